"""The banded C++ CPU sliding-window kernel (megatron_consa/backends/csrc/swa_cpu.cpp).

Called directly, with tiles small enough that every tiling case occurs at test
sizes: several query tiles, several key tiles per window, key tiles of the sink
range, tiles wholly inside the visible set and tiles that need the mask, the
backward's query segments (their dK/dV rows summed back), GQA rows folded into
one tile, strided inputs. The reference is tests/attention_reference.py (fp64,
the visible set built row by row from the convention).
"""

import math
import os
import sys
from pathlib import Path

import pytest
import torch

from megatron_consa.backends import cpu_extension
from megatron_consa.backends.torch_attention import (
    CPU_KV_TILE,
    CPU_KV_TILE_FP32_BRGEMM_FORWARD,
    cpu_kv_tile,
    cpu_q_tile,
    default_cpu_q_tile,
    sliding_window_attention,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from attention_reference import masked_scores, reference_attention, visible_mask  # noqa: E402


def _reference(q, k, v, window, sinks, scale):
    """fp64 (out, lse) and a function giving (dq, dk, dv) for a grad_out."""
    q64, k64, v64 = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    mask = visible_mask(q.shape[2], window, sinks)
    out = reference_attention(q64, k64, v64, mask, scale)
    lse = torch.logsumexp(masked_scores(q64, k64, mask, scale), -1)

    def grads(grad_out):
        return torch.autograd.grad(out, (q64, k64, v64), grad_out.double(), retain_graph=True)

    return out.detach(), lse.detach(), grads


def _ext():
    ext = cpu_extension.extension()
    assert ext is not None, "the banded CPU kernel must build wherever make test runs"
    return ext


def _qkv(b, hq, hkv, s, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, s, d, generator=g, dtype=torch.float64).to(dtype) for h in (hq, hkv, hkv)]


def test_builds_for_this_cpu():
    """The shipped CPU path: the kernel builds (make test installs ninja; the machine has
    a compiler and torch's MKL), compiled for the capability torch dispatches to."""
    assert cpu_extension.capability() in ("AVX512", "AVX2", "DEFAULT")
    ext = _ext()
    assert ext.__name__ == cpu_extension.module_name() and cpu_extension.capability().lower() in ext.__name__


def test_build_finds_the_ninja_package_off_path(tmp_path, monkeypatch):
    """torch's build runs `ninja` from PATH: a virtualenv's python run without activating it
    (the Makefile's, torchrun's ranks) has the ninja package's binary off PATH. The build puts
    it there for its own time only."""
    import shutil

    ninja = pytest.importorskip("ninja")
    monkeypatch.setenv("PATH", str(tmp_path))  # a PATH without ninja
    assert shutil.which("ninja") is None
    with cpu_extension.ninja_on_path():
        found = shutil.which("ninja")
        assert found is not None and Path(found).parent == Path(ninja.BIN_DIR)
    assert shutil.which("ninja") is None and os.environ["PATH"] == str(tmp_path)


def test_cache_folder_per_torch_installation(monkeypatch, tmp_path):
    """Two environments with the same torch version, or two checkouts, build into folders of their own
    (one folder would have its build files rewritten, and the module rebuilt, at every switch)."""
    here = cpu_extension.module_name()
    assert here.startswith(f"consa_swa_cpu_{cpu_extension.capability().lower()}_torch")
    with monkeypatch.context() as m:
        m.setattr(torch, "__file__", str(tmp_path / "other_venv" / "torch" / "__init__.py"))
        other = cpu_extension.module_name()
    assert other != here and other.rsplit("_", 1)[0] == here.rsplit("_", 1)[0]
    # another checkout of this repository: its own folder too (its source path is in the build files)
    monkeypatch.setattr(cpu_extension, "SOURCE", tmp_path / "other_checkout" / "swa_cpu.cpp")
    checkout = cpu_extension.module_name()
    assert checkout not in (here, other) and checkout.rsplit("_", 1)[0] == here.rsplit("_", 1)[0]


# (b, hq, hkv, s, d, W, S, q_tile, kv_tile)
CASES = [
    (1, 2, 1, 37, 8, 5, 0, 4, 16),     # several key tiles per window at kv_tile 16
    (2, 4, 2, 50, 16, 7, 3, 8, 16),    # sinks, GQA 2, q tile larger than W
    (1, 3, 1, 90, 8, 1, 0, 7, 16),     # W = 1, GQA 3, tiles not dividing s
    (1, 2, 1, 100, 8, 10, 20, 16, 32),  # more sinks than the window, sink range in several tiles
    (1, 2, 2, 64, 8, 64, 2, 16, 16),   # W = s: causal
    (1, 1, 1, 200, 8, 24, 4, 8, 16),   # one KV head: the backward splits it into query segments
    (1, 8, 1, 160, 16, 33, 0, 16, 48),  # GQA 8: 128 rows per tile
]


