"""Runtime shims that let megatron-core 0.19 train on a CPU with the gloo backend.

``apply_cpu_shims()`` installs all of them, once per process, and only where
``torch.cuda.is_available()`` is False; on a CUDA machine it does nothing. Each shim
below names the megatron-core file:line it covers (paths inside the installed
``megatron/core/``, megatron-core 0.19.2).

The model behind the shims: on a CPU-only process the CPU *is* the device megatron
calls "cuda". ``torch.cuda.current_device()`` answers ``"cpu"``, tensors asked for on
"cuda" are made on the CPU, the "cuda" RNG is the CPU default generator, streams and
events are no-ops (CPU ops are synchronous).

Shims (the project notes in shared/MCORE_ON_CPU.md, "Needs a shim on CPU", items 1-6):

1. ``install_cpu_rng_tracker``      - RNG tracker keeping CPU generator states.
2. ``patch_cuda_device_queries``    - ``torch.cuda.current_device()`` -> ``"cpu"``.
3. ``patch_mask_builders``          - causal / sliding-window masks built on the CPU.
4. ``patch_torch_norm_sequence_parallel`` / ``CpuSequenceParallelNorm`` - torch norms
   with ``sequence_parallel=True``, params tagged ``.sequence_parallel`` like apex.
5. ``CudaToCpuMode`` (+ ``enter_cuda_to_cpu_mode``) - maps device "cuda" to "cpu" in
   factory functions, ``.to()``, ``.cuda()``; answers ``torch.cuda.*Tensor`` type strings
   to megatron's optimizer checks.
6. ``patch_cuda_streams``           - ``torch.cuda.synchronize`` no-op; ``Stream``,
   ``current_stream``, ``stream``, ``Event`` CPU stand-ins.

Item 8 (resuming the distributed optimizer with the torch-Adam fallback) is covered by
``prepare_distrib_optimizer_for_load`` and ``fix_param_steps_after_load``.

Threads: the device mapping of shim 5 is a ``TorchFunctionMode``; torch keeps those per
thread. ``apply_cpu_shims()`` enters it on the calling thread (normally the main thread;
autograd's backward inherits it). A worker thread that makes megatron tensors on "cuda"
should call ``apply_cpu_shims()`` itself or run under ``with cuda_to_cpu_mode():``. All
other shims are process-wide attribute patches and work from any thread.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import sys
import threading
import time
from typing import Any, Callable, Dict, Optional, Tuple

import torch

from megatron_consa.compat.importable import ensure_importable

logger = logging.getLogger(__name__)

__all__ = [
    "apply_cpu_shims",
    "cpu_shims_active",
    "cuda_to_cpu_mode_active",
    "cuda_to_cpu_mode",
    "enter_cuda_to_cpu_mode",
    "seed_cpu_rng",
    "CudaToCpuMode",
    "CpuSequenceParallelNorm",
    "CpuStream",
    "CpuEvent",
    "install_cpu_rng_tracker",
    "patch_cuda_device_queries",
    "patch_mask_builders",
    "patch_torch_norm_sequence_parallel",
    "patch_cuda_streams",
    "cpu_default_causal_mask",
    "cpu_sliding_window_causal_mask",
    "prepare_distrib_optimizer_for_load",
    "fix_param_steps_after_load",
    "original",
]

_LOCK = threading.RLock()
_INSTALLED = False
_TLS = threading.local()
# (id-free key "owner.attr") -> original object, filled by _patch(); see original().
_ORIGINALS: Dict[str, Any] = {}


def _patch(owner: Any, attr: str, new: Any) -> None:
    """Set ``owner.attr = new``, remembering the first original value."""
    key = f"{getattr(owner, '__name__', type(owner).__name__)}.{attr}"
    _ORIGINALS.setdefault(key, getattr(owner, attr, None))
    setattr(owner, attr, new)


def original(qualified_attr: str) -> Any:
    """The object a shim replaced, e.g. ``original("torch.cuda.current_device")``.

    Keys are ``"<module or class __name__>.<attr>"``; ``None`` when nothing was patched.
    """
    return _ORIGINALS.get(qualified_attr)


# ----------------------------------------------------------------------------------------
# Shim 1: RNG tracker on CPU generator states
# ----------------------------------------------------------------------------------------


def _cpu_get_rng_state(device: Any = "cuda", clone: bool = False, graph_safe: bool = False):
    """CPU replacement for ``tensor_parallel/random.py:104`` ``_get_cuda_rng_state``."""
    return torch.get_rng_state()


def _cpu_set_rng_state(new_state: torch.Tensor, device: Any = -1, graph_safe: bool = False):
    """CPU replacement for ``tensor_parallel/random.py:135`` ``_set_cuda_rng_state``."""
    torch.set_rng_state(new_state)


def _cpu_cuda_manual_seed(seed: int) -> None:
    """``torch.cuda.manual_seed`` on CPU: seed the CPU default generator.

    ``model_parallel_cuda_manual_seed`` (``tensor_parallel/random.py:490``) seeds the
    default "cuda" generator with the data-parallel seed; on CPU that generator is the
    CPU default generator. (``torch.cuda.manual_seed_all``, which ``torch.manual_seed``
    calls, is left alone.)
    """
    torch.default_generator.manual_seed(int(seed))


def _cpu_cuda_get_rng_state(device: Any = "cuda") -> torch.Tensor:
    return torch.get_rng_state()


def _cpu_cuda_set_rng_state(new_state: torch.Tensor, device: Any = "cuda") -> None:
    torch.set_rng_state(new_state)


def _cpu_tracker_add(self, name, seed):
    """``CudaRNGStatesTracker.add`` on CPU (replaces ``tensor_parallel/random.py:285``).

    Tracks a CPU generator state seeded with ``seed`` under ``name``; same bookkeeping and
    errors as megatron's. CUDA-graph-safe states do not exist on CPU and are ignored.
    """
    self._is_initialized = True
    if seed in self.seeds_:
        raise Exception('seed {} already exists'.format(seed))
    self.seeds_.add(seed)
    if name in self.states_:
        raise Exception('cuda rng state {} already exists'.format(name))
    self.states_[name] = torch.Generator().manual_seed(int(seed)).get_state()


@contextlib.contextmanager
def _cpu_tracker_fork(self, name=None):
    """``CudaRNGStatesTracker.fork`` on CPU (replaces ``tensor_parallel/random.py:311``).

    Runs the body with the CPU default generator set to state ``name`` and restores the
    previous state after, saving the advanced ``name`` state, like megatron's. Unlike it,
    it does not warn "CPU RNG state changed within GPU RNG context" (``:333``): on CPU the
    "cuda" generator *is* the CPU generator, so that would fire on every dropout.
    """
    if name is None:
        from megatron.core.tensor_parallel import random as mrandom

        name = mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME  # random.py:95
    if name not in self.states_:
        raise Exception('cuda rng state {} is not added'.format(name))
    orig_state = torch.get_rng_state()
    orig_state_name = self._current_state_name
    if orig_state_name != "default-rng":
        self.states_[orig_state_name] = orig_state
    torch.set_rng_state(self.states_[name])
    self._current_state_name = name
    try:
        yield
    finally:
        if self._current_state_name != name:
            raise Exception(
                f'current state name {self._current_state_name} is not the same as the '
                f'desired state name {name}.'
            )
        self.states_[name] = torch.get_rng_state()
        if orig_state_name != "default-rng":
            orig_state = self.states_[orig_state_name]
        torch.set_rng_state(orig_state)
        self._current_state_name = orig_state_name


def install_cpu_rng_tracker() -> None:
    """Shim 1: megatron's RNG tracker on CPU generator states.

    Covers ``megatron/core/tensor_parallel/random.py``:
    - ``:303-306`` ``CudaRNGStatesTracker.add`` calls ``torch.cuda.get_rng_state`` (asserts
      "Torch not compiled with CUDA enabled"): ``add`` and ``fork`` are replaced on the
      class itself, so every import path of the class (``megatron.core.tensor_parallel``,
      ``transformer/cuda_graphs.py:26``) and an already-created tracker get them;
    - ``:104``/``:135`` ``_get_cuda_rng_state``/``_set_cuda_rng_state`` (used by activation
      checkpointing, ``_get_all_rng_states``/``_set_all_rng_states`` ``:525/:535``, via
      module globals): replaced by CPU-generator versions;
    - ``:490`` ``model_parallel_cuda_manual_seed`` seeding the default "cuda" generator
      (``torch.cuda.manual_seed`` is a silent lazy no-op without CUDA): mapped to the CPU
      default generator.

    After this, stock ``model_parallel_cuda_manual_seed(seed)`` and
    ``get_cuda_rng_tracker().fork()`` work on CPU: the CPU default generator gets the
    data-parallel seed (``seed``), the tracker's ``model-parallel-rng`` state gets
    ``seed + 2718 + tp_rank``, ``expert-parallel-rng`` ``seed + 1024 + 100*ep_rank +
    etp_rank``: exactly the seeds megatron uses on CUDA. ``torch.cuda.get_rng_state`` /
    ``set_rng_state`` / ``manual_seed`` answer the CPU generator for other callers (e.g.
    megatron.training checkpointing); ``torch.cuda.manual_seed_all`` (called by
    ``torch.manual_seed``) is left alone.
    """
    ensure_importable()
    from megatron.core.tensor_parallel import random as mrandom

    _patch(mrandom.CudaRNGStatesTracker, "add", _cpu_tracker_add)
    _patch(mrandom.CudaRNGStatesTracker, "fork", _cpu_tracker_fork)
    _patch(mrandom, "_get_cuda_rng_state", _cpu_get_rng_state)
    _patch(mrandom, "_set_cuda_rng_state", _cpu_set_rng_state)
    _patch(torch.cuda, "manual_seed", _cpu_cuda_manual_seed)
    _patch(torch.cuda, "get_rng_state", _cpu_cuda_get_rng_state)
    _patch(torch.cuda, "set_rng_state", _cpu_cuda_set_rng_state)


def seed_cpu_rng(seed: int, **kwargs: Any) -> None:
    """Seed like megatron on CUDA: ``model_parallel_cuda_manual_seed(seed, **kwargs)``.

    Requires ``initialize_model_parallel`` first (it reads the TP/EP ranks). Applies the
    CPU shims if needed; on a CUDA machine this is just the stock call.
    """
    apply_cpu_shims()
    from megatron.core.tensor_parallel import random as mrandom

    mrandom.model_parallel_cuda_manual_seed(seed, **kwargs)


# ----------------------------------------------------------------------------------------
# Shim 2: torch.cuda.current_device() answers the CPU
# ----------------------------------------------------------------------------------------


def _cpu_current_device() -> str:
    """``torch.cuda.current_device()`` on CPU: ``"cpu"`` (valid for ``device=``, ``.to()``,
    ``torch.device()``). An int would not do: ``torch.device(0)`` raises without CUDA."""
    return "cpu"


def _cpu_set_device(device: Any) -> None:
    """``torch.cuda.set_device`` on CPU: nothing to select."""
    return None


def patch_cuda_device_queries() -> None:
    """Shim 2: ``torch.cuda.current_device()`` -> ``"cpu"``; ``torch.cuda.set_device`` no-op.

    Covers ~200 sites, first hit ``models/common/embeddings/rotary_pos_embedding.py:162``
    (``self.inv_freq.to(device=torch.cuda.current_device())``), then e.g.
    ``tensor_parallel/layers.py:305``, ``tensor_parallel/mappings.py:95``,
    ``transformer/attention.py:530``, ``models/gpt/gpt_model.py:452``,
    ``distributed/param_and_grad_buffer.py:1162``. Unshimmed it asserts "Torch not
    compiled with CUDA enabled". Sites that build ``f"cuda:{current_device()}"`` or
    ``torch.device("cuda", current_device())`` (FSDP, inference engines, nccl_allocator)
    remain CUDA-only.
    """
    _patch(torch.cuda, "current_device", _cpu_current_device)
    _patch(torch.cuda, "set_device", _cpu_set_device)


# ----------------------------------------------------------------------------------------
# Shim 3: attention masks built on the CPU
# ----------------------------------------------------------------------------------------


def cpu_default_causal_mask(sq: int) -> torch.Tensor:
    """CPU version of ``transformer/utils.py:37`` ``get_default_causal_mask`` (same values)."""
    return torch.triu(torch.ones(sq, sq, device="cpu"), diagonal=1).bool()


def cpu_sliding_window_causal_mask(sq, skv, window_size) -> torch.Tensor:
    """CPU version of ``transformer/utils.py:42`` ``get_sliding_window_causal_mask``."""
    m = torch.ones(sq, skv, dtype=torch.bool, device="cpu")
    mu = torch.triu(m, diagonal=skv - sq - window_size[0])
    ml = torch.tril(mu, diagonal=skv - sq + window_size[1])
    return ~ml


_MASK_BUILDERS = {
    "get_default_causal_mask": cpu_default_causal_mask,
    "get_sliding_window_causal_mask": cpu_sliding_window_causal_mask,
}


def patch_mask_builders() -> None:
    """Shim 3: causal and sliding-window masks on the CPU.

    Covers ``transformer/utils.py:39`` and ``:44`` (``torch.ones(..., device="cuda")``).
    Both functions are also bound by name in ``fusions/fused_softmax.py:8`` and called at
    ``:322``/``:327`` (``FusedScaleMaskSoftmax`` builds the mask when none is passed, which
    is the local ``DotProductAttention`` path for causal and ``window_size`` attention).
    Replaced in ``megatron.core.transformer.utils`` and in every already-imported
    ``megatron.core`` module holding the original by name.
    """
    ensure_importable()
    import megatron.core.fusions.fused_softmax  # noqa: F401  (binds the names)
    from megatron.core.transformer import utils as tutils

    originals = {name: getattr(tutils, name) for name in _MASK_BUILDERS}
    for modname, module in list(sys.modules.items()):
        if module is None or not modname.startswith("megatron.core"):
            continue
        for name, replacement in _MASK_BUILDERS.items():
            stock = originals[name]
            if stock is not replacement and getattr(module, name, None) is stock:
                _patch(module, name, replacement)


# ----------------------------------------------------------------------------------------
# Shim 4: torch norms with sequence parallelism
# ----------------------------------------------------------------------------------------


_ORIGINAL_WRAPPED_TORCH_NORM_NEW: Optional[Callable[..., Any]] = None


def _wrapped_torch_norm_original_new() -> Callable[..., Any]:
    global _ORIGINAL_WRAPPED_TORCH_NORM_NEW
    if _ORIGINAL_WRAPPED_TORCH_NORM_NEW is None:
        ensure_importable()
        from megatron.core.transformer.torch_norm import WrappedTorchNorm

        _ORIGINAL_WRAPPED_TORCH_NORM_NEW = WrappedTorchNorm.__dict__["__new__"].__func__
    return _ORIGINAL_WRAPPED_TORCH_NORM_NEW


def _build_sp_norm(args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> torch.nn.Module:
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    kwargs = dict(kwargs)
    if "config" in kwargs:
        config = kwargs.pop("config")
    else:
        config, args = args[0], tuple(args[1:])
    sequence_parallel = bool(getattr(config, "sequence_parallel", False))
    build_config = config
    if sequence_parallel:
        build_config = copy.copy(config)  # no __post_init__; only the flag differs
        build_config.sequence_parallel = False
    module = _wrapped_torch_norm_original_new()(WrappedTorchNorm, build_config, *args, **kwargs)
    for param in module.parameters():
        # What apex's FusedLayerNorm / TE norms do; read by
        # distributed/finalize_model_grads.py:452 to all-reduce norm grads over TP.
        setattr(param, "sequence_parallel", sequence_parallel)
    return module


class CpuSequenceParallelNorm:
    """Torch ``LayerNorm``/``RMSNorm`` (via megatron's ``WrappedTorchNorm``) that accepts
    ``config.sequence_parallel=True`` and tags its parameters ``.sequence_parallel`` the way
    apex's ``FusedLayerNorm`` does, so ``finalize_model_grads`` all-reduces their grads
    across the TP group (``distributed/finalize_model_grads.py:452``).

    Same constructor as ``WrappedTorchNorm`` (``transformer/torch_norm.py:33``:
    ``config, hidden_size, eps=1e-5, persist_layer_norm, zero_centered_gamma,
    normalization``, positional or keyword) and, like it, returns a plain ``torch.nn``
    module. Usable in any spec as a ``layer_norm`` submodule, on CPU or GPU. After
    ``apply_cpu_shims()``, ``WrappedTorchNorm`` itself behaves like this class (see
    ``patch_torch_norm_sequence_parallel``), so the stock ``get_gpt_layer_local_spec()``
    works with sequence parallelism.
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> torch.nn.Module:  # type: ignore[misc]
        return _build_sp_norm(args, kwargs)


def _patched_wrapped_torch_norm_new(cls, *args: Any, **kwargs: Any) -> torch.nn.Module:
    return _build_sp_norm(args, kwargs)


def patch_torch_norm_sequence_parallel() -> None:
    """Shim 4: ``WrappedTorchNorm`` accepts ``sequence_parallel`` on CPU.

    Covers ``transformer/torch_norm.py:50`` (``assert not config.sequence_parallel``).
    ``WrappedTorchNorm`` is the ``LNImpl`` of ``models/gpt/gpt_layer_specs.py:75`` (and of
    ``models/backends.py:37``, ``transformer/transformer_block.py:64``) when apex is absent,
    i.e. what ``get_gpt_layer_local_spec()`` uses on CPU. Its ``__new__`` is replaced on the
    class object itself, so every module that bound the class by name sees the change.
    The other asserts of that constructor (zero-centred gamma, persist, memory-efficient
    LN) still apply.
    """
    ensure_importable()
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    _wrapped_torch_norm_original_new()
    _patch(WrappedTorchNorm, "__new__", staticmethod(_patched_wrapped_torch_norm_new))


# ----------------------------------------------------------------------------------------
# Shim 5: device "cuda" -> "cpu" everywhere tensors are made or moved
# ----------------------------------------------------------------------------------------

# Modules whose ``Tensor.type()`` checks must see "torch.cuda.*Tensor" for CPU tensors:
# optimizer/clip_grads.py:174 (assert), optimizer/optimizer.py:1009/1028 and
# optimizer/distrib_optimizer.py:401/466/758 (fp32/fp16 param sorting, else TypeError).
CUDA_TYPE_STRING_CALLERS: Tuple[str, ...] = ("megatron.core.optimizer",)


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, str):
        return device.startswith("cuda")
    if isinstance(device, torch.device):
        return device.type == "cuda"
    # A bare int is a CUDA ordinal (torch.device(0) needs an accelerator).
    return isinstance(device, int) and not isinstance(device, bool)


