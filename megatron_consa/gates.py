"""Hard-concrete L0 gates (Louizos et al. 2018), as used by CoFi / Sheared-LLaMA.

Pure math on tensors: no modules, no process groups. One gate per unit
(a layer, or a (layer, KV head) pair) with a float32 parameter `log_alpha`.
z = 1 means full attention (FA), z = 0 sliding-window attention (SWA).

    training sample:  u ~ U(eps, 1-eps)
                      s = sigmoid((log u - log(1-u) + log_alpha) / beta)
                      z = clamp(s * (zeta - gamma) + gamma, 0, 1)
    P(z > 0)        = sigmoid(log_alpha - beta * log(-gamma / zeta))
    expected sparsity s_hat = 1 - sum_i cost_i P(z_i > 0) / sum_i cost_i
    evaluation      z = clamp(sigmoid(log_alpha) * (zeta - gamma) + gamma, 0, 1)
    finalize        the K = round((1 - t) * total_cost / unit_cost) units with
                    the largest log_alpha are FA (ties: lower unit index wins):
                    `fa_budget` and `rank_units` here, applied by
                    `megatron_consa.allocation.finalize_topk`

The uniform noise comes from `counter_uniform`, a counter-based generator keyed
by (seed, iteration, global unit index): the same unit draws the same u on every
rank, in every recomputation and under any parallel layout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


@dataclass(frozen=True)
class HardConcrete:
    """The hard-concrete constants (defaults as in Louizos et al. and CoFi)."""

    gamma: float = -0.1
    zeta: float = 1.1
    beta: float = 2.0 / 3.0
    eps: float = 1e-6

    @classmethod
    def from_config(cls, config) -> "HardConcrete":
        return cls(gamma=config.hc_gamma, zeta=config.hc_zeta, beta=config.hc_beta, eps=config.hc_eps)

    @property
    def log_ratio(self) -> float:
        """beta * log(-gamma / zeta): the shift between log_alpha and logit P(z > 0)."""
        return self.beta * math.log(-self.gamma / self.zeta)


def sample_z(log_alpha: Tensor, u: Tensor, hc: HardConcrete = HardConcrete()) -> Tensor:
    """A training sample of z from given uniform noise u (same shape as log_alpha)."""
    u = u.to(log_alpha.dtype).clamp(hc.eps, 1.0 - hc.eps)
    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / hc.beta)
    return (s * (hc.zeta - hc.gamma) + hc.gamma).clamp(0.0, 1.0)


def deterministic_z(log_alpha: Tensor, hc: HardConcrete = HardConcrete()) -> Tensor:
    """The noise-free z used for evaluation while gates are still learning."""
    return (torch.sigmoid(log_alpha) * (hc.zeta - hc.gamma) + hc.gamma).clamp(0.0, 1.0)


def prob_nonzero(log_alpha: Tensor, hc: HardConcrete = HardConcrete()) -> Tensor:
    """P(z > 0) per unit: the probability that the unit keeps any full attention."""
    return torch.sigmoid(log_alpha - hc.log_ratio)


def expected_fa_cost(log_alpha: Tensor, unit_cost: float | Tensor, hc: HardConcrete = HardConcrete()) -> Tensor:
    """sum_i cost_i * P(z_i > 0): the expected KV-head cost kept at full attention."""
    return (prob_nonzero(log_alpha.float(), hc) * unit_cost).sum()


def expected_sparsity(
    log_alpha: Tensor, unit_cost: float | Tensor, total_cost: float, hc: HardConcrete = HardConcrete()
) -> Tensor:
    """s_hat = 1 - expected FA cost / total cost (differentiable in log_alpha)."""
    return 1.0 - expected_fa_cost(log_alpha, unit_cost, hc) / total_cost


def fa_budget(target_sparsity: float, total_cost: int, unit_cost: int) -> int:
    """K, the number of units that stay FA so the SWA share is the target.

    K = round((1 - t) * total_cost / unit_cost), rounding half up so the result
    is deterministic and documented (Python's round() would round half to even).
    """
    if not 0.0 <= target_sparsity <= 1.0:
        raise ValueError(f"target_sparsity={target_sparsity} must lie in [0, 1] (the SWA share of the KV-head cost)")
    num_units = total_cost // unit_cost
    # +1e-9: (1 - 0.9) * 5 is 0.4999... in floating point and must round to 1, not 0
    k = math.floor((1.0 - target_sparsity) * total_cost / unit_cost + 0.5 + 1e-9)
    return max(0, min(num_units, k))


def rank_units(scores) -> list[int]:
    """Unit indices by descending score, ties to the lower index (deterministic)."""
    values = [float(v) for v in (scores.detach().flatten().tolist() if isinstance(scores, Tensor) else scores)]
    return sorted(range(len(values)), key=lambda i: (-values[i], i))


# ---------------------------------------------------------------------------
# Counter-based noise.
# ---------------------------------------------------------------------------

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finalizer, vectorised over uint64 (wraps modulo 2**64)."""
    x = (x + np.uint64(0x9E3779B97F4A7C15)) & _MASK64
    x = ((x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK64
    x = ((x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK64
    return x ^ (x >> np.uint64(31))


def counter_uniform(seed: int, iteration: int, unit_ids: Tensor | list[int], eps: float = 1e-6) -> Tensor:
    """Uniform noise in [eps, 1-eps], a pure function of (seed, iteration, unit id).

    No generator state: every rank, every recomputation and every parallel
    layout draws the same value for the same global unit at the same iteration.
    Returns float32 on the CPU with the shape of `unit_ids`.
    """
    ids = torch.as_tensor(unit_ids, dtype=torch.int64).cpu()
    with np.errstate(over="ignore"):
        key = _splitmix64(np.array([seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))
        key = _splitmix64(key ^ np.uint64(iteration & 0xFFFFFFFFFFFFFFFF))
        x = _splitmix64(key ^ ids.numpy().astype(np.uint64).reshape(-1))
    # top 53 bits -> a double in [0, 1)
    u = (x >> np.uint64(11)).astype(np.float64) * (1.0 / 9007199254740992.0)
    u = np.clip(u, eps, 1.0 - eps)
    return torch.from_numpy(u.astype(np.float32)).view(ids.shape)
