"""Distributed checkpoints of a ConSA run with megatron-core's dist_checkpointing.

A checkpoint holds the model (gates included: `log_alpha` is an ordinary
parameter of each layer's core attention, so its sharded key carries the
global layer index), the optimizer, the LR scheduler, the controller state
(iteration, lambda1, lambda2) and the ConSA/architecture configs. With the
standard optimizer it loads at any TP/PP/DP layout; the distributed
optimizer's state (megatron's dp_reshardable format) at another DP size only.

Saving writes to `<dir>.tmp-<iteration>` and renames it into place once every
rank finished; an existing checkpoint is kept as `<dir>.old` during the swap,
and loading falls back to it if a save was interrupted between the renames.

A run (`save_run_checkpoint`) keeps Megatron-LM's layout: `<save>/iter_XXXXXXX/`
per checkpoint and `<save>/latest_checkpointed_iteration.txt`, the marker,
written (atomically) only after every shard of the new checkpoint is in place:
a crash or kill during a save leaves the previous checkpoint loadable and
marked latest. Each checkpoint also holds every rank's RNG states and, for a
learning run, the gathered log_alpha of all layers (so finalize needs no model).

How the shards are written is a `CheckpointWriter`'s: by default each data-parallel
replica writes a share of the replicated tensors (megatron-core's fully parallel save,
Megatron-LM's default), synchronously; with `async_save` a background process writes
them while training goes on, and the renames and the marker above wait until every
rank's writes are done.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.dist_checkpointing.serialization import (
    get_default_load_sharded_strategy, get_default_save_sharded_strategy, load_sharded_metadata,
)
from megatron.core.dist_checkpointing.strategies.fully_parallel import (
    FullyParallelLoadStrategyWrapper, FullyParallelSaveStrategyWrapper,
)
from megatron.core.dist_checkpointing.validation import StrictHandling

from megatron_consa.group_layout import stored_orders
from megatron_consa.model import unwrap_model
from megatron_consa.training.config import DIST_CKPT_STRICTNESS
from megatron_consa.training.finalize import CHECKPOINT_DIR as FINALIZED_CHECKPOINT_DIR
from megatron_consa.training.parallel import device
from megatron_consa.compat import (
    cpu_shims_active, fix_param_steps_after_load, prepare_distrib_optimizer_for_load, torch_adam_fallback,
)

logger = logging.getLogger(__name__)

CONSA_META_FILE = "consa_run.json"
TRACKER_FILE = "latest_checkpointed_iteration.txt"
"""Megatron-LM's marker of the latest complete checkpoint in a `--save` directory."""


def _rng_file(directory: Path, rank: int) -> Path:
    return directory / f"rng_rank{rank:05d}.pt"


def _rng_state() -> dict:
    import numpy as np

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
             "device": _rng_device()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    tracker = get_cuda_rng_tracker()
    if hasattr(tracker, "get_states"):
        state["tracker"] = tracker.get_states()
    return state


def _rng_device() -> str:
    """The kind of generator megatron-core's RNG tracker holds here: "cpu" under the CPU shims (CPU
    generator states), "cuda" on a GPU (Philox states, which a CPU generator cannot take, nor back)."""
    return "cuda" if torch.cuda.is_available() and not cpu_shims_active() else "cpu"


def _set_rng_state(state: dict) -> None:
    import numpy as np

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    saved = state.get("device", "cuda" if "cuda" in state else "cpu")  # (checkpoints from before the field)
    if saved != _rng_device():
        if dist.get_rank() == 0:
            logger.warning("the checkpoint's RNG states were saved on %s, this run is on %s: its host generators "
                           "(python, numpy, torch) are restored, the %s ones keep this run's --seed "
                           "(--no-load-rng restores none)", saved.upper(), _rng_device().upper(),
                           _rng_device().upper())
        return
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    if "tracker" in state:
        from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

        get_cuda_rng_tracker().set_states(state["tracker"])


def _model_sharded_state_dict(chunks) -> dict:
    # From the bare GPTModel: wrappers (DDP) would add a `module.` prefix that
    # their own load_state_dict does not strip.
    if len(chunks) == 1:
        return {"model": unwrap_model(chunks[0]).sharded_state_dict()}
    return {f"model{i}": unwrap_model(c).sharded_state_dict() for i, c in enumerate(chunks)}


def model_state_for_save(chunks, *, controller_state: dict, iteration: int) -> dict:
    """What every checkpoint holds: the model chunks' sharded state, the controller, the iteration.

    A checkpoint with only this (a converted one) loads with `weights_only=True`.
    """
    state = dict(_model_sharded_state_dict(chunks))
    state["consa_controller"] = controller_state
    state["iteration"] = iteration
    return state