def _cpu_like(device: Any) -> Any:
    return torch.device("cpu") if isinstance(device, torch.device) else "cpu"


def _map_device_kwargs(kwargs: Dict[str, Any]) -> Dict[str, Any]:
    device = kwargs.get("device")
    pin = kwargs.get("pin_memory")
    if (device is not None and _is_cuda_device(device)) or pin:
        kwargs = dict(kwargs)
        if device is not None and _is_cuda_device(device):
            kwargs["device"] = _cpu_like(device)
        if pin:
            kwargs["pin_memory"] = False  # pinned memory needs an accelerator
    return kwargs


def _handle_to(func, args, kwargs):
    if len(args) > 1 and _is_cuda_device(args[1]):
        args = (args[0], _cpu_like(args[1])) + tuple(args[2:])
    return func(*args, **_map_device_kwargs(kwargs))


def _handle_cuda(func, args, kwargs):
    # Tensor.cuda(device=None, non_blocking=False, memory_format=torch.preserve_format):
    # the CPU stands in for the device, so the tensor already lives there (as a CUDA
    # tensor's .cuda() returns itself).
    tensor = args[0]
    memory_format = kwargs.get("memory_format")
    if memory_format is not None and memory_format is not torch.preserve_format:
        return tensor.contiguous(memory_format=memory_format)
    return tensor


