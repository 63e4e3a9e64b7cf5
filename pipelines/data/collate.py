"""Shard rows -> the model's batch: pad per batch, draw MLM masks (the loader,
`pipelines.data.loader`, decides which rows and seeds each batch's generator).

Dynamic masking: the collator owns a torch.Generator and draws new masks for every batch,
so each epoch sees different masks (RoBERTa); static shards carry `mlm_labels` and are
used as written. Batches are padded to their own longest row, rounded up to a multiple
of 8 (tensor-core friendly), not to max_seq_len.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
import torch

from encoder.masking import IGNORE, mask_tokens

from .tokenizer import SpecialIds

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


class PretrainCollator:
    """Shard rows (token columns as arrays, label columns as one array) -> the model's batch
    dict (torch tensors, all long). Static shards' `mlm_labels` are used as written."""

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
