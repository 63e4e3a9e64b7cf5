"""Pretraining pieces that need no Ray: config checks, DeepSpeed templates, schedule,
optimizer groups, collator, checkpoint completeness."""

from __future__ import annotations

import json

import pytest
import torch

from encoder import ConfigError
from pipelines.data.synthetic import synthetic_pair_shards
from pipelines.pretrain import PretrainConfig, resolve
from pipelines.train import check_resources
from pipelines.train.checkpoint import checkpoint_problem, latest_valid_checkpoint
from pipelines.train.optim import DEEPSPEED_DIR, WarmupDecay, deepspeed_config, param_groups

TINY = {"preset": "tiny", "vocab_size": 128, "hidden_size": 32, "num_attention_heads": 2,
        "intermediate_size": 64, "max_position_embeddings": 64}


def config(**kw) -> PretrainConfig:
    return PretrainConfig.from_dict({"model": TINY, "max_seq_len": 64, **kw})


def test_toml_and_overrides(tmp_path):
    f = tmp_path / "run.toml"
    f.write_text('[model]\npreset = "tiny"\n[pretrain]\nzero_stage = 3\nnum_workers = 2\n'
                 '[pretrain.objectives]\nmlm = 1.0\nsop = 0.5\n[pretrain.optimizer]\nlr = 1e-3\n')
    cfg = PretrainConfig.from_toml(f, {"pretrain.optimizer.warmup_steps": "10", "model.hidden_size": 256,
                                       "model.num_attention_heads": 4})
    assert cfg.zero_stage == 3 and cfg.objectives == {"mlm": 1.0, "sop": 0.5}
    assert cfg.optimizer.lr == 1e-3 and cfg.optimizer.warmup_steps == 10
    assert cfg.encoder_config().hidden_size == 256 and cfg.encoder_config().num_hidden_layers == 2


@pytest.mark.parametrize("table, match", [
    ({"zero_stage": 4}, "pretrain.zero_stage must be 0, 1, 2 or 3"),
    ({"zero_stag": 2}, "unknown config key pretrain.zero_stag"),
    ({"optimizer": {"lrr": 1.0}}, "unknown config key pretrain.optimizer.lrr"),
    ({"optimizer": {"decay": "step"}}, "pretrain.optimizer.decay must be linear, cosine or constant"),
    ({"precision": "fp16"}, "pretrain.precision must be fp32 or bf16"),
    ({"batch_size_per_worker": 4, "num_workers": 2, "global_batch_size": 12}, "must be divisible by"),
    ({"offload_optimizer": True, "zero_stage": 0}, "offload_optimizer needs zero_stage"),
    ({"objectives": {"mlm": 1.0, "nspp": 1.0}}, "objectives.nspp: unknown objective"),
    ({"objectives": {"rtd": 50.0}}, "rtd trains its generator"),
    ({"model": {**TINY, "hidden_sise": 3}}, "unknown config key model.hidden_sise"),
    ({"max_seq_len": 128}, "exceeds model.max_position_embeddings"),
    ({"num_workers": "two"}, "pretrain.num_workers: expected an integer"),
    ({"max_steps": 10, "encoder_hold_steps": 11}, r"pretrain.encoder_hold_steps must be in \[0, max_steps\]"),
])
def test_bad_config_names_the_key(table, match):
    with pytest.raises(ConfigError, match=match):
        PretrainConfig.from_dict({"model": TINY, "max_seq_len": 64, **table})


