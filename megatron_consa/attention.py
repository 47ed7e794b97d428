"""`ConsaCoreAttention`: hybrid FA/SWA core attention for megatron-core.

It fills `SelfAttentionSubmodules.core_attention` (the slot megatron-core's
`DotProductAttention` / `TEDotProductAttention` normally fill) and takes the
same constructor and forward arguments, so it fits any megatron-core model
whose layers use `SelfAttention`. It does not touch `attention.py` or GPTModel.

Two modes, fixed by `config.consa.allocation`:

* learning (no allocation): the layer owns the hard-concrete gates of its
  units (`log_alpha`, float32, replicated on every TP rank). Per local KV group
  o = z * FA(q, k, v) + (1 - z) * SWA(q, k, v), z broadcast to the query heads
  of the group. Which branches to run is decided on the host, without a
  device sync in the forward: the controller hands each layer a host copy of
  its log_alpha with the iteration's noise, and the layer computes z there
  with the same float32 formula. A branch is skipped when every local z is
  exactly 0 or 1 (the clamp makes its gradient zero there); when every local
  z is 0 or 1 but both occur, each branch runs on its own heads only. Before the local groups are sliced,
  `log_alpha` passes through megatron-core's copy-to-tensor-parallel-region,
  so its gradient is summed over TP ranks and the replicas stay identical.
* fixed (a binary allocation): FA groups get only FA, SWA groups only SWA; a
  layer of one type is a single call, a mixed layer one call per type on the
  heads of that type: no extra attention work over a plain model. Inside
  `ConsaSelfAttention` (the ConSA layer specs) the layer stores its KV groups
  in `megatron_consa.group_layout.kv_group_order` (each type one contiguous
  slice of heads on every TP rank, FA groups spread evenly over the ranks), so
  each kernel reads a view of q, k and v; otherwise a mixed layer whose types
  interleave gathers its heads by type (a copy of q, k and v).

The gate noise for training is handed in by the controller once per iteration
(`set_gate_noise`), so the forward is a pure function of `log_alpha` and that
noise: activation recomputation and every TP rank see the same z.
"""

from __future__ import annotations

import logging
import math
import weakref
from typing import Optional

import torch
from torch import Tensor

from megatron.core import parallel_state
from megatron.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule

from megatron_consa.allocation import heads_by_type
from megatron_consa.backends.select import make_attention_backend
from megatron_consa.config import ConsaConfigError
from megatron_consa.gates import HardConcrete, deterministic_z, sample_z
from megatron_consa.group_layout import kv_group_order, rank_groups, type_runs

logger = logging.getLogger(__name__)


_checked_mask: Optional[tuple] = None  # (weakref to the last mask found plain causal, its version, seq)


def _check_causal_mask(mask: Tensor, seq: int, layer_index: int) -> None:
    """Refuse an `attention_mask` ([b or 1, 1, s, s], True = hidden, megatron's convention)
    that hides anything other than the future: the kernels apply causality (and the window)
    themselves and would silently drop a padding or document mask. The last mask checked
    is remembered with the sequence length it was checked at, so a model's layers compare it
    once per micro-batch."""
    global _checked_mask
    tracked = not mask.is_inference()  # inference tensors have no version counter: checked every time
    if tracked and _checked_mask is not None and _checked_mask[1:] == (mask._version, seq) and _checked_mask[0]() is mask:
        return
    if mask.dtype != torch.bool or mask.dim() != 4 or tuple(mask.shape[-2:]) != (seq, seq):
        raise ConsaConfigError(
            f"layer {layer_index}: attention_mask of shape {tuple(mask.shape)} and dtype {mask.dtype}: ConSA "
            f"attention takes None or megatron's causal mask ([b, 1, {seq}, {seq}], bool, True = hidden)"
        )
    causal = torch.ones(seq, seq, dtype=torch.bool, device=mask.device).triu_(1)
    if not torch.equal(mask, causal.expand_as(mask)):
        raise ConsaConfigError(
            f"layer {layer_index}: attention_mask hides more (or less) than the future: ConSA attention "
            "applies the causal and window masks itself and cannot apply padding or document masks; pass "
            "attention_mask=None with unpadded sequences (megatron's --reset-attention-mask is not supported)"
        )
    if tracked:
        _checked_mask = (weakref.ref(mask), mask._version, seq)


