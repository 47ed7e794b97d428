"""Unit tests for megatron_consa.allocation (pure Python, fast)."""

from __future__ import annotations

import json
import math
import os
import re

import pytest
import torch

from megatron_consa import allocation as alloc_mod
from megatron_consa.allocation import (
    ALLOCATION_FORMAT_VERSION,
    GRANULARITIES,
    Allocation,
    AllocationError,
    allocation_from_spec,
    fa_unit_budget,
    finalize_topk,
    list_presets,
    make_preset,
)

BUDGET_PRESETS = ["interleave:4", "interleave:6", "interleave:1", "top_swa", "bottom_swa", "uniform_heads", "random:7", "heuristic"]


def _alloc(**kw) -> Allocation:
    base = dict(
        granularity="kv_head",
        num_layers=4,
        num_kv_heads=2,
        window=8,
        sink_tokens=2,
        target_sparsity=0.5,
        fa=[[1, 0], [0, 1], [0, 0], [1, 1]],
        log_alpha=[[1.5, -2.0], [-0.25, 3.0], [-1.0, -3.0], [2.0, 2.5]],
        metadata={"note": "test"},
    )
    base.update(kw)
    return Allocation(**base)


def _budget(granularity: str, L: int, G: int, t: float) -> int:
    n = L if granularity == "layer" else L * G
    return math.floor((1 - t) * n + 0.5 + 1e-9)


def _fa_kv_heads(fa) -> int:
    return sum(map(sum, fa))


# ----------------------------------------------------------------- file round trip


def test_roundtrip_save_load(tmp_path):
    a = _alloc()
    p = tmp_path / "allocation.json"
    a.save(p)
    b = Allocation.load(p)
    assert b.to_dict() == a.to_dict()
    assert b == a
    d = json.loads(p.read_text())
    assert d["achieved_sparsity"] == 0.5 and d["format_version"] == ALLOCATION_FORMAT_VERSION
    # fa rows one per line
    assert "    [1, 0],\n" in p.read_text()


def test_roundtrip_layer_without_log_alpha(tmp_path):
    a = _alloc(granularity="layer", fa=[[1, 1], [0, 0], [0, 0], [1, 1]], log_alpha=None, target_sparsity=None, metadata={})
    p = tmp_path / "a.json"
    a.save(p)
    assert Allocation.load(p).to_dict() == a.to_dict()


def _leftovers(tmp_path):
    return sorted(x.name for x in tmp_path.iterdir())


def test_save_is_atomic_on_serialization_failure(tmp_path, monkeypatch):
    p = tmp_path / "allocation.json"
    _alloc().save(p)
    before = p.read_bytes()

    def boom(*a, **k):
        raise RuntimeError("serialization failed")

    monkeypatch.setattr(alloc_mod.json, "dumps", boom)
    with pytest.raises(RuntimeError):
        _alloc(fa=[[0, 0], [0, 0], [0, 0], [0, 0]]).save(p)
    assert p.read_bytes() == before
    assert _leftovers(tmp_path) == ["allocation.json"]


def test_save_is_atomic_on_write_failure(tmp_path, monkeypatch):
    p = tmp_path / "allocation.json"
    _alloc().save(p)
    before = p.read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(alloc_mod.os, "replace", boom)
    with pytest.raises(OSError):
        _alloc(fa=[[0, 0], [0, 0], [0, 0], [0, 0]]).save(p)
    assert p.read_bytes() == before
    assert _leftovers(tmp_path) == ["allocation.json"]


