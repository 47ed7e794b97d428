"""Pure-PyTorch attention kernels: causal full attention (FA) and sliding-window
attention (SWA) with optional attention sinks.

Conventions
-----------
* Layout: ``q`` is ``[b, hq, s, d]``, ``k`` and ``v`` are ``[b, hkv, s, d]``,
  the result is ``[b, hq, s, d]``. Grouped-query attention (GQA) is supported
  with ``hq = hkv * rep``; query head ``h`` reads KV head ``h // rep``
  (megatron / Hugging Face convention: consecutive query heads share a KV head).
* Window ``W >= 1``: the query at position ``p`` sees itself and the ``W - 1``
  tokens before it, i.e. key positions ``max(0, p - W + 1) .. p``. This is
  Hugging Face ``sliding_window=W`` and flash-attn / Transformer Engine
  ``window_size=(W - 1, 0)``.
* Attention sinks ``S >= 0``: an SWA query at ``p`` additionally sees the key
  positions ``0 .. S - 1`` that are ``<= p``. Its visible set is
  ``{j : j <= p and (j > p - W or j < S)}``; no key is counted twice.
* The softmax scale is always passed explicitly.

O(n*W) blocking
---------------
``sliding_window_attention`` never forms an ``[s, s]`` score matrix. Queries
are split into ``nblk = ceil(s / B)`` blocks of ``B`` tokens (the tail block is
zero-padded). Query block ``i`` covers positions ``[i*B, i*B + B)`` and can
only see keys in ``[i*B - W + 1, i*B + B)``: a chunk of ``L = B + W - 1`` keys.
``k``/``v`` are left-padded by ``W - 1`` zero rows (and right-padded to
``nblk*B``) and ``unfold`` turns them into an overlapping ``[.., nblk, L, d]``
*view* (no copy in the forward). The ``S`` sink keys are prepended to every
chunk. A boolean band mask of shape ``[nblk, B, S + L]`` (broadcast over batch
and heads) hides left-padding keys, keys outside the window, and sink keys that
already lie in the window or in the future. All blocks then go through one
batched ``scaled_dot_product_attention`` call with the blocks as the "head"
dimension (``[b*hkv, nblk, rep*B, d]``; GQA query heads are folded into the
rows so K/V are never repeated). The mask is passed 4-D, which keeps SDPA on its
fused kernels (CPU: flash, forward and backward; CUDA: memory-efficient), so time
and memory are ``O(s * (B + W + S))`` in the forward and in the backward. The
default ``B`` is :func:`default_block_size`.

Every query row sees at least its own key (right-padding keys are not masked:
causality alone hides them from real queries, and padded query rows may look at
them), so no row is fully masked and neither forward nor backward produces NaN.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import torch
import torch.nn.functional as F

__all__ = [
    "full_causal_attention",
    "sliding_window_attention",
    "dense_masked_attention",
    "sliding_window_mask",
    "sliding_window_mask_mod",
    "flex_sliding_window_block_mask",
    "flex_sliding_window_attention",
    "default_block_size",
]


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> int:
    """Validate ``[b, h, s, d]`` shapes and return the GQA factor ``rep``."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"expected 4-D [b, h, s, d] tensors, got q{tuple(q.shape)} "
            f"k{tuple(k.shape)} v{tuple(v.shape)}"
        )
    if k.shape != v.shape:
        raise ValueError(f"k{tuple(k.shape)} and v{tuple(v.shape)} must have the same shape")
    b, hq, s, d = q.shape
    if k.shape[0] != b or k.shape[2] != s or k.shape[3] != d:
        raise ValueError(f"q{tuple(q.shape)} and k{tuple(k.shape)} disagree on batch/seq/head_dim")
    hkv = k.shape[1]
    if hkv < 1 or hq % hkv != 0:
        raise ValueError(f"query heads ({hq}) must be a multiple of KV heads ({hkv})")
    return hq // hkv


