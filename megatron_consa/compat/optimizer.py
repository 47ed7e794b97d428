"""Checkpointing megatron-core's mixed-precision optimizer when float32 parameters sit in a bf16/fp16 model.

ConSA's gates (``log_alpha``) stay float32 in a bf16 or fp16 model. megatron-core 0.19's
``Float16OptimizerWithFloat16Params`` (the optimizer for ``--bf16``/``--fp16`` without
``--use-distributed-optimizer``) keeps such parameters in ``fp32_from_fp32_groups`` and
trains them correctly, but its ``sharded_state_dict`` (optimizer.py, "Convert
fp32_from_fp16_params") numbers the optimizer's parameters by enumerating the float16
groups alone. The inner torch optimizer numbers every parameter of every group, so
with a float32 parameter present the numbers disagree and the save fails with a
``KeyError`` (or, were the ids to collide, would file one parameter's Adam state under
another's name). The distributed optimizer has its own, correct path.

A second problem follows: the gates' parameter group has no float16 parameter, so its
``fp32_from_fp16_params`` entry is an empty list among lists of sharded tensors.
dist_checkpointing files an empty list with the common (unsharded) state and the others
with the sharded state, each list compacted, so a load cannot put them back together
("Cannot merge two lists with different lengths").

``patch_fp32_param_checkpointing(optimizer)`` replaces, on each affected optimizer
instance, ``sharded_state_dict`` by ``_sharded_state_dict`` below (megatron-core's own
steps, with the parameters numbered in the inner optimizer's order, each float16
parameter standing for its float32 main copy, and ``fp32_from_fp16_params`` keyed by
group index, which merges back by key) and ``load_state_dict`` by one that turns that
dict back into megatron-core's per-group list before megatron-core's own load. The
checkpoint's keys and tensors are megatron-core's.
"""

from __future__ import annotations

import types
from itertools import chain
from typing import Optional

import torch


def _float16_optimizers(optimizer) -> list:
    from megatron.core.optimizer.optimizer import Float16OptimizerWithFloat16Params

    inner = getattr(optimizer, "chained_optimizers", [optimizer])
    return [opt for opt in inner if isinstance(opt, Float16OptimizerWithFloat16Params)]


def _sharded_state_dict(self, model_sharded_state_dict, is_loading: bool = False, metadata: Optional[dict] = None):
    """``Float16OptimizerWithFloat16Params.sharded_state_dict`` with float32 parameters numbered
    as the inner optimizer numbers them (see the module docstring)."""
    from megatron.core.dist_checkpointing.optimizer import (
        get_param_id_to_sharded_param_map,
        make_sharded_optimizer_tensor,
        optim_state_to_sharding_state,
    )

    if is_loading:
        self.init_state_fn(self.optimizer, self.config)
    state_dict = self.state_dict()
    # The inner optimizer's parameters in its numbering: param_groups in order, within a group
    # in order (torch's Optimizer.state_dict). A float16 parameter's main copy maps to the model
    # parameter that the model's sharded state dict holds; a float32 parameter is its own.
    main_to_model = {
        id(main): model
        for main_group, model_group in zip(self.fp32_from_float16_groups, self.float16_groups)
        for main, model in zip(main_group, model_group)
    }
    inner_params = list(chain.from_iterable(group["params"] for group in self.optimizer.param_groups))
    id_to_sharded_param_map = get_param_id_to_sharded_param_map(
        model_sharded_state_dict, [main_to_model.get(id(p), p) for p in inner_params]
    )
    number = {id(p): i for i, p in enumerate(inner_params)}
    state_dict["fp32_from_fp16_params"] = {  # by group index: an empty group merges back by its key
        index: [
            make_sharded_optimizer_tensor(
                id_to_sharded_param_map[number[id(main)]], main, prefix="optimizer.state.fp32_param"
            )
            for main in main_group
        ]
        for index, main_group in enumerate(state_dict["fp32_from_fp16_params"])
    }
    step = self._extract_common_per_param_step(state_dict["optimizer"])
    optim_state_to_sharding_state(state_dict["optimizer"], id_to_sharded_param_map, exclude_keys="step")
    if step:
        state_dict["optimizer"]["state"]["common_step"] = step
    return state_dict


def _load_state_dict(self, state_dict) -> None:
    """megatron-core's load, given ``fp32_from_fp16_params`` as its per-group list again."""
    groups = state_dict.get("fp32_from_fp16_params")
    if isinstance(groups, dict):
        state_dict = {**state_dict, "fp32_from_fp16_params": [groups[i] for i in sorted(groups)]}
    type(self).load_state_dict(self, state_dict)


def patch_fp32_param_checkpointing(optimizer) -> int:
    """Fix the sharded state dict of each mixed-precision optimizer in `optimizer` (a
    megatron-core optimizer or ChainedOptimizer) that holds float32 parameters; returns
    how many were patched (0 when there is nothing to fix: fp32 training, the distributed
    optimizer, or a model without float32 parameters)."""
    patched = 0
    for opt in _float16_optimizers(optimizer):
        if any(p.dtype == torch.float32 for group in opt.fp32_from_fp32_groups for p in group):
            opt.sharded_state_dict = types.MethodType(_sharded_state_dict, opt)
            opt.load_state_dict = types.MethodType(_load_state_dict, opt)
            patched += 1
    return patched


__all__ = ["patch_fp32_param_checkpointing"]
