"""Command-line arguments of the training entry point, parsed once into typed configs.

Flag names follow Megatron-LM where it has them (`--tensor-model-parallel-size`,
`--num-layers`, `--data-path`, `--save`, ...), plus `--consa-*` flags for the
method. `parse_run_config(argv)` returns a `RunConfig` of the typed dataclasses
the library takes (`ArchitectureConfig`, `ConsaConfig`, `ParallelConfig`,
`TrainingConfig`, `DataConfig`, `CheckpointConfig`); nothing below the entry
point reads these arguments again.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from megatron_consa.architecture import ArchitectureConfig
from megatron_consa.compat import distributed_backend
from megatron_consa.config import GRANULARITIES, ConsaConfig, ConsaConfigError
from megatron_consa.data.gpt import DataConfig
from megatron_consa.data.tokenizer import TOKENIZER_TYPES, tokenizer_type_of
from megatron_consa.training.config import (
    ATTENTION_BACKENDS, DIST_CKPT_STRICTNESS, LR_DECAY_STYLES, LR_WSD_DECAY_STYLES, TIMING_LOG_OPTIONS,
    WEIGHT_DECAY_INCR_STYLES, ParallelConfig, TrainingConfig,
)
from megatron_consa.training.early_exit import ExitConfig
from megatron_consa.training.profiling import ProfileConfig
from megatron_consa.training.writers import WANDB_MISSING, wandb_installed

logger = logging.getLogger(__name__)

PHASES = ("learn", "fixed")


class ArgumentError(ValueError):
    """A flag with a bad value, or flags that do not fit together; the message names the flag."""


class LocalPathError(ArgumentError):
    """A path flag this process cannot use (not writable, a file in the way): the nodes of a job may
    see different file systems, so any rank may be the one that meets it, and reports it."""


@dataclass
class CheckpointConfig:
    """Where a run saves and what it resumes from."""

    save: Optional[str] = None
    """Directory of `iter_XXXXXXX/` checkpoints and `latest_checkpointed_iteration.txt`."""
    load: Optional[str] = None
    """A checkpoint directory (a `--save` directory or one `iter_*` in it) to resume or start from."""
    save_interval: Optional[int] = None
    """Iterations between saves (and a save at the end when `save` is set)."""
    finetune: bool = False
    """Load the model weights only (start a new phase): iteration, optimizer and controller start fresh."""
    save_optim: bool = True
    """Save optimizer and LR-scheduler state (resumable); off: a weights-only checkpoint, about a third the size."""
    load_optim: bool = True
    """On resume, load the optimizer and LR-scheduler state; off (`--no-load-optim`): a new optimizer,
    and this run's schedule from the saved iteration on (the iteration, data position, gates and
    controller are loaded: precision, learning rates or the optimizer's sharding may change)."""
    load_rng: bool = True
    """On resume, restore every rank's RNG states (`--no-load-rng`: keep this run's seeds)."""
    save_rng: bool = True
    """Save every rank's RNG states with the optimizer (`--no-save-rng`: a resume of it needs
    `--no-load-rng`, as in Megatron-LM)."""
    fully_parallel_save: bool = True
    """Data-parallel replicas share the writing of the tensors they hold alike (Megatron-LM's default;
    `--no-ckpt-fully-parallel-save`: replica 0 writes them)."""
    fully_parallel_load: bool = False
    """Data-parallel replicas share the reading, and exchange what they read (`--ckpt-fully-parallel-load`)."""
    assume_constant_structure: bool = False
    """Plan the save once and reuse the plan (`--ckpt-assume-constant-structure`)."""
    async_save: bool = False
    """Write checkpoints in the background while training goes on (`--async-save`)."""
    persistent_worker: bool = False
    """One long-lived writer process per rank instead of a fork per save (`--use-persistent-ckpt-worker`;
    CUDA only)."""
    save_retain_interval: Optional[int] = None
    """Keep only the checkpoints at multiples of this, and the latest (`--save-retain-interval`)."""
    ckpt_step: Optional[int] = None
    """Load this iteration of the `load` (`--save`) directory instead of its latest (`--ckpt-step`)."""
    pretrained_checkpoint: Optional[str] = None
    """`--pretrained-checkpoint`: the checkpoint a run starts from while `load` holds none."""
    started_from_pretrained: bool = False
    """Whether `load` is the pretrained checkpoint (`load` held none): a weights-only start (`finetune`)."""
    dist_ckpt_strictness: str = "assume_ok_unexpected"
    """How a load treats tensors the run asks for that the checkpoint lacks, or the reverse
    (`--dist-ckpt-strictness`: megatron-core's StrictHandling; see
    `training.checkpoint.strictness_of`). Every model weight must load whatever the value."""
    log_progress: bool = False
    """Append the job's starts, saves (with the throughputs and the floating-point operations
    and tokens so far) and deletions to `<save>/progress.txt` (`--log-progress`, Megatron-LM's
    format: `training.progress`)."""

    def load_flag(self) -> str:
        """The flag and path the checkpoint loaded came from, for messages."""
        return f"--pretrained-checkpoint {self.load}" if self.started_from_pretrained else f"--load {self.load}"

    def writer(self):
        """The `CheckpointWriter` these settings ask for."""
        from megatron_consa.training.checkpoint import CheckpointWriter

        return CheckpointWriter(fully_parallel=self.fully_parallel_save,
                                assume_constant_structure=self.assume_constant_structure, async_save=self.async_save,
                                persistent_worker=self.persistent_worker)


@dataclass
class TokenizerConfig:
    tokenizer_type: str = "NullTokenizer"
    tokenizer_model: Optional[str] = None
    vocab_size: Optional[int] = None
    make_vocab_size_divisible_by: int = 128
    """A model sized by its tokenizer pads its vocabulary to a multiple of this times the TP size."""


@dataclass
class RunConfig:
    """Everything one training run needs, typed."""

    arch: ArchitectureConfig
    consa: ConsaConfig
    parallel: ParallelConfig
    training: TrainingConfig
    data: DataConfig
    tokenizer: TokenizerConfig
    checkpoint: CheckpointConfig
    phase: str = "learn"
    allocation_source: Optional[str] = None
    """The allocation file or preset name a fixed phase runs (None: from the loaded checkpoint)."""
    calibration_scores: Optional[str] = None
    """The unit-scores file the `heuristic` preset ranks units by (tools/calibrate_heuristic.py)."""
    eval_interval: Optional[int] = None
    eval_iters: int = 10
    hf_config: Optional[str] = None
    transformer_impl: str = "auto"
    exit: ExitConfig = dataclasses.field(default_factory=ExitConfig)
    """When the run stops early, after saving (Megatron-LM's --exit-* flags)."""
    profile: ProfileConfig = dataclasses.field(default_factory=ProfileConfig)
    """Which iterations are profiled, where (Megatron-LM's --profile flags)."""
    consa_flags: tuple[str, ...] = ()
    """The ConsaConfig fields among window, sink_tokens, granularity and target_sparsity that the
    run's flags set: a fixed phase's allocation from a file or a checkpoint must agree with them."""


_LOSS_SCALE_FLAGS = (  # Megatron-LM's flags, with TrainingConfig's defaults
    ("--loss-scale", float, "dynamic", "a static loss scale instead of the dynamic one"),
    ("--initial-loss-scale", float, "2**16", "the dynamic loss scale's start"),
    ("--min-loss-scale", float, 1.0, "the dynamic loss scale's floor"),
    ("--loss-scale-window", int, 1000, "steps without overflow before the dynamic scale doubles"),
    ("--hysteresis", int, 2, "overflows tolerated before the dynamic scale halves"),
)


