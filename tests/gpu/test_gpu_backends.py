"""GPU paths: CUDA torch backend in bf16, Transformer Engine backend and layer spec, 1-rank NCCL runs.

The TE layer spec: ConSA all-FA equals megatron-core's stock TE-spec GPTModel
(logits and gradients, same weights), reordered mixed layers with the TE backend
equal the torch backend in the same spec, and a learning run through the whole
TE spec follows the torch backend's.

Every test here skips with a reason where CUDA (or Transformer Engine) is absent;
CI never has a GPU. Run them with `make test-gpu` on a GPU machine.
"""

from __future__ import annotations

import math
import os
import re

import pytest
import torch

import megatron_consa  # noqa: F401
from megatron_consa.backends.select import transformer_engine_available

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
# CONSA_REQUIRE_TE=1 (the device kit, once TE imported there): a missing TE fails instead of skipping
_te_required = os.environ.get("CONSA_REQUIRE_TE") == "1"
if _te_required and torch.cuda.is_available() and not transformer_engine_available():
    raise RuntimeError("CONSA_REQUIRE_TE=1 but Transformer Engine does not import here (the warning above says why)")
needs_te = pytest.mark.skipif(
    not transformer_engine_available(), reason="needs Transformer Engine (pip install megatron-consa[gpu])"
)

HEADS, G, D, S, B = 8, 4, 64, 512, 2
ROWS = [[1, 0, 0, 1], [0, 0, 0, 0]]


def _attn(backend: str, **consa):
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_consa.attention import ConsaCoreAttention
    from megatron_consa.config import ConsaConfig
    from megatron_consa.model import ConsaTransformerConfig

    cfg = ConsaTransformerConfig(
        num_layers=2,
        hidden_size=HEADS * D,
        num_attention_heads=HEADS,
        num_query_groups=G,
        kv_channels=D,
        attention_dropout=0.0,
        hidden_dropout=0.0,
        bf16=True,
        params_dtype=torch.bfloat16,
        consa=ConsaConfig(backend=backend, **consa),
    )
    return ConsaCoreAttention(cfg, layer_number=1, attn_mask_type=AttnMaskType.causal).cuda()


def _qkv(dtype=torch.bfloat16):
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(S, B, HEADS, D, device="cuda", generator=g, dtype=dtype)
    k = torch.randn(S, B, G, D, device="cuda", generator=g, dtype=dtype)
    v = torch.randn(S, B, G, D, device="cuda", generator=g, dtype=dtype)
    return q, k, v