def write_checkpoint_meta(directory: str | os.PathLike, meta: dict) -> None:
    """The run metadata file (`consa_run.json`) that marks a complete checkpoint directory."""
    (Path(directory) / CONSA_META_FILE).write_text(json.dumps(meta, indent=2, default=str))


def _sharded_state_dict(trainer, *, is_loading: bool, with_optimizer: bool = True) -> dict:
    state = model_state_for_save(
        trainer.chunks, controller_state=trainer.controller.state_dict(), iteration=trainer.iteration
    )
    if not is_loading and trainer.consa.learning:
        state["consa_log_alpha"] = trainer.gather_log_alpha().tolist()  # a collective: every rank saves
    if not is_loading:
        state["train_records"] = [dataclasses.asdict(r) for r in trainer.history]
        state["num_floating_point_operations_so_far"] = trainer.floating_point_operations_so_far
    if not with_optimizer:
        return state
    # every chunk's entries, by chunk: an interleaved pipeline's chunks hold the same keys (their layers are
    # offsets of one sharded tensor), so merged into one dict the last chunk's would hide the others'
    models = {key: v for key, v in state.items() if key.startswith("model")}
    metadata = None
    if trainer.parallel.use_distributed_optimizer:
        # The format that works with every optimizer backend, CPU fallback included.
        # It reshards over data-parallel ranks only: keep TP/PP when resuming it.
        metadata = {"distrib_optim_sharding_type": "dp_reshardable"}
    state["optimizer"] = trainer.optimizer.sharded_state_dict(models, is_loading=is_loading, metadata=metadata)
    state["opt_param_scheduler"] = trainer.scheduler.state_dict()
    return state


def _replica_group():
    """The group whose ranks hold the same shards (data-parallel with context-parallel), or None
    where megatron-core's parallel state is not set up (one process writes everything then)."""
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        return None
    return parallel_state.get_data_parallel_group(with_context_parallel=True)


