"""The banded CPU SWA kernel's matrix products: oneDNN brgemm vs MKL, side by side in one run.

Where the kernel is built for AVX-512, its fp32 forward and backward run their
products on oneDNN brgemm ukernels (torch's ``cpublas::brgemm``) on a K^T / V^T
each thread transposes as its tiles reach the keys; the extension's
``allow_pack=False`` / ``allow_brgemm=False`` run the same kernel on MKL's sgemm
instead (the AVX2 build's only path). This times both on the same inputs, the
two interleaved in every repetition, forward and backward apart (the backward
from the forward's output and log-sum-exp), and checks that they agree.

    python benchmarks/cpu_kernel_products.py                      # the default shapes below
    python benchmarks/cpu_kernel_products.py --shapes 4096:256:1 --reps 15 --json out.json

A shape is n:W:ratio (query heads per KV head; --heads query heads, head dim
--head-dim). Times are the minimum over --reps of each call (every call warm).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see benchmarks/attention_cpu.py

import torch  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from megatron_consa.backends import cpu_extension  # noqa: E402
from megatron_consa.backends.torch_attention import CPU_KV_TILE, default_cpu_q_tile  # noqa: E402
from megatron_consa.files import write_json_atomic  # noqa: E402

DEFAULT_SHAPES = "1024:64:1,1024:128:1,1024:128:4,4096:256:1,4096:256:8,16384:32:1,16384:2048:1"


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


def main(argv=None):
    args = parse_args(argv)
    ext = cpu_extension.extension()
    if ext is None:
        raise SystemExit("cpu_kernel_products: the banded CPU kernel did not build here (see CONSA_CPU_SWA_KERNEL)")
    if not ext.brgemm_fp32():
        raise SystemExit(
            f"cpu_kernel_products: the kernel is built for {cpu_extension.capability()}, where fp32 runs on MKL "
            "only; there is nothing to compare (brgemm is the AVX-512 build's)"
        )
    torch.set_num_threads(args.threads)
    d, hq = args.head_dim, args.heads
    print(f"banded kernel, fp32, b=1 hq={hq} d={d} threads={args.threads} min of {args.reps}; "
          f"torch={torch.__version__} cpu={platform.processor() or platform.machine()}")
    print()
    print("| n | W | hq/hkv | tile | fwd brgemm (ms) | fwd MKL (ms) | fwd brgemm / MKL "
          "| bwd brgemm (ms) | bwd MKL (ms) | bwd brgemm / MKL | max rel diff |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    rows = []
    for n, W, ratio in args.shapes:
        if hq % ratio:
            raise SystemExit(f"cpu_kernel_products: --shapes ratio {ratio} does not divide --heads {hq}")
        g = torch.Generator().manual_seed(0)
        q, go = (torch.randn(1, hq, n, d, generator=g) for _ in range(2))
        k, v = (torch.randn(1, hq // ratio, n, d, generator=g) for _ in range(2))
        tile, scale = default_cpu_q_tile(W, ratio), d ** -0.5
        fixed = (W, 0, scale, tile, CPU_KV_TILE)
        out, lse = ext.forward(q, k, v, *fixed, allow_pack=True)
        ref_out, ref_lse = ext.forward(q, k, v, *fixed, allow_pack=False)
        grads = ext.backward(go, q, k, v, out, lse, *fixed, allow_brgemm=True)
        ref_grads = ext.backward(go, q, k, v, out, lse, *fixed, allow_brgemm=False)
        # largest difference relative to the tensor's largest value (gradients grow with n)
        diff = max((a - b).abs().max().item() / max(1.0, b.abs().max().item())
                   for a, b in zip((out, *grads), (ref_out, *ref_grads)))
        times = {key: [] for key in ("fwd_brgemm", "fwd_mkl", "bwd_brgemm", "bwd_mkl")}
        reps = max(1, args.reps // 2)
        for _ in range(2):  # interleaved: load that comes and goes hits both alike
            for brgemm in (True, False):
                name = "brgemm" if brgemm else "mkl"
                times[f"fwd_{name}"].append(_best_ms(lambda: ext.forward(q, k, v, *fixed, allow_pack=brgemm), reps))
                times[f"bwd_{name}"].append(_best_ms(
                    lambda: ext.backward(go, q, k, v, out, lse, *fixed, allow_brgemm=brgemm), reps))
        best = {key: min(ts) for key, ts in times.items()}
        row = {"seq_len": n, "window": W, "heads": hq, "kv_heads": hq // ratio, "tile": tile, "max_rel_diff": diff,
               **{f"{key}_ms": ms for key, ms in best.items()},
               "fwd_ratio": best["fwd_brgemm"] / best["fwd_mkl"], "bwd_ratio": best["bwd_brgemm"] / best["bwd_mkl"]}
        rows.append(row)
        print(f"| {n} | {W} | {ratio} | {tile} | {best['fwd_brgemm']:.2f} | {best['fwd_mkl']:.2f} "
              f"| {row['fwd_ratio']:.3f}x | {best['bwd_brgemm']:.2f} | {best['bwd_mkl']:.2f} "
              f"| {row['bwd_ratio']:.3f}x | {diff:.1e} |", flush=True)
        if diff > 1e-4:
            raise SystemExit(f"cpu_kernel_products: brgemm and MKL differ by {diff:.2e} at n={n} W={W} ratio={ratio}")
    if args.json:
        config = {"heads": hq, "head_dim": d, "threads": args.threads, "reps": args.reps, "torch": torch.__version__,
                  "cpu": platform.processor() or platform.machine(), "omp_wait_policy": os.environ["OMP_WAIT_POLICY"]}
        write_json_atomic(args.json, {"config": config, "rows": rows})
    return rows


if __name__ == "__main__":
    main()
