"""The log's FLOP count (training/flops.py): Megatron-LM's formula for full attention, each
sliding-window head at the pairs the reference mask lets it see."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from attention_reference import visible_mask  # noqa: E402

from megatron_consa.architecture import ArchitectureConfig  # noqa: E402
from megatron_consa.training.flops import attended_pairs, iteration_flops  # noqa: E402

ARCH = ArchitectureConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_layers=6,
                          num_attention_heads=16, num_kv_heads=4, head_dim=64)


def megatron_lm_flops(arch: ArchitectureConfig, batch: int, seq: int) -> float:
    """Megatron-LM's num_floating_point_operations (training.py) for a dense GPT with GQA and SwiGLU."""
    query_projection_size = arch.head_dim * arch.num_attention_heads
    ratio = query_projection_size / arch.hidden_size
    return 12 * batch * seq * arch.num_layers * arch.hidden_size ** 2 * (
        (1 + arch.num_kv_heads / arch.num_attention_heads + seq / arch.hidden_size / 2) * ratio
        + (arch.intermediate_size / arch.hidden_size) * 3 / 2
        + arch.vocab_size / (2 * arch.num_layers * arch.hidden_size)
    )


@pytest.mark.parametrize("seq,window,sinks", [(64, 16, 0), (64, 16, 4), (64, 16, 60), (64, 8, 20), (64, 64, 0),
                                              (64, 100, 3), (50, 1, 0), (50, 7, 7), (33, 32, 1)])
def test_attended_pairs_are_the_reference_masks(seq, window, sinks):
    assert attended_pairs(seq, window, sinks) == int(visible_mask(seq, window, sinks).sum())
    assert attended_pairs(seq) == int(visible_mask(seq, seq, 0).sum())  # causal


def test_full_attention_is_megatron_lms_count_with_exact_causal_pairs():
    """Megatron-LM counts s^2/2 pairs per head, here s(s+1)/2: the difference is s/2 pairs per head
    and layer, nothing else."""
    batch, seq = 8, 4096
    ours = iteration_flops(ARCH, seq_length=seq, global_batch_size=batch)
    extra = 6 * batch * 2 * ARCH.num_layers * ARCH.num_attention_heads * ARCH.head_dim * (seq / 2)
    assert ours == pytest.approx(megatron_lm_flops(ARCH, batch, seq) + extra, rel=1e-12)


def test_a_hybrid_allocation_costs_each_groups_query_heads_at_its_pairs():
    batch, seq, window, sinks = 4, 2048, 256, 4
    allocation = [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1], [0, 1, 0, 1], [0, 0, 0, 1]]
    swa_groups = sum(row.count(0) for row in allocation)
    full = iteration_flops(ARCH, seq_length=seq, global_batch_size=batch)
    hybrid = iteration_flops(ARCH, seq_length=seq, global_batch_size=batch, allocation=allocation, window=window,
                             sink_tokens=sinks)
    saved_pairs = attended_pairs(seq) - int(visible_mask(seq, window, sinks).sum())
    per_group = ARCH.num_attention_heads // ARCH.num_kv_heads
    assert full - hybrid == pytest.approx(6 * batch * 2 * ARCH.head_dim * per_group * swa_groups * saved_pairs,
                                          rel=1e-12)


def test_frozen_weights_drop_the_weight_gradient_products_only():
    """Gates-only training: the projections' backward computes input gradients only (2 of their 3
    passes); attention's products keep their three (the backward needs dq, dk, dv)."""
    batch, seq = 2, 1024
    both = iteration_flops(ARCH, seq_length=seq, global_batch_size=batch)
    frozen = iteration_flops(ARCH, seq_length=seq, global_batch_size=batch, weight_gradients=False)
    h, q, kv = ARCH.hidden_size, ARCH.num_attention_heads * ARCH.head_dim, ARCH.num_kv_heads * ARCH.head_dim
    projections = ARCH.num_layers * (h * (q + 2 * kv) + q * h + 3 * h * ARCH.intermediate_size) + h * ARCH.vocab_size
    assert both - frozen == pytest.approx(2 * batch * seq * projections, rel=1e-12)
