"""Bad run configurations fail before any work, naming the field and the fix."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from megatron_consa.compat import distributed_backend
from megatron_consa.config import ConsaConfig, ConsaConfigError
from megatron_consa.training.config import ParallelConfig, TrainingConfig

ROOT = Path(__file__).resolve().parents[2]


def _validate(**kw):
    return ParallelConfig(**kw).validate(num_layers=4, num_kv_heads=4, world_size=8)


def test_a_good_layout_gives_the_data_parallel_size():
    assert _validate(tensor_model_parallel_size=2, pipeline_model_parallel_size=2) == 2
    assert _validate(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2) == 4


@pytest.mark.parametrize(
    "kw,field",
    [
        (dict(tensor_model_parallel_size=8), "tensor_model_parallel_size"),  # 8 does not divide 4 KV heads
        (dict(tensor_model_parallel_size=3), "tensor_model_parallel_size"),
        (dict(pipeline_model_parallel_size=8), "pipeline_model_parallel_size"),
        (dict(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=4), "pipeline_model_parallel_size"),
        (dict(virtual_pipeline_model_parallel_size=2), "virtual_pipeline_model_parallel_size"),
        (dict(sequence_parallel=True), "sequence_parallel"),
        (dict(recompute_granularity="some"), "recompute_granularity"),
        (dict(overlap_param_gather=True, overlap_grad_reduce=True), "overlap_param_gather"),  # no distributed optimizer
        (dict(overlap_param_gather=True, use_distributed_optimizer=True), "overlap_param_gather"),  # as Megatron-LM
    ],
)
def test_bad_layouts_name_the_field(kw, field):
    with pytest.raises(ConsaConfigError, match=field):
        _validate(**kw)


def test_kv_heads_fewer_than_tp_ranks_is_refused():
    # megatron-core would replicate KV heads over TP ranks; per-KV-head gates cannot be split then
    with pytest.raises(ConsaConfigError, match="num_query_groups=2"):
        ParallelConfig(tensor_model_parallel_size=4).validate(num_layers=4, num_kv_heads=2, world_size=4)


@pytest.mark.parametrize(
    "kw,field",
    [
        (dict(global_batch_size=6, micro_batch_size=4), "global_batch_size"),
        (dict(bf16=True, fp16=True), "bf16"),
        (dict(lr_decay_style="exp"), "lr_decay_style"),
        (dict(train_iters=-1), "train_iters"),
        (dict(micro_batch_size=0), "micro_batch_size"),
    ],
)
def test_bad_training_settings_name_the_field(kw, field):
    with pytest.raises(ConsaConfigError, match=field):
        TrainingConfig(**kw).validate(dp_size=1)


def test_a_save_over_an_interrupted_one_keeps_the_old_until_the_new_is_in_place(tmp_path, monkeypatch):
    """`iter_N.old` without `iter_N` (a save killed between its renames, perhaps the checkpoint
    this run resumed from) survives a failure of the next save's rename."""
    from pathlib import Path

    from megatron_consa.training.checkpoint import _swap_into_place

    final, old, tmp = tmp_path / "iter_0000008", tmp_path / "iter_0000008.old", tmp_path / "iter_0000008.tmp-8"
    old.mkdir()
    (old / "consa_run.json").write_text("{}")
    tmp.mkdir()
    real = Path.rename

    def failing(self, target):
        if self == tmp:
            raise OSError("disk full")
        return real(self, target)

    monkeypatch.setattr(Path, "rename", failing)
    with pytest.raises(OSError):
        _swap_into_place(tmp, final)
    assert (old / "consa_run.json").exists()
    monkeypatch.setattr(Path, "rename", real)
    _swap_into_place(tmp, final)
    assert final.exists() and not old.exists()
    (tmp_path / "next").mkdir()
    _swap_into_place(tmp_path / "next", final)  # over a complete one: replaced, nothing left beside
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_0000008"]


def test_hf_config_reads_a_save_directory_and_finalize_output_as_load_does(tmp_path):
    """`--hf-config <save>` takes the config.json of the latest checkpoint there, and
    `--hf-config <finalize output>` its checkpoint's (the run's later steps read that path too)."""
    import transformers

    from megatron_consa.training.arguments import parse_run_config
    from megatron_consa.training.checkpoint import TRACKER_FILE, iteration_dir
    from megatron_consa.training.finalize import CHECKPOINT_DIR

    save, finalized = tmp_path / "save", tmp_path / "finalized"
    for checkpoint in (iteration_dir(save, 7), iteration_dir(save, 3), finalized / CHECKPOINT_DIR):
        checkpoint.mkdir(parents=True)
        (checkpoint / "consa_run.json").write_text("{}")
        layers = 4 if checkpoint.name == "iter_0000003" else 2  # not the latest: not read
        transformers.Qwen3Config(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                                 num_attention_heads=4, num_key_value_heads=2, head_dim=8).save_pretrained(checkpoint)
    (save / TRACKER_FILE).write_text("7")
    rest = ["--seq-length", "32", "--micro-batch-size", "1", "--global-batch-size", "1", "--train-iters", "2",
            "--mock-data", "--consa-target-warmup-iters", "0"]
    for given, expected in ((save, iteration_dir(save, 7)), (finalized, finalized / CHECKPOINT_DIR)):
        run = parse_run_config(["--hf-config", str(given)] + rest)
        assert run.hf_config == str(expected / "config.json") and run.arch.num_layers == 2 and run.arch.num_kv_heads == 2


def test_an_hf_config_transformers_refuses_is_a_flag_error(tmp_path, capsys):
    """A config.json whose fields contradict each other (transformers' strict validation, not a ValueError):
    exit 2 naming --hf-config and the file, not a traceback; a --save directory without its latest checkpoint
    is named too."""
    import transformers

    from megatron_consa.train import main

    transformers.Qwen3Config(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=8).save_pretrained(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    config["layer_types"] = ["full_attention"] * 3  # 2 layers
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    rest = ["--seq-length", "32", "--train-iters", "2", "--mock-data", "--consa-target-warmup-iters", "0"]
    assert main(["--hf-config", str(tmp_path / "hf")] + rest) == 2
    err = capsys.readouterr().err
    assert f"--hf-config {tmp_path / 'hf' / 'config.json'}: not a valid qwen3 config" in err and "Traceback" not in err
    (tmp_path / "save").mkdir()
    (tmp_path / "save" / "latest_checkpointed_iteration.txt").write_text("5")
    assert main(["--hf-config", str(tmp_path / "save")] + rest) == 2
    assert "iter_0000005" in capsys.readouterr().err


def test_optimizer_and_loss_scale_flags_reach_the_training_config():
    """Megatron-LM's flags land in TrainingConfig; the loss-scale ones left out keep its defaults."""
    from megatron_consa.training.arguments import parse_run_config

    base = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "32",
            "--train-iters", "2", "--mock-data", "--vocab-size", "64", "--consa-target-warmup-iters", "0"]
    default = parse_run_config(base + ["--fp16"]).training
    assert (default.loss_scale, default.initial_loss_scale, default.min_loss_scale, default.loss_scale_window,
            default.hysteresis, default.adam_eps) == (None, 2.0**16, 1.0, 1000, 2, 1e-8)
    given = parse_run_config(base + ["--fp16", "--loss-scale", "512", "--initial-loss-scale", "4096",
                                     "--min-loss-scale", "2", "--loss-scale-window", "50", "--hysteresis", "3",
                                     "--adam-eps", "1e-6"]).training
    assert (given.loss_scale, given.initial_loss_scale, given.min_loss_scale, given.loss_scale_window,
            given.hysteresis, given.adam_eps) == (512.0, 4096.0, 2.0, 50, 3, 1e-6)


OTHER_BACKEND = {"nccl": "gloo", "gloo": "nccl"}[distributed_backend()]
LLAMA_SCRIPT = [  # the model and schedule flags of a Megatron-LM Llama pretraining script
    "--use-mcore-models", "--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "128",
    "--num-attention-heads", "4", "--group-query-attention", "--num-query-groups", "2", "--seq-length", "32",
    "--max-position-embeddings", "32", "--position-embedding-type", "rope", "--rotary-base", "500000",
    "--normalization", "RMSNorm", "--norm-epsilon", "1e-5", "--swiglu", "--untie-embeddings-and-output-weights",
    "--disable-bias-linear", "--attention-dropout", "0.0", "--hidden-dropout", "0.0", "--init-method-std", "0.01",
    "--no-masked-softmax-fusion", "--attention-softmax-in-fp32", "--no-gradient-accumulation-fusion",
    "--no-bias-swiglu-fusion", "--no-bias-dropout-fusion", "--no-rope-fusion", "--no-position-embedding",
    "--use-rotary-position-embeddings", "--ckpt-format", "torch_dist", "--distributed-timeout-minutes", "30",
    "--train-iters", "100", "--lr-decay-iters", "80", "--lr-warmup-fraction", "0.05", "--lr-decay-style", "cosine",
    "--adam-beta2", "0.95", "--use-distributed-optimizer", "--overlap-grad-reduce", "--overlap-param-gather",
    "--rotary-percent", "1.0", "--context-parallel-size", "1", "--no-create-attention-mask-in-dataloader",
    "--log-throughput", "--accumulate-allreduce-grads-in-fp32", "--use-dist-ckpt", "--recompute-activations",
    "--eod-mask-loss", "--no-mmap-bin-files",
    # NVIDIA's Llama 3 8B script (examples/llama/train_llama3_8b_h100_fp8.sh) without its fp8 flags
    "--attention-backend", "fused", "--decoupled-lr", "5.0e-4", "--decoupled-min-lr", "4.5e-5", "--bf16",
    "--grad-reduce-in-bf16", "--cross-entropy-loss-fusion", "--calculate-per-token-loss", "--manual-gc",
    "--empty-unused-memory-level", "1", "--tiktoken-pattern", "v2",
    # and those of AMD's Llama 3 script there (examples/llama/train_llama3.sh)
    "--optimizer", "adam", "--dataloader-type", "single", "--no-async-tensor-model-parallel-allreduce",
    "--exit-on-missing-checkpoint", "--distributed-backend", distributed_backend(), "--rerun-mode", "disabled",
    "--tensorboard-log-interval", "5", "--log-validation-ppl-to-tensorboard", "--log-loss-scale-to-tensorboard",
    # and a Qwen3 script's (Megatron-LM's examples/qwen3 style)
    "--tensorboard-queue-size", "5", "--log-batch-size-to-tensorboard", "--lr-warmup-init", "1e-7",
    # the checkpoint flags of NVIDIA's large-scale scripts (e.g. Megatron-LM's Nemotron and DeepSeek examples)
    "--save", "/ckpt", "--save-interval", "250", "--save-retain-interval", "1000",
    "--ckpt-fully-parallel-save", "--ckpt-fully-parallel-load", "--async-save",
    "--use-persistent-ckpt-worker", "--ckpt-assume-constant-structure",
    # and their logging flags
    "--timing-log-level", "1", "--log-timers-to-tensorboard", "--log-memory-to-tensorboard",
    "--log-world-size-to-tensorboard", "--wandb-project", "llama3", "--wandb-exp-name", "8b",
    "--num-dataset-builder-threads", "4",
    # and the flags of Megatron-LM's own GPT test configurations (tests/functional_tests)
    "--dist-ckpt-strictness", "log_all", "--log-progress", "--auto-detect-ckpt-format", "--no-persist-layer-norm",
    "--num-distributed-optimizer-instances", "1", "--use-cpu-initialization",
    "--mock-data", "--vocab-size", "64", "--consa-target-warmup-iters", "10",
]


