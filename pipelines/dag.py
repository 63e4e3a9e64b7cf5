"""`cloze run`: the whole pipeline as one Ray DAG of tasks chained by their ObjectRefs.

(`ray.dag`'s `DAGNode.execute()` is deprecated in Ray 2.60, so the graph is built from
plain `.remote()` calls: a task that receives another task's ref waits for it, which is
the same dependency graph, scheduled by Ray, with no API on its way out.)

    data (Ray Data pairs) -> pretrain (Ray Train + DeepSpeed) -> [finetune -> evaluate -> deploy]

Every stage is a Ray task with num_cpus=0, pinned to the driver's node (the head, under
Ray Jobs): it only drives (Ray Data / Ray Train start their own workers), so a 2-CPU
machine never deadlocks on the driver task holding a CPU. Each stage writes to a folder
named by the hash of its inputs and config (`runs/data-<hash>`, `runs/pretrain-<hash>`):
a stage whose folder is finished is skipped, an unfinished one resumes from its last
checkpoint, and a changed config writes a new folder, so a rerun never destroys finished
work; only `--force` redoes a stage. The stage's input is always the previous stage's
output: the shard manifest decides vocabulary, special ids and sequence length.
All configs are built and validated before Ray starts. Stages of the design that do not
exist yet are listed as skipped, never faked.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from .config import ConfigError, apply_overrides, load_toml

# The design's stages after pretrain: not built yet (their issues come next).
PLANNED = ("finetune", "evaluate", "deploy", "request")


# [pretrain] fields that change where or how a run is watched, never the weights it trains:
# a rerun that only changes them continues the same run folder
NOT_HASHED = ("name", "storage_path", "shared_filesystem", "log_every", "report_every", "checkpoint_every",
              "keep_checkpoints", "max_failures", "prefetch_batches", "cpus_per_worker")


def _hash(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


@dataclass(frozen=True)
class RunPlan:
    data: Any  # pipelines.data.config.DataConfig, its output keyed by the stage's hash
    pretrain: Any  # pipelines.pretrain.PretrainConfig (data wired to the data stage's output)
    raw: dict
    force: bool = False  # redo the pretrain stage even if its folder is finished


def plan_run(config_path: str | os.PathLike | None, overrides: Mapping[str, Any] | None = None,
             force: bool = False) -> RunPlan:
    """Read and validate every stage's config (ConfigError naming the key) before any Ray work."""
    from .data.config import DataConfig
    from .data.corpus import plan_units
    from .data.pairs import cache_key
    from .pretrain import PretrainConfig
    from .storage import split_query

    raw = load_toml(config_path) if config_path else {}
    if overrides:
        raw = apply_overrides(raw, overrides)
    # Ray workers do not share the driver's working directory: make local paths absolute
    for table, key in (("data", "output"), ("pretrain", "storage_path"), ("pretrain", "init_from"),
                       ("pretrain", "tokenizer"), ("pretrain", "data"), ("pretrain", "eval_data")):
        value = raw.get(table, {}).get(key)
        if isinstance(value, str) and value and "://" not in value:
            raw[table][key] = str(Path(value).resolve())
    unknown = sorted(set(raw) - {"data", "model", "pretrain"})
    if unknown:
        raise ConfigError(f"unknown config table [{unknown[0]}] (cloze run reads [data], [model], [pretrain])")
    data = DataConfig.from_dict(raw.get("data", {}))
    units = plan_units(data)  # a missing input path fails here
    # the data stage's own folder: <output>-<hash of its inputs + config> (a URI keeps its query)
    head, query = split_query(data.output)
    data = dataclasses.replace(data, output=f"{head.rstrip('/')}-{cache_key(data, units.fingerprint)[:12]}{query}")
    table = PretrainConfig.table_from_raw(raw)
    for key in ("data", "tokenizer"):  # wired to the data stage's output by the DAG
        if table.get(key):
            raise ConfigError(f"pretrain.{key}: cloze run trains on its own data stage's output; drop this key")
    model = dict(table.get("model", {"preset": "tiny"}))
    if not table.get("init_from"):
        model.setdefault("max_position_embeddings", max(512, data.max_seq_len))
        table["model"] = model
    table["data"] = data.output  # checked against the manifest when the stage runs
    pre = PretrainConfig.from_dict(table)
    if pre.max_seq_len and pre.max_seq_len != data.max_seq_len:
        raise ConfigError(f"pretrain.max_seq_len = {pre.max_seq_len} disagrees with data.max_seq_len = "
                          f"{data.max_seq_len}: set it in [data] only")
    return RunPlan(data=data, pretrain=pre, raw=raw, force=force)