def _expand_kv(x: torch.Tensor, rep: int) -> torch.Tensor:
    """``[b, hkv, s, d]`` -> ``[b, hkv * rep, s, d]`` (head ``h`` reads ``h // rep``)."""
    if rep == 1:
        return x
    return x.repeat_interleave(rep, dim=1)


def full_causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float
) -> torch.Tensor:
    """Causal full attention via ``scaled_dot_product_attention(is_causal=True)``.

    ``q`` ``[b, hq, s, d]``, ``k``/``v`` ``[b, hkv, s, d]`` with ``hq % hkv == 0``;
    returns ``[b, hq, s, d]``.
    """
    rep = _check_qkv(q, k, v)
    if rep == 1:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    try:
        return F.scaled_dot_product_attention(
            q, k, v, is_causal=True, scale=scale, enable_gqa=True
        )
    except (TypeError, RuntimeError):  # older torch / backend without GQA support
        return F.scaled_dot_product_attention(
            q, _expand_kv(k, rep), _expand_kv(v, rep), is_causal=True, scale=scale
        )


def default_block_size(window: int, seq_len: int) -> int:
    """Query block size ``B`` used by :func:`sliding_window_attention`.

    Each query computes scores against ``B + W - 1`` keys (ideal: ``W``), so a
    small ``B`` wastes fewer FLOPs; but K/V chunks overlap ``(B + W - 1) / B``
    times, so the gradient w.r.t. the chunks (and the fused kernels' per-block
    overhead) grows as ``B`` shrinks. Measured on a 2-core CPU (fp32, d=64,
    n=4096, forward+backward), the best ``B`` was ~32 for W=64, ~64 for
    W=128..256 and 128..256 for W=512..1024, hence::

        W <= 64 -> 32,   64 < W <= 256 -> 64,   W > 256 -> 128

    (never more than ``seq_len``).
    """
    if window <= 64:
        block = 32
    elif window <= 256:
        block = 64
    else:
        block = 128
    return max(1, min(block, seq_len))


def _band_mask(
    nblk: int, block: int, window: int, sinks: int, device: torch.device
) -> torch.Tensor:
    """Boolean mask ``[nblk, block, sinks + block + window - 1]`` (True = may attend).

    Column ``sinks + c`` of block ``i`` is key position ``j = i*B - (W-1) + c``
    (negative = left padding); columns ``0..sinks-1`` are the sink keys ``0..S-1``.
    """
    L = block + window - 1
    i = torch.arange(block, device=device).view(block, 1)  # query offset in block
    c = torch.arange(L, device=device).view(1, L)  # key offset in chunk
    # j <= p  <=>  c <= i + W - 1 ;  j > p - W  <=>  c >= i
    band = (c >= i) & (c <= i + window - 1)  # [B, L]
    blk = torch.arange(nblk, device=device).view(nblk, 1, 1)
    key_pos = blk * block - (window - 1) + c.view(1, 1, L)  # [nblk, 1, L]
    mask = band.unsqueeze(0) & (key_pos >= 0)  # [nblk, B, L]
    if sinks > 0:
        q_pos = blk * block + i.view(1, block, 1)  # [nblk, B, 1]
        sink_pos = torch.arange(sinks, device=device).view(1, 1, sinks)
        # sink j is visible iff j <= p - W (older than the window, hence not future)
        sink_mask = sink_pos <= q_pos - window  # [nblk, B, S]
        mask = torch.cat([sink_mask, mask], dim=-1)  # [nblk, B, S + L]
    return mask


def _key_chunks(x: torch.Tensor, window: int, block: int, nblk: int) -> torch.Tensor:
    """Overlapping key/value chunks ``[b*hkv, nblk, B + W - 1, d]`` (a strided view)."""
    b, h, s, d = x.shape
    L = block + window - 1
    xp = F.pad(x, (0, 0, window - 1, nblk * block - s))  # [b, h, nblk*B + W - 1, d]
    chunks = xp.unfold(2, L, block)  # [b, h, nblk, d, L]
    return chunks.transpose(-1, -2).reshape(b * h, nblk, L, d)  # [b*h, nblk, L, d]


