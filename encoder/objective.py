"""What every objective returns, and the base class heads-with-a-loss derive from."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class ObjectiveOutput:
    """A scalar loss to backpropagate and detached metrics (tensors; call float() to read)."""

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


class Objective(nn.Module):
    """A head plus its loss. `label_key` names the batch column holding its labels; a batch
    without that column skips the objective (so batches of different tasks can interleave)."""

    name: str = ""
    label_key: str = ""

    def forward(self, hidden: torch.Tensor, pooled: torch.Tensor, batch: dict) -> ObjectiveOutput:
        raise NotImplementedError


def classification_output(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> ObjectiveOutput:
    """Softmax cross-entropy, -log Pr(c_gold | x), averaged over labelled rows; plus accuracy.

    logits (M, C), labels (M,). Rows with `ignore_index` do not count. With no labelled row
    the loss is a zero that still depends on the logits (so every rank's graph is the same).
    """
    valid = labels != ignore_index
    count = valid.sum()
    losses = F.cross_entropy(logits.float(), labels.clamp(min=0), reduction="none")  # (M,)
    loss = (losses * valid).sum() / count.clamp(min=1)
    with torch.no_grad():
        correct = ((logits.argmax(-1) == labels) & valid).sum()
        acc = correct.float() / count.clamp(min=1)
    return ObjectiveOutput(loss, {"loss": loss.detach(), "acc": acc, "count": count})
