"""MultiObjective: one encoder, a weighted mix of pretraining objectives.

total = sum_i w_i * loss_i over the objectives whose labels the batch carries. With `rtd`
in the mix, the encoder is ELECTRA's discriminator: it reads the generator-corrupted
sequence, and the `mlm` weight applies to the generator's MLM loss.
"""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn as nn

from .config import ConfigError, EncoderConfig
from .heads import OBJECTIVES
from .model import Encoder
from .objective import ObjectiveOutput


def validate_weights(weights: Mapping[str, float]) -> dict[str, float]:
    if not weights:
        raise ConfigError("objectives: at least one objective is needed, e.g. {mlm = 1.0}")
    out = {}
    for name, w in weights.items():
        if name not in OBJECTIVES:
            raise ConfigError(f"objectives.{name}: unknown objective (choose from {', '.join(OBJECTIVES)})")
        if isinstance(w, bool) or not isinstance(w, (int, float)) or w < 0:
            raise ConfigError(f"objectives.{name}: weight must be a number >= 0, got {w!r}")
        out[name] = float(w)
    if "rtd" in out and "mlm" not in out:
        raise ConfigError("objectives: rtd trains its generator with the mlm loss; add mlm (e.g. {rtd = 50.0, mlm = 1.0})")
    return out


class MultiObjective(nn.Module):
    def __init__(self, encoder: Encoder, weights: Mapping[str, float], generator_fraction: float = 0.25):
        super().__init__()
        self.encoder = encoder
        self.config: EncoderConfig = encoder.config
        self.weights = validate_weights(weights)
        self.objectives = nn.ModuleDict()
        for name in self.weights:
            cls = OBJECTIVES[name]
            if name == "mlm":
                if "rtd" in self.weights:
                    continue  # the generator carries the MLM head
                self.objectives[name] = cls(self.config, encoder.embeddings.word_embeddings)
            elif name == "rtd":
                self.objectives[name] = cls(self.config, encoder.embeddings, generator_fraction)
            else:
                self.objectives[name] = cls(self.config)

    def forward(self, batch: dict) -> ObjectiveOutput:
        parts: dict[str, ObjectiveOutput] = {}
        ids = batch["input_ids"]
        if "rtd" in self.objectives:
            parts["mlm"], ids, rtd_labels = self.objectives["rtd"].corrupt(batch)
            batch = {**batch, "rtd_labels": rtd_labels}
        hidden = self.encoder(ids, batch.get("attention_mask"), batch.get("token_type_ids"))  # (B, T, H)
        pooled = self.encoder.pool(hidden) if self.encoder.pooler is not None else None  # (B, H)
        for name, objective in self.objectives.items():
            if objective.label_key in batch:
                parts[name] = objective(hidden, pooled, batch)
        if not parts:
            raise ValueError(f"batch carries no label of this mix ({', '.join(self.weights)}): "
                             f"keys are {sorted(batch)}")
        total = sum(self.weights[name] * out.loss for name, out in parts.items())
        metrics = {"loss": total.detach()}
        for name, out in parts.items():
            for key, value in out.metrics.items():
                metrics[f"{name}/{key}"] = value
        return ObjectiveOutput(total, metrics)