def test_atomic_outputs_get_the_mode_a_plain_write_gives(tmp_path):
    """tempfile makes private files (0600) and directories (0700); a renamed output must not stay private."""
    import os
    import stat

    from megatron_consa.conversion.hf_files import staged_directory
    from megatron_consa.files import _umask

    umask = _umask()
    plain = tmp_path / "plain.json"
    plain.write_text("{}")
    _alloc().save(tmp_path / "allocation.json")
    assert stat.S_IMODE(os.stat(tmp_path / "allocation.json").st_mode) == stat.S_IMODE(os.stat(plain).st_mode)
    assert stat.S_IMODE(os.stat(plain).st_mode) == 0o666 & ~umask
    with staged_directory(tmp_path / "out") as d:
        (d / "f").write_text("x")
    (tmp_path / "made").mkdir()
    assert stat.S_IMODE(os.stat(tmp_path / "out").st_mode) == stat.S_IMODE(os.stat(tmp_path / "made").st_mode)


def test_staged_directory_replaces_an_output_or_keeps_it(tmp_path, monkeypatch):
    """An output written over an old one: the new one in place and nothing beside it; a
    failure while moving it in puts the old one back."""
    from pathlib import Path

    from megatron_consa.conversion.hf_files import staged_directory

    out = tmp_path / "out"
    out.mkdir()
    (out / "f").write_text("old")
    with staged_directory(out) as d:
        (d / "f").write_text("new")
    assert (out / "f").read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["out"]
    real = Path.rename

    def failing(self, target):
        if self.name.startswith(".out.tmp-"):
            raise OSError("disk full")
        return real(self, target)

    monkeypatch.setattr(Path, "rename", failing)
    with pytest.raises(OSError, match="disk full"):
        with staged_directory(out) as d:
            (d / "f").write_text("newer")
    assert (out / "f").read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["out"]


def test_load_bad_json_names_path(tmp_path):
    p = tmp_path / "broken.json"
    p.write_text("{not json")
    with pytest.raises(AllocationError, match="broken.json.*not valid JSON"):
        Allocation.load(p)
    with pytest.raises(AllocationError, match="not found"):
        Allocation.load(tmp_path / "missing.json")


def test_load_validation_error_names_path(tmp_path):
    d = _alloc().to_dict()
    d["fa"] = d["fa"][:3]
    p = tmp_path / "allocation.json"
    p.write_text(json.dumps(d))
    with pytest.raises(AllocationError, match=r"allocation.json: field 'fa' has 3 rows but num_layers is 4"):
        Allocation.load(p)


# ----------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "kw, pattern",
    [
        (dict(fa=[[1, 0], [0, 1], [0, 0]]), "'fa' has 3 rows"),
        (dict(fa=[[1, 0], [0, 1], [0, 0], [1]]), "'fa' row 3 has 1 columns"),
        (dict(fa=[[1, 0], [0, 2], [0, 0], [1, 1]]), r"'fa' \[1\]\[1\]"),
        (dict(fa=[[1, 0], [0, 0.5], [0, 0], [1, 1]]), "'fa'"),
        (dict(fa=[[True, 0], [0, 1], [0, 0], [1, 1]]), "'fa'"),
        (dict(granularity="head"), "granularity"),
        (dict(granularity="layer"), "'fa' row 0 .*granularity is 'layer'"),
        (dict(format_version=2), "format_version"),
        (dict(window=0), "window"),
        (dict(sink_tokens=-1), "sink_tokens"),
        (dict(target_sparsity=1.0), "target_sparsity"),
        (dict(target_sparsity=-0.1), "target_sparsity"),
        (dict(num_layers=0, fa=[]), "num_layers"),
        (dict(num_kv_heads=0), "num_kv_heads"),
        (dict(log_alpha=[[0.0, 0.0]] * 3), "'log_alpha' has 3 rows"),
        (dict(log_alpha=[[0.0]] * 4), "'log_alpha' row 0"),
        (dict(log_alpha=[[0.0, float("nan")]] * 4), "log_alpha"),
        (
            dict(granularity="layer", fa=[[1, 1], [0, 0], [0, 0], [1, 1]], log_alpha=[[1.0, 1.0], [0.5, -0.5], [0.0, 0.0], [2.0, 2.0]]),
            r"'log_alpha' row 1 .*granularity is 'layer'",
        ),
        (dict(metadata={"x": object()}), "metadata"),
        (dict(metadata={1: "int key", "1": "str key"}), "field 'metadata' would not read back as written"),
        (dict(metadata={"t": (1, 2)}), "field 'metadata' would not read back as written"),
        (dict(metadata={"x": float("nan")}), "field 'metadata' is not JSON serializable"),
    ],
)
def test_validation_errors_name_field(kw, pattern):
    with pytest.raises(AllocationError, match=pattern):
        _alloc(**kw).validate()


