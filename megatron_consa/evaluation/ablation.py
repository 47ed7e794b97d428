"""Single-unit ablation: the loss increase when one unit alone is switched to SWA.

An oracle-style reference ranking: for every unit (a KV head, or a layer),
the model runs with that unit SWA and every other unit FA, and the score is

    loss(unit SWA, rest FA) - loss(all FA)

where loss is the mean next-token NLL on the positions beyond the window
(`megatron_consa.evaluation.perplexity`; the only positions the switch can
change). It costs one evaluation per unit (L x G at kv_head granularity), so
it is a reference to judge cheaper rankings by, not a preset of its own: its
`UnitScores` (kind `ablation`) feed the `heuristic` preset like the
calibration scores do, giving the "ablation top-K" allocation at any budget.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from megatron_consa.allocation import num_units
from megatron_consa.evaluation.models import CheckpointModels, model_logits_fn
from megatron_consa.evaluation.perplexity import evaluate_perplexity
from megatron_consa.unit_scores import UnitScores

Grid = list[list[int]]


def single_unit_swa(unit: int, *, granularity: str, num_layers: int, num_kv_heads: int) -> Grid:
    """All FA except `unit` (layer-major index at `granularity`), which is SWA."""
    fa = [[1] * num_kv_heads for _ in range(num_layers)]
    if granularity == "layer":
        fa[unit] = [0] * num_kv_heads
    else:
        fa[unit // num_kv_heads][unit % num_kv_heads] = 0
    return fa


def ablation_scores(loss_for: Callable[[Grid], float], *, granularity: str, num_layers: int, num_kv_heads: int,
                    window: int, sink_tokens: int = 0,
                    progress: Optional[Callable[[int], None]] = None) -> UnitScores:
    """`ablation` unit scores: ``loss_for(grid)`` per single-unit-SWA grid minus ``loss_for(all FA)``.

    `progress(1)` after each of the ``1 + units`` evaluations.
    """
    base = loss_for([[1] * num_kv_heads for _ in range(num_layers)])
    if progress is not None:
        progress(1)
    scores = [[0.0] * num_kv_heads for _ in range(num_layers)]
    for unit in range(num_units(granularity, num_layers, num_kv_heads)):
        increase = loss_for(single_unit_swa(unit, granularity=granularity, num_layers=num_layers,
                                            num_kv_heads=num_kv_heads)) - base
        if granularity == "layer":
            scores[unit] = [increase] * num_kv_heads
        else:
            scores[unit // num_kv_heads][unit % num_kv_heads] = increase
        if progress is not None:
            progress(1)
    return UnitScores(kind="ablation", granularity=granularity, num_layers=num_layers, num_kv_heads=num_kv_heads,
                      window=window, sink_tokens=sink_tokens, scores=scores,
                      metadata={"base_loss": base}).validate()


def checkpoint_ablation(models: CheckpointModels, sequences: torch.Tensor, *, granularity: str, window: int,
                        sink_tokens: int = 0, batch_size: int = 1,
                        progress: Optional[Callable[[int], None]] = None) -> UnitScores:
    """:func:`ablation_scores` of a checkpoint: loss = mean NLL beyond the window on ``sequences``."""
    if sequences.shape[1] - 1 <= window + sink_tokens:
        raise ValueError(f"sequences of {sequences.shape[1] - 1} tokens have no position beyond window {window} + "
                         f"sinks {sink_tokens}: use longer sequences")

    def loss_for(fa: Sequence[Sequence[int]]) -> float:
        model = models.model(fa, window=window, sink_tokens=sink_tokens)
        result = evaluate_perplexity(model_logits_fn(model), sequences, window=window, sink_tokens=sink_tokens,
                                     batch_size=batch_size)
        return result.mean_nll_beyond_window

    scores = ablation_scores(loss_for, granularity=granularity, num_layers=models.arch.num_layers,
                             num_kv_heads=models.arch.num_kv_heads, window=window, sink_tokens=sink_tokens,
                             progress=progress)
    scores.metadata.update(sequences=int(sequences.shape[0]), seq_length=int(sequences.shape[1] - 1))
    return scores


__all__ = ["ablation_scores", "checkpoint_ablation", "single_unit_swa"]
