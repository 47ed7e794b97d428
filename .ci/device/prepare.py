"""Stage what the lent GPU machine needs for the Transformer Engine checks (run here, not there).

The GPU machine (../shared/GPU.md) has CUDA torch, nvcc, ninja, transformers and
pytest, but no megatron-core, no Transformer Engine and no network; a command
may carry at most 64 MiB of files. This script downloads, on a machine with the
package registries:

* transformer-engine-cu13 (the core library) with every fat binary of
  libtransformer_engine.so cut to the kept GPU architecture (`fatbin.py`):
  276 MB -> about 30 MB, the wheel otherwise unchanged (its RECORD updated);
* transformer-engine (the Python package and metadata), and the source of
  transformer-engine-torch (a C++ extension: built there by `run.sh`, or here with
  --build-python, a Python 3.12 with the GPU machine's CUDA torch: the CUDA
  toolkit headers are needed, no GPU);
* megatron-core, and what `import transformer_engine.pytorch` and the build need
  that CUDA torch and transformers do not bring: pydantic, einops, onnxscript and
  onnx (imported by TE's export module), wheel, and nvidia-ml-py (`--log-straggler`), with their dependencies but
  numpy, sympy and mpmath (there already);

into one folder for `run`'s `carry`, and fails if it is over the budget:

    python .ci/device/prepare.py            # -> .ci/device/wheels (git-ignored)
    python .ci/device/prepare.py --build-python /tmp/v312/bin/python   # + TE's torch extension, built here
    # then, with the device tool: run(command="bash .ci/device/run.sh", carry=[".ci/device/wheels"])
"""

from __future__ import annotations

import argparse
import base64
import csv
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import urllib.request
import zipfile
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fatbin import arch_sizes, strip_fatbins  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
CORE_LIBRARY = "transformer_engine/wheel_lib/libtransformer_engine.so"
STAGED_SUFFIXES = (".whl", ".tar.gz", ".torch-version")
CARRY_LIMIT_MIB = 64.0  # what one device command carries: the working tree and `carry` together
MARGIN_MIB = 0.25  # for what the tree gains between staging and the run (a commit, a log)


def makefile_value(name: str) -> str:
    match = re.search(rf"^{name}\s*:=\s*(\S+)", (ROOT / "Makefile").read_text(), re.M)
    if not match:
        raise SystemExit(f"error: {name} not found in the Makefile")
    return match.group(1)


def pip_download(dest: Path, requirements: list[str], *, python: str, deps: bool) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--dest", str(dest), "--only-binary", ":all:",
           "--python-version", python, "--implementation", "cp", "--platform", "manylinux_2_28_x86_64",
           "--platform", "manylinux_2_17_x86_64", "--platform", "manylinux2014_x86_64", "--platform", "any"]
    if not deps:
        cmd.append("--no-deps")
    subprocess.run(cmd + requirements, check=True)


def download_sdist(dest: Path, project: str, version: str) -> Path:
    """The sdist of project==version from PyPI's JSON simple index, its sha256 checked.

    (`pip download` would build its metadata, which needs CUDA torch.)"""
    request = urllib.request.Request(f"https://pypi.org/simple/{project}/",
                                     headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        files = json.load(response)["files"]
    name = f"{project.replace('-', '_')}-{version}.tar.gz"
    match = [f for f in files if f["filename"] == name]
    if not match:
        raise SystemExit(f"error: {name} is not on PyPI's index of {project}")
    with urllib.request.urlopen(match[0]["url"], timeout=300) as response:
        data = response.read()
    if hashlib.sha256(data).hexdigest() != match[0]["hashes"]["sha256"]:
        raise SystemExit(f"error: {name}: sha256 differs from the index's")
    path = dest / name
    path.write_bytes(data)
    return path


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def strip_wheel(wheel: Path, keep_archs: set[int]) -> tuple[int, int]:
    """Rewrite `wheel` (in place, via a temp file) with its core library's fat binaries cut
    to `keep_archs`; returns (bytes before, after)."""
    before = wheel.stat().st_size
    with zipfile.ZipFile(wheel) as src:
        record_name = next(n for n in src.namelist() if n.endswith(".dist-info/RECORD"))
        library = bytearray(src.read(CORE_LIBRARY))
        print(f"{CORE_LIBRARY}: {len(library) / 1e6:.1f} MB; fat binaries by (kind, sm): "
              + ", ".join(f"{k}: {v / 1e6:.1f} MB" for k, v in sorted(arch_sizes(library).items())))
        freed = strip_fatbins(library, keep_archs)
        print(f"  kept sm {sorted(keep_archs)}: {freed / 1e6:.1f} MB of other architectures zeroed")
        rows = list(csv.reader(io.StringIO(src.read(record_name).decode())))
        for row in rows:
            if row and row[0] == CORE_LIBRARY:
                row[1], row[2] = _record_hash(bytes(library)), str(len(library))
        record = io.StringIO()
        csv.writer(record, lineterminator="\n").writerows(rows)
        fd, tmp = tempfile.mkstemp(dir=wheel.parent, suffix=".whl.tmp")
        os.close(fd)
        try:
            with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=6) as dst:
                for info in src.infolist():
                    if info.filename == CORE_LIBRARY:
                        data = bytes(library)
                    elif info.filename == record_name:
                        data = record.getvalue().encode()
                    else:
                        data = src.read(info)
                    dst.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED)
            os.chmod(tmp, 0o644)
            os.replace(tmp, wheel)
        except BaseException:
            os.unlink(tmp)
            raise
    return before, wheel.stat().st_size


