"""GPU paths: CUDA torch backend in bf16, Transformer Engine backend, a 1-rank NCCL learning run.

Every test here skips with a reason where CUDA (or Transformer Engine) is absent;
CI never has a GPU. Run them with `make test-gpu` on a GPU machine.
"""

from __future__ import annotations

import math

import pytest
import torch

import megatron_consa  # noqa: F401
from megatron_consa.backends.select import transformer_engine_available

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
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


def _run(backend: str, bf16: bool, iters: int = 6):
    from scenarios_gpu import ARCH, DATA, consa_config

    from megatron_consa.training.config import ParallelConfig, TrainingConfig
    from megatron_consa.training.loop import ConsaTrainer
    from megatron_consa.training.parallel import initialize_distributed

    training = TrainingConfig(
        train_iters=iters, micro_batch_size=2, global_batch_size=4, seq_length=256, lr=1e-3, min_lr=1e-3,
        lr_decay_style="constant", bf16=bf16, allocation_check_interval=1,
    )
    parallel = ParallelConfig()
    initialize_distributed(parallel, seed=training.seed)
    trainer = ConsaTrainer(
        arch=ARCH, consa=consa_config(backend), parallel=parallel, training=training, data=DATA,
        transformer_impl="local",
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

    @needs_te
    def test_te_backend_run_matches_torch_backend(self):
        torch_run = _run("torch", bf16=True)
        te_run = _run("te", bf16=True)
        for a, b in zip(te_run, torch_run):
            assert abs(a.loss - b.loss) < 2e-2 * b.loss
            assert abs(a.s_hat - b.s_hat) < 1e-2


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
