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

O(n*W) kernels
--------------
``sliding_window_attention`` never forms an ``[s, s]`` score matrix.

On the CPU it runs the banded C++ kernel of :mod:`.cpu_extension` (compiled on
first use; fp32, fp64, bf16): tiles of ``T`` query rows (the ``rep`` GQA heads
of a KV head share one tile) read only their window ``max(0, m0-W+1) .. m1-1``
and the sinks below it, in key tiles of at most :func:`cpu_kv_tile`, with an
online softmax; the tiles entirely inside the visible set skip the masking;
the backward recomputes the probabilities from the forward's log-sum-exp and
accumulates dK/dV in fp32 in place, so nothing key-sized is materialised per
query block. The default ``T`` is :func:`cpu_q_tile`.

Where it does not build (no compiler, or a torch without MKL), and for fp16,
the layout below runs on PyTorch's own CPU flash-attention ops instead. The first
``W`` queries see every key before them, so they are plain causal FA over the
first ``W`` keys. The other queries (positions ``W .. s-1``) are split into
``nblk = ceil((s - W) / B)`` blocks of ``B`` (the tail block zero-padded). Query
``r`` of block ``i`` sits at ``p = W + i*B + r`` and sees keys ``p - W + 1 .. p``;
its block's *chunk* is the ``L = W + B`` keys ``i*B .. i*B + W + B - 1`` (one
more than it needs, so that ``L`` stays a multiple of the vector width; right-padded
keys are seen by padded queries only). Chunk column ``c`` is visible to row ``r``
iff ``r < c <= r + W``: the same band for every block, so the mask is one
``[B, L]`` tile broadcast over the blocks, and no key is left padding. The
chunks are an overlapping strided *view* of the keys. With ``S`` attention sinks
the sink keys are prepended to every chunk and the mask, now ``[nblk, B, S + L]``,
also shows sink ``j`` to row ``r`` of block ``i`` iff ``j <= i*B + r`` (older
than the window). All blocks go through one batched
flash-attention call with the blocks as the "head" dimension
(``[b*hkv, nblk, rep*B, d]``; GQA query heads are folded into the rows so K/V
are never repeated), so time and memory are ``O(s * (B + W + S))`` in the
forward and in the backward. The default ``B`` is :func:`default_block_size`.

On that fallback, :class:`_CpuBlockedSWA` calls the CPU flash kernel's forward and
backward ops directly: the chunks stay a view in the backward too, their
gradients are summed back onto the keys by ``ceil(L / B)`` shifted adds
(autograd's unfold backward was a tenth of the step), the additive mask is
cached per shape, and large batch x head stacks are split into calls of at most
``CPU_CALL_BYTES`` of chunks. Elsewhere (CUDA without FlexAttention) the same
layout goes through public ``scaled_dot_product_attention`` with a 4-D boolean
mask (a 3-D one falls back to the math kernel) and autograd's backward.

Every query row sees at least its own key, so no row is fully masked and neither
forward nor backward produces NaN.
"""

from __future__ import annotations

import functools
import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from megatron_consa.backends import cpu_extension

__all__ = [
    "full_causal_attention",
    "attention_over_keys",
    "sliding_window_attention",
    "dense_masked_attention",
    "sliding_window_mask",
    "window_visible",
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
    if hq < 1 or hkv < 1 or hq % hkv != 0:
        raise ValueError(f"query heads ({hq}) must be a positive multiple of KV heads ({hkv})")
    if d < 1:
        raise ValueError(f"head_dim must be >= 1, got q{tuple(q.shape)}")
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not q.device == k.device == v.device:
        raise ValueError(f"q, k and v must be on one device, got {q.device}, {k.device}, {v.device}")
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
    _check_qkv(q, k, v)
    return _sdpa(q, k, v, scale=scale, is_causal=True)


def attention_over_keys(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, mask: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Attention of ``q`` ``[b, hq, m, d]`` over keys ``k``/``v`` ``[b, hkv, k, d]`` of any length.

    ``mask`` (``[m, k]`` boolean, True = may attend; every row must see a key) or
    None: every query sees every key (a decode step over a cache). For queries
    at positions of their own, such as a KV cache's (see :func:`window_visible`).
    """
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"expected q [b, hq, m, d] and k, v [b, hkv, k, d]; got q{tuple(q.shape)} k{tuple(k.shape)} v{tuple(v.shape)}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of KV heads ({k.shape[1]})")
    return _sdpa(q, k, v, scale=scale, attn_mask=mask)


