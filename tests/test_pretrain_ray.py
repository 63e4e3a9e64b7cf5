"""Pretraining on real Ray Train + real DeepSpeed: 2 CPU workers, a tiny model, few steps.

One uninterrupted ZeRO-0 run is the reference. An uninterrupted ZeRO-3 run, and a ZeRO-2 run
whose worker is killed mid-way (restarted from its last checkpoint), must reach its weights
within 1e-5; a ZeRO-0 run stopped, its latest checkpoint truncated, then resumed, within 1e-6.
Each run is about half a minute of fixed Ray Train cost, so every run checks several things.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from encoder import ConfigError
from faults import KillWorkerAt, StopAt
from pipelines.data.synthetic import synthetic_pair_shards
from pipelines.pretrain import PretrainConfig, pretrain, read_metrics

pytestmark = pytest.mark.ray

TINY = {"preset": "tiny", "vocab_size": 128, "hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64,
        "max_position_embeddings": 64, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
STEPS = 20


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """One epoch = STEPS global batches of 2 workers x 4 rows."""
    base = tmp_path_factory.mktemp("pretrain-data")
    # another draw of the same kind of rows: the held-out set every run evaluates on
    synthetic_pair_shards(base / "held-out", rows=64, shards=1, vocab_size=128, seed=1)
    return str(synthetic_pair_shards(base / "train", rows=STEPS * 8, shards=2, vocab_size=128))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return tmp_path_factory.mktemp("runs")


def make_config(data, runs, name, **kw) -> PretrainConfig:
    table = {"data": data, "storage_path": str(runs), "name": name, "model": TINY, "max_seq_len": 64,
             "eval_data": str(Path(data).parent / "held-out") if (Path(data).parent / "held-out").is_dir() else "",
             "objectives": {"mlm": 1.0, "nsp": 1.0}, "batch_size_per_worker": 4, "num_workers": 2,
             "cpus_per_worker": 1.0, "max_steps": STEPS, "checkpoint_every": 6, "keep_checkpoints": 2,
             "zero_stage": 0, "seed": 7, "optimizer": {"lr": 3e-3, "warmup_steps": 2}}
    return PretrainConfig.from_dict({**table, **kw})


def weights(result) -> dict[str, torch.Tensor]:
    return load_file(str(Path(result.model_dir) / "model.safetensors"))


def max_diff(a, b) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.fixture(scope="module")
def reference(ray_cluster, data, runs):
    return pretrain(make_config(data, runs, "zero0"), progress=False)


def loss_falls(result) -> None:
    rows = read_metrics(result.run_dir)
    assert [int(r["step"]) for r in rows] == list(range(1, STEPS + 1))
    first, last = sum(r["loss"] for r in rows[:3]) / 3, sum(r["loss"] for r in rows[-3:]) / 3
    assert last < first - 0.3, (first, last)


def test_zero0_trains_and_reports_everything(reference):
    loss_falls(reference)
    m = reference.metrics
    for key in ("loss", "mlm/loss", "mlm/acc", "nsp/loss", "nsp/acc", "lr", "grad_norm", "tokens_per_s",
                "samples_per_s", "mfu"):
        assert key in m and m[key] == m[key], key  # present, not NaN
    assert m["step"] == STEPS and m["samples"] == STEPS * 8 and 0 < m["mfu"] < 1
    run = Path(reference.run_dir)
    assert (run / "config.json").is_file() and list((run / "tb").glob("events.out.tfevents.*"))
    assert sorted(p.name for p in run.glob("checkpoint_0*")) == ["checkpoint_00000018", "checkpoint_00000020"]
    info = (Path(reference.model_dir) / "cloze.json").read_text()
    assert '"nsp"' in info and '"final_metrics"' in info
    # held-out evaluation before the first step, at every checkpoint and at the end
    evals = read_metrics(reference.run_dir, "eval.csv")
    assert [int(r["step"]) for r in evals] == [0, 6, 12, 18, 20] and evals == reference.evals
    assert evals[-1]["eval/mlm/loss"] < evals[0]["eval/mlm/loss"] - 0.3
    assert 0 <= evals[0]["eval/nsp/acc"] <= 1 and m["eval/mlm/acc"] == evals[-1]["eval/mlm/acc"]
    mem = json.loads((run / "memory.json").read_text())
    # fp32 ZeRO-0 keeps parameters, gradients and Adam's two moments whole on every rank: >= 16 bytes each
    assert len(mem["live_tensor_bytes"]) == 2 and min(mem["live_tensor_bytes"]) >= 16 * mem["parameters"]


def test_zero3_matches_zero0(reference, data, runs):
    result = pretrain(make_config(data, runs, "zero3", zero_stage=3), progress=False)
    loss_falls(result)
    assert max_diff(weights(result), weights(reference)) < 1e-5
    assert result.evals[-1]["eval/mlm/loss"] == pytest.approx(reference.evals[-1]["eval/mlm/loss"], abs=1e-4)


def test_zero2_killed_worker_restarts_from_checkpoint(reference, data, runs):
    # rank 1 is SIGKILLed after step 9; last checkpoint: step 6
    result = pretrain(make_config(data, runs, "fault", zero_stage=2, max_failures=1), progress=False,
                      callbacks=[KillWorkerAt(9)])
    loss_falls(result)
    assert (Path(result.run_dir) / ".fault_injected").read_text() == "9"
    rows = read_metrics(result.run_dir)
    # final step count right, and the data positions of the kept trajectory neither repeat nor skip
    assert [int(r["step"]) for r in rows] == list(range(1, STEPS + 1))
    assert [(int(r["epoch"]), int(r["batch_index"])) for r in rows] == [(0, s) for s in range(STEPS)]
    assert result.metrics["step"] == STEPS
    assert max_diff(weights(result), weights(reference)) < 1e-5


def test_resume_after_stop_skips_a_truncated_checkpoint(reference, data, runs, monkeypatch, capsys):
    cfg = make_config(data, runs, "resume")
    stopped = pretrain(cfg, progress=False, callbacks=[StopAt(14)])  # checkpoints at 12 and 14
    assert stopped.model_dir is None and stopped.metrics["step"] == 14
    run = Path(stopped.run_dir)
    latest = max(run.glob("checkpoint_0*"))
    shard = max((latest / "ds").rglob("*.pt"), key=lambda p: p.stat().st_size)
    shard.write_bytes(shard.read_bytes()[:100])  # truncated mid-write
    with pytest.raises(ConfigError, match="already has checkpoints"):
        pretrain(cfg, progress=False)
    resumed = pretrain(cfg, resume=run, progress=False)
    out = capsys.readouterr().out
    assert f"skipping checkpoint {latest}" in out and "truncated" in out
    assert "resuming" in out and "checkpoint_00000012" in out
    assert resumed.metrics["step"] == STEPS
    assert resumed.metrics["lr"] == pytest.approx(reference.metrics["lr"], abs=1e-12)
    assert max_diff(weights(resumed), weights(reference)) < 1e-6


# mlm + nsp is the reference run's mix; mlm + sop + shuffle is also tested below, from an import
@pytest.mark.parametrize("mix", [{"mlm": 1.0}, {"mlm": 1.0, "sop": 1.0}, {"mlm": 1.0, "shuffle": 1.0},
                                 {"rtd": 50.0, "mlm": 1.0}])
def test_objective_mix_reports_each_part(ray_cluster, data, runs, mix, monkeypatch):
    name = "mix-" + "-".join(mix)
    monkeypatch.chdir(Path(data).parent)  # relative paths, as on a command line: workers run elsewhere
    cfg = make_config("train", runs, name, objectives=mix, num_workers=1, max_steps=3, checkpoint_every=0,
                      eval_data="held-out")
    result = pretrain(cfg, progress=False)
    for part in mix:
        assert f"{part}/loss" in result.metrics and f"{part}/acc" in result.metrics, (part, result.metrics)
        assert f"eval/{part}/acc" in result.metrics
    assert result.metrics["step"] == 3 and Path(result.model_dir, "model.safetensors").is_file()


def test_continued_pretraining_from_an_exported_model(reference, data, runs):
    """The reference export (mlm + nsp heads) continues with sop + shuffle: those heads start fresh."""
    result = pretrain(make_config(data, runs, "continued", init_from=reference.model_dir, model={},
                                  objectives={"mlm": 1.0, "sop": 1.0, "shuffle": 0.5}, num_workers=1,
                                  max_steps=3, checkpoint_every=0), progress=False)
    first = read_metrics(result.run_dir)[0]
    fresh = read_metrics(reference.run_dir)[0]
    assert first["mlm/loss"] < fresh["mlm/loss"] - 0.5  # the encoder and MLM head were loaded, not drawn
    for part in ("sop", "shuffle"):
        assert f"{part}/loss" in result.metrics and f"{part}/acc" in result.metrics
    assert result.metrics["step"] == 3


def test_encoder_hold_trains_only_the_heads(reference, data, runs):
    """encoder_hold_steps: the shared encoder's lr is 0 while the heads train (ZeRO-2's flat
    groups too), so after a run held for all its steps the encoder is the init's, bit for bit,
    and the heads have moved; the logged lr (the encoder's group) is 0 for those steps."""
    result = pretrain(make_config(data, runs, "held", init_from=reference.model_dir, model={}, zero_stage=2,
                                  max_steps=2, encoder_hold_steps=2, checkpoint_every=0), progress=False)
    assert [r["lr"] for r in read_metrics(result.run_dir)] == [0.0, 0.0]
    before, after = weights(reference), weights(result)
    encoder = [k for k in before if k.startswith("bert.")]
    heads = [k for k in before if k.startswith("cls.predictions.transform.")]
    assert len(encoder) > 20 and heads
    assert all(torch.equal(before[k], after[k]) for k in encoder)
    assert all(not torch.equal(before[k], after[k]) for k in heads)


def test_bad_config_rejected_before_workers(ray_cluster, data, runs):
    cfg = make_config(data, runs, "too-many", num_workers=3, cpus_per_worker=1.0)
    with pytest.raises(ConfigError, match="CPUs, but the cluster has 2"):
        pretrain(cfg, progress=False)
    assert not (Path(runs) / "too-many").exists()
    with pytest.raises(ConfigError, match="no .parquet shards"):
        pretrain(make_config(str(runs), runs, "no-data"), progress=False)


@pytest.mark.gpu
@pytest.mark.parametrize("workers", [1, 2])
def test_gpu_bf16_nccl_trains(ray_cluster, data, runs, workers):
    """The GPU path: one worker per GPU (NCCL), bf16, ZeRO-2. With 2 ranks the metric, eval
    and memory all-reduces run on NCCL (CPU tensors there crashed every multi-GPU run)."""
    if torch.cuda.device_count() < workers:
        pytest.skip(f"needs {workers} GPUs (NCCL needs one GPU per rank)")
    result = pretrain(make_config(data, runs, f"gpu{workers}", use_gpu=True, gpus_per_worker=1.0, precision="bf16",
                                  zero_stage=2, num_workers=workers, cpus_per_worker=1.0,
                                  batch_size_per_worker=8 // workers), progress=False)
    loss_falls(result)
    assert result.metrics["mfu"] > 0 and Path(result.model_dir, "model.safetensors").is_file()