def _handle_pin_memory(func, args, kwargs):
    return args[0]


def _handle_record_stream(func, args, kwargs):
    return None


def _caller_module() -> str:
    """Module name of the first frame outside this module and torch (the code that
    called the tensor method the mode intercepted)."""
    frame = sys._getframe(1)
    while frame is not None:
        name = frame.f_globals.get("__name__", "") or ""
        if name != __name__ and name != "torch" and not name.startswith("torch."):
            return name
        frame = frame.f_back
    return ""


def _handle_type(func, args, kwargs):
    tensor = args[0]
    if len(args) == 1 and not kwargs:
        result = func(tensor)
        if (
            isinstance(result, str)
            and result.startswith("torch.")
            and not result.startswith("torch.cuda.")
            and tensor.device.type == "cpu"
            and _caller_module().startswith(CUDA_TYPE_STRING_CALLERS)
        ):
            return "torch.cuda." + result[len("torch."):]
        return result
    # Conversion: t.type("torch.cuda.FloatTensor") / t.type(torch.cuda.FloatTensor).
    args = list(args)
    target = args[1] if len(args) > 1 else kwargs.get("dtype")
    if isinstance(target, str) and target.startswith("torch.cuda."):
        target = "torch." + target[len("torch.cuda."):]
    elif isinstance(target, type) and getattr(target, "__module__", "") == "torch.cuda":
        target = getattr(torch, target.__name__)
    if len(args) > 1:
        args[1] = target
    elif "dtype" in kwargs:
        kwargs = dict(kwargs, dtype=target)
    return func(*args, **kwargs)


