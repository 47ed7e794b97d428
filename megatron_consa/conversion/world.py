"""The process group a conversion rank runs in (gloo on a CPU, NCCL on GPUs)."""

from __future__ import annotations

import contextlib
import os
import socket
from typing import Iterator

import torch.distributed as dist

CONVERSION_SEED = 1234
"""Seed of the throw-away random initialisation the loaded weights replace."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def conversion_world(*, rank: int, world_size: int, port: int, tp: int = 1, pp: int = 1) -> Iterator[None]:
    """megatron-core's parallel state for one conversion rank; torn down afterwards.

    Reuses an already initialised torch.distributed world (one rank, e.g. a
    test process) and leaves megatron-core's state initialised in it; otherwise
    starts a world and destroys it on exit.
    """
    from megatron.core import parallel_state  # here, not at import: the tools' --help stays quiet

    from megatron_consa.training.config import ParallelConfig
    from megatron_consa.training.parallel import initialize_distributed

    started = not dist.is_initialized()
    if started:
        os.environ.update(
            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank)
        )
    initialize_distributed(ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp), seed=CONVERSION_SEED)
    try:
        yield
    finally:
        if started:
            parallel_state.destroy_model_parallel()
            dist.destroy_process_group()
