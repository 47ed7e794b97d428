"""The architecture of a decoder-only Qwen3/Llama-style model, in Hugging Face terms.

No megatron-core import: conversion code and tools read it without building a model.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

from megatron_consa.config import ConsaConfigError

SUPPORTED_HF_MODEL_TYPES = ("qwen3", "qwen2", "llama", "mistral")

CONSA_HF_CONFIG_KEY = "consa"
"""config.json field of an export that runs through the `consa` attention: the allocation
(see `megatron_consa.conversion.windows`)."""


@dataclass
class ArchitectureConfig:
    """A decoder-only Qwen3/Llama-style architecture, in Hugging Face terms."""

    vocab_size: int
    """Embedding rows (padded vocabulary)."""
    hidden_size: int
    """Model width."""
    intermediate_size: int
    """SwiGLU inner width."""
    num_layers: int
    """Transformer layers (HF `num_hidden_layers`)."""
    num_attention_heads: int
    """Query heads."""
    num_kv_heads: int
    """KV heads (GQA groups, HF `num_key_value_heads`)."""
    head_dim: Optional[int] = None
    """Per-head width; defaults to hidden_size // num_attention_heads."""
    rope_theta: float = 1_000_000.0
    """RoPE base."""
    rope_scaling_factor: Optional[float] = None
    """Llama 3.x RoPE scaling factor (HF `rope_type: llama3`); None: plain RoPE.

    megatron-core implements llama3 scaling with low/high frequency factors 1 and 4
    and an original context of 8192 (Llama 3.1-3.3's values); `from_hf` refuses others.
    """
    rms_norm_eps: float = 1e-6
    """RMSNorm epsilon."""
    qk_norm: bool = False
    """Per-head RMSNorm on queries and keys before RoPE (Qwen3)."""
    qkv_bias: bool = False
    """Bias on the QKV projection (Qwen2)."""
    tie_word_embeddings: bool = False
    """Share the input embedding with the output layer."""
    max_position_embeddings: int = 4096
    """Longest sequence the model is built for."""
    model_type: str = ""
    """The Hugging Face model type this came from (for export); empty: the family these
    features are (QK norm: qwen3; a QKV bias: qwen2; else llama)."""

    def __post_init__(self) -> None:
        family = "qwen3" if self.qk_norm else "qwen2" if self.qkv_bias else "llama"
        # Empty: the family these features are. A qwen3 record without QK norm (or with QK norm
        # under another name), or a qwen2 one without its bias, names no real model: shape-built
        # checkpoints before 2026-12-06 recorded qwen3 whatever their features; read as theirs.
        if (not self.model_type or (self.model_type == "qwen3") != self.qk_norm
                or (self.model_type == "qwen2" and not self.qkv_bias)):
            self.model_type = family
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_kv_heads:
            raise ConsaConfigError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_kv_heads={self.num_kv_heads}"
            )

    @classmethod
    def from_record(cls, record: dict, where: str) -> "ArchitectureConfig":
        """From a checkpoint's `architecture` record (consa_run.json); `where` names the checkpoint in errors.

        A field this version does not know (a checkpoint written by a newer megatron-consa) or a
        missing one is refused by name: dropping a field could build another model silently."""
        if not isinstance(record, dict):
            raise ConsaConfigError(f"{where}: its architecture record is {type(record).__name__}, not a JSON object: "
                                   "the checkpoint's consa_run.json is damaged")
        fields = set(cls.__dataclass_fields__)
        unknown = sorted(set(record) - fields)
        if unknown:
            raise ConsaConfigError(
                f"{where}: its architecture record has field(s) {', '.join(map(repr, unknown))} that this version of "
                "megatron-consa does not know (written by a newer version?): upgrade megatron-consa to read it")
        required = {name for name, f in cls.__dataclass_fields__.items() if f.default is dataclasses.MISSING}
        missing = sorted(required - set(record))
        if missing:
            raise ConsaConfigError(f"{where}: its architecture record lacks {', '.join(map(repr, missing))}: "
                                   "the checkpoint's consa_run.json is damaged")
        try:
            return cls(**record)
        except (TypeError, ValueError, ZeroDivisionError) as err:  # (a value __post_init__ cannot take)
            raise ConsaConfigError(f"{where}: its architecture record {record} describes no model ({err}): the "
                                   "checkpoint's consa_run.json is damaged") from None

    @classmethod
    def from_hf(cls, hf_config: Any, *, allow_sliding_window: bool = False,
                for_transformers: bool = False) -> "ArchitectureConfig":
        """From a transformers `PretrainedConfig` of a supported model type.

        A config whose layers already use sliding windows (see `hf_sliding_layers`),
        or that carries a `consa` allocation (an export for the `consa` attention),
        is refused unless `allow_sliding_window=True`: the architecture alone would
        build a full-attention model. With it, the caller carries the windows over,
        as the importer does (`megatron_consa.conversion.windows.allocation_from_hf`).

        `for_transformers=True`: for readers of a model transformers runs (the consa
        attention, `HybridCache`, `tools/generate.py --hf-path`, KV budgets), which
        need the shapes only. What the megatron-core model here cannot build (RoPE
        scaling other than llama3's, as a long-context YaRN; attention or MLP biases)
        is then not refused, and an unsupported RoPE scaling reads as
        `rope_scaling_factor=None`: build no megatron-core model from such a result.
        """
        model_type = getattr(hf_config, "model_type", None)
        if model_type not in SUPPORTED_HF_MODEL_TYPES:
            raise ConsaConfigError(
                f"model_type={model_type!r} is not supported; supported: {SUPPORTED_HF_MODEL_TYPES}"
            )
        if not for_transformers:
            _reject_unsupported_hf_features(hf_config, model_type)
        if getattr(hf_config, CONSA_HF_CONFIG_KEY, None) is not None and not allow_sliding_window:
            raise ConsaConfigError(
                f"{model_type} config carries a hybrid FA/SWA allocation in its {CONSA_HF_CONFIG_KEY!r} field "
                "(an export for the consa attention); a model built from the architecture alone would run full "
                "attention everywhere. Import it with tools/convert_hf_to_megatron.py (writes allocation.json), "
                "or call from_hf(..., allow_sliding_window=True) and build the model with "
                "megatron_consa.conversion.windows.allocation_from_hf(config)"
            )
        window, sliding = hf_sliding_layers(hf_config)
        if any(sliding) and not allow_sliding_window:
            raise ConsaConfigError(
                f"{model_type} config uses sliding_window={window} on layers "
                f"{[i for i, s in enumerate(sliding) if s]} ({_sliding_source(hf_config)}); a model built "
                "from the architecture alone would run full attention there. Import it with "
                "tools/convert_hf_to_megatron.py (writes the equivalent allocation.json), or call "
                "from_hf(..., allow_sliding_window=True) and build the model with "
                "megatron_consa.conversion.windows.allocation_from_hf(config)"
            )
        act = getattr(hf_config, "hidden_act", "silu")
        if act != "silu":
            raise ConsaConfigError(f"hidden_act={act!r}: only SwiGLU (silu) MLPs are supported")
        rope_theta = getattr(hf_config, "rope_theta", None)
        if rope_theta is None:  # transformers >= 5 keeps it in rope_parameters
            rope_theta = (getattr(hf_config, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
        qkv_bias = bool(getattr(hf_config, "attention_bias", model_type == "qwen2"))
        return cls(
            vocab_size=hf_config.vocab_size,
            hidden_size=hf_config.hidden_size,
            intermediate_size=hf_config.intermediate_size,
            num_layers=hf_config.num_hidden_layers,
            num_attention_heads=hf_config.num_attention_heads,
            num_kv_heads=getattr(hf_config, "num_key_value_heads", None) or hf_config.num_attention_heads,
            head_dim=getattr(hf_config, "head_dim", None),
            rope_theta=float(rope_theta),
            rope_scaling_factor=_rope_scaling_factor_read(hf_config) if for_transformers else hf_rope_scaling_factor(hf_config),
            rms_norm_eps=hf_config.rms_norm_eps,
            qk_norm=model_type == "qwen3",
            qkv_bias=qkv_bias or model_type == "qwen2",
            tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
            max_position_embeddings=hf_config.max_position_embeddings,
            model_type=model_type,
        )


LLAMA3_ROPE_FIXED = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
"""The llama3 RoPE-scaling parameters megatron-core's GPTModel hard-codes (only `factor` is free)."""


def hf_rope_scaling_factor(hf_config: Any) -> Optional[float]:
    """The llama3 RoPE scaling factor of an HF config, None for plain RoPE; refuses what megatron-core cannot run."""
    scaling = getattr(hf_config, "rope_scaling", None)
    if scaling is None:
        scaling = getattr(hf_config, "rope_parameters", None)
    if not isinstance(scaling, dict):
        return None
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind in (None, "default"):
        return None
    if kind != "llama3":
        raise ConsaConfigError(
            f"rope_scaling type {kind!r} is not supported (plain RoPE and Llama 3's 'llama3' scaling are); "
            "convert a checkpoint without it"
        )
    differs = {k: scaling.get(k) for k, v in LLAMA3_ROPE_FIXED.items() if float(scaling.get(k, v)) != v}
    if differs:
        raise ConsaConfigError(
            f"rope_scaling llama3 with {differs}: megatron-core's llama3 scaling fixes "
            f"{LLAMA3_ROPE_FIXED} (only factor may differ)"
        )
    return float(scaling["factor"])


def _rope_scaling_factor_read(hf_config: Any) -> Optional[float]:
    """`hf_rope_scaling_factor`, None where megatron-core could not run the scaling (transformers does)."""
    try:
        return hf_rope_scaling_factor(hf_config)
    except ConsaConfigError:
        return None


def _reject_unsupported_hf_features(hf_config: Any, model_type: str) -> None:
    """Fail, naming the field, on HF settings the megatron-core model here would silently drop."""
    hf_rope_scaling_factor(hf_config)
    if model_type in ("llama", "mistral", "qwen3") and getattr(hf_config, "attention_bias", False):
        raise ConsaConfigError(
            f"{model_type} with attention_bias=True also has an o_proj bias, which is not supported; "
            "use a checkpoint with attention_bias=False"
        )
    if getattr(hf_config, "mlp_bias", False):
        raise ConsaConfigError(
            f"{model_type} with mlp_bias=True has biases on the MLP projections, which are not supported; "
            "use a checkpoint with mlp_bias=False"
        )


def hf_sliding_layers(hf_config: Any) -> tuple[Optional[int], list[bool]]:
    """(window, per-layer "uses the sliding window") exactly as transformers runs the config.

    * qwen2 / qwen3: layer i slides when `layer_types[i] == "sliding_attention"`
      and `sliding_window` is set (transformers clears `sliding_window` unless
      `use_sliding_window`; without `layer_types` it derives them from
      `max_window_layers`: layers >= max_window_layers slide).
    * mistral: `sliding_window` set -> every layer slides.
    * llama: no sliding windows.

    HF `sliding_window=W` is ConSA's window W (a query sees itself and W-1 earlier tokens).
    """
    model_type = getattr(hf_config, "model_type", None)
    n = hf_config.num_hidden_layers
    window = getattr(hf_config, "sliding_window", None)
    if model_type == "mistral":
        return window, [window is not None] * n
    if model_type not in ("qwen2", "qwen3"):
        return None, [False] * n
    if getattr(hf_config, "use_sliding_window", False) is False:
        window = None  # what transformers does; also for a raw dict-like config
    layer_types = getattr(hf_config, "layer_types", None)
    if layer_types is None:
        max_window_layers = getattr(hf_config, "max_window_layers", n)
        layer_types = ["sliding_attention" if window is not None and i >= max_window_layers else "full_attention" for i in range(n)]
    if len(layer_types) != n:
        raise ConsaConfigError(f"layer_types has {len(layer_types)} entries but num_hidden_layers={n}")
    unknown = sorted(set(layer_types) - {"full_attention", "sliding_attention"})
    if unknown:
        raise ConsaConfigError(f"layer_types contains {unknown}; only full_attention and sliding_attention are supported")
    if window is None and "sliding_attention" in layer_types:
        raise ConsaConfigError(
            "layer_types marks sliding_attention layers but use_sliding_window is false or sliding_window is null: "
            "transformers' behaviour is ambiguous there; set use_sliding_window=true with a sliding_window, "
            "or make every layer full_attention"
        )
    return window, [t == "sliding_attention" for t in layer_types]


def _sliding_source(hf_config: Any) -> str:
    if getattr(hf_config, "model_type", None) == "mistral":
        return "mistral sliding_window applies to every layer"
    return "use_sliding_window with layer_types / max_window_layers"
