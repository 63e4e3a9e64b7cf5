"""The driver side of a run: check the run folder and the cluster, start Ray Train's
TorchTrainer with the task, show progress, and read the result.

Run folder (`storage_path/name`, a local path or a URI): `config.json`, Ray's
`checkpoint_*` folders (DeepSpeed state, sharded under ZeRO, trainer state, RNG, each
rank's data position, per-rank manifests), `metrics.csv`, `eval.csv`, `memory.json`, `tb/`
and `model/` (the export). With a URI, rank 0 writes the metrics files in a local staging
folder and copies them up at every checkpoint and at the end.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from ..config import ConfigError
from ..ray_session import start_ray
from ..storage import filesystem, join_path, read_bytes, to_uri, write_atomic
from .checkpoint import latest_valid_checkpoint
from .config import check_resources, check_storage, torch_extensions_dir
from .loop import train_loop_per_worker
from .metrics import cpu_peak_flops, read_metrics
from .optim import deepspeed_config
from .task import Callback, Task


@dataclass
class TrainResult:
    run_dir: str
    model_dir: str | None
    metrics: dict[str, float]
    checkpoint: str | None
    evals: list[dict[str, float]] = field(default_factory=list)  # eval.csv: held-out metrics by step
    resumed_from: str | None = None  # the checkpoint a resumed run started from


def _progress(run_dir: str, total: int, stop: threading.Event, desc: str) -> None:
    """tqdm bar with ETA, fed from metrics.csv while fit() runs."""
    from tqdm import tqdm

    bar = tqdm(total=total, desc=desc, unit="step")
    while not stop.wait(0.5 if "://" not in run_dir else 5.0):
        rows = read_metrics(run_dir)
        if rows:
            last = rows[-1]
            bar.n = int(last["step"])
            bar.set_postfix(loss=f"{last.get('loss', float('nan')):.3f}", tok_s=f"{last.get('tokens_per_s', 0):.0f}",
                            refresh=False)
            bar.refresh()
    rows = read_metrics(run_dir)
    bar.n = int(rows[-1]["step"]) if rows else bar.n
    bar.close()


def run_folder(cfg) -> str:
    return join_path(cfg.storage_path, cfg.name) if cfg.remote else str(Path(cfg.storage_path) / cfg.name)


def has_checkpoints(run_dir: str) -> bool:
    """Whether a run folder (local or URI) already holds checkpoint folders."""
    if "://" not in run_dir:
        return any(p.is_dir() for p in Path(run_dir).glob("checkpoint_*"))
    import pyarrow.fs as pafs

    fs, root = filesystem(run_dir)
    try:
        found = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    except (OSError, ValueError) as e:
        raise ConfigError(f"storage_path: cannot open {run_dir!r}: {e}") from None
    return any(i.type == pafs.FileType.Directory and i.base_name.startswith("checkpoint_") for i in found)


def fit(task: Task, resume: str | os.PathLike | None = None, progress: bool = True, log=print,
        callbacks: Sequence[Callback] = ()) -> TrainResult:
    """Launch one run of `task` (its config already checked) and wait for it.
    `resume`: an existing run folder (local or URI), continued from its newest complete checkpoint."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    cfg = task.config
    run_dir = run_folder(cfg)
    resume_from = None
    if resume is not None:
        if read_bytes(join_path(run_dir, "config.json")) is None:
            raise ConfigError(f"resume: {run_dir} is not a run folder (no config.json)")
        resume_from = latest_valid_checkpoint(run_dir, log=log)
        log(f"cloze {task.name}: resuming {run_dir} from {resume_from or 'the start (no complete checkpoint)'}")
    elif has_checkpoints(run_dir):
        raise ConfigError(f"run folder {run_dir} already has checkpoints: pass --resume {run_dir} or pick another name")

    start_ray(log, f"cloze {task.name}")
    res = ray.cluster_resources()
    check_resources(cfg, res.get("CPU", 0.0), res.get("GPU", 0.0))
    check_storage(cfg, sum(1 for n in ray.nodes() if n.get("Alive")), task.input_paths())
    ds_config = deepspeed_config(cfg, task.hidden_size())

    if not cfg.remote:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
    write_atomic(join_path(run_dir, "config.json"), json.dumps(cfg.to_dict(), indent=2).encode())
    ext_dir = torch_extensions_dir()
    Path(ext_dir).mkdir(parents=True, exist_ok=True)
    run = {"run_dir": run_dir, "metrics_dir": None if cfg.remote else run_dir, "sync_dir": run_dir if cfg.remote else None,
           "export_dir": cfg.output or join_path(run_dir, "model"), "best_dir": join_path(run_dir, "best"),
           "resume_from": resume_from, "torch_extensions_dir": ext_dir,
           "cpu_peak_flops": None if cfg.use_gpu else cpu_peak_flops(int(cfg.cpus_per_worker))}
    store_fs, store_path = (filesystem(cfg.storage_path) if cfg.remote else (None, cfg.storage_path))
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"task": task, "deepspeed": ds_config, "run": run, "callbacks": list(callbacks)},
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
            resources_per_worker={"CPU": cfg.cpus_per_worker, **({"GPU": cfg.gpus_per_worker} if cfg.use_gpu else {})}),
        run_config=ray.train.RunConfig(
            name=cfg.name, storage_path=store_path, storage_filesystem=store_fs,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            worker_runtime_env={"env_vars": {"TORCH_EXTENSIONS_DIR": ext_dir}}),
    )
    stop = threading.Event()
    bar = threading.Thread(target=_progress, args=(run_dir, cfg.max_steps, stop, task.name), daemon=True)
    if progress:
        bar.start()
    try:
        result = trainer.fit()
    finally:
        stop.set()
        if progress:
            bar.join()
    model_dir = cfg.output or join_path(run_dir, "model")
    if read_bytes(join_path(model_dir, "cloze.json")) is None:
        model_dir = None  # stopped before the end
    ckpt = result.checkpoint.path if result.checkpoint else None
    if ckpt and cfg.remote:
        ckpt = to_uri(cfg.storage_path, ckpt)
    return TrainResult(run_dir=run_dir, model_dir=model_dir, metrics=dict(result.metrics or {}), checkpoint=ckpt,
                       evals=read_metrics(run_dir, "eval.csv"), resumed_from=resume_from)