_FIXED_SWITCHES = (  # on in every model here; Megatron-LM needs them said
    ("--swiglu", "SwiGLU MLP (always)"),
    ("--disable-bias-linear", "no bias in the linear layers (always; --add-qkv-bias adds Qwen2's QKV bias)"),
    ("--group-query-attention", "GQA (always possible: --num-query-groups sets the groups)"),
    ("--use-mcore-models", "megatron-core's GPTModel (always)"),
    ("--use-rotary-position-embeddings", "RoPE (always)"),
    ("--no-position-embedding", "no learned absolute positions (always)"),
    ("--no-masked-softmax-fusion", "(the core attention is ConSA's: no fused masked softmax)"),
    ("--no-bias-swiglu-fusion", "(no bias to fuse)"),
    ("--no-bias-dropout-fusion", "(no bias or dropout to fuse)"),
    ("--attention-softmax-in-fp32", "(the attention's softmax runs in fp32)"),
    ("--no-gradient-accumulation-fusion", "(weight gradients are not accumulated by a fused kernel)"),
    ("--no-rope-fusion", "(RoPE is not fused)"),
    ("--no-create-attention-mask-in-dataloader", "(no mask is built: the hybrid attention is causal by construction)"),
    ("--log-throughput", "(tokens/s and TFLOP/s per GPU are always logged)"),
    ("--log-loss-scale-to-tensorboard", "(TensorBoard always gets the fp16 loss scale)"),
    ("--accumulate-allreduce-grads-in-fp32", "(gradients are accumulated and reduced in fp32 unless "
     "--grad-reduce-in-bf16, which wins as in Megatron-LM; the gates' always in fp32)"),
    ("--use-dist-ckpt", "(checkpoints are always megatron-core's dist_checkpointing)"),
    ("--no-async-tensor-model-parallel-allreduce", "(deprecated in Megatron-LM, where it does nothing either)"),
    ("--auto-detect-ckpt-format", "(every checkpoint here is megatron-core's torch_dist: --load's format is known)"),
    ("--no-persist-layer-norm", "(the norms never use Transformer Engine's persistent LayerNorm kernel)"),
)
_FIXED_NUMBERS = {  # flags whose one value here is a number: (value, what it says, why no other)
    "--rotary-percent": (1.0, "RoPE on the whole head dimension", "Qwen/Llama/Mistral rotate all of it"),
    "--num-distributed-optimizer-instances": (1, "one distributed-optimizer instance",
                                              "--use-distributed-optimizer shards the optimizer state over the whole "
                                              "data-parallel group (megatron-core's partial sharding is not wired in)"),
    "--context-parallel-size": (1, "no context parallelism",
                                "ConSA's core attention keeps each sequence on one rank (megatron-core's local "
                                "attention asserts it too); use --tensor-model-parallel-size and "
                                "--sequence-parallel for long sequences"),
}
_REFUSED = {  # Megatron-LM flags that would change what these runs are: why not, and what instead
    "--apply-layernorm-1p": "these models' norms keep plain weights (Qwen/Llama/Mistral); drop the flag",
    "--use-legacy-models": "megatron-consa builds megatron-core's GPTModel; drop the flag",
    "--rampup-batch-size": "a ramped batch size moves every later sample, and a resume reads samples by iteration x "
                           "global batch; train at a fixed --global-batch-size",
    "--vocab-file": "GPT-2 BPE files are not read here: give a Hugging Face tokenizer directory "
                    "(--tokenizer-type HuggingFaceTokenizer --tokenizer-model DIR) or a sentencepiece model",
    "--merge-file": "GPT-2 BPE files are not read here: give a Hugging Face tokenizer directory "
                    "(--tokenizer-type HuggingFaceTokenizer --tokenizer-model DIR) or a sentencepiece model",
    **{flag: "give the stages' layers instead: --decoder-first-pipeline-num-layers / "
             "--decoder-last-pipeline-num-layers (e.g. one layer fewer beside the embedding or the loss)"
       for flag in ("--account-for-embedding-in-pipeline-split", "--account-for-loss-in-pipeline-split")},
    "--num-experts": "megatron-consa's models are dense (Qwen/Llama/Mistral): mixture-of-experts layers are not "
                     "supported; drop the flag",
    "--tp-comm-overlap": "Transformer Engine's overlap of tensor-parallel communication (userbuffers) is not wired "
                         "into ConSA's layers; drop the flag (--overlap-grad-reduce and --overlap-param-gather overlap "
                         "the data-parallel communication)",
    "--use-torch-fsdp2": "FSDP is not supported (megatron-core's DDP holds the gates' replicas); shard the optimizer "
                         "state with --use-distributed-optimizer",
    "--use-precision-aware-optimizer": "Transformer Engine's FusedAdam with low-precision optimizer state is not "
                                       "wired in here; drop the flag (--use-distributed-optimizer shards the fp32 "
                                       "state)",
    "--overlap-param-gather-with-optimizer-step": "not supported here; --overlap-param-gather leaves the parameter "
                                                  "all-gather to the next forward instead",
    "--dist-ckpt-optim-fully-reshardable": "the distributed optimizer's checkpoints here are megatron-core's "
                                           "dp_reshardable format (they load at another data-parallel size; the "
                                           "KV-group reordering has no fully reshardable one): to change TP or PP, "
                                           "resume with --no-load-optim, or train with the standard optimizer, whose "
                                           "checkpoints load at any layout",
    "--rotary-interleaved": "Qwen/Llama/Mistral rotate the two halves of each head (megatron-core's default), not "
                            "interleaved pairs; drop the flag",
    "--rotary-seq-len-interpolation-factor": "megatron-core's linear position interpolation is not part of these "
                                             "models' configs (a Hugging Face export could not carry it); the RoPE "
                                             "scaling supported is Llama 3's (--use-rope-scaling); drop the flag",
    "--apply-query-key-layer-scaling": "ConSA's core attention scales the scores by 1/sqrt(head dim) with the softmax "
                                       "in fp32, so there is nothing to rescale per layer; drop the flag",
    "--defer-embedding-wgrad-compute": "needs gradient-accumulation fusion (Transformer Engine / apex kernels), "
                                       "which these runs do not use; drop the flag",
    **{flag: "fp8 training is not supported here (the KV-group reordering would copy into low-precision weights, "
             "and Transformer Engine's fp8 sliding-window attention needs sm_100 or a newer cuDNN): train with --bf16 "
             "and drop the --fp8-* flags"
       for flag in ("--fp8-format", "--fp8-recipe", "--fp8-amax-history-len", "--fp8-amax-compute-algo",
                    "--fp8-param-gather", "--fp8-margin")},
}
_IGNORED = {  # Megatron-LM flags with a value that only a setup these runs do not have reads
    "--tiktoken-pattern": "read by Megatron-LM's TikTokenizer only, not one of these tokenizer types: ignored",
}
_SETUP_CHOICES = {  # Megatron-LM set-up flags with one value here: (the value, what it is, why no other)
    "--optimizer": ("adam", "megatron-core's Adam with decoupled weight decay",
                    "the gates and the augmented Lagrangian were tuned with it"),
    "--dataloader-type": ("single", "each iteration reads the next global batch of megatron-core's shuffled samples, "
                          "as Megatron-LM's single sampler", "a resume reads on from iteration x global batch"),
    "--rerun-mode": ("disabled", "no rerun state machine", "megatron-consa has none"),
}
_FIXED_CHOICES = {
    "--normalization": ("RMSNorm", "the norm layers"),
    "--position-embedding-type": ("rope", "positions"),
    "--ckpt-format": ("torch_dist", "checkpoints (megatron-core's dist_checkpointing)"),
}


