"""The GPU-machine kit in .ci/device: cutting a library's CUDA fat binaries to one
architecture (`fatbin.py`) and rewriting a wheel around it (`prepare.py`).

Synthetic fat binaries in CUDA's layout (the one cuobjdump reads), built here
byte by byte: the kept cubins come out byte-identical at the start of their fat
binary, everything else in the file is untouched, the file keeps its length.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import struct
import sys
import zipfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / ".ci" / "device"))
import fatbin  # noqa: E402
import prepare  # noqa: E402

ENTRY_HEADER = 64


def _entry(arch: int, payload: bytes, kind: int = 2) -> bytes:
    header = bytearray(ENTRY_HEADER)
    struct.pack_into("<HHIQ", header, 0, kind, 0x101, ENTRY_HEADER, len(payload))
    struct.pack_into("<I", header, 28, arch)
    return bytes(header) + payload


def _fat_binary(*entries: bytes) -> bytes:
    body = b"".join(entries)
    return struct.pack("<IHHQ", fatbin.MAGIC, 1, 16, len(body)) + body


def _library():
    a80, a90, a100 = _entry(80, b"\x80" * 40), _entry(90, b"\x90" * 24), _entry(100, b"\xa0" * 56)
    b90, b120 = _entry(90, b"\x91" * 16), _entry(120, b"\xc0" * 32)
    fake = struct.pack("<IHHQ", fatbin.MAGIC, 7, 16, 10**9)  # the magic by chance: not a fat binary
    parts = [b"\x7fELF" + b"\x11" * 60, _fat_binary(a80, a90, a100), b"\x22" * 13 + fake, _fat_binary(b90, b120), b"\x33" * 9]
    return bytearray(b"".join(parts)), parts, (a90, b90)


def test_strip_keeps_one_architecture_in_place():
    data, parts, kept = _library()
    original = bytes(data)
    assert fatbin.arch_sizes(data) == {(2, 80): 104, (2, 90): 88 + 80, (2, 100): 120, (2, 120): 96}
    freed = fatbin.strip_fatbins(data, {90})
    assert len(data) == len(original)
    assert freed == 104 + 120 + 96
    assert fatbin.arch_sizes(data) == {(2, 90): 168}
    (start1, size1, entries1), (start2, size2, entries2) = fatbin.fat_binaries(data)
    assert (size1, size2) == (len(kept[0]), len(kept[1]))
    assert bytes(data[start1 + 16 : start1 + 16 + size1]) == kept[0]
    assert bytes(data[start2 + 16 : start2 + 16 + size2]) == kept[1]
    # the rest of each fat binary is zeros, everything outside them as it was
    offsets, at = [], 0
    for part in parts:
        offsets.append(at)
        at += len(part)
    end1 = offsets[1] + len(parts[1])
    assert set(data[start1 + 16 + size1 : end1]) == {0}
    assert data[: offsets[1]] == original[: offsets[1]]
    assert data[end1 : offsets[3]] == original[end1 : offsets[3]]
    assert data[offsets[4] :] == original[offsets[4] :]


def test_strip_refuses_an_architecture_a_fat_binary_lacks():
    data, _, _ = _library()
    before = bytes(data)
    with pytest.raises(ValueError, match=r"no entry for sm \[80\]"):
        fatbin.strip_fatbins(data, {80})
    assert bytes(data) == before  # checked before any fat binary is cut


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def test_strip_wheel_rewrites_the_library_and_its_record(tmp_path):
    data, _, _ = _library()
    other = b"print('hello')\n"
    wheel = tmp_path / "transformer_engine_cu13-1.0-py3-none-manylinux_2_28_x86_64.whl"
    record_name = "transformer_engine_cu13-1.0.dist-info/RECORD"
    rows = [[prepare.CORE_LIBRARY, _record_hash(bytes(data)), str(len(data))],
            ["transformer_engine/__init__.py", _record_hash(other), str(len(other))], [record_name, "", ""]]
    record = io.StringIO()
    csv.writer(record, lineterminator="\n").writerows(rows)
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr(prepare.CORE_LIBRARY, bytes(data))
        z.writestr("transformer_engine/__init__.py", other)
        z.writestr(record_name, record.getvalue())

    prepare.strip_wheel(wheel, {90})

    with zipfile.ZipFile(wheel) as z:
        assert z.namelist() == [prepare.CORE_LIBRARY, "transformer_engine/__init__.py", record_name]
        library = z.read(prepare.CORE_LIBRARY)
        assert fatbin.arch_sizes(library) == {(2, 90): 168} and len(library) == len(data)
        assert z.read("transformer_engine/__init__.py") == other
        new_rows = list(csv.reader(io.StringIO(z.read(record_name).decode())))
    assert new_rows[0] == [prepare.CORE_LIBRARY, _record_hash(library), str(len(library))]
    assert new_rows[1:] == rows[1:]
    assert [p.name for p in tmp_path.iterdir()] == [wheel.name]  # no temp file left behind


def test_a_chance_magic_with_zeros_after_it_is_not_a_fat_binary():
    """A header-shaped match followed by zeros (entry size 0) or a truncated entry is skipped."""
    zeros = struct.pack("<IHHQ", fatbin.MAGIC, 1, 16, 64) + bytes(64)
    truncated = struct.pack("<IHHQ", fatbin.MAGIC, 1, 16, 40) + _entry(90, b"\x90" * 24)[:40]
    data = bytearray(zeros + truncated + _fat_binary(_entry(90, b"\x90" * 8)) + b"\x33" * 4)
    found = fatbin.fat_binaries(data)
    assert [(size, [e.arch for e in entries]) for _, size, entries in found] == [(ENTRY_HEADER + 8, [90])]


def _wheel(directory: Path, dist: str, files: dict[str, str]) -> Path:
    """A minimal pure-Python wheel (what `pip install --target` needs)."""
    info = f"{dist}-0.0.1.dist-info"
    content = {**files, f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.0.1\n",
               f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    content[f"{info}/RECORD"] = "".join(f"{name},,\n" for name in content) + f"{info}/RECORD,,\n"
    path = directory / f"{dist}-0.0.1-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for name, text in content.items():
            z.writestr(name, text)
    return path


def test_run_sh_keeps_a_broken_transformer_engine_away_from_the_torch_stages(tmp_path):
    """The kit's stage logic on this CPU machine, with stand-in wheels: TE installs apart and
    does not import (as with a missing extension); the te stage fails, bench-te is skipped with
    the reason, and the GPU tests (skipping: no GPU) and the torch-backend benchmark still run,
    writing their JSON. The exit status says a stage failed."""
    import json
    import os
    import subprocess

    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _wheel(wheels, "kit_probe_common", {"kit_probe_common/__init__.py": ""})
    _wheel(wheels, "transformer_engine", {
        "transformer_engine/__init__.py": "",
        "transformer_engine/pytorch/__init__.py": "raise FileNotFoundError('libtransformer_engine_torch.so')\n",
    })
    out = tmp_path / "out"
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHON": sys.executable, "WHEELS": str(wheels), "OUT": str(out),
           "SITE": str(tmp_path / "site"), "SITE_TE": str(tmp_path / "site_te"), "BUILD": str(tmp_path / "build"),
           "BENCH_ARGS": "--device cpu --seq-len 64 --window 16 --layers 1 --hidden 64 --heads 4 --kv-heads 2 "
                         "--head-dim 16 --reps 1 --skip-stock"}
    done = subprocess.run(["bash", str(root / ".ci" / "device" / "run.sh")], cwd=root, env=env, capture_output=True,
                          text=True, timeout=600)
    summary = (out / "summary.txt").read_text()
    assert done.returncode == 1, summary
    assert (tmp_path / "site" / "kit_probe_common").is_dir() and not (tmp_path / "site" / "transformer_engine").exists()
    assert (tmp_path / "site_te" / "transformer_engine").is_dir()
    assert "te: rc=1" in summary and "bench-te: skipped, Transformer Engine does not import" in summary, summary
    assert "tests: rc=0" in summary and "bench: rc=0" in summary, summary
    assert "FileNotFoundError" in (out / "te.log").read_text()
    names = [row["model"] for row in json.loads((out / "model_step_torch.json").read_text())["rows"]]
    assert "consa learning" in names


def test_run_sh_names_te_tests_that_exist():
    """run.sh's tests-te stage names the TE tests by node id (and the tests stage deselects them): a renamed test
    would otherwise run nowhere, found out only on a lent GPU."""
    import re
    import subprocess

    root = Path(__file__).resolve().parents[2]
    script = (root / ".ci" / "device" / "run.sh").read_text()
    module = re.search(r"^G=(\S+)$", script, re.M).group(1)
    block = re.search(r"^TE_TESTS=\((.*?)\)$", script, re.M | re.S).group(1)
    ids = [i.replace("$G", module) for i in re.findall(r'"([^"]+)"', block)]
    assert len(ids) >= 5
    done = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *ids],
                          cwd=root, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    collected = [line for line in done.stdout.splitlines() if line.startswith(module + "::")]
    for i in ids:
        assert any(c == i or c.startswith(i + "::") for c in collected), (i, collected)
