"""The `pairs` stage: raw documents -> Parquet shards of pretraining examples, with Ray Data.

    units (driver) -> ReadDocuments -> SplitSentences -> TokenizeSentences -> BuildExamples
                   -> PairShardWriter -> per-shard stats -> manifest.json (driver)

Each stage is a callable class over a pyarrow batch whose rows are work units (see
corpus.py); they are passed to `map_batches` as instances, so Ray runs them as tasks and
fuses the whole chain: a unit is read, tokenized, turned into examples and written by one
worker without crossing the object store, and the driver only sees small stats rows.

Reproducible by construction: a unit's randomness is `random.Random(f"{seed}/{unit key}/
{pass}")` and a unit is one shard (`part-NNNNN.parquet`), so the bytes of every shard are a
function of (input, config), whatever the number of workers or blocks.

Example builders (NspBuilder, SopBuilder, ShuffleBuilder, MlmBuilder) follow BERT's
`create_pretraining_data.py`: target length `max_seq_len - 3` (or a random shorter one
with `short_seq_prob`, per document), chunks of whole sentences, A = a random number of
the chunk's sentences, pairs cut to fit by dropping tokens from the longer side, front or
back at random. One deliberate change: BERT forces "random next" for a chunk of one
sentence, which pushes NotNext above 50% and lets the model read the label off the chunk's
shape. Here the label is a fair coin drawn for every example, and a one-sentence chunk is
split inside the sentence (A = its first part), for both labels. A random B comes from
another document of the same unit (never the same document; units hold >= 16 documents
where the input allows), and the chunk's unused sentences are put back, as in BERT.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import socket
import time
import uuid
from collections import Counter
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from .config import DataConfig
from .corpus import Unit, _filesystem, plan_units, read_unit, split_query
from .text import NO_TEXT, document_sentences, normalize_text
from .tokenizer import (SpecialIds, continuation_table, is_lowercase, load_tokenizer, save_tokenizer,
                        tokenizer_hash, train_wordpiece)

FORMAT_VERSION = 1  # bump when the algorithm or the shard layout changes: invalidates caches
HIST_BIN = 16  # width of the manifest's length-histogram bins, in tokens
MAX_LISTED = 200  # skipped / repaired documents named per reason in the manifest

Doc = list[list[list[int]]]  # paragraphs of sentences of token ids


# ---------------------------------------------------------------- example builders (no Ray)


def truncate_pair(a: list[int], b: list[int], max_tokens: int, rng: random.Random) -> int:
    """BERT's truncate_seq_pair, in place: drop from the longer side, front or back at
    random, until len(a) + len(b) <= max_tokens. Returns the number of tokens dropped."""
    dropped = 0
    while len(a) + len(b) > max_tokens:
        longer = a if len(a) > len(b) else b
        if rng.random() < 0.5:
            del longer[0]
        else:
            longer.pop()
        dropped += 1
    return dropped


class _Builder:
    """Shared chunking of BERT's generator; subclasses turn chunks into examples."""

    label: str | None = None

    def __init__(self, max_seq_len: int, short_seq_prob: float, special: SpecialIds):
        self.max_seq_len = max_seq_len
        self.short_seq_prob = short_seq_prob
        self.cls, self.sep = special.cls, special.sep

    def pair(self, a: list[int], b: list[int]) -> tuple[list[int], list[int]]:
        """[CLS] A [SEP] B [SEP] and its token types (0 for [CLS] A [SEP], 1 for B [SEP])."""
        return [self.cls, *a, self.sep, *b, self.sep], [0] * (len(a) + 2) + [1] * (len(b) + 1)

    def single(self, x: list[int]) -> tuple[list[int], list[int]]:
        return [self.cls, *x, self.sep], [0] * (len(x) + 2)

    def target_length(self, max_tokens: int, rng: random.Random) -> int:
        if rng.random() < self.short_seq_prob:
            return rng.randint(2, max_tokens)
        return max_tokens

    def __call__(self, docs: list[Doc], rng: random.Random, counts: Counter) -> list[tuple[list[int], list[int], int]]:
        """Examples (input_ids, token_type_ids, label) of a unit's documents, in order."""
        out: list[tuple[list[int], list[int], int]] = []
        for d in range(len(docs)):
            self.document(docs, d, rng, counts, out)
        return out

    def document(self, docs, d, rng, counts, out) -> None:  # pragma: no cover - abstract
        raise NotImplementedError


