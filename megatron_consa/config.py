"""ConSA configuration: one typed dataclass, validated on construction.

`ConsaConfig` holds everything ConSA adds to a model and its training: the
sliding window, attention sinks, gate granularity, hard-concrete constants,
the sparsity target and the augmented-Lagrangian controller. It imports
nothing from megatron-core, so the gate math and the controller can be used
and tested without it. The megatron-core side (`ConsaTransformerConfig` in
`megatron_consa.model`) carries a `ConsaConfig` in its `consa` field, which is
how `ConsaCoreAttention` reads it.

Every constant of the method is a named, documented default here. The paper's
hyperparameters are not public; the defaults are chosen so that the gates-only
toy problem in `tests/unit/test_controller.py` settles on the target.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Optional

GRANULARITIES = ("layer", "kv_head")
BACKENDS = ("auto", "torch", "te")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


class ConsaConfigError(ValueError):
    """A ConSA configuration field has an invalid value; the message names it."""


def _fail(name: str, value: Any, fix: str) -> None:
    raise ConsaConfigError(f"ConsaConfig.{name}={value!r} is invalid: {fix}")


@dataclass
class ConsaConfig:
    """ConSA settings for the hybrid attention, the gates and the controller."""

    # ---- attention ------------------------------------------------------
    window: int = 512
    """Sliding window W: an SWA query sees itself and the W-1 tokens before it
    (Hugging Face `sliding_window=W`, flash/TE `window_size=(W-1, 0)`)."""

    sink_tokens: int = 0
    """Attention sinks S: SWA heads also see the first S tokens of the sequence
    (streaming attention). 0 is plain SWA, as in the paper."""

    granularity: str = "kv_head"
    """`layer`: one gate per layer (cost = KV heads per layer); `kv_head`: one
    gate per (layer, KV head) (cost 1)."""

    backend: str = "auto"
    """Attention backend: `te` (Transformer Engine, GPU), `torch` (any device),
    `auto` (TE when importable and CUDA is present, else torch)."""

    allocation: Optional[list[list[int]]] = None
    """A fixed binary allocation, num_layers x num_kv_heads of 0/1 (1 = FA).
    When set, attention runs in fixed mode (no gates); when None, the layers
    own gates and run in learning mode."""

    # ---- target and controller ---------------------------------------------
    target_sparsity: float = 0.75
    """Fraction of KV-head cost that should be SWA, in [0, 1)."""

    target_warmup_iters: int = 2000
    """The target ramps linearly: t(k) = t_final * min(1, k / warmup). With the
    default gate lr and multiplier step, run the allocation phase for about three
    times this (the settling test runs 6000 iterations); shorter runs should
    shorten the warm-up and raise gate_lr / lagrangian_lr (the quickstart does)."""

    lagrangian_lr: float = 0.05
    """Dual step size eta: lambda1 += eta*(s_hat - t), lambda2 += eta*(s_hat - t)^2."""

    gate_lr: float = 0.05
    """Learning rate of the gate parameters (their own group, no weight decay)."""

    gates_only: bool = False
    """Freeze model weights and train only the gates (cheap, DuoAttention-like)."""

    settle_tolerance: float = 0.02
    """Finalize refuses an allocation whose learned s_hat is further than this from
    the target (top-k would otherwise hide a run that never reached its budget)."""

    noise_seed: int = 1234
    """Seed of the counter-based gate noise, keyed by (seed, iteration, unit)."""

    # ---- hard-concrete gate ------------------------------------------------
    init_log_alpha: float = 3.0
    """Initial log_alpha of every gate: high, so training starts all-FA."""

    log_alpha_min: float = -8.0
    """Lower clamp of log_alpha (applied after each optimizer step).
    P(z>0) = 0.0017 there, so a windowed unit barely counts as FA cost."""

    log_alpha_max: float = 3.5
    """Upper clamp of log_alpha. Kept low on purpose: P(z>0) = 0.994 and the
    evaluation z is already exactly 1 there, while a higher cap makes FA units
    so saturated that Adam barely moves them once the constraint asks
    (the controller then overshoots; see tests/unit/test_controller.py)."""

    hc_gamma: float = -0.1
    """Hard-concrete stretch lower end (gamma < 0)."""

    hc_zeta: float = 1.1
    """Hard-concrete stretch upper end (zeta > 1)."""

    hc_beta: float = 2.0 / 3.0
    """Hard-concrete temperature."""

    hc_eps: float = 1e-6
    """Uniform noise is drawn from U(eps, 1 - eps)."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ConsaConfigError naming the first invalid field."""
        if not _is_int(self.window) or self.window < 1:
            _fail("window", self.window, "the sliding window must be an integer >= 1")
        if not _is_int(self.sink_tokens) or self.sink_tokens < 0:
            _fail("sink_tokens", self.sink_tokens, "attention sinks must be an integer >= 0")
        if self.granularity not in GRANULARITIES:
            _fail("granularity", self.granularity, f"choose one of {GRANULARITIES}")
        if self.backend not in BACKENDS:
            _fail("backend", self.backend, f"choose one of {BACKENDS}")
        t = self.target_sparsity
        if not isinstance(t, (int, float)) or math.isnan(t) or not 0.0 <= t < 1.0:
            _fail("target_sparsity", t, "the SWA share must lie in [0, 1)")
        if not _is_int(self.target_warmup_iters) or self.target_warmup_iters < 0:
            _fail("target_warmup_iters", self.target_warmup_iters, "use an integer, 0 (no warm-up) or more")
        for name in ("lagrangian_lr", "gate_lr", "settle_tolerance"):
            value = getattr(self, name)
            if not _is_number(value) or not math.isfinite(value) or value < 0:
                _fail(name, value, "must be a finite number >= 0")
        for name in ("init_log_alpha", "log_alpha_min", "log_alpha_max"):
            if not _is_number(getattr(self, name)) or not math.isfinite(getattr(self, name)):
                _fail(name, getattr(self, name), "must be a finite number")
        if not self.log_alpha_min < self.log_alpha_max:
            _fail("log_alpha_min", self.log_alpha_min, "must be below log_alpha_max")
        if not self.log_alpha_min <= self.init_log_alpha <= self.log_alpha_max:
            _fail("init_log_alpha", self.init_log_alpha, "must lie inside [log_alpha_min, log_alpha_max]")
        if not self.hc_gamma < 0:
            _fail("hc_gamma", self.hc_gamma, "the hard-concrete stretch needs gamma < 0")
        if not self.hc_zeta > 1:
            _fail("hc_zeta", self.hc_zeta, "the hard-concrete stretch needs zeta > 1")
        if not self.hc_beta > 0:
            _fail("hc_beta", self.hc_beta, "the temperature must be > 0")
        if not 0 < self.hc_eps < 0.5:
            _fail("hc_eps", self.hc_eps, "noise clipping must lie in (0, 0.5)")
        if self.allocation is not None:
            rows = self.allocation
            if hasattr(rows, "fa") and hasattr(rows, "achieved_sparsity"):
                _fail("allocation", type(rows).__name__, "pass the matrix: ConsaConfig(allocation=alloc.fa)")
            if (
                not isinstance(rows, (list, tuple))
                or not rows
                or not all(isinstance(r, (list, tuple)) and r for r in rows)
                or any(len(r) != len(rows[0]) for r in rows)
            ):
                _fail("allocation", rows, "must be a non-empty num_layers x num_kv_heads matrix (list of rows)")
            if any(not _is_int(v) or v not in (0, 1) for r in rows for v in r):
                _fail("allocation", "...", "entries must be the integers 0 (SWA) or 1 (FA)")
            if self.gates_only:
                _fail("gates_only", True, "a fixed allocation has no gates to train; drop one of the two")

    def check_model_shape(self, *, num_layers: int, num_kv_heads: int, tp_size: int = 1) -> None:
        """Check this config against a model's shape and tensor-parallel size."""
        if num_kv_heads % tp_size != 0:
            raise ConsaConfigError(
                f"num_query_groups={num_kv_heads} is not divisible by tensor_model_parallel_size="
                f"{tp_size}: ConSA gates are per KV head, so choose a TP size that divides "
                f"the number of KV heads"
            )
        if self.allocation is not None:
            rows, cols = len(self.allocation), len(self.allocation[0])
            if (rows, cols) != (num_layers, num_kv_heads):
                _fail(
                    "allocation",
                    f"{rows}x{cols}",
                    f"the model has {num_layers} layers x {num_kv_heads} KV heads",
                )
            if self.granularity == "layer" and any(len(set(r)) > 1 for r in self.allocation):
                _fail("allocation", "...", "at granularity 'layer' every row must be all 0 or all 1")

    @property
    def learning(self) -> bool:
        """True when the layers own gates (no fixed allocation given)."""
        return self.allocation is None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ConsaConfig":
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise ConsaConfigError(f"unknown ConsaConfig field(s) {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)
