"""`ConsaSelfAttention`: megatron-core's SelfAttention storing a fixed layer's KV groups by type.

With a fixed allocation, `ConsaCoreAttention.preferred_group_order` names the
order the layer's KV groups should be stored in (`megatron_consa.group_layout`:
each type one contiguous slice of heads on every TP rank, FA groups balanced
over the ranks). This subclass moves the weights there once, when it is built:

* `linear_qkv` rows (weight and bias; megatron's fused layout is one block per
  KV group, [its query heads, k, v]) and `linear_proj` columns (one block of
  query heads per group) are reordered. Rank r then holds the groups
  `order[r*G/T:(r+1)*G/T]`, which need not be its own slice of megatron's
  order: every rank all-gathers these two weights over TP once and keeps its
  groups, so the model starts from the same function as the unpermuted one
  (megatron's initialisation, whatever the layout). The per-head-dim QK norms
  are shared by all heads and stay as they are.
* `sharded_state_dict` (checkpoints, resume, conversion, export) stays
  canonical: each local group is its own `ShardedTensor` at its canonical
  offset, through megatron-core's `ShardedTensorFactory` (the mechanism of its
  fused SwiGLU fc1), so optimizer states, which share the parameters' layout,
  are saved and loaded canonically too, with no communication. A checkpoint
  does not depend on the order, the TP size or this class.
* `state_dict()` / `load_state_dict()` are, as everywhere in megatron-core, the
  rank's own tensors in its storage order (what `dist_checkpointing.load`
  merges back); only a layer whose order is not the identity differs from
  megatron's order there. In one process (TP1), `to_canonical_order` and
  `to_stored_order` convert a whole-model state dict between the two, e.g. to
  load `conversion.keymap.hf_to_mcore`'s output with `load_state_dict`.

Learning mode (no allocation) and `ConsaConfig.permute_kv_groups=False` leave
megatron-core's SelfAttention unchanged.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
from megatron.core.transformer.attention import SelfAttention

from megatron_consa.attention import ConsaCoreAttention
from megatron_consa.compat import compute_device
from megatron_consa.config import ConsaConfigError
from megatron_consa.group_layout import inverse_order, rank_groups, take_groups

GROUPED_TENSORS = (("linear_qkv", "weight", 0), ("linear_qkv", "bias", 0), ("linear_proj", "weight", 1))
"""(submodule, parameter, dim): the tensors made of one equal block per KV group along dim
(column-parallel QKV rows, row-parallel output-projection columns)."""


class ConsaSelfAttention(SelfAttention):
    """SelfAttention whose fixed layers store their KV groups in the core attention's order."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        core = self.core_attention
        order = core.preferred_group_order() if isinstance(core, ConsaCoreAttention) else None
        self.kv_group_order: Optional[tuple[int, ...]] = order
        """The stored order of the KV groups (None: megatron's order, canonical sharding)."""
        if order is None:
            return
        if self.config.attention_output_gate:
            raise ConsaConfigError(
                "attention_output_gate=True adds gate rows to the fused QKV projection that KV-group "
                "reordering does not move; set ConsaConfig.permute_kv_groups=False"
            )
        tp = self.pg_collection.tp
        self._tp_size, self._tp_rank = tp.size(), tp.rank()
        self._store_groups()
        core.adopt_group_order(order)

    def _grouped_parameters(self):
        for module, name, dim in GROUPED_TENSORS:
            param = getattr(getattr(self, module), name, None)
            # Transformer Engine's linears without a bias hold an empty plain tensor
            # there (megatron's local ones None): nothing to move, and not in the state.
            if isinstance(param, Tensor) and param.numel() > 0:
                yield module, name, dim, param

    @property
    def _local_groups(self) -> tuple[int, ...]:
        return rank_groups(self.kv_group_order, self._tp_size, self._tp_rank)

    @torch.no_grad()
    def _store_groups(self) -> None:
        """Move this rank's groups into its weights (all TP ranks call this together)."""
        num_groups = self.config.num_query_groups
        if self.kv_group_order == tuple(range(num_groups)):
            return
        for _, _, dim, param in self._grouped_parameters():
            full = _gather_tensor_parallel(param, dim, self.pg_collection.tp)  # megatron's order, all groups
            param.copy_(take_groups(full, self._local_groups, dim, num_groups))

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: Optional[dict] = None):
        state = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        if self.kv_group_order is None:
            return state
        for module, name, dim, _ in self._grouped_parameters():
            key = f"{prefix}{module}.{name}"
            state[key] = _canonical_group_factory(state[key], self._local_groups, dim, self.config.num_query_groups)
        return state


