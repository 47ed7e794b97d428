"""The `consa` attention for Hugging Face transformers, and the hybrid KV cache as a transformers `Cache`.

After `import megatron_consa` (which registers this module's functions as soon
as transformers' modeling code is imported, see `hf_hook`)::

    model = AutoModelForCausalLM.from_pretrained(export_dir)          # config.json names the attention
    model = AutoModelForCausalLM.from_pretrained(export_dir, attn_implementation="consa")  # the same, by its short name
    cache = HybridCache.for_model(model, max_length=ids.size(1) + 64)    # without it the FA buffers grow by doubling
    out = model.generate(ids, past_key_values=cache, max_new_tokens=64)

`consa_attention` runs each layer's allocation row (FA heads see every earlier
token, SWA heads the window plus the sinks) for the Qwen3, Qwen2, Llama and
Mistral model classes. The allocation is the config's `consa` field (an export of
a head-wise allocation, or one with sinks), else its stock sliding-window fields
(`conversion.windows.allocation_from_hf`): the same attention also runs stock
layer-wise configs. With `HybridCache` the SWA heads keep only the window and
the sinks; with transformers' dynamic cache (or none) it attends over full K/V with
the window mask, same result (a stock layer-wise config's sliding layers get their
window's keys from that cache: the same). Caches that hand over a fixed-size buffer
with unfilled slots (transformers' static caches) are refused.

Sequences of a batch must have the same length (no padding): a padded
`attention_mask` is refused, since the masks are built from positions.
"""

from __future__ import annotations

import functools
import logging
import weakref
from typing import Any, Optional, Union

import torch
from torch import Tensor
from transformers import AttentionInterface, PreTrainedConfig, PreTrainedModel
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.masking_utils import AttentionMaskInterface

from megatron_consa.allocation import Allocation, make_preset
from megatron_consa.architecture import CONSA_HF_CONFIG_KEY, ArchitectureConfig
from megatron_consa.conversion.windows import CONSA_ATTENTION, CONSA_ATTENTION_IN_CONFIG, allocation_from_hf
from megatron_consa.data.tokenizer import id_list
from megatron_consa.inference.cache import CachedKV, HybridKVCache, LayerKVCache, hybrid_attention
from megatron_consa.inference.sampling import SamplingConfig

logger = logging.getLogger(__name__)


def config_allocation(config: Any) -> Allocation:
    """The allocation a transformers config runs: its `consa` field, its stock sliding
    windows, or all FA (window 1, never used)."""
    arch = ArchitectureConfig.from_hf(config, allow_sliding_window=True, for_transformers=True)
    allocation = allocation_from_hf(config, arch)
    if allocation is None:
        allocation = make_preset(
            "all_fa", num_layers=arch.num_layers, num_kv_heads=arch.num_kv_heads, granularity="layer",
            target_sparsity=None, window=1,
        )
    return allocation


def _layer_setting(module: torch.nn.Module) -> tuple[tuple[int, ...], int, int]:
    """(allocation row, window, sinks) of an HF attention module, read from its config once."""
    setting = module.__dict__.get("_consa_layer")
    if setting is None:
        config = module.config
        allocation = config_allocation(config)
        setting = (tuple(allocation.fa[module.layer_idx]), allocation.window, allocation.sink_tokens)
        module._consa_layer = setting
    return setting