def test_a_megatron_lm_llama_script_parses_into_our_configs():
    from megatron_consa.training.arguments import parse_run_config

    run = parse_run_config(LLAMA_SCRIPT)
    t = run.training
    assert (t.lr_decay_iters, t.lr_warmup_iters, t.init_method_std, t.adam_beta2) == (80, 4, 0.01, 0.95)
    assert run.parallel.distributed_timeout_minutes == 30.0
    p = run.parallel
    assert (p.use_distributed_optimizer, p.overlap_grad_reduce, p.overlap_param_gather) == (True, True, True)
    assert p.recompute_granularity == "selective"
    assert (run.data.eod_mask_loss, run.data.mmap_bin_files, run.data.num_dataset_builder_threads) == (True, False, 4)
    assert (run.arch.num_kv_heads, run.arch.rope_theta, run.arch.rms_norm_eps, run.arch.tie_word_embeddings) == (
        2, 500000.0, 1e-5, False)
    assert (t.attention_backend, t.decoupled_lr, t.decoupled_min_lr, t.bf16, t.grad_reduce_in_bf16) == (
        "fused", 5e-4, 4.5e-5, True, True)
    assert (t.cross_entropy_loss_fusion, t.calculate_per_token_loss, t.manual_gc, t.empty_unused_memory_level) == (
        True, True, True, 1)
    assert (t.tensorboard_log_interval, t.log_validation_ppl_to_tensorboard) == (5, True)
    assert (t.timing_log_level, t.log_timers_to_tensorboard, t.log_memory_to_tensorboard,
            t.log_world_size_to_tensorboard) == (1, True, True, True)
    assert (t.tensorboard_queue_size, t.log_batch_size_to_tensorboard, t.lr_warmup_init) == (5, True, 1e-7)
    assert t.wandb_init() == {"project": "llama3", "name": "8b", "dir": "/ckpt/wandb", "entity": None}
    local = parse_run_config(LLAMA_SCRIPT + ["--attention-backend", "local"])  # no TE attention: the torch backend
    assert (local.training.attention_backend, local.consa.backend) == ("local", "torch")
    c = run.checkpoint
    assert (c.fully_parallel_save, c.fully_parallel_load, c.async_save, c.persistent_worker,
            c.assume_constant_structure, c.save_retain_interval) == (True, True, True, True, True, 1000)
    assert (c.dist_ckpt_strictness, c.log_progress, t.use_cpu_initialization, t.deterministic_mode) == (
        "log_all", True, True, False)


def test_checkpoint_writing_flags_and_their_refusals(caplog):
    """Fully parallel save is the default (as in Megatron-LM); --async-save needs --save; the
    background writer's own flags without it are ignored with a warning (as Megatron-LM ignores
    them); nvrx's writer is refused by name; the retain interval is a multiple of the save
    interval (Megatron-LM asserts it)."""
    from megatron_consa.training.arguments import ArgumentError, parse_run_config

    base = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "32",
            "--train-iters", "4", "--mock-data", "--vocab-size", "64", "--consa-target-warmup-iters", "1"]
    c = parse_run_config(base).checkpoint
    assert (c.fully_parallel_save, c.fully_parallel_load, c.async_save, c.assume_constant_structure) == (
        True, False, False, False)
    assert parse_run_config(base + ["--no-ckpt-fully-parallel-save"]).checkpoint.fully_parallel_save is False
    c = parse_run_config(base + ["--save", "/ckpt", "--async-save", "--async-strategy", "mcore"]).checkpoint
    assert (c.async_save, c.persistent_worker) == (True, False)
    with caplog.at_level("WARNING", logger="megatron_consa.training.arguments"):
        c = parse_run_config(base + ["--save", "/ckpt", "--use-persistent-ckpt-worker"]).checkpoint
    assert (c.async_save, c.persistent_worker) == (False, False)
    assert "--use-persistent-ckpt-worker without --async-save: ignored" in caplog.text
    for flags, message in (
        (["--async-save"], "--async-save without --save"),
        (["--save", "/ckpt", "--async-save", "--async-strategy", "nvrx"],
         "megatron-core's own writer here; pass --async-strategy mcore or drop the flag"),
        (["--save", "/ckpt", "--save-retain-interval", "10"], "--save-retain-interval needs --save and --save-interval"),
        (["--save", "/ckpt", "--save-interval", "4", "--save-retain-interval", "10"],
         "--save-retain-interval 10: must be a positive multiple of --save-interval 4"),
    ):
        with pytest.raises(ArgumentError, match=re.escape(message)):
            parse_run_config(base + flags)


def test_a_schedule_in_samples_runs_in_iterations_of_the_global_batch(caplog):
    """Megatron-LM's --train-samples / --lr-decay-samples / --lr-warmup-samples: its iteration
    count (samples // global batch) and the decay and warm-up at the nearest iteration."""
    from megatron_consa.training.arguments import parse_run_config

    base = [f for f in LLAMA_SCRIPT]
    for flag in ("--train-iters", "--lr-decay-iters", "--lr-warmup-fraction"):
        i = base.index(flag)
        del base[i:i + 2]
    base += ["--global-batch-size", "8"]
    with caplog.at_level("INFO", logger="megatron_consa.training.arguments"):
        t = parse_run_config(base + ["--train-samples", "805", "--lr-decay-samples", "640",
                                     "--lr-warmup-samples", "30"]).training
    assert (t.train_iters, t.lr_decay_iters, t.lr_warmup_iters, t.global_batch_size) == (100, 80, 4, 8)
    assert "--lr-warmup-samples 30: 4 (ends within an iteration of sample 30)" in caplog.text
    t = parse_run_config(base + ["--train-samples", "800", "--lr-warmup-fraction", "0.05"]).training
    assert (t.train_iters, t.lr_decay_iters, t.lr_warmup_iters) == (100, None, 5)
    t = parse_run_config(base + ["--train-samples", "800", "--lr-warmup-samples", "20"]).training
    assert t.lr_warmup_iters == 3  # 2.5 iterations: half up


def test_wsd_schedule_flags_in_iterations_and_in_samples():
    """Megatron-LM's --lr-decay-style WSD with --lr-wsd-decay-iters / --lr-wsd-decay-samples (at the
    nearest iteration) and --lr-wsd-decay-style; without the anneal's length it is refused by flag,
    and an anneal longer than the decay by field."""
    from megatron_consa.training.arguments import ArgumentError, parse_run_config

    base = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "32",
            "--mock-data", "--vocab-size", "64", "--consa-target-warmup-iters", "1", "--lr-decay-style", "WSD"]
    t = parse_run_config(base + ["--train-iters", "100", "--lr-wsd-decay-iters", "20",
                                 "--lr-wsd-decay-style", "minus_sqrt"]).training
    assert (t.lr_decay_style, t.lr_wsd_decay_iters, t.lr_wsd_decay_style) == ("WSD", 20, "minus_sqrt")
    t = parse_run_config(base + ["--global-batch-size", "8", "--train-samples", "800",
                                 "--lr-wsd-decay-samples", "156"]).training
    assert (t.train_iters, t.lr_wsd_decay_iters, t.lr_wsd_decay_style) == (100, 20, "exponential")
    with pytest.raises(ArgumentError, match="--lr-decay-style WSD needs the anneal's length: --lr-wsd-decay-iters"):
        parse_run_config(base + ["--train-iters", "100"])
    with pytest.raises(ArgumentError, match="--lr-wsd-decay-iters with --train-samples"):
        parse_run_config(base + ["--global-batch-size", "8", "--train-samples", "800", "--lr-wsd-decay-iters", "5"])
    with pytest.raises(ConsaConfigError, match="lr_wsd_decay_iters=200 is invalid"):
        too_long = ["--train-iters", "100", "--lr-wsd-decay-iters", "200", "--global-batch-size", "1"]
        parse_run_config(base + too_long).training.validate(dp_size=1)


def test_weight_decay_increment_flags():
    """Megatron-LM's --weight-decay-incr-style with --start-weight-decay / --end-weight-decay; the
    ends without a moving style, or a moving style without both ends, are refused by flag."""
    from megatron_consa.training.arguments import ArgumentError, parse_run_config

    base = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "32",
            "--mock-data", "--vocab-size", "64", "--consa-target-warmup-iters", "1", "--train-iters", "10"]
    t = parse_run_config(base + ["--weight-decay", "0.05"]).training
    assert t.weight_decay_schedule() == (0.05, 0.05, "constant")
    t = parse_run_config(base + ["--weight-decay-incr-style", "linear", "--start-weight-decay", "0.01",
                                 "--end-weight-decay", "0.1"]).training
    assert t.weight_decay_schedule() == (0.01, 0.1, "linear")
    with pytest.raises(ArgumentError, match="--end-weight-decay goes with --weight-decay-incr-style linear or cosine"):
        parse_run_config(base + ["--end-weight-decay", "0.1"])
    with pytest.raises(ArgumentError, match="--weight-decay-incr-style cosine moves the decay from "
                                            "--start-weight-decay to --end-weight-decay: give both"):
        parse_run_config(base + ["--weight-decay-incr-style", "cosine", "--start-weight-decay", "0.1"])
    with pytest.raises(ConsaConfigError, match="end_weight_decay=-0.1 is invalid"):
        TrainingConfig(weight_decay_incr_style="linear", start_weight_decay=0.0,
                       end_weight_decay=-0.1).validate(dp_size=1)
    with pytest.raises(ArgumentError, match="--end-weight-decay 0.01 < --start-weight-decay 0.1: megatron-core's "
                                            "schedule only increases the decay"):
        parse_run_config(base + ["--weight-decay-incr-style", "linear", "--start-weight-decay", "0.1",
                                 "--end-weight-decay", "0.01"])
    with pytest.raises(ConsaConfigError, match="end_weight_decay=0.0 is invalid: megatron-core's schedule only"):
        TrainingConfig(weight_decay_incr_style="cosine", start_weight_decay=0.1,
                       end_weight_decay=0.0).validate(dp_size=1)
    with pytest.raises(ConsaConfigError, match="start_weight_decay=0.0 is invalid: goes with"):
        TrainingConfig(start_weight_decay=0.0).validate(dp_size=1)


