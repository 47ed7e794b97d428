"""The tests' reader of wandb's offline run files (tests/wandb_records.py) on a run longer than
one 32 KiB block, with records split over blocks: every value logged comes back."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from wandb_records import config, history, run_file  # noqa: E402


def test_a_run_over_many_blocks_reads_back_whole(tmp_path, monkeypatch):
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = wandb.init(project="reader", dir=str(tmp_path), config={"long": "x" * 40000, "n": 3}, reinit="create_new")
    for step in range(400):
        run.log({"a": step * 0.5, "b/c": -step, "text": "y" * (step % 97)}, step=step)
    run.finish()
    wandb.teardown()  # (finish returns before wandb's service has written everything)
    path = run_file(tmp_path)
    assert path.stat().st_size > 4 * 32768
    logged = history(path)
    assert logged["a"] == {step: step * 0.5 for step in range(400)}
    assert logged["b/c"] == {step: -step for step in range(400)}
    assert config(path)["long"] == "x" * 40000 and config(path)["n"] == 3  # (one record over two blocks)
