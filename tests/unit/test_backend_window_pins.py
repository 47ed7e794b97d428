"""The GPU-only window paths, pinned on the CPU.

CUDA runs SWA through FlexAttention (a block mask built from a mask function)
or Transformer Engine (`window_size=(W-1, 0)`). Neither runs here, but both are
decided by plain code that does: the mask function can be evaluated on CPU
tensors, `create_block_mask` runs on the CPU, and the TE backend's attention
class can be replaced by a stand-in that implements TE's documented window
semantics. An off-by-one in either path fails these tests. The stand-in also
checks what else the TE backend must get right without TE: half-precision inputs
as whole tensors (fp32 goes to the torch kernels), the train/eval mode, the
refusals (sinks, FP8/FP4), and that alternating causal and windowed calls reuse
TE's backend selection (the stand-in keeps TE's one-entry selection cache as
TE 2.20's `DotProductAttention.forward` does).

The reference window is built row by row from the convention (query p sees key
j iff j <= p and (j > p - W or j < S)), independently of the library.
"""

from __future__ import annotations

import importlib.util
import math
import os

import pytest
import torch

import megatron_consa  # noqa: F401  (makes megatron.core importable without triton)
from megatron.core.transformer.enums import AttnMaskType

from megatron_consa.attention import ConsaCoreAttention
from megatron_consa.backends import select
from megatron_consa.backends.torch_attention import (
    flex_sliding_window_block_mask,
    sliding_window_mask_mod,
)
from megatron_consa.model import ConsaTransformerConfig
from megatron_consa.config import ConsaConfig

# (seq_len, window, sinks): windows on, just off and across FlexAttention's
# 128-token tiles, W = 1, W = s - 1, sinks inside and beyond the window.
WINDOW_CASES = [
    (300, 100, 0),
    (300, 100, 4),
    (517, 128, 0),
    (517, 129, 3),
    (256, 127, 0),
    (200, 1, 0),
    (200, 1, 130),
    (256, 1, 130),
    (384, 383, 2),
]


def _reference_window(s: int, window: int, sinks: int) -> torch.Tensor:
    mask = torch.zeros(s, s, dtype=torch.bool)
    for p in range(s):
        mask[p, max(0, p - window + 1) : p + 1] = True
        mask[p, : min(sinks, p + 1)] = True
    return mask


def _tiles(num_blocks: torch.Tensor, indices: torch.Tensor, n_q: int, n_kv: int) -> torch.Tensor:
    """[n_q, n_kv] bool from a BlockMask's (num_blocks, indices) pair (batch/head 0)."""
    dense = torch.zeros(n_q, n_kv, dtype=torch.bool)
    for r in range(n_q):
        dense[r, indices[0, 0, r, : num_blocks[0, 0, r]].long()] = True
    return dense


@pytest.mark.parametrize("s,window,sinks", WINDOW_CASES)
def test_flex_mask_mod_equals_reference_window(s, window, sinks):
    ref = _reference_window(s, window, sinks)
    q_idx = torch.arange(s).view(s, 1)
    kv_idx = torch.arange(s).view(1, s)
    dense = sliding_window_mask_mod(window, sinks)(torch.tensor(0), torch.tensor(0), q_idx, kv_idx)
    assert torch.equal(dense, ref)
    # The block mask CUDA uses carries the same function.
    block_mask = flex_sliding_window_block_mask(s, window, sinks, torch.device("cpu"))
    assert torch.equal(block_mask.mask_mod(torch.tensor(0), torch.tensor(0), q_idx, kv_idx), ref)


