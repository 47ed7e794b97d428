"""The CPU quickstart (`make quickstart`, the library-API example) end to end, at its shipped settings."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from megatron_consa.allocation import Allocation

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = str(ROOT / "examples" / "cpu_quickstart.py")


def test_quickstart_at_its_shipped_defaults_finalizes_on_budget(tmp_path):
    """Exactly what `make quickstart` runs (only the output directory differs): no relaxing flag."""
    out = tmp_path / "qs"
    proc = subprocess.run([sys.executable, QUICKSTART, "--out", str(out)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    alloc = Allocation.load(out / "allocation.json")
    assert alloc.achieved_sparsity == 0.75 and alloc.num_layers == 4 and alloc.num_kv_heads == 4
    assert alloc.log_alpha is not None and alloc.metadata["settle_max_gap"] <= 0.01
    assert "12/16 KV heads SWA" in proc.stdout
    assert list((out / "tensorboard").glob("events.out.tfevents.*")), "no TensorBoard events written"
    assert "s_hat" in proc.stderr and "target" in proc.stderr and "gate lr" in proc.stderr
    assert "settling: s_hat stayed within" in proc.stderr
    json.loads((out / "allocation.json").read_text())


def test_quickstart_rejects_a_bad_target(tmp_path):
    proc = subprocess.run([sys.executable, QUICKSTART, "--target", "1.2", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "target_sparsity" in proc.stderr
    assert not (tmp_path / "allocation.json").exists()


def test_quickstart_refuses_a_run_shorter_than_the_warmup(tmp_path):
    proc = subprocess.run([sys.executable, QUICKSTART, "--pretrain-iters", "2", "--iters", "3", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "target_warmup_iters" in proc.stderr and "train_iters=3" in proc.stderr
    assert not (tmp_path / "allocation.json").exists()
