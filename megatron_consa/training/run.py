"""One training run from typed configs: checks, data, trainer, checkpoints, evaluation, logs.

`prepare_run` makes every check that needs no process group (tokenizer vs
model vocabulary, data files, allocation file vs model, `--load` and `--save`
directories, parallel layout vs world size, warm-up vs run length) so bad input
fails before any training work with a message naming the flag. `run_training`
then does the work on every rank: megatron-core's datasets, the `ConsaTrainer`,
resume from `--load`, validation loss every `--eval-interval`, a checkpoint every
`--save-interval` and at the end (with the allocation heatmap in TensorBoard).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from megatron_consa.allocation import Allocation, allocation_from_spec
from megatron_consa.architecture import ArchitectureConfig
from megatron_consa.config import ConsaConfigError
from megatron_consa.data.gpt import check_data_paths
from megatron_consa.data.tokenizer import build_tokenizer
from megatron_consa.evaluation.flags import warn_past_positions
from megatron_consa.training.arguments import ArgumentError, LocalPathError, RunConfig, architecture_mismatch
from megatron_consa.training.config import ParallelConfig
from megatron_consa.unit_scores import UnitScores

logger = logging.getLogger(__name__)


@dataclass
class PreparedRun:
    run: RunConfig
    tokenizer: object
    load_dir: Optional[Path]
    load_meta: dict
    resume: bool
    """True: full resume (optimizer, controller, iteration); False: weights only (or no --load)."""
    allocation: Optional[Allocation]


def _resolve_allocation(run: RunConfig, load_dir: Optional[Path], load_meta: dict) -> Optional[Allocation]:
    """The fixed phase's allocation: a file, a preset, or the loaded checkpoint's own."""
    if run.phase != "fixed":
        return None
    arch, consa = run.arch, run.consa
    src = run.allocation_source
    scores = None
    if run.calibration_scores:
        if src != "heuristic":
            raise ArgumentError("--consa-calibration-scores is for --consa-allocation heuristic")
        try:
            scores = UnitScores.load(run.calibration_scores)
        except ValueError as err:
            raise ArgumentError(f"--consa-calibration-scores {run.calibration_scores}: {err}") from err
    if src:
        try:
            return allocation_from_spec(src, num_layers=arch.num_layers, num_kv_heads=arch.num_kv_heads,
                                        granularity=consa.granularity, target_sparsity=consa.target_sparsity,
                                        window=consa.window, sink_tokens=consa.sink_tokens, calibration_scores=scores)
        except ValueError as err:
            hint = " (--consa-calibration-scores FILE)" if src == "heuristic" and scores is None else ""
            raise ArgumentError(f"--consa-allocation {src}: {err}{hint}") from err
    from megatron_consa.conversion.checkpoint_model import checkpoint_allocation

    saved = checkpoint_allocation(load_dir, load_meta) if load_dir is not None else None
    if saved is None:
        raise ArgumentError(
            "--consa-phase fixed needs an allocation: --consa-allocation FILE|PRESET, or --load a checkpoint "
            "written by tools/finalize_allocation.py (or an earlier fixed phase, or an imported sliding-window model)"
        )
    return saved


def _continue_instead(run: RunConfig, load_dir: Optional[Path], load_meta: dict) -> str:
    """How to continue the run whose checkpoints --save holds, for a run that would start over there."""
    save, ckpt = run.checkpoint.save, run.checkpoint
    same_dir = load_dir is not None and Path(save).resolve() in (load_dir.resolve().parent, load_dir.resolve())
    if ckpt.started_from_pretrained:
        return f"with --pretrained-checkpoint, --load is the directory saved to: --load {save}"
    saved_phase = "learn" if (load_meta.get("consa") or {}).get("allocation") is None else "fixed"
    if same_dir and saved_phase != run.phase:  # (it cannot be continued as this phase)
        return f"they are a {saved_phase} phase's: a {run.phase} phase needs its own --save"
    if same_dir and ckpt.finetune:
        return "drop --finetune (it starts over from those weights)"
    if same_dir:  # (same phase, not --finetune, yet not resumed: saved without its optimizer state)
        return "add --no-load-optim to continue it (its checkpoints hold no optimizer state: --no-save-optim)"
    relaunch = f" --pretrained-checkpoint {ckpt.load}" if load_dir is not None else ""
    return (f"to continue that run, --load {save}; for one command line that starts a phase and resumes it when "
            f"relaunched, --load {save} --save {save}{relaunch or ' --pretrained-checkpoint <the start>'}")


def _check_flags_fit_allocation(run: RunConfig, allocation: Allocation) -> None:
    """A fixed phase runs its allocation's (a file's, a checkpoint's) window, sinks and granularity: a --consa-*
    flag given that says otherwise is refused (it would be ignored), as is a --consa-target-sparsity that is
    neither the allocation's sparsity nor the target it was made for."""
    source = f"--consa-allocation {run.allocation_source}" if run.allocation_source else run.checkpoint.load_flag()
    for name in run.consa_flags:
        asked = getattr(run.consa, name)
        if name == "target_sparsity":
            fits = [allocation.achieved_sparsity] + ([allocation.target_sparsity]
                                                     if allocation.target_sparsity is not None else [])
            if any(abs(asked - v) < 1e-9 for v in fits):
                continue
            has = f"sparsity is {allocation.achieved_sparsity:g}" + (
                f" (made for a target of {allocation.target_sparsity:g})" if allocation.target_sparsity is not None
                else "")
        else:
            value = getattr(allocation, name)
            if asked == value:
                continue
            has = {"window": f"window is {value}", "sink_tokens": f"number of sink tokens is {value}",
                   "granularity": f"granularity is {value}"}[name]
        raise ArgumentError(
            f"--consa-{name.replace('_', '-')} {asked}: the fixed phase runs the allocation of {source}, whose {has}; "
            "drop the flag (the allocation's is used), or give --consa-allocation another allocation"
        )


