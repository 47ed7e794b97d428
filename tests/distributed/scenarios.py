"""What spawned ranks run (see harness.py), and the shared tiny run definition.

The run definition (architecture, ConSA, training, data) is also imported by
the single-process reference in the tests, so both sides train the same thing.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch

from megatron_consa.config import ConsaConfig
from megatron_consa.model import ArchitectureConfig
from megatron_consa.training.checkpoint import CheckpointWriter, load_checkpoint, save_checkpoint
from megatron_consa.training.config import ParallelConfig, TrainingConfig
from megatron_consa.training.data import SyntheticRecallData
from megatron_consa.training.loop import ConsaTrainer
from megatron_consa.training.parallel import initialize_distributed

ARCH = ArchitectureConfig(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_layers=4,
    num_attention_heads=8,
    num_kv_heads=4,
    head_dim=8,
    qk_norm=True,
    rope_theta=10000.0,
    max_position_embeddings=64,
)
DATA = SyntheticRecallData(vocab_size=128, seq_length=32, key_length=4, min_distance=12, seed=3)


@dataclasses.dataclass
class EodMaskedData:
    """DATA under --eod-mask-loss (EOD = 0) with a varying share of EODs: sample i starts with
    (i % 5) * 6, so micro-batches, and data-parallel ranks, hold different numbers of tokens
    with loss."""

    eod_mask_id: int = 0

    def sample(self, index: int) -> torch.Tensor:
        seq = DATA.sample(index)  # (its tokens are >= 1)
        seq[: (index % 5) * 6] = 0
        return seq


def consa_config(granularity: str = "kv_head") -> ConsaConfig:
    # Fast-moving gates and multipliers so 8 iterations exercise the constraint.
    return ConsaConfig(
        window=8,
        target_sparsity=0.5,
        target_warmup_iters=4,
        gate_lr=0.03,
        lagrangian_lr=2.0,
        init_log_alpha=0.0,
        granularity=granularity,
    )


def training_config(**kw) -> TrainingConfig:
    base = dict(
        train_iters=8,
        micro_batch_size=1,
        global_batch_size=8,
        seq_length=32,
        lr=1e-3,
        min_lr=1e-3,
        lr_decay_style="constant",
        weight_decay=0.01,
        clip_grad=1.0,
        allocation_check_interval=1,  # bit-for-bit replica check after every iteration
        log_params_norm=True,  # at the log iterations (the first, the last): each parameter once at any layout
        # every megatron-core timer on (a barrier at each level-1 one), each rank's reported: the
        # trajectories below show they change nothing, and `timer_reports` what they report
        timing_log_level=2,
        timing_log_option="all",
        check_weight_hash_across_dp_replicas_interval=5,  # the replicas' weights, bit for bit
    )
    base.update(kw)
    return TrainingConfig(**base)


LAYOUTS = {
    "tp1pp1": ParallelConfig(),
    "tp2": ParallelConfig(tensor_model_parallel_size=2),
    "pp2": ParallelConfig(pipeline_model_parallel_size=2),
    "pp2_vpp2": ParallelConfig(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2),
    # uneven stages: layer 0 on the first, layers 1-3 on the last (--decoder-first-pipeline-num-layers 1)
    "pp2_uneven": ParallelConfig(pipeline_model_parallel_size=2, decoder_first_pipeline_num_layers=1),
    "tp2pp2": ParallelConfig(tensor_model_parallel_size=2, pipeline_model_parallel_size=2),
    "tp2_sp": ParallelConfig(tensor_model_parallel_size=2, sequence_parallel=True),
    "tp2_distopt": ParallelConfig(tensor_model_parallel_size=2, use_distributed_optimizer=True),
    "pp2_recompute_full": ParallelConfig(
        pipeline_model_parallel_size=2, recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1
    ),
    "tp2_recompute_selective": ParallelConfig(tensor_model_parallel_size=2, recompute_granularity="selective"),
    "tp2_overlap_grad_reduce": ParallelConfig(tensor_model_parallel_size=2, overlap_grad_reduce=True),
    # DP2 on 4 ranks: the distributed optimizer's all-gather left to the next forward
    "tp2_overlap_param_gather": ParallelConfig(
        tensor_model_parallel_size=2, use_distributed_optimizer=True, overlap_grad_reduce=True, overlap_param_gather=True
    ),
    # the interleaved schedule's aligned gather (config.param_sync_func)
    "pp2_vpp2_overlap_param_gather": ParallelConfig(
        pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2, use_distributed_optimizer=True,
        overlap_grad_reduce=True, overlap_param_gather=True,
    ),
}

# A mixed allocation for fixed-mode runs, unbalanced on purpose: at TP2 layer 0 keeps
# its FA heads on rank 0, layer 3 on rank 1, so a rank slicing the wrong half of its
# row computes another function.
FIXED_ALLOCATION = [[1, 1, 0, 0], [0, 0, 0, 0], [1, 0, 0, 1], [0, 0, 1, 1]]


# KV-group balance over TP ranks: 8 KV groups, so TP4 leaves two per rank. Hand-made
# and unbalanced in megatron's order: layer 0 has every FA group in the first half
# (TP2: all on rank 0), layer 1 its three at the end, layer 2 alternates (contiguous
# per rank only after reordering), layer 3 wraps around.
BALANCE_ARCH = dataclasses.replace(ARCH, num_attention_heads=16, num_kv_heads=8, head_dim=4)
BALANCE_ALLOCATION = [
    [1, 1, 1, 1, 0, 0, 0, 0],
    [0, 0, 0, 0, 0, 1, 1, 1],
    [1, 0, 1, 0, 1, 0, 1, 0],
    [1, 1, 0, 0, 0, 0, 0, 1],
]
BALANCE_TP_SIZES = (2, 4)  # TP1 in one process: tests/unit/test_group_layout.py


# Mixed-precision runs: (layout, TrainingConfig overrides). Gates stay float32.
PRECISION_RUNS = {
    "tp2pp2_bf16": ("tp2pp2", {"bf16": True}),
    "tp2pp2_fp16": ("tp2pp2", {"fp16": True, "initial_loss_scale": 1024.0}),
    "pp2_vpp2_bf16": ("pp2_vpp2", {"bf16": True}),
}


# Runs whose timers differ from training_config's (every timer, a barrier at each level-1 one)
TIMING = {"tp2_sp": {"timing_log_level": 0}, "tp2": {"barrier_with_l1_time": False}}


def make_trainer(parallel: ParallelConfig, granularity: str = "kv_head", **train_kw) -> ConsaTrainer:
    training = training_config(**train_kw)
    initialize_distributed(parallel, seed=training.seed)
    trainer = ConsaTrainer(arch=ARCH, consa=consa_config(granularity), parallel=parallel, training=training, data=DATA)
    trainer.capture_gate_grads = True
    return trainer


def _step_record(trainer: ConsaTrainer, record) -> dict:
    return {
        "loss": record.loss,
        "skipped": record.skipped,
        "s_hat": record.s_hat,
        "lambda1": record.lambda1,
        "lambda2": record.lambda2,
        "log_alpha": trainer.gather_log_alpha(),
        "gate_grad": trainer.gather_gate_grads(),
        "params_norm": record.params_norm,
    }


class _captured_log:
    """The INFO messages one logger emits inside the block (a list, filled as they come)."""

    def __init__(self, name: str) -> None:
        self.logger, self.messages = logging.getLogger(name), []
        self.handler = logging.Handler(logging.INFO)
        self.handler.emit = lambda record: self.messages.append(record.getMessage())

    def __enter__(self) -> list[str]:
        self.level = self.logger.level
        self.logger.setLevel(logging.INFO)
        self.logger.addHandler(self.handler)
        return self.messages

    def __exit__(self, *exc) -> None:
        self.logger.removeHandler(self.handler)
        self.logger.setLevel(self.level)


def layouts(
    *, out_dir: str, names: list[str], iters: int = 8, resume_from: str = "tp2pp2", resume_at: int = 5,
    resume_into: tuple[str, ...] = ("tp1pp1", "pp2"), granularity: str = "kv_head",
    self_resumes: tuple[str, ...] = (),
) -> dict:
    """Train the same run at each layout from the same initial checkpoint.

    The first layout writes the initial weights; every later one loads them.
    The `resume_from` layout also saves a checkpoint at `resume_at`, which is
    then loaded (with optimizer and controller) at each `resume_into` layout
    and trained to `iters`. Each of `self_resumes` (names of runs) saves one too,
    resumed in its own layout and precision (`runs["self-resume:<name>"]`).
    """
    from megatron.core import parallel_state

    out = Path(out_dir)
    init_ckpt, mid_ckpt = out / "init", out / f"{resume_from}-iter{resume_at}"
    runs: dict[str, list[dict]] = {}
    local_gates: dict[str, dict] = {}
    timer_reports: dict[str, list[str]] = {}  # (rank 0 logs them)
    log_lines: dict[str, tuple[list[str], float]] = {}  # (rank 0's log lines, the FLOPs of an iteration)
    stages: dict[str, int] = {}
    for name in names:
        layout, train_kw = PRECISION_RUNS.get(name, (name, {}))
        trainer = make_trainer(LAYOUTS[layout], granularity, **{**TIMING.get(name, {}), **train_kw})
        stages[name] = parallel_state.get_pipeline_model_parallel_rank()
        if not init_ckpt.exists():
            save_checkpoint(trainer, init_ckpt)
        else:
            load_checkpoint(trainer, init_ckpt, weights_only=True)
        history = []
        with _captured_log("megatron_consa.training.loop") as messages:
            for k in range(iters):
                if name == resume_from and k == resume_at:
                    save_checkpoint(trainer, mid_ckpt)
                if name in self_resumes and k == resume_at:
                    save_checkpoint(trainer, out / f"{name}-iter{resume_at}")
                history.append(_step_record(trainer, trainer.train_step()))
        runs[name] = history
        timer_reports[name] = [m for m in messages if m.startswith("times across ranks (ms):")]
        log_lines[name] = ([m for m in messages if m.startswith("iter ")], trainer.flops_per_iteration)
        local_gates[name] = trainer.local_log_alpha()
    for name in resume_into:
        trainer = make_trainer(LAYOUTS[name], granularity)
        # (the data-parallel replicas read shares of it and exchange them: --ckpt-fully-parallel-load)
        load_checkpoint(trainer, mid_ckpt, fully_parallel=True)
        runs[f"resume:{name}"] = [_step_record(trainer, trainer.train_step()) for _ in range(iters - resume_at)]
    for name in self_resumes:
        layout, train_kw = PRECISION_RUNS.get(name, (name, {}))
        trainer = make_trainer(LAYOUTS[layout], granularity, **train_kw)
        load_checkpoint(trainer, out / f"{name}-iter{resume_at}")
        runs[f"self-resume:{name}"] = [_step_record(trainer, trainer.train_step()) for _ in range(iters - resume_at)]
    rank = torch.distributed.get_rank()
    return {
        "runs": runs if rank == 0 else None,
        "local_gates": local_gates,
        "timer_reports": timer_reports,
        "log_lines": log_lines,
        "stages": stages,
        "rank": rank,
        "mid_ckpt": str(mid_ckpt),
        "shard_bytes": _shard_bytes(out, names[0], granularity),
        "guard_error": _perturbed_replica_error(),
        "deferred_gather": _deferred_gather_probe(),
        "diverged": _diverged_probe(),
    }


def _shard_bytes(out: Path, layout: str, granularity: str) -> dict[str, list[int]]:
    """Bytes each rank wrote of the initial checkpoint (saved at `layout`, the default writer: fully
    parallel), and of the same state saved with replica 0 writing the replicated tensors alone."""
    trainer = make_trainer(LAYOUTS[layout], granularity)
    load_checkpoint(trainer, out / "init", weights_only=True)
    save_checkpoint(trainer, out / "init-replica0", writer=CheckpointWriter(fully_parallel=False))
    files = [f"__{r}_0.distcp" for r in range(torch.distributed.get_world_size())]  # (none: nothing to write)
    return {name: [(out / name / f).stat().st_size if (out / name / f).exists() else 0 for f in files]
            for name in ("init", "init-replica0")}


def fixed_layouts(*, out_dir: str, names: list[str], iters: int = 6,
                  layer_names: tuple[str, ...] = ("tp1pp1", "tp2pp2"),
                  resume_from: str = "tp2", resume_at: int = 3, resume_into: str = "tp1pp1",
                  self_resumes: tuple[str, ...] = ()) -> dict:
    """Fixed-mode continued training (FIXED_ALLOCATION) at each layout from the same weights
    (the `resume_from` run also saves at `resume_at`, with its optimizer, and the run is
    resumed from there at `resume_into`; each of `self_resumes` saves there too, with nothing
    read between its last step and the save, and is resumed in its own layout), learning at
    layer granularity at `layer_names`, and the KV-group balance checks (`group_balance`);
    rank 0 returns the loss curves."""
    out = Path(out_dir)
    init_ckpt, mid_ckpt = out / "fixed-init", out / f"fixed-{resume_from}-iter{resume_at}"
    consa = dataclasses.replace(consa_config(), allocation=FIXED_ALLOCATION)
    runs: dict[str, list[float]] = {}

    def fixed_trainer(name: str) -> ConsaTrainer:
        training = training_config(train_iters=iters)
        initialize_distributed(LAYOUTS[name], seed=training.seed)
        return ConsaTrainer(arch=ARCH, consa=consa, parallel=LAYOUTS[name], training=training, data=DATA)

    for name in names:
        trainer = fixed_trainer(name)
        if not init_ckpt.exists():
            save_checkpoint(trainer, init_ckpt)
        else:
            load_checkpoint(trainer, init_ckpt, weights_only=True)
        losses = []
        for k in range(iters):
            if name == resume_from and k == resume_at:
                save_checkpoint(trainer, mid_ckpt)
            if name in self_resumes and k == resume_at:
                runs[f"fixed:pending-at-save:{name}"] = trainer._param_gather_pending
                save_checkpoint(trainer, out / f"fixed-{name}-iter{resume_at}")
            losses.append(trainer.train_step().loss)
        runs[f"fixed:{name}"] = losses
    trainer = fixed_trainer(resume_into)
    load_checkpoint(trainer, mid_ckpt)
    runs[f"fixed:resume:{resume_into}"] = [trainer.train_step().loss for _ in range(iters - resume_at)]
    for name in self_resumes:
        trainer = fixed_trainer(name)
        load_checkpoint(trainer, out / f"fixed-{name}-iter{resume_at}")
        runs[f"fixed:self-resume:{name}"] = [trainer.train_step().loss for _ in range(iters - resume_at)]
    training = training_config(train_iters=iters)
    initialize_distributed(LAYOUTS["tp1pp1"], seed=training.seed)
    all_fa = dataclasses.replace(consa, allocation=[[1] * ARCH.num_kv_heads] * ARCH.num_layers)
    trainer = ConsaTrainer(arch=ARCH, consa=all_fa, parallel=LAYOUTS["tp1pp1"], training=training, data=DATA)
    load_checkpoint(trainer, init_ckpt, weights_only=True)
    runs["allfa:tp1pp1"] = [trainer.train_step().loss for _ in range(iters)]
    layer_init = out / "layer-init"
    for name in layer_names:
        trainer = make_trainer(LAYOUTS[name], "layer", train_iters=iters)
        if not layer_init.exists():
            save_checkpoint(trainer, layer_init)
        else:
            load_checkpoint(trainer, layer_init, weights_only=True)
        runs[f"layer:{name}"] = [
            (r.loss, r.s_hat, r.lambda1) for r in (trainer.train_step() for _ in range(iters))
        ]
        runs[f"layer:{name}:log_alpha"] = trainer.gather_log_alpha()
    # --calculate-per-token-loss at DP4 (2 micro-batches per rank) and DP1 (8): every token of the
    # global batch weighs the same at both; (loss, grad norm) per step: Adam would hide a gradient
    # off by a constant factor, the norm does not. One step of the default normalisation beside it.
    for name, per_token, steps in (("tp1pp1", True, iters), ("tp2pp2", True, iters), ("tp2pp2", False, 1)):
        training = training_config(train_iters=iters, calculate_per_token_loss=per_token)
        initialize_distributed(LAYOUTS[name], seed=training.seed)
        trainer = ConsaTrainer(arch=ARCH, consa=consa, parallel=LAYOUTS[name], training=training,
                               data=EodMaskedData())
        load_checkpoint(trainer, init_ckpt, weights_only=True)
        runs[f"{'per-token' if per_token else 'mean'}:{name}"] = [
            (r.loss, r.grad_norm) for r in (trainer.train_step() for _ in range(steps))]
    runs["balance"] = group_balance(out_dir=out_dir)
    return {"runs": runs if torch.distributed.get_rank() == 0 else None}


def _balance_model(tp: int, *, permute: bool, allocation=BALANCE_ALLOCATION, seed: int = 11):
    """A fixed-mode BALANCE_ARCH model at TP `tp` (the current layout), initialised from `seed`."""
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from megatron_consa.model import build_gpt_model, build_transformer_config

    consa = ConsaConfig(window=3, allocation=allocation, permute_kv_groups=permute, backend="torch")
    config = build_transformer_config(BALANCE_ARCH, consa, tensor_model_parallel_size=tp)
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)
    return build_gpt_model(config, BALANCE_ARCH, use_transformer_engine=False).eval()


def _full_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    pos = torch.arange(tokens.size(1)).unsqueeze(0).expand_as(tokens)
    with torch.no_grad():
        return gather_from_tensor_model_parallel_region(model(tokens, pos, attention_mask=None))


def save_weights(model, directory: Path, arch: ArchitectureConfig) -> None:
    """The model's weights as a checkpoint `load_model_weights` and the exporter read (all ranks call this)."""
    from megatron.core import dist_checkpointing

    from megatron_consa.training.checkpoint import model_state_for_save, write_checkpoint_meta

    directory.mkdir(parents=True, exist_ok=True)
    torch.distributed.barrier()
    dist_checkpointing.save(model_state_for_save([model], controller_state={}, iteration=0), str(directory))
    if torch.distributed.get_rank() == 0:
        write_checkpoint_meta(directory, {"architecture": dataclasses.asdict(arch)})
    torch.distributed.barrier()


