"""What Ray Train + DeepSpeed ZeRO-2 cost per step, at 1 worker, vs a bare PyTorch loop.

Both sides train the same model (MLM + NSP) on the same Parquet pair shards, collated by the
same collator, with AdamW + the same lr schedule, on one CPU thread (a Ray worker with
1 CPU gets OMP_NUM_THREADS=1). Per-step time is the median wall-clock interval between
consecutive steps after --warmup steps: for `cloze pretrain` it includes data iteration,
the DeepSpeed step, the metrics all-reduce/CSV row and `ray.train.report`; its fixed
start-up cost (Ray Train workers, DeepSpeed init, export) is reported separately.
The two sides alternate, --repeats times each.

Usage: python benchmarks/pretrain_overhead.py [--preset mini] [--steps 30] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_worker_niceness", "0")  # Ray's default 15 loses every race on a shared machine (pairs.py)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from common import machine, run_batches, summary  # noqa: E402
from pipelines.data.synthetic import synthetic_pair_shards  # noqa: E402
from pipelines.pretrain import PretrainConfig, pretrain, read_metrics, resolve  # noqa: E402
from pipelines.train.optim import WarmupDecay, param_groups  # noqa: E402


def bare_loop(cfg: PretrainConfig) -> list[float]:
    """Step end times of a plain loop: same model, data, collator, optimizer, schedule."""
    torch.set_num_threads(1)
    task = resolve(cfg)
    torch.manual_seed(cfg.seed)
    model = task.build_model()
    opt = torch.optim.AdamW(param_groups(model, cfg.optimizer.weight_decay), lr=cfg.optimizer.lr,
                            betas=(cfg.optimizer.beta1, cfg.optimizer.beta2), eps=cfg.optimizer.eps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, WarmupDecay(cfg.optimizer.warmup_steps, cfg.max_steps,
                                                               cfg.optimizer.decay, cfg.optimizer.min_lr_ratio))
    times = []
    for batch in run_batches(task, cfg.max_steps):
        loss = model(batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optimizer.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.time())
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="mini")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    import ray

    work = Path(tempfile.mkdtemp(prefix="cloze-bench-pretrain-"))
    data = synthetic_pair_shards(work / "data", rows=args.steps * args.batch, shards=2, vocab_size=8192, max_len=128)
    base = {"data": str(data), "storage_path": str(work / "runs"), "model": {"preset": args.preset, "vocab_size": 8192},
            "objectives": {"mlm": 1.0, "nsp": 1.0}, "batch_size_per_worker": args.batch, "num_workers": 1,
            "cpus_per_worker": 1.0, "max_steps": args.steps, "zero_stage": 2, "seed": 0, "max_seq_len": 128}
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=256 * 2**20, log_to_driver=False,
             _node_ip_address="127.0.0.1")
    bare_steps, ray_steps, fixed = [], [], []
    for r in range(args.repeats):
        cfg = PretrainConfig.from_dict({**base, "name": f"bare{r}"})
        t = bare_loop(cfg)
        bare_steps.append(statistics.median(np.diff(t[args.warmup:])))
        cfg = PretrainConfig.from_dict({**base, "name": f"ray{r}"})
        t0 = time.time()
        result = pretrain(cfg, progress=False, log=lambda *_: None)
        total = time.time() - t0
        rows = read_metrics(result.run_dir)
        t = [row["time"] for row in rows]
        ray_steps.append(statistics.median(np.diff(t[args.warmup:])))
        fixed.append(total - (t[-1] - t[0]))
        print(f"repeat {r}: bare {bare_steps[-1] * 1e3:.1f} ms/step, TorchTrainer+ZeRO-2 "
              f"{ray_steps[-1] * 1e3:.1f} ms/step, fixed {fixed[-1]:.1f} s", flush=True)
    ray.shutdown()
    ratio = [a / b for a, b in zip(ray_steps, bare_steps)]
    print(f"\n{machine()}")
    print(f"preset {args.preset} (vocab 8192), batch {args.batch}, seq <= 128, {args.steps} steps "
          f"(first {args.warmup} dropped), {args.repeats} interleaved repeats: median [min-max]")
    print(f"bare PyTorch loop, 1 thread:      {summary([x * 1e3 for x in bare_steps])} ms/step")
    print(f"TorchTrainer + ZeRO-2, 1 worker:  {summary([x * 1e3 for x in ray_steps])} ms/step")
    print(f"per-step overhead ratio:          {summary(ratio)} x (goal <= 1.10)")
    print(f"fixed cost per run (start, init, export): {summary(fixed)} s")


if __name__ == "__main__":
    main()
