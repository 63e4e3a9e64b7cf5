"""ELECTRA replaced-token detection.

A small generator (an MLM encoder of `generator_fraction` of the heads, sharing the
discriminator's embeddings) fills the masked positions with samples from its own
distribution; the discriminator (the main encoder) labels every real token
0 = original / 1 = replaced. A sample equal to the original token counts as original.
The generator's MLM loss is the mix's `mlm` term; the discriminator's is `rtd`.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import EncoderConfig
from ..model import Embeddings, TransformerStack, Unpadder, activation, init_weights
from ..objective import Objective, ObjectiveOutput, classification_output
from .mlm import MLMHead


def generator_config(config: EncoderConfig, fraction: float) -> EncoderConfig:
    """Same depth and head size, `fraction` of the heads (ELECTRA uses 1/4 to 1/2)."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"generator_fraction must be in (0, 1], got {fraction}")
    heads = max(1, round(config.num_attention_heads * fraction))
    hidden = heads * config.head_dim
    return config.replace(hidden_size=hidden, num_attention_heads=heads, intermediate_size=4 * hidden)


class Generator(nn.Module):
    def __init__(self, config: EncoderConfig, embeddings: Embeddings, fraction: float):
        super().__init__()
        self.config = generator_config(config, fraction)
        gh, E = self.config.hidden_size, config.hidden_size
        self.project = nn.Linear(E, gh) if gh != E else nn.Identity()
        self.stack = TransformerStack(self.config)
        init_weights(self, config.initializer_range)
        # shared, not owned: kept out of this module's registry so it is saved once
        self._embeddings = (embeddings,)
        self.head = MLMHead(self.config, embeddings.word_embeddings, in_size=gh)

    def forward(self, input_ids, attention_mask, token_type_ids) -> torch.Tensor:  # -> (B, T, gh)
        B, T = input_ids.shape
        unpad = Unpadder(attention_mask, B, T, input_ids.device)
        x = self.project(self._embeddings[0](input_ids, token_type_ids, unpad))
        return unpad.unpack(self.stack(x, unpad))


class DiscriminatorHead(nn.Module):
    """(B, T, H) -> (B, T) logits of 'replaced'. ELECTRA's dense -> act -> dense_prediction."""

    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.act = activation(config.hidden_act)
        self.prediction = nn.Linear(config.hidden_size, 1)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.prediction(self.act(self.dense(hidden))).squeeze(-1)


class RTDObjective(Objective):
    name = "rtd"
    label_key = "rtd_labels"  # made by `corrupt`, not read from data

    def __init__(self, config: EncoderConfig, embeddings: Embeddings, generator_fraction: float = 0.25):
        super().__init__()
        self.generator = Generator(config, embeddings, generator_fraction)
        self.head = DiscriminatorHead(config)
        init_weights(self.head, config.initializer_range)

    def corrupt(self, batch: dict) -> tuple[ObjectiveOutput, torch.Tensor, torch.Tensor]:
        """Generator MLM on the masked batch; returns (generator output, corrupted ids, rtd labels)."""
        ids, labels = batch["input_ids"], batch["mlm_labels"]
        hidden = self.generator(ids, batch.get("attention_mask"), batch.get("token_type_ids"))
        where = labels != -100
        logits = self.generator.head(hidden[where])  # (M, V)
        gen_out = classification_output(logits, labels[where])
        with torch.no_grad():
            sampled = torch.multinomial(F.softmax(logits.float(), -1), 1).squeeze(-1) if logits.numel() else labels[where]
            original = torch.where(where, labels, ids)  # (B, T) the uncorrupted sequence
            corrupted = original.clone()
            corrupted[where] = sampled
            rtd_labels = (corrupted != original).long()
            mask = batch.get("attention_mask")
            if mask is not None:
                rtd_labels = rtd_labels.masked_fill(mask == 0, -100)
        return gen_out, corrupted, rtd_labels

    def forward(self, hidden: torch.Tensor, pooled: torch.Tensor, batch: dict) -> ObjectiveOutput:
        labels = batch[self.label_key]  # (B, T)
        valid = labels != -100
        logits = self.head(hidden)[valid]  # (N,)
        target = labels[valid].float()
        loss = F.binary_cross_entropy_with_logits(logits.float(), target) if logits.numel() else logits.sum()
        with torch.no_grad():
            pred = (logits > 0).float()
            acc = (pred == target).float().mean() if logits.numel() else torch.zeros(())
            replaced = target.sum()
            recall = ((pred * target).sum() / replaced.clamp(min=1))
        return ObjectiveOutput(loss, {"loss": loss.detach(), "acc": acc, "count": valid.sum(), "replaced_recall": recall,
                                      "replaced_frac": target.mean() if target.numel() else torch.zeros(())})