def _check_megatron_compat(a: argparse.Namespace) -> None:
    for flag, (choice, text) in _FIXED_CHOICES.items():
        value = getattr(a, flag[2:].replace("-", "_"), None)
        if value is not None and value != choice:
            raise ArgumentError(
                f"{flag} {value}: megatron-consa's models are Qwen/Llama/Mistral-style, {text}: {choice} only; "
                f"drop the flag or pass {flag} {choice}"
            )
    for flag, (only, text, why) in _FIXED_NUMBERS.items():
        value = getattr(a, flag[2:].replace("-", "_"), None)
        if value is not None and value != only:
            raise ArgumentError(f"{flag} {value}: only {flag} {only:g} here ({text}): {why}")
    for flag, (only, text, why) in _SETUP_CHOICES.items():
        value = getattr(a, flag[2:].replace("-", "_"), None)
        if value is not None and value != only:
            raise ArgumentError(f"{flag} {value}: {flag} {only} only ({text}): {why}; drop the flag or pass {only}")
    backend = getattr(a, "distributed_backend", None)
    if backend is not None and backend != distributed_backend():
        raise ArgumentError(f"--distributed-backend {backend}: this machine runs {distributed_backend()} (NCCL with "
                            f"CUDA, gloo without); drop the flag or pass {distributed_backend()}")
    if hasattr(a, "use_flash_attn"):  # Megatron-LM's older switch for FlashAttention
        if a.attention_backend not in ("auto", "flash"):
            raise ArgumentError(f"--use-flash-attn and --attention-backend {a.attention_backend}: give one")
        a.attention_backend = "flash"
    for flag, why in _REFUSED.items():
        if hasattr(a, flag[2:].replace("-", "_")):
            raise ArgumentError(f"{flag}: {why}")
    for flag in ("--hidden-dropout", "--attention-dropout"):
        value = getattr(a, flag[2:].replace("-", "_"), None)
        if value is not None and value != 0:
            raise ArgumentError(
                f"{flag} {value}: these models train without dropout (ConSA's attention has none); pass 0 or drop "
                "the flag (Megatron-LM's default would be 0.1)"
            )


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each option's default in --help, except a `--no-X` switch's: its stored default (X on: True) would read as
    the switch being on by default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if isinstance(action, argparse._StoreFalseAction):
            return action.help or ""
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m megatron_consa.train",
        description=(
            "Train a megatron-core GPT model with ConSA hybrid attention. Phases: `learn` (gates + "
            "augmented Lagrangian choose FA/SWA units under --consa-target-sparsity), then "
            "tools/finalize_allocation.py, then `fixed` (continued training with the allocation fixed). "
            "Launch with torchrun: torchrun --nproc-per-node N -m megatron_consa.train ..."
        ),
        formatter_class=_HelpFormatter,
    )
    g = p.add_argument_group("model (or --hf-config)")
    g.add_argument("--hf-config", help="a Hugging Face config.json (or its directory) describing the model")
    g.add_argument("--num-layers", type=int, help="transformer layers")
    g.add_argument("--hidden-size", type=int, help="model width")
    g.add_argument("--ffn-hidden-size", type=int, help="SwiGLU inner width")
    g.add_argument("--num-attention-heads", type=int, help="query heads")
    g.add_argument("--num-query-groups", type=int, help="KV heads (GQA groups); default: num-attention-heads")
    g.add_argument("--kv-channels", type=int, help="per-head width; default hidden-size / heads")
    # defaults given in the help, not to argparse: a flag given next to --hf-config is refused
    g.add_argument("--rotary-base", type=float, default=argparse.SUPPRESS, help="RoPE theta (default 1e6)")
    g.add_argument("--use-rope-scaling", action="store_true",
                   help="Llama 3.x RoPE scaling (low/high frequency factors 1 and 4, original context 8192)")
    g.add_argument("--rope-scaling-factor", type=float, default=argparse.SUPPRESS,
                   help="the RoPE scaling factor of --use-rope-scaling (default 8)")
    g.add_argument("--norm-epsilon", type=float, default=argparse.SUPPRESS, help="RMSNorm epsilon (default 1e-6)")
    g.add_argument("--qk-layernorm", action="store_true", help="per-head RMSNorm on q and k (Qwen3)")
    g.add_argument("--add-qkv-bias", action="store_true", help="bias on the QKV projection (Qwen2)")
    g.add_argument("--untie-embeddings-and-output-weights", action="store_true",
                   help="separate output layer (default: tied)")
    g.add_argument("--max-position-embeddings", type=int, help="longest sequence; default seq-length")
    g.add_argument("--transformer-impl", choices=["auto", "local", "transformer_engine", "stock"], default="auto",
                   help="layer spec: auto (TE on GPU when installed), local, transformer_engine, or stock "
                        "(megatron-core's own attention, no ConSA; a baseline, needs --consa-allocation all_fa)")

    g = p.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1, help="TP size (divides the KV heads)")
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1, help="PP size")
    g.add_argument("--num-layers-per-virtual-pipeline-stage", type=int,
                   help="layers per virtual stage (interleaved 1F1B)")
    g.add_argument("--decoder-first-pipeline-num-layers", type=int, metavar="N",
                   help="layers on the first pipeline stage (default: an even share); the stages between the first "
                        "and the last share the rest evenly")
    g.add_argument("--decoder-last-pipeline-num-layers", type=int, metavar="N",
                   help="layers on the last pipeline stage (default: an even share)")
    g.add_argument("--sequence-parallel", action="store_true", help="megatron sequence parallelism (TP > 1)")
    g.add_argument("--use-distributed-optimizer", action="store_true", help="shard optimizer state over DP")
    g.add_argument("--overlap-grad-reduce", action="store_true", help="overlap the DP gradient reduction")
    g.add_argument("--overlap-param-gather", action="store_true",
                   help="overlap the distributed optimizer's parameter all-gather with the next forward "
                        "(needs --use-distributed-optimizer and --overlap-grad-reduce)")
    g.add_argument("--recompute-granularity", choices=["full", "selective"], help="activation recomputation")
    g.add_argument("--recompute-method", choices=["uniform", "block"], help="full recomputation method")
    g.add_argument("--recompute-num-layers", type=int, help="layers per recomputation unit")
    g.add_argument("--distributed-timeout-minutes", type=float, default=10.0,
                   help="how long a collective may wait before torch.distributed gives up")

    g = p.add_argument_group("training")
    g.add_argument("--seq-length", type=int, required=True, help="tokens per sequence")
    g.add_argument("--micro-batch-size", type=int, default=1, help="sequences per micro-batch per DP rank")
    g.add_argument("--global-batch-size", type=int, help="sequences per step; default micro-batch x DP")
    g.add_argument("--train-iters", type=int, help="optimizer steps (of this run, resumed ones count); or --train-samples")
    g.add_argument("--train-samples", type=int, default=argparse.SUPPRESS,
                   help="the run's length in sequences (Megatron-LM's sample-based schedule, with --lr-decay-samples "
                        "and --lr-warmup-samples): iterations of --global-batch-size, which it needs")
    g.add_argument("--lr-decay-samples", type=int, default=argparse.SUPPRESS,
                   help="the decay to --min-lr in sequences (with --train-samples)")
    g.add_argument("--lr-warmup-samples", type=int, default=argparse.SUPPRESS,
                   help="the linear warm-up in sequences (with --train-samples)")
    g.add_argument("--lr", type=float, default=3e-4, help="peak learning rate of the weights")
    g.add_argument("--min-lr", type=float, default=3e-5, help="final learning rate")
    g.add_argument("--lr-decay-style", choices=list(LR_DECAY_STYLES), default="cosine",
                   help="WSD: warm-up, then --lr until the last --lr-wsd-decay-iters of the decay, which anneal to "
                        "--min-lr")
    g.add_argument("--lr-wsd-decay-style", choices=list(LR_WSD_DECAY_STYLES), default="exponential",
                   help="the anneal of --lr-decay-style WSD")
    g.add_argument("--lr-wsd-decay-iters", type=int, help="the anneal's length (with --lr-decay-style WSD)")
    g.add_argument("--lr-wsd-decay-samples", type=int, default=argparse.SUPPRESS,
                   help="the anneal's length in sequences (with --train-samples)")
    g.add_argument("--decoupled-lr", type=float,
                   help="peak learning rate of the input embedding and the output layer (default: --lr)")
    g.add_argument("--decoupled-min-lr", type=float,
                   help="final learning rate of the input embedding and the output layer (with --decoupled-lr; "
                        "default: --min-lr)")
    g.add_argument("--lr-warmup-iters", type=int, default=argparse.SUPPRESS, help="linear LR warm-up (default: 0)")
    g.add_argument("--lr-warmup-init", type=float, default=0.0, help="the rate the warm-up starts from (default: 0)")
    g.add_argument("--lr-warmup-fraction", type=float, default=argparse.SUPPRESS,
                   help="the warm-up as a fraction of the decay iterations (instead of --lr-warmup-iters; below 1 "
                        "unless --lr-decay-style constant)")
    g.add_argument("--lr-decay-iters", type=int, default=argparse.SUPPRESS,
                   help="iterations of the decay to --min-lr (default: --train-iters)")
    g.add_argument("--weight-decay", type=float, default=0.1,
                   help="decoupled weight decay (not on gates, norms or biases), throughout the run")
    g.add_argument("--weight-decay-incr-style", choices=list(WEIGHT_DECAY_INCR_STYLES), default="constant",
                   help="linear or cosine: the decay rises from --start-weight-decay to --end-weight-decay over "
                        "--train-iters (instead of --weight-decay)")
    g.add_argument("--start-weight-decay", type=float, help="the first step's weight decay (with "
                   "--weight-decay-incr-style linear or cosine)")
    g.add_argument("--end-weight-decay", type=float, help="the weight decay reached at the end of --train-iters (with "
                   "--weight-decay-incr-style linear or cosine)")
    g.add_argument("--override-opt-param-scheduler", "--override-opt_param-scheduler", action="store_true",
                   help="on resume, follow this run's learning-rate and weight-decay schedule flags (--train-iters, "
                        "--lr-warmup-iters, --lr-decay-style, --lr-decay-iters, the WSD anneal's, "
                        "--weight-decay-incr-style, --start/--end-weight-decay) from the saved iteration on (e.g. to "
                        "extend a run); without it a resume must keep the checkpoint's")
    g.add_argument("--use-checkpoint-opt_param-scheduler", "--use-checkpoint-opt-param-scheduler",
                   dest="use_checkpoint_opt_param_scheduler", action="store_true",
                   help="on resume, take the checkpoint's learning rates (--lr, --min-lr, the decoupled and gate "
                        "rates), weight decay and schedule whatever this run's flags say (--train-iters stays this "
                        "run's; the decay ends where the saved run's did); logged when they differ")
    g.add_argument("--manual-gc", action="store_true",
                   help="Python's garbage collector off, collections at the same iterations on every rank instead "
                        "(a collection at another moment on each rank makes the others wait)")
    g.add_argument("--manual-gc-interval", type=int, default=0,
                   help="with --manual-gc: collect every this many iterations (0: at the start and around evaluations)")
    g.add_argument("--no-manual-gc-eval", dest="manual_gc_eval", action="store_false",
                   help="with --manual-gc: no collection around evaluations")
    g.add_argument("--log-params-norm", action="store_true",
                   help="log the L2 norm of all parameters (each counted once) at every log line")
    g.add_argument("--log-num-zeros-in-grad", action="store_true", help="log the number of zero gradient entries")
    g.add_argument("--no-check-for-nan-in-loss-and-grad", dest="check_for_nan_in_loss_and_grad",
                   action="store_false",
                   help="train on when an applied step's loss, gradient norm or s_hat is not finite (by default the "
                        "run stops there with exit status 3, before saving anything of that step)")
    g.add_argument("--calculate-per-token-loss", action="store_true",
                   help="normalise the loss by the tokens with loss in the whole global batch (every token weighs the "
                        "same, however --eod-mask-loss spreads them over micro-batches and ranks); default: the mean "
                        "of each micro-batch's per-token mean")
    g.add_argument("--clip-grad", type=float, default=1.0, help="global gradient-norm clip of the weights")
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.999)
    g.add_argument("--adam-eps", type=float, default=1e-8, help="Adam epsilon")
    g.add_argument("--bf16", action="store_true", help="bf16 weights and activations (gates stay fp32)")
    g.add_argument("--fp16", action="store_true", help="fp16 with dynamic loss scaling (gates stay fp32)")
    g.add_argument("--grad-reduce-in-bf16", action="store_true",
                   help="with --bf16: accumulate and reduce the weights' gradients in bf16, not fp32 (the gates' "
                        "stay fp32)")
    g.add_argument("--cross-entropy-loss-fusion", action="store_true",
                   help="megatron-core's fused cross entropy (on CUDA; the CPU keeps the unfused one)")
    g.add_argument("--deterministic-mode", action="store_true",
                   help="bit-exact reproducible runs: torch's deterministic algorithms, megatron-core's "
                        "deterministic_mode, and NCCL_ALGO=Ring, NVTE_ALLOW_NONDETERMINISTIC_ALGO=0, "
                        "CUBLAS_WORKSPACE_CONFIG=:4096:8 unless the environment sets deterministic values already "
                        "(others are refused)")
    g.add_argument("--use-cpu-initialization", action="store_true",
                   help="draw each weight whole on the CPU and give each tensor-parallel rank its part, instead of "
                        "each GPU drawing its own (always so without CUDA)")
    g.add_argument("--attention-backend", choices=ATTENTION_BACKENDS, default="auto",
                   help="the Transformer Engine attention kernels the TE backend may use (flash, fused, unfused; "
                        "auto: TE picks), or local: none (implies --consa-backend torch)")
    g.add_argument("--empty-unused-memory-level", type=int, choices=[0, 1, 2], default=0,
                   help="release the CUDA allocator's cached blocks: 1 after each forward-backward and evaluation "
                        "batch, 2 also after each optimizer step")
    for flag, kind, default, text in _LOSS_SCALE_FLAGS:
        g.add_argument(flag, type=kind, default=argparse.SUPPRESS, help=f"{text} (--fp16; default: {default})")
    g.add_argument("--init-method-std", type=float, default=0.02,
                   help="std of the random initialisation (a run that loads weights does not use it)")
    g.add_argument("--seed", type=int, default=1234, help="weight initialisation and data shuffling seed")
    g.add_argument("--log-interval", type=int, default=10,
                   help="iterations between log lines (counted from 1 as Megatron-LM counts; the first and the last "
                        "iteration are logged too)")
    g.add_argument("--check-weight-hash-across-dp-replicas-interval", type=int, metavar="N",
                   help="every N iterations, check that the data-parallel replicas hold bit-identical weights (a "
                        "SHA-1 of each parameter): a mismatch stops every rank, naming the ranks")
    g.add_argument("--tensorboard-dir", help="write TensorBoard scalars and allocation heatmaps here")
    g.add_argument("--tensorboard-log-interval", type=int, default=1,
                   help="iterations between TensorBoard scalars (their step: the iterations done, as Megatron-LM's)")
    g.add_argument("--log-validation-ppl-to-tensorboard", action="store_true",
                   help="TensorBoard gets the validation perplexity beside the validation loss")
    g.add_argument("--timing-log-level", type=int, choices=(0, 1, 2), default=0,
                   help="megatron-core's timers at each log line: 0 none; 1 the step's parts (forward-backward, "
                        "gradient all-reduces, optimizer parts, ConSA's constraint and dual step); 2 also each "
                        "micro-batch's forward and backward, pipeline sends and receives, batch reading. Levels 1 "
                        "and 2 synchronise the device at each timer")
    g.add_argument("--timing-log-option", choices=list(TIMING_LOG_OPTIONS), default="minmax",
                   help="the timers over ranks: max, minmax, or all (each rank's)")
    g.add_argument("--log-timers-to-tensorboard", action="store_true",
                   help="TensorBoard gets the time per iteration and each timer's, at every log line")
    g.add_argument("--no-barrier-with-level-1-timing", dest="barrier_with_l1_time", action="store_false",
                   help="level-1 timers start without waiting for every rank (the time then includes stragglers)")
    g.add_argument("--log-memory-to-tensorboard", action="store_true",
                   help="TensorBoard gets the last rank's memory (CUDA's allocator; the CPU: resident bytes)")
    g.add_argument("--log-world-size-to-tensorboard", action="store_true",
                   help="TensorBoard gets the number of ranks")
    g.add_argument("--log-batch-size-to-tensorboard", action="store_true",
                   help="TensorBoard gets the global batch size")
    g.add_argument("--tensorboard-queue-size", type=int, default=1000,
                   help="events TensorBoard's writer holds before writing them out (default 1000)")
    g.add_argument("--log-straggler", action="store_true",
                   help="megatron-core's straggler detector (CUDA; needs nvidia-ml-py): at every log line the first "
                        "rank logs the slowest and fastest ranks' time per iteration, estimated TFLOP/s and GPU power, "
                        "temperature, utilisation and clock")
    g.add_argument("--straggler-ctrlr-port", type=int, default=65535,
                   help="the first rank's port: `curl <host>:<port>` turns the detector on or off at the next log line")
    g.add_argument("--straggler-minmax-count", type=int, default=1,
                   help="how many of the slowest and of the fastest ranks the report names")
    g.add_argument("--disable-straggler-on-startup", action="store_true",
                   help="the detector starts off (its port turns it on)")
    g.add_argument("--wandb-project", help="also log every TensorBoard scalar and image to this Weights & Biases "
                   "project (the last rank; needs the wandb package; WANDB_MODE=offline writes the run for a later "
                   "`wandb sync`)")
    g.add_argument("--wandb-exp-name", help="the W&B run's name (default: W&B picks one)")
    g.add_argument("--wandb-save-dir", help="W&B writes the run's files under DIR/wandb/ (default DIR: --save's "
                   "wandb/, as in Megatron-LM)")
    g.add_argument("--wandb-entity", help="the W&B team or user (default: the logged-in user's)")
    g.add_argument("--profile", action="store_true",
                   help="profile iterations --profile-step-start + 1 to --profile-step-end (as the log numbers them; "
                        "Megatron-LM's flags) on --profile-ranks: CUDA's "
                        "profiler for nsys (nsys profile --capture-range=cudaProfilerApi), or --use-pytorch-profiler")
    g.add_argument("--use-pytorch-profiler", action="store_true",
                   help="with --profile: torch.profiler, its traces into --tensorboard-dir")
    g.add_argument("--profile-step-start", type=int, default=10,
                   help="the iterations done before the first profiled one")
    g.add_argument("--profile-step-end", type=int, default=12,
                   help="the last iteration profiled (as the log numbers it)")
    g.add_argument("--profile-ranks", type=int, nargs="+", default=[0], help="the global ranks that profile")
    g.add_argument("--eval-interval", type=int, help="iterations between validation-loss evaluations")
    g.add_argument("--eval-iters", type=int, default=10,
                   help="validation batches per evaluation (and the test split's, evaluated once after training)")
    g.add_argument("--reset-attention-mask", action="store_true",
                   help="not supported: hybrid attention does not honour document masks (refused)")
    g.add_argument("--reset-position-ids", action="store_true", help="not supported (refused)")

    g = p.add_argument_group("data")
    g.add_argument("--data-path", nargs="+", default=[], help="dataset prefixes, optionally weighted: 0.3 A 0.7 B")
    g.add_argument("--split", default=argparse.SUPPRESS, help="train,valid,test split of the blend (default: 969,30,1)")
    for which in ("train", "valid", "test"):
        g.add_argument(f"--{which}-data-path", nargs="+", default=[],
                       help=f"the {which} split's own blend, whole (instead of --data-path and --split)")
    g.add_argument("--data-args-path", metavar="FILE",
                   help="a file holding --data-path's arguments (for a blend too long for a command line)")
    g.add_argument("--per-split-data-args-path", metavar="FILE",
                   help='a JSON file {"train": ..., "valid": ..., "test": ...} holding each split\'s --*-data-path '
                        "arguments (a list, or one string)")
    g.add_argument("--mock-data", action="store_true", help="megatron-core's mock dataset (no files)")
    g.add_argument("--data-cache-path", help="where megatron-core caches sample indices")
    g.add_argument("--eod-mask-loss", action="store_true",
                   help="no loss where the input token is the EOD (a document's first token is not predicted from "
                        "the previous one's end)")
    g.add_argument("--num-workers", type=int, default=0,
                   help="worker processes preparing the next iterations' batches during a step (0: read in the "
                        "training process at each step's start; Megatron-LM's default is 2)")
    g.add_argument("--no-mmap-bin-files", dest="mmap_bin_files", action="store_false",
                   help="read the .bin files without mmap (for file systems where mmap is slow)")
    g.add_argument("--num-dataset-builder-threads", type=int, default=1, metavar="N",
                   help="threads building a blend's datasets and sample indices at the start")
    g.add_argument("--tokenizer-type", choices=TOKENIZER_TYPES, default=None,
                   help="SentencePieceTokenizer (= Megatron-LM's GPTSentencePieceTokenizer) / HuggingFaceTokenizer "
                        "(with --tokenizer-model), NullTokenizer; default: from --tokenizer-model (a directory: "
                        "Hugging Face, a file or a directory with a tokenizer.model and no Hugging Face tokenizer "
                        "files: sentencepiece)")
    g.add_argument("--tokenizer-model", help="sentencepiece .model file or HF tokenizer directory")
    g.add_argument("--vocab-size", type=int, help="vocabulary of the NullTokenizer / model when no tokenizer")
    g.add_argument("--make-vocab-size-divisible-by", type=int, default=128,
                   help="a model sized by its tokenizer (no --vocab-size, --hf-config) pads the vocabulary to a "
                        "multiple of this times --tensor-model-parallel-size")

    g = p.add_argument_group("checkpoints")
    g.add_argument("--save", help="checkpoint directory (iter_XXXXXXX/ + latest_checkpointed_iteration.txt)")
    g.add_argument("--load", help="checkpoint to resume (or, with --finetune, to start from)")
    g.add_argument("--save-interval", type=int, help="iterations between checkpoints")
    g.add_argument("--no-save-optim", action="store_true",
                   help="save the model weights (and gates, controller) only: a smaller checkpoint that starts a new "
                        "phase (--load it; no --finetune needed) but cannot be resumed")
    g.add_argument("--exit-interval", type=int, metavar="N",
                   help="save (with --save) and stop at an iteration that is a multiple of N; launch again to resume")
    g.add_argument("--exit-duration-in-mins", type=float, metavar="M",
                   help="save (with --save) and stop once the run has taken M minutes (a job's time limit)")
    g.add_argument("--exit-signal-handler", action="store_true",
                   help="on SIGTERM (e.g. Slurm's --signal=TERM@120), save (with --save) after the current step and "
                        "stop")
    g.add_argument("--no-load-optim", action="store_true",
                   help="resume without the optimizer and schedule state: a new optimizer (another precision, lr or "
                        "--use-distributed-optimizer layout) and this run's schedule, from the saved iteration and "
                        "data position on; also continues a --no-save-optim checkpoint of the same phase")
    g.add_argument("--no-load-rng", action="store_true", help="resume without restoring the ranks' RNG states")
    g.add_argument("--no-save-rng", action="store_true",
                   help="save checkpoints without the ranks' RNG states (their resume takes --no-load-rng)")
    g.add_argument("--pretrained-checkpoint", metavar="DIR",
                   help="start from DIR's weights (as --load DIR --finetune) while --load holds no checkpoint yet; "
                        "once it does, resume it: with --load and --save the same directory, one command line "
                        "starts a phase and resumes it after a requeue")
    g.add_argument("--finetune", action="store_true",
                   help="load the weights only: new iteration count, optimizer and controller")
    g.add_argument("--exit-on-missing-checkpoint", action="store_true",
                   help="a --load that holds no checkpoint is an error even where it is --save too (the first "
                        "launch of a job script: otherwise it starts from random weights, as Megatron-LM's)")
    g.add_argument("--ckpt-step", type=int, metavar="N",
                   help="load iteration N of the --load directory instead of its latest (e.g. to go back before a "
                        "loss spike)")
    g.add_argument("--save-retain-interval", type=int, metavar="N",
                   help="keep the checkpoints at multiples of N (a multiple of --save-interval) and the latest; each "
                        "other one is deleted once the next is in place")
    g.add_argument("--ckpt-fully-parallel-save", dest="ckpt_fully_parallel_save", action="store_true", default=True,
                   help="the data-parallel replicas share the writing of the tensors they hold alike (the default, "
                        "as in Megatron-LM)")
    g.add_argument("--no-ckpt-fully-parallel-save", dest="ckpt_fully_parallel_save", action="store_false",
                   help="data-parallel replica 0 writes the replicated tensors alone")
    g.add_argument("--ckpt-fully-parallel-load", action="store_true",
                   help="the data-parallel replicas share the reading of a checkpoint and exchange what they read, "
                        "instead of each reading all of it")
    g.add_argument("--ckpt-assume-constant-structure", action="store_true",
                   help="plan the first save and reuse its plan for the later ones (every save of a run holds the "
                        "same tensors); the sharding is validated at the first save only")
    g.add_argument("--async-save", action="store_true",
                   help="write checkpoints in a background process while training goes on; each is renamed into "
                        "place and marked latest once every rank's writes are done (with --save)")
    g.add_argument("--use-persistent-ckpt-worker", action="store_true",
                   help="with --async-save, one long-lived writer process per rank instead of a fork per save "
                        "(CUDA; on the CPU a save forks its writer)")
    g.add_argument("--dist-ckpt-strictness", choices=list(DIST_CKPT_STRICTNESS), default="assume_ok_unexpected",
                   help="a load's handling of tensors the run asks for that the checkpoint lacks (unexpected) or the "
                        "checkpoint holds that the run does not read (missing), megatron-core's StrictHandling: "
                        "assume_ok_unexpected fails at the first lacking tensor; raise_* name them before reading; "
                        "log_* and return_* log them and read the rest; ignore_all says nothing. Every model weight "
                        "must load whatever the value")
    g.add_argument("--log-progress", action="store_true",
                   help="append each job start, save (job and cumulative TFLOP/s per GPU, floating-point operations "
                        "and tokens so far) and deletion to --save's progress.txt, in Megatron-LM's format")
    g.add_argument("--async-strategy", choices=["nvrx", "mcore"],
                   help="with --async-save, the background writer: megatron-core's own (mcore) only here; nvrx "
                        "(NVIDIA Resiliency Extension's, Megatron-LM's default) is refused")

    g = p.add_argument_group(
        "Megatron-LM compatibility",
        "flags of Megatron-LM Llama/Qwen scripts that name what these models always are; accepted when they agree, "
        "refused with the reason otherwise",
    )
    for flag, text in _FIXED_SWITCHES:  # (argparse.SUPPRESS: no "(default: ...)" in --help)
        g.add_argument(flag, action="store_true", default=argparse.SUPPRESS, help=text)
    for flag, (choice, text) in _FIXED_CHOICES.items():
        g.add_argument(flag, metavar=choice, default=argparse.SUPPRESS, help=f"{text} (only {choice})")
    for flag in ("--hidden-dropout", "--attention-dropout"):
        g.add_argument(flag, type=float, default=argparse.SUPPRESS,
                       help="only 0 (these models train without dropout; Megatron-LM's default is 0.1)")
    for flag, (only, text, _) in _FIXED_NUMBERS.items():
        g.add_argument(flag, type=type(only), default=argparse.SUPPRESS, help=f"{text} (only {only:g})")
    for flag, (only, text, _) in _SETUP_CHOICES.items():
        g.add_argument(flag, metavar=only, default=argparse.SUPPRESS, help=f"{text} (only {only})")
    g.add_argument("--distributed-backend", choices=["nccl", "gloo"], default=argparse.SUPPRESS,
                   help="the process group's backend: NCCL with CUDA, gloo without (only that one)")
    g.add_argument("--use-flash-attn", action="store_true", default=argparse.SUPPRESS,
                   help="= --attention-backend flash")
    g.add_argument("--use-checkpoint-args", action="store_true", default=argparse.SUPPRESS,
                   help="the model as --load's checkpoint describes it (= --hf-config <the --load path>)")
    g.add_argument("--recompute-activations", action="store_true", default=argparse.SUPPRESS,
                   help="selective activation recomputation (= --recompute-granularity selective)")
    for flag, why in _IGNORED.items():
        g.add_argument(flag, metavar="VALUE", default=argparse.SUPPRESS, help=why)
    for flag, why in _REFUSED.items():
        g.add_argument(flag, nargs="*", metavar="VALUE", default=argparse.SUPPRESS, help=f"refused: {why}")

    g = p.add_argument_group("ConSA")
    d = ConsaConfig()
    g.add_argument("--consa-phase", choices=PHASES, default="learn",
                   help="learn: gates + Lagrangian; fixed: continued training with a fixed allocation")
    # (absent when not given: a fixed phase's allocation file or checkpoint brings its own, and a flag given must agree)
    for flag, kw, what, default in (
            ("--consa-granularity", {"choices": GRANULARITIES}, "gate per layer or KV head", d.granularity),
            ("--consa-target-sparsity", {"type": float}, "SWA share of KV heads", d.target_sparsity),
            ("--consa-window", {"type": int}, "sliding window W (HF sliding_window)", d.window),
            ("--consa-sink-tokens", {"type": int}, "attention sinks of SWA heads", d.sink_tokens)):
        g.add_argument(flag, **kw, default=argparse.SUPPRESS,
                       help=f"{what} (default: {default}; a fixed phase from an allocation file or checkpoint: the "
                            "allocation's)")
    g.add_argument("--consa-gates-only", action="store_true", help="freeze the weights, train the gates only")
    g.add_argument("--consa-allocation", help="fixed phase: an allocation.json, or a preset name (interleave:4, ...)")
    g.add_argument("--consa-calibration-scores", metavar="FILE",
                   help="with --consa-allocation heuristic: the unit-scores file tools/calibrate_heuristic.py wrote")
    g.add_argument("--consa-backend", choices=["auto", "torch", "te"], default=d.backend, help="attention backend")
    g.add_argument("--consa-target-warmup-iters", type=int, default=d.target_warmup_iters, help="target ramp")
    g.add_argument("--consa-gate-lr", type=float, default=d.gate_lr, help="gate learning rate")
    g.add_argument("--consa-lagrangian-lr", type=float, default=d.lagrangian_lr, help="multiplier step eta")
    g.add_argument("--consa-lagrangian-rho", type=float, default=d.lagrangian_rho, help="fixed quadratic weight rho")
    g.add_argument("--consa-noise-seed", type=int, default=d.noise_seed, help="gate noise seed")
    g.add_argument("--consa-init-log-alpha", type=float, default=d.init_log_alpha, help="initial gate log_alpha")
    g.add_argument("--consa-settle-tolerance", type=float, default=d.settle_tolerance,
                   help="finalize: allowed |s_hat - target| over the judged tail")
    return p


