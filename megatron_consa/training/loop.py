"""The ConSA training step on megatron-core's schedules, DDP and optimizer.

One iteration:

1. the controller hands every local gate its noise (keyed by the iteration);
2. megatron-core's forward-backward schedule (no pipelining, 1F1B or
   interleaved 1F1B) runs the micro-batches and finalises the gradients
   (data-parallel reduction, embedding and sequence-parallel norm reductions);
3. each pipeline stage adds its own share of the constraint gradient,
   d/dlog_alpha [lambda1 (s_hat - t) + lambda2 (s_hat - t)^2], where s_hat is
   global (the FA cost summed over the pipeline group). It is added once per
   step (the LM loss is already averaged over micro-batches and DP ranks),
   multiplied by the loss scale so fp16 unscaling treats it like the LM part,
   and, being identical on every DP replica, needs no extra reduction;
4. the optimizer steps (gates in their own group: own lr, no weight decay, and
   their own gradient-norm clip, outside the model's global clip, so the
   constraint never shrinks the LM update and LM spikes never shrink the
   gates'), gates are clamped to their bounds, and, if the step was applied,
   the multipliers take their dual step;
5. every `allocation_check_interval` iterations all replicas of every gate are
   compared bit for bit.

`ConsaTrainer.settle_report()` judges the recorded tail of s_hat and
`ConsaTrainer.finalize()` turns the gates into an `Allocation` at the exact
budget, refusing a run that did not settle.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any, Callable, Optional

import torch
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer import get_standard_config_overrides
from megatron.core.optimizer import optimizer as mcore_optimizer_module
from megatron.core.optimizer.optimizer_config import ParamKey
from megatron.core.optimizer_param_scheduler import (
    OptimizerParamScheduler, ParamGroupOverride, get_canonical_lr_for_logging,
)
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate
from megatron.core.transformer.enums import AttnBackend
from megatron.core.transformer.module import Float16Module, param_is_not_shared
from megatron.core.utils import StragglerDetector, get_model_config

from megatron_consa.allocation import Allocation
from megatron_consa.backends.select import resolve_backend_name, transformer_engine_available
from megatron_consa.compat import has_cuda, patch_fp32_param_checkpointing
from megatron_consa.config import ConsaConfig, ConsaConfigError
from megatron_consa.controller import ConsaController, SettleReport, clamp_log_alpha_, judge_settling
from megatron_consa.gates import HardConcrete, deterministic_z
from megatron_consa.model import (
    ArchitectureConfig,
    ConsaTransformerConfig,
    build_gpt_model,
    build_transformer_config,
    consa_attention_modules,
)
from megatron_consa.training.config import ParallelConfig, TrainingConfig
from megatron_consa.training.data import PrefetchedBatches, SampleSource, micro_batches, repeat_for_chunks
from megatron_consa.training.flops import iteration_flops
from megatron_consa.training.parallel import (
    check_gates_consistent,
    check_weights_consistent,
    device,
    last_stage_sums_to_all,
    pipeline_cost_all_reduce,
)
from megatron_consa.training.timing import TIMERS_TO_LOG, build_timers, memory_scalars, report_timers
from megatron_consa.training.writers import MetricWriters

if TYPE_CHECKING:
    from megatron.core.timers import Timers

logger = logging.getLogger(__name__)


TRANSFORMER_IMPLS = ("auto", "local", "transformer_engine", "stock")


class TrainingDivergedError(RuntimeError):
    """An applied step gave a loss, gradient norm or s_hat that is not finite (raised on every
    rank alike: the values are the same everywhere)."""


def check_transformer_impl(transformer_impl: str) -> None:
    """Raise `ConsaConfigError`, naming the field, for a layer spec this machine cannot build."""
    if transformer_impl not in TRANSFORMER_IMPLS:
        raise ConsaConfigError(f"transformer_impl={transformer_impl!r}: use one of {TRANSFORMER_IMPLS}")
    if transformer_impl == "transformer_engine" and not transformer_engine_available():
        raise ConsaConfigError(
            "transformer_impl='transformer_engine' (--transformer-impl) needs CUDA and an importable "
            "transformer_engine: install Transformer Engine on the GPU machines, or use 'local' or 'auto'"
        )


def build_model_chunks(
    arch: ArchitectureConfig,
    consa: ConsaConfig,
    parallel: ParallelConfig,
    training: TrainingConfig,
    *,
    wrap_ddp: bool = True,
    transformer_impl: str = "auto",
) -> tuple[list[torch.nn.Module], ConsaTransformerConfig]:
    """This rank's model chunks (one per virtual stage), in megatron-core's DDP.

    `transformer_impl`: `local` (megatron-core's torch layers), `transformer_engine`
    (TE layers), `auto` (TE layers exactly when the ConSA backend is TE), or
    `stock` (megatron-core's own local spec and attention, no ConSA: a benchmark
    baseline; it needs an all-FA fixed allocation).
    """
    check_transformer_impl(transformer_impl)
    stock = transformer_impl == "stock"
    on_te = not stock and resolve_backend_name(consa.backend, sink_tokens=consa.sink_tokens) == "te"
    if training.attention_backend == "local" and on_te:
        raise ConsaConfigError(
            "TrainingConfig.attention_backend='local' turns Transformer Engine's attention kernels off, and "
            f"ConsaConfig.backend={consa.backend!r} runs on them here: use backend='torch' (--consa-backend torch)"
        )
    if training.attention_backend in ("flash", "fused", "unfused") and not on_te and torch.distributed.get_rank() == 0:
        logger.warning("attention_backend=%r (--attention-backend) picks Transformer Engine's attention kernels; this "
                       "run's attention does not run on them (the torch backend, or megatron-core's local one): no "
                       "effect", training.attention_backend)
    if stock and (consa.learning or any(0 in row for row in consa.allocation)):
        raise ConsaConfigError("transformer_impl='stock' is megatron-core's full attention: use an all-FA fixed allocation")
    use_te = None if transformer_impl in ("auto", "stock") else transformer_impl == "transformer_engine"
    dtype = torch.bfloat16 if training.bf16 else torch.float16 if training.fp16 else torch.float32
    config = build_transformer_config(
        arch,
        consa,
        params_dtype=dtype,
        bf16=training.bf16,
        fp16=training.fp16,
        pipeline_dtype=dtype,
        init_method_std=training.init_method_std,
        calculate_per_token_loss=training.calculate_per_token_loss,
        # a fusion, CUDA only like the others (build_transformer_config)
        cross_entropy_loss_fusion=training.cross_entropy_loss_fusion and has_cuda(),
        attention_backend=AttnBackend[training.attention_backend],
        deterministic_mode=training.deterministic_mode,
        **({"use_cpu_initialization": True} if training.use_cpu_initialization else {}),  # (the default: not CUDA)
        **parallel.megatron_fields(),
    )
    vpp = parallel.virtual_pipeline_model_parallel_size
    chunks = []
    for vp_stage in range(vpp or 1):
        model = build_gpt_model(config, arch, use_transformer_engine=False if stock else use_te,
                                vp_stage=vp_stage if vpp else None, stock_attention=stock)
        model.to(device())
        if training.bf16 or training.fp16:
            model = Float16Module(config, model)
        chunks.append(model)
    # Gates stay float32 whatever the model dtype (Float16Module casts everything).
    for m in consa_attention_modules(chunks):
        if m.log_alpha is not None:
            m.log_alpha.data = m.log_alpha.data.float()
    if consa.gates_only:
        for chunk in chunks:
            for name, p in chunk.named_parameters():
                p.requires_grad_(name.endswith("log_alpha"))
    if wrap_ddp:
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=not training.grad_reduce_in_bf16,  # (the float32 gates keep float32 grads)
            overlap_grad_reduce=parallel.overlap_grad_reduce,
            overlap_param_gather=parallel.overlap_param_gather,
            # the interleaved schedule launches every stage's gather at once (Megatron-LM's default)
            align_param_gather=parallel.overlap_param_gather and vpp is not None,
            use_distributed_optimizer=parallel.use_distributed_optimizer,
        )
        chunks = [
            DistributedDataParallel(config=config, ddp_config=ddp_config, module=c, disable_bucketing=i > 0)
            for i, c in enumerate(chunks)
        ]
    return chunks, config


GATE_GRAD_NORM_GROUP = "consa_gate"
"""megatron-core's separate gradient-norm group the gates belong to (see `exclude_gates_from_global_clip`)."""


def exclude_gates_from_global_clip(chunks: list[torch.nn.Module]) -> None:
    """Give the gates a gradient-norm clip of their own, outside the model's global one.

    megatron-core (>= 0.19) excludes parameters tagged with a registered
    `grad_norm_group` from the global gradient norm and clips each group by its
    own norm (it does so for multi-token-prediction heads). We register one
    group for the gates and tag them: the constraint gradient never shrinks the
    LM update, and an LM spike never shrinks the gates' update. The reported
    `grad_norm` is the model's alone.
    """
    groups = getattr(mcore_optimizer_module, "SEPARATE_GRAD_NORM_GROUPS", None)
    if groups is None or not hasattr(mcore_optimizer_module, "GRAD_NORM_GROUP_ATTR"):
        raise RuntimeError(
            "megatron.core.optimizer.optimizer has no SEPARATE_GRAD_NORM_GROUPS / GRAD_NORM_GROUP_ATTR: "
            "this megatron-core cannot clip the ConSA gates apart from the model; use megatron-core 0.19"
        )
    if GATE_GRAD_NORM_GROUP not in groups:
        mcore_optimizer_module.SEPARATE_GRAD_NORM_GROUPS = tuple(groups) + (GATE_GRAD_NORM_GROUP,)
    for m in consa_attention_modules(chunks):
        if m.log_alpha is not None:
            setattr(m.log_alpha, mcore_optimizer_module.GRAD_NORM_GROUP_ATTR, GATE_GRAD_NORM_GROUP)


def build_optimizer(
    chunks: list[torch.nn.Module], consa: ConsaConfig, parallel: ParallelConfig, training: TrainingConfig,
    *, timers: Optional[Timers] = None,
):
    """megatron-core's optimizer with the gates in their own group, and its LR scheduler
    (`timers`: megatron-core's, for the optimizer step's parts)."""
    exclude_gates_from_global_clip(chunks)
    start_wd, end_wd, wd_incr_style = training.weight_decay_schedule()
    opt_config = OptimizerConfig(
        optimizer="adam",
        lr=training.lr,
        min_lr=training.min_lr,
        weight_decay=start_wd,
        adam_beta1=training.adam_beta1,
        adam_beta2=training.adam_beta2,
        adam_eps=training.adam_eps,
        clip_grad=training.clip_grad,
        decoupled_lr=training.decoupled_lr,  # the embedding and output layer (get_standard_config_overrides)
        decoupled_min_lr=training.decoupled_min_lr,
        bf16=training.bf16,
        fp16=training.fp16,
        params_dtype=torch.bfloat16 if training.bf16 else torch.float16 if training.fp16 else torch.float32,
        use_distributed_optimizer=parallel.use_distributed_optimizer,
        overlap_param_gather=parallel.overlap_param_gather,
        log_num_zeros_in_grad=training.log_num_zeros_in_grad,
        loss_scale=training.loss_scale,
        initial_loss_scale=training.initial_loss_scale,
        min_loss_scale=training.min_loss_scale,
        loss_scale_window=training.loss_scale_window,
        hysteresis=training.hysteresis,
        timers=timers,
        barrier_with_L1_time=training.barrier_with_l1_time,
    )
    overrides = get_standard_config_overrides(opt_config)
    overrides[ParamKey(attr="consa_gate")] = ParamGroupOverride(
        max_lr=consa.gate_lr, min_lr=consa.gate_lr, wd_mult=0.0
    )
    optimizer = get_megatron_optimizer(opt_config, chunks, config_overrides=overrides)
    patch_fp32_param_checkpointing(optimizer)  # the float32 gates in a bf16/fp16 model (compat.optimizer)
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=training.lr_warmup_init,
        max_lr=training.lr,
        min_lr=training.min_lr,
        lr_warmup_steps=training.lr_warmup_iters,
        # (a constant schedule with a warm-up as long as the run: megatron-core asserts warm-up < decay)
        lr_decay_steps=max(1, training.lr_decay_iters or training.train_iters, training.lr_warmup_iters + 1),
        lr_decay_style=training.lr_decay_style,
        wsd_decay_steps=training.lr_wsd_decay_iters,
        lr_wsd_decay_style=training.lr_wsd_decay_style,
        start_wd=start_wd,
        end_wd=end_wd,
        wd_incr_steps=max(1, training.train_iters),  # (Megatron-LM's: train_iters x global batch, in samples)
        wd_incr_style=wd_incr_style,
        # a resume has the checkpoint's schedule, or this run's with --override-opt-param-scheduler
        # (run.prepare_run refuses a resume that changes it without the flag)
        override_opt_param_scheduler=training.override_opt_param_scheduler,
        use_checkpoint_opt_param_scheduler=not training.override_opt_param_scheduler,
    )
    return optimizer, scheduler