def test_timing_and_tensorboard_logging_flags(caplog):
    """Megatron-LM's --timing-log-level / --timing-log-option / --log-timers-to-tensorboard /
    --no-barrier-with-level-1-timing / --log-memory-to-tensorboard / --log-world-size-to-tensorboard
    and --wandb-* reach TrainingConfig; without --tensorboard-dir the TensorBoard ones warn that
    nothing is written."""
    import logging

    from megatron_consa.training.arguments import parse_run_config

    base = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "32",
            "--mock-data", "--vocab-size", "64", "--consa-target-warmup-iters", "1", "--train-iters", "10"]
    t = parse_run_config(base).training
    assert (t.timing_log_level, t.timing_log_option, t.log_timers_to_tensorboard, t.barrier_with_l1_time,
            t.log_memory_to_tensorboard, t.log_world_size_to_tensorboard) == (0, "minmax", False, True, False, False)
    flags = ["--timing-log-level", "2", "--timing-log-option", "all", "--log-timers-to-tensorboard",
             "--no-barrier-with-level-1-timing", "--log-memory-to-tensorboard", "--log-world-size-to-tensorboard"]
    with caplog.at_level(logging.WARNING):
        t = parse_run_config(base + flags).training
    assert (t.timing_log_level, t.timing_log_option, t.log_timers_to_tensorboard, t.barrier_with_l1_time,
            t.log_memory_to_tensorboard, t.log_world_size_to_tensorboard) == (2, "all", True, False, True, True)
    assert "--log-timers-to-tensorboard and --log-memory-to-tensorboard and --log-world-size-to-tensorboard " \
           "without --tensorboard-dir or --wandb-project: nothing is written" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        parse_run_config(base + flags + ["--tensorboard-dir", "/tmp/tb"])
    assert "without --tensorboard-dir" not in caplog.text
    with pytest.raises(SystemExit):
        parse_run_config(base + ["--timing-log-level", "3"])
    with pytest.raises(ConsaConfigError, match="timing_log_option='median' is invalid: use one of max, minmax, all"):
        TrainingConfig(timing_log_option="median").validate(dp_size=1)
    # W&B: its files under --save by default; its other flags alone warn
    t = parse_run_config(base + ["--wandb-project", "p", "--save", "/runs/a"]).training
    assert t.wandb_init() == {"project": "p", "name": None, "dir": "/runs/a/wandb", "entity": None}
    t = parse_run_config(base + ["--wandb-project", "p", "--wandb-exp-name", "e", "--wandb-save-dir", "/wb",
                                 "--wandb-entity", "team"]).training
    assert t.wandb_init() == {"project": "p", "name": "e", "dir": "/wb", "entity": "team"}
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert parse_run_config(base + ["--wandb-exp-name", "e"]).training.wandb_init() is None
    assert "--wandb-exp-name without --wandb-project: ignored" in caplog.text
    with pytest.raises(ConsaConfigError, match="wandb_save_dir=None is invalid: wandb_project needs"):
        TrainingConfig(wandb_project="p").validate(dp_size=1)


@pytest.mark.parametrize("layers,pp,first,last", [
    (8, 2, 3, None), (8, 2, None, 3), (8, 3, 2, 2), (10, 4, 1, 3), (9, 4, 3, None), (12, 4, None, None), (4, 2, 1, None),
])
def test_uneven_pipeline_stages_split_as_megatron_core_builds_them(layers, pp, first, last):
    """--decoder-first/last-pipeline-num-layers: each stage's global layers, as megatron-core's own
    offset and layer count give them (what the model builds)."""
    import megatron_consa  # noqa: F401
    import torch
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.transformer_block import get_num_layers_to_build
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    parallel = ParallelConfig(pipeline_model_parallel_size=pp, decoder_first_pipeline_num_layers=first,
                              decoder_last_pipeline_num_layers=last)
    config = TransformerConfig(num_layers=layers, hidden_size=8, num_attention_heads=1, pipeline_dtype=torch.float32,
                               **{k: v for k, v in parallel.megatron_fields().items()
                                  if k.startswith(("pipeline", "num_layers_in"))})
    built = []
    for rank in range(pp):
        start = get_transformer_layer_offset(config, pp_rank=rank)
        built.append(range(start, start + get_num_layers_to_build(config, pp_rank=rank)))
    assert parallel.stage_layers(layers) == built
    parallel.validate(num_layers=layers, num_kv_heads=2, world_size=pp)


def test_uneven_pipeline_stages_that_do_not_fit_are_refused():
    from megatron_consa.training.arguments import ArgumentError, parse_run_config

    base = ["--num-layers", "8", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "32",
            "--train-iters", "4", "--mock-data", "--vocab-size", "64", "--consa-target-warmup-iters", "1"]
    p = parse_run_config(base + ["--pipeline-model-parallel-size", "2", "--decoder-last-pipeline-num-layers", "3"])
    assert (p.parallel.decoder_first_pipeline_num_layers, p.parallel.stage_layers(8)) == (None, [range(5), range(5, 8)])
    for kw, message in (
        (dict(pipeline_model_parallel_size=3, decoder_first_pipeline_num_layers=3),
         "decoder_first_pipeline_num_layers=3 is invalid: the other 2 of 3 stages must share the remaining 5 of"),
        (dict(pipeline_model_parallel_size=2, decoder_first_pipeline_num_layers=4, decoder_last_pipeline_num_layers=3),
         "the other 0 of 2 stages must share the remaining 1"),
        (dict(decoder_first_pipeline_num_layers=2), "needs pipeline_model_parallel_size >= 2"),
        (dict(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2,
              decoder_first_pipeline_num_layers=2), "goes with even pipeline stages here"),
    ):
        with pytest.raises(ConsaConfigError, match=re.escape(message)):
            ParallelConfig(**kw).validate(num_layers=8, num_kv_heads=2, world_size=kw.get("pipeline_model_parallel_size", 1))
    with pytest.raises(ArgumentError, match="--num-layers-per-virtual-pipeline-stage goes with even pipeline stages"):
        parse_run_config(base + ["--pipeline-model-parallel-size", "2", "--decoder-first-pipeline-num-layers", "2",
                                 "--num-layers-per-virtual-pipeline-stage", "1"])
    with pytest.raises(ArgumentError, match="--account-for-embedding-in-pipeline-split: give the stages' layers"):
        parse_run_config(base + ["--account-for-embedding-in-pipeline-split"])
    with pytest.raises(ArgumentError, match="--num-experts: megatron-consa's models are dense"):
        parse_run_config(base + ["--num-experts", "8"])


def test_blends_from_files_as_megatron_lm_reads_them(tmp_path):
    """--data-args-path: --data-path's arguments in a file; --per-split-data-args-path: each
    split's in a JSON object (a list, or one string); bad files are refused by name."""
    from megatron_consa.training.arguments import ArgumentError, parse_run_config

    base = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "32",
            "--train-iters", "4", "--vocab-size", "64", "--tokenizer-type", "NullTokenizer",
            "--consa-target-warmup-iters", "1"]
    (tmp_path / "blend.txt").write_text("0.3 /data/a_text_document\n0.7 /data/b_text_document\n")
    data = parse_run_config(base + ["--data-args-path", str(tmp_path / "blend.txt")]).data
    assert data.data_path == ["0.3", "/data/a_text_document", "0.7", "/data/b_text_document"]
    (tmp_path / "splits.json").write_text(json.dumps({"train": ["1", "/data/a", "2", "/data/b"], "valid": "/data/v",
                                                      "test": None}))
    data = parse_run_config(base + ["--per-split-data-args-path", str(tmp_path / "splits.json")]).data
    assert (data.train_data_path, data.valid_data_path, data.test_data_path) == (["1", "/data/a", "2", "/data/b"],
                                                                                 ["/data/v"], [])
    (tmp_path / "bad.json").write_text('{"train": ["/data/a"],}')
    (tmp_path / "keys.json").write_text('{"training": ["/data/a"]}')
    (tmp_path / "empty.txt").write_text("\n")
    for flags, message in (
        (["--data-args-path", str(tmp_path / "missing.txt")], "--data-args-path " + str(tmp_path / "missing.txt")),
        (["--data-args-path", str(tmp_path / "empty.txt")], "the file is empty"),
        (["--data-args-path", str(tmp_path / "blend.txt"), "--data-path", "/data/c"], "give the blend one way"),
        (["--per-split-data-args-path", str(tmp_path / "bad.json")], "not JSON"),
        (["--per-split-data-args-path", str(tmp_path / "keys.json")], 'keys among "train", "valid", "test"'),
        (["--per-split-data-args-path", str(tmp_path / "splits.json"), "--train-data-path", "/data/c"],
         "give the blends one way"),
    ):
        with pytest.raises(ArgumentError, match=re.escape(message)):
            parse_run_config(base + flags)


