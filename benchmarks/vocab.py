"""Vocabulary training: cloze (Ray Data word counts, deterministic WordPiece) vs the Rust
`tokenizers` WordPieceTrainer, on 20 Newsgroups x N (data.replicate).

  cloze     pipelines.data.vocab.stage_tokenizer: Ray tasks read, normalize and count each
            unit's words; the driver sums per-unit counts (capped at vocab_max_words) and
            learns the vocabulary (Python BPE merges with fixed tie-breaking).
  rust      the same units' documents read in the driver (read_unit, unit order) and streamed
            into Tokenizer.train_from_iterator(WordPieceTrainer) with the same BERT normalizer
            and pre-tokenizer, vocab_size and min_frequency; its own threads (rayon) on every
            core. The raw texts go in (its normalizer does the cleaning).

Every repeat of each variant runs in a fresh process (interleaved: cloze, rust, cloze, ...),
so the peak driver RSS is that run's own: RSS of the driver process sampled every 20 ms
over the timed region (Ray workers are separate processes and not counted; the point is
what the driver has to hold). The Ray start is outside the timed region. Both vocabularies
then encode the same 2,000 documents: token counts show they are comparable.

Usage: python benchmarks/vocab.py [--replicate 10] [--repeats 3] [--vocab-size 8192]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_worker_niceness", "0")  # Ray's workers at the driver's priority
sys.path.insert(0, str(Path(__file__).resolve().parent))

HERE = Path(__file__).resolve()


def peak_rss():
    """Peak RSS of this process (the driver) over a `with` block, sampled every 20 ms."""
    import psutil

    from pairs import PeakMemory

    me = psutil.Process()
    return PeakMemory(0.02, measure=lambda: me.memory_info().rss)


def config(replicate: int, vocab_size: int):
    from pipelines.data.config import DataConfig

    return DataConfig(inputs=("20ng",), replicate=replicate, vocab_size=vocab_size, min_frequency=2, output="")


def sample_texts(cfg, n: int = 2000) -> list[str]:
    from pipelines.data.corpus import plan_units, read_unit

    out: list[str] = []
    for unit in sorted(plan_units(cfg).units, key=lambda u: u.key):
        if unit.key.startswith("0:"):  # copy 0 only
            out += read_unit(unit, cfg).texts
        if len(out) >= n:
            break
    return out[:n]


def child(variant: str, replicate: int, vocab_size: int, out: str) -> None:
    """One timed run in this (fresh) process; writes its tokenizer to `out` and prints JSON."""
    from pipelines.data.corpus import plan_units, read_unit
    from pipelines.data.tokenizer import SPECIAL_TOKENS, _bert_pipeline

    cfg = config(replicate, vocab_size)
    plan = plan_units(cfg)  # unpacks 20NG once (cached), lists the units
    if variant == "cloze":
        import ray

        from pipelines.data.pairs import default_blocks
        from pipelines.data.vocab import stage_tokenizer

        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1",
                 runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false", "RAY_USAGE_STATS_ENABLED": "0"}})
        workers = int(ray.cluster_resources()["CPU"])
        blocks = default_blocks(len(plan.units), workers)

        def dataset(units):
            return ray.data.from_items([{"unit": u.to_json()} for u in units], override_num_blocks=blocks)

        with peak_rss() as rss:
            t = time.perf_counter()
            tok = stage_tokenizer(cfg, plan.units, dataset, ray.data.TaskPoolStrategy(size=workers))
            dt = time.perf_counter() - t
    else:
        from tokenizers import Tokenizer, models, trainers

        with peak_rss() as rss:
            t = time.perf_counter()
            tok = _bert_pipeline(Tokenizer(models.WordPiece(unk_token="[UNK]", continuing_subword_prefix="##")), True)
            texts = (text for unit in plan.units for text in read_unit(unit, cfg).texts)
            tok.train_from_iterator(texts, trainer=trainers.WordPieceTrainer(
                vocab_size=vocab_size, min_frequency=2, special_tokens=list(SPECIAL_TOKENS),
                continuing_subword_prefix="##", show_progress=False))
            dt = time.perf_counter() - t
    tok.save(out)
    print(json.dumps({"variant": variant, "seconds": dt, "peak_rss": rss.peak, "start_rss": rss.start,
                      "vocab_size": tok.get_vocab_size(), "units": len(plan.units)}), flush=True)


def run_child(variant: str, args, out: str) -> dict:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "true" if variant == "rust" else "false"}
    proc = subprocess.run([sys.executable, str(HERE), "--child", variant, "--replicate", str(args.replicate),
                           "--vocab-size", str(args.vocab_size), "--out", out], env=env, capture_output=True,
                          text=True, timeout=1800)
    if proc.returncode:
        raise RuntimeError(f"{variant} run failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--replicate", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--child", choices=("cloze", "rust"))
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    if args.child:
        child(args.child, args.replicate, args.vocab_size, args.out)
        return
    import tempfile

    from tokenizers import Tokenizer

    from common import machine, summary

    print(f"machine: {machine()}, load average {os.getloadavg()[0]:.1f} at start", flush=True)
    work = Path(tempfile.mkdtemp(prefix="cloze-vocab-bench-"))
    results: dict[str, list[dict]] = {"cloze": [], "rust": []}
    hashes: dict[str, set] = {"cloze": set(), "rust": set()}
    for r in range(args.repeats):
        for variant in ("cloze", "rust"):
            out = str(work / f"{variant}{r}.json")
            res = run_child(variant, args, out)
            results[variant].append(res)
            hashes[variant].add(Path(out).read_text())
            print(f"  repeat {r} {variant}: {res['seconds']:.1f} s, peak driver RSS {res['peak_rss'] / 2**20:.0f} MiB "
                  f"(+{(res['peak_rss'] - res['start_rss']) / 2**20:.0f} MiB over the run's start), "
                  f"vocabulary {res['vocab_size']}, load average {os.getloadavg()[0]:.1f}", flush=True)
    units = results["cloze"][0]["units"]
    print(f"20 Newsgroups x{args.replicate} ({units} units), vocab_size {args.vocab_size}, min_frequency 2, "
          f"{args.repeats} interleaved repeats, fresh process each:")
    for variant, label in (("cloze", "cloze (Ray Data counts)"), ("rust", "Rust WordPieceTrainer")):
        rs = results[variant]
        print(f"{label:26s} time {summary([x['seconds'] for x in rs])} s, peak driver RSS "
              f"{summary([x['peak_rss'] / 2**20 for x in rs])} MiB, growth over the run "
              f"{summary([(x['peak_rss'] - x['start_rss']) / 2**20 for x in rs])} MiB; "
              f"{len(hashes[variant])} distinct vocabularies in {len(rs)} runs")
    ratio = [a["seconds"] / b["seconds"] for a, b in zip(results["rust"], results["cloze"])]
    print(f"speed-up (rust time / cloze time): {summary(ratio)} x")
    texts = sample_texts(config(args.replicate, args.vocab_size))
    for variant in ("cloze", "rust"):
        tok = Tokenizer.from_file(str(work / f"{variant}0.json"))
        enc = tok.encode_batch(texts, add_special_tokens=False)
        print(f"{variant}: {sum(len(e.ids) for e in enc)} tokens for {len(texts)} documents "
              f"({sum(e.ids.count(tok.token_to_id('[UNK]')) for e in enc)} [UNK])")


if __name__ == "__main__":
    main()
