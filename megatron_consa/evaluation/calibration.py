"""Calibration for the `heuristic` preset: each KV head's attention mass beyond the window.

In a dense (all-FA) model, for every layer ``l``, KV head ``g``, query head
``h`` of that group and query position ``p``, the softmax attention
``a[p, j] = softmax_j(q_p . k_j * scale)`` over the causal keys ``j <= p``. The
*mass beyond the window* is the attention on the keys an SWA head with window
``W`` and ``S`` sinks would not see::

    m(p) = sum of a[p, j] over j <= p - W and j >= S

The score of unit ``(l, g)`` is the mean of ``m(p)`` over the query heads of the
group, the positions ``p >= W + S`` (the only ones with such keys) and the
calibration sequences: the share of its attention an SWA version of the head
would lose. Larger = needs FA more, which is what the `heuristic` preset ranks by.

The probabilities are computed from the query and key the core attention
receives (after QK-norm and RoPE), by a forward pre-hook on each
`ConsaCoreAttention`; the model's own forward is unchanged. Queries are taken
in blocks, so memory is ``O(block x s)`` per head, never ``O(s^2)`` at once.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from megatron_consa.evaluation.models import model_logits_fn
from megatron_consa.unit_scores import UnitScores

DEFAULT_QUERY_BLOCK = 256
"""Query positions whose attention rows are formed at once."""


def far_attention_mass(query: Tensor, key: Tensor, *, scale: float, window: int, sink_tokens: int = 0,
                       query_block: int = DEFAULT_QUERY_BLOCK) -> Tensor:
    """Attention mass beyond the window per query head and position.

    `query` [s, b, np, d] and `key` [s, b, ng, d] in megatron-core's layout (query
    head h reads KV group h // (np / ng)). Returns [b, ng, np / ng, s] float32:
    0 where the position has no key beyond the window.
    """
    s, b, num_heads, d = query.shape
    num_groups = key.shape[2]
    rep = num_heads // num_groups
    q = query.permute(1, 2, 0, 3).float().reshape(b, num_groups, rep, s, d)  # [b, ng, rep, s, d]
    k = key.permute(1, 2, 0, 3).float()  # [b, ng, s, d]
    out = torch.zeros(b, num_groups, rep, s, dtype=torch.float32, device=query.device)
    for start in range(window + sink_tokens, s, query_block):  # earlier positions see every key
        stop = min(s, start + query_block)
        scores = torch.einsum("bgrqd,bgkd->bgrqk", q[:, :, :, start:stop], k[:, :, :stop]) * scale
        p = torch.arange(start, stop, device=query.device)[:, None]
        j = torch.arange(stop, device=query.device)[None, :]
        visible = j <= p
        far = visible & (p - j >= window) & (j >= sink_tokens)
        lse_all = scores.masked_fill(~visible, float("-inf")).logsumexp(-1)
        lse_far = scores.masked_fill(~far, float("-inf")).logsumexp(-1)
        out[..., start:stop] = (lse_far - lse_all).exp()
    return out


@torch.no_grad()
def attention_mass_scores(model: torch.nn.Module, sequences: Tensor, *, window: int, sink_tokens: int = 0,
                          batch_size: int = 1, query_block: int = DEFAULT_QUERY_BLOCK,
                          progress: Optional[Callable[[int], None]] = None) -> UnitScores:
    """The `attention_mass` unit scores of a dense one-rank model on ``sequences`` ([N, s + 1]).

    Run it on the all-FA model: in a hybrid one the later layers' queries would
    depend on which heads are windowed. `progress(n)` after each batch of n rows.
    """
    from megatron_consa.model import consa_attention_modules

    modules = consa_attention_modules([model])
    if not modules:
        raise ValueError("the model has no ConsaCoreAttention layers (build it with megatron_consa.model)")
    if any(m.tp_size != 1 for m in modules):
        raise ValueError("calibration needs a one-rank (TP=1) model: load the checkpoint with CheckpointModels")
    seq_length = sequences.shape[1] - 1
    positions = seq_length - (window + sink_tokens)
    if positions < 1:
        raise ValueError(f"sequences of {seq_length} tokens have no position beyond window {window} + sinks "
                         f"{sink_tokens}: use longer sequences")
    num_layers, num_kv_heads = len(modules), modules[0].num_kv_heads
    totals = torch.zeros(num_layers, num_kv_heads, dtype=torch.float64)

    def hook(module, args, kwargs):
        query = args[0] if len(args) > 0 else kwargs["query"]
        key = args[1] if len(args) > 1 else kwargs["key"]
        mass = far_attention_mass(query, key, scale=module.softmax_scale, window=window, sink_tokens=sink_tokens,
                                  query_block=query_block)
        # (the groups as the layer stores them: a reordered fixed model's are not in megatron's order)
        totals[module.layer_index, list(module.local_groups)] += mass.sum(dim=(0, 2, 3)).double().cpu()

    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in modules]
    logits = model_logits_fn(model)
    try:
        for start in range(0, sequences.shape[0], batch_size):
            batch = sequences[start:start + batch_size, :-1]
            logits(batch)
            if progress is not None:
                progress(batch.shape[0])
    finally:
        for h in handles:
            h.remove()
    per_unit = sequences.shape[0] * modules[0].heads_per_group * positions
    return UnitScores(
        kind="attention_mass", granularity="kv_head", num_layers=num_layers, num_kv_heads=num_kv_heads,
        window=window, sink_tokens=sink_tokens, scores=(totals / per_unit).tolist(),
        metadata={"sequences": int(sequences.shape[0]), "seq_length": seq_length, "positions_per_sequence": positions},
    ).validate()


__all__ = ["DEFAULT_QUERY_BLOCK", "attention_mass_scores", "far_attention_mass"]