# The ConsaConfig fields only the learn phase reads (their --consa-* flags do nothing in the fixed phase).
_LEARN_PHASE_ONLY = ("target_warmup_iters", "gate_lr", "lagrangian_lr", "lagrangian_rho", "noise_seed",
                     "init_log_alpha", "settle_tolerance")


# The model's shape flags (-> what the ArchitectureConfig holds for each): --hf-config describes all of it,
# so none of them may come with it.
_SHAPE_FIELD = {
    "num_layers": lambda m: m.num_layers, "hidden_size": lambda m: m.hidden_size,
    "ffn_hidden_size": lambda m: m.intermediate_size, "num_attention_heads": lambda m: m.num_attention_heads,
    "num_query_groups": lambda m: m.num_kv_heads,
    "kv_channels": lambda m: m.head_dim or m.hidden_size // m.num_attention_heads,
    "rotary_base": lambda m: m.rope_theta, "use_rope_scaling": lambda m: m.rope_scaling_factor is not None,
    "rope_scaling_factor": lambda m: m.rope_scaling_factor, "norm_epsilon": lambda m: m.rms_norm_eps,
    "qk_layernorm": lambda m: m.qk_norm, "add_qkv_bias": lambda m: m.qkv_bias,
    "untie_embeddings_and_output_weights": lambda m: not m.tie_word_embeddings,
    "max_position_embeddings": lambda m: m.max_position_embeddings,
}
_SHAPE_FLAGS = tuple(_SHAPE_FIELD)


