"""ConsaCoreAttention against a dense masked attention written here, and learning vs fixed mode."""

from __future__ import annotations

import math

import pytest
import torch

import megatron_consa  # noqa: F401  (makes megatron.core importable without triton)
from megatron.core.transformer.enums import AttnMaskType

from megatron_consa.attention import ConsaCoreAttention
from megatron_consa.config import ConsaConfig, ConsaConfigError
from megatron_consa.controller import ConsaController, find_gates
from megatron_consa.gates import sample_z
from megatron_consa.model import ConsaTransformerConfig

L, HEADS, G, D, S, B = 3, 8, 4, 16, 29, 2
FA_ROWS = [[1, 0, 0, 1], [0, 0, 0, 0], [1, 1, 1, 1]]


def _config(**consa) -> ConsaTransformerConfig:
    return ConsaTransformerConfig(
        num_layers=L,
        hidden_size=HEADS * D,
        num_attention_heads=HEADS,
        num_query_groups=G,
        kv_channels=D,
        use_cpu_initialization=True,
        attention_dropout=0.0,
        hidden_dropout=0.0,
        consa=ConsaConfig(**consa),
    )


def _attn(layer: int, **consa) -> ConsaCoreAttention:
    return ConsaCoreAttention(_config(**consa), layer_number=layer + 1, attn_mask_type=AttnMaskType.causal)


