"""The ConSA controller: sparsity target, Lagrange multipliers and gate noise.

The controller is the only stateful piece of the method outside the layers:

* the target schedule t(k) = t_final * min(1, k / warmup);
* the multipliers lambda1, lambda2 with an explicit dual (ascent) step after
  each optimizer step: lambda1 += eta*(s_hat - t), lambda2 += eta*(s_hat - t)^2.
  They are controller state, saved in checkpoints, never optimizer parameters;
* the per-iteration gate noise, drawn from `gates.counter_uniform` keyed by
  (seed, iteration, global unit index) and handed to every gate;
* the Lagrangian term lambda1*(s_hat - t) + lambda2*(s_hat - t)^2.

Gates live in the layers that use them (`ConsaCoreAttention`); the controller
reaches them through the small `GateProvider` protocol. The global expected
sparsity needs the FA cost summed over every pipeline stage; that reduction is
injected as `cost_all_reduce` (a callable summing a scalar tensor over the
pipeline group), so this module holds no process-group code. With the default
(identity) it is the single-stage controller.
"""

from __future__ import annotations

from typing import Callable, Iterable, Optional, Protocol

import torch
from torch import Tensor

from megatron_consa.config import ConsaConfig
from megatron_consa.gates import HardConcrete, counter_uniform, expected_fa_cost

CostAllReduce = Callable[[Tensor], Tensor]


class GateProvider(Protocol):
    """What the controller needs from a module that owns gates."""

    log_alpha: torch.nn.Parameter  # [units of this module], float32
    gate_unit_ids: Tensor  # [units], global unit index (layer-major)
    gate_unit_cost: int  # KV-head cost of one unit

    def set_gate_noise(self, u: Optional[Tensor], log_alpha_host: Optional[Tensor] = None) -> None:
        """This iteration's noise (float32, on the host); `log_alpha_host` is a host copy
        of `log_alpha` taken for the same iteration (lets the owner plan its forward
        without a device sync), or None."""


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
        log_alpha: one device-to-host transfer for all gates, instead of one per layer
        in the forward."""
        gates = list(gates)
        if not gates:
            return
        host = torch.cat([g.log_alpha.detach().float().reshape(-1) for g in gates]).cpu()
        for g, log_alpha in zip(gates, host.split([g.log_alpha.numel() for g in gates])):
            g.set_gate_noise(self.noise(g.gate_unit_ids), log_alpha_host=log_alpha)

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
        local = self.local_fa_cost(gates)
        global_cost = self.cost_all_reduce(local.detach().clone())
        fa_cost = local + (global_cost.to(local.device) - local.detach())
        return 1.0 - fa_cost / self.total_cost

    def penalty(self, s_hat: Tensor, target: Optional[float] = None) -> Tensor:
        """lambda1*(s_hat - t) + lambda2*(s_hat - t)^2 at the current multipliers."""
        gap = s_hat - (self.target() if target is None else target)
        return self.lambda1 * gap + self.lambda2 * gap * gap

    def constraint_loss(self, gates: Iterable[GateProvider]) -> tuple[Tensor, float]:
        """(penalty tensor to backpropagate, s_hat as a float) for this iteration."""
        s_hat = self.expected_sparsity(list(gates))
        return self.penalty(s_hat), float(s_hat.detach())

    def dual_step(self, s_hat: float) -> dict:
        """Ascend the multipliers on the observed s_hat and advance the iteration.

        Returns the figures worth logging (s_hat, target, lambda1, lambda2).
        """
        t = self.target()
        gap = float(s_hat) - t
        eta = self.config.lagrangian_lr
        self.lambda1 += eta * gap
        self.lambda2 += eta * gap * gap
        self.last_s_hat = float(s_hat)
        record = {"s_hat": float(s_hat), "target": t, "lambda1": self.lambda1, "lambda2": self.lambda2}
        self.iteration += 1
        return record

    # ---- checkpointing -----------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "iteration": self.iteration,
            "lambda1": self.lambda1,
            "lambda2": self.lambda2,
            "last_s_hat": self.last_s_hat,
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


def clamp_log_alpha_(gates: Iterable[GateProvider], config: ConsaConfig) -> None:
    """Keep every log_alpha inside [log_alpha_min, log_alpha_max] (after each optimizer step)."""
    with torch.no_grad():
        for g in gates:
            g.log_alpha.clamp_(config.log_alpha_min, config.log_alpha_max)
