"""One inference path for fine-tuning's evaluation, `cloze evaluate` (and later serving and
batch scoring): tokenize -> forward -> postprocess, for sequence and token classifiers, so
their predictions agree exactly.

Encoding rules (the same in training and inference):
- sequence: `[CLS] a [SEP]` or `[CLS] a [SEP] b [SEP]`, cut to `max_seq_len` longest-first
  (the final [SEP] is kept); `truncated` says whether anything was cut.
- token: words -> WordPiece pieces; a word's label sits on its first piece, -100 on the
  others and on the specials; words cut off by `max_seq_len` are predicted "O".
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

IGNORE = -100


@dataclass
class Encoded:
    input_ids: list[np.ndarray]
    token_type_ids: list[np.ndarray]
    first_piece: list[list[int]]  # token task: per word, the position of its first piece (-1: no piece kept)
    truncated: list[bool]


def tokenizer_for(folder: str, max_seq_len: int):
    """The folder's tokenizer (tokenizer.json or vocab.txt), truncating to max_seq_len."""
    from .data.tokenizer import load_tokenizer

    tok = load_tokenizer(folder)
    tok.enable_truncation(max_length=max_seq_len, strategy="longest_first")
    return tok


def encode_sequences(tok, texts: Sequence[str], texts_b: Sequence[str] | None = None) -> Encoded:
    inputs = list(zip(texts, texts_b)) if texts_b is not None else list(texts)
    encs = tok.encode_batch(inputs)
    return Encoded([np.asarray(e.ids, dtype=np.int32) for e in encs],
                   [np.asarray(e.type_ids, dtype=np.int8) for e in encs],
                   [[] for _ in encs], [bool(e.overflowing) for e in encs])


def encode_words(tok, sentences: Sequence[Sequence[str]]) -> Encoded:
    """Words -> pieces; each word's first piece found by its word id (a word the normalizer
    empties, e.g. a zero-width space, has no piece and shifts nothing)."""
    encs = tok.encode_batch([list(s) for s in sentences], is_pretokenized=True)
    firsts = []
    for e, words in zip(encs, sentences):
        first = [-1] * len(words)
        for pos, w in enumerate(e.word_ids):
            if w is not None and first[w] < 0:
                first[w] = pos
        firsts.append(first)
    return Encoded([np.asarray(e.ids, dtype=np.int32) for e in encs],
                   [np.asarray(e.type_ids, dtype=np.int8) for e in encs], firsts,
                   [bool(e.overflowing) for e in encs])


def token_labels(enc: Encoded, tags: Sequence[Sequence[str]], label2id: dict[str, int]) -> list[np.ndarray]:
    """Per-piece label ids: the word's tag on its first piece, -100 elsewhere."""
    out = []
    for ids, first, sent in zip(enc.input_ids, enc.first_piece, tags):
        lab = np.full(len(ids), IGNORE, dtype=np.int32)
        for w, pos in enumerate(first):
            if pos >= 0:
                lab[pos] = label2id[sent[w]]
        out.append(lab)
    return out


def word_tags(first: Sequence[int], piece_pred: Sequence[int], labels: Sequence[str]) -> list[str]:
    """Word-level tags from per-piece predictions: the first piece's; "O" for a word without one."""
    return [labels[piece_pred[p]] if p >= 0 else "O" for p in first]


def pad_batch(input_ids: Sequence[np.ndarray], token_type_ids: Sequence[np.ndarray], pad_id: int,
              multiple: int = 8) -> dict[str, torch.Tensor]:
    from .data.collate import pad_rows

    ids = pad_rows(input_ids, pad_id, multiple)
    lengths = torch.as_tensor([len(x) for x in input_ids])
    return {"input_ids": ids, "token_type_ids": pad_rows(token_type_ids, 0, multiple),
            "attention_mask": (torch.arange(ids.shape[1])[None, :] < lengths[:, None]).long()}


def stable_softmax(logits: torch.Tensor) -> torch.Tensor:
    return torch.softmax(logits.float() - logits.float().amax(-1, keepdim=True), -1)


class Predictor:
    """A classifier folder (cloze or HF `BertFor{Sequence,Token}Classification`) ready to predict."""

    def __init__(self, folder: str, max_seq_len: int | None = None, batch_size: int = 32):
        import json

        from encoder.hf import load_pretrained

        self.folder = str(folder)
        info = Path(folder, "cloze.json")
        trained = json.loads(info.read_text()).get("metadata", {}).get("finetune_config", {}) if info.is_file() else {}
        self.model = load_pretrained(folder).eval()
        self.kind = "token" if type(self.model).__name__ == "TokenClassifier" else "sequence"
        if type(self.model).__name__ not in ("SequenceClassifier", "TokenClassifier"):
            raise ValueError(f"{folder} holds no sequence or token classifier")
        self.labels = [self.model.id2label[i] for i in range(self.model.num_labels)]
        # the length it was fine-tuned (and selected) at, else the model's limit
        self.max_seq_len = max_seq_len or trained.get("max_seq_len") or min(512, self.model.config.max_position_embeddings)
        self.tok = tokenizer_for(self.folder, self.max_seq_len)
        self.pad_id = self.model.config.pad_token_id
        self.batch_size = batch_size

    @torch.inference_mode()
    def logits(self, enc: Encoded) -> list[torch.Tensor]:
        out = []
        for i in range(0, len(enc.input_ids), self.batch_size):
            batch = pad_batch(enc.input_ids[i:i + self.batch_size], enc.token_type_ids[i:i + self.batch_size],
                              self.pad_id)
            logits = self.model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]).logits
            lengths = batch["attention_mask"].sum(1)
            out += [row if self.kind == "sequence" else row[:n] for row, n in zip(logits, lengths.tolist())]
        return out

    def classify(self, texts: Sequence[str], texts_b: Sequence[str] | None = None) -> list[dict]:
        enc = encode_sequences(self.tok, texts, texts_b)
        results = []
        for row, cut in zip(self.logits(enc), enc.truncated):
            probs = stable_softmax(row)
            best = int(probs.argmax())
            results.append({"label": self.labels[best], "score": float(probs[best]),
                            "probs": {lab: float(p) for lab, p in zip(self.labels, probs.tolist())},
                            "truncated": cut})
        return results

    def tag(self, sentences: Sequence[Sequence[str]]) -> list[list[str]]:
        """Word-level tags; words past max_seq_len get "O"."""
        enc = encode_words(self.tok, sentences)
        out = []
        for row, first in zip(self.logits(enc), enc.first_piece):
            out.append(word_tags(first, row.argmax(-1).tolist(), self.labels))
        return out


def folder_kind(folder: str) -> str | None:
    """"sequence" / "token" for a classifier folder, None otherwise (no weights read)."""
    import json

    cfg = Path(folder) / "config.json"
    if not cfg.is_file():
        return None
    arch = (json.loads(cfg.read_text()).get("architectures") or [""])[0]
    return {"BertForSequenceClassification": "sequence", "BertForTokenClassification": "token"}.get(arch)
