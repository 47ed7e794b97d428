"""Compatibility layer between megatron_consa and the installed megatron-core.

Two jobs:

* ``ensure_importable()`` - make ``import megatron.core`` work without triton (CPU / CI).
  Call it before anything imports megatron.core; it imports neither torch nor megatron.
* ``apply_cpu_shims()`` - make megatron-core run on a CPU with gloo (no-op returning False
  when CUDA is available). See :mod:`megatron_consa.compat.cpu` for every shim and the
  megatron-core file:line it covers.

Public API::

    MCORE_TESTED_VERSIONS               # ("0.19",): megatron-core minors this was tested on
    mcore_version() -> str              # installed megatron-core version (no import of it)
    mcore_version_tested() -> bool      # its "major.minor" is in MCORE_TESTED_VERSIONS
    ensure_importable() -> bool
    apply_cpu_shims() -> bool
    cpu_shims_active() -> bool
    seed_cpu_rng(seed, **kw)            # == megatron's model_parallel_cuda_manual_seed, shimmed
    cuda_to_cpu_mode()                  # context manager: device mapping for another thread
    CpuSequenceParallelNorm             # torch LN/RMSNorm accepting sequence_parallel
    torch_adam_fallback() -> bool       # megatron-core runs torch's Adam (no apex/TE: CPU, or a GPU without them)
    prepare_distrib_optimizer_for_load(optimizer) -> int
    fix_param_steps_after_load(optimizer, step=None) -> int
    patch_fp32_param_checkpointing(optimizer) -> int   # float32 gates in a bf16/fp16 model's checkpoint
"""

from __future__ import annotations

from megatron_consa.compat.importable import (
    PAGED_STASH_OPS_MODULE,
    TritonKernelUnavailable,
    ensure_importable,
    paged_stash_stub_installed,
    triton_available,
)

MCORE_TESTED_VERSIONS = ("0.19",)


def mcore_version() -> str:
    """Version string of the installed megatron-core, read without importing it."""
    try:
        from importlib.metadata import PackageNotFoundError, version

        return version("megatron-core")
    except PackageNotFoundError:
        ensure_importable()
        from megatron.core.package_info import __version__

        return __version__


def mcore_version_tested(version: str | None = None) -> bool:
    """Whether ``version`` (default: the installed one) is a megatron-core minor release
    listed in ``MCORE_TESTED_VERSIONS``. The shims target file:line positions of those
    releases; on any other version re-run ``tests/unit/test_compat.py``."""
    version = mcore_version() if version is None else version
    major_minor = ".".join(version.split(".")[:2])
    return major_minor in MCORE_TESTED_VERSIONS


from megatron_consa.compat.cpu import (  # noqa: E402  (torch import after the light API)
    CpuEvent,
    CpuSequenceParallelNorm,
    CpuStream,
    CudaToCpuMode,
    apply_cpu_shims,
    cpu_shims_active,
    cuda_to_cpu_mode,
    cuda_to_cpu_mode_active,
    fix_param_steps_after_load,
    prepare_distrib_optimizer_for_load,
    seed_cpu_rng,
    torch_adam_fallback,
)
from megatron_consa.compat.optimizer import patch_fp32_param_checkpointing  # noqa: E402

__all__ = [
    "MCORE_TESTED_VERSIONS",
    "mcore_version",
    "mcore_version_tested",
    "ensure_importable",
    "paged_stash_stub_installed",
    "triton_available",
    "PAGED_STASH_OPS_MODULE",
    "TritonKernelUnavailable",
    "apply_cpu_shims",
    "cpu_shims_active",
    "seed_cpu_rng",
    "cuda_to_cpu_mode",
    "cuda_to_cpu_mode_active",
    "CudaToCpuMode",
    "CpuSequenceParallelNorm",
    "CpuStream",
    "CpuEvent",
    "torch_adam_fallback",
    "prepare_distrib_optimizer_for_load",
    "fix_param_steps_after_load",
    "patch_fp32_param_checkpointing",
]


def has_cuda() -> bool:
    """The one CPU-vs-GPU question the rest of the package asks (device, backend, fusions)."""
    import torch

    return torch.cuda.is_available()


def compute_device():
    """This rank's device: its GPU (torch.cuda.current_device()) or the CPU."""
    import torch

    return torch.device("cuda", torch.cuda.current_device()) if has_cuda() else torch.device("cpu")


def distributed_backend() -> str:
    """NCCL on GPUs, gloo on a CPU."""
    return "nccl" if has_cuda() else "gloo"