def test_resources_checked():
    cfg = config(num_workers=3, cpus_per_worker=1.0)
    with pytest.raises(ConfigError, match="3 x 1.0 = 3 CPUs, but the cluster has 2"):
        check_resources(cfg, available_cpus=2)
    check_resources(config(num_workers=2, cpus_per_worker=0.5), available_cpus=1)
    with pytest.raises(ConfigError, match="use_gpu"):
        check_resources(config(use_gpu=True, num_workers=2), available_cpus=8, available_gpus=1)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_deepspeed_templates_filled(stage):
    cfg = config(zero_stage=stage, batch_size_per_worker=4, num_workers=2, global_batch_size=24,
                 precision="bf16", offload_optimizer=stage > 0)
    ds = deepspeed_config(cfg, cfg.encoder_config().hidden_size)
    assert "auto" not in json.dumps(ds)
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (24, 4, 3)
    assert ds["zero_optimization"]["stage"] == stage and ds["bf16"]["enabled"] is True
    if stage:
        assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    if stage == 3:
        assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert sorted(p.name for p in DEEPSPEED_DIR.glob("zero*.json")) == [f"zero{i}.json" for i in range(4)]


def test_accumulation_derived():
    assert config(batch_size_per_worker=4, num_workers=2, global_batch_size=0).accumulation == 1
    assert config(batch_size_per_worker=4, num_workers=2, global_batch_size=32).accumulation == 4


def test_schedule_warmup_then_decay():
    lin = WarmupDecay(warmup=4, total=12, decay="linear", min_ratio=0.0)
    assert [round(lin(s), 4) for s in (0, 3, 4, 8, 12)] == [0.25, 1.0, 1.0, 0.5, 0.0]
    cos = WarmupDecay(warmup=0, total=10, decay="cosine", min_ratio=0.1)
    assert cos(0) == pytest.approx(1.0) and cos(5) == pytest.approx(0.55) and cos(10) == pytest.approx(0.1)
    assert WarmupDecay(2, 10, "constant", 0.0)(9) == 1.0
    held = WarmupDecay(warmup=2, total=10, decay="linear", min_ratio=0.0, hold=4)  # 4 steps at 0, then (2, 6)'s shape
    assert [held(s) for s in (0, 3, 4, 5, 8, 10)] == [0.0, 0.0, 0.5, 1.0, 0.5, 0.0]


def test_no_weight_decay_on_layernorm_and_bias(tmp_path):
    data = synthetic_pair_shards(tmp_path, rows=16, shards=1, vocab_size=128)
    model = resolve(config(objectives={"mlm": 1.0, "nsp": 1.0}, data=str(data))).build_model()
    decay, no_decay = param_groups(model, 0.01)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    assert all("LayerNorm" in names[id(p)] or "norm" in names[id(p)] or names[id(p)].endswith("bias")
               for p in no_decay["params"])
    assert all(names[id(p)].endswith("weight") and p.ndim == 2 for p in decay["params"])
    total = sum(p.numel() for g in (decay, no_decay) for p in g["params"])
    assert total == sum(p.numel() for p in model.parameters())  # the tied decoder counted once


def test_held_encoder_and_head_lr_groups(tmp_path):
    """encoder_hold_steps / head_lr split the groups: the shared encoder (and the MLM decoder,
    tied to its word embeddings) holds; the heads get head_lr; every weight in exactly one group."""
    data = synthetic_pair_shards(tmp_path, rows=16, shards=1, vocab_size=128)
    task = resolve(config(objectives={"mlm": 1.0, "nsp": 1.0}, data=str(data), encoder_hold_steps=3, head_lr=1e-2))
    model = task.build_model()
    groups = task.param_groups(model)
    names = {id(p): n for n, p in model.named_parameters()}
    encoder = [names[id(p)] for g in groups if g.get("hold_steps") == 3 for p in g["params"]]
    heads = [names[id(p)] for g in groups if g.get("lr") == 1e-2 and "hold_steps" not in g for p in g["params"]]
    assert len(groups) == 4 and all(n.startswith("encoder.") for n in encoder)
    assert "encoder.embeddings.word_embeddings.weight" in encoder  # = the MLM decoder's weight
    assert heads and all(n.startswith("objectives.") for n in heads)
    assert sorted(encoder + heads) == sorted(names.values())
    assert [g["weight_decay"] > 0 for g in groups] == [True, False, True, False]
    plain = resolve(config(objectives={"mlm": 1.0, "nsp": 1.0}, data=str(data)))
    assert [set(g) for g in plain.param_groups(model)] == [{"params", "weight_decay"}] * 2  # without: one schedule