def _check_save_dir(save: str) -> None:
    """--save is a directory this process can write, or can be made in one (not made here: a run refused
    later leaves nothing behind; the first save makes it)."""
    from megatron_consa.files import unwritable_reason
    from megatron_consa.training.checkpoint import CONSA_META_FILE, checkpoint_marker

    if Path(save).exists() and not Path(save).is_dir():
        raise ArgumentError(f"--save {save}: exists and is not a directory")
    marker = checkpoint_marker(save)
    if marker:  # its iter_* would shadow what it holds: a later --load of it would read them
        what = "a checkpoint" if marker == CONSA_META_FILE else "finalize's output"
        raise ArgumentError(f"--save {save}: {what} (it holds {marker}), not a --save directory: save into a "
                            "directory of its own")
    problem = unwritable_reason(save)
    if problem:
        raise LocalPathError(f"--save {save}: {problem}; choose a directory you can write")


def _check_output_dirs(run: RunConfig) -> None:
    """The other directories a run writes (TensorBoard's, the profiler's traces go there too; W&B's): writable,
    checked before any work, not made (their writers make them)."""
    from megatron_consa.files import unwritable_reason

    for flag, directory in (("--tensorboard-dir", run.training.tensorboard_dir),
                            ("--wandb-save-dir", run.training.wandb_save_dir)):
        problem = directory and unwritable_reason(directory)
        if problem:
            raise LocalPathError(f"{flag} {directory}: {problem}; choose a directory you can write")


def _check_describable(arch: ArchitectureConfig) -> None:
    """Every checkpoint gets a Hugging Face config.json of the model (built from the shape flags
    without --hf-config): a shape transformers refuses (a hidden size that is not a multiple of
    the head count, for Llama and Qwen2) is refused now, not at the first save after the work."""
    from huggingface_hub.errors import StrictDataclassError

    from megatron_consa.conversion.hf_files import hf_config_from_arch

    try:
        hf_config_from_arch(arch)
    except (StrictDataclassError, ValueError) as err:
        cause = err.__cause__ if isinstance(err, StrictDataclassError) and err.__cause__ is not None else err
        problem = " ".join(str(cause).split()).rstrip(".")
        fix = ("choose a hidden size that is a multiple of the head count" if "multiple" in problem else
               f"choose an even head dimension (--kv-channels, else --hidden-size / --num-attention-heads: "
               f"{arch.head_dim} now)" if "even" in problem else "change the shape flags to a model it can describe")
        raise ArgumentError(
            f"--hidden-size {arch.hidden_size}, --num-attention-heads {arch.num_attention_heads}: the checkpoints' "
            f"config.json ({arch.model_type}) cannot describe this model ({problem}); {fix}"
        ) from err


