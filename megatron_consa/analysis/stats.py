"""Statistics of an FA/SWA allocation that test the paper's pattern claims.

ConSA reports that learned allocations put SWA in the bottom layers and FA in
contiguous middle-layer blocks. For an allocation grid ``fa`` (``L x G`` of 0/1,
1 = FA) this module measures:

* **FA fraction per depth third**: layer ``l`` belongs to third
  ``floor(3 * l / L)`` (0 bottom, 1 middle, 2 top; for ``L = 28`` the thirds hold
  10, 9 and 9 layers); the fraction of that third's KV heads that are FA. A
  third with no layer (``L < 3``) has ``None``.
* **FA depth centroid**: the mean depth of the FA KV heads, where layer ``l``
  sits at depth ``(l + 0.5) / L`` (so 0 is the bottom edge, 1 the top edge, and
  an all-FA or evenly spread allocation has centroid 0.5). ``None`` without FA.
* **contiguous FA layer blocks**: a layer is an *FA layer* when at least
  ``block_threshold`` (default 0.5) of its KV heads are FA (at layer
  granularity: exactly the FA layers); blocks are maximal runs of consecutive
  FA layers, as ``[first, last]`` (inclusive).
* **overlap** of two allocations of one model, KV head by KV head: shared FA
  heads, Jaccard index of the FA sets, agreement (share of KV heads with the
  same decision), and the shared FA heads expected by chance (two uniformly
  random allocations with these FA counts share ``fa_a * fa_b / units``).

A *ranking* (`megatron_consa.unit_scores.UnitScores`: calibration attention
mass or the ablation loss increase) is compared with an allocation through
:func:`ranking_allocation`: its top units at the allocation's own budget and
granularity (the `heuristic` preset's rule), so the overlap is "top-K vs top-K".
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional, Sequence

from megatron_consa.allocation import Allocation, make_preset
from megatron_consa.unit_scores import UnitScores

Grid = Sequence[Sequence[int]]

DEFAULT_BLOCK_THRESHOLD = 0.5
"""Share of a layer's KV heads that must be FA for the layer to count in an FA block."""


def depth_third(layer: int, num_layers: int) -> int:
    """0 (bottom), 1 (middle) or 2 (top): ``floor(3 * layer / num_layers)``."""
    return (3 * layer) // num_layers


def layer_depth(layer: int, num_layers: int) -> float:
    """The depth of a layer's centre in [0, 1]: ``(layer + 0.5) / num_layers``."""
    return (layer + 0.5) / num_layers


def _check_grid(fa: Grid) -> tuple[int, int]:
    if not fa or not fa[0]:
        raise ValueError("allocation grid is empty: expected L x G of 0/1")
    num_kv_heads = len(fa[0])
    for l, row in enumerate(fa):
        if len(row) != num_kv_heads or any(v not in (0, 1) for v in row):
            raise ValueError(f"allocation grid row {l} is {list(row)}; every row needs {num_kv_heads} values of 0/1")
    return len(fa), num_kv_heads


def fa_layer_blocks(fa: Grid, *, block_threshold: float = DEFAULT_BLOCK_THRESHOLD) -> list[tuple[int, int]]:
    """Maximal runs of consecutive FA layers (FA share >= `block_threshold`) as (first, last), inclusive."""
    _, num_kv_heads = _check_grid(fa)
    blocks: list[tuple[int, int]] = []
    start = None
    for l, row in enumerate(list(fa) + [[0] * num_kv_heads]):  # a sentinel SWA layer closes the last block
        is_fa = sum(row) / num_kv_heads >= block_threshold
        if is_fa and start is None:
            start = l
        elif not is_fa and start is not None:
            blocks.append((start, l - 1))
            start = None
    return blocks


@dataclass(frozen=True)
class AllocationStats:
    """Pattern statistics of one allocation (see the module docstring for each definition)."""

    num_layers: int
    num_kv_heads: int
    fa_kv_heads: int
    """FA KV heads in the whole model."""
    sparsity: float
    """Share of KV heads that are SWA."""
    fa_fraction_by_layer: list[float]
    """FA share of each layer's KV heads, bottom layer first."""
    fa_fraction_by_third: list[Optional[float]]
    """FA share of the KV heads of the bottom, middle and top third (None: an empty third)."""
    fa_depth_centroid: Optional[float]
    """Mean depth (layer l at (l + 0.5) / L) of the FA KV heads; None without FA."""
    block_threshold: float
    """FA share at which a layer counts as an FA layer for the blocks."""
    fa_layer_blocks: list[tuple[int, int]]
    """Maximal runs of consecutive FA layers, (first, last) inclusive."""

    @property
    def num_fa_blocks(self) -> int:
        return len(self.fa_layer_blocks)

    @property
    def fa_block_lengths(self) -> list[int]:
        return [last - first + 1 for first, last in self.fa_layer_blocks]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["fa_layer_blocks"] = [list(b) for b in self.fa_layer_blocks]
        d.update(num_fa_blocks=self.num_fa_blocks, fa_block_lengths=self.fa_block_lengths)
        return d


