"""CPU benchmark: causal full attention vs dense-mask SWA vs blocked O(n*W) SWA.

Runs, side by side in one process:
  (a) FA          torch SDPA with ``is_causal=True``
  (b) dense SWA   torch SDPA with the dense ``[n, n]`` boolean window mask
  (c) ours        ``megatron_consa.backends.torch_attention.sliding_window_attention``

For each: median forward time (under ``torch.no_grad``) and median
forward+backward time over ``--reps`` repetitions after warm-up, and the ratio
to FA. Repetitions are interleaved across methods (a, b, c, a, b, c, ...) so
that background load on a shared machine hits all of them alike.

    python benchmarks/attention_cpu.py [--seq-len 4096 --window 256 --heads 8
        --head-dim 64 --reps 5 --threads 2 --json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from megatron_consa.backends.torch_attention import (  # noqa: E402
    default_block_size,
    full_causal_attention,
    sliding_window_attention,
    sliding_window_mask,
)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=None, help="GQA KV heads (default: = heads)")
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--sinks", type=int, default=0, help="attention sink tokens for SWA")
    p.add_argument("--block-size", type=int, default=None, help="SWA query block (default: library's)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--skip-dense", action="store_true", help="skip the O(n^2) dense-mask SWA")
    p.add_argument("--json", type=str, default=None, help="also write the results as JSON here")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dtype = DTYPES[args.dtype]
    b, hq, n, d = args.batch, args.heads, args.seq_len, args.head_dim
    hkv = args.kv_heads or hq
    scale = d ** -0.5
    W, S = args.window, args.sinks
    block = args.block_size or default_block_size(W, n)

    q = torch.randn(b, hq, n, d, dtype=dtype, requires_grad=True)
    k = torch.randn(b, hkv, n, d, dtype=dtype, requires_grad=True)
    v = torch.randn(b, hkv, n, d, dtype=dtype, requires_grad=True)
    grad_out = torch.randn(b, hq, n, d, dtype=dtype)
    dense_mask = sliding_window_mask(n, W, S)  # [n, n] bool

    def fa():
        return full_causal_attention(q, k, v, scale=scale)

    def dense_swa():
        if hkv == hq:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=dense_mask, scale=scale)
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=dense_mask, scale=scale, enable_gqa=True
        )

    def ours():
        return sliding_window_attention(
            q, k, v, window=W, scale=scale, sink_tokens=S, block_size=args.block_size
        )

    methods = {"FA (SDPA causal)": fa}
    if not args.skip_dense:
        methods["dense-mask SWA (SDPA [n,n] mask)"] = dense_swa
    methods[f"ours: blocked SWA (B={block})"] = ours

    # Sanity: ours vs dense-mask SWA.
    with torch.no_grad():
        ref = dense_swa().float() if not args.skip_dense else None
        max_err = (ours().float() - ref).abs().max().item() if ref is not None else float("nan")
        del ref

    def run_fwd(fn):
        with torch.no_grad():
            t0 = time.perf_counter()
            fn()
            return time.perf_counter() - t0

    def run_fwd_bwd(fn):
        q.grad = k.grad = v.grad = None
        t0 = time.perf_counter()
        out = fn()
        out.backward(grad_out)
        return time.perf_counter() - t0

    for _ in range(args.warmup):
        for fn in methods.values():
            run_fwd(fn)
            run_fwd_bwd(fn)
    times = {name: {"fwd": [], "fwd_bwd": []} for name in methods}
    for _ in range(args.reps):
        for name, fn in methods.items():
            times[name]["fwd"].append(run_fwd(fn))
            times[name]["fwd_bwd"].append(run_fwd_bwd(fn))

    med = {name: {key: statistics.median(ts) for key, ts in t.items()} for name, t in times.items()}
    fa_name = next(iter(methods))
    rows = []
    for name in methods:
        rows.append(
            {
                "method": name,
                "fwd_ms": 1e3 * med[name]["fwd"],
                "fwd_ratio_to_fa": med[name]["fwd"] / med[fa_name]["fwd"],
                "fwd_bwd_ms": 1e3 * med[name]["fwd_bwd"],
                "fwd_bwd_ratio_to_fa": med[name]["fwd_bwd"] / med[fa_name]["fwd_bwd"],
                "fwd_ms_all": [1e3 * t for t in times[name]["fwd"]],
                "fwd_bwd_ms_all": [1e3 * t for t in times[name]["fwd_bwd"]],
            }
        )

    config = {
        "batch": b, "heads": hq, "kv_heads": hkv, "seq_len": n, "head_dim": d,
        "window": W, "sinks": S, "block_size": block, "dtype": args.dtype,
        "threads": args.threads, "reps": args.reps, "warmup": args.warmup,
        "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
        "ideal_swa_ratio": min(1.0, n * W / (n * n / 2)),
        "max_abs_err_ours_vs_dense": max_err,
    }
    print(
        f"CPU attention benchmark: b={b} hq={hq} hkv={hkv} n={n} d={d} W={W} S={S} "
        f"{args.dtype} threads={args.threads} reps={args.reps} torch={torch.__version__}"
    )
    print(f"ideal SWA/FA work ratio n*W/(n^2/2) = {config['ideal_swa_ratio']:.3f}; "
          f"max |ours - dense| = {max_err:.2e}")
    print()
    print("| method | fwd (ms) | fwd / FA | fwd+bwd (ms) | fwd+bwd / FA |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['method']} | {r['fwd_ms']:.1f} | {r['fwd_ratio_to_fa']:.3f}x | "
            f"{r['fwd_bwd_ms']:.1f} | {r['fwd_bwd_ratio_to_fa']:.3f}x |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": config, "results": rows}, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
