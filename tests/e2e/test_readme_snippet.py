"""The README's Python API snippet, run exactly as written, in a fresh interpreter.

A fresh process because a new user's process has applied no CPU shims and set up
no torch.distributed world; inside pytest other tests may already have done both.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def readme_api_snippet() -> str:
    """The first ```python block under the README heading "How it fits megatron-core"."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## How it fits megatron-core") :]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "README: no python block under 'How it fits megatron-core'"
    return match.group(1)


def test_readme_snippet_runs_as_written_on_a_fresh_process(tmp_path):
    code = readme_api_snippet()
    assert "apply_cpu_shims" not in code  # the point: a user need not call it
    script = tmp_path / "snippet.py"
    script.write_text(code + "\nprint('SNIPPET-OK', type(model).__name__, tuple(logits.shape))\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "SNIPPET-OK GPTModel (1, 16, 1024)" in proc.stdout
