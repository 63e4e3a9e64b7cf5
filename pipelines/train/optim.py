"""AdamW with a warmup + decay schedule, handed to DeepSpeed with a ZeRO config filled from
the run config (`cluster/deepspeed/zero<stage>.json`)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from .config import TrainConfig

DEEPSPEED_DIR = Path(__file__).resolve().parents[2] / "cluster" / "deepspeed"


def deepspeed_config(cfg: TrainConfig, hidden_size: int) -> dict:
    """`cluster/deepspeed/zero<stage>.json` with its "auto" values filled from the run config."""
    template = json.loads((DEEPSPEED_DIR / f"zero{cfg.zero_stage}.json").read_text())
    values = {
        "train_batch_size": cfg.effective_global_batch,
        "train_micro_batch_size_per_gpu": cfg.batch_size_per_worker,
        "gradient_accumulation_steps": cfg.accumulation,
        "gradient_clipping": cfg.optimizer.grad_clip,
        "bf16.enabled": cfg.precision == "bf16",
        "zero_optimization.offload_optimizer.device": "cpu" if cfg.offload_optimizer else "none",
    }
    # Buffer sizes from the model's width, as HF's DeepSpeed integration does (H^2 elements),
    # with a 1 Mi-element floor: DeepSpeed allocates some of them whole, so a fixed 5e7 (200 MB
    # in fp32) dwarfed the model states of small models and hid ZeRO-3's saving.
    bucket = max(hidden_size * hidden_size, 2**20)
    values.update({"zero_optimization.reduce_bucket_size": bucket, "zero_optimization.allgather_bucket_size": bucket,
                   "zero_optimization.stage3_prefetch_bucket_size": bucket,
                   "zero_optimization.stage3_param_persistence_threshold": 10 * hidden_size})

    def fill(node: dict, prefix: str) -> dict:
        out = {}
        for key, value in node.items():
            dotted = prefix + key
            if isinstance(value, dict):
                out[key] = fill(value, dotted + ".")
            elif value == "auto":
                if dotted not in values:
                    raise KeyError(f"zero{cfg.zero_stage}.json: no run-config value for {dotted}")
                out[key] = values[dotted]
            else:
                out[key] = value
        return out

    return fill(template, "")


def param_groups(model: torch.nn.Module, weight_decay: float, is_encoder=None, encoder: dict | None = None,
                 head: dict | None = None) -> list[dict]:
    """Weight decay on matrices only: LayerNorm weights and biases (all 1-d tensors) get none.
    Frozen parameters (requires_grad False) are left out. With `is_encoder(name)`, the
    encoder's groups (first: the core logs the first group's lr) carry the keys of `encoder`
    and the rest the keys of `head` (e.g. their own "lr", or the schedule's "hold_steps")."""
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():  # tied weights are listed once
        if p.requires_grad:
            groups.setdefault((is_encoder is None or is_encoder(name), p.ndim >= 2), []).append(p)
    extra = {True: encoder or {}, False: head or {}}
    return [{"params": ps, "weight_decay": weight_decay if matrix else 0.0, **extra[enc]}
            for (enc, matrix), ps in sorted(groups.items(), key=lambda kv: kv[0], reverse=True)]


class WarmupDecay:
    """lr multiplier at optimizer step s: linear warmup, then linear / cosine / no decay.
    With `hold` > 0 the multiplier is 0 for the first `hold` steps and the schedule (warmup,
    then decay to `total`) starts after them: a group held while fresh heads warm up.

    A class, not a lambda, so LambdaLR's state_dict (saved in checkpoints) carries it."""

    def __init__(self, warmup: int, total: int, decay: str, min_ratio: float, hold: int = 0):
        self.warmup, self.total, self.decay, self.min_ratio = warmup, total - hold, decay, min_ratio
        self.hold = hold

    def __call__(self, step: int) -> float:
        if step < self.hold:
            return 0.0
        step -= self.hold
        if step < self.warmup:
            return (step + 1) / self.warmup
        if self.decay == "constant":
            return 1.0
        frac = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        shape = 1.0 - frac if self.decay == "linear" else 0.5 * (1.0 + math.cos(math.pi * frac))
        return self.min_ratio + (1.0 - self.min_ratio) * shape


def build_engine(model: torch.nn.Module, groups: list[dict], cfg: TrainConfig, ds_config: dict):
    """(engine, schedule): a client AdamW (no JIT-built DeepSpeed Adam) + LambdaLR, wrapped.
    A group may carry `hold_steps`: its lr is 0 for that many steps (AdamW's decoupled weight
    decay scales with lr, so those weights do not move), then its warmup + decay begins.
    The AdamW is torch's fused kernel (CPU and CUDA): one pass over each flat ZeRO partition
    instead of a loop of small ops, 9-11% of a fine-tuning step on CPU (BENCHMARKS)."""
    import deepspeed

    opt = cfg.optimizer
    optimizer = torch.optim.AdamW(groups, lr=opt.lr, betas=(opt.beta1, opt.beta2), eps=opt.eps, fused=True)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, [
        WarmupDecay(opt.warmup_steps, cfg.max_steps, opt.decay, opt.min_lr_ratio, hold=g.get("hold_steps", 0))
        for g in groups])
    engine, _, _, schedule = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=schedule,
                                                  config=ds_config)
    return engine, schedule
