#!/usr/bin/env python
"""Evaluate a checkpoint under allocations: perplexity, long-range retrieval, KV-cache bytes.

    python tools/evaluate.py --load ckpt/fixed --allocation checkpoint --allocation all_fa \\
        --allocation uniform_heads --allocation interleave:4 --target-sparsity 0.75 \\
        --text held_out.jsonl --seq-length 2048 --num-sequences 32 \\
        --retrieval passkey kv --distances 256 512 1024 --samples-per-distance 16 \\
        --kv-context-length 32768 --output eval.json

The checkpoint may be saved at any TP/PP (training, finalize, or an imported
Hugging Face model); every allocation runs on a one-rank copy of it. An
allocation is an allocation.json, a preset (made at --target-sparsity,
--granularity, and the checkpoint's window unless --window), or `checkpoint`
(its own). Perplexity is reported over all positions and over the positions
beyond the window (where FA and SWA differ); retrieval as accuracy per task and
distance (tokens between the needle's value and the question's end; >= the
window means out of an SWA head's reach); KV bytes by the kv_memory formula.
Prints a table; --output writes the JSON report (atomically).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Optional, Sequence

from megatron_consa.allocation import list_presets, names_a_file
from megatron_consa.cli import (
    PRESET_FLAGS,
    UserInputError,
    below_minimum,
    check_distinct_outputs,
    check_output_file,
    flag_error,
    in_flag_terms,
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
from megatron_consa.evaluation.kv_memory import DTYPE_BYTES
from megatron_consa.evaluation.retrieval import TASKS

DEFAULT_SEQ_LENGTH = 1024
DEFAULT_NUM_SEQUENCES = 16


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_arguments(p)
    g = p.add_argument_group("allocations")
    g.add_argument("--allocation", action="append", metavar="SPEC",
                   help="repeatable: an allocation.json, `checkpoint` (the checkpoint's own), or a preset: "
                        f"{', '.join(list_presets())} (default: `checkpoint` when it has one, else all_fa)")
    g.add_argument("--target-sparsity", type=float, help="the presets' target (share of KV heads SWA)")
    g.add_argument("--granularity", choices=("kv_head", "layer"), default="kv_head", help="the presets' unit (default: kv_head)")
    g.add_argument("--window", type=int,
                   help="sliding window W of every allocation (default: the checkpoint's for presets, a file's own)")
    g.add_argument("--sink-tokens", type=int, help="attention sinks of every allocation (default: as --window)")
    g.add_argument("--calibration-scores", metavar="FILE",
                   help="the unit-scores file the `heuristic` preset ranks by (tools/calibrate_heuristic.py)")
    add_sequence_arguments(p, what="perplexity", seq_length=DEFAULT_SEQ_LENGTH, num_sequences=DEFAULT_NUM_SEQUENCES)
    g = p.add_argument_group("retrieval")
    g.add_argument("--retrieval", nargs="+", choices=TASKS, metavar="TASK",
                   help=f"tasks to run: {', '.join(TASKS)} (passkey in real text; key-value recall)")
    g.add_argument("--distances", nargs="+", type=int, metavar="D",
                   help="distances in tokens, one accuracy bucket each (needed with --retrieval)")
    g.add_argument("--samples-per-distance", type=int, default=8, help="prompts per task and distance (default: 8)")
    g.add_argument("--context-length", type=int,
                   help="retrieval prompt tokens (default: the longest distance's prompt + 64 tokens of lead)")
    g.add_argument("--haystack", metavar="FILE",
                   help="text or JSONL the passkey haystack is cut from (default: the Python standard library)")
    g.add_argument("--retrieval-seed", type=int, default=0, help="seed of values, keys and haystack offsets (default: 0)")
    g = p.add_argument_group("KV cache")
    g.add_argument("--kv-context-length", type=int,
                   help="tokens per sequence for the KV bytes (default: the longest input the model reads; needed when "
                        "nothing is evaluated)")
    g.add_argument("--kv-batch-size", type=int, default=1, help="sequences cached at once (default: 1)")
    g.add_argument("--kv-dtype", choices=sorted(DTYPE_BYTES), default="bf16", help="KV-cache element type (default: bf16)")
    g = p.add_argument_group("run")
    g.add_argument("--batch-size", type=int, default=1, help="sequences per forward pass (default: 1)")
    g.add_argument("--output", metavar="FILE.json", help="write the report as JSON (atomically)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def _check(args: argparse.Namespace) -> None:
    if args.retrieval and not args.distances:
        raise UserInputError("--retrieval needs --distances (tokens between the needle and the question)")
    for flag, value in (("--distances", args.distances), ("--context-length", args.context_length),
                        ("--haystack", args.haystack)):
        if value and not args.retrieval:
            raise UserInputError(f"{flag} is for --retrieval: name the tasks (passkey, kv), or drop {flag}")
    problem = below_minimum(("--batch-size", args.batch_size, 1), ("--kv-batch-size", args.kv_batch_size, 1),
                            ("--samples-per-distance", args.samples_per_distance, 1), ("--window", args.window, 1),
                            ("--sink-tokens", args.sink_tokens, 0), ("--context-length", args.context_length, 1),
                            ("--kv-context-length", args.kv_context_length, 0))
    if problem:
        raise UserInputError(problem)
    if not (args.text or args.data_path or args.stdlib_text or args.retrieval) and args.kv_context_length is None:
        raise UserInputError("--kv-context-length is needed when no perplexity data or retrieval sets a length")
    if args.haystack and not os.path.isfile(args.haystack):
        raise UserInputError(f"--haystack {args.haystack}: no such file")
    for d in args.distances or ():
        if d < 1:
            raise UserInputError(f"--distances {d}: distances are >= 1 token")
    if args.output:  # before the models load: not a traceback after the evaluation
        check_output_file("--output", args.output, example="eval.json")
        check_distinct_outputs(("--output", args.output), inputs=[
            *(("--allocation", spec) for spec in args.allocation or ()), ("--calibration-scores", args.calibration_scores),
            ("--text", args.text), ("--haystack", args.haystack)])


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    _check(args)
    source = sequence_source(args)
    setup_logging()
    import warnings

    warnings.filterwarnings("ignore")
    from megatron_consa.evaluation.models import CheckpointModels
    from megatron_consa.evaluation.retrieval import RetrievalConfig, make_samples
    from megatron_consa.evaluation.sequences import text_file_documents
    from megatron_consa.evaluation.suite import (
        CHECKPOINT_SPEC,
        EvaluationRequest,
        evaluate_allocations,
        resolve_allocations,
    )
    from megatron_consa.files import write_json_atomic
    from megatron_consa.unit_scores import UnitScores

    models = CheckpointModels(args.load)
    source = with_training_split(source, models.meta)
    specs = args.allocation or [CHECKPOINT_SPEC if models.own_allocation() is not None else "all_fa"]
    try:
        scores = UnitScores.load(args.calibration_scores) if args.calibration_scores else None
        if scores is not None and "heuristic" in specs:
            scores.check_compatible(models.arch.num_layers, models.arch.num_kv_heads)
    except ValueError as err:
        raise flag_error("--calibration-scores", args.calibration_scores, err) from err
    allocations = []
    for spec in specs:  # one at a time: the error names the --allocation it is about
        try:
            allocations += resolve_allocations([spec], models, granularity=args.granularity,
                                               target_sparsity=args.target_sparsity, window=args.window,
                                               sink_tokens=args.sink_tokens, calibration_scores=scores)
        except ValueError as err:
            hint = " (--calibration-scores FILE)" if spec == "heuristic" and scores is None else ""
            # a preset's message names make_preset's parameters; a file's names its own fields
            message = str(err) if names_a_file(spec) else in_flag_terms(str(err), PRESET_FLAGS)
            raise flag_error("--allocation", spec, message + hint) from err
    needs_text = source is not None or args.retrieval
    tokenizer = checkpoint_tokenizer(models, args.tokenizer_model) if needs_text else None
    samples = []
    if args.retrieval:
        haystack = text_file_documents(args.haystack) if args.haystack else None
        try:
            config = RetrievalConfig(distances=tuple(args.distances), samples_per_distance=args.samples_per_distance,
                                     context_length=args.context_length, seed=args.retrieval_seed)
            for task in args.retrieval:
                samples += make_samples(task, tokenizer, config, haystack_documents=haystack)
        except ValueError as err:
            raise UserInputError(f"--distances / --context-length / --haystack: {err}") from err
    limit = models.arch.max_position_embeddings
    if source is not None:
        warn_past_positions(source.seq_length, limit, f"--seq-length {source.seq_length}")
        _warn_nothing_beyond_the_window(allocations, source.seq_length)
    if samples:
        warn_past_positions(max(len(s.tokens) for s in samples), limit, "the retrieval prompts (--distances, "
                            "--context-length)")
    with models:
        request = EvaluationRequest(
            allocations=tuple(allocations), perplexity_sequences=load_flagged_sequences(source, tokenizer) if source else None,
            retrieval_samples=tuple(samples), kv_context_length=args.kv_context_length,
            kv_batch_size=args.kv_batch_size, kv_dtype=args.kv_dtype, batch_size=args.batch_size,
        )
        report = evaluate_allocations(models, request, progress=tqdm_progress(not args.no_progress))
    print(report.table())
    if args.output:
        write_json_atomic(args.output, report.to_dict())
        print(f"wrote {args.output}")
    return 0


def _warn_nothing_beyond_the_window(allocations, seq_length: int) -> None:
    """Perplexity tells FA from SWA only at positions past the window: warn where --seq-length
    leaves none (a checkpoint's default window longer than the sequences, say)."""
    blind = [f"{a.name} (W={a.allocation.window}, sinks={a.allocation.sink_tokens})" for a in allocations
             if a.allocation.achieved_sparsity > 0 and seq_length <= a.allocation.window + a.allocation.sink_tokens]
    if blind:
        logging.getLogger("megatron_consa.evaluate").warning(
            "--seq-length %d: no position lies beyond the window of %s, so their perplexity equals all-FA's and the "
            "beyond-W column is empty; pass a --seq-length longer than the window + sinks, or a smaller --window",
            seq_length, ", ".join(blind))


def cli() -> int:
    """The `consa-evaluate` console script: `main` with user errors reported as `error: ...`, exit 2."""
    return run_tool(main)


if __name__ == "__main__":
    sys.exit(cli())
