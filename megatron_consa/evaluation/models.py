"""A checkpoint as one-rank models under any allocation, for evaluation and calibration.

`CheckpointModels` opens a megatron-consa checkpoint saved at any TP/PP layout
(training, finalize, or an imported Hugging Face model) inside a one-rank world:
each `model(...)` call builds a TP1/PP1 fixed-mode model with the allocation,
window and sinks asked for, and loads the checkpoint's weights into it through
megatron-core's dist_checkpointing (which merges the TP/PP shards). Every model
is therefore exactly the checkpoint, whatever ran before it. The weights are
not randomly initialised first (`perform_initialization=False`): the load
overwrites every tensor. A learning-phase checkpoint loads too (its gates are
skipped; pass the allocation to run).

Evaluation runs in float32 on the CPU (or the GPU when there is one and the
backend is torch); the model is in eval mode and its forward needs no grad.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from megatron_consa.allocation import Allocation
from megatron_consa.config import ConsaConfig

logger = logging.getLogger(__name__)

LogitsFn = Callable[[Tensor], Tensor]
"""tokens [b, s] (int64) -> logits [b, s, V] (float32)."""

Grid = Sequence[Sequence[int]]


def model_logits_fn(model: torch.nn.Module) -> LogitsFn:
    """The logits of a one-stage GPTModel, positions 0..s-1, causal (no explicit mask)."""

    def logits(tokens: Tensor) -> Tensor:
        device = next(model.parameters()).device
        tokens = tokens.to(device)
        positions = torch.arange(tokens.shape[1], device=device).unsqueeze(0).expand_as(tokens)
        return model(tokens, positions, attention_mask=None).float()

    return logits


class CheckpointModels:
    """One-rank fixed-mode models of a checkpoint under any allocation (see the module docstring).

    Use as a context manager (it holds the one-rank world; an already initialised
    one-rank world, e.g. a test's, is reused and left as it was)::

        with CheckpointModels("ckpt/fixed") as ckpt:
            logits = model_logits_fn(ckpt.model(all_fa_grid, window=64))(tokens)
    """

    def __init__(self, load: str | Path, *, dtype: torch.dtype = torch.float32):
        from megatron_consa.conversion.checkpoint_model import read_checkpoint_info

        self.info = read_checkpoint_info(load)
        self.path, self.meta, self.arch = self.info.path, self.info.meta, self.info.arch
        saved = self.meta.get("consa") or {}
        self.window: int = int(saved.get("window", ConsaConfig().window))
        """The window the checkpoint was trained (or imported) with."""
        self.sink_tokens: int = int(saved.get("sink_tokens", 0))
        self.dtype = dtype
        self._world: Optional[contextlib.ExitStack] = None

    # ---------------------------------------------------------------- what the checkpoint says

    def own_allocation(self) -> Optional[Allocation]:
        """The allocation the checkpoint runs: an import's `allocation.json`, or a fixed phase's; else None."""
        return self.info.allocation

    def tokenizer(self):
        """The tokenizer saved beside the weights (sentencepiece or Hugging Face), or None."""
        from megatron_consa.data.tokenizer import tokenizer_from_path

        return tokenizer_from_path(self.path, flag="--load")

    def all_fa(self) -> list[list[int]]:
        return [[1] * self.arch.num_kv_heads for _ in range(self.arch.num_layers)]

    # ---------------------------------------------------------------- models

    def __enter__(self) -> "CheckpointModels":
        from megatron_consa.conversion.world import conversion_world

        self._world = contextlib.ExitStack()
        self._world.enter_context(conversion_world())
        return self

    def __exit__(self, *exc) -> None:
        if self._world is not None:
            self._world.close()
            self._world = None

    def model(self, fa: Optional[Grid] = None, *, window: Optional[int] = None,
              sink_tokens: Optional[int] = None) -> torch.nn.Module:
        """A fixed-mode GPTModel with the checkpoint's weights (eval mode).

        `fa`: ``L x G`` 0/1 (default: the checkpoint's own allocation, else all FA);
        `window` / `sink_tokens`: default the checkpoint's.
        """
        if self._world is None:
            raise RuntimeError("CheckpointModels.model() needs the one-rank world: use `with CheckpointModels(...)`")
        from megatron_consa.compat import compute_device
        from megatron_consa.conversion.checkpoint_model import load_model

        if fa is None:
            own = self.own_allocation()
            fa = own.fa if own is not None else self.all_fa()
        consa = ConsaConfig(
            window=self.window if window is None else window,
            sink_tokens=self.sink_tokens if sink_tokens is None else sink_tokens,
            allocation=[list(map(int, row)) for row in fa],
            backend="torch",
        )
        return load_model(self.info, consa, dtype=self.dtype).to(compute_device())

    def allocation_model(self, allocation: Allocation) -> torch.nn.Module:
        """The model under `allocation` (its grid, window and sinks)."""
        allocation.check_compatible(self.arch.num_layers, self.arch.num_kv_heads)
        return self.model(allocation.fa, window=allocation.window, sink_tokens=allocation.sink_tokens)


__all__ = ["CheckpointModels", "LogitsFn", "model_logits_fn"]
