#!/usr/bin/env python
r"""Convert a Hugging Face Qwen3 / Qwen2 / Llama / Mistral checkpoint to a megatron-consa checkpoint.

    python tools/convert_hf_to_megatron.py --hf-path Qwen3-0.6B/ --save ckpt/qwen3-0.6b \
        --tensor-model-parallel-size 2 --pipeline-model-parallel-size 1

Reads safetensors only (a sharded index too). Writes a megatron-core
dist_checkpointing checkpoint that training loads with weights_only, plus
config.json, the tokenizer and, for a source that already uses sliding windows,
the equivalent allocation.json. See megatron_consa.conversion.importer.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from megatron_consa.cli import flag_error, run_tool, setup_logging
from megatron_consa.conversion.importer import DTYPES, ImportRequest, import_hf_checkpoint


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf-path", required=True, help="Hugging Face checkpoint directory")
    p.add_argument("--save", required=True, help="output checkpoint directory")
    p.add_argument("--tensor-model-parallel-size", type=int, default=1)
    p.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    p.add_argument("--dtype", choices=sorted(DTYPES), help="weights' dtype (default: the checkpoint's own)")
    p.add_argument("--granularity", choices=("layer", "kv_head"), default="kv_head",
                   help="granularity of the gates written (untrained, at their initial value; a learning phase "
                        "started from the import keeps its own initial gates, at either granularity)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing, different checkpoint at --save")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    setup_logging()
    request = ImportRequest(
        hf_path=args.hf_path,
        save=args.save,
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        dtype=args.dtype,
        granularity=args.granularity,
        overwrite=args.overwrite,
    )
    try:
        import_hf_checkpoint(request)
    except FileNotFoundError as err:  # (a file of the source missing: its config.json, a weight file)
        raise flag_error("--hf-path", args.hf_path, err) from err
    return 0


def cli() -> int:
    """The `consa-convert-hf-to-megatron` console script: `main` with user errors reported as `error: ...`, exit 2."""
    return run_tool(main)


if __name__ == "__main__":
    sys.exit(cli())