_SPECIAL_HANDLERS: Dict[Any, Callable[..., Any]] = {
    torch.Tensor.to: _handle_to,
    torch.Tensor.cuda: _handle_cuda,
    torch.Tensor.pin_memory: _handle_pin_memory,
    torch.Tensor.record_stream: _handle_record_stream,
    torch.Tensor.type: _handle_type,
}


class CudaToCpuMode(torch.overrides.TorchFunctionMode):
    """Shim 5: a ``TorchFunctionMode`` that maps device "cuda" (or a CUDA ordinal) to "cpu".

    Covers ~68 hard-coded ``device="cuda"`` sites and ``.cuda()`` calls, e.g.
    ``pipeline_parallel/schedules.py:749/1121/2292`` (every schedule, even PP=1),
    ``optimizer/optimizer.py:690/698/702/1249``, ``optimizer/clip_grads.py:96/108/112/180``,
    ``optimizer/grad_scaler.py:20``, ``distributed/param_and_grad_buffer.py:1145``,
    ``tensor_parallel/data.py:37/84``, ``.cuda()`` in
    ``models/common/language_module/language_module.py:307`` (tied embeddings with PP) and
    ``optimizer/distrib_optimizer.py:1374``.

    Rewrites: a ``device=`` keyword of any torch function (factories, ``new_*``,
    ``*_like``); ``Tensor.to(device, ...)``; ``Tensor.cuda()`` returns the tensor;
    ``pin_memory=True`` and ``Tensor.pin_memory()`` (need an accelerator) become no-ops;
    ``Tensor.record_stream`` is a no-op. ``Tensor.type()`` with no argument answers
    ``"torch.cuda.FloatTensor"`` etc. for CPU tensors *only when called from*
    ``CUDA_TYPE_STRING_CALLERS`` (megatron's optimizer package: ``clip_grads.py:174``
    asserts it, ``optimizer.py:1028`` and ``distrib_optimizer.py:466`` raise TypeError
    otherwise); everyone else sees the true type string.

    Torch keeps function modes per thread: enter it on each thread that needs it
    (``apply_cpu_shims()`` / ``cuda_to_cpu_mode()``). Overhead: ~5% of a fwd+bwd step
    (4-layer, hidden-256 GPT, 2 threads); MCORE_ON_CPU.md saw 10-20%.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if kwargs is None:
            kwargs = {}
        handler = _SPECIAL_HANDLERS.get(func)
        if handler is not None:
            return handler(func, args, kwargs)
        if kwargs:
            kwargs = _map_device_kwargs(kwargs)
        return func(*args, **kwargs)


def _mode_on_this_thread() -> Optional[CudaToCpuMode]:
    return getattr(_TLS, "mode", None)


def enter_cuda_to_cpu_mode() -> bool:
    """Enter ``CudaToCpuMode`` on the calling thread and keep it active (no exit).

    Idempotent per thread. Returns True if it was entered now. Called inside the caller's own
    modes (``with torch.device(...)``, a ``TorchFunctionMode``) it goes under them (on top, it
    would be what their exit pops, leaving their mode on for good and this one gone), above
    ``torch.set_default_device``'s context, which torch keeps at the bottom.
    """
    if cuda_to_cpu_mode_active():
        return False
    from torch.overrides import _pop_mode, _push_mode

    mode = CudaToCpuMode()
    stack = [_pop_mode() for _ in range(torch._C._len_torch_function_stack())][::-1]  # bottom first
    default_device = getattr(torch._GLOBAL_DEVICE_CONTEXT, "device_context", None)
    keep = 1 if stack and default_device is not None and stack[0] is default_device else 0
    for m in (*stack[:keep], mode, *stack[keep:]):
        _push_mode(m)
    _TLS.mode = mode
    return True


def cuda_to_cpu_mode_active() -> bool:
    """Whether a ``CudaToCpuMode`` is on the calling thread's torch-function mode stack."""
    try:
        from torch.overrides import _get_current_function_mode_stack
    except ImportError:  # private API moved: trust our per-thread record
        return _mode_on_this_thread() is not None
    return any(isinstance(m, CudaToCpuMode) for m in _get_current_function_mode_stack())


