"""`cloze run`: the whole pipeline as one Ray DAG of tasks chained by their ObjectRefs.

(`ray.dag`'s `DAGNode.execute()` is deprecated in Ray 2.60, so the graph is built from
plain `.remote()` calls: a task that receives another task's ref waits for it, which is
the same dependency graph, scheduled by Ray, with no API on its way out.)

    data (Ray Data pairs) -> pretrain (Ray Train + DeepSpeed) -> finetune (the same core)
         -> evaluate (test report) [-> score (Ray Data batch scoring of the [score] table's
         input)] -> deploy (Ray Serve) -> request (one real HTTP request)

Every stage is a Ray task with num_cpus=0, pinned to the driver's node (the head, under
Ray Jobs): it only drives (Ray Data / Ray Train start their own workers), so a 2-CPU
machine never deadlocks on the driver task holding a CPU. Each stage writes to a folder
named by the hash of its inputs and config (`runs/data-<hash>`, `runs/pretrain-<hash>`):
a stage whose folder is finished is skipped, an unfinished one resumes from its last
checkpoint, and a changed config writes a new folder, so a rerun never destroys finished
work; only `--force` redoes a stage. The stage's input is always the previous stage's
output: the shard manifest decides vocabulary, special ids and sequence length.
All configs are built and validated before Ray starts. The stage bodies are in
`pipelines.stages`; this module plans them, chains them and keeps the console.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from .config import ConfigError, apply_overrides, load_toml
from .report import stage_headline
from .stages import (answer_line, data_stage, deploy_stage, evaluate_stage, finetune_stage, logged, pretrain_stage,
                     request, sample_text, score_stage)

STAGES = ("data", "pretrain", "finetune", "evaluate", "score", "deploy", "request")
DOWNSTREAM = ("finetune", "evaluate", "score", "deploy", "request")  # need a [finetune] table
RUN_TABLES = ("data", "model", "pretrain", "finetune", "score", "serve")  # the config tables cloze run reads


@dataclass(frozen=True)
class RunPlan:
    data: Any  # pipelines.data.config.DataConfig, its output keyed by the stage's hash
    pretrain: Any  # pipelines.pretrain.PretrainConfig (data wired to the data stage's output)
    raw: dict
    force: tuple[str, ...] = ()  # stages redone even if finished (one and everything downstream)
    finetune: Any = None  # pipelines.finetune_config.FinetuneConfig (init wired to pretrain's model); None: no [finetune]
    until: str = STAGES[-1]  # the last stage run
    serve: Any = None  # pipelines.serve_config.ServeConfig of the deploy stage
    score: dict | None = None  # the [score] table (model and output wired by the DAG); None: no score stage

    def stages(self) -> list[str]:
        last = STAGES.index(self.until)
        return [s for s in STAGES[:last + 1] if (s not in DOWNSTREAM or self.finetune is not None)
                and (s != "score" or self.score is not None)]


class StageFailed(RuntimeError):
    """A stage of `cloze run` raised: the console already has its FAILED line (the stage,
    the reason, its log); finished stages are kept and a rerun resumes. `exit_code`: 2 when
    the stage refused its input or config (e.g. GPUs the cluster lacks), 1 otherwise."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


def run_folder(storage_path: str) -> str:
    """This invocation's record, `<storage_path>/run-<UTC time>`: a log per stage, run.json
    (every stage's status, time and folder) and report.html."""
    from datetime import datetime, timezone

    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S-%f")[:-3]
    return f"{storage_path.rstrip('/')}/run-{stamp}"


def force_from(stage: str | None) -> tuple[str, ...]:
    """`--force STAGE`: that stage and everything downstream of it."""
    if not stage:
        return ()
    if stage not in STAGES:
        raise ConfigError(f"--force {stage}: not a stage (choose from {', '.join(STAGES)})")
    return STAGES[STAGES.index(stage):]