def test_from_dict_errors():
    good = _alloc().to_dict()
    assert Allocation.from_dict(good) == _alloc()
    for key in ("fa", "granularity", "window", "target_sparsity", "format_version"):
        d = dict(good)
        del d[key]
        with pytest.raises(AllocationError, match=f"missing field.*'{key}'"):
            Allocation.from_dict(d)
    with pytest.raises(AllocationError, match="format_version"):
        Allocation.from_dict({**good, "format_version": 99})
    for wrong in (0.25, float("nan"), "0.5"):
        with pytest.raises(AllocationError, match="achieved_sparsity"):
            Allocation.from_dict({**good, "achieved_sparsity": wrong})
    with pytest.raises(AllocationError, match="unknown field.*'extra'.*metadata"):
        Allocation.from_dict({**good, "extra": 1})
    d = dict(good)
    del d["achieved_sparsity"]  # optional on read
    assert Allocation.from_dict(d).achieved_sparsity == 0.5


def test_queries():
    a = _alloc()
    assert a.fa_tensor().dtype == torch.bool
    assert a.fa_tensor(torch.int64).tolist() == a.fa
    assert a.layer_fa(1) == [0, 1]
    with pytest.raises(AllocationError, match="layer_index"):
        a.layer_fa(4)
    a.check_compatible(4, 2, granularity="kv_head", window=8)
    for kw, name in [
        (dict(num_layers=5, num_kv_heads=2), "num_layers"),
        (dict(num_layers=4, num_kv_heads=4), "num_kv_heads"),
        (dict(num_layers=4, num_kv_heads=2, granularity="layer"), "granularity"),
        (dict(num_layers=4, num_kv_heads=2, window=16), "window"),
    ]:
        with pytest.raises(AllocationError, match=name):
            a.check_compatible(**kw)
    s = a.summary()
    assert "F." in s and ".F" in s and "FF" in s and "0.5000" in s
    assert len(s.splitlines()) == 2 + 4


def test_kv_cache_tokens_hand_computed():
    # 4 FA heads, 4 SWA heads; window 8 + 2 sinks = 10 tokens cap.
    a = _alloc()
    assert a.kv_cache_tokens(100) == 4 * 100 + 4 * 10
    assert a.kv_cache_tokens(6) == 8 * 6  # shorter than the cap: every head holds all tokens
    assert a.kv_cache_tokens(0) == 0
    b = _alloc(sink_tokens=0)
    assert b.kv_cache_tokens(1000) == 4 * 1000 + 4 * 8


# ----------------------------------------------------------------- finalize


def _brute_force(values: list[float], k: int) -> set[int]:
    return set(sorted(range(len(values)), key=lambda i: (-values[i], i))[:k])


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_finalize_exact_budget_and_brute_force(granularity):
    gen = torch.Generator().manual_seed(0)
    for L in (1, 3, 4, 7, 28):
        for G in (1, 2, 3, 8):
            shape = (L,) if granularity == "layer" else (L, G)
            # coarse values so ties happen often
            la = torch.randint(-3, 4, shape, generator=gen).float()
            for t in (0.0, 0.1, 0.25, 0.3, 0.5, 0.6, 0.75, 0.875, 0.9, 0.99):
                fa = finalize_topk(la, target_sparsity=t, granularity=granularity, num_kv_heads=G)
                k = _budget(granularity, L, G, t)
                assert len(fa) == L and all(len(r) == G for r in fa)
                unit_cost = G if granularity == "layer" else 1
                assert _fa_kv_heads(fa) == k * unit_cost
                flat = la.reshape(-1).tolist()
                if granularity == "layer":
                    chosen = {l for l in range(L) if fa[l][0] == 1}
                    assert all(len(set(r)) == 1 for r in fa)
                else:
                    chosen = {l * G + g for l in range(L) for g in range(G) if fa[l][g] == 1}
                assert chosen == _brute_force(flat, k)