def _loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """(loss summed over the tokens with loss, their number, the report [sum, tokens]).

    megatron-core's schedule divides the sum by the tokens (at least 1) and the
    micro-batches, or, with `calculate_per_token_loss`, leaves it and scales the
    gradients by the global batch's tokens once they are reduced."""
    losses = output_tensor.float()
    mask = loss_mask.to(losses.device).float()
    loss = (losses * mask).sum()
    tokens = mask.sum()
    return loss, tokens.to(torch.int), {"lm loss": torch.stack([loss.detach(), tokens])}  # (a copy: the schedule
    # divides `loss` in place)


def reduced_loss(reports: list[torch.Tensor], *, per_token: bool) -> tuple[float, float]:
    """(total, count) of one global batch's LM loss from the micro-batches' [sum, tokens]
    reports, on every rank (a collective: the last pipeline stage holds the reports, summed
    over its DP replicas here); the loss is total / count, and pooled over batches
    sum(totals) / sum(counts).

    `per_token`: the loss summed over the tokens with loss, and their number: the objective of
    `calculate_per_token_loss`; otherwise each micro-batch's per-token mean (one without tokens
    with loss counts 0) summed, and the number of micro-batches: the default's."""
    sums = None
    if parallel_state.is_pipeline_last_stage(ignore_virtual=True) and reports:
        r = torch.stack([x.double() for x in reports])  # [micro-batches, 2]
        sums = [float(r[:, 0].sum()), float(r[:, 1].sum())] if per_token else [
            float((r[:, 0] / r[:, 1].clamp(min=1)).sum()), float(len(reports))]
    total, count = last_stage_sums_to_all(sums, 2)
    return total, count


