"""Shards -> training batches: the collator (pad per batch, draw MLM masks) and the reader.

In a Ray Train worker:

    shard = ray.train.get_dataset_shard("train")
    collator = PretrainCollator.from_folder(data_dir, seed=seed + rank)
    for batch in iter_pretraining_batches(shard, collator, batch_size=32):
        ...  # batch: input_ids, attention_mask, token_type_ids, mlm_labels, <task>_label

Dynamic masking: the collator owns a torch.Generator and draws new masks for every batch,
so each epoch sees different masks (RoBERTa); static shards carry `mlm_labels` and are
used as written. Batches are padded to their own longest row, rounded up to a multiple
of 8 (tensor-core friendly), not to max_seq_len.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
from ray.data.collate_fn import NumpyBatchCollateFn

from encoder.masking import IGNORE, mask_tokens

from .tokenizer import SpecialIds, continuation_table, load_tokenizer

LABEL_COLUMNS = ("nsp_label", "sop_label", "shuffle_label")


def pad_rows(rows: Iterable[np.ndarray], value: int, multiple: int = 8) -> torch.Tensor:
    """Variable-length rows -> (B, T) long, T = longest row rounded up to `multiple`."""
    rows = list(rows)
    longest = max((len(r) for r in rows), default=0)
    width = max(multiple, -(-longest // multiple) * multiple)
    out = np.full((len(rows), width), value, dtype=np.int64)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return torch.from_numpy(out)


class PretrainCollator(NumpyBatchCollateFn):
    """numpy batch of shard rows -> the model's batch dict (torch tensors, all long).

    A NumpyBatchCollateFn so that Ray runs it in its iterator; plain callable otherwise."""

    def __init__(self, special: SpecialIds, *, mask_prob: float = 0.15, max_predictions: int | None = 20,
                 whole_word_masking: bool = False, continuation: list[bool] | None = None,
                 pad_multiple: int = 8, seed: int = 0):
        if whole_word_masking and continuation is None:
            raise ValueError("whole-word masking needs the vocabulary's continuation table")
        self.special = special
        self.mask_prob = mask_prob
        self.max_predictions = max_predictions
        self.pad_multiple = pad_multiple
        self.specials = torch.tensor(special.all)
        self.continuation = torch.tensor(continuation) if whole_word_masking else None
        self.generator = torch.Generator().manual_seed(seed)

    @classmethod
    def from_folder(cls, folder: str | Path, *, seed: int = 0, pad_multiple: int = 8) -> "PretrainCollator":
        """Masking settings and tokenizer from a shard folder written by `cloze data`."""
        folder = Path(folder)
        manifest = json.loads((folder / "manifest.json").read_text())
        cfg = manifest["config"]
        tok = load_tokenizer(folder / "tokenizer.json")
        return cls(SpecialIds.of(tok), mask_prob=cfg["mask_prob"], max_predictions=cfg["max_predictions_per_seq"],
                   whole_word_masking=cfg["whole_word_masking"],
                   continuation=continuation_table(tok) if cfg["whole_word_masking"] else None,
                   pad_multiple=pad_multiple, seed=seed)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        input_ids = pad_rows(batch["input_ids"], self.special.pad, self.pad_multiple)  # (B, T)
        token_types = pad_rows(batch["token_type_ids"], 0, self.pad_multiple)
        lengths = torch.as_tensor(np.asarray([len(r) for r in batch["input_ids"]]))
        attention = (torch.arange(input_ids.shape[1])[None, :] < lengths[:, None]).long()  # (B, T)
        if "mlm_labels" in batch:  # static masking: written by `cloze data`
            labels = pad_rows(batch["mlm_labels"], IGNORE, self.pad_multiple)
            masked = input_ids
        else:
            never = torch.isin(input_ids, self.specials) | (attention == 0)  # specials and padding
            starts = None if self.continuation is None else ~self.continuation[input_ids]
            masked, labels = mask_tokens(input_ids, never, mask_token_id=self.special.mask,
                                         vocab_size=self.special.vocab_size, mask_prob=self.mask_prob,
                                         max_predictions=self.max_predictions,
                                         random_token_low=self.special.random_token_low,
                                         generator=self.generator, word_starts=starts)
        out = {"input_ids": masked, "attention_mask": attention, "token_type_ids": token_types, "mlm_labels": labels}
        for name in LABEL_COLUMNS:
            if name in batch:
                out[name] = torch.as_tensor(np.asarray(batch[name], dtype=np.int64))
        return out


def load_pretraining_dataset(folder: str):
    """A finished shard folder as a ray.data.Dataset (refuses one without manifest.json)."""
    import ray.data

    from .pairs import read_manifest

    manifest = read_manifest(folder)
    if manifest is None:
        raise FileNotFoundError(f"{folder}: no manifest.json, not a finished `cloze data` output")
    files = [f"{folder.rstrip('/')}/{s['file']}" for s in manifest["shards"]]
    return ray.data.read_parquet(files, columns=manifest["columns"])


def iter_pretraining_batches(shard, collator: PretrainCollator, *, batch_size: int = 32,
                             local_shuffle_buffer_size: int | None = None, shuffle_seed: int | None = None,
                             prefetch_batches: int = 4, drop_last: bool = True) -> Iterator[dict[str, torch.Tensor]]:
    """Batches from a Ray Train dataset shard (`ray.train.get_dataset_shard`) or a Dataset.

    The local shuffle buffer defaults to 8 batches: enough to mix rows from different shards
    (each shard is already shuffled when written), small enough that the first batch comes at
    once; batches are prefetched and collated in Ray's iterator thread, beside training."""
    buffer = local_shuffle_buffer_size if local_shuffle_buffer_size is not None else 8 * batch_size
    yield from shard.iter_torch_batches(batch_size=batch_size, collate_fn=collator, drop_last=drop_last,
                                        local_shuffle_buffer_size=buffer or None, local_shuffle_seed=shuffle_seed,
                                        prefetch_batches=prefetch_batches)