@pytest.mark.parametrize("s,window,sinks", WINDOW_CASES)
def test_flex_block_mask_tiles_match_reference(s, window, sinks):
    """Skipped tiles hold no visible key; tiles marked full (mask_mod not applied
    there) hold only visible keys; every other tile with a visible key is partial."""
    block_mask = flex_sliding_window_block_mask(s, window, sinks, torch.device("cpu"))
    bq, bkv = block_mask.BLOCK_SIZE
    n_q, n_kv = math.ceil(s / bq), math.ceil(s / bkv)
    partial = _tiles(block_mask.kv_num_blocks, block_mask.kv_indices, n_q, n_kv)
    full = _tiles(block_mask.full_kv_num_blocks, block_mask.full_kv_indices, n_q, n_kv)
    assert not (partial & full).any()
    ref = _reference_window(s, window, sinks)
    for r in range(n_q):
        for c in range(n_kv):
            tile = ref[r * bq : (r + 1) * bq, c * bkv : (c + 1) * bkv]
            if full[r, c]:
                assert tile.all() and tile.shape == (bq, bkv), (r, c)
            elif partial[r, c]:
                assert tile.any(), (r, c)
            else:
                assert not tile.any(), (r, c)
    if s % bq == 0 and (window >= 2 * bq - 1 or sinks >= bq):  # a whole off-diagonal tile is visible
        assert full.any()


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("s,window,sinks", [(300, 100, 4), (200, 1, 0)])
def test_flex_attention_with_the_block_mask_matches_dense_reference(s, window, sinks):
    """FlexAttention's eager (unfused) implementation on the CPU, with the CUDA block mask."""
    from torch.nn.attention.flex_attention import flex_attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, s, 16, generator=g, dtype=torch.float64) for _ in range(3))
    block_mask = flex_sliding_window_block_mask(s, window, sinks, torch.device("cpu"))
    out = flex_attention(q, k, v, block_mask=block_mask, scale=0.25)
    scores = (q @ k.transpose(-1, -2) * 0.25).masked_fill(~_reference_window(s, window, sinks), float("-inf"))
    torch.testing.assert_close(out, scores.softmax(-1) @ v, rtol=0, atol=1e-10)


# ---------------------------------------------------------------------------
# Transformer Engine backend with a stand-in for TE's DotProductAttention
# ---------------------------------------------------------------------------


class StandInDotProductAttention:
    """TE's `DotProductAttention` as documented, in plain torch (sbhd, causal).

    With `window_size=(left, right)` query i sees keys i - left .. i + right
    (seqlen_q == seqlen_k; -1 = unbounded); `None` means the mask type's default,
    (-1, 0) for causal. Records every construction. Keeps TE's one-entry
    backend-selection cache the way TE's `forward` does (`_attention_backends`:
    parameters that differ from the cached ones mark it stale, a stale cache selects
    again) and counts selections.
    """

    made: list[dict] = []
    instances: list = []
    selection_cache: dict = {}
    selections: int = 0

    @classmethod
    def reset(cls):
        cls.made, cls.instances, cls.selections = [], [], 0
        cls.selection_cache = {"attention_params": None, "use_fused_attention": None,
                               "backend_selection_requires_update": False}

    def _select(self, q, k):
        cache = StandInDotProductAttention.selection_cache
        params = (self.kwargs["num_attention_heads"], self.kwargs["num_gqa_groups"], self.kwargs["window_size"],
                  tuple(q.shape), tuple(k.shape), q.dtype, self.training, os.environ.get("NVTE_FUSED_ATTN"))
        if cache["attention_params"] is None or params != cache["attention_params"]:
            cache["attention_params"] = params
            cache["backend_selection_requires_update"] = True
        if cache["backend_selection_requires_update"]:
            StandInDotProductAttention.selections += 1
            cache["use_fused_attention"] = True
            cache["backend_selection_requires_update"] = False
        assert cache["use_fused_attention"]

    def __init__(self, **kwargs):
        self.kwargs = kwargs
        self.training = True
        StandInDotProductAttention.made.append(kwargs)
        StandInDotProductAttention.instances.append(self)

    def train(self, mode=True):
        self.training = mode
        return self

    def __call__(self, q, k, v, *, qkv_format, attn_mask_type):
        assert qkv_format == "sbhd" and attn_mask_type == "causal"
        assert q.size(2) == self.kwargs["num_attention_heads"] and k.size(2) == self.kwargs["num_gqa_groups"]
        assert q.dtype in (torch.bfloat16, torch.float16)  # TE's fused kernels' dtypes
        # whole tensors, as TE's layout detection takes separate q, k, v
        assert all(x.is_contiguous() and x.storage_offset() == 0 for x in (q, k, v))
        self._select(q, k)
        left, right = self.kwargs["window_size"] or (-1, 0)
        s, b, h, d = q.shape
        i = torch.arange(s).view(s, 1)
        j = torch.arange(s).view(1, s)
        visible = j <= i  # causal
        if left >= 0:
            visible &= j >= i - left
        if right >= 0:
            visible &= j <= i + right
        rep = h // k.size(2)
        kh = k.repeat_interleave(rep, dim=2).permute(1, 2, 0, 3)  # [b, h, s, d]
        vh = v.repeat_interleave(rep, dim=2).permute(1, 2, 0, 3)
        scores = (q.permute(1, 2, 0, 3) @ kh.transpose(-1, -2)) * self.kwargs["softmax_scale"]
        out = scores.float().masked_fill(~visible, float("-inf")).softmax(-1).to(q.dtype) @ vh  # [b, h, s, d]
        return out.permute(2, 0, 1, 3).reshape(s, b, h * d)


