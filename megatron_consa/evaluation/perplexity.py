"""Perplexity, overall and on the positions beyond the window (where FA and SWA differ).

For a row of ``s + 1`` tokens the model reads the first ``s`` and position
``p`` (0-based) predicts token ``p + 1``. An SWA query at ``p`` sees the keys
``p - W + 1 .. p`` plus the first ``S`` sink tokens, so it sees every key, like
FA, while ``p < W + S``; the positions ``p >= W + S`` are *beyond the window*,
the only ones where an allocation can change the prediction. Both averages
are mean next-token NLL (natural log) over their positions;
perplexity = exp(mean NLL).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from megatron_consa.evaluation.models import LogitsFn


def beyond_window(seq_length: int, *, window: int, sink_tokens: int = 0) -> torch.Tensor:
    """Bool ``[seq_length]``: True at the positions ``p >= window + sink_tokens``."""
    return torch.arange(seq_length) >= window + sink_tokens


@dataclass(frozen=True)
class PerplexityResult:
    """Mean next-token NLL and perplexity of a set of sequences."""

    sequences: int
    seq_length: int
    tokens: int
    """Positions scored (sequences x seq_length)."""
    mean_nll: float
    tokens_beyond_window: int
    """Positions at or beyond window + sink_tokens."""
    mean_nll_beyond_window: Optional[float]
    """None when no position lies beyond the window (seq_length <= window + sinks)."""
    nll_beyond_window_std_error: Optional[float] = None
    """The standard error of ``mean_nll_beyond_window`` over sequences (each sequence's mean NLL beyond the window,
    sample standard deviation / sqrt(N)): the spread of one allocation's figure. None for fewer than 2 sequences."""
    nll_beyond_window_per_sequence: Optional[list[float]] = None
    """Each sequence's mean NLL beyond the window, in the order scored: two allocations scored on the same
    sequences compare by the paired differences (their spread is far below either allocation's own). None when
    no position lies beyond the window."""

    @property
    def perplexity(self) -> float:
        return math.exp(self.mean_nll)

    @property
    def perplexity_beyond_window(self) -> Optional[float]:
        return None if self.mean_nll_beyond_window is None else math.exp(self.mean_nll_beyond_window)

    def to_dict(self) -> dict:
        return dict(asdict(self), perplexity=self.perplexity, perplexity_beyond_window=self.perplexity_beyond_window)


@torch.no_grad()
def evaluate_perplexity(logits_fn: LogitsFn, sequences: torch.Tensor, *, window: int, sink_tokens: int = 0,
                        batch_size: int = 1, progress: Optional[Callable[[int], None]] = None) -> PerplexityResult:
    """Score ``sequences`` ([N, s + 1] int64) with ``logits_fn``; `progress(n)` after each batch of n rows."""
    if sequences.dim() != 2 or sequences.shape[1] < 2:
        raise ValueError(f"sequences has shape {tuple(sequences.shape)}; expected [N, seq_length + 1]")
    seq_length = sequences.shape[1] - 1
    far = beyond_window(seq_length, window=window, sink_tokens=sink_tokens)
    nll_sum = nll_far = 0.0
    per_sequence_far: list[float] = []
    for start in range(0, sequences.shape[0], batch_size):
        batch = sequences[start:start + batch_size]
        logits = logits_fn(batch[:, :-1])  # [b, s, V]
        labels = batch[:, 1:].to(logits.device)
        nll = F.cross_entropy(logits.transpose(1, 2), labels, reduction="none").double().cpu()  # [b, s]
        nll_sum += float(nll.sum())
        nll_far += float(nll[:, far].sum())
        if far.any():
            per_sequence_far += nll[:, far].mean(dim=1).tolist()
        if progress is not None:
            progress(batch.shape[0])
    n = sequences.shape[0]
    far_tokens = n * int(far.sum())
    return PerplexityResult(
        sequences=n, seq_length=seq_length, tokens=n * seq_length, mean_nll=nll_sum / (n * seq_length),
        tokens_beyond_window=far_tokens, mean_nll_beyond_window=nll_far / far_tokens if far_tokens else None,
        nll_beyond_window_std_error=(torch.tensor(per_sequence_far, dtype=torch.float64).std().item() / math.sqrt(n)
                                     if len(per_sequence_far) >= 2 else None),
        nll_beyond_window_per_sequence=per_sequence_far or None,
    )


def paired_difference(a: Sequence[float], b: Sequence[float]) -> dict:
    """``b - a`` over the same sequences (e.g. two allocations' ``nll_beyond_window_per_sequence``): the mean
    difference, its standard error (the differences' sample standard deviation / sqrt(N)), z = mean / s.e.
    (None where the s.e. is 0 or N < 2) and on how many sequences ``b`` is the larger."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired_difference needs values of the same sequences: {len(a)} and {len(b)} given")
    d = torch.tensor(b, dtype=torch.float64) - torch.tensor(a, dtype=torch.float64)
    se = d.std().item() / math.sqrt(len(d)) if len(d) >= 2 else None
    mean = d.mean().item()
    return {"mean": mean, "std_error": se, "z": mean / se if se else None, "larger_on": int((d > 0).sum()),
            "sequences": len(d)}


__all__ = ["PerplexityResult", "beyond_window", "evaluate_perplexity", "paired_difference"]
