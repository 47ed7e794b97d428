"""Process groups for ConSA: initialisation, the pipeline cost reduction, the consistency guard."""

from __future__ import annotations

import logging
import os
from datetime import timedelta
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
from torch import Tensor

from megatron_consa.compat import apply_cpu_shims, compute_device, distributed_backend, has_cuda
from megatron_consa.training.config import ParallelConfig

logger = logging.getLogger(__name__)


PIPELINE_SEED_STRIDE = 100
"""Each pipeline stage seeds its weight initialisation with seed + stride * pp_rank
(megatron-LM's convention), so stages do not draw the same weights."""


DETERMINISTIC_ENV = {"NCCL_ALGO": "Ring", "NVTE_ALLOW_NONDETERMINISTIC_ALGO": "0", "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
"""What `apply_deterministic_mode` sets where the environment does not (Megatron-LM's values)."""
_DETERMINISTIC_VALUES = {  # (every NCCL_ALGO token must be one of these: Megatron-LM's accepted set)
    "NCCL_ALGO": {"Ring", "CollnetDirect", "CollnetChain", "^NVLS"},
    "NVTE_ALLOW_NONDETERMINISTIC_ALGO": {"0"},
    "CUBLAS_WORKSPACE_CONFIG": {":4096:8", ":16:8"},
}


def apply_deterministic_mode(env=os.environ) -> None:
    """Make this process's training bit-exact reproducible (`TrainingConfig.deterministic_mode`),
    as Megatron-LM's `--deterministic-mode`: torch's deterministic algorithms (an operation
    without one then raises instead of running), and the NCCL, Transformer Engine and cuBLAS
    settings of `DETERMINISTIC_ENV` where `env` does not set them. A value set that is not
    deterministic (e.g. NCCL_ALGO=Tree) is an error naming it. Call it before the process group
    and the first CUDA kernel: those libraries read the environment once."""
    check_deterministic_env(env)
    for name, value in DETERMINISTIC_ENV.items():
        env.setdefault(name, value)
    torch.use_deterministic_algorithms(True)


def check_deterministic_env(env=os.environ) -> None:
    """A ValueError naming the variable if `env` sets one of `DETERMINISTIC_ENV`'s to a value that is
    not deterministic."""
    for name, accepted in _DETERMINISTIC_VALUES.items():
        value = env.get(name)
        if value is None:
            continue
        tokens = [t.strip() for t in value.split(",") if t.strip()] if name == "NCCL_ALGO" else [value]
        if not tokens or any(t not in accepted for t in tokens):
            raise ValueError(f"--deterministic-mode: {name}={value!r} is not deterministic; unset it (the default is "
                             f"{DETERMINISTIC_ENV[name]}) or set it to one of {', '.join(sorted(accepted))}")


def device() -> torch.device:
    """The device this rank computes on (its GPU, or the CPU)."""
    return compute_device()


def initialize_distributed(parallel: ParallelConfig, *, seed: int, init_method: str | None = None) -> None:
    """Start torch.distributed and megatron-core's parallel state.

    NCCL on GPUs, gloo on a CPU (with megatron_consa.compat's shims applied).
    The world comes from torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR,
    MASTER_PORT); `init_method` (e.g. ``file:///tmp/x/rendezvous``) replaces
    MASTER_ADDR/MASTER_PORT for ranks a process spawns itself. Safe to call
    again with another layout (every rank at the same point): the previous
    model-parallel state and its process groups are destroyed first, the world
    kept. Models, optimizers and checkpoint writers of the previous layout hold
    its groups: build them anew.
    """
    apply_cpu_shims()
    timeout = timedelta(minutes=parallel.distributed_timeout_minutes)
    if not dist.is_initialized():
        if has_cuda():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size == 1:
            # one process: an in-memory store, no TCP port to race other processes for (a port
            # found free can be taken before the store binds it)
            dist.init_process_group(distributed_backend(), store=dist.HashStore(), rank=0, world_size=1,
                                    timeout=timeout)
        elif init_method is not None:
            dist.init_process_group(distributed_backend(), init_method=init_method, rank=int(os.environ["RANK"]),
                                    world_size=world_size, timeout=timeout)
        else:
            dist.init_process_group(distributed_backend(), timeout=timeout)
    if parallel_state.model_parallel_is_initialized():
        destroy_model_parallel()
    initialize_model_parallel(
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_model_parallel_size,
    )
    # Same weights on every data-parallel replica; TP ranks get their own RNG stream.
    stage_seed = seed + PIPELINE_SEED_STRIDE * parallel_state.get_pipeline_model_parallel_rank()
    torch.manual_seed(stage_seed)
    model_parallel_cuda_manual_seed(stage_seed)


_MODEL_PARALLEL_GROUPS: list = []
"""The process groups megatron-core's `initialize_model_parallel` made in `initialize_distributed`."""


def _process_groups() -> list:
    # (torch keeps no public list; megatron-core's destroy_model_parallel reads the same map)
    return list(dist.distributed_c10d._world.pg_map)


def initialize_model_parallel(**kwargs) -> None:
    """megatron-core's `initialize_model_parallel(**kwargs)`, its process groups recorded for
    `destroy_model_parallel`."""
    before = set(_process_groups())
    parallel_state.initialize_model_parallel(**kwargs)
    _MODEL_PARALLEL_GROUPS[:] = [g for g in _process_groups() if g not in before]


def destroy_model_parallel() -> None:
    """megatron-core's `destroy_model_parallel`, and the process groups it made destroyed too.

    megatron-core forgets most of its groups without destroying them, and each gloo group keeps
    its threads (its work loop's and its transport's) for as long as the process lives. A process
    that sets up layouts again and again (a test suite, a benchmark of several models) piled up
    thousands of them, and its steps slowed down 2-3x. A destroyed group's threads end once
    nothing holds the group."""
    parallel_state.destroy_model_parallel()
    alive = set(_process_groups())
    for group in _MODEL_PARALLEL_GROUPS:
        if group in alive and group is not dist.GroupMember.WORLD:
            dist.destroy_process_group(group)
    _MODEL_PARALLEL_GROUPS.clear()


def pipeline_cost_all_reduce() -> Callable[[Tensor], Tensor]:
    """Sum a scalar over the pipeline-parallel group (the controller's global FA cost), in
    float64, returned in the input's dtype (the controller passes float64: the same bits on
    every stage)."""
    group = parallel_state.get_pipeline_model_parallel_group()
    size = parallel_state.get_pipeline_model_parallel_world_size()

    def reduce(x: Tensor) -> Tensor:
        if size == 1:
            return x
        y = x.detach().to(device=device(), dtype=torch.float64).clone()
        dist.all_reduce(y, group=group)
        return y.to(x.dtype).to(x.device)

    return reduce


def last_stage_sums_to_all(values: Optional[Sequence[float]], size: int) -> list[float]:
    """`size` numbers known on the last pipeline stage (None elsewhere), summed over its DP
    replicas, on every rank."""
    t = torch.zeros(size, dtype=torch.float64, device=device())
    if values is not None:
        t += torch.tensor([float(v) for v in values], dtype=torch.float64, device=t.device)
    if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        dist.all_reduce(t, group=parallel_state.get_data_parallel_group())
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        last = parallel_state.get_pipeline_model_parallel_last_rank()
        dist.broadcast(t, src=last, group=parallel_state.get_pipeline_model_parallel_group())
    return t.tolist()


class AllocationMismatchError(RuntimeError):
    """Ranks that must hold identical gates do not."""


class ReplicaMismatchError(RuntimeError):
    """Data-parallel replicas that must hold identical weights do not."""


def check_weights_consistent(chunks: Sequence[torch.nn.Module], *, iteration: int) -> None:
    """Raise ReplicaMismatchError on every rank unless each rank's parameters (weights and
    gates) are bit-identical to its data-parallel replica 0's (Megatron-LM's
    `--check-weight-hash-across-dp-replicas-interval`): megatron-core's SHA-1 of each
    parameter, compared over the data-parallel group. The verdict, with the parameters
    megatron-core found differing, is gathered over the world: every rank raises, naming them."""
    import re

    from megatron.core.utils import check_param_hashes_across_dp_replicas

    mcore_log = logging.getLogger("megatron.core.utils")  # (where megatron-core names them, at INFO)
    found: list[str] = []
    catch = logging.Handler(logging.INFO)
    catch.emit = lambda record: found.extend(re.findall(r"Hash not matching for (\S+) in", record.getMessage()))
    level = mcore_log.level
    mcore_log.setLevel(logging.INFO)
    mcore_log.addHandler(catch)
    try:
        same = check_param_hashes_across_dp_replicas(list(chunks), cross_check=False)
    finally:
        mcore_log.removeHandler(catch)
        mcore_log.setLevel(level)
    verdicts: list = [None] * dist.get_world_size()
    dist.all_gather_object(verdicts, (bool(same), found))
    differing = {rank: names for rank, (ok, names) in enumerate(verdicts) if not ok}
    if differing:
        which = "; ".join(f"rank {rank}: {', '.join(names[:3]) or '?'}" + (f" and {len(names) - 3} more"
                          if len(names) > 3 else "") for rank, names in differing.items())
        raise ReplicaMismatchError(
            f"iteration {iteration}: ranks {sorted(differing)} hold weights that differ from their data-parallel "
            f"replica 0's ({which}); replicas must stay bit-identical: check that every rank runs the same code "
            "and settings, and the hardware of those ranks"
        )


def check_gates_consistent(gate_params: Sequence[Tensor], *, iteration: int) -> None:
    """Raise AllocationMismatchError on every rank unless all gate replicas are bit-identical.

    Gates are replicated over tensor-parallel and data-parallel ranks; each
    replica set is compared with an all-gather of the raw bits. Every rank runs
    the same collectives whatever it finds, and the verdict is agreed over the
    world, so a mismatch raises everywhere (no rank is left waiting).
    """
    if not gate_params:
        flat = torch.zeros(0, dtype=torch.float32, device=device())
    else:
        flat = torch.cat([p.detach().float().reshape(-1) for p in gate_params]).to(device())
    problems = []
    for name, group in (
        ("tensor-parallel", parallel_state.get_tensor_model_parallel_group()),
        ("data-parallel", parallel_state.get_data_parallel_group()),
    ):
        size = dist.get_world_size(group)
        if size == 1:
            continue
        gathered = [torch.empty_like(flat) for _ in range(size)]
        dist.all_gather(gathered, flat, group=group)
        ranks = dist.get_process_group_ranks(group)
        reference = gathered[0].view(torch.int32)
        bad = [ranks[i] for i, g in enumerate(gathered) if not torch.equal(g.view(torch.int32), reference)]
        if bad:
            problems.append(f"{name} group {ranks}: ranks {bad} disagree with rank {ranks[0]}")
    flag = torch.tensor([float(bool(problems))], device=device())
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if flag.item() == 0:
        return
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, problems)
    found = sorted({p for rank_problems in everyone for p in rank_problems})
    raise AllocationMismatchError(
        f"iteration {iteration}: ConSA gates that must be identical differ: {'; '.join(found)}. "
        "Replicated gates must stay bit-identical; check that every rank runs the same code, "
        "seeds, data and controller state"
    )