@pytest.mark.parametrize("b,hq,hkv,s,d,window,sinks,q_tile,kv_tile", CASES)
def test_forward_lse_backward_match_reference_fp64(b, hq, hkv, s, d, window, sinks, q_tile, kv_tile):
    ext = _ext()
    scale = 0.7 / math.sqrt(d)
    q, k, v = _qkv(b, hq, hkv, s, d, torch.float64)
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref_out, ref_lse, ref_grads = _reference(q, k, v, window, sinks, scale)
    out, lse = ext.forward(q, k, v, window, sinks, scale, q_tile, kv_tile)
    torch.testing.assert_close(out, ref_out, atol=1e-12, rtol=0)
    torch.testing.assert_close(lse, ref_lse, atol=1e-12, rtol=0)
    grads = ext.backward(grad_out, q, k, v, out, lse, window, sinks, scale, q_tile, kv_tile)
    for name, g, r in zip("qkv", grads, ref_grads(grad_out)):
        torch.testing.assert_close(g, r, atol=1e-11, rtol=0, msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=["fp64", "fp32", "bf16"])
def test_forward_does_not_depend_on_threads(dtype):
    """The forward's threads take runs of query tiles of about equal work (a lone KV head's
    first tiles read fewer keys): every tile once, whatever the split, more threads than
    tiles included; the results are the same bit for bit."""
    ext = _ext()
    threads = torch.get_num_threads()
    results = []
    try:
        for s in (300, 40):  # 19 and 3 tiles of 16 for one KV head (GQA 4)
            q, k, v = (t.to(dtype) for t in _qkv(1, 4, 1, s, 64, torch.float64))
            runs = []
            for n in (1, 2, 3, 7):
                torch.set_num_threads(n)
                runs.append(ext.forward(q, k, v, 50, 2, 0.125, 16, 64))
            results.append(runs)
    finally:
        torch.set_num_threads(threads)
    for runs in results:
        for out, lse in runs[1:]:
            assert torch.equal(out, runs[0][0]) and torch.equal(lse, runs[0][1])
    ref_out, ref_lse, _ = _reference(q, k, v, 50, 2, 0.125)  # the last (s = 40) against fp64
    tol = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 3e-2}[dtype]
    torch.testing.assert_close(results[-1][0][0].double(), ref_out, atol=tol, rtol=0)


def test_backward_segments_do_not_depend_on_threads():
    """dK/dV summed from query segments: the segment count follows the thread count,
    the gradients must not (up to fp64 rounding)."""
    ext = _ext()
    q, k, v = _qkv(1, 2, 1, 300, 8, torch.float64)
    go = torch.randn(q.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 3):
            torch.set_num_threads(n)
            out, lse = ext.forward(q, k, v, 20, 3, 0.3, 16, 32)
            results.append(ext.backward(go, q, k, v, out, lse, 20, 3, 0.3, 16, 32))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


def test_strided_inputs_megatron_layout():
    """megatron-core hands attention [s, b, h, d] tensors; permuted views work as they are."""
    ext = _ext()
    s, d, W, S = 70, 16, 9, 2
    g = torch.Generator().manual_seed(0)
    q = torch.randn(s, 2, 4, d, generator=g, dtype=torch.float64).permute(1, 2, 0, 3)
    k, v = (torch.randn(s, 2, 2, d, generator=g, dtype=torch.float64).permute(1, 2, 0, 3) for _ in range(2))
    ref_out, _, _ = _reference(q, k, v, W, S, 0.25)
    out, _ = ext.forward(q, k, v, W, S, 0.25, 16, 32)
    assert out.is_contiguous()
    torch.testing.assert_close(out, ref_out, atol=1e-12, rtol=0)


NO_PACKED_BF16 = "no bf16 dot products on this CPU (AMX or AVX512-BF16) in this build: no packed path"
NO_BF16_AS_FP32 = "bf16 runs on the fp32 brgemm kernel only in an AVX-512 build, where it has no bf16 products"


def _skip_unless_brgemm_fp32(ext, brgemm):
    if brgemm and not ext.brgemm_fp32():
        pytest.skip("the fp32 brgemm path is compiled for AVX-512 only: this CPU runs MKL's")


