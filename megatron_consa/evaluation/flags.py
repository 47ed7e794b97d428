"""Command-line flags the evaluation tools share (`tools/evaluate.py`, `tools/calibrate_heuristic.py`).

The flags name a checkpoint, its tokenizer and the sequences to score; these
helpers add them to a parser and turn the parsed values into the typed
objects of `megatron_consa.evaluation` (user errors raise `UserInputError`
naming the flag).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from pathlib import Path
from typing import Optional

from megatron_consa.cli import UserInputError, flag_error
from megatron_consa.evaluation.sequences import DEFAULT_DATA_SEED, DEFAULT_SPLIT, SPLITS, SequenceSource

logger = logging.getLogger(__name__)


def add_checkpoint_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("checkpoint")
    g.add_argument("--load", required=True,
                   help="a megatron-consa checkpoint at any TP/PP (a --save directory, one iter_* in it, a finalized "
                        "or an imported Hugging Face model)")
    g.add_argument("--tokenizer-model",
                   help="sentencepiece .model file or Hugging Face tokenizer directory (default: the tokenizer saved "
                        "in the checkpoint)")


def add_sequence_arguments(p: argparse.ArgumentParser, *, what: str, seq_length: int, num_sequences: int) -> None:
    g = p.add_argument_group(f"{what} data (one of --text, --data-path, --stdlib-text)")
    g.add_argument("--text", metavar="FILE",
                   help="a plain-text file (one document), or a .jsonl or .json file: one JSON object per line")
    g.add_argument("--json-key", default="text", help="the JSONL field holding the text (default: text)")
    g.add_argument("--data-path", nargs="+", metavar="PREFIX",
                   help="indexed dataset prefixes (tools/preprocess_data.py), Megatron-LM's --data-path (blends too)")
    g.add_argument("--split", default=None,
                   help="Megatron-LM's --split of --data-path (default: the checkpoint's training run's, so the "
                        "valid split holds no training document; else 969,30,1)")
    g.add_argument("--data-split", choices=SPLITS, default="valid",
                   help="which split of --data-path to draw sequences from (default: valid)")
    g.add_argument("--stdlib-text", action="store_true",
                   help="the Python standard library's sources from the first file on: real text every machine "
                        "has; the demo corpus and the shipped start checkpoints trained on its first files, so it "
                        "is not held-out text for them")
    g.add_argument("--seq-length", type=int, default=seq_length,
                   help=f"tokens per sequence (default: {seq_length})")
    g.add_argument("--num-sequences", type=int, default=num_sequences,
                   help=f"sequences to score (default: {num_sequences}; fewer when a text file or a --data-path split "
                        "runs out)")
    g.add_argument("--data-seed", type=int, default=None,
                   help="megatron-core's shuffling seed for --data-path (default: the checkpoint's training run's, "
                        "else 1234)")


def warn_past_positions(positions: int, max_positions: int, what: str,
                        log: logging.Logger = logger) -> None:
    """Warn when `what` (the flags that set it) runs the model over more positions than its
    max_position_embeddings: the tokens beyond it sit at positions the model was not built for."""
    if positions > max_positions:
        log.warning("%s: %d positions, past the model's max_position_embeddings (%d): the tokens beyond it are at "
                    "positions the model was not built for", what, positions, max_positions)


def sequence_source(args: argparse.Namespace) -> Optional[SequenceSource]:
    """The parsed data flags, or None when no source was named."""
    named = [flag for flag, value in (("--text", args.text), ("--data-path", args.data_path),
                                      ("--stdlib-text", args.stdlib_text)) if value]
    if not named:
        return None
    if len(named) > 1:
        raise UserInputError(f"{' and '.join(named)}: give one source of sequences")
    if args.text and not Path(args.text).is_file():
        raise UserInputError(f"--text {args.text}: no such file")
    for flag, value in (("--split", args.split), ("--data-seed", args.data_seed)):
        if value is not None and not args.data_path:
            raise UserInputError(f"{flag} {value} is for --data-path (an indexed dataset's split and shuffling): "
                                 f"drop it with {named[0]}")
    for flag, value in (("--seq-length", args.seq_length), ("--num-sequences", args.num_sequences)):
        if value < 1:
            raise UserInputError(f"{flag} {value}: must be >= 1")
    return SequenceSource(seq_length=args.seq_length, num_sequences=args.num_sequences, text=args.text,
                          json_key=args.json_key, data_path=tuple(args.data_path or ()), split=args.split,
                          data_split=args.data_split, stdlib=args.stdlib_text, seed=args.data_seed)


def load_flagged_sequences(source: SequenceSource, tokenizer) -> "torch.Tensor":
    """`load_sequences(source, tokenizer)`, a damaged --text file's error naming the flag (a `.json` file is read as
    JSONL, one object per line)."""
    from megatron_consa.data.indexed import DataError
    from megatron_consa.evaluation.sequences import load_sequences

    try:
        return load_sequences(source, tokenizer)
    except DataError as err:
        if not source.text:
            raise
        hint = " (a .json file is read as JSONL: one JSON object per line)" if source.text.endswith(".json") else ""
        raise flag_error("--text", source.text, f"{err}{hint}") from None


def with_training_split(source: Optional[SequenceSource], meta: dict) -> Optional[SequenceSource]:
    """`source` with its unset `--split` / `--data-seed` taken from the run that trained the
    checkpoint (its consa_run.json `data`): the default valid split is then the one that run
    held out. Logged; the defaults 969,30,1 / 1234 where the checkpoint does not say."""
    if source is None or not source.data_path or (source.split is not None and source.seed is not None):
        return source
    saved = meta.get("data") or {}
    split = source.split or saved.get("split") or DEFAULT_SPLIT
    seed = source.seed if source.seed is not None else saved.get("seed", DEFAULT_DATA_SEED)
    if source.split is None:
        logger.info("--split %s (%s)", split, "the checkpoint's training run's" if saved.get("split") else "default")
    return dataclasses.replace(source, split=split, seed=seed)


def checkpoint_tokenizer(models, tokenizer_model: Optional[str]):
    """`--tokenizer-model`, else the checkpoint's own; refused when its ids exceed the model's vocabulary."""
    from megatron_consa.data.tokenizer import tokenizer_from_path

    if tokenizer_model:
        tokenizer = tokenizer_from_path(tokenizer_model)
        if tokenizer is None:
            raise UserInputError(f"--tokenizer-model {tokenizer_model}: no sentencepiece model or Hugging Face "
                                 "tokenizer there")
    else:
        tokenizer = models.tokenizer()
        if tokenizer is None:
            raise UserInputError(f"--load {models.path}: the checkpoint holds no tokenizer; give --tokenizer-model")
    if tokenizer.vocab_size > models.arch.vocab_size:
        source = "--tokenizer-model" if tokenizer_model else f"--load {models.path}: the checkpoint's tokenizer"
        raise UserInputError(f"{source}: the tokenizer has {tokenizer.vocab_size} tokens but the model's "
                             f"vocabulary is {models.arch.vocab_size}: use the model's own tokenizer")
    return tokenizer


def tqdm_progress(enabled: bool):
    """A `ProgressFactory` of tqdm bars on stderr (None when disabled)."""
    if not enabled:
        return None
    from tqdm import tqdm

    return lambda total, desc: tqdm(total=total, desc=desc, unit="seq", leave=False, disable=None)


__all__ = ["add_checkpoint_arguments", "add_sequence_arguments", "checkpoint_tokenizer", "sequence_source",
           "tqdm_progress"]
