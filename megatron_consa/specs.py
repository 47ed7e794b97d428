"""Layer specs that put `ConsaCoreAttention` in megatron-core's core-attention slot.

The specs start from megatron-core's own GPT layer specs and fill the
`self_attention.submodules.core_attention` slot with `ConsaCoreAttention`; the
self-attention module becomes `ConsaSelfAttention`, megatron-core's
SelfAttention that, with a fixed allocation, stores each layer's KV groups by
type (`megatron_consa.self_attention`). Everything else (fused QKV projection,
QK-norm, SwiGLU MLP, norms) stays megatron-core's.
"""

from __future__ import annotations

import copy

from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_consa.attention import ConsaCoreAttention
from megatron_consa.config import ConsaConfigError
from megatron_consa.self_attention import ConsaSelfAttention


def _with_consa_core_attention(spec: ModuleSpec) -> ModuleSpec:
    spec = copy.deepcopy(spec)
    attn = spec.submodules.self_attention
    if not hasattr(attn.submodules, "core_attention"):
        raise ConsaConfigError(f"layer spec {spec.module.__name__} has no core_attention slot to fill")
    if not issubclass(ConsaSelfAttention, attn.module):
        raise ConsaConfigError(f"layer spec {spec.module.__name__} uses {attn.module.__name__}, not SelfAttention")
    attn.module = ConsaSelfAttention
    attn.submodules.core_attention = ConsaCoreAttention
    return spec


def get_consa_layer_local_spec(*, qk_layernorm: bool = False, normalization: str = "RMSNorm") -> ModuleSpec:
    """megatron-core's local (pure torch) GPT layer with ConSA core attention."""
    return _with_consa_core_attention(
        get_gpt_layer_local_spec(qk_layernorm=qk_layernorm, normalization=normalization)
    )


def get_consa_layer_with_transformer_engine_spec(*, qk_layernorm: bool = False) -> ModuleSpec:
    """megatron-core's Transformer Engine GPT layer with ConSA core attention.

    Needs Transformer Engine (a GPU machine). The TE linear layers fuse the
    input norm into the QKV projection; only the core attention changes.
    """
    return _with_consa_core_attention(get_stock_layer_spec(use_transformer_engine=True, qk_layernorm=qk_layernorm))


def get_consa_layer_spec(*, use_transformer_engine: bool, qk_layernorm: bool = False) -> ModuleSpec:
    """The TE or the local ConSA layer spec."""
    if use_transformer_engine:
        return get_consa_layer_with_transformer_engine_spec(qk_layernorm=qk_layernorm)
    return get_consa_layer_local_spec(qk_layernorm=qk_layernorm)


def get_stock_layer_spec(*, use_transformer_engine: bool, qk_layernorm: bool = False) -> ModuleSpec:
    """megatron-core's own GPT layer spec, TE or local, without ConSA: the baseline.

    Its attention is megatron-core's (TEDotProductAttention or DotProductAttention):
    full causal, or sliding-window through `TransformerConfig.window_size`.
    """
    if use_transformer_engine:
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=qk_layernorm)
    return get_gpt_layer_local_spec(qk_layernorm=qk_layernorm, normalization="RMSNorm")
