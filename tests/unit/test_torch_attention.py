"""Tests for megatron_consa.backends.torch_attention (pure-torch FA / SWA kernels),
against the independent fp64 reference of tests/attention_reference.py."""

import sys
from pathlib import Path

import pytest
import torch

from megatron_consa.backends.torch_attention import (
    default_block_size,
    dense_masked_attention,
    full_causal_attention,
    sliding_window_attention,
    sliding_window_mask,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from attention_reference import reference_attention as _ref_attention  # noqa: E402
from attention_reference import visible_mask as _ref_mask  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

# The CPU has two SWA kernels: the banded C++ one (shipped default) and, where that
# does not build, the chunked layout on PyTorch's CPU flash ops.
CPU_KERNELS = ["banded", "flash_op"]


def _use_cpu_kernel(monkeypatch, kernel):
    from megatron_consa.backends import cpu_extension

    if kernel == "flash_op":
        monkeypatch.setattr(cpu_extension, "extension", lambda: None)
    else:
        assert cpu_extension.extension() is not None, "the banded CPU kernel must build where make test runs"


def _make_qkv(b, hkv, rep, s, d, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hkv * rep, s, d, generator=g, dtype=torch.float64)
    k = torch.randn(b, hkv, s, d, generator=g, dtype=torch.float64)
    v = torch.randn(b, hkv, s, d, generator=g, dtype=torch.float64)
    return [t.to(device=device, dtype=dtype).requires_grad_(True) for t in (q, k, v)]


def _check_against_ref(fn, s, window, sinks, rep, dtype, device, fwd_tol, grad_tol, d=16, b=2, hkv=2):
    """Forward within ``fwd_tol`` and gradients within ``grad_tol`` (absolute).

    For fp32 the gradient tolerance is relative to the largest reference entry
    when that exceeds 1: dK/dV of a sink key sum ~100 O(1) terms (|g| up to ~10),
    so fp32 rounding alone reaches ~1e-6 there."""
    scale = 0.7 / d ** 0.5
    q, k, v = _make_qkv(b, hkv, rep, s, d, dtype, device)
    out = fn(q, k, v, scale)
    assert out.shape == (b, hkv * rep, s, d) and out.dtype == dtype
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grads = torch.autograd.grad(out, (q, k, v), grad_out.to(device=device, dtype=dtype))

    qr, kr, vr = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    ref = _ref_attention(qr, kr, vr, _ref_mask(s, window, sinks), scale)
    ref_grads = torch.autograd.grad(ref, (qr, kr, vr), grad_out.to(device))

    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), ref, atol=fwd_tol, rtol=0)
    for name, g, rg in zip("qkv", grads, ref_grads):
        assert torch.isfinite(g).all(), name
        atol = grad_tol * (max(1.0, rg.abs().max().item()) if dtype == torch.float32 else 1.0)
        torch.testing.assert_close(g.double(), rg, atol=atol, rtol=0, msg=lambda m: f"d{name}: {m}")


# (s, W, S, B): s not divisible by B, W = 1, W = s - 1, W >= s, sinks 0/1/4,
# sinks longer than the window, B larger than W, default B, sinks over several blocks.
SWA_CASES = [
    (37, 5, 0, 8),
    (37, 5, 1, 8),
    (37, 5, 4, 8),
    (64, 16, 0, 16),
    (64, 16, 4, None),
    (50, 1, 0, 7),
    (50, 1, 4, 7),
    (40, 39, 0, 16),  # W = s - 1
    (40, 39, 4, 16),
    (40, 40, 0, None),  # W = s -> full causal
    (33, 100, 4, 8),  # W > s
    (45, 3, 10, 16),  # B > W, sinks > W
    (29, 6, 4, 29),  # one block
    (70, 6, 13, 4),  # sinks older than the window from the third block on
    (9, 8, 2, 16),  # one query after the first W
]