class CheckpointWriter:
    """How a run's checkpoints are written (all ranks hold one, with the same settings).

    - `fully_parallel` (Megatron-LM's `--ckpt-fully-parallel-save`, its default): every
      data-parallel replica writes a share of the tensors the replicas hold alike, instead
      of replica 0 writing them all (megatron-core's `FullyParallelSaveStrategyWrapper`).
      The checkpoint is the same; its files are spread over the replicas' ranks.
    - `assume_constant_structure` (`--ckpt-assume-constant-structure`): the save plan and
      the fully parallel distribution are made at the first save and reused, since every
      save of a run holds the same tensors.
    - `async_save` (`--async-save`): a save takes the state at its iteration (on a GPU, a
      copy to host memory; on the CPU, a forked process's copy-on-write view), and a
      background process writes it with megatron-core's writer while training goes on.
      The checkpoint is renamed into place, and marked latest, by `poll()` or `wait()`
      once every rank's writes are done (a collective: every rank calls them at the same
      points). A save before the previous one finished waits for it.
    - `persistent_worker` (`--use-persistent-ckpt-worker`, with `async_save`): one
      long-lived writer process per rank instead of a fork per save (CUDA only:
      megatron-core's worker binds a GPU; elsewhere a warning, and a fork per save). It is
      started here, ignoring SIGTERM, so that the signal `--exit-signal-handler` saves on
      does not kill it.
    """

    def __init__(self, *, fully_parallel: bool = True, assume_constant_structure: bool = False,
                 async_save: bool = False, persistent_worker: bool = False):
        if persistent_worker and not async_save:
            raise ValueError("CheckpointWriter(persistent_worker=True) needs async_save=True")
        if persistent_worker and not torch.cuda.is_available():
            logger.warning("a persistent checkpoint worker needs CUDA (megatron-core's binds a GPU): on the CPU each "
                           "save forks its writer")
            persistent_worker = False
        self.fully_parallel = fully_parallel
        self.assume_constant_structure = assume_constant_structure
        self.async_save = async_save
        self.persistent_worker = persistent_worker
        self._strategy = None
        self._saves = 0
        self._queue = None
        if async_save:
            from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

            self._queue = AsyncCallsQueue(persistent=persistent_worker)
            if persistent_worker:
                self._start_persistent_worker()

    def _start_persistent_worker(self) -> None:
        import atexit
        import signal

        from megatron.core.dist_checkpointing.strategies.async_utils import PersistentAsyncCaller

        # (spawned: a Python handler is not inherited, an ignored signal is)
        previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            type(self._queue).warmup_persistent_caller(dist.get_rank())
        finally:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
        # The queue's caller owns the worker from now on, so that close() ends it even before a first save
        # (megatron-core attaches it at the first save only).
        caller = self._queue._get_async_caller()
        caller.process = worker = PersistentAsyncCaller._persistent_process
        # It ignores SIGTERM, which multiprocessing's exit handler sends daemon processes before joining them:
        # end it first wherever this process exits without close() (an error, a run with nothing to save).
        atexit.register(lambda: worker.kill() if worker.is_alive() else None)

    def _save_strategy(self):
        if self._strategy is not None and self.assume_constant_structure:
            return self._strategy
        strategy = get_default_save_sharded_strategy("torch_dist")
        strategy.use_cached_ckpt_structure = self.assume_constant_structure
        group = _replica_group()
        if self.fully_parallel and group is not None:
            strategy = FullyParallelSaveStrategyWrapper(strategy, group, self.assume_constant_structure)
        self._strategy = strategy
        return strategy

    def write(self, state: dict, directory: Path, finalize: Callable[[], None]) -> None:
        """Write `state` into `directory`, then call `finalize` on every rank (now, or from `poll`/`wait`).

        Call `wait()` first: one save at a time keeps the renames and the marker in iteration order."""
        # the sharding's validation (a collective over every shard's metadata) once per run when the
        # structure is constant, as Megatron-LM does
        validate = not (self.assume_constant_structure and self._saves)
        self._saves += 1
        if not self.async_save:
            dist_checkpointing.save(state, str(directory), self._save_strategy(), validate_access_integrity=validate)
            finalize()
            return
        request = dist_checkpointing.save(state, str(directory), self._save_strategy(),
                                          validate_access_integrity=validate, async_sharded_save=True,
                                          async_strategy="mcore")
        request.add_finalize_fn(finalize)
        self._queue.schedule_async_request(request)

    @property
    def pending(self) -> int:
        """Saves scheduled and not yet finalized (the same on every rank)."""
        return self._queue.get_num_unfinalized_calls() if self._queue is not None else 0

    def poll(self) -> None:
        """Finalize the saves every rank has finished writing; returns at once otherwise (a collective
        while a save is pending)."""
        if self.pending:
            self._queue.maybe_finalize_async_calls(blocking=False)

    def wait(self) -> None:
        """Finalize every pending save, waiting for its writes (a collective while one is pending)."""
        if self.pending:
            self._queue.maybe_finalize_async_calls(blocking=True)

    def close(self, *, abort: bool = False) -> None:
        """Finish (or, `abort`, drop: not marked latest) the pending saves and end the writer processes."""
        if self._queue is None:
            return
        if abort:  # (megatron-core's queue aborts a persistent worker only; end the forked writers too)
            for call in self._queue.async_calls:
                call.async_caller.close(abort=True)
            self._queue.async_calls.clear()
        self._queue.close(abort=abort)


def save_checkpoint(trainer, directory: str | os.PathLike, *, extras: Optional[Callable[[Path], dict]] = None,
                    with_optimizer: bool = True, with_rng: bool = True, writer: Optional[CheckpointWriter] = None,
                    on_complete: Optional[Callable[[], None]] = None) -> Path:
    """Save `trainer` (all ranks call this) into `directory` atomically.

    `extras(dir)` (rank 0, before the directory is complete) writes the files
    that describe the checkpoint beside the shards (its tokenizer, config.json)
    and returns entries for the metadata. `with_optimizer=False`: weights, gates
    and controller only (no optimizer, scheduler or RNG): it starts a new phase,
    it cannot resume. `with_rng=False` (Megatron-LM's `--no-save-rng`): no RNG states; a
    resume then keeps its own (`load_checkpoint(load_rng=False)`).
    `writer`: how the shards are written (default: `CheckpointWriter()`, fully parallel,
    synchronous). `on_complete()` runs on every rank once the checkpoint is in place. With an
    asynchronous writer both happen later, in its `poll()` or `wait()`: `directory` is
    returned before it is complete.
    """
    writer = writer or CheckpointWriter()
    writer.wait()  # (before this save's temporary directory: the previous save may be renaming its own)
    trainer.finish_param_gather()  # --overlap-param-gather: save this step's weights
    final = Path(directory)
    iteration = trainer.iteration
    tmp = final.with_name(f"{final.name}.tmp-{iteration}")
    rank = dist.get_rank()
    if rank == 0:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    dist.barrier()
    state = _sharded_state_dict(trainer, is_loading=False, with_optimizer=with_optimizer)
    rng = _rng_state() if with_optimizer and with_rng else None  # (written beside the shards, after them)
    meta = {
        "iteration": iteration,
        "consa": trainer.consa.to_dict(),
        "architecture": trainer.arch.__dict__,
        "training": trainer.training.to_dict(),
        "parallel": dataclasses.asdict(trainer.parallel),
        # the model's KV-group order per layer: the distributed optimizer's flat state is laid out in it
        "kv_group_orders": _kv_group_orders(trainer.consa.to_dict(), trainer.parallel.tensor_model_parallel_size),
        "world_size": dist.get_world_size(),
        "resumable": with_optimizer,
        "rng": with_optimizer and with_rng,
    }

    def finalize() -> None:  # every rank, once every rank's shards are written
        if rng is not None:
            torch.save(rng, _rng_file(tmp, rank))
        dist.barrier()
        if os.environ.get(FAULT_INJECTION_ENV) == str(iteration):
            import signal

            os.kill(os.getpid(), signal.SIGKILL)
        error = ""
        if rank == 0:
            try:
                if extras is not None:
                    meta.update(extras(tmp))
                write_checkpoint_meta(tmp, meta)
                _swap_into_place(tmp, final)
            except OSError as err:  # tell every rank, instead of leaving them in the barrier
                error = f"could not move the checkpoint into {final}: {err}"
        _raise_everywhere(error)
        logger.info("saved checkpoint at iteration %d to %s", iteration, final)
        if on_complete is not None:
            on_complete()

    writer.write(state, tmp, finalize)
    return final