def data_loader_workers(*, out_dir: str) -> dict:
    """--num-workers in a fresh process, as a training rank forks its loader (a worker forked from a
    long-lived test process inherits whatever hundreds of earlier tests left in it). The losses of a
    fixed-allocation run with the batches read in the trainer and from 2 forked workers; then the
    micro-batches a 1-worker PrefetchedBatches hands for iterations asked out of order (a resume)."""
    from megatron_consa.training.data import PrefetchedBatches, micro_batches

    consa = ConsaConfig(window=8, allocation=FIXED_ALLOCATION)

    def run(num_workers: int):
        training = TrainingConfig(train_iters=4, micro_batch_size=2, global_batch_size=4, seq_length=32, lr=1e-2,
                                  min_lr=1e-2, lr_decay_style="constant", num_workers=num_workers)
        initialize_distributed(ParallelConfig(), seed=training.seed)
        trainer = ConsaTrainer(arch=ARCH, consa=consa, parallel=ParallelConfig(), training=training,
                               data=EodMaskedData())
        losses = [r.loss for r in trainer.train()]
        loader = type(getattr(trainer._loader, "_loader", None)).__name__
        trainer.close()
        return losses, loader

    (inline, _), (workers, loader) = run(0), run(2)
    layout = dict(global_batch_size=4, micro_batch_size=2, dp_rank=0, dp_size=1)
    prefetched = PrefetchedBatches(EodMaskedData(), num_workers=1, **layout)
    out_of_order = {}
    for k in (10, 11, 3, 4):
        got, want = prefetched.get(k), micro_batches(EodMaskedData(), iteration=k, **layout)
        out_of_order[k] = len(got) == len(want) == 2 and all(
            torch.equal(g[key], w[key]) for g, w in zip(got, want) for key in w)
    prefetched.close()
    return {"inline": inline, "workers": workers, "loader": loader, "out_of_order": out_of_order,
            "fault": _worker_fault_report(Path(out_dir), layout)}