def test_finalize_ties_by_unit_index_and_shapes():
    la = torch.zeros(2, 3)
    fa = finalize_topk(la, target_sparsity=0.5, granularity="kv_head", num_kv_heads=3)
    assert fa == [[1, 1, 1], [0, 0, 0]]
    # layer granularity accepts [L], [L, 1] and constant-row [L, G]
    for shaped in (torch.tensor([0.0, 1.0, 1.0, 0.0]), torch.tensor([[0.0], [1.0], [1.0], [0.0]]),
                   torch.tensor([[0.0] * 2, [1.0] * 2, [1.0] * 2, [0.0] * 2])):
        fa = finalize_topk(shaped, target_sparsity=0.75, granularity="layer", num_kv_heads=2)
        assert fa == [[0, 0], [1, 1], [0, 0], [0, 0]]
    with pytest.raises(AllocationError, match="varies across KV heads"):
        finalize_topk(torch.tensor([[0.0, 1.0]] * 4), target_sparsity=0.5, granularity="layer", num_kv_heads=2)
    with pytest.raises(AllocationError, match="num_kv_heads"):
        finalize_topk(torch.zeros(4, 3), target_sparsity=0.5, granularity="kv_head", num_kv_heads=2)
    with pytest.raises(AllocationError, match="target_sparsity"):
        finalize_topk(torch.zeros(4, 2), target_sparsity=1.0, granularity="kv_head", num_kv_heads=2)
    with pytest.raises(AllocationError, match="NaN"):
        finalize_topk(torch.tensor([[float("nan"), 0.0]]), target_sparsity=0.5, granularity="kv_head", num_kv_heads=2)


def test_budget_rounding_half_up():
    assert fa_unit_budget(28, 0.875) == 4  # 3.5 -> 4
    assert fa_unit_budget(5, 0.9) == 1  # 0.5 (0.4999... in floats) -> 1
    assert fa_unit_budget(10, 0.65) == 4  # 3.5 -> 4
    assert fa_unit_budget(3, 0.5) == 2  # 1.5 -> 2 (half-even would give 2 too)
    assert fa_unit_budget(5, 0.5) == 3  # 2.5 -> 3 (half-even would give 2)
    assert fa_unit_budget(8, 0.0) == 8


def test_from_log_alpha():
    la = torch.tensor([[3.0, -1.0], [0.5, 2.0], [-2.0, -3.0], [1.0, 0.0]])
    a = Allocation.from_log_alpha(la, target_sparsity=0.5, granularity="kv_head", num_kv_heads=2, window=16)
    assert a.fa == [[1, 0], [1, 1], [0, 0], [1, 0]]
    assert a.log_alpha == la.tolist() and a.source == "consa" and a.target_sparsity == 0.5
    b = Allocation.from_log_alpha(torch.tensor([1.0, 3.0, -1.0, 2.0]), target_sparsity=0.5, granularity="layer",
                                  num_kv_heads=2, window=16, sink_tokens=4)
    assert b.fa == [[0, 0], [1, 1], [0, 0], [1, 1]]
    assert b.log_alpha == [[1.0, 1.0], [3.0, 3.0], [-1.0, -1.0], [2.0, 2.0]]
    assert Allocation.from_dict(b.to_dict()) == b


# ----------------------------------------------------------------- presets