class _KeepInGraph(torch.autograd.Function):
    """Identity on `out` that makes it depend on `z` with a zero gradient."""

    @staticmethod
    def forward(ctx, out: Tensor, z: Tensor) -> Tensor:
        ctx.z_shape, ctx.z_dtype = z.shape, z.dtype
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, torch.zeros(ctx.z_shape, dtype=ctx.z_dtype, device=grad.device)


def _keep_in_graph(out: Tensor, z: Tensor) -> Tensor:
    if not (torch.is_grad_enabled() and z.requires_grad):
        return out
    return _KeepInGraph.apply(out, z)


class _GateBlend(torch.autograd.Function):
    """``swa + z * (fa - swa)`` per query head (`torch.lerp` in the model's dtype), with the gate's
    gradient summed in float32.

    lerp's own backward reduces ``grad * (fa - swa)`` over every position, batch entry and channel of
    a head into a bf16 / fp16 value (rounded by 0.4% in bf16, and in fp16 the first gradient of the
    model to overflow at large shapes and loss scales: a skipped step and a halved scale); here it
    accumulates and stays in float32, as the gates do. The branches' gradients are lerp's.
    """

    @staticmethod
    def forward(ctx, swa: Tensor, fa: Tensor, z: Tensor, heads_per_group: int) -> Tensor:
        ctx.save_for_backward(swa, fa, z)
        ctx.heads_per_group = heads_per_group
        return torch.lerp(swa, fa, _per_head(z, heads_per_group, swa.dtype))

    @staticmethod
    def backward(ctx, grad: Tensor):
        swa, fa, z = ctx.saved_tensors
        zh = _per_head(z, ctx.heads_per_group, grad.dtype)
        grad_fa = grad * zh if ctx.needs_input_grad[1] else None
        grad_swa = grad * (1 - zh) if ctx.needs_input_grad[0] else None
        grad_z = None
        if ctx.needs_input_grad[2]:
            per_head = (grad * (fa - swa)).sum(dim=(0, 1, 3), dtype=torch.float32)  # [np]
            grad_z = per_head.view(-1, ctx.heads_per_group).sum(dim=1).to(z.dtype)  # [ng]
        return grad_swa, grad_fa, grad_z, None


def _per_head(z: Tensor, heads_per_group: int, dtype: torch.dtype) -> Tensor:
    """Each KV group's z for its query heads, ``[np, 1]`` (broadcast over ``[sq, b, np, hn]``)."""
    return z.to(dtype).repeat_interleave(heads_per_group)[:, None]


