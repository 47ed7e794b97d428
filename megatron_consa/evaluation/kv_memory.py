"""KV-cache bytes of a hybrid FA/SWA model, and the target sparsity that fits a budget.

Pure arithmetic, no torch model. The formula, per sequence of `n` tokens:

    bytes = 2 (K and V) x batch x head_dim x bytes_per_element
            x [ FA_heads x n + SWA_heads x min(n, window + sink_tokens) ]

summed over all layers' KV heads (`Allocation.kv_cache_tokens` gives the bracket).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from megatron_consa.allocation import Allocation, num_units

DTYPE_BYTES = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2, "fp8": 1}
"""Bytes per cached K/V element for the dtype names the tools accept."""


def dtype_bytes(dtype: str) -> int:
    """Bytes per element of a KV-cache dtype name (`bf16`, `fp16`, `fp32`, `fp8`)."""
    try:
        return DTYPE_BYTES[dtype]
    except KeyError:
        raise ValueError(f"dtype {dtype!r} is not known; use one of {sorted(DTYPE_BYTES)}") from None


@dataclass(frozen=True)
class KvCacheShape:
    """What the KV-cache size depends on, besides the allocation."""

    num_layers: int
    """Transformer layers."""
    num_kv_heads: int
    """KV heads per layer (GQA groups)."""
    head_dim: int
    """Width of one K (or V) head."""
    context_length: int
    """Tokens cached per sequence (prompt + generated)."""
    batch_size: int = 1
    """Sequences cached at once."""
    bytes_per_element: int = 2
    """Bytes per cached element (2 for bf16/fp16)."""

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_kv_heads", "head_dim", "batch_size", "bytes_per_element"):
            if getattr(self, name) < 1:
                raise ValueError(f"KvCacheShape.{name}={getattr(self, name)} must be >= 1")
        if self.context_length < 0:
            raise ValueError(f"KvCacheShape.context_length={self.context_length} must be >= 0")

    @property
    def bytes_per_head_token(self) -> int:
        """Bytes of one KV head's K and V for one token, over the batch."""
        return 2 * self.batch_size * self.head_dim * self.bytes_per_element

    @property
    def total_kv_heads(self) -> int:
        return self.num_layers * self.num_kv_heads


def all_fa_bytes(shape: KvCacheShape) -> int:
    """KV-cache bytes with every head full attention."""
    return shape.total_kv_heads * shape.context_length * shape.bytes_per_head_token


def allocation_bytes(shape: KvCacheShape, allocation: Allocation) -> int:
    """KV-cache bytes under `allocation` (SWA heads keep window + sink_tokens tokens)."""
    allocation.check_compatible(shape.num_layers, shape.num_kv_heads)
    return allocation.kv_cache_tokens(shape.context_length) * shape.bytes_per_head_token


@dataclass(frozen=True)
class BudgetFit:
    """The most FA a byte budget allows."""

    target_sparsity: float
    """Smallest sparsity on the granularity's grid whose allocation fits (1.0: only all-SWA fits)."""
    fa_units: int
    """FA units at that sparsity (layers or KV heads, per granularity)."""
    kv_bytes: int
    """KV-cache bytes at that sparsity (<= the budget)."""


def sparsity_for_budget(
    shape: KvCacheShape, budget_bytes: int, *, window: int, sink_tokens: int = 0, granularity: str = "kv_head"
) -> BudgetFit:
    """The lowest target sparsity whose allocation's KV cache fits in `budget_bytes`.

    Any allocation with K FA units costs the same, so this is the largest K with
    K x unit_heads x n + (rest) x min(n, W + S) tokens within the budget; the target
    `1 - K / units` gives exactly K FA units under the finalize/preset rounding.
    Raises ValueError when even all-SWA does not fit.
    """
    units = num_units(granularity, shape.num_layers, shape.num_kv_heads)
    heads_per_unit = shape.total_kv_heads // units
    n, per = shape.context_length, shape.bytes_per_head_token
    swa_tokens = min(n, window + sink_tokens)
    floor_bytes = shape.total_kv_heads * swa_tokens * per
    if budget_bytes < floor_bytes:
        raise ValueError(
            f"budget {budget_bytes} bytes is below the all-SWA KV cache ({floor_bytes} bytes at "
            f"context {n}, window {window}): lower the batch size, the context or the window"
        )
    extra_per_unit = heads_per_unit * (n - swa_tokens) * per  # one more FA unit costs this
    k = units if extra_per_unit == 0 else min(units, (budget_bytes - floor_bytes) // extra_per_unit)
    return BudgetFit(
        target_sparsity=1.0 - k / units,
        fa_units=int(k),
        kv_bytes=floor_bytes + int(k) * extra_per_unit,
    )


def format_bytes(n: int) -> str:
    """1536 -> '1.50 KiB' (binary units)."""
    if n < 1024:
        return f"{n} B"
    exp = min(int(math.log(n, 1024)), 4)
    return f"{n / 1024 ** exp:.2f} {['B', 'KiB', 'MiB', 'GiB', 'TiB'][exp]}"


def parse_bytes(text: str) -> int:
    """'24GiB', '1.5GB', '1000000' -> bytes (binary KiB/MiB/GiB/TiB, decimal KB/MB/GB/TB)."""
    units = {"": 1, "b": 1, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
             "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
    s = text.strip().lower().replace(" ", "")
    number = s.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = s[len(number):]
    hint = "write e.g. 24GiB, 1.5GB or 1000000"
    try:
        value = float(number) * units[unit] if number and unit in units else None
    except ValueError:
        value = None
    if value is None:
        raise ValueError(f"cannot read {text!r} as a byte count; {hint}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{text!r} is not a finite, non-negative byte count; {hint}")
    return int(value)


__all__ = [
    "BudgetFit",
    "DTYPE_BYTES",
    "KvCacheShape",
    "all_fa_bytes",
    "allocation_bytes",
    "dtype_bytes",
    "format_bytes",
    "parse_bytes",
    "sparsity_for_budget",
]