def sliding_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    window: int,
    scale: float,
    sink_tokens: int = 0,
    block_size: Optional[int] = None,
) -> torch.Tensor:
    """Causal sliding-window attention in ``O(s * W)`` time and memory.

    Args:
        q: ``[b, hq, s, d]``.
        k, v: ``[b, hkv, s, d]`` with ``hq % hkv == 0`` (GQA).
        window: ``W >= 1``; query ``p`` sees keys ``max(0, p-W+1) .. p``.
        scale: softmax scale (e.g. ``1 / sqrt(d)``).
        sink_tokens: ``S >= 0`` leading tokens every query may also attend to.
        block_size: query block size ``B``; default :func:`default_block_size`.

    Returns:
        ``[b, hq, s, d]`` in the dtype of ``q``.
    """
    rep = _check_qkv(q, k, v)
    window = int(window)
    sink_tokens = int(sink_tokens)
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    if sink_tokens < 0:
        raise ValueError(f"sink_tokens must be >= 0, got {sink_tokens}")
    b, hq, s, d = q.shape
    hkv = hq // rep
    if s == 0:
        return q.new_empty(q.shape)
    if window >= s:
        # Every key j <= p is inside the window (sinks included): plain causal FA.
        return full_causal_attention(q, k, v, scale=scale)

    # A sink j only matters for queries p >= j + W, i.e. j <= s - 1 - W.
    sinks = min(sink_tokens, s - window)
    block = default_block_size(window, s) if block_size is None else int(block_size)
    if block < 1:
        raise ValueError(f"block_size must be >= 1, got {block}")
    block = min(block, s)
    nblk = math.ceil(s / block)
    s_pad = nblk * block
    L = block + window - 1

    # Queries: [b, hq, s, d] -> [b*hkv, nblk, rep*B, d]; the rep query heads of a
    # KV group are folded into the rows of each block so K/V are never repeated.
    qp = F.pad(q, (0, 0, 0, s_pad - s)) if s_pad != s else q  # [b, hq, s_pad, d]
    if rep == 1:
        qb = qp.reshape(b * hq, nblk, block, d)  # [b*h, nblk, B, d]
    else:
        qb = qp.reshape(b, hkv, rep, nblk, block, d)  # [b, hkv, rep, nblk, B, d]
        qb = qb.permute(0, 1, 3, 2, 4, 5).reshape(b * hkv, nblk, rep * block, d)

    kc = _key_chunks(k, window, block, nblk)  # [b*hkv, nblk, L, d]
    vc = _key_chunks(v, window, block, nblk)  # [b*hkv, nblk, L, d]
    if sinks > 0:
        ks = k[:, :, :sinks].reshape(b * hkv, 1, sinks, d).expand(-1, nblk, -1, -1)
        vs = v[:, :, :sinks].reshape(b * hkv, 1, sinks, d).expand(-1, nblk, -1, -1)
        kc = torch.cat([ks, kc], dim=2)  # [b*hkv, nblk, S + L, d]
        vc = torch.cat([vs, vc], dim=2)  # [b*hkv, nblk, S + L, d]

    mask = _band_mask(nblk, block, window, sinks, q.device)  # [nblk, B, S + L]
    if rep > 1:
        mask = mask.repeat(1, rep, 1)  # [nblk, rep*B, S + L]
    # A 4-D mask is required for the fused kernels (a 3-D one falls back to math).
    mask = mask.unsqueeze(0)  # [1, nblk, rep*B, S + L]

    out = F.scaled_dot_product_attention(qb, kc, vc, attn_mask=mask, scale=scale)
    # out: [b*hkv, nblk, rep*B, d] -> [b, hq, s_pad, d]
    if rep == 1:
        out = out.reshape(b, hq, s_pad, d)
    else:
        out = out.reshape(b, hkv, nblk, rep, block, d)  # [b, hkv, nblk, rep, B, d]
        out = out.permute(0, 1, 3, 2, 4, 5).reshape(b, hq, s_pad, d)
    return out[:, :, :s] if s_pad != s else out


