"""Training throughput on the CPU through the real entry point, side by side in one run.

Four runs of the same small model on megatron-core's mock data, each
`python -m megatron_consa.train` (one process, or --nproc ranks with torchrun):

  stock           megatron-core's own local spec (DotProductAttention, full causal attention)
  consa all-FA    ConSA core attention, fixed allocation all_fa
  consa learning  ConSA gates learning (both branches run while gates are interior)
  consa 75% SWA   fixed allocation uniform_heads at sparsity 0.75

A run's tokens/s is the median over its log intervals after the first --log-interval
iterations (warm-up; the log's line at iteration 1 and the one at --log-interval).
The four runs are repeated --rounds times, interleaved (stock, all-FA, learning,
75% SWA, then again), so that a machine's drift hits every model alike. A model's
tokens/s is the median over its rounds; its ratios pair each run with the baseline
run of the same round and take the median of those.

    python benchmarks/train_throughput.py                 # seq 1024, window 128, 30 iterations, 3 rounds
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

STOCK, ALL_FA = "stock (megatron-core DotProductAttention)", "consa all-FA"
CASES = {
    STOCK: ["--consa-phase", "fixed", "--consa-allocation", "all_fa", "--transformer-impl", "stock"],
    ALL_FA: ["--consa-phase", "fixed", "--consa-allocation", "all_fa"],
    "consa learning": ["--consa-phase", "learn", "--consa-target-sparsity", "0.75"],
    "consa 75% SWA (uniform_heads)": ["--consa-phase", "fixed", "--consa-allocation", "uniform_heads",
                                      "--consa-target-sparsity", "0.75"],
}
# The training log line of `megatron_consa.training.loop`: "iter  N/M | loss ... | 1234 tok/s | ..."
_RATE = re.compile(r"\biter\s+(\d+)/\d+ \|.*?\| (\d+(?:\.\d+)?) tok/s \|")


def tokens_per_s(log: str, warmup_iters: int) -> float:
    """The median tokens/s over a run's log intervals that end after `warmup_iters` iterations (the loop logs
    iteration 1 too: with --log-interval 5, the intervals ending at 1 and 5 are the warm-up)."""
    lines = [m for m in map(_RATE.search, log.splitlines()) if m]
    rates = [float(m.group(2)) for m in lines if int(m.group(1)) > warmup_iters]
    if len(rates) < 2:
        raise ValueError(f"the run logged {len(rates)} interval(s) after its first {warmup_iters} iterations; it "
                         "needs 2 or more: raise --iters")
    return statistics.median(rates)


def run(extra: list[str], args) -> float:
    cmd = [sys.executable, "-m", "megatron_consa.train"]
    if args.nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(args.nproc), "-m",
               "megatron_consa.train"]
    cmd += [
        "--mock-data", "--vocab-size", "1024", "--split", "98,1,1", "--num-layers", "4", "--hidden-size", "256",
        "--ffn-hidden-size", "704", "--num-attention-heads", "8", "--num-query-groups", "4", "--qk-layernorm",
        "--seq-length", str(args.seq_length), "--micro-batch-size", "1", "--global-batch-size", "2",
        "--train-iters", str(args.iters), "--log-interval", str(args.log_interval), "--consa-window",
        str(args.window), "--consa-target-warmup-iters", "1", "--consa-init-log-alpha", "0.0", *extra,
    ]
    # Threads sleep at barriers (see benchmarks/model_step.py); export OMP_WAIT_POLICY to override.
    env = {"OMP_WAIT_POLICY": "PASSIVE", **os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    return tokens_per_s(proc.stdout + proc.stderr, args.log_interval)


def main(argv=None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-length", type=int, default=1024)
    p.add_argument("--window", type=int, default=128)
    p.add_argument("--iters", type=int, default=30, help="training iterations per run")
    p.add_argument("--log-interval", type=int, default=5, help="iterations per timed interval")
    p.add_argument("--rounds", type=int, default=3, help="interleaved repetitions of the four runs")
    p.add_argument("--nproc", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path("runs/bench_train_throughput.json"))
    args = p.parse_args(argv)
    if args.iters < 3 * args.log_interval:
        p.error(f"--iters {args.iters} must be at least 3 x --log-interval {args.log_interval}: the first interval is "
                "warm-up, and two more are timed")
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    per_round = {name: [] for name in CASES}
    for _ in range(args.rounds):
        for name, extra in CASES.items():
            per_round[name].append(run(extra, args))
    rates = {name: statistics.median(r) for name, r in per_round.items()}
    # each run against the baseline run of its own round; a model's ratio is the median over rounds
    paired = {base: {name: [a / b for a, b in zip(r, per_round[base])] for name, r in per_round.items()}
              for base in (STOCK, ALL_FA)}
    ratios = {base: {name: statistics.median(r) for name, r in by_name.items()} for base, by_name in paired.items()}
    print(f"| model (seq {args.seq_length}, W={args.window}, {args.nproc} rank(s), median of {args.rounds}) "
          "| tokens/s | vs stock | vs consa all-FA | vs all-FA per round |")
    print("|---|---:|---:|---:|---|")
    for name, r in rates.items():
        rounds = ", ".join(f"{x:.2f}" for x in paired[ALL_FA][name])
        print(f"| {name} | {r:.0f} | {ratios[STOCK][name]:.2f}x | {ratios[ALL_FA][name]:.2f}x | {rounds} |")
    from megatron_consa.files import write_json_atomic

    write_json_atomic(args.out, {"args": vars(args) | {"out": str(args.out)}, "tokens_per_s": rates,
                                 "tokens_per_s_per_round": per_round, "vs_stock": ratios[STOCK],
                                 "vs_all_fa": ratios[ALL_FA]})
    return rates


if __name__ == "__main__":
    main()
