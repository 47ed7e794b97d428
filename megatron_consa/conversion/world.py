"""The process group a conversion rank runs in (gloo on a CPU, NCCL on GPUs)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator, Optional

import torch.distributed as dist

CONVERSION_SEED = 1234
"""Seed of the throw-away random initialisation the loaded weights replace."""


@contextlib.contextmanager
def conversion_world(
    *, rank: int = 0, world_size: int = 1, rendezvous: Optional[Path] = None, tp: int = 1, pp: int = 1
) -> Iterator[None]:
    """megatron-core's parallel state for one conversion rank; torn down afterwards.

    Reuses an already initialised torch.distributed world (one rank, e.g. a
    test process) and leaves megatron-core's state initialised in it; otherwise
    starts a world and destroys it on exit. One rank needs nothing to meet on (an
    in-memory store); several meet at `rendezvous`, a file path no rank has used
    (torch's FileStore: no TCP port another process could take first).
    """
    # here, not at import: the tools' --help stays quiet
    from megatron_consa.training.config import ParallelConfig
    from megatron_consa.training.parallel import destroy_model_parallel, initialize_distributed

    started = not dist.is_initialized()
    if started:
        if world_size > 1 and rendezvous is None:
            raise ValueError(f"conversion_world: world_size={world_size} needs a rendezvous file")
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    initialize_distributed(
        ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp),
        seed=CONVERSION_SEED,
        init_method=None if rendezvous is None else Path(rendezvous).resolve().as_uri(),
    )
    try:
        yield
    finally:
        if started:
            destroy_model_parallel()
            dist.destroy_process_group()