class _FaultingData:
    """A sample source whose reads crash the process (a read at address 8)."""

    def sample(self, index: int) -> torch.Tensor:
        import ctypes

        return torch.tensor(list(ctypes.string_at(8, 8)))  # (address 0 would allocate: ctypes reads NULL as "new")


def _worker_fault_report(out: Path, layout: dict) -> dict:
    """What a worker killed by SIGSEGV leaves: the error `get` raises, and its stderr (no core file)."""
    import os
    import resource

    from megatron_consa.training.data import PrefetchedBatches

    resource.setrlimit(resource.RLIMIT_CORE, (0, resource.getrlimit(resource.RLIMIT_CORE)[1]))
    log, saved = out / "worker_stderr.txt", os.dup(2)
    with open(log, "w") as f:
        os.dup2(f.fileno(), 2)
    try:
        loader = PrefetchedBatches(_FaultingData(), num_workers=1, **layout)
        try:
            loader.get(0)
            error = None
        except RuntimeError as err:
            error = str(err)
        loader.close()
    finally:
        os.dup2(saved, 2)
        os.close(saved)
    return {"error": error, "stderr": log.read_text()}


def group_balance(*, out_dir: str) -> dict:
    """Fixed mixed models (BALANCE_ALLOCATION) at TP2 and TP4 in the stored KV-group order.

    Returns, for rank 0: the logits of each TP size loaded from the same canonical
    weights, of the megatron-order model at TP1 (the reference) and of all-FA; each
    rank's groups (canonical index, type) as its core attention and weights hold them;
    the logits of freshly built models (no load) in both orders at each TP size; and
    the keys whose weights, saved at each TP size, load into a megatron-order TP1
    model other than bit for bit equal to the weights it loaded (none, if canonical).
    """
    from megatron.core import parallel_state

    from megatron_consa.model import consa_attention_modules
    from megatron_consa.training.checkpoint import load_model_weights

    out = Path(out_dir) / "balance"
    tokens = torch.randint(0, BALANCE_ARCH.vocab_size, (2, 24), generator=torch.Generator().manual_seed(5))
    initialize_distributed(ParallelConfig(), seed=0)  # TP1: data parallelism fills the world
    reference = _balance_model(1, permute=False)
    save_weights(reference, out / "init", BALANCE_ARCH)
    result: dict = {"reference": _full_logits(reference, tokens), "logits": {}, "groups": {}, "fresh": {}, "round_trip": {}}
    all_fa = _balance_model(1, permute=False, allocation=[[1] * BALANCE_ARCH.num_kv_heads] * BALANCE_ARCH.num_layers)
    load_model_weights([all_fa], out / "init")
    result["all_fa"] = _full_logits(all_fa, tokens)
    for tp in BALANCE_TP_SIZES:
        initialize_distributed(ParallelConfig(tensor_model_parallel_size=tp), seed=0)
        result["fresh"][tp] = tuple(_full_logits(_balance_model(tp, permute=p, seed=23), tokens) for p in (False, True))
        model = _balance_model(tp, permute=True)
        load_model_weights([model], out / "init")
        result["logits"][tp] = _full_logits(model, tokens)
        mine = [(m.local_groups, m.fa_local) for m in consa_attention_modules([model])]
        ranks: list = [None] * tp
        torch.distributed.all_gather_object(ranks, mine, group=parallel_state.get_tensor_model_parallel_group())
        result["groups"][tp] = ranks  # [rank][layer] -> (groups, types)
        save_weights(model, out / f"tp{tp}", BALANCE_ARCH)
    expected = {k: v for k, v in reference.state_dict().items() if torch.is_tensor(v)}
    initialize_distributed(ParallelConfig(), seed=0)
    for tp in BALANCE_TP_SIZES:
        back = _balance_model(1, permute=False)
        load_model_weights([back], out / f"tp{tp}")
        got = back.state_dict()
        result["round_trip"][tp] = sorted(k for k, v in expected.items() if not torch.equal(got[k], v))
    return result if torch.distributed.get_rank() == 0 else None


