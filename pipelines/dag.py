"""`cloze run`: the whole pipeline as one Ray DAG of tasks chained by their ObjectRefs.

(`ray.dag`'s `DAGNode.execute()` is deprecated in Ray 2.60, so the graph is built from
plain `.remote()` calls: a task that receives another task's ref waits for it, which is
the same dependency graph, scheduled by Ray, with no API on its way out.)

    data (Ray Data pairs) -> pretrain (Ray Train + DeepSpeed) -> [finetune -> evaluate -> deploy]

Every stage is a Ray task with num_cpus=0: it only drives (Ray Data / Ray Train start
their own workers), so a 2-CPU machine never deadlocks on the driver task holding a CPU.
Each stage's output carries the hash of its inputs and config, and a stage whose output
already has the same hash is skipped: rerunning `cloze run` after a change redoes only
what the change touches. All configs are built and validated before Ray starts.
Stages of the design that do not exist yet are listed as skipped, never faked.
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


def _hash(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


@dataclass(frozen=True)
class RunPlan:
    data: Any  # pipelines.data.config.DataConfig
    pretrain: Any  # pipelines.pretrain.PretrainConfig (data / tokenizer / vocab filled by the DAG)
    raw: dict


def plan_run(config_path: str | os.PathLike | None, overrides: Mapping[str, Any] | None = None) -> RunPlan:
    """Read and validate every stage's config (ConfigError naming the key) before any Ray work."""
    from .data.config import DataConfig
    from .data.corpus import plan_units
    from .pretrain import PretrainConfig

    raw = load_toml(config_path) if config_path else {}
    if overrides:
        raw = apply_overrides(raw, overrides)
    # Ray workers do not share the driver's working directory: make local paths absolute
    for table, key in (("data", "output"), ("pretrain", "storage_path"), ("pretrain", "init_from"),
                       ("pretrain", "tokenizer"), ("pretrain", "data")):
        value = raw.get(table, {}).get(key)
        if isinstance(value, str) and value and "://" not in value:
            raw[table][key] = str(Path(value).resolve())
    unknown = sorted(set(raw) - {"data", "model", "pretrain"})
    if unknown:
        raise ConfigError(f"unknown config table [{unknown[0]}] (cloze run reads [data], [model], [pretrain])")
    data = DataConfig.from_dict(raw.get("data", {}))
    plan_units(data)  # a missing input path fails here
    table = PretrainConfig.table_from_raw(raw)
    model = dict(table.get("model", {"preset": "tiny"}))
    if not table.get("init_from"):
        # the vocabulary the data stage will write; checked again against its manifest
        if data.tokenizer == "train":
            model.setdefault("vocab_size", data.vocab_size)
        model.setdefault("max_position_embeddings", max(512, data.max_seq_len))
        table["model"] = model
    table.setdefault("max_seq_len", data.max_seq_len)
    table.setdefault("data", data.output)
    pre = PretrainConfig.from_dict(table)
    return RunPlan(data=data, pretrain=pre, raw=raw)


def _pretrain_config_for(plan_pre: dict, data_out: dict) -> dict:
    """Point pretraining at the shards and their tokenizer (the collator reads the special
    ids from the same manifest); the model's vocabulary is the tokenizer's."""
    tok = data_out["manifest"]["tokenizer"]
    cfg = {**plan_pre, "data": data_out["output"], "tokenizer": data_out["output"]}
    if not cfg.get("init_from"):
        cfg["model"] = {**cfg["model"], "vocab_size": tok["vocab_size"], "pad_token_id": tok["special_ids"]["pad"]}
    return cfg


def _data_stage(data_cfg: dict) -> dict:
    from .data.config import DataConfig
    from .data.pairs import build_sentence_pairs

    cfg = DataConfig.from_dict(data_cfg)
    manifest = build_sentence_pairs(cfg)
    return {"output": cfg.output, "manifest": manifest, "hash": manifest["cache_key"]}


def _pretrain_stage(pre_cfg: dict, data_out: dict) -> dict:
    from .pretrain import PretrainConfig, pretrain

    table = _pretrain_config_for(pre_cfg, data_out)
    cfg = PretrainConfig.from_dict(table)
    key = _hash("pretrain", cfg.to_dict(), data_out["hash"])
    run_dir = Path(cfg.storage_path) / cfg.name
    stamp = run_dir / "stage.json"
    if stamp.is_file():
        done = json.loads(stamp.read_text())
        if done.get("hash") == key and Path(done.get("model_dir", "")).joinpath("cloze.json").is_file():
            print(f"cloze run: pretrain is up to date ({key[:12]}), {done['model_dir']}")
            return {**done, "skipped": True}
    if run_dir.exists():  # same name, other inputs: start over rather than resume a different run
        import shutil

        shutil.rmtree(run_dir)
    result = pretrain(cfg, progress=False)
    out = {"hash": key, "run_dir": result.run_dir, "model_dir": result.model_dir,
           "metrics": {k: v for k, v in result.metrics.items() if isinstance(v, (int, float))},
           "evals": result.evals}
    stamp.write_text(json.dumps(out, indent=2))
    return out


def launch_dag(plan: RunPlan):
    """Submit the stages that exist, data -> pretrain; returns the last stage's ObjectRef."""
    import ray

    data_task = ray.remote(num_cpus=0)(_data_stage)
    pretrain_task = ray.remote(num_cpus=0)(_pretrain_stage)
    data_cfg = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(plan.data).items()}
    return pretrain_task.remote(plan.pretrain.to_dict(), data_task.remote(data_cfg))


def run(config_path: str | os.PathLike | None = None, overrides: Mapping[str, Any] | None = None,
        log=print) -> dict:
    plan = plan_run(config_path, overrides)  # every error before Ray starts
    import ray

    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=True,
                 runtime_env={"env_vars": {"RAY_USAGE_STATS_ENABLED": "0", "TOKENIZERS_PARALLELISM": "false"}})
    t0 = time.perf_counter()
    out = ray.get(launch_dag(plan))
    log(f"cloze run: data -> {plan.data.output}")
    log(f"cloze run: pretrain -> {out['model_dir']}"
        + (" (cached)" if out.get("skipped") else f" in {time.perf_counter() - t0:.0f} s"))
    for name in ("mlm/acc", "mlm/loss", "loss"):
        if name in out.get("metrics", {}):
            log(f"cloze run:   final {name} = {out['metrics'][name]:.4f}")
    if out.get("evals"):
        from .pretrain import held_out_summary

        log(held_out_summary(out["evals"], prog="cloze run"))
    log("cloze run: skipped (not built yet): " + ", ".join(PLANNED))
    return out