def consa_attention(
    module: torch.nn.Module,
    query: Tensor,
    key: Union[Tensor, CachedKV],
    value: Union[Tensor, CachedKV],
    attention_mask: Optional[Tensor],
    scaling: Optional[float] = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """transformers attention function: query ``[b, hq, m, d]``; key/value ``[b, G, n, d]`` or,
    from `HybridCache`, the layer's `CachedKV`. Returns ``([b, m, hq, d], None)``.

    The layer's row, window and sinks come from the config (`config_allocation`);
    the `sliding_window` transformers passes is the same information and is not used.
    """
    if attention_mask is not None:
        raise NotImplementedError(
            "the consa attention builds its causal and window masks from positions; a custom attention_mask "
            "is not supported (pass none, and prompts of equal length)"
        )
    if dropout and module.training:
        raise NotImplementedError("the consa attention has no attention dropout; set attention_dropout=0")
    row, window, sinks = _layer_setting(module)
    if isinstance(key, CachedKV):
        kv = key
    else:
        _check_keys(key.size(2), query.size(2), kwargs.get("position_ids"), row, window, sinks)
        kv = CachedKV.from_full(key, value, row, query.size(2))
    scale = scaling if scaling is not None else query.size(-1) ** -0.5
    out = hybrid_attention(query, kv, row, window=window, sink_tokens=sinks, scale=scale)
    return out.transpose(1, 2).contiguous(), None


_positions_seen: Optional[tuple] = None  # (weakref to the last position_ids read, (first, last))


def _query_positions(position_ids: Tensor) -> tuple[int, int]:
    """(first, last) of `position_ids`, read from the device once per forward (the layers of
    a model share the tensor), not once per layer."""
    global _positions_seen
    if _positions_seen is not None and _positions_seen[0]() is position_ids:
        return _positions_seen[1]
    span = (int(position_ids.min()), int(position_ids.max()))
    _positions_seen = (weakref.ref(position_ids), span)
    return span


def _check_keys(num_keys: int, num_queries: int, position_ids: Optional[Tensor], row: tuple[int, ...],
                window: int, sinks: int) -> None:
    """Full keys are positions 0..n-1 with the queries the last of them (no cache, or a
    dynamic cache), or, for a layer whose heads all slide (no sinks), the latest positions
    covering every query's window (transformers' sliding-window cache layers). A cache that
    hands over a fixed-size buffer with unfilled slots (transformers' static caches) is refused."""
    if position_ids is None:
        return
    first, last = _query_positions(position_ids)
    contiguous = last - first + 1 == num_queries
    if num_keys == last + 1 and contiguous:
        return
    if num_keys < last + 1 and contiguous and not any(row) and sinks == 0 and num_keys >= num_queries + window - 1:
        return  # the window's keys, in order: relative positions are all the masks use
    raise NotImplementedError(
        f"the consa attention got {num_keys} keys for queries at positions {first}..{last}: a transformers cache "
        "whose keys are neither the positions 0..n-1 nor a whole window of a sliding layer (a static cache, or a "
        "sliding cache under FA heads or sinks); generate with past_key_values=HybridCache.for_model(model), or "
        "transformers' default dynamic cache"
    )


def consa_attention_mask(
    batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
    mask_function: Any = None, attention_mask: Optional[Tensor] = None, **kwargs: Any,
) -> None:
    """transformers mask function for the consa attention: no mask (it builds its own from
    positions); a padding mask with padded positions is refused."""
    if attention_mask is not None and not bool(attention_mask.all()):
        raise NotImplementedError(
            "the consa attention does not support padded batches (the attention_mask has zeros): generate "
            "prompts of different lengths one at a time, and pass attention_mask=torch.ones_like(input_ids) "
            "when a prompt contains the pad token id"
        )
    return None


class HybridCacheLayer(CacheLayerMixin):
    """One layer of `HybridCache`: `update` stores into a `LayerKVCache` and hands the
    consa attention a `CachedKV` (as both keys and values)."""

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, store: LayerKVCache):
        super().__init__()
        self.store = store

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any) -> tuple[CachedKV, CachedKV]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        view = self.store.append(key_states, value_states)
        return view, view

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.store.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.store.length

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.store.reset()
        self.is_initialized = False

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.store.map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.store.map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: Tensor) -> None:
        self.store.map_batch(lambda t: t[indices])

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("HybridCache cannot roll back: its SWA ring has overwritten older tokens")

    def offload(self) -> None:
        raise NotImplementedError("HybridCache does not offload (its SWA heads are already bounded)")

    prefetch = offload


class HybridCache(Cache):
    """The hybrid KV cache as a transformers `Cache`: `generate(past_key_values=HybridCache.for_model(model))`.

    Works with the consa attention only (its layers hand the attention a `CachedKV`,
    not tensors). `max_length` (prompt + new tokens) allocates the FA buffers once.
    """

    def __init__(self, allocation: Allocation, *, max_length: Optional[int] = None):
        self.kv = HybridKVCache.from_allocation(allocation, max_length=max_length)
        super().__init__(layers=[HybridCacheLayer(layer) for layer in self.kv.layers])

    @classmethod
    def for_model(cls, model: Any, *, max_length: Optional[int] = None) -> "HybridCache":
        """The cache for a transformers model (or its config) loaded with the consa attention."""
        config = getattr(model, "config", model)
        attn = getattr(config, "_attn_implementation", None)
        if attn not in (CONSA_ATTENTION, CONSA_ATTENTION_IN_CONFIG):
            raise ValueError(
                f"HybridCache needs the consa attention, but the model runs attn_implementation={attn!r}: load it "
                f'with from_pretrained(..., attn_implementation="{CONSA_ATTENTION}") after import megatron_consa'
            )
        return cls(config_allocation(config), max_length=max_length)

    @property
    def entries(self) -> int:
        """Cached tokens summed over every layer's KV heads."""
        return self.kv.entries

    @property
    def held_bytes(self) -> int:
        """Bytes of the K and V entries held."""
        return self.kv.held_bytes

    @property
    def nbytes(self) -> int:
        """Bytes of every K and V buffer allocated."""
        return self.kv.nbytes


TRANSFORMERS_MIN_TEMPERATURE = 1e-20
"""Below it `generate_hf` decodes greedily: transformers divides float32 logits by the temperature, which
overflows to inf (then NaN probabilities) from about 1e-36 on, and sampling there is the argmax anyway (a
logit 1e-6 below the best is e^-(1e14) as likely); `next_token` computes such temperatures in float64."""