def prepare_run(run: RunConfig, *, world_size: int) -> PreparedRun:
    """Every check that needs no process group; returns the run with its configs completed."""
    from megatron_consa.training.checkpoint import read_checkpoint_meta, resolve_load_dir, saved_iterations
    from megatron_consa.training.loop import check_learning_run, check_transformer_impl
    from megatron_consa.training.parallel import check_deterministic_env

    try:
        check_transformer_impl(run.transformer_impl)
        run.profile.validate()
        if run.training.deterministic_mode:
            check_deterministic_env()
    except (ConsaConfigError, ValueError) as err:
        raise ArgumentError(str(err)) from err
    tok = run.tokenizer
    vocab_hint = tok.vocab_size or (run.arch.vocab_size or None)
    try:
        tokenizer = build_tokenizer(tok.tokenizer_type, tok.tokenizer_model, vocab_size=vocab_hint)
    except ValueError as err:
        raise ArgumentError(str(err)) from err
    arch = run.arch
    tp = run.parallel.tensor_model_parallel_size
    if not arch.vocab_size:
        multiple = tok.make_vocab_size_divisible_by * tp
        arch = dataclasses.replace(arch, vocab_size=math.ceil(tokenizer.vocab_size / multiple) * multiple)
    elif tokenizer.vocab_size > arch.vocab_size:
        raise ArgumentError(
            f"--tokenizer-model: the tokenizer has {tokenizer.vocab_size} tokens but the model's vocabulary is "
            f"{arch.vocab_size} (--vocab-size / --hf-config): use the model's own tokenizer or a larger vocabulary"
        )
    if arch.vocab_size % tp:  # megatron-core's vocab-parallel embedding splits the rows evenly (it asserts)
        source = f"--hf-config {run.hf_config}" if run.hf_config else f"--vocab-size {arch.vocab_size}"
        raise ArgumentError(
            f"{source}: a vocabulary of {arch.vocab_size} does not split over --tensor-model-parallel-size {tp} "
            f"(the embedding and output layer split their rows evenly): give a multiple of {tp} (e.g. "
            f"{math.ceil(arch.vocab_size / (128 * tp)) * 128 * tp}), or leave --vocab-size out to pad the tokenizer's "
            "to a multiple of --make-vocab-size-divisible-by x TP"
        )
    if not run.hf_config:
        _check_describable(arch)
    else:  # what every checkpoint will carry beside it: a damaged one is refused now, not at the first save
        from megatron_consa.conversion.hf_files import generation_eos_ids, hf_config_file

        try:
            generation_eos_ids(hf_config_file(run.hf_config).parent)
        except ValueError as err:
            raise ArgumentError(f"--hf-config {run.hf_config}: {err}") from err
    if dist_rank() == 0:
        warn_past_positions(run.training.seq_length, arch.max_position_embeddings,
                            f"--seq-length {run.training.seq_length}", logger)
    if not run.data.mock:
        try:
            check_data_paths(run.data)
        except ValueError as err:
            raise ArgumentError(str(err)) from err
    parallel, training = run.parallel, run.training
    dp = parallel.validate(num_layers=arch.num_layers, num_kv_heads=arch.num_kv_heads, world_size=world_size)
    if not training.global_batch_size:
        training = dataclasses.replace(training, global_batch_size=training.micro_batch_size * dp)
    micro_batches = training.validate(dp_size=dp)
    pp = run.parallel.pipeline_model_parallel_size
    if run.parallel.virtual_pipeline_model_parallel_size and micro_batches % pp:
        raise ArgumentError(
            f"--global-batch-size {training.global_batch_size}: the interleaved pipeline "
            f"(--num-layers-per-virtual-pipeline-stage) runs micro-batches in groups of --pipeline-model-parallel-size "
            f"{pp}, and global / (micro-batch x DP) = {micro_batches} is not a multiple of it; use a global batch of "
            f"{training.micro_batch_size * dp * pp * max(1, -(-micro_batches // pp))}"
        )

    load_dir, load_meta, resume = None, {}, False
    if run.checkpoint.load:
        try:
            load_dir = resolve_load_dir(run.checkpoint.load, step=run.checkpoint.ckpt_step)
        except FileNotFoundError as err:
            raise ArgumentError(str(err)) from err
        step, save = run.checkpoint.ckpt_step, run.checkpoint.save
        if step is not None and save and Path(save).resolve() == Path(run.checkpoint.load).resolve():
            later = [k for k in saved_iterations(save) if k > step]
            if later and dist_rank() == 0:
                logger.warning("--ckpt-step %d with --save the --load directory: its checkpoints at %s are the earlier "
                               "run's; each stays until this run saves that iteration over it (retention does not "
                               "remove them)", step,
                               ", ".join(map(str, later)))
        load_meta = read_checkpoint_meta(load_dir) or {}
        if load_meta.get("architecture"):
            try:
                saved_arch = ArchitectureConfig.from_record(load_meta["architecture"], run.checkpoint.load_flag())
            except ConsaConfigError as err:
                raise ArgumentError(str(err)) from None
            if not run.arch.vocab_size and arch.vocab_size != saved_arch.vocab_size:
                # the vocabulary was padded here from the tokenizer (to 128 x TP rows): the checkpoint's padding
                # serves as well where it holds the tokenizer and splits over this TP size
                if saved_arch.vocab_size >= tokenizer.vocab_size and saved_arch.vocab_size % tp == 0:
                    arch = dataclasses.replace(arch, vocab_size=saved_arch.vocab_size)
            mismatch = architecture_mismatch(saved_arch, arch)
            if mismatch:
                raise ArgumentError(
                    f"{run.checkpoint.load_flag()}: {mismatch}: describe the model the "
                    "checkpoint holds (--use-checkpoint-args, or --hf-config of the checkpoint, takes it from there)"
                )
        saved_learning = (load_meta.get("consa") or {}).get("allocation") is None
        same_phase = saved_learning == (run.phase == "learn")
        # --no-load-optim continues a weights-only checkpoint of a training run too (not an import's or
        # finalize's: their iteration is not this run's position)
        of_a_run = bool(load_meta.get("iteration")) and not {"conversion", "finalized_from"} & set(load_meta)
        continuable = bool(load_meta.get("resumable")) or (not run.checkpoint.load_optim and of_a_run)
        resume = continuable and not run.checkpoint.finetune and same_phase
        if continuable and not run.checkpoint.finetune and not same_phase:
            raise ArgumentError(
                f"{run.checkpoint.load_flag()}: a {'learn' if saved_learning else 'fixed'}-phase checkpoint cannot be "
                f"resumed as a {run.phase} phase; " + (
                    f"the new phase needs its own --load and --save (--pretrained-checkpoint "
                    f"{run.checkpoint.pretrained_checkpoint} is read while --load holds no checkpoint)"
                    if run.checkpoint.pretrained_checkpoint else
                    "add --finetune to start the new phase from its weights (or finalize it first: "
                    "tools/finalize_allocation.py)")
            )
    save = run.checkpoint.save
    held = saved_iterations(save) if save and not resume and Path(save).is_dir() else []
    resumed_elsewhere = resume and save and Path(save).is_dir() and \
        Path(save).resolve() not in (load_dir.resolve().parent, load_dir.resolve())
    other_run = saved_iterations(save) if resumed_elsewhere else []
    if other_run:  # (a --save mistyped for another run's directory: its checkpoints and marker would be replaced)
        raise ArgumentError(
            f"--save {save} holds the checkpoints of another run (iterations {', '.join(map(str, other_run))}); this "
            f"run resumes {load_dir} and would save over them: --save {load_dir.parent} to continue where it was "
            "saved, or an empty --save to copy the run on"
        )
    if held:  # (a relaunched --finetune command line, say: it would restart and save over the run it began)
        raise ArgumentError(
            f"--save {save} holds the checkpoints of an earlier run (iterations {', '.join(map(str, held))}); this run "
            f"starts over from {f'{run.checkpoint.load_flag()} (its weights)' if load_dir else 'random weights'} and "
            f"would save over them: {_continue_instead(run, load_dir, load_meta)}; to start again: an empty --save"
        )
    if resume:
        if run.checkpoint.load_rng and load_meta.get("rng") is False and load_meta.get("resumable"):
            raise ArgumentError(f"{run.checkpoint.load_flag()}: saved without its RNG states (--no-save-rng): resume "
                                "with --no-load-rng (the ranks keep this run's seeds)")
        if run.checkpoint.load_optim:
            if training.use_checkpoint_opt_param_scheduler:
                training, consa = _checkpoint_schedule(run, training, load_meta)
                run = dataclasses.replace(run, consa=consa, training=training)
            _check_same_optimizer(run, training, load_meta)
        _check_same_data(run, training, load_meta)
        if run.phase == "learn":
            _check_same_learning_setup(run, load_meta)
    if training.use_checkpoint_opt_param_scheduler and not (resume and run.checkpoint.load_optim):
        logger.warning("--use-checkpoint-opt_param-scheduler has no effect here: this run %s, so it follows its own "
                       "schedule flags", "does not load the optimizer state (--no-load-optim)" if resume else
                       "starts a new schedule (no checkpoint of this run to resume)")
    allocation = _resolve_allocation(run, load_dir, load_meta)
    if resume and run.phase == "fixed":
        _check_same_allocation(run, load_dir, load_meta, allocation)
    if allocation is not None and not (run.allocation_source and not Path(run.allocation_source).is_file()):
        _check_flags_fit_allocation(run, allocation)  # (a preset is built from the flags: interleave:K has its own)
    consa = run.consa
    if allocation is not None:
        consa = dataclasses.replace(consa, allocation=allocation.fa, granularity=allocation.granularity,
                                    window=allocation.window, sink_tokens=allocation.sink_tokens)
        consa.validate()
    if resume and run.phase == "fixed" and run.checkpoint.load_optim and run.parallel.use_distributed_optimizer:
        # its distributed-optimizer state holds the KV groups in the saved model's order: build the model so (a
        # checkpoint from before the reordering, which has no permute_kv_groups, stored them unreordered)
        saved_permute = bool((load_meta.get("consa") or {}).get("permute_kv_groups", False))
        if saved_permute != consa.permute_kv_groups:
            logger.info("KV groups %s, as in the checkpoint (its distributed-optimizer state is laid out so)",
                        "reordered by type" if saved_permute else "in megatron's order")
            consa = dataclasses.replace(consa, permute_kv_groups=saved_permute)
    run = dataclasses.replace(run, arch=arch, consa=consa, training=training)
    try:
        check_learning_run(consa, arch=arch, training=training, tp_size=tp)
    except ConsaConfigError as err:
        raise ArgumentError(str(err)) from err
    if consa.learning and training.seq_length <= consa.window + consa.sink_tokens and dist_rank() == 0:
        logger.warning(  # (a smoke test's short sequences, say: warned, not refused)
            "--consa-window %d (and %d --consa-sink-tokens) covers the whole --seq-length %d: no position lies beyond "
            "the window, so a windowed unit computes what full attention does and the loss cannot tell the gates "
            "which to keep (the allocation learned is arbitrary); choose a window shorter than the sequences (a "
            "quarter of them, say), or longer sequences", consa.window, consa.sink_tokens, training.seq_length)
    if run.checkpoint.save:
        _check_save_dir(run.checkpoint.save)
    _check_output_dirs(run)
    return PreparedRun(run=run, tokenizer=tokenizer, load_dir=load_dir, load_meta=load_meta, resume=resume,
                       allocation=allocation)


