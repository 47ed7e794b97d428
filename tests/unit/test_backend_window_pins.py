"""The GPU-only window paths, pinned on the CPU.

CUDA runs SWA through FlexAttention (a block mask built from a mask function)
or Transformer Engine (`window_size=(W-1, 0)`). Neither runs here, but both are
decided by plain code that does: the mask function can be evaluated on CPU
tensors, `create_block_mask` runs on the CPU, and the TE backend's attention
class can be replaced by a stand-in that implements TE's documented window
semantics. An off-by-one in either path fails these tests.

The reference window is built row by row from the convention (query p sees key
j iff j <= p and (j > p - W or j < S)), independently of the library.
"""

from __future__ import annotations

import math

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
    (-1, 0) for causal. Records every construction.
    """

    made: list[dict] = []

    def __init__(self, **kwargs):
        self.kwargs = kwargs
        StandInDotProductAttention.made.append(kwargs)

    def __call__(self, q, k, v, *, qkv_format, attn_mask_type):
        assert qkv_format == "sbhd" and attn_mask_type == "causal"
        assert q.size(2) == self.kwargs["num_attention_heads"] and k.size(2) == self.kwargs["num_gqa_groups"]
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
        out = scores.masked_fill(~visible, float("-inf")).softmax(-1) @ vh  # [b, h, s, d]
        return out.permute(2, 0, 1, 3).reshape(s, b, h * d)


@pytest.fixture
def te_stand_in(monkeypatch):
    StandInDotProductAttention.made = []
    monkeypatch.setattr(select, "transformer_engine_available", lambda: True)
    monkeypatch.setattr(select, "te_dot_product_attention_class", lambda: StandInDotProductAttention)
    return StandInDotProductAttention


@pytest.mark.usefixtures("single_rank_mcore")
@pytest.mark.parametrize("window", [1, 6, 13])
def test_te_backend_hands_te_window_w_minus_one(te_stand_in, window):
    heads, groups, d, s, b = 8, 4, 16, 29, 2
    row = [1, 0, 0, 1]
    config = ConsaTransformerConfig(
        num_layers=1, hidden_size=heads * d, num_attention_heads=heads, num_query_groups=groups, kv_channels=d,
        use_cpu_initialization=True, attention_dropout=0.0, hidden_dropout=0.0,
        consa=ConsaConfig(window=window, backend="te", allocation=[row]),
    )
    attn = ConsaCoreAttention(config, layer_number=1, attn_mask_type=AttnMaskType.causal).eval()
    assert attn.backend.name == "te"
    g = torch.Generator().manual_seed(window)
    q = torch.randn(s, b, heads, d, generator=g, dtype=torch.float64)
    k = torch.randn(s, b, groups, d, generator=g, dtype=torch.float64)
    v = torch.randn(s, b, groups, d, generator=g, dtype=torch.float64)
    out = attn(q, k, v, None)

    windowed = [kw for kw in te_stand_in.made if kw["window_size"] is not None]
    assert [kw["window_size"] for kw in windowed] == [(window - 1, 0)]
    assert all(kw["attn_mask_type"] == "causal" and kw["qkv_format"] == "sbhd" for kw in te_stand_in.made)

    # And the output is the convention's: FA heads causal, SWA heads see W keys.
    rep = heads // groups
    ref_swa = _reference_window(s, window, 0)
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    ref = torch.empty(s, b, heads, d, dtype=torch.float64)
    for h in range(heads):
        mask = causal if row[h // rep] else ref_swa
        qh, kh, vh = (t[:, :, idx].transpose(0, 1) for t, idx in ((q, h), (k, h // rep), (v, h // rep)))
        scores = (qh @ kh.transpose(1, 2) / math.sqrt(d)).masked_fill(~mask, float("-inf"))
        ref[:, :, h] = (scores.softmax(-1) @ vh).transpose(0, 1)
    torch.testing.assert_close(out, ref.reshape(s, b, heads * d), rtol=0, atol=1e-12)
