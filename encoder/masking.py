"""BERT's masked-language-model corruption, in torch (used by the data collator and tests).

Of the maskable tokens (not special, not padding) a fraction `mask_prob` is selected
(at most `max_predictions` per sequence); of those 80% become [MASK], 10% a random
token, 10% stay as they are. Labels are the original ids at selected positions and
-100 everywhere else.
"""

from __future__ import annotations

import torch

IGNORE = -100


def mask_tokens(
    input_ids: torch.Tensor,  # (B, T) long
    special_mask: torch.Tensor,  # (B, T) bool: True where the token may never be masked (specials, padding)
    *,
    mask_token_id: int,
    vocab_size: int,
    mask_prob: float = 0.15,
    max_predictions: int | None = None,
    random_token_low: int = 0,
    generator: torch.Generator | None = None,
    word_starts: torch.Tensor | None = None,  # (B, T) bool: whole-word masking when given
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (masked_ids, labels), both (B, T)."""
    if not 0.0 < mask_prob < 1.0:
        raise ValueError(f"mask_prob must be in (0, 1), got {mask_prob}")
    maskable = ~special_mask
    scores = torch.rand(input_ids.shape, generator=generator, device=input_ids.device)
    if word_starts is not None:
        # one score per word: every piece of a word takes the score of the word's first piece
        word_id = (torch.cumsum(word_starts.long(), dim=1) - 1).clamp(min=0)  # (B, T)
        first_score = torch.where(word_starts, scores, torch.full_like(scores, 2.0))
        per_word = torch.full_like(scores, 2.0).scatter_reduce(1, word_id, first_score, "amin")
        scores = per_word.gather(1, word_id)
    selected = (scores < mask_prob) & maskable
    if max_predictions is not None:
        # keep the max_predictions lowest-scoring selected positions of each row
        ranked = torch.where(selected, scores, torch.full_like(scores, 2.0))
        order = ranked.argsort(dim=1)
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
        selected &= rank < max_predictions
    labels = torch.where(selected, input_ids, torch.full_like(input_ids, IGNORE))
    action = torch.rand(input_ids.shape, generator=generator, device=input_ids.device)
    to_mask = selected & (action < 0.8)
    to_random = selected & (action >= 0.8) & (action < 0.9)
    randoms = torch.randint(random_token_low, vocab_size, input_ids.shape, generator=generator, device=input_ids.device)
    masked = torch.where(to_mask, torch.full_like(input_ids, mask_token_id), input_ids)
    masked = torch.where(to_random, randoms, masked)
    return masked, labels