# What a resumed learn phase must keep: its gates, multipliers and noise stream were built on these, and the
# multipliers move by these.
_LEARNING_SETUP = {
    "target_sparsity": "--consa-target-sparsity", "noise_seed": "--consa-noise-seed",
    "granularity": "--consa-granularity", "window": "--consa-window", "sink_tokens": "--consa-sink-tokens",
    "target_warmup_iters": "--consa-target-warmup-iters", "lagrangian_lr": "--consa-lagrangian-lr",
    "lagrangian_rho": "--consa-lagrangian-rho",
}


def _check_same_learning_setup(run: RunConfig, load_meta: dict) -> None:
    """Refuse to resume a learn phase under a changed target, noise seed, gate granularity,
    window, target ramp or multiplier step (rho, eta): the saved multipliers were integrated against
    the old target at the old rates, and the run would no longer be the one the checkpoint continues
    (nor an exact resume)."""
    saved = load_meta.get("consa") or {}
    for name, flag in _LEARNING_SETUP.items():
        if name in saved and saved[name] != getattr(run.consa, name):
            raise ArgumentError(
                f"{run.checkpoint.load_flag()}: the learn phase was run with {flag} {saved[name]}, this run asks "
                f"for {getattr(run.consa, name)}: resume with {flag} {saved[name]}, or start a new learn phase "
                "from its weights with --finetune"
            )


# Resumed optimizer state: its parameter groups are keyed by these (a change cannot be loaded) ...
_OPTIMIZER_GROUPS = {"lr": "--lr", "min_lr": "--min-lr", "weight_decay": "--weight-decay",
                     "decoupled_lr": "--decoupled-lr", "decoupled_min_lr": "--decoupled-min-lr"}
# ... and the learning-rate schedule follows these (the checkpoint's, unless overridden).
_SCHEDULE = {"train_iters": "--train-iters", "lr_warmup_iters": "--lr-warmup-iters", "lr_warmup_init": "--lr-warmup-init",
             "lr_decay_style": "--lr-decay-style",
             "lr_decay_iters": "--lr-decay-iters", "lr_wsd_decay_iters": "--lr-wsd-decay-iters",
             "lr_wsd_decay_style": "--lr-wsd-decay-style", "weight_decay_incr_style": "--weight-decay-incr-style",
             "start_weight_decay": "--start-weight-decay", "end_weight_decay": "--end-weight-decay"}


def _checkpoint_schedule(run: RunConfig, training, load_meta: dict):
    """--use-checkpoint-opt_param-scheduler: the run's learning rates and schedule become the checkpoint's
    (its peak and final rates, decoupled and gate rates, weight decay, warm-up, decay and WSD anneal),
    whatever this run's flags say; --train-iters stays this run's (the decay still ends where the saved
    run's did: its lr_decay_iters, or its train_iters). Returns (training, consa)."""
    saved = load_meta.get("training") or {}
    if "lr" not in saved:
        raise ArgumentError(f"--use-checkpoint-opt_param-scheduler: {run.checkpoint.load_flag()} records no "
                            "schedule (consa_run.json has no training settings); drop the flag")
    names = [n for n in (*_OPTIMIZER_GROUPS, *_SCHEDULE) if n != "train_iters" and n in saved]
    adopted = {n: saved[n] for n in names}
    if adopted.get("lr_decay_iters") is None:
        adopted["lr_decay_iters"] = saved.get("train_iters")
    changed = {n: (getattr(training, n), v) for n, v in adopted.items() if getattr(training, n) != v}
    consa = run.consa
    gate_lr = (load_meta.get("consa") or {}).get("gate_lr")
    if run.phase == "learn" and gate_lr is not None and gate_lr != consa.gate_lr:
        changed["gate_lr"] = (consa.gate_lr, gate_lr)
        consa = dataclasses.replace(consa, gate_lr=gate_lr)
    if changed and dist_rank() == 0:
        logger.info("--use-checkpoint-opt_param-scheduler: the checkpoint's schedule, not this run's flags: %s",
                    ", ".join(f"{n} {now} (not {was})" for n, (was, now) in changed.items()))
    return dataclasses.replace(training, **adopted), consa


