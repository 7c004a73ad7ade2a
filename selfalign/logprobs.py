"""Causal-LM scoring over left-padded batches: the batch, its position ids, per-token log-probabilities.

PPO scores its rollouts and DPO its held-out answers with these, so both read a sequence's tokens the way
generation does: left padding (every sequence ends at the last position, so `logits_to_keep` can keep only
the answer's positions) and position ids that skip the padding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def left_pad(seqs: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(input ids, attention mask) of `seqs`, padded on the left to the longest, on `device`."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s) :] = torch.tensor(s, dtype=torch.long)
        mask[i, width - len(s) :] = 1
    return ids.to(device), mask.to(device)


def positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that skip left padding, as `generate` computes them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log p(token) at each position: `logits` [batch, length, vocabulary], `tokens` [batch, length]."""
    return torch.gather(F.log_softmax(logits.float(), dim=-1), 2, tokens.unsqueeze(-1)).squeeze(-1)