def tree_bytes() -> int:
    """Bytes of the files a device command sends besides `carry`: tracked and untracked, not ignored."""
    names = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                           capture_output=True).stdout.split(b"\0")
    return sum((ROOT / n.decode()).stat().st_size for n in names if n and (ROOT / n.decode()).is_file())


def _built_for(out: Path, python: Optional[str]) -> list[Path]:
    """The staged extension wheel and its torch-version file, to keep: built for `python`'s
    torch, or, without `python`, whatever was built (run.sh checks the version there)."""
    version_file = out / "transformer_engine_torch.torch-version"
    wheels = list(out.glob("transformer_engine_torch-*.whl"))
    if not wheels or not version_file.is_file():
        return []
    if not python:
        return [wheels[0], version_file]
    torch_version = subprocess.run([python, "-c", "import torch; print(torch.__version__)"], check=True,
                                   capture_output=True, text=True).stdout.strip()
    return [wheels[0], version_file] if version_file.read_text().strip() == torch_version else []


def build_extension(out: Path, python: str) -> None:
    """transformer-engine-torch built by `run.sh`'s install and build stages with `python`,
    staged in `out` with the torch version it was built against."""
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, PYTHON=python, WHEELS=str(out.resolve()), OUT=f"{tmp}/out", SITE=f"{tmp}/site",
                   SITE_TE=f"{tmp}/site_te", BUILD=f"{tmp}/build", STAGES="install build", DEADLINE="100000", LIMIT_SCALE="20")
        done = subprocess.run(["bash", str(ROOT / ".ci/device/run.sh")], env=env)
        wheels = list(Path(tmp, "build").glob("transformer_engine_torch-*.whl"))
        if done.returncode or not wheels:
            raise SystemExit(f"error: building transformer-engine-torch with {python} failed (rc {done.returncode})")
        os.replace(wheels[0], out / wheels[0].name)
        os.replace(Path(tmp, "build", "transformer_engine_torch.torch-version"), out / "transformer_engine_torch.torch-version")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ROOT / ".ci/device/wheels"),
                   help="folder to fill (its wheels and sdists are replaced; an extension wheel built "
                        "before is kept)")
    p.add_argument("--te-version", default="2.20.2")
    p.add_argument("--cuda-major", default="13", help="the GPU machine's torch CUDA major (GPU.md: 13)")
    p.add_argument("--arch", default="90", help="comma-separated sm archs to keep (H100/H200: 90)")
    p.add_argument("--python", default="3.12", help="the GPU machine's Python")
    p.add_argument("--build-python", default=None,
                   help="a Python with the GPU machine's CUDA torch (same version): build TE's torch extension "
                        "here with run.sh's build stage and stage the wheel, so run.sh needs no build there "
                        "(it builds anyway when its torch differs)")
    p.add_argument("--budget-mib", type=float, default=None,
                   help="fail above this (default: the 64 MiB a command carries, less the files git "
                        "sends with the working tree, less 0.25 MiB)")
    args = p.parse_args(argv)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    built = _built_for(out, args.build_python)
    for old in out.iterdir():
        if old not in built and old.is_file() and old.name.endswith(STAGED_SUFFIXES):
            old.unlink()
    te = args.te_version
    core = f"transformer-engine-cu{args.cuda_major}=={te}"
    pip_download(out, [core, f"transformer-engine=={te}", f"megatron-core=={makefile_value('MCORE_VERSION')}"],
                 python=args.python, deps=False)
    # (nvidia-ml-py: the straggler report reads the GPU through NVML, --log-straggler)
    pip_download(out, ["pydantic", "einops", "onnxscript", "wheel", "nvidia-ml-py"], python=args.python, deps=True)
    for there in ("numpy-", "sympy-", "mpmath-"):  # CUDA torch brings sympy and mpmath, transformers numpy
        for f in out.glob(f"{there}*.whl"):
            f.unlink()
    download_sdist(out, "transformer-engine-torch", te)
    core_wheel = next(out.glob(f"transformer_engine_cu{args.cuda_major}-{te}-*.whl"))
    before, after = strip_wheel(core_wheel, {int(a) for a in args.arch.split(",")})
    print(f"{core_wheel.name}: {before / 2**20:.1f} MiB -> {after / 2**20:.1f} MiB")
    if args.build_python and not built:
        build_extension(out, args.build_python)
    elif built:
        print(f"keeping {built[0].name}, built for torch {built[1].read_text().strip()}")
    total = 0
    for f in sorted(out.iterdir()):
        total += f.stat().st_size
        print(f"  {f.stat().st_size / 2**20:7.2f} MiB  {f.name}")
    budget = args.budget_mib if args.budget_mib is not None else CARRY_LIMIT_MIB - MARGIN_MIB - tree_bytes() / 2**20
    print(f"total {total / 2**20:.1f} MiB in {out}; budget {budget:.1f} MiB")
    if total > budget * 2**20:
        print(f"error: over the budget of {budget:.1f} MiB", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
