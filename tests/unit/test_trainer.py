"""ConsaTrainer in one process: gates-only mode, fixed-allocation runs, checks before any work,
the controller's wiring (dual steps, bounds, clipping) and settling in the real trainer."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
import sys
from pathlib import Path

import pytest
import torch

import megatron_consa  # noqa: F401
from megatron_consa.config import ConsaConfig, ConsaConfigError
from megatron_consa.model import ArchitectureConfig, unwrap_model
from megatron_consa.training.config import ParallelConfig, TrainingConfig
from megatron_consa.training.data import PeriodicSequenceData
from megatron_consa.training.loop import ConsaTrainer
from megatron_consa.training.parallel import initialize_distributed

ARCH = ArchitectureConfig(
    vocab_size=64, hidden_size=64, intermediate_size=128, num_layers=2, num_attention_heads=4,
    num_kv_heads=2, head_dim=16, qk_norm=True, rope_theta=10000.0, max_position_embeddings=32,
)
DATA = PeriodicSequenceData(vocab_size=64, seq_length=32, period=12)


def _trainer(consa: ConsaConfig, parallel: ParallelConfig | None = None, data=DATA, arch=ARCH,
             **train_kw) -> ConsaTrainer:
    parallel = parallel or ParallelConfig()
    settings = dict(
        train_iters=3, micro_batch_size=2, global_batch_size=4, seq_length=32, lr=1e-2, min_lr=1e-2,
        lr_decay_style="constant",
    )
    training = TrainingConfig(**{**settings, **train_kw})
    initialize_distributed(parallel, seed=training.seed)
    return ConsaTrainer(arch=arch, consa=consa, parallel=parallel, training=training, data=data)


def _weights(trainer):
    return {n: p.detach().clone() for n, p in unwrap_model(trainer.chunks[0]).named_parameters()}


def _adam_tensors(trainer) -> list:
    """Every parameter and moment the torch optimizers inside megatron-core's hold, in their order."""
    out = []
    for opt in getattr(trainer.optimizer, "chained_optimizers", [trainer.optimizer]):
        for group in opt.optimizer.param_groups:
            for p in group["params"]:
                out += [p.detach()] + [v for _, v in sorted(opt.optimizer.state[p].items()) if torch.is_tensor(v)]
    return out


