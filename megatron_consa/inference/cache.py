"""Hybrid KV cache: FA heads keep every token, SWA heads keep the window plus the sinks.

Pure torch (no megatron-core, no transformers): the megatron-side generator
(`megatron_consa.inference.generate`) and the Hugging Face `Cache`
(`megatron_consa.inference.hf`) both store into it and attend with
`hybrid_attention`.

Layout of one layer (`LayerKVCache`), K and V alike, each type of KV head in a
tensor of its own, ``[b, g_type, slots, d]``:

* FA heads: slot = position, 0 .. n-1. The buffer is allocated once at
  `max_length` when it is known, else it grows by doubling.
* SWA heads: ``S + W`` slots at most (S = sink tokens, W = window). Slots
  ``0 .. S-1`` hold positions ``0 .. S-1`` (the sinks); slots ``S .. S+W-1`` are a
  ring of the latest W positions ``>= S``: position ``p`` sits at slot
  ``S + (p - S) % W``. Window semantics as everywhere in the project: a query at
  ``p`` sees keys ``p-W+1 .. p`` and the sinks ``0 .. S-1`` (DESIGN.md). A new
  token is written *before* it attends, into the slot of position ``p - W``,
  which no query from ``p`` on can see; so one-token steps read the filled slots
  as they are, every entry visible, no mask and no copy.

After ``n`` tokens a layer holds exactly ``FA heads x n + SWA heads x min(n, W + S)``
entries (times K and V), the formula of `megatron_consa.evaluation.kv_memory`.
Positions (for RoPE) are absolute: the cache only counts them.

A step of several tokens (a prefill chunk) attends with a window mask over
``[filled slots, new tokens]`` before the new tokens overwrite the ring; the
first chunk of an empty cache runs the training kernels (causal FA, the O(n W)
blocked SWA). All sequences of a batch advance together (no padding).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from megatron_consa.allocation import Allocation, heads_by_type
from megatron_consa.backends.torch_attention import (
    attention_over_keys,
    full_causal_attention,
    sliding_window_attention,
    window_visible,
)


@dataclass(frozen=True)
class CachedKV:
    """What one attention call reads: the keys and values of each head type, ``[b, g_type, k, d]``."""

    query_start: int
    """Absolute position of the call's first query (the queries are consecutive)."""
    fa_keys: Optional[Tensor]
    """FA heads' keys at positions ``0 .. query_start + m - 1``; None without FA heads."""
    fa_values: Optional[Tensor]
    swa_keys: Optional[Tensor]
    """SWA heads' keys at `swa_positions`; None without SWA heads."""
    swa_values: Optional[Tensor]
    swa_positions: Optional[Tensor]
    """Absolute position of each SWA entry (int64 ``[k]``); None: positions ``0 .. k-1`` in order."""
    swa_all_visible: bool = False
    """Every SWA entry is visible to the (single) query: a one-token step read from the cache."""

    @classmethod
    def from_full(cls, keys: Tensor, values: Tensor, fa_row: Sequence[int], query_len: int) -> "CachedKV":
        """Plain K/V of every position ``0 .. n-1`` (``[b, G, n, d]``), split by type: for a caller
        without a hybrid cache (no cache, or a cache that keeps everything)."""
        groups = head_plan(tuple(fa_row), 1, keys.device)
        fa_k, swa_k = groups.split_groups(keys)
        fa_v, swa_v = groups.split_groups(values)
        return cls(keys.size(2) - query_len, fa_k, fa_v, swa_k, swa_v, None)


@dataclass(frozen=True)
class HeadPlan:
    """Index tensors of one layer row: KV groups and query heads of each type."""

    fa_groups: Tensor
    fa_heads: Tensor
    swa_groups: Tensor
    swa_heads: Tensor

    @property
    def all_fa(self) -> bool:
        return self.swa_groups.numel() == 0

    @property
    def all_swa(self) -> bool:
        return self.fa_groups.numel() == 0

    def split_groups(self, x: Tensor) -> tuple[Optional[Tensor], Optional[Tensor]]:
        """``[b, G, s, d]`` -> (FA groups, SWA groups); None for a type the layer lacks (no copy for one type)."""
        if self.all_fa:
            return x, None
        if self.all_swa:
            return None, x
        return x.index_select(1, self.fa_groups), x.index_select(1, self.swa_groups)