@contextlib.contextmanager
def cuda_to_cpu_mode():
    """Context manager: ``CudaToCpuMode`` for a block (e.g. in a worker thread).

    Does nothing on a CUDA machine or where the mode is already active on this thread.
    """
    if torch.cuda.is_available() or cuda_to_cpu_mode_active():
        yield
        return
    with CudaToCpuMode():
        yield


# ----------------------------------------------------------------------------------------
# Shim 6: streams, events, synchronize
# ----------------------------------------------------------------------------------------


class CpuEvent(torch.cpu.Event):
    """Stand-in for ``torch.cuda.Event`` on CPU: CPU work is synchronous, so every event
    is complete; ``elapsed_time`` measures wall-clock time between two ``record`` calls."""

    def __init__(
        self,
        enable_timing: bool = False,
        blocking: bool = False,
        interprocess: bool = False,
        external: bool = False,
        **kwargs: Any,
    ) -> None:
        self.enable_timing = enable_timing
        self._time: Optional[float] = None

    def record(self, stream: Any = None) -> None:
        self._time = time.perf_counter()

    def wait(self, stream: Any = None) -> None:
        return None

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        return None

    def elapsed_time(self, end_event: "CpuEvent") -> float:
        if self._time is None or end_event._time is None:
            raise RuntimeError("CpuEvent.elapsed_time: both events must be recorded")
        return (end_event._time - self._time) * 1000.0