@pytest.mark.parametrize("device,cpu_kernel", [("cpu", k) for k in CPU_KERNELS] + [(d, None) for d in DEVICES[1:]])
@pytest.mark.parametrize("rep", [1, 2])
@pytest.mark.parametrize("s,window,sinks,block", SWA_CASES)
def test_swa_matches_reference_fp64(monkeypatch, s, window, sinks, block, rep, device, cpu_kernel):
    if cpu_kernel:
        _use_cpu_kernel(monkeypatch, cpu_kernel)

    def fn(q, k, v, scale):
        return sliding_window_attention(
            q, k, v, window=window, scale=scale, sink_tokens=sinks, block_size=block
        )

    _check_against_ref(fn, s, window, sinks, rep, torch.float64, device, 1e-10, 1e-10)


@pytest.mark.parametrize("device,cpu_kernel", [("cpu", k) for k in CPU_KERNELS] + [(d, None) for d in DEVICES[1:]])
@pytest.mark.parametrize("rep", [1, 2])
@pytest.mark.parametrize(
    "s,window,sinks,block",
    [(37, 5, 0, 8), (37, 5, 4, 8), (50, 1, 1, 7), (40, 39, 4, 16), (96, 24, 1, None)],
)
def test_swa_matches_reference_fp32(monkeypatch, s, window, sinks, block, rep, device, cpu_kernel):
    if cpu_kernel:
        _use_cpu_kernel(monkeypatch, cpu_kernel)
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False

    def fn(q, k, v, scale):
        return sliding_window_attention(
            q, k, v, window=window, scale=scale, sink_tokens=sinks, block_size=block
        )

    _check_against_ref(fn, s, window, sinks, rep, torch.float32, device, 1e-6, 1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rep", [1, 2])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-6)])
@pytest.mark.parametrize("s", [1, 23, 64])
def test_full_causal_matches_reference(s, dtype, tol, rep, device):
    def fn(q, k, v, scale):
        return full_causal_attention(q, k, v, scale=scale)

    _check_against_ref(fn, s, s, 0, rep, dtype, device, tol, tol)


@pytest.mark.parametrize("threads,hkv,repeated", [(1, 1, False), (2, 1, True), (2, 3, True), (2, 2, False)])
def test_full_causal_repeats_kv_where_kv_heads_split_threads_unevenly(monkeypatch, threads, hkv, repeated):
    """With a backward to follow, the CPU path hands SDPA K/V repeated per query head
    where the (batch, KV head) pairs split the threads less evenly than the query heads
    (torch's native-GQA CPU backward divides its work by KV head), else native GQA;
    values and gradients as the reference either way."""
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        calls.append((k.shape[1], kw.get("enable_gqa", False)))
        return sdpa(q, k, v, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        def fn(q, k, v, scale):
            return full_causal_attention(q, k, v, scale=scale)

        _check_against_ref(fn, 23, 23, 0, 2, torch.float64, "cpu", 1e-10, 1e-10, b=1, hkv=hkv)
        with torch.no_grad():  # no backward: native GQA
            full_causal_attention(*_make_qkv(1, hkv, 2, 23, 16, torch.float64, "cpu"), scale=0.5)
    finally:
        torch.set_num_threads(before)
    assert calls == [(2 * hkv, False) if repeated else (hkv, True), (hkv, True)]


def test_library_mask_and_dense_reference():
    for s, window, sinks in [(1, 1, 0), (17, 1, 0), (17, 4, 3), (17, 17, 2), (17, 30, 0), (20, 5, 25)]:
        assert torch.equal(sliding_window_mask(s, window, sinks), _ref_mask(s, window, sinks))
    q, k, v = _make_qkv(2, 2, 2, 21, 8, torch.float64, "cpu")
    mask = _ref_mask(21, 4, 2)
    torch.testing.assert_close(
        dense_masked_attention(q, k, v, mask=mask, scale=0.3),
        _ref_attention(q, k, v, mask, 0.3), atol=1e-12, rtol=0,
    )


@pytest.mark.parametrize("device,cpu_kernel", [("cpu", k) for k in CPU_KERNELS] + [(d, None) for d in DEVICES[1:]])
@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 3e-2), (torch.float16, 4e-3)])
def test_half_precision_forward(monkeypatch, dtype, tol, device, cpu_kernel):
    if cpu_kernel:
        _use_cpu_kernel(monkeypatch, cpu_kernel)
    s, window, sinks, d = 200, 48, 4, 32
    q, k, v = _make_qkv(2, 2, 2, s, d, torch.float32, device)
    scale = d ** -0.5
    out32 = sliding_window_attention(q, k, v, window=window, scale=scale, sink_tokens=sinks)
    qh, kh, vh = (t.detach().to(dtype).requires_grad_(True) for t in (q, k, v))
    out = sliding_window_attention(qh, kh, vh, window=window, scale=scale, sink_tokens=sinks)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), out32, atol=tol, rtol=0)
    out.float().square().sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (qh, kh, vh))


