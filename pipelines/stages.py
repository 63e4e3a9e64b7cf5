"""The stages of `cloze run` (pipelines.dag plans and chains them): each takes its config
and the upstream stage's result, writes a folder keyed by the hash of both, and returns a
small dict. A finished folder (its `stage.json` carries the hash) is skipped on rerun; a
training stage left unfinished resumes from its newest complete checkpoint."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

# [pretrain] fields that change where or how a run is watched, never the weights it trains:
# a rerun that only changes them continues the same run folder
NOT_HASHED = ("name", "storage_path", "shared_filesystem", "log_every", "report_every", "checkpoint_every",
              "keep_checkpoints", "max_failures", "prefetch_batches", "cpus_per_worker")


def logged(fn, path: str | None):
    """`fn` with its process's stdout and stderr (Python's and C's: Ray Data, Ray Train's
    driver, DeepSpeed) written to the file `path` while it runs, and the traceback of an
    exception it raises written there too; `fn` itself when `path` is None. A URI `path`
    (shared storage) is written locally and uploaded when `fn` ends, however it ends."""
    import functools

    if not path:
        return fn

    @functools.wraps(fn)
    def run(*args, **kwargs):
        import os
        import sys
        import tempfile
        import traceback

        from .storage import is_uri, write_atomic

        local = tempfile.mkstemp(prefix="cloze-stage-", suffix=".log")[1] if is_uri(path) else path
        sys.stdout.flush(), sys.stderr.flush()
        saved = os.dup(1), os.dup(2)
        fd = os.open(local, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.dup2(fd, 1), os.dup2(fd, 2)
            return fn(*args, **kwargs)
        except BaseException:
            traceback.print_exc()
            raise
        finally:
            sys.stdout.flush(), sys.stderr.flush()
            os.dup2(saved[0], 1), os.dup2(saved[1], 2)
            for f in (fd, *saved):
                os.close(f)
            if local != path:
                try:
                    with open(local, "rb") as f:
                        write_atomic(path, f.read())
                finally:
                    os.remove(local)
    return run


def _hash(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def data_stage(data_cfg: dict, force: bool = False) -> dict:
    from .data.config import DataConfig
    from .data.pairs import build_sentence_pairs
    from .storage import filesystem, join_path, read_bytes, remove

    cfg = DataConfig.from_dict(data_cfg)
    if force and read_bytes(join_path(cfg.output, "manifest.json")) is not None:
        print(f"cloze run: --force: removing {cfg.output}")
        remove(*filesystem(cfg.output))
    before = read_bytes(join_path(cfg.output, "manifest.json"))
    manifest = build_sentence_pairs(cfg)
    # build_sentence_pairs' own rule: a finished folder with this cache key is left as it is
    cached = before is not None and json.loads(before).get("cache_key") == manifest["cache_key"]
    out = {"output": cfg.output, "manifest": manifest, "hash": manifest["cache_key"]}
    return {**out, "skipped": True} if cached else out


def _stamp(folder: str, key: str, force: bool, complete=lambda done: True) -> dict | None:
    """The saved result in `folder/stage.json` when it was written for this hash, is
    `complete` and the stage is not forced; otherwise None."""
    from .storage import join_path, read_bytes

    if force:
        return None
    stamp = read_bytes(join_path(folder, "stage.json"))
    if stamp is None:
        return None
    done = json.loads(stamp)
    return {**done, "skipped": True} if done.get("hash") == key and complete(done) else None


def _up_to_date(run_dir: str, key: str, force: bool) -> dict | None:
    """The training stage's saved result when its folder is finished for this hash (and not
    forced); otherwise None, after removing the folder when forced."""
    from .storage import filesystem, join_path, read_bytes, remove
    from .train.launch import has_checkpoints

    done = _stamp(run_dir, key, force,
                  lambda d: bool(d.get("model_dir")) and read_bytes(join_path(d["model_dir"], "cloze.json")) is not None)
    if done is not None:
        return done
    if force and (read_bytes(join_path(run_dir, "stage.json")) is not None or has_checkpoints(run_dir)):
        print(f"cloze run: --force: removing {run_dir}")  # asked for: redo this stage from scratch
        remove(*filesystem(run_dir))
    return None


def _finish(run_dir: str, out: dict) -> dict:
    from .storage import join_path, write_atomic

    write_atomic(join_path(run_dir, "stage.json"), json.dumps(out, indent=2, default=str).encode())
    return out


def _training_run(stage: str, cfg, name: str, upstream: str, force: bool, ignore: tuple[str, ...] = ()):
    """(cfg named `<name>-<hash>`, hash, run folder, finished result or None, folder to resume
    or None) of a training stage; the hash covers its config (less what only watches the
    run) and the upstream stage's hash."""
    from .train.launch import has_checkpoints, run_folder

    key = _hash(stage, {k: v for k, v in cfg.to_dict().items() if k not in NOT_HASHED + ignore}, upstream)
    cfg = dataclasses.replace(cfg, name=f"{name}-{key[:12]}")
    run_dir = run_folder(cfg)
    done = _up_to_date(run_dir, key, force)
    return cfg, key, run_dir, done, (run_dir if done is None and has_checkpoints(run_dir) else None)


def pretrain_stage(pre_cfg: dict, data_out: dict, force: bool = False) -> dict:
    """Pretrain into `<storage_path>/<name>-<hash>`: skipped when finished, resumed from its
    newest complete checkpoint when a crash or a kill left it unfinished."""
    from .pretrain import PretrainConfig, pretrain

    cfg = PretrainConfig.from_dict({**pre_cfg, "data": data_out["output"]})
    cfg, key, run_dir, done, resume = _training_run("pretrain", cfg, cfg.name, data_out["hash"], force)
    if done is not None:
        return done
    result = pretrain(cfg, resume=resume, progress=False)
    return _finish(run_dir, {"hash": key, "run_dir": result.run_dir, "model_dir": result.model_dir,
                             "resumed": result.resumed_from is not None, "resumed_from": result.resumed_from,
                             "metrics": {k: v for k, v in result.metrics.items() if isinstance(v, (int, float))},
                             "evals": result.evals})