def _swap_into_place(tmp: Path, final: Path) -> None:
    """Rename `tmp` to `final`; an existing `final` survives as `<final>.old` until then."""
    old = final.with_name(final.name + ".old")
    if final.exists():
        if old.exists():
            shutil.rmtree(old)  # a leftover beside a complete `final` (only whole saves are renamed to it)
        final.rename(old)
    # without `final`, an `.old` is the checkpoint of an interrupted save (perhaps the one this run
    # resumed from): it goes only once the new one is in place
    tmp.rename(final)
    if old.exists():
        shutil.rmtree(old)


def _raise_everywhere(error: str) -> None:
    flag = torch.tensor([1.0 if error else 0.0], device=device())
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if flag.item():
        messages: list = [None] * dist.get_world_size()
        dist.all_gather_object(messages, error)
        raise RuntimeError("; ".join(m for m in messages if m))


def _resolve(directory: str | os.PathLike) -> Path:
    path = Path(directory)
    if (path / CONSA_META_FILE).exists():
        return path
    old = path.with_name(path.name + ".old")
    if (old / CONSA_META_FILE).exists():  # a save was interrupted between the two renames
        logger.warning("%s is missing; loading the previous checkpoint %s", path, old)
        return old
    raise FileNotFoundError(
        f"{path} is not a megatron-consa checkpoint (no {CONSA_META_FILE}); pass the directory "
        "written by save_checkpoint"
    )


def _kv_group_orders(consa: dict, tp_size: int) -> list[list[int]]:
    """Each layer's stored KV-group order of a model with the ConsaConfig `consa` (its dict) at `tp_size`
    (`group_layout.stored_orders`; a record from before the reordering has no `permute_kv_groups`: none)."""
    return stored_orders(consa.get("allocation"), tp_size, bool(consa.get("permute_kv_groups", False)))


def _check_same_kv_group_orders(trainer, meta: dict, path: Path) -> None:
    """The distributed optimizer's state (dp_reshardable: flat buffers per bucket) holds each layer's KV groups in
    the order of the model that saved it, which the model's own canonical save does not undo: a model storing them
    in another order would take other groups' main weights and Adam moments, silently."""
    saved_tp = (meta.get("parallel") or {}).get("tensor_model_parallel_size", trainer.parallel.tensor_model_parallel_size)
    saved = meta.get("kv_group_orders")
    if saved is None:  # (written since the check; before, the order followed from the saved config)
        saved = _kv_group_orders(meta.get("consa") or {}, saved_tp)
    ours = _kv_group_orders(trainer.consa.to_dict(), trainer.parallel.tensor_model_parallel_size)
    identity = [list(range(trainer.arch.num_kv_heads))] * trainer.arch.num_layers  # (no allocation: none moved)
    saved, ours = saved or identity, ours or identity
    if saved != ours:
        layer = next(i for i, (a, b) in enumerate(zip(saved, ours)) if a != b)
        permute = bool((meta.get("consa") or {}).get("permute_kv_groups", False))
        raise ValueError(
            f"checkpoint {path}: its distributed-optimizer state holds the KV groups in another order than this "
            f"model (layer {layer}: {saved[layer]} against {ours[layer]}), and would load into other groups' "
            f"weights: build the model as the checkpoint's was (ConsaConfig.permute_kv_groups={permute}), or load "
            "it without the optimizer state"
        )


