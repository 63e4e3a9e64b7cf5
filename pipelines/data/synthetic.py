"""Synthetic pair shards: random tokens in the pair-shard schema, with a manifest like the
one `cloze data` writes (BERT's special ids). For smoke runs, exactness tests and benchmarks
where the text does not matter; tests of what production sees use real `cloze data` output."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

LABEL_COLUMNS = ("nsp_label", "sop_label", "shuffle_label")
BERT_SPECIAL = {"pad": 0, "unk": 100, "cls": 101, "sep": 102, "mask": 103}


def synthetic_pair_shards(folder: str | os.PathLike, rows: int = 32, shards: int = 2, vocab_size: int = 128,
                          max_len: int = 24, seed: int = 0, max_seq_len: int = 64) -> Path:
    """Rows are `[CLS] A [SEP] B [SEP]` with ids in [110, vocab_size) (clear of BERT's
    specials) and random 0/1 labels in every label column; manifest.json declares the
    vocabulary, special ids and `max_seq_len` (>= max_len)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    per = -(-rows // shards)
    files = []
    for s in range(shards):
        n = min(per, rows - s * per)
        ids, types = [], []
        for _ in range(n):
            la = int(rng.integers(2, max(3, max_len // 2 - 2)))
            lb = int(rng.integers(2, max(3, max_len - la - 3)))
            a = [101, *rng.integers(110, vocab_size, la).tolist(), 102]
            b = [*rng.integers(110, vocab_size, lb).tolist(), 102]
            ids.append(a + b)
            types.append([0] * len(a) + [1] * len(b))
        table = {"input_ids": pa.array(ids, pa.list_(pa.int32())),
                 "token_type_ids": pa.array(types, pa.list_(pa.int32())),
                 "length": pa.array([len(x) for x in ids], pa.int32())}
        for col in LABEL_COLUMNS:
            table[col] = pa.array(rng.integers(0, 2, n), pa.int64())
        name = f"part-{s:05d}.parquet"
        pq.write_table(pa.table(table), out / name)
        files.append({"file": name, "rows": n})
    manifest = {"task": "synthetic", "columns": ["input_ids", "token_type_ids", "length", *LABEL_COLUMNS],
                "masking": "dynamic", "max_seq_len": max(max_seq_len, max_len), "seed": seed, "shards": files,
                "tokenizer": {"vocab_size": vocab_size, "special_ids": BERT_SPECIAL, "source": "synthetic"}}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return out
