"""One inference path for fine-tuning's evaluation, `cloze evaluate` (and later serving and
batch scoring): tokenize -> forward -> postprocess, for sequence and token classifiers, so
their predictions agree exactly.

Encoding rules (the same in training and inference):
- sequence: `[CLS] a [SEP]` or `[CLS] a [SEP] b [SEP]`, cut to `max_seq_len` longest-first
  (the final [SEP] is kept); `truncated` says whether anything was cut.
- token: words -> WordPiece pieces; a word's label sits on its first piece, -100 on the
  others and on the specials; words cut off by `max_seq_len` are predicted "O".
- raw text for NER (`split_words`): words are the maximal runs of letters, digits and `_`
  and each other non-space character alone (punctuation), as BERT's basic tokenizer splits
  them; each word keeps its [start, end) character offsets into the original text.

Serving options (`Predictor(..., quantize="int8", threads=N)`): int8 dynamic quantization
of every nn.Linear (weights int8, activations quantized per batch on the fly: CPU only),
and the torch thread count of the process. Embeddings (`Predictor.embed`) are the
classifier's encoder features: h_cls (the last layer's [CLS] state, before the pooler) or
the mean over every real token ([CLS] and [SEP] included, as sentence-transformers pools).
"""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from .config import check_inference

IGNORE = -100
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # config.INFERENCE_DTYPES
POOLING_MODES = ("cls", "mean")
WORD = re.compile(r"\w+|[^\w\s]")


@dataclass
class Encoded:
    input_ids: list[np.ndarray]
    token_type_ids: list[np.ndarray]
    first_piece: list[list[int]]  # token task: per word, the position of its first piece (-1: no piece kept)
    truncated: list[bool]

    def __len__(self) -> int:
        return len(self.input_ids)

    def rows(self) -> list["Encoded"]:
        """One single-row Encoded per example (the unit a serving batch is made of)."""
        return [Encoded([i], [t], [f], [c]) for i, t, f, c in
                zip(self.input_ids, self.token_type_ids, self.first_piece, self.truncated)]

    @staticmethod
    def join(parts: Sequence["Encoded"]) -> "Encoded":
        return Encoded([x for p in parts for x in p.input_ids], [x for p in parts for x in p.token_type_ids],
                       [x for p in parts for x in p.first_piece], [x for p in parts for x in p.truncated])


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


def check_threshold(value: float) -> float:
    if not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {value!r}")
    return float(value)


def stable_softmax(logits: torch.Tensor) -> torch.Tensor:
    return torch.softmax(logits.float() - logits.float().amax(-1, keepdim=True), -1)


def split_words(text: str) -> tuple[list[str], list[tuple[int, int]]]:
    """NER words of raw text and their [start, end) character offsets: 'Hi, Bob.' ->
    ['Hi', ',', 'Bob', '.'] at [(0, 2), (2, 3), (4, 7), (7, 8)]."""
    found = list(WORD.finditer(text))
    return [m.group() for m in found], [m.span() for m in found]


