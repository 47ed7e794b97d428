"""ConsaTrainer in one process: gates-only mode, fixed-allocation runs, checks before any work."""

from __future__ import annotations

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


def _trainer(consa: ConsaConfig, parallel: ParallelConfig | None = None, **train_kw) -> ConsaTrainer:
    parallel = parallel or ParallelConfig()
    settings = dict(
        train_iters=3, micro_batch_size=2, global_batch_size=4, seq_length=32, lr=1e-2, min_lr=1e-2,
        lr_decay_style="constant",
    )
    training = TrainingConfig(**{**settings, **train_kw})
    initialize_distributed(parallel, seed=training.seed)
    return ConsaTrainer(arch=ARCH, consa=consa, parallel=parallel, training=training, data=DATA)


def _weights(trainer):
    return {n: p.detach().clone() for n, p in unwrap_model(trainer.chunks[0]).named_parameters()}


@pytest.mark.usefixtures("single_rank_mcore")
class TestTrainer:
    def test_gates_only_mode_trains_gates_and_freezes_weights(self):
        trainer = _trainer(ConsaConfig(window=4, gates_only=True, init_log_alpha=0.0, target_warmup_iters=0))
        before = _weights(trainer)
        trainer.train()
        after = _weights(trainer)
        for name, value in before.items():
            if name.endswith("log_alpha"):
                assert not torch.equal(value, after[name]), name
            else:
                assert torch.equal(value, after[name]), name

    def test_fixed_allocation_reports_its_exact_sparsity_and_has_no_gates(self):
        trainer = _trainer(ConsaConfig(window=4, allocation=[[1, 0], [0, 0]]))
        before = _weights(trainer)
        history = trainer.train()
        assert trainer.gates == [] and not any(n.endswith("log_alpha") for n in before)
        assert [r.s_hat for r in history] == [0.75] * 3
        assert all(r.lambda1 == 0.0 for r in history)
        assert all(not torch.equal(v, _weights(trainer)[n]) for n, v in before.items() if n.endswith("weight"))

    def test_gate_group_has_its_own_lr_and_no_weight_decay(self):
        trainer = _trainer(ConsaConfig(window=4, gate_lr=0.123), weight_decay=0.1)
        gate_ids = {id(g.log_alpha) for g in trainer.gates}
        groups = [g for g in trainer.optimizer.param_groups if any(id(p) in gate_ids for p in g["params"])]
        assert len(groups) == 1 and len(groups[0]["params"]) == len(gate_ids)
        assert groups[0]["max_lr"] == 0.123 and groups[0]["wd_mult"] == 0.0

    def test_bad_layout_fails_before_building(self):
        with pytest.raises(ConsaConfigError, match="global_batch_size"):
            _trainer(ConsaConfig(window=4), global_batch_size=3)

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
        for name, value in _weights(first).items():
            assert torch.equal(value, _weights(fresh)[name]), name
        resumed = _trainer(consa)
        load_checkpoint(resumed, tmp_path / "ckpt")
        assert resumed.iteration == 2 and resumed.controller.lambda1 == first.controller.lambda1
        with pytest.raises(ValueError, match="granularity"):
            load_checkpoint(_trainer(ConsaConfig(window=4, granularity="layer")), tmp_path / "ckpt")


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