class _ChunkPairBuilder(_Builder):
    """Chunks of whole sentences, split into A (first a_end sentences) and B (the rest)."""

    def chunk_split(self, chunk: list[list[int]], rng: random.Random, counts: Counter):
        """(A tokens, B tokens of the true continuation, a_end) or None for a 1-token chunk.

        A chunk of one sentence is cut inside it (a_end = 1, B = the sentence's rest)."""
        if len(chunk) >= 2:
            a_end = rng.randint(1, len(chunk) - 1)
            return [t for s in chunk[:a_end] for t in s], [t for s in chunk[a_end:] for t in s], a_end
        (only,) = chunk
        if len(only) < 2:
            counts["chunks_skipped_one_token"] += 1
            return None
        counts["chunks_split_inside_sentence"] += 1
        cut = rng.randint(1, len(only) - 1)
        return only[:cut], only[cut:], 1

    def document(self, docs, d, rng, counts, out) -> None:
        sentences = [s for para in docs[d] for s in para]
        max_tokens = self.max_seq_len - 3
        target = self.target_length(max_tokens, rng)
        chunk: list[list[int]] = []
        length = 0
        i = 0
        while i < len(sentences):
            chunk.append(sentences[i])
            length += len(sentences[i])
            if i == len(sentences) - 1 or length >= target:
                i -= self.emit(docs, d, chunk, target, max_tokens, rng, counts, out)
                chunk, length = [], 0
            i += 1

    def emit(self, docs, d, chunk, target, max_tokens, rng, counts, out) -> int:
        """Append an example for `chunk`; return how many sentences to put back."""
        raise NotImplementedError  # pragma: no cover - abstract


class NspBuilder(_ChunkPairBuilder):
    """Next sentence prediction. nsp_label 0 = B is A's true continuation, 1 = B is random."""

    label = "nsp_label"

    def __call__(self, docs, rng, counts):
        if len(docs) < 2:  # no other document to draw a random B from
            counts["units_skipped_single_document"] += 1
            return []
        return super().__call__(docs, rng, counts)

    def emit(self, docs, d, chunk, target, max_tokens, rng, counts, out) -> int:
        split = self.chunk_split(chunk, rng, counts)
        if split is None:
            return 0
        a, b, a_end = split
        put_back = 0
        is_random = rng.random() < 0.5
        if is_random:
            other = rng.randrange(len(docs) - 1)
            other += other >= d  # never the same document
            source = [s for para in docs[other] for s in para]
            b = []
            for s in source[rng.randrange(len(source)):]:
                b.extend(s)
                if len(b) >= target - len(a):
                    break
            put_back = len(chunk) - a_end  # the chunk's unused sentences go back to the document
        counts["truncated_tokens"] += truncate_pair(a, b, max_tokens, rng)
        out.append((*self.pair(a, b), int(is_random)))
        return put_back


class SopBuilder(_ChunkPairBuilder):
    """Sentence order prediction (ALBERT): A, B consecutive in one document; sop_label 1 =
    swapped. B never comes from another document."""

    label = "sop_label"

    def emit(self, docs, d, chunk, target, max_tokens, rng, counts, out) -> int:
        split = self.chunk_split(chunk, rng, counts)
        if split is None:
            return 0
        a, b, _ = split
        counts["truncated_tokens"] += truncate_pair(a, b, max_tokens, rng)
        swapped = rng.random() < 0.5
        if swapped:
            a, b = b, a
        out.append((*self.pair(a, b), int(swapped)))
        return 0


class ShuffleBuilder(_Builder):
    """Sentence shuffling: one paragraph's sentences (a window of them that fits), in order
    or shuffled (shuffle_label 1). `[CLS] s1 s2 ... [SEP]`. A window of one sentence cannot be
    shuffled: it is counted (`windows_single_sentence`), not labeled."""

    label = "shuffle_label"

    def document(self, docs, d, rng, counts, out) -> None:
        max_tokens = self.max_seq_len - 2
        for para in docs[d]:
            window: list[list[int]] = []
            length = 0
            for s in para:
                if window and length + len(s) > max_tokens:
                    self.emit(window, rng, counts, out)
                    window, length = [], 0
                window.append(s)
                length += len(s)
            if window:
                self.emit(window, rng, counts, out)

    def emit(self, window: list[list[int]], rng, counts, out) -> None:
        max_tokens = self.max_seq_len - 2
        if len(window) < 2:
            counts["windows_single_sentence"] += 1
            return
        if all(s == window[0] for s in window):
            counts["windows_identical_sentences"] += 1
            return
        original = [t for s in window for t in s]
        shuffled = rng.random() < 0.5
        tokens = original
        while shuffled and tokens == original:  # a real permutation: the text must change
            order = list(range(len(window)))
            rng.shuffle(order)
            tokens = [t for i in order for t in window[i]]
        counts["truncated_tokens"] += max(0, len(tokens) - max_tokens)
        out.append((*self.single(tokens[:max_tokens]), int(shuffled)))


