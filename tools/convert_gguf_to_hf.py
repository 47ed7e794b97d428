#!/usr/bin/env python
"""Dequantize a GGUF file (llama.cpp) into a Hugging Face checkpoint directory.

    python tools/convert_gguf_to_hf.py --gguf-file SmolLM2-135M-Instruct.Q4_1.gguf --save hf/smollm2-135m
    python tools/convert_hf_to_megatron.py --hf-path hf/smollm2-135m --save ckpt/smollm2-135m

Writes model.safetensors, config.json, generation_config.json and the tokenizer,
read and dequantized by transformers (needs the `gguf` package): the input of
tools/convert_hf_to_megatron.py, and a directory transformers loads as usual.
See megatron_consa.conversion.gguf.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from megatron_consa.cli import run_tool, setup_logging
from megatron_consa.conversion.gguf import gguf_to_hf
from megatron_consa.conversion.importer import DTYPES


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gguf-file", required=True, help="the .gguf file")
    p.add_argument("--save", required=True, help="output Hugging Face directory")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="dtype of the dequantized weights (default: fp32)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --save directory")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    setup_logging()
    gguf_to_hf(args.gguf_file, args.save, dtype=args.dtype, overwrite=args.overwrite)
    return 0


def cli() -> int:
    """The `consa-convert-gguf-to-hf` console script: `main` with user errors reported as `error: ...`, exit 2."""
    return run_tool(main)


if __name__ == "__main__":
    sys.exit(cli())