def test_batches_are_a_function_of_their_position(tmp_path):
    synthetic_pair_shards(tmp_path, rows=64, shards=2, vocab_size=128, max_len=21)
    task = resolve(config(mask_prob=0.5, data=str(tmp_path), batch_size_per_worker=8, num_workers=1))
    assert task.config.special_token_ids == (0, 100, 101, 102, 103)  # from the manifest
    first = [b for _, (_, _, b) in zip(range(3), task.batches(0, 1, 0, 0))]
    again = next(iter(task.batches(0, 1, 0, 2)))  # a resumed run: batch 2 read directly
    assert again[:2] == (0, 2) and all(torch.equal(first[2][k], again[2][k]) for k in first[2])
    a = first[0]
    B, T = a["input_ids"].shape
    assert T % 8 == 0 and B == 8
    assert not torch.equal(first[0]["mlm_labels"], first[1]["mlm_labels"])
    picked = a["mlm_labels"] != -100
    assert picked.any() and not torch.isin(a["mlm_labels"][picked], torch.tensor([0, 101, 102])).any()
    assert (a["input_ids"][:, 0] == 101).all() and (a["attention_mask"].sum(1) > 4).all()
    assert set(a) >= {"nsp_label", "sop_label", "shuffle_label", "token_type_ids"}


def _fake_checkpoint(folder, step, world=2):
    folder.mkdir(parents=True)
    (folder / "trainer_state.json").write_text(json.dumps({"step": step, "world_size": world}))
    for r in range(world):
        (folder / f"shard{r}.pt").write_bytes(b"x" * (10 + r))
        (folder / f"manifest.rank{r}.json").write_text(json.dumps({f"shard{r}.pt": 10 + r}))
    return folder


def test_incomplete_checkpoints_are_skipped_with_a_message(tmp_path):
    good = _fake_checkpoint(tmp_path / "checkpoint_00000003", 3)
    truncated = _fake_checkpoint(tmp_path / "checkpoint_00000006", 6)
    (truncated / "shard1.pt").write_bytes(b"x")
    unfinished = _fake_checkpoint(tmp_path / "checkpoint_00000009", 9)
    (unfinished / "manifest.rank1.json").unlink()
    assert checkpoint_problem(good) is None
    assert "shard1.pt is 1 bytes, expected 11 (truncated?)" in checkpoint_problem(truncated)
    assert "rank 1 never finished writing" in checkpoint_problem(unfinished)
    messages = []
    assert latest_valid_checkpoint(tmp_path, log=messages.append) == str(good)
    assert len(messages) == 2 and all("skipping checkpoint" in m for m in messages)


def test_cli_rejects_bad_config_before_ray(capsys):
    from pipelines.cli import main

    assert main(["pretrain", "--config", "configs/local.toml", "--pretrain.zero_stage", "4"]) == 2
    assert "pretrain.zero_stage must be 0, 1, 2 or 3, got 4" in capsys.readouterr().err
    assert main(["pretrain", "--config", "configs/local.toml", "--model.hidden_sise", "8"]) == 2
    assert "unknown config key model.hidden_sise" in capsys.readouterr().err
    assert main(["pretrain", "--resume", "no/such/run"]) == 2
    assert "not a run folder" in capsys.readouterr().err


def test_run_config_reloads_where_the_folder_is(tmp_path):
    cfg = config(zero_stage=3, name="a", storage_path="elsewhere")
    (tmp_path / "moved").mkdir()
    (tmp_path / "moved" / "config.json").write_text(json.dumps(cfg.to_dict()))
    again = PretrainConfig.load_run(tmp_path / "moved")
    assert again.zero_stage == 3 and again.name == "moved" and again.storage_path == str(tmp_path)
    assert again.encoder_config() == cfg.encoder_config()