@pytest.mark.parametrize("brgemm", [True, False], ids=["brgemm", "mkl"])
@pytest.mark.parametrize("b,hq,hkv,s,d,window,sinks,q_tile,kv_tile",
                         CASES + [(1, 4, 2, 300, 32, 64, 4, 32, CPU_KV_TILE), (1, 8, 2, 700, 64, 300, 5, 16, 512),
                                  # the fp32 brgemm forward's key tile: a window over two of them
                                  (1, 2, 1, 1400, 64, 1100, 3, 32, CPU_KV_TILE_FP32_BRGEMM_FORWARD),
                                  # K^T, Q^T, dO^T, dQ^T in whole 16 x 16 blocks and both remainders
                                  # (d = 24, 3 x 12 = 36 rows per tile)
                                  (1, 3, 1, 130, 24, 40, 2, 12, 32)])
def test_fp32_within_rounding(brgemm, b, hq, hkv, s, d, window, sinks, q_tile, kv_tile):
    """fp32 on both of its paths (oneDNN brgemm on a transposed K / V where the kernel is
    built for AVX-512, MKL's sgemm otherwise): every tiling case, against the fp64 reference."""
    ext = _ext()
    _skip_unless_brgemm_fp32(ext, brgemm)
    scale = 0.7 / math.sqrt(d)
    q, k, v = (t.float() for t in _qkv(b, hq, hkv, s, d, torch.float64))
    go = torch.randn(q.shape, generator=torch.Generator().manual_seed(1))
    ref_out, ref_lse, ref_grads = _reference(q, k, v, window, sinks, scale)
    out, lse = ext.forward(q, k, v, window, sinks, scale, q_tile, kv_tile, allow_pack=brgemm)
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref_out, atol=2e-6, rtol=0)
    torch.testing.assert_close(lse.double(), ref_lse, atol=2e-6, rtol=0)
    grads = ext.backward(go, q, k, v, out, lse, window, sinks, scale, q_tile, kv_tile, allow_brgemm=brgemm)
    for name, g, r in zip("qkv", grads, ref_grads(go)):
        torch.testing.assert_close(g.double(), r, atol=2e-6 * max(1.0, r.abs().max().item()), rtol=0,
                                   msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize("brgemm", [True, False], ids=["brgemm", "mkl"])
def test_fp32_megatron_layout_equals_contiguous(brgemm):
    """Both fp32 paths read [s, b, h, d] views (strided rows of Q, K, V, whose K^T / V^T
    the brgemm path builds from them) exactly as they read contiguous copies."""
    ext = _ext()
    _skip_unless_brgemm_fp32(ext, brgemm)
    s, d, W, S = 300, 64, 50, 3
    g = torch.Generator().manual_seed(0)
    q, go = (torch.randn(s, 2, 4, d, generator=g).permute(1, 2, 0, 3) for _ in range(2))
    k, v = (torch.randn(s, 2, 2, d, generator=g).permute(1, 2, 0, 3) for _ in range(2))
    args = (W, S, 0.125, 32, CPU_KV_TILE)
    out, lse = ext.forward(q, k, v, *args, allow_pack=brgemm)
    ref_out, ref_lse = ext.forward(q.contiguous(), k.contiguous(), v.contiguous(), *args, allow_pack=brgemm)
    assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)
    grads = ext.backward(go, q, k, v, out, lse, *args, allow_brgemm=brgemm)
    ref_grads = ext.backward(go.contiguous(), q.contiguous(), k.contiguous(), v.contiguous(), out, lse, *args,
                             allow_brgemm=brgemm)
    for g_, r in zip(grads, ref_grads):
        assert torch.equal(g_, r)


@pytest.mark.parametrize("dtype,fast", [(torch.float32, True), (torch.float32, False), (torch.bfloat16, True)],
                         ids=["fp32-brgemm", "fp32-mkl", "bf16"])
def test_nan_reaches_exactly_the_rows_that_see_it(dtype, fast):
    """A NaN in a query row makes that row's output and lse NaN; a NaN in key j those of the
    rows that see key j (positions j .. j + W - 1, every GQA head), and no others: the
    softmax's exp keeps a NaN (ATen's exp_u20 would turn it into a large finite number) and
    the window's masking drops the hidden ones. Several query and key tiles (16 and 32)."""
    ext = _ext()
    if dtype == torch.float32:
        _skip_unless_brgemm_fp32(ext, fast)
    s, d, W = 200, 64, 24
    q, k, v = _qkv(1, 2, 1, s, d, dtype)
    q[0, 1, 50] = float("nan")
    k[0, 0, 120] = float("nan")
    out, lse = ext.forward(q, k, v, W, 0, 0.125, 16, 32, allow_pack=fast)
    want = torch.zeros(2, s, dtype=torch.bool)
    want[1, 50] = True
    want[:, 120:120 + W] = True
    assert torch.equal(out[0].isnan().any(-1), want)
    assert torch.equal(out[0].isnan().all(-1), want)
    assert torch.equal(lse[0].isnan(), want)


