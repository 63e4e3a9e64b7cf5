"""Per-unit processing of the `pairs` stage: one callable class per step, over a pyarrow batch
whose rows are work units (see corpus.py). No Ray needed to call them.

    unit (JSON) -> ReadDocuments -> SplitSentences -> TokenizeSentences -> BuildExamples
                -> PairShardWriter -> the unit's statistics (one JSON row)
    unit (JSON) -> ReadDocuments -> CountWords -> the unit's word counts (vocabulary training)

`build_sentence_pairs` passes them to Ray Data's `map_batches` as instances, so Ray runs
them as tasks and fuses each chain: a unit is read, tokenized, turned into examples and
written by one worker without crossing the object store.

A unit's randomness is `random.Random(f"{seed}/{unit key}/{pass}")` and a unit is one shard
(`part-NNNNN.parquet`), so the bytes of every shard are a function of (input, config),
whatever the number of workers or blocks.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from itertools import chain
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..storage import filesystem
from .builders import BUILDERS, Doc
from .config import DataConfig
from .corpus import Unit, read_unit
from .text import NO_TEXT, document_sentences, normalize_text
from .tokenizer import SpecialIds, count_words, word_counter

# rows per Parquet row group of a shard: the unit a training rank reads, so a rank's share of
# the rows costs its share of the bytes (+ at most a group at each end)
SHARD_ROW_GROUP = 1024
HIST_BIN = 16  # width of the manifest's length-histogram bins, in tokens


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
        fs, root = filesystem(self.folder)
        out = []
        for r in range(batch.num_rows):
            stats = json.loads(_one(batch, "stats", r))
            table = shard_table(batch, r, self.label)
            stats["shards"] = []
            if table.num_rows:
                name = f"part-{_one(batch, 'index', r):05d}.parquet"
                pq.write_table(table, f"{root}/{name}", filesystem=fs, compression="zstd",
                               row_group_size=SHARD_ROW_GROUP)
                stats["shards"] = [{"file": name, "rows": table.num_rows}]
            out.append({"index": _one(batch, "index", r), "stats": json.dumps(stats)})
        return pa.Table.from_pylist(out, schema=pa.schema([("index", pa.int64()), ("stats", pa.string())]))


class CountWords:
    """Read documents -> the unit's word counts (`count_words` on normalized text), as
    (word, count) columns sorted by word: the vocabulary's input, counted where it is read."""

    def __init__(self, lowercase: bool):
        self.lowercase = lowercase

    def __call__(self, batch: pa.Table) -> pa.Table:
        tok = word_counter(self.lowercase)
        indexes, words, counts = [], [], []
        for r in range(batch.num_rows):
            c = count_words((normalize_text(t) for t in _one(batch, "texts", r)), tok)
            indexes.append(_one(batch, "index", r))
            ordered = sorted(c)
            words.append(ordered)
            counts.append([c[w] for w in ordered])
        return pa.table({"index": pa.array(indexes, pa.int64()), "words": pa.array(words, pa.list_(pa.string())),
                         "counts": pa.array(counts, pa.list_(pa.int64()))})