def test_use_checkpoint_args_takes_the_model_from_the_load_checkpoint():
    from megatron_consa.training.arguments import ArgumentError, parse_run_config

    ckpt = str(ROOT / "examples" / "checkpoints" / "demo_dense")
    base = ["--seq-length", "32", "--train-iters", "4", "--mock-data", "--vocab-size", "64",
            "--consa-target-warmup-iters", "1", "--load", ckpt, "--finetune"]
    assert parse_run_config(base + ["--use-checkpoint-args"]).arch == parse_run_config(base + ["--hf-config", ckpt]).arch
    with pytest.raises(ArgumentError, match="--use-checkpoint-args and --hf-config: give one"):
        parse_run_config(base + ["--use-checkpoint-args", "--hf-config", ckpt])
    # a Megatron-LM script's shape flags beside it: accepted when they agree, named when they do not
    arch = parse_run_config(base + ["--use-checkpoint-args"]).arch
    agree = ["--num-layers", str(arch.num_layers), "--hidden-size", str(arch.hidden_size), "--num-query-groups",
             str(arch.num_kv_heads), "--ffn-hidden-size", str(arch.intermediate_size), "--kv-channels",
             str(arch.head_dim or arch.hidden_size // arch.num_attention_heads), "--rotary-base",
             f"{arch.rope_theta:g}", "--norm-epsilon", f"{arch.rms_norm_eps:g}", "--max-position-embeddings",
             str(arch.max_position_embeddings)] + (["--qk-layernorm"] if arch.qk_norm else [])
    assert parse_run_config(base + ["--use-checkpoint-args"] + agree).arch == arch
    with pytest.raises(ArgumentError, match=rf"--num-layers {arch.num_layers + 1}: --load's checkpoint .* has "
                                            rf"{arch.num_layers}; drop the flag"):
        parse_run_config(base + ["--use-checkpoint-args", "--num-layers", str(arch.num_layers + 1)])
    with pytest.raises(ArgumentError, match="give --load"):
        parse_run_config(base[:-3] + ["--use-checkpoint-args"])
    with pytest.raises(ArgumentError, match="--use-checkpoint-args: --load /nowhere: no config.json there"):
        parse_run_config(base[:-3] + ["--load", "/nowhere", "--finetune", "--use-checkpoint-args"])


def test_use_checkpoint_args_with_ckpt_step_reads_that_checkpoints_model(tmp_path):
    """--use-checkpoint-args --ckpt-step N: the model of iteration N's checkpoint, not the latest's."""
    import shutil

    from megatron_consa.training.arguments import parse_run_config

    demo = ROOT / "examples" / "checkpoints" / "demo_dense"
    save = tmp_path / "save"
    for iteration, layers in ((4, None), (8, 6)):  # (the latest describes another model)
        ckpt = save / f"iter_{iteration:07d}"
        ckpt.mkdir(parents=True)
        for name in ("config.json", "consa_run.json"):
            shutil.copy(demo / name, ckpt / name)
        if layers:
            config = json.loads((ckpt / "config.json").read_text())
            config.update(num_hidden_layers=layers, layer_types=[config["layer_types"][0]] * layers)
            (ckpt / "config.json").write_text(json.dumps(config))
    (save / "latest_checkpointed_iteration.txt").write_text("8\n")
    base = ["--seq-length", "32", "--train-iters", "4", "--mock-data", "--vocab-size", "64",
            "--consa-target-warmup-iters", "1", "--load", str(save), "--finetune", "--use-checkpoint-args"]
    expected = parse_run_config(base[:-4] + ["--hf-config", str(demo)]).arch
    assert parse_run_config(base + ["--ckpt-step", "4"]).arch == expected
    assert parse_run_config(base).arch.num_layers == 6


@pytest.mark.parametrize("flags,message", [
    ([], "give the run's length: --train-iters (optimizer steps) or --train-samples"),
    (["--train-samples", "80", "--train-iters", "10", "--global-batch-size", "8"], "--train-iters and --train-samples: give one"),
    (["--train-iters", "10", "--lr-decay-samples", "40"], "--lr-decay-samples: a schedule in samples goes with --train-samples"),
    (["--train-samples", "80"], "--train-samples needs --global-batch-size"),
    (["--train-samples", "4", "--global-batch-size", "8"], "--train-samples 4: must be at least one iteration's --global-batch-size 8"),
    (["--train-samples", "80", "--global-batch-size", "8", "--lr-decay-iters", "5"], "--lr-decay-iters with --train-samples"),
    (["--train-samples", "80", "--global-batch-size", "8", "--lr-warmup-samples", "8", "--lr-warmup-fraction", "0.1"],
     "--lr-warmup-samples and --lr-warmup-fraction: give one"),
])
def test_a_schedule_in_samples_is_refused_where_it_cannot_mean_one_thing(flags, message):
    from megatron_consa.training.arguments import ArgumentError, parse_run_config

    base = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "32",
            "--mock-data", "--vocab-size", "64", "--consa-target-warmup-iters", "0"]
    with pytest.raises(ArgumentError, match=re.escape(message)):
        parse_run_config(base + flags)


@pytest.mark.parametrize("flags,message", [
    (["--grad-reduce-in-bf16"], "--grad-reduce-in-bf16 is for bf16 training: add --bf16"),
    (["--decoupled-min-lr", "1e-5"], "--decoupled-min-lr goes with --decoupled-lr"),
    (["--attention-backend", "local", "--consa-backend", "te"], "--attention-backend local turns Transformer Engine's"),
    (["--attention-backend", "flashy"], "argument --attention-backend: invalid choice: 'flashy'"),
])
def test_megatron_lm_kernel_and_optimizer_flags_that_cannot_hold_are_refused(flags, message, capsys):
    from megatron_consa.training.arguments import ArgumentError, parse_run_config

    base = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "32",
            "--train-iters", "2", "--mock-data", "--vocab-size", "64", "--consa-target-warmup-iters", "0"]
    with pytest.raises((ArgumentError, SystemExit)) as err:
        parse_run_config(base + flags)
    assert message in (str(err.value) if err.type is ArgumentError else capsys.readouterr().err)


@pytest.mark.parametrize("kw,field", [
    (dict(decoupled_lr=1e-4, decoupled_min_lr=1e-3), "decoupled_min_lr"),
    (dict(decoupled_lr=1e-5, min_lr=3e-5), "min_lr"),  # the embedding's decay would end above its peak
    (dict(decoupled_min_lr=1e-5), "decoupled_min_lr"),
    (dict(grad_reduce_in_bf16=True), "grad_reduce_in_bf16"),
    (dict(attention_backend="flashy"), "attention_backend"),
    (dict(empty_unused_memory_level=3), "empty_unused_memory_level"),
    (dict(deterministic_mode=True, cross_entropy_loss_fusion=True), "cross_entropy_loss_fusion.*--deterministic-mode"),
    (dict(override_opt_param_scheduler=True, use_checkpoint_opt_param_scheduler=True),
     "use_checkpoint_opt_param_scheduler"),
    # megatron-core's schedule asserts warm-up < decay: the decay must end after the warm-up
    (dict(train_iters=5, lr_warmup_iters=5, lr_decay_style="cosine"), "lr_warmup_iters=5 is invalid: the cosine decay "
                                                                      "ends at iteration 5"),
    (dict(train_iters=9, lr_warmup_iters=5, lr_decay_iters=3, lr_decay_style="linear"),
     "lr_warmup_iters=5 is invalid: the linear decay ends at iteration 3"),
])
def test_bad_kernel_and_optimizer_settings_name_the_field(kw, field):
    with pytest.raises(ConsaConfigError, match=field):
        TrainingConfig(**kw).validate(dp_size=1)


@pytest.mark.parametrize("warmup", [5, 20, 100])
def test_a_learn_run_too_short_for_its_judged_tail_is_refused_before_any_work(warmup):
    """The run ends before its target warm-up, or its judged tail (the last 10% of the run, what finalize
    judges) starts inside the warm-up: refused at the start, naming the shortest run finalize could
    accept, which is exactly where the settling judge stops refusing for that reason."""
    from megatron_consa.architecture import ArchitectureConfig
    from megatron_consa.config import ConsaConfig
    from megatron_consa.controller import judge_settling
    from megatron_consa.training.loop import _least_iters, check_learning_run

    arch = ArchitectureConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                              num_attention_heads=4, num_kv_heads=2)
    consa = ConsaConfig(target_warmup_iters=warmup, target_sparsity=0.5)
    least = _least_iters(consa)
    for n in (warmup, least - 1, least):
        records = [[k, 0.5] for k in range(n)]
        in_warmup = "inside the target warm-up" in judge_settling(
            records, target_sparsity=0.5, warmup_iters=warmup, tail_fraction=0.1, tolerance=0.01).reason
        assert in_warmup is (n < least), n
        training = TrainingConfig(train_iters=n, seq_length=1024)
        if n < least:
            with pytest.raises(ConsaConfigError, match=f"train for at least {least} iterations|is not shorter than"):
                check_learning_run(consa, arch=arch, training=training, tp_size=1)
        else:
            check_learning_run(consa, arch=arch, training=training, tp_size=1)
    whole = ConsaConfig(target_warmup_iters=warmup, target_sparsity=0.5, settle_tail_fraction=1.0)
    with pytest.raises(ConsaConfigError, match="judges the whole run, which starts inside the target warm-up"):
        check_learning_run(whole, arch=arch, training=TrainingConfig(train_iters=10 * warmup, seq_length=1024),
                           tp_size=1)


def test_a_learn_run_whose_window_covers_its_sequences_is_warned_about(caplog):
    """With every position inside the window (and sinks), a windowed unit computes what full attention
    does: the gates learn nothing from the loss. Warned once before any work, in flag terms (a smoke
    test's short sequences may mean it); one position past it, or a fixed phase, no warning."""
    from megatron_consa.training.arguments import parse_run_config
    from megatron_consa.training.run import prepare_run

    base = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--num-query-groups", "2",
            "--train-iters", "100", "--mock-data", "--vocab-size", "64", "--consa-target-warmup-iters", "5",
            "--consa-window", "48", "--consa-sink-tokens", "16"]
    said = "--consa-window 48 (and 16 --consa-sink-tokens) covers the whole --seq-length 64"
    for seq, extra, warned in (("64", [], True), ("65", [], False),
                               ("64", ["--consa-phase", "fixed", "--consa-allocation", "all_swa"], False)):
        caplog.clear()
        with caplog.at_level("WARNING", logger="megatron_consa.training.run"):
            prepare_run(parse_run_config(base + ["--seq-length", seq] + extra), world_size=1)
        assert caplog.text.count(said) == int(warned), caplog.text


def test_an_unwritable_tensorboard_dir_is_refused_before_any_work(tmp_path):
    """--tensorboard-dir where a file stands (or under one): refused by prepare_run naming the flag, as --save
    is, not a traceback from TensorBoard's writer after the model is built."""
    from megatron_consa.training.arguments import ArgumentError, parse_run_config
    from megatron_consa.training.run import prepare_run

    base = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--num-query-groups", "2",
            "--seq-length", "32", "--train-iters", "20", "--mock-data", "--vocab-size", "64",
            "--consa-target-warmup-iters", "5"]
    (tmp_path / "file").write_text("x")
    for where in (tmp_path / "file", tmp_path / "file" / "tb"):
        with pytest.raises(ArgumentError, match=re.escape(f"--tensorboard-dir {where}: {tmp_path / 'file'} is a file, "
                                                          "not a directory")):
            prepare_run(parse_run_config(base + ["--tensorboard-dir", str(where)]), world_size=1)
    prepare_run(parse_run_config(base + ["--tensorboard-dir", str(tmp_path / "tb")]), world_size=1)
    assert not (tmp_path / "tb").exists()