def architecture_mismatch(saved: ArchitectureConfig, ours: ArchitectureConfig) -> Optional[str]:
    """Where `ours` describes another model than `saved` (a checkpoint's): '<flag>: the checkpoint
    has X, this run's model Y' for the first field that differs, by the flag that sets it; None when
    they agree. The vocabulary counts; max_position_embeddings does not (it shapes no weight: a
    run may extend the context)."""
    for name, field in _SHAPE_FIELD.items():
        if name == "max_position_embeddings" or (name == "rope_scaling_factor" and None in (
                saved.rope_scaling_factor, ours.rope_scaling_factor)):  # (scaling on one side: --use-rope-scaling's)
            continue
        if field(saved) != field(ours):
            return f"--{name.replace('_', '-')}: the checkpoint has {field(saved)}, this run's model {field(ours)}"
    if saved.vocab_size != ours.vocab_size:
        return f"--vocab-size: the checkpoint has {saved.vocab_size}, this run's model {ours.vocab_size}"
    return None


def _arch_from_checkpoint_args(a: argparse.Namespace) -> ArchitectureConfig:
    """Megatron-LM's --use-checkpoint-args: the model as --load's checkpoint describes it; a
    shape flag given beside it must agree with the checkpoint (Megatron-LM keeps some such
    flags and lets the checkpoint override others, silently either way)."""
    if not a.load:
        raise ArgumentError("--use-checkpoint-args reads the model from --load's checkpoint: give --load")
    if a.hf_config:
        raise ArgumentError("--use-checkpoint-args and --hf-config: give one (both describe the model)")
    given = {name: vars(a)[name] for name in _SHAPE_FLAGS if vars(a).get(name) not in (None, False)}
    for name in given:
        setattr(a, name, False if isinstance(given[name], bool) else None)
    a.hf_config = a.load
    try:
        arch = _arch_from_args(a)
    except ArgumentError as err:  # (its messages name --hf-config, which is --load here)
        raise ArgumentError(str(err).replace("--hf-config", "--use-checkpoint-args: --load")) from None
    for name, value in given.items():
        saved = _SHAPE_FIELD[name](arch)
        if value != saved:
            flag = "--" + name.replace("_", "-")
            raise ArgumentError(
                f"{flag}{'' if isinstance(value, bool) else f' {value}'}: --load's checkpoint ({a.hf_config}) has "
                f"{saved}; drop the flag (--use-checkpoint-args takes the checkpoint's model) or load another "
                "checkpoint"
            )
    return arch


def _arch_from_args(a: argparse.Namespace) -> ArchitectureConfig:
    if a.hf_config:
        # (what the run's later steps read too; --use-checkpoint-args: the checkpoint --ckpt-step picks)
        step = a.ckpt_step if getattr(a, "use_checkpoint_args", False) else None
        from megatron_consa.conversion.hf_files import hf_config_file

        try:  # a config.json, a directory holding one, or (as --load reads them) a --save directory or finalize's
            # output, whose checkpoint holds one
            flag = "--load" if step is not None else "--hf-config"
            a.hf_config = str(hf_config_file(a.hf_config, step=step, flag=flag))
        except FileNotFoundError as err:
            raise ArgumentError(str(err)) from None
        given = ["--" + name.replace("_", "-") for name in _SHAPE_FLAGS if vars(a).get(name) not in (None, False)]
        if given:
            raise ArgumentError(
                f"--hf-config {a.hf_config} describes the whole model; {', '.join(given)} would be ignored: "
                "drop them, or describe the model by its shape flags without --hf-config"
            )
        if not Path(a.hf_config).is_file():
            raise ArgumentError(f"--hf-config {a.hf_config}: no config.json there")
        from megatron_consa.cli import UserInputError
        from megatron_consa.conversion.hf_files import load_hf_config

        try:
            hf = load_hf_config(a.hf_config)
        except UserInputError as err:  # (it names the file and what is wrong in it)
            raise ArgumentError(f"--hf-config {err}") from err
        # An imported sliding-window model's checkpoint keeps its source's config.json, windows
        # included, and their allocation.json beside it (what a fixed phase --load-ing it runs).
        windows_beside = (Path(a.hf_config).parent / "allocation.json").is_file()
        try:
            return ArchitectureConfig.from_hf(hf, allow_sliding_window=windows_beside)
        except (ValueError, NotImplementedError) as err:
            raise ArgumentError(f"--hf-config {a.hf_config}: {err}") from err
    missing = [f for f in ("num_layers", "hidden_size", "num_attention_heads") if getattr(a, f) is None]
    if missing:
        raise ArgumentError("the model needs --hf-config or " + ", ".join("--" + m.replace("_", "-") for m in missing))
    for name in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
                 "kv_channels", "max_position_embeddings"):
        if getattr(a, name) is not None and getattr(a, name) < 1:
            raise ArgumentError(f"--{name.replace('_', '-')} {getattr(a, name)}: must be >= 1")
    if a.qk_layernorm and a.add_qkv_bias:
        raise ArgumentError(
            "--qk-layernorm with --add-qkv-bias: no Hugging Face family has both (Qwen3's attention_bias adds an "
            "o_proj bias as well), so the checkpoints could not describe themselves or be exported; drop one"
        )
    heads = a.num_attention_heads
    return ArchitectureConfig(
        vocab_size=a.vocab_size or 0,
        hidden_size=a.hidden_size,
        intermediate_size=a.ffn_hidden_size or 4 * a.hidden_size,
        num_layers=a.num_layers,
        num_attention_heads=heads,
        num_kv_heads=a.num_query_groups or heads,
        head_dim=a.kv_channels,
        rope_theta=getattr(a, "rotary_base", 1_000_000.0),
        rope_scaling_factor=getattr(a, "rope_scaling_factor", 8.0) if a.use_rope_scaling else None,
        rms_norm_eps=getattr(a, "norm_epsilon", 1e-6),
        qk_norm=a.qk_layernorm,
        qkv_bias=a.add_qkv_bias,
        tie_word_embeddings=not a.untie_embeddings_and_output_weights,
        max_position_embeddings=a.max_position_embeddings or a.seq_length,
    )