_NEW_OPTIMIZER = ("--no-load-optim (a new optimizer from the saved iteration on), or start from its weights with "
                  "--finetune (a new optimizer, schedule and data position)")


def _check_same_optimizer(run: RunConfig, training, load_meta: dict) -> None:
    """A resume continues the saved optimizer and schedule: refuse flags that change them
    (megatron-core would keep the checkpoint's schedule silently, or fail to match the
    optimizer's parameter groups), naming the flag and the fix."""
    saved = dict(load_meta.get("training") or {})
    if "lr" in saved:  # saved before --decoupled-lr and --weight-decay-incr-style existed: none, a constant decay
        saved.setdefault("decoupled_lr", None)
        saved.setdefault("decoupled_min_lr", None)
        saved.setdefault("weight_decay_incr_style", "constant")
        saved.setdefault("start_weight_decay", None)
        saved.setdefault("end_weight_decay", None)
    styles = (training.weight_decay_incr_style, saved.get("weight_decay_incr_style", "constant"))
    unused = {"weight_decay"} if "constant" not in styles else set()  # (a rising decay does not read it)
    changed = [(flag, saved[name], getattr(training, name)) for name, flag in _OPTIMIZER_GROUPS.items()
               if name in saved and name not in unused and saved[name] != getattr(training, name)]
    gate_lr = (load_meta.get("consa") or {}).get("gate_lr")
    if run.phase == "learn" and gate_lr is not None and gate_lr != run.consa.gate_lr:  # (a fixed phase has no gates)
        changed.append(("--consa-gate-lr", gate_lr, run.consa.gate_lr))
    gates_only = (load_meta.get("consa") or {}).get("gates_only")
    if run.phase == "learn" and gates_only is not None and gates_only != run.consa.gates_only:
        changed.append(("--consa-gates-only", gates_only, run.consa.gates_only))  # (another set of parameter groups)
    if changed:
        flag, was, now = changed[0]
        saved_with = (f"with {flag}" if was is True else f"without {flag}" if was is None or was is False
                      else f"with {flag} {was}")
        asked = f"{flag}" if now is True else f"no {flag}" if now is None or now is False else f"{flag} {now}"
        raise ArgumentError(
            f"{run.checkpoint.load_flag()}: the run was saved {saved_with}, this run asks for {asked}: a resume "
            f"continues the saved optimizer; resume {saved_with}, continue with {asked} and {_NEW_OPTIMIZER}"
        )
    _check_same_precision(run, training, saved)
    _check_same_optimizer_layout(run, load_meta)
    if training.override_opt_param_scheduler or training.use_checkpoint_opt_param_scheduler:
        return  # (this run's schedule; or the checkpoint's, taken by _checkpoint_schedule, and any --train-iters)
    for name, flag in _SCHEDULE.items():
        if name in saved and saved[name] != getattr(training, name):
            was = f"with {flag} {saved[name]}" if saved[name] is not None else f"without {flag}"
            now = getattr(training, name) if getattr(training, name) is not None else f"no {flag}"
            raise ArgumentError(
                f"{run.checkpoint.load_flag()}: the run was saved {was}, this run asks for {now}: resume {was}, or "
                "add --override-opt-param-scheduler to follow the new schedule from the saved iteration on"
            )


def _check_same_data(run: RunConfig, training, load_meta: dict) -> None:
    """A resume reads on from sample iteration x global batch: refuse another global batch
    (it would skip or repeat samples); say so when the data, split, seed or sequence length
    changed (a deliberate switch, but the samples after the resume come from a new order)."""
    saved = load_meta.get("training") or {}
    was = saved.get("global_batch_size")
    if was is not None and was != training.global_batch_size:
        raise ArgumentError(
            f"{run.checkpoint.load_flag()}: the run was saved with --global-batch-size {was}, this run asks for "
            f"{training.global_batch_size}: a resume reads on from sample iteration x global batch, so another batch "
            f"would skip or repeat samples; resume with --global-batch-size {was}, or start from its weights with "
            "--finetune"
        )
    data = load_meta.get("data") or {}
    changed = [flag for flag, before, now in (
        ("--data-path", data.get("data_path"), list(run.data.data_path)),
        ("--split", data.get("split"), None if run.data.per_split else run.data.split),
        *((flag, data.get(flag[2:].replace("-", "_"), [] if data else None), list(paths))
          for flag, paths in run.data.split_paths()),
        ("--seed", data.get("seed"), run.data.seed), ("--mock-data", data.get("mock"), run.data.mock),
        ("--seq-length", saved.get("seq_length"), training.seq_length),
    ) if before is not None and before != now]
    if changed and dist_rank() == 0:
        logger.warning("resuming with another %s than the run was saved with: the samples from here on come from a "
                       "new order of the data, not from where the saved run stopped", ", ".join(changed))


def _precision_flag(training: dict) -> str:
    return "--bf16" if training.get("bf16") else "--fp16" if training.get("fp16") else "fp32 (neither --bf16 nor --fp16)"


def _check_same_precision(run: RunConfig, training, saved: dict) -> None:
    """fp32 training keeps plain Adam state; bf16/fp16 keep float32 main copies of the weights
    too (and fp16 a loss scale): one cannot be loaded as the other (dist_checkpointing fails
    on a missing `optimizer.state.fp32_param`)."""
    if "bf16" not in saved:
        return
    was, now = _precision_flag(saved), _precision_flag(dataclasses.asdict(training))
    if was != now:
        raise ArgumentError(
            f"{run.checkpoint.load_flag()}: the run was saved in {was}, this run asks for {now}: the optimizer state "
            f"of one precision cannot be loaded into the other; resume in {was}, or continue in {now} with "
            f"{_NEW_OPTIMIZER}"
        )


