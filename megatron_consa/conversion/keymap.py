"""Declarative key map between Hugging Face Qwen3/Qwen2/Llama/Mistral and megatron-core GPTModel.

Pure tensor functions, no I/O and no process groups. The map is a table of
per-layer entries; each names the megatron key, the HF key(s) and how the
tensors combine:

* `copy`: one HF tensor, same layout;
* `qkv`:  HF q, k, v projections -> megatron's fused `linear_qkv`, interleaved
  per KV group as [q heads of the group, k, v] (the layout megatron-core's
  SelfAttention splits);
* `gate_up`: HF gate_proj and up_proj -> megatron's `linear_fc1` = [gate; up].

Names of the norm weights differ between the local spec (separate norm
modules) and the Transformer Engine spec (norms fused into the next linear);
`te=True` selects the latter.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from megatron_consa.architecture import ArchitectureConfig


@dataclass(frozen=True)
class KeyEntry:
    mcore: str
    hf: tuple[str, ...]
    kind: str = "copy"  # copy | qkv | gate_up


def layer_entries(arch: ArchitectureConfig, *, te: bool = False) -> list[KeyEntry]:
    """The per-layer entries; `{i}` stands for the layer index."""
    hf = "model.layers.{i}."
    mc = "decoder.layers.{i}."
    entries = [
        KeyEntry(
            mc + ("self_attention.linear_qkv.layer_norm_weight" if te else "input_layernorm.weight"),
            (hf + "input_layernorm.weight",),
        ),
        KeyEntry(
            mc + "self_attention.linear_qkv.weight",
            (hf + "self_attn.q_proj.weight", hf + "self_attn.k_proj.weight", hf + "self_attn.v_proj.weight"),
            "qkv",
        ),
        KeyEntry(mc + "self_attention.linear_proj.weight", (hf + "self_attn.o_proj.weight",)),
        KeyEntry(
            mc + ("mlp.linear_fc1.layer_norm_weight" if te else "pre_mlp_layernorm.weight"),
            (hf + "post_attention_layernorm.weight",),
        ),
        KeyEntry(mc + "mlp.linear_fc1.weight", (hf + "mlp.gate_proj.weight", hf + "mlp.up_proj.weight"), "gate_up"),
        KeyEntry(mc + "mlp.linear_fc2.weight", (hf + "mlp.down_proj.weight",)),
    ]
    if arch.qkv_bias:
        entries.append(
            KeyEntry(
                mc + "self_attention.linear_qkv.bias",
                (hf + "self_attn.q_proj.bias", hf + "self_attn.k_proj.bias", hf + "self_attn.v_proj.bias"),
                "qkv",
            )
        )
    if arch.qk_norm:
        entries += [
            KeyEntry(mc + "self_attention.q_layernorm.weight", (hf + "self_attn.q_norm.weight",)),
            KeyEntry(mc + "self_attention.k_layernorm.weight", (hf + "self_attn.k_norm.weight",)),
        ]
    return entries


def global_entries(arch: ArchitectureConfig) -> list[KeyEntry]:
    entries = [
        KeyEntry("embedding.word_embeddings.weight", ("model.embed_tokens.weight",)),
        KeyEntry("decoder.final_layernorm.weight", ("model.norm.weight",)),
    ]
    if not arch.tie_word_embeddings:
        entries.append(KeyEntry("output_layer.weight", ("lm_head.weight",)))
    return entries


def fuse_qkv(q: Tensor, k: Tensor, v: Tensor, arch: ArchitectureConfig) -> Tensor:
    """HF q [nh*d, ...], k/v [ng*d, ...] -> megatron [ng*(nh/ng + 2)*d, ...]."""
    ng, d = arch.num_kv_heads, arch.head_dim
    rep = arch.num_attention_heads // ng
    rest = q.shape[1:]
    q = q.reshape(ng, rep * d, *rest)
    k = k.reshape(ng, d, *rest)
    v = v.reshape(ng, d, *rest)
    return torch.cat([q, k, v], dim=1).reshape(ng * (rep + 2) * d, *rest)


def split_qkv(qkv: Tensor, arch: ArchitectureConfig) -> tuple[Tensor, Tensor, Tensor]:
    """Inverse of fuse_qkv."""
    ng, d = arch.num_kv_heads, arch.head_dim
    rep = arch.num_attention_heads // ng
    rest = qkv.shape[1:]
    x = qkv.reshape(ng, (rep + 2) * d, *rest)
    q, k, v = torch.split(x, [rep * d, d, d], dim=1)
    return q.reshape(ng * rep * d, *rest), k.reshape(ng * d, *rest), v.reshape(ng * d, *rest)


def hf_to_mcore(hf_state: dict[str, Tensor], arch: ArchitectureConfig, *, te: bool = False,
                partial: bool = False) -> dict[str, Tensor]:
    """A full (unsharded) megatron-core GPTModel state dict from an HF state dict.

    `partial`: `hf_state` holds only some entries (one pipeline stage's, checked whole
    before): convert those, without the missing- and leftover-tensor checks.
    """
    out: dict[str, Tensor] = {}
    used: set[str] = set()
    tables = [(e, None) for e in global_entries(arch)]
    tables += [(e, i) for i in range(arch.num_layers) for e in layer_entries(arch, te=te)]
    for entry, i in tables:
        names = [h.format(i=i) for h in entry.hf]
        missing = [n for n in names if n not in hf_state]
        if missing and partial:
            continue
        if missing:
            raise ValueError(f"Hugging Face checkpoint lacks {missing} (needed for {entry.mcore.format(i=i)})")
        tensors = [hf_state[n] for n in names]
        if entry.kind == "qkv":
            value = fuse_qkv(*tensors, arch)
        elif entry.kind == "gate_up":
            value = torch.cat(tensors, dim=0)
        else:
            value = tensors[0]
        out[entry.mcore.format(i=i)] = value  # no copy: the callers only read (a clone doubled an import's peak)
        used.update(names)
    leftover = sorted(set(hf_state) - used - {"lm_head.weight"} - {k for k in hf_state if k.endswith("rotary_emb.inv_freq")})
    if leftover and not partial:
        raise ValueError(
            f"Hugging Face checkpoint has tensors this architecture does not use: {leftover[:8]}"
            f"{' ...' if len(leftover) > 8 else ''}; the model would silently drop them"
        )
    return out


def mcore_to_hf(mcore_state: dict[str, Tensor], arch: ArchitectureConfig, *, te: bool = False) -> dict[str, Tensor]:
    """Inverse of hf_to_mcore (megatron-only keys such as gates are ignored). The tensors
    are views of `mcore_state`'s (q, k, v of the fused QKV share its storage): copy what
    is kept or written."""
    out: dict[str, Tensor] = {}
    tables = [(e, None) for e in global_entries(arch)]
    tables += [(e, i) for i in range(arch.num_layers) for e in layer_entries(arch, te=te)]
    for entry, i in tables:
        value = mcore_state[entry.mcore.format(i=i)]
        names = [h.format(i=i) for h in entry.hf]
        if entry.kind == "qkv":
            parts = split_qkv(value, arch)
        elif entry.kind == "gate_up":
            parts = torch.chunk(value, 2, dim=0)
        else:
            parts = (value,)
        for n, p in zip(names, parts):
            out[n] = p
    if arch.tie_word_embeddings:
        out["lm_head.weight"] = out["model.embed_tokens.weight"]
    return out


def expected_hf_shapes(arch: ArchitectureConfig) -> dict[str, tuple[int, ...]]:
    """The shape of every HF tensor the architecture needs (tied models have no lm_head)."""
    h, nh, ng, d, ffn = arch.hidden_size, arch.num_attention_heads, arch.num_kv_heads, arch.head_dim, arch.intermediate_size
    per_layer = {
        "input_layernorm.weight": (h,),
        "post_attention_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (nh * d, h),
        "self_attn.k_proj.weight": (ng * d, h),
        "self_attn.v_proj.weight": (ng * d, h),
        "self_attn.o_proj.weight": (h, nh * d),
        "mlp.gate_proj.weight": (ffn, h),
        "mlp.up_proj.weight": (ffn, h),
        "mlp.down_proj.weight": (h, ffn),
    }
    if arch.qkv_bias:
        per_layer.update({"self_attn.q_proj.bias": (nh * d,), "self_attn.k_proj.bias": (ng * d,), "self_attn.v_proj.bias": (ng * d,)})
    if arch.qk_norm:
        per_layer.update({"self_attn.q_norm.weight": (d,), "self_attn.k_norm.weight": (d,)})
    shapes = {"model.embed_tokens.weight": (arch.vocab_size, h), "model.norm.weight": (h,)}
    if not arch.tie_word_embeddings:
        shapes["lm_head.weight"] = (arch.vocab_size, h)
    for i in range(arch.num_layers):
        shapes.update({f"model.layers.{i}.{k}": v for k, v in per_layer.items()})
    return shapes


def check_hf_shapes(hf_state: dict[str, Tensor], arch: ArchitectureConfig) -> None:
    """Raise ValueError naming the first tensor that is missing or has the wrong shape."""
    for name, shape in expected_hf_shapes(arch).items():
        if name not in hf_state:
            raise ValueError(f"the Hugging Face checkpoint lacks tensor {name!r} (shape {list(shape)} expected)")
        got = tuple(hf_state[name].shape)
        if got != shape:
            raise ValueError(
                f"tensor {name!r} has shape {list(got)} but config.json implies {list(shape)}: "
                "the weights do not belong to this config"
            )