def _deferred_gather_probe() -> tuple[bool, bool]:
    """With the parameter all-gather overlapped, a step leaves the DP replicas apart (each
    updated only its shard) until `finish_param_gather`: (apart after the step, equal after it)."""
    from megatron_consa.training.parallel import AllocationMismatchError, check_gates_consistent

    # no replica check, no log line (its FA counts gather the gates)
    trainer = make_trainer(LAYOUTS["tp2_overlap_param_gather"], allocation_check_interval=0, log_interval=0)
    trainer.train_step()
    verdicts = []
    for finish in (False, True):
        if finish:
            trainer.finish_param_gather()
        try:
            check_gates_consistent([g.log_alpha for g in trainer.gates], iteration=trainer.iteration)
            verdicts.append(False)
        except AllocationMismatchError:
            verdicts.append(True)
    return verdicts[0], not verdicts[1]


def _diverged_probe() -> str | None:
    """TP2xPP2: a NaN weight on global rank 0 alone (first stage, one TP half). Every rank must
    stop at the same step (no rank left waiting in a collective); returns this rank's error."""
    from megatron_consa.model import unwrap_model
    from megatron_consa.training.loop import TrainingDivergedError

    trainer = make_trainer(LAYOUTS["tp2pp2"], log_interval=0)
    trainer.train_step()
    if torch.distributed.get_rank() == 0:
        with torch.no_grad():
            next(unwrap_model(trainer.chunks[0]).decoder.layers[0].parameters()).view(-1)[0] = float("nan")
    try:
        trainer.train_step()
    except TrainingDivergedError as err:
        return str(err)
    return None


