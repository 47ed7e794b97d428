"""The banded CPU sliding-window kernel (``csrc/swa_cpu.cpp``), compiled on first use.

PyTorch's CPU flash-attention op has no window, so :mod:`.torch_attention` can
only feed it overlapping key chunks under an additive band mask; the C++
kernel here reads each query tile's window directly (no chunks, no mask on the
tiles inside the window, dK/dV accumulated in place) and is what
:func:`~megatron_consa.backends.torch_attention.sliding_window_attention` uses
on the CPU when it builds.

It is compiled with ``torch.utils.cpp_extension.load`` (ninja and a C++
compiler; about 40 s, once per machine and torch installation: torch caches
the build under ``$TORCH_EXTENSIONS_DIR``, by default
``~/.cache/torch_extensions``, and a file lock lets concurrent processes wait
for one build). torch runs ``ninja`` from ``PATH``; the ``ninja`` package
installed with this one is put there for the build when ``PATH`` has none (a
virtualenv's python run without activating it). The vector code is compiled for the CPU capability torch
itself dispatches to (``torch.backends.cpu.get_cpu_capability()``). The matrix
products run on oneDNN brgemm ukernels (torch's ``cpublas::brgemm``) in an
AVX-512 build: fp32, and bf16 on VNNI-packed blocks where the CPU has bf16 dot
products (AMX or AVX512-BF16); elsewhere (AVX2 builds) on the MKL that torch's
x86 builds carry (``brgemm_fp32``, ``bf16_dot_products`` say which, here).

``make install`` builds it (``python tools/build_cpu_kernel.py``).
``CONSA_CPU_SWA_KERNEL=0`` turns it off (the flash-op path runs instead);
``CONSA_CPU_SWA_KERNEL=1`` makes a failed build an error instead of a logged warning.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import shutil
from pathlib import Path
from typing import Optional

import torch

logger = logging.getLogger(__name__)

ENV_VAR = "CONSA_CPU_SWA_KERNEL"
SOURCE = Path(__file__).with_name("csrc") / "swa_cpu.cpp"

# ATen's vector headers pick their implementation from CPU_CAPABILITY_* macros, as
# torch's own kernels are compiled once per capability.
_CAPABILITY_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mavx2",
               "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"],
    "AVX2": ["-mavx2", "-mfma", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
}


class ExtensionUnavailable(RuntimeError):
    """The C++ kernel could not be built or loaded here."""


def mode() -> str:
    """How `CONSA_CPU_SWA_KERNEL` asks for the kernel: "off", "required" or "auto"."""
    value = os.environ.get(ENV_VAR, "auto").strip().lower()
    if value in ("0", "off", "false", "no"):
        return "off"
    if value in ("1", "on", "true", "yes", "required"):
        return "required"
    if value in ("", "auto"):
        return "auto"
    raise ValueError(f"{ENV_VAR}={value!r}: use 0 (off), 1 (required) or auto")


def capability() -> str:
    """The vector flavour to compile for: AVX512, AVX2 or DEFAULT (torch's own dispatch)."""
    cap = torch.backends.cpu.get_cpu_capability().upper()
    if cap.startswith("AVX512"):
        return "AVX512"
    return "AVX2" if cap.startswith("AVX2") else "DEFAULT"


def module_name() -> str:
    """The compiled module's name, which is also its cache folder: per CPU capability, torch
    version (a module built against other torch headers must not be loaded), torch
    installation and source file (two virtualenvs with the same torch, or two checkouts of
    this repository, would otherwise rewrite each other's build files, with their own include
    paths or source path, and rebuild at every switch)."""
    version = "".join(c if c.isalnum() else "_" for c in torch.__version__)
    where = hashlib.sha1("\0".join(str(p) for p in (Path(torch.__file__).resolve().parent, SOURCE.resolve()))
                         .encode()).hexdigest()[:8]
    return f"consa_swa_cpu_{capability().lower()}_torch{version}_{where}"


@contextlib.contextmanager
def ninja_on_path():
    """``PATH`` with a ``ninja`` on it while the block runs, where the ``ninja`` package has one
    and ``PATH`` has none (torch's build runs ``ninja`` from ``PATH``, and a virtualenv's
    ``bin`` is not on it unless the virtualenv is activated); ``PATH`` as it was afterwards."""
    old = os.environ.get("PATH")
    try:
        import ninja  # the PyPI package: the binary and its folder
    except ImportError:
        ninja = None
    if shutil.which("ninja") is None and ninja is not None and shutil.which("ninja", path=ninja.BIN_DIR):
        os.environ["PATH"] = os.pathsep.join([ninja.BIN_DIR] + ([old] if old else []))
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("PATH", None)
        else:
            os.environ["PATH"] = old


def build(name: str, source: Path):
    """Compile ``source`` (this module's kernel, or another version of it: a benchmark's
    baseline) as the extension module ``name``, for this machine's capability."""
    from torch.utils.cpp_extension import load

    # -fopenmp: at::parallel_for is inline and runs serially in code compiled without it.
    flags = ["-O3", "-std=c++17", "-fno-math-errno", "-fopenmp"] + _CAPABILITY_FLAGS.get(capability(), [])
    with ninja_on_path():
        return load(name=name, sources=[str(source)], extra_cflags=flags, extra_ldflags=["-fopenmp"], verbose=False)


@functools.lru_cache(maxsize=1)
def _build():
    return build(module_name(), SOURCE)


@functools.lru_cache(maxsize=1)
def _load_or_none() -> Optional[object]:
    try:
        return _build()
    except Exception as exc:  # noqa: BLE001 - any build/link failure means "not here"
        if mode() == "required":
            raise ExtensionUnavailable(f"the CPU SWA kernel did not build ({ENV_VAR}=1): {exc}") from exc
        # logged, not warnings.warn: the entry points filter warnings, and a run on the slower
        # path must say so
        logger.warning(
            "the C++ CPU sliding-window kernel did not build (%s: %s); using the slower flash-op path. "
            "Set %s=0 to skip the build, or %s=1 to make this an error.",
            type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "", ENV_VAR, ENV_VAR,
        )
        return None


def extension() -> Optional[object]:
    """The compiled module (``forward``, ``backward``), or None where it is off or did not build."""
    if mode() == "off":
        return None
    return _load_or_none()


def supports(dtype: torch.dtype) -> bool:
    return dtype in (torch.float32, torch.float64, torch.bfloat16)


def brgemm_fp32() -> bool:
    """Whether the kernel here runs its fp32 products on oneDNN brgemm (AVX-512 builds)."""
    ext = extension()
    return ext is not None and ext.brgemm_fp32()


def compute_dtype(dtype: torch.dtype, head_dim: int, backward: bool = False) -> torch.dtype:
    """The dtype the kernel computes a ``dtype`` call's forward (or ``backward``) in: fp32 for
    bf16 where it runs bf16 on its fp32 brgemm products (an AVX-512 build where the CPU has no
    bf16 dot products, or the head dim is not a multiple of 64), else ``dtype``. The tile
    heuristic follows it (:func:`.cpu_q_tile`)."""
    ext = extension()
    if dtype == torch.bfloat16 and ext is not None and ext.bf16_as_fp32(head_dim, backward):
        return torch.float32
    return dtype


def bf16_dot_products(head_dim: int, backward: bool = False) -> bool:
    """Whether the bf16 forward (or ``backward``) runs on AVX512-BF16 dot products without AMX
    here (AMD Zen 4)."""
    ext = extension()
    if ext is None:
        return False
    return ext.packs_bf16_backward(head_dim) if backward else ext.packs_bf16(head_dim) and not ext.amx_bf16()