STRAGGLER_DETECTOR = StragglerDetector()
"""megatron-core's straggler detector (a process-wide singleton, as in Megatron-LM): its timing
calls do nothing until `configure_straggler_detector` turns it on."""


def configure_straggler_detector(training: TrainingConfig) -> bool:
    """`--log-straggler`: turn megatron-core's detector on (every rank, once per process; CUDA
    only: on the CPU it stays off, with a warning). Returns whether it is configured."""
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    if not has_cuda():
        if rank == 0:
            logger.warning("--log-straggler times CUDA kernels with CUDA events: no GPU here, no straggler report")
        return False
    STRAGGLER_DETECTOR.configure(world, rank, mmcnt=training.straggler_minmax_count,
                                 enabled=not training.disable_straggler_on_startup,
                                 port=training.straggler_ctrlr_port)
    return True


def forward_step(data_iterator, model):
    """megatron-core forward step: next micro-batch -> (per-token losses, loss function)."""
    timers = get_model_config(model).timers
    if timers is not None:
        timers("batch-generator", log_level=2).start()
    with STRAGGLER_DETECTOR(bdata=True):  # (as Megatron-LM's pretrain_gpt: nothing unless --log-straggler)
        batch = next(data_iterator)
        dev = device()
        tokens = batch["tokens"].to(dev)
        labels = batch["labels"].to(dev)
        pos = batch["position_ids"].to(dev)
    if timers is not None:
        timers("batch-generator").stop()
    with STRAGGLER_DETECTOR:
        output = model(tokens, pos, attention_mask=None, labels=labels)
    return output, partial(_loss_func, batch["loss_mask"])


@dataclass
class StepRecord:
    """What one iteration did (identical on every rank)."""

    iteration: int
    loss: float
    s_hat: float
    target: float
    lambda1: float
    lambda2: float
    lr: float
    """Learning rate of the model weights."""
    gate_lr: Optional[float]
    """Learning rate of the gates (None without gates)."""
    grad_norm: Optional[float]
    """Global gradient norm of the model weights (the gates are clipped apart)."""
    skipped: bool
    loss_scale: Optional[float] = None
    """The fp16 loss scale after this step (None without loss scaling)."""
    gate_grad_norm: Optional[float] = None
    """Global gradient norm of the gates, the one their own clip uses (None where nothing
    clips them: `clip_grad` 0, no gates, a skipped step)."""
    params_norm: Optional[float] = None
    """L2 norm of all parameters after the step (at log iterations, with `log_params_norm`)."""
    num_zeros_in_grad: Optional[int] = None
    """Zero gradient entries of the step (with `log_num_zeros_in_grad`)."""
    dual_step: bool = False
    """Whether the multipliers moved this iteration (not on skipped steps, not during the warm-up)."""
    fa_per_layer: Optional[list[int]] = None
    """FA KV heads per layer at the noise-free gate value (filled at log iterations)."""
    extra: dict = field(default_factory=dict)