@pytest.mark.usefixtures("single_rank_mcore")
class TestTrainer:
    def test_a_distributed_optimizer_resume_keeps_the_saved_kv_group_order(self, tmp_path):
        """The distributed optimizer's flat state holds each layer's KV groups in the order of the model that saved
        it: a model reordered otherwise (ConsaConfig.permute_kv_groups flipped, or a checkpoint from before the
        reordering, which records neither) is refused, naming the setting; weights alone load in any order; the
        same order resumes the run as it went on uninterrupted."""
        from megatron_consa.self_attention import to_canonical_order
        from megatron_consa.training.checkpoint import CONSA_META_FILE, load_checkpoint, save_checkpoint

        arch = dataclasses.replace(ARCH, num_attention_heads=8, num_kv_heads=4, head_dim=8)
        alloc = [[1, 0, 1, 0], [0, 1, 1, 0]]  # both layers reorder at TP1: (0, 2, 1, 3) and (1, 2, 0, 3)

        def make(permute: bool) -> ConsaTrainer:
            return _trainer(ConsaConfig(window=4, allocation=alloc, permute_kv_groups=permute),
                            ParallelConfig(use_distributed_optimizer=True), arch=arch, train_iters=4)

        def canonical(trainer):
            model = unwrap_model(trainer.chunks[0])
            return to_canonical_order(model, {n: p.detach().clone() for n, p in model.named_parameters()})

        whole = make(True)
        whole.train_step(), whole.train_step()
        save_checkpoint(whole, tmp_path / "ck")
        whole.train_step()
        meta_file = tmp_path / "ck" / CONSA_META_FILE
        assert json.loads(meta_file.read_text())["kv_group_orders"] == [[0, 2, 1, 3], [1, 2, 0, 3]]
        with pytest.raises(ValueError, match=r"another order than this model \(layer 0: \[0, 2, 1, 3\] against "
                                             r"\[0, 1, 2, 3\]\).*permute_kv_groups=True"):
            load_checkpoint(make(False), tmp_path / "ck")
        load_checkpoint(make(False), tmp_path / "ck", load_optimizer=False)
        resumed = make(True)
        load_checkpoint(resumed, tmp_path / "ck")
        resumed.train_step()
        after, want = canonical(resumed), canonical(whole)
        assert all(torch.equal(after[n], want[n]) for n in want)

        meta = json.loads(meta_file.read_text())  # as written before the reordering: unreordered groups
        del meta["kv_group_orders"], meta["consa"]["permute_kv_groups"]
        meta_file.write_text(json.dumps(meta))
        with pytest.raises(ValueError, match="permute_kv_groups=False"):
            load_checkpoint(make(True), tmp_path / "ck")
        load_checkpoint(make(False), tmp_path / "ck")

    def test_gates_only_mode_trains_gates_and_freezes_weights(self, tmp_path):
        """... and finalize makes its checkpoint a fixed-phase start (whose weights train: no gates-only)."""
        from megatron_consa.training.checkpoint import load_checkpoint, save_checkpoint
        from megatron_consa.training.finalize import CHECKPOINT_DIR, FinalizeError, FinalizeRequest, finalize_checkpoint

        trainer = _trainer(ConsaConfig(window=4, gates_only=True, init_log_alpha=0.0, target_warmup_iters=0))
        before = _weights(trainer)
        trainer.train()
        after = _weights(trainer)
        for name, value in before.items():
            if name.endswith("log_alpha"):
                assert not torch.equal(value, after[name]), name
            else:
                assert torch.equal(value, after[name]), name
        save_checkpoint(trainer, tmp_path / "learn")
        for save in (tmp_path / "learn", tmp_path):  # (replacing --save would delete the learn checkpoint)
            with pytest.raises(FinalizeError, match="writing it would replace that input, deleting it"):
                finalize_checkpoint(FinalizeRequest(load=str(tmp_path / "learn"), save=str(save), overwrite=True))
        allocation = finalize_checkpoint(FinalizeRequest(load=str(tmp_path / "learn"), save=str(tmp_path / "final"),
                                                         tolerance=1.0))
        meta = json.loads((tmp_path / "final" / CHECKPOINT_DIR / "consa_run.json").read_text())
        assert meta["consa"]["allocation"] == allocation.fa and meta["consa"]["gates_only"] is False
        fixed = _trainer(ConsaConfig.from_dict(meta["consa"]))
        load_checkpoint(fixed, tmp_path / "final" / CHECKPOINT_DIR, weights_only=True)
        assert torch.equal(_weights(fixed)["embedding.word_embeddings.weight"],
                           after["embedding.word_embeddings.weight"])

    def test_fixed_allocation_reports_its_exact_sparsity_and_has_no_gates(self):
        trainer = _trainer(ConsaConfig(window=4, allocation=[[1, 0], [0, 0]]))
        before = _weights(trainer)
        history = trainer.train()
        assert trainer.gates == [] and not any(n.endswith("log_alpha") for n in before)
        assert [r.s_hat for r in history] == [0.75] * 3
        assert all(r.lambda1 == 0.0 for r in history)
        assert all(not torch.equal(v, _weights(trainer)[n]) for n, v in before.items() if n.endswith("weight"))

    def test_gate_group_has_its_own_lr_and_no_weight_decay(self):
        trainer = _trainer(ConsaConfig(window=4, gate_lr=0.123, target_warmup_iters=0), weight_decay=0.1)
        gate_ids = {id(g.log_alpha) for g in trainer.gates}
        groups = [g for g in trainer.optimizer.param_groups if any(id(p) in gate_ids for p in g["params"])]
        assert len(groups) == 1 and len(groups[0]["params"]) == len(gate_ids)
        assert groups[0]["max_lr"] == 0.123 and groups[0]["wd_mult"] == 0.0

    def test_logged_learning_rates_are_the_ones_the_groups_get(self):
        """Over a warm-up and a decay, each step logs the lr of the model's groups and of the
        gates' group as the optimizer holds them; the same with the distributed optimizer
        (whose groups hold shards of the gates), and in gates-only mode the model's schedule,
        not the gates' lr."""
        consa = ConsaConfig(window=4, gate_lr=0.05, init_log_alpha=0.0, target_warmup_iters=0)
        schedule = dict(train_iters=5, lr=1e-2, min_lr=1e-3, lr_warmup_iters=2, lr_decay_style="cosine")
        trainer = _trainer(consa, **schedule)
        gate_ids = {id(g.log_alpha) for g in trainer.gates}
        seen = []

        def groups(_record):
            by_kind = {}
            for g in trainer.optimizer.param_groups:
                if g["params"]:
                    by_kind.setdefault("gate" if any(id(p) in gate_ids for p in g["params"]) else "model", set()).add(g["lr"])
            seen.append(by_kind)

        plain = trainer.train(on_step=groups)
        assert [len(k["model"]) for k in seen] == [1] * 5 and [len(k["gate"]) for k in seen] == [1] * 5
        assert [r.lr for r in plain] == [k["model"].pop() for k in seen]
        assert [r.gate_lr for r in plain] == [k["gate"].pop() for k in seen]
        assert len({r.lr for r in plain}) == 5 and len({r.gate_lr for r in plain}) == 2  # warm-up, decay; the gates warm up
        distopt = _trainer(consa, ParallelConfig(use_distributed_optimizer=True), **schedule).train()
        assert [(r.lr, r.gate_lr) for r in distopt] == [(r.lr, r.gate_lr) for r in plain]
        gates_only = _trainer(dataclasses.replace(consa, gates_only=True), **schedule).train()
        assert [(r.lr, r.gate_lr) for r in gates_only] == [(r.lr, r.gate_lr) for r in plain]

    def test_lr_warmup_init_is_where_the_warm_up_starts(self):
        """--lr-warmup-init: the linear warm-up rises from it to --lr (step k of w: init + (lr - init) k / w), the
        gates' from it to their own rate; the decay after it is unchanged."""
        consa = ConsaConfig(window=4, gate_lr=0.05, init_log_alpha=0.0, target_warmup_iters=0)
        schedule = dict(train_iters=6, lr=1e-2, min_lr=1e-3, lr_warmup_iters=4, lr_decay_style="linear")
        plain = _trainer(consa, **schedule).train()
        lifted = _trainer(consa, lr_warmup_init=2e-3, **schedule).train()
        # (the scheduler steps before each step: the first step runs at warm-up step 1)
        for k in range(1, 4):
            assert lifted[k - 1].lr == pytest.approx(2e-3 + (1e-2 - 2e-3) * k / 4)
            assert plain[k - 1].lr == pytest.approx(1e-2 * k / 4)
            assert lifted[k - 1].gate_lr == pytest.approx(2e-3 + (0.05 - 2e-3) * k / 4)
        assert [r.lr for r in lifted[3:]] == [r.lr for r in plain[3:]]

    def test_lr_decay_iters_ends_the_decay_early_and_init_method_std_scales_the_weights(self):
        """--lr-decay-iters: the lr follows a run of that length, then stays at min_lr;
        --init-method-std: megatron-core's initialisation at that scale."""
        consa = ConsaConfig(window=4, init_log_alpha=0.0, target_warmup_iters=0)
        schedule = dict(lr=1e-2, min_lr=1e-3, lr_decay_style="linear")
        short = [r.lr for r in _trainer(consa, train_iters=3, **schedule).train()]
        early = [r.lr for r in _trainer(consa, train_iters=6, lr_decay_iters=3, **schedule).train()]
        assert early[:3] == short and early[3:] == [1e-3] * 3 and short[0] > short[1] > short[2]
        stds = [unwrap_model(_trainer(consa, init_method_std=std).chunks[0]).decoder.layers[0].mlp.linear_fc1.weight.std()
                for std in (0.02, 0.5)]
        assert 0.019 < stds[0] < 0.021 and 0.48 < stds[1] < 0.52

    def test_resume_keeps_the_saved_schedule_unless_overridden(self, tmp_path):
        """megatron's scheduler on resume: the checkpoint's decay length, or (override) this run's."""
        from megatron_consa.training.checkpoint import load_checkpoint, save_checkpoint

        consa = ConsaConfig(window=4, init_log_alpha=0.0, target_warmup_iters=0)
        schedule = dict(train_iters=4, min_lr=1e-3, lr_decay_style="cosine")
        first = _trainer(consa, **schedule)
        first.train(2)
        save_checkpoint(first, tmp_path / "ckpt")
        kept = _trainer(consa, **{**schedule, "train_iters": 8})
        load_checkpoint(kept, tmp_path / "ckpt")
        assert kept.scheduler.lr_decay_steps == 4 and kept.scheduler.num_steps == first.scheduler.num_steps
        extended = _trainer(consa, **{**schedule, "train_iters": 8}, override_opt_param_scheduler=True)
        load_checkpoint(extended, tmp_path / "ckpt")
        assert extended.scheduler.lr_decay_steps == 8 and extended.scheduler.num_steps == first.scheduler.num_steps
        assert extended.scheduler.get_lr(extended.optimizer.param_groups[0]) > first.scheduler.get_lr(first.optimizer.param_groups[0])

    def test_throughput_after_a_resume_counts_only_this_processes_steps(self, caplog):
        """The first log line after a resume at iteration 1000 reports the time of one step,
        not that time spread over 1001 iterations."""
        import logging
        import re

        def first_tokens_per_s(start: int) -> float:
            trainer = _trainer(ConsaConfig(window=4, allocation=[[1, 0], [0, 0]]), train_iters=start + 2,
                               log_interval=1)
            trainer.iteration = start
            caplog.clear()
            with caplog.at_level(logging.INFO, logger="megatron_consa.training.loop"):
                trainer.train_step()
            return float(re.search(r"\| (\d+) tok/s", caplog.text).group(1))

        fresh, resumed = first_tokens_per_s(0), first_tokens_per_s(1000)
        assert resumed < 20 * fresh, (fresh, resumed)

    @pytest.mark.parametrize("check,broken", [(True, "weight"), (True, "multiplier"), (False, "weight")])
    def test_a_non_finite_step_stops_the_run_unless_asked_not_to(self, check, broken):
        """A NaN weight makes the loss NaN; a NaN multiplier only the gates' gradient (the model's
        norm leaves the gates out). With the check (the default) the step raises, naming the
        iteration and the value, before it counts; without it the run trains on."""
        from megatron_consa.training.loop import TrainingDivergedError

        trainer = _trainer(ConsaConfig(window=4, target_warmup_iters=0), check_for_nan_in_loss_and_grad=check)
        first = trainer.train_step()
        assert first.gate_grad_norm is not None and first.gate_grad_norm > 0 and first.grad_norm > 0
        with torch.no_grad():
            if broken == "weight":
                unwrap_model(trainer.chunks[0]).decoder.final_layernorm.weight[0] = float("nan")
            else:
                trainer.controller.lambda1 = float("nan")
        message = "loss nan, grad norm nan" if broken == "weight" else r"gate grad norm nan: training diverged"
        if check:
            with pytest.raises(TrainingDivergedError, match=rf"iteration 2: {message}"):  # (the second step)
                trainer.train_step()
            assert trainer.iteration == 1 and len(trainer.history) == 1
        else:
            record = trainer.train_step()
            assert record.loss != record.loss and trainer.iteration == 2

    def test_params_norm_and_zeros_in_grad_are_the_models_own(self, caplog):
        """--log-params-norm: the L2 norm of every parameter (gates included, the tied output layer
        once); --log-num-zeros-in-grad: the zero entries of the step's gradients; both logged."""
        trainer = _trainer(ConsaConfig(window=4, target_warmup_iters=0), log_interval=1, log_params_norm=True,
                           log_num_zeros_in_grad=True)
        with caplog.at_level("INFO", logger="megatron_consa.training.loop"):
            record = trainer.train_step()
        model = unwrap_model(trainer.chunks[0])
        expected = torch.sqrt(sum(p.detach().double().pow(2).sum() for p in model.parameters()))
        assert record.params_norm == pytest.approx(float(expected), rel=1e-6)
        zeros = sum(int((p.grad == 0).sum()) for p in model.parameters() if p.grad is not None)
        assert record.num_zeros_in_grad == zeros and zeros > 0, zeros  # (embedding rows of tokens not in the batch)
        assert f"params norm {record.params_norm:.3f}" in caplog.text and f"zeros in grad {zeros}" in caplog.text
        off = _trainer(ConsaConfig(window=4, target_warmup_iters=0), log_interval=1).train_step()
        assert off.params_norm is None and off.num_zeros_in_grad is None

    def test_bad_layout_fails_before_building(self):
        with pytest.raises(ConsaConfigError, match="global_batch_size"):
            _trainer(ConsaConfig(window=4), global_batch_size=3)

    def test_exporting_a_learning_runs_checkpoint_warns_that_it_is_all_fa(self, tmp_path, caplog):
        """Its gates are no allocation yet: the export (and generation) is the dense model, said so
        with the fix."""
        import importlib.util
        from pathlib import Path

        from megatron_consa.conversion.exporter import ExportRequest, export_to_hf
        from megatron_consa.training.checkpoint import save_checkpoint

        learn = _trainer(ConsaConfig(window=4, target_sparsity=0.5, target_warmup_iters=0))
        learn.train(1)
        save_checkpoint(learn, tmp_path / "learn")
        fixed = _trainer(ConsaConfig(window=4, allocation=[[1, 0], [0, 1]]))
        fixed.train(1)
        save_checkpoint(fixed, tmp_path / "fixed")
        with caplog.at_level("WARNING", logger="megatron_consa.conversion.exporter"):
            export_to_hf(ExportRequest(load=str(tmp_path / "learn"), save=str(tmp_path / "hf_learn")))
            assert "its gates are not an allocation yet" in caplog.text and "finalize_allocation" in caplog.text
            caplog.clear()
            export_to_hf(ExportRequest(load=str(tmp_path / "fixed"), save=str(tmp_path / "hf_fixed")))
            assert "gates" not in caplog.text
        tool = Path(__file__).resolve().parents[2] / "tools" / "generate.py"
        spec = importlib.util.spec_from_file_location("_generate_tool", tool)
        generate_tool = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(generate_tool)
        with caplog.at_level("WARNING", logger="megatron_consa.generate"):
            caplog.clear()
            assert generate_tool.main(["--load", str(tmp_path / "learn"), "--prompt-ids", "1,2", "--max-new-tokens",
                                       "2"]) == 0
            assert "so generation is all full attention" in caplog.text
        assert json.loads((tmp_path / "hf_learn" / "config.json").read_text()).get("sliding_window") is None

    def test_checkpoint_weights_only_and_full_resume(self, tmp_path):
        from megatron_consa.training.checkpoint import load_checkpoint, save_checkpoint

        consa = ConsaConfig(window=4, init_log_alpha=0.0, target_warmup_iters=0)
        first = _trainer(consa)
        first.train(2)
        save_checkpoint(first, tmp_path / "ckpt")
        save_checkpoint(first, tmp_path / "ckpt")  # over an existing one
        assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
        fresh = _trainer(consa)
        assert load_checkpoint(fresh, tmp_path / "ckpt", weights_only=True) == 2
        assert fresh.iteration == 0 and fresh.controller.lambda1 == 0.0
        # the operations trained so far carry over (Megatron-LM's count over a --finetune)
        assert fresh.floating_point_operations_so_far == 2 * first.flops_per_iteration > 0
        for name, value in _weights(first).items():
            assert torch.equal(value, _weights(fresh)[name]), name
        resumed = _trainer(consa)
        load_checkpoint(resumed, tmp_path / "ckpt")
        assert resumed.iteration == 2 and resumed.controller.lambda1 == first.controller.lambda1
        assert resumed.floating_point_operations_so_far == first.floating_point_operations_so_far
        assert resumed.controller.s_hat_history == first.controller.s_hat_history
        with pytest.raises(ValueError, match="granularity"):
            load_checkpoint(_trainer(ConsaConfig(window=4, granularity="layer", target_sparsity=0.5,
                                             target_warmup_iters=0)), tmp_path / "ckpt")
        with pytest.raises(ValueError, match="learned gates at granularity='kv_head'.*--consa-granularity kv_head"):
            load_checkpoint(_trainer(ConsaConfig(window=4, granularity="layer", target_sparsity=0.5,
                                             target_warmup_iters=0)), tmp_path / "ckpt", weights_only=True)


    def test_dist_ckpt_strictness_names_or_reports_the_mismatched_tensors(self, tmp_path, caplog):
        """--dist-ckpt-strictness reaches dist_checkpointing's load: an exact resume passes the strictest
        check both ways; a fixed model leaves the learned gates unread (missing: raise_all names them);
        a model with QK norms asks for tensors the checkpoint lacks (unexpected: raise_unexpected names
        them before reading; log_unexpected reads the rest, and the model load then names them)."""
        from megatron.core.dist_checkpointing.core import CheckpointingException

        from megatron_consa.training.checkpoint import load_checkpoint, save_checkpoint

        learn = ConsaConfig(window=4, init_log_alpha=0.0, target_warmup_iters=0)
        first = _trainer(learn)
        first.train(1)
        save_checkpoint(first, tmp_path / "ckpt")
        for strict in ("raise_all", "return_all"):
            resumed = _trainer(learn)
            assert load_checkpoint(resumed, tmp_path / "ckpt", strict=strict) == 1
            for name, value in _weights(first).items():
                assert torch.equal(value, _weights(resumed)[name]), (strict, name)
            assert _adam_tensors(resumed) and all(
                torch.equal(a, b) for a, b in zip(_adam_tensors(first), _adam_tensors(resumed)))
        fixed = ConsaConfig(window=4, allocation=[[1, 0], [0, 1]], target_warmup_iters=0)
        assert load_checkpoint(_trainer(fixed), tmp_path / "ckpt", weights_only=True, strict="raise_unexpected") == 1
        with pytest.raises(CheckpointingException, match="log_alpha"):
            load_checkpoint(_trainer(fixed), tmp_path / "ckpt", weights_only=True, strict="raise_all")
        with caplog.at_level("WARNING", logger="megatron_consa.training.checkpoint"):
            caplog.clear()
            loaded = _trainer(fixed)
            load_checkpoint(loaded, tmp_path / "ckpt", weights_only=True, strict="log_all")
            assert re.search(r"holds \d+ tensor\(s\) this run does not read: decoder.layers.self_attention."
                             r"core_attention.log_alpha, ", caplog.text)
        assert torch.equal(_weights(first)["embedding.word_embeddings.weight"],
                           _weights(loaded)["embedding.word_embeddings.weight"])

        plain = dataclasses.replace(ARCH, qk_norm=False)
        no_norms = _trainer(learn, arch=plain)
        no_norms.train(1)
        save_checkpoint(no_norms, tmp_path / "plain")
        with pytest.raises(CheckpointingException, match="q_layernorm"):
            load_checkpoint(_trainer(learn), tmp_path / "plain", strict="raise_unexpected")
        with caplog.at_level("WARNING", logger="megatron_consa.training.checkpoint"):
            caplog.clear()
            with pytest.raises(RuntimeError, match="does not fit model chunk 0: missing.*q_layernorm"):
                load_checkpoint(_trainer(learn), tmp_path / "plain", strict="log_unexpected")
            assert "lacks 6 tensor(s) this run asks for" in caplog.text and "q_layernorm" in caplog.text
            caplog.clear()
            with pytest.raises(RuntimeError, match="does not fit model chunk 0: missing.*q_layernorm"):
                load_checkpoint(_trainer(learn), tmp_path / "plain", strict="return_unexpected")
            assert "lacks 6 tensor(s) this run asks for" in caplog.text and "q_layernorm" in caplog.text
        with pytest.raises(ValueError, match="--dist-ckpt-strictness 'strict': one of assume_ok_unexpected"):
            load_checkpoint(_trainer(learn), tmp_path / "ckpt", strict="strict")

    def test_an_import_starts_learning_at_either_granularity_with_its_own_initial_gates(self, tmp_path):
        """An import writes untrained gates (kv_head by default); learning from it at layer granularity, or with
        another init_log_alpha, keeps the run's own initial gates and loads every weight."""
        import sys
        from pathlib import Path

        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from conversion_fixtures import IMPORT, read_weights, save_hf

        from megatron_consa.cli import run_tool
        from megatron_consa.conversion.hf_files import load_hf_config
        from megatron_consa.training.checkpoint import load_checkpoint

        hf_dir = save_hf("qwen3", tmp_path / "hf")
        assert run_tool(IMPORT.main, ["--hf-path", str(hf_dir), "--save", str(tmp_path / "imp"), "--dtype", "fp32"]) == 0
        arch = ArchitectureConfig.from_hf(load_hf_config(hf_dir))
        training = TrainingConfig(train_iters=3, micro_batch_size=2, global_batch_size=4, seq_length=16, lr=1e-2,
                                  min_lr=1e-2, lr_decay_style="constant")
        data = PeriodicSequenceData(vocab_size=arch.vocab_size, seq_length=16, period=6)
        for granularity in ("layer", "kv_head"):
            consa = ConsaConfig(window=4, granularity=granularity, target_sparsity=0.5, init_log_alpha=1.25,
                                target_warmup_iters=0)
            initialize_distributed(ParallelConfig(), seed=training.seed)
            trainer = ConsaTrainer(arch=arch, consa=consa, parallel=ParallelConfig(), training=training, data=data)
            load_checkpoint(trainer, tmp_path / "imp", weights_only=True)
            assert all(torch.all(g.log_alpha == 1.25) for g in trainer.gates), granularity
            emb = unwrap_model(trainer.chunks[0]).embedding.word_embeddings.weight.detach()
            assert torch.equal(emb, read_weights(hf_dir)["model.embed_tokens.weight"]), granularity

    def test_warmup_longer_than_the_run_fails_before_any_work(self):
        with pytest.raises(ConsaConfigError, match="target_warmup_iters=200.*train_iters=3"):
            _trainer(ConsaConfig(window=4))  # library default warm-up, a 3-iteration run

    def test_unrepresentable_target_fails_before_any_work(self):
        with pytest.raises(ConsaConfigError, match="nearest representable targets are 0.5"):
            _trainer(ConsaConfig(window=4, granularity="layer", target_sparsity=0.75, target_warmup_iters=0))

    def test_dual_steps_are_the_sum_of_the_recorded_gaps(self):
        """Pinned wiring: one dual step per applied optimizer step after the warm-up, none before;
        lambda1 and lambda2 equal the sums of eta*gap and eta*gap^2 over the recorded s_hat."""
        consa = ConsaConfig(window=4, target_sparsity=0.5, target_warmup_iters=4, lagrangian_lr=3.0,
                            init_log_alpha=0.0)
        trainer = _trainer(consa, train_iters=12)
        history = trainer.train()
        assert len(history) == 12 and [r.dual_step for r in history] == [False] * 4 + [True] * 8
        gaps = [r.s_hat - r.target for r in history if r.dual_step]
        assert trainer.controller.lambda1 == pytest.approx(3.0 * sum(gaps), rel=1e-12, abs=1e-12)
        assert trainer.controller.lambda2 == pytest.approx(3.0 * sum(g * g for g in gaps), rel=1e-12, abs=1e-15)
        assert history[-1].lambda1 == trainer.controller.lambda1
        assert [k for k, _ in trainer.controller.s_hat_history] == list(range(12))
        assert [v for _, v in trainer.controller.s_hat_history] == [r.s_hat for r in history]
        assert all(r.gate_lr == 0.05 for r in history) and history[0].fa_per_layer is not None

    @pytest.mark.parametrize("target,bound", [(0.5, -1.0), (0.0, 1.0)])
    def test_gates_pushed_against_their_bounds_never_leave_them(self, target, bound):
        # In [-1, 1] s_hat can only reach [0.07, 0.35]: target 0.5 pushes every gate down, 0.0 every gate up.
        consa = ConsaConfig(window=4, target_sparsity=target, target_warmup_iters=0, log_alpha_min=-1.0,
                            log_alpha_max=1.0, init_log_alpha=0.5, gate_lr=0.5, gates_only=True)
        trainer = _trainer(consa, train_iters=15)
        seen = []
        trainer.train(on_step=lambda r: seen.append(trainer.gather_log_alpha()))
        values = torch.stack(seen)
        assert values.min() >= -1.0 and values.max() <= 1.0
        assert (values[-5:] == bound).all(), "the constraint did not hold the gates on their bound"

    def test_gates_are_clipped_apart_from_the_model(self):
        """The global clip acts on the model weights alone; the gates are clipped by their own norm."""
        consa = ConsaConfig(window=4, target_sparsity=0.5, target_warmup_iters=0, init_log_alpha=0.0)
        trainer = _trainer(consa, clip_grad=1e-3)
        gate_ids = {id(g.log_alpha) for g in trainer.gates}
        params = [p for chunk in trainer.chunks for p in chunk.parameters() if p.requires_grad]
        seen = {}
        real_step = trainer.optimizer.step

        def step():
            seen["before"] = [p.main_grad.detach().clone() for p in params]
            out = real_step()
            seen["after"] = [p.main_grad.detach().clone() for p in params]
            return out

        trainer.optimizer.step = step
        record = trainer.train_step()
        gate = [i for i, p in enumerate(params) if id(p) in gate_ids]
        model = [i for i, p in enumerate(params) if id(p) not in gate_ids]
        norm = lambda idx: float(torch.sqrt(sum((seen["before"][i].double() ** 2).sum() for i in idx)))
        model_norm, gate_norm = norm(model), norm(gate)
        assert record.grad_norm == pytest.approx(model_norm, rel=1e-5)  # gates are not in the global norm
        for idx, n in ((model, model_norm), (gate, gate_norm)):
            coef = min(1.0, 1e-3 / (n + 1e-6))
            for i in idx:
                torch.testing.assert_close(seen["after"][i], seen["before"][i] * coef, rtol=1e-4, atol=1e-12)
        assert gate_norm > 0 and model_norm > 0

    @pytest.mark.parametrize("precision,distributed", [("bf16", False), ("fp16", False), ("bf16", True)])
    def test_mixed_precision_learning_saves_and_resumes_exactly(self, tmp_path, precision, distributed):
        """The float32 gates in a bf16/fp16 model: megatron-core's mixed-precision optimizer
        could not save them (compat.optimizer); a resume continues bit for bit (weights, main
        params, every Adam moment, the loss scale), at the shipped initial loss scale."""
        from megatron_consa.training.checkpoint import load_checkpoint, save_checkpoint

        consa = ConsaConfig(window=4, target_sparsity=0.5, target_warmup_iters=0, init_log_alpha=0.0)
        parallel = ParallelConfig(use_distributed_optimizer=distributed)
        kw = {precision: True, "train_iters": 4}
        first = _trainer(consa, parallel, **kw)
        first.train(2)
        save_checkpoint(first, tmp_path / "ckpt")
        first.train(2)
        resumed = _trainer(consa, parallel, **kw)
        assert load_checkpoint(resumed, tmp_path / "ckpt") == 2
        resumed.train(2)
        assert [r.loss for r in resumed.history] == [r.loss for r in first.history]
        assert [r.skipped for r in first.history] == [False] * 4
        for name, value in _weights(first).items():
            assert value.dtype == (torch.float32 if name.endswith("log_alpha") else getattr(torch, {
                "bf16": "bfloat16", "fp16": "float16"}[precision])), name
            assert torch.equal(value, _weights(resumed)[name]), name
        assert resumed.optimizer.get_loss_scale().item() == first.optimizer.get_loss_scale().item()
        states = [_adam_tensors(t) for t in (first, resumed)]  # in the inner optimizers' order
        assert len(states[0]) >= 3 * len(first.gates) and len(states[0]) == len(states[1])
        for a, b in zip(*states):
            assert torch.equal(a, b)

    def test_a_distributed_optimizer_resume_without_apex_or_te_is_exact_on_any_device(self, tmp_path, monkeypatch):
        """Without apex or TE megatron-core runs torch's Adam on a GPU too: the distributed optimizer's load needs its
        state filled and a step tensor per parameter there as well, so the fix-up follows the optimizer, not the CPU
        shims (with them reported off the load asserted on the empty state)."""
        from megatron.core.optimizer import distrib_optimizer

        from megatron_consa.compat import cpu as compat_cpu
        from megatron_consa.training.checkpoint import load_checkpoint, save_checkpoint

        if distrib_optimizer.HAVE_APEX_OR_TE:
            pytest.skip("apex or Transformer Engine imports here: megatron-core runs their fused Adam, not torch's")
        consa = ConsaConfig(window=4, target_sparsity=0.5, target_warmup_iters=0, init_log_alpha=0.0)
        parallel = ParallelConfig(use_distributed_optimizer=True)
        first = _trainer(consa, parallel, train_iters=4)
        first.train(2)
        save_checkpoint(first, tmp_path / "ckpt")
        first.train(2)
        resumed = _trainer(consa, parallel, train_iters=4)
        with monkeypatch.context() as m:
            m.setattr(compat_cpu, "_INSTALLED", False)  # as on a GPU: no CPU shims
            assert load_checkpoint(resumed, tmp_path / "ckpt") == 2
        steps = [opt.optimizer.state[p]["step"] for opt in getattr(resumed.optimizer, "chained_optimizers",
                                                                   [resumed.optimizer])
                 for group in opt.optimizer.param_groups for p in group["params"]]
        assert len({id(t) for t in steps}) == len(steps) and {t.item() for t in steps} == {2.0}
        resumed.train(2)
        assert [r.loss for r in resumed.history] == [r.loss for r in first.history]
        for a, b in zip(_adam_tensors(first), _adam_tensors(resumed), strict=True):
            assert torch.equal(a, b)

    def test_the_log_lines_loss_is_the_mean_over_its_interval(self, caplog):
        """As Megatron-LM's: the log line's loss is the mean over the iterations since the last line (the first line
        its own), not the last iteration's."""
        consa = ConsaConfig(window=4, target_sparsity=0.5, target_warmup_iters=0, init_log_alpha=0.0)
        trainer = _trainer(consa, train_iters=7, log_interval=3)
        with caplog.at_level(logging.INFO, logger="megatron_consa.training.loop"):
            history = [r.loss for r in trainer.train()]
        logged = {int(m.group(1)): float(m.group(2)) for m in (
            re.search(r"iter +(\d+)/7 \| loss ([0-9.]+)", r.getMessage()) for r in caplog.records) if m}
        assert logged == {1: pytest.approx(history[0], abs=1e-4), 3: pytest.approx(sum(history[1:3]) / 2, abs=1e-4),
                          6: pytest.approx(sum(history[3:6]) / 3, abs=1e-4), 7: pytest.approx(history[6], abs=1e-4)}
        assert logged[6] != pytest.approx(history[5], abs=1e-4)

    def test_no_load_optim_continues_at_the_saved_iteration_with_a_new_optimizer(self, tmp_path):
        """--no-load-optim: weights, gates, controller and iteration load; the optimizer is the
        new run's (here bf16 after fp32) with no moments, its schedule at the saved iteration;
        --no-load-rng leaves this process's RNG state alone."""
        from megatron_consa.training.checkpoint import load_checkpoint, save_checkpoint

        consa = ConsaConfig(window=4, target_sparsity=0.5, target_warmup_iters=0, init_log_alpha=0.0)
        schedule = dict(train_iters=6, lr=1e-2, min_lr=1e-3, lr_decay_style="linear")
        first = _trainer(consa, **schedule)
        first.train(3)
        save_checkpoint(first, tmp_path / "ckpt")
        fresh_schedule = [r.lr for r in _trainer(consa, **schedule).train(4)]
        resumed = _trainer(consa, bf16=True, **schedule)
        torch.manual_seed(7)
        rng = torch.get_rng_state()
        assert load_checkpoint(resumed, tmp_path / "ckpt", load_optimizer=False, load_rng=False) == 3
        assert torch.equal(torch.get_rng_state(), rng)
        assert resumed.iteration == 3 and resumed.controller.state_dict() == first.controller.state_dict()
        for name, value in _weights(first).items():
            assert torch.equal(value.to(_weights(resumed)[name].dtype), _weights(resumed)[name]), name
        assert not any(opt.optimizer.state for opt in resumed.optimizer.chained_optimizers)  # no moments loaded
        assert resumed.train_step().lr == fresh_schedule[3]  # the schedule's 4th step, not its first


    def test_rng_states_saved_on_a_gpu_resume_on_the_cpu(self, tmp_path, caplog):
        """A checkpoint written on a GPU holds Philox states (16 bytes) for megatron-core's RNG tracker,
        which a CPU generator cannot take: the host generators are restored, the tracker keeps this
        run's seed, and the warning says so (it failed at the tracker's next fork before)."""
        import logging
        import random

        from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

        from megatron_consa.training.checkpoint import _rng_file, load_checkpoint, save_checkpoint

        consa = ConsaConfig(window=4, target_sparsity=0.5, target_warmup_iters=0, init_log_alpha=0.0)
        first = _trainer(consa, train_iters=4)
        first.train(2)
        save_checkpoint(first, tmp_path / "ckpt")
        rng_file = _rng_file(tmp_path / "ckpt", 0)
        saved = torch.load(rng_file, weights_only=False)
        assert saved["device"] == "cpu"
        philox = torch.zeros(16, dtype=torch.uint8)  # a CUDA generator's state
        saved.update(device="cuda", cuda=philox, tracker={name: philox for name in saved["tracker"]})
        torch.save(saved, rng_file)
        resumed = _trainer(consa, train_iters=4)
        tracker = get_cuda_rng_tracker().get_states()
        with caplog.at_level(logging.WARNING, logger="megatron_consa.training.checkpoint"):
            assert load_checkpoint(resumed, tmp_path / "ckpt") == 2
        assert "saved on CUDA, this run is on CPU" in caplog.text
        assert torch.equal(torch.get_rng_state(), saved["torch"]) and random.getstate() == saved["python"]
        assert all(torch.equal(state, tracker[name]) for name, state in get_cuda_rng_tracker().get_states().items())
        with get_cuda_rng_tracker().fork():
            torch.rand(1)
        assert resumed.train_step().iteration == 2  # (trains on)
    def test_fp16_loss_scale_settings_reach_the_scaler(self):
        """Megatron-LM's --loss-scale (static) and the dynamic scaler's window and hysteresis."""
        consa = ConsaConfig(window=4, target_sparsity=0.5, target_warmup_iters=0, init_log_alpha=0.0)
        static = _trainer(consa, fp16=True, loss_scale=1024.0, train_iters=2)
        static.train(2)
        assert [r.loss_scale for r in static.history] == [1024.0, 1024.0]
        # every step overflows at 2**120 (fp16 ends at 65504): hysteresis 1 halves at once, down to the floor
        falling = _trainer(consa, fp16=True, initial_loss_scale=2.0**120, min_loss_scale=2.0**118, hysteresis=1,
                           train_iters=3)
        falling.train(3)
        assert [(r.skipped, r.loss_scale) for r in falling.history] == [(True, 2.0**119), (True, 2.0**118),
                                                                         (True, 2.0**118)]
        rising = _trainer(consa, fp16=True, initial_loss_scale=16.0, loss_scale_window=1, train_iters=2)
        rising.train(2)  # each clean step doubles it (window 1)
        assert [(r.skipped, r.loss_scale) for r in rising.history] == [(False, 32.0), (False, 64.0)]

    def test_no_dual_step_on_a_skipped_fp16_step(self):
        consa = ConsaConfig(window=4, target_sparsity=0.5, target_warmup_iters=0, init_log_alpha=0.0)
        trainer = _trainer(consa, fp16=True, initial_loss_scale=2.0**120, train_iters=2)
        record = trainer.train_step()
        assert record.skipped and not record.dual_step
        assert (trainer.controller.lambda1, trainer.controller.lambda2) == (0.0, 0.0)
        assert trainer.controller.s_hat_history == [[0, record.s_hat]]