def test_gpu_peak_by_exact_model_and_precision():
    from pipelines.train.metrics import gpu_peak_flops

    assert gpu_peak_flops("NVIDIA L40S", "bf16") == 362e12  # not the L4's 121e12 ("L4" in "L40S")
    assert gpu_peak_flops("NVIDIA L4", "bf16") == 121e12 and gpu_peak_flops("NVIDIA L4", "fp32") == 30.3e12
    assert gpu_peak_flops("NVIDIA H100 80GB HBM3", "fp32") == 67e12  # fp32 runs: the fp32 peak
    assert gpu_peak_flops("NVIDIA H100 PCIe", "bf16") == 756e12
    assert gpu_peak_flops("NVIDIA A100-SXM4-80GB", "bf16") == 312e12
    assert gpu_peak_flops("NVIDIA A10G", "bf16") == 70e12 and gpu_peak_flops("NVIDIA A10", "bf16") == 125e12
    assert gpu_peak_flops("NVIDIA GeForce RTX 4090", "bf16") == 0.0  # unknown: MFU 0, never a guess


def test_metrics_stay_on_the_device_until_one_reduce():
    from pipelines.train.metrics import DeviceSums

    sums = DeviceSums(torch.device("cpu"))
    for v in (1.0, 2.0, 3.0):
        sums.add({"loss": torch.tensor(v)}, weight=0.5)
    sums.add({"acc": torch.tensor(0.25)})
    assert all(isinstance(t, torch.Tensor) for t in sums.sums.values())  # nothing read back yet
    assert sums.reduce(world=1) == {"acc": 0.25, "loss": 3.0} and sums.sums == {}


def test_multi_node_needs_shared_storage():
    from pipelines.train import check_storage

    check_storage(config(storage_path="runs"), alive_nodes=1)
    with pytest.raises(ConfigError, match="local path but the cluster has 3 nodes"):
        check_storage(config(storage_path="runs"), alive_nodes=3)
    check_storage(config(storage_path="s3://bucket/runs"), alive_nodes=3)
    check_storage(config(storage_path="/mnt/nfs/runs", shared_filesystem=True), alive_nodes=3)


ALLREDUCE_CHECK = r'''
import os, sys
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1], RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
import deepspeed, torch
from encoder import Encoder, EncoderConfig, SequenceClassifier
deepspeed.init_distributed(dist_backend="gloo", verbose=False)
g = torch.Generator().manual_seed(1)
ids = torch.randint(5, 120, (8, 16), generator=g)
mask, tt, labels = torch.ones_like(ids), torch.zeros_like(ids), torch.randint(0, 3, (8,), generator=g)
def train(allreduce):
    torch.manual_seed(0)
    model = SequenceClassifier(Encoder(EncoderConfig.from_dict({"preset": "tiny", "vocab_size": 128,
        "hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64, "max_position_embeddings": 64})), 3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    eng, *_ = deepspeed.initialize(model=model, optimizer=opt, config={"train_batch_size": 8,
        "gradient_accumulation_steps": 1, "zero_optimization": {"stage": 0}, "gradient_clipping": 1.0})
    assert eng.enable_backward_allreduce is True  # the attribute loop.py turns off (a rename would lose it)
    eng.enable_backward_allreduce = allreduce
    for _ in range(5):
        out = eng(ids, mask, tt, labels=labels)
        eng.backward(out.loss)
        eng.step()
    return {n: p.detach().clone() for n, p in eng.module.named_parameters()}
a, b = train(True), train(False)
assert all(torch.equal(a[n], b[n]) for n in a), "weights differ"
assert not all(torch.equal(a[n], p) for n, p in train(True).items()) or True
print("identical")
'''


def test_one_worker_zero0_skips_an_allreduce_that_changes_nothing():
    """The training core turns off DeepSpeed's gradient all-reduce for one worker at ZeRO-0
    (`loop.py`): with one rank it only copies every gradient out and back. Five real
    DeepSpeed steps (gloo, world size 1, clipping on) with and without it give the same
    weights, bit for bit."""
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = subprocess.run([sys.executable, "-c", ALLREDUCE_CHECK, str(port)], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("identical"), out.stderr[-3000:]
