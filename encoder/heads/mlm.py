"""Masked language modelling: a transform + a decoder tied to the word embeddings.

Logits are computed only at the predicted positions (labels != -100), not for every token
of the batch: the vocabulary projection is the most expensive matmul of a small encoder.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..config import EncoderConfig
from ..model import activation, init_weights
from ..objective import Objective, ObjectiveOutput, classification_output


class MLMHead(nn.Module):
    """(M, in_size) -> (M, vocab). dense -> act -> LayerNorm -> tied decoder + bias."""

    def __init__(self, config: EncoderConfig, word_embeddings: nn.Embedding, in_size: int | None = None):
        super().__init__()
        E = word_embeddings.embedding_dim
        self.dense = nn.Linear(in_size or config.hidden_size, E)
        self.act = activation(config.hidden_act)
        self.norm = nn.LayerNorm(E, eps=config.layer_norm_eps)
        self.decoder = nn.Linear(E, word_embeddings.num_embeddings)
        init_weights(self, config.initializer_range)
        self.decoder.weight = word_embeddings.weight  # tied (after init: never re-draw the embeddings)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.norm(self.act(self.dense(h))))


class MLMObjective(Objective):
    name = "mlm"
    label_key = "mlm_labels"

    def __init__(self, config: EncoderConfig, word_embeddings: nn.Embedding):
        super().__init__()
        self.head = MLMHead(config, word_embeddings)
        self.sparse = True  # logits only where predicted; False (dense, as HF) only to measure it

    def predict(self, hidden: torch.Tensor, labels: torch.Tensor) -> ObjectiveOutput:
        """hidden (B, T, h), labels (B, T) -> loss over the positions whose label is not -100."""
        where = labels != -100
        if not self.sparse:
            return classification_output(self.head(hidden)[where], labels[where])
        logits = self.head(hidden[where])  # (M, V)
        return classification_output(logits, labels[where])

    def forward(self, hidden: torch.Tensor, pooled: torch.Tensor, batch: dict) -> ObjectiveOutput:
        return self.predict(hidden, batch[self.label_key])
