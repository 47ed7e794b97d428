"""Spawned gloo ranks for distributed tests.

`launch("scenario_name", world_size, out_dir, **kwargs)` starts `world_size`
processes with the spawn start method (not fork: megatron-core and gloo keep
threads), on a free local port, each running
`tests/distributed/scenarios.py::<scenario_name>(out_dir=..., **kwargs)`.
Whatever a rank's scenario returns comes back in a list indexed by rank. A
rank that raises fails the launch with its traceback.

A launch costs ~6 s on 2 cores, so scenarios group many checks per launch.
"""

from __future__ import annotations

import importlib
import os
import socket
import sys
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

HERE = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world_size: int, port: int, scenario: str, out_dir: str, kwargs: dict) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    torch.set_num_threads(1)
    sys.path.insert(0, str(HERE))
    import megatron_consa  # noqa: F401  (megatron.core importable without triton)

    fn = getattr(importlib.import_module("scenarios"), scenario)
    result = fn(out_dir=out_dir, **kwargs)
    torch.save(result, Path(out_dir) / f"result-rank{rank}.pt")
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def launch(scenario: str, world_size: int, out_dir: str | os.PathLike, **kwargs: Any) -> list[Any]:
    """Run a scenario on `world_size` spawned ranks; returns each rank's result."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.start_processes(
        _entry,
        args=(world_size, free_port(), scenario, str(out), kwargs),
        nprocs=world_size,
        join=True,
        start_method="spawn",
    )
    return [torch.load(out / f"result-rank{r}.pt", weights_only=False) for r in range(world_size)]