class CpuStream(torch.Stream):
    """Stand-in for ``torch.cuda.Stream`` on CPU: one synchronous stream, so waits are
    no-ops. A ``torch.Stream`` on the CPU device (so torch's argument parser accepts it,
    e.g. in ``Tensor.record_stream``); accepts the ``torch.cuda.Stream`` constructor
    arguments (``device``, ``priority``)."""

    def __new__(cls, device: Any = None, priority: int = 0, **kwargs: Any):
        return super().__new__(cls, device="cpu")

    def __init__(self, device: Any = None, priority: int = 0, **kwargs: Any) -> None:
        self.priority = priority

    def wait_stream(self, stream: Any) -> None:
        return None

    def wait_event(self, event: Any) -> None:
        return None

    def record_event(self, event: Optional[CpuEvent] = None) -> CpuEvent:
        event = event if event is not None else CpuEvent()
        event.record(self)
        return event

    def synchronize(self) -> None:
        return None

    def query(self) -> bool:
        return True

    @staticmethod
    def priority_range() -> Tuple[int, int]:
        return (0, 0)

    def __enter__(self):
        return self

    def __exit__(self, *exc: Any) -> None:
        return None


_DEFAULT_STREAM: Optional[CpuStream] = None


def _cpu_current_stream(device: Any = None) -> CpuStream:
    global _DEFAULT_STREAM
    if _DEFAULT_STREAM is None:
        _DEFAULT_STREAM = CpuStream()
    return _DEFAULT_STREAM