class ConsaCoreAttention(MegatronModule):
    """Hybrid full / sliding-window core attention with optional learned gates.

    Input layout is megatron-core's: query [sq, b, np, hn], key and value
    [sk, b, ng, hn] (np, ng: local query heads and KV groups). Output
    [sq, b, np * hn].
    """

    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str = "self",
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection=None,
    ) -> None:
        super().__init__(config=config)
        consa = getattr(config, "consa", None)
        if consa is None:
            raise ConsaConfigError(
                "ConsaCoreAttention needs a config with a `consa` field "
                "(build it with megatron_consa.model.ConsaTransformerConfig)"
            )
        self.consa = consa
        if config.context_parallel_size != 1:
            raise ConsaConfigError("context_parallel_size > 1 is not supported by ConsaCoreAttention yet")
        if attention_type != "self":
            raise ConsaConfigError(f"attention_type={attention_type!r}: ConSA gates self-attention only")
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        if dropout:
            raise ConsaConfigError(
                f"attention_dropout={dropout}: ConsaCoreAttention does not implement attention "
                "dropout; set attention_dropout=0 (Qwen3/Llama train without it)"
            )

        if pg_collection is not None and hasattr(pg_collection, "tp"):
            self.tp_group = pg_collection.tp
        else:
            self.tp_group = parallel_state.get_tensor_model_parallel_group()
        tp_size = self.tp_group.size() if self.tp_group is not None else 1
        tp_rank = self.tp_group.rank() if self.tp_group is not None else 0

        self.attn_mask_type = attn_mask_type
        self.layer_index = max(1, layer_number) - 1  # global, 0-based
        self.num_kv_heads = config.num_query_groups or config.num_attention_heads
        consa.check_model_shape(num_layers=config.num_layers, num_kv_heads=self.num_kv_heads, tp_size=tp_size)
        self.kv_heads_local = self.num_kv_heads // tp_size
        self.heads_local = config.num_attention_heads // tp_size
        self.heads_per_group = self.heads_local // self.kv_heads_local
        self.tp_size, self.tp_rank = tp_size, tp_rank
        self.hidden_per_partition = config.kv_channels * self.heads_local
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(config.kv_channels)
        if config.apply_query_key_layer_scaling:
            raise ConsaConfigError("apply_query_key_layer_scaling=True is not supported; set it to False")
        for low_precision in ("fp8", "fp4"):
            if getattr(config, low_precision, None):
                raise ConsaConfigError(
                    f"{low_precision}={getattr(config, low_precision)!r}: ConSA's attention and KV-group "
                    f"reordering do not handle {low_precision.upper()} yet; train in bf16 ({low_precision}=None)"
                )

        self.hc = HardConcrete.from_config(consa)
        self.backend = make_attention_backend(
            consa.backend,
            window=consa.window,
            sink_tokens=consa.sink_tokens,
            softmax_scale=self.softmax_scale,
            kv_channels=config.kv_channels,
            layer_number=self.layer_index + 1,
        )

        if consa.learning:
            num_units = 1 if consa.granularity == "layer" else self.num_kv_heads
            self.log_alpha = torch.nn.Parameter(
                torch.full((num_units,), float(consa.init_log_alpha), dtype=torch.float32)
            )
            # Replicated on every TP rank (not split): megatron treats it like a norm weight.
            self.log_alpha.tensor_model_parallel = False
            self.log_alpha.consa_gate = True
            self.gate_unit_cost = self.num_kv_heads if consa.granularity == "layer" else 1
            # The global unit ids, on the host (not a buffer: `.to(device)` leaves them here),
            # where the controller draws every gate's noise in one call.
            self.gate_unit_ids = torch.arange(num_units, dtype=torch.int64) + self.layer_index * num_units
            self._gate_noise: Optional[Tensor] = None
            self._gate_noise_host: Optional[Tensor] = None
            self._noise_count = 0  # which set_gate_noise call the noise came from
            self._plan: Optional[tuple] = None  # (key, local z on the host)
            self.fa_row = None
        else:
            self.log_alpha = None
            self.fa_row = tuple(bool(v) for v in consa.allocation[self.layer_index])  # canonical order
        # How a local FA/SWA pattern is split into kernel calls (a few patterns in a run).
        self._type_plans: dict[tuple, tuple] = {}
        self.local_groups: tuple[int, ...] = tuple(range(tp_rank * self.kv_heads_local, (tp_rank + 1) * self.kv_heads_local))
        """Canonical indices of this rank's KV groups, in the order q, k and v hold them."""

    @property
    def fa_local(self) -> Optional[tuple[bool, ...]]:
        """Fixed mode: the type of each local group (True = FA), in `local_groups` order."""
        return None if self.fa_row is None else tuple(self.fa_row[g] for g in self.local_groups)

    def preferred_group_order(self) -> Optional[tuple[int, ...]]:
        """Fixed mode with `ConsaConfig.permute_kv_groups`: the order the layer's KV groups
        should be stored in (`group_layout.kv_group_order`); None otherwise."""
        if self.fa_row is None or not self.consa.permute_kv_groups:
            return None
        return kv_group_order(self.fa_row, self.tp_size)

    def adopt_group_order(self, order) -> None:
        """The layer's weights now store the KV groups in `order` (q, k and v arrive so):
        called by `ConsaSelfAttention` once it has moved them."""
        if self.fa_row is None:
            raise RuntimeError(f"layer {self.layer_index}: only a fixed allocation reorders KV groups")
        if sorted(order) != list(range(self.num_kv_heads)):
            raise ValueError(f"layer {self.layer_index}: {order} is not an order of {self.num_kv_heads} KV groups")
        self.local_groups = rank_groups(order, self.tp_size, self.tp_rank)

    # ---- gates ------------------------------------------------------------
    def set_gate_noise(self, u: Optional[Tensor], log_alpha_host: Optional[Tensor] = None,
                       u_device: Optional[Tensor] = None) -> None:
        """The controller's uniform noise for this iteration ([units], float32, on the host),
        optionally the same noise already on `log_alpha`'s device (`u_device`: the controller
        copies every gate's noise in one transfer; else it is copied here), and optionally a
        host copy of `log_alpha` for the same iteration (then the forward plans its branches
        without a device sync)."""
        self._noise_count += 1
        self._plan = None
        if u is None:
            self._gate_noise = self._gate_noise_host = None
            return
        self._gate_noise_host = u.detach().to(device="cpu", dtype=torch.float32)
        if u_device is None:
            u_device = u
        self._gate_noise = u_device.to(device=self.log_alpha.device, dtype=torch.float32)
        if log_alpha_host is not None:
            z = sample_z(log_alpha_host.to(device="cpu", dtype=torch.float32), self._gate_noise_host, self.hc)
            self._plan = (self._plan_key(training=True), self._local(z))

    def gate_values(self) -> Tensor:
        """z for every KV head of this layer ([num_kv_heads], float32), differentiable.

        Training uses the controller's noise; evaluation the noise-free value.
        """
        log_alpha = self.log_alpha
        if self.tp_size > 1:
            log_alpha = copy_to_tensor_model_parallel_region(log_alpha, group=self.tp_group)
        z = self._z(log_alpha, self._gate_noise)
        return z.expand(self.num_kv_heads) if z.numel() == 1 else z

    def _z(self, log_alpha: Tensor, noise: Optional[Tensor]) -> Tensor:
        """Training: the sample at this iteration's noise; evaluation: the noise-free z."""
        if not self.training:
            return deterministic_z(log_alpha, self.hc)
        if noise is None:
            raise RuntimeError(
                f"layer {self.layer_index}: no gate noise for this iteration; call "
                "ConsaController.begin_iteration(gates) before the forward pass"
            )
        return sample_z(log_alpha, noise, self.hc)

    def train(self, mode: bool = True) -> "ConsaCoreAttention":
        super().train(mode)
        self.backend.train(mode)  # the TE backend's attention instances are not submodules
        return self

    # ---- forward ----------------------------------------------------------
    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Optional[Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[Tensor] = None,
        packed_seq_params=None,
    ) -> Tensor:
        if packed_seq_params is not None:
            raise NotImplementedError("packed sequences are not supported by ConsaCoreAttention")
        if attention_bias is not None:
            raise NotImplementedError("attention_bias is not supported by ConsaCoreAttention")
        mask_type = attn_mask_type or self.attn_mask_type
        if mask_type not in (AttnMaskType.causal, AttnMaskType.padding_causal):
            raise NotImplementedError(f"attn_mask_type={mask_type}: ConSA attention is causal")
        if key.size(0) != query.size(0):
            raise NotImplementedError(
                f"layer {self.layer_index}: {query.size(0)} queries against {key.size(0)} keys (a KV cache?): "
                "ConsaCoreAttention runs whole sequences; generate through megatron_consa.inference "
                "(HybridCache), not megatron-core's inference context"
            )
        # The causal structure is built into both kernels: an attention_mask may only
        # repeat it (what megatron's data pipeline makes); padding or document masks are refused.
        if attention_mask is not None:
            _check_causal_mask(attention_mask, query.size(0), self.layer_index)

        if self.log_alpha is None:
            out = self._fixed(query, key, value)
        else:
            out = self._learning(query, key, value)
        # [sq, b, np, hn] -> [sq, b, np * hn]
        return out.reshape(out.size(0), out.size(1), self.hidden_per_partition)

    def _local(self, z: Tensor) -> Tensor:
        """This TP rank's groups of a per-KV-head (or one layer-unit) z."""
        z = z.expand(self.num_kv_heads) if z.numel() == 1 else z
        lo = self.tp_rank * self.kv_heads_local
        return z[lo : lo + self.kv_heads_local]

    def _plan_key(self, *, training: bool) -> tuple:
        return (training, self._noise_count if training else None, self.log_alpha._version, self.log_alpha.data_ptr())

    def _host_z(self) -> Tensor:
        """Local z on the host ([ng], float32): from the controller's copy when it is
        current, else one device sync (evaluation, or a gate changed since the copy)."""
        key = self._plan_key(training=self.training)
        if self._plan is None or self._plan[0] != key or not self.training:
            z = self._z(self.log_alpha.detach().float().cpu(), self._gate_noise_host)
            self._plan = (key, self._local(z))
        return self._plan[1]

    def _learning(self, query: Tensor, key: Tensor, value: Tensor) -> Tensor:
        z_host = self._host_z()  # decides the branches; no device sync
        z = self._local(self.gate_values())  # [ng], differentiable
        # z == 1 (or 0) exactly: o = FA (or SWA) and dz/dlog_alpha = 0 under the clamp.
        # z stays in the graph anyway, so every TP rank runs the backward all-reduce
        # of copy_to_tensor_model_parallel_region, whatever its local groups decided.
        saturated = bool(((z_host == 0) | (z_host == 1)).all())
        if saturated:
            fa = tuple(bool(v) for v in (z_host == 1).tolist())
            return _keep_in_graph(self._by_type(query, key, value, fa), z)
        fa = self.backend.full(query, key, value)  # [sq, b, np, hn]
        swa = self.backend.sliding(query, key, value)
        return _GateBlend.apply(swa, fa, z, self.heads_per_group)  # swa + z * (fa - swa), one fused op

    def _fixed(self, query: Tensor, key: Tensor, value: Tensor) -> Tensor:
        return self._by_type(query, key, value, self.fa_local)

    def _by_type(self, query: Tensor, key: Tensor, value: Tensor, fa: tuple[bool, ...]) -> Tensor:
        """FA on the local groups marked in `fa`, SWA on the rest: one call per type.

        When each type is one contiguous run of groups (always inside
        `ConsaSelfAttention`), each call reads a view of q, k and v and the outputs
        are concatenated (the one copy a single-type layer's output makes too);
        otherwise the heads are gathered by type (a copy of q, k and v).
        """
        calls = {True: self.backend.full, False: self.backend.sliding}
        plan = self._type_plan(fa, query.device)
        if plan[0] == "runs":
            _, types, head_sizes, group_sizes = plan
            if len(types) == 1:
                return calls[types[0]](query, key, value)
            # [sq, b, np_run, hn] views; split's backward is one cat of the gradients
            parts = zip(types, query.split(head_sizes, dim=2), key.split(group_sizes, dim=2), value.split(group_sizes, dim=2))
            return torch.cat([calls[t](q, k, v) for t, q, k, v in parts], dim=2)
        out = torch.empty_like(query)
        for is_fa, groups, heads in plan[1]:
            # [sq, b, np_type, hn]
            out[:, :, heads] = calls[is_fa](query.index_select(2, heads), key.index_select(2, groups), value.index_select(2, groups))
        return out

    def _type_plan(self, fa: tuple[bool, ...], device: torch.device) -> tuple:
        """("runs", types, head sizes, group sizes) when each type is one run of groups,
        else ("gather", [(is_fa, group index, query-head index)]); built once per pattern."""
        key = (fa, device)
        if key not in self._type_plans:
            if len(self._type_plans) >= 2 * self.kv_heads_local + 2:  # learning mode sees few patterns
                self._type_plans.clear()
            runs = type_runs(fa)
            if len(runs) <= 2:
                sizes = [stop - start for _, start, stop in runs]
                plan = ("runs", [t for t, _, _ in runs], [n * self.heads_per_group for n in sizes], sizes)
            else:
                fa_groups, fa_heads, swa_groups, swa_heads = heads_by_type(fa, self.heads_per_group)
                plan = ("gather", [(is_fa, torch.tensor(groups, device=device), torch.tensor(heads, device=device))
                                   for is_fa, groups, heads in ((True, fa_groups, fa_heads), (False, swa_groups, swa_heads))])
            self._type_plans[key] = plan
        return self._type_plans[key]

    # ---- allocation -------------------------------------------------------
    def fa_heads(self) -> list[int]:
        """The current FA/SWA decision of this layer's KV heads (1 = FA), in canonical order.

        Fixed mode: the allocation row. Learning mode: z > 0 at the noise-free
        evaluation value. All KV heads of the layer (`local_groups` says which
        this rank holds).
        """
        if self.log_alpha is None:
            return [int(v) for v in self.fa_row]
        with torch.no_grad():
            z = deterministic_z(self.log_alpha.float(), self.hc)
        z = z.expand(self.num_kv_heads) if z.numel() == 1 else z
        return [int(v > 0) for v in z.tolist()]