def _thread_balance(units: int) -> float:
    """The share of the CPU threads busy when ``units`` equal tasks are split over them."""
    threads = torch.get_num_threads()
    return units / (threads * math.ceil(units / threads))


def _sdpa(q, k, v, *, scale: float, is_causal: bool = False, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """SDPA with grouped-query K/V (native GQA where torch has it, else repeated K/V).

    On a CPU, where a backward follows, the K/V are repeated per query head unless the
    (batch, KV head) pairs share the threads as evenly as the (batch, query head) pairs
    do: torch's CPU flash backward with native GQA divides its work by KV head
    (measured on 2 threads, n=4096, d=32, backward: 8 query heads over 1 KV head 445 ms
    native, 159 ms on repeated K/V; 6 over 3: 160 ms and 124 ms; 8 or 4 over 2: native
    6-8% faster). A mixed layer's FA slice is often a single KV head.
    """
    rep = q.shape[1] // k.shape[1]
    if rep == 1:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale)
    cpu_backward_uneven = (
        q.device.type == "cpu"
        and torch.is_grad_enabled()
        and (q.requires_grad or k.requires_grad or v.requires_grad)
        and _thread_balance(k.shape[0] * k.shape[1]) < _thread_balance(q.shape[0] * q.shape[1])
    )
    if not cpu_backward_uneven:
        try:
            return F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale, enable_gqa=True
            )
        except (TypeError, RuntimeError):  # older torch / backend without GQA support
            pass
    return F.scaled_dot_product_attention(
        q, _expand_kv(k, rep), _expand_kv(v, rep), attn_mask=attn_mask, is_causal=is_causal, scale=scale
    )


def default_block_size(window: int, seq_len: int) -> int:
    """Query block size ``B`` used by :func:`sliding_window_attention`.

    Each query computes scores against ``B + W - 1`` keys (ideal: ``W``), so a
    small ``B`` wastes fewer FLOPs; but K/V chunks overlap ``(B + W - 1) / B``
    times, so the gradient w.r.t. the chunks (and the fused kernels' per-block
    overhead) grows as ``B`` shrinks. Measured on a 2-core CPU (fp32, d=64,
    n=4096, forward+backward), the best ``B`` was ~32 for W=64, ~64 for
    W=128..256 and 128..256 for W=512..1024; with the CPU flash ops called
    directly (under load, fwd+bwd, 8 heads x 64) 256 beat 128 by 5% at n=4096,
    W=1024 and by 12% at n=16384, W=2048 (512 was no better), hence::

        W <= 64 -> 32,   64 < W <= 256 -> 64,   256 < W <= 512 -> 128,   W > 512 -> 256

    (never more than ``seq_len``).
    """
    if window <= 64:
        block = 32
    elif window <= 256:
        block = 64
    elif window <= 512:
        block = 128
    else:
        block = 256
    return max(1, min(block, seq_len))


CPU_CALL_BYTES = 8 << 20
"""Largest K (or V) chunk tensor, in bytes, one CPU flash-attention call works on.

Bigger batch x KV-head stacks are split into several calls. The flash backward
zero-fills gradient buffers the size of the chunks; above glibc's mmap
threshold (at most 32 MiB) every call page-faults them in afresh, which cost
about a fifth of the SWA backward on a 2-core VM. Below it, freed buffers are
reused."""


def _chunk_layout(s: int, window: int, block: int) -> tuple[int, int, int]:
    """``(nblk, chunk, rows)`` for ``s`` keys: query blocks after the first ``W`` queries,
    keys per chunk (``W + B``) and padded key rows (``W + nblk*B``).

    Chunk ``i`` holds key positions ``[i*B, i*B + W + B)``, rows of the keys
    right-padded to ``W + nblk*B``; its queries sit at ``W + i*B .. W + i*B + B - 1``.
    """
    nblk = math.ceil((s - window) / block)
    return nblk, window + block, window + nblk * block


