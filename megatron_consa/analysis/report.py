"""An allocation's pattern statistics and its overlap with other allocations or rankings (what
`tools/analyze_allocation.py` prints and writes).

A compared file is an `allocation.json` (two seeds, learned vs a preset) or a
unit-scores file (`megatron_consa.unit_scores`: calibration attention mass or
the ablation ranking), which is compared through its top units at the
analysed allocation's budget (`stats.ranking_allocation`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from megatron_consa.allocation import Allocation, AllocationError
from megatron_consa.analysis.stats import (
    DEFAULT_BLOCK_THRESHOLD,
    AllocationStats,
    Overlap,
    allocation_stats,
    overlap,
    ranking_allocation,
)
from megatron_consa.files import read_json
from megatron_consa.unit_scores import UnitScores, is_unit_scores_file


@dataclass(frozen=True)
class Comparison:
    """One compared file: what it is, the allocation it stands for, and the overlap."""

    name: str
    kind: str
    """`allocation`, or the unit-scores kind (`attention_mass`, `ablation`) of a ranking."""
    allocation: Allocation
    """The file's allocation, or a ranking's top units at the analysed allocation's budget."""
    stats: AllocationStats
    overlap: Overlap

    def to_dict(self) -> dict:
        return {"name": self.name, "kind": self.kind, "fa": self.allocation.fa, "stats": self.stats.to_dict(),
                "overlap": self.overlap.to_dict()}


@dataclass
class AnalysisReport:
    name: str
    allocation: Allocation
    stats: AllocationStats
    comparisons: list[Comparison] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"name": self.name, "source": self.allocation.source, "fa": self.allocation.fa,
                "stats": self.stats.to_dict(), "comparisons": [c.to_dict() for c in self.comparisons]}

    def tables(self) -> str:
        """Two Markdown tables: the pattern statistics of every allocation, and the overlaps."""
        rows = [(self.name, "analysed", self.stats)] + [(c.name, c.kind, c.stats) for c in self.comparisons]
        out = ["| allocation | kind | SWA share | FA bottom / middle / top third | FA depth centroid | "
               f"FA layer blocks (>= {self.stats.block_threshold:g} FA) | blocks (first-last layer) |",
               "|---|---|---:|---:|---:|---:|---|"]
        for name, kind, s in rows:
            thirds = " / ".join("-" if v is None else f"{v:.2f}" for v in s.fa_fraction_by_third)
            centroid = "-" if s.fa_depth_centroid is None else f"{s.fa_depth_centroid:.3f}"
            out.append(f"| {name} | {kind} | {s.sparsity:.3f} | {thirds} | {centroid} | {s.num_fa_blocks} | "
                       f"{', '.join(f'{a}-{b}' for a, b in s.fa_layer_blocks) or '-'} |")
        if self.comparisons:
            out += ["", f"| {self.name} vs | shared FA heads | Jaccard | agreement | shared by chance |",
                    "|---|---:|---:|---:|---:|"]
            for c in self.comparisons:
                o = c.overlap
                out.append(f"| {c.name} | {o.shared_fa} of {o.fa_a} / {o.fa_b} | {o.jaccard:.3f} | {o.agreement:.3f} | "
                           f"{o.chance_shared_fa:.1f} |")
        return "\n".join(out)


def load_compared(path: str | Path, like: Allocation) -> tuple[str, Allocation]:
    """(kind, allocation) of a compared file: an allocation.json, or a ranking's top units at `like`'s budget."""
    d = read_json(path, what="file", error=AllocationError)
    if is_unit_scores_file(d):
        scores = UnitScores.from_dict(d, where=str(path))
        return scores.kind, ranking_allocation(scores, like)
    alloc = Allocation.from_dict(d, where=str(path))
    alloc.check_compatible(like.num_layers, like.num_kv_heads)
    return "allocation", alloc


def analyze(path: str | Path, compare: Optional[list[str | Path]] = None, *,
            block_threshold: float = DEFAULT_BLOCK_THRESHOLD, allocation: Optional[Allocation] = None,
            compared: Optional[list[tuple[str, Allocation]]] = None) -> AnalysisReport:
    """The report of the allocation at `path` and its overlap with each file in `compare`. `allocation`
    and `compared` (each file's `load_compared`, in `compare`'s order): what a caller loaded already."""
    allocation = allocation if allocation is not None else Allocation.load(path)
    report = AnalysisReport(name=str(path), allocation=allocation,
                            stats=allocation_stats(allocation.fa, block_threshold=block_threshold))
    compare = list(compare or [])
    compared = compared if compared is not None else [load_compared(other, allocation) for other in compare]
    for other, (kind, alloc) in zip(compare, compared, strict=True):
        report.comparisons.append(Comparison(
            name=str(other), kind=kind, allocation=alloc,
            stats=allocation_stats(alloc.fa, block_threshold=block_threshold), overlap=overlap(allocation.fa, alloc.fa),
        ))
    return report


__all__ = ["AnalysisReport", "Comparison", "analyze", "load_compared"]