def load_checkpoint(trainer, directory: str | os.PathLike, *, weights_only: bool = False, load_optimizer: bool = True,
                    load_rng: bool = True, fully_parallel: bool = False, strict: str = "assume_ok_unexpected") -> int:
    """Load a checkpoint into `trainer`; returns the iteration it was saved at.

    Full resume (default): model, optimizer, LR scheduler, controller, iteration
    and RNG states. `load_optimizer=False` (`--no-load-optim`): all of it but the
    optimizer and scheduler: the trainer's new optimizer, its schedule moved to
    the saved iteration. `load_rng=False`: not the RNG states.
    `weights_only=True`: the model (gates included) and nothing else, for
    starting a new phase from these weights; the trainer keeps its own
    iteration, schedule and controller state. `fully_parallel` (Megatron-LM's
    `--ckpt-fully-parallel-load`): each data-parallel replica reads a share of the
    tensors the replicas hold alike and sends it to the others (megatron-core's
    `FullyParallelLoadStrategyWrapper`), instead of every replica reading all of them.
    `strict` (Megatron-LM's `--dist-ckpt-strictness`, one of `DIST_CKPT_STRICTNESS`): how
    dist_checkpointing treats a mismatch between the tensors this run asks for and those
    the checkpoint holds (`strictness_of`); every model weight must still load.

    The standard optimizer's checkpoints load at any TP/PP/DP layout; the
    distributed optimizer's (dp_reshardable) at another DP size only.
    """
    path = _resolve(directory)
    meta = read_checkpoint_meta(path) or {}
    saved_arch = meta.get("architecture", {})
    for field_name in ("num_layers", "num_kv_heads", "hidden_size", "num_attention_heads"):
        if field_name in saved_arch and saved_arch[field_name] != getattr(trainer.arch, field_name):
            raise ValueError(
                f"checkpoint {path} has {field_name}={saved_arch[field_name]} but the model has "
                f"{getattr(trainer.arch, field_name)}: build the model with the checkpoint's architecture"
            )
    # An import's gates were never trained (every log_alpha at its initial value): a phase that starts from it
    # keeps its own initial gates, at any granularity.
    untrained_import = weights_only and "conversion" in meta and not meta.get("iteration")
    saved_gran = meta.get("consa", {}).get("granularity")
    if saved_gran and saved_gran != trainer.consa.granularity and trainer.consa.learning and not untrained_import:
        raise ValueError(
            f"checkpoint {path} has learned gates at granularity={saved_gran!r} but ConsaConfig.granularity="
            f"{trainer.consa.granularity!r}: learn at the checkpoint's granularity (--consa-granularity "
            f"{saved_gran}), or start from weights without learned gates"
        )
    load_optimizer = load_optimizer and not weights_only and bool(meta.get("resumable", True))
    if load_optimizer and trainer.parallel.use_distributed_optimizer:
        _check_same_kv_group_orders(trainer, meta, path)
    # without apex or TE (every CPU, a GPU install without them) megatron-core runs torch's Adam, whose state is
    # created lazily; megatron expects it filled, and its load shares one step tensor between parameters
    torch_adam = load_optimizer and torch_adam_fallback()
    if torch_adam:
        prepare_distrib_optimizer_for_load(trainer.optimizer)
    state = _sharded_state_dict(trainer, is_loading=True, with_optimizer=load_optimizer)
    checkpoint_has_gates = meta.get("consa", {}).get("allocation", None) is None and bool(meta) and not untrained_import
    if weights_only and not checkpoint_has_gates:
        # A dense or fixed-allocation checkpoint, or an import, starting a learning phase: the gates are not in it
        # (or never trained) and keep their initial value (init_log_alpha).
        for key in [k for k in state if k.startswith("model")]:
            state[key] = {k: v for k, v in state[key].items() if not k.endswith("log_alpha")}
    _drop_extra_states_not_in(state, path)
    strategy = None
    if fully_parallel and _replica_group() is not None:
        strategy = FullyParallelLoadStrategyWrapper(get_default_load_sharded_strategy(str(path)), _replica_group())
    handling = strictness_of(strict)
    # log_*: asked as return_* and reported here (the entry point keeps megatron-core's loggers at ERROR)
    handling = {StrictHandling.LOG_UNEXPECTED: StrictHandling.RETURN_UNEXPECTED,
                StrictHandling.LOG_ALL: StrictHandling.RETURN_ALL}.get(handling, handling)
    loaded = dist_checkpointing.load(state, str(path), strategy, strict=handling)
    if StrictHandling.requires_returning_mismatch_keys(handling):
        loaded, missing, unexpected = loaded
        _report_mismatch(path, missing, unexpected)
    _load_chunks(trainer.chunks, loaded, path, gates_in_checkpoint=checkpoint_has_gates)
    if load_optimizer:
        with torch.no_grad():
            trainer.optimizer.load_state_dict(loaded["optimizer"])
        if torch_adam:
            fix_param_steps_after_load(trainer.optimizer)
        trainer.scheduler.load_state_dict(loaded["opt_param_scheduler"])
        # (megatron-core sets the groups' decay before it takes the saved decay schedule: again, with it)
        trainer.scheduler.step(increment=0)
    # the operations trained so far, a weights-only start included, as Megatron-LM counts them over a --finetune
    # (0 for a checkpoint that kept no count: an import's, finalize's, or one saved before the count existed;
    # dist_checkpointing's result holds the common state too)
    trainer.floating_point_operations_so_far = float(loaded.get("num_floating_point_operations_so_far", 0.0))
    if weights_only:
        return int(loaded["iteration"])
    trainer.controller.load_state_dict(loaded["consa_controller"])
    trainer.iteration = int(loaded["iteration"])
    if not load_optimizer:  # a new optimizer: this run's schedule, at the saved iteration
        trainer.scheduler.step(increment=trainer.iteration)
    from megatron_consa.training.loop import StepRecord

    trainer.history = [StepRecord(**r) for r in loaded.get("train_records") or []]
    rng = _rng_file(path, dist.get_rank())
    if load_rng and rng.exists() and (meta.get("world_size") in (None, dist.get_world_size())):
        _set_rng_state(torch.load(rng, weights_only=False))
    return trainer.iteration