def allocation_stats(fa: Grid, *, block_threshold: float = DEFAULT_BLOCK_THRESHOLD) -> AllocationStats:
    """The pattern statistics of an ``L x G`` 0/1 grid."""
    if not 0.0 < block_threshold <= 1.0:
        raise ValueError(f"block_threshold={block_threshold}: it must lie in (0, 1]")
    num_layers, num_kv_heads = _check_grid(fa)
    per_layer = [sum(row) for row in fa]
    total = sum(per_layer)
    thirds: list[Optional[float]] = []
    for third in range(3):
        layers = [l for l in range(num_layers) if depth_third(l, num_layers) == third]
        thirds.append(sum(per_layer[l] for l in layers) / (len(layers) * num_kv_heads) if layers else None)
    centroid = (sum(n * layer_depth(l, num_layers) for l, n in enumerate(per_layer)) / total) if total else None
    return AllocationStats(
        num_layers=num_layers,
        num_kv_heads=num_kv_heads,
        fa_kv_heads=total,
        sparsity=1.0 - total / (num_layers * num_kv_heads),
        fa_fraction_by_layer=[n / num_kv_heads for n in per_layer],
        fa_fraction_by_third=thirds,
        fa_depth_centroid=centroid,
        block_threshold=block_threshold,
        fa_layer_blocks=fa_layer_blocks(fa, block_threshold=block_threshold),
    )


@dataclass(frozen=True)
class Overlap:
    """How much two allocations of one model agree, KV head by KV head."""

    units: int
    """KV heads compared (L x G)."""
    fa_a: int
    fa_b: int
    shared_fa: int
    """KV heads FA in both."""
    jaccard: float
    """shared_fa / |FA in either| (1.0 when neither has FA)."""
    agreement: float
    """Share of KV heads with the same decision in both."""
    chance_shared_fa: float
    """Shared FA heads expected between two uniformly random allocations with these FA counts."""

    def to_dict(self) -> dict:
        return asdict(self)


def overlap(a: Grid, b: Grid) -> Overlap:
    """Overlap of two ``L x G`` 0/1 grids of the same shape."""
    shape_a, shape_b = _check_grid(a), _check_grid(b)
    if shape_a != shape_b:
        raise ValueError(f"allocations of different shapes (L, G) {shape_a} and {shape_b} cannot be compared")
    flat_a = [v for row in a for v in row]
    flat_b = [v for row in b for v in row]
    units = len(flat_a)
    shared = sum(x & y for x, y in zip(flat_a, flat_b))
    union = sum(x | y for x, y in zip(flat_a, flat_b))
    fa_a, fa_b = sum(flat_a), sum(flat_b)
    return Overlap(
        units=units, fa_a=fa_a, fa_b=fa_b, shared_fa=shared, jaccard=shared / union if union else 1.0,
        agreement=sum(x == y for x, y in zip(flat_a, flat_b)) / units, chance_shared_fa=fa_a * fa_b / units,
    )


def ranking_allocation(scores: UnitScores, like: Allocation) -> Allocation:
    """The top units of a ranking at `like`'s budget and granularity (the `heuristic` preset's rule).

    Same number of FA KV heads as `like`, so :func:`overlap` compares top-K with top-K.
    """
    scores.check_compatible(like.num_layers, like.num_kv_heads)
    common = dict(num_layers=like.num_layers, num_kv_heads=like.num_kv_heads, granularity=like.granularity,
                  window=like.window, sink_tokens=like.sink_tokens)
    if like.num_fa_kv_heads == 0:
        alloc = make_preset("all_swa", target_sparsity=None, **common)
    else:
        alloc = make_preset("heuristic", target_sparsity=like.achieved_sparsity, calibration_scores=scores.scores,
                            **common)
    alloc.source = f"top units of {scores.kind} scores"
    return alloc


__all__ = [
    "DEFAULT_BLOCK_THRESHOLD",
    "AllocationStats",
    "Overlap",
    "allocation_stats",
    "depth_third",
    "fa_layer_blocks",
    "layer_depth",
    "overlap",
    "ranking_allocation",
]