@functools.lru_cache(maxsize=1024)
def head_plan(fa_row: tuple[int, ...], heads_per_group: int, device: torch.device) -> HeadPlan:
    """The (cached) `HeadPlan` of a layer row ``fa_row`` (1 = FA) on ``device``."""
    index = heads_by_type(fa_row, heads_per_group)
    return HeadPlan(*(torch.tensor(i, dtype=torch.long, device=device) for i in index))


def hybrid_attention(
    query: Tensor, kv: CachedKV, fa_row: Sequence[int], *, window: int, sink_tokens: int, scale: float
) -> Tensor:
    """Hybrid FA/SWA attention of ``query`` ``[b, hq, m, d]`` (positions ``kv.query_start ..``) over `kv`.

    FA heads see every earlier position, SWA heads the window and the sinks;
    returns ``[b, hq, m, d]``. The result equals the dense masked reference
    (`backends.torch_attention.dense_masked_attention` with `sliding_window_mask`
    on the SWA heads) at the query rows.
    """
    g = len(fa_row)
    plan = head_plan(tuple(int(f) for f in fa_row), query.size(1) // g, query.device)
    m, start = query.size(2), kv.query_start
    q_pos = functools.partial(torch.arange, start, start + m, device=query.device)  # built only for masks
    out = query.new_empty(query.shape) if not (plan.all_fa or plan.all_swa) else None
    parts = []
    if not plan.all_swa:
        q = query if plan.all_fa else query.index_select(1, plan.fa_heads)
        n = kv.fa_keys.size(2)
        if start == 0 and m == n:
            o = full_causal_attention(q, kv.fa_keys, kv.fa_values, scale=scale)
        else:
            mask = None if m == 1 else torch.arange(n, device=query.device)[None, :] <= q_pos()[:, None]
            o = attention_over_keys(q, kv.fa_keys, kv.fa_values, scale=scale, mask=mask)
        parts.append((plan.fa_heads, o))
    if not plan.all_fa:
        q = query if plan.all_swa else query.index_select(1, plan.swa_heads)
        k, v = kv.swa_keys, kv.swa_values
        if kv.swa_positions is None and start == 0 and m == k.size(2):
            o = sliding_window_attention(q, k, v, window=window, scale=scale, sink_tokens=sink_tokens)
        elif kv.swa_all_visible:
            o = attention_over_keys(q, k, v, scale=scale)
        else:
            k_pos = kv.swa_positions if kv.swa_positions is not None else torch.arange(k.size(2), device=query.device)
            o = attention_over_keys(q, k, v, scale=scale, mask=window_visible(q_pos(), k_pos, window, sink_tokens))
        parts.append((plan.swa_heads, o))
    if out is None:
        return parts[0][1]
    for heads, o in parts:
        out[:, heads] = o
    return out


def _grown(buf: Optional[Tensor], slots: int, like: Tensor) -> Tensor:
    """``buf`` with room for ``slots`` slots along dim 2 (its content kept), or a new buffer like ``like``."""
    if buf is not None and buf.size(2) >= slots:
        return buf
    new = like.new_empty(like.size(0), like.size(1), slots, like.size(3))
    if buf is not None:
        new[:, :, : buf.size(2)] = buf
    return new


class LayerKVCache:
    """One layer of the hybrid cache (see the module docstring)."""

    def __init__(self, fa_row: Sequence[int], *, window: int, sink_tokens: int = 0, max_length: Optional[int] = None):
        if window < 1 or sink_tokens < 0:
            raise ValueError(f"window={window} must be >= 1 and sink_tokens={sink_tokens} >= 0")
        if max_length is not None and max_length < 1:
            raise ValueError(f"max_length={max_length} must be >= 1 (or None to grow as needed)")
        self.fa_row = tuple(int(f) for f in fa_row)
        self.window, self.sink_tokens, self.max_length = int(window), int(sink_tokens), max_length
        self.length = 0
        """Tokens seen so far (the next token's absolute position)."""
        self.buffers: dict[str, Optional[Tensor]] = {"fa_k": None, "fa_v": None, "swa_k": None, "swa_v": None}

    # ---- accounting ---------------------------------------------------------
    @property
    def swa_slots(self) -> int:
        """Slots an SWA head needs at most: window + sinks."""
        return self.window + self.sink_tokens

    @property
    def num_fa_heads(self) -> int:
        return sum(self.fa_row)

    @property
    def num_swa_heads(self) -> int:
        return len(self.fa_row) - self.num_fa_heads

    @property
    def entries(self) -> int:
        """Cached tokens summed over KV heads, per sequence (each entry is one K and one V row)."""
        return self.num_fa_heads * self.length + self.num_swa_heads * min(self.length, self.swa_slots)

    @property
    def held_bytes(self) -> int:
        """Bytes of the K and V entries held: `entries` x 2 (K, V) x batch x head_dim x element size."""
        buf = next((b for b in self.buffers.values() if b is not None), None)
        return 0 if buf is None else self.entries * 2 * buf.size(0) * buf.size(3) * buf.element_size()

    @property
    def allocated_entries(self) -> int:
        """Slots allocated, summed over KV heads (= `entries` once `max_length` tokens are in)."""
        return sum(b.size(1) * b.size(2) for name, b in self.buffers.items() if b is not None and name.endswith("_k"))

    @property
    def nbytes(self) -> int:
        """Bytes of every K and V buffer allocated."""
        return sum(b.numel() * b.element_size() for b in self.buffers.values() if b is not None)

    # ---- storing ------------------------------------------------------------
    def append(self, keys: Tensor, values: Tensor) -> CachedKV:
        """Store the next ``m`` tokens' keys and values (``[b, G, m, d]``, after RoPE) and
        return what their queries attend to."""
        if keys.dim() != 4 or keys.shape != values.shape or keys.size(1) != len(self.fa_row):
            raise ValueError(
                f"expected keys and values [b, {len(self.fa_row)}, m, d] (one row per KV head of the allocation row); "
                f"got {tuple(keys.shape)} and {tuple(values.shape)}"
            )
        batch = self.buffers["fa_k"] if self.buffers["fa_k"] is not None else self.buffers["swa_k"]
        if batch is not None and batch.size(0) != keys.size(0):
            raise ValueError(f"batch size {keys.size(0)} differs from the cached sequences' {batch.size(0)}")
        plan = head_plan(self.fa_row, 1, keys.device)
        n, m = self.length, keys.size(2)
        fa_k, swa_k = plan.split_groups(keys)
        fa_v, swa_v = plan.split_groups(values)
        view = {"fa_keys": None, "fa_values": None, "swa_keys": None, "swa_values": None, "swa_positions": None}
        all_visible = False
        if fa_k is not None:
            view["fa_keys"], view["fa_values"] = self._append_fa(fa_k, fa_v, n)
        if swa_k is not None:
            filled = min(n, self.swa_slots)
            if n == 0:  # the chunk itself, positions 0 .. m-1 in order
                view["swa_keys"], view["swa_values"] = swa_k, swa_v
                self._store_swa(swa_k, swa_v, n)
            elif m == 1:  # write first (evicts position n - W), then every filled slot is visible
                self._store_swa(swa_k, swa_v, n)
                k_now = min(n + 1, self.swa_slots)
                view["swa_keys"], view["swa_values"] = self.buffers["swa_k"][:, :, :k_now], self.buffers["swa_v"][:, :, :k_now]
                all_visible = True
            else:  # a chunk after earlier tokens: old slots + the chunk, masked by position
                old_k, old_v = self.buffers["swa_k"][:, :, :filled], self.buffers["swa_v"][:, :, :filled]
                view["swa_keys"], view["swa_values"] = torch.cat([old_k, swa_k], 2), torch.cat([old_v, swa_v], 2)
                view["swa_positions"] = torch.cat(
                    [self._slot_positions(n, keys.device), torch.arange(n, n + m, device=keys.device)]
                )
                self._store_swa(swa_k, swa_v, n)
        self.length = n + m
        return CachedKV(query_start=n, swa_all_visible=all_visible, **view)

    def _capacity(self, needed: int, current: int) -> int:
        if current == 0 and self.max_length is not None:
            return max(needed, self.max_length)
        return max(needed, 2 * current)

    def _append_fa(self, k: Tensor, v: Tensor, n: int) -> tuple[Tensor, Tensor]:
        m = k.size(2)
        buf = self.buffers["fa_k"]
        if buf is None or buf.size(2) < n + m:
            slots = self._capacity(n + m, 0 if buf is None else buf.size(2))
            self.buffers["fa_k"], self.buffers["fa_v"] = _grown(buf, slots, k), _grown(self.buffers["fa_v"], slots, v)
        self.buffers["fa_k"][:, :, n : n + m] = k
        self.buffers["fa_v"][:, :, n : n + m] = v
        return self.buffers["fa_k"][:, :, : n + m], self.buffers["fa_v"][:, :, : n + m]

    def _store_swa(self, k: Tensor, v: Tensor, n: int) -> None:
        """Write positions ``n .. n+m-1`` into their slots (sinks, then the ring's latest W)."""
        m, S, W = k.size(2), self.sink_tokens, self.window
        needed = min(n + m, self.swa_slots)
        buf = self.buffers["swa_k"]
        if buf is None or buf.size(2) < needed:
            # While n + m <= S + W the slot of a position is the position itself, so growing keeps the layout.
            current = 0 if buf is None else buf.size(2)
            slots = min(self.swa_slots, self._capacity(needed, current))
            self.buffers["swa_k"], self.buffers["swa_v"] = _grown(buf, slots, k), _grown(self.buffers["swa_v"], slots, v)
        if m == 1:
            slot = n if n < S else S + (n - S) % W
            self.buffers["swa_k"][:, :, slot] = k[:, :, 0]
            self.buffers["swa_v"][:, :, slot] = v[:, :, 0]
            return
        positions = torch.arange(n, n + m, device=k.device)
        # Sinks stay; of the rest only the chunk's latest W reach the ring (distinct slots).
        keep = (positions < S) | (positions >= n + m - W)
        src = keep.nonzero().squeeze(1)
        kept = positions[src]
        slots = torch.where(kept < S, kept, S + (kept - S) % W)
        self.buffers["swa_k"].index_copy_(2, slots, k.index_select(2, src))
        self.buffers["swa_v"].index_copy_(2, slots, v.index_select(2, src))

    def _slot_positions(self, n: int, device: torch.device) -> Tensor:
        """Absolute position held by each filled SWA slot after ``n`` tokens (``[min(n, S + W)]``)."""
        S, W = self.sink_tokens, self.window
        ring = torch.arange(min(max(n - S, 0), W), device=device)  # ring slot S + r holds its latest position < n
        return torch.cat([torch.arange(min(n, S), device=device), S + ring + W * torch.div(n - 1 - S - ring, W, rounding_mode="floor")])

    # ---- batch bookkeeping (beam search, repeated sequences) ----------------
    def map_batch(self, fn: Callable[[Tensor], Tensor]) -> None:
        """Apply ``fn`` to the batch dimension of every buffer (e.g. ``index_select(0, beams)``)."""
        self.buffers = {name: None if b is None else fn(b) for name, b in self.buffers.items()}

    def reset(self) -> None:
        self.length = 0
        self.buffers = dict.fromkeys(self.buffers)


class HybridKVCache:
    """The hybrid cache of a whole model: one `LayerKVCache` per layer."""

    def __init__(self, layers: Sequence[LayerKVCache]):
        self.layers = list(layers)

    @classmethod
    def from_allocation(cls, allocation: Allocation, *, max_length: Optional[int] = None) -> "HybridKVCache":
        """One layer per allocation row, with the allocation's window and sinks.

        ``max_length`` (prompt + generated tokens) allocates the FA buffers once;
        without it they grow by doubling.
        """
        allocation.validate("allocation for the KV cache")
        return cls(
            LayerKVCache(row, window=allocation.window, sink_tokens=allocation.sink_tokens, max_length=max_length)
            for row in allocation.fa
        )

    @property
    def seq_length(self) -> int:
        """Tokens cached (the next token's position)."""
        return self.layers[0].length if self.layers else 0

    @property
    def entries(self) -> int:
        """Cached tokens summed over every layer's KV heads."""
        return sum(layer.entries for layer in self.layers)

    @property
    def held_bytes(self) -> int:
        """Bytes of the K and V entries held (the kv_memory formula at `seq_length`)."""
        return sum(layer.held_bytes for layer in self.layers)

    @property
    def nbytes(self) -> int:
        """Bytes of every K and V buffer allocated."""
        return sum(layer.nbytes for layer in self.layers)

    def reset(self) -> None:
        for layer in self.layers:
            layer.reset()


__all__ = ["CachedKV", "HeadPlan", "HybridKVCache", "LayerKVCache", "head_plan", "hybrid_attention"]