def _dense(q, k, v, fa_row, window):
    rep = HEADS // G
    i = torch.arange(S, device=q.device)[:, None]
    j = torch.arange(S, device=q.device)[None, :]
    causal = j <= i
    swa = causal & (j > i - window)
    out = torch.empty(S, B, HEADS, D, dtype=torch.float64, device=q.device)
    for h in range(HEADS):
        mask = causal if fa_row[h // rep] else swa
        qh, kh, vh = (t.double().transpose(0, 1) for t in (q[:, :, h], k[:, :, h // rep], v[:, :, h // rep]))
        s = (qh @ kh.transpose(1, 2) / math.sqrt(D)).masked_fill(~mask, float("-inf"))
        out[:, :, h] = (s.softmax(-1) @ vh).transpose(0, 1)
    return out.reshape(S, B, HEADS * D)


@pytest.mark.usefixtures("single_rank_mcore")
class TestCudaAttention:
    @pytest.mark.parametrize("backend", ["torch", pytest.param("te", marks=needs_te)])
    def test_fixed_mode_bf16_matches_dense_fp64(self, backend):
        attn = _attn(backend, window=64, allocation=ROWS).eval()
        q, k, v = _qkv()
        out = attn(q, k, v, None)
        ref = _dense(q, k, v, ROWS[0], 64)
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out.double(), ref, rtol=2e-2, atol=2e-2)

    @needs_te
    def test_te_learning_mode_matches_torch_backend(self):
        from megatron_consa.controller import ConsaController, find_gates

        outs, grads = [], []
        for backend in ("torch", "te"):
            attn = _attn(backend, window=64)
            with torch.no_grad():
                attn.log_alpha.copy_(torch.tensor([-0.5, 0.0, 0.4, 1.0]))
            ctl = ConsaController(attn.consa, total_cost=2 * G)
            ctl.begin_iteration(find_gates([attn]))
            q, k, v = _qkv()
            out = attn.train()(q, k, v, None)
            out.float().square().mean().backward()
            outs.append(out.float())
            grads.append(attn.log_alpha.grad.clone())
        torch.testing.assert_close(outs[1], outs[0], rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(grads[1], grads[0], rtol=5e-2, atol=1e-4)

    @needs_te
    def test_te_backend_selects_once_per_configuration(self, monkeypatch):
        """Learning mode alternates TE's causal and windowed calls in every layer; TE's
        one-entry cache alone selects its backend on every call. With the memo, later
        steps select nothing, and the step computes what it computes without it."""
        import transformer_engine.pytorch.attention.dot_product_attention.utils as dpa_utils

        from megatron_consa.backends import select
        from megatron_consa.controller import ConsaController, find_gates

        assert select.te_backend_selection_cache() is not None  # this TE keeps it where we look
        real = dpa_utils.get_attention_backend
        calls = []
        monkeypatch.setattr(dpa_utils, "get_attention_backend", lambda params: calls.append(1) or real(params))

        def steps(n):
            attn = _attn("te", window=64)
            with torch.no_grad():
                attn.log_alpha.copy_(torch.tensor([-0.5, 0.0, 0.4, 1.0]))
            ConsaController(attn.consa, total_cost=2 * G).begin_iteration(find_gates([attn]))
            outs, counts = [], []
            for _ in range(n):
                q, k, v = (t.requires_grad_() for t in _qkv())
                out = attn.train()(q, k, v, None)
                out.float().square().mean().backward()
                outs.append((out.detach().float(), q.grad.float()))
                counts.append(len(calls))
            return outs, counts

        memo, counts = steps(3)
        assert counts[0] >= 1 and counts[1] == counts[2] == counts[0], counts
        calls.clear()
        monkeypatch.setattr(select, "te_backend_selection_cache", lambda: None)
        alone, counts = steps(3)
        assert counts[2] > counts[0], counts  # without the memo TE selects again
        for (o1, g1), (o2, g2) in zip(memo, alone):
            torch.testing.assert_close(o1, o2, rtol=0, atol=0)  # same kernel, deterministic forward
            # TE's backward may accumulate dQ in any order (NVTE_ALLOW_NONDETERMINISTIC_ALGO=1)
            torch.testing.assert_close(g1, g2, rtol=1e-2, atol=1e-3)


def _run(backend: str, bf16: bool, iters: int = 6, transformer_impl: str = "local", **train_kw):
    from scenarios_gpu import ARCH, DATA, consa_config

    from megatron_consa.training.config import ParallelConfig, TrainingConfig
    from megatron_consa.training.loop import ConsaTrainer
    from megatron_consa.training.parallel import initialize_distributed

    training = TrainingConfig(
        train_iters=iters, micro_batch_size=2, global_batch_size=4, seq_length=256, lr=1e-3, min_lr=1e-3,
        lr_decay_style="constant", bf16=bf16, allocation_check_interval=1, **train_kw,
    )
    parallel = ParallelConfig()
    initialize_distributed(parallel, seed=training.seed)
    trainer = ConsaTrainer(
        arch=ARCH, consa=consa_config(backend), parallel=parallel, training=training, data=DATA,
        transformer_impl=transformer_impl,
    )
    return trainer.train()


@pytest.mark.usefixtures("single_rank_mcore")
class TestSingleRankNccl:
    def test_nccl_learning_run_bf16_follows_fp32(self):
        assert torch.distributed.get_backend() == "nccl"
        fp32 = _run("torch", bf16=False)
        bf16 = _run("torch", bf16=True)
        for a, b in zip(bf16, fp32):
            assert math.isfinite(a.loss) and abs(a.loss - b.loss) < 2e-2 * b.loss
            assert abs(a.s_hat - b.s_hat) < 1e-2
        assert fp32[-1].loss < fp32[0].loss

    def test_fused_cross_entropy_run_follows_the_unfused_one(self):
        """--cross-entropy-loss-fusion (on CUDA only): megatron-core's fused cross entropy is the same loss."""
        plain = _run("torch", bf16=True)
        fused = _run("torch", bf16=True, cross_entropy_loss_fusion=True)
        for a, b in zip(fused, plain):
            assert math.isfinite(a.loss) and abs(a.loss - b.loss) < 1e-2 * b.loss

    def test_async_save_with_a_persistent_worker_writes_the_state_of_its_iteration(self, tmp_path):
        """--async-save --use-persistent-ckpt-worker (CUDA only): the worker copies the GPU tensors
        to the host before the trainer goes on; the checkpoint it writes while two more steps change
        the weights equals a synchronous save of the same iteration."""
        from checkpoint_contents import checkpoint_contents, differing_keys
        from scenarios_gpu import ARCH, DATA, consa_config

        from megatron_consa.training.checkpoint import CheckpointWriter, save_checkpoint
        from megatron_consa.training.config import ParallelConfig, TrainingConfig
        from megatron_consa.training.loop import ConsaTrainer

        training = TrainingConfig(train_iters=6, micro_batch_size=2, global_batch_size=4, seq_length=256, lr=1e-3,
                                  min_lr=1e-3, lr_decay_style="constant", bf16=True)
        trainer = ConsaTrainer(arch=ARCH, consa=consa_config("torch"), parallel=ParallelConfig(), training=training,
                               data=DATA)
        for _ in range(2):
            trainer.train_step()
        save_checkpoint(trainer, tmp_path / "sync")
        writer = CheckpointWriter(async_save=True, persistent_worker=True)
        assert writer.persistent_worker
        save_checkpoint(trainer, tmp_path / "async", writer=writer)
        for _ in range(2):
            trainer.train_step()
        writer.close()
        sync, written = checkpoint_contents(tmp_path / "sync"), checkpoint_contents(tmp_path / "async")
        assert "/embedding.word_embeddings.weight" in sync and not differing_keys(sync, written)

    def test_cuda_timers_and_memory_figures(self):
        """--timing-log-level 2 and --log-memory-to-tensorboard's figures on CUDA: the timers synchronise
        the device (the forward-backward time covers its compute parts), and the CUDA allocator's
        figures come under Megatron-LM's names."""
        from scenarios_gpu import ARCH, DATA, consa_config

        from megatron_consa.training.config import ParallelConfig, TrainingConfig
        from megatron_consa.training.loop import ConsaTrainer
        from megatron_consa.training.timing import memory_scalars

        training = TrainingConfig(train_iters=4, micro_batch_size=2, global_batch_size=4, seq_length=256, lr=1e-3,
                                  min_lr=1e-3, lr_decay_style="constant", bf16=True, timing_log_level=2,
                                  log_interval=100)
        trainer = ConsaTrainer(arch=ARCH, consa=consa_config("torch"), parallel=ParallelConfig(), training=training,
                               data=DATA)
        trainer.train(3)  # (the log line of iteration 1 resets the timers: they hold iterations 2-3; 4 would log)
        elapsed = {name: trainer.timers(name).elapsed(reset=False)
                   for name in ("forward-backward", "forward-compute", "backward-compute", "optimizer")}
        assert 0 < elapsed["forward-compute"] + elapsed["backward-compute"] <= elapsed["forward-backward"] * 1.01
        assert elapsed["optimizer"] > 0
        figures = memory_scalars()
        assert set(figures) == {"mem-reserved-bytes", "mem-allocated-bytes", "mem-max-allocated-bytes",
                                "mem-allocated-count"}
        assert 0 < figures["mem-allocated-bytes"] <= figures["mem-max-allocated-bytes"]
        assert figures["mem-allocated-bytes"] <= figures["mem-reserved-bytes"] and figures["mem-allocated-count"] > 0

    def test_straggler_detector_reports_at_every_log_line(self, caplog):
        """--log-straggler on CUDA: megatron-core's detector times the forward passes with CUDA events and
        each log line (iterations 1, 2 and 4 of 4) brings its report, the one rank both slowest and fastest;
        the losses are a run's without it (to run-to-run noise)."""
        import socket

        pytest.importorskip("pynvml", reason="the straggler report reads NVML (pip install nvidia-ml-py)")
        with socket.socket() as s:  # (a free port for the first rank's on/off controller)
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        plain = _run("torch", bf16=True, iters=4, log_interval=2)
        with caplog.at_level("INFO", logger="megatron.core.utils"):
            timed = _run("torch", bf16=True, iters=4, log_interval=2, log_straggler=True, straggler_ctrlr_port=port)
        from megatron_consa.training.loop import STRAGGLER_DETECTOR

        STRAGGLER_DETECTOR.start = STRAGGLER_DETECTOR.stop = STRAGGLER_DETECTOR.null_method  # (off for later tests)
        reports = [r.getMessage() for r in caplog.records if "MnRtt/Rnk" in r.getMessage()]
        assert len(reports) == 3, caplog.text
        for m in reports:  # (rank 0 alone: the slowest and the fastest, with a positive time)
            assert re.search(r"MnRtt/Rnk: [\d.]+ms/0 \| MxRtt/Rnk: [\d.]+ms/0", m) and "MnPwr/Rnk" in m, m
            assert float(re.search(r"MnRtt/Rnk: ([\d.]+)ms", m).group(1)) > 0
        # (without --deterministic-mode two CUDA runs need not agree bit for bit)
        assert [r.loss for r in timed] == pytest.approx([r.loss for r in plain], rel=1e-3)

    def test_deterministic_mode_repeats_a_run_bit_for_bit(self, monkeypatch):
        """--deterministic-mode on CUDA: every operation of a learning run (the torch backend, bf16) has a
        deterministic kernel (torch raises otherwise), two runs give the same losses bit for bit, and
        the environment holds Megatron-LM's settings."""
        import os

        from megatron_consa.training.parallel import DETERMINISTIC_ENV, apply_deterministic_mode

        for name in DETERMINISTIC_ENV:  # (setenv first: teardown then restores the value, or the absence, it had)
            monkeypatch.setenv(name, "")
            monkeypatch.delenv(name)
        was = torch.are_deterministic_algorithms_enabled()
        try:
            apply_deterministic_mode()
            assert {name: os.environ[name] for name in DETERMINISTIC_ENV} == DETERMINISTIC_ENV
            first = _run("torch", bf16=True, deterministic_mode=True)
            second = _run("torch", bf16=True, deterministic_mode=True)
        finally:
            torch.use_deterministic_algorithms(was)
        assert [r.loss for r in first] == [r.loss for r in second]
        assert [r.s_hat for r in first] == [r.s_hat for r in second]

    def test_deterministic_and_cpu_initialization_reach_megatron_cores_config(self):
        from scenarios_gpu import ARCH, DATA, consa_config

        from megatron_consa.training.config import ParallelConfig, TrainingConfig
        from megatron_consa.training.loop import ConsaTrainer

        for flags, expected in (({}, (False, False)), (dict(deterministic_mode=True, use_cpu_initialization=True),
                                                        (True, True))):
            training = TrainingConfig(train_iters=1, micro_batch_size=2, global_batch_size=4, seq_length=256,
                                      bf16=True, **flags)
            trainer = ConsaTrainer(arch=ARCH, consa=consa_config("torch"), parallel=ParallelConfig(),
                                   training=training, data=DATA)
            assert (trainer.config.deterministic_mode, trainer.config.use_cpu_initialization) == expected

    @needs_te
    def test_te_backend_run_matches_torch_backend(self):
        torch_run = _run("torch", bf16=True)
        te_run = _run("te", bf16=True)
        for a, b in zip(te_run, torch_run):
            assert abs(a.loss - b.loss) < 2e-2 * b.loss
            assert abs(a.s_hat - b.s_hat) < 1e-2

    @needs_te
    def test_te_layer_spec_run_matches_torch_backend_in_the_same_spec(self):
        """Learning mode through the whole TE spec (TE linears, norms and attention) vs the
        same spec with the torch attention backend: the same initialisation, the same data."""
        torch_run = _run("torch", bf16=True, transformer_impl="transformer_engine")
        te_run = _run("te", bf16=True, transformer_impl="transformer_engine")
        for a, b in zip(te_run, torch_run):
            assert math.isfinite(a.loss) and abs(a.loss - b.loss) < 2e-2 * b.loss
            assert abs(a.s_hat - b.s_hat) < 1e-2
        assert te_run[-1].loss < te_run[0].loss


def _te_spec_models(rows, backends, *, stock: bool):
    """bf16 GPTModels from the Transformer Engine layer spec, all with the same weights:
    megatron-core's stock TE-spec model (if `stock`) and one ConSA TE-spec model per backend
    with the fixed allocation `rows` (stored by type: reordered KV groups)."""
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
    from megatron.core.transformer.module import Float16Module

    from megatron_consa.config import ConsaConfig
    from megatron_consa.model import build_gpt_model, build_transformer_config
    from megatron_consa.self_attention import to_canonical_order, to_stored_order
    from scenarios_gpu import ARCH

    common = dict(params_dtype=torch.bfloat16, bf16=True)
    models = {}
    for backend in backends:
        cfg = build_transformer_config(ARCH, ConsaConfig(window=64, allocation=rows, backend=backend), **common)
        model_parallel_cuda_manual_seed(3)
        models[backend] = (build_gpt_model(cfg, ARCH, use_transformer_engine=True), cfg)
    if stock:  # megatron-core's own TE layer spec and TEDotProductAttention
        cfg = build_transformer_config(ARCH, ConsaConfig(), **common)
        model_parallel_cuda_manual_seed(3)
        models["stock"] = (build_gpt_model(cfg, ARCH, use_transformer_engine=True, stock_attention=True), cfg)
    first = next(iter(models.values()))[0]
    canonical = to_canonical_order(first, {k: v for k, v in first.state_dict().items() if "_extra_state" not in k})
    out = {}
    for name, (model, cfg) in models.items():
        state = to_stored_order(model, canonical)
        missing, unexpected = model.load_state_dict(state, strict=False)
        assert [k for k in missing if "_extra_state" not in k] == [] and unexpected == [], (name, missing, unexpected)
        out[name] = Float16Module(cfg, model.cuda())
    return out


def _logits_and_grads(model, tokens):
    from megatron_consa.self_attention import to_canonical_order

    model.zero_grad(set_to_none=True)
    pos = torch.arange(tokens.size(1), device="cuda").unsqueeze(0).expand_as(tokens)
    logits = model(tokens, pos, attention_mask=None)
    logits.float().square().mean().backward()
    inner = model.module
    grads = to_canonical_order(inner, {n: p.grad.float() for n, p in inner.named_parameters() if p.grad is not None})
    return logits.float().detach(), grads


@needs_te
@pytest.mark.usefixtures("single_rank_mcore")
class TestTransformerEngineSpec:
    """ConSA's TE layer spec (TE linears and norms, TE attention backend) on the GPU."""

    def test_all_fa_equals_megatron_cores_stock_te_spec_model(self):
        from scenarios_gpu import ARCH

        models = _te_spec_models([[1] * ARCH.num_kv_heads] * ARCH.num_layers, ["te"], stock=True)
        tokens = torch.randint(0, ARCH.vocab_size, (2, 256), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
        ours, ours_grads = _logits_and_grads(models["te"], tokens)
        stock, stock_grads = _logits_and_grads(models["stock"], tokens)
        # The same TE kernels on the same weights (bit for bit unless TE picks another
        # attention backend for one of the two calls; bf16 rounding otherwise).
        torch.testing.assert_close(ours, stock, rtol=1e-2, atol=1e-2)
        assert sorted(ours_grads) == sorted(stock_grads)
        for name, g in stock_grads.items():
            scale = g.abs().max().clamp_min(1e-6)
            assert ((ours_grads[name] - g).abs().max() / scale).item() < 2e-2, name

    def test_mixed_reordered_layers_te_backend_match_torch_backend(self):
        from scenarios_gpu import ARCH

        rows = [[1, 0, 1, 0], [0, 0, 0, 1], [0, 0, 0, 0], [1, 1, 0, 1]][: ARCH.num_layers]
        models = _te_spec_models(rows, ["te", "torch"], stock=False)
        inner = models["te"].module
        orders = [m.self_attention.kv_group_order for m in inner.decoder.layers]
        assert orders[0] == (0, 2, 1, 3)  # the interleaved row is stored by type
        tokens = torch.randint(0, ARCH.vocab_size, (2, 256), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
        te_logits, te_grads = _logits_and_grads(models["te"], tokens)
        torch_logits, torch_grads = _logits_and_grads(models["torch"], tokens)
        torch.testing.assert_close(te_logits, torch_logits, rtol=2e-2, atol=2e-2)
        for name, g in torch_grads.items():
            scale = g.abs().max().clamp_min(1e-6)
            assert ((te_grads[name] - g).abs().max() / scale).item() < 5e-2, name
        # the window matters at this length: an all-FA model differs by more than the tolerance
        all_fa = _te_spec_models([[1] * ARCH.num_kv_heads] * ARCH.num_layers, ["te"], stock=False)["te"]
        assert (_logits_and_grads(all_fa, tokens)[0] - te_logits).abs().max() > 1e-1


@pytest.mark.parametrize("sinks", [0, 4])
def test_flex_sliding_window_matches_dense_reference_and_blocked_kernel(sinks):
    from megatron_consa.backends.torch_attention import (
        flex_sliding_window_attention,
        sliding_window_attention,
        sliding_window_mask,
        dense_masked_attention,
    )

    g = torch.Generator(device="cuda").manual_seed(1)
    q = torch.randn(2, 8, 1000, 64, device="cuda", generator=g, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(2, 4, 1000, 64, device="cuda", generator=g, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(2, 4, 1000, 64, device="cuda", generator=g, dtype=torch.bfloat16, requires_grad=True)
    scale = 64**-0.5
    flex = flex_sliding_window_attention(q, k, v, window=100, scale=scale, sink_tokens=sinks)
    blocked = sliding_window_attention(q, k, v, window=100, scale=scale, sink_tokens=sinks)
    mask = sliding_window_mask(1000, 100, sinks, device="cuda")
    ref = dense_masked_attention(
        q.double(), k.double().repeat_interleave(2, 1), v.double().repeat_interleave(2, 1), mask=mask, scale=scale
    )
    torch.testing.assert_close(flex.double(), ref, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(blocked.double(), ref, rtol=2e-2, atol=2e-2)
    gf = torch.autograd.grad(flex.float().square().sum(), (q, k, v))
    gb = torch.autograd.grad(blocked.float().square().sum(), (q, k, v))
    for a, b in zip(gf, gb):
        torch.testing.assert_close(a.float(), b.float(), rtol=5e-2, atol=5e-2)
