"""Which part of each Hugging Face tensor one rank of a TP x PP layout holds (pure).

An import rank reads only its part of the checkpoint: `hf_tensor_part` says, per
HF tensor, whether the rank's pipeline stage holds it and which slice its tensor-
parallel rank holds, in the HF tensor's own layout. Read those slices (safetensors
reads a slice without the rest), fuse them with `keymap.hf_to_mcore` at the rank's
local head counts (`rank_architecture`), and `stage_state_dict` renumbers the
stage's layers: the result is the rank's megatron-core state dict.

Tensor parallelism follows megatron-core's layers:

* column-parallel (split rows): `linear_qkv` (weight and bias; the fused layout is
  grouped per KV head, so a rank's chunk is whole groups: HF rows of q, k and v of
  those groups, each contiguous), `word_embeddings` and `output_layer`
  (vocab-parallel, rows of `embed_tokens` / `lm_head`);
* `linear_fc1` (gated MLP, [gate; up]): each rank holds [gate_r; up_r] (rows of
  `gate_proj` and `up_proj`);
* row-parallel (split columns): `linear_proj` (`o_proj`), `linear_fc2` (`down_proj`);
* everything else (norms, QK-norm) is replicated.

Pipeline parallelism: megatron-core's uniform split; stage p owns global layers
[p*L/P, (p+1)*L/P), renumbered from 0 in its state dict; the embedding lives on
the first stage, the final norm and output layer on the last. With tied
embeddings the last stage's `output_layer.weight` is the embedding's shard.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Optional

from torch import Tensor

from megatron_consa.architecture import ArchitectureConfig
from megatron_consa.config import ConsaConfigError

_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.*)$")
_MCORE_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.*)$")
HF_ROWS = (  # split along dim 0
    "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
    "self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias",
    "mlp.gate_proj.weight", "mlp.up_proj.weight",
)
HF_COLUMNS = ("self_attn.o_proj.weight", "mlp.down_proj.weight")  # split along dim 1
HF_VOCAB = ("model.embed_tokens.weight", "lm_head.weight")  # split along dim 0


@dataclass(frozen=True)
class RankLayout:
    """One rank's place in a TP x PP layout."""

    tp_rank: int
    tp_size: int
    pp_rank: int
    pp_size: int

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1


def check_layout(arch: ArchitectureConfig, tp_size: int, pp_size: int) -> None:
    """Raise ConsaConfigError naming the field that does not divide by the layout."""
    for flag, size in (("--tensor-model-parallel-size", tp_size), ("--pipeline-model-parallel-size", pp_size)):
        if size < 1:
            raise ConsaConfigError(f"{flag}={size}: must be >= 1 (1: no split)")
    for name, value, by, flag in (
        ("num_attention_heads", arch.num_attention_heads, tp_size, "--tensor-model-parallel-size"),
        ("num_key_value_heads", arch.num_kv_heads, tp_size, "--tensor-model-parallel-size"),
        ("vocab_size", arch.vocab_size, tp_size, "--tensor-model-parallel-size"),
        ("intermediate_size", arch.intermediate_size, tp_size, "--tensor-model-parallel-size"),
        ("num_hidden_layers", arch.num_layers, pp_size, "--pipeline-model-parallel-size"),
    ):
        if value % by:
            raise ConsaConfigError(f"{name}={value} is not divisible by {flag}={by}: choose a size that divides it")


def stage_layers(arch: ArchitectureConfig, layout: RankLayout) -> range:
    """The global layer numbers of the rank's pipeline stage."""
    per_stage = arch.num_layers // layout.pp_size
    return range(layout.pp_rank * per_stage, (layout.pp_rank + 1) * per_stage)


def hf_tensor_part(name: str, shape: tuple[int, ...], arch: ArchitectureConfig,
                   layout: RankLayout) -> Optional[tuple[slice, ...]]:
    """The index of HF tensor `name` (of `shape`) that the rank reads: None when its stage
    does not hold the tensor, `()` for all of it (a replicated tensor), else its TP slice."""
    m = _HF_LAYER.match(name)
    if m:
        if int(m.group(1)) not in stage_layers(arch, layout):
            return None
        local = m.group(2)
    elif name == "model.embed_tokens.weight":  # again on the last stage when tied: its output layer
        if not (layout.is_first_stage or (layout.is_last_stage and arch.tie_word_embeddings)):
            return None
        local = name
    elif name in ("model.norm.weight", "lm_head.weight"):
        if not layout.is_last_stage:
            return None
        local = name
    else:
        return None  # not a model weight (rotary inv_freq); keymap.hf_to_mcore refuses unknown names
    if local in HF_ROWS or local in HF_VOCAB:
        dim = 0
    elif local in HF_COLUMNS:
        dim = 1
    else:
        return ()
    size = shape[dim] // layout.tp_size
    part = slice(layout.tp_rank * size, (layout.tp_rank + 1) * size)
    return (slice(None),) * dim + (part,)


def rank_architecture(arch: ArchitectureConfig, layout: RankLayout) -> ArchitectureConfig:
    """`arch` at one TP rank's head counts: what `keymap.hf_to_mcore` fuses a rank's q, k, v
    slices with (its groups, each [q heads, k, v], are the rank's chunk of the fused tensor)."""
    return dataclasses.replace(
        arch, num_attention_heads=arch.num_attention_heads // layout.tp_size,
        num_kv_heads=arch.num_kv_heads // layout.tp_size,
    )


def stage_state_dict(converted: dict[str, Tensor], arch: ArchitectureConfig, layout: RankLayout) -> dict[str, Tensor]:
    """The rank's state dict, local layer numbering, from its converted tensors (global
    numbering; the embedding also present on a tied last stage, as its output layer)."""
    layers = stage_layers(arch, layout)
    out: dict[str, Tensor] = {}
    for key, t in converted.items():
        m = _MCORE_LAYER.match(key)
        if m:
            layer = int(m.group(1))
            if layer not in layers:
                raise KeyError(f"{key}: layer {layer} is not on pipeline stage {layout.pp_rank} ({layers})")
            out[f"decoder.layers.{layer - layers.start}.{m.group(2)}"] = t
        elif key.startswith("embedding."):
            if layout.is_first_stage:
                out[key] = t
        elif key.startswith(("decoder.final_layernorm", "output_layer")):
            out[key] = t
        else:
            raise KeyError(f"{key}: not a GPTModel key this converter knows how to shard")
    if layout.is_last_stage and arch.tie_word_embeddings and not layout.is_first_stage:
        out["output_layer.weight"] = converted["embedding.word_embeddings.weight"]
    return out