def finetune_stage(fine_cfg: dict, pre_out: dict, force: bool = False) -> dict:
    """Fine-tune the pretrained model into `<storage_path>/finetune-<hash>` (same skip /
    resume rules as pretraining; the hash covers the pretrained model's)."""
    from .finetune import FinetuneConfig, finetune
    from .train.metrics import best_eval

    cfg = FinetuneConfig.from_dict({**fine_cfg, "init": pre_out["model_dir"]})
    cfg, key, run_dir, done, resume = _training_run("finetune", cfg, "finetune", pre_out["hash"], force, ("init",))
    if done is not None:
        return done
    result = finetune(None if resume else cfg, resume=resume, progress=False, evaluate_test=False)
    best = best_eval(result.train.run_dir) or {}
    return _finish(run_dir, {"hash": key, "run_dir": result.train.run_dir, "model_dir": result.model_dir,
                             "resumed": result.train.resumed_from is not None, "dev_f1": best.get("eval/f1"),
                             "task": cfg.task, "task_name": cfg.task_name,
                             "test": cfg.test, "steps": result.train.metrics.get("step")})


def evaluate_stage(fine_out: dict, force: bool = False) -> dict:
    """The fine-tuned model on the test set: eval.json, report.md, confusion.png in
    `<finetune run>/evaluate` (skipped when there for this model)."""
    from .builtin_tasks import builtin_task
    from .evaluate import evaluate_folder
    from .labeled import read_labeled
    from .storage import join_path

    out_dir = join_path(fine_out["run_dir"], "evaluate")
    key = _hash("evaluate", fine_out["hash"])
    done = _stamp(out_dir, key, force)
    if done is not None:
        return done
    if fine_out.get("task_name"):
        test = builtin_task(fine_out["task_name"], "test")
    elif fine_out.get("test"):
        test = read_labeled(fine_out["test"], fine_out["task"])
    else:
        return {"hash": key, "not_run": True, "why": "no test set (finetune.test or a built-in task)"}
    report = evaluate_folder(fine_out["model_dir"], test, output=out_dir)
    headline = {k: report[k] for k in ("examples", "f1", "accuracy", "macro_f1") if k in report}
    return _finish(out_dir, {"hash": key, "output": out_dir, **headline})


def score_stage(score_cfg: dict, fine_out: dict, force: bool = False, eval_out: dict | None = None) -> dict:
    """`cloze score` of the [score] table's input with the fine-tuned model into
    `<output>-<hash>` (the hash covers the model's and the table's): skipped when that
    folder is published, redone when forced. Runs after evaluate, before deploy."""
    from .score import score
    from .score_plan import ScoreConfig
    from .storage import join_path, read_bytes

    key = _hash("score", fine_out["hash"], score_cfg)
    output = f"{score_cfg['output'].rstrip('/')}-{key[:12]}"
    published = read_bytes(join_path(output, "manifest.json"))
    if published is not None and not force:
        return {**json.loads(published), "output": output, "hash": key, "skipped": True}
    cfg = ScoreConfig.from_dict({**score_cfg, "model": fine_out["model_dir"], "output": output,
                                 "overwrite": published is not None, "progress": False})
    manifest = score(cfg)
    return {**manifest, "output": output, "hash": key}


def deploy_stage(fine_out: dict, serve_cfg: dict, eval_out: dict | None = None, score_out: dict | None = None) -> dict:
    """Deploy the fine-tuned folder on Ray Serve (replicas outlive this task); runs after the
    evaluate stage when there is one, so the endpoint never holds CPUs training needs."""
    from .serve import deploy
    from .serve_config import ServeConfig

    cfg = ServeConfig.from_dict(serve_cfg)
    url = deploy(fine_out["model_dir"], cfg)
    return {"url": url, "model_dir": fine_out["model_dir"], "app": cfg.name}


def sample_text(fine_out: dict) -> tuple[str, str]:
    """(route, text) of the request stage: the first test (else dev) example of the task."""
    from .builtin_tasks import builtin_task
    from .labeled import read_labeled

    if fine_out.get("task_name"):
        ds = builtin_task(fine_out["task_name"], "test")
    else:
        ds = read_labeled(fine_out.get("test") or fine_out["dev"], fine_out["task"])
    if fine_out["task"] == "token":
        return "/v1/entities", " ".join(ds.tokens[0])
    return "/v1/classify", ds.texts[0]


def request(url: str, route: str, text: str, token: str | None = None, timeout: float = 60.0) -> dict:
    """POST one text to the endpoint; the JSON answer (raises on a non-2xx with its JSON reason)."""
    import urllib.error
    import urllib.request

    body = json.dumps({"texts": [text]}).encode()
    headers = {"content-type": "application/json", **({"authorization": f"Bearer {token}"} if token else {})}
    req = urllib.request.Request(url + route, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as e:
        raise RuntimeError(f"POST {url}{route}: HTTP {e.code}: {e.read()[:300].decode(errors='replace')}") from None


def answer_line(route: str, answer: dict) -> str:
    first = answer["results"][0] if "results" in answer else answer
    if route == "/v1/classify":
        return f"label: {first['label']} ({first['score']:.2f})"
    spans = first.get("entities", first.get("spans", []))
    return "entities: " + (", ".join(f"{e['text']} ({e['type']})" for e in spans) or "none")