@pytest.mark.parametrize("path", ["packed-brgemm", "fp32-brgemm", "mkl"])
@pytest.mark.parametrize("s,window,sinks,q_tile", [(300, 64, 0, 64), (517, 33, 70, 32), (1000, 128, 3, 128)])
def test_bf16_within_bf16_rounding(path, s, window, sinks, q_tile):
    """bf16 on each of its paths (the forward on oneDNN brgemm on packed K/V where the
    machine has bf16 dot products, its backward on MKL's bf16 GEMM with AMX and on packed
    blocks too with AVX512-BF16; forward and backward on the fp32 brgemm kernel where it is built
    for AVX-512 and has no bf16 products, or the head dim is not a multiple of 64, as here;
    MKL's bf16 GEMM otherwise): against the fp64 reference, within the error PyTorch's own
    bf16 CPU flash attention makes on the same inputs (causal case)."""
    ext = _ext()
    d = 48 if path == "fp32-brgemm" else 64
    if path == "packed-brgemm" and not ext.packs_bf16(d):
        pytest.skip(NO_PACKED_BF16)
    if path == "fp32-brgemm" and not ext.bf16_as_fp32(d, backward=False):
        pytest.skip(NO_BF16_AS_FP32)
    fast = path != "mkl"
    q, k, v = (t.bfloat16() for t in _qkv(1, 4, 2, s, d, torch.float64))
    ref_out, ref_lse, ref_grads = _reference(q, k, v, window, sinks, 0.125)
    out, lse = ext.forward(q, k, v, window, sinks, 0.125, q_tile, CPU_KV_TILE, allow_pack=fast)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    # torch's own bf16 kernel on these inputs, causal (its only band): its error sets the bar
    torch_out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.125, enable_gqa=True)
    causal_ref, _, _ = _reference(q, k, v, s, 0, 0.125)
    bar = 1.5 * (torch_out.double() - causal_ref).abs().max().item()
    assert (out.double() - ref_out).abs().max().item() <= bar
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-5, rtol=0)  # fp32 scores of bf16 inputs
    go = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).bfloat16()
    grads = ext.backward(go, q, k, v, out, lse, window, sinks, 0.125, q_tile, CPU_KV_TILE, allow_brgemm=fast)
    for name, g, r in zip("qkv", grads, ref_grads(go)):
        assert g.dtype == torch.bfloat16
        torch.testing.assert_close(g.double(), r, atol=3e-2 * max(1.0, r.abs().max().item()), rtol=0,
                                   msg=lambda m: f"d{name}: {m}")



def test_bf16_packed_key_tiles_at_every_alignment():
    """The packed bf16 forward (and, where it packs, the backward) starts key tiles at
    multiples of 32 keys, inside its packed blocks of 64 (a tile may start in a block's second
    half): windows, sinks and lengths around those boundaries, tile heights (odd rows in the
    last tile: the backward's row pairs), GQA, one KV head (the backward's query segments,
    whose dK/dV rows start at the aligned keys), against the fp64 reference."""
    ext = _ext()
    d = 64
    if not ext.packs_bf16(d):
        pytest.skip(NO_PACKED_BF16)
    backward = ext.packs_bf16_backward(d)
    for s, window, sinks, q_tile, hkv in [
        (301, 32, 0, 64, 4), (301, 33, 40, 64, 1), (301, 96, 64, 32, 4), (301, 1, 70, 32, 1),
        (130, 64, 1, 32, 1), (130, 200, 0, 64, 4), (517, 96, 5, 128, 1), (517, 32, 33, 32, 4),
        (517, 40, 0, 16, 1), (99, 17, 3, 7, 2),
    ]:
        q, k, v = (t.bfloat16() for t in _qkv(1, 4, hkv, s, d, torch.float64))
        ref_out, ref_lse, ref_grads = _reference(q, k, v, window, sinks, 0.125)
        out, lse = ext.forward(q, k, v, window, sinks, 0.125, q_tile, CPU_KV_TILE, allow_pack=True)
        case = f"s={s} W={window} S={sinks} T={q_tile} hkv={hkv}"
        assert (out.double() - ref_out).abs().max().item() <= 0.04, case
        torch.testing.assert_close(lse.double(), ref_lse, atol=1e-4, rtol=0, msg=lambda m: f"{case}: {m}")
        if backward:
            go = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).bfloat16()
            grads = ext.backward(go, q, k, v, out, lse, window, sinks, 0.125, q_tile, CPU_KV_TILE)
            for name, g, r in zip("qkv", grads, ref_grads(go)):
                torch.testing.assert_close(g.double(), r, atol=3e-2 * max(1.0, r.abs().max().item()), rtol=0,
                                           msg=lambda m: f"{case} d{name}: {m}")