def _scores(L, G):
    return torch.arange(L * G, dtype=torch.float64).reshape(L, G).flip(0) * 0.37 % 5.0


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("name", BUDGET_PRESETS)
def test_every_preset_meets_budget(name, granularity):
    for L in (4, 28):
        for G in (1, 2, 8):
            for t in (0.0, 0.25, 0.5, 0.75, 0.875):
                a = make_preset(name, num_layers=L, num_kv_heads=G, granularity=granularity, target_sparsity=t,
                                window=64, calibration_scores=_scores(L, G))
                k = _budget(granularity, L, G, t)
                unit_cost = G if granularity == "layer" else 1
                assert _fa_kv_heads(a.fa) == k * unit_cost, (name, L, G, t)
                assert math.isclose(a.achieved_sparsity, 1 - k * unit_cost / (L * G))
                if granularity == "layer":
                    assert all(len(set(r)) == 1 for r in a.fa)
                assert a.source == name and a.target_sparsity == t
                assert Allocation.from_dict(a.to_dict()) == a


def test_interleave_pattern():
    a = make_preset("interleave:4", num_layers=8, num_kv_heads=2, granularity="layer", target_sparsity=0.75, window=16)
    assert [l for l in range(8) if a.fa[l][0]] == [3, 7]
    b = make_preset("interleave:4", num_layers=8, num_kv_heads=2, granularity="kv_head", target_sparsity=0.75, window=16)
    assert b.fa == a.fa
    # Gemma 5:1 on 12 layers at its own sparsity
    c = make_preset("interleave:6", num_layers=12, num_kv_heads=4, granularity="kv_head", target_sparsity=10 / 12,
                    window=16)
    assert [l for l in range(12) if any(c.fa[l])] == [5, 11]
    # budget above the pattern: extra layers spread between pattern layers
    d = make_preset("interleave:4", num_layers=8, num_kv_heads=1, granularity="layer", target_sparsity=0.5, window=16)
    assert [l for l in range(8) if d.fa[l][0]] == [1, 3, 5, 7]
    # kv_head remainder: whole pattern layers, then lowest heads of the next layer in priority order
    e = make_preset("interleave:4", num_layers=8, num_kv_heads=4, granularity="kv_head", target_sparsity=1 - 10 / 32,
                    window=16)
    assert e.fa[3] == e.fa[7] == [1, 1, 1, 1] and e.fa[1] == [1, 1, 0, 0]
    assert _fa_kv_heads(e.fa) == 10


def test_top_and_bottom_swa():
    for gran in GRANULARITIES:
        top = make_preset("top_swa", num_layers=4, num_kv_heads=2, granularity=gran, target_sparsity=0.5, window=16)
        assert top.fa == [[1, 1], [1, 1], [0, 0], [0, 0]]
        bot = make_preset("bottom_swa", num_layers=4, num_kv_heads=2, granularity=gran, target_sparsity=0.5, window=16)
        assert bot.fa == [[0, 0], [0, 0], [1, 1], [1, 1]]
    # remainder heads of the next layer, lowest head first
    top = make_preset("top_swa", num_layers=4, num_kv_heads=2, granularity="kv_head", target_sparsity=5 / 8, window=16)
    assert top.fa == [[1, 1], [1, 0], [0, 0], [0, 0]]
    bot = make_preset("bottom_swa", num_layers=4, num_kv_heads=2, granularity="kv_head", target_sparsity=5 / 8,
                      window=16)
    assert bot.fa == [[0, 0], [0, 0], [1, 0], [1, 1]]


