"""The CPU quickstart (make demo) end to end, with few iterations."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from megatron_consa.allocation import Allocation

ROOT = Path(__file__).resolve().parents[2]


def test_quickstart_writes_an_allocation_on_budget(tmp_path):
    out = tmp_path / "qs"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "cpu_quickstart.py"), "--pretrain-iters", "4", "--iters", "6",
         "--target", "0.5", "--allow-off-target", "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    alloc = Allocation.load(out / "allocation.json")
    assert alloc.achieved_sparsity == 0.5 and alloc.num_layers == 4 and alloc.num_kv_heads == 4
    assert alloc.log_alpha is not None
    assert "8/16 KV heads SWA" in proc.stdout
    assert list((out / "tensorboard").glob("events.out.tfevents.*")), "no TensorBoard events written"
    assert "s_hat" in proc.stderr and "target" in proc.stderr  # the log shows s_hat next to the target
    json.loads((out / "allocation.json").read_text())


def test_quickstart_rejects_a_bad_target(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "cpu_quickstart.py"), "--target", "1.2", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "target_sparsity" in proc.stderr
    assert not (tmp_path / "allocation.json").exists()


def test_quickstart_refuses_to_finalize_an_unsettled_run(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "cpu_quickstart.py"), "--pretrain-iters", "2", "--iters", "3",
         "--target", "0.5", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 1
    assert "did not settle" in proc.stderr and "s_hat" in proc.stderr
    assert not (tmp_path / "allocation.json").exists()
