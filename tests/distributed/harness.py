"""Spawned gloo ranks for distributed tests.

`launch("scenario_name", world_size, out_dir, **kwargs)` starts `world_size`
processes with the spawn start method (not fork: megatron-core and gloo keep
threads), meeting at a file in `out_dir` (a FileStore: no TCP port to race other
processes for), each running
`tests/distributed/scenarios.py::<scenario_name>(out_dir=..., **kwargs)`.
Whatever a rank's scenario returns comes back in a list indexed by rank. A
rank that raises fails the launch with its traceback.

A launch costs ~6 s on 2 cores, so scenarios group many checks per launch.
"""

from __future__ import annotations

import importlib
import os
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

HERE = Path(__file__).resolve().parent


def _entry(rank: int, world_size: int, rendezvous: str, scenario: str, out_dir: str, kwargs: dict) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    sys.path.insert(0, str(HERE))
    import megatron_consa  # noqa: F401  (megatron.core importable without triton)
    from megatron_consa.training.config import ParallelConfig
    from megatron_consa.training.parallel import distributed_backend

    import torch.distributed as dist

    # the world scenarios' initialize_distributed calls find started
    dist.init_process_group(distributed_backend(), init_method=Path(rendezvous).as_uri(), rank=rank,
                            world_size=world_size,
                            timeout=timedelta(minutes=ParallelConfig().distributed_timeout_minutes))

    fn = getattr(importlib.import_module("scenarios"), scenario)
    result = fn(out_dir=out_dir, **kwargs)
    torch.save(result, Path(out_dir) / f"result-rank{rank}.pt")
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def launch(scenario: str, world_size: int, out_dir: str | os.PathLike, **kwargs: Any) -> list[Any]:
    """Run a scenario on `world_size` spawned ranks; returns each rank's result."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rendezvous = out / "rendezvous"
    rendezvous.unlink(missing_ok=True)  # a file left by an earlier launch would hold its keys
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.start_processes(
        _entry,
        args=(world_size, str(rendezvous.resolve()), scenario, str(out), kwargs),
        nprocs=world_size,
        join=True,
        start_method="spawn",
    )
    return [torch.load(out / f"result-rank{r}.pt", weights_only=False) for r in range(world_size)]
