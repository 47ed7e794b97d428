"""Attention backends behind `ConsaCoreAttention`, and the one place that picks one.

A backend exposes two calls on megatron-core's layout (query [sq, b, hq, d],
key/value [sk, b, hkv, d], output [sq, b, hq, d]):

* `full(q, k, v)`   causal full attention;
* `sliding(q, k, v)` causal sliding-window attention with window W (each query
  sees itself and the W-1 tokens before it) plus the first `sink_tokens`.

`TorchAttentionBackend` runs anywhere (CPU, or a GPU without Transformer
Engine); its SWA costs O(n*W). `TEAttentionBackend` wraps Transformer
Engine's `DotProductAttention`: one causal instance and one windowed instance
(`window_size=(W-1, 0)`), created per head count on first use, because a
mixed layer in fixed mode calls each type on a subset of the heads. TE reads
q, k and v in whole tensors, so a subset of heads (a view) is copied first; TE's
fused kernels take bf16/fp16 only (in fp32 it falls back to an unfused O(n^2)
attention with a dense window mask), so fp32 calls go to the torch backend.

TE remembers one backend selection, for the last call's parameters, and selects
again (host work: a long series of checks and a cuDNN support query) whenever a
call's parameters differ. A ConSA layer alternates configurations (learning mode
calls the causal and the windowed instance in every layer; a mixed fixed layer
calls each type on its own head count), so that one-entry cache would miss on
every call (TE issue #1349). `TESelectionMemo` keeps each configuration's last
selection and puts it back before the call, so TE's own comparison finds its
parameters unchanged and skips selecting; TE still compares everything it
compares, and a call that differs selects again.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
from functools import lru_cache
from typing import Callable

import torch
from torch import Tensor

from megatron_consa.backends.torch_attention import (
    flex_attention_available,
    flex_sliding_window_attention,
    full_causal_attention,
    sliding_window_attention,
)
from megatron_consa.compat import has_cuda
from megatron_consa.config import ConsaConfigError

logger = logging.getLogger(__name__)


def transformer_engine_available() -> bool:
    """True when CUDA is present and Transformer Engine imports (when it is installed but
    does not import, the reason is logged once)."""
    if not has_cuda() or importlib.util.find_spec("transformer_engine") is None:
        return False
    return _transformer_engine_imports()


@lru_cache(maxsize=1)
def _transformer_engine_imports() -> bool:
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception as err:  # a wheel without its CUDA libraries raises OSError, a missing extension FileNotFoundError
        logger.warning("Transformer Engine is installed but does not import (%s: %s): the TE backend is off",
                       type(err).__name__, err)
        return False
    return True


def te_dot_product_attention_class():
    """Transformer Engine's `DotProductAttention` (imported on first use).

    The one place the TE backend gets its attention class from, so a test can
    stand in for it on a machine without Transformer Engine.
    """
    from transformer_engine.pytorch import DotProductAttention

    return DotProductAttention


# Where Transformer Engine keeps its one-entry backend-selection cache (a module-level
# dict): in the dot_product_attention package in recent TE (2.20 read), in the
# attention module in older ones. Elsewhere the memo steps aside.
_TE_SELECTION_CACHE_MODULES = (
    "transformer_engine.pytorch.attention.dot_product_attention.dot_product_attention",
    "transformer_engine.pytorch.attention",
)
# The environment TE's selection reads, as its own per-policy cache keys it.
TE_SELECTION_ENV_VARS = (
    "NVTE_FLASH_ATTN",
    "NVTE_FLASH_ATTN_V2",
    "NVTE_FLASH_ATTN_V3",
    "NVTE_FLASH_ATTN_V4",
    "NVTE_FUSED_ATTN",
    "NVTE_UNFUSED_ATTN",
)
_TE_SELECTION_KEYS = ("attention_params", "backend_selection_requires_update")


@lru_cache(maxsize=1)
def te_backend_selection_cache() -> dict | None:
    """Transformer Engine's module-level backend-selection cache (`_attention_backends`),
    or None where this TE keeps none where we look (then calls go to TE unchanged)."""
    for name in _TE_SELECTION_CACHE_MODULES:
        try:
            module = importlib.import_module(name)
        except Exception:  # absent, or a TE without its CUDA libraries
            continue
        cache = getattr(module, "_attention_backends", None)
        if isinstance(cache, dict) and all(key in cache for key in _TE_SELECTION_KEYS):
            return cache
    return None


class TESelectionMemo:
    """TE's backend selection, kept per call configuration and restored before each call.

    `call(key, fn)` runs `fn` (one TE attention call) after putting back what TE's
    cache held right after the last call with the same `key`, when the selection
    environment (`TE_SELECTION_ENV_VARS`) is unchanged since. TE then compares the
    call's parameters with the restored ones: equal, it reuses that selection; not,
    it selects again, as without the memo. A cache marked stale
    (`backend_selection_requires_update`, TE's own way to force a new selection)
    drops every kept entry. At most `max_entries` keys are kept (oldest dropped).
    """

    def __init__(self, max_entries: int = 16) -> None:
        self.max_entries = max_entries
        self._kept: dict[tuple, tuple[tuple, dict]] = {}

    def call(self, key: tuple, fn: Callable[[], Tensor]) -> Tensor:
        cache = te_backend_selection_cache()
        if cache is None:
            return fn()
        environment = tuple(os.environ.get(name) for name in TE_SELECTION_ENV_VARS)
        if cache.get("backend_selection_requires_update"):
            self._kept.clear()
        else:
            kept = self._kept.get(key)
            if kept is not None and kept[0] == environment:
                cache.update(kept[1])
        out = fn()
        self._kept.pop(key, None)
        self._kept[key] = (environment, dict(cache))
        while len(self._kept) > self.max_entries:
            self._kept.pop(next(iter(self._kept)))
        return out


def resolve_backend_name(name: str, *, sink_tokens: int = 0) -> str:
    """`auto` -> `te` when Transformer Engine can run here (and no sink tokens are
    asked for: TE's window has none), else `torch`."""
    if name == "auto":
        return "te" if not sink_tokens and transformer_engine_available() else "torch"
    if name not in ("torch", "te"):
        raise ConsaConfigError(f"attention backend {name!r}: use 'auto', 'torch' or 'te'")
    if name == "te" and not transformer_engine_available():
        raise ConsaConfigError(
            "ConsaConfig.backend='te' needs CUDA and an importable transformer_engine; "
            "install megatron-consa[gpu] on a GPU machine or use backend='torch'"
        )
    return name


def _to_bhsd(x: Tensor) -> Tensor:
    # [s, b, h, d] -> [b, h, s, d]
    return x.permute(1, 2, 0, 3)


def _to_sbhd(x: Tensor) -> Tensor:
    # [b, h, s, d] -> [s, b, h, d]
    return x.permute(2, 0, 1, 3)


class TorchAttentionBackend:
    """Pure-torch kernels: SDPA for causal FA; SWA via compiled FlexAttention on CUDA
    (block-sparse), on a CPU via the banded C++ kernel (`cpu_extension`; the blocked
    O(n*W) flash-op path where it does not build).

    `use_flex=False` forces the blocked kernel on CUDA too.
    """

    name = "torch"

    def __init__(self, *, window: int, sink_tokens: int, softmax_scale: float, use_flex: bool = True) -> None:
        self.window = window
        self.sink_tokens = sink_tokens
        self.scale = softmax_scale
        self.use_flex = use_flex

    def train(self, mode: bool = True) -> "TorchAttentionBackend":
        """Nothing depends on the mode here (the TE backend's instances do)."""
        return self

    def full(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        out = full_causal_attention(_to_bhsd(q), _to_bhsd(k), _to_bhsd(v), scale=self.scale)
        return _to_sbhd(out)

    def sliding(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        if self.use_flex and flex_attention_available(q.device):
            out = flex_sliding_window_attention(
                _to_bhsd(q), _to_bhsd(k), _to_bhsd(v), window=self.window, scale=self.scale,
                sink_tokens=self.sink_tokens,
            )
            return _to_sbhd(out)
        # No .contiguous(): the kernel copies q into blocks and k/v into padded
        # buffers anyway, from any strides.
        out = sliding_window_attention(
            _to_bhsd(q),
            _to_bhsd(k),
            _to_bhsd(v),
            window=self.window,
            scale=self.scale,
            sink_tokens=self.sink_tokens,
        )
        return _to_sbhd(out)


class TEAttentionBackend:
    """Transformer Engine `DotProductAttention`: one causal and one windowed instance.

    Half-precision calls run on TE; others (fp32) on `TorchAttentionBackend`, whose
    SWA stays O(n*W) where TE's would be its unfused O(n^2) path. The owner's
    train/eval mode reaches the TE instances through `train()` (they are not
    submodules: that would add their `_extra_state` to checkpoints). Each call goes
    through a `TESelectionMemo` keyed by type, shapes, dtype and mode, so the
    alternating causal and windowed calls do not make TE select its backend again.
    """

    name = "te"
    TE_DTYPES = (torch.bfloat16, torch.float16)

    def __init__(
        self, *, window: int, sink_tokens: int, softmax_scale: float, kv_channels: int, layer_number: int
    ) -> None:
        if sink_tokens:
            raise ConsaConfigError(
                f"ConsaConfig.sink_tokens={sink_tokens} is not supported by the Transformer Engine "
                "backend (its sliding window has no sinks); use backend='torch' or sink_tokens=0"
            )
        self.window_size = window
        self.scale = softmax_scale
        self.kv_channels = kv_channels
        self.layer_number = layer_number
        self.training = True
        self._instances: dict[tuple[int, int, bool], Callable] = {}
        self._selections = TESelectionMemo()
        self._torch = TorchAttentionBackend(window=window, sink_tokens=0, softmax_scale=softmax_scale)

    def train(self, mode: bool = True) -> "TEAttentionBackend":
        self.training = mode
        for attn in self._instances.values():
            attn.train(mode)
        return self

    def _instance(self, num_heads: int, num_groups: int, windowed: bool):
        key = (num_heads, num_groups, windowed)
        if key not in self._instances:
            # Flash/TE window (left, right): query p sees keys p-left .. p+right, so
            # "itself and the W-1 before it" is (W-1, 0).
            self._instances[key] = te_dot_product_attention_class()(
                num_attention_heads=num_heads,
                kv_channels=self.kv_channels,
                num_gqa_groups=num_groups,
                attention_dropout=0.0,
                qkv_format="sbhd",
                attn_mask_type="causal",
                window_size=(self.window_size - 1, 0) if windowed else None,
                softmax_scale=self.scale,
                layer_number=self.layer_number,
                attention_type="self",
            )
            self._instances[key].train(self.training)
        return self._instances[key]

    def _call(self, q: Tensor, k: Tensor, v: Tensor, windowed: bool) -> Tensor:
        if q.dtype not in self.TE_DTYPES:
            return self._torch.sliding(q, k, v) if windowed else self._torch.full(q, k, v)
        attn = self._instance(q.size(2), k.size(2), windowed)
        # TE's layout detection (get_qkv_layout) takes separate q, k, v at storage offset 0
        # and copies strided views itself; a contiguous view at an offset (a head slice when
        # s * b == 1) it refuses. Copy any view here: the same copy, and no such case.
        q, k, v = (x if x.is_contiguous() and x.storage_offset() == 0 else x.clone(memory_format=torch.contiguous_format)
                   for x in (q, k, v))
        key = (windowed, tuple(q.shape), tuple(k.shape), q.dtype, self.training)
        out = self._selections.call(
            key, lambda: attn(q, k, v, qkv_format="sbhd", attn_mask_type="causal")
        )  # [sq, b, hq * d]
        return out.view(q.size(0), q.size(1), q.size(2), q.size(3))

    def full(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return self._call(q, k, v, windowed=False)

    def sliding(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return self._call(q, k, v, windowed=True)


def make_attention_backend(
    name: str, *, window: int, sink_tokens: int, softmax_scale: float, kv_channels: int, layer_number: int
):
    """Build the backend `name` (`auto`, `torch` or `te`)."""
    resolved = resolve_backend_name(name, sink_tokens=sink_tokens)
    if resolved == "te":
        return TEAttentionBackend(
            window=window,
            sink_tokens=sink_tokens,
            softmax_scale=softmax_scale,
            kv_channels=kv_channels,
            layer_number=layer_number,
        )
    return TorchAttentionBackend(window=window, sink_tokens=sink_tokens, softmax_scale=softmax_scale)
