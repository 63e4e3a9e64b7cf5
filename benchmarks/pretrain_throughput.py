"""Pretraining throughput and MFU on this machine's CPUs, and 1 -> 2 worker scaling.

Every run is `cloze pretrain` (Ray Train + DeepSpeed ZeRO-2, gloo, MLM + NSP) on the same
synthetic shards (rows of up to 128 tokens, a uniform length mix). The worker's per-step
metrics give real tokens/s and MFU = encoder-layer training FLOPs (6 x MACs of the dense
layers + attention, `encoder.flops_per_token`; embeddings and heads not counted) per second
over the peak, measured by an fp32 GEMM probe (best of 10 short timings) that the driver
runs once with a worker's thread count before the workers start.
Per run: the median over the steps after --warmup; runs repeat --repeats times.

  mfu      presets (default small, base) on 1 worker that holds every CPU (all threads)
  scaling  the same global batch on 1 worker x all CPUs vs 2 workers x half the CPUs

Usage: python benchmarks/pretrain_throughput.py [--presets small base] [--repeats 2]
       [--steps 12] [--skip-scaling] [--skip-mfu]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_worker_niceness", "0")  # see benchmarks/pairs.py

from common import machine, summary  # noqa: E402
from pipelines.data.synthetic import synthetic_pair_shards  # noqa: E402
from pipelines.pretrain import PretrainConfig, pretrain, read_metrics  # noqa: E402
from pipelines.train.metrics import gemm_peak_flops  # noqa: E402


def run(data: Path, work: Path, name: str, preset: str, vocab: int, workers: int, cpus: int, batch: int,
        steps: int, warmup: int) -> dict[str, float]:
    cfg = PretrainConfig.from_dict({
        "data": str(data), "storage_path": str(work / "runs"), "name": name,
        "model": {"preset": preset, "vocab_size": vocab}, "objectives": {"mlm": 1.0, "nsp": 1.0},
        "batch_size_per_worker": batch // workers, "num_workers": workers, "cpus_per_worker": cpus / workers,
        "max_steps": steps, "zero_stage": 2, "seed": 0, "max_seq_len": 128})
    result = pretrain(cfg, progress=False, log=lambda *_: None)
    rows = read_metrics(result.run_dir)[warmup:]
    return {k: statistics.median(r[k] for r in rows) for k in ("tokens_per_s", "samples_per_s", "mfu", "step_time_s")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["small", "base"])
    ap.add_argument("--vocab", type=int, default=30522)
    ap.add_argument("--batch", type=int, default=16, help="global batch (rows)")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--scaling-preset", default="small")
    ap.add_argument("--skip-mfu", action="store_true")
    ap.add_argument("--skip-scaling", action="store_true")
    args = ap.parse_args()

    import ray
    import torch

    cpus = os.cpu_count() or 2
    work = Path(tempfile.mkdtemp(prefix="cloze-bench-throughput-"))
    data = synthetic_pair_shards(work / "data", rows=args.steps * args.batch, shards=2, vocab_size=args.vocab,
                                 max_len=128)
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    torch.set_num_threads(cpus)
    probe = gemm_peak_flops()
    lines = [f"{machine()}", f"driver GEMM probe ({cpus} threads, fp32 1024^3): {probe / 1e9:.1f} GFLOP/s",
             f"global batch {args.batch} rows of <= 128 tokens, vocab {args.vocab}, MLM + NSP, ZeRO-2, "
             f"{args.steps} steps (first {args.warmup} dropped), {args.repeats} repeats: median [min-max]"]
    if not args.skip_mfu:
        for preset in args.presets:
            res = [run(data, work, f"mfu-{preset}-{r}", preset, args.vocab, 1, cpus, args.batch, args.steps,
                       args.warmup) for r in range(args.repeats)]
            for r in res:
                print(f"  {preset}: {r}", flush=True)
            lines.append(f"{preset:6s} 1 worker x {cpus} CPUs: {summary([r['tokens_per_s'] for r in res])} tokens/s, "
                         f"{summary([r['step_time_s'] for r in res])} s/step, "
                         f"MFU {summary([100 * r['mfu'] for r in res])} %")
    if not args.skip_scaling:
        p = args.scaling_preset
        one, two = [], []
        for r in range(args.repeats):
            one.append(run(data, work, f"scale1-{r}", p, args.vocab, 1, cpus, args.batch, args.steps, args.warmup))
            two.append(run(data, work, f"scale2-{r}", p, args.vocab, 2, cpus, args.batch, args.steps, args.warmup))
            print(f"  repeat {r}: 1 worker {one[-1]}, 2 workers {two[-1]}", flush=True)
        ratio = [b["tokens_per_s"] / a["tokens_per_s"] for a, b in zip(one, two)]
        lines += [f"scaling, {p}, global batch {args.batch}:",
                  f"  1 worker x {cpus} CPUs:       {summary([r['tokens_per_s'] for r in one])} tokens/s, "
                  f"MFU {summary([100 * r['mfu'] for r in one])} %",
                  f"  2 workers x {cpus // 2} CPU(s):    {summary([r['tokens_per_s'] for r in two])} tokens/s, "
                  f"MFU {summary([100 * r['mfu'] for r in two])} %",
                  f"  2 workers / 1 worker:    {summary(ratio)} x"]
    ray.shutdown()
    print("\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