def _cpu_stream_context(stream: Any = None):
    """``torch.cuda.stream(s)`` on CPU: a context that does nothing."""
    return contextlib.nullcontext(stream)


def _cpu_synchronize(device: Any = None) -> None:
    """``torch.cuda.synchronize`` on CPU: CPU ops are already synchronous."""
    return None


def _cpu_set_stream(stream: Any) -> None:
    return None


def patch_cuda_streams() -> None:
    """Shim 6: ``torch.cuda`` stream/event/synchronize API as CPU no-ops.

    Covers ``pipeline_parallel/p2p_communication.py:263/419`` (``torch.cuda.synchronize``
    with ``batch_p2p_comm``/``batch_p2p_sync``), ``distributed/param_and_grad_buffer.py:632``
    (``torch.cuda.current_stream()`` in every ``start_grad_sync``), ``:686/:691/:814``
    (``torch.cuda.stream`` / ``wait_stream`` with a communication stream),
    ``distributed/distributed_data_parallel.py:297/649/672`` (``torch.cuda.Stream``,
    ``synchronize``), ``parallel_state.py:216``. Patched: ``torch.cuda.synchronize``,
    ``current_stream``, ``default_stream``, ``Stream``, ``stream``, ``set_stream``,
    ``Event``.
    """
    _patch(torch.cuda, "synchronize", _cpu_synchronize)
    _patch(torch.cuda, "current_stream", _cpu_current_stream)
    _patch(torch.cuda, "default_stream", _cpu_current_stream)
    _patch(torch.cuda, "Stream", CpuStream)
    _patch(torch.cuda, "stream", _cpu_stream_context)
    _patch(torch.cuda, "set_stream", _cpu_set_stream)
    _patch(torch.cuda, "Event", CpuEvent)


# ----------------------------------------------------------------------------------------
# Item 8: resuming megatron's distributed optimizer with the torch-Adam fallback
# ----------------------------------------------------------------------------------------


