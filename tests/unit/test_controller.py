"""The augmented-Lagrangian controller: schedule, dual step, state, split reductions, settling."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from megatron_consa.allocation import Allocation
from megatron_consa.config import ConsaConfig
from megatron_consa.controller import ConsaController, clamp_log_alpha_, find_gates
from megatron_consa.gates import HardConcrete, expected_sparsity, sample_z
from megatron_consa.training.config import TrainingConfig


class ToyGates(torch.nn.Module):
    """Gates of L layers x G KV heads and a loss that prefers FA.

    Unit importances w span two decades (as head importances do in practice:
    a few "retrieval" heads matter a lot, most barely): loss = mean_i w_i (1 - z_i).
    """

    def __init__(self, L: int, G: int, config: ConsaConfig, first_unit: int = 0):
        super().__init__()
        units = L if config.granularity == "layer" else L * G
        self.log_alpha = torch.nn.Parameter(torch.full((units,), config.init_log_alpha))
        self.gate_unit_ids = torch.arange(units) + first_unit
        self.gate_unit_cost = G if config.granularity == "layer" else 1
        self.hc = HardConcrete.from_config(config)
        perm = torch.randperm(units, generator=torch.Generator().manual_seed(0))
        self.w = torch.logspace(-2, 0, units)[perm]
        self.u = None

    def set_gate_noise(self, u, log_alpha_host=None):
        self.u = u

    def forward(self):
        z = sample_z(self.log_alpha, self.u, self.hc)
        return (self.w * (1 - z)).mean()


def test_target_warmup_schedule():
    c = ConsaController(ConsaConfig(target_sparsity=0.8, target_warmup_iters=10), total_cost=8)
    assert [c.target(k) for k in (0, 5, 10, 50)] == [0.0, 0.4, 0.8, 0.8]
    assert ConsaController(ConsaConfig(target_warmup_iters=0), total_cost=8).target(0) == 0.75


def test_dual_step_and_penalty():
    c = ConsaController(ConsaConfig(target_sparsity=0.5, target_warmup_iters=0, lagrangian_lr=0.1), total_cost=8)
    rec = c.dual_step(0.7)
    assert rec["lambda1"] == pytest.approx(0.1 * 0.2)
    assert rec["lambda2"] == pytest.approx(0.1 * 0.04)
    assert c.iteration == 1
    s = torch.tensor(0.6, requires_grad=True)
    pen = c.penalty(s)
    pen.backward()
    assert pen.item() == pytest.approx(0.02 * 0.1 + 0.004 * 0.01)
    assert s.grad.item() == pytest.approx(0.02 + 2 * 0.004 * 0.1)


def test_state_dict_round_trip():
    cfg = ConsaConfig(target_sparsity=0.5)
    c = ConsaController(cfg, total_cost=8)
    for s in (0.1, 0.3, 0.6):
        c.dual_step(s)
    d = copy.deepcopy(c.state_dict())
    c2 = ConsaController(cfg, total_cost=8)
    c2.load_state_dict(d)
    assert c2.state_dict() == c.state_dict()
    assert torch.equal(c2.noise(torch.arange(5)), c.noise(torch.arange(5)))
    with pytest.raises(KeyError, match="lambda1"):
        c2.load_state_dict({"iteration": 1})


def test_split_gates_give_the_global_gradient():
    """Two 'stages' each backpropagating their own share == one stage holding everything."""
    cfg = ConsaConfig(granularity="kv_head", target_sparsity=0.5, target_warmup_iters=0)
    torch.manual_seed(0)
    la = torch.randn(8)
    whole = ToyGates(2, 4, cfg)
    a, b = ToyGates(1, 4, cfg), ToyGates(1, 4, cfg, first_unit=4)
    with torch.no_grad():
        whole.log_alpha.copy_(la)
        a.log_alpha.copy_(la[:4])
        b.log_alpha.copy_(la[4:])
    c = ConsaController(cfg, total_cost=8)
    c.lambda1, c.lambda2 = 0.3, 0.7
    pen, s_whole = c.constraint_loss([whole])
    pen.backward()

    cost_b = c.local_fa_cost([b]).detach()
    cost_a = c.local_fa_cost([a]).detach()
    ca = ConsaController(cfg, total_cost=8, cost_all_reduce=lambda x: x + cost_b)
    cb = ConsaController(cfg, total_cost=8, cost_all_reduce=lambda x: x + cost_a)
    for ctl, g in ((ca, a), (cb, b)):
        ctl.lambda1, ctl.lambda2 = 0.3, 0.7
        p, s = ctl.constraint_loss([g])
        p.backward()
        assert s == pytest.approx(s_whole, abs=1e-7)
    torch.testing.assert_close(torch.cat([a.log_alpha.grad, b.log_alpha.grad]), whole.log_alpha.grad)


def _learn(config: ConsaConfig, L: int, G: int, steps: int) -> tuple[ToyGates, ConsaController, list[float]]:
    gates_mod = ToyGates(L, G, config)
    gates = find_gates([gates_mod])
    ctl = ConsaController(config, total_cost=L * G)
    train = TrainingConfig()  # the trainer's Adam settings, which the gates share
    opt = torch.optim.Adam(
        [gates_mod.log_alpha], lr=config.gate_lr, betas=(train.adam_beta1, train.adam_beta2),
        eps=train.adam_eps, weight_decay=0.0,
    )
    history = []
    for _ in range(steps):
        ctl.begin_iteration(gates)
        opt.zero_grad()
        penalty, s_hat = ctl.constraint_loss(gates)
        (gates_mod() + penalty).backward()
        opt.step()
        clamp_log_alpha_(gates, config)
        ctl.dual_step(s_hat)
        history.append(s_hat)
    return gates_mod, ctl, history


@pytest.mark.parametrize("granularity", ["layer", "kv_head"])
@pytest.mark.parametrize("target", [0.25, 0.5, 0.75, 0.875])
def test_defaults_settle_on_target_and_finalize_meets_budget(granularity, target):
    """Gates-only toy with every controller and optimizer default; 6000 iterations (3x warm-up)."""
    L, G, steps = 8, 4, 6000
    cfg = ConsaConfig(granularity=granularity, target_sparsity=target)
    assert steps >= 3 * cfg.target_warmup_iters
    gates_mod, ctl, hist = _learn(cfg, L, G, steps)
    assert abs(hist[-1] - target) < 0.01, f"s_hat ended at {hist[-1]:.4f} for target {target}"
    s_now = expected_sparsity(gates_mod.log_alpha.detach(), gates_mod.gate_unit_cost, L * G).item()
    assert abs(s_now - target) < 0.01

    la = gates_mod.log_alpha.detach().view(L, -1)
    alloc = Allocation.from_log_alpha(
        la, target_sparsity=target, granularity=granularity, num_kv_heads=G, window=64
    )
    assert alloc.achieved_sparsity == pytest.approx(target, abs=1e-12)
    # the units kept at FA are, on average, the more important ones
    fa = alloc.fa_tensor().flatten() if granularity == "kv_head" else alloc.fa_tensor()[:, 0]
    assert gates_mod.w[fa].mean() > gates_mod.w[~fa].mean()

    # controller state survives a round trip and resumes the same trajectory
    ctl2 = ConsaController(cfg, total_cost=L * G)
    ctl2.load_state_dict(ctl.state_dict())
    assert (ctl2.lambda1, ctl2.lambda2, ctl2.iteration) == (ctl.lambda1, ctl.lambda2, steps)
    assert math.isfinite(ctl.lambda1) and ctl.lambda2 >= 0