def sliding_window_mask(
    seq_len: int,
    window: int,
    sink_tokens: int = 0,
    device: Optional[torch.device] = None,
) -> torch.Tensor:
    """Dense boolean ``[s, s]`` mask (True = may attend) for the SWA convention.

    ``mask[p, j] = j <= p and (j > p - window or j < sink_tokens)``.
    """
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    p = torch.arange(seq_len, device=device).view(seq_len, 1)
    j = torch.arange(seq_len, device=device).view(1, seq_len)
    return (j <= p) & ((j > p - window) | (j < sink_tokens))


def dense_masked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    mask: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Reference attention with an explicit boolean mask (True = may attend).

    Explicit ``matmul -> masked softmax -> matmul`` in ``O(s^2)``; ``mask`` is
    ``[s, s]`` or broadcastable to ``[b, hq, s, s]``. Half precision inputs are
    computed in fp32 and cast back. Every row must see at least one key.
    """
    rep = _check_qkv(q, k, v)
    k = _expand_kv(k, rep)  # [b, hq, s, d]
    v = _expand_kv(v, rep)  # [b, hq, s, d]
    compute = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    scores = torch.matmul(q.to(compute), k.to(compute).transpose(-1, -2)) * scale  # [b, hq, s, s]
    scores = scores.masked_fill(~mask.to(torch.bool), float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.matmul(probs, v.to(compute)).to(q.dtype)  # [b, hq, s, d]


# ---------------------------------------------------------------------------
# FlexAttention (CUDA): block-sparse sliding window, compiled.
# ---------------------------------------------------------------------------

FLEX_BLOCK_MASK_CACHE = 32
"""Block masks kept per (seq_len, window, sinks, device): a run sees few shapes."""


def flex_attention_available(device: torch.device) -> bool:
    """FlexAttention runs compiled (with a backward) on CUDA only."""
    if device.type != "cuda":
        return False
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


@functools.lru_cache(maxsize=1)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def sliding_window_mask_mod(window: int, sink_tokens: int = 0):
    """FlexAttention ``mask_mod`` of the SWA convention (True = may attend).

    ``kv <= q and (q - kv < W or kv < S)``: the same set as
    :func:`sliding_window_mask`. Pure tensor arithmetic, so it can be evaluated
    on any device (the CPU tests pin it against the reference window mask).
    """

    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & ((q_idx - kv_idx < window) | (kv_idx < sink_tokens))

    return mask_mod


@functools.lru_cache(maxsize=FLEX_BLOCK_MASK_CACHE)
def flex_sliding_window_block_mask(seq_len: int, window: int, sink_tokens: int, device: torch.device):
    """The block mask `flex_sliding_window_attention` uses (cached per shape and device).

    Built by FlexAttention's `create_block_mask` from :func:`sliding_window_mask_mod`;
    tiles outside the window (and sinks) are skipped, tiles entirely inside it
    are marked full (their mask_mod is not evaluated).
    """
    from torch.nn.attention.flex_attention import create_block_mask

    return create_block_mask(
        sliding_window_mask_mod(window, sink_tokens), B=None, H=None, Q_LEN=seq_len, KV_LEN=seq_len,
        device=device,
    )


def flex_sliding_window_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, window: int, scale: float, sink_tokens: int = 0
) -> torch.Tensor:
    """Sliding-window attention through compiled FlexAttention (CUDA).

    Same convention and layout as `sliding_window_attention`; the block mask
    skips every key block outside the window (plus sinks), so the work is
    O(s * W) on the GPU's fused kernel instead of a masked dense one.
    """
    rep = _check_qkv(q, k, v)
    mask = flex_sliding_window_block_mask(q.size(2), window, sink_tokens, q.device)
    return _compiled_flex()(q, k, v, block_mask=mask, scale=scale, enable_gqa=rep > 1)