@pytest.fixture
def te_stand_in(monkeypatch):
    StandInDotProductAttention.reset()
    monkeypatch.setattr(select, "transformer_engine_available", lambda: True)
    monkeypatch.setattr(select, "te_dot_product_attention_class", lambda: StandInDotProductAttention)
    monkeypatch.setattr(select, "te_backend_selection_cache", lambda: StandInDotProductAttention.selection_cache)
    monkeypatch.delenv("NVTE_FUSED_ATTN", raising=False)
    return StandInDotProductAttention


HEADS, GROUPS, D, S, B = 8, 4, 16, 29, 2
ROW = [1, 1, 0, 0]  # one run per type: each kernel gets a view of q, k, v (three runs would gather copies)


def _te_attention(window: int, *, backend: str = "te", sinks: int = 0, allocation=(ROW,)) -> ConsaCoreAttention:
    """One core attention; `allocation=None` is learning mode."""
    config = ConsaTransformerConfig(
        num_layers=1, hidden_size=HEADS * D, num_attention_heads=HEADS, num_query_groups=GROUPS, kv_channels=D,
        use_cpu_initialization=True, attention_dropout=0.0, hidden_dropout=0.0,
        consa=ConsaConfig(window=window, backend=backend, allocation=None if allocation is None else list(allocation),
                          sink_tokens=sinks),
    )
    return ConsaCoreAttention(config, layer_number=1, attn_mask_type=AttnMaskType.causal)


def _qkv(seed: int, dtype, s: int = S, b: int = B):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(s, b, h, D, generator=g, dtype=torch.float64).to(dtype) for h in (HEADS, GROUPS, GROUPS))


