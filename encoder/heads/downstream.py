"""What the sequence and token classifiers share: an encoder, frozen or fine-tuned."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ..model import Encoder


@dataclass
class ClassifierOutput:
    logits: torch.Tensor
    loss: torch.Tensor | None = None
    metrics: dict | None = None

    def probs(self) -> torch.Tensor:
        return self.logits.float().softmax(-1)


class DownstreamModel(nn.Module):
    """`frozen=True` uses the encoder as a feature extractor: its weights get no gradient and
    it stays in eval mode (no dropout) even when the classifier trains."""

    def __init__(self, encoder: Encoder, num_labels: int, id2label: dict[int, str] | None, frozen: bool):
        super().__init__()
        if num_labels < 1:
            raise ValueError(f"num_labels must be >= 1, got {num_labels}")
        if id2label is not None and sorted(int(k) for k in id2label) != list(range(num_labels)):
            raise ValueError(f"id2label must name labels 0..{num_labels - 1}, got {sorted(id2label)}")
        self.encoder = encoder
        self.config = encoder.config
        self.num_labels = num_labels
        self.id2label = {int(k): str(v) for k, v in (id2label or {i: f"LABEL_{i}" for i in range(num_labels)}).items()}
        self.dropout = nn.Dropout(encoder.config.hidden_dropout_prob)
        self.frozen = frozen
        encoder.set_frozen(frozen)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.frozen:
            self.encoder.eval()
        return self

    def encode(self, input_ids, attention_mask=None, token_type_ids=None) -> torch.Tensor:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            return self.encoder(input_ids, attention_mask, token_type_ids)

    # A classifier is `head(features(x))`: `features` is all the encoder contributes, so a
    # frozen encoder's features can be computed once, cached, and the head trained on them.
    def features(self, input_ids, attention_mask=None, token_type_ids=None) -> torch.Tensor:
        raise NotImplementedError

    def head(self, features: torch.Tensor, attention_mask=None, labels=None) -> ClassifierOutput:
        raise NotImplementedError

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None) -> ClassifierOutput:
        return self.head(self.features(input_ids, attention_mask, token_type_ids), attention_mask, labels)
