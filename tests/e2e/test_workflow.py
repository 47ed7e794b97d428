"""`make workflow` as it ships: the demo's workflow from scratch (a sentencepiece tokenizer
trained on the corpus, a dense model pretrained at DP=2) through learn, finalize, fixed and
the recall table. Exactly the Makefile's command (only the output directory differs)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from megatron_consa.allocation import Allocation

ROOT = Path(__file__).resolve().parents[2]
MAKEFILE_WORKFLOW = re.compile(
    r"^workflow: install\n\t\$\(PY\) (examples/cpu_workflow\.py) --out runs/workflow --pretrain$", re.M)


def test_make_workflow_at_its_shipped_settings(tmp_path):
    script = MAKEFILE_WORKFLOW.search((ROOT / "Makefile").read_text())
    assert script, "the Makefile's workflow target no longer runs cpu_workflow.py --pretrain: update this test"
    out = tmp_path / "workflow"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    proc = subprocess.run([sys.executable, script.group(1), "--out", str(out), "--pretrain"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, (proc.stdout[-4000:], proc.stderr[-3000:])

    # the tokenizer it trained keeps the corpus's code as it is (newlines, indentation)
    from megatron_consa.data.tokenizer import SentencePieceTokenizer

    tokenizer = SentencePieceTokenizer(out / "data" / "corpus.model")
    code = next(json.loads(line)["text"] for line in (out / "corpus.jsonl").read_text().splitlines()
                if "\n    " in json.loads(line)["text"])
    assert tokenizer.decode(tokenizer.encode(code)) == code

    allocation = Allocation.load(out / "finalized" / "allocation.json")
    assert allocation.achieved_sparsity == 0.75 and allocation.metadata["settle_max_gap"] <= 0.01
    recall = {row["model"]: row["accuracy"] for row in json.loads((out / "recall.json").read_text())}
    all_fa, all_swa = recall["dense model, all FA"], recall["dense model, all SWA"]
    assert all_fa > 0.5 and all_swa < 0.2, recall  # the pretrained model needs attention beyond the window
    assert recall["ConSA hybrid after continued training"] >= all_fa - 0.05, recall