def strictness_of(name: str) -> StrictHandling:
    """The StrictHandling `name` means; a ValueError naming the choices otherwise.

    "Unexpected" keys are tensors the run asks for that the checkpoint lacks; "missing"
    keys the checkpoint's tensors the run does not ask for (megatron-core's words).
    assume_ok_unexpected (the default): the reading fails at a key the checkpoint lacks;
    raise_unexpected / raise_all: such keys (and, raise_all, the checkpoint's unread
    ones) are named before anything is read; log_* and return_* (both reported by this
    module's logger: megatron-core's own is quiet in the tools): the mismatches are logged
    and the rest is read; ignore_all: nothing is reported.
    """
    try:
        return StrictHandling(name)
    except ValueError:
        raise ValueError(f"--dist-ckpt-strictness {name!r}: one of {', '.join(DIST_CKPT_STRICTNESS)}") from None


def _report_mismatch(path: Path, missing, unexpected) -> None:
    def listed(keys) -> str:  # the model's first, then the optimizer's (a weights-only load reads none of those)
        keys = sorted(keys, key=lambda k: (k.startswith("optimizer."), k))
        return ", ".join(keys[:10]) + (f" and {len(keys) - 10} more" if len(keys) > 10 else "")

    if unexpected:
        logger.warning("checkpoint %s lacks %d tensor(s) this run asks for (not loaded): %s", path, len(unexpected),
                       listed(unexpected))
    if missing:
        logger.warning("checkpoint %s holds %d tensor(s) this run does not read: %s", path, len(missing),
                       listed(missing))


def _load_chunks(chunks, loaded: dict, path: Path, *, gates_in_checkpoint: bool = True) -> None:
    for i, chunk in enumerate(chunks):
        key = "model" if len(chunks) == 1 else f"model{i}"
        result = unwrap_model(chunk).load_state_dict(_strip_extra(loaded[key]), strict=False)
        missing = [
            k for k in result.missing_keys
            if not k.endswith("_extra_state") and (gates_in_checkpoint or not k.endswith("log_alpha"))
        ]
        if missing or result.unexpected_keys:
            raise RuntimeError(
                f"checkpoint {path} does not fit model chunk {i}: missing {missing[:5]}, "
                f"unexpected {result.unexpected_keys[:5]}"
            )