def _perturbed_replica_error() -> tuple[str | None, str | None]:
    """Global rank 3 nudges one gate, then rank 2 one weight; the consistency guards must name them."""
    from megatron_consa.training.parallel import (
        AllocationMismatchError,
        ReplicaMismatchError,
        check_gates_consistent,
        check_weights_consistent,
    )

    trainer = make_trainer(LAYOUTS["tp2"])
    check_weights_consistent(trainer.chunks, iteration=0)  # (alike: no error)
    gates = weights = None
    if torch.distributed.get_rank() == 3:
        with torch.no_grad():
            trainer.gates[0].log_alpha.add_(1e-6)
    try:
        check_gates_consistent([g.log_alpha for g in trainer.gates], iteration=7)
    except AllocationMismatchError as err:
        gates = str(err)
    trainer = make_trainer(LAYOUTS["tp2"])
    if torch.distributed.get_rank() == 2:
        with torch.no_grad():
            next(iter(trainer.chunks[0].parameters())).view(-1)[0] += 1e-3
    try:
        check_weights_consistent(trainer.chunks, iteration=8)
    except ReplicaMismatchError as err:
        weights = str(err)
    return gates, weights



# ----------------------------------------------------------------- conversion


def checkpoint_logits(ckpt_dir: str, toks: torch.Tensor) -> torch.Tensor | None:
    """Logits [b, s, vocab] of an imported checkpoint at the current TP/PP layout (last stage; else None).

    Fixed mode with the checkpoint's allocation.json when it has one, all-FA otherwise.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from megatron_consa.allocation import Allocation
    from megatron_consa.conversion.checkpoint_model import fixed_consa_config
    from megatron_consa.model import build_gpt_model, build_transformer_config
    from megatron_consa.training.checkpoint import load_model_weights, read_checkpoint_meta

    meta = read_checkpoint_meta(ckpt_dir)
    arch = ArchitectureConfig(**meta["architecture"])
    alloc_file = Path(ckpt_dir) / "allocation.json"
    consa = fixed_consa_config(arch, Allocation.load(alloc_file) if alloc_file.exists() else None)
    tp = parallel_state.get_tensor_model_parallel_world_size()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    config = build_transformer_config(
        arch, consa, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, pipeline_dtype=torch.float32,
        perform_initialization=False,  # every weight is loaded
    )
    model = build_gpt_model(config, arch, use_transformer_engine=False).eval()
    load_model_weights([model], ckpt_dir)
    pos = torch.arange(toks.size(1)).unsqueeze(0).expand_as(toks)
    group = parallel_state.get_pipeline_model_parallel_group()
    stage = parallel_state.get_pipeline_model_parallel_rank()
    hidden_shape = (toks.size(1), toks.size(0), arch.hidden_size)  # [s, b, h]
    with torch.no_grad():
        if stage > 0:
            received = torch.empty(hidden_shape)
            dist.recv(received, group_src=stage - 1, group=group)
            model.set_input_tensor(received)
        out = model(toks, pos, attention_mask=None)
        if stage < pp - 1:
            dist.send(out.contiguous(), group_dst=stage + 1, group=group)
            return None
    return gather_from_tensor_model_parallel_region(out)  # vocab-parallel -> full vocab


def conversion_layouts(out_dir: str, checkpoints: dict, layouts: dict, tokens: torch.Tensor) -> dict:
    """Each imported checkpoint's logits at each layout {name: (tp, pp)}; rank 0 returns the last stage's."""
    import torch.distributed as dist

    results = {}
    for name, (tp, pp) in layouts.items():
        initialize_distributed(ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp), seed=1)
        for family, ckpt in checkpoints.items():
            logits = checkpoint_logits(ckpt, tokens)
            box = [logits]
            dist.broadcast_object_list(box, src=dist.get_world_size() - 1)  # the last rank is a last stage
            results[(family, name)] = box[0]
    return results

