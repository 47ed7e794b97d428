"""Floating-point operations of a training iteration, for the log's TFLOP/s per GPU (what
Megatron-LM's `--log-throughput` reports), with each sliding-window head costed at the
(query, key) pairs it really attends.

The count is Megatron-LM's `num_floating_point_operations` for a dense GPT (every matrix
product three times, forward and two backward, at two operations a multiply-add: the
QKV, output and SwiGLU projections, the output layer, and attention's two products over
the attended pairs), with one change: attention's pairs are counted exactly per head,
`s(s+1)/2` for a causal full-attention head (Megatron-LM counts `s^2/2`, 1/s more or less)
and, for a sliding-window head, each query's window (itself and the W-1 keys before it)
plus the sinks before the window. A fixed allocation costs each KV group's query heads as
its type; a learning run counts every head as full attention (the FLOPs of the model it
starts from; the gates' branches are not counted).
"""

from __future__ import annotations

from typing import Optional, Sequence

from megatron_consa.architecture import ArchitectureConfig


def attended_pairs(seq_length: int, window: Optional[int] = None, sink_tokens: int = 0) -> int:
    """(query, key) pairs one head attends over a sequence: causal full attention (`window`
    None), or a window of `window` keys (the query included) plus the first `sink_tokens`
    keys where they lie before the window."""
    s = seq_length
    if window is None or window >= s:
        return s * (s + 1) // 2
    in_window = window * (window + 1) // 2 + (s - window) * window
    past = s - window  # queries whose window starts after key 0: t = 1 .. past keys before it
    sinks = min(sink_tokens, past)
    return in_window + sinks * (sinks + 1) // 2 + (past - sinks) * sink_tokens


def iteration_flops(arch: ArchitectureConfig, *, seq_length: int, global_batch_size: int,
                    allocation: Optional[Sequence[Sequence[int]]] = None, window: Optional[int] = None,
                    sink_tokens: int = 0, weight_gradients: bool = True) -> float:
    """Floating-point operations of one training iteration (forward and backward) over the
    global batch; `allocation` (num_layers rows of per-KV-group 1 = FA / 0 = SWA) with its
    `window` and `sink_tokens`, or None: every head FA. Without `weight_gradients` (frozen
    weights: gates-only training) the projections' backward computes input gradients only
    (nominally in every layer: autograd also skips the first layer's, 1-2% of a deep model)."""
    h, s, d = arch.hidden_size, seq_length, arch.head_dim
    q, kv = arch.num_attention_heads * d, arch.num_kv_heads * d
    per_group = arch.num_attention_heads // arch.num_kv_heads
    full = attended_pairs(s)
    sliding = full if window is None else attended_pairs(s, window, sink_tokens)
    # per token: the projections of every layer and the output layer (multiply-adds)
    dense = arch.num_layers * (h * (q + 2 * kv) + q * h + 3 * h * arch.intermediate_size) + h * arch.vocab_size
    pairs = 0  # (query head, key) pairs per sequence, over the layers
    for layer in range(arch.num_layers):
        row = [1] * arch.num_kv_heads if allocation is None else allocation[layer]
        pairs += per_group * sum(full if fa else sliding for fa in row)
    # x2 operations per multiply-add; x3 for forward + backward (x2 without weight gradients); attention's
    # scores and values products: x3 either way (the backward needs the gradients of q, k, v)
    passes = 3 if weight_gradients else 2
    return 2.0 * global_batch_size * (passes * s * dense + 3 * 2 * pairs * d)