def _band_mask(
    nblk: int, block: int, window: int, sinks: int, device: torch.device
) -> torch.Tensor:
    """Boolean mask (True = may attend), see :func:`_chunk_layout`: ``[1, B, chunk]``
    without sinks (the same band for every block), ``[nblk, B, S + chunk]`` with them.

    Column ``S + c`` of block ``i`` is key ``i*B + c``, seen by row ``r``
    (query ``W + i*B + r``) iff ``r < c <= r + W``; columns ``0..S-1`` are the
    sink keys ``0..S-1``, seen iff older than the window (``j <= i*B + r``).
    """
    L = window + block
    r = torch.arange(block, device=device).view(1, block, 1)  # query offset in block
    c = torch.arange(L, device=device).view(1, 1, L)  # key offset in chunk
    mask = (c > r) & (c <= r + window)  # [1, B, L]
    if sinks > 0:
        blk = torch.arange(nblk, device=device).view(nblk, 1, 1)
        sink = torch.arange(sinks, device=device).view(1, 1, sinks)
        mask = torch.cat([sink <= blk * block + r, mask.expand(nblk, -1, -1)], dim=-1)  # [nblk, B, S + L]
    return mask


BAND_BIAS_CACHE_BYTES = 64 << 20
"""Additive band masks up to this size are kept (per shape, a few of them). Without
sinks a mask is one ``[rep*B, W + B]`` tile; with sinks it has a tile per
block, and larger ones are rebuilt on every call, as SDPA would convert a boolean
mask anyway."""