def test_bf16_packed_head_dim_128():
    """The packed paths at d = 128 (two 64-column blocks of K/V rows for P V and dQ; dK and dV
    in one product over the whole head dim), forward and backward, against the fp64 reference."""
    ext = _ext()
    d = 128
    if not ext.packs_bf16(d):
        pytest.skip(NO_PACKED_BF16)
    q, k, v = (t.bfloat16() for t in _qkv(1, 4, 2, 300, d, torch.float64))
    ref_out, ref_lse, ref_grads = _reference(q, k, v, 70, 2, 0.09)
    out, lse = ext.forward(q, k, v, 70, 2, 0.09, 32, CPU_KV_TILE)
    assert (out.double() - ref_out).abs().max().item() <= 0.04
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-4, rtol=0)
    go = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).bfloat16()
    grads = ext.backward(go, q, k, v, out, lse, 70, 2, 0.09, 32, CPU_KV_TILE)
    for name, g, r in zip("qkv", grads, ref_grads(go)):
        torch.testing.assert_close(g.double(), r, atol=3e-2 * max(1.0, r.abs().max().item()), rtol=0,
                                   msg=lambda m: f"d{name}: {m}")


def test_bf16_megatron_layout_equals_contiguous():
    """The bf16 paths read [s, b, h, d] views (strided K/V rows: the packed path
    transposes them as 32-bit words, the fp32 one converts them) exactly as they read
    contiguous copies, forward and backward."""
    ext = _ext()
    s, d, W = 200, 64, 50
    g = torch.Generator().manual_seed(0)
    q = torch.randn(s, 2, 4, d, generator=g).bfloat16().permute(1, 2, 0, 3)
    k, v = (torch.randn(s, 2, 2, d, generator=g).bfloat16().permute(1, 2, 0, 3) for _ in range(2))
    go = torch.randn(s, 2, 4, d, generator=g).bfloat16().permute(1, 2, 0, 3)
    for packed in (True, False):
        out, lse = ext.forward(q, k, v, W, 1, 0.125, 64, CPU_KV_TILE, allow_pack=packed)
        ref_out, ref_lse = ext.forward(q.contiguous(), k.contiguous(), v.contiguous(), W, 1, 0.125, 64, CPU_KV_TILE,
                                       allow_pack=packed)
        assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)
        grads = ext.backward(go, q, k, v, out, lse, W, 1, 0.125, 64, CPU_KV_TILE, allow_brgemm=packed)
        ref_grads = ext.backward(go.contiguous(), q.contiguous(), k.contiguous(), v.contiguous(), out, lse, W, 1,
                                 0.125, 64, CPU_KV_TILE, allow_brgemm=packed)
        assert all(torch.equal(a, b) for a, b in zip(grads, ref_grads))


@pytest.mark.parametrize("b,hq,hkv,s,d,window,sinks,q_tile,kv_tile",
                         CASES + [(1, 4, 2, 300, 64, 50, 2, 32, CPU_KV_TILE), (1, 8, 2, 700, 64, 300, 5, 16, 512)])
def test_bf16_as_fp32_equals_the_fp32_kernel(b, hq, hkv, s, d, window, sinks, q_tile, kv_tile):
    """Where bf16 runs on the fp32 brgemm products (converting its tiles' rows and K/V as it
    reaches them), its results are the fp32 kernel's on the converted inputs, rounded to bf16
    (the log-sum-exp stays fp32), forward and backward (each where it takes that route: at
    d = 64 a machine with bf16 dot products packs the forward), at every tiling case (the
    backward's query segments among them) and on megatron's [s, b, h, d] views."""
    ext = _ext()
    fwd32, bwd32 = ext.bf16_as_fp32(d, backward=False), ext.bf16_as_fp32(d, backward=True)
    if not (fwd32 or bwd32):
        pytest.skip(NO_BF16_AS_FP32)
    scale = 0.7 / math.sqrt(d)
    args = (window, sinks, scale, q_tile, kv_tile)
    q, k, v = (t.bfloat16() for t in _qkv(b, hq, hkv, s, d, torch.float64))
    go = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).bfloat16()
    out32, lse32 = ext.forward(q.float(), k.float(), v.float(), *args)
    # megatron's layout: [s, b, h, d] tensors permuted to [b, h, s, d] views
    views = [t.permute(2, 0, 1, 3).contiguous().permute(1, 2, 0, 3) for t in (q, k, v, go)]
    for q_, k_, v_, go_ in ((q, k, v, go), views):
        out, lse = ext.forward(q_, k_, v_, *args)
        assert out.dtype == torch.bfloat16
        if fwd32:
            assert torch.equal(out, out32.bfloat16()) and torch.equal(lse, lse32)
        if bwd32:  # on this forward's out and lse, whichever route gave them
            grads = ext.backward(go_, q_, k_, v_, out, lse, *args)
            grads32 = ext.backward(go.float(), q.float(), k.float(), v.float(), out.float(), lse, *args)
            for name, g, r in zip("qkv", grads, grads32):
                assert g.dtype == torch.bfloat16 and torch.equal(g, r.bfloat16()), f"d{name}"