def _read_data_args(a: argparse.Namespace) -> None:
    """Megatron-LM's --data-args-path / --per-split-data-args-path: the blends from files, in place."""
    if a.data_args_path and a.per_split_data_args_path:
        raise ArgumentError("--data-args-path and --per-split-data-args-path: give one")
    if a.data_args_path:
        if a.data_path:
            raise ArgumentError("--data-args-path and --data-path: give the blend one way")
        try:
            a.data_path = Path(a.data_args_path).read_text().split()
        except OSError as err:
            raise ArgumentError(f"--data-args-path {a.data_args_path}: cannot read it ({err.strerror})") from None
        if not a.data_path:
            raise ArgumentError(f"--data-args-path {a.data_args_path}: the file is empty; write --data-path's "
                                "arguments into it (prefixes, optionally weighted: 0.3 A 0.7 B)")
    elif a.per_split_data_args_path:
        flag = f"--per-split-data-args-path {a.per_split_data_args_path}"
        if a.data_path or a.train_data_path or a.valid_data_path or a.test_data_path:
            raise ArgumentError(f"{flag} with --data-path or --*-data-path: give the blends one way")
        try:
            blends = json.loads(Path(a.per_split_data_args_path).read_text())
        except OSError as err:
            raise ArgumentError(f"{flag}: cannot read it ({err.strerror})") from None
        except json.JSONDecodeError as err:
            raise ArgumentError(f"{flag}: not JSON ({err.msg}, line {err.lineno})") from None
        if not isinstance(blends, dict) or not set(blends) <= {"train", "valid", "test"}:
            raise ArgumentError(f'{flag}: must be a JSON object with keys among "train", "valid", "test"')
        for split, value in blends.items():
            if value is None:  # no blend for this split
                continue
            if isinstance(value, str):
                value = value.split()
            if not isinstance(value, list) or not all(isinstance(v, (str, int, float)) for v in value):
                raise ArgumentError(f'{flag}: "{split}" must be a list of --{split}-data-path arguments or one string')
            setattr(a, f"{split}_data_path", [str(v) for v in value])


def _recompute_granularity(a: argparse.Namespace) -> Optional[str]:
    """--recompute-granularity, or Megatron-LM's --recompute-activations (selective). --recompute-method and
    --recompute-num-layers choose the layers full recomputation covers: with selective recomputation they
    are refused (Megatron-LM asserts it), without recomputation ignored with a warning (Megatron-LM ignores
    them silently)."""
    granularity = a.recompute_granularity
    selective_flag = "--recompute-granularity selective"
    if hasattr(a, "recompute_activations"):
        if granularity not in (None, "selective"):
            raise ArgumentError(f"--recompute-activations (selective) and --recompute-granularity {granularity}: "
                                "give one")
        granularity, selective_flag = "selective", "--recompute-activations"
    given = [f"{flag} {value}" for flag, value in (("--recompute-method", a.recompute_method),
                                                   ("--recompute-num-layers", a.recompute_num_layers))
             if value is not None]
    if given and granularity == "selective":
        raise ArgumentError(f"{given[0]} chooses the layers full recomputation covers, not selective recomputation "
                            f"({selective_flag}): replace {selective_flag} with --recompute-granularity full, or "
                            "drop the flag")
    if given and granularity is None:
        logger.warning("%s without --recompute-granularity full: no activation is recomputed, so it does nothing",
                       " and ".join(given))
    return granularity


_SAMPLE_FLAGS = ("train_samples", "lr_decay_samples", "lr_warmup_samples", "lr_wsd_decay_samples")


def _schedule_in_iterations(a: argparse.Namespace) -> None:
    """Megatron-LM's sample-based schedule as iterations of --global-batch-size, in place.

    Megatron-LM runs `train_samples // global_batch_size` iterations and steps its LR
    schedule by samples; here it steps by iterations, so the decay and the warm-up end at
    the nearest iteration (said in the log when that is not exact)."""
    given = {name: getattr(a, name) for name in _SAMPLE_FLAGS if hasattr(a, name)}
    if "train_samples" not in given:
        if given:
            flag = "--" + next(iter(given)).replace("_", "-")
            raise ArgumentError(f"{flag}: a schedule in samples goes with --train-samples; with --train-iters give "
                                "--lr-decay-iters / --lr-warmup-iters")
        if a.train_iters is None:
            raise ArgumentError("give the run's length: --train-iters (optimizer steps) or --train-samples (sequences)")
        return
    if a.train_iters is not None:
        raise ArgumentError("--train-iters and --train-samples: give one")
    for flag, value in (("--lr-decay-iters", a.lr_decay_iters), ("--lr-warmup-iters", a.lr_warmup_iters),
                        ("--lr-wsd-decay-iters", a.lr_wsd_decay_iters)):
        if value is not None:
            raise ArgumentError(f"{flag} with --train-samples: give the schedule in samples (--lr-decay-samples, "
                                "--lr-warmup-samples, --lr-wsd-decay-samples), as Megatron-LM")
    if "lr_warmup_samples" in given and a.lr_warmup_fraction is not None:
        raise ArgumentError("--lr-warmup-samples and --lr-warmup-fraction: give one")
    gbs = a.global_batch_size
    if not gbs:
        raise ArgumentError("--train-samples needs --global-batch-size (the sequences of one iteration)")
    for name, value in given.items():
        if value < 0 or (name != "lr_warmup_samples" and value < gbs):
            raise ArgumentError(f"--{name.replace('_', '-')} {value}: must be at least one iteration's "
                                f"--global-batch-size {gbs}" + (" (or 0)" if name == "lr_warmup_samples" else ""))
    a.train_iters = given["train_samples"] // gbs
    converted = [f"--train-samples {given['train_samples']}: {a.train_iters} iterations"]
    for name, target in (("lr_decay_samples", "lr_decay_iters"), ("lr_warmup_samples", "lr_warmup_iters"),
                         ("lr_wsd_decay_samples", "lr_wsd_decay_iters")):
        if name in given:
            nearest = (2 * given[name] + gbs) // (2 * gbs)  # half up, in integers
            iters = max(0 if name == "lr_warmup_samples" else 1, nearest)
            setattr(a, target, iters)
            exact = "" if iters * gbs == given[name] else f" (ends within an iteration of sample {given[name]})"
            converted.append(f"--{name.replace('_', '-')} {given[name]}: {iters}{exact}")
    logger.info("schedule in iterations of %d sequences: %s", gbs, "; ".join(converted))


def _wandb_save_dir(a: argparse.Namespace) -> Optional[str]:
    """--wandb-save-dir, or --save's wandb/ (Megatron-LM's default), for a run with --wandb-project."""
    if not a.wandb_project:
        given = [flag for flag, value in (("--wandb-exp-name", a.wandb_exp_name), ("--wandb-save-dir", a.wandb_save_dir),
                                          ("--wandb-entity", a.wandb_entity)) if value]
        if given:
            logger.warning("%s without --wandb-project: ignored (nothing goes to W&B)", " and ".join(given))
        return None
    if not wandb_installed():
        raise ArgumentError(f"--wandb-project {a.wandb_project}: {WANDB_MISSING}; or drop the flag")
    if a.wandb_save_dir:
        return a.wandb_save_dir
    if not a.save:
        raise ArgumentError(f"--wandb-project {a.wandb_project} needs a directory for the run's W&B files: give "
                            "--wandb-save-dir DIR, or --save DIR (then DIR/wandb)")
    return str(Path(a.save) / "wandb")


_ALLOCATION_FLAGS = ("window", "sink_tokens", "granularity", "target_sparsity")
"""The ConsaConfig fields an allocation carries (their --consa-* flags are absent unless given: RunConfig.consa_flags)."""


def _holds_checkpoint(load: str) -> bool:
    """Whether `--load` holds a checkpoint to resume: a `--save` directory with its marker or a complete
    checkpoint, a checkpoint, or finalize's output (not: no such directory, an empty one, or one a job
    wrote logs into before its first save); what `training.checkpoint.resolve_load_dir` resolves."""
    from megatron_consa.training.checkpoint import TRACKER_FILE, checkpoint_marker, saved_iterations

    path = Path(load)
    return path.is_dir() and ((path / TRACKER_FILE).exists() or checkpoint_marker(path) is not None
                              or bool(saved_iterations(path)))


def _first_launch_of_a_resumable_job(a: argparse.Namespace) -> None:
    """`--load D --save D` (a job's launch script, the same at every requeue) while D holds no
    checkpoint yet: the first launch starts from random weights, as Megatron-LM's (its later launches
    resume D), unless --exit-on-missing-checkpoint. A --load elsewhere that holds none is still an
    error (a mistyped path must not train from scratch)."""
    if (not (a.load and a.save) or Path(a.load).resolve() != Path(a.save).resolve() or _holds_checkpoint(a.load)
            or a.exit_on_missing_checkpoint):
        return
    for flag, given in (("--finetune", a.finetune), ("--ckpt-step", a.ckpt_step is not None),
                        ("--use-checkpoint-args", hasattr(a, "use_checkpoint_args"))):
        if given:
            raise ArgumentError(f"{flag}: --load {a.load} holds no checkpoint yet; give one to read (or drop {flag} "
                                "to start this job from random weights)")
    if os.environ.get("RANK", "0") == "0":  # (every rank parses the flags)
        logger.warning("--load %s holds no checkpoint yet: starting from random weights (as Megatron-LM); launches "
                       "of this command after its first save resume it", a.load)
    a.load = None


