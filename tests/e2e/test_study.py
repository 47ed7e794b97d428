"""The real-model study's quick mode (`examples/study_real.py --quick`) end to end, on SmolLM2-135M.

Exactly the command the README gives for the quick study, with the test cache's
SmolLM2 directory as --hf-dir (the same GGUF conversion the study would run):
import through the converter, gates-only learning through the training entry
point, finalize, the heuristic's calibration, evaluation of the learned
allocation against every rule, analysis, and the table.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_consa.allocation import Allocation

ROOT = Path(__file__).resolve().parents[2]
RULES = {"interleave:4", "top_swa", "bottom_swa", "uniform_heads", "random:1", "random:2", "heuristic"}


def test_study_real_quick_mode_runs_end_to_end_and_writes_the_table(smollm2_hf_dir, tmp_path):
    out = tmp_path / "study"
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "study_real.py"), "--quick", "--out", str(out),
                           "--hf-dir", str(smollm2_hf_dir)], capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    learned = Allocation.load(out / "finalized_kv_head_0500" / "allocation.json")
    assert (learned.num_layers, learned.num_kv_heads, learned.window) == (30, 3, 16)
    assert sum(map(sum, learned.fa)) == 45 and learned.achieved_sparsity == 0.5
    assert learned.metadata["settle_max_gap"] <= 0.01, learned.metadata  # the controller reached the target

    summary = json.loads((out / "study_real.json").read_text())
    refs = {r["allocation"]: r for r in summary["references"]}
    assert set(refs) == {"all_fa", "all_swa"}
    # windowing every head of a real LM costs perplexity beyond the window
    assert refs["all_fa"]["ppl_beyond_window"] < refs["all_swa"]["ppl_beyond_window"]
    run = summary["runs"]["kv_head_0500"]
    rows = {r["allocation"]: r for r in run["allocations"]}
    assert set(rows) == RULES | {"learned"}
    assert rows["learned"]["fa"] == learned.fa
    for name, row in rows.items():  # one budget: the same SWA share and KV bytes for every allocation
        assert row["sparsity"] == 0.5 and sum(map(sum, row["fa"])) == 45, name
        assert row["kv_bytes"] == rows["learned"]["kv_bytes"], name
        assert set(row["retrieval"]) == {"passkey@32", "kv@32"}, name
        assert refs["all_fa"]["ppl_beyond_window"] < row["ppl_beyond_window"], name  # windowing half the heads costs
    nll = rows["learned"]["nll_beyond_window"]
    assert run["verdict"]["rank"] == 1 + sum(r["nll_beyond_window"] < nll for n, r in rows.items() if n != "learned")
    paired = run["verdict"]["paired"]  # every allocation scored on the same sequences: differences per sequence
    assert set(paired) == RULES
    for name, d in paired.items():
        assert d["sequences"] == len(rows["learned"]["nll_per_sequence"]) == len(rows[name]["nll_per_sequence"])
        assert d["mean"] == pytest.approx(rows[name]["nll_beyond_window"] - nll, abs=1e-9), name
    assert run["verdict"]["beats_by_more_than_2_paired_se"] == [n for n, d in paired.items() if d["z"] > 2]
    assert run["allocation_phase"]["iterations"] == 160 and run["allocation_phase"]["tokens"] == 160 * 32
    comparisons = {c["kind"] for c in run["analysis"]["comparisons"]}
    assert comparisons == {"attention_mass"}  # quick mode has no ablation ranking
    assert (out / "heatmap_kv_head_0500.png").stat().st_size > 0

    table = (out / "study_real.md").read_text()
    assert table in proc.stdout
    assert "ΔNLL vs learned (paired z)" in table and "| **learned** | 0.500 |" in table and "### kv_head, target 0.5000" in table and "### learned maps" in table
    for rule in RULES:
        assert f"| {rule} | 0.500 |" in table


def test_study_real_refuses_an_hf_dir_without_a_model_before_any_work(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "study_real.py"), "--quick", "--out",
                           str(tmp_path / "s"), "--hf-dir", str(tmp_path / "nowhere")],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2
    assert "--hf-dir" in proc.stderr and "config.json" in proc.stderr
    assert not (tmp_path / "s").exists()