@dataclasses.dataclass
class EodMaskedData:
    """DATA under `--eod-mask-loss` (EOD = 0) with a varying share of EODs: sample i starts with
    (i % 5) * 4 of them, so micro-batches have different numbers of tokens with loss."""

    eod_mask_id: int = 0

    def sample(self, index: int) -> torch.Tensor:
        seq = DATA.sample(index).clamp(min=1)
        seq[: (index % 5) * 4] = 0
        return seq


@pytest.mark.usefixtures("single_rank_mcore")
class TestMegatronTrainingFlags:
    """Megatron-LM's --calculate-per-token-loss, --decoupled-lr, --grad-reduce-in-bf16,
    --empty-unused-memory-level and --attention-backend in the trainer."""

    @pytest.mark.parametrize("per_token", [False, True])
    def test_loss_and_gradients_are_the_normalisation_asked_for(self, per_token):
        """Against autograd of the objective written out here, on 4 micro-batches with 16 to 32
        tokens with loss: per token, the sum over the global batch's tokens over their number;
        by default, the mean of the micro-batches' per-token means. The logged loss and the
        reduced gradients are that objective's; the validation loss is per token over all the
        tokens of two batches in either mode, as Megatron-LM's."""
        from megatron_consa.training.data import micro_batches

        data = EodMaskedData()
        kw = dict(micro_batch_size=1, global_batch_size=4, clip_grad=0.0, calculate_per_token_loss=per_token)
        consa = ConsaConfig(window=4, allocation=[[1, 0], [0, 1]])
        model = unwrap_model(_trainer(consa, data=data, **kw).chunks[0])  # the same initial weights (seed)

        def objectives(iterations):  # (per token, mean of the micro-batches' means) over these batches
            sums, counts = [], []
            for k in iterations:
                for b in micro_batches(data, iteration=k, global_batch_size=4, micro_batch_size=1, dp_rank=0,
                                       dp_size=1):
                    losses = model(b["tokens"], b["position_ids"], attention_mask=None, labels=b["labels"]).float()
                    sums.append((losses * b["loss_mask"]).sum())
                    counts.append(b["loss_mask"].sum())
            assert len(set(map(int, counts))) > 1, counts
            return sum(sums) / sum(counts), sum(s / c for s, c in zip(sums, counts)) / len(sums)

        both = objectives([0])
        objective = both[0] if per_token else both[1]
        assert abs(float(both[0]) - float(both[1])) > 1e-3  # the two differ on this batch
        params = list(model.parameters())
        grads = torch.autograd.grad(objective, params)
        with torch.no_grad():
            pooled = objectives([0, 1])[0]

        trainer = _trainer(consa, data=data, **kw)
        assert trainer.evaluate(data, iterations=2) == pytest.approx(float(pooled), rel=1e-6)
        record = trainer.train_step()
        assert record.loss == pytest.approx(float(objective), rel=1e-6)
        for (name, p), g in zip(unwrap_model(trainer.chunks[0]).named_parameters(), grads):
            torch.testing.assert_close(p.main_grad, g, rtol=1e-4, atol=1e-7, msg=name)

    def test_decoupled_lr_schedules_the_embedding_and_output_layer_apart(self):
        consa = ConsaConfig(window=4, allocation=[[1, 0], [0, 1]])
        schedule = dict(train_iters=4, lr=1e-2, min_lr=1e-3, lr_decay_style="linear")
        for decoupled in ({}, {"decoupled_lr": 5e-2, "decoupled_min_lr": 5e-3}):
            trainer = _trainer(consa, **schedule, **decoupled)
            model = unwrap_model(trainer.chunks[0])
            special = {id(model.embedding.word_embeddings.weight), id(model.output_layer.weight)}
            seen = []
            trainer.train(on_step=lambda r: seen.append((r.lr, {
                id(p) in special: g["lr"] for g in trainer.optimizer.param_groups for p in g["params"]})))
            for lr, by_kind in seen:
                assert by_kind[False] == lr and by_kind[True] == pytest.approx(5 * lr if decoupled else lr, rel=1e-9)
            assert len({lr for lr, _ in seen}) == 4  # (the schedule moved)

    @pytest.mark.parametrize("style", ["exponential", "linear", "cosine", "minus_sqrt"])
    def test_wsd_schedule_holds_the_peak_then_anneals_over_its_last_iterations(self, style):
        """--lr-decay-style WSD: the linear warm-up, the peak held, then the anneal to --min-lr over the last
        --lr-wsd-decay-iters of the decay, in each --lr-wsd-decay-style (written out here)."""
        consa = ConsaConfig(window=4, allocation=[[1, 0], [0, 1]])
        peak, low, warmup, decay, anneal = 1e-2, 1e-3, 2, 10, 4
        trainer = _trainer(consa, train_iters=12, lr=peak, min_lr=low, lr_warmup_iters=warmup, lr_decay_iters=decay,
                           lr_decay_style="WSD", lr_wsd_decay_iters=anneal, lr_wsd_decay_style=style)
        seen = [r.lr for r in trainer.train()]
        shape = {"exponential": lambda x: 2 * 0.5 ** x - 1, "linear": lambda x: 1 - x,
                 "cosine": lambda x: 0.5 * (math.cos(math.pi * x) + 1), "minus_sqrt": lambda x: 1 - math.sqrt(x)}[style]

        def expected(step: int) -> float:  # the rate of step `step` (1-based: the scheduler steps first)
            if step < warmup:
                return peak * step / warmup
            if step <= decay - anneal:
                return peak
            return low + (peak - low) * shape(min(1.0, (step - (decay - anneal)) / anneal))

        assert seen == pytest.approx([expected(k) for k in range(1, 13)], rel=1e-9, abs=1e-12)
        assert seen[warmup - 1:decay - anneal] == pytest.approx([peak] * (decay - anneal + 1 - warmup))  # held
        assert seen[-1] == pytest.approx(low)

    @pytest.mark.parametrize("style", ["linear", "cosine"])
    def test_weight_decay_moves_from_start_to_end_on_the_weights_only(self, style):
        """--weight-decay-incr-style: each step's decay, on every weight megatron-core decays, is the
        schedule written out here (start at the first step, end after train_iters); norms and the
        gates keep none."""
        consa = ConsaConfig(window=4, target_warmup_iters=0)
        start, end, iters = 0.02, 0.3, 5
        trainer = _trainer(consa, train_iters=iters, weight_decay=0.1, weight_decay_incr_style=style,
                           start_weight_decay=start, end_weight_decay=end)
        names = {id(p): n for n, p in unwrap_model(trainer.chunks[0]).named_parameters()}
        ratio = {"linear": lambda x: x, "cosine": lambda x: 0.5 * (math.cos(math.pi * (1 - x)) + 1)}[style]

        def decays() -> dict[str, float]:
            return {names[id(p)]: g["weight_decay"] for g in trainer.optimizer.param_groups for p in g["params"]}

        applied = [decays()]  # step k applies the decay set after step k - 1
        trainer.train(on_step=lambda r: applied.append(decays()))
        for k, by_name in enumerate(applied):
            want = start + (end - start) * ratio(k / iters)
            for name, wd in by_name.items():
                no_decay = name.endswith(("log_alpha", ".bias")) or "layernorm" in name or "layer_norm" in name
                assert wd == (0.0 if no_decay else pytest.approx(want, rel=1e-12)), (k, name)
        assert applied[-1]["decoder.layers.0.mlp.linear_fc1.weight"] == pytest.approx(end)
        assert any(n.endswith("log_alpha") for n in applied[0]) and any("layernorm" in n for n in applied[0])

    def test_a_loaded_checkpoint_brings_its_weight_decay_schedule(self, tmp_path):
        """load_checkpoint: the next step decays at the saved schedule's value, not at the loading
        trainer's (megatron-core sets the groups' decay before it reads the saved schedule)."""
        from megatron_consa.training.checkpoint import load_checkpoint, save_checkpoint

        consa = ConsaConfig(window=4, allocation=[[1, 0], [0, 1]])
        saved = _trainer(consa, train_iters=6, weight_decay_incr_style="linear", start_weight_decay=0.0,
                         end_weight_decay=0.3)
        saved.train(2)
        save_checkpoint(saved, tmp_path / "ckpt")
        loading = _trainer(consa, train_iters=6, weight_decay=0.05)
        load_checkpoint(loading, tmp_path / "ckpt")
        weight = id(unwrap_model(loading.chunks[0]).decoder.layers[0].mlp.linear_fc1.weight)
        decay = [g["weight_decay"] for g in loading.optimizer.param_groups if weight in map(id, g["params"])]
        assert decay == [pytest.approx(0.1)]  # 0.3 x 2 / 6

    def test_weights_and_biases_gets_what_tensorboard_gets(self, tmp_path, monkeypatch):
        """--wandb-project: the W&B run (offline here) holds every TensorBoard scalar at the same
        iterations with the same values (timers and memory included), images, and the run's
        configuration."""
        import sys
        from pathlib import Path

        import numpy as np
        import wandb
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from wandb_records import config, history, run_file

        monkeypatch.setenv("WANDB_MODE", "offline")
        monkeypatch.setenv("WANDB_SILENT", "true")
        trainer = _trainer(ConsaConfig(window=4, target_warmup_iters=0), train_iters=4, log_interval=2,
                           tensorboard_dir=str(tmp_path / "tb"), wandb_project="consa-tests", wandb_exp_name="unit",
                           wandb_save_dir=str(tmp_path / "wb"), timing_log_level=1, log_timers_to_tensorboard=True,
                           log_memory_to_tensorboard=True)
        trainer.train()
        trainer.metrics.add_image("consa/allocation_heatmap", np.full((6, 8, 3), 200, dtype=np.uint8), 4)
        trainer.close()
        wandb.teardown()  # (run.finish returns before wandb's service has written everything; an exit waits)
        events = EventAccumulator(str(tmp_path / "tb")).Reload()
        board = {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}
        logged = history(run_file(tmp_path / "wb"))
        assert {"consa/loss", "consa/s_hat", "consa/lambda1", "iteration-time", "forward-backward-time",
                "optimizer-time", "mem-rss-bytes"} <= set(board)
        assert set(logged) == set(board) | {"consa/allocation_heatmap"}
        for tag, by_step in board.items():
            assert list(logged[tag]) == list(by_step), tag
            assert [float(v) for v in logged[tag].values()] == pytest.approx(list(by_step.values()), rel=1e-6), tag
        image = logged["consa/allocation_heatmap"][4]
        assert image["_type"] == "image-file" and (image["width"], image["height"]) == (8, 6)
        assert (run_file(tmp_path / "wb").parent / "files" / image["path"]).is_file()
        saved = config(run_file(tmp_path / "wb"))
        assert saved["training"]["train_iters"] == 4 and saved["consa"]["window"] == 4
        assert saved["architecture"]["num_layers"] == ARCH.num_layers

    def test_work_between_steps_is_left_out_of_the_time_per_iteration(self, monkeypatch, caplog):
        """`untimed` (run.py wraps evaluations and saves in it): the next log line's time per
        iteration, so its tokens/s and TFLOP/s, leave that work out, as Megatron-LM's interval timer."""
        import logging
        import types

        from megatron_consa.training import loop

        clock = [1000.0]
        monkeypatch.setattr(loop, "time", types.SimpleNamespace(time=lambda: clock[0]))  # (the loop's clock only)
        trainer = _trainer(ConsaConfig(window=4, allocation=[[1, 0], [0, 1]]), train_iters=4, log_interval=2)
        with caplog.at_level(logging.INFO, logger="megatron_consa.training.loop"):
            for k in range(3):
                trainer.train_step()
                clock[0] += 2.0  # (each step "takes" 2 s)
                if k == 0:
                    with trainer.untimed():
                        clock[0] += 10.0  # an evaluation
                        with trainer.untimed():  # (nested: counted once)
                            clock[0] += 20.0  # a save
        line = [r.getMessage() for r in caplog.records if r.getMessage().startswith("iter      2/4")][0]
        assert " | 64 tok/s | " in line, line  # 4 x 32 tokens in 2 s, not in (4 + 30) / 2
        tflops = trainer.flops_per_iteration / 2.0 / 1e12
        assert f" | {tflops:.3g} TFLOP/s/GPU | " in line, line

    def test_a_writer_that_cannot_open_stops_the_trainer_before_any_step(self, tmp_path, monkeypatch):
        """W&B failing to start (online without credentials, say) raises at set-up, before any step, and
        the TensorBoard writer opened before it is closed (one rank here: the verdict's exchange between
        ranks, so that none waits at the first collective, is not exercised)."""
        import wandb
        from torch.utils.tensorboard import SummaryWriter

        def no_credentials(**kwargs):
            raise wandb.errors.UsageError("api_key not configured (no-tty)")

        closed = []
        monkeypatch.setattr(wandb, "init", no_credentials)
        monkeypatch.setattr(SummaryWriter, "close", lambda self: closed.append(self.log_dir))
        with pytest.raises(wandb.errors.UsageError, match="api_key not configured"):
            _trainer(ConsaConfig(window=4, target_warmup_iters=0), wandb_project="p",
                     wandb_save_dir=str(tmp_path / "wb"), tensorboard_dir=str(tmp_path / "tb"))
        assert closed == [str(tmp_path / "tb")]  # (the TensorBoard writer opened first is not left open)

    def test_a_step_that_raises_leaves_no_timer_started(self):
        trainer = _trainer(ConsaConfig(window=4, target_warmup_iters=0), timing_log_level=1)
        trainer.train_step()
        step = trainer.optimizer.step

        def failing_step():
            raise RuntimeError("optimizer failed")

        trainer.optimizer.step = failing_step
        with pytest.raises(RuntimeError, match="optimizer failed"):
            trainer.train_step()  # (inside the "optimizer" timer)
        trainer.optimizer.step = step
        assert trainer.train_step().iteration == 1  # megatron-core: "timer has already been started" otherwise

    def test_timers_and_memory_reach_the_log_and_tensorboard(self, tmp_path, caplog):
        """--timing-log-level 2 with --log-timers-to-tensorboard, --log-memory-to-tensorboard,
        --log-world-size-to-tensorboard and --log-batch-size-to-tensorboard (and --tensorboard-queue-size
        reaching the writer): megatron-core's timers (the schedule's, the optimizer's,
        the gradient sync's) and ConSA's in the log line's text and in TensorBoard, per iteration and
        nested as they run; an evaluation is not timed; level 0 times nothing."""
        import logging

        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        consa = ConsaConfig(window=4, target_warmup_iters=0)
        trainer = _trainer(consa, train_iters=4, log_interval=2, tensorboard_dir=str(tmp_path / "tb"),
                           timing_log_level=2, log_timers_to_tensorboard=True, log_memory_to_tensorboard=True,
                           log_world_size_to_tensorboard=True, log_batch_size_to_tensorboard=True,
                           tensorboard_queue_size=3)
        with caplog.at_level(logging.INFO, logger="megatron_consa.training.loop"):
            trainer.train_step()
            before = trainer.timers("forward-backward").elapsed(reset=False)
            trainer.evaluate(DATA, iterations=2)
            assert trainer.timers("forward-backward").elapsed(reset=False) == before  # not timed
            trainer.train()
        assert trainer.metrics.tensorboard.max_queue == 3  # --tensorboard-queue-size
        trainer.close()
        reports = [r.getMessage() for r in caplog.records if "time across ranks (ms)" in r.getMessage()]
        assert len(reports) == 3  # at iterations 1 (the first), 2 and 4 (counted as Megatron-LM counts)
        for name in ("forward-backward", "forward-compute", "backward-compute", "batch-generator", "all-grads-sync",
                     "optimizer-inner-step", "optimizer", "consa-constraint", "consa-dual-step"):
            assert f"\n    {name} ." in reports[-1], (name, reports[-1])
        events = EventAccumulator(str(tmp_path / "tb")).Reload()

        def scalars(tag: str) -> dict[int, float]:
            return {e.step: e.value for e in events.Scalars(tag)}

        iteration = scalars("iteration-time")
        assert list(iteration) == [1, 2, 4]
        for step in (1, 2, 4):  # each timer's mean per iteration (s) over the same iterations as iteration-time
            whole = scalars("forward-backward-time")[step]
            parts = scalars("forward-compute-time")[step] + scalars("backward-compute-time")[step]
            assert 0 < parts <= whole * 1.001 and whole + scalars("optimizer-time")[step] <= iteration[step] * 1.001
            assert scalars("optimizer-inner-step-time")[step] <= scalars("optimizer-time")[step] * 1.001
        # Megatron-LM's "throughput" (TFLOP/s per GPU): the iteration's FLOPs at the logged token rate
        tokens, throughput = scalars("consa/tokens_per_s"), scalars("throughput")
        for step in (1, 2, 4):
            assert throughput[step] == pytest.approx(
                tokens[step] * trainer.flops_per_iteration / (4 * 32) / 1e12, rel=1e-5)
        assert trainer.flops_per_iteration > 6 * 4 * 32 * (ARCH.hidden_size * ARCH.vocab_size)
        rss, peak = scalars("mem-rss-bytes"), scalars("mem-max-rss-bytes")
        assert list(rss) == [1, 2, 3, 4] and all(1e7 < rss[k] <= peak[k] for k in rss), (rss, peak)
        assert set(scalars("world-size").values()) == {1.0}
        assert scalars("batch-size") == {k: float(trainer.training.global_batch_size) for k in range(1, 5)}

        caplog.clear()
        quiet = _trainer(consa, train_iters=2, log_interval=1)
        with caplog.at_level(logging.INFO, logger="megatron_consa.training.loop"):
            quiet.train()
        assert quiet.timers is None and "across ranks" not in caplog.text and "iter" in caplog.text

    def test_grad_reduce_in_bf16_keeps_the_gates_float32(self):
        consa = ConsaConfig(window=4, target_warmup_iters=0)
        for reduce_in_bf16 in (False, True):
            trainer = _trainer(consa, bf16=True, grad_reduce_in_bf16=reduce_in_bf16)
            record = trainer.train_step()
            assert record.loss == record.loss and not record.skipped
            for name, p in unwrap_model(trainer.chunks[0]).named_parameters():
                want = torch.bfloat16 if reduce_in_bf16 and not name.endswith("log_alpha") else torch.float32
                assert p.main_grad.dtype == want, name

    @pytest.mark.parametrize("level,per_step,per_eval_batch", [(0, 0, 0), (1, 1, 1), (2, 2, 1)])
    def test_empty_unused_memory_level_releases_at_megatrons_points(self, monkeypatch, level, per_step,
                                                                    per_eval_batch):
        from megatron_consa.training import loop

        calls = []
        monkeypatch.setattr(loop, "empty_cuda_cache", lambda: calls.append(1))
        trainer = _trainer(ConsaConfig(window=4, target_warmup_iters=0), empty_unused_memory_level=level)
        trainer.train(2)
        assert len(calls) == 2 * per_step
        trainer.evaluate(DATA, iterations=3)
        assert len(calls) == 2 * per_step + 3 * per_eval_batch

    def test_data_loader_workers_prepare_the_same_batches_ahead(self, tmp_path):
        """--num-workers: the micro-batches come from forked worker processes, the same tensors as read in
        the trainer, so the same run; asked out of order (a resume) it starts over. In a fresh process
        (tests/distributed/scenarios.py::data_loader_workers), as a training rank forks its workers: forked
        from this long-lived test process, which earlier tests left with their threads and state, a worker
        crashed now and then (SIGSEGV) while the same runs through torchrun never did."""
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "distributed"))
        from harness import launch

        (result,) = launch("data_loader_workers", 1, tmp_path)
        assert result["workers"] == result["inline"] and len(result["inline"]) == 4, result
        assert result["loader"] == "_MultiProcessingDataLoaderIter"
        assert result["out_of_order"] == {10: True, 11: True, 3: True, 4: True}
        # a worker killed by a fault: the error names it, and its stderr has its Python stack (faulthandler)
        fault = result["fault"]
        assert fault["error"] and "DataLoader worker" in fault["error"], fault
        assert "Segmentation fault" in fault["stderr"] and "in sample" in fault["stderr"], fault["stderr"]
        assert "Unexpected segmentation fault encountered in worker" in fault["stderr"]  # torch's handler after it

    def test_attention_backend_sets_transformer_engines_switches(self, monkeypatch):
        """megatron-core turns the choice into TE's NVTE_*_ATTN switches when the model is built
        (the TE backend's DotProductAttention reads them; the torch backend has no use for them)."""
        import os

        monkeypatch.setattr(os, "environ", {k: v for k, v in os.environ.items() if not k.startswith("NVTE_")})
        _trainer(ConsaConfig(window=4, allocation=[[1, 0], [0, 1]]), attention_backend="fused")
        assert {k: os.environ.get(k) for k in ("NVTE_FLASH_ATTN", "NVTE_FUSED_ATTN", "NVTE_UNFUSED_ATTN")} == {
            "NVTE_FLASH_ATTN": "0", "NVTE_FUSED_ATTN": "1", "NVTE_UNFUSED_ATTN": "0"}


    def test_straggler_detector_stays_off_without_a_gpu(self, caplog):
        """--log-straggler on the CPU (megatron-core's detector times CUDA events): a warning, the detector
        off (its timing calls around the batch and the forward do nothing), and training as without it."""
        from megatron_consa.training.loop import STRAGGLER_DETECTOR

        consa = ConsaConfig(window=4, allocation=[[1, 0], [0, 1]])
        plain = _trainer(consa, train_iters=2).train()
        with caplog.at_level("WARNING", logger="megatron_consa.training.loop"):
            trainer = _trainer(consa, train_iters=2, log_straggler=True, log_interval=1)
        assert "--log-straggler times CUDA kernels with CUDA events: no GPU here" in caplog.text
        assert not trainer._straggler_report and not STRAGGLER_DETECTOR.enabled
        assert [r.loss for r in trainer.train()] == [r.loss for r in plain]

    def test_deterministic_mode_reaches_the_models_config(self):
        """--deterministic-mode's field is megatron-core's deterministic_mode in the built model's config."""
        for mode in (False, True):
            trainer = _trainer(ConsaConfig(window=4, allocation=[[1, 0], [0, 1]]), deterministic_mode=mode)
            assert unwrap_model(trainer.chunks[0]).config.deterministic_mode is mode