def _check_same_optimizer_layout(run: RunConfig, load_meta: dict) -> None:
    """The distributed optimizer's saved state (`dp_reshardable`) reshards over data-parallel
    ranks only, and neither optimizer loads the other's state: refuse, naming the flag,
    what would fail deep in dist_checkpointing with a shape mismatch."""
    saved = dict(load_meta.get("parallel") or {})
    if "use_distributed_optimizer" not in saved:
        return
    was, now = saved["use_distributed_optimizer"], run.parallel.use_distributed_optimizer
    if was != now:
        raise ArgumentError(
            f"{run.checkpoint.load_flag()}: the run was saved {'with' if was else 'without'} "
            f"--use-distributed-optimizer, this run {'uses' if now else 'does not use'} it: the optimizer state of "
            f"one cannot be loaded into the other; resume {'with' if was else 'without'} --use-distributed-optimizer, "
            f"or continue with {_NEW_OPTIMIZER}"
        )
    if not was:
        return  # the standard optimizer's state reshards over TP and PP
    vpp_flag = "--num-layers-per-virtual-pipeline-stage (virtual stages per pipeline stage)"
    for name, flag in (("tensor_model_parallel_size", "--tensor-model-parallel-size"),
                       ("pipeline_model_parallel_size", "--pipeline-model-parallel-size"),
                       ("virtual_pipeline_model_parallel_size", vpp_flag)):
        if name in saved and saved[name] != getattr(run.parallel, name):
            raise ArgumentError(
                f"{run.checkpoint.load_flag()}: the run was saved at {flag} {saved[name]} with the distributed "
                f"optimizer, whose state reshards over data-parallel ranks only; this run asks for "
                f"{getattr(run.parallel, name)}: resume at {saved[name]}, or continue with {_NEW_OPTIMIZER}"
            )
    # ... and the layers of each pipeline stage (saved before uneven stages: even ones)
    was_split = ParallelConfig(
        pipeline_model_parallel_size=run.parallel.pipeline_model_parallel_size,
        decoder_first_pipeline_num_layers=saved.get("decoder_first_pipeline_num_layers"),
        decoder_last_pipeline_num_layers=saved.get("decoder_last_pipeline_num_layers"),
    ).stage_layers(run.arch.num_layers)
    now_split = run.parallel.stage_layers(run.arch.num_layers)
    if was_split != now_split:
        was, now = [len(r) for r in was_split], [len(r) for r in now_split]
        raise ArgumentError(
            f"{run.checkpoint.load_flag()}: the run was saved with pipeline stages of {was} layers with the "
            f"distributed optimizer, whose state reshards over data-parallel ranks only; this run's stages have "
            f"{now}: resume with --decoder-first-pipeline-num-layers {was[0]} --decoder-last-pipeline-num-layers "
            f"{was[-1]}, or continue with {_NEW_OPTIMIZER}"
        )
    # its buckets are keyed by (parameter dtype, gradient dtype) too
    was_bf16 = bool((load_meta.get("training") or {}).get("grad_reduce_in_bf16", False))
    if was_bf16 != run.training.grad_reduce_in_bf16:
        raise ArgumentError(
            f"{run.checkpoint.load_flag()}: the run was saved {'with' if was_bf16 else 'without'} "
            f"--grad-reduce-in-bf16 and the distributed optimizer, whose state is kept per gradient dtype; resume "
            f"{'with' if was_bf16 else 'without'} it, or continue with {_NEW_OPTIMIZER}"
        )


def _check_same_allocation(run: RunConfig, load_dir: Path, load_meta: dict, allocation: Optional[Allocation]) -> None:
    """A resumed fixed phase keeps the allocation (and window, sinks) it was trained with."""
    from megatron_consa.conversion.checkpoint_model import checkpoint_allocation

    saved = checkpoint_allocation(load_dir, load_meta)
    if saved is None or allocation is None:
        return
    if (saved.fa, saved.window, saved.sink_tokens) != (allocation.fa, allocation.window, allocation.sink_tokens):
        raise ArgumentError(
            f"{run.checkpoint.load_flag()}: the fixed phase was trained with another allocation (or window, sinks) "
            f"than --consa-allocation {run.allocation_source} gives: resume without --consa-allocation (the "
            "checkpoint's is used), or start a new fixed phase from its weights with --finetune"
        )


def _relaunch_advice(run: RunConfig) -> str:
    """How to go on from a checkpoint an early exit saved: the flags its resume needs (what it was saved without)."""
    save = run.checkpoint.save
    without = [flag for flag, saved in (("--no-load-optim", run.checkpoint.save_optim),
                                        ("--no-load-rng", run.checkpoint.save_rng)) if not saved]
    if not without:
        return f"saved to {save}; launch again with --load {save} to resume"
    parts = " and ".join("its optimizer state" if f == "--no-load-optim" else "its RNG states" for f in without)
    return (f"saved to {save} without {parts} ({', '.join(f.replace('load', 'save') for f in without)}); launch "
            f"again with --load {save} {' '.join(without)} to continue")


def _evaluates_test(run: RunConfig) -> bool:
    """The test split is evaluated once, after training (Megatron-LM's do_test), where the run
    evaluates (--eval-interval) or names a test blend (--test-data-path), and it holds documents."""
    from megatron_consa.data.gpt import has_test_split

    return bool(run.eval_iters) and bool(run.eval_interval or run.data.test_data_path) and has_test_split(run.data)


def _eval_samples(run: RunConfig) -> int:
    if not run.eval_interval:
        return 0
    evals = run.training.train_iters // run.eval_interval + 1
    return evals * run.eval_iters * run.training.global_batch_size


def validation_perplexity(loss: float) -> float:
    """exp(loss), capped at exp(20) as Megatron-LM caps the validation perplexity it logs (a diverged
    run's loss would overflow it)."""
    return math.exp(min(20.0, loss))