def _qkv(seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(S, B, HEADS, D, generator=g)
    k = torch.randn(S, B, G, D, generator=g)
    v = torch.randn(S, B, G, D, generator=g)
    return q, k, v


def _reference(q, k, v, fa_row, window, sinks):
    """Dense attention with an explicit per-head mask, built from the convention."""
    rep = HEADS // G
    out = torch.empty(S, B, HEADS, D, dtype=torch.float64)
    i = torch.arange(S)[:, None]
    j = torch.arange(S)[None, :]
    causal = j <= i
    swa = causal & ((j > i - window) | (j < sinks))
    for h in range(HEADS):
        mask = causal if fa_row[h // rep] else swa
        qh = q[:, :, h].double().transpose(0, 1)  # [b, s, d]
        kh = k[:, :, h // rep].double().transpose(0, 1)
        vh = v[:, :, h // rep].double().transpose(0, 1)
        scores = qh @ kh.transpose(1, 2) / math.sqrt(D)
        scores = scores.masked_fill(~mask, float("-inf"))
        out[:, :, h] = (scores.softmax(-1) @ vh).transpose(0, 1)
    return out.reshape(S, B, HEADS * D)


@pytest.mark.usefixtures("single_rank_mcore")
class TestCoreAttention:
    @pytest.mark.parametrize("sinks", [0, 3])
    @pytest.mark.parametrize("layer", [0, 1, 2])
    def test_fixed_allocation_matches_dense_reference(self, layer, sinks):
        attn = _attn(layer, window=6, sink_tokens=sinks, allocation=FA_ROWS).eval()
        q, k, v = _qkv(layer)
        out = attn(q, k, v, None)
        ref = _reference(q, k, v, FA_ROWS[layer], 6, sinks)
        assert out.shape == (S, B, HEADS * D)
        torch.testing.assert_close(out.double(), ref, rtol=1e-6, atol=1e-6)

    @pytest.mark.parametrize("granularity", ["kv_head", "layer"])
    def test_learning_with_exact_gates_equals_fixed(self, granularity):
        layer = 0 if granularity == "kv_head" else 2
        row = FA_ROWS[layer]
        fixed = _attn(layer, window=6, allocation=FA_ROWS)
        learn = _attn(layer, window=6, granularity=granularity)
        with torch.no_grad():
            la = torch.tensor([8.0 if f else -8.0 for f in row])
            learn.log_alpha.copy_(la if granularity == "kv_head" else la[:1])
        q, k, v = _qkv(3)
        ctl = ConsaController(learn.consa, total_cost=L * G)
        ctl.begin_iteration(find_gates([learn]))
        for mode in ("train", "eval"):
            getattr(learn, mode)()
            fixed.train(mode == "train")
            torch.testing.assert_close(learn(q, k, v, None), fixed(q, k, v, None), rtol=1e-6, atol=1e-7)

    def test_learning_mode_mixes_branches_and_gradients_reach_gates(self):
        attn = _attn(1, window=4)
        ctl = ConsaController(attn.consa, total_cost=L * G)
        with torch.no_grad():
            attn.log_alpha.copy_(torch.tensor([-0.5, 0.0, 0.3, 1.0]))
        gates = find_gates([attn])
        ctl.begin_iteration(gates)
        q, k, v = _qkv(4)
        out = attn.train()(q, k, v, None)
        z = sample_z(attn.log_alpha.detach(), ctl.noise(attn.gate_unit_ids), attn.hc)
        zh = z.repeat_interleave(HEADS // G)
        fa = _reference(q, k, v, [1] * G, 4, 0).view(S, B, HEADS, D)
        swa = _reference(q, k, v, [0] * G, 4, 0).view(S, B, HEADS, D)
        expect = (zh[:, None] * fa + (1 - zh[:, None]) * swa).reshape(S, B, -1)
        torch.testing.assert_close(out.double(), expect, rtol=1e-6, atol=1e-6)
        # same iteration, same noise: recomputation gives the same output
        torch.testing.assert_close(attn(q, k, v, None), out, rtol=0, atol=0)
        out.square().sum().backward()
        assert attn.log_alpha.grad is not None
        interior = (z > 0) & (z < 1)
        assert interior.any() and torch.all(attn.log_alpha.grad[interior] != 0)
        assert torch.all(attn.log_alpha.grad[~interior] == 0)

    def test_training_forward_plans_from_the_controllers_host_copy(self, monkeypatch):
        """After begin_iteration the training forward reads no gate value back from the
        device; a gate edited after the copy is noticed (and then read back once)."""
        attn = _attn(0, window=4).train()
        with torch.no_grad():
            attn.log_alpha.copy_(torch.tensor([8.0, -8.0, 0.2, -0.4]))
        ctl = ConsaController(attn.consa, total_cost=L * G)
        ctl.begin_iteration(find_gates([attn]))
        reads = []
        real_cpu = torch.Tensor.cpu

        def counting_cpu(t, *args, **kwargs):
            if t.data_ptr() == attn.log_alpha.data_ptr():  # a gate read back from its device
                reads.append(t.shape)
            return real_cpu(t, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, "cpu", counting_cpu)
        q, k, v = _qkv(5)
        out = attn(q, k, v, None)
        attn(q, k, v, None)  # recomputation: same plan
        assert reads == []
        z = sample_z(attn.log_alpha.detach(), ctl.noise(attn.gate_unit_ids), attn.hc)
        zh = z.repeat_interleave(HEADS // G)[:, None]
        fa = _reference(q, k, v, [1] * G, 4, 0).view(S, B, HEADS, D)
        swa = _reference(q, k, v, [0] * G, 4, 0).view(S, B, HEADS, D)
        torch.testing.assert_close(out.double(), (zh * fa + (1 - zh) * swa).reshape(S, B, -1), rtol=1e-6, atol=1e-6)

        with torch.no_grad():  # every gate saturated now: the plan must follow
            attn.log_alpha.copy_(torch.tensor([8.0, -8.0, -8.0, 8.0]))
        out = attn(q, k, v, None)
        assert reads  # read back (the CPU shims may route one read through two calls)
        torch.testing.assert_close(out.double(), _reference(q, k, v, [1, 0, 0, 1], 4, 0), rtol=1e-6, atol=1e-6)

    def test_begin_iteration_draws_and_moves_every_gates_noise_once(self, monkeypatch):
        """The noise of all layers is drawn in one call and handed out as views of one
        tensor (on a GPU: one host-to-device copy, not one per layer); the unit ids stay on
        the host when the layers move (no device-to-host read per layer)."""
        import megatron_consa.controller as controller_module

        layers = [_attn(i, window=4).train() for i in range(L)]
        assert all(a.gate_unit_ids.device.type == "cpu" for a in layers)
        moved = _attn(0, window=4).to("meta")
        assert moved.log_alpha.device.type == "meta" and moved.gate_unit_ids.device.type == "cpu"
        draws = []
        real = controller_module.counter_uniform
        monkeypatch.setattr(controller_module, "counter_uniform",
                            lambda *args, **kwargs: draws.append(args[2]) or real(*args, **kwargs))
        ctl = ConsaController(layers[0].consa, total_cost=L * G)
        ctl.begin_iteration(find_gates(layers))
        assert len(draws) == 1 and draws[0].tolist() == list(range(L * G))
        storages = {a._gate_noise.untyped_storage().data_ptr() for a in layers}
        assert len(storages) == 1
        for a in layers:
            expect = real(a.consa.noise_seed, ctl.iteration, a.gate_unit_ids, a.hc.eps)
            torch.testing.assert_close(a._gate_noise, expect, rtol=0, atol=0)
            torch.testing.assert_close(a._gate_noise_host, expect, rtol=0, atol=0)

    @pytest.mark.parametrize("row", [[1, 0, 0, 1], [1, 1, 0, 0]])  # heads gathered by type / two views
    def test_saturated_mixed_gates_run_each_branch_on_its_heads_with_gates_in_graph(self, row):
        attn = _attn(0, window=5).train()
        with torch.no_grad():
            attn.log_alpha.copy_(torch.tensor([8.0 if f else -8.0 for f in row]))
        ConsaController(attn.consa, total_cost=L * G).begin_iteration(find_gates([attn]))
        calls = []
        for name in ("full", "sliding"):
            real = getattr(attn.backend, name)
            setattr(attn.backend, name, lambda q, k, v, real=real, name=name: calls.append((name, q.size(2))) or real(q, k, v))
        q, k, v = (t.requires_grad_(True) for t in _qkv(6))
        out = attn(q, k, v, None)
        assert sorted(calls) == [("full", HEADS // 2), ("sliding", HEADS // 2)]
        torch.testing.assert_close(out.double(), _reference(q, k, v, row, 5, 0), rtol=1e-6, atol=1e-6)
        out.square().sum().backward()
        assert attn.log_alpha.grad is not None and torch.all(attn.log_alpha.grad == 0)
        assert q.grad is not None and torch.isfinite(q.grad).all()

    def test_attention_mask_causal_is_accepted_padding_is_refused(self):
        """The kernels apply causality themselves: megatron's causal mask changes nothing,
        a padding mask (which they would silently drop) is refused, as is a KV-cache call."""
        from megatron.core.transformer.enums import AttnMaskType

        attn = _attn(0, window=4, allocation=FA_ROWS).eval()
        q, k, v = _qkv(7)
        causal = torch.ones(S, S, dtype=torch.bool).triu(1)[None, None].expand(B, 1, S, S)
        torch.testing.assert_close(attn(q, k, v, causal), attn(q, k, v, None), rtol=0, atol=0)
        padded = causal.clone()
        padded[0, :, :, :3] = True  # the first sequence's first three keys are padding
        for mask_type in (AttnMaskType.causal, AttnMaskType.padding_causal):
            with pytest.raises(ConsaConfigError, match="attention_mask hides more"):
                attn(q, k, v, padded, attn_mask_type=mask_type)
        with pytest.raises(ConsaConfigError, match="attention_mask of shape"):
            attn(q, k, v, causal.float())
        # a mask already found causal is remembered, but not for another sequence length
        short = torch.ones(S - 1, S - 1, dtype=torch.bool).triu(1)[None, None]
        attn(q[:-1], k[:-1], v[:-1], short)
        with pytest.raises(ConsaConfigError, match="attention_mask of shape"):
            attn(q, k, v, short)
        with pytest.raises(NotImplementedError, match="KV cache"):
            attn(q[-1:], k, v, None)

    def test_training_without_noise_is_a_clear_error(self):
        attn = _attn(0, window=4).train()
        with pytest.raises(RuntimeError, match="begin_iteration"):
            attn(*_qkv(), None)

    def test_bad_allocation_shape_names_the_field(self):
        with pytest.raises(ConsaConfigError, match="allocation"):
            _attn(0, window=4, allocation=[[1, 0], [0, 1]])
        with pytest.raises(ConsaConfigError, match="allocation"):
            _attn(0, window=4, granularity="layer", allocation=FA_ROWS)


@pytest.mark.parametrize(
    "field,value",
    [
        ("target_sparsity", 1.0), ("target_sparsity", -0.1), ("window", 0), ("sink_tokens", -1),
        ("granularity", "head"), ("target_warmup_iters", "4"), ("lagrangian_lr", float("nan")),
        ("allocation", [1, 0]), ("allocation", [[1.0, 0.0]]), ("allocation", [[True, False]]),
        # malformed types that used to be accepted or fail later with a bare TypeError
        ("gates_only", "false"), ("gates_only", 1), ("noise_seed", "abc"), ("noise_seed", 1.5),
        ("target_sparsity", False), ("hc_gamma", "-0.1"), ("hc_zeta", None), ("window", True),
        ("integrate_during_warmup", "no"), ("lagrangian_rho", -1.0), ("settle_tail_fraction", 0.0),
        ("settle_tolerance", "0.01"), ("finalize_margin", float("inf")), ("backend", None), ("init_log_alpha", "3"),
    ],
)
def test_bad_config_names_the_field(field, value):
    with pytest.raises(ConsaConfigError, match=field):
        ConsaConfig(**{field: value})


def test_kv_groups_not_divisible_by_tp_names_the_fix():
    with pytest.raises(ConsaConfigError, match="tensor_model_parallel_size"):
        ConsaConfig().check_model_shape(num_layers=2, num_kv_heads=3, tp_size=2)


def test_gates_only_with_a_fixed_allocation_is_refused():
    with pytest.raises(ConsaConfigError, match="gates_only"):
        ConsaConfig(allocation=[[1, 0]], gates_only=True)


def _lerp_reference(swa, fa, z, rep):
    return torch.lerp(swa, fa, z.to(swa.dtype).repeat_interleave(rep)[:, None])


def test_gate_blend_is_lerp_with_the_gate_gradient_summed_in_float32():
    """Learning mode's blend swa + z (fa - swa): in fp32 lerp exactly, values and every gradient; in bf16 / fp16
    the gate's gradient is the float32 sum of the model-dtype products grad * (fa - swa) (lerp's own backward
    rounds it to the model's dtype: 0.4% in bf16, and in fp16 a total past 65504 is inf)."""
    from megatron_consa.attention import _GateBlend

    rep = HEADS // G
    g = torch.Generator().manual_seed(3)
    swa, fa, grad = (torch.randn(S, B, HEADS, D, generator=g, dtype=torch.float64) for _ in range(3))
    z0 = torch.rand(G, generator=g, dtype=torch.float64).float()

    def run(fn, dtype, grad_out, fa=fa):
        a, b = swa.to(dtype).requires_grad_(), fa.to(dtype).requires_grad_()
        z = z0.clone().requires_grad_()
        out = fn(a, b, z)
        out.backward(grad_out.to(dtype))
        return out, a.grad, b.grad, z.grad

    ours = run(lambda a, b, z: _GateBlend.apply(a, b, z, rep), torch.float32, grad)
    ref = run(lambda a, b, z: _lerp_reference(a, b, z, rep), torch.float32, grad)
    for got, want in zip(ours, ref):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)

    above = swa + (fa - swa).abs()  # FA's output above SWA's everywhere
    for dtype, grad_out, fa_out in ((torch.bfloat16, grad, fa), (torch.float16, grad.abs() * 1000, above)):
        # fp16: a loss-scaled gradient of one sign against a difference of one sign, so each head's total (~1e6)
        # is past fp16's range
        out, grad_swa, grad_fa, grad_z = run(lambda a, b, z: _GateBlend.apply(a, b, z, rep), dtype, grad_out, fa_out)
        lerp_out, lerp_swa, lerp_fa, _ = run(lambda a, b, z: _lerp_reference(a, b, z, rep), dtype, grad_out, fa_out)
        assert torch.equal(out, lerp_out) and torch.equal(grad_swa, lerp_swa) and torch.equal(grad_fa, lerp_fa)
        products = (grad_out.to(dtype) * (fa_out.to(dtype) - swa.to(dtype))).double()  # what the backward sums
        want = products.sum(dim=(0, 1, 3)).view(G, rep).sum(1)
        assert grad_z.dtype == torch.float32 and torch.isfinite(grad_z).all(), (dtype, grad_z)
        torch.testing.assert_close(grad_z.double(), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
        if dtype == torch.float16:
            assert want.abs().min() > 65504  # lerp's fp16 total would be inf