def _saved_numel(fn, *args):
    """Total numel of the tensors autograd saves for backward while running fn(*args)."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*args)
    out.sum().backward()
    return total


@pytest.mark.parametrize("cpu_kernel", CPU_KERNELS)
def test_swa_saved_memory_is_linear(monkeypatch, cpu_kernel):
    _use_cpu_kernel(monkeypatch, cpu_kernel)
    window, d, h = 64, 16, 2

    def swa_saved(n):
        q, k, v = (torch.randn(1, h, n, d, requires_grad=True) for _ in range(3))
        return _saved_numel(
            lambda: sliding_window_attention(q, k, v, window=window, scale=0.25, sink_tokens=4)
        )

    small, large = swa_saved(2048), swa_saved(4096)
    assert 1.8 <= large / small <= 2.2, (small, large)
    # O(n * (W + B + S)) per head, far from the n^2 of a dense score matrix.
    assert large <= 3 * h * 4096 * (window + 128 + 4 + d), large

    # Sanity of the probe itself: the dense reference is quadratic.
    def dense_saved(n):
        q, k, v = (torch.randn(1, h, n, d, requires_grad=True) for _ in range(3))
        mask = sliding_window_mask(n, window)
        return _saved_numel(lambda: dense_masked_attention(q, k, v, mask=mask, scale=0.25))

    assert dense_saved(512) / dense_saved(256) > 3.5


def test_default_block_size_and_validation():
    assert default_block_size(8, 4096) == 32
    assert default_block_size(256, 4096) == 64
    assert default_block_size(512, 4096) == 128
    assert default_block_size(1024, 4096) == 256
    assert default_block_size(256, 10) == 10
    q = torch.randn(1, 2, 8, 4)
    with pytest.raises(ValueError):
        sliding_window_attention(q, q, q, window=0, scale=0.5)
    with pytest.raises(ValueError):
        sliding_window_attention(q, q, q, window=2, scale=0.5, sink_tokens=-1)
    with pytest.raises(ValueError):
        sliding_window_attention(q, q[:, :, :4], q[:, :, :4], window=2, scale=0.5)
    with pytest.raises(ValueError):
        full_causal_attention(q, q[:, :1].repeat(1, 3, 1, 1), q[:, :1].repeat(1, 3, 1, 1), scale=0.5)


def test_swa_uses_fused_sdpa_kernel_on_cpu(monkeypatch):
    """Regression guard for the flash-op fallback: a 3-D mask makes SDPA fall back to the
    O(B*L)-memory math kernel; the library must pass a 4-D mask so the fused CPU flash
    kernel runs. (The default path, the banded kernel: test_cpu_extension.)"""
    from torch.profiler import profile

    _use_cpu_kernel(monkeypatch, "flash_op")

    q, k, v = _make_qkv(1, 2, 2, 300, 16, torch.float32, "cpu")
    with profile() as prof:
        sliding_window_attention(q, k, v, window=40, scale=0.25, sink_tokens=2).sum().backward()
    names = {e.key for e in prof.key_averages()}
    assert not any("scaled_dot_product_attention_math" in n for n in names), names
    assert any("flash_attention" in n for n in names), names


@pytest.mark.parametrize("rep", [1, 2])
@pytest.mark.parametrize("s,window,sinks,block", [(37, 5, 0, 8), (37, 5, 4, 8), (50, 1, 1, 7), (45, 3, 10, 16)])
def test_public_sdpa_path_matches_reference(monkeypatch, s, window, sinks, block, rep):
    """The path CUDA takes without FlexAttention (public SDPA, autograd's backward), run on the CPU."""
    from megatron_consa.backends import torch_attention

    _use_cpu_kernel(monkeypatch, "flash_op")

    monkeypatch.setattr(torch_attention, "_cpu_flash_ops_available", lambda: False)
    taken = []
    sdpa_blocked = torch_attention._sdpa_blocked_swa
    monkeypatch.setattr(
        torch_attention, "_sdpa_blocked_swa", lambda *a, **kw: taken.append(1) or sdpa_blocked(*a, **kw)
    )

    def fn(q, k, v, scale):
        return sliding_window_attention(q, k, v, window=window, scale=scale, sink_tokens=sinks, block_size=block)

    _check_against_ref(fn, s, window, sinks, rep, torch.float64, "cpu", 1e-10, 1e-10)
    assert taken


@pytest.mark.parametrize("sinks", [0, 3])
def test_cpu_kernel_split_into_several_calls_matches_reference(monkeypatch, sinks):
    """Batch x KV heads split across flash calls (one row each) gives the same values and gradients."""
    from megatron_consa.backends import torch_attention

    _use_cpu_kernel(monkeypatch, "flash_op")

    monkeypatch.setattr(torch_attention, "CPU_CALL_BYTES", 1)

    def fn(q, k, v, scale):
        return sliding_window_attention(q, k, v, window=6, scale=scale, sink_tokens=sinks, block_size=4)

    _check_against_ref(fn, 41, 6, sinks, 2, torch.float32, "cpu", 1e-6, 1e-6)
    _check_against_ref(fn, 41, 6, sinks, 1, torch.float64, "cpu", 1e-10, 1e-10)


def test_cpu_kernel_where_flash_op_lacks_gqa(monkeypatch):
    """Torch versions whose CPU flash op needs as many K/V heads as query heads: the first
    W queries run on repeated K/V, their gradients summed back per KV head."""
    from megatron_consa.backends import torch_attention

    _use_cpu_kernel(monkeypatch, "flash_op")

    monkeypatch.setattr(torch_attention, "_cpu_flash_takes_gqa", lambda: False)

    def fn(q, k, v, scale):
        return sliding_window_attention(q, k, v, window=6, scale=scale, sink_tokens=2, block_size=4)

    _check_against_ref(fn, 41, 6, 2, 3, torch.float64, "cpu", 1e-10, 1e-10)


@pytest.mark.parametrize("cpu_kernel", CPU_KERNELS)
def test_bf16_gradients_follow_fp32(monkeypatch, cpu_kernel):
    _use_cpu_kernel(monkeypatch, cpu_kernel)
    s, window, sinks, d = 300, 64, 2, 32
    q, k, v = _make_qkv(1, 2, 4, s, d, torch.float32, "cpu")
    go = torch.randn(q.shape, generator=torch.Generator().manual_seed(3))
    ref = torch.autograd.grad(sliding_window_attention(q, k, v, window=window, scale=d ** -0.5, sink_tokens=sinks), (q, k, v), go)
    qh, kh, vh = (t.detach().bfloat16().requires_grad_(True) for t in (q, k, v))
    out = sliding_window_attention(qh, kh, vh, window=window, scale=d ** -0.5, sink_tokens=sinks)
    got = torch.autograd.grad(out, (qh, kh, vh), go.bfloat16())
    for name, g, r in zip("qkv", got, ref):
        assert g.dtype == torch.bfloat16
        torch.testing.assert_close(g.float(), r, atol=6e-2 * max(1.0, r.abs().max().item()), rtol=0, msg=name)


def test_large_band_masks_are_not_cached(monkeypatch):
    from megatron_consa.backends import torch_attention

    _use_cpu_kernel(monkeypatch, "flash_op")
    torch_attention._cached_band_bias.cache_clear()
    monkeypatch.setattr(torch_attention, "BAND_BIAS_CACHE_BYTES", 0)
    test_swa_matches_reference_fp64(monkeypatch, 37, 5, 4, 8, 2, "cpu", "flash_op")
    assert torch_attention._cached_band_bias.cache_info().currsize == 0
    monkeypatch.setattr(torch_attention, "BAND_BIAS_CACHE_BYTES", 1 << 30)
    test_swa_matches_reference_fp64(monkeypatch, 37, 5, 4, 8, 2, "cpu", "flash_op")
    assert torch_attention._cached_band_bias.cache_info().currsize == 1