def _checkpoint_extras(run: RunConfig, tokenizer) -> Callable[[Path], dict]:
    """What makes a checkpoint self-describing: its tokenizer and a Hugging Face config.json.

    With them, finalize, export (tools/convert_megatron_to_hf.py), generation and a
    later run (`--hf-config <checkpoint>`) need no flag to know the model and its text.
    The config is the run's own `--hf-config` file when given (family extras kept), and the
    generation_config.json beside it goes along (the EOS ids generation stops at).
    """

    from megatron_consa.conversion.hf_files import GENERATION_CONFIG, hf_config_file, hf_config_from_arch, load_hf_config
    from megatron_consa.conversion.windows import allocation_from_hf, hf_window_fields, set_window_fields

    # The run's --hf-config, read now: it may sit in a checkpoint of --load that a later save's
    # --save-retain-interval deletes.
    source_bytes = source_config = generation_bytes = None
    if run.hf_config:
        source = hf_config_file(run.hf_config)  # (a file already when it came through the arguments)
        source_config = load_hf_config(source)
        if (source.parent / GENERATION_CONFIG).is_file():  # (checked by prepare_run)
            generation_bytes = (source.parent / GENERATION_CONFIG).read_bytes()
        if allocation_from_hf(source_config, run.arch) is None:
            source_bytes, source_config = source.read_bytes(), None
        else:  # an imported sliding-window model's: the run's windows are its own (consa_run.json)
            set_window_fields(source_config, hf_window_fields(None, run.arch))

    def write(directory: Path) -> dict:
        tokenizer.save_to(directory)
        if source_bytes is not None:
            (directory / "config.json").write_bytes(source_bytes)
        elif source_config is not None:
            source_config.save_pretrained(str(directory))
        else:  # with the run's tokenizer's special ids, not the family's defaults (Llama's 1 and 2)
            config = hf_config_from_arch(run.arch)
            config.bos_token_id, config.eos_token_id = tokenizer.bos, tokenizer.eos
            config.save_pretrained(str(directory))
        if generation_bytes is not None:
            (directory / GENERATION_CONFIG).write_bytes(generation_bytes)
        # the data the run read: evaluation draws its validation split from the same blend by default
        data = {"data_path": list(run.data.data_path), "split": None if run.data.per_split else run.data.split,
                "seed": run.data.seed, "mock": run.data.mock, "eod_mask_loss": run.data.eod_mask_loss}
        if run.data.per_split:
            data.update({flag[2:].replace("-", "_"): list(paths) for flag, paths in run.data.split_paths()})
        return {"tokenizer": type(tokenizer).__name__, "data": data}

    return write