def load_model_weights(chunks, directory: str | os.PathLike) -> dict:
    """Load only the model weights of a checkpoint into `chunks` (all ranks call this).

    For inference, evaluation and export: any TP/PP layout, no trainer needed. A
    fixed-mode model skips the checkpoint's gates. Returns the checkpoint's metadata.
    """
    path = _resolve(directory)
    state = {k: v for k, v in model_state_for_save(chunks, controller_state={}, iteration=0).items() if k.startswith("model")}
    _drop_extra_states_not_in(state, path)
    loaded = dist_checkpointing.load(state, str(path))
    _load_chunks(chunks, loaded, path)
    return read_checkpoint_meta(path) or {}


def _drop_extra_states_not_in(state: dict, path: Path) -> None:
    """Leave out of `state` (in place) the modules' `_extra_state` objects the checkpoint lacks.

    Transformer Engine's modules keep one (FP8 metadata; empty without FP8) where
    megatron-core's local modules have none, e.g. the TE layer spec's QK norms
    (TENorm) against the local spec's: a checkpoint written with the local spec
    (an import, finalize, a machine without TE) then has no such entry, and
    dist_checkpointing.load would refuse the TE-spec model. Those modules keep
    their fresh state, as `_load_chunks` allows; their weights still must match.
    """
    # every checkpoint here is written in megatron-core's default torch_dist format
    saved = {key.split("/shard_")[0] for key in load_sharded_metadata(str(path))}
    for name in [k for k in state if k.startswith("model")]:
        state[name] = {
            k: v for k, v in state[name].items()
            if not (k.endswith("_extra_state") and isinstance(v, ShardedObject) and v.key not in saved)
        }


def _strip_extra(sd: dict) -> dict:
    return {k: v for k, v in sd.items() if v is not None}


def read_checkpoint_meta(directory: str | os.PathLike) -> Optional[dict]:
    """The run metadata of a checkpoint (configs, iteration), or None."""
    f = Path(directory) / CONSA_META_FILE
    return json.loads(f.read_text()) if f.exists() else None


# ---------------------------------------------------------------------------- a run's checkpoints


def iteration_dir(save: str | os.PathLike, iteration: int) -> Path:
    return Path(save) / f"iter_{iteration:07d}"


def saved_iterations(save: str | os.PathLike) -> list[int]:
    """The iterations of the complete checkpoints in a `--save` directory (an `.old` one included)."""
    names = (re.fullmatch(r"iter_(\d+)(\.old)?", d.name) for d in Path(save).iterdir())
    return sorted({int(m.group(1)) for m in names if m and (Path(save) / m.group(0) / CONSA_META_FILE).exists()})


FAULT_INJECTION_ENV = "MEGATRON_CONSA_KILL_DURING_SAVE"
"""Tests only: SIGKILL this process after the shards of the checkpoint at this iteration are written,
before they are renamed into place and marked latest (a crash in the middle of a save)."""


def save_run_checkpoint(trainer, save: str | os.PathLike, *, retain_interval: Optional[int] = None,
                        progress=None, **save_kwargs) -> Path:
    """Save into `<save>/iter_XXXXXXX` and only then mark it latest (all ranks call this).

    `save_kwargs`: `extras`, `with_optimizer`, `with_rng` and `writer` of `save_checkpoint`
    (with an asynchronous writer, the marker moves when the writer finalizes the save).
    `retain_interval` (Megatron-LM's `--save-retain-interval`): once the new checkpoint is
    marked latest, the one the marker named before is deleted unless its iteration is a
    multiple of this; the latest checkpoint is always kept. `progress` (a
    `training.progress.ProgressLog`): records the save and the deletion, as in Megatron-LM
    (the caller writes the save's own line, with the throughputs).
    """
    iteration = trainer.iteration
    writer = save_kwargs.get("writer")
    asynchronous = writer is not None and writer.async_save

    def mark_latest() -> None:
        if dist.get_rank() == 0:
            tracker = Path(save) / TRACKER_FILE
            previous = tracker.read_text().strip() if tracker.is_file() else ""
            tmp = tracker.with_name(tracker.name + ".tmp")
            tmp.write_text(f"{iteration}\n")
            os.replace(tmp, tracker)  # atomic: the marker names a complete checkpoint, old or new
            # (never one after this save: after --ckpt-step, the checkpoint the run went back from)
            if progress is not None and asynchronous:
                progress.async_checkpoint_in_place(iteration)
            if retain_interval and previous.isdigit() and int(previous) < iteration \
                    and int(previous) % retain_interval:
                if _delete_in_background(iteration_dir(save, int(previous))) and progress is not None:
                    progress.checkpoint_deleted(int(previous))
        dist.barrier()

    return save_checkpoint(trainer, iteration_dir(save, iteration), on_complete=mark_latest, **save_kwargs)