class ConsaTrainer:
    """Drives learning-phase (or fixed-allocation) training of one rank's model chunks."""

    def __init__(
        self,
        *,
        arch: ArchitectureConfig,
        consa: ConsaConfig,
        parallel: ParallelConfig,
        training: TrainingConfig,
        data: SampleSource,
        transformer_impl: str = "auto",
    ) -> None:
        self.arch, self.consa, self.parallel, self.training, self.data = arch, consa, parallel, training, data
        world = torch.distributed.get_world_size()
        self.dp_size = parallel.validate(num_layers=arch.num_layers, num_kv_heads=arch.num_kv_heads, world_size=world)
        self.num_microbatches = training.validate(dp_size=self.dp_size)
        check_learning_run(consa, arch=arch, training=training, tp_size=parallel.tensor_model_parallel_size)
        self.chunks, self.config = build_model_chunks(
            arch, consa, parallel, training, transformer_impl=transformer_impl
        )
        # megatron-core's timers, in the schedules, the gradient reductions and the optimizer (Megatron-LM's;
        # None at timing level 0)
        self.timers = build_timers(training.timing_log_level, training.timing_log_option)
        self.config.timers = self.timers
        self.config.barrier_with_L1_time = training.barrier_with_l1_time
        self.optimizer, self.scheduler = build_optimizer(self.chunks, consa, parallel, training, timers=self.timers)
        self.controller = ConsaController(
            consa, total_cost=arch.num_layers * arch.num_kv_heads, cost_all_reduce=pipeline_cost_all_reduce()
        )
        self.config.grad_scale_func = self.optimizer.scale_loss
        self.config.finalize_model_grads_func = finalize_model_grads
        if len(self.chunks) == 1:
            self.config.no_sync_func = self.chunks[0].no_sync
        else:
            self.config.no_sync_func = [c.no_sync for c in self.chunks]
        self.gates = [m for m in consa_attention_modules(self.chunks) if m.log_alpha is not None]
        if self.chunks[0].ddp_config.align_param_gather and not self.gates:
            # the interleaved schedule launches each chunk's gather (a learn step has gathered already)
            self.config.param_sync_func = [c.start_param_sync for c in self.chunks]
        # --overlap-param-gather: an optimizer step leaves its parameter all-gather to the
        # next forward (see `finish_param_gather`)
        self._param_gather_pending = False
        self.iteration = 0
        self.history: list[StepRecord] = []
        # When True, each step keeps the unscaled gate gradients of the whole
        # objective (LM loss + constraint), for inspection and tests.
        self.capture_gate_grads = False
        self.last_gate_grads: dict[int, torch.Tensor] = {}
        self._forward_backward = get_forward_backward_func()
        self._straggler_report = training.log_straggler and configure_straggler_detector(training)
        self._loader = PrefetchedBatches(
            data, num_workers=training.num_workers, global_batch_size=training.global_batch_size,
            micro_batch_size=training.micro_batch_size, dp_rank=parallel_state.get_data_parallel_rank(),
            dp_size=self.dp_size,
        )
        self._start_time = time.time()
        # what the log's TFLOP/s per GPU counts (Megatron-LM's formula, each SWA head at its own pairs)
        self.flops_per_iteration = iteration_flops(
            arch, seq_length=training.seq_length, global_batch_size=training.global_batch_size,
            allocation=consa.allocation, window=consa.window, sink_tokens=consa.sink_tokens,
            weight_gradients=not consa.gates_only,
        )
        # their sum over the trained iterations, kept in the checkpoints (Megatron-LM's
        # num_floating_point_operations_so_far: the progress log's count, --log-progress)
        self.floating_point_operations_so_far = 0.0
        # (time, iterations done) at the previous log line; set at this process's first step
        # (a resume starts at the saved iteration, not 0)
        self._last_log: Optional[tuple[float, int]] = None
        self._interval_loss = [0.0, 0]  # the log interval's applied iterations: their losses' sum, their number
        self._untimed_depth = 0
        # TensorBoard and W&B: megatron's convention, the last rank writes them (it holds the loss)
        self.metrics: Optional[MetricWriters] = None
        error: Optional[Exception] = None
        if torch.distributed.get_rank() == world - 1:
            try:
                self.metrics = MetricWriters.open(
                    tensorboard_dir=training.tensorboard_dir, tensorboard_queue_size=training.tensorboard_queue_size,
                    wandb=training.wandb_init(),
                    config={"architecture": dataclasses.asdict(arch), "consa": consa.to_dict(),
                            "parallel": dataclasses.asdict(parallel), "training": training.to_dict()},
                )
            except Exception as err:  # (e.g. W&B online without credentials)
                error = err
        if training.tensorboard_dir or training.wandb_project:  # every rank stops, not only the one that failed
            failed = torch.tensor([float(error is not None)], device=device())
            torch.distributed.all_reduce(failed, op=torch.distributed.ReduceOp.MAX)
            if failed.item():
                why = [f"{type(error).__name__}: {error}" if error is not None else None]
                torch.distributed.broadcast_object_list(why, src=world - 1)
                if error is not None:
                    raise error
                raise RuntimeError(f"rank {world - 1} could not open the run's TensorBoard / W&B writers: {why[0]}")

    # ---- one iteration -----------------------------------------------------
    def _batches(self, iteration: int):
        return self._loader.get(iteration)

    def _add_constraint_gradient(self) -> float:
        """Backpropagate this stage's share of the constraint into the gate grads; returns s_hat."""
        penalty, s_hat = self.controller.constraint_loss(self.gates)
        params = [g.log_alpha for g in self.gates]
        if params:
            grads = torch.autograd.grad(penalty, params, allow_unused=True)
            scale = float(self.optimizer.get_loss_scale())
            for p, g in zip(params, grads):
                if g is None:
                    continue
                g = (g * scale).to(p.device)
                if hasattr(p, "main_grad") and p.main_grad is not None:
                    p.main_grad.add_(g.to(p.main_grad.dtype))
                elif p.grad is None:
                    p.grad = g.to(p.dtype)
                else:
                    p.grad.add_(g.to(p.grad.dtype))
        return s_hat

    def train_step(self) -> StepRecord:
        """One iteration: forward-backward of the global batch, the constraint, the optimizer and
        the dual step; logs, and returns what it did."""
        try:
            return self._train_step()
        except BaseException:
            if self.timers is not None:  # none left started: a caller that goes on can time the next step
                for name in TIMERS_TO_LOG:
                    self.timers(name).reset()
            raise

    @contextmanager
    def untimed(self):
        """Work between steps (an evaluation, a save) left out of the next log line's time per
        iteration, tokens/s, TFLOP/s and ETA, as Megatron-LM stops its interval timer around it
        (nested, the outermost counts)."""
        start, self._untimed_depth = time.time(), self._untimed_depth + 1
        try:
            yield
        finally:
            self._untimed_depth -= 1
            if self._last_log is not None and self._untimed_depth == 0:
                since, done = self._last_log
                self._last_log = (since + time.time() - start, done)

    @contextmanager
    def _timed(self, name: str):
        """One of ConSA's level-1 timers around a part of the step (nothing at timing level 0)."""
        if self.timers is None:
            yield
            return
        self.timers(name, log_level=1).start(barrier=self.training.barrier_with_l1_time)
        yield
        self.timers(name).stop()

    def _train_step(self) -> StepRecord:
        k = self.iteration
        if self._last_log is None:
            self._last_log = (time.time(), k)
        self.controller.iteration = k
        for chunk in self.chunks:
            chunk.train()
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        if self.gates:
            self.finish_param_gather()  # the gates' host copy below plans this step's branches
        self.controller.begin_iteration(self.gates)

        batches = self._batches(k)
        data_iter = repeat_for_chunks(batches, len(self.chunks))
        losses = self._forward_backward(
            forward_step_func=forward_step,
            data_iterator=data_iter if len(self.chunks) > 1 else data_iter[0],
            model=self.chunks if len(self.chunks) > 1 else self.chunks[0],
            num_microbatches=self.num_microbatches,
            seq_length=self.training.seq_length,
            micro_batch_size=self.training.micro_batch_size,
            forward_only=False,
        )
        self._release_memory(1)
        if self.consa.learning:
            with self._timed("consa-constraint"):
                s_hat = self._add_constraint_gradient()
        else:  # fixed allocation: report its exact SWA share
            s_hat = 1.0 - sum(map(sum, self.consa.allocation)) / (self.arch.num_layers * self.arch.num_kv_heads)
        if self.capture_gate_grads:
            scale = float(self.optimizer.get_loss_scale())
            self.last_gate_grads = {
                g.layer_index: _grad_of(g.log_alpha).float().cpu() / scale for g in self.gates
            }
        target = self.controller.target() if self.consa.learning else s_hat
        with self._timed("optimizer"):
            update_ok, grad_norm, num_zeros = self.optimizer.step()
        self._param_gather_pending = self.parallel.overlap_param_gather
        self._release_memory(2)
        if self.gates:
            clamp_log_alpha_(self.gates, self.consa)
        if update_ok:
            self.scheduler.step(increment=1)
        if self.consa.learning:
            with self._timed("consa-dual-step"):
                dual = self.controller.dual_step(s_hat, applied=bool(update_ok))
        else:
            dual = {"lambda1": 0.0, "lambda2": 0.0, "dual_step": False}

        total, count = reduced_loss([x["lm loss"] for x in losses], per_token=self.training.calculate_per_token_loss)
        loss = total / max(count, 1.0)
        if update_ok:  # (as Megatron-LM's log line: each applied iteration's loss counts once, a skipped one not)
            self._interval_loss[0] += loss
            self._interval_loss[1] += 1
        lr, gate_lr = self._learning_rates()
        log_now = self._logs_iteration(k + 1)
        fa_per_layer = self.fa_per_layer() if self.consa.learning and log_now else None  # collectives: every
        params_norm = self.params_norm() if self.training.log_params_norm and log_now else None  # rank takes them
        record = StepRecord(
            iteration=k,
            loss=loss,
            s_hat=s_hat,
            target=target,
            lambda1=dual["lambda1"],
            lambda2=dual["lambda2"],
            lr=lr,
            gate_lr=gate_lr,
            grad_norm=None if grad_norm is None else float(grad_norm),
            skipped=not update_ok,
            loss_scale=float(self.optimizer.get_loss_scale()) if self.training.fp16 else None,
            gate_grad_norm=self._gate_grad_norm(),
            params_norm=params_norm,
            num_zeros_in_grad=None if num_zeros is None or not self.training.log_num_zeros_in_grad else int(num_zeros),
            dual_step=dual["dual_step"],
            fa_per_layer=fa_per_layer,
        )
        self._log(record)
        if self.training.check_for_nan_in_loss_and_grad and not record.skipped:
            _check_finite(record)
        self.iteration += 1
        self.floating_point_operations_so_far += self.flops_per_iteration
        self.history.append(record)
        interval = self.training.allocation_check_interval
        if interval and (self.iteration % interval == 0 or self.iteration == 1):
            if self.gates:
                self.finish_param_gather()
            check_gates_consistent([g.log_alpha for g in self.gates], iteration=self.iteration)
        interval = self.training.check_weight_hash_across_dp_replicas_interval
        if interval and self.iteration % interval == 0:
            self.finish_param_gather()  # (the distributed optimizer's shards back in every replica)
            check_weights_consistent(self.chunks, iteration=self.iteration)
        return record

    def params_norm(self) -> float:
        """L2 norm of every parameter, weights and gates, each counted once: not the tied output
        layer's copy of the embedding, not a TP duplicate (a collective over all ranks)."""
        self.finish_param_gather()
        squares = torch.zeros(1, dtype=torch.float64, device=device())
        for chunk in self.chunks:
            for p in chunk.parameters():
                if param_is_not_shared(p) and param_is_not_tensor_parallel_duplicate(p):
                    squares += torch.linalg.vector_norm(p.detach(), dtype=torch.float32).double().to(squares.device) ** 2
        torch.distributed.all_reduce(squares, group=parallel_state.get_model_parallel_group())
        return float(squares.sqrt())

    def _release_memory(self, level: int) -> None:
        """Megatron-LM's `--empty-unused-memory-level`: the CUDA allocator's cached blocks back
        to the device at points of `level` and above (a no-op without CUDA)."""
        if self.training.empty_unused_memory_level >= level:
            empty_cuda_cache()

    def _gate_grad_norm(self) -> Optional[float]:
        """The gates' gradient norm megatron-core computed for their clip in this step (the same
        on every rank: reduced over the model-parallel ranks, of DP-reduced gradients)."""
        norm = (getattr(self.optimizer, "grad_norms_by_group", None) or {}).get(GATE_GRAD_NORM_GROUP)
        return None if norm is None else float(norm)

    def finish_param_gather(self) -> None:
        """Complete the parameter all-gather the last optimizer step left pending, so what is
        read here is this step's weights and gates (a collective: every rank calls it).

        With `overlap_param_gather` the distributed optimizer updates its shard and each
        bucket's all-gather finishes in the forward pre-hook of the first module using it;
        whatever reads parameters outside a forward (the gates' host plan, the FA counts of
        the log, the replica check, checkpoints, finalize) calls this first. A learning step
        calls it before its forward (its gates plan the branches on the host), so the overlap
        pays in the fixed phase. A no-op without the overlap."""
        if not self._param_gather_pending:
            return
        with torch.no_grad():
            for chunk in self.chunks:
                chunk.start_param_sync(force_sync=True)
        self._param_gather_pending = False

    @torch.no_grad()
    def evaluate(self, source: SampleSource, *, iterations: int, first_batch: int = 0) -> float:
        """LM loss per token over all the tokens with loss of `iterations` global batches of `source`
        (forward only, noise-free gates), as Megatron-LM's evaluation, whatever normalises the
        training loss (`calculate_per_token_loss`): the perplexity's exponent.

        Batch j is the same global batch on every layout (`micro_batches`), so the
        figure does not depend on TP/PP/DP. Every rank returns the same value.
        """
        for chunk in self.chunks:
            chunk.eval()
        self.config.timers = None  # evaluation is not timed (as in Megatron-LM)
        try:
            total = count = 0.0
            for j in range(iterations):
                batches = micro_batches(
                    source, iteration=first_batch + j, global_batch_size=self.training.global_batch_size,
                    micro_batch_size=self.training.micro_batch_size,
                    dp_rank=parallel_state.get_data_parallel_rank(), dp_size=self.dp_size,
                )
                data_iter = repeat_for_chunks(batches, len(self.chunks))
                out = self._forward_backward(
                    forward_step_func=forward_step,
                    data_iterator=data_iter if len(self.chunks) > 1 else data_iter[0],
                    model=self.chunks if len(self.chunks) > 1 else self.chunks[0],
                    num_microbatches=self.num_microbatches, seq_length=self.training.seq_length,
                    micro_batch_size=self.training.micro_batch_size, forward_only=True,
                )
                batch_total, batch_count = reduced_loss([x["lm loss"] for x in out], per_token=True)
                total, count = total + batch_total, count + batch_count
                self._release_memory(1)
        finally:
            self.config.timers = self.timers
        for chunk in self.chunks:
            chunk.train()
        return total / max(count, 1.0)

    def train(self, iterations: Optional[int] = None, on_step: Optional[Callable[[StepRecord], Any]] = None):
        """Run `iterations` steps (default: up to train_iters)."""
        n = self.training.train_iters - self.iteration if iterations is None else iterations
        for _ in range(n):
            record = self.train_step()
            if on_step is not None:
                on_step(record)
        return self.history

    # ---- logging -----------------------------------------------------------
    def _learning_rates(self) -> tuple[float, Optional[float]]:
        """(model lr, gate lr) of this step, as the scheduler set them. The model's is megatron-
        core's canonical one (a default group's; in gates-only mode, with no such group, the
        schedule's at the model's max/min lr); the gates' is the schedule at their override
        (max = min = the gate lr). Computed, not read from the group holding the gates: with
        the distributed optimizer a rank's groups hold shards of the gates, or none."""
        lr = get_canonical_lr_for_logging(self.optimizer.param_groups)
        if lr is None:
            lr = self.scheduler.get_lr({})
        gate_lr = None
        if self.gates:
            gate_lr = self.scheduler.get_lr({"max_lr": self.consa.gate_lr, "min_lr": self.consa.gate_lr})
        return float(lr), None if gate_lr is None else float(gate_lr)

    def _logs_iteration(self, done: int) -> bool:
        """Whether the step that makes `done` iterations gets a log line: every `log_interval`-th (counted as
        Megatron-LM counts, from 1), and the first (its ETA) and the last (the final loss)."""
        interval = self.training.log_interval
        return bool(interval) and (done % interval == 0 or done in (1, self.training.train_iters))

    def _log(self, r: StepRecord) -> None:
        """The log line and the TensorBoard / W&B scalars of step `r`, numbered by the iterations done with it
        (Megatron-LM's `iteration`: 1 for the first step; validation, checkpoints and the heatmap count so too)."""
        done = r.iteration + 1
        if self.metrics is not None and done % self.training.tensorboard_log_interval == 0:
            for key in ("loss", "s_hat", "target", "lambda1", "lambda2", "lr", "gate_lr", "grad_norm", "gate_grad_norm",
                        "loss_scale", "params_norm", "num_zeros_in_grad"):
                if getattr(r, key) is not None:
                    self.metrics.add_scalar(f"consa/{key}", getattr(r, key), done)
            if r.fa_per_layer is not None:
                for layer, count in enumerate(r.fa_per_layer):
                    self.metrics.add_scalar(f"consa_fa_heads/layer_{layer:03d}", count, done)
            if self.training.log_memory_to_tensorboard:
                for name, value in memory_scalars().items():
                    self.metrics.add_scalar(name, value, done)
            if self.training.log_world_size_to_tensorboard:
                self.metrics.add_scalar("world-size", torch.distributed.get_world_size(), done)
            if self.training.log_batch_size_to_tensorboard:
                self.metrics.add_scalar("batch-size", self.training.global_batch_size, done)
        if self._logs_iteration(done) or (self.training.log_interval and r.skipped):
            now = time.time()
            prev_time, prev_iter = self._last_log
            per_iter = (now - prev_time) / max(1, done - prev_iter)
            self._last_log = (now, done)
            total, count = self._interval_loss
            self._interval_loss = [0.0, 0]
            interval_loss = total / count if count else r.loss  # (every iteration since the last line skipped)
            tokens_per_s = self.training.global_batch_size * self.training.seq_length / max(per_iter, 1e-9)
            tflops_per_gpu = self.flops_per_iteration / max(per_iter, 1e-9) / torch.distributed.get_world_size() / 1e12
            eta = per_iter * max(0, self.training.train_iters - done)
            if self._straggler_report:  # (a collective: every rank; the first logs it)
                STRAGGLER_DETECTOR.report(self.flops_per_iteration * (done - prev_iter), done - prev_iter)
            timings = report_timers(  # (a collective: every rank)
                self.timers, iterations=done - prev_iter, writers=self.metrics,
                to_writers=self.training.log_timers_to_tensorboard, step=done,
            )
            if self.metrics is not None:
                self.metrics.add_scalar("consa/tokens_per_s", tokens_per_s, done)
                self.metrics.add_scalar("throughput", tflops_per_gpu, done)  # (Megatron-LM's tag)
                if self.training.log_timers_to_tensorboard:
                    self.metrics.add_scalar("iteration-time", per_iter, done)
            if torch.distributed.get_rank() != 0:
                return
            gate = "" if r.gate_lr is None else f" | gate lr {r.gate_lr:.3g}"
            norm = "" if r.grad_norm is None else f" | grad norm {r.grad_norm:.3f}"
            scale = "" if r.loss_scale is None else f" | loss scale {r.loss_scale:g}"
            if r.params_norm is not None:
                norm += f" | params norm {r.params_norm:.3f}"
            if r.num_zeros_in_grad is not None:
                norm += f" | zeros in grad {r.num_zeros_in_grad}"
            fa = "" if r.fa_per_layer is None else " | FA/layer " + ",".join(map(str, r.fa_per_layer))
            logger.info(
                "iter %6d/%d | loss %.4f | lr %.3g%s%s%s | %.0f tok/s | %.3g TFLOP/s/GPU | elapsed %s | ETA %s | "
                "s_hat %.4f | target %.4f | lambda1 %+.4f | lambda2 %.4f%s%s",
                done, self.training.train_iters, interval_loss, r.lr, gate, norm, scale, tokens_per_s, tflops_per_gpu,
                _hms(now - self._start_time), _hms(eta), r.s_hat, r.target, r.lambda1, r.lambda2, fa,
                " | skipped (loss scale)" if r.skipped else "",
            )
            if timings:
                logger.info("%s", timings)

    def close(self) -> None:
        """Stop the data-loader workers; flush and close the TensorBoard writer and the W&B run, if any."""
        self._loader.close()
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None

    # ---- inspection --------------------------------------------------------
    def local_log_alpha(self) -> dict[int, torch.Tensor]:
        """{global layer index: log_alpha} for the gates this rank holds (not a collective: with
        `overlap_param_gather`, call `finish_param_gather` on every rank first)."""
        return {g.layer_index: g.log_alpha.detach().float().cpu().clone() for g in self.gates}

    def gather_log_alpha(self) -> torch.Tensor:
        """All layers' log_alpha on every rank ([L, units per layer], float32)."""
        self.finish_param_gather()
        return self._gather_per_layer(self.local_log_alpha())

    def fa_per_layer(self) -> list[int]:
        """FA KV heads per layer at the noise-free gate value (a collective over all ranks)."""
        z = deterministic_z(self.gather_log_alpha(), HardConcrete.from_config(self.consa))
        counts = (z > 0).sum(dim=1)
        if self.consa.granularity == "layer":
            counts = counts * self.arch.num_kv_heads
        return [int(c) for c in counts]

    def settle_report(self, tolerance: Optional[float] = None) -> SettleReport:
        """Judge the recorded s_hat tail of this learning run (see `controller.judge_settling`)."""
        c = self.consa
        return judge_settling(
            self.controller.s_hat_history, target_sparsity=c.target_sparsity, warmup_iters=c.target_warmup_iters,
            tail_fraction=c.settle_tail_fraction, tolerance=c.settle_tolerance if tolerance is None else tolerance,
        )

    def finalize(self, *, tolerance: Optional[float] = None, margin: Optional[float] = None,
                 metadata: Optional[dict] = None) -> Allocation:
        """The allocation at the exact budget from the learned gates (a collective over all ranks).

        Refuses (AllocationError) a run whose s_hat tail left target +- tolerance
        (default `ConsaConfig.settle_tolerance`; pass float('inf') to accept any); warns
        about units too close to call within `margin` (default `ConsaConfig.finalize_margin`).
        """
        if not self.consa.learning:
            raise ConsaConfigError("finalize: this run has a fixed allocation and no gates to finalize")
        log_alpha = self.gather_log_alpha()
        c = self.consa
        report = self.settle_report(tolerance)
        meta = {"iterations": self.controller.iteration, "final_s_hat": self.controller.last_s_hat, **(metadata or {})}
        return Allocation.from_log_alpha(
            log_alpha, target_sparsity=c.target_sparsity, granularity=c.granularity,
            num_kv_heads=self.arch.num_kv_heads, window=c.window, sink_tokens=c.sink_tokens, metadata=meta,
            settle=report, margin=c.finalize_margin if margin is None else margin,
        )

    def gather_gate_grads(self) -> torch.Tensor:
        """All layers' gate gradients of the last step (set capture_gate_grads first)."""
        return self._gather_per_layer(self.last_gate_grads)

    def _gather_per_layer(self, local: dict[int, torch.Tensor]) -> torch.Tensor:
        units = 1 if self.consa.granularity == "layer" else self.arch.num_kv_heads
        full = torch.zeros(self.arch.num_layers, units, dtype=torch.float64, device=device())
        if parallel_state.get_tensor_model_parallel_rank() == 0 and parallel_state.get_data_parallel_rank() == 0:
            for layer, value in local.items():
                full[layer] = value.double().to(full.device)
        torch.distributed.all_reduce(full)
        return full.float().cpu()


