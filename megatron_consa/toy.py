"""A toy allocation problem for the controller: gates, a synthetic LM loss, no model.

Used by the settling tests and `benchmarks/controller.py` to check the
controller's defaults quickly over a grid of shapes, granularities, targets
and modes. It runs the real pieces: `ConsaController` (schedule, noise,
penalty, dual step, settle judgement), the hard-concrete math of
`megatron_consa.gates`, and Adam with the trainer's betas and the gate lr.

The synthetic LM loss prefers FA: loss = mean_i w_i (1 - z_i), with unit
importances w_i spread over two decades (a few "retrieval" units matter a lot,
most barely), times `importance_scale`. In `joint` mode the importances of
units running SWA decay slowly, standing in for weights that learn to do
without full attention (what co-training does in the real trainer).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch

from megatron_consa.config import ConsaConfig
from megatron_consa.controller import ConsaController, SettleReport, clamp_log_alpha_, judge_settling
from megatron_consa.gates import HardConcrete, sample_z

TOY_MODES = ("gates_only", "joint")

JOINT_ADAPTATION_RATE = 0.002
"""Joint mode: per step, an SWA unit's importance shrinks by this fraction times (1 - z)."""


class ToyGates(torch.nn.Module):
    """The gates of L layers x G KV heads (one module owns them all) and the synthetic loss."""

    def __init__(self, num_layers: int, num_kv_heads: int, config: ConsaConfig, *,
                 importance_scale: float = 1.0, seed: int = 0, first_unit: int = 0):
        super().__init__()
        units = num_layers if config.granularity == "layer" else num_layers * num_kv_heads
        self.log_alpha = torch.nn.Parameter(torch.full((units,), float(config.init_log_alpha)))
        self.gate_unit_ids = torch.arange(units) + first_unit
        self.gate_unit_cost = num_kv_heads if config.granularity == "layer" else 1
        self.hc = HardConcrete.from_config(config)
        perm = torch.randperm(units, generator=torch.Generator().manual_seed(seed))
        self.register_buffer("importance", torch.logspace(-2, 0, units)[perm] * importance_scale)
        self.u: Optional[torch.Tensor] = None

    def set_gate_noise(self, u: Optional[torch.Tensor], log_alpha_host: Optional[torch.Tensor] = None,
                       u_device: Optional[torch.Tensor] = None) -> None:
        self.u = u if u_device is None else u_device

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, z) for the current noise."""
        z = sample_z(self.log_alpha, self.u, self.hc)
        return (self.importance * (1 - z)).mean(), z


@dataclass
class ToyRun:
    gates: ToyGates
    controller: ConsaController
    s_hat: list[float]
    report: SettleReport

    @property
    def settle_iteration(self) -> Optional[int]:
        """First iteration from which s_hat stays within the settle tolerance to the end (None: never)."""
        tol, t = self.report.tolerance, self.report.target
        last_bad = max((k for k, s in enumerate(self.s_hat) if abs(s - t) > tol), default=-1)
        return None if last_bad + 1 >= len(self.s_hat) else last_bad + 1


def run_toy(
    config: ConsaConfig,
    *,
    num_layers: int,
    num_kv_heads: int,
    iterations: int,
    mode: str = "gates_only",
    importance_scale: float = 1.0,
    seed: int = 0,
    adam_betas: Optional[tuple[float, float]] = None,
    adam_eps: Optional[float] = None,
) -> ToyRun:
    """Learn the toy's gates for `iterations` steps with the trainer's order of operations.

    Per step: noise -> loss + penalty backward -> Adam (gate lr) -> clamp ->
    dual step, exactly as `ConsaTrainer.train_step` does. Adam's betas and eps
    default to the trainer's (`TrainingConfig`).
    """
    if mode not in TOY_MODES:
        raise ValueError(f"mode={mode!r}: use one of {TOY_MODES}")
    from megatron_consa.training.config import TrainingConfig  # plain dataclass, no megatron import

    train = TrainingConfig()
    betas = adam_betas or (train.adam_beta1, train.adam_beta2)
    eps = train.adam_eps if adam_eps is None else adam_eps
    gates = ToyGates(num_layers, num_kv_heads, config, importance_scale=importance_scale, seed=seed)
    owners = [gates]
    controller = ConsaController(config, total_cost=num_layers * num_kv_heads)
    opt = torch.optim.Adam([gates.log_alpha], lr=config.gate_lr, betas=betas, eps=eps, weight_decay=0.0)
    history = []
    for _ in range(iterations):
        controller.begin_iteration(owners)
        opt.zero_grad()
        penalty, s_hat = controller.constraint_loss(owners)
        loss, z = gates()
        (loss + penalty).backward()
        opt.step()
        clamp_log_alpha_(owners, config)
        if mode == "joint":
            with torch.no_grad():
                gates.importance.mul_(1 - JOINT_ADAPTATION_RATE * (1 - z.detach()))
        controller.dual_step(s_hat)
        history.append(s_hat)
    report = judge_settling(
        controller.s_hat_history, target_sparsity=config.target_sparsity, warmup_iters=config.target_warmup_iters,
        tail_fraction=config.settle_tail_fraction, tolerance=config.settle_tolerance,
    )
    return ToyRun(gates=gates, controller=controller, s_hat=history, report=report)


def legacy_controller_config(config: ConsaConfig, *, iterations: int) -> ConsaConfig:
    """The controller shipped before the damped one, at the old quickstart's schedule (benchmarks only).

    Plain dual ascent: no fixed quadratic weight, multipliers integrating from
    iteration 0 (through the warm-up too), multiplier step 0.3, gate lr 0.1 and
    a warm-up of a third of the run: what `make demo` ran, and failed with.
    """
    return dataclasses.replace(
        config, lagrangian_rho=0.0, lagrangian_lr=0.3, gate_lr=0.1, integrate_during_warmup=True,
        target_warmup_iters=max(1, iterations // 3),
    )