def _delete_in_background(directory: Path) -> bool:
    """Remove a checkpoint no longer retained without holding up the ranks (a large one takes a while on a
    parallel file system); renamed first, so that nothing reads it meanwhile. The process waits for the
    removal before it exits. Returns whether it was there to remove."""
    if not directory.is_dir():  # (e.g. the marker named an `.old` a resume was saved back over)
        return False
    doomed = directory.with_name(f"{directory.name}.deleting-{os.getpid()}-{time.time_ns()}")
    try:
        directory.rename(doomed)
    except OSError as err:
        logger.warning("could not remove %s (no longer retained): %s", directory, err)
        return False
    import threading

    threading.Thread(target=shutil.rmtree, args=(doomed,), kwargs={"ignore_errors": True},
                     name="consa-retain-delete").start()
    return True


def checkpoint_marker(path: str | os.PathLike) -> Optional[str]:
    """What makes `path` one checkpoint: its `consa_run.json`, or finalize's output's
    `checkpoint/consa_run.json` (returned relative to `path`); None otherwise (a `--save` directory
    of `iter_*` checkpoints included)."""
    for marker in (CONSA_META_FILE, f"{FINALIZED_CHECKPOINT_DIR}/{CONSA_META_FILE}"):
        if (Path(path) / marker).is_file():
            return marker
    return None


def resolve_load_dir(load: str | os.PathLike, *, step: Optional[int] = None, flag: Optional[str] = "--load") -> Path:
    """The checkpoint directory `--load` means: the latest in a `--save` directory (or its
    iteration `step`: Megatron-LM's `--ckpt-step`), the directory itself, or the checkpoint in
    finalize's output directory. A `--save` directory without its marker (stopped between a
    save's rename and the marker's write) gives its latest complete checkpoint. Messages name the
    directory after `flag` (the flag that gave it; None: the path alone, for a caller that adds its own)."""
    path = Path(load)
    named = f"{flag} {path}" if flag else str(path)
    if not path.exists():
        raise FileNotFoundError(f"{named}: no such directory")
    tracker = path / TRACKER_FILE
    if step is not None:
        if not tracker.is_file() and not saved_iterations(path):
            raise FileNotFoundError(f"--ckpt-step {step}: {named} is not a --save directory (no {TRACKER_FILE});"
                                    " give the directory that holds the iter_* checkpoints, or drop --ckpt-step")
        try:
            return _resolve(iteration_dir(path, step))
        except FileNotFoundError:
            held = saved_iterations(path)
            raise FileNotFoundError(f"--ckpt-step {step}: {named} has no complete checkpoint of iteration {step} "
                                    f"(it holds {', '.join(map(str, held)) or 'none'})") from None
    if tracker.is_file():
        text = tracker.read_text().strip()
        if not text.isdigit():
            raise FileNotFoundError(f"{named}: {TRACKER_FILE} holds {text!r}, not an iteration number")
        target = iteration_dir(path, int(text))
        try:
            return _resolve(target)  # or its `.old`, where a save over it was interrupted
        except FileNotFoundError:
            raise FileNotFoundError(
                f"{named}: {TRACKER_FILE} names {target.name}, which is not a complete checkpoint"
            ) from None
    try:
        return _resolve(path)
    except FileNotFoundError as err:
        if (path / FINALIZED_CHECKPOINT_DIR / CONSA_META_FILE).exists():  # finalize's output directory
            return path / FINALIZED_CHECKPOINT_DIR
        held = saved_iterations(path) if path.is_dir() else []
        if held:  # a --save directory whose first save was stopped after its rename, before its marker
            if int(os.environ.get("RANK", "0")) == 0:  # (every rank resolves it, before and after torch.distributed)
                logger.warning("%s: no %s, but complete checkpoints (iterations %s): loading the latest", named,
                               TRACKER_FILE, ", ".join(map(str, held)))
            return _resolve(iteration_dir(path, held[-1]))
        hf = (path / "config.json").is_file() and any(path.glob("*.safetensors"))
        raise FileNotFoundError(
            f"{named}: neither a checkpoint (no {CONSA_META_FILE}), a --save directory (no {TRACKER_FILE}) "
            f"nor finalize's output (no {FINALIZED_CHECKPOINT_DIR}/)" + (
                "; it is a Hugging Face model: import it with tools/convert_hf_to_megatron.py and --load the "
                "result (the tools that read Hugging Face models take it as --hf-path)" if hf else "")
        ) from err


def read_common_state(directory: str | os.PathLike) -> dict:
    """The non-sharded part of a checkpoint (iteration, controller state, gathered log_alpha) without a model."""
    return dist_checkpointing.load_common_state_dict(str(directory))