def test_a_path_only_another_node_cannot_use_is_reported_by_that_node(tmp_path, monkeypatch, capsys):
    """A path may be missing or unusable on another node's file system alone (a --data-path read, a --save
    written): the first rank of each node reports what it meets, with its rank (a node whose ranks left
    unheard would leave the others waiting at the rendezvous); the other ranks of a node stay quiet."""
    from megatron_consa.train import main

    (tmp_path / "file").write_text("x")
    base = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--num-query-groups", "2",
            "--seq-length", "32", "--train-iters", "20", "--mock-data", "--vocab-size", "64",
            "--consa-target-warmup-iters", "5"]
    for rank, local, argv, said in (
            ("4", "0", ["--tensorboard-dir", str(tmp_path / "file")], f"error: (rank 4) --tensorboard-dir {tmp_path}"),
            ("5", "1", ["--tensorboard-dir", str(tmp_path / "file")], None),  # (that node's first rank reports)
            ("4", "0", ["--save", str(tmp_path / "file" / "run")], "error: (rank 4) --save"),
            ("4", "0", ["--data-path", str(tmp_path / "corpus")], f"error: (rank 4) --data-path {tmp_path / 'corpus'}"),
            ("5", "1", ["--data-path", str(tmp_path / "corpus")], None),  # (both without --mock-data)
            ("4", "0", ["--eval-iters", "0"], "error: (rank 4) --eval-iters")):  # (the same on every node)
        monkeypatch.setenv("RANK", rank)
        monkeypatch.setenv("LOCAL_RANK", local)
        flags = [f for f in base if f != "--mock-data" or "--data-path" not in argv] + argv
        assert main(flags) == 2
        err = capsys.readouterr().err
        assert (said in err) if said else "error:" not in err, err


def test_sequences_past_the_models_positions_are_warned_about(caplog):
    """--seq-length beyond --max-position-embeddings (or --hf-config's): positions the model was not built
    for (the checkpoints record the shorter context); warned as the evaluation tools warn."""
    from megatron_consa.training.arguments import parse_run_config
    from megatron_consa.training.run import prepare_run

    base = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--num-query-groups", "2",
            "--seq-length", "64", "--train-iters", "20", "--mock-data", "--vocab-size", "64",
            "--consa-target-warmup-iters", "5", "--consa-window", "16"]
    for positions, warned in (("32", True), ("64", False)):
        caplog.clear()
        with caplog.at_level("WARNING", logger="megatron_consa.training.run"):
            prepare_run(parse_run_config(base + ["--max-position-embeddings", positions]), world_size=1)
        said = "--seq-length 64: 64 positions, past the model's max_position_embeddings (32)"
        assert (said in caplog.text) is warned, caplog.text


def test_an_early_exit_names_the_flags_its_checkpoint_resumes_with():
    """A run stopped early (--exit-interval, a signal) says how to go on: a checkpoint saved without its
    optimizer state or RNG states resumes only with --no-load-optim / --no-load-rng (prepare_run refuses
    otherwise), so the advice names them."""
    from types import SimpleNamespace

    from megatron_consa.training.run import _relaunch_advice

    def advice(optim: bool, rng: bool) -> str:
        return _relaunch_advice(SimpleNamespace(checkpoint=SimpleNamespace(save="/s", save_optim=optim, save_rng=rng)))

    assert advice(True, True) == "saved to /s; launch again with --load /s to resume"
    assert advice(False, True).endswith("(--no-save-optim); launch again with --load /s --no-load-optim to continue")
    assert advice(True, False).endswith("(--no-save-rng); launch again with --load /s --no-load-rng to continue")
    assert advice(False, False) == ("saved to /s without its optimizer state and its RNG states (--no-save-optim, "
                                    "--no-save-rng); launch again with --load /s --no-load-optim --no-load-rng to "
                                    "continue")


def test_a_damaged_generation_config_beside_the_hf_config_is_refused_before_any_work(tmp_path):
    """Each checkpoint carries the generation_config.json beside --hf-config (generation stops at its EOS
    ids): one that cannot be read is refused by prepare_run, naming the flag and the file."""
    import shutil

    from megatron_consa.training.arguments import ArgumentError, parse_run_config
    from megatron_consa.training.run import prepare_run

    shutil.copyfile(ROOT / "examples" / "checkpoints" / "demo_dense" / "config.json", tmp_path / "config.json")
    base = ["--hf-config", str(tmp_path), "--seq-length", "32", "--train-iters", "20", "--mock-data",
            "--consa-target-warmup-iters", "5", "--consa-window", "8"]
    prepare_run(parse_run_config(base), world_size=1)  # none there: nothing to carry
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": "w3"}')
    with pytest.raises(ArgumentError, match=re.escape(f"--hf-config {tmp_path / 'config.json'}: "
                                                      f"{tmp_path / 'generation_config.json'}"
                                                      ": expected a JSON object whose eos_token_id")):
        prepare_run(parse_run_config(base), world_size=1)


def test_recompute_layer_flags_without_full_recomputation_are_warned_about(caplog):
    """--recompute-method / --recompute-num-layers without any recomputation do nothing (Megatron-LM ignores
    them silently): warned, naming both; with --recompute-granularity full, taken, no warning."""
    from megatron_consa.training.arguments import parse_run_config

    base = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "32",
            "--train-iters", "20", "--mock-data", "--vocab-size", "64", "--recompute-method", "uniform",
            "--recompute-num-layers", "1"]
    for extra, warned in (([], True), (["--recompute-granularity", "full"], False)):
        caplog.clear()
        with caplog.at_level("WARNING", logger="megatron_consa.training.arguments"):
            run = parse_run_config(base + extra)
        said = "--recompute-method uniform and --recompute-num-layers 1 without --recompute-granularity full"
        assert (said in caplog.text) is warned, caplog.text
        assert run.parallel.recompute_granularity == ("full" if extra else None)


def test_a_constant_schedule_may_warm_up_for_the_whole_run():
    """The warm-up-before-decay refusal is for decaying schedules: a constant one may warm up for the whole
    run, and a cosine decay one iteration longer than its warm-up is fine."""
    for style, iters, refused in (("constant", 5, False), ("cosine", 5, True), ("cosine", 6, False)):
        config = TrainingConfig(train_iters=iters, lr_warmup_iters=5, lr_decay_style=style, global_batch_size=4,
                                micro_batch_size=2)
        if refused:
            with pytest.raises(ConsaConfigError, match="lr_warmup_iters=5 is invalid"):
                config.validate(dp_size=1)
        else:
            assert config.validate(dp_size=1) == 2  # (micro-batches per step: the config passed every check)


@pytest.mark.parametrize("flags,message", [
    (["--normalization", "LayerNorm"], "--normalization LayerNorm: megatron-consa's models are Qwen/Llama/Mistral"),
    (["--position-embedding-type", "learned_absolute"], "positions: rope only"),
    (["--ckpt-format", "torch"], "--ckpt-format torch_dist"),
    (["--hidden-dropout", "0.1"], "--hidden-dropout 0.1: these models train without dropout"),
    (["--attention-dropout", "0.1"], "--attention-dropout 0.1"),
    (["--lr-warmup-iters", "3"], "--lr-warmup-iters and --lr-warmup-fraction: give one"),
    (["--lr-decay-iters", "0"], "--lr-decay-iters 0: must be >= 1"),
    (["--rotary-percent", "0.5"], "--rotary-percent 0.5: only --rotary-percent 1 here (RoPE on the whole head dimension)"),
    (["--context-parallel-size", "2"], "--context-parallel-size 2: only --context-parallel-size 1 here (no context parallelism)"),
    (["--apply-layernorm-1p"], "--apply-layernorm-1p: these models' norms keep plain weights"),
    (["--use-legacy-models"], "--use-legacy-models: megatron-consa builds megatron-core's GPTModel"),
    (["--rampup-batch-size", "16", "16", "1000"], "--rampup-batch-size: a ramped batch size moves every later sample"),
    (["--vocab-file", "vocab.json", "--merge-file", "merges.txt"], "--vocab-file: GPT-2 BPE files are not read here"),
    (["--fp8-format", "hybrid", "--fp8-amax-history-len", "1024", "--fp8-param-gather"],
     "--fp8-format: fp8 training is not supported here"),
    (["--recompute-granularity", "full"], "--recompute-activations (selective) and --recompute-granularity full"),
    (["--recompute-method", "uniform"], "--recompute-method uniform chooses the layers full recomputation covers, not "
                                        "selective recomputation (--recompute-activations): replace "
                                        "--recompute-activations with --recompute-granularity full"),
    (["--optimizer", "sgd"], "--optimizer sgd: --optimizer adam only (megatron-core's Adam"),
    (["--dataloader-type", "cyclic"], "--dataloader-type cyclic: --dataloader-type single only"),
    (["--distributed-backend", OTHER_BACKEND], f"--distributed-backend {OTHER_BACKEND}: this machine runs "
                                               f"{distributed_backend()}"),
    (["--use-flash-attn"], "--use-flash-attn and --attention-backend fused: give one"),
    (["--num-distributed-optimizer-instances", "2"], "--num-distributed-optimizer-instances 2: only "
                                                     "--num-distributed-optimizer-instances 1 here (one"),
    (["--dist-ckpt-optim-fully-reshardable"], "--dist-ckpt-optim-fully-reshardable: the distributed optimizer's "
                                              "checkpoints here are megatron-core's dp_reshardable format"),
    (["--rotary-interleaved"], "--rotary-interleaved: Qwen/Llama/Mistral rotate the two halves of each head"),
    (["--apply-query-key-layer-scaling"], "--apply-query-key-layer-scaling: ConSA's core attention scales"),
    (["--lr-warmup-fraction", "1"], "--lr-warmup-fraction 1.0: a warm-up of the whole decay (80 iterations) leaves "
                                    "none to decay"),
    (["--rotary-seq-len-interpolation-factor", "4"], "--rotary-seq-len-interpolation-factor: megatron-core's linear "
                                                     "position interpolation is not part of these models' configs"),
])
def test_megatron_lm_flags_that_disagree_are_refused_by_name(flags, message):
    from megatron_consa.training.arguments import ArgumentError, parse_run_config

    with pytest.raises(ArgumentError, match=re.escape(message)):
        parse_run_config(LLAMA_SCRIPT + flags)


def test_dist_ckpt_strictness_choices_are_megatron_cores():
    import megatron_consa  # noqa: F401  (megatron-core importable)
    from megatron.core.dist_checkpointing.validation import StrictHandling

    from megatron_consa.training.config import DIST_CKPT_STRICTNESS

    assert DIST_CKPT_STRICTNESS == tuple(h.value for h in StrictHandling)


