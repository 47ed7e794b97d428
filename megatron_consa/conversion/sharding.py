"""Split a full megatron-core GPTModel state dict into one rank's TP x PP shard (pure).

Tensor parallelism follows megatron-core's layers:

* column-parallel (split rows, dim 0): `linear_qkv` (weight and bias; the fused
  layout is grouped per KV head, so contiguous chunks are whole groups),
  `word_embeddings` and `output_layer` (vocab-parallel);
* `linear_fc1` (gated MLP, [gate; up]): each rank holds [gate_r; up_r];
* row-parallel (split columns, dim 1): `linear_proj`, `linear_fc2`;
* everything else (norms, QK-norm) is replicated.

Pipeline parallelism: megatron-core's uniform split; stage p owns global layers
[p*L/P, (p+1)*L/P), renumbered from 0 in its state dict; the embedding lives on
the first stage, the final norm and output layer on the last. With tied
embeddings the last stage's `output_layer.weight` is the embedding's shard.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import Tensor

from megatron_consa.architecture import ArchitectureConfig
from megatron_consa.config import ConsaConfigError

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.*)$")
COLUMN_PARALLEL = ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias")
ROW_PARALLEL = ("self_attention.linear_proj.weight", "mlp.linear_fc2.weight")
GATED = ("mlp.linear_fc1.weight",)
VOCAB_PARALLEL = ("embedding.word_embeddings.weight", "output_layer.weight")


@dataclass(frozen=True)
class RankLayout:
    """One rank's place in a TP x PP layout."""

    tp_rank: int
    tp_size: int
    pp_rank: int
    pp_size: int


def check_layout(arch: ArchitectureConfig, tp_size: int, pp_size: int) -> None:
    """Raise ConsaConfigError naming the field that does not divide by the layout."""
    for name, value, by, flag in (
        ("num_attention_heads", arch.num_attention_heads, tp_size, "--tensor-model-parallel-size"),
        ("num_key_value_heads", arch.num_kv_heads, tp_size, "--tensor-model-parallel-size"),
        ("vocab_size", arch.vocab_size, tp_size, "--tensor-model-parallel-size"),
        ("intermediate_size", arch.intermediate_size, tp_size, "--tensor-model-parallel-size"),
        ("num_hidden_layers", arch.num_layers, pp_size, "--pipeline-model-parallel-size"),
    ):
        if by < 1 or value % by:
            raise ConsaConfigError(f"{name}={value} is not divisible by {flag}={by}: choose a size that divides it")


def _tp_chunk(t: Tensor, dim: int, layout: RankLayout) -> Tensor:
    return torch.chunk(t, layout.tp_size, dim=dim)[layout.tp_rank]


def shard_tensor(key: str, t: Tensor, layout: RankLayout) -> Tensor:
    """This rank's TP slice of one full tensor (`key` without the layer prefix or with it)."""
    name = _LAYER.sub(r"\2", key)
    if name in COLUMN_PARALLEL or key in VOCAB_PARALLEL:
        return _tp_chunk(t, 0, layout).clone()
    if name in ROW_PARALLEL:
        return _tp_chunk(t, 1, layout).clone()
    if name in GATED:
        gate, up = torch.chunk(t, 2, dim=0)
        return torch.cat([_tp_chunk(gate, 0, layout), _tp_chunk(up, 0, layout)], dim=0)
    return t.clone()


def shard_state_dict(full: dict[str, Tensor], arch: ArchitectureConfig, layout: RankLayout) -> dict[str, Tensor]:
    """One rank's state dict (local layer numbering) from the full TP1PP1 state dict."""
    check_layout(arch, layout.tp_size, layout.pp_size)
    per_stage = arch.num_layers // layout.pp_size
    first = layout.pp_rank * per_stage
    is_first, is_last = layout.pp_rank == 0, layout.pp_rank == layout.pp_size - 1
    out: dict[str, Tensor] = {}
    for key, t in full.items():
        m = _LAYER.match(key)
        if m:
            layer = int(m.group(1))
            if not first <= layer < first + per_stage:
                continue
            out[f"decoder.layers.{layer - first}.{m.group(2)}"] = shard_tensor(key, t, layout)
        elif key.startswith("embedding."):
            if is_first:
                out[key] = shard_tensor(key, t, layout)
        elif key.startswith(("decoder.final_layernorm", "output_layer")):
            if is_last:
                out[key] = shard_tensor(key, t, layout)
        else:
            raise KeyError(f"{key}: not a GPTModel key this converter knows how to shard")
    if is_last and arch.tie_word_embeddings and not is_first:
        out["output_layer.weight"] = shard_tensor("output_layer.weight", full["embedding.word_embeddings.weight"], layout)
    return out
