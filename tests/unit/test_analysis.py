"""Allocation statistics (megatron_consa.analysis) and tools/analyze_allocation.py against values computed by hand."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from megatron_consa.allocation import Allocation, make_preset
from megatron_consa.analysis.stats import allocation_stats, fa_layer_blocks, overlap, ranking_allocation
from megatron_consa.cli import run_tool
from megatron_consa.unit_scores import UnitScores, UnitScoresError

ROOT = Path(__file__).resolve().parents[2]

# 6 layers x 2 KV heads. Thirds: floor(3 l / 6) -> layers 0-1 bottom, 2-3 middle, 4-5 top.
A = [[0, 0], [0, 0], [1, 1], [1, 0], [0, 0], [1, 1]]
B = [[1, 0], [0, 0], [1, 1], [0, 0], [0, 0], [1, 1]]


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _alloc(fa, **kw) -> Allocation:
    return Allocation(granularity="kv_head", num_layers=len(fa), num_kv_heads=len(fa[0]), window=16, sink_tokens=0,
                      target_sparsity=None, fa=fa, **kw).validate()


def test_statistics_equal_hand_computed_values():
    s = allocation_stats(A)
    assert s.fa_kv_heads == 5 and s.sparsity == pytest.approx(7 / 12)
    assert s.fa_fraction_by_layer == [0.0, 0.0, 1.0, 0.5, 0.0, 1.0]
    assert s.fa_fraction_by_third == [0.0, 3 / 4, 2 / 4]
    # FA heads at depths (l + 0.5) / 6: two in layer 2, one in layer 3, two in layer 5
    assert s.fa_depth_centroid == pytest.approx((2 * 2.5 + 3.5 + 2 * 5.5) / 6 / 5)
    assert s.fa_layer_blocks == [(2, 3), (5, 5)] and s.fa_block_lengths == [2, 1] and s.num_fa_blocks == 2
    strict = allocation_stats(A, block_threshold=1.0)  # layer 3 (half FA) no longer counts
    assert strict.fa_layer_blocks == [(2, 2), (5, 5)]


def test_thirds_centroid_and_blocks_at_the_edges():
    L = 28  # Qwen3-0.6B: the thirds hold 10, 9 and 9 layers
    bottom_only = [[1, 1] if l < 10 else [0, 0] for l in range(L)]
    s = allocation_stats(bottom_only)
    assert s.fa_fraction_by_third == [1.0, 0.0, 0.0]
    assert s.fa_depth_centroid == pytest.approx(sum((l + 0.5) / L for l in range(10)) / 10)
    assert s.fa_layer_blocks == [(0, 9)]
    assert allocation_stats([[1, 1]] * L).fa_depth_centroid == pytest.approx(0.5)  # all FA: the middle
    none = allocation_stats([[0, 0]] * 4)
    assert none.fa_depth_centroid is None and none.fa_layer_blocks == [] and none.fa_fraction_by_third == [0.0] * 3
    assert allocation_stats([[1]]).fa_fraction_by_third == [1.0, None, None]  # one layer: the other thirds are empty
    assert fa_layer_blocks([[1], [1], [0], [1]]) == [(0, 1), (3, 3)]  # a block that ends at the top closes too


def test_overlap_equals_hand_counts():
    o = overlap(A, B)
    assert (o.units, o.fa_a, o.fa_b, o.shared_fa) == (12, 5, 5, 4)
    assert o.jaccard == pytest.approx(4 / 6)  # union = 5 + 5 - 4
    assert o.agreement == pytest.approx(10 / 12)  # (0, 0) and (3, 0) differ
    assert o.chance_shared_fa == pytest.approx(5 * 5 / 12)
    assert overlap(A, A).jaccard == 1.0 and overlap([[0]], [[0]]).jaccard == 1.0
    with pytest.raises(ValueError, match="different shapes"):
        overlap(A, A[:4])


def _scores(values, *, kind="attention_mass", granularity="kv_head") -> UnitScores:
    return UnitScores(kind=kind, granularity=granularity, num_layers=len(values), num_kv_heads=len(values[0]),
                      window=16, sink_tokens=0, scores=values).validate()


def test_a_ranking_is_compared_at_the_allocations_budget():
    # scores whose top 5 units are exactly A's FA heads, then B's extra head (0, 0)
    values = [[0.5, 0.0], [0.1, 0.1], [0.9, 0.8], [0.7, 0.2], [0.0, 0.1], [0.95, 0.6]]
    top = ranking_allocation(_scores(values), _alloc(A))
    assert top.fa == A and top.num_fa_kv_heads == 5
    three = _alloc([[0, 0], [0, 0], [1, 1], [0, 0], [0, 0], [1, 0]])
    assert ranking_allocation(_scores(values), three).fa == [[0, 0], [0, 0], [1, 1], [0, 0], [0, 0], [1, 0]]
    # layer granularity: the heads of a layer are summed (the heuristic preset's rule): layers 5 and 2 lead
    layers = make_preset("top_swa", num_layers=6, num_kv_heads=2, granularity="layer", target_sparsity=2 / 3, window=16)
    assert ranking_allocation(_scores(values), layers).fa == [[0, 0]] * 2 + [[1, 1]] + [[0, 0]] * 2 + [[1, 1]]


def test_unit_scores_file_round_trip_and_errors(tmp_path):
    s = _scores([[0.25, 1.0], [0.5, 0.125]], kind="ablation")
    s.save(tmp_path / "s.json")
    assert UnitScores.load(tmp_path / "s.json").to_dict() == s.to_dict()
    bad = s.to_dict()
    bad["scores"] = [[0.25, float("inf")], [0.5, 0.125]]
    with pytest.raises(UnitScoresError, match="finite"):
        UnitScores.from_dict(bad)
    with pytest.raises(UnitScoresError, match="'kind'"):
        UnitScores.from_dict(dict(s.to_dict(), kind="vibes"))
    with pytest.raises(UnitScoresError, match="varies across KV heads"):
        UnitScores.from_dict(dict(s.to_dict(), granularity="layer"))
    with pytest.raises(UnitScoresError, match="num_kv_heads"):
        s.check_compatible(2, 4)
    for version in (True, 1.0, "1"):  # (True == 1 == 1.0 in Python: the type is checked too)
        with pytest.raises(UnitScoresError, match="'format_version'"):
            UnitScores.from_dict(dict(s.to_dict(), format_version=version))
    for metadata in ({"x": float("nan")}, {1: "an int key"}, {"t": (1, 2)}):  # what a JSON file cannot give back
        with pytest.raises(UnitScoresError, match="field 'metadata'"):
            UnitScores.from_dict(dict(s.to_dict(), metadata=metadata))


def test_cli_writes_heatmap_statistics_and_overlaps(tmp_path, capsys):
    a = _alloc(A, log_alpha=[[-1.0, -2.0], [-0.5, -3.0], [2.0, 1.5], [0.5, -0.2], [-1.0, -1.0], [3.0, 2.5]])
    a.save(tmp_path / "a.json")
    _alloc(B).save(tmp_path / "b.json")
    _scores([[0.5, 0.0], [0.1, 0.1], [0.9, 0.8], [0.7, 0.2], [0.0, 0.1], [0.95, 0.6]]).save(tmp_path / "scores.json")
    tool = _tool("analyze_allocation")
    argv = ["--allocation", str(tmp_path / "a.json"), "--compare", str(tmp_path / "b.json"),
            "--compare", str(tmp_path / "scores.json"), "--heatmap", str(tmp_path / "out" / "heatmap.png"),
            "--output", str(tmp_path / "analysis.json")]
    assert run_tool(tool.main, argv) == 0
    out = capsys.readouterr().out
    assert "| 0.00 / 0.75 / 0.50 |" in out and "4 of 5 / 5" in out
    png = (tmp_path / "out" / "heatmap.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    report = json.loads((tmp_path / "analysis.json").read_text())
    assert report["stats"]["fa_fraction_by_third"] == [0.0, 0.75, 0.5]
    assert report["stats"]["fa_layer_blocks"] == [[2, 3], [5, 5]]
    assert report["stats"]["fa_depth_centroid"] == pytest.approx(19.5 / 30)
    vs_b, vs_scores = report["comparisons"]
    assert vs_b["kind"] == "allocation" and vs_b["overlap"]["shared_fa"] == 4
    assert vs_b["overlap"]["jaccard"] == pytest.approx(4 / 6)
    assert vs_scores["kind"] == "attention_mass" and vs_scores["overlap"]["shared_fa"] == 5
    assert vs_scores["fa"] == A


def test_cli_bad_input_names_the_flag(tmp_path, capsys):
    tool = _tool("analyze_allocation")
    assert run_tool(tool.main, ["--allocation", str(tmp_path / "none.json")]) == 2
    assert "none.json" in capsys.readouterr().err
    _alloc(A).save(tmp_path / "a.json")
    _alloc([[1, 1]] * 3).save(tmp_path / "short.json")
    assert run_tool(tool.main, ["--allocation", str(tmp_path / "a.json"), "--compare", str(tmp_path / "short.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --compare {tmp_path / 'short.json'}: ") and "num_layers" in err
    assert f"--allocation {tmp_path / 'a.json'}" in err
    assert run_tool(tool.main, ["--allocation", str(tmp_path)]) == 2  # a directory, not the file
    assert capsys.readouterr().err.startswith(f"error: --allocation {tmp_path}: a directory")
    assert run_tool(tool.main, ["--allocation", str(tmp_path / "a.json"), "--block-threshold", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --block-threshold") and len(err.strip().splitlines()) == 1
    assert not list(tmp_path.glob("*.png"))


def test_cli_output_paths_are_checked_before_any_work(tmp_path, capsys):
    """--heatmap / --output naming a directory (or a path under a file, or each other) are refused
    up front, exit 2 naming the flag, with nothing written: no stray temporary file either."""
    tool = _tool("analyze_allocation")
    _alloc(A).save(tmp_path / "a.json")
    taken = tmp_path / "taken"
    taken.mkdir()
    before = sorted(p.name for p in tmp_path.rglob("*"))
    cases = [
        (["--heatmap", str(taken)], f"--heatmap {taken}: is a directory"),
        (["--output", str(taken)], f"--output {taken}: is a directory"),
        (["--output", str(tmp_path / "a.json" / "x.json")], "a.json is a file, not a directory"),
        (["--heatmap", str(tmp_path / "same"), "--output", str(tmp_path / "same")], "--heatmap and --output both name"),
        # an output over an input: the report (or a PNG) would replace the allocation it analyses
        (["--output", str(tmp_path / "a.json")], f"--output {tmp_path / 'a.json'} is --allocation {tmp_path / 'a.json'}: "
                                                  "writing it would replace that input"),
        (["--compare", str(tmp_path / "a.json"), "--heatmap", str(tmp_path / "a.json")], "--heatmap"),
    ]
    for extra, message in cases:
        assert run_tool(tool.main, ["--allocation", str(tmp_path / "a.json")] + extra) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_heatmap_draws_layer_zero_at_the_bottom_and_names_the_colours():
    """The text says "bottom layers" for layer 0 and up: so does the picture; a 0/1 map has a legend."""
    import matplotlib.pyplot as plt
    import numpy as np

    from megatron_consa.analysis.heatmap import allocation_figure

    for log_alpha in (None, [[float(v) - 0.5 for v in row] for row in A]):
        fig = allocation_figure(A, log_alpha)
        ax = fig.axes[0]
        image = ax.get_images()[0]
        assert image.origin == "lower" and not ax.yaxis_inverted()
        np.testing.assert_array_equal(np.asarray(image.get_array()), np.asarray(log_alpha if log_alpha else A))
        if log_alpha is None:
            assert [t.get_text() for t in ax.get_legend().get_texts()] == ["FA", "SWA"]
            assert "FA black" in ax.get_title()
        else:
            assert "FA outlined" in ax.get_title()
        plt.close(fig)


def test_save_heatmap_leaves_nothing_behind_when_it_fails(tmp_path):
    from megatron_consa.analysis.heatmap import save_heatmap

    (tmp_path / "taken.png").mkdir()
    with pytest.raises(OSError):
        save_heatmap(tmp_path / "taken.png", A)
    assert [p.name for p in tmp_path.iterdir()] == ["taken.png"] and not any((tmp_path / "taken.png").iterdir())
    save_heatmap(tmp_path / "ok.png", A)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok.png", "taken.png"]
    assert (tmp_path / "ok.png").stat().st_mode & 0o777 == 0o666 & ~_umask()


def _umask() -> int:
    import os

    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_finalize_cli_checks_save_before_reading_the_checkpoint(tmp_path, capsys):
    """--save is checked before --load is read and ranked (here --load does not even exist)."""
    tool = _tool("finalize_allocation")
    a_file = tmp_path / "file"
    a_file.write_text("x")
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep").write_text("x")
    cases = [
        ([str(a_file)], f"--save {a_file}: a file, not a directory"),
        ([str(a_file), "--overwrite"], f"--save {a_file}: a file, not a directory"),
        ([str(occupied)], f"--save {occupied}: exists and is not empty; choose another directory or pass --overwrite"),
        ([str(a_file / "sub")], f"--save {a_file / 'sub'}: {a_file} is a file, not a directory"),
    ]
    for save, message in cases:
        assert run_tool(tool.main, ["--load", str(tmp_path / "no-checkpoint"), "--save", *save]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {message}") and len(err.strip().splitlines()) == 1, err
    assert (occupied / "keep").read_text() == "x" and a_file.read_text() == "x"
    assert run_tool(tool.main, ["--load", str(tmp_path / "no-checkpoint"), "--save", str(occupied), "--overwrite"]) == 2
    assert "--load" in capsys.readouterr().err  # --overwrite: on to the checkpoint, which is missing
    # a NaN tolerance would accept a run that never settled, a negative one refuse every run; NaN margin: no report
    for flag, value in (("--tolerance", "nan"), ("--tolerance", "-0.01"), ("--margin", "nan"), ("--margin", "-1")):
        assert run_tool(tool.main, ["--load", str(tmp_path / "no-checkpoint"), "--save", str(tmp_path / "new"),
                                    flag, value]) == 2
        assert f"error: {flag} {float(value)}: must be a number >= 0" in capsys.readouterr().err, (flag, value)
    assert not (tmp_path / "new").exists()