def run_training(prepared: PreparedRun):
    """Train on every rank (torch.distributed is started here from torchrun's environment)."""
    import torch

    from megatron_consa.data.gpt import build_gpt_sources
    from megatron_consa.training.checkpoint import load_checkpoint, save_run_checkpoint
    from megatron_consa.training.early_exit import EXIT_SIGNAL, EarlyExit
    from megatron_consa.training.loop import ConsaTrainer, TrainingDivergedError
    from megatron_consa.training.manual_gc import ManualGC
    from megatron_consa.training.parallel import apply_deterministic_mode, initialize_distributed
    from megatron_consa.training.profiling import StepProfiler
    from megatron_consa.training.progress import ProgressLog

    start_time = time.monotonic()  # --exit-duration-in-mins counts from here
    job_start = time.time()  # the progress log's job throughput too
    run = prepared.run
    training = run.training
    if training.deterministic_mode:
        apply_deterministic_mode()
    if training.log_straggler:  # its report is logged by megatron-core's utils logger (quieted with the others)
        logging.getLogger("megatron.core.utils").setLevel(logging.INFO)
    initialize_distributed(run.parallel, seed=training.seed)
    save = run.checkpoint.save
    progress = None
    if run.checkpoint.log_progress:
        progress = ProgressLog(save, rank=dist_rank(), world_size=torch.distributed.get_world_size(),
                               start_time=job_start)
    samples = training.train_iters * training.global_batch_size
    test_samples = run.eval_iters * training.global_batch_size if _evaluates_test(run) else 0
    train_src, valid_src, test_src = build_gpt_sources(
        run.data, prepared.tokenizer, seq_length=training.seq_length, train_samples=samples,
        valid_samples=_eval_samples(run), test_samples=test_samples,
    )
    if train_src is None:
        raise ArgumentError(f"--split {run.data.split}: the training split is empty")
    if run.eval_interval and valid_src is None:
        raise ArgumentError(f"--eval-interval needs a validation split; --split {run.data.split} has none")
    trainer = ConsaTrainer(arch=run.arch, consa=run.consa, parallel=run.parallel, training=training, data=train_src,
                           transformer_impl=run.transformer_impl)
    if prepared.load_dir is not None:
        at = load_checkpoint(trainer, prepared.load_dir, weights_only=not prepared.resume,
                             load_optimizer=run.checkpoint.load_optim, load_rng=run.checkpoint.load_rng,
                             fully_parallel=run.checkpoint.fully_parallel_load,
                             strict=run.checkpoint.dist_ckpt_strictness)
        if dist_rank() == 0:
            logger.info("%s %s (iteration %d%s)", "resumed from" if prepared.resume else "started from the weights of",
                        prepared.load_dir, at,
                        "; a new optimizer, this run's schedule" if prepared.resume and not run.checkpoint.load_optim
                        else "")
    if progress is not None:  # its start line records the operations the loaded checkpoint had counted
        progress.flops_at_start = trainer.floating_point_operations_so_far
        progress.starting_job()
    interval = run.checkpoint.save_interval
    writer = run.checkpoint.writer()
    # validation batch j is the same at every layout and on resume: the evaluations before
    # the loaded iteration used the first ones
    eval_batch = (trainer.iteration // run.eval_interval) * run.eval_iters if run.eval_interval else 0

    manual_gc = ManualGC(training.manual_gc, interval=training.manual_gc_interval, around_eval=training.manual_gc_eval)

    def evaluate(k: int, split: str = "valid") -> None:
        nonlocal eval_batch
        manual_gc.before_eval()
        if split == "valid":
            loss = trainer.evaluate(valid_src, iterations=run.eval_iters, first_batch=eval_batch)
            eval_batch += run.eval_iters
        else:  # the test split, once, at the end (its first --eval-iters batches)
            loss = trainer.evaluate(test_src, iterations=run.eval_iters)
        manual_gc.after_eval()
        ppl = validation_perplexity(loss)
        if trainer.metrics is not None:
            trainer.metrics.add_scalar(f"consa/{split}_loss", loss, k)
            if training.log_validation_ppl_to_tensorboard:
                trainer.metrics.add_scalar(f"consa/{split}_ppl", ppl, k)
        if dist_rank() == 0:
            logger.info("%s | iter %d | loss %.4f | ppl %.3f", "validation" if split == "valid" else "test", k, loss,
                        ppl)

    extras = _checkpoint_extras(run, prepared.tokenizer)

    def checkpoint() -> None:
        save_run_checkpoint(trainer, save, extras=extras,
                            with_optimizer=run.checkpoint.save_optim, with_rng=run.checkpoint.save_rng, writer=writer,
                            retain_interval=run.checkpoint.save_retain_interval, progress=progress)
        if progress is not None:
            progress.checkpoint_saved(
                trainer.iteration, flops=trainer.floating_point_operations_so_far,
                tokens=trainer.iteration * training.global_batch_size * training.seq_length,
                asynchronous=writer.async_save)
        if run.consa.learning and (training.tensorboard_dir or training.wandb_project):  # the same on every rank
            log_alpha = trainer.gather_log_alpha()  # a collective: every rank
            if trainer.metrics is not None:
                _heatmap_to_metrics(trainer, log_alpha)

    start = trainer.iteration
    profiler = StepProfiler(run.profile, rank=dist_rank(), world_size=torch.distributed.get_world_size())
    try:
        with EarlyExit(run.exit, start_time=start_time) as early_exit, manual_gc, profiler:
            while trainer.iteration < training.train_iters:
                profiler.before_step(trainer.iteration)
                trainer.train_step()
                k = trainer.iteration
                profiler.after_step(k)
                manual_gc.after_step(k)
                writer.poll()  # --async-save: the checkpoints every rank has written go into place
                if run.eval_interval and k % run.eval_interval == 0:
                    with trainer.untimed():  # (as Megatron-LM, its interval timer stopped)
                        evaluate(k)
                saved = save and interval and k % interval == 0 and k < training.train_iters
                if saved:
                    with trainer.untimed():
                        checkpoint()
                stop = early_exit.reason(k) if k < training.train_iters else None  # (a collective when it needs one)
                if stop:
                    if save and not saved:
                        checkpoint()
                    writer.wait()
                    if dist_rank() == 0:
                        logger.info("stopping after iteration %d of %d (%s): %s", k, training.train_iters, stop,
                                    _relaunch_advice(run) if save else "nothing saved (no --save)")
                    trainer.close()
                    writer.close()
                    torch.distributed.barrier()
                    return trainer
            writer.wait()
            # The final save, still under --exit-signal-handler's handler: a SIGTERM now (Slurm's warning) waits
            # for it instead of killing the process halfway through it.
            unchanged = prepared.resume and not prepared.load_dir.name.endswith(".old")  # (.old: saved back in place)
            # a finished run launched again (a requeue), or --ckpt-step back to a checkpoint at --train-iters: it
            # is in --save already
            in_save = save is not None and prepared.load_dir is not None and \
                prepared.load_dir.resolve().parent == Path(save).resolve()
            if save and trainer.iteration == start and unchanged and in_save:
                if dist_rank() == 0:
                    logger.info("nothing to train: iteration %d reached; %s stays as it is", start, prepared.load_dir)
            elif save:
                checkpoint()
            writer.close()  # (the final save written and in place)
            signalled = run.exit.signal_handler and early_exit.signalled()
    except TrainingDivergedError:
        writer.close()  # the checkpoints before the diverging step (every rank stops at it)
        trainer.close()  # the TensorBoard scalars up to the diverging step
        raise
    except BaseException:
        writer.close(abort=True)  # a save not written everywhere is not marked latest
        with contextlib.suppress(Exception):  # (the error raised is the one to report)
            trainer.close()  # data-loader workers, the TensorBoard and W&B runs
        raise
    if signalled:  # the job is ending: no evaluation to start
        if dist_rank() == 0:
            logger.info("stopping after the final save (--exit-signal-handler: %s received): the evaluation after "
                        "training is skipped", EXIT_SIGNAL.name)
        trainer.close()
        torch.distributed.barrier()
        return trainer
    if trainer.iteration > start:  # as Megatron-LM after training: the validation split, then the test split
        k = trainer.iteration
        if run.eval_interval and k % run.eval_interval:  # (at a multiple, the loop has just evaluated it)
            evaluate(k)
        if test_src is not None:
            evaluate(k, "test")
    if run.consa.learning:
        report, fa = trainer.settle_report(), trainer.fa_per_layer()  # fa_per_layer: a collective
        if dist_rank() == 0:
            logger.info("allocation phase: %s", report.describe())
            logger.info("FA KV heads per layer now: %s (finalize with tools/finalize_allocation.py)", fa)
    trainer.close()
    torch.distributed.barrier()
    return trainer


def _heatmap_to_metrics(trainer, la) -> None:
    from megatron_consa.analysis.heatmap import heatmap_image
    from megatron_consa.gates import HardConcrete, deterministic_z

    z = deterministic_z(la, HardConcrete.from_config(trainer.consa))
    G = trainer.arch.num_kv_heads
    if la.shape[1] == 1:
        la, z = la.expand(-1, G), z.expand(-1, G)
    image = heatmap_image((z > 0).int().tolist(), la.tolist(), title=f"log_alpha at iteration {trainer.iteration}")
    trainer.metrics.add_image("consa/allocation_heatmap", image, trainer.iteration)


def dist_rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))
