"""What every training run needs, whatever it learns: batch sizes, steps, optimizer, ZeRO,
workers, checkpoints, logging. A task's config (pretraining, fine-tuning) is a subclass
that adds its own fields; `build_dataclass` names a bad key as `<table>.<key>`."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from ..config import ConfigError, build_dataclass


@dataclass(frozen=True, kw_only=True)
class OptimizerConfig:
    """AdamW; lr warms up linearly for `warmup_steps`, then decays to min_lr_ratio x lr."""

    lr: float = 5e-4
    weight_decay: float = 0.01  # not applied to LayerNorm weights and biases
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-6
    warmup_steps: int = 0
    decay: str = "linear"  # linear | cosine | constant
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0  # 0 = off

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if self.weight_decay < 0 or self.warmup_steps < 0 or self.grad_clip < 0:
            raise ConfigError("weight_decay, warmup_steps and grad_clip must be >= 0")
        if self.decay not in ("linear", "cosine", "constant"):
            raise ConfigError(f"decay must be linear, cosine or constant, got {self.decay!r}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """The task-agnostic part of a run (the training core's settings)."""

    storage_path: str = "runs"  # local folder, a shared filesystem, or s3:// / gs:// URI
    shared_filesystem: bool = False  # storage_path is a local path every node sees (NFS, ...): multi-node OK
    name: str = "run"
    output: str = ""  # where the exported model folder goes; "" = <storage_path>/<name>/model
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    batch_size_per_worker: int = 8
    global_batch_size: int = 0  # 0 = batch_size_per_worker x num_workers (no accumulation)
    max_steps: int = 100  # optimizer steps
    max_tokens: int = 0  # also stop after this many real (non-pad) tokens; 0 = off
    shuffle_buffer: int = 4096  # rows shuffled together within a rank's share (seeded per epoch); 0 = off
    prefetch_batches: int = 4  # batches read + collated ahead by the loader thread
    precision: str = "fp32"  # fp32 | bf16
    zero_stage: int = 2
    offload_optimizer: bool = False  # optimizer states in CPU memory (ZeRO 1-3)
    num_workers: int = 2
    cpus_per_worker: float = 1.0
    use_gpu: bool = False
    gpus_per_worker: float = 1.0
    seed: int = 0
    # steps between metric rows (metrics.csv, TensorBoard, progress bar): metrics stay on the
    # device and are all-reduced once per row, so a GPU is never synced per micro-batch
    log_every: int = 1
    # steps between metric-only ray.train.report calls; 0 = only with checkpoints (Ray Train
    # 2.60 drains a 1-slot report queue every 2 s: reporting every step costs ~2 s/step)
    report_every: int = 0
    checkpoint_every: int = 0  # steps; 0 = only at the end
    keep_checkpoints: int = 2
    max_failures: int = 0  # worker failures Ray Train recovers from (from the last checkpoint)
    eval_batches: int = 8  # held-out global batches per evaluation
    # model selection: keep the weights of the best evaluation of this metric (e.g. "eval/f1",
    # higher is better; a name ending in "loss" is lower-better) as the export; "" = the last weights
    select_metric: str = ""
    patience: int = 0  # evaluations without improvement of select_metric before stopping; 0 = never stop early

    def __post_init__(self) -> None:
        checks = [
            ("zero_stage", self.zero_stage in (0, 1, 2, 3), "must be 0, 1, 2 or 3"),
            ("precision", self.precision in ("fp32", "bf16"), "must be fp32 or bf16"),
            ("num_workers", self.num_workers >= 1, "must be >= 1"),
            ("cpus_per_worker", self.cpus_per_worker > 0, "must be > 0"),
            ("gpus_per_worker", self.gpus_per_worker > 0, "must be > 0"),
            ("batch_size_per_worker", self.batch_size_per_worker >= 1, "must be >= 1"),
            ("global_batch_size", self.global_batch_size >= 0, "must be >= 0"),
            ("max_steps", self.max_steps >= 1, "must be >= 1"),
            ("max_tokens", self.max_tokens >= 0, "must be >= 0"),
            ("shuffle_buffer", self.shuffle_buffer >= 0, "must be >= 0"),
            ("prefetch_batches", self.prefetch_batches >= 1, "must be >= 1"),
            ("log_every", self.log_every >= 1, "must be >= 1"),
            ("report_every", self.report_every >= 0, "must be >= 0"),
            ("checkpoint_every", self.checkpoint_every >= 0, "must be >= 0"),
            ("keep_checkpoints", self.keep_checkpoints >= 1, "must be >= 1"),
            ("max_failures", self.max_failures >= -1, "must be >= -1 (-1 = unlimited)"),
            ("eval_batches", self.eval_batches >= 1, "must be >= 1"),
            ("patience", self.patience >= 0, "must be >= 0"),
            ("name", bool(self.name) and "/" not in self.name, "must be a non-empty folder name"),
        ]
        for key, ok, why in checks:
            if not ok:
                raise ConfigError(f"{key} {why}, got {getattr(self, key)!r}")
        unit = self.batch_size_per_worker * self.num_workers
        if self.global_batch_size % unit:
            raise ConfigError(
                f"global_batch_size ({self.global_batch_size}) must be divisible by batch_size_per_worker x "
                f"num_workers ({self.batch_size_per_worker} x {self.num_workers} = {unit})")
        if self.patience and not self.select_metric:
            raise ConfigError("patience needs select_metric (the evaluation metric to watch)")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ConfigError("offload_optimizer needs zero_stage 1, 2 or 3")

    @property
    def accumulation(self) -> int:
        """Gradient accumulation steps derived from the global batch."""
        return max(1, self.global_batch_size // (self.batch_size_per_worker * self.num_workers))

    @property
    def effective_global_batch(self) -> int:
        return self.batch_size_per_worker * self.num_workers * self.accumulation

    @property
    def remote(self) -> bool:
        return "://" in self.storage_path

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, table: Mapping[str, Any], prefix: str = ""):
        return build_dataclass(cls, table, prefix)

    @classmethod
    def load_run(cls, run_dir: str | os.PathLike):
        """The config a run folder (local or URI) was started with, re-rooted at where the
        folder is now (for --resume)."""
        from ..storage import join_path, read_bytes, split_query

        run_dir = str(run_dir)
        body = read_bytes(join_path(run_dir, "config.json"))
        if body is None:
            raise ConfigError(f"resume: {run_dir} is not a run folder (no config.json)")
        table = json.loads(body)
        if "://" in run_dir:
            head, query = split_query(run_dir)
            parent, _, name = head.rstrip("/").rpartition("/")
            table.update(storage_path=parent + query, name=name)
        else:
            path = Path(run_dir).resolve()
            table.update(storage_path=str(path.parent), name=path.name)
        return cls.from_dict(table)

    # local path fields of the config (made absolute before workers start: they run elsewhere)
    PATH_FIELDS = ("storage_path", "output")

    def absolute(self):
        """The config with its local paths made absolute (URIs and empty values stay)."""
        changes = {}
        for key in self.PATH_FIELDS:
            value = getattr(self, key)
            if value and "://" not in value:
                changes[key] = str(Path(value).expanduser().resolve())
        return dataclasses.replace(self, **changes)


def check_resources(cfg: TrainConfig, available_cpus: float, available_gpus: float = 0.0) -> None:
    """Raise ConfigError if the cluster cannot place the workers (before Ray starts any)."""
    need = cfg.num_workers * cfg.cpus_per_worker
    if need > available_cpus + 1e-9:
        raise ConfigError(f"num_workers x cpus_per_worker = {cfg.num_workers} x {cfg.cpus_per_worker} = {need:g} "
                          f"CPUs, but the cluster has {available_cpus:g}")
    if cfg.use_gpu and cfg.num_workers * cfg.gpus_per_worker > available_gpus + 1e-9:
        raise ConfigError(f"use_gpu: {cfg.num_workers} workers x {cfg.gpus_per_worker} GPUs, "
                          f"but the cluster has {available_gpus:g}")


def check_storage(cfg: TrainConfig, alive_nodes: int, inputs: list[str] = ()) -> None:
    """A multi-node cluster needs storage every node sees: a URI, or a declared shared path.
    A plain local path would scatter checkpoints and metrics across the nodes' own disks, and
    workers on other nodes would not find local inputs."""
    if alive_nodes < 2 or cfg.shared_filesystem:
        return
    if not cfg.remote:
        raise ConfigError(
            f"storage_path {cfg.storage_path!r} is a local path but the cluster has {alive_nodes} nodes: give a "
            f"URI (s3://, gs://) or set shared_filesystem = true for a path every node mounts")
    local = [p for p in inputs if "://" not in p]
    if local:
        raise ConfigError(f"{local[0]!r} is a local path but the cluster has {alive_nodes} nodes: workers on the "
                          f"other nodes cannot read it; give a URI or set shared_filesystem = true")


def torch_extensions_dir() -> str:
    """Where DeepSpeed's JIT ops are cached across runs (so the shm op builds once, not per run)."""
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return os.environ["TORCH_EXTENSIONS_DIR"]
    repo = Path(__file__).resolve().parents[2]
    if os.access(repo, os.W_OK) and (repo / "pyproject.toml").is_file():
        return str(repo / ".torch_extensions")
    return str(Path.home() / ".cache" / "cloze" / "torch_extensions")
