"""Tests of megatron_consa.compat: each CPU shim is needed (unshimmed fails) and works.

The "unshimmed fails" halves run in ONE subprocess (shims are process-wide), which runs
every snippet of ``CHECKS`` against stock megatron-core and prints a JSON dict; it starts
at the beginning of this module and runs alongside the in-process tests. The "shimmed
works" halves run the same snippets in this process after ``apply_cpu_shims()``, then
check semantics. If megatron-core changes so that a stock call stops failing (or a shim
stops working), these tests say which one.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from megatron_consa import compat

REPO_ROOT = Path(__file__).resolve().parents[2]

CUDA = torch.cuda.is_available()
cpu_only = pytest.mark.skipif(CUDA, reason="CPU shims apply only where CUDA is absent")

# Each snippet is one megatron-core call site that fails on a CPU-only machine without
# the shims. It may read ``GROUP`` (a process group or None) and must leave its outcome
# in ``result``.
CHECKS = {
    # Shim 1: tensor_parallel/random.py:303 (torch.cuda.get_rng_state in tracker.add).
    "rng_tracker_add": (
        "from megatron.core.tensor_parallel.random import CudaRNGStatesTracker\n"
        "tracker = CudaRNGStatesTracker()\n"
        "tracker.add('probe-rng', 4242)\n"
        "result = tracker"
    ),
    # Shim 2: models/common/embeddings/rotary_pos_embedding.py:162 (current_device()).
    "current_device_rotary": (
        "from megatron.core.models.common.embeddings.rotary_pos_embedding import "
        "RotaryEmbedding\n"
        "rope = RotaryEmbedding(kv_channels=16, rotary_percent=1.0, "
        "use_cpu_initialization=True)\n"
        "result = rope(8)"
    ),
    # Shim 3: transformer/utils.py:39 and :44 (device="cuda").
    "causal_mask": (
        "from megatron.core.transformer.utils import get_default_causal_mask\n"
        "result = get_default_causal_mask(5)"
    ),
    "sliding_window_mask": (
        "from megatron.core.transformer.utils import get_sliding_window_causal_mask\n"
        "result = get_sliding_window_causal_mask(5, 5, (2, 0))"
    ),
    # Shim 3: the same builders bound by name in fusions/fused_softmax.py:8, used at :327.
    "fused_softmax_causal": (
        "from megatron.core.fusions.fused_softmax import FusedScaleMaskSoftmax\n"
        "from megatron.core.transformer.enums import AttnMaskType\n"
        "from megatron.core.transformer.utils import attention_mask_func\n"
        "sm = FusedScaleMaskSoftmax(False, False, AttnMaskType.causal, False, "
        "attention_mask_func, True, None)\n"
        "result = sm(torch.zeros(1, 2, 4, 4), None)"
    ),
    # Shim 4: transformer/torch_norm.py:50 (assert not config.sequence_parallel).
    "torch_norm_sequence_parallel": (
        "from megatron.core.transformer import TransformerConfig\n"
        "from megatron.core.transformer.torch_norm import WrappedTorchNorm\n"
        "cfg = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=2, "
        "normalization='RMSNorm')\n"
        "cfg.sequence_parallel = True  # TP=1 refuses SP in __post_init__\n"
        "result = (cfg, WrappedTorchNorm(config=cfg, hidden_size=8, eps=1e-5))"
    ),
    # Shim 5: hard-coded device="cuda" (schedules.py:749 style) and .cuda()
    # (language_module.py:307 style).
    "device_cuda_factory": "result = torch.zeros([], dtype=torch.int, device='cuda')",
    "tensor_dot_cuda": "result = torch.ones(3).cuda()",
    "tensor_to_cuda": "result = torch.ones(3).to('cuda', non_blocking=True)",
    # Shim 5: optimizer/clip_grads.py:108 (device='cuda') in get_grad_norm_fp32.
    "grad_norm_fp32": (
        "from megatron.core.optimizer.clip_grads import get_grad_norm_fp32\n"
        "result = get_grad_norm_fp32([torch.full((4,), 2.0)], "
        "grad_stats_parallel_group=GROUP)"
    ),
    # Shim 5: optimizer/clip_grads.py:174 (assert grad.type() == 'torch.cuda.FloatTensor').
    "clip_grads_type_string": (
        "from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32\n"
        "p = torch.nn.Parameter(torch.ones(4))\n"
        "p.grad = torch.full((4,), 2.0)\n"
        "clip_grad_by_total_norm_fp32([p], max_norm=1.0, total_norm=4.0)\n"
        "result = p.grad"
    ),
    # Shim 6: p2p_communication.py:419, param_and_grad_buffer.py:632/686/691,
    # distributed_data_parallel.py:297.
    "cuda_synchronize": "result = torch.cuda.synchronize()",
    "cuda_streams": (
        "s = torch.cuda.current_stream()\n"
        "comm = torch.cuda.Stream(device=torch.cuda.current_device())\n"
        "comm.wait_stream(torch.cuda.current_stream())\n"
        "with torch.cuda.stream(comm):\n"
        "    pass\n"
        "result = (s, comm)"
    ),
    "cuda_event": (
        "e0 = torch.cuda.Event(enable_timing=True); e0.record()\n"
        "e1 = torch.cuda.Event(enable_timing=True); e1.record()\n"
        "result = e0.elapsed_time(e1)"
    ),
}

_PROBE_SCRIPT = r"""
import json, sys, warnings
warnings.filterwarnings("ignore")
out = {}
try:
    import megatron.core  # stock import, before anything of megatron_consa
    out["import_megatron_core"] = {"ok": True}
