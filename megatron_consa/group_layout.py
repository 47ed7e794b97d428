"""Where a fixed layer keeps its KV groups: contiguous by type, balanced over TP ranks (pure).

megatron-core stores a layer's KV groups (each with its query heads, its rows of
the fused QKV projection and its columns of the output projection) in index
order, and tensor parallelism gives rank r the contiguous slice
[r*G/T, (r+1)*G/T) of the G groups. With a fixed allocation that order has two
costs: a mixed layer gathers its heads by type (a copy of q, k and v) before the
two kernels, and a rank may hold every FA group of a layer (all FA work, and all
its KV cache, on one rank).

`kv_group_order` picks another order, once, from the allocation row and the TP
size: position p of the stored order holds the group whose index (the
"canonical" index, the one the allocation file, checkpoints and Hugging Face
use) is `order[p]`; rank r holds positions [r*G/T, (r+1)*G/T). The order
moves as little as it can:

1. balance: the FA groups per rank differ by at most 1 (the ranks that hold
   most FA groups in index order keep the larger share); a rank above its share
   swaps its last FA groups for the last SWA groups of a rank below its share,
   each in the other's place (so a rank of one type becomes two runs);
2. contiguity: a rank whose groups then form more than one run of each type
   puts its FA groups first (stable); a rank with at most one run per type
   keeps its order.

A layer of one type, and any row that is already balanced and contiguous, keeps
the identity order. Permuting groups with their query heads and projection
slices does not change the layer's function; only the place where each group's
weights are stored changes (see `megatron_consa.self_attention`).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

__all__ = ["kv_group_order", "rank_groups", "type_runs", "fa_per_rank", "take_groups", "inverse_order", "stored_orders"]


def _rank_sizes(num_groups: int, tp_size: int) -> int:
    if tp_size < 1 or num_groups % tp_size:
        raise ValueError(f"{num_groups} KV groups do not split evenly over {tp_size} tensor-parallel ranks: choose a "
                         "tensor-model-parallel size that divides num_query_groups")
    return num_groups // tp_size


def rank_groups(order: Sequence[int], tp_size: int, tp_rank: int) -> tuple[int, ...]:
    """The canonical groups TP rank `tp_rank` holds, in its storage order."""
    per_rank = _rank_sizes(len(order), tp_size)
    return tuple(order[tp_rank * per_rank : (tp_rank + 1) * per_rank])


def fa_per_rank(fa_row: Sequence[int], order: Sequence[int], tp_size: int) -> list[int]:
    """How many FA groups each TP rank holds under `order`."""
    return [sum(bool(fa_row[g]) for g in rank_groups(order, tp_size, r)) for r in range(tp_size)]


def type_runs(fa: Sequence[bool]) -> list[tuple[bool, int, int]]:
    """Maximal runs of one type: [(is_fa, start, stop)] covering `fa` in order."""
    runs: list[tuple[bool, int, int]] = []
    for i, f in enumerate(fa):
        f = bool(f)
        if runs and runs[-1][0] == f:
            runs[-1] = (f, runs[-1][1], i + 1)
        else:
            runs.append((f, i, i + 1))
    return runs


def kv_group_order(fa_row: Sequence[int], tp_size: int) -> tuple[int, ...]:
    """The stored order of a fixed layer's KV groups (see the module docstring).

    A pure function of the allocation row and the TP size, so every rank computes
    the same order. Guarantees: a permutation of range(G); per-rank FA counts
    differ by at most 1; on every rank each type is one contiguous run.
    """
    fa = [bool(v) for v in fa_row]
    per_rank = _rank_sizes(len(fa), tp_size)
    slots = [list(range(r * per_rank, (r + 1) * per_rank)) for r in range(tp_size)]
    counts = [sum(fa[g] for g in s) for s in slots]
    base, extra = divmod(sum(fa), tp_size)
    larger = sorted(range(tp_size), key=lambda r: (-counts[r], r))[:extra]
    share = [base + (r in larger) for r in range(tp_size)]
    for donor in range(tp_size):
        for receiver in range(tp_size):
            while counts[donor] > share[donor] and counts[receiver] < share[receiver]:
                i = max(i for i, g in enumerate(slots[donor]) if fa[g])  # its last FA group
                j = max(j for j, g in enumerate(slots[receiver]) if not fa[g])  # the other's last SWA group
                slots[donor][i], slots[receiver][j] = slots[receiver][j], slots[donor][i]
                counts[donor] -= 1
                counts[receiver] += 1
    for s in slots:
        if len(type_runs([fa[g] for g in s])) > 2:
            s.sort(key=lambda g: not fa[g])  # stable: FA first, each type in index order
    return tuple(g for s in slots for g in s)


def stored_orders(allocation: Optional[Sequence[Sequence[int]]], tp_size: int, permute: bool) -> list[list[int]]:
    """Each layer's stored KV-group order in a model built with `allocation` (None: learning mode or
    all FA unreordered) at `tp_size`, with or without `ConsaConfig.permute_kv_groups`: identity where
    nothing moves. What a distributed optimizer's flat state is laid out in (see `checkpoint`)."""
    if allocation is None:
        return []
    return [list(kv_group_order(row, tp_size)) if permute else list(range(len(row))) for row in allocation]


def inverse_order(order: Sequence[int]) -> tuple[int, ...]:
    """The order that undoes `order`: take_groups(take_groups(t, order), inverse_order(order)) == t."""
    inverse = [0] * len(order)
    for position, group in enumerate(order):
        inverse[group] = position
    return tuple(inverse)


def take_groups(t: Tensor, groups: Sequence[int], dim: int, num_groups: int) -> Tensor:
    """The blocks `groups` of `t`, in that order, where `t` holds `num_groups`
    equal blocks along `dim` (a KV group's rows of the fused QKV projection, or its
    columns of the output projection). Returns a new tensor."""
    blocks = t.unflatten(dim, (num_groups, t.size(dim) // num_groups))
    index = torch.tensor(list(groups), dtype=torch.long, device=t.device)
    return blocks.index_select(dim, index).flatten(dim, dim + 1)
