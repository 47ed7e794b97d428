#!/usr/bin/env python
"""Score every attention unit on calibration data: the `heuristic` preset's input, or the ablation reference.

    # attention mass beyond the window per KV head, in the dense (all-FA) model
    python tools/calibrate_heuristic.py --load ckpt/dense --text calib.jsonl --seq-length 2048 \\
        --num-sequences 16 --window 1024 --output scores.json
    # ... and the heuristic allocation at a budget, in the same run
    python tools/calibrate_heuristic.py ... --output scores.json --target-sparsity 0.75 --save-allocation heuristic.json
    # oracle-style reference: loss increase when one unit alone is SWA (one evaluation per unit)
    python tools/calibrate_heuristic.py --mode ablation --granularity kv_head ... --output ablation.json

The scores file is what `--allocation heuristic --calibration-scores scores.json`
(tools/evaluate.py), `--preset heuristic --calibration-scores scores.json`
(tools/kv_budget.py) and `--consa-allocation heuristic --consa-calibration-scores
scores.json` (training) consume, and what
tools/analyze_allocation.py compares with a learned allocation. An ablation file
works there too: the heuristic preset then takes the ablation's top units.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from megatron_consa.cli import (
    UserInputError,
    below_minimum,
    check_distinct_outputs,
    check_output_file,
    run_tool,
    setup_logging,
)
from megatron_consa.evaluation.flags import (
    add_checkpoint_arguments,
    add_sequence_arguments,
    checkpoint_tokenizer,
    load_flagged_sequences,
    sequence_source,
    tqdm_progress,
    warn_past_positions,
    with_training_split,
)

MODES = ("attention", "ablation")
DEFAULT_SEQ_LENGTH = 1024
DEFAULT_NUM_SEQUENCES = 16


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_arguments(p)
    add_sequence_arguments(p, what="calibration", seq_length=DEFAULT_SEQ_LENGTH, num_sequences=DEFAULT_NUM_SEQUENCES)
    g = p.add_argument_group("scores")
    g.add_argument("--mode", choices=MODES, default="attention",
                   help="attention: mass beyond the window per KV head in the all-FA model (default); ablation: "
                        "loss increase when one unit alone is SWA")
    g.add_argument("--window", type=int, help="sliding window W the scores are for (default: the checkpoint's)")
    g.add_argument("--sink-tokens", type=int, help="attention sinks of the SWA heads (default: the checkpoint's)")
    g.add_argument("--granularity", choices=("kv_head", "layer"), default="kv_head",
                   help="ablation: switch one KV head or one whole layer at a time; with --save-allocation: "
                        "the allocation's unit (default: kv_head)")
    g.add_argument("--output", required=True, metavar="FILE.json", help="the unit-scores file to write (atomically)")
    g.add_argument("--target-sparsity", type=float, help="with --save-allocation: the heuristic allocation's budget")
    g.add_argument("--save-allocation", metavar="FILE.json",
                   help="also write the heuristic allocation (the top units at --target-sparsity)")
    g.add_argument("--batch-size", type=int, default=1, help="sequences per forward pass (default: 1)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    source = sequence_source(args)
    if source is None:
        raise UserInputError("no calibration data: give --text FILE, --data-path PREFIX or --stdlib-text")
    if args.save_allocation and args.target_sparsity is None:
        raise UserInputError("--save-allocation needs --target-sparsity (the allocation's budget)")
    if args.target_sparsity is not None and not args.save_allocation:
        raise UserInputError("--target-sparsity is the budget of --save-allocation's allocation: give "
                             "--save-allocation FILE, or drop it (the scores file serves every budget)")
    problem = below_minimum(("--window", args.window, 1), ("--sink-tokens", args.sink_tokens, 0),
                            ("--batch-size", args.batch_size, 1))
    if problem:
        raise UserInputError(problem)
    # the outputs before the model loads: not a traceback after the calibration
    check_output_file("--output", args.output, example="scores.json")
    if args.save_allocation:
        check_output_file("--save-allocation", args.save_allocation, example="allocation.json")
    check_distinct_outputs(("--output", args.output), ("--save-allocation", args.save_allocation),
                           inputs=[("--text", args.text)])
    setup_logging()
    import warnings

    warnings.filterwarnings("ignore")
    from megatron_consa.allocation import make_preset, num_units
    from megatron_consa.evaluation.ablation import checkpoint_ablation
    from megatron_consa.evaluation.calibration import attention_mass_scores
    from megatron_consa.evaluation.models import CheckpointModels
    from megatron_consa.gates import rank_units

    models = CheckpointModels(args.load)
    source = with_training_split(source, models.meta)
    window = models.window if args.window is None else args.window
    sinks = models.sink_tokens if args.sink_tokens is None else args.sink_tokens
    tokenizer = checkpoint_tokenizer(models, args.tokenizer_model)
    arch = models.arch
    warn_past_positions(source.seq_length, arch.max_position_embeddings, f"--seq-length {source.seq_length}")
    if source.seq_length <= window + sinks:
        raise UserInputError(f"--seq-length {source.seq_length}: no position lies beyond window {window} + sinks "
                             f"{sinks}; use longer sequences")
    if args.save_allocation:  # the budget is checked before any work
        try:
            make_preset("heuristic", num_layers=arch.num_layers, num_kv_heads=arch.num_kv_heads,
                        granularity=args.granularity, target_sparsity=args.target_sparsity, window=window,
                        sink_tokens=sinks, calibration_scores=[[0.0] * arch.num_kv_heads] * arch.num_layers)
        except ValueError as err:
            raise UserInputError(f"--target-sparsity {args.target_sparsity}: {err}") from err
    progress = tqdm_progress(not args.no_progress)
    with models:
        sequences = load_flagged_sequences(source, tokenizer)
        if args.mode == "attention":
            bar = progress(sequences.shape[0], "attention mass") if progress else None
            scores = attention_mass_scores(models.model(models.all_fa()), sequences, window=window, sink_tokens=sinks,
                                           batch_size=args.batch_size, progress=bar.update if bar else None)
        else:
            total = 1 + num_units(args.granularity, arch.num_layers, arch.num_kv_heads)
            bar = progress(total, "ablation (units)") if progress else None
            scores = checkpoint_ablation(models, sequences, granularity=args.granularity, window=window,
                                         sink_tokens=sinks, batch_size=args.batch_size,
                                         progress=bar.update if bar else None)
        if bar is not None:
            bar.close()
    scores.metadata.update(checkpoint=str(models.path))
    scores.save(args.output)
    print(f"{scores.kind} scores of {arch.num_layers} layers x {arch.num_kv_heads} KV heads (W={window}, sinks={sinks}, "
          f"{sequences.shape[0]} sequences of {sequences.shape[1] - 1} tokens), largest first:")
    per_layer = scores.granularity == "layer"
    flat = [row[0] for row in scores.scores] if per_layer else [v for row in scores.scores for v in row]
    for unit in rank_units(flat)[:10]:
        l, g = (unit, None) if per_layer else divmod(unit, arch.num_kv_heads)
        print(f"  layer {l:>3}" + ("" if per_layer else f" head {g:>2}") + f"  {flat[unit]:.5f}")
    print(f"wrote {args.output}")
    if args.save_allocation:
        allocation = make_preset("heuristic", num_layers=arch.num_layers, num_kv_heads=arch.num_kv_heads,
                                 granularity=args.granularity, target_sparsity=args.target_sparsity, window=window,
                                 sink_tokens=sinks, calibration_scores=scores.scores)
        allocation.metadata.update(scores=str(args.output), scores_kind=scores.kind)
        allocation.save(args.save_allocation)
        print(allocation.summary())
        print(f"wrote {args.save_allocation}")
    return 0


def cli() -> int:
    """The `consa-calibrate-heuristic` console script: `main` with user errors reported as `error: ...`, exit 2."""
    return run_tool(main)


if __name__ == "__main__":
    sys.exit(cli())