def plan_run(config_path: str | os.PathLike | None, overrides: Mapping[str, Any] | None = None,
             force: str | bool | None = None, until: str | None = None) -> RunPlan:
    """Read and validate every stage's config (ConfigError naming the key) before any Ray work."""
    from .data.config import DataConfig
    from .data.corpus import plan_units
    from .data.pairs import cache_key
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
    check_tables(raw)
    if until is not None and until not in STAGES:
        raise ConfigError(f"--until {until}: not a stage (choose from {', '.join(STAGES)})")
    data = DataConfig.from_dict(raw.get("data", {}))
    units = plan_units(data)  # a missing input path fails here
    # the data stage's own folder: <output>-<hash of its inputs + config> (a URI keeps its query)
    head, query = split_query(data.output)
    data = dataclasses.replace(data, output=f"{head.rstrip('/')}-{cache_key(data, units.fingerprint)[:12]}{query}")
    pre = plan_pretrain(raw, data)
    if pre.max_seq_len and pre.max_seq_len != data.max_seq_len:
        raise ConfigError(f"pretrain.max_seq_len = {pre.max_seq_len} disagrees with data.max_seq_len = "
                          f"{data.max_seq_len}: set it in [data] only")
    fine = plan_finetune(raw, pre)
    if until in DOWNSTREAM and fine is None:
        raise ConfigError(f"--until {until}: the config has no [finetune] table")
    score = plan_score(raw, pre, fine)
    if until == "score" and score is None:
        raise ConfigError("--until score: the config has no [score] table")
    from .serve_config import ServeConfig

    serve_cfg = ServeConfig.from_dict(raw.get("serve", {}))
    if fine is not None:
        serve_cfg.check_model(fine.max_seq_len)
    return RunPlan(data=data, pretrain=pre, raw=raw, force=force_from("pretrain" if force is True else force),
                   finetune=fine, until=until or STAGES[-1], serve=serve_cfg, score=score)


def check_tables(raw: Mapping[str, Any]) -> None:
    """Refuse a config table `cloze run` does not read (a misspelled [pretrian] would be ignored)."""
    unknown = sorted(set(raw) - set(RUN_TABLES))
    if unknown:
        raise ConfigError(f"unknown config table [{unknown[0]}] (cloze run reads "
                          f"{', '.join(f'[{t}]' for t in RUN_TABLES)})")


def plan_score(raw: dict, pre, fine, list_input: bool = True) -> dict | None:
    """The [score] table, checked (keys, values and, with `list_input`, the input's files)
    before Ray starts; its model is the fine-tuned one and its output
    `<storage_path>/score-<hash>`."""
    from .score_plan import ScoreConfig, list_inputs

    table = dict(raw.get("score", {}))
    if not table:
        return None
    if fine is None:
        raise ConfigError("[score] scores with the fine-tuned model: the config needs a [finetune] table too")
    for key in ("model", "output", "overwrite"):
        if key in table:
            raise ConfigError(f"score.{key}: cloze run scores with its own fine-tuned model into its storage "
                              f"folder; drop this key")
    if not table.get("input"):
        raise ConfigError("score.input is required (a CSV / JSONL / Parquet file or folder to score)")
    if "://" not in table["input"]:
        table["input"] = str(Path(table["input"]).resolve())
    table["output"] = f"{pre.storage_path.rstrip('/')}/score"
    ScoreConfig.from_dict({**table, "model": "(the finetune stage's model)"})
    if list_input:
        list_inputs(table["input"], table.get("input_format", ""))
    return table


def plan_pretrain(raw: dict, data) -> Any:
    """The [pretrain] and [model] tables as a PretrainConfig that trains on the data stage's
    output (`data.output`; checked against its manifest when the stage runs)."""
    from .pretrain import PretrainConfig

    table = PretrainConfig.table_from_raw(raw)
    for key in ("data", "tokenizer"):  # wired to the data stage's output by the DAG
        if table.get(key):
            raise ConfigError(f"pretrain.{key}: cloze run trains on its own data stage's output; drop this key")
    model = dict(table.get("model", {"preset": "tiny"}))
    if not table.get("init_from"):
        model.setdefault("max_position_embeddings", max(512, data.max_seq_len))
        table["model"] = model
    return PretrainConfig.from_dict({**table, "data": data.output})


def plan_finetune(raw: dict, pre) -> Any:
    """The [finetune] table as a FinetuneConfig whose init is the pretrain stage's model (set
    when that stage has run); its run folders go beside pretraining's."""
    from .finetune_config import FinetuneConfig

    table = dict(raw.get("finetune", {}))
    if not table:
        return None
    for key in ("init", "like", "output", "storage_path"):
        if table.get(key):
            raise ConfigError(f"finetune.{key}: cloze run fine-tunes its own pretrained model into its run "
                              f"folder; drop this key")
    for key in ("train", "dev", "test"):
        value = table.get(key)
        if isinstance(value, str) and value and "://" not in value:
            table[key] = str(Path(value).resolve())
    return FinetuneConfig.from_dict({**table, "init": "pretrain", "storage_path": pre.storage_path,
                                     "shared_filesystem": pre.shared_filesystem})


