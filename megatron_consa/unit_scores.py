"""Per-unit scores: how much each attention unit needs full attention (larger = more).

The interchange between calibration (`tools/calibrate_heuristic.py`), the
`heuristic` preset (``make_preset("heuristic", ..., calibration_scores=scores.scores)``,
or `--consa-calibration-scores FILE` / `--calibration-scores FILE` on the CLIs) and
analysis (`tools/analyze_allocation.py` compares a ranking with an allocation at
the same budget). Pure Python: no model, no torch.

Kinds
-----
* ``attention_mass``: per KV head, the mean share of attention a dense (all-FA)
  model puts on keys an SWA head would not see (distance >= window, sinks
  excluded), averaged over the query heads of the group and over every query
  position that has such keys (`megatron_consa.evaluation.calibration`).
* ``ablation``: the LM loss increase (mean NLL on positions beyond the window)
  when that unit alone is switched to SWA, everything else FA
  (`megatron_consa.evaluation.ablation`): an oracle-style reference.

File format (``format_version`` 1)
----------------------------------
JSON object; ``scores`` is ``L x G`` floats, one row per line::

    {
      "format_version": 1,
      "kind": "attention_mass",
      "granularity": "kv_head",
      "num_layers": 2,
      "num_kv_heads": 2,
      "window": 8,
      "sink_tokens": 0,
      "scores": [
        [0.41, 0.02],
        [0.13, 0.97]
      ],
      "metadata": {}
    }

``granularity`` is the unit the scores were measured at: ``kv_head`` (one
value per KV head) or ``layer`` (one value per layer, repeated along its row,
as `allocation.json` writes layer-wise log_alpha). ``metadata`` is free JSON
(calibration data, sequences, the base loss).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Mapping

from megatron_consa.config import GRANULARITIES
from megatron_consa.files import json_round_trip_problem, read_json, write_text_atomic

UNIT_SCORES_FORMAT_VERSION = 1
SCORE_KINDS = ("attention_mass", "ablation")
_KEYS = ("format_version", "kind", "granularity", "num_layers", "num_kv_heads", "window", "sink_tokens", "scores",
         "metadata")


class UnitScoresError(ValueError):
    """An invalid unit-scores file or value; the message names the field and the fix."""


@dataclass
class UnitScores:
    """Scores per (layer, KV head); larger means the unit needs full attention more."""

    kind: str
    """`attention_mass` or `ablation` (see the module docstring)."""
    granularity: str
    """The unit measured: `kv_head`, or `layer` (each row repeats the layer's value)."""
    num_layers: int
    num_kv_heads: int
    window: int
    """The sliding window W the scores were measured for."""
    sink_tokens: int
    """Attention sinks of the SWA heads the scores assume."""
    scores: list[list[float]]
    """``L x G`` finite floats."""
    metadata: dict = field(default_factory=dict)
    """Free JSON: calibration data, number of sequences, base loss, ..."""
    format_version: int = UNIT_SCORES_FORMAT_VERSION

    def validate(self, where: str = "unit scores") -> "UnitScores":
        """Check every field; raise :class:`UnitScoresError` naming it. Returns self."""
        version = self.format_version
        if isinstance(version, bool) or not isinstance(version, int) or version != UNIT_SCORES_FORMAT_VERSION:
            raise UnitScoresError(f"{where}: field 'format_version' is {self.format_version!r}; this version reads "
                                  f"{UNIT_SCORES_FORMAT_VERSION}")
        if self.kind not in SCORE_KINDS:
            raise UnitScoresError(f"{where}: field 'kind' is {self.kind!r}; use one of {', '.join(SCORE_KINDS)}")
        if self.granularity not in GRANULARITIES:
            raise UnitScoresError(f"{where}: field 'granularity' is {self.granularity!r}; use one of "
                                  f"{', '.join(GRANULARITIES)}")
        for name, minimum in (("num_layers", 1), ("num_kv_heads", 1), ("window", 1), ("sink_tokens", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise UnitScoresError(f"{where}: field '{name}' is {value!r}; it must be an integer >= {minimum}")
        rows = self.scores
        if not isinstance(rows, list) or len(rows) != self.num_layers:
            raise UnitScoresError(f"{where}: field 'scores' must be {self.num_layers} rows (num_layers)")
        for l, row in enumerate(rows):
            if not isinstance(row, list) or len(row) != self.num_kv_heads:
                raise UnitScoresError(f"{where}: field 'scores' row {l} must hold {self.num_kv_heads} values "
                                      "(num_kv_heads)")
            for v in row:
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                    raise UnitScoresError(f"{where}: field 'scores' row {l} holds {v!r}; every score must be a "
                                          "finite number")
            if self.granularity == "layer" and len(set(row)) != 1:
                raise UnitScoresError(f"{where}: field 'scores' row {l} varies across KV heads but granularity is "
                                      "'layer': repeat the layer's value along its row")
        if not isinstance(self.metadata, dict):
            raise UnitScoresError(f"{where}: field 'metadata' must be a JSON object")
        problem = json_round_trip_problem(self.metadata)
        if problem:
            raise UnitScoresError(f"{where}: field 'metadata' {problem}; store plain JSON values")
        return self

    def check_compatible(self, num_layers: int, num_kv_heads: int) -> None:
        """Raise :class:`UnitScoresError` unless the scores are for a model of this shape."""
        for name, mine, theirs in (("num_layers", self.num_layers, num_layers),
                                   ("num_kv_heads", self.num_kv_heads, num_kv_heads)):
            if mine != theirs:
                raise UnitScoresError(f"unit scores field '{name}' is {mine} but the model has {name}={theirs}: "
                                      "calibrate on this model")

    def to_dict(self) -> dict:
        return {
            "format_version": self.format_version, "kind": self.kind, "granularity": self.granularity,
            "num_layers": self.num_layers, "num_kv_heads": self.num_kv_heads, "window": self.window,
            "sink_tokens": self.sink_tokens, "scores": [[float(v) for v in row] for row in self.scores],
            "metadata": dict(self.metadata),
        }

    def to_json(self) -> str:
        """Indented JSON, ``scores`` one row per line."""
        lines = []
        for key, value in self.to_dict().items():
            if key == "scores":
                text = "[\n" + ",\n".join("    " + json.dumps(row, allow_nan=False) for row in value) + "\n  ]"
            else:
                text = json.dumps(value, indent=2, allow_nan=False).replace("\n", "\n  ")
            lines.append(f"  {json.dumps(key)}: {text}")
        return "{\n" + ",\n".join(lines) + "\n}\n"

    def save(self, path: str | os.PathLike) -> None:
        """Validate, then write atomically."""
        self.validate()
        write_text_atomic(path, self.to_json())

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "unit scores") -> "UnitScores":
        if not isinstance(d, Mapping):
            raise UnitScoresError(f"{where}: expected a JSON object")
        missing = [k for k in _KEYS if k not in d and k != "metadata"]
        if missing:
            raise UnitScoresError(f"{where}: missing field(s) {', '.join(map(repr, missing))}; is this a unit-scores "
                                  "file (written by tools/calibrate_heuristic.py)?")
        unknown = sorted(set(d) - set(_KEYS))
        if unknown:
            raise UnitScoresError(f"{where}: unknown field(s) {', '.join(map(repr, unknown))}; put extra "
                                  "information under 'metadata'")
        return cls(**{k: d[k] for k in _KEYS if k in d and k != "metadata"},
                   metadata=d.get("metadata") or {}).validate(where)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "UnitScores":
        """Read and validate a file; errors name the path."""
        d = read_json(path, what="unit-scores file", error=UnitScoresError)
        return cls.from_dict(d, where=str(path))


def is_unit_scores_file(d: Mapping[str, Any]) -> bool:
    """True for the JSON object of a unit-scores file (it has `scores` and `kind`; an allocation has `fa`)."""
    return isinstance(d, Mapping) and "scores" in d and "kind" in d


__all__ = ["SCORE_KINDS", "UNIT_SCORES_FORMAT_VERSION", "UnitScores", "UnitScoresError", "is_unit_scores_file"]
