"""Training throughput on the CPU through the real entry point, side by side in one run.

Four runs of the same small model on megatron-core's mock data, each
`python -m megatron_consa.train` (one process, or --nproc ranks with torchrun):

  stock           megatron-core's own local spec (DotProductAttention, full causal attention)
  consa all-FA    ConSA core attention, fixed allocation all_fa
  consa learning  ConSA gates learning (both branches run while gates are interior)
  consa 75% SWA   fixed allocation uniform_heads at sparsity 0.75

Tokens/s is the median over the log intervals after the first (warm-up).

    python benchmarks/train_throughput.py                 # seq 1024, window 128, 40 iterations each
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(extra: list[str], args) -> float:
    cmd = [sys.executable, "-m", "megatron_consa.train"]
    if args.nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(args.nproc), "-m",
               "megatron_consa.train"]
    cmd += [
        "--mock-data", "--vocab-size", "1024", "--split", "98,1,1", "--num-layers", "4", "--hidden-size", "256",
        "--ffn-hidden-size", "704", "--num-attention-heads", "8", "--num-query-groups", "4", "--qk-layernorm",
        "--seq-length", str(args.seq_length), "--micro-batch-size", "1", "--global-batch-size", "2",
        "--train-iters", str(args.iters), "--log-interval", "5", "--consa-window", str(args.window),
        "--consa-target-warmup-iters", "1", "--consa-init-log-alpha", "0.0", *extra,
    ]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    rates = [float(l.split(" tok/s")[0].split("| ")[-1]) for l in (proc.stdout + proc.stderr).splitlines()
             if " tok/s" in l and "iter " in l]
    return statistics.median(rates[1:])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq-length", type=int, default=1024)
    p.add_argument("--window", type=int, default=128)
    p.add_argument("--iters", type=int, default=40)
    p.add_argument("--nproc", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path("runs/bench_train_throughput.json"))
    args = p.parse_args(argv)
    cases = {
        "stock (megatron-core DotProductAttention)": ["--consa-phase", "fixed", "--consa-allocation", "all_fa",
                                                      "--transformer-impl", "stock"],
        "consa all-FA": ["--consa-phase", "fixed", "--consa-allocation", "all_fa"],
        "consa learning": ["--consa-phase", "learn", "--consa-target-sparsity", "0.75"],
        "consa 75% SWA (uniform_heads)": ["--consa-phase", "fixed", "--consa-allocation", "uniform_heads",
                                          "--consa-target-sparsity", "0.75"],
    }
    rates = {name: run(extra, args) for name, extra in cases.items()}
    base = rates["stock (megatron-core DotProductAttention)"]
    print(f"| model (seq {args.seq_length}, W={args.window}, {args.nproc} rank(s)) | tokens/s | vs stock |")
    print("|---|---:|---:|")
    for name, r in rates.items():
        print(f"| {name} | {r:.0f} | {r / base:.2f}x |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"args": vars(args) | {"out": str(args.out)}, "tokens_per_s": rates}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
