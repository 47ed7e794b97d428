"""A megatron-consa checkpoint as one in-process model (for export and generation).

`read_checkpoint_info` reads what a checkpoint directory says about itself
(architecture, allocation, dtype); `one_rank_model` builds a TP1/PP1 model with
its weights in a one-rank world: megatron-core's dist_checkpointing merges the
shards of any TP/PP layout on load.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import torch

from megatron_consa.allocation import Allocation
from megatron_consa.architecture import ArchitectureConfig
from megatron_consa.config import ConsaConfig
from megatron_consa.conversion.importer import ALLOCATION_FILE


@dataclass(frozen=True)
class CheckpointInfo:
    """What a checkpoint directory says about itself."""

    path: Path
    """The checkpoint directory (a `--save` directory resolved to its latest iteration)."""
    meta: dict
    """Its consa_run.json."""
    arch: ArchitectureConfig
    allocation: Optional[Allocation]
    """The allocation asked for, else the checkpoint's own (`checkpoint_allocation`), else None (all FA)."""
    dtype: torch.dtype
    """The dtype its weights were trained or converted in."""

    @property
    def unfinalized_gates(self) -> bool:
        """A learning run's checkpoint (trained gates, no allocation yet) read without an
        allocation: its model here is all FA, not the hybrid its gates lean towards."""
        return (self.allocation is None and (self.meta.get("consa") or {}).get("allocation") is None
                and bool(self.meta.get("iteration")) and "conversion" not in self.meta)

    def warn_if_unfinalized(self, logger, what: str) -> None:
        """Say so when `unfinalized_gates`: `what` (the export, generation) runs all FA."""
        if self.unfinalized_gates:
            logger.warning(
                "%s is a learning run's checkpoint: its gates are not an allocation yet, so %s is all full "
                "attention; for the hybrid model, finalize it first (tools/finalize_allocation.py) and use the "
                "finalized checkpoint, or pass --allocation", self.path, what)


def read_checkpoint_info(load: str | Path, allocation: Optional[str | Path] = None) -> CheckpointInfo:
    """Read `load` (`FileNotFoundError` when it is not a megatron-consa checkpoint); `allocation`
    overrides the checkpoint's own (checked against the architecture)."""
    from megatron_consa.training.checkpoint import read_checkpoint_meta, resolve_load_dir

    path = resolve_load_dir(load)
    meta = read_checkpoint_meta(path)
    if meta is None:
        raise FileNotFoundError(f"{path} is not a megatron-consa checkpoint (no consa_run.json)")
    arch = ArchitectureConfig.from_record(meta.get("architecture"), str(path))
    alloc = Allocation.load(allocation) if allocation else checkpoint_allocation(path, meta)
    if alloc is not None:
        alloc.check_compatible(arch.num_layers, arch.num_kv_heads)
    return CheckpointInfo(path=path, meta=meta, arch=arch, allocation=alloc, dtype=_checkpoint_dtype(meta))


def checkpoint_allocation(path: Path, meta: dict) -> Optional[Allocation]:
    """The allocation a checkpoint runs, from its consa_run.json `meta`: an import's
    allocation.json (a sliding-window source), else the fixed allocation it was saved with
    (finalize's checkpoint, a fixed phase); None for all FA or a learn phase's gates."""
    if meta.get("allocation"):
        return Allocation.load(path / ALLOCATION_FILE)
    consa = meta.get("consa") or {}
    fa = consa.get("allocation")
    if fa is None:
        return None
    return Allocation(granularity=consa.get("granularity", "kv_head"), num_layers=len(fa), num_kv_heads=len(fa[0]),
                      window=consa["window"], sink_tokens=consa.get("sink_tokens", 0), target_sparsity=None,
                      fa=[list(r) for r in fa], source="checkpoint").validate()


def _checkpoint_dtype(meta: dict) -> torch.dtype:
    conversion, training = meta.get("conversion") or {}, meta.get("training") or {}
    if conversion.get("dtype") in ("float32", "bfloat16", "float16"):
        return getattr(torch, conversion["dtype"])
    return torch.bfloat16 if training.get("bf16") else torch.float16 if training.get("fp16") else torch.float32


def fixed_consa_config(arch: ArchitectureConfig, allocation: Optional[Allocation]) -> ConsaConfig:
    """Fixed mode with `allocation` (window and sinks included), or all FA without one (torch backend)."""
    if allocation is None:
        return ConsaConfig(allocation=[[1] * arch.num_kv_heads] * arch.num_layers, backend="torch")
    return ConsaConfig(
        window=allocation.window, sink_tokens=allocation.sink_tokens, allocation=allocation.fa, backend="torch"
    )


def load_model(info: CheckpointInfo, consa: ConsaConfig, *, dtype: Optional[torch.dtype] = None) -> torch.nn.Module:
    """A TP1/PP1 GPTModel (eval mode) with the checkpoint's weights; needs a one-rank world.

    The weights are not drawn at random first (`perform_initialization=False`):
    the load overwrites every tensor.
    """
    from megatron_consa.model import build_gpt_model, build_transformer_config
    from megatron_consa.training.checkpoint import load_model_weights

    config = build_transformer_config(info.arch, consa, params_dtype=dtype or info.dtype, perform_initialization=False)
    model = build_gpt_model(config, info.arch, use_transformer_engine=False)
    load_model_weights([model], info.path)
    return model.eval()


@contextlib.contextmanager
def one_rank_model(info: CheckpointInfo, consa: ConsaConfig, *, dtype: Optional[torch.dtype] = None) -> Iterator[torch.nn.Module]:
    """`load_model` alive inside a one-rank world.

    Reuses a one-rank world that is already initialised (a test process);
    otherwise starts one and tears it down on exit.
    """
    from megatron_consa.conversion.world import conversion_world

    with conversion_world():
        yield load_model(info, consa, dtype=dtype)


__all__ = ["CheckpointInfo", "checkpoint_allocation", "fixed_consa_config", "load_model", "one_rank_model", "read_checkpoint_info"]