def test_bf16_as_fp32_results_are_the_callers():
    """The bf16-on-fp32 route computes in per-thread scratch; what it returns is its own: a
    second call (other inputs, same shapes) leaves the first call's results as they were."""
    ext = _ext()
    d = 48  # not a multiple of 64: forward and backward on the fp32 products wherever they run
    if not ext.bf16_as_fp32(d, backward=False):
        pytest.skip(NO_BF16_AS_FP32)
    q, k, v, go = (t.bfloat16() for t in _qkv(1, 4, 2, 300, d, torch.float64) + [torch.randn(1, 4, 300, d)])
    out, lse = ext.forward(q, k, v, 50, 2, 0.125, 32, CPU_KV_TILE)
    grads = ext.backward(go, q, k, v, out, lse, 50, 2, 0.125, 32, CPU_KV_TILE)
    kept = [t.clone() for t in (out, lse, *grads)]
    out2, _ = ext.forward(q * 2, k, v, 50, 2, 0.125, 32, CPU_KV_TILE)
    grads2 = ext.backward(go * 2, q, k, v, out2, lse, 50, 2, 0.125, 32, CPU_KV_TILE)
    assert not torch.equal(out2, out) and not torch.equal(grads2[0], grads[0])
    assert all(torch.equal(t, c) for t, c in zip((out, lse, *grads), kept))


def test_bf16_odd_key_row_stride_takes_the_mkl_path():
    """The packed path reads key rows as 32-bit words; keys with an odd row stride (a
    slice of a wider tensor) run the MKL path instead, with its exact result."""
    ext = _ext()
    if not ext.packs_bf16(64):
        pytest.skip(NO_PACKED_BF16)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 150, 64, generator=g).bfloat16()
    k, v = (torch.randn(1, 1, 150, 65, generator=g).bfloat16()[..., :64] for _ in range(2))
    assert k.stride(2) % 2 == 1
    out, lse = ext.forward(q, k, v, 40, 0, 0.125, 64, CPU_KV_TILE, allow_pack=True)
    ref_out, ref_lse = ext.forward(q, k, v, 40, 0, 0.125, 64, CPU_KV_TILE, allow_pack=False)
    assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)
    # the backward too
    go = torch.randn(q.shape, generator=g).bfloat16()
    grads = ext.backward(go, q, k, v, out, lse, 40, 0, 0.125, 64, CPU_KV_TILE)
    want = ext.backward(go, q, k, v, out, lse, 40, 0, 0.125, 64, CPU_KV_TILE, allow_brgemm=False)
    assert all(torch.equal(a, b) for a, b in zip(grads, want))


def test_bad_input_is_refused():
    ext = _ext()
    q = torch.randn(1, 3, 8, 4)
    kv = torch.randn(1, 2, 8, 4)
    with pytest.raises(RuntimeError, match="multiple of KV heads"):
        ext.forward(q, kv, kv, 2, 0, 0.5, 4, 16)
    with pytest.raises(RuntimeError, match="window, tiles >= 1"):
        ext.forward(q, q, q, 0, 0, 0.5, 4, 16)
    with pytest.raises(RuntimeError, match="last dim must be contiguous"):
        ext.forward(q.transpose(-1, -2), q.transpose(-1, -2), q.transpose(-1, -2), 2, 0, 0.5, 4, 16)
    for scale in (0.0, -0.5, float("inf"), float("nan")):  # its products take the row max before scaling
        with pytest.raises(RuntimeError, match="scale must be a positive finite number"):
            ext.forward(q, q, q, 2, 0, scale, 4, 16)
    with pytest.raises(RuntimeError, match="dtypes differ: Float, BFloat16, BFloat16"):
        ext.forward(q, q.bfloat16(), q.bfloat16(), 2, 0, 0.5, 4, 16)
    with pytest.raises(RuntimeError, match="positive multiple of KV heads"):
        ext.forward(q[:, :0], kv, kv, 2, 0, 0.5, 4, 16)
    with pytest.raises(RuntimeError, match="head_dim must be >= 1"):
        ext.forward(q[..., :0], q[..., :0], q[..., :0], 2, 0, 0.5, 4, 16)


