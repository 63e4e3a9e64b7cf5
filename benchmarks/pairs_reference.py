"""Single-process reference for the `pairs` stage: the same algorithm, one plain loop, no Ray.

Reads every unit in order, normalizes and splits it, tokenizes it (one batched Rust call
per unit, one thread), builds examples with the same builders and seeds, and writes one
Parquet file per unit. Its output counts must equal the Ray pipeline's (benchmarks/pairs.py
checks), so the speed-up is measured on identical work.
"""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.data.config import DataConfig
from pipelines.data.corpus import plan_units, read_unit
from pipelines.data.builders import BUILDERS
from pipelines.data.text import document_sentences, normalize_text
from pipelines.data.tokenizer import SpecialIds, load_tokenizer


def build_reference(config: DataConfig, out_dir: str) -> dict:
    tok = load_tokenizer(config.tokenizer, config.lowercase)
    builder = BUILDERS[config.task](config.max_seq_len, config.short_seq_prob, SpecialIds.of(tok))
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    examples = tokens = 0
    for unit in plan_units(config).units:
        docs = [document_sentences(normalize_text(t)) for t in read_unit(unit, config).texts]
        docs = [d for d in docs if d]
        flat = [s for d in docs for p in d for s in p]
        ids = iter(e.ids for e in tok.encode_batch_fast(flat, add_special_tokens=False))
        docs = [[[next(ids) for _ in p] for p in d] for d in docs]
        docs = [[[s for s in p if s] for p in d] for d in docs]
        docs = [d for d in ([p for p in d if p] for d in docs) if d]
        rows = []
        for p in range(config.dupe_factor):
            rows += builder(docs, random.Random(f"{config.seed}/{unit.key}/{p}"), Counter())
        random.Random(f"{config.seed}/{unit.key}/order").shuffle(rows)
        if rows:
            table = {"input_ids": [r[0] for r in rows], "token_type_ids": [r[1] for r in rows],
                     "length": [len(r[0]) for r in rows]}
            if builder.label:
                table[builder.label] = [r[2] for r in rows]
            pq.write_table(pa.table(table), f"{out_dir}/part-{unit.index:05d}.parquet", compression="zstd")
        examples += len(rows)
        tokens += sum(len(r[0]) for r in rows)
    return {"examples": examples, "example_tokens": tokens}