def check_learning_run(consa: ConsaConfig, *, arch: ArchitectureConfig, training: TrainingConfig, tp_size: int) -> None:
    """Checks of a learning run that need the model and the run length, made before any work.

    The target must be representable at the granularity (named with its
    nearest representable neighbours), and the target warm-up must end before
    the run does, with room for the judged tail after it.
    """
    consa.check_model_shape(num_layers=arch.num_layers, num_kv_heads=arch.num_kv_heads, tp_size=tp_size)
    if not consa.learning:
        return
    consa.check_target_representable(num_layers=arch.num_layers, num_kv_heads=arch.num_kv_heads)
    if training.train_iters == 0:
        return
    if consa.target_warmup_iters >= training.train_iters:
        raise ConsaConfigError(
            f"ConsaConfig.target_warmup_iters={consa.target_warmup_iters} is not shorter than "
            f"TrainingConfig.train_iters={training.train_iters}: the target would still be ramping when the "
            "allocation phase ends, so it could never settle; train for longer than the warm-up (a few hundred "
            "iterations more) or shorten the warm-up"
        )
    # settle_report's tail: the last ceil(fraction x n) of the controller's records, one a step (index 0-based)
    first_judged = training.train_iters - math.ceil(consa.settle_tail_fraction * training.train_iters)
    if first_judged < consa.target_warmup_iters and consa.settle_tail_fraction >= 1:
        raise ConsaConfigError(
            f"ConsaConfig.settle_tail_fraction={consa.settle_tail_fraction} judges the whole run, which starts inside "
            f"the target warm-up (ConsaConfig.target_warmup_iters={consa.target_warmup_iters}): finalize could never "
            "accept the allocation; judge a smaller tail, or set no warm-up"
        )
    if first_judged < consa.target_warmup_iters:
        raise ConsaConfigError(
            f"ConsaConfig.target_warmup_iters={consa.target_warmup_iters}: the run's judged tail (iterations "
            f"{first_judged + 1}..{training.train_iters}, the last {consa.settle_tail_fraction:.0%} of "
            f"TrainingConfig.train_iters={training.train_iters}) starts inside the target warm-up, so finalize could "
            f"never accept the allocation; train for at least {_least_iters(consa)} iterations or shorten the warm-up"
        )


