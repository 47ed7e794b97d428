"""What `pip install` of the package brings: every module of megatron_consa, the CPU kernel's
source, the license, and the tools (as megatron_consa_tools, with a console script each).

The wheel is built from a copy of the tracked files (the build writes next to its sources),
installed into a folder of its own, and used from there: a non-editable install works without
the clone.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _tracked(*paths: str) -> list[str]:
    out = subprocess.run(["git", "ls-files", *paths], cwd=ROOT, check=True, capture_output=True, text=True).stdout
    return out.split()


def _tools() -> list[str]:
    return sorted(Path(f).stem for f in _tracked("tools/*.py") if Path(f).stem != "__init__")


def test_wheel_holds_the_package_the_kernel_source_and_the_tools(tmp_path):
    src = tmp_path / "src"
    files = ["setup.py", "README.md", "LICENSE"] + _tracked("megatron_consa", "tools")
    for f in files:
        (src / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, src / f)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path / "dist"), str(src)], check=True, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("megatron_consa-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())

    modules = {f for f in _tracked("megatron_consa") if f.endswith(".py")}
    assert modules and modules <= names, sorted(modules - names)
    assert "megatron_consa/backends/csrc/swa_cpu.cpp" in names
    assert any(n.endswith("/LICENSE") and ".dist-info/" in n for n in names)
    tools = _tools()
    assert {f"megatron_consa_tools/{t}.py" for t in tools} <= names

    (entry_points,) = (n for n in names if n.endswith(".dist-info/entry_points.txt"))
    scripts = {
        line.split("=")[0].strip(): line.split("=")[1].strip()
        for line in zipfile.ZipFile(wheel).read(entry_points).decode().splitlines()
        if "=" in line
    }
    assert scripts == {f"consa-{t.replace('_', '-')}": f"megatron_consa_tools.{t}:cli" for t in tools}

    # installed where the clone is not: the tools import and answer from there
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target),
                    str(wheel)], check=True, capture_output=True)
    env = {**os.environ, "PYTHONPATH": str(target)}
    where = subprocess.run(
        [sys.executable, "-c", "import megatron_consa, megatron_consa_tools.kv_budget as t; "
         "print(megatron_consa.__file__); print(t.__file__)"],
        cwd=tmp_path, env=env, check=True, capture_output=True, text=True).stdout.split()
    assert all(Path(p).is_relative_to(target) for p in where), where
    help_text = subprocess.run([sys.executable, "-m", "megatron_consa_tools.kv_budget", "--help"], cwd=tmp_path,
                               env=env, check=True, capture_output=True, text=True).stdout
    assert "--context-length" in help_text


def test_console_scripts_report_user_errors():
    """`make install` puts a consa-<tool> script beside the interpreter; a user error is one
    `error:` line and exit status 2, as with `python tools/<tool>.py`."""
    bindir = Path(sys.executable).parent
    for tool in _tools():
        assert (bindir / f"consa-{tool.replace('_', '-')}").is_file(), f"consa-{tool}: run make install"
    proc = subprocess.run([str(bindir / "consa-finalize-allocation"), "--load", "/nonexistent/run", "--save",
                           "/nonexistent/out"], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error:") and "Traceback" not in proc.stderr, proc.stderr