@pytest.mark.parametrize("kwargs,message", [
    ({"scale": 0.0}, "scale must be a positive finite number"),
    ({"scale": -0.125}, "scale must be a positive finite number"),
    ({"window": 3.7}, "must be whole numbers"),
    ({"sink_tokens": 1.5}, "must be whole numbers"),
    ({"k_dtype": torch.bfloat16}, "must share a dtype"),
    ({"heads": 0}, "positive multiple of KV heads"),
])
def test_the_library_refuses_what_the_kernels_cannot_run(kwargs, message):
    """At the library's boundary, whatever path the CPU would take (a zero scale gave NaN on the
    fast paths and the right answer on MKL's; a window of 3.7 ran as 3)."""
    heads, k_dtype = kwargs.pop("heads", 4), kwargs.pop("k_dtype", torch.float32)
    q = torch.randn(1, heads, 64, 16)
    k, v = torch.randn(1, 2, 64, 16, dtype=k_dtype), torch.randn(1, 2, 64, 16, dtype=k_dtype)
    args = {"window": 8, "scale": 0.25, "sink_tokens": 0, **kwargs}
    with pytest.raises(ValueError, match=message):
        sliding_window_attention(q, k, v, **args)


def test_library_runs_the_banded_kernel_by_default():
    """sliding_window_attention on the CPU goes through the kernel, forward and backward,
    and never through SDPA's math fallback or the flash-op chunks."""
    from torch.profiler import profile

    q, k, v = (torch.randn(1, h, 300, 16, requires_grad=True) for h in (4, 2, 2))
    with profile() as prof:
        sliding_window_attention(q, k, v, window=40, scale=0.25, sink_tokens=2).sum().backward()
    names = {e.key for e in prof.key_averages()}
    assert {"_CpuBandedSWA", "_CpuBandedSWABackward"} <= names, names
    assert not any("scaled_dot_product" in n for n in names), names


def test_default_q_tile():
    assert [default_cpu_q_tile(w) for w in (32, 256, 512, 1024, 2048)] == [32, 32, 64, 128, 128]
    assert default_cpu_q_tile(1024, rep=4) == 32  # at most 128 rows
    assert default_cpu_q_tile(512, rep=8) == 16
    assert default_cpu_q_tile(256, dtype=torch.bfloat16) == 64
    assert default_cpu_q_tile(512, rep=4, dtype=torch.bfloat16) == 64  # at most 256 rows
    # fp32 on brgemm: 16 up to W = 256, then 32, at most 128 rows
    assert [default_cpu_q_tile(w, brgemm=True) for w in (32, 256, 512, 2048)] == [16, 16, 32, 32]
    assert default_cpu_q_tile(1024, rep=8, brgemm=True) == 16
    assert default_cpu_q_tile(256, dtype=torch.bfloat16, brgemm=True) == 64  # bf16 on its own products
    # bf16 on AVX512-BF16 dot products: 32, at most 256 rows
    assert [default_cpu_q_tile(w, dtype=torch.bfloat16, bf16_dot=True) for w in (32, 256, 2048)] == [32, 32, 32]
    assert default_cpu_q_tile(1024, rep=16, dtype=torch.bfloat16, bf16_dot=True) == 16
    assert default_cpu_q_tile(256, bf16_dot=True) == 32  # fp32 is not bf16's products


def test_q_tile_follows_the_build():
    """The tile a call gets is the heuristic's for the dtype and products this build runs."""
    ext = _ext()
    brgemm = ext.brgemm_fp32()
    assert cpu_q_tile(128, 1, torch.float32, 64) == default_cpu_q_tile(128, brgemm=brgemm)
    for backward in (False, True):  # bf16's forward and backward may compute in different dtypes
        as_fp32 = ext.bf16_as_fp32(64, backward=backward)
        dot = ext.packs_bf16_backward(64) if backward else ext.packs_bf16(64) and not ext.amx_bf16()
        want = default_cpu_q_tile(128, 1, torch.float32 if as_fp32 else torch.bfloat16, brgemm=brgemm and as_fp32,
                                  bf16_dot=dot)
        assert cpu_q_tile(128, 1, torch.bfloat16, 64, backward=backward) == want


