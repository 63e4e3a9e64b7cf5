"""The shard set's tokenizer: loaded, or trained on the corpus with Ray Data.

Training counts words where the documents are read: each Ray task reads its units,
normalizes them and counts their words (`units.CountWords`); only per-unit word counts reach
the driver, which sums them in unit order, keeping at most `vocab_max_words` distinct words
(`tokenizer.merge_word_counts`), and learns the WordPiece vocabulary from the sums
(`tokenizer.wordpiece_from_counts`). Units and their order depend on the input and config
only, so the vocabulary is the same for any number of workers or blocks.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import pyarrow as pa

from .config import DataConfig
from .corpus import Unit
from .tokenizer import load_tokenizer, merge_word_counts, wordpiece_from_counts
from .units import CountWords, ReadDocuments


def unit_word_counts(ds) -> Iterator[pa.Table]:
    """(word, count) tables, one per unit, in unit order, from a dataset of CountWords rows."""
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        for r in range(batch.num_rows):
            yield pa.table({"word": batch.column("words")[r].values, "count": batch.column("counts")[r].values})


def count_corpus_words(config: DataConfig, units: list[Unit], dataset: Callable[[list[Unit]], Any],
                       compute=None) -> dict[str, int]:
    """Every unit's words counted by Ray tasks and summed on the driver (see the module doc).

    `dataset(units)` makes the Ray dataset of unit rows; `compute` is map_batches' strategy."""
    import ray

    ctx = ray.data.DataContext.get_current()
    keep = ctx.execution_options.preserve_order, ctx.op_resource_reservation_enabled
    # in unit order: the cap on distinct words prunes at the same points on every run; and no
    # per-operator reservation for the one fused operator (see build_sentence_pairs)
    ctx.execution_options.preserve_order, ctx.op_resource_reservation_enabled = True, False
    try:
        ds = dataset(units)
        for stage in (ReadDocuments(config), CountWords(config.lowercase)):
            ds = ds.map_batches(stage, batch_size=1, batch_format="pyarrow", compute=compute)
        return merge_word_counts(unit_word_counts(ds), config.vocab_max_words)
    finally:
        ctx.execution_options.preserve_order, ctx.op_resource_reservation_enabled = keep


def stage_tokenizer(config: DataConfig, units: list[Unit], dataset: Callable[[list[Unit]], Any], compute=None):
    """The tokenizer of `config`: loaded from its path, or trained on `units` ("train")."""
    if config.tokenizer != "train":
        return load_tokenizer(config.tokenizer, config.lowercase)
    counts = count_corpus_words(config, units, dataset, compute)
    return wordpiece_from_counts(counts, vocab_size=config.vocab_size, min_frequency=config.min_frequency,
                                 lowercase=config.lowercase)
