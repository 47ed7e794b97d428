#!/usr/bin/env python
r"""JSONL -> megatron-core indexed dataset (.bin/.idx) for `--data-path`.

    python tools/preprocess_data.py --input corpus.jsonl --output-prefix data/corpus \
        --tokenizer-type SentencePieceTokenizer --tokenizer-model tok.model --workers 2
    python tools/preprocess_data.py --input corpus.jsonl --output-prefix data/corpus \
        --train-sentencepiece 4096            # trains data/corpus.model on the input first

One JSON object per line; the text is in --json-keys (default `text`; several keys
write one dataset each, as Megatron-LM's preprocessing does). Each
document is tokenized as Megatron-LM's preprocessing does (a Hugging Face
tokenizer with its special tokens: a Llama or Mistral BOS first) and followed by
the tokenizer's end-of-document token (its EOS; a tokenizer without one is
refused), once: Megatron-LM's `--append-eod` is accepted and changes nothing. Documents without text are skipped. Writes <output-prefix>_<key>_document.bin/.idx
(Megatron-LM's naming: `_text_document` for the default key) atomically.
--tokenizer-model alone is a sentencepiece model when it is a file or a directory holding
only a `tokenizer.model` (a sentencepiece run's checkpoint), else a Hugging Face tokenizer
directory (as in training).
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path
from typing import Optional, Sequence

from megatron_consa.cli import UserInputError, check_output_file, run_tool, setup_logging


def main(argv: Optional[Sequence[str]] = None) -> int:
    from megatron_consa.data.tokenizer import SENTENCEPIECE_TYPES, TEXT_TOKENIZER_TYPES

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, help="JSONL file(s)")
    p.add_argument("--output-prefix", required=True, help="output prefix; writes <prefix>_<json key>_document.bin/.idx (_text_document by default)")
    p.add_argument("--json-keys", nargs="+", default=["text"],
                   help="the JSON field(s) holding the text; one dataset per field")
    p.add_argument("--append-eod", action="store_true",
                   help="accepted for Megatron-LM's command lines: every document ends with the EOD here, once")
    p.add_argument("--tokenizer-type", choices=TEXT_TOKENIZER_TYPES,
                   help="default: HuggingFaceTokenizer for a --tokenizer-model directory, SentencePieceTokenizer "
                        "(= Megatron-LM's GPTSentencePieceTokenizer) for a file or a directory holding a "
                        "tokenizer.model and no Hugging Face tokenizer files")
    p.add_argument("--tokenizer-model", help="sentencepiece .model file or HF tokenizer directory")
    p.add_argument("--train-sentencepiece", type=int, metavar="VOCAB",
                   help="train a sentencepiece model of this vocabulary on the input (written to <prefix>.model)")
    p.add_argument("--workers", type=int, default=1, help="encoding processes")
    args = p.parse_args(argv)
    setup_logging()
    from tqdm import tqdm

    from megatron_consa.data.indexed import iter_jsonl_records, write_indexed_datasets
    from megatron_consa.data.tokenizer import build_tokenizer, tokenizer_type_of, train_sentencepiece

    if args.workers < 1:
        raise UserInputError(f"--workers {args.workers}: must be >= 1")
    for path in args.input:  # (before a tokenizer is trained, a worker started or a directory made)
        if not Path(path).is_file():
            raise UserInputError(f"--input {path}: {'a directory' if Path(path).is_dir() else 'no such file'}; "
                                 "give the JSONL file(s) to tokenize")
    if len(set(args.json_keys)) != len(args.json_keys):
        raise UserInputError(f"--json-keys {' '.join(args.json_keys)}: a key given twice")
    prefixes = {key: f"{args.output_prefix}_{key}_document" for key in args.json_keys}
    for prefix in prefixes.values():
        for suffix in (".bin", ".idx"):  # before any tokenizing: not a traceback at the end
            check_output_file(f"--output-prefix {args.output_prefix}: the output", prefix + suffix)
    model = args.tokenizer_model
    if args.train_sentencepiece:
        if args.tokenizer_type not in (None, *SENTENCEPIECE_TYPES):
            raise UserInputError("--train-sentencepiece makes a SentencePieceTokenizer; drop --tokenizer-type")
        if model:
            raise UserInputError("--train-sentencepiece trains the tokenizer: drop --tokenizer-model, or drop "
                                 "--train-sentencepiece to use that model")
        if args.train_sentencepiece < 64:
            raise UserInputError(f"--train-sentencepiece {args.train_sentencepiece}: use a vocabulary of 64 or more")
        texts = (text for record in iter_jsonl_records(args.input, args.json_keys) for text in record)
        model = str(train_sentencepiece(texts, args.output_prefix, vocab_size=args.train_sentencepiece))
        print(f"trained {model}")
    if not model:
        raise UserInputError("--tokenizer-model is missing (or pass --train-sentencepiece VOCAB)")
    factory = functools.partial(build_tokenizer, args.tokenizer_type or tokenizer_type_of(model), model)
    factory().eod  # noqa: B018  fail early on a bad tokenizer, or one without an EOS to end documents
    with tqdm(desc="documents", unit="doc") as bar:  # (one pass for every key, as Megatron-LM's)
        stats = write_indexed_datasets(iter_jsonl_records(args.input, args.json_keys), list(prefixes.values()),
                                       tokenizer_factory=factory, workers=args.workers, progress=bar.update)
    for prefix, stat in zip(prefixes.values(), stats):
        print(f"wrote {prefix}.bin/.idx: {stat['documents']} documents, {stat['tokens']} tokens")
    return 0


def cli() -> int:
    """The `consa-preprocess-data` console script: `main` with user errors reported as `error: ...`, exit 2."""
    return run_tool(main)


if __name__ == "__main__":
    sys.exit(cli())
