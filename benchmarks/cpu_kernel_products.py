"""The banded CPU SWA kernel two ways, side by side in one run: its products (oneDNN brgemm vs
MKL), or this checkout's kernel against another version of its source (--baseline).

Where the kernel is built for AVX-512, its fp32 forward and backward run their
products on oneDNN brgemm ukernels (torch's ``cpublas::brgemm``) on a K^T / V^T
each thread transposes as its tiles reach the keys; the extension's
``allow_pack=False`` / ``allow_brgemm=False`` run the same kernel on MKL's sgemm
instead (the AVX2 build's only path). This times both on the same inputs, the
two interleaved in every repetition, forward and backward apart (the backward
from the forward's output and log-sum-exp), and checks that they agree.

    python benchmarks/cpu_kernel_products.py                      # the default shapes below
    python benchmarks/cpu_kernel_products.py --shapes 4096:256:1 --reps 15 --json out.json

With ``--baseline REV`` (a git revision of this repository, or a path to a
``swa_cpu.cpp``) it compiles that source as a module of its own, with the flags
of this build, and times it against this checkout's kernel instead, both on
their default products and the tiles the library picks (``cpu_q_tile``, ``cpu_kv_tile``):

    python benchmarks/cpu_kernel_products.py --baseline 7e22247 --dtype bf16

A shape is n:W:ratio (query heads per KV head; --heads query heads, head dim
--head-dim). Times are the minimum over --reps of each call, rounded up to even: two
interleaved rounds of half each (every call warm).
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see benchmarks/attention_cpu.py

import torch  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from megatron_consa.backends import cpu_extension  # noqa: E402
from megatron_consa.backends.torch_attention import (  # noqa: E402
    CPU_KV_TILE,
    cpu_kv_tile,
    cpu_q_tile,
    default_cpu_q_tile,
)
from megatron_consa.files import write_json_atomic  # noqa: E402

DEFAULT_SHAPES = "1024:64:1,1024:128:1,1024:128:4,4096:256:1,4096:256:8,16384:32:1,16384:2048:1"
REPO = Path(__file__).resolve().parents[1]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# largest difference of the two, relative to each result's largest value, that passes
TOLERANCE = {"fp32": 1e-4, "bf16": 3e-2}


def _shape(text: str):
    n, w, ratio = (int(t) for t in text.split(":"))
    return n, w, ratio


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", type=lambda t: [_shape(s) for s in t.split(",")], default=DEFAULT_SHAPES,
                   help=f"n:W:ratio, comma-separated (default {DEFAULT_SHAPES})")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--reps", type=int, default=9)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--baseline", type=str, default=None,
                   help="time this checkout's kernel against the swa_cpu.cpp of this git revision (or at this path)")
    p.add_argument("--no-check", action="store_true",
                   help="time only: do not stop where the two columns' results differ (a --baseline source "
                        "changed for a timing experiment, such as one with a pass removed)")
    p.add_argument("--json", type=str, default=None, help="also write the rows as JSON here")
    return p.parse_args(argv)


def _best_ms(fn, reps):
    fn()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return 1e3 * best


def baseline_source(spec: str) -> Path:
    """The kernel source a --baseline names: a file, or the kernel at a git revision of this repository."""
    if os.path.isfile(spec):
        return Path(spec)
    relative = cpu_extension.SOURCE.resolve().relative_to(REPO).as_posix()
    shown = subprocess.run(["git", "-C", str(REPO), "show", f"{spec}:{relative}"], capture_output=True, text=True)
    if shown.returncode != 0:
        raise SystemExit(f"cpu_kernel_products: --baseline {spec!r} is neither a file nor a git revision holding "
                         f"{relative}: {shown.stderr.strip()}")
    path = Path(tempfile.mkdtemp(prefix="consa_kernel_baseline_")) / "swa_cpu.cpp"
    path.write_text(shown.stdout)
    return path


def _variants(args, ext):
    """The two columns: name -> (extension, run its fast products), and the tile rule: the
    forward's and the backward's query tile of a shape."""
    if args.baseline is None:
        if not ext.brgemm_fp32():
            raise SystemExit(
                f"cpu_kernel_products: the kernel is built for {cpu_extension.capability()}, where fp32 runs on MKL "
                "only; there is nothing to compare (brgemm is the AVX-512 build's)"
            )
        return {"brgemm": (ext, True), "mkl": (ext, False)}, lambda W, ratio, d: (default_cpu_q_tile(W, ratio),) * 2
    source = baseline_source(args.baseline)
    digest = hashlib.sha1(source.read_bytes()).hexdigest()[:12]
    base = cpu_extension.build(f"{cpu_extension.module_name()}_baseline_{digest}", source)
    dtype = DTYPES[args.dtype]
    return {"this": (ext, True), "baseline": (base, True)}, \
        lambda W, ratio, d: (cpu_q_tile(W, ratio, dtype, d), cpu_q_tile(W, ratio, dtype, d, backward=True))


def main(argv=None):
    args = parse_args(argv)
    ext = cpu_extension.extension()
    if ext is None:
        raise SystemExit("cpu_kernel_products: the banded CPU kernel did not build here (see CONSA_CPU_SWA_KERNEL)")
    variants, tile_of = _variants(args, ext)
    (a, (ext_a, fast_a)), (b, (ext_b, fast_b)) = variants.items()
    torch.set_num_threads(args.threads)
    d, hq, dtype = args.head_dim, args.heads, DTYPES[args.dtype]
    print(f"banded kernel, {args.dtype}, {a} vs {b}, b=1 hq={hq} d={d} threads={args.threads} min of {2 * math.ceil(args.reps / 2)}; "
          f"torch={torch.__version__} cpu={platform.processor() or platform.machine()}")
    print()
    print(f"| n | W | hq/hkv | tile fwd / bwd | fwd {a} (ms) | fwd {b} (ms) | fwd {a} / {b} "
          f"| bwd {a} (ms) | bwd {b} (ms) | bwd {a} / {b} | max rel diff |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    rows = []
    for n, W, ratio in args.shapes:
        if hq % ratio:
            raise SystemExit(f"cpu_kernel_products: --shapes ratio {ratio} does not divide --heads {hq}")
        g = torch.Generator().manual_seed(0)
        q, go = (torch.randn(1, hq, n, d, generator=g).to(dtype) for _ in range(2))
        k, v = (torch.randn(1, hq // ratio, n, d, generator=g).to(dtype) for _ in range(2))
        (tile, bwd_tile), scale = tile_of(W, ratio, d), d ** -0.5
        # the key tile the library uses (the same for both columns, as the query tile)
        kv_tile = (CPU_KV_TILE,) * 2 if args.baseline is None else (cpu_kv_tile(dtype, d), cpu_kv_tile(dtype, d, True))
        fixed, fixed_bwd = (W, 0, scale, tile, kv_tile[0]), (W, 0, scale, bwd_tile, kv_tile[1])
        out, lse = ext_a.forward(q, k, v, *fixed, allow_pack=fast_a)
        ref_out, ref_lse = ext_b.forward(q, k, v, *fixed, allow_pack=fast_b)
        grads = ext_a.backward(go, q, k, v, out, lse, *fixed_bwd, allow_brgemm=fast_a)
        ref_grads = ext_b.backward(go, q, k, v, out, lse, *fixed_bwd, allow_brgemm=fast_b)
        # largest difference relative to the tensor's largest value (gradients grow with n)
        diff = max((x.float() - y.float()).abs().max().item() / max(1.0, y.float().abs().max().item())
                   for x, y in zip((out, *grads), (ref_out, *ref_grads)))
        times = {f"{pass_}_{name}": [] for pass_ in ("fwd", "bwd") for name in (a, b)}
        reps = math.ceil(args.reps / 2)  # per round, two rounds: at least --reps timed calls per variant
        for _ in range(2):  # interleaved: load that comes and goes hits both alike
            for name, (e, fast) in variants.items():
                times[f"fwd_{name}"].append(_best_ms(lambda: e.forward(q, k, v, *fixed, allow_pack=fast), reps))
                times[f"bwd_{name}"].append(_best_ms(
                    lambda: e.backward(go, q, k, v, out, lse, *fixed_bwd, allow_brgemm=fast), reps))
        best = {key: min(ts) for key, ts in times.items()}
        row = {"seq_len": n, "window": W, "heads": hq, "kv_heads": hq // ratio, "tile": tile, "bwd_tile": bwd_tile,
               "max_rel_diff": diff if math.isfinite(diff) else None,  # JSON has no NaN (--no-check)
               **{f"{key}_ms": ms for key, ms in best.items()},
               "fwd_ratio": best[f"fwd_{a}"] / best[f"fwd_{b}"], "bwd_ratio": best[f"bwd_{a}"] / best[f"bwd_{b}"]}
        rows.append(row)
        print(f"| {n} | {W} | {ratio} | {tile} / {bwd_tile} | {best[f'fwd_{a}']:.2f} | {best[f'fwd_{b}']:.2f} "
              f"| {row['fwd_ratio']:.3f}x | {best[f'bwd_{a}']:.2f} | {best[f'bwd_{b}']:.2f} "
              f"| {row['bwd_ratio']:.3f}x | {diff:.1e} |", flush=True)
        if diff > TOLERANCE[args.dtype] and not args.no_check:
            raise SystemExit(f"cpu_kernel_products: {a} and {b} differ by {diff:.2e} at n={n} W={W} ratio={ratio}")
    if args.json:
        config = {"heads": hq, "head_dim": d, "threads": args.threads, "reps": 2 * math.ceil(args.reps / 2), "dtype": args.dtype,
                  "checked": not args.no_check,
                  "baseline": args.baseline, "torch": torch.__version__,
                  "cpu": platform.processor() or platform.machine(), "omp_wait_policy": os.environ["OMP_WAIT_POLICY"]}
        write_json_atomic(args.json, {"config": config, "rows": rows})
    return rows


if __name__ == "__main__":
    main()
