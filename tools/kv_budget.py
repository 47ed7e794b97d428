#!/usr/bin/env python
r"""KV-cache bytes of a model at a context length, and the target sparsity that fits a budget.

    python tools/kv_budget.py --hf-config Qwen3-0.6B/ --context-length 32768 --batch-size 8 \
        --dtype bf16 --window 4096 --preset uniform_heads --target-sparsity 0.75 --budget 24GiB

Prints all-FA bytes; with --allocation FILE or --preset NAME the bytes of that
allocation; with --budget the lowest target sparsity whose KV cache fits. --json
prints the same as one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence

from megatron_consa.allocation import Allocation, allocation_from_spec, list_presets
from megatron_consa.architecture import ArchitectureConfig
from megatron_consa.cli import (
    PRESET_FLAGS, UserInputError, below_minimum, flag_error, in_flag_terms, run_tool, setup_logging,
)
from megatron_consa.conversion.hf_files import load_hf_config
from megatron_consa.evaluation.kv_memory import (
    DTYPE_BYTES,
    KvCacheShape,
    all_fa_bytes,
    allocation_bytes,
    dtype_bytes,
    format_bytes,
    parse_bytes,
    sparsity_for_budget,
)
from megatron_consa.unit_scores import UnitScores


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf-config", required=True,
                   help="Hugging Face checkpoint directory or its config.json; a megatron-consa checkpoint, training "
                        "--save directory (its latest checkpoint) or finalize's output")
    p.add_argument("--context-length", type=int, required=True, help="tokens cached per sequence")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPE_BYTES), help="KV-cache element type")
    p.add_argument("--window", type=int, help="sliding window W (default: the allocation file's)")
    p.add_argument("--sink-tokens", type=int, help="attention sinks (default: the allocation file's, else 0)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--allocation", help="an allocation.json")
    which.add_argument("--preset", help=f"a rule-based allocation: {', '.join(list_presets())}")
    p.add_argument("--target-sparsity", type=float, help="the preset's target")
    p.add_argument("--calibration-scores", metavar="FILE",
                   help="with --preset heuristic: the unit-scores file tools/calibrate_heuristic.py wrote")
    p.add_argument("--granularity", choices=("layer", "kv_head"),
                   help="units of --preset and of the --budget answer (default: the --allocation file's, else kv_head)")
    p.add_argument("--budget", help="KV-cache memory you have, e.g. 24GiB: prints the target sparsity that fits")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    problem = below_minimum(("--context-length", args.context_length, 1), ("--batch-size", args.batch_size, 1),
                            ("--window", args.window, 1), ("--sink-tokens", args.sink_tokens, 0))
    if problem:
        p.error(problem)
    if args.preset is None and args.target_sparsity is not None:
        p.error("--target-sparsity is a --preset's target: give --preset (an --allocation file has its own sparsity)")
    if args.calibration_scores and args.preset != "heuristic":
        p.error("--calibration-scores are the heuristic's input: give --preset heuristic, or drop the flag")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    setup_logging()
    try:
        arch = ArchitectureConfig.from_hf(load_hf_config(args.hf_config), allow_sliding_window=True,
                                          for_transformers=True)  # (the KV shapes only: any RoPE scaling)
    except (ValueError, FileNotFoundError, NotImplementedError) as err:
        raise flag_error("--hf-config", args.hf_config, err) from err
    shape = KvCacheShape(
        num_layers=arch.num_layers,
        num_kv_heads=arch.num_kv_heads,
        head_dim=arch.head_dim,
        context_length=args.context_length,
        batch_size=args.batch_size,
        bytes_per_element=dtype_bytes(args.dtype),
    )
    allocation = None
    if args.allocation:
        try:
            allocation = Allocation.load(args.allocation)
            allocation.check_compatible(arch.num_layers, arch.num_kv_heads)
        except ValueError as err:
            raise flag_error("--allocation", args.allocation, err) from err
    if args.granularity is None:  # the allocation file's units, else KV heads
        args.granularity = allocation.granularity if allocation is not None else "kv_head"
    if allocation is None and args.preset:
        if args.window is None:
            raise UserInputError("--preset needs --window (the sliding window W)")
        if args.preset in ("all_fa", "all_swa") and args.target_sparsity is not None:
            raise UserInputError(f"--target-sparsity {args.target_sparsity} with --preset {args.preset}: that preset's "
                                 f"sparsity is {0 if args.preset == 'all_fa' else 1} by definition; drop "
                                 "--target-sparsity (or pick a preset that takes a target, e.g. uniform_heads)")
        if args.preset == "heuristic" and not args.calibration_scores:
            raise UserInputError("--preset heuristic needs --calibration-scores FILE (tools/calibrate_heuristic.py)")
        try:
            scores = UnitScores.load(args.calibration_scores) if args.calibration_scores else None
            if scores is not None and args.preset == "heuristic":
                scores.check_compatible(arch.num_layers, arch.num_kv_heads)
        except ValueError as err:
            raise flag_error("--calibration-scores", args.calibration_scores, err) from err
        try:
            allocation = allocation_from_spec(
                args.preset,
                num_layers=arch.num_layers,
                num_kv_heads=arch.num_kv_heads,
                granularity=args.granularity,
                target_sparsity=args.target_sparsity,
                window=args.window,
                sink_tokens=args.sink_tokens or 0,
                calibration_scores=scores,
            )
        except ValueError as err:
            raise UserInputError(f"--preset: {in_flag_terms(str(err), PRESET_FLAGS)}") from err
    window = args.window if args.window is not None else (allocation.window if allocation else None)
    sinks = args.sink_tokens if args.sink_tokens is not None else (allocation.sink_tokens if allocation else 0)
    if allocation is not None and (window, sinks) != (allocation.window, allocation.sink_tokens):
        allocation.window, allocation.sink_tokens = window, sinks  # what-if: same heads, other window
    report: dict = {
        "num_layers": arch.num_layers,
        "num_kv_heads": arch.num_kv_heads,
        "head_dim": arch.head_dim,
        "context_length": args.context_length,
        "batch_size": args.batch_size,
        "dtype": args.dtype,
        "all_fa_bytes": all_fa_bytes(shape),
    }
    if allocation is not None:
        report.update(
            allocation=allocation.source,
            window=window,
            sink_tokens=sinks,
            sparsity=allocation.achieved_sparsity,
            allocation_bytes=allocation_bytes(shape, allocation),
        )
    if args.budget:
        if window is None:
            raise UserInputError("--budget needs --window (or an --allocation file that has one)")
        try:
            budget_bytes = parse_bytes(args.budget)
            fit = sparsity_for_budget(shape, budget_bytes, window=window, sink_tokens=sinks,
                                      granularity=args.granularity)
        except ValueError as err:
            raise flag_error("--budget", args.budget, err) from err
        report.update(
            budget_bytes=budget_bytes,
            window=window,
            sink_tokens=sinks,
            granularity=args.granularity,
            fitting_target_sparsity=fit.target_sparsity,
            fitting_fa_units=fit.fa_units,
            fitting_bytes=fit.kv_bytes,
        )
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(
        f"model: {arch.num_layers} layers x {arch.num_kv_heads} KV heads x head_dim {arch.head_dim}; "
        f"context {args.context_length}, batch {args.batch_size}, {args.dtype}"
    )
    print(f"all FA:            {format_bytes(report['all_fa_bytes']):>12}  ({report['all_fa_bytes']} bytes)")
    if allocation is not None:
        b = report["allocation_bytes"]
        print(
            f"{allocation.source} (sparsity {allocation.achieved_sparsity:.4f}, W={window}, sinks={sinks}): "
            f"{format_bytes(b)}  ({b} bytes, {b / report['all_fa_bytes']:.3f}x all FA)"
        )
    if args.budget:
        t = report["fitting_target_sparsity"]
        hint = " (only all_swa fits)" if t >= 1.0 else ""
        print(
            f"budget {args.budget}: target_sparsity {t:.4f}{hint} -> {report['fitting_fa_units']} FA "
            f"{args.granularity} units, {format_bytes(report['fitting_bytes'])}"
        )
    return 0


def cli() -> int:
    """The `consa-kv-budget` console script: `main` with user errors reported as `error: ...`, exit 2."""
    return run_tool(main)


if __name__ == "__main__":
    sys.exit(cli())
