"""Where a ZeRO step's time goes at world size 1: one process, no Ray, the same batches.

Variants (interleaved, --repeats times; per variant the median step time after 4 warm-up
steps): a bare PyTorch loop (forward, backward, clip, AdamW), and DeepSpeed engines built
from cloze's own `cluster/deepspeed/zero<k>.json` (`deepspeed_config`) for ZeRO 0, 1 and 2,
plus ZeRO-2 with `contiguous_gradients` off. One CPU thread, gloo, world size 1.

Usage: python benchmarks/deepspeed_step.py [--preset mini] [--batch 8] [--repeats 3]
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
os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
os.environ.setdefault("MASTER_PORT", "29533")

import torch  # noqa: E402

from common import machine, run_batches, summary  # noqa: E402
from pipelines.data.synthetic import synthetic_pair_shards  # noqa: E402
from pipelines.pretrain import PretrainConfig, resolve  # noqa: E402
from pipelines.train.config import torch_extensions_dir  # noqa: E402
from pipelines.train.optim import deepspeed_config, param_groups  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="mini")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    os.environ.setdefault("TORCH_EXTENSIONS_DIR", torch_extensions_dir())
    torch.set_num_threads(1)
    import deepspeed
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=0, world_size=1)
    work = Path(tempfile.mkdtemp(prefix="cloze-bench-dsstep-"))
    data = synthetic_pair_shards(work / "data", rows=args.steps * args.batch, shards=2, vocab_size=8192, max_len=128)
    base = {"data": str(data), "model": {"preset": args.preset, "vocab_size": 8192},
            "objectives": {"mlm": 1.0, "nsp": 1.0}, "batch_size_per_worker": args.batch, "num_workers": 1,
            "max_steps": args.steps, "zero_stage": 0}
    cfg = PretrainConfig.from_dict(base)
    batches = run_batches(resolve(cfg), args.steps)

    def bare() -> float:
        torch.manual_seed(cfg.seed)
        model = resolve(cfg).build_model()
        opt = torch.optim.AdamW(param_groups(model, 0.01), lr=1e-4)
        times = []
        for b in batches:
            t = time.perf_counter()
            model(b).loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - t)
        return statistics.median(times[4:])

    def engine(stage: int, contiguous: bool = True) -> float:
        c = PretrainConfig.from_dict({**base, "zero_stage": stage})
        conf = deepspeed_config(c, c.encoder_config().hidden_size)
        if not contiguous:
            conf["zero_optimization"]["contiguous_gradients"] = False
        torch.manual_seed(c.seed)
        model = resolve(c).build_model()
        opt = torch.optim.AdamW(param_groups(model, 0.01), lr=1e-4)
        eng, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=conf)
        times = []
        for b in batches:
            t = time.perf_counter()
            out = eng(b)
            eng.backward(out.loss)
            eng.step()
            times.append(time.perf_counter() - t)
        return statistics.median(times[4:])

    variants = {"bare PyTorch loop": bare, "DeepSpeed ZeRO-0": lambda: engine(0), "DeepSpeed ZeRO-1": lambda: engine(1),
                "DeepSpeed ZeRO-2": lambda: engine(2),
                "DeepSpeed ZeRO-2, contiguous_gradients off": lambda: engine(2, contiguous=False)}
    results: dict[str, list[float]] = {k: [] for k in variants}
    for r in range(args.repeats):
        for name, fn in variants.items():
            results[name].append(fn() * 1e3)
        print(f"repeat {r}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in results.items()), flush=True)
    bare_ms = results["bare PyTorch loop"]
    print(f"\n{machine()}\npreset {args.preset} (vocab 8192), batch {args.batch}, 1 thread, world size 1, "
          f"{args.repeats} interleaved repeats: ms/step median [min-max], ratio to the bare loop")
    for name, values in results.items():
        print(f"{name:44s} {summary(values)} ms   {summary([v / b for v, b in zip(values, bare_ms)])} x")


if __name__ == "__main__":
    main()
