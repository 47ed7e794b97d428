#!/usr/bin/env python
"""Heatmap and pattern statistics of an allocation; its overlap with other allocations or rankings.

    python tools/analyze_allocation.py --allocation runs/finalized/allocation.json \\
        --compare seed2/allocation.json --compare heuristic.json --compare scores.json --compare ablation.json \\
        --heatmap allocation.png --output analysis.json

Statistics (the paper's pattern claims): FA share per depth third (layer l is in
third floor(3 l / L)), the FA depth centroid (layer l at depth (l + 0.5) / L;
0.5 for an even spread), and the contiguous blocks of FA layers (a layer counts
when at least --block-threshold of its KV heads are FA). A --compare file is an
allocation.json (two seeds, learned vs a preset) or a unit-scores file from
tools/calibrate_heuristic.py (attention mass or ablation), compared through its
top units at the analysed allocation's budget. Overlap is per KV head: shared
FA heads, Jaccard, agreement, and the shared FA heads two random allocations
with these counts would have.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from megatron_consa.cli import (
    UserInputError,
    check_distinct_outputs,
    check_output_file,
    flag_error,
    run_tool,
    setup_logging,
)


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--allocation", required=True, metavar="FILE.json", help="the allocation.json to analyse")
    p.add_argument("--compare", action="append", metavar="FILE.json",
                   help="repeatable: another allocation.json of the same model, or a unit-scores file (ranking)")
    p.add_argument("--heatmap", metavar="FILE.png",
                   help="write the layers x KV heads heatmap (learned log_alpha when the file has it, else 0/1)")
    p.add_argument("--binary", action="store_true", help="heatmap of the 0/1 allocation even when log_alpha is there")
    p.add_argument("--block-threshold", type=float, default=0.5,
                   help="share of a layer's KV heads that must be FA for it to count in an FA block (default: 0.5)")
    p.add_argument("--output", metavar="FILE.json", help="write the statistics and overlaps as JSON (atomically)")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if not 0.0 < args.block_threshold <= 1.0:
        raise UserInputError(f"--block-threshold {args.block_threshold}: must lie in (0, 1]")
    for flag, path, example in (("--heatmap", args.heatmap, "allocation.png"), ("--output", args.output, "analysis.json")):
        if path:
            check_output_file(flag, path, example=example)
    check_distinct_outputs(("--heatmap", args.heatmap), ("--output", args.output),
                           inputs=[("--allocation", args.allocation), *(("--compare", c) for c in args.compare or ())])
    setup_logging()
    from megatron_consa.allocation import Allocation
    from megatron_consa.analysis.report import analyze, load_compared
    from megatron_consa.files import write_json_atomic

    # each input checked on its own first (small files): the error names its flag
    try:
        allocation = Allocation.load(args.allocation)
    except ValueError as err:
        raise flag_error("--allocation", args.allocation, err) from err
    compared = []
    for other in args.compare or ():
        try:
            compared.append(load_compared(other, allocation))
        except ValueError as err:
            raise flag_error("--compare", other, f"{err} (compared with --allocation {args.allocation})") from err
    report = analyze(args.allocation, args.compare, block_threshold=args.block_threshold, allocation=allocation,
                     compared=compared)
    print(report.allocation.summary() + "\n")
    print(report.tables())
    if args.heatmap:
        from megatron_consa.analysis.heatmap import save_heatmap

        a = report.allocation
        values = None if args.binary else a.log_alpha
        save_heatmap(args.heatmap, a.fa, values,
                     title=f"{a.source}: SWA share {a.achieved_sparsity:.3f}, W={a.window}"
                           + (", log_alpha (FA outlined)" if values is not None else ""))
        print(f"wrote {args.heatmap}")
    if args.output:
        write_json_atomic(args.output, report.to_dict())
        print(f"wrote {args.output}")
    return 0


def cli() -> int:
    """The `consa-analyze-allocation` console script: `main` with user errors reported as `error: ...`, exit 2."""
    return run_tool(main)


if __name__ == "__main__":
    sys.exit(cli())
