"""How the next token is chosen from the logits: greedy, or sampled with temperature, top-k, top-p."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor


@dataclass(frozen=True)
class SamplingConfig:
    """Next-token choice."""

    temperature: float = 0.0
    """0: greedy (argmax); > 0: sample from softmax(logits / temperature)."""
    top_k: int = 0
    """Sample among the k most likely tokens only (0: all)."""
    top_p: float = 1.0
    """Sample among the most likely tokens whose probabilities first reach top_p (1: all)."""
    seed: int = 0
    """Seed of the sampling generator; each generation starts from it."""

    def __post_init__(self) -> None:
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature={self.temperature!r} must be a number >= 0 (0 = greedy)")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k={self.top_k!r} must be an integer >= 0 (0 = no top-k filter)")
        if not (isinstance(self.top_p, (int, float)) and 0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p={self.top_p!r} must be in (0, 1] (1 = no top-p filter)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def generator(self, device: torch.device) -> Optional[torch.Generator]:
        """A fresh generator at `seed` (None when greedy)."""
        return None if self.greedy else torch.Generator(device=device).manual_seed(self.seed)


def next_token(logits: Tensor, config: SamplingConfig, generator: Optional[torch.Generator]) -> Tensor:
    """The next token of each sequence (``[b]``) from the last position's logits ``[b, vocab]``."""
    if config.greedy:
        return logits.argmax(dim=-1)
    # from the row's max, in float64: a tiny temperature (1e-40) would overflow float32 to inf / nan
    scores = logits.double()
    scores = (scores - scores.amax(dim=-1, keepdim=True)) / config.temperature
    if config.top_k and config.top_k < scores.size(-1):
        kth = torch.topk(scores, config.top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if config.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, dim=-1, descending=True)
        before = torch.softmax(sorted_scores, dim=-1).cumsum(dim=-1) - torch.softmax(sorted_scores, dim=-1)
        drop = before >= config.top_p  # tokens after the set that first reaches top_p (the first always stays)
        scores = scores.scatter(-1, order, sorted_scores.masked_fill(drop, float("-inf")))
    probs = torch.softmax(scores, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


__all__ = ["SamplingConfig", "next_token"]