def test_kv_tile_follows_the_build():
    """1024 keys per tile for the fp32 forward on brgemm (bf16 too where it computes in fp32),
    512 for everything else."""
    ext = _ext()
    wide = CPU_KV_TILE_FP32_BRGEMM_FORWARD
    assert cpu_kv_tile(torch.float32, 64) == (wide if ext.brgemm_fp32() else CPU_KV_TILE)
    assert cpu_kv_tile(torch.float32, 64, backward=True) == CPU_KV_TILE
    assert cpu_kv_tile(torch.float64, 64) == CPU_KV_TILE
    assert cpu_kv_tile(torch.bfloat16, 64) == (wide if ext.bf16_as_fp32(64, backward=False) else CPU_KV_TILE)
    assert cpu_kv_tile(torch.bfloat16, 64, backward=True) == CPU_KV_TILE


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_forward_and_backward_take_their_own_tiles(monkeypatch, dtype):
    """sliding_window_attention hands the kernel cpu_q_tile's and cpu_kv_tile's forward tiles for
    the forward and their backward tiles for the backward (bf16 may compute the two in different
    dtypes: on Zen 4 the forward on bf16 dot products, the backward in fp32), or block_size as
    the query tile of both."""
    ext = _ext()
    tiles = []

    class Recording:
        def __getattr__(self, name):
            return getattr(ext, name)

        def forward(self, *args, **kwargs):
            tiles.append(("fwd", args[6], args[7]))
            return ext.forward(*args, **kwargs)

        def backward(self, *args, **kwargs):
            tiles.append(("bwd", args[9], args[10]))
            return ext.backward(*args, **kwargs)

    monkeypatch.setattr(cpu_extension, "extension", lambda: Recording())
    q, k, v = (torch.randn(1, h, 400, 64, dtype=dtype, requires_grad=True) for h in (4, 2, 2))
    kv_tiles = cpu_kv_tile(dtype, 64), cpu_kv_tile(dtype, 64, backward=True)
    want = [("fwd", cpu_q_tile(100, 2, dtype, 64), kv_tiles[0]),
            ("bwd", cpu_q_tile(100, 2, dtype, 64, backward=True), kv_tiles[1])]
    sliding_window_attention(q, k, v, window=100, scale=0.125).sum().backward()
    assert tiles == want
    tiles.clear()
    sliding_window_attention(q, k, v, window=100, scale=0.125, block_size=24).sum().backward()
    assert tiles == [("fwd", 24, kv_tiles[0]), ("bwd", 24, kv_tiles[1])]


def test_mode_variable(monkeypatch):
    monkeypatch.setenv(cpu_extension.ENV_VAR, "0")
    assert cpu_extension.extension() is None
    monkeypatch.setenv(cpu_extension.ENV_VAR, "sometimes")
    with pytest.raises(ValueError, match=cpu_extension.ENV_VAR):
        cpu_extension.extension()


def test_failed_build_falls_back_with_a_warning(monkeypatch, caplog):
    """No compiler (or a torch without MKL): a warning naming the variable, then the
    flash-op path; with the variable at 1 the failure is an error."""
    def broken():
        raise OSError("no c++ compiler")

    monkeypatch.setattr(cpu_extension, "_build", broken)
    cpu_extension._load_or_none.cache_clear()
    try:
        monkeypatch.setenv(cpu_extension.ENV_VAR, "auto")
        import warnings

        with caplog.at_level("WARNING", logger=cpu_extension.__name__), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # what the entry points do: the message must still reach the log
            assert cpu_extension.extension() is None
        assert cpu_extension.ENV_VAR in caplog.text and "did not build" in caplog.text
        q, k, v = (torch.randn(1, 2, 50, 8, dtype=torch.float64) for _ in range(3))
        out = sliding_window_attention(q, k, v, window=6, scale=0.3)  # the flash-op path
        torch.testing.assert_close(out, _reference(q, k, v, 6, 0, 0.3)[0], atol=1e-12, rtol=0)
        cpu_extension._load_or_none.cache_clear()
        monkeypatch.setenv(cpu_extension.ENV_VAR, "1")
        with pytest.raises(cpu_extension.ExtensionUnavailable, match="no c\\+\\+ compiler"):
            cpu_extension.extension()
    finally:
        cpu_extension._load_or_none.cache_clear()


def test_build_tool(monkeypatch, capsys):
    """tools/build_cpu_kernel.py (what make install runs): prints the module; where the kernel
    is off or did not build it says so, and fails only with --require."""
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "tools" / "build_cpu_kernel.py"
    spec = importlib.util.spec_from_file_location("build_cpu_kernel", path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    assert tool.main([]) == 0
    assert capsys.readouterr().out.strip() == f"CPU SWA kernel: {_ext().__file__}"
    monkeypatch.setenv(cpu_extension.ENV_VAR, "0")
    assert tool.main([]) == 0
    assert "not built" in capsys.readouterr().out
    assert tool.main(["--require"]) == 1