def launch_dag(plan: RunPlan, logs: str | None = None) -> dict[str, Any]:
    """Submit the planned stages, each waiting on the one before; returns their ObjectRefs.
    `logs`: the folder (local or URI) where each stage's output goes (`<stage>.log`)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    # the stages drive from the driver's node (the head under Ray Jobs), never a worker node
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)

    def stage(fn):
        name = fn.__name__.removesuffix("_stage")
        return ray.remote(num_cpus=0, scheduling_strategy=here, max_retries=0)(
            logged(fn, f"{logs}/{name}.log" if logs else None))

    stages = plan.stages()
    data_cfg = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(plan.data).items()}
    refs: dict[str, Any] = {"data": stage(data_stage).remote(data_cfg, "data" in plan.force)}
    if "pretrain" in stages:
        refs["pretrain"] = stage(pretrain_stage).remote(plan.pretrain.to_dict(), refs["data"],
                                                         "pretrain" in plan.force)
    if "finetune" in stages:
        refs["finetune"] = stage(finetune_stage).remote(plan.finetune.to_dict(), refs["pretrain"],
                                                         "finetune" in plan.force)
    if "evaluate" in stages:
        refs["evaluate"] = stage(evaluate_stage).remote(refs["finetune"], "evaluate" in plan.force)
    if "score" in stages:
        refs["score"] = stage(score_stage).remote(plan.score, refs["finetune"], "score" in plan.force,
                                                   refs.get("evaluate"))
    if "deploy" in stages:
        refs["deploy"] = stage(deploy_stage).remote(refs["finetune"], plan.serve.to_dict(), refs.get("evaluate"),
                                                     refs.get("score"))
    return refs


def run(config_path: str | os.PathLike | None = None, overrides: Mapping[str, Any] | None = None,
        log=print, force: str | bool | None = None, until: str | None = None, keep_serving: bool = False) -> dict:
    """Run the DAG; returns the pretrain stage's result (model_dir, metrics, evals, ...) with
    `data_dir` and one entry per later stage that ran (`finetune`, `evaluate`, `deploy`,
    `request`). The endpoint is shut down at the end unless `keep_serving` (then this
    returns on Ctrl-C)."""
    plan = plan_run(config_path, overrides, force, until)  # every error before Ray starts
    import ray

    from .ray_session import session_logs, start_ray

    env = {"RAY_USAGE_STATS_ENABLED": "0", "TOKENIZERS_PARALLELISM": "false"}
    started = start_ray(log, "cloze run", runtime_env={"env_vars": env})
    logs = session_logs()
    folder = run_folder(plan.pretrain.storage_path)
    local = "://" not in folder
    if local:
        Path(folder).mkdir(parents=True, exist_ok=True)
    log(f"cloze run: run folder {folder} (a log per stage, run.json, report.html)")
    t0 = time.perf_counter()
    refs = launch_dag(plan, folder)
    results: dict[str, dict] = {}
    timings: dict[str, dict] = {}
    for name, ref in refs.items():  # in DAG order: each line appears as its stage finishes
        try:
            results[name] = out = _wait(ref, name, plan)
        except ray.exceptions.RayTaskError as e:
            cause = e.cause if isinstance(getattr(e, "cause", None), Exception) else e
            where = [f"{folder}/{name}.log"] + ([f"Ray's logs {logs}"] if logs else [])
            reason = f"{type(cause).__name__}: {(str(cause).splitlines() or [''])[0][:300]}"
            log(f"cloze run: {name:<9} FAILED: {reason}" + (f" (log: {'; '.join(where)})" if where else ""))
            _record(folder, plan, timings, results, failed=name)
            for later in list(refs.values())[list(refs).index(name) + 1:]:  # they fail with it: collect
                try:  # their errors here, or Ray prints each as an "unhandled error" on the console
                    ray.get(later)
                except ray.exceptions.RayError:
                    pass
            from .data.corpus import InputError

            refused = isinstance(cause, (ConfigError, InputError))
            raise StageFailed(f"stage {name} failed: {reason}", 2 if refused else 1) from None
        elapsed = time.perf_counter() - t0
        state = "skipped" if out.get("not_run") else "cached" if out.get("skipped") else "done"
        timings[name] = {"status": state, "elapsed_s": round(elapsed, 1)}
        where = "" if name == "deploy" else out.get("model_dir") or out.get("output") or ""
        status = f"done in {elapsed:.0f} s" if state == "done" else state
        if out.get("resumed"):
            status += " (resumed from its last checkpoint)"
        log(f"cloze run: {name:<9} {status:<12} {stage_headline(name, out)}" + (f"  {where}" if where else ""))
        t0 = time.perf_counter()
        if name == "pretrain" and out.get("evals"):
            from .train.metrics import held_out_summary

            log(held_out_summary(out["evals"], prog="cloze run"))
    try:
        if "deploy" in results and "request" in plan.stages():
            route, text = sample_text(results["finetune"])
            answer = request(results["deploy"]["url"], route, text)
            results["request"] = {"route": route, "text": text, "answer": answer}
            timings["request"] = {"status": "done", "elapsed_s": round(time.perf_counter() - t0, 2)}
            log(f"cloze run: request   POST {results['deploy']['url']}{route} {json.dumps(text[:60] + '...')}")
            log(f"cloze run:   {answer_line(route, answer)}")
        not_run = [s for s in STAGES if s not in results and (s != "score" or plan.score is not None)]
        if not_run:
            log("cloze run: not run: " + ", ".join(not_run))
        out = {**results.get("pretrain", {}), "data_dir": plan.data.output, "stages": timings}
        out.update({k: v for k, v in results.items() if k in DOWNSTREAM})
        _record(folder, plan, timings, results)
        if results.get("pretrain"):
            from .report import write_report

            out["report"] = write_report(out, folder, quality=str(QUALITY_RESULTS))
            log(f"cloze run: report    {out['report']}")
        if "deploy" in results:
            _serving(results, plan, keep_serving, log)
    finally:
        if "deploy" in results:  # (with --keep-serving: after Ctrl-C)
            from .serve import shutdown

            if started:  # our own Ray: stopping it stops Serve without Serve's shutdown chatter
                ray.shutdown()
            else:
                shutdown()
    return out


# the learning-quality cells BENCHMARKS.md reports (benchmarks/quality.py appends to it)
QUALITY_RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "quality.jsonl"


def _record(folder: str, plan: RunPlan, timings: dict, results: dict, failed: str | None = None) -> None:
    """run.json in the run folder: each planned stage's status, time and output folder."""
    from .storage import join_path, write_atomic

    stages = {}
    for name in plan.stages():
        out = results.get(name) or {}
        status = timings.get(name, {}).get("status") or ("failed" if name == failed else "not run")
        stages[name] = {"status": status, "elapsed_s": timings.get(name, {}).get("elapsed_s"),
                        "folder": out.get("run_dir") or out.get("output") or out.get("url")}
    body = {"stages": stages, "failed": failed, "config": plan.raw}
    write_atomic(join_path(folder, "run.json"), json.dumps(body, indent=2, default=str).encode())