def _pretrained_or_load(a: argparse.Namespace) -> bool:
    """Megatron-LM's --pretrained-checkpoint: while --load holds no checkpoint, the run starts from the
    pretrained one's weights (--finetune); once it does, --load is resumed and the other is not read.
    Returns whether the run starts from it."""
    pretrained = a.pretrained_checkpoint
    if pretrained is None:
        _first_launch_of_a_resumable_job(a)
        return False
    if a.finetune:
        raise ArgumentError("--pretrained-checkpoint and --finetune: --pretrained-checkpoint starts from its weights "
                            "already (while --load holds no checkpoint); drop --finetune")
    if a.load and _holds_checkpoint(a.load):
        logger.info("--load %s holds a checkpoint: resuming it (--pretrained-checkpoint %s is not read)", a.load,
                    pretrained)
        return False
    if not _holds_checkpoint(pretrained):
        raise ArgumentError(f"--pretrained-checkpoint {pretrained}: no checkpoint there (no consa_run.json, "
                            "latest_checkpointed_iteration.txt or finalize output); give the directory "
                            "tools/convert_hf_to_megatron.py, finalize or a run saved")
    if a.ckpt_step is not None:
        raise ArgumentError(f"--ckpt-step {a.ckpt_step}: --load {a.load} holds no checkpoint yet (the run starts from "
                            f"--pretrained-checkpoint {pretrained}); drop --ckpt-step")
    logger.info("%s: starting from the weights of --pretrained-checkpoint %s",
                f"--load {a.load} holds no checkpoint yet" if a.load else "no --load", pretrained)
    a.load, a.finetune = pretrained, True
    # (a weights-only start reads no optimizer or RNG states: these flags are for the resumes of the same command)
    a.no_load_optim = a.no_load_rng = False
    return True


