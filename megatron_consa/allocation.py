"""FA/SWA allocations: the ``allocation.json`` file, finalize, and rule-based presets.

An *allocation* says, for every layer ``l`` and KV head ``g`` of a model with
``L`` layers and ``G`` KV heads (``num_query_groups``) per layer, whether that KV
head keeps full attention (FA, ``fa[l][g] == 1``) or becomes sliding-window
attention (SWA, ``fa[l][g] == 0``). It is the interchange between training,
finalize, conversion, analysis and inference. This module is pure Python +
torch: no megatron-core, no distributed code.

Units and cost
--------------
* granularity ``layer``: one unit per layer, cost ``G``; every row of ``fa`` is
  all 0 or all 1.
* granularity ``kv_head``: one unit per (layer, KV head), cost 1.
* sparsity = fraction of the ``L * G`` KV-head cost that is SWA. Both
  granularities speak the same budget.
* units are ordered layer-major: unit index ``l`` (layer) or ``l * G + g``
  (kv_head). Ties are always broken by the lower unit index.

Budget rounding
---------------
For a target sparsity ``t`` the number of FA units is (see :func:`fa_unit_budget`)::

    K = floor((1 - t) * num_units + 0.5 + 1e-9)     # round half up

with ``num_units = total_cost / unit_cost`` (``L`` for ``layer``, ``L * G`` for
``kv_head``). Half-up, not Python's half-even ``round()``, so the rule is the
same everywhere and easy to state; the ``1e-9`` nudge makes decimal halves that
float arithmetic lands just below ``.5`` (``(1 - 0.9) * 5``) round as they do in
exact arithmetic. :func:`finalize_topk` and every budget preset use this ``K``.

File format (``format_version`` 1)
----------------------------------
JSON object; ``fa`` and ``log_alpha`` are written one row per line::

    {
      "format_version": 1,
      "granularity": "kv_head",
      "num_layers": 4,
      "num_kv_heads": 2,
      "window": 1024,
      "sink_tokens": 0,
      "target_sparsity": 0.5,
      "achieved_sparsity": 0.5,
      "source": "consa",
      "fa": [
        [0, 0],
        [1, 1],
        [1, 0],
        [0, 1]
      ],
      "log_alpha": [
        [-2.1, -1.7],
        [3.0, 2.9],
        [0.4, -0.2],
        [-0.9, 1.2]
      ],
      "metadata": {}
    }

Required keys: ``format_version``, ``granularity``, ``num_layers``,
``num_kv_heads``, ``window``, ``sink_tokens``, ``target_sparsity`` (may be
``null``), ``fa``. Optional: ``achieved_sparsity`` (always written; checked
against ``fa`` when present), ``log_alpha`` (``L x G``; at layer granularity each
row repeats the layer's gate), ``source`` (``consa`` or the preset name that
made it, e.g. ``interleave:6``), ``metadata`` (free JSON object). Unknown keys
are rejected: put extra information in ``metadata``.

Presets
-------
Every budget preset is a *priority order* over units; the allocation is the
first ``K`` units of that order, so it meets the target exactly (same ``K`` as
finalize). Presets that are layer rules, used at ``kv_head`` granularity, take
whole layers in priority order and, if ``K`` is not a multiple of ``G``, the
first ``K mod G`` heads (lowest head index first) of the next layer in the
order. ``all_fa`` / ``all_swa`` are fixed patterns: they accept
``target_sparsity=None`` or a target whose budget they meet, and raise
otherwise. See :func:`list_presets`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

import torch

from megatron_consa.config import GRANULARITIES
from megatron_consa.files import json_round_trip_problem, read_json, write_text_atomic
from megatron_consa.gates import fa_budget, rank_units

if TYPE_CHECKING:
    from megatron_consa.unit_scores import UnitScores

logger = logging.getLogger(__name__)

ALLOCATION_FORMAT_VERSION = 1
SUPPORTED_FORMAT_VERSIONS = (1,)


_SPARSITY_ATOL = 1e-9

_REQUIRED_KEYS = (
    "format_version",
    "granularity",
    "num_layers",
    "num_kv_heads",
    "window",
    "sink_tokens",
    "target_sparsity",
    "fa",
)
_OPTIONAL_KEYS = ("achieved_sparsity", "log_alpha", "source", "metadata")

Grid = list[list[int]]


class AllocationError(ValueError):
    """An invalid allocation, preset request or file. Messages name the field and the fix."""


# --------------------------------------------------------------------------- budget


def num_units(granularity: str, num_layers: int, num_kv_heads: int) -> int:
    """Number of allocation units: ``L`` (layer) or ``L * G`` (kv_head)."""
    _check_granularity(granularity, "granularity")
    return num_layers if granularity == "layer" else num_layers * num_kv_heads


def fa_unit_budget(total_units: int, target_sparsity: float) -> int:
    """FA units for a target: ``floor((1 - t) * total_units + 0.5 + 1e-9)`` (round half up)."""
    _check_target(target_sparsity, "fa_unit_budget")
    return fa_budget(float(target_sparsity), total_units, 1)


def _check_granularity(granularity: Any, where: str) -> None:
    if granularity not in GRANULARITIES:
        raise AllocationError(
            f"{where}: granularity is {granularity!r}; use one of {', '.join(GRANULARITIES)}"
        )


def _check_target(t: Any, where: str) -> None:
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not (0.0 <= t < 1.0):
        raise AllocationError(
            f"{where}: target_sparsity is {t!r}; it must be a number in [0, 1) "
            "(fraction of KV heads that become sliding-window)"
        )


# --------------------------------------------------------------------------- units <-> grid


def _grid_from_units(fa_units: Iterable[int], granularity: str, num_layers: int, num_kv_heads: int) -> Grid:
    """Build an L x G 0/1 grid from the set of FA unit indices."""
    grid = [[0] * num_kv_heads for _ in range(num_layers)]
    for u in fa_units:
        if granularity == "layer":
            grid[u] = [1] * num_kv_heads
        else:
            grid[u // num_kv_heads][u % num_kv_heads] = 1
    return grid


def _take_units(order: Sequence[int], k: int, granularity: str, num_layers: int, num_kv_heads: int) -> Grid:
    """First ``k`` units of a priority order (unit indices at ``granularity``) as a grid."""
    n = num_units(granularity, num_layers, num_kv_heads)
    if sorted(order) != list(range(n)):
        raise AssertionError(f"priority order is not a permutation of {n} units")
    return _grid_from_units(order[:k], granularity, num_layers, num_kv_heads)


def _expand_layer_order(layer_order: Sequence[int], granularity: str, num_kv_heads: int) -> list[int]:
    """A layer priority order as a unit order: whole layers, heads lowest index first."""
    if granularity == "layer":
        return list(layer_order)
    return [l * num_kv_heads + g for l in layer_order for g in range(num_kv_heads)]


def _order_by_score(scores: Sequence[float]) -> list[int]:
    """Unit indices by descending score, ties by lower index."""
    return rank_units(scores)


# --------------------------------------------------------------------------- finalize


def _unit_scores(values: Any, granularity: str, num_layers: int | None, num_kv_heads: int, what: str) -> tuple[list[float], int]:
    """Flatten per-unit scores (log_alpha, calibration scores) to one float per unit.

    ``layer``: accepts ``[L]``, ``[L, 1]`` or ``[L, G]`` with constant rows.
    ``kv_head``: accepts ``[L, G]``. Returns (scores, L).
    """
    t = torch.as_tensor(values, dtype=torch.float64).detach().cpu()
    if not bool(torch.isfinite(t).all()):
        raise AllocationError(f"{what} contains NaN or inf; every unit needs a finite value")
    if t.dim() == 1 and granularity == "layer":
        t = t.unsqueeze(1)
    if t.dim() != 2 or t.shape[0] < 1:
        raise AllocationError(
            f"{what} has shape {tuple(t.shape)}; expected [L, {num_kv_heads}]"
            + (" or [L] / [L, 1] at layer granularity" if granularity == "layer" else "")
        )
    if num_layers is not None and t.shape[0] != num_layers:
        raise AllocationError(f"{what} has {t.shape[0]} rows but num_layers is {num_layers}")
    if granularity == "kv_head":
        if t.shape[1] != num_kv_heads:
            raise AllocationError(
                f"{what} has {t.shape[1]} columns but num_kv_heads is {num_kv_heads}; "
                "kv_head granularity needs one value per (layer, KV head)"
            )
        return t.reshape(-1).tolist(), t.shape[0]
    if t.shape[1] not in (1, num_kv_heads):
        raise AllocationError(f"{what} has {t.shape[1]} columns; expected 1 or num_kv_heads={num_kv_heads}")
    if not bool((t == t[:, :1]).all()):
        raise AllocationError(
            f"{what} varies across KV heads within a layer; at layer granularity pass [L] or [L, 1] "
            "(or reduce per layer yourself, e.g. sum over heads)"
        )
    return t[:, 0].tolist(), t.shape[0]


def finalize_topk(log_alpha: Any, *, target_sparsity: float, granularity: str, num_kv_heads: int) -> Grid:
    """Binarize gates so the budget holds exactly.

    ``log_alpha``: ``[L, G]`` at ``kv_head`` granularity; ``[L]``, ``[L, 1]`` (or
    ``[L, G]`` with constant rows) at ``layer`` granularity. The
    ``K = fa_unit_budget(num_units, target_sparsity)`` units with the largest
    ``log_alpha`` become FA (ties: lower unit index, layer-major), the rest SWA.
    ``K = floor((1 - t) * num_units + 0.5 + 1e-9)`` - round half up.
    Returns an ``L x G`` list of 0/1 ints.
    """
    _check_granularity(granularity, "finalize_topk")
    _check_positive_int(num_kv_heads, "num_kv_heads", "finalize_topk")
    scores, num_layers = _unit_scores(log_alpha, granularity, None, num_kv_heads, "log_alpha")
    k = fa_unit_budget(len(scores), target_sparsity)
    return _take_units(_order_by_score(scores), k, granularity, num_layers, num_kv_heads)


# --------------------------------------------------------------------------- Allocation


def _check_positive_int(value: Any, name: str, where: str, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise AllocationError(f"{where}: field '{name}' is {value!r}; it must be an integer >= {minimum}")


def _check_grid_shape(grid: Any, name: str, where: str, num_layers: int, num_kv_heads: int) -> None:
    if not isinstance(grid, (list, tuple)):
        raise AllocationError(f"{where}: field '{name}' must be a list of {num_layers} rows, got {type(grid).__name__}")
    if len(grid) != num_layers:
        raise AllocationError(
            f"{where}: field '{name}' has {len(grid)} rows but num_layers is {num_layers}: "
            "write one row per layer"
        )
    for l, row in enumerate(grid):
        if not isinstance(row, (list, tuple)) or len(row) != num_kv_heads:
            got = len(row) if isinstance(row, (list, tuple)) else type(row).__name__
            raise AllocationError(
                f"{where}: field '{name}' row {l} has {got} columns but num_kv_heads is {num_kv_heads}: "
                "write one entry per KV head"
            )


@dataclass
class Allocation:
    """A binary FA/SWA allocation (see the module docstring for the file format)."""

    granularity: str
    num_layers: int
    num_kv_heads: int
    window: int
    sink_tokens: int
    target_sparsity: float | None
    fa: Grid
    log_alpha: list[list[float]] | None = None
    source: str = "consa"
    format_version: int = ALLOCATION_FORMAT_VERSION
    metadata: dict = field(default_factory=dict)

    # ----------------------------------------------------------------- derived

    @property
    def num_fa_kv_heads(self) -> int:
        return sum(sum(row) for row in self.fa)

    @property
    def achieved_sparsity(self) -> float:
        """Fraction of the ``L * G`` KV heads that are SWA, computed from ``fa``."""
        return 1.0 - self.num_fa_kv_heads / (self.num_layers * self.num_kv_heads)

    # ----------------------------------------------------------------- validation

    def validate(self, where: str = "allocation") -> "Allocation":
        """Check every field; raise :class:`AllocationError` naming the field. Returns self."""
        fv = self.format_version
        if isinstance(fv, bool) or not isinstance(fv, int) or fv not in SUPPORTED_FORMAT_VERSIONS:
            raise AllocationError(
                f"{where}: field 'format_version' is {self.format_version!r}; this version of "
                f"megatron_consa reads {list(SUPPORTED_FORMAT_VERSIONS)}: upgrade megatron_consa or "
                "re-export the allocation"
            )
        if self.granularity not in GRANULARITIES:
            raise AllocationError(
                f"{where}: field 'granularity' is {self.granularity!r}; use one of {', '.join(GRANULARITIES)}"
            )
        _check_positive_int(self.num_layers, "num_layers", where)
        _check_positive_int(self.num_kv_heads, "num_kv_heads", where)
        _check_positive_int(self.window, "window", where)
        _check_positive_int(self.sink_tokens, "sink_tokens", where, minimum=0)
        if self.target_sparsity is not None:
            t = self.target_sparsity
            if isinstance(t, bool) or not isinstance(t, (int, float)) or not (0.0 <= t < 1.0):
                raise AllocationError(
                    f"{where}: field 'target_sparsity' is {t!r}; it must be null or a number in [0, 1)"
                )
        if not isinstance(self.source, str) or not self.source:
            raise AllocationError(f"{where}: field 'source' must be a non-empty string, got {self.source!r}")
        if not isinstance(self.metadata, dict):
            raise AllocationError(f"{where}: field 'metadata' must be a JSON object (dict), got {type(self.metadata).__name__}")
        problem = json_round_trip_problem(self.metadata)
        if problem:
            raise AllocationError(f"{where}: field 'metadata' {problem}; store plain JSON values")
        self._validate_fa(where)
        self._validate_log_alpha(where)
        return self

    def _validate_fa(self, where: str) -> None:
        _check_grid_shape(self.fa, "fa", where, self.num_layers, self.num_kv_heads)
        for l, row in enumerate(self.fa):
            for g, v in enumerate(row):
                if isinstance(v, bool) or not isinstance(v, int) or v not in (0, 1):
                    raise AllocationError(
                        f"{where}: field 'fa' [{l}][{g}] is {v!r}; entries must be the integers 0 (SWA) "
                        "or 1 (FA), e.g. tensor.int().tolist()"
                    )
            if self.granularity == "layer" and len(set(row)) > 1:
                raise AllocationError(
                    f"{where}: field 'fa' row {l} is {list(row)} (mixed FA/SWA) but granularity is 'layer': "
                    "make the row all 0 or all 1, or use granularity 'kv_head'"
                )

    def _validate_log_alpha(self, where: str) -> None:
        if self.log_alpha is None:
            return
        _check_grid_shape(self.log_alpha, "log_alpha", where, self.num_layers, self.num_kv_heads)
        for l, row in enumerate(self.log_alpha):
            for g, v in enumerate(row):
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                    raise AllocationError(
                        f"{where}: field 'log_alpha' [{l}][{g}] is {v!r}; entries must be finite numbers"
                    )
            if self.granularity == "layer" and len(set(row)) > 1:
                raise AllocationError(
                    f"{where}: field 'log_alpha' row {l} is {list(row)} but granularity is 'layer': a layer has "
                    "one gate, repeated over its KV heads; repeat the layer's value in every column, or use "
                    "granularity 'kv_head'"
                )

    # ----------------------------------------------------------------- dict / file

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (validates first)."""
        self.validate()
        return {
            "format_version": self.format_version,
            "granularity": self.granularity,
            "num_layers": self.num_layers,
            "num_kv_heads": self.num_kv_heads,
            "window": self.window,
            "sink_tokens": self.sink_tokens,
            "target_sparsity": None if self.target_sparsity is None else float(self.target_sparsity),
            "achieved_sparsity": self.achieved_sparsity,
            "source": self.source,
            "fa": [list(row) for row in self.fa],
            "log_alpha": None if self.log_alpha is None else [[float(v) for v in row] for row in self.log_alpha],
            "metadata": dict(self.metadata),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "allocation") -> "Allocation":
        """Build and validate from a dict as written by :meth:`to_dict`."""
        if not isinstance(d, Mapping):
            raise AllocationError(f"{where}: expected a JSON object, got {type(d).__name__}")
        version = d.get("format_version")
        if "format_version" in d and (
            isinstance(version, bool) or not isinstance(version, int) or version not in SUPPORTED_FORMAT_VERSIONS
        ):
            raise AllocationError(
                f"{where}: field 'format_version' is {version!r}; this version of megatron_consa reads "
                f"{list(SUPPORTED_FORMAT_VERSIONS)}: upgrade megatron_consa or re-export the allocation"
            )
        missing = [k for k in _REQUIRED_KEYS if k not in d]
        if missing:
            raise AllocationError(
                f"{where}: missing field(s) {', '.join(repr(k) for k in missing)}; required fields are "
                f"{', '.join(_REQUIRED_KEYS)} (target_sparsity may be null)"
            )
        unknown = sorted(set(d) - set(_REQUIRED_KEYS) - set(_OPTIONAL_KEYS))
        if unknown:
            raise AllocationError(
                f"{where}: unknown field(s) {', '.join(repr(k) for k in unknown)}; "
                "put extra information under 'metadata'"
            )
        alloc = cls(
            granularity=d["granularity"],
            num_layers=d["num_layers"],
            num_kv_heads=d["num_kv_heads"],
            window=d["window"],
            sink_tokens=d["sink_tokens"],
            target_sparsity=d["target_sparsity"],
            fa=d["fa"],
            log_alpha=d.get("log_alpha"),
            source=d.get("source", "consa"),
            format_version=d["format_version"],
            metadata=d.get("metadata") if d.get("metadata") is not None else {},
        )
        alloc.validate(where)
        alloc.fa = [list(row) for row in alloc.fa]
        if alloc.log_alpha is not None:
            alloc.log_alpha = [[float(v) for v in row] for row in alloc.log_alpha]
        claimed = d.get("achieved_sparsity")
        if claimed is not None:
            if (
                isinstance(claimed, bool)
                or not isinstance(claimed, (int, float))
                or not abs(claimed - alloc.achieved_sparsity) <= _SPARSITY_ATOL  # NaN fails too
            ):
                raise AllocationError(
                    f"{where}: field 'achieved_sparsity' is {claimed!r} but 'fa' has "
                    f"{alloc.num_fa_kv_heads} of {alloc.num_layers * alloc.num_kv_heads} KV heads FA "
                    f"(sparsity {alloc.achieved_sparsity!r}): fix 'fa' or drop 'achieved_sparsity'"
                )
        return alloc

    def to_json(self) -> str:
        """Pretty JSON text: two-space indent, ``fa`` / ``log_alpha`` one row per line."""
        d = self.to_dict()
        lines = []
        for key, value in d.items():
            if key in ("fa", "log_alpha") and value is not None:
                rows = ",\n".join("    " + json.dumps(row, allow_nan=False) for row in value)
                text = "[\n" + rows + "\n  ]"
            else:
                text = json.dumps(value, indent=2, allow_nan=False).replace("\n", "\n  ")
            lines.append(f"  {json.dumps(key)}: {text}")
        return "{\n" + ",\n".join(lines) + "\n}\n"

    def save(self, path: str | os.PathLike) -> None:
        """Write atomically: temp file in the same directory, fsync, ``os.replace``."""
        write_text_atomic(path, self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Allocation":
        """Read and validate a file; errors name the path."""
        path = os.fspath(path)
        d = read_json(path, what="allocation file", error=AllocationError,
                      hint="; regenerate it with tools/finalize_allocation or fix the syntax")
        return cls.from_dict(d, where=path)

    # ----------------------------------------------------------------- construction

    @classmethod
    def from_log_alpha(
        cls,
        log_alpha: Any,
        *,
        target_sparsity: float,
        granularity: str,
        num_kv_heads: int,
        window: int,
        sink_tokens: int = 0,
        source: str = "consa",
        metadata: dict | None = None,
        settle: Any = None,
        margin: float = 0.0,
    ) -> "Allocation":
        """Finalize learned gates (:func:`finalize_topk`); keep ``log_alpha`` (as ``L x G``) in the file.

        Refuses, naming the reason and the fix,

        * a target the granularity cannot meet exactly ((1 - t) x units is not whole);
        * ``settle``, the run's :class:`~megatron_consa.controller.SettleReport`, when it
          says the run did not settle: top-k always meets the budget and would hide it,

        and says so (a warning, and ``metadata["undecided_units"]``) when the last FA
        unit's log_alpha lies within ``margin`` of the first SWA unit's: the choice
        among the units near that boundary is made by differences below the margin
        (exact ties by unit index), not a learned preference (units the LM loss is
        indifferent to often share one log_alpha). The budget holds.
        ``metadata["boundary_margin"]`` records the gap in every case.
        """
        _check_granularity(granularity, "finalize")
        _check_target(target_sparsity, "finalize")
        scores, num_layers = _unit_scores(log_alpha, granularity, None, num_kv_heads, "log_alpha")
        n = len(scores)
        exact = (1.0 - float(target_sparsity)) * n
        if abs(exact - round(exact)) > 1e-6:
            lo, hi = math.floor(exact), math.ceil(exact)
            nearest = [f"{1 - k / n:.6g}" for k in (hi, lo) if 0 < k <= n]
            raise AllocationError(
                f"finalize: target_sparsity={target_sparsity} is not representable at granularity "
                f"'{granularity}' with {n} units ((1 - t) x {n} = {exact:.4g} FA units); the nearest "
                f"representable targets are {' and '.join(nearest)}"
            )
        meta = dict(metadata or {})
        if settle is not None:
            if not settle.settled:
                raise AllocationError(f"finalize: {settle.describe()}; top-k would hide that")
            meta.update(
                settle_max_gap=float(settle.max_gap),
                settle_tail=[int(settle.first_iteration), int(settle.last_iteration)],  # (as the log counts them)
            )
        order = _order_by_score(scores)
        k = fa_unit_budget(n, target_sparsity)
        if 0 < k < n:
            boundary = scores[order[k - 1]] - scores[order[k]]
            meta["boundary_margin"] = float(boundary)
            if boundary < margin:
                # An FA unit within `margin` of the best SWA unit, and an SWA unit within `margin` of the
                # last FA unit, could have gone either way: name them, so the user sees which part of the
                # allocation is not a learned choice.
                lo, hi = scores[order[k]], scores[order[k - 1]]
                undecided = ([u for u in order[:k] if scores[u] - lo < margin]
                             + [u for u in order[k:] if hi - scores[u] < margin])
                names = [
                    [u, 0] if granularity == "layer" else [u // num_kv_heads, u % num_kv_heads] for u in undecided
                ]
                meta["undecided_units"] = names
                logger.warning(
                    "finalize: too close to call: the last FA unit (log_alpha %.4f) and the first SWA unit "
                    "(%.4f) differ by less than margin=%s; %d units [layer, head] ([layer, 0]: a layer) within the margin "
                    "of the other side (%s) were ranked by differences below the margin (exact ties by unit index), not "
                    "by a learned preference. The budget holds; train longer if the choice among them matters",
                    hi, lo, margin, len(undecided), names,
                )
        fa = _take_units(order, k, granularity, num_layers, num_kv_heads)
        if granularity == "layer":
            la = [[scores[l]] * num_kv_heads for l in range(num_layers)]
        else:
            la = [scores[l * num_kv_heads:(l + 1) * num_kv_heads] for l in range(num_layers)]
        return cls(
            granularity=granularity,
            num_layers=num_layers,
            num_kv_heads=num_kv_heads,
            window=window,
            sink_tokens=sink_tokens,
            target_sparsity=float(target_sparsity),
            fa=fa,
            log_alpha=la,
            source=source,
            metadata=meta,
        ).validate()

    # ----------------------------------------------------------------- queries

    def fa_tensor(self, dtype: torch.dtype = torch.bool) -> torch.Tensor:
        """``[L, G]`` tensor, 1/True = FA."""
        return torch.tensor(self.fa, dtype=torch.int64).to(dtype)

    def layer_fa(self, layer_index: int) -> list[int]:
        """The 0/1 row of one layer (global layer index, 0-based)."""
        if not 0 <= layer_index < self.num_layers:
            raise AllocationError(f"layer_index {layer_index} is out of range for num_layers={self.num_layers}")
        return list(self.fa[layer_index])

    def check_compatible(
        self,
        num_layers: int,
        num_kv_heads: int,
        granularity: str | None = None,
        window: int | None = None,
    ) -> None:
        """Raise :class:`AllocationError` naming the first field that does not match the model/config."""
        checks = [("num_layers", self.num_layers, num_layers), ("num_kv_heads", self.num_kv_heads, num_kv_heads)]
        if granularity is not None:
            checks.append(("granularity", self.granularity, granularity))
        if window is not None:
            checks.append(("window", self.window, window))
        for name, mine, theirs in checks:
            if mine != theirs:
                raise AllocationError(
                    f"allocation field '{name}' is {mine!r} but the model/config has {name}={theirs!r}: "
                    "use an allocation made for this model, or regenerate it"
                )

    def kv_cache_tokens(self, seq_len: int) -> int:
        """KV tokens cached, summed over KV heads, after ``seq_len`` tokens.

        FA head: ``seq_len``; SWA head: ``min(seq_len, window + sink_tokens)``.
        Multiply by ``2 * head_dim * bytes`` (K and V) for bytes per layer stack.
        """
        _check_positive_int(seq_len, "seq_len", "kv_cache_tokens", minimum=0)
        n_fa = self.num_fa_kv_heads
        n_swa = self.num_layers * self.num_kv_heads - n_fa
        return n_fa * seq_len + n_swa * min(seq_len, self.window + self.sink_tokens)

    def summary(self) -> str:
        """Text grid, one line per layer: ``F`` = FA head, ``.`` = SWA head."""
        total = self.num_layers * self.num_kv_heads
        target = "none" if self.target_sparsity is None else f"{self.target_sparsity:.4f}"
        out = [
            f"allocation ({self.source}): granularity={self.granularity} layers={self.num_layers} "
            f"kv_heads={self.num_kv_heads} window={self.window} sinks={self.sink_tokens}",
            f"sparsity: target {target}, achieved {self.achieved_sparsity:.4f} "
            f"({total - self.num_fa_kv_heads}/{total} KV heads SWA)",
        ]
        width = len(str(self.num_layers - 1))
        for l, row in enumerate(self.fa):
            grid = "".join("F" if v else "." for v in row)
            out.append(f"layer {l:>{width}}  {grid}  {sum(row)}/{self.num_kv_heads} FA")
        return "\n".join(out)


def heads_by_type(fa_row: Sequence[int | bool], heads_per_group: int) -> tuple[list[int], list[int], list[int], list[int]]:
    """(FA KV groups, their query heads, SWA KV groups, their query heads) of one layer row.

    GQA convention (megatron and Hugging Face): query head ``h`` reads KV group
    ``h // heads_per_group``, so group ``g`` owns query heads
    ``g * heads_per_group .. (g + 1) * heads_per_group - 1``.
    """
    out: list[list[int]] = []
    for is_fa in (True, False):
        groups = [g for g, f in enumerate(fa_row) if bool(f) == is_fa]
        out += [groups, [g * heads_per_group + r for g in groups for r in range(heads_per_group)]]
    return out[0], out[1], out[2], out[3]


# --------------------------------------------------------------------------- presets

_PRESETS: dict[str, str] = {
    "all_fa": "every KV head full attention (sparsity 0); target must be None or one it meets",
    "all_swa": "every KV head sliding-window (sparsity 1); target must be None or one it meets",
    "interleave:K": "Gemma style: layers K-1, 2K-1, ... FA first, then the others spread evenly",
    "top_swa": "Qwen max_window_layers: bottom layers FA, top layers SWA",
    "bottom_swa": "bottom layers SWA, top layers FA",
    "uniform_heads": "the same number of FA heads in every layer, one more in evenly spaced layers where the budget "
                     "does not divide (kv_head); evenly spaced FA layers, the top one among them (layer)",
    "random:SEED": "uniformly random set of FA units, reproducible from SEED (integer >= 0)",
    "heuristic": "units with the most attention mass beyond the window (calibration_scores [L, G]) are FA",
}


def list_presets() -> dict[str, str]:
    """Preset names (``K`` / ``SEED`` are arguments) with a one-line description each."""
    return dict(_PRESETS)


def _spread_order(num_layers: int, first: Sequence[int] = ()) -> list[int]:
    """Layers in an evenly spreading priority order.

    ``first`` layers come first, themselves in spreading order; then the rest.
    Greedy max-min spacing: repeatedly take the candidate farthest from every
    layer already taken and from a virtual FA layer at -1 (so the top layer
    goes first, like the last layer of a Gemma group); ties go to the lower
    layer. Nested: every prefix is as spread as the greedy rule allows.
    """
    taken: list[int] = []
    anchors = [-1]
    first_set = set(first)
    for pool in (list(first), [l for l in range(num_layers) if l not in first_set]):
        remaining = list(pool)
        while remaining:
            best = max(remaining, key=lambda c: (min(abs(c - a) for a in anchors), -c))
            remaining.remove(best)
            taken.append(best)
            anchors.append(best)
    return taken


def _evenly_spaced(num_layers: int, k: int) -> list[int]:
    """k of the layers evenly spaced, the top one first: L-1 - floor(i L / k) for i < k (every 4th layer
    from the top at k = L/4, whatever L); [] at k = 0."""
    return [num_layers - 1 - (i * num_layers) // k for i in range(k)]


def _uniform_order(num_layers: int, num_kv_heads: int, granularity: str, budget: int) -> list[int]:
    """`uniform_heads`' priority order for `budget` FA units: layer granularity, `budget` evenly spaced layers
    first; KV heads, `budget // L` heads in every layer and one more in `budget % L` evenly spaced layers."""
    if granularity == "layer":
        first = _evenly_spaced(num_layers, budget)
        taken = set(first)
        return first + [l for l in range(num_layers) if l not in taken]
    per_layer, extra = divmod(budget, num_layers)
    order = [l * num_kv_heads + g for g in range(min(per_layer, num_kv_heads)) for l in range(num_layers)]
    if per_layer < num_kv_heads:
        order += [l * num_kv_heads + per_layer for l in _evenly_spaced(num_layers, extra)]
    taken = set(order)
    return order + [u for u in range(num_layers * num_kv_heads) if u not in taken]


def _parse_preset(name: Any) -> tuple[str, int | None]:
    def bad(why: str) -> AllocationError:
        valid = ", ".join(_PRESETS)
        return AllocationError(f"preset {name!r}: {why}; valid presets: {valid}")

    if not isinstance(name, str):
        raise bad("preset name must be a string")
    base, sep, arg = name.partition(":")
    key = base + (":K" if base == "interleave" else ":SEED" if base == "random" else "")
    if key not in _PRESETS:
        if os.path.isdir(name):  # (finalize's --save, say)
            inside = os.path.join(name, "allocation.json")
            raise AllocationError(f"{name!r}: a directory, not an allocation file or a preset: " + (
                f"give {inside} (finalize's allocation)" if os.path.isfile(inside) else
                "give an allocation.json file or a preset name"))
        raise bad("unknown preset")
    if key == base:
        if sep:
            raise bad(f"preset '{base}' takes no argument")
        return base, None
    if not sep or re.fullmatch(r"[0-9]+", arg.strip()) is None:
        raise bad(f"'{key}' needs an integer argument, e.g. '{base}:{6 if base == 'interleave' else 1234}'")
    value = int(arg)
    if base == "interleave" and value < 1:
        raise bad("interleave:K needs K >= 1 (one FA layer per K layers)")
    return base, value


def _layer_rule_order(base: str, arg: int | None, num_layers: int) -> list[int]:
    if base == "interleave":
        pattern = [l for l in range(num_layers) if (l + 1) % arg == 0]
        return _spread_order(num_layers, first=pattern)
    if base == "top_swa":
        return list(range(num_layers))
    if base == "bottom_swa":
        return list(range(num_layers - 1, -1, -1))
    raise AssertionError(base)


def _preset_order(
    base: str, arg: int | None, granularity: str, num_layers: int, num_kv_heads: int, calibration_scores: Any,
    budget: int,
) -> list[int]:
    """Priority order over units (unit indices at ``granularity``); `budget`: the FA units to be taken."""
    n = num_units(granularity, num_layers, num_kv_heads)
    if base in ("interleave", "top_swa", "bottom_swa"):
        return _expand_layer_order(_layer_rule_order(base, arg, num_layers), granularity, num_kv_heads)
    if base == "uniform_heads":
        return _uniform_order(num_layers, num_kv_heads, granularity, budget)
    if base == "random":
        order = list(range(n))
        random.Random(arg).shuffle(order)
        return order
    if base == "heuristic":
        if calibration_scores is None:
            raise AllocationError(
                "preset 'heuristic': calibration_scores is missing; pass [L, G] attention mass beyond "
                "the window per KV head (larger = needs FA more)"
            )
        t = torch.as_tensor(calibration_scores, dtype=torch.float64)
        if tuple(t.shape) != (num_layers, num_kv_heads):
            raise AllocationError(
                f"preset 'heuristic': calibration_scores has shape {tuple(t.shape)}; expected "
                f"[num_layers, num_kv_heads] = [{num_layers}, {num_kv_heads}]"
            )
        if granularity == "layer":
            t = t.sum(dim=1, keepdim=True)
        scores, _ = _unit_scores(t, granularity, num_layers, num_kv_heads, "preset 'heuristic': calibration_scores")
        return _order_by_score(scores)
    raise AssertionError(base)


def _fixed_preset_target(base: str, target_sparsity: float | None, n: int) -> float | None:
    """all_fa / all_swa: check a given target is one they meet; return the target to record."""
    want_k = n if base == "all_fa" else 0
    if target_sparsity is None:
        return 0.0 if base == "all_fa" else None
    if base == "all_swa" and target_sparsity == 1.0:
        return None
    _check_target(target_sparsity, f"preset '{base}'")
    if fa_unit_budget(n, target_sparsity) != want_k:
        implied = "0 (every KV head FA)" if base == "all_fa" else "1 (every KV head SWA)"
        raise AllocationError(
            f"preset '{base}' has sparsity {implied} but target_sparsity={target_sparsity} asks for "
            f"{fa_unit_budget(n, target_sparsity)} of {n} units FA: pass target_sparsity=None, or use a "
            "budget preset (interleave:K, top_swa, bottom_swa, uniform_heads, random:SEED, heuristic)"
        )
    return float(target_sparsity)


def make_preset(
    name: str,
    *,
    num_layers: int,
    num_kv_heads: int,
    granularity: str,
    target_sparsity: float | None,
    window: int,
    sink_tokens: int = 0,
    calibration_scores: Any = None,
) -> Allocation:
    """A rule-based allocation of exactly ``K`` FA units for ``target_sparsity`` (see :func:`list_presets`).

    Budget presets take the first ``K = fa_unit_budget(num_units, target_sparsity)``
    units of their priority order and need a target. ``K`` meets the target exactly where
    ``(1 - t) x units`` is whole; elsewhere it is the nearest budget (rounded half up, as
    every preset rounds it, so presets compared at one target hold equal budgets). The
    file records the target asked for; ``achieved_sparsity`` is what ``K`` gives. ``all_fa`` / ``all_swa``
    accept ``None`` or a target whose ``K`` they meet (``all_swa`` also 1.0,
    recorded as null). ``source`` is the preset name.
    """
    base, arg = _parse_preset(name)
    where = f"preset {name!r}"
    _check_granularity(granularity, where)
    _check_positive_int(num_layers, "num_layers", where)
    _check_positive_int(num_kv_heads, "num_kv_heads", where)
    n = num_units(granularity, num_layers, num_kv_heads)
    if base in ("all_fa", "all_swa"):
        recorded = _fixed_preset_target(base, target_sparsity, n)
        value = 1 if base == "all_fa" else 0
        fa = [[value] * num_kv_heads for _ in range(num_layers)]
    else:
        if target_sparsity is None:
            raise AllocationError(f"{where}: target_sparsity is required (a number in [0, 1))")
        _check_target(target_sparsity, where)
        budget = fa_unit_budget(n, target_sparsity)
        order = _preset_order(base, arg, granularity, num_layers, num_kv_heads, calibration_scores, budget)
        fa = _take_units(order, budget, granularity, num_layers, num_kv_heads)
        recorded = float(target_sparsity)
    return Allocation(
        granularity=granularity,
        num_layers=num_layers,
        num_kv_heads=num_kv_heads,
        window=window,
        sink_tokens=sink_tokens,
        target_sparsity=recorded,
        fa=fa,
        source=name,
    ).validate(where)


def names_a_file(spec: str) -> bool:
    """Whether an allocation flag's value is an ``allocation.json`` path (ends in ``.json`` or is a file),
    not a preset name."""
    return spec.endswith(".json") or os.path.isfile(spec)


def allocation_from_spec(
    spec: str,
    *,
    num_layers: int,
    num_kv_heads: int,
    granularity: str,
    target_sparsity: float | None,
    window: int,
    sink_tokens: int = 0,
    calibration_scores: "UnitScores | None" = None,
) -> Allocation:
    """What a tool's allocation flag names: an ``allocation.json`` path or a preset name.

    A file (a path ending in ``.json`` or an existing file) is loaded and checked
    against ``num_layers`` / ``num_kv_heads``; it keeps its own window and sinks. A
    preset is made at ``target_sparsity`` with ``granularity``, ``window`` and
    ``sink_tokens`` (``all_fa`` / ``all_swa`` meet only their own sparsity and ignore
    the target). ``heuristic`` needs ``calibration_scores``
    (:class:`megatron_consa.unit_scores.UnitScores` for this model); other specs
    ignore them.
    """
    if names_a_file(spec):
        alloc = Allocation.load(spec)
        alloc.check_compatible(num_layers, num_kv_heads)
        return alloc
    base, _ = _parse_preset(spec)
    scores = None
    if base == "heuristic":
        if calibration_scores is None:
            raise AllocationError(
                "preset 'heuristic' needs calibration scores: pass the unit-scores file "
                "tools/calibrate_heuristic.py writes for this model"
            )
        calibration_scores.check_compatible(num_layers, num_kv_heads)
        if (calibration_scores.window, calibration_scores.sink_tokens) != (window, sink_tokens):
            logger.warning(
                "preset 'heuristic': the calibration scores were measured for window %d, sinks %d; the allocation "
                "uses window %d, sinks %d", calibration_scores.window, calibration_scores.sink_tokens, window,
                sink_tokens,
            )
        scores = calibration_scores.scores
    return make_preset(
        spec, num_layers=num_layers, num_kv_heads=num_kv_heads, granularity=granularity,
        target_sparsity=None if base in ("all_fa", "all_swa") else target_sparsity, window=window,
        sink_tokens=sink_tokens, calibration_scores=scores,
    )


__all__ = [
    "ALLOCATION_FORMAT_VERSION",
    "GRANULARITIES",
    "Allocation",
    "AllocationError",
    "allocation_from_spec",
    "fa_unit_budget",
    "names_a_file",
    "finalize_topk",
    "list_presets",
    "make_preset",
    "num_units",
]
