"""Per-worker memory of the model states under DeepSpeed ZeRO 0/1/2/3, measured, vs theory.

Each stage runs `cloze pretrain` (real Ray Train + DeepSpeed, gloo) with --workers workers on
the same synthetic shards; the worker loop writes `memory.json`: every rank's live tensor
bytes (each storage once) on its 2nd step after backward and before the optimizer update,
when parameters, gradients, optimizer states and ZeRO's partitions and buffers all exist,
and each rank's peak RSS. Theory (ZeRO paper, Psi parameters, N workers, Adam):

  mixed precision (paper):  16Psi | 4Psi + 12Psi/N | 2Psi + 14Psi/N | 16Psi/N
  fp32 (4-byte params and grads, Adam's two 4-byte moments = 8Psi, no master copy):
                            16Psi | 8Psi + 8Psi/N  | 4Psi + 12Psi/N | 16Psi/N

"Live tensors" also counts what the formulas leave out: DeepSpeed's communication buckets
(1 Mi elements each, see `deepspeed_config`), parameters that ZeRO-3 keeps whole (below
10 x hidden elements), unflattened full gradients still alive mid-step, and one batch.

Usage: python benchmarks/pretrain_memory.py [--preset small] [--workers 2] [--stages 0 1 2 3]
       [--precision fp32]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from common import machine  # noqa: E402
from pipelines.data.synthetic import synthetic_pair_shards  # noqa: E402
from pipelines.pretrain import PretrainConfig, pretrain  # noqa: E402

MiB = 2**20


def theory(stage: int, psi: int, n: int, precision: str) -> float:
    """Bytes of model states per worker (ZeRO paper; fp32: 4-byte params/grads, K = 8)."""
    if precision == "bf16":  # the paper's mixed-precision accounting (2-byte params/grads, K = 12)
        return [16 * psi, 4 * psi + 12 * psi / n, 2 * psi + 14 * psi / n, 16 * psi / n][stage]
    return [16 * psi, 8 * psi + 8 * psi / n, 4 * psi + 12 * psi / n, 16 * psi / n][stage]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--stages", type=int, nargs="+", default=[0, 1, 2, 3])
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--batch", type=int, default=4)
    args = ap.parse_args()

    import ray

    work = Path(tempfile.mkdtemp(prefix="cloze-bench-memory-"))
    data = synthetic_pair_shards(work / "data", rows=4 * args.batch * args.workers, shards=2,
                                 vocab_size=args.vocab, max_len=128)
    ray.init(num_cpus=max(2, args.workers), include_dashboard=False, log_to_driver=False,
             _node_ip_address="127.0.0.1")
    rows = []
    for stage in args.stages:
        cfg = PretrainConfig.from_dict({
            "data": str(data), "storage_path": str(work / "runs"), "name": f"zero{stage}-{args.precision}",
            "model": {"preset": args.preset, "vocab_size": args.vocab}, "objectives": {"mlm": 1.0, "nsp": 1.0},
            "batch_size_per_worker": args.batch, "num_workers": args.workers,
            "cpus_per_worker": max(2, args.workers) / args.workers, "max_steps": 3, "zero_stage": stage,
            "precision": args.precision, "seed": 0, "max_seq_len": 128})
        result = pretrain(cfg, progress=False, log=lambda *_: None)
        mem = json.loads((Path(result.run_dir) / "memory.json").read_text())
        rows.append((stage, mem))
        print(f"ZeRO-{stage}: {json.dumps(mem)}", flush=True)
    ray.shutdown()

    psi = rows[0][1]["parameters"]
    n = args.workers
    base = statistics.median(rows[0][1]["live_tensor_bytes"]) if rows[0][0] == 0 else None
    print(f"\n{machine()}")
    print(f"preset {args.preset} (vocab {args.vocab}), Psi = {psi:,} parameters, {n} workers, {args.precision}, "
          f"batch {args.batch} x <= 128 tokens per worker")
    print("| ZeRO | measured MiB / worker (live tensors) | theory MiB | measured / theory | "
          "measured / ZeRO-0 | peak RSS MiB / worker |")
    print("|---|---|---|---|---|---|")
    for stage, mem in rows:
        live = statistics.median(mem["live_tensor_bytes"])
        paper = theory(stage, psi, n, args.precision)
        ratio = f"{live / base:.2f}x" if base else "-"
        print(f"| {stage} | {live / MiB:.1f} (ranks: {', '.join(f'{b / MiB:.1f}' for b in mem['live_tensor_bytes'])}) "
              f"| {paper / MiB:.1f} | {live / paper:.2f} | {ratio} | "
              f"{statistics.median(mem['max_rss_bytes']) / MiB:.0f} |")


if __name__ == "__main__":
    main()
