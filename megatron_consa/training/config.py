"""Typed configs for a training run (parallel layout and optimisation)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional

from megatron_consa.config import ConsaConfigError


def _fail(cls: str, name: str, value, fix: str) -> None:
    raise ConsaConfigError(f"{cls}.{name}={value!r} is invalid: {fix}")


LR_DECAY_STYLES = ("constant", "linear", "cosine", "inverse-square-root", "WSD")
LR_WSD_DECAY_STYLES = ("exponential", "linear", "cosine", "minus_sqrt")
WEIGHT_DECAY_INCR_STYLES = ("constant", "linear", "cosine")
TIMING_LOG_OPTIONS = ("max", "minmax", "all")


@dataclass
class ParallelConfig:
    """How the model is split over ranks (world = tp * pp * dp)."""

    tensor_model_parallel_size: int = 1
    """TP: KV heads per layer must divide by it."""
    pipeline_model_parallel_size: int = 1
    """PP: layers per stage must be whole (num_layers divisible by pp * vpp)."""
    virtual_pipeline_model_parallel_size: Optional[int] = None
    """Interleaved 1F1B: model chunks per pipeline stage."""
    sequence_parallel: bool = False
    """Megatron sequence parallelism (needs TP > 1)."""
    use_distributed_optimizer: bool = False
    """Shard optimizer state over data-parallel ranks (megatron-core's)."""
    overlap_grad_reduce: bool = False
    """Overlap the data-parallel gradient reduction with backward."""
    overlap_param_gather: bool = False
    """Overlap the distributed optimizer's parameter all-gather with the next forward
    (each bucket's all-gather finishes where a module first uses it; with an interleaved
    pipeline the stages launch theirs together, Megatron-LM's aligned gather). Needs
    `use_distributed_optimizer` and `overlap_grad_reduce`, as in Megatron-LM."""
    recompute_granularity: Optional[str] = None
    """None, 'full' or 'selective' activation recomputation."""
    recompute_method: Optional[str] = None
    """'uniform' or 'block' (full recomputation only)."""
    recompute_num_layers: Optional[int] = None
    """Layers per recomputation unit (full recomputation only)."""
    decoder_first_pipeline_num_layers: Optional[int] = None
    """Layers on the first pipeline stage (Megatron-LM's `--decoder-first-pipeline-num-layers`;
    None: an even share), e.g. fewer beside the embedding; the stages between the first and
    the last split the rest evenly."""
    decoder_last_pipeline_num_layers: Optional[int] = None
    """Layers on the last pipeline stage (`--decoder-last-pipeline-num-layers`; None: an even
    share), e.g. fewer beside the output layer and the loss."""
    distributed_timeout_minutes: float = 10.0
    """How long a collective may wait before torch.distributed gives up (Megatron-LM's
    default; a large checkpoint's load or save can need more)."""

    def validate(self, *, num_layers: int, num_kv_heads: int, world_size: int) -> int:
        """Check the layout against the model and the world; returns the DP size."""
        tp, pp = self.tensor_model_parallel_size, self.pipeline_model_parallel_size
        vpp = self.virtual_pipeline_model_parallel_size or 1
        for name, value in (("tensor_model_parallel_size", tp), ("pipeline_model_parallel_size", pp),
                            ("virtual_pipeline_model_parallel_size", vpp)):
            if value < 1:
                _fail("ParallelConfig", name, value, "must be >= 1")
        if not self.distributed_timeout_minutes > 0:
            _fail("ParallelConfig", "distributed_timeout_minutes", self.distributed_timeout_minutes, "must be > 0")
        if world_size % (tp * pp):
            _fail(
                "ParallelConfig",
                "tensor_model_parallel_size*pipeline_model_parallel_size",
                tp * pp,
                f"must divide the world size {world_size}",
            )
        if num_kv_heads % tp:
            _fail(
                "ParallelConfig",
                "tensor_model_parallel_size",
                tp,
                f"must divide num_query_groups={num_kv_heads} (ConSA gates are per KV head)",
            )
        uneven = self.decoder_first_pipeline_num_layers is not None or self.decoder_last_pipeline_num_layers is not None
        if uneven:
            self.stage_layers(num_layers)  # (names what does not fit)
            if self.virtual_pipeline_model_parallel_size is not None:
                _fail("ParallelConfig", "virtual_pipeline_model_parallel_size", vpp,
                      "goes with even pipeline stages here: drop decoder_first/last_pipeline_num_layers "
                      "(--decoder-first/last-pipeline-num-layers) or the virtual pipeline")
        elif num_layers % (pp * vpp):
            _fail(
                "ParallelConfig",
                "pipeline_model_parallel_size",
                pp if vpp == 1 else (pp, vpp),
                f"pp * vpp must divide num_layers={num_layers}",
            )
        if self.virtual_pipeline_model_parallel_size is not None and pp < 2:
            _fail("ParallelConfig", "virtual_pipeline_model_parallel_size", vpp, "needs pipeline_model_parallel_size >= 2")
        if self.sequence_parallel and tp == 1:
            _fail("ParallelConfig", "sequence_parallel", True, "needs tensor_model_parallel_size > 1")
        if self.overlap_param_gather and not (self.use_distributed_optimizer and self.overlap_grad_reduce):
            _fail("ParallelConfig", "overlap_param_gather", True,
                  "needs use_distributed_optimizer and overlap_grad_reduce (--use-distributed-optimizer "
                  "--overlap-grad-reduce): only the distributed optimizer gathers parameters")
        if self.recompute_granularity not in (None, "full", "selective"):
            _fail("ParallelConfig", "recompute_granularity", self.recompute_granularity, "use None, 'full' or 'selective'")
        return world_size // (tp * pp)

    def stage_layers(self, num_layers: int) -> list[range]:
        """The global layer numbers (0-based) of each pipeline stage: `decoder_first/last_
        pipeline_num_layers` on the first / last stage, the other stages sharing the rest
        evenly (megatron-core's split); even stages without them."""
        pp = self.pipeline_model_parallel_size
        ends = {0: self.decoder_first_pipeline_num_layers, pp - 1: self.decoder_last_pipeline_num_layers}
        for rank, name in ((0, "decoder_first_pipeline_num_layers"), (pp - 1, "decoder_last_pipeline_num_layers")):
            value = getattr(self, name)
            if value is not None and (pp < 2 or not isinstance(value, int) or value < 1):
                _fail("ParallelConfig", name, value, "needs pipeline_model_parallel_size >= 2 and an integer >= 1")
        fixed = {rank: n for rank, n in ends.items() if n is not None}
        others = [rank for rank in range(pp) if rank not in fixed]
        rest = num_layers - sum(fixed.values())
        if rest < 0 or bool(rest) != bool(others) or (others and rest % len(others)):
            name = "decoder_first_pipeline_num_layers" if 0 in fixed else "decoder_last_pipeline_num_layers"
            _fail("ParallelConfig", name, getattr(self, name),
                  f"the other {len(others)} of {pp} stages must share the remaining {rest} of num_layers={num_layers} "
                  "evenly, at least one each")
        counts = [fixed.get(rank, rest // max(1, len(others))) for rank in range(pp)]
        starts = [sum(counts[:rank]) for rank in range(pp)]
        return [range(start, start + count) for start, count in zip(starts, counts)]

    def megatron_fields(self) -> dict:
        """The TransformerConfig fields this layout sets."""
        out = dict(
            tensor_model_parallel_size=self.tensor_model_parallel_size,
            pipeline_model_parallel_size=self.pipeline_model_parallel_size,
            virtual_pipeline_model_parallel_size=self.virtual_pipeline_model_parallel_size,
            sequence_parallel=self.sequence_parallel,
            recompute_granularity=self.recompute_granularity,
            num_layers_in_first_pipeline_stage=self.decoder_first_pipeline_num_layers,
            num_layers_in_last_pipeline_stage=self.decoder_last_pipeline_num_layers,
        )
        if self.recompute_granularity == "full":
            out.update(recompute_method=self.recompute_method or "uniform", recompute_num_layers=self.recompute_num_layers or 1)
        return out


DIST_CKPT_STRICTNESS = ("assume_ok_unexpected", "log_unexpected", "log_all", "raise_unexpected", "raise_all",
                        "return_unexpected", "return_all", "ignore_all")
"""megatron-core's StrictHandling values: Megatron-LM's `--dist-ckpt-strictness` choices
(`training.checkpoint.strictness_of` says what each does)."""


ATTENTION_BACKENDS = ("auto", "flash", "fused", "unfused", "local")
"""megatron-core's AttnBackend names (`TrainingConfig.attention_backend`)."""


def _cuda_without_nvml() -> bool:
    """A GPU, and no NVML bindings (the nvidia-ml-py package's pynvml) to read it through."""
    import importlib.util

    import torch

    return torch.cuda.is_available() and importlib.util.find_spec("pynvml") is None


@dataclass
class TrainingConfig:
    """Optimisation, batch and logging settings of a run."""

    train_iters: int = 100
    """Optimizer steps."""
    micro_batch_size: int = 2
    """Sequences per micro-batch per data-parallel rank."""
    global_batch_size: int = 8
    """Sequences per optimizer step over all data-parallel ranks."""
    seq_length: int = 256
    """Tokens per sequence."""
    lr: float = 3e-4
    """Peak learning rate of the model weights."""
    min_lr: float = 3e-5
    """Learning rate at the end of the decay."""
    lr_warmup_iters: int = 0
    """Linear warm-up of every learning rate (gates included)."""
    lr_warmup_init: float = 0.0
    """The rate the warm-up starts from (Megatron-LM's `--lr-warmup-init`)."""
    lr_decay_iters: Optional[int] = None
    """Iterations over which the learning rate decays to min_lr (None: train_iters); it
    stays at min_lr after them."""
    lr_decay_style: str = "cosine"
    """'constant', 'linear', 'cosine', 'inverse-square-root' or 'WSD' (megatron-core's scheduler)."""
    lr_wsd_decay_iters: Optional[int] = None
    """With lr_decay_style 'WSD' (warm-up, stable, decay): the last iterations of the decay, over which
    the rate anneals from lr to min_lr; before them it stays at lr."""
    lr_wsd_decay_style: str = "exponential"
    """The WSD anneal: 'exponential', 'linear', 'cosine' or 'minus_sqrt' (megatron-core's)."""
    decoupled_lr: Optional[float] = None
    """Peak learning rate of the input embedding and the output layer (Megatron-LM's
    `--decoupled-lr`; None: `lr`). Their schedule is the model's, at this peak."""
    decoupled_min_lr: Optional[float] = None
    """Final learning rate of the embedding and the output layer (with `decoupled_lr`;
    None: `min_lr`)."""
    weight_decay: float = 0.1
    """Decoupled weight decay (never applied to gates, norms, biases), with
    `weight_decay_incr_style` 'constant'."""
    weight_decay_incr_style: str = "constant"
    """'constant' (`weight_decay` throughout), or 'linear' / 'cosine': the decay moves from
    `start_weight_decay` to `end_weight_decay` over the train_iters (megatron-core's
    scheduler; Megatron-LM's `--weight-decay-incr-style`)."""
    start_weight_decay: Optional[float] = None
    """The weight decay of the first step (with a 'linear' or 'cosine' weight_decay_incr_style)."""
    end_weight_decay: Optional[float] = None
    """The weight decay reached at the end of train_iters (with a 'linear' or 'cosine'
    weight_decay_incr_style)."""
    adam_beta1: float = 0.9
    """Adam first-moment decay (megatron-core's default)."""
    adam_beta2: float = 0.999
    """Adam second-moment decay (megatron-core's default). The gates share it; the
    controller defaults were tuned with it (0.95 settles one unit off at 0.875)."""
    adam_eps: float = 1e-8
    """Adam epsilon (megatron-core's default)."""
    clip_grad: float = 1.0
    """Global gradient-norm clip (0 disables)."""
    bf16: bool = False
    """bf16 weights and activations (gates stay float32)."""
    fp16: bool = False
    """fp16 with dynamic loss scaling (gates stay float32)."""
    grad_reduce_in_bf16: bool = False
    """With bf16: accumulate and reduce the weights' gradients in bf16 (Megatron-LM's
    `--grad-reduce-in-bf16`: half the gradient buffer and its traffic) instead of float32.
    The gates, float32 parameters, keep float32 gradients either way."""
    calculate_per_token_loss: bool = False
    """Normalise the loss by the tokens with loss in the whole global batch (Megatron-LM's
    `--calculate-per-token-loss`): every token weighs the same, however the loss mask
    (`--eod-mask-loss`) spreads over micro-batches and data-parallel ranks. Off: the mean
    of each micro-batch's per-token mean. The logged loss is the objective's."""
    cross_entropy_loss_fusion: bool = False
    """megatron-core's fused vocab-parallel cross entropy (`--cross-entropy-loss-fusion`;
    on CUDA only, like the other fusions: the CPU keeps the unfused one)."""
    deterministic_mode: bool = False
    """Bit-exact reproducible runs (Megatron-LM's `--deterministic-mode`): torch's
    deterministic algorithms, megatron-core's `deterministic_mode`, and the environment's
    NCCL_ALGO, NVTE_ALLOW_NONDETERMINISTIC_ALGO and CUBLAS_WORKSPACE_CONFIG set (or checked)
    for it (`training.parallel.apply_deterministic_mode`). Not with cross_entropy_loss_fusion."""
    use_cpu_initialization: bool = False
    """Draw each weight whole on the CPU and give each tensor-parallel rank its part
    (megatron-core's `use_cpu_initialization`, always so without CUDA), instead of each GPU
    drawing its own part."""
    attention_backend: str = "auto"
    """Which Transformer Engine attention kernels the TE backend may pick: 'auto', 'flash',
    'fused' or 'unfused' (Megatron-LM's `--attention-backend`: megatron-core sets TE's
    NVTE_*_ATTN switches from it), or 'local', no TE kernel (the torch backend only)."""
    empty_unused_memory_level: int = 0
    """Release the CUDA caching allocator's unused blocks: 1 after each forward-backward and
    each evaluation batch, 2 also after each optimizer step (Megatron-LM's
    `--empty-unused-memory-level`; nothing to release on the CPU)."""
    initial_loss_scale: float = 2.0**16
    """Starting dynamic loss scale for fp16 (megatron-core's DynamicGradScaler; Megatron-LM
    starts at 2**32, which only costs more skipped first steps)."""
    loss_scale: Optional[float] = None
    """A static fp16 loss scale instead of the dynamic one (None: dynamic)."""
    min_loss_scale: float = 1.0
    """The dynamic scale never goes below this."""
    loss_scale_window: int = 1000
    """Steps without an overflow before the dynamic scale doubles."""
    hysteresis: int = 2
    """Overflows tolerated before the dynamic scale halves."""
    num_workers: int = 0
    """Worker processes that prepare the next iterations' micro-batches while this one trains
    (Megatron-LM's `--num-workers`, whose default is 2); 0: each iteration's samples are read
    when it starts, in the training process."""
    init_method_std: float = 0.02
    """Standard deviation of the random weight initialisation (megatron-core's; a run
    that loads weights does not use it)."""
    seed: int = 1234
    """Seed of weight initialisation (the data and the gate noise have seeds of their own).
    Initial weights also depend on the pipeline layout; to compare layouts, start
    them from one checkpoint."""
    manual_gc: bool = False
    """Python's automatic garbage collector off for the run, collections at the same
    iterations on every rank instead (Megatron-LM's `--manual-gc`; see `training.manual_gc`)."""
    manual_gc_interval: int = 0
    """With `manual_gc`: collect every this many iterations (0: only at the start and around
    evaluations)."""
    manual_gc_eval: bool = True
    """With `manual_gc`: collect before and after each evaluation."""
    log_params_norm: bool = False
    """Log the L2 norm of all parameters (weights and gates, each counted once) at every log
    line (Megatron-LM's `--log-params-norm`; a collective over the model-parallel ranks)."""
    log_num_zeros_in_grad: bool = False
    """Log the number of zero gradient entries (megatron-core's count, `--log-num-zeros-in-grad`)."""
    check_for_nan_in_loss_and_grad: bool = True
    """Stop the run (`TrainingDivergedError`, on every rank) at the first applied step
    whose loss, gradient norm (the model's, or the gates' when they are clipped: `clip_grad`
    > 0) or s_hat is not finite, before anything after it is saved
    (Megatron-LM's default). fp16 overflows are not divergence: the loss scaler skips
    those steps."""
    log_interval: int = 10
    """Iterations between log lines."""
    check_weight_hash_across_dp_replicas_interval: Optional[int] = None
    """Every this many iterations, check that every data-parallel replica holds bit-identical
    weights and gates (Megatron-LM's flag; a SHA-1 of each parameter on the CPU, so not every
    iteration on a large model): a mismatch stops the run on every rank, naming the ranks."""
    allocation_check_interval: int = 50
    """Iterations between the all-ranks-hold-the-same-gates check (0 disables)."""
    tensorboard_dir: Optional[str] = None
    """Write scalars (loss, s_hat, target, lambdas, lr) here when set."""
    tensorboard_log_interval: int = 1
    """Iterations between TensorBoard scalars (Megatron-LM's `--tensorboard-log-interval`)."""
    log_validation_ppl_to_tensorboard: bool = False
    """TensorBoard gets the validation perplexity beside the validation loss."""
    timing_log_level: int = 0
    """Which of megatron-core's timers run (Megatron-LM's `--timing-log-level`): 0 none (the log
    line's time per iteration only); 1 each step's parts: forward-backward, the gradient
    all-reduces, the optimizer's parts, ConSA's constraint gradient and dual step; 2 also
    each micro-batch's forward and backward compute, pipeline sends and receives and batch
    reading. Level 1 and 2 timers synchronise the device at each start and stop."""
    timing_log_option: str = "minmax"
    """How the timers are reported over ranks: 'max', 'minmax' or 'all' (each rank's)."""
    log_timers_to_tensorboard: bool = False
    """TensorBoard gets the time per iteration ('iteration-time', s) and each timer's
    ('<name>-time': its mean per iteration since the previous log line, the max over ranks)
    at every log line."""
    barrier_with_l1_time: bool = True
    """Level-1 timers wait for every rank at their start (Megatron-LM's default; the time
    then excludes waiting for stragglers)."""
    log_memory_to_tensorboard: bool = False
    """TensorBoard gets the last rank's memory: with CUDA the allocator's reserved, allocated
    and peak allocated bytes and allocations ('mem-reserved-bytes', 'mem-allocated-bytes',
    'mem-max-allocated-bytes', 'mem-allocated-count', as Megatron-LM); on the CPU the
    process's resident and peak resident bytes ('mem-rss-bytes', 'mem-max-rss-bytes')."""
    log_world_size_to_tensorboard: bool = False
    """TensorBoard gets the number of ranks ('world-size')."""
    log_batch_size_to_tensorboard: bool = False
    """TensorBoard gets the global batch size ('batch-size')."""
    tensorboard_queue_size: int = 1000
    """Events TensorBoard's writer holds before it writes them out (its `max_queue`, Megatron-LM's
    `--tensorboard-queue-size`)."""
    log_straggler: bool = False
    """Megatron-LM's straggler detector (`--log-straggler`, megatron-core's `StragglerDetector`;
    CUDA only, no effect on the CPU): each rank times its forward passes and batch reading
    with CUDA events, and at every log line the first rank logs the slowest and fastest
    ranks' time per iteration, estimated TFLOP/s, and GPU power, temperature, utilisation
    and clock (read through NVML: the nvidia-ml-py package)."""
    straggler_ctrlr_port: int = 65535
    """The first rank's port: a connection to it (`curl <host>:<port>`) turns the straggler
    detector on or off at the next log line."""
    straggler_minmax_count: int = 1
    """How many of the slowest and of the fastest ranks the straggler report names."""
    disable_straggler_on_startup: bool = False
    """The straggler detector starts off (its port turns it on)."""
    wandb_project: Optional[str] = None
    """Weights & Biases project: the last rank also logs every TensorBoard scalar and image
    there (Megatron-LM's `--wandb-project`; needs the `wandb` package)."""
    wandb_exp_name: Optional[str] = None
    """The W&B run's name (None: W&B picks one)."""
    wandb_save_dir: Optional[str] = None
    """Where W&B keeps the run's files (required with wandb_project)."""
    wandb_entity: Optional[str] = None
    """The W&B team or user (None: the logged-in user's default)."""
    override_opt_param_scheduler: bool = False
    """On resume, schedule the learning rate with this run's train_iters, warm-up and decay
    style from the saved iteration on (megatron's `override_opt_param_scheduler`), instead
    of requiring the checkpoint's."""
    use_checkpoint_opt_param_scheduler: bool = False
    """On resume, take the checkpoint's learning rates and schedule whatever this run's flags
    say (Megatron-LM's `--use-checkpoint-opt_param-scheduler`; the entry point puts them in
    this config); without it, and without `override_opt_param_scheduler`, a resume must ask
    for the checkpoint's."""

    def validate(self, *, dp_size: int) -> int:
        """Check batch sizes; returns micro-batches per step per DP rank."""
        for name in ("micro_batch_size", "global_batch_size", "seq_length"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                _fail("TrainingConfig", name, getattr(self, name), "must be an integer >= 1")
        if self.deterministic_mode and self.cross_entropy_loss_fusion:
            _fail("TrainingConfig", "cross_entropy_loss_fusion", True,
                  "is not bit-exact: drop it (--cross-entropy-loss-fusion) with deterministic_mode (--deterministic-mode)")
        if self.override_opt_param_scheduler and self.use_checkpoint_opt_param_scheduler:
            _fail("TrainingConfig", "use_checkpoint_opt_param_scheduler", True,
                  "contradicts override_opt_param_scheduler (this run's schedule): give one of "
                  "--use-checkpoint-opt_param-scheduler and --override-opt-param-scheduler")
        per_step = self.micro_batch_size * dp_size
        if self.global_batch_size % per_step:
            _fail(
                "TrainingConfig",
                "global_batch_size",
                self.global_batch_size,
                f"must be a multiple of micro_batch_size*data_parallel_size={per_step}",
            )
        if self.bf16 and self.fp16:
            _fail("TrainingConfig", "bf16", True, "choose bf16 or fp16, not both")
        if self.train_iters < 0:
            _fail("TrainingConfig", "train_iters", self.train_iters, "must be >= 0")
        if self.lr_decay_style not in LR_DECAY_STYLES:
            _fail("TrainingConfig", "lr_decay_style", self.lr_decay_style, f"use one of {', '.join(LR_DECAY_STYLES)}")
        if self.lr_wsd_decay_style not in LR_WSD_DECAY_STYLES:
            _fail("TrainingConfig", "lr_wsd_decay_style", self.lr_wsd_decay_style,
                  f"use one of {', '.join(LR_WSD_DECAY_STYLES)}")
        if self.lr_decay_style == "WSD":
            decay = self.lr_decay_iters or self.train_iters
            wsd = self.lr_wsd_decay_iters
            if not isinstance(wsd, int) or not 1 <= wsd <= max(1, decay):
                _fail("TrainingConfig", "lr_wsd_decay_iters", wsd,
                      f"lr_decay_style 'WSD' anneals over the last lr_wsd_decay_iters of the decay's {decay} "
                      "iterations: give an integer from 1 to that")
        self._validate_weight_decay()
        for name in ("lr", "min_lr"):
            if getattr(self, name) < 0:
                _fail("TrainingConfig", name, getattr(self, name), "must be >= 0")
        if self.min_lr > self.lr:
            _fail("TrainingConfig", "min_lr", self.min_lr, f"the decay ends below the peak: use a value <= lr={self.lr}")
        if self.lr_decay_iters is not None and (not isinstance(self.lr_decay_iters, int) or self.lr_decay_iters < 1):
            _fail("TrainingConfig", "lr_decay_iters", self.lr_decay_iters, "must be an integer >= 1 (or None: train_iters)")
        if self.lr_warmup_iters < 0:
            _fail("TrainingConfig", "lr_warmup_iters", self.lr_warmup_iters, "must be >= 0")
        if not 0 <= self.lr_warmup_init <= self.lr:
            _fail("TrainingConfig", "lr_warmup_init", self.lr_warmup_init, f"the warm-up rises from it to lr={self.lr}: "
                  "use a value in [0, lr]")
        if self.tensorboard_queue_size < 1:
            _fail("TrainingConfig", "tensorboard_queue_size", self.tensorboard_queue_size, "must be >= 1")
        decay = self.lr_decay_iters or self.train_iters
        if self.lr_decay_style != "constant" and 0 < decay <= self.lr_warmup_iters:
            _fail("TrainingConfig", "lr_warmup_iters", self.lr_warmup_iters,
                  f"the {self.lr_decay_style} decay ends at iteration {decay} (lr_decay_iters, else train_iters), "
                  "which must come after the warm-up (megatron-core's schedule asserts it); use a shorter warm-up, a "
                  "longer decay, or lr_decay_style 'constant'")
        for name in ("decoupled_lr", "decoupled_min_lr"):
            value = getattr(self, name)
            if value is not None and not (value >= 0 and math.isfinite(value)):
                _fail("TrainingConfig", name, value, "must be a finite number >= 0 (or None)")
        if self.decoupled_min_lr is not None and self.decoupled_lr is None:
            _fail("TrainingConfig", "decoupled_min_lr", self.decoupled_min_lr,
                  "goes with decoupled_lr (the embedding's and output layer's peak); set it too")
        if self.decoupled_lr is not None:
            final = self.min_lr if self.decoupled_min_lr is None else self.decoupled_min_lr
            if final > self.decoupled_lr:
                name = "min_lr" if self.decoupled_min_lr is None else "decoupled_min_lr"
                _fail("TrainingConfig", name, final, f"the embedding's and output layer's decay must end at or below "
                      f"their peak decoupled_lr={self.decoupled_lr}: set decoupled_min_lr <= decoupled_lr")
        if self.grad_reduce_in_bf16 and not self.bf16:
            _fail("TrainingConfig", "grad_reduce_in_bf16", True, "is for bf16 training: add bf16 or drop it")
        if not isinstance(self.tensorboard_log_interval, int) or self.tensorboard_log_interval < 1:
            _fail("TrainingConfig", "tensorboard_log_interval", self.tensorboard_log_interval, "must be an integer >= 1")
        if self.wandb_project and not self.wandb_save_dir:
            _fail("TrainingConfig", "wandb_save_dir", self.wandb_save_dir,
                  "wandb_project needs the directory for the run's W&B files (--wandb-save-dir, or --save: <save>/wandb)")
        if self.wandb_project:
            from megatron_consa.training.writers import WANDB_MISSING, wandb_installed

            if not wandb_installed():  # (checked on every rank: the last one alone opens the run)
                _fail("TrainingConfig", "wandb_project", self.wandb_project, WANDB_MISSING)
        interval = self.check_weight_hash_across_dp_replicas_interval
        if interval is not None and (not isinstance(interval, int) or interval < 1):
            _fail("TrainingConfig", "check_weight_hash_across_dp_replicas_interval", interval,
                  "must be an integer >= 1 (or None: no check)")
        if not 1 <= self.straggler_ctrlr_port <= 65535:
            _fail("TrainingConfig", "straggler_ctrlr_port", self.straggler_ctrlr_port, "must be a port, 1 to 65535")
        if self.straggler_minmax_count < 1:
            _fail("TrainingConfig", "straggler_minmax_count", self.straggler_minmax_count, "must be >= 1")
        if self.log_straggler and not self.log_interval:
            _fail("TrainingConfig", "log_straggler", True, "reports at the log lines: needs log_interval >= 1 "
                  "(--log-interval)")
        if self.log_straggler and _cuda_without_nvml():
            _fail("TrainingConfig", "log_straggler", True, "the straggler report reads the GPUs' power, temperature "
                  "and clock through NVML: pip install nvidia-ml-py (or megatron-consa[gpu])")
        if self.timing_log_level not in (0, 1, 2):
            _fail("TrainingConfig", "timing_log_level", self.timing_log_level, "use 0, 1 or 2")
        if self.timing_log_option not in TIMING_LOG_OPTIONS:
            _fail("TrainingConfig", "timing_log_option", self.timing_log_option,
                  f"use one of {', '.join(TIMING_LOG_OPTIONS)}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            _fail("TrainingConfig", "attention_backend", self.attention_backend, f"use one of {ATTENTION_BACKENDS}")
        if self.empty_unused_memory_level not in (0, 1, 2):
            _fail("TrainingConfig", "empty_unused_memory_level", self.empty_unused_memory_level, "use 0, 1 or 2")
        if not isinstance(self.num_workers, int) or self.num_workers < 0:
            _fail("TrainingConfig", "num_workers", self.num_workers, "must be an integer >= 0")
        if not isinstance(self.manual_gc_interval, int) or self.manual_gc_interval < 0:
            _fail("TrainingConfig", "manual_gc_interval", self.manual_gc_interval, "must be an integer >= 0")
        if not self.init_method_std > 0:
            _fail("TrainingConfig", "init_method_std", self.init_method_std, "must be > 0")
        if not self.adam_eps > 0:
            _fail("TrainingConfig", "adam_eps", self.adam_eps, "must be > 0")
        for name in ("initial_loss_scale", "min_loss_scale", "loss_scale"):
            value = getattr(self, name)
            if value is not None and not (value > 0 and math.isfinite(value)):
                _fail("TrainingConfig", name, value, "must be a finite number > 0")
        if self.min_loss_scale > self.initial_loss_scale:
            _fail("TrainingConfig", "min_loss_scale", self.min_loss_scale,
                  f"must be <= initial_loss_scale={self.initial_loss_scale}")
        for name in ("loss_scale_window", "hysteresis"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                _fail("TrainingConfig", name, getattr(self, name), "must be an integer >= 1")
        return self.global_batch_size // per_step

    def _validate_weight_decay(self) -> None:
        if self.weight_decay_incr_style not in WEIGHT_DECAY_INCR_STYLES:
            _fail("TrainingConfig", "weight_decay_incr_style", self.weight_decay_incr_style,
                  f"use one of {', '.join(WEIGHT_DECAY_INCR_STYLES)}")
        ends = ("start_weight_decay", "end_weight_decay")
        if self.weight_decay_incr_style == "constant":
            for name in ends:
                if getattr(self, name) is not None:
                    _fail("TrainingConfig", name, getattr(self, name),
                          "goes with a 'linear' or 'cosine' weight_decay_incr_style; a constant decay is weight_decay")
        else:
            for name in ends:
                value = getattr(self, name)
                if value is None or not (value >= 0 and math.isfinite(value)):
                    _fail("TrainingConfig", name, value, f"weight_decay_incr_style {self.weight_decay_incr_style!r} "
                          "moves the decay from start_weight_decay to end_weight_decay: give both, finite and >= 0")
            if self.end_weight_decay < self.start_weight_decay:
                _fail("TrainingConfig", "end_weight_decay", self.end_weight_decay,
                      f"megatron-core's schedule only increases the decay: use a value >= start_weight_decay="
                      f"{self.start_weight_decay}")
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            _fail("TrainingConfig", "weight_decay", self.weight_decay, "must be a finite number >= 0")

    def wandb_init(self) -> Optional[dict]:
        """`wandb.init`'s project, name, dir and entity (None without a wandb_project)."""
        if not self.wandb_project:
            return None
        return {"project": self.wandb_project, "name": self.wandb_exp_name, "dir": self.wandb_save_dir,
                "entity": self.wandb_entity}

    def weight_decay_schedule(self) -> tuple[float, float, str]:
        """(first step's, last step's, style): what megatron-core's scheduler is given."""
        if self.weight_decay_incr_style == "constant":
            return self.weight_decay, self.weight_decay, "constant"
        return self.start_weight_decay, self.end_weight_decay, self.weight_decay_incr_style

    def to_dict(self) -> dict:
        return asdict(self)