def to_stored_order(model: torch.nn.Module, state: dict) -> dict:
    """A TP1 state dict of `model` in megatron's (canonical) order -> the order its layers
    store their KV groups in (what `model.load_state_dict` takes). Other entries pass as they are."""
    return _reorder_state_dict(model, state, to_stored=True)


def to_canonical_order(model: torch.nn.Module, state: dict) -> dict:
    """Inverse of `to_stored_order`: `model`'s TP1 state dict (or gradients by parameter name)
    in megatron's order, as a model with `ConsaConfig.permute_kv_groups=False` holds it."""
    return _reorder_state_dict(model, state, to_stored=False)


def _reorder_state_dict(model: torch.nn.Module, state: dict, *, to_stored: bool) -> dict:
    out = dict(state)
    for prefix, module in model.named_modules():
        if not isinstance(module, ConsaSelfAttention) or module.kv_group_order is None:
            continue
        if module._tp_size != 1:
            raise ValueError(
                "a tensor-parallel rank holds other KV groups than its slice of megatron's order: "
                "move weights between layouts with dist_checkpointing (sharded_state_dict), not state_dict()"
            )
        order = module.kv_group_order if to_stored else inverse_order(module.kv_group_order)
        for name, param, dim in GROUPED_TENSORS:
            key = f"{prefix}.{name}.{param}"
            if key in out:
                out[key] = take_groups(out[key], order, dim, module.config.num_query_groups)
    return out


def _gather_tensor_parallel(t: Tensor, dim: int, group) -> Tensor:
    """The TP ranks' shards of `t` concatenated along `dim` (on this rank's device for the collective)."""
    if group is None or group.size() == 1:
        return t.detach().clone()
    device = compute_device()
    local = t.detach().to(device).contiguous()
    parts = [torch.empty_like(local) for _ in range(group.size())]
    dist.all_gather(parts, local, group=group)
    return torch.cat(parts, dim=dim).to(t.device)


def _canonical_group_factory(
    sharded: ShardedTensor, groups: Sequence[int], dim: int, num_groups: int
) -> ShardedTensorFactory:
    """`sharded` (this rank's slice of a per-group tensor, megatron's TP sharding) as one
    ShardedTensor per local group, each at its canonical group's offset.

    The build function receives the parameter, or an optimizer state of the same
    layout (megatron-core replaces `data` and prefixes the key), so both are
    written to and read from canonical offsets; the merge concatenates the groups
    back in storage order. Every layer of a fixed model uses it (also in the
    identity order), so all shards of a checkpoint key have the same shape, as
    dist_checkpointing's validation requires.
    """
    axis = sharded.prepend_axis_num + dim
    fragments = list(sharded.axis_fragmentations)
    fragments[axis] = num_groups

    def build(key: str, data: Tensor, replica_id, flattened_range) -> list[ShardedTensor]:
        if flattened_range is not None:
            raise NotImplementedError(
                "KV-group reordering has no flattened (fully_sharded_model_space) optimizer format; "
                "use the dp_reshardable distributed-optimizer format or ConsaConfig.permute_kv_groups=False"
            )
        size = data.size(dim) // len(groups)
        pieces = []
        for j, g in enumerate(groups):
            piece = data.narrow(dim, j * size, size)
            offset = list(sharded.global_offset)
            offset[axis] = g * size
            pieces.append(dataclasses.replace(
                sharded, key=key, data=piece, dtype=piece.dtype, local_shape=tuple(piece.shape),
                global_offset=tuple(offset), axis_fragmentations=tuple(fragments), replica_id=replica_id,
            ))
        return pieces

    def merge(pieces: list[Tensor]) -> Tensor:
        return torch.cat(pieces, dim=dim)

    return ShardedTensorFactory(sharded.key, sharded.data, build, merge, sharded.replica_id)