def _reference(q, k, v, window: int) -> torch.Tensor:
    """fp64, per head: FA heads causal, SWA heads see W keys (the convention)."""
    q, k, v = (t.double() for t in (q, k, v))
    s, b = q.shape[:2]
    rep = HEADS // GROUPS
    ref_swa = _reference_window(s, window, 0)
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    ref = torch.empty(s, b, HEADS, D, dtype=torch.float64)
    for h in range(HEADS):
        mask = causal if ROW[h // rep] else ref_swa
        qh, kh, vh = (t[:, :, idx].transpose(0, 1) for t, idx in ((q, h), (k, h // rep), (v, h // rep)))
        scores = (qh @ kh.transpose(1, 2) / math.sqrt(D)).masked_fill(~mask, float("-inf"))
        ref[:, :, h] = (scores.softmax(-1) @ vh).transpose(0, 1)
    return ref.reshape(s, b, HEADS * D)


@pytest.mark.usefixtures("single_rank_mcore")
@pytest.mark.parametrize("window", [1, 6, 13])
def test_te_backend_hands_te_window_w_minus_one(te_stand_in, window):
    attn = _te_attention(window).eval()
    assert attn.backend.name == "te"
    q, k, v = _qkv(window, torch.bfloat16)
    out = attn(q, k, v, None)

    windowed = [kw for kw in te_stand_in.made if kw["window_size"] is not None]
    assert [kw["window_size"] for kw in windowed] == [(window - 1, 0)]
    assert all(kw["attn_mask_type"] == "causal" and kw["qkv_format"] == "sbhd" for kw in te_stand_in.made)
    # And the output is the convention's, within bf16 rounding, which an off-by-one exceeds by far.
    assert out.dtype == torch.bfloat16
    err = (out.double() - _reference(q, k, v, window)).abs().max().item()
    off_by_one = (out.double() - _reference(q, k, v, window + 1)).abs().max().item()
    assert err < 3e-2 and off_by_one > 10 * err, (err, off_by_one)


@pytest.mark.usefixtures("single_rank_mcore")
@pytest.mark.parametrize("s,b", [(S, B), (1, 1)])
def test_te_backend_hands_te_whole_tensors_for_head_views(te_stand_in, s, b):
    """A mixed layer hands each kernel a view of its heads. TE takes separate q, k, v at
    storage offset 0 only (it copies strided views, and refuses a contiguous one at an
    offset: the SWA heads' slice when s * b == 1), so the backend copies views first;
    the stand-in asserts whole tensors."""
    attn = _te_attention(6).eval()
    q, k, v = _qkv(1, torch.bfloat16, s, b)
    seen = []
    for name in ("full", "sliding"):  # the layer really hands views to the backend
        real = getattr(attn.backend, name)

        def spy(q_, k_, v_, real=real):
            seen.append(all(x.untyped_storage().data_ptr() == y.untyped_storage().data_ptr()
                            for x, y in ((q_, q), (k_, k), (v_, v))))
            return real(q_, k_, v_)

        setattr(attn.backend, name, spy)
    out = attn(q, k, v, None)
    assert seen == [True, True] and len(te_stand_in.instances) == 2
    assert (out.double() - _reference(q, k, v, 6)).abs().max().item() < 3e-2


@pytest.mark.usefixtures("single_rank_mcore")
def test_te_backend_runs_fp32_on_the_torch_kernels(te_stand_in):
    """TE's fused kernels are bf16/fp16: in fp32 TE would run its unfused O(n^2) attention
    with a dense window mask. The TE backend hands fp32 calls to the torch kernels."""
    attn = _te_attention(6).eval()
    q, k, v = _qkv(0, torch.float32)
    out = attn(q, k, v, None)
    assert te_stand_in.made == []
    torch.testing.assert_close(out.double(), _reference(q, k, v, 6), rtol=0, atol=1e-5)


@pytest.mark.usefixtures("single_rank_mcore")
def test_te_backend_instances_follow_train_and_eval(te_stand_in):
    layer = torch.nn.ModuleDict({"attn": _te_attention(6)})  # eval() reaches it as a submodule
    layer.eval()
    layer["attn"](*_qkv(0, torch.bfloat16), None)
    assert len(te_stand_in.instances) == 2 and not any(a.training for a in te_stand_in.instances)
    layer.train()
    assert all(a.training for a in te_stand_in.instances)
    layer.eval()
    assert not any(a.training for a in te_stand_in.instances)


def _learning_te_attention(window: int) -> ConsaCoreAttention:
    """Learning mode with every gate interior: both branches run on every head."""
    from megatron_consa.controller import ConsaController, find_gates

    attn = _te_attention(window, allocation=None)
    with torch.no_grad():
        attn.log_alpha.copy_(torch.tensor([-0.5, 0.0, 0.4, 1.0]))
    ConsaController(attn.consa, total_cost=GROUPS).begin_iteration(find_gates([attn]))
    return attn


def _forwards(attn, inputs) -> list[torch.Tensor]:
    with torch.no_grad():
        return [attn(*qkv, None) for qkv in inputs]


@pytest.mark.usefixtures("single_rank_mcore")
@pytest.mark.parametrize("mode", ["fixed_mixed", "learning"])
def test_te_backend_selects_once_per_configuration(te_stand_in, monkeypatch, mode):
    """The layer alternates a causal and a windowed TE call, so TE's one-entry cache
    alone selects on every call (6 in 3 forwards); the memo selects once per
    configuration, with the same outputs."""
    make = (lambda: _te_attention(6).eval()) if mode == "fixed_mixed" else (lambda: _learning_te_attention(6))
    inputs = [_qkv(seed, torch.bfloat16) for seed in range(3)]

    monkeypatch.setattr(select, "te_backend_selection_cache", lambda: None)  # TE on its own
    alone = _forwards(make(), inputs)
    assert te_stand_in.selections == 6

    monkeypatch.setattr(select, "te_backend_selection_cache", lambda: te_stand_in.selection_cache)
    te_stand_in.reset()
    memo = _forwards(make(), inputs)
    assert te_stand_in.selections == 2
    for a, b in zip(alone, memo):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.usefixtures("single_rank_mcore")
def test_te_selection_memo_selects_again_where_te_would(te_stand_in, monkeypatch):
    """A new shape, a new mode, a changed selection environment and a cache TE marks
    stale each select again; returning to a kept shape does not."""
    attn = _te_attention(6).eval()
    short, long = _qkv(0, torch.bfloat16), _qkv(1, torch.bfloat16, s=S + 8)
    counts = []

    def step(qkv):
        with torch.no_grad():
            attn(*qkv, None)
        counts.append(te_stand_in.selections)

    step(short)                      # 2: causal and windowed
    step(long)                       # 4: a new shape
    step(short)                      # 4: kept
    attn.train()
    step(short)                      # 6: training mode is a TE parameter
    attn.eval()
    step(short)                      # 6
    monkeypatch.setenv("NVTE_FUSED_ATTN", "1")
    step(short)                      # 8: the environment TE's selection reads changed
    te_stand_in.selection_cache["backend_selection_requires_update"] = True
    step(short)                      # 10: TE's cache marked stale drops what was kept
    step(short)                      # 10
    assert counts == [2, 4, 4, 6, 6, 8, 10, 10]


def test_te_selection_memo_bounds_what_it_keeps_and_passes_through_without_a_cache(monkeypatch):
    cache = {"attention_params": None, "backend_selection_requires_update": False}
    monkeypatch.setattr(select, "te_backend_selection_cache", lambda: cache)
    memo = select.TESelectionMemo(max_entries=3)
    for i in range(5):
        def call(i=i):
            cache["attention_params"] = i
            return torch.tensor(float(i))
        assert memo.call(("key", i), call).item() == i
    assert sorted(key[1] for key in memo._kept) == [2, 3, 4]
    monkeypatch.setattr(select, "te_backend_selection_cache", lambda: None)
    assert memo.call(("key", 9), lambda: torch.tensor(9.0)).item() == 9 and ("key", 9) not in memo._kept


def test_te_backend_selection_cache_is_none_without_transformer_engine():
    if importlib.util.find_spec("transformer_engine") is not None:
        pytest.skip("Transformer Engine is installed here: tests/gpu checks its cache")
    select.te_backend_selection_cache.cache_clear()
    assert select.te_backend_selection_cache() is None


def test_auto_backend_takes_torch_for_sink_tokens(monkeypatch):
    monkeypatch.setattr(select, "transformer_engine_available", lambda: True)
    assert select.resolve_backend_name("auto") == "te"
    assert select.resolve_backend_name("auto", sink_tokens=4) == "torch"
    assert select.resolve_backend_name("torch") == "torch"
    from megatron_consa.config import ConsaConfigError

    with pytest.raises(ConsaConfigError, match="attention backend 'TE'"):  # not silently the torch backend
        select.resolve_backend_name("TE")

    with pytest.raises(ConsaConfigError, match="sink_tokens=4"):
        select.make_attention_backend("te", window=8, sink_tokens=4, softmax_scale=1.0, kv_channels=16, layer_number=1)


@pytest.mark.usefixtures("single_rank_mcore")
@pytest.mark.parametrize("field,value", [("fp8", "hybrid"), ("fp4", "e2m1")])
def test_fp8_and_fp4_are_refused_with_the_field_named(field, value):
    from megatron_consa.config import ConsaConfigError

    config = ConsaTransformerConfig(
        num_layers=1, hidden_size=HEADS * D, num_attention_heads=HEADS, num_query_groups=GROUPS, kv_channels=D,
        use_cpu_initialization=True, attention_dropout=0.0, hidden_dropout=0.0, consa=ConsaConfig(window=6, allocation=[ROW]),
    )
    setattr(config, field, value)  # set after construction: megatron's own checks need TE for these
    with pytest.raises(ConsaConfigError, match=f"{field}='{value}'"):
        ConsaCoreAttention(config, layer_number=1, attn_mask_type=AttnMaskType.causal)


def test_an_installed_te_that_does_not_import_says_why(monkeypatch, caplog):
    """TE present but broken (a missing extension, cuDNN not found): the TE backend is off, and
    the reason is logged instead of swallowed (the GPU tests would otherwise just skip)."""
    import sys

    monkeypatch.setattr(select, "has_cuda", lambda: True)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "transformer_engine" else real_find_spec(name, *a))
    monkeypatch.setitem(sys.modules, "transformer_engine.pytorch", None)  # importing it raises ImportError
    select._transformer_engine_imports.cache_clear()
    try:
        with caplog.at_level("WARNING", logger=select.__name__):
            assert select.transformer_engine_available() is False
        assert "does not import" in caplog.text and "halted" in caplog.text
    finally:
        select._transformer_engine_imports.cache_clear()