class MlmBuilder(_Builder):
    """MLM only: `[CLS] text [SEP]` blocks of consecutive whole sentences of one document."""

    def document(self, docs, d, rng, counts, out) -> None:
        max_tokens = self.max_seq_len - 2
        target = self.target_length(max_tokens, rng)
        block: list[int] = []
        for s in (s for para in docs[d] for s in para):
            if block and len(block) + len(s) > target:
                out.append((*self.single(block), -1))
                block = []
            block.extend(s)
            if len(block) > max_tokens:
                counts["truncated_tokens"] += len(block) - max_tokens
                del block[max_tokens:]
        if block:
            out.append((*self.single(block), -1))


BUILDERS = {"nsp": NspBuilder, "sop": SopBuilder, "shuffle": ShuffleBuilder, "mlm": MlmBuilder}


# ---------------------------------------------------------------- Ray Data stages (no Ray needed to call)


def _one(table: pa.Table, column: str, row: int) -> Any:
    return table.column(column)[row].as_py()


def _flat(table: pa.Table, column: str, row: int) -> np.ndarray:
    return table.column(column)[row].values.to_numpy(zero_copy_only=False)


def _offsets(lengths: list[int]) -> list[int]:
    return np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).tolist()


class ReadDocuments:
    """unit (JSON) -> the unit's decoded documents, and the ones skipped, with reasons."""

    def __init__(self, config: DataConfig):
        self.config = config

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = []
        for spec in batch.column("unit").to_pylist():
            unit = Unit.from_json(spec)
            docs = read_unit(unit, self.config)
            rows.append({"index": unit.index, "key": unit.key, "doc_ids": docs.doc_ids, "texts": docs.texts,
                         "skipped": json.dumps(docs.skipped), "repaired": json.dumps(docs.repaired)})
        return pa.Table.from_pylist(rows, schema=_READ_SCHEMA)


_READ_SCHEMA = pa.schema([("index", pa.int64()), ("key", pa.string()), ("doc_ids", pa.list_(pa.string())),
                          ("texts", pa.list_(pa.string())), ("skipped", pa.string()), ("repaired", pa.string())])


class SplitSentences:
    """Documents -> normalized paragraphs of sentences (flat, with offsets). A document left
    with no text is skipped (no_text)."""

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = []
        for r in range(batch.num_rows):
            skipped = json.loads(_one(batch, "skipped", r))
            doc_ids, para_counts, sent_counts, sentences = [], [], [], []
            for doc_id, text in zip(_one(batch, "doc_ids", r), _one(batch, "texts", r)):
                paras = document_sentences(normalize_text(text))
                if not paras:
                    skipped.append((doc_id, NO_TEXT))
                    continue
                doc_ids.append(doc_id)
                para_counts.append(len(paras))
                for p in paras:
                    sent_counts.append(len(p))
                    sentences += p
            rows.append({"index": _one(batch, "index", r), "key": _one(batch, "key", r), "doc_ids": doc_ids,
                         "para_offsets": _offsets(para_counts), "sent_offsets": _offsets(sent_counts),
                         "sentences": sentences, "skipped": json.dumps(skipped),
                         "repaired": _one(batch, "repaired", r)})
        return pa.Table.from_pylist(rows, schema=_SPLIT_SCHEMA)


_STRUCTURE = [("doc_ids", pa.list_(pa.string())), ("para_offsets", pa.list_(pa.int64())),
              ("sent_offsets", pa.list_(pa.int64()))]
_SPLIT_SCHEMA = pa.schema([("index", pa.int64()), ("key", pa.string()), *_STRUCTURE,
                           ("sentences", pa.list_(pa.string())), ("skipped", pa.string()), ("repaired", pa.string())])