def _torch_optimizers(optimizer: Any):
    """The torch optimizers inside a megatron optimizer (chained or not)."""
    chained = getattr(optimizer, "chained_optimizers", None)
    if chained is not None:
        for sub in chained:
            yield from _torch_optimizers(sub)
        return
    inner = getattr(optimizer, "optimizer", None)
    if inner is not None and isinstance(inner, torch.optim.Optimizer):
        yield inner
    elif isinstance(optimizer, torch.optim.Optimizer):
        yield optimizer


def torch_adam_fallback() -> bool:
    """True where megatron-core's optimizers run torch's Adam (neither apex nor Transformer Engine imports: every
    CPU, and a GPU install without them): the distributed optimizer's load then needs
    ``prepare_distrib_optimizer_for_load`` and ``fix_param_steps_after_load``, whatever the device."""
    from megatron.core.optimizer import distrib_optimizer

    return not distrib_optimizer.HAVE_APEX_OR_TE


def prepare_distrib_optimizer_for_load(optimizer: Any) -> int:
    """Pre-fill Adam state (``exp_avg``, ``exp_avg_sq``, ``step``) of every parameter that
    has none, so ``DistributedOptimizer.load_state_dict`` / ``sharded_state_dict`` find
    state to load into.

    Covers ``optimizer/distrib_optimizer.py:839`` (asserts on empty optimizer state when
    the torch-Adam fallback is used instead of apex/TE ``FusedAdam``, which creates state
    eagerly). Call it before ``optimizer.load_state_dict(...)`` and do that load under
    ``torch.no_grad()`` (``:2061`` writes into leaf tensors), then call
    ``fix_param_steps_after_load``. Returns the number of parameters whose state was filled.
    Only megatron's ``dp_reshardable`` distributed-optimizer format was seen to work.
    """
    filled = 0
    for opt in _torch_optimizers(optimizer):
        for group in opt.param_groups:
            for param in group["params"]:
                state = opt.state[param]
                if state:
                    continue
                state["step"] = torch.zeros((), dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(
                    param, memory_format=torch.preserve_format
                )
                if group.get("amsgrad", False):
                    state["max_exp_avg_sq"] = torch.zeros_like(param)
                filled += 1
    return filled


def fix_param_steps_after_load(optimizer: Any, step: Optional[int] = None) -> int:
    """Give every parameter its own Adam ``step`` tensor after a checkpoint load.

    Loading megatron's distributed-optimizer checkpoint into the torch-Adam fallback leaves
    one ``step`` shared between parameters (or, via the param-group ``step``, none), and
    the torch Adam then restarts bias correction at 0: results silently change. This sets
    ``state["step"]`` of every parameter to a fresh tensor holding ``step``; by default
    the largest step found in the loaded state (per-parameter ``step`` or the param
    group's ``step`` that megatron stores). Returns the step used.
    """
    opts = list(_torch_optimizers(optimizer))
    if step is None:
        found = 0
        for opt in opts:
            for group in opt.param_groups:
                if "step" in group:
                    found = max(found, int(group["step"]))
                for param in group["params"]:
                    value = opt.state.get(param, {}).get("step")
                    if value is not None:
                        found = max(found, int(value))
        step = found
    for opt in opts:
        for group in opt.param_groups:
            for param in group["params"]:
                state = opt.state[param]
                if state:
                    state["step"] = torch.tensor(float(step), dtype=torch.float32)
    return int(step)


# ----------------------------------------------------------------------------------------
# Entry points
# ----------------------------------------------------------------------------------------


def apply_cpu_shims() -> bool:
    """Install every CPU shim (1-6 above) when CUDA is absent.

    Returns False (and does nothing) when ``torch.cuda.is_available()``; otherwise installs
    the process-wide patches once, enters ``CudaToCpuMode`` on the calling thread if it is
    not active there yet, and returns True. Idempotent and thread-safe. Imports
    megatron.core (after ``ensure_importable()``).
    """
    global _INSTALLED
    if torch.cuda.is_available():
        return False
    ensure_importable()
    with _LOCK:
        if not _INSTALLED:
            patch_cuda_device_queries()
            patch_cuda_streams()
            install_cpu_rng_tracker()
            patch_mask_builders()
            patch_torch_norm_sequence_parallel()
            _INSTALLED = True
            logger.debug("megatron_consa: CPU shims for megatron-core installed")
    enter_cuda_to_cpu_mode()
    return True


def cpu_shims_active() -> bool:
    """True once ``apply_cpu_shims()`` installed the shims in this process."""
    return _INSTALLED