def _data_stage(data_cfg: dict) -> dict:
    from .data.config import DataConfig
    from .data.pairs import build_sentence_pairs

    cfg = DataConfig.from_dict(data_cfg)
    manifest = build_sentence_pairs(cfg)
    return {"output": cfg.output, "manifest": manifest, "hash": manifest["cache_key"]}


def _pretrain_stage(pre_cfg: dict, data_out: dict, force: bool = False) -> dict:
    """Pretrain into `<storage_path>/<name>-<hash>`: skipped when finished, resumed from its
    newest complete checkpoint when a crash or a kill left it unfinished."""
    from .pretrain import PretrainConfig, pretrain
    from .storage import join_path, read_bytes, write_atomic
    from .train.launch import has_checkpoints, run_folder

    cfg = PretrainConfig.from_dict({**pre_cfg, "data": data_out["output"]})
    key = _hash("pretrain", {k: v for k, v in cfg.to_dict().items() if k not in NOT_HASHED}, data_out["hash"])
    cfg = dataclasses.replace(cfg, name=f"{cfg.name}-{key[:12]}")
    run_dir = run_folder(cfg)
    stamp = read_bytes(join_path(run_dir, "stage.json"))
    if stamp is not None and not force:
        done = json.loads(stamp)
        if done.get("hash") == key and done.get("model_dir") and read_bytes(join_path(done["model_dir"], "cloze.json")):
            print(f"cloze run: pretrain is up to date ({key[:12]}), {done['model_dir']}")
            return {**done, "skipped": True}
    if force and (stamp is not None or has_checkpoints(run_dir)):  # asked for: redo this stage from scratch
        from .storage import filesystem, remove

        print(f"cloze run: --force: removing {run_dir}")
        remove(*filesystem(run_dir))
    resume = run_dir if has_checkpoints(run_dir) else None
    result = pretrain(cfg, resume=resume, progress=False)
    out = {"hash": key, "run_dir": result.run_dir, "model_dir": result.model_dir,
           "resumed": result.resumed_from is not None, "resumed_from": result.resumed_from,
           "metrics": {k: v for k, v in result.metrics.items() if isinstance(v, (int, float))},
           "evals": result.evals}
    write_atomic(join_path(run_dir, "stage.json"), json.dumps(out, indent=2).encode())
    return out


def launch_dag(plan: RunPlan):
    """Submit the stages that exist, data -> pretrain; returns the last stage's ObjectRef."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    # the stages drive from the driver's node (the head under Ray Jobs), never a worker node
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    data_task = ray.remote(num_cpus=0, scheduling_strategy=here)(_data_stage)
    pretrain_task = ray.remote(num_cpus=0, scheduling_strategy=here)(_pretrain_stage)
    data_cfg = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(plan.data).items()}
    return pretrain_task.remote(plan.pretrain.to_dict(), data_task.remote(data_cfg), plan.force)


def run(config_path: str | os.PathLike | None = None, overrides: Mapping[str, Any] | None = None,
        log=print, force: bool = False) -> dict:
    plan = plan_run(config_path, overrides, force)  # every error before Ray starts
    import ray

    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=True,
                 runtime_env={"env_vars": {"RAY_USAGE_STATS_ENABLED": "0", "TOKENIZERS_PARALLELISM": "false"}})
    t0 = time.perf_counter()
    out = {**ray.get(launch_dag(plan)), "data_dir": plan.data.output}
    log(f"cloze run: data -> {plan.data.output}")
    log(f"cloze run: pretrain -> {out['model_dir']}"
        + (" (cached)" if out.get("skipped") else f" in {time.perf_counter() - t0:.0f} s"
           + (" (resumed from its last checkpoint)" if out.get("resumed") else "")))
    for name in ("mlm/acc", "mlm/loss", "loss"):
        if name in out.get("metrics", {}):
            log(f"cloze run:   final {name} = {out['metrics'][name]:.4f}")
    if out.get("evals"):
        from .train.metrics import held_out_summary

        log(held_out_summary(out["evals"], prog="cloze run"))
    log("cloze run: skipped (not built yet): " + ", ".join(PLANNED))
    return out