def quantize_int8(model: torch.nn.Module) -> torch.nn.Module:
    """Dynamic int8 quantization of every nn.Linear (CPU inference only; embeddings and
    LayerNorms stay fp32). torch 2.13 marks torch.ao's eager quantization deprecated in favour
    of torchao, which is not a dependency here: its warnings are silenced, not hidden bugs."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", (DeprecationWarning, UserWarning))
        return torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)


class Predictor:
    """A classifier folder (cloze or HF `BertFor{Sequence,Token}Classification`; local, or a
    URI such as s3://... that each node copies once) ready to predict."""

    def __init__(self, folder: str, max_seq_len: int | None = None, batch_size: int = 32,
                 quantize: str = "none", threads: int | None = None, device: str = "cpu", dtype: str = "fp32",
                 threshold: float = 0.5):
        """`quantize`: "none" or "int8" (see `quantize_int8`); `threads`: set torch's intra-op
        threads (process-wide) to this many, e.g. a Ray replica's CPUs; None leaves them.
        `device`: "cpu" or "cuda" (the process's current GPU); `dtype`: the weights' and
        activations' type, fp32 | bf16 | fp16 (fp16: GPU only). Outputs are fp32 on the CPU.
        `threshold`: for a multi-label model (config.json `problem_type` is
        `multi_label_classification`, as transformers writes it), a label applies when its
        sigmoid probability is >= this."""
        from encoder.hf import load_pretrained

        from .storage import local_copy

        self.source = str(folder)  # as given: a local folder or a URI on shared storage
        folder = self.folder = local_copy(self.source)  # a URI's folder is copied to this node once
        info = Path(folder, "cloze.json")
        trained = json.loads(info.read_text()).get("metadata", {}).get("finetune_config", {}) if info.is_file() else {}
        check_inference(quantize, device, dtype)
        if threads is not None:
            torch.set_num_threads(max(1, int(threads)))
        self.model = load_pretrained(folder).eval()
        self.kind = "token" if type(self.model).__name__ == "TokenClassifier" else "sequence"
        if type(self.model).__name__ not in ("SequenceClassifier", "TokenClassifier"):
            raise ValueError(f"{folder} holds no sequence or token classifier")
        self.labels = [self.model.id2label[i] for i in range(self.model.num_labels)]
        self.multi_label = self.kind == "sequence" and is_multi_label(folder)
        self.threshold = check_threshold(threshold)
        self.quantize, self.device, self.dtype = quantize, torch.device(device), dtype
        if quantize == "int8":
            self.model = quantize_int8(self.model)
        self.model = self.model.to(device=self.device, dtype=DTYPES[dtype])
        # the length it was fine-tuned (and selected) at, else the model's limit
        self.max_seq_len = max_seq_len or trained.get("max_seq_len") or min(512, self.model.config.max_position_embeddings)
        self.tok = tokenizer_for(self.folder, self.max_seq_len)
        self.pad_id = self.model.config.pad_token_id
        self.batch_size = batch_size

    @torch.inference_mode()
    def _batched(self, enc: Encoded, run: Callable[[dict], list[torch.Tensor]]) -> list[torch.Tensor]:
        """`run` over padded chunks of `batch_size` examples; one output per example."""
        out = []
        for i in range(0, len(enc.input_ids), self.batch_size):
            batch = pad_batch(enc.input_ids[i:i + self.batch_size], enc.token_type_ids[i:i + self.batch_size],
                              self.pad_id)
            rows = run({k: v.to(self.device, non_blocking=True) for k, v in batch.items()})
            out += [r.float().cpu() for r in rows]  # no-ops for fp32 on the CPU
        return out

    def _logit_rows(self, batch: dict) -> list[torch.Tensor]:
        logits = self.model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]).logits
        lengths = batch["attention_mask"].sum(1)
        return [row if self.kind == "sequence" else row[:n] for row, n in zip(logits, lengths.tolist())]

    def logits(self, enc: Encoded) -> list[torch.Tensor]:
        return self._batched(enc, self._logit_rows)

    def encode(self, texts: Sequence[str], texts_b: Sequence[str] | None = None) -> Encoded:
        return encode_sequences(self.tok, texts, texts_b)

    def classify(self, texts: Sequence[str], texts_b: Sequence[str] | None = None) -> list[dict]:
        enc = self.encode(texts, texts_b)
        return self.classify_rows(self.logits(enc), enc.truncated)

    def classify_rows(self, rows: Sequence[torch.Tensor], truncated: Sequence[bool],
                      threshold: float | None = None) -> list[dict]:
        """Sequence logits -> label, score, probs (label -> probability), truncated. A
        multi-label model's probs are independent sigmoids, and `labels` lists those >=
        the threshold (this call's, else the Predictor's), most probable first; `label` /
        `score` are its most probable label either way."""
        threshold = self.threshold if threshold is None else check_threshold(threshold)
        results = []
        for row, cut in zip(rows, truncated):
            probs = torch.sigmoid(row.float()) if self.multi_label else stable_softmax(row)
            best = int(probs.argmax())
            out = {"label": self.labels[best], "score": float(probs[best]),
                   "probs": {lab: float(p) for lab, p in zip(self.labels, probs.tolist())}, "truncated": cut}
            if self.multi_label:
                order = sorted(range(len(self.labels)), key=lambda i: -float(probs[i]))
                out["labels"] = [self.labels[i] for i in order if float(probs[i]) >= threshold]
            results.append(out)
        return results

    def encode_texts_as_words(self, texts: Sequence[str]) -> tuple[Encoded, list[tuple[list[str], list]]]:
        """Raw texts -> `split_words` words (with offsets) -> the token encoding."""
        split = [split_words(t) for t in texts]
        return encode_words(self.tok, [w for w, _ in split]), split

    def entities(self, texts: Sequence[str]) -> list[dict]:
        """Typed spans with character offsets, and per-word tags, for raw texts."""
        enc, split = self.encode_texts_as_words(texts)
        return [self.entity_row(row, first, text, offsets, cut) for row, first, text, (_, offsets), cut in
                zip(self.logits(enc), enc.first_piece, texts, split, enc.truncated)]

    def entity_row(self, row: torch.Tensor, first: Sequence[int], text: str, offsets: Sequence[tuple[int, int]],
                   truncated: bool) -> dict:
        """One text's token logits -> words (tag, score = the tag's probability on the word's
        first piece; None for a word cut off by max_seq_len, tagged "O") and entity spans
        (BIO chunks as `quality.bio_spans` decodes them; score = the mean of their words')."""
        from .quality import bio_spans

        probs = stable_softmax(row)  # (T, C): never empty, [CLS] and [SEP] are always there
        best = probs.argmax(-1).tolist()
        tags = word_tags(first, best, self.labels)
        scores = [float(probs[p, best[p]]) if p >= 0 else None for p in first]
        out_words = [{"word": text[a:b], "start": a, "end": b, "tag": t, "score": sc}
                     for (a, b), t, sc in zip(offsets, tags, scores)]
        spans = []
        for typ, s, e in bio_spans(tags):
            word_scores = [x for x in scores[s:e] if x is not None]
            start, end = offsets[s][0], offsets[e - 1][1]
            spans.append({"type": typ, "text": text[start:end], "start": start, "end": end,
                          "score": sum(word_scores) / len(word_scores) if word_scores else 0.0,
                          "words": [s, e]})
        return {"entities": spans, "words": out_words, "truncated": truncated}

    def _pooled_rows(self, pooling: str) -> Callable[[dict], list[torch.Tensor]]:
        def run(batch: dict) -> list[torch.Tensor]:
            mask = batch["attention_mask"]
            hidden = self.model.encoder(batch["input_ids"], mask, batch["token_type_ids"])  # (B, T, H)
            if pooling == "cls":
                pooled = hidden[:, 0]
            else:  # padding states are exactly zero; divide by the real token count
                pooled = hidden.sum(1) / mask.sum(1, keepdim=True).to(hidden.dtype)
            return list(pooled.float())
        return run

    def embeddings(self, enc: Encoded, pooling: str = "cls", normalize: bool = False) -> list[torch.Tensor]:
        """Encoder features of encoded texts: (H,) per text, L2-normalized if asked."""
        if pooling not in POOLING_MODES:
            raise ValueError(f"pooling must be one of {', '.join(POOLING_MODES)}, got {pooling!r}")
        rows = self._batched(enc, self._pooled_rows(pooling))
        return [torch.nn.functional.normalize(r, dim=-1) if normalize else r for r in rows]

    def embed(self, texts: Sequence[str], pooling: str = "cls", normalize: bool = False) -> list[list[float]]:
        return [r.tolist() for r in self.embeddings(self.encode(texts), pooling, normalize)]

    def tag(self, sentences: Sequence[Sequence[str]]) -> list[list[str]]:
        """Word-level tags; words past max_seq_len get "O"."""
        enc = encode_words(self.tok, sentences)
        out = []
        for row, first in zip(self.logits(enc), enc.first_piece):
            out.append(word_tags(first, row.argmax(-1).tolist(), self.labels))
        return out


def folder_kind(folder: str) -> str | None:
    """"sequence" / "token" for a classifier folder, None otherwise (no weights read)."""

    cfg = Path(folder) / "config.json"
    if not cfg.is_file():
        return None
    arch = (json.loads(cfg.read_text()).get("architectures") or [""])[0]
    return {"BertForSequenceClassification": "sequence", "BertForTokenClassification": "token"}.get(arch)


def is_multi_label(folder: str) -> bool:
    """Whether config.json marks a multi-label classifier (transformers' `problem_type`)."""
    cfg = Path(folder) / "config.json"
    return cfg.is_file() and json.loads(cfg.read_text()).get("problem_type") == "multi_label_classification"