def test_deterministic_mode_sets_or_checks_the_environment_and_reaches_the_model(monkeypatch, capsys):
    """--deterministic-mode: Megatron-LM's NCCL / Transformer Engine / cuBLAS settings where the environment
    has none, a non-deterministic one refused by name before any work, torch's deterministic algorithms on,
    the flag in the typed training config (the model's config: test_trainer); never with the fused cross
    entropy."""
    import torch

    from megatron_consa.train import main
    from megatron_consa.training.arguments import ArgumentError, parse_run_config
    from megatron_consa.training.parallel import DETERMINISTIC_ENV, apply_deterministic_mode, check_deterministic_env

    env = {"CUBLAS_WORKSPACE_CONFIG": ":16:8"}
    was = torch.are_deterministic_algorithms_enabled()
    try:
        apply_deterministic_mode(env)
        assert torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(was)
    assert env == {**DETERMINISTIC_ENV, "CUBLAS_WORKSPACE_CONFIG": ":16:8"}  # (a deterministic value kept)
    check_deterministic_env({"NCCL_ALGO": "Ring,CollnetDirect"})
    for name, value in (("NCCL_ALGO", "Tree"), ("NVTE_ALLOW_NONDETERMINISTIC_ALGO", "1"),
                        ("CUBLAS_WORKSPACE_CONFIG", ":0:0")):
        with pytest.raises(ValueError, match=re.escape(f"--deterministic-mode: {name}={value!r} is not deterministic")):
            check_deterministic_env({name: value})
    base = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "32",
            "--train-iters", "4", "--mock-data", "--vocab-size", "64", "--consa-target-warmup-iters", "1"]
    assert parse_run_config(base + ["--deterministic-mode"]).training.deterministic_mode
    assert main(base + ["--deterministic-mode", "--cross-entropy-loss-fusion"]) == 2
    assert "cross_entropy_loss_fusion" in capsys.readouterr().err
    monkeypatch.setenv("NCCL_ALGO", "Tree")
    assert main(base + ["--deterministic-mode"]) == 2
    assert "--deterministic-mode: NCCL_ALGO='Tree' is not deterministic" in capsys.readouterr().err


def test_distributed_timeout_reaches_the_process_group():
    """--distributed-timeout-minutes is the process group's timeout (a fresh process: the
    test process's world is started already). Setting the layout up again destroys the
    previous one's process groups: their number, and the process's threads, stay the same
    (megatron-core's destroy_model_parallel alone left every gloo group's threads running)."""
    import ast
    import subprocess
    import sys

    code = ("import os, torch, megatron_consa; from megatron_consa.training.config import ParallelConfig;"
            "from megatron_consa.training.parallel import initialize_distributed;"
            "initialize_distributed(ParallelConfig(distributed_timeout_minutes=3.5), seed=0);"
            "print(torch.distributed.group.WORLD._get_backend(torch.device('cpu')).options._timeout);"
            "import gc; counts = [];\n"
            "for _ in range(4):\n"
            "    initialize_distributed(ParallelConfig(), seed=0); gc.collect()\n"
            "    counts.append((len(torch.distributed.distributed_c10d._world.pg_map), len(os.listdir('/proc/self/task'))))\n"
            "print(counts)")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    timeout, counts = out.stdout.strip().splitlines()[-2:]
    assert timeout == "0:03:30"
    counts = ast.literal_eval(counts)
    assert len({groups for groups, _ in counts}) == 1, counts
    assert counts[-1][1] <= counts[0][1], counts


def test_no_load_optim_continues_a_runs_weights_only_checkpoint_but_not_an_import_or_finalize(tmp_path):
    """--no-load-optim resumes (iteration, data position) a --no-save-optim checkpoint of the same
    phase; an import's or finalize's checkpoint, whose iteration is not a position of this run,
    still starts from its weights; --finetune with it is refused."""
    from megatron_consa.config import ConsaConfig
    from megatron_consa.training.arguments import ArgumentError, parse_run_config
    from megatron_consa.training.run import prepare_run

    base = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--num-query-groups", "2",
            "--seq-length", "32", "--train-iters", "20", "--mock-data", "--vocab-size", "64",
            "--consa-target-warmup-iters", "5"]
    consa = ConsaConfig(target_warmup_iters=5).to_dict()
    metas = {"run": {"iteration": 8, "resumable": False, "consa": consa, "architecture": {}, "training": {}},
             "finalized": {"iteration": 0, "resumable": False, "consa": consa, "finalized_from": "x"},
             "imported": {"iteration": 0, "resumable": False, "consa": consa, "conversion": {"from": "huggingface"}}}
    resumes = {}
    for name, meta in metas.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "consa_run.json").write_text(json.dumps(meta))
        for extra in ([], ["--no-load-optim"]):
            resumes[name, bool(extra)] = prepare_run(parse_run_config(base + ["--load", str(tmp_path / name)] + extra),
                                                     world_size=1).resume
    assert resumes == {("run", False): False, ("run", True): True, ("finalized", False): False,
                       ("finalized", True): False, ("imported", False): False, ("imported", True): False}
    with pytest.raises(ArgumentError, match="--finetune with --no-load-optim"):
        parse_run_config(base + ["--load", str(tmp_path / "run"), "--finetune", "--no-load-optim"])


def test_a_phase_refused_over_the_other_phases_save_is_told_to_use_its_own(tmp_path):
    """A fixed phase --load D --save D over a learn phase's checkpoints: without --finetune it is told to add
    it (a learn checkpoint does not resume as a fixed phase); with it, to use its own --save (not to drop
    --finetune again, which would send it round in circles)."""
    from megatron_consa.config import ConsaConfig
    from megatron_consa.training.arguments import ArgumentError, parse_run_config
    from megatron_consa.training.run import prepare_run

    save = tmp_path / "learn"
    (save / "iter_0000008").mkdir(parents=True)
    (save / "latest_checkpointed_iteration.txt").write_text("8")
    (save / "iter_0000008" / "consa_run.json").write_text(json.dumps(
        {"iteration": 8, "resumable": True, "consa": ConsaConfig(target_warmup_iters=5).to_dict(),
         "architecture": {}, "training": {}}))
    base = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--num-query-groups", "2",
            "--seq-length", "32", "--train-iters", "20", "--mock-data", "--vocab-size", "64",
            "--consa-phase", "fixed", "--consa-allocation", "all_fa", "--load", str(save), "--save", str(save)]
    with pytest.raises(ArgumentError, match="cannot be resumed as a fixed phase; add --finetune"):
        prepare_run(parse_run_config(base), world_size=1)
    with pytest.raises(ArgumentError, match="they are a learn phase's: a fixed phase needs its own --save"):
        prepare_run(parse_run_config(base + ["--finetune"]), world_size=1)


def test_use_checkpoint_schedule_warns_where_it_has_no_effect(tmp_path, caplog):
    """--use-checkpoint-opt_param-scheduler matters only on a resume that loads the optimizer: a start
    from a run's weights (--finetune) or a --no-load-optim continuation says it follows its own flags."""
    from megatron_consa.config import ConsaConfig
    from megatron_consa.training.arguments import parse_run_config
    from megatron_consa.training.run import prepare_run

    base = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--num-query-groups", "2",
            "--seq-length", "32", "--train-iters", "20", "--mock-data", "--vocab-size", "64",
            "--consa-target-warmup-iters", "5", "--use-checkpoint-opt_param-scheduler"]
    meta = {"iteration": 8, "resumable": True, "consa": ConsaConfig(target_warmup_iters=5).to_dict(),
            "architecture": {}, "training": {"lr": 3e-4, "min_lr": 3e-5}}
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "consa_run.json").write_text(json.dumps(meta))
    said = {}
    for name, extra in {"finetune": ["--finetune"], "no-load-optim": ["--no-load-optim"], "none": []}.items():
        caplog.clear()
        with caplog.at_level("WARNING", logger="megatron_consa.training.run"):
            prepare_run(parse_run_config(base + ["--load", str(tmp_path / "run")] + extra), world_size=1)
        said[name] = caplog.text
    assert "has no effect here: this run starts a new schedule" in said["finetune"]
    assert "has no effect here: this run does not load the optimizer state (--no-load-optim)" in said["no-load-optim"]
    assert "has no effect" not in said["none"]


@pytest.mark.parametrize("saved,flags,message", [
    # saved before --decoupled-lr existed: its optimizer has no group of its own for the embedding
    ({"lr": 3e-4, "min_lr": 3e-5, "weight_decay": 0.1}, ["--decoupled-lr", "1e-3"],
     "saved without --decoupled-lr, this run asks for --decoupled-lr 0.001"),
    # the distributed optimizer keeps its state per (parameter dtype, gradient dtype)
    ({"bf16": True, "grad_reduce_in_bf16": False}, ["--bf16", "--use-distributed-optimizer", "--grad-reduce-in-bf16"],
     "saved without --grad-reduce-in-bf16 and the distributed optimizer"),
    ({"bf16": True}, ["--bf16", "--use-distributed-optimizer", "--grad-reduce-in-bf16"],
     "saved without --grad-reduce-in-bf16 and the distributed optimizer"),
])
def test_a_resume_that_would_not_fit_the_saved_optimizer_is_refused(tmp_path, saved, flags, message):
    """What dist_checkpointing would fail on deep in the load (a KeyError on a parameter group or
    bucket), refused before any work, naming the flag; --no-load-optim continues with a new optimizer."""
    from megatron_consa.config import ConsaConfig
    from megatron_consa.training.arguments import ArgumentError, parse_run_config
    from megatron_consa.training.run import prepare_run

    base = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--num-query-groups", "2",
            "--seq-length", "32", "--train-iters", "20", "--mock-data", "--vocab-size", "64",
            "--consa-target-warmup-iters", "5"]
    meta = {"iteration": 8, "resumable": True, "consa": ConsaConfig(target_warmup_iters=5).to_dict(),
            "architecture": {}, "training": saved,
            "parallel": {"use_distributed_optimizer": "--use-distributed-optimizer" in flags}}
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "consa_run.json").write_text(json.dumps(meta))
    with pytest.raises(ArgumentError, match=re.escape(message)):
        prepare_run(parse_run_config(base + flags + ["--load", str(tmp_path / "run")]), world_size=1)
    assert prepare_run(parse_run_config(base + flags + ["--load", str(tmp_path / "run"), "--no-load-optim"]),
                       world_size=1).resume


@pytest.mark.parametrize("shape", [["--hidden-size", "65", "--num-attention-heads", "4"],
                                   ["--hidden-size", "64", "--num-attention-heads", "3", "--kv-channels", "16"]])