def _wait(ref, name: str, plan: RunPlan):
    """The stage's result; while it runs, a live progress line on a terminal: the step its
    newest run folder's metrics.csv has reached (pretrain, finetune) or the time spent."""
    import sys

    import ray

    if not sys.stderr.isatty():
        return ray.get(ref)
    from tqdm import tqdm

    total = plan.pretrain.max_steps if name == "pretrain" else None
    started = time.time()
    with tqdm(total=total, desc=f"cloze run: {name}", unit="step", leave=False, dynamic_ncols=True) as bar:
        while not ray.wait([ref], timeout=1.0)[0]:
            step = _newest_step(plan.pretrain.storage_path, name, started) if name in ("pretrain", "finetune") else None
            if step is not None and step > bar.n:
                bar.update(step - bar.n)
            else:
                bar.refresh()
    return ray.get(ref)


def _newest_step(storage_path: str, stage: str, since: float) -> int | None:
    """The last step in metrics.csv of the newest `<stage>-*` run folder written since `since`."""
    if "://" in storage_path:
        return None
    files = [f for f in Path(storage_path).glob(f"{stage}-*/metrics.csv") if f.stat().st_mtime >= since]
    if not files:
        return None
    try:
        last = max(files, key=lambda f: f.stat().st_mtime).read_text().rstrip().rsplit("\n", 1)[-1]
        return int(float(last.split(",", 1)[0]))
    except (OSError, ValueError):
        return None


def _serving(results: dict, plan: RunPlan, keep_serving: bool, log) -> None:
    model_dir = results["finetune"]["model_dir"]
    again = f"cloze serve {model_dir}" + (f" --port {plan.serve.port}" if plan.serve.port != 8000 else "")
    if not keep_serving:
        log(f"cloze run: endpoint stopped; bring it back with: {again}")
        return
    log(f"cloze run: serving {results['deploy']['url']} (Ctrl-C stops it)")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        log("cloze run: stopping the endpoint")