def _least_iters(consa: ConsaConfig) -> int:
    """The shortest run whose judged tail starts after the target warm-up."""
    n = consa.target_warmup_iters + 1
    while n - math.ceil(consa.settle_tail_fraction * n) < consa.target_warmup_iters:
        n += 1
    return n


def _check_finite(r: StepRecord) -> None:
    """Raise `TrainingDivergedError` when an applied step's loss, grad norms or s_hat is not finite."""
    values = {"loss": r.loss, "grad norm": r.grad_norm, "gate grad norm": r.gate_grad_norm, "s_hat": r.s_hat}
    bad = {k: v for k, v in values.items() if v is not None and not math.isfinite(v)}
    if bad:
        found = ", ".join(f"{k} {v}" for k, v in bad.items())
        raise TrainingDivergedError(
            f"iteration {r.iteration + 1}: {found}: training diverged (nothing from this step on is saved). "
            "Resume from the last checkpoint (--load <the --save directory>; with --no-load-optim to lower --lr or "
            "--consa-gate-lr there), or pass --no-check-for-nan-in-loss-and-grad to train on regardless"
        )


def empty_cuda_cache() -> None:
    """Return the CUDA caching allocator's unused blocks (nothing to do without CUDA)."""
    if has_cuda():
        torch.cuda.empty_cache()


def _hms(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _grad_of(p: torch.Tensor) -> torch.Tensor:
    grad = getattr(p, "main_grad", None)
    if grad is None:
        grad = p.grad
    return torch.zeros_like(p) if grad is None else grad.detach()