def _band_bias(
    nblk: int, block: int, window: int, sinks: int, rep: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """Additive form of :func:`_band_mask` for the CPU kernel, ``[1, nblk or 1, rep*B, S + chunk]``
    (0 visible, -inf hidden; rows repeated for the ``rep`` query heads of a KV group)."""
    nblk = nblk if sinks else 1  # the mask depends on the block only through the sinks
    nbytes = nblk * rep * block * (sinks + window + block) * torch.empty((), dtype=dtype).element_size()
    if nbytes <= BAND_BIAS_CACHE_BYTES:
        return _cached_band_bias(nblk, block, window, sinks, rep, dtype, device)
    return _build_band_bias(nblk, block, window, sinks, rep, dtype, device)


def _build_band_bias(nblk, block, window, sinks, rep, dtype, device) -> torch.Tensor:
    mask = _band_mask(nblk, block, window, sinks, device)
    if rep > 1:
        mask = mask.repeat(1, rep, 1)  # [nblk or 1, rep*B, S + L]
    bias = torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill_(~mask, float("-inf"))
    return bias.unsqueeze(0)


_cached_band_bias = functools.lru_cache(maxsize=8)(_build_band_bias)


def _query_blocks(x: torch.Tensor, rep: int, nblk: int, block: int) -> torch.Tensor:
    """``[b, hq, m, d]`` -> ``[b*hkv, nblk, rep*B, d]`` (zero-padded to ``nblk*B``); the
    ``rep`` query heads of a KV group are folded into the rows so K/V are never repeated."""
    b, hq, m, d = x.shape
    m_pad = nblk * block
    xp = F.pad(x, (0, 0, 0, m_pad - m)) if m_pad != m else x  # [b, hq, m_pad, d]
    if rep == 1:
        return xp.reshape(b * hq, nblk, block, d)
    xb = xp.reshape(b, hq // rep, rep, nblk, block, d)  # [b, hkv, rep, nblk, B, d]
    return xb.permute(0, 1, 3, 2, 4, 5).reshape(b * hq // rep, nblk, rep * block, d)


def _from_query_blocks(x: torch.Tensor, b: int, hq: int, rep: int, m: int) -> torch.Tensor:
    """Inverse of :func:`_query_blocks`: ``[b*hkv, nblk, rep*B, d]`` -> ``[b, hq, m, d]``."""
    _, nblk, rows, d = x.shape
    block = rows // rep
    m_pad = nblk * block
    if rep == 1:
        out = x.reshape(b, hq, m_pad, d)
    else:
        out = x.reshape(b, hq // rep, nblk, rep, block, d)  # [b, hkv, nblk, rep, B, d]
        out = out.permute(0, 1, 3, 2, 4, 5).reshape(b, hq, m_pad, d)
    return out[:, :, :m] if m_pad != m else out


def _cpu_flash_ops_available() -> bool:
    aten = torch.ops.aten
    return hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu") and hasattr(
        aten, "_scaled_dot_product_flash_attention_for_cpu_backward"
    )


@functools.lru_cache(maxsize=1)
def _cpu_flash_takes_gqa() -> bool:
    """Whether this torch's CPU flash op reads fewer K/V heads than query heads itself."""
    q, kv = torch.zeros(1, 2, 1, 1), torch.zeros(1, 1, 1, 1)
    try:
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, kv, kv, 0.0, True)
    except RuntimeError:
        return False
    return True


class _CpuBlockedSWA(torch.autograd.Function):
    """The SWA on the CPU flash kernel, with its own backward: causal FA for the
    first ``W`` queries, the blocked band for the rest (:func:`_chunk_layout`).

    The K/V chunks are an overlapping strided *view* of the padded keys in the
    forward and in the backward (the CPU flash kernel reads any row stride), and
    the backward sums the chunk gradients onto the keys with shifted adds,
    instead of autograd's generic unfold backward. The backward reuses the
    forward's outputs and log-sum-exps, like SDPA's own.
    """

    @staticmethod
    def forward(ctx, q, k, v, window: int, scale: float, sinks: int, block: int):
        b, hq, s, d = q.shape
        hkv = k.shape[1]
        rep = hq // hkv
        flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
        # The first W queries: causal FA over the first W keys.
        qh = q[:, :, :window]
        kh, vh = (_heads_for_flash(x[:, :, :window], rep) for x in (k, v))
        out_head, lse_head = flash(qh, kh, vh, 0.0, True, scale=scale)
        # The others: the blocked band.
        nblk, _, _ = _chunk_layout(s, window, block)
        qb = _query_blocks(q[:, :, window:], rep, nblk, block)  # [b*hkv, nblk, rep*B, d]
        kc, vc = (_cpu_chunks(x, nblk, block, window, sinks) for x in (k, v))  # [b*hkv, nblk, S + L, d]
        bias = _band_bias(nblk, block, window, sinks, rep, q.dtype, q.device)
        rows = _rows_per_call(kc)
        parts = [
            flash(qb[r : r + rows], kc[r : r + rows], vc[r : r + rows], 0.0, False, attn_mask=bias, scale=scale)
            for r in range(0, qb.size(0), rows)
        ]
        out = _cat([o for o, _ in parts])  # [b*hkv, nblk, rep*B, d]
        lse = _cat([lse for _, lse in parts])
        ctx.save_for_backward(qh, kh, vh, out_head, lse_head, qb, kc, vc, out, lse, bias)
        ctx.meta = (b, hq, rep, s, window, block, sinks, scale)
        result = q.new_empty(b, hq, s, d)
        result[:, :, :window] = out_head
        result[:, :, window:] = _from_query_blocks(out, b, hq, rep, s - window)
        return result

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        qh, kh, vh, out_head, lse_head, qb, kc, vc, out, lse, bias = ctx.saved_tensors
        b, hq, rep, s, window, block, sinks, scale = ctx.meta
        flash_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
        hkv = hq // rep
        d = qb.size(-1)
        gq_head, gk_head, gv_head = flash_backward(
            grad[:, :, :window], qh, kh, vh, out_head, lse_head, 0.0, True, scale=scale
        )
        nblk = qb.size(1)
        gb = _query_blocks(grad[:, :, window:], rep, nblk, block).contiguous()  # [b*hkv, nblk, rep*B, d]
        rows = _rows_per_call(kc)
        dq, dk, dv = [], [], []
        for r in range(0, qb.size(0), rows):
            part = slice(r, r + rows)
            gq, gk, gv = flash_backward(
                gb[part], qb[part], kc[part], vc[part], out[part], lse[part], 0.0, False,
                attn_mask=bias, scale=scale,
            )
            dq.append(gq)
            dk.append(_fold_chunks(gk, s, window, block, sinks))
            dv.append(_fold_chunks(gv, s, window, block, sinks))
        grad_q = grad.new_empty(b, hq, s, d)
        grad_q[:, :, :window] = gq_head
        grad_q[:, :, window:] = _from_query_blocks(_cat(dq), b, hq, rep, s - window)
        grad_k, grad_v = (_cat(g).view(b, hkv, s, d) for g in (dk, dv))
        for full, head in ((grad_k, gk_head), (grad_v, gv_head)):
            if head.size(1) != hkv:  # K/V were repeated per query head for the flash op
                head = head.view(b, hkv, rep, window, d).sum(2)
            full[:, :, :window] += head
        return grad_q, grad_k, grad_v, None, None, None, None


CPU_KV_TILE = 512
"""Keys per tile of the banded CPU kernel (the CPU flash op's own ``kvSplitSize``),
except where :func:`cpu_kv_tile` says otherwise."""

CPU_KV_TILE_FP32_BRGEMM_FORWARD = 1024
"""Keys per tile of the fp32 forward on oneDNN brgemm (:func:`cpu_kv_tile`)."""


def cpu_kv_tile(dtype: torch.dtype, head_dim: int, backward: bool = False) -> int:
    """Keys per tile of the banded CPU kernel for a ``dtype`` call's forward (or ``backward``).

    :data:`CPU_KV_TILE`, except the fp32 forward on oneDNN brgemm (AVX-512 builds, bf16
    too where it computes in fp32): 1024. Measured on Zen 4 (2 cores, d=64, minimum of 4 x
    interleaved runs): 1.6-3.6% faster at W 512..2048 (one key tile of ``W + T - 1`` keys
    instead of two or three: fewer brgemm calls, and fewer rescales of the running
    output), within 1% at W 64..256. The backward and the bf16 dot-product forward gained
    nothing consistent (-7% to +5%) and keep 512.
    """
    compute = cpu_extension.compute_dtype(dtype, head_dim, backward)
    if not backward and compute == torch.float32 and cpu_extension.brgemm_fp32():
        return CPU_KV_TILE_FP32_BRGEMM_FORWARD
    return CPU_KV_TILE


def default_cpu_q_tile(window: int, rep: int = 1, dtype: torch.dtype = torch.float32, brgemm: bool = False,
                       bf16_dot: bool = False) -> int:
    """Query positions per tile of the banded CPU kernel (:mod:`.cpu_extension`).

    A tile of ``T`` positions reads ``W + T - 1`` keys for ``W`` useful per row,
    so a small ``T`` wastes less; its ``rep * T`` rows (the GQA heads of a KV
    head share the tile) make bigger matrix products the larger it is. Measured
    on 2 cores (d=64, forward and backward; differences of a few percent):

    - fp32 on MKL's sgemm (AVX2 builds; measured on Intel at n=4096 before the
      brgemm products): best at ``T = W / 8`` within 32..128 and at most 128 rows;
    - fp32 on oneDNN brgemm (``brgemm``: AVX-512 builds, bf16 too where it runs
      on them; Zen 4, n 1024..16384, 40 interleaved repetitions): 16 was 3-10%
      faster than 32 at W 64..256, 32 within 5% of the best from W = 512 on, 64
      and 128 up to 10% slower: 16 up to W = 256, then 32, at most 128 rows;
    - bf16 (AMX products, cheap next to the softmax) at 64..128 and at most 256
      rows;
    - bf16 on AVX512-BF16 dot products without AMX (``bf16_dot``; Zen 4, n
      1024..8192, W 64..2048): 32 was the fastest or within 2% of it, forward and
      backward; forward 16 and 64 up to 5% and 13% slower, 128 up to 45%; backward 16
      up to 12% slower, 64 up to 17% (or 1% faster): 32, at most 256 rows.

    Hence ``clamp(W / 8)`` to a power of two (or the brgemm and bf16_dot rules),
    halved (down to 16) while the rows exceed the cap.
    """
    if brgemm and dtype == torch.float32:
        tile, rows = (16 if window <= 256 else 32), 128
    elif bf16_dot and dtype == torch.bfloat16:
        tile, rows = 32, 256
    else:
        low, rows = (64, 256) if dtype in (torch.bfloat16, torch.float16) else (32, 128)
        tile = low
        while tile < 128 and tile * 8 < window:
            tile *= 2
    while tile > 16 and tile * rep > rows:
        tile //= 2
    return tile


def cpu_q_tile(window: int, rep: int, dtype: torch.dtype, head_dim: int, backward: bool = False) -> int:
    """:func:`default_cpu_q_tile` for a ``dtype`` call's forward (or ``backward``) on this
    machine's kernel build: in the dtype it computes in (:func:`.cpu_extension.compute_dtype`),
    on the products it uses."""
    compute = cpu_extension.compute_dtype(dtype, head_dim, backward)
    return default_cpu_q_tile(window, rep, compute, brgemm=compute == torch.float32 and cpu_extension.brgemm_fp32(),
                              bf16_dot=cpu_extension.bf16_dot_products(head_dim, backward))


class _CpuBandedSWA(torch.autograd.Function):
    """The SWA on the banded C++ CPU kernel (:mod:`.cpu_extension`): each query tile
    reads only its window (and sinks), the backward recomputes the probabilities
    from the forward's log-sum-exp."""

    @staticmethod
    def forward(ctx, q, k, v, window: int, scale: float, sinks: int, q_tiles: Tuple[int, int], kernel):
        """``q_tiles``: the forward's and the backward's query tile (they may compute in
        different dtypes: :func:`cpu_q_tile`)."""
        q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
        out, lse = kernel.forward(q, k, v, window, sinks, scale, q_tiles[0], cpu_kv_tile(q.dtype, q.size(-1)))
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.meta = (window, scale, sinks, q_tiles[1], kernel)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        q, k, v, out, lse = ctx.saved_tensors
        window, scale, sinks, q_tile, kernel = ctx.meta
        grads = kernel.backward(grad, q, k, v, out, lse, window, sinks, scale, q_tile,
                                cpu_kv_tile(q.dtype, q.size(-1), backward=True))
        return (*grads, None, None, None, None, None)


def _heads_for_flash(x: torch.Tensor, rep: int) -> torch.Tensor:
    """K/V ``[b, hkv, m, d]`` as the CPU flash op takes them beside ``hkv * rep`` query
    heads: unchanged where it handles GQA itself, else repeated per query head."""
    return x if rep == 1 or _cpu_flash_takes_gqa() else _expand_kv(x, rep)


def _cat(parts: list[torch.Tensor]) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _rows_per_call(chunks: torch.Tensor) -> int:
    """Rows of ``[b*hkv, ...]`` per CPU flash call, keeping a chunk tensor under CPU_CALL_BYTES."""
    per_row = chunks[0].numel() * chunks.element_size()
    return max(1, CPU_CALL_BYTES // per_row)


def _cpu_chunks(x: torch.Tensor, nblk: int, block: int, window: int, sinks: int) -> torch.Tensor:
    """Keys ``[b, hkv, s, d]`` -> chunks ``[b*hkv, nblk, S + W + B, d]`` (:func:`_chunk_layout`).

    Without sinks an overlapping strided view of the keys right-padded with zero
    rows: one copy of ``x``, not of every chunk. Sinks are prepended to each
    chunk (a copy).
    """
    b, h, s, d = x.shape
    _, L, P = _chunk_layout(s, window, block)
    xp = x.new_zeros(b * h, P, d)
    xp[:, :s] = x.reshape(b * h, s, d)
    chunks = xp.as_strided((b * h, nblk, L, d), (P * d, block * d, d, 1))  # chunk i from key i*B
    if sinks:
        head = x.reshape(b * h, 1, s, d)[:, :, :sinks].expand(-1, nblk, -1, -1)  # [b*h, nblk, S, d]
        chunks = torch.cat([head, chunks], dim=2)
    return chunks


def _fold_chunks(grad: torch.Tensor, s: int, window: int, block: int, sinks: int) -> torch.Tensor:
    """Sum chunk gradients ``[rows, nblk, S + W + B, d]`` onto the keys: ``[rows, s, d]``."""
    rows, nblk, _, d = grad.shape
    _, L, P = _chunk_layout(s, window, block)
    keys = grad.new_zeros(rows, P, d)
    # Columns [t*B, t*B + w) of chunk i are keys (i + t)*B + [0, w): one shifted add per t.
    for start in range(0, L, block):
        w = min(block, L - start)
        target = keys.as_strided((rows, nblk, w, d), (P * d, block * d, d, 1), start * d)
        target += grad[:, :, sinks + start : sinks + start + w]
    keys = keys[:, :s]
    if sinks:
        keys[:, :sinks] += grad[:, :, :sinks].sum(dim=1)
    return keys


def _sdpa_blocked_swa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, window: int, scale: float, sinks: int, block: int
) -> torch.Tensor:
    """The blocked SWA of the queries after the first ``W`` through public
    ``scaled_dot_product_attention`` (any device; autograd differentiates it).
    Same layout and mask as :class:`_CpuBlockedSWA`."""
    b, hq, m, d = q.shape
    hkv, s = k.shape[1], k.shape[2]
    rep = hq // hkv
    nblk, L, P = _chunk_layout(s, window, block)
    qb = _query_blocks(q, rep, nblk, block)  # [b*hkv, nblk, rep*B, d]

    def chunks(x):  # [b, hkv, s, d] -> overlapping view [b*hkv, nblk, S + L, d]
        xp = F.pad(x, (0, 0, 0, P - s))  # [b, hkv, P, d]
        view = xp.unfold(2, L, block).transpose(-1, -2).reshape(b * hkv, nblk, L, d)
        if sinks:
            head = x[:, :, :sinks].reshape(b * hkv, 1, sinks, d).expand(-1, nblk, -1, -1)
            view = torch.cat([head, view], dim=2)
        return view

    mask = _band_mask(nblk, block, window, sinks, q.device)  # [nblk or 1, B, S + L]
    if rep > 1:
        mask = mask.repeat(1, rep, 1)  # [nblk or 1, rep*B, S + L]
    # A 4-D mask is required for the fused kernels (a 3-D one falls back to math).
    out = F.scaled_dot_product_attention(qb, chunks(k), chunks(v), attn_mask=mask.unsqueeze(0), scale=scale)
    return _from_query_blocks(out, b, hq, rep, m)


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
        block_size: query rows per tile of the banded CPU kernel (default
            :func:`cpu_q_tile`), or the query block ``B`` of the chunked
            layout elsewhere (default :func:`default_block_size`).

    Returns:
        ``[b, hq, s, d]`` in the dtype of ``q``. On the CPU the backward is the
        kernel's own (:class:`_CpuBandedSWA`, or :class:`_CpuBlockedSWA` on the
        fallback; first order only).
    """
    _check_qkv(q, k, v)
    if int(window) != window or int(sink_tokens) != sink_tokens:
        raise ValueError(f"window ({window}) and sink_tokens ({sink_tokens}) must be whole numbers")
    window = int(window)
    sink_tokens = int(sink_tokens)
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    if sink_tokens < 0:
        raise ValueError(f"sink_tokens must be >= 0, got {sink_tokens}")
    if not (scale > 0 and math.isfinite(scale)):  # the kernel takes the row max before scaling
        raise ValueError(f"scale must be a positive finite number, got {scale}")
    s = q.shape[2]
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
    block = min(block, s - window)
    kernel = cpu_extension.extension() if q.device.type == "cpu" and cpu_extension.supports(q.dtype) else None
    if kernel is not None:
        rep, d = q.shape[1] // k.shape[1], q.shape[-1]
        q_tiles = (int(block_size),) * 2 if block_size is not None else \
            (cpu_q_tile(window, rep, q.dtype, d), cpu_q_tile(window, rep, q.dtype, d, backward=True))
        return _CpuBandedSWA.apply(q, k, v, window, scale, sinks, q_tiles, kernel)
    if q.device.type == "cpu" and _cpu_flash_ops_available():
        return _CpuBlockedSWA.apply(q, k, v, window, scale, sinks, block)
    # The first W queries see every key before them (no sink is older than the window).
    head = full_causal_attention(q[:, :, :window], k[:, :, :window], v[:, :, :window], scale=scale)
    rest = _sdpa_blocked_swa(q[:, :, window:], k, v, window=window, scale=scale, sinks=sinks, block=block)
    return torch.cat([head, rest], dim=2)


def sliding_window_mask(
    seq_len: int,
    window: int,
    sink_tokens: int = 0,
    device: Optional[torch.device] = None,
) -> torch.Tensor:
    """Dense boolean ``[s, s]`` mask (True = may attend) for the SWA convention.

    ``mask[p, j] = j <= p and (j > p - window or j < sink_tokens)``.
    """
    positions = torch.arange(seq_len, device=device)
    return window_visible(positions, positions, window, sink_tokens)


def window_visible(
    query_positions: torch.Tensor, key_positions: torch.Tensor, window: int, sink_tokens: int = 0
) -> torch.Tensor:
    """Boolean ``[len(q), len(k)]`` mask of the SWA convention at absolute positions (True = may attend).

    ``visible[i, c] = j <= p and (j > p - window or j < sink_tokens)`` with
    ``p = query_positions[i]``, ``j = key_positions[c]``: what a KV cache that holds
    keys in any order (a ring buffer) needs, and :func:`sliding_window_mask` for
    ``positions = 0 .. s-1``.
    """
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    p = query_positions.view(-1, 1)
    j = key_positions.view(1, -1)
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