SETTLE_ARCH = ArchitectureConfig(
    vocab_size=32, hidden_size=64, intermediate_size=128, num_layers=4, num_attention_heads=4,
    num_kv_heads=2, head_dim=16, qk_norm=True, rope_theta=10000.0, max_position_embeddings=48,
)


@pytest.mark.usefixtures("single_rank_mcore")
@pytest.mark.parametrize("granularity,target", [("kv_head", 0.5), ("layer", 0.5), ("layer", 0.75)])
def test_real_trainer_settles_with_the_default_controller(granularity, target):
    """megatron-core optimizer, scheduler, clipping and co-trained weights; every ConsaConfig controller default.
    s_hat must sit within the default tolerance over the judged tail and finalize must accept the run.
    kv_head at 0.75 is the shipped case: tests/e2e/test_quickstart.py and test_demo.py run it as shipped."""
    consa = ConsaConfig(window=4, granularity=granularity, target_sparsity=target)
    training = TrainingConfig(train_iters=400, micro_batch_size=2, global_batch_size=2, seq_length=48, lr=2e-3,
                              min_lr=2e-4, log_interval=0)
    initialize_distributed(ParallelConfig(), seed=training.seed)
    data = PeriodicSequenceData(vocab_size=32, seq_length=48, period=6)
    trainer = ConsaTrainer(arch=SETTLE_ARCH, consa=consa, parallel=ParallelConfig(), training=training, data=data)
    bounds = []
    trainer.train(on_step=lambda r: bounds.append((min(float(g.log_alpha.min()) for g in trainer.gates),
                                                   max(float(g.log_alpha.max()) for g in trainer.gates))))
    report = trainer.settle_report()
    assert report.settled, report.describe()
    allocation = trainer.finalize()
    assert allocation.achieved_sparsity == pytest.approx(target, abs=1e-12)
    assert min(b[0] for b in bounds) >= consa.log_alpha_min and max(b[1] for b in bounds) <= consa.log_alpha_max
    history = [s for _, s in trainer.controller.s_hat_history]
    assert abs(history[len(history) // 2] - target) <= 0.01  # on target by half-way, not just at the end


def test_interrupted_save_falls_back_to_the_previous_checkpoint(tmp_path):
    from megatron_consa.training.checkpoint import CONSA_META_FILE, _resolve, _swap_into_place

    final, tmp = tmp_path / "ckpt", tmp_path / "ckpt.tmp-5"
    for d, tag in ((final, "old"), (tmp, "new"), (tmp_path / "ckpt.old", "stale")):
        d.mkdir()
        (d / CONSA_META_FILE).write_text(tag)
    _swap_into_place(tmp, final)  # a stale .old from an earlier crash does not block it
    assert (final / CONSA_META_FILE).read_text() == "new" and not (tmp_path / "ckpt.old").exists()
    final.rename(tmp_path / "ckpt.old")  # as if a crash hit between the two renames
    assert _resolve(final) == tmp_path / "ckpt.old"
    with pytest.raises(FileNotFoundError, match="not a megatron-consa checkpoint"):
        _resolve(tmp_path / "elsewhere")


def test_a_save_directory_stopped_before_its_first_marker_resumes_its_latest_checkpoint(tmp_path, caplog):
    """Killed between a first save's rename and its marker, --save holds complete checkpoints and no
    latest_checkpointed_iteration.txt: --load of it takes the latest of them (with a warning; --ckpt-step
    any of them), and --pretrained-checkpoint sees a checkpoint there: the relaunched command loads --load,
    not the pretrained checkpoint."""
    from megatron_consa.training.arguments import _holds_checkpoint, parse_run_config
    from megatron_consa.training.checkpoint import CONSA_META_FILE, resolve_load_dir

    save = tmp_path / "save"
    save.mkdir()
    assert not _holds_checkpoint(str(save)) and not _holds_checkpoint(str(tmp_path / "none"))
    with pytest.raises(FileNotFoundError, match="neither a checkpoint"):
        resolve_load_dir(save)
    for it in (2, 4):
        (save / f"iter_{it:07d}").mkdir()
        (save / f"iter_{it:07d}" / CONSA_META_FILE).write_text("{}")
    (save / "iter_0000006").mkdir()  # (a directory without its metadata is not a complete checkpoint)
    with caplog.at_level("WARNING", logger="megatron_consa.training.checkpoint"):
        assert resolve_load_dir(save) == save / "iter_0000004"
    assert f"--load {save}: no latest_checkpointed_iteration.txt, but complete checkpoints (iterations 2, 4)" in caplog.text
    assert resolve_load_dir(save, step=2) == save / "iter_0000002"
    assert _holds_checkpoint(str(save))
    (tmp_path / "pretrained").mkdir()
    (tmp_path / "pretrained" / CONSA_META_FILE).write_text("{}")
    relaunch = parse_run_config(["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
                                 "--seq-length", "32", "--train-iters", "4", "--mock-data", "--vocab-size", "64",
                                 "--load", str(save), "--save", str(save),
                                 "--pretrained-checkpoint", str(tmp_path / "pretrained")]).checkpoint
    assert (relaunch.load, relaunch.finetune, relaunch.started_from_pretrained) == (str(save), False, False)