@torch.no_grad()
def generate_hf(
    model: Any, prompt: Tensor, *, max_new_tokens: int, sampling: SamplingConfig = SamplingConfig(),
    eos_token_id: Union[int, list[int], None] = None,
) -> tuple[Tensor, HybridCache]:
    """transformers' `generate` with a `HybridCache`: ``([b, n + new] tokens, the cache)``.

    Sampling is transformers' own (temperature, top-k, top-p), seeded by
    `torch.manual_seed(sampling.seed)` (the caller's global generator is restored after); it draws
    other numbers than `megatron_consa.inference.generate` does for the same seed (a temperature
    below `TRANSFORMERS_MIN_TEMPERATURE` decodes greedily). It stops at the
    generation config's EOS ids and at `eos_token_id`'s (an id or a list). Of the
    model's generation config only the special ids count: its sampling settings and
    penalties (`repetition_penalty`, `no_repeat_ngram_size`, ...), which `generate`
    would apply, are left out, so the decoding is `sampling`'s, as on the Megatron side.
    """
    from transformers import GenerationConfig

    cache = HybridCache.for_model(model, max_length=prompt.size(1) + max_new_tokens)
    own_config = getattr(model, "generation_config", None)
    ids = {key: getattr(own_config, key, None) for key in ("bos_token_id", "eos_token_id", "pad_token_id")}
    sample = sampling.temperature >= TRANSFORMERS_MIN_TEMPERATURE
    kwargs: dict[str, Any] = {"do_sample": sample}
    extra = id_list(eos_token_id)
    if extra:  # besides the generation config's own (a chat model may list several)
        own = id_list(ids["eos_token_id"])
        kwargs["eos_token_id"] = own + [i for i in extra if i not in own]
    if sample:
        kwargs.update(temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p)
    # (generate fills what it is not given from model.generation_config: swapped for one of the ids only)
    model.generation_config = GenerationConfig(**{k: v for k, v in ids.items() if v is not None})
    try:
        with torch.random.fork_rng(devices=[prompt.device] if prompt.device.type == "cuda" else []):
            torch.manual_seed(sampling.seed)
            tokens = model.generate(prompt, attention_mask=torch.ones_like(prompt), past_key_values=cache,
                                    max_new_tokens=max_new_tokens, **kwargs)
    finally:
        model.generation_config = own_config
    return tokens, cache


def _needs_consa(config: Any) -> bool:
    """Whether a config's allocation runs only under the consa attention (an export's `consa` field: a head-wise
    mix or sinks; its stock fields then say all FA)."""
    return getattr(config, CONSA_HF_CONFIG_KEY, None) is not None


def _guard_transformers() -> None:
    """Keep an export that needs the consa attention from running under another one, and from losing the name.

    - transformers' check of a model's attention implementation (at `__init__`, so in `from_pretrained`, and in
      `set_attn_implementation`) refuses any other for such a config: `from_pretrained(export,
      attn_implementation="sdpa")` would otherwise run every head with full attention, silently.
    - A config's `to_dict` (what `save_pretrained` writes, the model's and the config's alone) names the consa
      attention for such a config: transformers keeps the name it loaded with apart and does not write it back,
      and a copy without it would load in stock transformers as all FA.
    """
    check = PreTrainedModel._check_and_adjust_attn_implementation
    if getattr(check, "__consa_guard__", False):
        return

    @functools.wraps(check)
    def checked(self, attn_implementation, *args, **kwargs):
        chosen = check(self, attn_implementation, *args, **kwargs)
        if _needs_consa(self.config) and chosen not in (CONSA_ATTENTION, CONSA_ATTENTION_IN_CONFIG):
            raise ValueError(
                f"attn_implementation={chosen!r}: this model's allocation (its config's {CONSA_HF_CONFIG_KEY!r} "
                "field: SWA heads beside FA heads in a layer, or sink tokens) runs only with the consa attention; "
                f'any other would run every head with full attention. Load it with attn_implementation="{CONSA_ATTENTION}" '
                "(or none: its config.json names it), after import megatron_consa"
            )
        return chosen

    checked.__consa_guard__ = True
    PreTrainedModel._check_and_adjust_attn_implementation = checked

    to_dict = PreTrainedConfig.to_dict

    @functools.wraps(to_dict)
    def to_dict_naming_the_attention(self) -> dict[str, Any]:
        out = to_dict(self)
        if _needs_consa(self):
            out["attn_implementation"] = CONSA_ATTENTION_IN_CONFIG
        return out

    PreTrainedConfig.to_dict = to_dict_naming_the_attention


def register() -> None:
    """Register the consa attention (and its mask function) with transformers, under
    `CONSA_ATTENTION` and under the name exports write into config.json; guard the exports
    that need it (`_guard_transformers`)."""
    for name in (CONSA_ATTENTION, CONSA_ATTENTION_IN_CONFIG):
        AttentionInterface.register(name, consa_attention)
        AttentionMaskInterface.register(name, consa_attention_mask)
    _guard_transformers()


register()  # importing this module registers (see megatron_consa.inference.hf_hook)

__all__ = [
    "TRANSFORMERS_MIN_TEMPERATURE", "HybridCache", "HybridCacheLayer", "config_allocation", "consa_attention", "consa_attention_mask", "generate_hf",
    "register",
]