def test_a_shape_no_checkpoint_config_can_describe_is_refused_before_any_work(shape):
    """Each checkpoint carries a Hugging Face config.json built from the shape flags: transformers' Llama
    refuses a hidden size that is not a multiple of the head count (even with --kv-channels), which would
    otherwise end the run at its first save, after the work; Qwen3 (--qk-layernorm) takes it."""
    from megatron_consa.training.arguments import ArgumentError, parse_run_config
    from megatron_consa.training.run import prepare_run

    base = ["--num-layers", "2", "--seq-length", "32", "--train-iters", "20", "--mock-data", "--vocab-size", "64",
            "--consa-target-warmup-iters", "5", "--consa-granularity", "layer", "--consa-target-sparsity", "0.5"]
    hidden, heads = shape[1], shape[3]
    with pytest.raises(ArgumentError, match=re.escape(
            f"--hidden-size {hidden}, --num-attention-heads {heads}: the checkpoints' config.json (llama) cannot "
            f"describe this model (The hidden size ({hidden}) is not a multiple of the number of attention heads "
            f"({heads})); choose a hidden size that is a multiple of the head count")):
        prepare_run(parse_run_config(base + shape), world_size=1)
    if "--kv-channels" in shape:
        assert prepare_run(parse_run_config(base + shape + ["--qk-layernorm"]), world_size=1).run.arch.head_dim == 16
    # an odd head dimension (no RoPE over it): the advice names the head dimension, not the multiple
    odd = ["--hidden-size", "99", "--num-attention-heads", "3", "--qk-layernorm"]
    with pytest.raises(ArgumentError, match=re.escape("choose an even head dimension (--kv-channels, else "
                                                      "--hidden-size / --num-attention-heads: 33 now)")):
        prepare_run(parse_run_config(base + odd), world_size=1)


def test_the_first_launch_of_load_d_save_d_starts_from_random_weights(tmp_path, caplog):
    """A job script's `--load D --save D` (the same command at every requeue): while D holds no checkpoint,
    the run starts from random weights with a warning, as Megatron-LM's; a --load elsewhere holding none
    is still refused (a mistyped path), and so are flags that need a checkpoint to read."""
    from megatron_consa.training.arguments import ArgumentError, parse_run_config
    from megatron_consa.training.run import prepare_run

    base = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--num-query-groups", "2",
            "--seq-length", "32", "--train-iters", "20", "--mock-data", "--vocab-size", "64",
            "--consa-target-warmup-iters", "5"]
    job = tmp_path / "job"
    for made in (False, True):  # no directory yet; one a job wrote its logs into before the first save
        if made:
            job.mkdir()
            (job / "slurm.log").write_text("x")
        caplog.clear()
        with caplog.at_level("WARNING", logger="megatron_consa.training.arguments"):
            prepared = prepare_run(parse_run_config(base + ["--load", str(job), "--save", str(job)]), world_size=1)
        assert prepared.load_dir is None and not prepared.resume and prepared.run.checkpoint.save == str(job)
        assert f"--load {job} holds no checkpoint yet: starting from random weights (as Megatron-LM)" in caplog.text
    with pytest.raises(ArgumentError, match=re.escape(f"--load {tmp_path / 'elsewhere'}: no such directory")):
        prepare_run(parse_run_config(base + ["--load", str(tmp_path / "elsewhere"), "--save", str(job)]), world_size=1)
    with pytest.raises(ArgumentError, match=re.escape(f"--load {job}: neither a checkpoint")):  # Megatron-LM's flag
        prepare_run(parse_run_config(base + ["--load", str(job), "--save", str(job), "--exit-on-missing-checkpoint"]),
                    world_size=1)
    for extra in (["--finetune"], ["--ckpt-step", "4"]):
        with pytest.raises(ArgumentError, match=re.escape(f"{extra[0]}: --load {job} holds no checkpoint yet")):
            parse_run_config(base + ["--load", str(job), "--save", str(job)] + extra)


@pytest.mark.parametrize("saved_gates_only", [True, False])
def test_a_resume_that_turns_gates_only_on_or_off_is_refused(tmp_path, saved_gates_only):
    """--consa-gates-only trains another set of parameters (another optimizer's parameter groups): a
    resume that switches it is refused naming the flag, before megatron-core fails to merge the groups."""
    from megatron_consa.config import ConsaConfig
    from megatron_consa.training.arguments import ArgumentError, parse_run_config
    from megatron_consa.training.run import prepare_run

    base = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--num-query-groups", "2",
            "--seq-length", "32", "--train-iters", "20", "--mock-data", "--vocab-size", "64",
            "--consa-target-warmup-iters", "5"]
    meta = {"iteration": 8, "resumable": True,
            "consa": ConsaConfig(target_warmup_iters=5, gates_only=saved_gates_only).to_dict(),
            "architecture": {}, "training": {}}
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "consa_run.json").write_text(json.dumps(meta))
    same = ["--consa-gates-only"] if saved_gates_only else []
    other = [] if saved_gates_only else ["--consa-gates-only"]
    message = ("saved with --consa-gates-only, this run asks for no --consa-gates-only" if saved_gates_only else
               "saved without --consa-gates-only, this run asks for --consa-gates-only")
    with pytest.raises(ArgumentError, match=re.escape(message)):
        prepare_run(parse_run_config(base + other + ["--load", str(tmp_path / "run")]), world_size=1)
    for extra in (same, other + ["--no-load-optim"], other + ["--finetune"]):
        prepare_run(parse_run_config(base + extra + ["--load", str(tmp_path / "run")]), world_size=1)


def test_a_model_sized_by_its_tokenizer_pads_the_vocabulary_as_megatron_lm(tmp_path):
    """--make-vocab-size-divisible-by (default 128) times the TP size; --vocab-size is taken as it is."""
    import sys

    sys.path.insert(0, str(ROOT / "tests"))
    from tokenizer_fixtures import hf_tokenizer_dir

    from megatron_consa.training.arguments import ArgumentError, parse_run_config
    from megatron_consa.training.run import prepare_run

    tok = hf_tokenizer_dir(["some text to train a tokenizer on, with words and more words"] * 20, tmp_path / "tok")
    base = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--num-query-groups", "2",
            "--seq-length", "32", "--train-iters", "20", "--mock-data", "--consa-target-warmup-iters", "5",
            "--tokenizer-model", str(tok)]
    sizes = {}
    for name, extra, world in (("default", [], 1), ("64", ["--make-vocab-size-divisible-by", "64"], 1),
                               ("64 at TP2", ["--make-vocab-size-divisible-by", "64",
                                              "--tensor-model-parallel-size", "2"], 2)):
        prepared = prepare_run(parse_run_config(base + extra), world_size=world)
        sizes[name] = (prepared.tokenizer.vocab_size, prepared.run.arch.vocab_size)
    n = sizes["default"][0]
    assert -(-n // 64) * 64 != -(-n // 128) * 128, n  # (so the flag shows)
    assert sizes == {"default": (n, -(-n // 128) * 128), "64": (n, -(-n // 64) * 64),
                     "64 at TP2": (n, -(-n // 128) * 128)}
    with pytest.raises(ArgumentError, match="--make-vocab-size-divisible-by 0: must be >= 1"):
        parse_run_config(base + ["--make-vocab-size-divisible-by", "0"])


@pytest.mark.parametrize("flags,message", [
    (["--untie-embeddings-and-output-weights"], "--untie-embeddings-and-output-weights: the checkpoint has True, "
                                                "this run's model False"),
    (["--rotary-base", "10000"], "--rotary-base: the checkpoint has 10000.0, this run's model 1000000.0"),
    (["--ffn-hidden-size", "96"], "--ffn-hidden-size: the checkpoint has 96, this run's model 128"),
    (["--kv-channels", "16"], "--kv-channels: the checkpoint has 16, this run's model 8"),
    (["--add-qkv-bias"], "--add-qkv-bias: the checkpoint has True, this run's model False"),
    (["--norm-epsilon", "1e-5"], "--norm-epsilon: the checkpoint has 1e-05, this run's model 1e-06"),
    (["--use-rope-scaling"], "--use-rope-scaling: the checkpoint has True, this run's model False"),
    (["--vocab-size", "128"], "--vocab-size: the checkpoint has 128, this run's model 64"),
])
def test_a_load_of_another_model_is_refused_naming_the_flag(tmp_path, flags, message):
    """Every field of the saved model is checked against the run's, by the flag that sets it: a
    resume or a start from weights of another model (an untied output layer, another RoPE base)
    would otherwise load what matches and drop or keep the rest silently. A longer context
    (--max-position-embeddings) is not another model."""
    from megatron_consa.config import ConsaConfig
    from megatron_consa.training.arguments import ArgumentError, parse_run_config
    from megatron_consa.training.run import prepare_run

    base = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--num-query-groups", "2",
            "--seq-length", "32", "--train-iters", "20", "--mock-data", "--vocab-size", "64",
            "--consa-target-warmup-iters", "5"]
    saved = parse_run_config(base + flags + ["--max-position-embeddings", "16"])
    meta = {"iteration": 8, "resumable": True, "consa": ConsaConfig(target_warmup_iters=5).to_dict(),
            "architecture": saved.arch.__dict__, "training": {}}
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "consa_run.json").write_text(json.dumps(meta))
    for extra in ([], ["--finetune"]):
        with pytest.raises(ArgumentError, match=re.escape(f"--load {tmp_path / 'run'}: {message}: describe the model")):
            prepare_run(parse_run_config(base + extra + ["--load", str(tmp_path / "run")]), world_size=1)
    assert prepare_run(parse_run_config(base + flags + ["--load", str(tmp_path / "run")]), world_size=1).resume


def test_a_model_sized_by_its_tokenizer_loads_its_checkpoint_at_another_tp(tmp_path):
    """The vocabulary padded from the tokenizer depends on the TP size (128 x TP rows); a checkpoint
    saved at another TP keeps its own padding where it holds the tokenizer and splits over this TP."""
    import sys

    sys.path.insert(0, str(ROOT / "tests"))
    from tokenizer_fixtures import hf_tokenizer_dir

    from megatron_consa.config import ConsaConfig
    from megatron_consa.training.arguments import ArgumentError, parse_run_config
    from megatron_consa.training.run import prepare_run

    tok = hf_tokenizer_dir(["some text to train a tokenizer on, with words and more words"] * 20, tmp_path / "tok")
    base = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--num-query-groups", "2",
            "--seq-length", "32", "--train-iters", "20", "--mock-data", "--consa-target-warmup-iters", "5",
            "--tokenizer-model", str(tok), "--make-vocab-size-divisible-by", "64"]
    at_tp1 = prepare_run(parse_run_config(base), world_size=1).run.arch
    at_tp2 = prepare_run(parse_run_config(base + ["--tensor-model-parallel-size", "2"]), world_size=2).run.arch
    assert at_tp1.vocab_size != at_tp2.vocab_size  # (so the case shows)
    for name, arch in (("tp1", at_tp1), ("tp2", at_tp2)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "consa_run.json").write_text(json.dumps(
            {"iteration": 8, "resumable": True, "consa": ConsaConfig(target_warmup_iters=5).to_dict(),
             "architecture": arch.__dict__, "training": {}}))
    loaded = prepare_run(parse_run_config(base + ["--tensor-model-parallel-size", "2", "--load", str(tmp_path / "tp1")]),
                         world_size=2)
    assert loaded.resume and loaded.run.arch.vocab_size == at_tp1.vocab_size
    assert prepare_run(parse_run_config(base + ["--load", str(tmp_path / "tp2")]), world_size=1).run.arch == at_tp2
    with pytest.raises(ArgumentError, match=re.escape(f"--vocab-size: the checkpoint has {at_tp1.vocab_size}")):
        prepare_run(parse_run_config(base + ["--vocab-size", str(at_tp2.vocab_size), "--load", str(tmp_path / "tp1")]),
                    world_size=1)


def test_save_directory_problems_are_named_before_any_work_and_nothing_is_made(tmp_path):
    """--save is checked where it would be made: a file in its place or in its path, and a directory this
    process cannot write in (a read-only mode; root writes anywhere, so that case is checked only as a
    user), each refused naming --save; a good path is not created by the check."""
    import os

    from megatron_consa.training.arguments import ArgumentError
    from megatron_consa.training.run import _check_save_dir

    (tmp_path / "file").write_text("x")
    with pytest.raises(ArgumentError, match=f"--save {tmp_path / 'file'}: exists and is not a directory"):
        _check_save_dir(str(tmp_path / "file"))
    with pytest.raises(ArgumentError, match=f"--save {tmp_path / 'file' / 'a'}: {tmp_path / 'file'} is a file, "
                                            "not a directory; choose a directory you can write"):
        _check_save_dir(str(tmp_path / "file" / "a"))
    _check_save_dir(str(tmp_path / "new" / "run"))
    assert not (tmp_path / "new").exists()
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    if os.geteuid() != 0:
        with pytest.raises(ArgumentError, match=f"--save {locked / 'run'}: {locked} is not writable"):
            _check_save_dir(str(locked / "run"))
    # a checkpoint (an import, one iter_* of a run) or finalize's output: its iter_* would shadow what it holds
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "consa_run.json").write_text("{}")
    (tmp_path / "finalized" / "checkpoint").mkdir(parents=True)
    (tmp_path / "finalized" / "checkpoint" / "consa_run.json").write_text("{}")
    for path, what in (("ckpt", "a checkpoint (it holds consa_run.json)"),
                       ("finalized", "finalize's output (it holds checkpoint/consa_run.json)")):
        with pytest.raises(ArgumentError, match=re.escape(f"--save {tmp_path / path}: {what}, not a --save directory")):
            _check_save_dir(str(tmp_path / path))


def test_straggler_flags_reach_the_training_config_and_bad_values_name_the_flag(capsys):
    """Megatron-LM's straggler-detector flags land in TrainingConfig; a port or count out of range, or no
    log lines to report at, is refused naming the flag, before any work."""
    from megatron_consa.train import main
    from megatron_consa.training.arguments import parse_run_config

    base = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "32",
            "--train-iters", "4", "--mock-data", "--vocab-size", "64", "--consa-target-warmup-iters", "1"]
    t = parse_run_config(base).training
    assert (t.log_straggler, t.straggler_ctrlr_port, t.straggler_minmax_count, t.disable_straggler_on_startup) == (
        False, 65535, 1, False)
    t = parse_run_config(base + ["--log-straggler", "--straggler-ctrlr-port", "6000", "--straggler-minmax-count",
                                 "4", "--disable-straggler-on-startup"]).training
    assert (t.log_straggler, t.straggler_ctrlr_port, t.straggler_minmax_count, t.disable_straggler_on_startup) == (
        True, 6000, 4, True)
    for flag, value, why in (("--straggler-ctrlr-port", "70000", "must be a port, 1 to 65535"),
                             ("--straggler-minmax-count", "0", "must be >= 1"),
                             ("--log-interval", "0", "reports at the log lines: needs")):
        assert main(base + ["--log-straggler", flag, value]) == 2
        err = capsys.readouterr().err
        assert flag in err and why in err, err


def test_a_vocabulary_that_does_not_split_over_tp_is_refused_before_any_work():
    """megatron-core's vocab-parallel embedding asserts an even split deep in model building, on every
    rank after start-up: refused by the flag first, with a multiple that works."""
    from megatron_consa.training.arguments import ArgumentError, parse_run_config
    from megatron_consa.training.run import prepare_run

    base = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--num-query-groups", "2",
            "--seq-length", "32", "--train-iters", "20", "--mock-data", "--consa-target-warmup-iters", "5",
            "--tensor-model-parallel-size", "2"]
    with pytest.raises(ArgumentError, match=re.escape("--vocab-size 501: a vocabulary of 501 does not split over "
                                                      "--tensor-model-parallel-size 2") + ".*e\\.g\\. 512"):
        prepare_run(parse_run_config(base + ["--vocab-size", "501"]), world_size=2)
    prepare_run(parse_run_config(base + ["--vocab-size", "502"]), world_size=2)


