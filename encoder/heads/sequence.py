"""Sequence classification: Pr(c | h_cls) = softmax(W pool(h_cls) + b) (BertForSequenceClassification)."""

from __future__ import annotations

import torch.nn as nn

from ..model import Encoder, init_weights
from ..objective import classification_output
from .downstream import ClassifierOutput, DownstreamModel


class SequenceClassifier(DownstreamModel):
    def __init__(self, encoder: Encoder, num_labels: int, id2label=None, frozen: bool = False):
        super().__init__(encoder, num_labels, id2label, frozen)
        if encoder.pooler is None:
            raise ValueError("SequenceClassifier needs an encoder with a pooler")
        self.classifier = nn.Linear(encoder.config.hidden_size, num_labels)
        init_weights(self.classifier, encoder.config.initializer_range)

    def features(self, input_ids, attention_mask=None, token_type_ids=None):
        return self.encode(input_ids, attention_mask, token_type_ids)[:, 0]  # h_cls (B, H)

    def head(self, features, attention_mask=None, labels=None) -> ClassifierOutput:
        logits = self.classifier(self.dropout(self.encoder.pooler(features)))  # (B, C)
        if labels is None:
            return ClassifierOutput(logits)
        out = classification_output(logits, labels)
        return ClassifierOutput(logits, out.loss, out.metrics)
