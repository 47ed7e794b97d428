"""An attention reference written independently of the library, shared by the kernel tests.

The visible set is built row by row straight from the convention

    query p sees key j  <=>  j <= p and (j > p - W or j < S)

and attention is an explicit fp64 matmul / softmax / matmul with K/V heads
repeated for GQA (query head h reads KV head h // rep).
"""

import functools

import torch


@functools.lru_cache(maxsize=None)
def visible_mask(s: int, window: int, sinks: int) -> torch.Tensor:
    """[s, s] bool, built row by row from the convention (True = may attend)."""
    mask = torch.zeros(s, s, dtype=torch.bool)
    for p in range(s):
        mask[p, max(0, p - window + 1): p + 1] = True  # the window, incl. itself
        mask[p, : min(sinks, p + 1)] = True  # sinks that are not in the future
    return mask


def masked_scores(q, k, mask, scale):
    """fp64 scores [b, hq, s, s] with the hidden entries at -inf."""
    rep = q.shape[1] // k.shape[1]
    k64 = torch.repeat_interleave(k.double(), rep, dim=1)  # [b, hq, s, d]
    scores = (q.double() @ k64.transpose(-1, -2)) * scale
    return scores.masked_fill(~mask.to(q.device), float("-inf"))


def reference_attention(q, k, v, mask, scale):
    """Explicit fp64 attention; returns fp64 [b, hq, s, d]."""
    rep = q.shape[1] // k.shape[1]
    v64 = torch.repeat_interleave(v.double(), rep, dim=1)  # [b, hq, s, d]
    return torch.softmax(masked_scores(q, k, mask, scale), dim=-1) @ v64
