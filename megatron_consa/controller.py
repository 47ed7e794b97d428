"""The ConSA controller: sparsity target, Lagrange multipliers and gate noise.

The controller is the only stateful piece of the method outside the layers:

* the target schedule t(k) = t_final * min(1, k / warmup);
* the augmented Lagrangian term, with gap = s_hat - t:
      lambda1 * gap + (rho/2 + lambda2) * gap^2
  The quadratic weight rho/2 is fixed and active from iteration 0: it is the
  proportional (damping) force, so s_hat tracks the ramping target instead of
  lagging behind it. lambda1 is the integral force that removes the offset a
  proportional force alone leaves;
* the multipliers' explicit dual (ascent) step after each *applied* optimizer
  step: lambda1 += eta*gap, lambda2 += eta*gap^2. Anti-windup: no dual step
  while the target still ramps (unless `integrate_during_warmup`), so the
  multipliers do not integrate the ramp's lag and overshoot when it stops. They
  are controller state, saved in checkpoints, never optimizer parameters;
* the record of s_hat per iteration, which finalize judges
  (`judge_settling`: the tail of the run, not one sample);
* the per-iteration gate noise, drawn from `gates.counter_uniform` keyed by
  (seed, iteration, global unit index) and handed to every gate.

Gates live in the layers that use them (`ConsaCoreAttention`); the controller
reaches them through the small `GateProvider` protocol. The global expected
sparsity needs the FA cost summed over every pipeline stage; that reduction is
injected as `cost_all_reduce` (a callable summing a scalar tensor over the
pipeline group), so this module holds no process-group code. With the default
(identity) it is the single-stage controller.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Protocol, Sequence

import torch
from torch import Tensor

from megatron_consa.config import ConsaConfig
from megatron_consa.gates import HardConcrete, counter_uniform, expected_fa_cost

CostAllReduce = Callable[[Tensor], Tensor]


class GateProvider(Protocol):
    """What the controller needs from a module that owns gates."""

    log_alpha: torch.nn.Parameter  # [units of this module], float32
    gate_unit_ids: Tensor  # [units], global unit index (layer-major), on the host
    gate_unit_cost: int  # KV-head cost of one unit

    def set_gate_noise(self, u: Optional[Tensor], log_alpha_host: Optional[Tensor] = None,
                       u_device: Optional[Tensor] = None) -> None:
        """This iteration's noise (float32, on the host); `log_alpha_host` is a host copy
        of `log_alpha` taken for the same iteration (lets the owner plan its forward
        without a device sync), or None; `u_device` the same noise on `log_alpha`'s
        device (a view of one copy made for all gates), or None."""


def find_gates(modules: Iterable[torch.nn.Module]) -> list[GateProvider]:
    """Every learning-mode gate owner inside the given model chunks, in module order."""
    # Duck typing, not isinstance(m, GateProvider): since Python 3.12 runtime protocol
    # checks look attributes up statically and miss nn.Module parameters and buffers.
    found = []
    for chunk in modules:
        for m in chunk.modules():
            if callable(getattr(m, "set_gate_noise", None)) and getattr(m, "log_alpha", None) is not None:
                found.append(m)
    return found


class ConsaController:
    """Target schedule, multipliers, noise and the constraint term.

    Args:
        config: the ConSA settings (target, warm-up, eta, noise seed, gate constants).
        total_cost: the model's whole KV-head cost, num_layers * num_kv_heads.
        cost_all_reduce: sums a scalar over the pipeline-parallel group
            (identity when there is one stage). Called on detached tensors only.
    """

    def __init__(
        self,
        config: ConsaConfig,
        *,
        total_cost: int,
        cost_all_reduce: Optional[CostAllReduce] = None,
    ) -> None:
        if total_cost <= 0:
            raise ValueError(f"total_cost={total_cost} must be > 0 (num_layers * num_kv_heads)")
        self.config = config
        self.hc = HardConcrete.from_config(config)
        self.total_cost = int(total_cost)
        self.cost_all_reduce = cost_all_reduce or (lambda x: x)
        self.iteration = 0
        self.lambda1 = 0.0
        self.lambda2 = 0.0
        self.last_s_hat: Optional[float] = None
        # [iteration, s_hat] of every iteration run so far (saved in checkpoints)
        self.s_hat_history: list[list[float]] = []  # [step index (0: the first step), s_hat]

    # ---- schedule ----------------------------------------------------------
    def target(self, iteration: Optional[int] = None) -> float:
        """t(k) = t_final * min(1, k / warmup); k defaults to the current iteration."""
        k = self.iteration if iteration is None else iteration
        warmup = self.config.target_warmup_iters
        frac = 1.0 if warmup == 0 else min(1.0, k / warmup)
        return self.config.target_sparsity * frac

    # ---- noise -------------------------------------------------------------
    def noise(self, unit_ids: Tensor, iteration: Optional[int] = None) -> Tensor:
        """The uniform noise of these global units at this iteration (float32, CPU)."""
        k = self.iteration if iteration is None else iteration
        return counter_uniform(self.config.noise_seed, k, unit_ids, self.hc.eps)

    def begin_iteration(self, gates: Iterable[GateProvider]) -> None:
        """Hand every gate its noise for the current iteration, with a host copy of its
        log_alpha: one device-to-host transfer of every log_alpha and one host-to-device
        transfer of every gate's noise (drawn on the host in one call), instead of one of
        each per layer."""
        gates = list(gates)
        if not gates:
            return
        sizes = [g.log_alpha.numel() for g in gates]
        host = torch.cat([g.log_alpha.detach().float().reshape(-1) for g in gates]).cpu()
        noise = self.noise(torch.cat([torch.as_tensor(g.gate_unit_ids).reshape(-1).cpu() for g in gates]))
        devices = {g.log_alpha.device for g in gates}
        # the noise where the gates are, in one copy (gates on several devices: each its own)
        on_device = noise.to(next(iter(devices))) if len(devices) == 1 else noise
        for g, log_alpha, u, u_device in zip(gates, host.split(sizes), noise.split(sizes), on_device.split(sizes)):
            g.set_gate_noise(u, log_alpha_host=log_alpha, u_device=u_device)

    # ---- constraint --------------------------------------------------------
    def local_fa_cost(self, gates: Iterable[GateProvider]) -> Tensor:
        """Expected FA cost of the gates held here (differentiable, float32 scalar)."""
        total = None
        for g in gates:
            c = expected_fa_cost(g.log_alpha, g.gate_unit_cost, self.hc)
            total = c if total is None else total + c
        if total is None:
            return torch.zeros((), dtype=torch.float32)
        return total

    def expected_sparsity(self, gates: Iterable[GateProvider]) -> Tensor:
        """Global s_hat; differentiable in the local gates only.

        s_hat = 1 - (local + remote) / total, where remote is the detached cost
        of the other pipeline stages, so each stage backpropagates exactly its
        own share of the constraint gradient.
        """
        return self._sparsity(list(gates))[0]

    def _sparsity(self, gates: list) -> tuple[Tensor, float]:
        """(s_hat to backpropagate, its value from the float64 global cost).

        The value is what the multipliers step on and the history records: computed from the
        reduced total alone, it is the same bits on every pipeline stage. Rebuilt from each
        stage's own float32 share (`local + (global - local)`), it can differ in the last bit
        between stages, and so would their multipliers.
        """
        local = self.local_fa_cost(gates)
        global_cost = self.cost_all_reduce(local.detach().double())
        fa_cost = local + (global_cost.to(local) - local.detach())
        return 1.0 - fa_cost / self.total_cost, 1.0 - float(global_cost) / self.total_cost

    @property
    def quadratic_weight(self) -> float:
        """The weight of gap^2 in the penalty: rho/2 (fixed) + lambda2 (integrated)."""
        return self.config.lagrangian_rho / 2.0 + self.lambda2

    def penalty(self, s_hat: Tensor, target: Optional[float] = None) -> Tensor:
        """lambda1*gap + (rho/2 + lambda2)*gap^2 at the current multipliers, gap = s_hat - t."""
        gap = s_hat - (self.target() if target is None else target)
        return self.lambda1 * gap + self.quadratic_weight * gap * gap

    def integrating(self, iteration: Optional[int] = None) -> bool:
        """Whether the dual step of this iteration moves the multipliers (anti-windup)."""
        k = self.iteration if iteration is None else iteration
        return self.config.integrate_during_warmup or k >= self.config.target_warmup_iters

    def constraint_loss(self, gates: Iterable[GateProvider]) -> tuple[Tensor, float]:
        """(penalty tensor to backpropagate, s_hat as a float) for this iteration."""
        s_hat, value = self._sparsity(list(gates))
        return self.penalty(s_hat), value

    def dual_step(self, s_hat: float, *, applied: bool = True) -> dict:
        """Record s_hat, ascend the multipliers on it, and advance the iteration.

        `applied=False` (the optimizer skipped its step, e.g. an fp16 overflow)
        records s_hat but leaves the multipliers alone: the gates did not move,
        so the multipliers must not either. While the target still ramps the
        multipliers stay put too (anti-windup, see `integrating`).
        Returns the figures worth logging (s_hat, target, lambda1, lambda2, dual_step).
        """
        t = self.target()
        gap = float(s_hat) - t
        step = applied and self.integrating()
        if step:
            eta = self.config.lagrangian_lr
            self.lambda1 += eta * gap
            self.lambda2 += eta * gap * gap
        self.last_s_hat = float(s_hat)
        self.s_hat_history.append([self.iteration, float(s_hat)])
        record = {
            "s_hat": float(s_hat), "target": t, "lambda1": self.lambda1, "lambda2": self.lambda2, "dual_step": step,
        }
        self.iteration += 1
        return record

    # ---- checkpointing -----------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "iteration": self.iteration,
            "lambda1": self.lambda1,
            "lambda2": self.lambda2,
            "last_s_hat": self.last_s_hat,
            "s_hat_history": [list(r) for r in self.s_hat_history],
            "target_sparsity": self.config.target_sparsity,
            "noise_seed": self.config.noise_seed,
        }

    def load_state_dict(self, state: dict) -> None:
        missing = {"iteration", "lambda1", "lambda2"} - set(state)
        if missing:
            raise KeyError(f"controller state is missing {sorted(missing)}")
        self.iteration = int(state["iteration"])
        self.lambda1 = float(state["lambda1"])
        self.lambda2 = float(state["lambda2"])
        self.last_s_hat = state.get("last_s_hat")
        self.s_hat_history = [[int(k), float(v)] for k, v in state.get("s_hat_history", [])]


def clamp_log_alpha_(gates: Iterable[GateProvider], config: ConsaConfig) -> None:
    """Keep every log_alpha inside [log_alpha_min, log_alpha_max] (after each optimizer step)."""
    with torch.no_grad():
        for g in gates:
            g.log_alpha.clamp_(config.log_alpha_min, config.log_alpha_max)


@dataclass(frozen=True)
class SettleReport:
    """How the tail of a learning run sat against its target (see `judge_settling`)."""

    target: float
    first_iteration: int
    """First iteration of the judged tail, counted as the log lines count (1: the first step); -1 when nothing
    could be judged."""
    last_iteration: int
    max_gap: float
    """max |s_hat - target| over the tail (inf when nothing could be judged)."""
    tolerance: float
    reason: str = ""
    """Why the run counts as unsettled, when it does."""

    @property
    def settled(self) -> bool:
        return not self.reason

    def describe(self) -> str:
        if not self.settled:
            return self.reason
        return (
            f"s_hat stayed within {self.max_gap:.4f} of target {self.target} over iterations "
            f"{self.first_iteration}..{self.last_iteration} (tolerance {self.tolerance})"
        )


def judge_settling(
    history: Sequence[Sequence[float]],
    *,
    target_sparsity: float,
    warmup_iters: int,
    tail_fraction: float,
    tolerance: float,
) -> SettleReport:
    """Judge a learning run by the tail of its s_hat record, not by one sample.

    `history` holds [step index, s_hat] pairs in order (the controller's record: 0 for the first step).
    The tail is the last ceil(tail_fraction * n) of the n records (at least one); every one of them
    must come after the target warm-up and lie within `tolerance` of the
    final target. A limit cycle that happens to cross the target at the last
    step fails here, since its swing lies in the tail. The report and its messages number iterations
    as the training log does (iterations done: the step at index k is iteration k + 1).
    """
    def unsettled(reason: str, first: int = -1, last: int = -1, gap: float = math.inf) -> SettleReport:
        return SettleReport(target_sparsity, first, last, gap, tolerance, reason)

    if not history:
        return unsettled("no s_hat was recorded: the run has no learning iterations to judge")
    n = len(history)
    tail = history[n - max(1, math.ceil(tail_fraction * n)):]
    first, last = int(tail[0][0]) + 1, int(tail[-1][0]) + 1
    gaps = [abs(float(s) - target_sparsity) for _, s in tail]
    worst = max(gaps)
    if not all(math.isfinite(g) for g in gaps):  # (max and > pass a NaN by: a diverged run looked settled)
        k = int(tail[next(i for i, g in enumerate(gaps) if not math.isfinite(g))][0]) + 1
        return unsettled(f"s_hat was not finite at iteration {k} (in the judged tail {first}..{last}): the gates "
                         "diverged", first, last, math.inf)
    if first <= warmup_iters:  # (the step at index warmup_iters is the first at the final target)
        return unsettled(
            f"the judged tail (iterations {first}..{last}, the last {tail_fraction:.0%} of the run) starts "
            f"inside the target warm-up ({warmup_iters} iterations): train longer so the tail comes after it",
            first, last, worst,
        )
    if worst > tolerance:
        k = int(tail[gaps.index(worst)][0]) + 1
        return unsettled(
            f"s_hat did not settle: over iterations {first}..{last} it strayed up to {worst:.4f} from target "
            f"{target_sparsity} (at iteration {k}; tolerance {tolerance}). Train longer, or finalize anyway "
            "with a larger tolerance (tools/finalize_allocation.py --tolerance)",
            first, last, worst,
        )
    return SettleReport(target_sparsity, first, last, worst, tolerance)
