#!/usr/bin/env python
"""Finalize a learning-phase checkpoint into allocation.json, a heatmap and a fixed-mode checkpoint.

    python tools/finalize_allocation.py --load ckpt/learn --save ckpt/finalized
    torchrun ... -m megatron_consa.train --consa-phase fixed --load ckpt/finalized/checkpoint ...

Refuses (exit 2) a run whose s_hat tail did not settle on its target; says so when
units at the FA/SWA boundary were too close to call.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from megatron_consa.cli import UserInputError, run_tool, setup_logging


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", required=True, help="the learning run's --save directory (or one iter_* in it)")
    p.add_argument("--save", required=True, help="output directory")
    p.add_argument("--tolerance", type=float, help="allowed max |s_hat - target| over the tail (default: the run's)")
    p.add_argument("--margin", type=float, help="log_alpha gap that counts as too close to call (default: the run's)")
    p.add_argument("--no-checkpoint", action="store_true", help="write allocation.json and the heatmap only")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --save directory")
    args = p.parse_args(argv)
    for flag, value in (("--tolerance", args.tolerance), ("--margin", args.margin)):
        if value is not None and not value >= 0:  # (NaN too: it would pass every comparison)
            raise UserInputError(f"{flag} {value}: must be a number >= 0")
    setup_logging()
    import warnings

    warnings.filterwarnings("ignore")
    from megatron_consa.training.finalize import FinalizeRequest, finalize_checkpoint

    allocation = finalize_checkpoint(FinalizeRequest(
        load=args.load, save=args.save, tolerance=args.tolerance, margin=args.margin, overwrite=args.overwrite,
        with_checkpoint=not args.no_checkpoint,
    ))
    print(allocation.summary())
    undecided = allocation.metadata.get("undecided_units")
    if undecided:
        print(f"note: {len(undecided)} units at the FA/SWA boundary were too close to call: {undecided}")
    print(f"wrote {args.save}/allocation.json, allocation_heatmap.png" + ("" if args.no_checkpoint else ", checkpoint/"))
    return 0


def cli() -> int:
    """The `consa-finalize-allocation` console script: `main` with user errors reported as `error: ...`, exit 2."""
    return run_tool(main)


if __name__ == "__main__":
    sys.exit(cli())
