"""Fine-tuning's data: labeled sets read and checked, tokenized with the one encoding of
`pipelines.inference`, written as the training shards the core's loader reads per rank,
collated into batches; and the evaluation scores the dev set is selected on."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import torch

from .config import ConfigError
from .inference import IGNORE, encode_sequences, encode_words, pad_batch, token_labels
from .storage import join_path

SHARD_ROWS = 4096


@dataclass
class Split:
    """A tokenized labeled set: model inputs, label ids, and what decoding needs."""

    input_ids: list[np.ndarray]
    token_type_ids: list[np.ndarray]
    labels: list  # sequence: int per example; token: per-piece ids (-100 off first pieces)
    gold: list  # sequence: label strings; token: word tag lists
    first_piece: list[list[int]]
    truncated: int


def tokenize(ds, tok, label2id: dict[str, int]) -> Split:
    if ds.task == "sequence":
        enc = encode_sequences(tok, ds.texts, ds.texts_b)
        labels = [label2id[lab] for lab in ds.labels]
    else:
        enc = encode_words(tok, ds.tokens)
        labels = token_labels(enc, ds.labels, label2id)
    return Split(enc.input_ids, enc.token_type_ids, labels, list(ds.labels), enc.first_piece, sum(enc.truncated))


def write_shards(split: Split, folder: str, task: str, seed: int) -> list[str]:
    """The training examples as Parquet shards (row groups of 1024) under `folder`, in a
    seeded random order: labeled files are often grouped by class (movie-sentiment lists its
    positive snippets first), and the loader only shuffles within windows of rows, so a
    file's order would give batches of a single class."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from .storage import filesystem

    fs, root = filesystem(folder)
    fs.create_dir(root, recursive=True)
    files = []
    label_type = pa.int32() if task == "sequence" else pa.list_(pa.int32())
    order = np.random.default_rng(seed).permutation(len(split.input_ids))
    for s, start in enumerate(range(0, len(order), SHARD_ROWS)):
        rows = order[start:start + SHARD_ROWS]
        table = pa.table({"input_ids": pa.array([split.input_ids[i] for i in rows], pa.list_(pa.int32())),
                          "token_type_ids": pa.array([split.token_type_ids[i] for i in rows], pa.list_(pa.int8())),
                          "labels": pa.array([split.labels[i] for i in rows], label_type)})
        name = f"part-{s:05d}.parquet"
        pq.write_table(table, f"{root}/{name}", filesystem=fs, row_group_size=1024, compression="zstd")
        files.append(join_path(folder, name))
    return files


def collate(rows: Mapping[str, list], pad_id: int, task: str) -> dict[str, torch.Tensor]:
    from .data.collate import pad_rows

    batch = pad_batch([np.asarray(x) for x in rows["input_ids"]], [np.asarray(x) for x in rows["token_type_ids"]],
                      pad_id)
    if task == "sequence":
        batch["labels"] = torch.as_tensor(np.asarray(rows["labels"], dtype=np.int64))
    else:
        batch["labels"] = pad_rows([np.asarray(x) for x in rows["labels"]], IGNORE, 8)
    return batch


def scores(kind: str, gold: list, pred: list, labels: list[str]) -> dict[str, Any]:
    """The evaluation report: sequence -> accuracy, macro-F1, per class, confusion; token ->
    entity precision / recall / F1 (overall and per type)."""
    from .quality import classification_report, entity_report

    if kind == "sequence":
        report = classification_report(gold, pred, labels)
        return {"f1": report["macro_f1"], **report}
    report = entity_report(gold, pred)
    return {"f1": report["overall"]["f1"], **report}



def load_sets(cfg):
    """(train, dev, test) LabeledSets, checked (LabeledDataError -> ConfigError)."""
    from .builtin_tasks import builtin_task
    from .labeled import LabeledDataError, check_splits, label_fraction, read_labeled, stratified_split

    try:
        if cfg.task_name:
            train, dev, test = (builtin_task(cfg.task_name, s) for s in ("train", "dev", "test"))
        else:
            train = read_labeled(cfg.train, cfg.task)
            dev = read_labeled(cfg.dev, cfg.task) if cfg.dev else None
            test = read_labeled(cfg.test, cfg.task) if cfg.test else None
            if dev is None:
                train, dev = stratified_split(train, (0.9, 0.1), cfg.seed)
        if train.task != cfg.task:
            raise ConfigError(f"task: {cfg.task_name or cfg.train} is a {train.task} task, not {cfg.task}")
        if cfg.label_fraction < 1.0:
            train = label_fraction(train, cfg.label_fraction, cfg.seed)
        check_splits(train, dev, test)
    except LabeledDataError as e:
        raise ConfigError(str(e)) from None
    return train, dev, test