def test_uniform_heads():
    a = make_preset("uniform_heads", num_layers=4, num_kv_heads=8, granularity="kv_head", target_sparsity=0.5, window=16)
    assert all(row == [1, 1, 1, 1, 0, 0, 0, 0] for row in a.fa)
    b = make_preset("uniform_heads", num_layers=4, num_kv_heads=8, granularity="kv_head", target_sparsity=1 - 14 / 32,
                    window=16)
    counts = [sum(r) for r in b.fa]
    assert sum(counts) == 14 and max(counts) - min(counts) <= 1
    c = make_preset("uniform_heads", num_layers=8, num_kv_heads=2, granularity="layer", target_sparsity=0.75, window=16)
    assert [l for l in range(8) if c.fa[l][0]] == [3, 7]
    # evenly spaced where L / K is no power of two: Qwen3-8B's 28 layers keep every 4th (7 FA), every other (14)
    for target, every in ((0.75, 4), (0.5, 2)):
        d = make_preset("uniform_heads", num_layers=28, num_kv_heads=8, granularity="layer", target_sparsity=target,
                        window=16)
        assert [l for l in range(28) if d.fa[l][0]] == list(range(every - 1, 28, every)), target
    # a budget that does not divide over the layers (SmolLM2's 30 x 3 KV heads): at 22/30, 24 FA heads, one in each
    # layer but 6 evenly spaced ones; at 1/2, 45: one in every layer and a second in every other layer
    e = make_preset("uniform_heads", num_layers=30, num_kv_heads=3, granularity="kv_head", target_sparsity=22 / 30,
                    window=16)
    assert [sum(row) for row in e.fa] == [0 if l % 5 == 0 else 1 for l in range(30)]
    f = make_preset("uniform_heads", num_layers=30, num_kv_heads=3, granularity="kv_head", target_sparsity=0.5,
                    window=16)
    assert [sum(row) for row in f.fa] == [1 + l % 2 for l in range(30)]


def test_random_reproducible():
    kw = dict(num_layers=28, num_kv_heads=8, granularity="kv_head", target_sparsity=0.75, window=16)
    a1, a2, b = make_preset("random:1", **kw), make_preset("random:1", **kw), make_preset("random:2", **kw)
    assert a1.fa == a2.fa and a1.fa != b.fa
    la1 = make_preset("random:1", **{**kw, "granularity": "layer"})
    la2 = make_preset("random:3", **{**kw, "granularity": "layer"})
    assert la1.fa != la2.fa


def test_heuristic_picks_largest_scores():
    scores = torch.tensor([[0.1, 0.9], [0.5, 0.2], [0.8, 0.3], [0.0, 0.05]])
    a = make_preset("heuristic", num_layers=4, num_kv_heads=2, granularity="kv_head", target_sparsity=0.625,
                    window=16, calibration_scores=scores)
    assert a.fa == [[0, 1], [1, 0], [1, 0], [0, 0]]
    # layer: sums are 1.0, 0.7, 1.1, 0.05
    b = make_preset("heuristic", num_layers=4, num_kv_heads=2, granularity="layer", target_sparsity=0.5, window=16,
                    calibration_scores=scores)
    assert b.fa == [[1, 1], [0, 0], [1, 1], [0, 0]]
    with pytest.raises(AllocationError, match="calibration_scores is missing"):
        make_preset("heuristic", num_layers=4, num_kv_heads=2, granularity="layer", target_sparsity=0.5, window=16)
    with pytest.raises(AllocationError, match="calibration_scores has shape"):
        make_preset("heuristic", num_layers=4, num_kv_heads=2, granularity="layer", target_sparsity=0.5, window=16,
                    calibration_scores=torch.zeros(4, 3))


def test_all_fa_all_swa():
    for gran in GRANULARITIES:
        kw = dict(num_layers=4, num_kv_heads=2, granularity=gran, window=16)
        fa = make_preset("all_fa", target_sparsity=None, **kw)
        assert _fa_kv_heads(fa.fa) == 8 and fa.achieved_sparsity == 0.0 and fa.target_sparsity == 0.0
        assert make_preset("all_fa", target_sparsity=0.0, **kw).fa == fa.fa
        swa = make_preset("all_swa", target_sparsity=None, **kw)
        assert _fa_kv_heads(swa.fa) == 0 and swa.achieved_sparsity == 1.0 and swa.target_sparsity is None
        assert make_preset("all_swa", target_sparsity=1.0, **kw).target_sparsity is None
        with pytest.raises(AllocationError, match="all_fa.*target_sparsity=0.5"):
            make_preset("all_fa", target_sparsity=0.5, **kw)
        with pytest.raises(AllocationError, match="all_swa"):
            make_preset("all_swa", target_sparsity=0.5, **kw)


