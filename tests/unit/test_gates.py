"""Hard-concrete gate math against Monte-Carlo and closed forms."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_consa.gates import (
    HardConcrete,
    counter_uniform,
    deterministic_z,
    expected_sparsity,
    fa_budget,
    prob_nonzero,
    sample_z,
)

HC = HardConcrete()


@pytest.mark.parametrize("log_alpha", [-3.0, 0.0, 2.0, 5.0])
def test_monte_carlo_matches_prob_nonzero(log_alpha):
    n = 200_000
    u = torch.rand(n, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    la = torch.full((n,), log_alpha, dtype=torch.float64)
    z = sample_z(la, u, HC)
    freq = (z > 0).double().mean().item()
    p = prob_nonzero(torch.tensor(log_alpha, dtype=torch.float64), HC).item()
    assert abs(freq - p) < 0.01
    # and the closed form itself: P(z>0) = sigmoid(log_alpha - beta*log(-gamma/zeta))
    assert p == pytest.approx(1 / (1 + math.exp(-(log_alpha - (2 / 3) * math.log(0.1 / 1.1)))), rel=1e-12)


def test_sample_is_clamped_and_has_exact_zeros_and_ones():
    u = torch.linspace(1e-6, 1 - 1e-6, 10001)
    z = sample_z(torch.zeros_like(u), u, HC)
    assert z.min() == 0.0 and z.max() == 1.0
    assert ((z > 0) & (z < 1)).any()


def test_gradients_reach_log_alpha():
    la = torch.tensor([-1.0, 0.0, 1.5], requires_grad=True)
    u = torch.tensor([0.3, 0.5, 0.6])
    z = sample_z(la, u, HC)
    (z.sum() + expected_sparsity(la, 2, 6, HC)).backward()
    assert la.grad is not None and torch.all(la.grad != 0)


def test_expected_sparsity_with_unit_costs():
    la = torch.tensor([10.0, -10.0, 0.0])
    cost = torch.tensor([1.0, 1.0, 2.0])
    p = prob_nonzero(la, HC)
    expect = 1 - (p * cost).sum() / 4
    assert expected_sparsity(la, cost, 4, HC).item() == pytest.approx(expect.item())


def test_deterministic_z_saturates():
    assert deterministic_z(torch.tensor(3.0), HC).item() == 1.0
    assert deterministic_z(torch.tensor(-3.0), HC).item() == 0.0
    mid = deterministic_z(torch.tensor(0.0), HC).item()
    assert mid == pytest.approx(0.5 * 1.2 - 0.1)


@pytest.mark.parametrize("layers,heads,granularity", [(28, 8, "layer"), (28, 8, "kv_head"), (7, 2, "layer")])
@pytest.mark.parametrize("target", [0.0, 0.25, 0.5, 0.75, 0.875, 0.99])
def test_finalize_meets_budget_exactly(layers, heads, granularity, target):
    from megatron_consa.allocation import finalize_topk

    units = layers if granularity == "layer" else layers * heads
    la = torch.randn(units, generator=torch.Generator().manual_seed(units))
    fa = torch.tensor(finalize_topk(la if granularity == "layer" else la.view(layers, heads), target_sparsity=target,
                                    granularity=granularity, num_kv_heads=heads), dtype=torch.bool)
    mask = fa[:, 0] if granularity == "layer" else fa.flatten()
    k = math.floor((1 - target) * units + 0.5)
    assert int(mask.sum()) == k
    # the kept units are the k largest
    if 0 < k < units:
        assert la[mask].min() > la[~mask].max()


def test_topk_ties_go_to_lower_index():
    from megatron_consa.allocation import finalize_topk

    scores = [[1.0, 2.0, 2.0, 2.0, 0.0]]
    assert finalize_topk(scores, target_sparsity=0.6, granularity="kv_head", num_kv_heads=5) == [[0, 1, 1, 0, 0]]


def test_fa_budget_rounds_half_up():
    assert fa_budget(0.5, 10, 2) == 3  # (1-0.5)*5 = 2.5 -> 3
    assert fa_budget(0.75, 224, 1) == 56


def test_counter_noise_is_a_pure_function():
    a = counter_uniform(5, 3, torch.arange(100))
    b = counter_uniform(5, 3, torch.arange(100))
    assert torch.equal(a, b)
    # a unit's value does not depend on which other units are asked for
    assert torch.equal(counter_uniform(5, 3, [42, 7]), a[[42, 7]])
    assert not torch.equal(a, counter_uniform(5, 4, torch.arange(100)))
    assert not torch.equal(a, counter_uniform(6, 3, torch.arange(100)))
    big = counter_uniform(0, 0, torch.arange(200_000))
    assert big.min() >= 1e-6 and big.max() <= 1 - 1e-6
    assert abs(big.mean().item() - 0.5) < 0.005
    assert abs((big < 0.1).float().mean().item() - 0.1) < 0.005
