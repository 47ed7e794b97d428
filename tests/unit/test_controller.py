"""The augmented-Lagrangian controller: schedule, dual step, state, split reductions, settling."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from megatron_consa.allocation import Allocation, AllocationError
from megatron_consa.config import ConsaConfig, ConsaConfigError
from megatron_consa.controller import ConsaController, judge_settling
from megatron_consa.gates import expected_sparsity
from megatron_consa.toy import ToyGates, run_toy


def test_target_warmup_schedule():
    c = ConsaController(ConsaConfig(target_sparsity=0.8, target_warmup_iters=10), total_cost=8)
    assert [c.target(k) for k in (0, 5, 10, 50)] == [0.0, 0.4, 0.8, 0.8]
    assert ConsaController(ConsaConfig(target_warmup_iters=0), total_cost=8).target(0) == 0.75


def test_dual_step_and_penalty():
    cfg = ConsaConfig(target_sparsity=0.5, target_warmup_iters=0, lagrangian_lr=0.1, lagrangian_rho=4.0)
    c = ConsaController(cfg, total_cost=8)
    rec = c.dual_step(0.7)
    assert rec["lambda1"] == pytest.approx(0.1 * 0.2) and rec["dual_step"]
    assert rec["lambda2"] == pytest.approx(0.1 * 0.04)
    assert c.iteration == 1 and c.s_hat_history == [[0, 0.7]]
    s = torch.tensor(0.6, requires_grad=True)
    pen = c.penalty(s)
    pen.backward()
    quad = 4.0 / 2 + 0.004  # rho/2 + lambda2
    assert pen.item() == pytest.approx(0.02 * 0.1 + quad * 0.01)
    assert s.grad.item() == pytest.approx(0.02 + 2 * quad * 0.1)


def test_quadratic_weight_acts_from_iteration_zero():
    """Before any dual step the penalty already pulls s_hat towards the target (rho/2 * gap^2)."""
    c = ConsaController(ConsaConfig(target_sparsity=0.5, target_warmup_iters=0, lagrangian_rho=100.0), total_cost=8)
    s = torch.tensor(0.3, requires_grad=True)
    c.penalty(s).backward()
    assert (c.lambda1, c.lambda2) == (0.0, 0.0)
    assert s.grad.item() == pytest.approx(100.0 * (0.3 - 0.5))


def test_no_dual_step_during_warmup_or_on_a_skipped_step():
    c = ConsaController(ConsaConfig(target_sparsity=0.5, target_warmup_iters=3, lagrangian_lr=1.0), total_cost=8)
    for k in range(3):  # the ramp: anti-windup keeps the multipliers still
        assert not c.dual_step(0.9)["dual_step"]
    assert (c.lambda1, c.lambda2) == (0.0, 0.0)
    rec = c.dual_step(0.6, applied=False)  # the optimizer skipped this step
    assert not rec["dual_step"] and (c.lambda1, c.lambda2) == (0.0, 0.0)
    assert c.dual_step(0.6)["dual_step"] and c.lambda1 == pytest.approx(0.1)
    assert [k for k, _ in c.s_hat_history] == [0, 1, 2, 3, 4]  # every iteration is recorded
    plain = ConsaController(
        ConsaConfig(target_sparsity=0.5, target_warmup_iters=3, lagrangian_lr=1.0, integrate_during_warmup=True),
        total_cost=8,
    )
    plain.dual_step(0.9)
    assert plain.lambda1 == pytest.approx(0.9)  # gap against t(0) = 0


def test_state_dict_round_trip():
    cfg = ConsaConfig(target_sparsity=0.5)
    c = ConsaController(cfg, total_cost=8)
    for s in (0.1, 0.3, 0.6):
        c.dual_step(s)
    d = copy.deepcopy(c.state_dict())
    c2 = ConsaController(cfg, total_cost=8)
    c2.load_state_dict(d)
    assert c2.state_dict() == c.state_dict() and len(c2.s_hat_history) == 3
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


def test_pipeline_stages_record_the_same_s_hat_bits():
    """Four pipeline stages of very different FA cost, with the real reduction's semantics
    (a float64 sum returned in the input's dtype): every stage records the same s_hat, bit
    for bit, the float64 total's, so their multipliers never drift apart. Rebuilt from each
    stage's float32 share it differed in the last bit at some of these splits."""
    cfg = ConsaConfig(granularity="kv_head", target_sparsity=0.5, target_warmup_iters=0)
    gen = torch.Generator().manual_seed(0)
    for trial in range(300):
        stages = [ToyGates(1, 8, cfg, first_unit=8 * i) for i in range(4)]
        with torch.no_grad():
            for i, g in enumerate(stages):  # stage costs from all-SWA-ish to all-FA-ish
                g.log_alpha.copy_(torch.randn(8, generator=gen) * 4 + (i - 1.5) * 3)
        costs = [ConsaController(cfg, total_cost=32).local_fa_cost([g]).detach() for g in stages]

        def reduce(x):
            return sum(c.double() for c in costs).to(x.dtype)

        values = []
        for g in stages:
            ctl = ConsaController(cfg, total_cost=32, cost_all_reduce=reduce)
            values.append(ctl.constraint_loss([g])[1])
            ctl.dual_step(values[-1])
        truth = 1.0 - float(sum(c.double() for c in costs)) / 32
        assert values == [truth] * 4, (trial, values)


def test_judge_settling_reads_the_tail_not_one_sample():
    def history(values):
        return [[k, v] for k, v in enumerate(values)]

    settled = judge_settling(history([0.2] * 10 + [0.5] * 90), target_sparsity=0.5, warmup_iters=10,
                             tail_fraction=0.1, tolerance=0.01)
    assert settled.settled and settled.first_iteration == 91 and settled.last_iteration == 100  # (iterations done)
    # a limit cycle of amplitude 0.05 that crosses the target at the very last step
    cycle = [0.5 + 0.05 * math.sin(2 * math.pi * k / 8) for k in range(100)]
    cycle[-1] = 0.5
    report = judge_settling(history(cycle), target_sparsity=0.5, warmup_iters=10, tail_fraction=0.1, tolerance=0.01)
    assert not report.settled and "did not settle" in report.describe() and report.max_gap > 0.04
    with pytest.raises(AllocationError, match="did not settle"):
        Allocation.from_log_alpha(torch.tensor([[3.0, -8.0], [-8.0, 3.0]]), target_sparsity=0.5,
                                  granularity="kv_head", num_kv_heads=2, window=8, settle=report)
    # a tail that reaches back into the warm-up is not judged as settled
    early = judge_settling(history([0.5] * 20), target_sparsity=0.5, warmup_iters=19, tail_fraction=0.1,
                           tolerance=0.01)
    assert not early.settled and "warm-up" in early.describe()
    assert "(iterations 19..20," in early.describe()  # (numbered as the log lines: the step at index k is k + 1)
    # the boundary: the step at index warmup_iters (iteration warmup_iters + 1) is the first at the final target
    edge = judge_settling(history([0.5] * 20), target_sparsity=0.5, warmup_iters=18, tail_fraction=0.1,
                          tolerance=0.01)
    assert edge.settled and (edge.first_iteration, edge.last_iteration) == (19, 20), edge
    assert "over iterations 19..20 " in edge.describe()
    assert not judge_settling([], target_sparsity=0.5, warmup_iters=0, tail_fraction=0.1, tolerance=0.01).settled
    # a non-finite s_hat anywhere in the tail (a run trained on with --no-check-for-nan-in-loss-and-grad) never
    # settles: max() and > let a NaN by
    for at in (18, 19):
        values = [0.5] * 20
        values[at] = float("nan")
        diverged = judge_settling(history(values), target_sparsity=0.5, warmup_iters=2, tail_fraction=0.1,
                                  tolerance=0.01)
        assert not diverged.settled and f"s_hat was not finite at iteration {at + 1}" in diverged.describe(), at


def test_unrepresentable_target_is_refused_naming_the_nearest():
    cfg = ConsaConfig(granularity="layer", target_sparsity=0.875)
    with pytest.raises(ConsaConfigError, match=r"target_sparsity.*nearest representable targets are 0\.75"):
        cfg.check_target_representable(num_layers=4, num_kv_heads=4)
    ConsaConfig(granularity="kv_head", target_sparsity=0.875).check_target_representable(num_layers=4, num_kv_heads=4)
    with pytest.raises(ConsaConfigError, match=r"0\.666667 and 0\.833333"):
        ConsaConfig(granularity="layer", target_sparsity=0.7).check_target_representable(num_layers=6, num_kv_heads=2)
    with pytest.raises(AllocationError, match="not representable"):
        Allocation.from_log_alpha(torch.zeros(4), target_sparsity=0.875, granularity="layer", num_kv_heads=4, window=8)


TOY_SHAPES = [(4, 4), (8, 4), (16, 8), (28, 8)]
TOY_TARGETS = [0.25, 0.5, 0.75, 0.875]


@pytest.mark.parametrize("mode", ["gates_only", "joint"])
@pytest.mark.parametrize("granularity", ["layer", "kv_head"])
def test_defaults_settle_within_1000_iterations_on_the_whole_grid(granularity, mode):
    """Every shape x representable target, every controller and optimizer default (only target and granularity set):
    s_hat within 0.01 of the target from some iteration before 1000 to the end, tail judged settled, finalize exact,
    and the units kept FA are the important ones."""
    ran = 0
    for L, G in TOY_SHAPES:
        units = L if granularity == "layer" else L * G
        for target in TOY_TARGETS:
            if abs((1 - target) * units - round((1 - target) * units)) > 1e-9:
                continue  # unrepresentable: refused up front (test above)
            cfg = ConsaConfig(granularity=granularity, target_sparsity=target)
            # 1100 iterations: settled from before 1000 on is then a claim the run can fail
            run = run_toy(cfg, num_layers=L, num_kv_heads=G, iterations=1100, mode=mode)
            case = f"{L}x{G} {granularity} {mode} t={target}"
            assert run.settle_iteration is not None and run.settle_iteration < 1000, case
            assert run.report.settled, f"{case}: {run.report.describe()}"
            la = run.gates.log_alpha.detach()
            s_now = expected_sparsity(la, run.gates.gate_unit_cost, L * G).item()
            assert abs(s_now - target) <= cfg.settle_tolerance, case
            alloc = Allocation.from_log_alpha(la.view(L, -1), target_sparsity=target, granularity=granularity,
                                              num_kv_heads=G, window=64, settle=run.report)
            assert alloc.achieved_sparsity == pytest.approx(target, abs=1e-12), case
            fa = alloc.fa_tensor().flatten() if granularity == "kv_head" else alloc.fa_tensor()[:, 0]
            imp = run.gates.importance
            assert imp[fa].mean() > imp[~fa].mean(), case
            ran += 1
    assert ran >= 12


def test_controller_state_resumes_the_same_trajectory():
    """A controller restored from another's state (with the gates as they were) continues
    on exactly the trajectory the original takes: multipliers, noise, s_hat."""
    cfg = ConsaConfig(granularity="kv_head", target_sparsity=0.5, target_warmup_iters=20)
    whole = run_toy(cfg, num_layers=4, num_kv_heads=2, iterations=60)
    ctl2 = ConsaController(cfg, total_cost=8)
    ctl2.load_state_dict(copy.deepcopy(whole.controller.state_dict()))
    assert (ctl2.lambda1, ctl2.lambda2, ctl2.iteration) == (whole.controller.lambda1, whole.controller.lambda2, 60)
    assert ctl2.s_hat_history == whole.controller.s_hat_history
    assert math.isfinite(ctl2.lambda1) and ctl2.lambda2 >= 0
    gates2 = copy.deepcopy(whole.gates)
    for ctl, gates in ((whole.controller, whole.gates), (ctl2, gates2)):  # 10 more steps of each, the same way
        opt = torch.optim.SGD(gates.parameters(), lr=0.1)
        for _ in range(10):
            ctl.begin_iteration([gates])
            penalty, s_hat = ctl.constraint_loss([gates])
            opt.zero_grad()
            penalty.backward()
            opt.step()
            ctl.dual_step(s_hat)
    assert ctl2.s_hat_history == whole.controller.s_hat_history and len(ctl2.s_hat_history) == 70
    assert (ctl2.lambda1, ctl2.lambda2) == (whole.controller.lambda1, whole.controller.lambda2)
    assert torch.equal(gates2.log_alpha, whole.gates.log_alpha)