def test_learn_phase_flags_in_the_fixed_phase_are_named_as_ignored(caplog):
    """A fixed allocation has no gates, noise or Lagrangian: their --consa-* flags, which a script may share
    between its phases, are ignored with a warning naming them (not silently); the learn phase reads them."""
    from megatron_consa.training.arguments import parse_run_config

    base = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "32",
            "--train-iters", "4", "--mock-data", "--vocab-size", "64"]
    learn_flags = ["--consa-gate-lr", "0.5", "--consa-noise-seed", "7", "--consa-target-warmup-iters", "1",
                   "--consa-init-log-alpha", "20"]  # (out of the gates' range: not even checked where ignored)
    with caplog.at_level("WARNING", logger="megatron_consa.training.arguments"):
        parse_run_config(base + ["--consa-phase", "fixed", "--consa-allocation", "all_fa"])
    assert "ignored" not in caplog.text
    with caplog.at_level("WARNING", logger="megatron_consa.training.arguments"):
        run = parse_run_config(base + ["--consa-phase", "fixed", "--consa-allocation", "all_fa", *learn_flags])
    assert ("--consa-target-warmup-iters, --consa-gate-lr, --consa-noise-seed, --consa-init-log-alpha: for "
            "--consa-phase learn" in caplog.text and "so ignored" in caplog.text)
    assert (run.phase, run.allocation_source) == ("fixed", "all_fa")
    assert (run.consa.gate_lr, run.consa.noise_seed) == (ConsaConfig().gate_lr, ConsaConfig().noise_seed)
    caplog.clear()
    with caplog.at_level("WARNING", logger="megatron_consa.training.arguments"):
        run = parse_run_config(base + learn_flags[:-2])
    assert "ignored" not in caplog.text and (run.consa.gate_lr, run.consa.noise_seed) == (0.5, 7)
    with pytest.raises(ConsaConfigError, match="init_log_alpha"):  # the learn phase checks what it uses
        parse_run_config(base + learn_flags)


def test_help_gives_no_default_for_a_switch_that_turns_something_off():
    """`--no-X` stores False into a setting that is on (True) by default: --help must not read "(default: True)"
    beside it, while an option's own default stays shown (--ckpt-fully-parallel-save is on by default)."""
    import argparse

    from megatron_consa.training.arguments import build_parser

    parser = build_parser()
    formatter = parser._get_formatter()
    shown = {a.option_strings[0]: formatter._expand_help(a) for a in parser._actions if a.option_strings and a.help}
    switches = {a.option_strings[0] for a in parser._actions if isinstance(a, argparse._StoreFalseAction)}
    assert switches >= {"--no-manual-gc-eval", "--no-check-for-nan-in-loss-and-grad", "--no-barrier-with-level-1-timing",
                        "--no-mmap-bin-files", "--no-ckpt-fully-parallel-save"}
    for flag in switches:
        assert "(default:" not in shown[flag], (flag, shown[flag])
    assert shown["--ckpt-fully-parallel-save"].endswith("(default: True)")
    assert shown["--micro-batch-size"].endswith("(default: 1)")
    help_text = " ".join(parser.format_help().split())  # (argparse wraps lines)
    assert " ".join(shown["--no-check-for-nan-in-loss-and-grad"].split()) in help_text


@pytest.mark.parametrize("saved_permute", [None, False, True])
def test_a_distributed_optimizer_resume_builds_the_saved_kv_group_order(tmp_path, saved_permute):
    """A fixed phase resumed with the distributed optimizer's state builds its layers' KV groups in the checkpoint's
    order (a checkpoint from before the reordering records none: megatron's order), since that state is laid out in
    it; without the optimizer state (--no-load-optim) the run reorders them as any new one does."""
    from megatron_consa.config import ConsaConfig
    from megatron_consa.training.arguments import parse_run_config
    from megatron_consa.training.run import prepare_run

    base = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "8", "--num-query-groups", "4",
            "--seq-length", "32", "--train-iters", "20", "--mock-data", "--vocab-size", "64", "--consa-phase", "fixed",
            "--consa-window", "4", "--use-distributed-optimizer", "--lr", "3e-4", "--min-lr", "3e-5"]
    consa = ConsaConfig(window=4, allocation=[[1, 0, 1, 0], [0, 1, 1, 0]]).to_dict()
    if saved_permute is None:
        del consa["permute_kv_groups"]
    else:
        consa["permute_kv_groups"] = saved_permute
    meta = {"iteration": 8, "resumable": True, "consa": consa, "architecture": {},
            "training": {"lr": 3e-4, "min_lr": 3e-5}, "parallel": {"use_distributed_optimizer": True}}
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "consa_run.json").write_text(json.dumps(meta))
    resumed = prepare_run(parse_run_config(base + ["--load", str(tmp_path / "run")]), world_size=1)
    assert resumed.resume and resumed.run.consa.permute_kv_groups is bool(saved_permute)
    fresh_optimizer = prepare_run(parse_run_config(base + ["--load", str(tmp_path / "run"), "--no-load-optim"]),
                                  world_size=1)
    assert fresh_optimizer.resume and fresh_optimizer.run.consa.permute_kv_groups is True


def test_validation_perplexity_is_capped_as_megatron_lms():
    """exp(loss) up to a loss of 20, exp(20) beyond (Megatron-LM's `math.exp(min(20, loss))`): a diverged run's
    validation loss logs a number, not an OverflowError."""
    import math

    from megatron_consa.training.run import validation_perplexity

    assert validation_perplexity(2.5) == math.exp(2.5) and validation_perplexity(20.0) == math.exp(20.0)
    assert validation_perplexity(25.0) == validation_perplexity(1e6) == math.exp(20.0)