except BaseException as e:
    out["import_megatron_core"] = {"ok": False, "error": f"{type(e).__name__}: {e}"}
from megatron_consa.compat.importable import ensure_importable, triton_available
out["_triton_available"] = triton_available()
had_mcore = "megatron.core" in sys.modules
ensure_importable()
out["_ensure_importable_imported_mcore"] = (not had_mcore) and "megatron.core" in sys.modules
import torch
import megatron.core
for name, code in json.loads(sys.argv[1]).items():
    ns = {"torch": torch, "GROUP": None}
    try:
        exec(code, ns)
        out[name] = {"ok": True}
    except BaseException as e:
        out[name] = {"ok": False, "error": f"{type(e).__name__}: {e}"}
print("RESULT:" + json.dumps(out))
"""

_probe: dict = {}


@pytest.fixture(scope="module", autouse=True)
def _unshimmed_probe():
    """Start the stock-megatron subprocess first so it overlaps the in-process tests."""
    proc = None
    if not CUDA:
        env = dict(os.environ, PYTHONWARNINGS="ignore")
        proc = subprocess.Popen(
            [sys.executable, "-c", _PROBE_SCRIPT, json.dumps(CHECKS)],
            cwd=REPO_ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    _probe["proc"] = proc
    yield
    if proc is not None and proc.poll() is None:
        proc.kill()
        proc.communicate()


@pytest.fixture
def unshimmed():
    """Outcome of every CHECKS snippet (and the stock import) without the shims."""
    if "result" not in _probe:
        proc = _probe.get("proc")
        if proc is None:
            pytest.skip("no CPU-only subprocess probe (CUDA available)")
        stdout, stderr = proc.communicate(timeout=120)
        lines = [ln for ln in stdout.splitlines() if ln.startswith("RESULT:")]
        assert lines, f"probe subprocess failed (rc={proc.returncode}):\n{stderr[-3000:]}"
        _probe["result"] = json.loads(lines[-1][len("RESULT:"):])
    return _probe["result"]


@pytest.fixture(scope="module")
def shims():
    """Apply the CPU shims in this process (after the probe has started)."""
    if CUDA:
        pytest.skip("CPU shims apply only where CUDA is absent")
    assert compat.apply_cpu_shims() is True
    return compat


def run_check(name: str, group=None):
    """Run one CHECKS snippet here (shimmed) and return its ``result``."""
    ns = {"torch": torch, "GROUP": group}
    exec(CHECKS[name], ns)
    return ns["result"]


def assert_fails(unshimmed_results: dict, name: str, *needles: str) -> None:
    outcome = unshimmed_results[name]
    assert not outcome["ok"], (
        f"stock megatron-core/torch call '{name}' now works on CPU without the shim: "
        f"the shim may be obsolete (megatron-core {compat.mcore_version()})"
    )
    if needles:
        assert any(n in outcome["error"] for n in needles), outcome["error"]


CUDA_ERRORS = ("CUDA", "accelerator", "cuda")


# --------------------------------------------------------------------------------------
# Version and API
# --------------------------------------------------------------------------------------


def test_megatron_core_version_is_tested():
    assert compat.MCORE_TESTED_VERSIONS == ("0.19",)
    version = compat.mcore_version()
    from megatron.core.package_info import __shortversion__

    # package_info.__version__ gets "+<git hash>" of any git checkout enclosing the
    # installed package (e.g. a .venv inside this repo): compare the release part.
    assert version.split("+")[0] == __shortversion__
    assert compat.mcore_version_tested(), (
        f"megatron-core {version} is not in MCORE_TESTED_VERSIONS "
        f"{compat.MCORE_TESTED_VERSIONS}: re-check the CPU shims' file:line references"
    )
    assert not compat.mcore_version_tested("0.20.0")


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_apply_cpu_shims_is_noop_with_cuda():
    assert compat.apply_cpu_shims() is False
    assert not compat.cpu_shims_active()


@cpu_only
def test_apply_cpu_shims_idempotent(shims):
    from torch.overrides import _get_current_function_mode_stack

    assert compat.apply_cpu_shims() is True
    assert compat.apply_cpu_shims() is True
    assert compat.cpu_shims_active()
    modes = [m for m in _get_current_function_mode_stack() if isinstance(m, compat.CudaToCpuMode)]
    assert len(modes) == 1


# --------------------------------------------------------------------------------------
# ensure_importable: megatron/core/transformer/moe/ops/paged_stash.py:4 `import triton`
# --------------------------------------------------------------------------------------


@pytest.mark.skipif(compat.triton_available(), reason="triton installed: no stub needed")
def test_import_without_triton(unshimmed):
    assert_fails(unshimmed, "import_megatron_core", "triton")
    assert unshimmed["_triton_available"] is False
    assert unshimmed["_ensure_importable_imported_mcore"] is False

    assert compat.ensure_importable() is True
    assert compat.ensure_importable() is True  # idempotent
    finders = [f for f in sys.meta_path if getattr(f, "megatron_consa_stub_finder", False)]
    assert len(finders) == 1
    assert "triton" not in sys.modules or sys.modules["triton"] is not None

    import megatron.core.transformer.moe.ops as ops
    import megatron.core.transformer.moe.ops.paged_stash as stub
    from megatron.core.transformer.moe.paged_stash import (  # noqa: F401  real module
        PagedStashBuffer,
    )

    assert ops.paged_stash is stub
    assert stub.MEGATRON_CONSA_STUB is True
    assert stub.GLOBAL_BLOCK_SIZE == 1024
    assert set(stub.__all__) >= {
        "GLOBAL_BLOCK_SIZE",
        "paged_stash_copy_kernel",
        "paged_stash_pop_kernel",
    }
    for name in stub.__all__:
        assert hasattr(stub, name)
    with pytest.raises(RuntimeError, match="MoE paged stash needs triton/CUDA"):
        stub.paged_stash_copy_kernel[(1,)](None)
    with pytest.raises(RuntimeError, match="needs triton/CUDA"):
        stub.paged_stash_pop_kernel(None)
    assert isinstance(stub.a_kernel_added_later, compat.TritonKernelUnavailable)


# --------------------------------------------------------------------------------------
# Shim 1: RNG tracker on CPU generator states
# --------------------------------------------------------------------------------------


def _draws(seed: int, n: int = 2, size: int = 4):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(size, generator=g) for _ in range(n)]


@cpu_only
def test_shim1_rng_tracker(unshimmed, shims, single_rank_mcore, caplog):
    assert_fails(unshimmed, "rng_tracker_add", *CUDA_ERRORS)
    tracker = run_check("rng_tracker_add")
    assert "probe-rng" in tracker.get_states()

    from megatron.core.tensor_parallel import (
        checkpoint,
        get_cuda_rng_tracker,
        model_parallel_cuda_manual_seed,
    )

    seed = 42
    model_parallel_cuda_manual_seed(seed)
    default = _draws(seed)  # data-parallel seed -> default generator
    tp = _draws(seed + 2718 + 0)  # tensor-model-parallel seed, TP rank 0
    tracker = get_cuda_rng_tracker()
    with caplog.at_level("WARNING"):
        a0 = torch.rand(4)
        with tracker.fork():
            t0 = torch.rand(4)
        a1 = torch.rand(4)
        with tracker.fork():
            t1 = torch.rand(4)
    assert torch.equal(a0, default[0]) and torch.equal(a1, default[1])
    assert torch.equal(t0, tp[0]) and torch.equal(t1, tp[1])
    assert "CPU RNG state changed" not in caplog.text

    # Activation recomputation replays the same dropout mask (random.py:604/:642).
    def dropout_in_fork(x):
        with get_cuda_rng_tracker().fork():
            return torch.nn.functional.dropout(x, p=0.5, training=True) * 2

    x = torch.randn(16, 16, requires_grad=True)
    y = checkpoint(dropout_in_fork, False, x)
    y.sum().backward()
    assert torch.equal(x.grad, (y.detach() != 0).float() * 4)

    # seed_cpu_rng is the same seeding.
    compat.seed_cpu_rng(seed)
    assert torch.equal(torch.rand(4), default[0])


# --------------------------------------------------------------------------------------
# Shim 2: torch.cuda.current_device()
# --------------------------------------------------------------------------------------


@cpu_only
def test_shim2_current_device(unshimmed, shims):
    assert_fails(unshimmed, "current_device_rotary", *CUDA_ERRORS)
    assert torch.cuda.current_device() == "cpu"
    assert torch.device(torch.cuda.current_device()).type == "cpu"
    emb = run_check("current_device_rotary")
    assert emb.device.type == "cpu" and emb.shape == (8, 1, 1, 16)
    assert torch.cuda.is_available() is False  # nothing claims CUDA exists


# --------------------------------------------------------------------------------------
# Shim 3: attention mask builders
# --------------------------------------------------------------------------------------


@cpu_only
def test_shim3_mask_builders(unshimmed, shims):
    for name in ("causal_mask", "sliding_window_mask", "fused_softmax_causal"):
        assert_fails(unshimmed, name, *CUDA_ERRORS)

    causal = run_check("causal_mask")
    assert causal.dtype == torch.bool and causal.device.type == "cpu"
    assert torch.equal(causal, torch.ones(5, 5).triu(1).bool())

    swa = run_check("sliding_window_mask")
    i = torch.arange(5).unsqueeze(1)
    j = torch.arange(5).unsqueeze(0)
    allowed = (j <= i) & (j >= i - 2)  # window (2, 0): self + 2 previous
    assert torch.equal(swa, ~allowed)

    probs = run_check("fused_softmax_causal")
    assert torch.allclose(probs[0, 0].triu(1), torch.zeros(4, 4))
    assert torch.allclose(probs.sum(-1), torch.ones(1, 2, 4))

    import megatron.core.fusions.fused_softmax as fs
    import megatron.core.transformer.utils as tu

    assert fs.get_default_causal_mask is tu.get_default_causal_mask
    assert fs.get_sliding_window_causal_mask is tu.get_sliding_window_causal_mask


# --------------------------------------------------------------------------------------
# Shim 4: torch norms with sequence parallel
# --------------------------------------------------------------------------------------


@cpu_only
def test_shim4_torch_norm_sequence_parallel(unshimmed, shims):
    assert_fails(unshimmed, "torch_norm_sequence_parallel", "sequence parallel")
    cfg, norm = run_check("torch_norm_sequence_parallel")
    assert isinstance(norm, torch.nn.RMSNorm)
    assert norm.weight.sequence_parallel is True
    assert cfg.sequence_parallel is True  # the caller's config is not modified

    from megatron.core.transformer import TransformerConfig

    ln_cfg = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=2)
    ln_cfg.sequence_parallel = True
    ln = compat.CpuSequenceParallelNorm(ln_cfg, 8, 1e-5)  # positional, like WrappedTorchNorm
    assert isinstance(ln, torch.nn.LayerNorm)
    assert ln.weight.sequence_parallel is True and ln.bias.sequence_parallel is True

    ln_cfg.sequence_parallel = False
    plain = compat.CpuSequenceParallelNorm(config=ln_cfg, hidden_size=8, eps=1e-5)
    assert plain.weight.sequence_parallel is False

    # The other constructor checks of WrappedTorchNorm still apply.
    ln_cfg.persist_layer_norm = True
    with pytest.raises(AssertionError, match="persist_layer_norm"):
        compat.CpuSequenceParallelNorm(config=ln_cfg, hidden_size=8, eps=1e-5)


# --------------------------------------------------------------------------------------
# Shim 5: device "cuda" -> "cpu", .cuda(), torch.cuda.*Tensor type strings
# --------------------------------------------------------------------------------------


@cpu_only
def test_shim5_cuda_device_mapping(unshimmed, shims, single_rank_mcore):
    for name in ("device_cuda_factory", "tensor_dot_cuda", "tensor_to_cuda", "grad_norm_fp32"):
        assert_fails(unshimmed, name, *CUDA_ERRORS)
    assert_fails(unshimmed, "clip_grads_type_string", "AssertionError")

    assert run_check("device_cuda_factory").device.type == "cpu"
    t = torch.ones(3)
    assert t.cuda() is t
    assert run_check("tensor_to_cuda").device.type == "cpu"
    assert torch.empty(2, device=torch.device("cuda", 0)).device.type == "cpu"
    assert torch.zeros(2, device=0).device.type == "cpu"
    assert torch.zeros(2, pin_memory=True).device.type == "cpu"
    assert t.new_zeros(2, device="cuda:0").device.type == "cpu"
    assert torch.nn.Linear(2, 2).cuda().weight.device.type == "cpu"

    norm = run_check("grad_norm_fp32", group=single_rank_mcore.group)
    assert float(norm) == pytest.approx(4.0)

    grad = run_check("clip_grads_type_string")
    assert torch.allclose(grad, torch.full((4,), 2.0 / (4.0 + 1e-6)))

    # Only megatron's optimizer package sees the cuda type string; others see the truth.
    assert t.type() == "torch.FloatTensor"
    assert t.type("torch.cuda.DoubleTensor").dtype == torch.float64


@cpu_only
def test_shim5_mode_is_per_thread(shims):
    """TorchFunctionMode is thread-local: other threads apply the shims or use the
    context manager (documented in megatron_consa.compat.cpu)."""
    outcome = {}

    def worker():
        try:
            torch.zeros(1, device="cuda")
            outcome["bare"] = "ok"
        except Exception as e:  # no mode on this thread yet
            outcome["bare"] = type(e).__name__
        with compat.cuda_to_cpu_mode():
            outcome["ctx"] = torch.zeros(1, device="cuda").device.type
        outcome["applied"] = compat.apply_cpu_shims()
        outcome["after"] = torch.zeros(1, device="cuda").device.type

    th = threading.Thread(target=worker)
    th.start()
    th.join()
    assert outcome["bare"] in ("RuntimeError", "AssertionError")  # torch: no CUDA
    assert outcome == {"bare": outcome["bare"], "ctx": "cpu", "applied": True, "after": "cpu"}


@cpu_only
@pytest.mark.parametrize("context", ["device_meta", "device_cpu", "mode", "default_device"])
def test_shim5_entered_inside_a_callers_mode_stays_under_it(shims, context):
    """apply_cpu_shims (build_gpt_model calls it) inside `with torch.device(...)`, another
    TorchFunctionMode or torch.set_default_device: the caller's context still ends where it ends
    and the mapping stays (entered on top, the caller's exit popped it and left the caller's
    mode on)."""
    outcome = {}

    class Tag(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    @contextlib.contextmanager
    def default_device():
        torch.set_default_device("meta")
        try:
            yield
        finally:
            torch.set_default_device(None)

    def worker():  # a thread: a mode stack without the shim yet
        try:
            ctx = {"device_meta": torch.device("meta"), "device_cpu": torch.device("cpu"), "mode": Tag(),
                   "default_device": default_device()}[context]
            with ctx:
                compat.apply_cpu_shims()
                outcome["inside"] = (torch.zeros(1).device.type, torch.zeros(1, device="cuda").device.type)
            from torch.overrides import _get_current_function_mode_stack

            outcome["stack"] = [type(m).__name__ for m in _get_current_function_mode_stack()]
            outcome["after"] = (torch.zeros(1).device.type, torch.zeros(1, device="cuda").device.type)
        except Exception as e:
            outcome["error"] = repr(e)

    th = threading.Thread(target=worker)
    th.start()
    th.join()
    default = "meta" if context in ("device_meta", "default_device") else "cpu"
    assert outcome == {"inside": (default, "cpu"), "stack": ["CudaToCpuMode"], "after": ("cpu", "cpu")}


# --------------------------------------------------------------------------------------
# Shim 6: synchronize, streams, events
# --------------------------------------------------------------------------------------


@cpu_only
def test_shim6_streams_and_synchronize(unshimmed, shims):
    for name in ("cuda_synchronize", "cuda_streams", "cuda_event"):
        assert_fails(unshimmed, name, *CUDA_ERRORS, "dummy base class")
    assert run_check("cuda_synchronize") is None
    current, comm = run_check("cuda_streams")
    assert isinstance(current, compat.CpuStream) and isinstance(comm, torch.cuda.Stream)
    assert current is torch.cuda.current_stream()
    assert run_check("cuda_event") >= 0.0
    torch.ones(2).record_stream(comm)  # no-op on CPU


# --------------------------------------------------------------------------------------
# Integration: tiny GPTModel, DDP, megatron optimizer, pipeline schedule (PP=1)
# --------------------------------------------------------------------------------------


def _build_gpt(bf16: bool, use_distributed_optimizer: bool, window_size=None, lr=1e-2):
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.module import Float16Module

    config = TransformerConfig(
        num_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        use_cpu_initialization=True,
        hidden_dropout=0.1,
        attention_dropout=0.1,
        bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        window_size=window_size,
    )
    model = GPTModel(
        config=config,
        transformer_layer_spec=get_gpt_layer_local_spec(),
        vocab_size=128,
        max_sequence_length=32,
        position_embedding_type="rope",
    )
    if bf16:
        model = Float16Module(config, model)
    ddp_config = DistributedDataParallelConfig(
        use_distributed_optimizer=use_distributed_optimizer
    )
    model = DistributedDataParallel(config, ddp_config, model)
    config.finalize_model_grads_func = finalize_model_grads
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam",
            lr=lr,
            bf16=bf16,
            use_distributed_optimizer=use_distributed_optimizer,
            clip_grad=1.0,
        ),
        [model],
    )
    return model, optimizer


def _train_step(model, optimizer, tokens):
    from megatron.core.pipeline_parallel import get_forward_backward_func

    batch, seq = tokens.shape
    position_ids = torch.arange(seq).unsqueeze(0).expand(batch, seq)

    def forward_step(data_iterator, model):
        tok = next(data_iterator)
        output = model(tok, position_ids, None, labels=tok)

        def loss_func(output_tensor):
            loss = output_tensor.float().mean()
            return loss, {"loss": loss.detach()}

        return output, loss_func

    model.zero_grad_buffer()
    optimizer.zero_grad()
    losses = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter([tokens]),
        model=[model],
        num_microbatches=1,
        seq_length=seq,
        micro_batch_size=batch,
        forward_only=False,
    )
    update_successful, grad_norm, _ = optimizer.step()
    return float(losses[0]["loss"]), update_successful, grad_norm


@cpu_only
@pytest.mark.parametrize(
    "bf16,use_distributed_optimizer,window_size",
    [
        (False, False, None),  # FP32Optimizer: clip_grads.py:108/174
        (True, False, None),  # Float16OptimizerWithFloat16Params: optimizer.py:1009
        (False, True, (8, 0)),  # DistributedOptimizer: distrib_optimizer.py:466; SWA masks
    ],
    ids=["fp32", "bf16", "distopt-swa"],
)
def test_integration_gpt_train_step(
    shims, single_rank_mcore, bf16, use_distributed_optimizer, window_size
):
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.pipeline_parallel.schedules import forward_backward_no_pipelining

    assert get_forward_backward_func() is forward_backward_no_pipelining  # schedules.py:749
    compat.seed_cpu_rng(single_rank_mcore.seed)
    model, optimizer = _build_gpt(bf16, use_distributed_optimizer, window_size)
    tokens = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    before = [p.detach().float().clone() for p in model.parameters()]

    loss0, ok0, norm0 = _train_step(model, optimizer, tokens)
    loss1, ok1, norm1 = _train_step(model, optimizer, tokens)

    assert ok0 and ok1
    assert norm0 is not None and norm0 > 0 and torch.isfinite(torch.tensor(norm0))
    assert torch.isfinite(torch.tensor([loss0, loss1])).all()
    assert loss1 < loss0
    changed = [not torch.equal(b, p.detach().float()) for b, p in zip(before, model.parameters())]
    assert all(changed)
    assert all(p.device.type == "cpu" for p in model.parameters())


# --------------------------------------------------------------------------------------
# Item 8: resuming the distributed optimizer with the torch-Adam fallback
# --------------------------------------------------------------------------------------


@cpu_only
def test_distrib_optimizer_load_helpers(shims, single_rank_mcore):
    compat.seed_cpu_rng(single_rank_mcore.seed)
    model, optimizer = _build_gpt(False, True)
    # distrib_optimizer.py:838-839: state_dict() asserts one 'step' over an empty state.
    with pytest.raises(AssertionError):
        optimizer.state_dict()
    filled = compat.prepare_distrib_optimizer_for_load(optimizer)
    assert filled == len(list(model.parameters()))
    state_dict = optimizer.state_dict()
    assert compat.prepare_distrib_optimizer_for_load(optimizer) == 0  # idempotent

    for group in state_dict["optimizer"]["param_groups"]:
        group["step"] = 7
    with torch.no_grad():
        optimizer.load_state_dict(state_dict)
    inner = optimizer.optimizer
    steps = [inner.state[p]["step"] for g in inner.param_groups for p in g["params"]]
    shared_before = len({id(s) for s in steps}) < len(steps)

    assert compat.fix_param_steps_after_load(optimizer) == 7
    steps = [inner.state[p]["step"] for g in inner.param_groups for p in g["params"]]
    assert len({id(s) for s in steps}) == len(steps)
    assert all(float(s) == 7.0 for s in steps)
    assert shared_before  # megatron shares one step tensor (distrib_optimizer.py:1032)

    tokens = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    _train_step(model, optimizer, tokens)
    steps = [inner.state[p]["step"] for g in inner.param_groups for p in g["params"]]
    assert all(float(s) == 8.0 for s in steps)
