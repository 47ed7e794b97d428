"""ConSA configuration: one typed dataclass, validated on construction.

`ConsaConfig` holds everything ConSA adds to a model and its training: the
sliding window, attention sinks, gate granularity, hard-concrete constants,
the sparsity target and the augmented-Lagrangian controller. It imports
nothing from megatron-core, so the gate math and the controller can be used
and tested without it. The megatron-core side (`ConsaTransformerConfig` in
`megatron_consa.model`) carries a `ConsaConfig` in its `consa` field, which is
how `ConsaCoreAttention` reads it.

Every constant of the method is a named, documented default here. The paper's
hyperparameters are not public; the controller defaults are chosen so that
s_hat settles within 0.01 of the target in under 1,000 iterations on the toy
grid of `megatron_consa.toy` (4x4 to 28x8 units, both granularities, targets
0.25 to 0.875, gates-only and joint) and in the real trainer
(`benchmarks/controller.py` measures both, beside the earlier controller).
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


def _check_int(cfg: Any, name: str, *, minimum: int, fix: str) -> None:
    value = getattr(cfg, name)
    if not _is_int(value):
        _fail(name, value, f"expected an integer, got {type(value).__name__}; {fix}")
    if value < minimum:
        _fail(name, value, fix)


def _check_float(cfg: Any, name: str, *, fix: str, minimum: Optional[float] = None) -> None:
    value = getattr(cfg, name)
    if not _is_number(value):
        _fail(name, value, f"expected a number, got {type(value).__name__}; {fix}")
    if not math.isfinite(value) or (minimum is not None and value < minimum):
        _fail(name, value, fix)


def _check_bool(cfg: Any, name: str) -> None:
    value = getattr(cfg, name)
    if not isinstance(value, bool):
        _fail(name, value, f"expected True or False, got {type(value).__name__} (a string such as 'false' is truthy)")


def _check_choice(cfg: Any, name: str, choices: tuple[str, ...]) -> None:
    value = getattr(cfg, name)
    if not isinstance(value, str) or value not in choices:
        _fail(name, value, f"choose one of {choices}")


def representable_targets(granularity: str, num_layers: int, num_kv_heads: int) -> list[float]:
    """Every sparsity the granularity can meet exactly: 1 - k / units for k = units..1."""
    units = num_layers if granularity == "layer" else num_layers * num_kv_heads
    return [1.0 - k / units for k in range(units, 0, -1)]


def nearest_representable(
    target: float, granularity: str, num_layers: int, num_kv_heads: int
) -> tuple[float, Optional[float]]:
    """(below, above): the representable targets next to `target` (equal when it is one;
    `above` is None when only all-SWA, which is no valid target, lies above)."""
    options = representable_targets(granularity, num_layers, num_kv_heads)
    below = max((t for t in options if t <= target + 1e-9), default=options[0])
    above = min((t for t in options if t >= target - 1e-9), default=None)
    return below, above


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

    permute_kv_groups: bool = True
    """Fixed mode, in the ConSA layer specs: store each layer's KV groups (with
    their query heads, QKV-projection rows and output-projection columns) so that
    each type is one contiguous slice of heads on every TP rank and the FA groups
    spread over the TP ranks as evenly as their count allows
    (`megatron_consa.group_layout`). The function is unchanged and checkpoints stay
    in the canonical order; a mixed layer then runs each kernel on a view instead
    of a gathered copy. False keeps megatron-core's order, so a module's plain
    `state_dict()` is the canonical one (see README, design notes)."""

    # ---- target and controller ---------------------------------------------
    target_sparsity: float = 0.75
    """Fraction of KV-head cost that should be SWA, in [0, 1). In learning mode it
    must be representable at the granularity: (1 - t) * units is a whole number
    of units (checked against the model, naming the nearest representable targets)."""

    target_warmup_iters: int = 200
    """The target ramps linearly: t(k) = t_final * min(1, k / warmup). The
    allocation phase must run longer than this (checked before any work); with
    the defaults s_hat sits within 0.01 of the target a few hundred iterations
    after the ramp ends (see benchmarks/controller.py)."""

    lagrangian_rho: float = 3000.0
    """Fixed quadratic weight rho of the augmented Lagrangian, active from
    iteration 0: the penalty is lambda1*gap + (rho/2 + lambda2)*gap^2 with
    gap = s_hat - t. It is the proportional (damping) force of the controller:
    at gap 0.01 it already pushes with a multiplier of 30, so s_hat tracks the
    ramp instead of lagging behind it (a lag the integral would wind up)."""

    lagrangian_lr: float = 10.0
    """Dual step size eta: lambda1 += eta*gap, lambda2 += eta*gap^2 after each
    optimizer step that was applied (the integral force, which removes the
    steady-state offset the quadratic term alone would leave)."""

    integrate_during_warmup: bool = False
    """Anti-windup. False (default): the multipliers take no dual step while the
    target still ramps, so they do not integrate the lag of s_hat behind a
    moving target and overshoot once it stops. True is the plain dual ascent."""

    gate_lr: float = 0.05
    """Learning rate of the gate parameters (their own group, no weight decay,
    their own gradient-norm clip: outside the model's global clip)."""

    gates_only: bool = False
    """Freeze model weights and train only the gates (cheap, DuoAttention-like)."""

    settle_tolerance: float = 0.01
    """Finalize refuses a run whose s_hat left target +- this anywhere in the
    judged tail (top-k would otherwise hide a run that never settled)."""

    settle_tail_fraction: float = 0.1
    """The tail finalize judges: the last this fraction of the allocation
    phase's iterations (at least one, all after the target warm-up)."""

    finalize_margin: float = 0.1
    """Finalize says so (a warning and `undecided_units` in the allocation's
    metadata) when the K-th (last FA) and (K+1)-th (first SWA) units' log_alpha
    differ by less than this: the choice between them is not a learned
    preference (differences below the margin; exact ties by unit index).
    0 disables the check."""

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
        """Raise ConsaConfigError naming the first invalid field (type, then range)."""
        _check_int(self, "window", minimum=1, fix="the sliding window is an integer number of tokens >= 1")
        _check_int(self, "sink_tokens", minimum=0, fix="attention sinks are an integer >= 0")
        _check_choice(self, "granularity", GRANULARITIES)
        _check_choice(self, "backend", BACKENDS)
        _check_float(self, "target_sparsity", fix="the SWA share is a number in [0, 1)")
        if not 0.0 <= self.target_sparsity < 1.0:
            _fail("target_sparsity", self.target_sparsity, "the SWA share must lie in [0, 1)")
        _check_int(self, "target_warmup_iters", minimum=0, fix="use an integer, 0 (no warm-up) or more")
        for name in ("lagrangian_rho", "lagrangian_lr", "gate_lr", "settle_tolerance", "finalize_margin"):
            _check_float(self, name, minimum=0.0, fix="must be a finite number >= 0")
        _check_float(self, "settle_tail_fraction", fix="a fraction of the run in (0, 1]")
        if not 0.0 < self.settle_tail_fraction <= 1.0:
            _fail("settle_tail_fraction", self.settle_tail_fraction, "a fraction of the run in (0, 1]")
        for name in ("gates_only", "integrate_during_warmup", "permute_kv_groups"):
            _check_bool(self, name)
        _check_int(self, "noise_seed", minimum=0, fix="the noise seed is an integer >= 0")
        for name in ("init_log_alpha", "log_alpha_min", "log_alpha_max", "hc_gamma", "hc_zeta", "hc_beta", "hc_eps"):
            _check_float(self, name, fix="must be a finite number")
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

    def check_target_representable(self, *, num_layers: int, num_kv_heads: int) -> None:
        """A learning run's target must be one the granularity meets exactly.

        (1 - t) x units must be a whole number of FA units; otherwise finalize would
        round to a neighbouring budget the gates were never trained for. The error
        names the nearest representable targets.
        """
        below, above = nearest_representable(self.target_sparsity, self.granularity, num_layers, num_kv_heads)
        if abs(below - self.target_sparsity) > 1e-9:
            units = num_layers if self.granularity == "layer" else num_layers * num_kv_heads
            nearest = f"{below:.6g}" if above is None else f"{below:.6g} and {above:.6g}"
            _fail(
                "target_sparsity",
                self.target_sparsity,
                f"granularity '{self.granularity}' has {units} units on this model "
                f"({num_layers} layers x {num_kv_heads} KV heads), so it can meet only multiples of "
                f"1/{units}; the nearest representable targets are {nearest}",
            )

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