_TOKENIZERS: dict[str, Any] = {}  # per worker process: tokenizer JSON digest -> Tokenizer


def _tokenizer_from_json(spec: str):
    digest = hashlib.sha256(spec.encode()).hexdigest()
    if digest not in _TOKENIZERS:
        from tokenizers import Tokenizer

        _TOKENIZERS[digest] = Tokenizer.from_str(spec)
    return _TOKENIZERS[digest]


class TokenizeSentences:
    """Sentences -> WordPiece ids, batched in the Rust tokenizer (no special tokens)."""

    def __init__(self, tokenizer_json: str):
        self.tokenizer_json = tokenizer_json

    def __call__(self, batch: pa.Table) -> pa.Table:
        tok = _tokenizer_from_json(self.tokenizer_json)
        ids_col, off_col = [], []
        for r in range(batch.num_rows):
            encodings = tok.encode_batch_fast(_one(batch, "sentences", r), add_special_tokens=False)
            ids = [e.ids for e in encodings]
            ids_col.append(np.array(list(chain.from_iterable(ids)), dtype=np.int32))
            off_col.append(_offsets([len(s) for s in ids]))
        out = batch.drop_columns(["sentences"])
        out = out.append_column("token_ids", pa.array(ids_col, type=pa.list_(pa.int32())))
        return out.append_column("token_offsets", pa.array(off_col, type=pa.list_(pa.int64())))


def unit_documents(table: pa.Table, row: int) -> tuple[list[str], list[Doc]]:
    """A tokenized unit as documents of paragraphs of sentences; empty pieces dropped."""
    ids = _flat(table, "token_ids", row).tolist()
    tok_off = _one(table, "token_offsets", row)
    sent_off = _one(table, "sent_offsets", row)
    para_off = _one(table, "para_offsets", row)
    doc_ids, docs = [], []
    for d, doc_id in enumerate(_one(table, "doc_ids", row)):
        doc = []
        for p in range(para_off[d], para_off[d + 1]):
            para = [ids[tok_off[s]:tok_off[s + 1]] for s in range(sent_off[p], sent_off[p + 1])]
            para = [s for s in para if s]
            if para:
                doc.append(para)
        doc_ids.append(doc_id)
        docs.append(doc)
    return doc_ids, docs


