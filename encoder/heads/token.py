"""Token classification: a label per token (e.g. BIO tags), -100 = not scored (BertForTokenClassification)."""

from __future__ import annotations

import torch.nn as nn

from ..model import Encoder, init_weights
from ..objective import classification_output
from .downstream import ClassifierOutput, DownstreamModel


class TokenClassifier(DownstreamModel):
    def __init__(self, encoder: Encoder, num_labels: int, id2label=None, frozen: bool = False):
        super().__init__(encoder, num_labels, id2label, frozen)
        self.classifier = nn.Linear(encoder.config.hidden_size, num_labels)
        init_weights(self.classifier, encoder.config.initializer_range)

    def features(self, input_ids, attention_mask=None, token_type_ids=None):
        return self.encode(input_ids, attention_mask, token_type_ids)  # (B, T, H)

    def head(self, features, attention_mask=None, labels=None) -> ClassifierOutput:
        logits = self.classifier(self.dropout(features))  # (B, T, C)
        if labels is None:
            return ClassifierOutput(logits)
        if attention_mask is not None:
            labels = labels.masked_fill(attention_mask == 0, -100)  # padding is never scored
        out = classification_output(logits.flatten(0, 1), labels.flatten())
        return ClassifierOutput(logits, out.loss, out.metrics)
