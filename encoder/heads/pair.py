"""Two-way [CLS] classifiers shared by NSP, SOP and shuffle detection.

loss = -log Pr(c_gold | h_cls), Pr = softmax(W pool(h_cls) + b).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..config import EncoderConfig
from ..model import Pooler, init_weights
from ..objective import Objective, ObjectiveOutput, classification_output


class PairObjective(Objective):
    """With `own_pooler` the head has its own tanh pooler; otherwise it uses the encoder's
    pooled output (as BERT's NSP head does, which is what makes it BertForPreTraining's)."""

    own_pooler: bool = True

    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.pooler = Pooler(config.hidden_size) if self.own_pooler else None
        self.classifier = nn.Linear(config.hidden_size, 2)
        init_weights(self, config.initializer_range)

    def logits(self, hidden: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:  # -> (B, 2)
        return self.classifier(self.pooler(hidden[:, 0]) if self.pooler is not None else pooled)

    def forward(self, hidden: torch.Tensor, pooled: torch.Tensor, batch: dict) -> ObjectiveOutput:
        return classification_output(self.logits(hidden, pooled), batch[self.label_key])
