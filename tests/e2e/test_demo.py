"""`make demo` as it ships: preprocess -> learn (TP2) -> finalize -> fixed (PP2) through torchrun, 2 ranks.

Exactly the command the Makefile runs (only the output directory differs), with
no relaxing flag, so the test fails where a user's `make demo` would.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from megatron_consa.allocation import Allocation
from megatron_consa.conversion.checkpoint_model import read_checkpoint_info
from megatron_consa.training.checkpoint import read_checkpoint_meta, resolve_load_dir

ROOT = Path(__file__).resolve().parents[2]
MAKEFILE_DEMO = re.compile(r"^demo: install\n\t\$\(PY\) (examples/cpu_workflow\.py) --out runs/demo$", re.M)


def _losses(log: str, phase_title: str) -> list[float]:
    section = log.split(phase_title, 1)[1].split("\n=== ", 1)[0]
    return [float(m) for m in re.findall(r"iter +\d+/\d+ \| loss ([0-9.]+)", section)]


def test_make_demo_at_its_shipped_settings(tmp_path):
    script = MAKEFILE_DEMO.search((ROOT / "Makefile").read_text())
    assert script, "the Makefile's demo target no longer runs examples/cpu_workflow.py --out runs/demo: update this test"
    out = tmp_path / "demo"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    proc = subprocess.run([sys.executable, script.group(1), "--out", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1500)
    log = proc.stdout
    assert proc.returncode == 0, (log[-4000:], proc.stderr[-3000:])

    # The allocation meets the budget exactly, from a settled learning run; the heatmap is there.
    alloc = Allocation.load(out / "finalized" / "allocation.json")
    assert alloc.achieved_sparsity == 0.75 and alloc.num_fa_kv_heads == 4  # 4 of 16 KV heads keep FA
    assert alloc.metadata["settle_max_gap"] <= 0.01
    assert (out / "finalized" / "allocation_heatmap.png").stat().st_size > 1000
    fixed = read_checkpoint_meta(resolve_load_dir(out / "fixed"))
    assert fixed["consa"]["allocation"] == alloc.fa and fixed["parallel"]["pipeline_model_parallel_size"] == 2
    assert read_checkpoint_meta(resolve_load_dir(out / "learn"))["parallel"]["tensor_model_parallel_size"] == 2
    # what export, generation and evaluation read from each checkpoint without --allocation
    for phase in ("finalized/checkpoint", "finalized", "fixed"):  # finalize's output directory too
        assert read_checkpoint_info(out / phase).allocation.fa == alloc.fa, phase
    assert read_checkpoint_info(out / "learn").allocation is None

    # Each phase learned; the printed summary points at the outputs.
    learn = _losses(log, "=== learn the allocation")
    assert len(learn) >= 8 and min(learn[-3:]) < learn[0]
    assert "allocation phase: s_hat stayed within" in log
    for field in ("gate lr", "tok/s", "ETA", "lambda1", "FA/layer", "validation | iter 100"):
        assert field in log, field
    assert list((out / "tensorboard" / "learn").glob("events.out.tfevents.*")), "no TensorBoard events"
    start = ROOT / "examples" / "checkpoints" / "demo_dense"
    for name in ("tokenizer.model", "config.json"):  # each phase's checkpoint describes itself
        assert (out / "finalized" / "checkpoint" / name).read_bytes() == (start / name).read_bytes(), name
    for line in ("allocation:  ", "heatmap:     ", "12/16 KV heads SWA", "| ConSA hybrid after continued training |"):
        assert line in log

    # The point of the demo: the hybrid keeps the long-range recall that windowing every head loses.
    recall = {row["model"]: row["accuracy"] for row in json.loads((out / "recall.json").read_text())}
    all_fa, all_swa = recall["dense model, all FA"], recall["dense model, all SWA"]
    hybrid = recall["ConSA hybrid after continued training"]
    assert all_fa > 0.5 and all_swa < 0.2, recall  # the task needs attention beyond the window
    assert hybrid >= all_fa - 0.05, recall


def test_the_workflow_never_deletes_an_output_it_did_not_write(tmp_path):
    """`--out` is replaced only when it is a run of this workflow (its marker, or its corpus)."""
    import importlib.util

    import pytest

    spec = importlib.util.spec_from_file_location("cpu_workflow", ROOT / "examples" / "cpu_workflow.py")
    workflow = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(workflow)
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit, match="not a run of this workflow"):
        workflow.main(["--out", str(precious)])
    assert (precious / "notes.txt").read_text() == "mine"
    with pytest.raises(SystemExit):  # argparse: the layouts need an even number of ranks
        workflow.main(["--out", str(tmp_path / "new"), "--nproc", "3"])
    assert not (tmp_path / "new").exists()