@pytest.mark.parametrize("name", ["interleave:0", "interleave:x", "interleave", "random:", "random:-1", "random:a",
                                  "nope", "top_swa:3", "", None])
def test_bad_preset_names(name):
    with pytest.raises(AllocationError, match="valid presets: all_fa"):
        make_preset(name, num_layers=4, num_kv_heads=2, granularity="layer", target_sparsity=0.5, window=16)


def test_a_directory_is_told_to_name_its_allocation_file(tmp_path):
    """finalize's output directory given where an allocation is asked for: pointed at its allocation.json."""
    kw = dict(num_layers=4, num_kv_heads=2, granularity="layer", target_sparsity=0.5, window=16)
    with pytest.raises(AllocationError, match="a directory, not an allocation file or a preset: give an allocation"):
        allocation_from_spec(str(tmp_path), **kw)
    make_preset("top_swa", **kw).save(tmp_path / "allocation.json")
    with pytest.raises(AllocationError, match=re.escape(f"give {tmp_path / 'allocation.json'} (finalize's")):
        allocation_from_spec(str(tmp_path), **kw)
    assert allocation_from_spec(str(tmp_path / "allocation.json"), **kw).fa == make_preset("top_swa", **kw).fa


def test_preset_argument_errors():
    kw = dict(num_layers=4, num_kv_heads=2, window=16)
    with pytest.raises(AllocationError, match="target_sparsity is required"):
        make_preset("top_swa", granularity="layer", target_sparsity=None, **kw)
    with pytest.raises(AllocationError, match="granularity"):
        make_preset("top_swa", granularity="head", target_sparsity=0.5, **kw)
    with pytest.raises(AllocationError, match="window"):
        make_preset("top_swa", granularity="layer", target_sparsity=0.5, num_layers=4, num_kv_heads=2, window=0)


def test_list_presets():
    p = list_presets()
    assert set(p) == {"all_fa", "all_swa", "interleave:K", "top_swa", "bottom_swa", "uniform_heads", "random:SEED",
                      "heuristic"}
    assert all(isinstance(v, str) and v and "\n" not in v for v in p.values())


def test_finalize_says_when_units_are_too_close_to_call(caplog):
    import torch as _torch

    la = _torch.tensor([[3.0, -3.40], [-3.41, -8.0]])
    with caplog.at_level("WARNING"):
        alloc = Allocation.from_log_alpha(la, target_sparsity=0.5, granularity="kv_head", num_kv_heads=2, window=8,
                                          margin=0.1)
    assert alloc.fa == [[1, 1], [0, 0]] and alloc.achieved_sparsity == 0.5
    assert alloc.metadata["undecided_units"] == [[0, 1], [1, 0]]
    assert alloc.metadata["boundary_margin"] == pytest.approx(0.01)
    assert "too close to call" in caplog.text
    clear = Allocation.from_log_alpha(_torch.tensor([[3.0, 2.0], [-3.0, -8.0]]), target_sparsity=0.5,
                                      granularity="kv_head", num_kv_heads=2, window=8, margin=0.1)
    assert "undecided_units" not in clear.metadata and clear.metadata["boundary_margin"] == pytest.approx(5.0)
    # only units within the margin of the other side: FA 0.18 is 0.18 above every SWA unit, SWA -0.05 is 0.14
    # below every FA unit; the boundary pair (0.09 and 0.0) alone lies within 0.1 of it
    layers = Allocation.from_log_alpha(_torch.tensor([5.0, 0.09, 0.0, -0.05, -0.2, 0.18]), target_sparsity=0.5,
                                       granularity="layer", num_kv_heads=2, window=8, margin=0.1)
    assert [l for l, row in enumerate(layers.fa) if row[0]] == [0, 1, 5]
    assert layers.metadata["undecided_units"] == [[1, 0], [2, 0]]