def run_config_from_args(a: argparse.Namespace) -> RunConfig:
    """Typed configs from parsed flags; raises ArgumentError / ConsaConfigError naming the flag."""
    if a.reset_attention_mask or a.reset_position_ids:
        flag = "--reset-attention-mask" if a.reset_attention_mask else "--reset-position-ids"
        raise ArgumentError(
            f"{flag}: ConSA's hybrid attention is causal over the whole sequence and does not honour "
            "per-document masks or position resets; train without it (documents are separated by EOD tokens)"
        )
    _check_megatron_compat(a)
    from_pretrained = _pretrained_or_load(a)
    for name in ("lr_warmup_iters", "lr_warmup_fraction", "lr_decay_iters"):  # (argparse.SUPPRESS: None if not given)
        setattr(a, name, getattr(a, name, None))
    _schedule_in_iterations(a)
    if a.bf16 and a.fp16:
        raise ArgumentError("--bf16 and --fp16: choose one")
    if a.grad_reduce_in_bf16 and not a.bf16:
        raise ArgumentError("--grad-reduce-in-bf16 is for bf16 training: add --bf16 or drop it")
    if a.decoupled_min_lr is not None and a.decoupled_lr is None:
        raise ArgumentError("--decoupled-min-lr goes with --decoupled-lr (the embedding's and output layer's peak): "
                            "give both, or neither")
    if a.attention_backend == "local":  # no TE attention kernel: the torch backend
        if a.consa_backend == "te":
            raise ArgumentError("--attention-backend local turns Transformer Engine's attention off: it cannot go "
                                "with --consa-backend te; use --consa-backend torch (or auto)")
        a.consa_backend = "torch"
    if a.lr_warmup_iters is not None and a.lr_warmup_fraction is not None:
        raise ArgumentError("--lr-warmup-iters and --lr-warmup-fraction: give one")
    if a.lr_warmup_fraction is not None and not 0 <= a.lr_warmup_fraction <= 1:
        raise ArgumentError(f"--lr-warmup-fraction {a.lr_warmup_fraction}: must be in [0, 1]")
    if a.lr_decay_iters is not None and a.lr_decay_iters < 1:
        raise ArgumentError(f"--lr-decay-iters {a.lr_decay_iters}: must be >= 1")
    if a.lr_warmup_iters is not None and a.lr_warmup_iters < 0:
        raise ArgumentError(f"--lr-warmup-iters {a.lr_warmup_iters}: must be >= 0")
    warmup = a.lr_warmup_iters or 0
    if a.lr_warmup_fraction is not None:  # Megatron-LM: a fraction of the decay iterations
        warmup = round(a.lr_warmup_fraction * (a.lr_decay_iters or a.train_iters))
        if a.lr_decay_style != "constant" and warmup >= (a.lr_decay_iters or a.train_iters):
            raise ArgumentError(f"--lr-warmup-fraction {a.lr_warmup_fraction}: a warm-up of the whole decay ({warmup} "
                                "iterations) leaves none to decay (megatron-core's schedule asserts warm-up < decay); "
                                "give a fraction below 1, or --lr-decay-style constant")
    scaling = {name: getattr(a, name) for name in (flag[2:].replace("-", "_") for flag, *_ in _LOSS_SCALE_FLAGS)
               if hasattr(a, name)}  # the flags given (argparse.SUPPRESS): TrainingConfig's defaults otherwise
    if scaling and not a.fp16:
        raise ArgumentError(
            f"--{next(iter(scaling)).replace('_', '-')}: loss scaling is for --fp16 only (fp32 and bf16 need none); "
            "add --fp16 or drop the flag"
        )
    arch = _arch_from_checkpoint_args(a) if hasattr(a, "use_checkpoint_args") else _arch_from_args(a)
    vpp = None
    for flag, value in (("--num-layers-per-virtual-pipeline-stage", a.num_layers_per_virtual_pipeline_stage),
                        ("--eval-iters", a.eval_iters)):
        if value is not None and value < 1:
            raise ArgumentError(f"{flag} {value}: must be >= 1")
    if a.num_workers < 0:
        raise ArgumentError(f"--num-workers {a.num_workers}: must be >= 0 (0: no worker processes)")
    uneven = a.decoder_first_pipeline_num_layers is not None or a.decoder_last_pipeline_num_layers is not None
    if a.num_layers_per_virtual_pipeline_stage and uneven:
        raise ArgumentError("--num-layers-per-virtual-pipeline-stage goes with even pipeline stages here: drop it or "
                            "--decoder-first/last-pipeline-num-layers")
    if a.num_layers_per_virtual_pipeline_stage:
        per_stage = arch.num_layers // max(1, a.pipeline_model_parallel_size)
        if per_stage % a.num_layers_per_virtual_pipeline_stage:
            raise ArgumentError(
                f"--num-layers-per-virtual-pipeline-stage {a.num_layers_per_virtual_pipeline_stage} must divide the "
                f"{per_stage} layers of each pipeline stage"
            )
        vpp = per_stage // a.num_layers_per_virtual_pipeline_stage
        if vpp == 1:  # one chunk per stage: the plain pipeline (megatron would pick the interleaved schedule)
            vpp = None
    parallel = ParallelConfig(
        tensor_model_parallel_size=a.tensor_model_parallel_size,
        pipeline_model_parallel_size=a.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=vpp,
        sequence_parallel=a.sequence_parallel,
        use_distributed_optimizer=a.use_distributed_optimizer,
        overlap_grad_reduce=a.overlap_grad_reduce,
        overlap_param_gather=a.overlap_param_gather,
        recompute_granularity=_recompute_granularity(a),
        recompute_method=a.recompute_method,
        recompute_num_layers=a.recompute_num_layers,
        decoder_first_pipeline_num_layers=a.decoder_first_pipeline_num_layers,
        decoder_last_pipeline_num_layers=a.decoder_last_pipeline_num_layers,
        distributed_timeout_minutes=a.distributed_timeout_minutes,
    )
    if a.lr_decay_style == "WSD" and a.lr_wsd_decay_iters is None:
        raise ArgumentError("--lr-decay-style WSD needs the anneal's length: --lr-wsd-decay-iters (or "
                            "--lr-wsd-decay-samples with --train-samples)")
    ends = [flag for flag, value in (("--start-weight-decay", a.start_weight_decay),
                                     ("--end-weight-decay", a.end_weight_decay)) if value is not None]
    if a.weight_decay_incr_style == "constant" and ends:
        raise ArgumentError(f"{ends[0]} goes with --weight-decay-incr-style linear or cosine (a decay that moves); "
                            "for a constant decay give --weight-decay")
    if a.weight_decay_incr_style != "constant" and len(ends) < 2:
        raise ArgumentError(f"--weight-decay-incr-style {a.weight_decay_incr_style} moves the decay from "
                            "--start-weight-decay to --end-weight-decay: give both")
    if ends and a.end_weight_decay < a.start_weight_decay:
        raise ArgumentError(f"--end-weight-decay {a.end_weight_decay} < --start-weight-decay {a.start_weight_decay}: "
                            "megatron-core's schedule only increases the decay; give an end >= the start")
    unwritten = [flag for flag, on in (
        ("--log-validation-ppl-to-tensorboard", a.log_validation_ppl_to_tensorboard),
        ("--log-timers-to-tensorboard", a.log_timers_to_tensorboard),
        ("--log-memory-to-tensorboard", a.log_memory_to_tensorboard),
        ("--log-world-size-to-tensorboard", a.log_world_size_to_tensorboard),
        ("--log-batch-size-to-tensorboard", a.log_batch_size_to_tensorboard)) if on]
    if unwritten and not a.tensorboard_dir and not a.wandb_project:
        logger.warning("%s without --tensorboard-dir or --wandb-project: nothing is written (as in Megatron-LM); add "
                       "--tensorboard-dir DIR", " and ".join(unwritten))
    wandb_save_dir = _wandb_save_dir(a)
    training = TrainingConfig(
        train_iters=a.train_iters,
        micro_batch_size=a.micro_batch_size,
        global_batch_size=a.global_batch_size or 0,  # 0: filled in once the DP size is known
        seq_length=a.seq_length,
        lr=a.lr,
        min_lr=a.min_lr,
        lr_warmup_iters=warmup,
        lr_decay_iters=a.lr_decay_iters,
        lr_decay_style=a.lr_decay_style,
        lr_wsd_decay_iters=a.lr_wsd_decay_iters,
        lr_wsd_decay_style=a.lr_wsd_decay_style,
        weight_decay=a.weight_decay,
        weight_decay_incr_style=a.weight_decay_incr_style,
        start_weight_decay=a.start_weight_decay,
        end_weight_decay=a.end_weight_decay,
        adam_beta1=a.adam_beta1,
        adam_beta2=a.adam_beta2,
        adam_eps=a.adam_eps,
        clip_grad=a.clip_grad,
        check_for_nan_in_loss_and_grad=a.check_for_nan_in_loss_and_grad,
        log_params_norm=a.log_params_norm,
        check_weight_hash_across_dp_replicas_interval=a.check_weight_hash_across_dp_replicas_interval,
        log_num_zeros_in_grad=a.log_num_zeros_in_grad,
        manual_gc=a.manual_gc,
        manual_gc_interval=a.manual_gc_interval,
        manual_gc_eval=a.manual_gc_eval,
        bf16=a.bf16,
        fp16=a.fp16,
        grad_reduce_in_bf16=a.grad_reduce_in_bf16,
        calculate_per_token_loss=a.calculate_per_token_loss,
        cross_entropy_loss_fusion=a.cross_entropy_loss_fusion,
        attention_backend=a.attention_backend,
        empty_unused_memory_level=a.empty_unused_memory_level,
        decoupled_lr=a.decoupled_lr,
        decoupled_min_lr=a.decoupled_min_lr,
        **scaling,
        init_method_std=a.init_method_std,
        num_workers=a.num_workers,
        seed=a.seed,
        log_interval=a.log_interval,
        tensorboard_dir=a.tensorboard_dir,
        tensorboard_log_interval=a.tensorboard_log_interval,
        log_validation_ppl_to_tensorboard=a.log_validation_ppl_to_tensorboard,
        timing_log_level=a.timing_log_level,
        timing_log_option=a.timing_log_option,
        log_timers_to_tensorboard=a.log_timers_to_tensorboard,
        barrier_with_l1_time=a.barrier_with_l1_time,
        log_memory_to_tensorboard=a.log_memory_to_tensorboard,
        log_world_size_to_tensorboard=a.log_world_size_to_tensorboard,
        log_batch_size_to_tensorboard=a.log_batch_size_to_tensorboard,
        tensorboard_queue_size=a.tensorboard_queue_size,
        lr_warmup_init=a.lr_warmup_init,
        log_straggler=a.log_straggler,
        straggler_ctrlr_port=a.straggler_ctrlr_port,
        straggler_minmax_count=a.straggler_minmax_count,
        disable_straggler_on_startup=a.disable_straggler_on_startup,
        wandb_project=a.wandb_project or None,
        wandb_exp_name=a.wandb_exp_name or None,
        wandb_save_dir=wandb_save_dir,
        wandb_entity=a.wandb_entity or None,
        override_opt_param_scheduler=a.override_opt_param_scheduler,
        use_checkpoint_opt_param_scheduler=a.use_checkpoint_opt_param_scheduler,
        deterministic_mode=a.deterministic_mode,
        use_cpu_initialization=a.use_cpu_initialization,
    )
    if a.train_iters < 1:
        raise ArgumentError(f"--train-iters {a.train_iters}: must be >= 1")
    given = {name: getattr(a, f"consa_{name}") for name in _ALLOCATION_FLAGS if hasattr(a, f"consa_{name}")}
    if a.consa_phase == "learn" and a.consa_allocation:
        raise ArgumentError("--consa-allocation is for --consa-phase fixed; the learn phase learns one")
    if a.consa_phase == "fixed" and a.consa_gates_only:
        raise ArgumentError("--consa-gates-only is for --consa-phase learn; a fixed allocation has no gates")
    learning = {name: getattr(a, f"consa_{name}") for name in _LEARN_PHASE_ONLY}
    if a.consa_phase == "fixed":
        defaults = ConsaConfig()
        unused = [f"--consa-{name.replace('_', '-')}" for name, value in learning.items()
                  if value != getattr(defaults, name)]
        if unused:  # (a script may share its flags between the phases: a warning, not an error)
            logger.warning("%s: for --consa-phase learn (the gates, their noise and the Lagrangian); a fixed "
                           "allocation has none of them, so ignored", ", ".join(unused))
        learning = {name: getattr(defaults, name) for name in learning}
    consa = ConsaConfig(**given, **learning, backend=a.consa_backend, gates_only=a.consa_gates_only)
    _read_data_args(a)
    per_split = [f"--{w}-data-path" for w in ("train", "valid", "test") if getattr(a, f"{w}_data_path")]
    if per_split and (a.data_path or hasattr(a, "split")):
        raise ArgumentError(f"{per_split[0]} with --data-path or --split: give the whole data with --data-path and "
                            "--split, or each split's own blend (--train-data-path, --valid-data-path, "
                            "--test-data-path), not both")
    if per_split and not a.train_data_path:
        raise ArgumentError(f"{per_split[0]} without --train-data-path: the run trains on --train-data-path's blend")
    if per_split and a.eval_interval and not a.valid_data_path:
        raise ArgumentError("--eval-interval reads the validation blend: give --valid-data-path")
    if not a.mock_data and not a.data_path and not per_split:
        raise ArgumentError("--data-path is missing: give dataset prefixes (tools/preprocess_data.py), each split's "
                            "(--train-data-path ...), or --mock-data")
    if a.mock_data and (a.data_path or per_split):
        raise ArgumentError(f"--mock-data trains on megatron-core's mock dataset, not {(per_split or ['--data-path'])[0]}: "
                            "drop one of them")
    if a.num_dataset_builder_threads < 1:
        raise ArgumentError(f"--num-dataset-builder-threads {a.num_dataset_builder_threads}: must be >= 1")
    data = DataConfig(data_path=list(a.data_path), split=getattr(a, "split", DataConfig.split), mock=a.mock_data,
                      cache_path=a.data_cache_path, seed=a.seed, train_data_path=list(a.train_data_path),
                      valid_data_path=list(a.valid_data_path), test_data_path=list(a.test_data_path),
                      eod_mask_loss=a.eod_mask_loss, mmap_bin_files=a.mmap_bin_files,
                      num_dataset_builder_threads=a.num_dataset_builder_threads)
    tok_type = a.tokenizer_type or (  # (as tokenizer_from_path reads the path)
        "NullTokenizer" if a.tokenizer_model is None
        else tokenizer_type_of(a.tokenizer_model)
    )
    if a.make_vocab_size_divisible_by < 1:
        raise ArgumentError(f"--make-vocab-size-divisible-by {a.make_vocab_size_divisible_by}: must be >= 1")
    tokenizer = TokenizerConfig(tokenizer_type=tok_type, tokenizer_model=a.tokenizer_model, vocab_size=a.vocab_size,
                                make_vocab_size_divisible_by=a.make_vocab_size_divisible_by)
    for flag, value in (("--save-interval", a.save_interval), ("--eval-interval", a.eval_interval)):
        if value is not None and value < 1:
            raise ArgumentError(f"{flag} {value}: must be >= 1")
    if a.finetune and (a.no_load_optim or a.no_load_rng):
        raise ArgumentError(f"--finetune with {'--no-load-optim' if a.no_load_optim else '--no-load-rng'}: --finetune "
                            "loads the weights only already; drop one")
    if a.save_retain_interval is not None:
        if not (a.save and a.save_interval):
            raise ArgumentError("--save-retain-interval needs --save and --save-interval")
        if a.save_retain_interval < 1 or a.save_retain_interval % a.save_interval:
            raise ArgumentError(f"--save-retain-interval {a.save_retain_interval}: must be a positive multiple of "
                                f"--save-interval {a.save_interval}")
    if a.ckpt_step is not None and (not a.load or a.ckpt_step < 0):
        raise ArgumentError(f"--ckpt-step {a.ckpt_step}: " + ("must be >= 0" if a.load else
                            "picks an iteration of the --load directory: add --load DIR"))
    if a.log_progress and not a.save:
        raise ArgumentError("--log-progress writes --save's progress.txt: add --save DIR or drop it")
    if a.async_save and not a.save:
        raise ArgumentError("--async-save without --save: there is nothing to write; add --save DIR or drop it")
    if (a.use_persistent_ckpt_worker or a.async_strategy) and not a.async_save:
        flag = "--use-persistent-ckpt-worker" if a.use_persistent_ckpt_worker else "--async-strategy"
        logger.warning("%s without --async-save: ignored (it sets up the background writer), as in Megatron-LM", flag)
    elif a.async_strategy == "nvrx":
        raise ArgumentError("--async-strategy nvrx: checkpoints are written in the background by megatron-core's own "
                            "writer here; pass --async-strategy mcore or drop the flag")
    checkpoint = CheckpointConfig(save=a.save, load=a.load, save_interval=a.save_interval, finetune=a.finetune,
                                  save_optim=not a.no_save_optim, load_optim=not a.no_load_optim,
                                  load_rng=not a.no_load_rng, save_rng=not a.no_save_rng,
                                  fully_parallel_save=a.ckpt_fully_parallel_save,
                                  fully_parallel_load=a.ckpt_fully_parallel_load,
                                  assume_constant_structure=a.ckpt_assume_constant_structure,
                                  async_save=a.async_save,
                                  persistent_worker=a.async_save and a.use_persistent_ckpt_worker,
                                  save_retain_interval=a.save_retain_interval, ckpt_step=a.ckpt_step,
                                  dist_ckpt_strictness=a.dist_ckpt_strictness, log_progress=a.log_progress,
                                  pretrained_checkpoint=a.pretrained_checkpoint,
                                  started_from_pretrained=from_pretrained)
    if a.exit_interval is not None and a.exit_interval < 1:
        raise ArgumentError(f"--exit-interval {a.exit_interval}: must be >= 1")
    if a.exit_duration_in_mins is not None and not a.exit_duration_in_mins > 0:
        raise ArgumentError(f"--exit-duration-in-mins {a.exit_duration_in_mins}: must be > 0")
    if a.use_pytorch_profiler and not a.profile:
        raise ArgumentError("--use-pytorch-profiler chooses the profiler of --profile: add --profile")
    profile = ProfileConfig(enabled=a.profile, step_start=a.profile_step_start, step_end=a.profile_step_end,
                            ranks=tuple(a.profile_ranks), use_pytorch_profiler=a.use_pytorch_profiler,
                            trace_dir=a.tensorboard_dir)
    exit_config = ExitConfig(interval=a.exit_interval, duration_in_mins=a.exit_duration_in_mins,
                             signal_handler=a.exit_signal_handler)
    return RunConfig(
        arch=arch, consa=consa, parallel=parallel, training=training, data=data, tokenizer=tokenizer,
        checkpoint=checkpoint, phase=a.consa_phase, allocation_source=a.consa_allocation,
        calibration_scores=a.consa_calibration_scores,
        eval_interval=a.eval_interval, eval_iters=a.eval_iters, hf_config=a.hf_config,
        transformer_impl=a.transformer_impl, exit=exit_config, profile=profile, consa_flags=tuple(given),
    )


def parse_run_config(argv=None) -> RunConfig:
    args = build_parser().parse_args(argv)
    return run_config_from_args(args)


__all__ = [
    "ArgumentError", "CheckpointConfig", "RunConfig", "TokenizerConfig", "build_parser", "parse_run_config",
    "run_config_from_args", "ConsaConfigError",
]
