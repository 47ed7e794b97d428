#!/usr/bin/env python
r"""Export a megatron-consa checkpoint (any TP/PP layout) to a Hugging Face directory.

    python tools/convert_megatron_to_hf.py --load ckpt/qwen3-0.6b --save hf/qwen3-hybrid \
        --allocation allocation.json

A layer-wise allocation that stock attention can run (no sinks; Qwen2/Qwen3 any
mix, Mistral all-SWA) becomes stock config fields (layer_types, sliding_window,
use_sliding_window): stock transformers runs the hybrid model. Any other
allocation (head-wise, sinks, a Llama/Mistral layer mix) is stored in
config.json for the consa attention that `import megatron_consa` registers with
transformers; stock transformers without the package refuses to load it:

    import megatron_consa
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained("hf/qwen3-hybrid")   # runs the consa attention

Without --allocation the checkpoint's own allocation is used: an import's
allocation.json, or the fixed allocation of a finalized checkpoint or a fixed
phase; without one the export is all full attention (a learning run's checkpoint
warns: finalize it first to export the hybrid model). Past --max-shard-size the
weights are split into files with an index, as save_pretrained does. See megatron_consa.conversion.exporter.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from megatron_consa.allocation import AllocationError
from megatron_consa.cli import flag_error, run_tool, setup_logging
from megatron_consa.conversion.exporter import ExportRequest, export_to_hf


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", required=True, help="megatron-consa checkpoint directory")
    p.add_argument("--save", required=True, help="output Hugging Face directory")
    p.add_argument("--allocation", help="allocation.json (layer-wise or head-wise) to export the hybrid model with")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --save directory")
    p.add_argument(
        "--max-shard-size", default="50GB", type=lambda v: int(v) if v.isdigit() else v,
        help="largest safetensors file, as in save_pretrained (e.g. 5GB, 500MB, 4GiB, or bytes; default: 50GB, "
        "the Hugging Face Hub's per-file limit); a larger model is split into files with an index",
    )
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    setup_logging()
    try:
        export_to_hf(ExportRequest(load=args.load, save=args.save, allocation=args.allocation,
                                   overwrite=args.overwrite, max_shard_size=args.max_shard_size))
    except AllocationError as err:  # (with --allocation, the errors about an allocation are about that file)
        if not args.allocation:
            raise
        raise flag_error("--allocation", args.allocation, err) from err
    return 0


def cli() -> int:
    """The `consa-convert-megatron-to-hf` console script: `main` with user errors reported as `error: ...`, exit 2."""
    return run_tool(main)


if __name__ == "__main__":
    sys.exit(cli())