class BuildExamples:
    """Tokenized documents -> the unit's examples (flat columns) + its statistics."""

    def __init__(self, config: DataConfig, special: SpecialIds, continuation: list[bool] | None = None):
        self.config = config
        self.special = special
        self.builder = BUILDERS[config.task](config.max_seq_len, config.short_seq_prob, special)
        self.continuation = continuation  # whole-word static masking only

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = [self.unit(batch, r) for r in range(batch.num_rows)]
        return pa.table({name: pa.array([row[name] for row in rows], type=_EXAMPLES_SCHEMA.field(name).type)
                         for name in _EXAMPLES_SCHEMA.names})

    def unit(self, batch: pa.Table, r: int) -> dict:
        cfg = self.config
        key = _one(batch, "key", r)
        doc_ids, docs = unit_documents(batch, r)
        skipped = [tuple(s) for s in json.loads(_one(batch, "skipped", r))]
        kept = []
        for doc_id, doc in zip(doc_ids, docs):
            if doc:
                kept.append(doc)
            else:  # every sentence tokenized to nothing
                skipped.append((doc_id, NO_TEXT))
        counts: Counter = Counter()
        examples = []
        for p in range(cfg.dupe_factor):
            examples += self.builder(kept, random.Random(f"{cfg.seed}/{key}/{p}"), counts)
        random.Random(f"{cfg.seed}/{key}/order").shuffle(examples)
        input_ids = [e[0] for e in examples]
        mlm_labels: list[list[int]] = []
        if cfg.masking == "static":
            input_ids, mlm_labels = self.mask(input_ids, key)
        lengths = [len(x) for x in input_ids]
        sentence_lengths = [len(s) for doc in kept for para in doc for s in para]
        stats = {
            "units": 1,
            "documents_seen": len(doc_ids) + len(json.loads(_one(batch, "skipped", r))),
            "documents_used": len(kept),
            "documents_single_sentence": sum(1 for doc in kept if sum(len(p) for p in doc) == 1),
            "skipped": skipped,
            "repaired": [tuple(x) for x in json.loads(_one(batch, "repaired", r))],
            "paragraphs": sum(len(doc) for doc in kept),
            "sentences": len(sentence_lengths),
            "tokens": int(sum(sentence_lengths)),
            "examples": len(examples),
            "example_tokens": int(sum(lengths)),
            "labels": dict(Counter(str(e[2]) for e in examples)) if self.builder.label else {},
            "length_histogram": np.bincount(np.asarray(lengths, dtype=np.int64) // HIST_BIN,
                                            minlength=(cfg.max_seq_len + HIST_BIN - 1) // HIST_BIN + 1).tolist()
            if lengths else [],
            "builder": dict(counts),
        }
        return {"index": _one(batch, "index", r), "key": key,
                "input_ids": np.array(list(chain.from_iterable(input_ids)), dtype=np.int32),
                "example_offsets": _offsets(lengths),
                "token_type_ids": np.array(list(chain.from_iterable(e[1] for e in examples)), dtype=np.int8),
                "labels": np.array([e[2] for e in examples], dtype=np.int8),
                "mlm_labels": np.array(list(chain.from_iterable(mlm_labels)), dtype=np.int32), "stats": json.dumps(stats)}

    def mask(self, input_ids: list[list[int]], key: str) -> tuple[list[list[int]], list[list[int]]]:
        """Static masking (BERT's original): drawn once here, per example, seeded by the unit."""
        import torch

        from encoder.masking import mask_tokens

        cfg, sp = self.config, self.special
        g = torch.Generator().manual_seed(int(hashlib.sha256(f"{cfg.seed}/{key}/mask".encode()).hexdigest()[:15], 16))
        specials = torch.tensor(sp.all)
        masked, labels = [], []
        for ids in input_ids:
            x = torch.tensor([ids], dtype=torch.long)
            starts = None
            if cfg.whole_word_masking and self.continuation is not None:
                starts = ~torch.tensor([[self.continuation[t] for t in ids]])
            m, lab = mask_tokens(x, torch.isin(x, specials), mask_token_id=sp.mask, vocab_size=sp.vocab_size,
                                 mask_prob=cfg.mask_prob, max_predictions=cfg.max_predictions_per_seq,
                                 random_token_low=sp.random_token_low, generator=g, word_starts=starts)
            masked.append(m[0].tolist())
            labels.append(lab[0].tolist())
        return masked, labels


_EXAMPLES_SCHEMA = pa.schema([("index", pa.int64()), ("key", pa.string()), ("input_ids", pa.list_(pa.int32())),
                              ("example_offsets", pa.list_(pa.int64())), ("token_type_ids", pa.list_(pa.int8())),
                              ("labels", pa.list_(pa.int8())), ("mlm_labels", pa.list_(pa.int32())),
                              ("stats", pa.string())])


def shard_table(batch: pa.Table, row: int, label: str | None) -> pa.Table:
    """One unit's examples as the shard's table: a row per example (schema in DESIGN.md)."""
    offsets = pa.array(_one(batch, "example_offsets", row), type=pa.int32())
    lengths = np.diff(offsets.to_numpy()).astype(np.int32)
    columns = {
        "input_ids": pa.ListArray.from_arrays(offsets, batch.column("input_ids")[row].values),
        "token_type_ids": pa.ListArray.from_arrays(offsets, batch.column("token_type_ids")[row].values),
        "length": pa.array(lengths, type=pa.int32()),
    }
    mlm = batch.column("mlm_labels")[row].values
    if len(mlm):
        columns["mlm_labels"] = pa.ListArray.from_arrays(offsets, mlm)
    if label:
        columns[label] = batch.column("labels")[row].values
    return pa.table(columns)


class PairShardWriter:
    """Writes each unit's examples to `<folder>/part-<unit index>.parquet` (no file for a unit
    with no examples); passes on only the unit's statistics."""

    def __init__(self, folder: str, label: str | None):
        self.folder = folder
        self.label = label

    def __call__(self, batch: pa.Table) -> pa.Table:
        fs, root = _filesystem(self.folder)
        out = []
        for r in range(batch.num_rows):
            stats = json.loads(_one(batch, "stats", r))
            table = shard_table(batch, r, self.label)
            stats["shards"] = []
            if table.num_rows:
                name = f"part-{_one(batch, 'index', r):05d}.parquet"
                pq.write_table(table, f"{root}/{name}", filesystem=fs, compression="zstd")
                stats["shards"] = [{"file": name, "rows": table.num_rows}]
            out.append({"index": _one(batch, "index", r), "stats": json.dumps(stats)})
        return pa.Table.from_pylist(out, schema=pa.schema([("index", pa.int64()), ("stats", pa.string())]))


# ---------------------------------------------------------------- manifest


def merge_stats(parts: list[dict]) -> dict:
    """Sum per-unit statistics (in unit order, so the manifest is deterministic)."""
    total: dict[str, Any] = {"skipped": Counter(), "repaired": Counter(), "labels": Counter(), "builder": Counter(),
                             "skipped_documents": {}, "repaired_documents": {}, "length_histogram": [], "shards": []}
    for s in parts:
        for k in ("units", "documents_seen", "documents_used", "documents_single_sentence", "paragraphs",
                  "sentences", "tokens", "examples", "example_tokens"):
            total[k] = total.get(k, 0) + s[k]
        for doc_id, reason in s["skipped"]:
            total["skipped"][reason] += 1
            listed = total["skipped_documents"].setdefault(reason, [])
            if len(listed) < MAX_LISTED:
                listed.append(doc_id)
        for doc_id, how in s["repaired"]:
            total["repaired"][how] += 1
            listed = total["repaired_documents"].setdefault(how, [])
            if len(listed) < MAX_LISTED:
                listed.append(doc_id)
        total["labels"].update(s["labels"])
        total["builder"].update(s["builder"])
        h = total["length_histogram"]
        for i, c in enumerate(s["length_histogram"]):
            if i >= len(h):
                h.append(0)
            h[i] += c
        total["shards"] += s["shards"]
    return total


def _manifest(config: DataConfig, stats: dict, ignored: list, cache_key: str, tok_info: dict, wall: float) -> dict:
    n = stats.get("examples", 0)
    labels = {k: stats["labels"][k] for k in sorted(stats["labels"])}
    return {
        "format_version": FORMAT_VERSION,
        "task": config.task,
        "label_column": config.label_column,
        "columns": ["input_ids", "token_type_ids", "length"]
        + (["mlm_labels"] if config.masking == "static" else []) + ([config.label_column] if config.label_column else []),
        "masking": config.masking,
        "seed": config.seed,
        "max_seq_len": config.max_seq_len,
        "documents": {
            "seen": stats.get("documents_seen", 0) + len(ignored),
            "read": stats.get("documents_seen", 0),
            "used": stats.get("documents_used", 0),
            "single_sentence": stats.get("documents_single_sentence", 0),
            "skipped": dict(sorted(Counter({**stats["skipped"], **Counter(r for _, r in ignored)}).items())),
            "skipped_documents": {**stats["skipped_documents"],
                                  **({"unsupported_type": [p for p, _ in ignored][:MAX_LISTED]} if ignored else {})},
            "repaired": dict(stats["repaired"]),
            "repaired_documents": stats["repaired_documents"],
        },
        "paragraphs": stats.get("paragraphs", 0),
        "sentences": stats.get("sentences", 0),
        "tokens": stats.get("tokens", 0),
        "examples": {config.task: n},
        "example_tokens": stats.get("example_tokens", 0),
        "label_balance": {"counts": labels, "fraction": {k: v / n for k, v in labels.items()} if n else {}},
        "length_histogram": {"bin_width": HIST_BIN, "counts": stats["length_histogram"]},
        "builder": dict(sorted(stats["builder"].items())),
        "tokenizer": tok_info,
        "config": config.to_dict(),
        "config_hash": config.config_hash(),
        "cache_key": cache_key,
        "units": stats.get("units", 0),
        "shards": stats["shards"],
        "wall_time_s": round(wall, 3),
    }


def read_manifest(folder: str) -> dict | None:
    """The folder's manifest, or None: a folder without one is not a finished shard set."""
    fs, root = _filesystem(folder)
    try:
        with fs.open_input_stream(f"{root}/manifest.json") as f:
            return json.loads(f.read())
    except (FileNotFoundError, OSError, pa.ArrowException):
        return None


# ---------------------------------------------------------------- the stage


def _tokenizer_for(config: DataConfig, plan, build) -> Any:
    if config.tokenizer != "train":
        return load_tokenizer(config.tokenizer, config.lowercase)
    ctx = __import__("ray").data.DataContext.get_current()
    keep, ctx.execution_options.preserve_order = ctx.execution_options.preserve_order, True
    try:  # stream normalized text to the trainer, in unit order (deterministic vocabulary)
        ds = build(plan.units).map_batches(ReadDocuments(config), batch_size=1, batch_format="pyarrow")
        texts = (normalize_text(t) for b in ds.iter_batches(batch_size=1, batch_format="pyarrow")
                 for t in b.column("texts")[0].as_py())
        return train_wordpiece(texts, vocab_size=config.vocab_size, min_frequency=config.min_frequency,
                               lowercase=config.lowercase)
    finally:
        ctx.execution_options.preserve_order = keep


def cache_key(config: DataConfig, plan_fingerprint: str) -> str:
    tok = config.tokenizer
    if tok != "train":  # a loaded tokenizer is part of the input
        tok = tokenizer_hash(load_tokenizer(tok, config.lowercase))
    parts = [str(FORMAT_VERSION), config.config_hash(), plan_fingerprint, tok]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


UNITS_PER_TASK = 8


def default_blocks(units: int, workers: int) -> int:
    """How many Ray tasks (blocks) the unit list is cut into when `num_blocks` is 0.

    Each Ray Data task costs ~0.1 s of scheduling on top of its work; one task per ~1 MiB
    unit left the 2 CPUs here ~30% idle (20NG: 9.4 s vs 7.2 s with 4 tasks). So a task takes
    about UNITS_PER_TASK units, and every worker still gets at least two tasks (balance)."""
    return max(1, min(units, max(2 * workers, -(-units // UNITS_PER_TASK))))


def build_sentence_pairs(config: DataConfig, *, log=print) -> dict:
    """Run the stage: `config.output` gets Parquet shards, the tokenizer and manifest.json.

    Inputs are listed (and a missing one raises InputError) before any Ray work. If the
    output already holds a manifest with the same cache key, nothing runs (cache hit).
    Shards are written into `<output>.tmp-<id>`, which is renamed to `output` only when
    complete, so a killed run never leaves a folder that looks finished. Returns the manifest.
    """
    import ray

    t0 = time.perf_counter()
    plan = plan_units(config)
    key = cache_key(config, plan.fingerprint)
    previous = read_manifest(config.output)
    if previous and previous.get("cache_key") == key:
        log(f"cloze data: cache hit, {config.output} is up to date ({key[:12]})")
        return previous
    if not ray.is_initialized():
        ray.init(num_cpus=config.num_workers or None, include_dashboard=False, log_to_driver=False)
    # an upper bound: Ray runs as many of these tasks as there are free CPUs at each moment
    workers = config.num_workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
    blocks = config.num_blocks or default_blocks(len(plan.units), workers)

    def units_dataset(units):
        return ray.data.from_items([{"unit": u.to_json()} for u in units],
                                   override_num_blocks=max(1, min(blocks, len(units))))

    fs, out_root = _filesystem(config.output)
    head, query = split_query(config.output)  # a URI's query (pyarrow options) stays at the end
    tmp = f"{head.rstrip('/')}.tmp-{uuid.uuid4().hex[:8]}{query}"
    _, tmp_root = _filesystem(tmp)
    local = "://" not in head
    if local:
        _remove_killed_runs(head, log)
    fs.create_dir(tmp_root, recursive=True)
    if local:  # who writes this folder: a later run removes it if this process dies
        Path(tmp_root, OWNER_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))
    try:
        log(f"cloze data: {len(plan.units)} units from {len(config.inputs)} input(s), task {config.task}, "
            f"{workers} workers")
        tok = _tokenizer_for(config, plan, units_dataset)
        special = SpecialIds.of(tok)
        save_tokenizer(tok, tmp if local else _local_staging(tmp))
        if not local:
            _upload(_local_staging(tmp), tmp)
        continuation = continuation_table(tok) if config.whole_word_masking and config.masking == "static" else None
        pool = ray.data.TaskPoolStrategy(size=workers)
        # One fused operator whose outputs are a stats row per unit: Ray Data's per-operator
        # resource reservation only held the second task back (~1 s of one idle CPU per run).
        # A Dataset copies the context when it is created, so this goes first.
        ctx = ray.data.DataContext.get_current()
        keep, ctx.op_resource_reservation_enabled = ctx.op_resource_reservation_enabled, False
        try:
            ds = units_dataset(plan.units)
            for stage in (ReadDocuments(config), SplitSentences(), TokenizeSentences(tok.to_str()),
                          BuildExamples(config, special, continuation), PairShardWriter(tmp, config.label_column)):
                ds = ds.map_batches(stage, batch_size=1, batch_format="pyarrow", compute=pool)
            parts = sorted((i, s) for b in ds.iter_batches(batch_size=None, batch_format="pyarrow")
                           for i, s in zip(b.column("index").to_pylist(), b.column("stats").to_pylist()))
        finally:
            ctx.op_resource_reservation_enabled = keep
        stats = merge_stats([json.loads(s) for _, s in parts])  # in unit order: a deterministic manifest
        tok_info = {"hash": tokenizer_hash(tok), "vocab_size": special.vocab_size, "lowercase": is_lowercase(tok),
                    "source": config.tokenizer, "special_ids": {"pad": special.pad, "unk": special.unk,
                                                                "cls": special.cls, "sep": special.sep,
                                                                "mask": special.mask}}
        manifest = _manifest(config, stats, plan.ignored, key, tok_info, time.perf_counter() - t0)
        if local:
            Path(tmp_root, OWNER_FILE).unlink(missing_ok=True)
        _finish(fs, tmp_root, out_root, manifest)
    except BaseException:
        _remove(fs, tmp_root)
        raise
    log(f"cloze data: {manifest['examples'][config.task]} {config.task} examples in {len(manifest['shards'])} "
        f"shards -> {config.output} ({manifest['wall_time_s']:.1f} s)")
    return manifest


OWNER_FILE = ".owner.json"


def _remove_killed_runs(output: str, log) -> None:
    """Remove `<output>.tmp-*` folders left by runs on this host whose process is gone (a
    killed run). A folder of a live run, or of another host, stays."""
    out = Path(output)
    for tmp in out.parent.glob(out.name + ".tmp-*"):
        try:
            owner = json.loads((tmp / OWNER_FILE).read_text())
        except (OSError, ValueError):
            continue  # not ours to judge
        if owner.get("host") != socket.gethostname():
            continue
        try:
            os.kill(int(owner["pid"]), 0)
            continue  # still running
        except ProcessLookupError:
            pass
        except (PermissionError, KeyError, ValueError):
            continue
        shutil.rmtree(tmp, ignore_errors=True)
        log(f"cloze data: removed {tmp}, left by a run that was killed (pid {owner['pid']})")


def _local_staging(uri: str) -> str:
    return os.path.join("/tmp", "cloze-staging-" + hashlib.sha256(uri.encode()).hexdigest()[:12])


def _upload(local: str, uri: str) -> None:
    pafs.copy_files(local, uri)
    shutil.rmtree(local, ignore_errors=True)


def _remove(fs: pafs.FileSystem, path: str) -> None:
    try:
        fs.delete_dir(path)
    except (FileNotFoundError, OSError, pa.ArrowException):
        pass


def _finish(fs: pafs.FileSystem, tmp_root: str, out_root: str, manifest: dict) -> None:
    """manifest.json last, then the temp folder takes the output's name (an old one is removed).

    Object stores (S3, GCS) cannot rename a folder: there the old output loses its manifest
    first (from then on it is not a finished shard set), is removed, the temp folder's files
    are copied in (server-side copies), the manifest is written last, and the temp folder
    is removed."""
    body = (json.dumps(manifest, indent=2) + "\n").encode()
    if fs.type_name != "local":
        if fs.get_file_info(out_root).type != pafs.FileType.NotFound:
            try:
                fs.delete_file(f"{out_root}/manifest.json")
            except FileNotFoundError:
                pass
            fs.delete_dir(out_root)
        for info in fs.get_file_info(pafs.FileSelector(tmp_root, recursive=True)):
            if info.type == pafs.FileType.File:
                fs.copy_file(info.path, out_root + info.path[len(tmp_root):])
        with fs.open_output_stream(f"{out_root}/manifest.json") as f:
            f.write(body)
        _remove(fs, tmp_root)
        return
    with fs.open_output_stream(f"{tmp_root}/manifest.json") as f:
        f.write(body)
    if fs.get_file_info(out_root).type != pafs.FileType.NotFound:
        old = f"{out_root}.old-{uuid.uuid4().hex[:8]}"
        fs.move(out_root, old)
        fs.move(tmp_root, out_root)
        _remove(fs, old)
    else:
        fs.move(tmp_root, out_root)
