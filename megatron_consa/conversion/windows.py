"""Sliding windows across the Hugging Face boundary: HF config fields <-> an Allocation.

Two forms in config.json:

* stock fields, for what stock transformers attention can run: a layer-wise
  allocation without sinks that the family's config expresses (Qwen2/Qwen3
  `use_sliding_window`/`sliding_window`/`layer_types`, any mix; Mistral
  `sliding_window`, all layers alike). Loads anywhere, no package needed.
* the `consa` attention, for everything else (a head-wise allocation, sinks, a
  per-layer mix on Llama/Mistral): the stock fields say all FA, the field
  `consa` holds the allocation (allocation.json without log_alpha) and
  `attn_implementation` names the attention that `import megatron_consa`
  registers with transformers (`megatron_consa.inference.hf`). Stock
  transformers refuses that name, and the name tells the user to
  `import megatron_consa`: such an export never runs full attention silently.

Window semantics are the same on both sides: HF `sliding_window=W` is ConSA's
window W (a query sees itself and the W-1 tokens before it; megatron/TE
`window_size=(W-1, 0)`). Layer indices are 0-based on both sides (HF
`layer_types[i]`, allocation row i; megatron-core's layer_number is i+1).
"""

from __future__ import annotations

from typing import Any, Optional

from megatron_consa.allocation import Allocation
from megatron_consa.architecture import CONSA_HF_CONFIG_KEY, ArchitectureConfig, hf_sliding_layers

LAYER_TYPES_FAMILIES = ("qwen2", "qwen3")
"""HF families whose stock config expresses a per-layer FA/SWA mix (`layer_types`)."""

CONSA_ATTENTION = "consa"
"""The attention implementation `import megatron_consa` registers with transformers:
`from_pretrained(path, attn_implementation="consa")`."""

CONSA_ATTENTION_IN_CONFIG = (
    "consa (the megatron-consa hybrid attention: pip install megatron-consa, then import megatron_consa "
    "before loading this model)"
)
"""The same attention under the name an export writes into config.json. Stock transformers
refuses an unknown `attn_implementation` with an error that quotes the name."""


def allocation_from_hf(hf_config: Any, arch: ArchitectureConfig) -> Optional[Allocation]:
    """The fixed allocation the config runs: its `consa` field, else the equivalent of its
    stock sliding windows (layer-wise), else None (all FA)."""
    block = getattr(hf_config, CONSA_HF_CONFIG_KEY, None)
    if block is not None:
        allocation = Allocation.from_dict(block, where=f"config field {CONSA_HF_CONFIG_KEY!r}")
        allocation.check_compatible(arch.num_layers, arch.num_kv_heads)
        return allocation
    window, sliding = hf_sliding_layers(hf_config)
    if not any(sliding):
        return None
    fa = [[0 if s else 1] * arch.num_kv_heads for s in sliding]
    swa_layers = sum(sliding)
    return Allocation(
        granularity="layer",
        num_layers=arch.num_layers,
        num_kv_heads=arch.num_kv_heads,
        window=int(window),
        sink_tokens=0,
        # every layer sliding (Mistral-7B-v0.1, an all-SWA export): a sparsity of 1 is no target an
        # Allocation takes (the all_swa preset records none either)
        target_sparsity=swa_layers / arch.num_layers if swa_layers < arch.num_layers else None,
        fa=fa,
        source=f"hf:{arch.model_type}",
        metadata={"imported_from": "layer_types" if arch.model_type != "mistral" else "sliding_window"},
    ).validate("allocation from the Hugging Face config")


def hf_window_fields(allocation: Optional[Allocation], arch: ArchitectureConfig) -> dict[str, Any]:
    """The config fields that make transformers run `allocation` (see the module docstring).

    None or all-FA: windows off. Stock fields where stock attention runs the
    allocation; otherwise stock fields all FA plus `consa` and `attn_implementation`.
    """
    off = _stock_fields(None, arch)
    if allocation is None or allocation.num_fa_kv_heads == arch.num_layers * arch.num_kv_heads:
        return off
    allocation.check_compatible(arch.num_layers, arch.num_kv_heads)
    stock = _stock_fields(allocation, arch)
    if stock is not None:
        return stock
    block = {**allocation.to_dict(), "log_alpha": None}
    return {**off, CONSA_HF_CONFIG_KEY: block, "attn_implementation": CONSA_ATTENTION_IN_CONFIG}


def set_window_fields(hf_config: Any, fields: dict[str, Any]) -> None:
    """Set `fields` (from `hf_window_fields`) on a transformers config, first removing a
    `consa` allocation and `attn_implementation` it may carry from an earlier export."""
    for key in (CONSA_HF_CONFIG_KEY, "attn_implementation"):
        if key in vars(hf_config):
            delattr(hf_config, key)
    n = hf_config.num_hidden_layers
    for key, value in fields.items():
        own = getattr(hf_config, key, None)
        if key == "max_window_layers" and isinstance(own, int) and min(own, n) == min(value, n):
            continue  # (any value from n on says "none slide": the config's own is kept, a round trip changes nothing)
        setattr(hf_config, key, value)


def _stock_fields(allocation: Optional[Allocation], arch: ArchitectureConfig) -> Optional[dict[str, Any]]:
    """Stock config fields for `allocation` (None: all FA), or None when stock attention cannot run it."""
    n = arch.num_layers
    if allocation is None:
        if arch.model_type in LAYER_TYPES_FAMILIES:  # (max_window_layers is read only with use_sliding_window:
            # a source's stays as it was)
            return {"sliding_window": None, "use_sliding_window": False, "layer_types": ["full_attention"] * n}
        return {"sliding_window": None} if arch.model_type == "mistral" else {}
    if allocation.sink_tokens or any(len(set(row)) > 1 for row in allocation.fa):
        return None  # sinks or a head-wise mix: stock attention has neither
    sliding = [row[0] == 0 for row in allocation.fa]
    if arch.model_type in LAYER_TYPES_FAMILIES:
        fields = {
            "use_sliding_window": True,
            "sliding_window": allocation.window,
            "layer_types": ["sliding_attention" if s else "full_attention" for s in sliding],
        }
        # the older field (read without layer_types): layers from `first` on slide, where that says the same;
        # else n, none (a reader of it alone runs the mix all FA: full attention, never a wrong window)
        first = next((i for i, s in enumerate(sliding) if s), n)
        fields["max_window_layers"] = first if all(sliding[first:]) else n
        return fields
    if arch.model_type == "mistral" and all(sliding):
        return {"sliding_window": allocation.window}
    return None  # a per-layer mix Llama/Mistral configs cannot express


__all__ = [
    "CONSA_ATTENTION",
    "CONSA_ATTENTION_IN_CONFIG",
    "allocation_from_hf",
    "hf_window_fields",
    "set_window_fields",
]
