"""Sliding windows across the Hugging Face boundary: HF config fields <-> a layer-wise Allocation.

Window semantics are the same on both sides: HF `sliding_window=W` is ConSA's
window W (a query sees itself and the W-1 tokens before it; megatron/TE
`window_size=(W-1, 0)`). Layer indices are 0-based on both sides (HF
`layer_types[i]`, allocation row i; megatron-core's layer_number is i+1).
"""

from __future__ import annotations

from typing import Any, Optional

from megatron_consa.allocation import Allocation, AllocationError
from megatron_consa.architecture import ArchitectureConfig, hf_sliding_layers

LAYER_TYPES_FAMILIES = ("qwen2", "qwen3")
"""HF families whose stock config expresses a per-layer FA/SWA mix (`layer_types`)."""


def allocation_from_hf(hf_config: Any, arch: ArchitectureConfig) -> Optional[Allocation]:
    """The fixed layer-wise allocation equivalent to the config's sliding windows, or None."""
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
        target_sparsity=swa_layers / arch.num_layers,
        fa=fa,
        source=f"hf:{arch.model_type}",
        metadata={"imported_from": "layer_types" if arch.model_type != "mistral" else "sliding_window"},
    ).validate("allocation from the Hugging Face config")


def hf_window_fields(allocation: Optional[Allocation], arch: ArchitectureConfig) -> dict[str, Any]:
    """The stock config fields that make transformers run `allocation` (layer-wise only).

    None or all-FA: windows off. Qwen2/Qwen3: `use_sliding_window`, `sliding_window`,
    `layer_types` (and `max_window_layers`, which transformers ignores once
    `layer_types` is given). Mistral: all-SWA only (`sliding_window`). A head-wise
    allocation, sinks, or a mix the family cannot express raise AllocationError.
    """
    n = arch.num_layers
    off: dict[str, Any] = {"sliding_window": None}
    if arch.model_type in LAYER_TYPES_FAMILIES:
        off.update(use_sliding_window=False, max_window_layers=n, layer_types=["full_attention"] * n)
    if allocation is None or allocation.num_fa_kv_heads == n * arch.num_kv_heads:
        return off if arch.model_type != "llama" else {}
    allocation.check_compatible(arch.num_layers, arch.num_kv_heads)
    if any(len(set(row)) > 1 for row in allocation.fa):
        raise AllocationError(
            "the allocation is head-wise (a layer mixes FA and SWA heads); stock transformers attention "
            "cannot run that, and the head-wise export (attn_implementation=\"consa\") is not implemented yet: "
            "export a layer-wise allocation (granularity layer)"
        )
    if allocation.sink_tokens:
        raise AllocationError(
            f"allocation sink_tokens={allocation.sink_tokens}: stock transformers sliding windows have no "
            "attention sinks; export an allocation with sink_tokens=0"
        )
    sliding = [row[0] == 0 for row in allocation.fa]
    if arch.model_type in LAYER_TYPES_FAMILIES:
        return {
            "use_sliding_window": True,
            "sliding_window": allocation.window,
            "max_window_layers": next((i for i, s in enumerate(sliding) if s), n),
            "layer_types": ["sliding_attention" if s else "full_attention" for s in sliding],
        }
    if arch.model_type == "mistral" and all(sliding):
        return {"sliding_window": allocation.window}
    raise AllocationError(
        f"{arch.model_type}'s stock config cannot express a per-layer FA/SWA mix (no layer_types): "
        f"only all-FA{' or all-SWA' if arch.model_type == 'mistral' else ''} exports to it"
    )
