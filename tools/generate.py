#!/usr/bin/env python
"""Generate text with the hybrid KV cache, from a megatron-consa checkpoint or an exported HF directory.

    python tools/generate.py --load ckpt/qwen3 --prompt "def fibonacci(n):" --max-new-tokens 64
    python tools/generate.py --hf-path hf/qwen3-hybrid --prompt "Once upon a time" --temperature 0.8 --top-p 0.95

--load: our checkpoint (any TP/PP layout, merged into one in-process rank), in
fixed mode with its own allocation (an import's allocation.json, or the fixed
allocation of a finalized checkpoint or a fixed phase), or --allocation; all FA
without either; the
generator is megatron_consa.inference.generate. --hf-path: an export
(tools/convert_megatron_to_hf.py; any Qwen3/Qwen2/Llama/Mistral directory),
loaded with the consa attention and run by transformers' generate with
HybridCache. Either way FA heads cache every token and SWA heads only the
window plus the sinks.

Prints the generated continuation (as token ids when there is no tokenizer).
The tokenizer is the model directory's (--tokenizer to choose another). Sampling is greedy unless --temperature > 0; for the same --seed
the two back ends may sample different tokens (their sampling code is their own). Of the model's
generation_config.json only the EOS ids count: its sampling settings and penalties are not applied.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Optional, Sequence

from megatron_consa.cli import UserInputError, flag_error, run_tool, setup_logging
from megatron_consa.evaluation.flags import warn_past_positions


def _checked(convert, ok, requirement: str):
    """An argparse type: `convert(text)`, refused with `requirement` unless `ok(value)`."""

    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not ok(value):
            raise argparse.ArgumentTypeError(f"must be {requirement}, got {text!r}")
        return value

    return parse


_POSITIVE = _checked(int, lambda v: v >= 1, "an integer >= 1")
_NON_NEGATIVE = _checked(int, lambda v: v >= 0, "an integer >= 0")
_TEMPERATURE = _checked(float, lambda v: 0 <= v < float("inf"), "a finite number >= 0")
_PROBABILITY = _checked(float, lambda v: 0 < v <= 1, "in (0, 1]")
_SEED = _checked(int, lambda v: 0 <= v < 2**63, "an integer in 0 .. 2**63 - 1")


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--load", help="megatron-consa checkpoint directory (or a training --save directory)")
    source.add_argument("--hf-path", help="Hugging Face directory exported by tools/convert_megatron_to_hf.py")
    p.add_argument("--allocation", help="with --load: allocation.json to generate with (default: the checkpoint's)")
    prompt = p.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="prompt text (needs a tokenizer)")
    prompt.add_argument("--prompt-ids", help="prompt as comma-separated token ids, e.g. 5,17,3")
    p.add_argument("--tokenizer", help="tokenizer file or directory (default: the model directory)")
    p.add_argument("--max-new-tokens", type=_POSITIVE, default=64, help="tokens to generate at most (default 64; both back ends stop at the generation_config.json's EOS ids and the tokenizer's EOS)")
    p.add_argument("--temperature", type=_TEMPERATURE, default=0.0, help="0: greedy (default); > 0: sample")
    p.add_argument("--top-k", type=_NON_NEGATIVE, default=0, help="with --temperature > 0: sample among the k most likely tokens (0: all)")
    p.add_argument("--top-p", type=_PROBABILITY, default=1.0, help="with --temperature > 0: nucleus sampling mass (1: all)")
    p.add_argument("--seed", type=_SEED, default=0, help="with --temperature > 0: sampling seed (0 .. 2**63 - 1)")
    p.add_argument("--prefill-chunk", type=_POSITIVE, help="with --load: prefill the prompt in chunks of this many tokens")
    p.add_argument("--kv-report", action="store_true", help="also print the KV-cache bytes held and allocated, and all FA's at the same length")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    setup_logging()
    import warnings

    warnings.filterwarnings("ignore")
    import torch

    from megatron_consa.data.tokenizer import tokenizer_from_path
    from megatron_consa.inference.sampling import SamplingConfig

    if args.hf_path and (args.allocation or args.prefill_chunk):
        raise UserInputError("--allocation and --prefill-chunk go with --load; an export's allocation is in its config.json")
    model_dir = Path(args.load or args.hf_path)
    if not model_dir.is_dir():
        raise UserInputError(f"--{'load' if args.load else 'hf-path'} {model_dir}: no such directory")
    if args.hf_path:
        from megatron_consa.architecture import ArchitectureConfig
        from megatron_consa.conversion.hf_files import check_safetensors, load_hf_config
        from megatron_consa.training.checkpoint import CONSA_META_FILE, TRACKER_FILE

        if (model_dir / CONSA_META_FILE).is_file() or (model_dir / TRACKER_FILE).is_file():
            raise UserInputError(f"--hf-path {model_dir}: a megatron-consa checkpoint, not a Hugging Face export: "
                                 "use --load (or export it with tools/convert_megatron_to_hf.py)")
        try:  # a bad config or missing / damaged weights: a clear error, not transformers' traceback
            check_safetensors(model_dir)
            hf_arch = ArchitectureConfig.from_hf(load_hf_config(model_dir), allow_sliding_window=True,
                                                 for_transformers=True)  # (transformers runs it: any RoPE scaling)
        except (ValueError, FileNotFoundError, NotImplementedError) as err:
            raise flag_error("--hf-path", model_dir, err) from err
    tokenizer = tokenizer_from_path(args.tokenizer, flag="--tokenizer") if args.tokenizer else None
    if args.tokenizer and tokenizer is None:
        raise UserInputError(f"--tokenizer {args.tokenizer}: no sentencepiece model or Hugging Face tokenizer there")
    if args.temperature == 0:
        for flag, value, default in (("--top-k", args.top_k, 0), ("--top-p", args.top_p, 1.0), ("--seed", args.seed, 0)):
            if value != default:
                raise UserInputError(f"{flag} {value} is for sampling: give --temperature > 0 as well "
                                     "(0, the default, decodes greedily)")
    sampling = SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)

    if args.load:
        from megatron_consa.allocation import AllocationError
        from megatron_consa.conversion.checkpoint_model import fixed_consa_config, one_rank_model, read_checkpoint_info
        from megatron_consa.inference.generate import generate

        try:
            info = read_checkpoint_info(args.load, args.allocation)
        except AllocationError as err:
            if not args.allocation:
                raise
            raise flag_error("--allocation", args.allocation, err) from err
        info.warn_if_unfinalized(logging.getLogger("megatron_consa.generate"), "generation")
        tokenizer = tokenizer or tokenizer_from_path(info.path, flag="--load")
        ids = _prompt_ids(args, tokenizer, info.arch.vocab_size)
        warn_past_positions(ids.size(1) + args.max_new_tokens, info.arch.max_position_embeddings,
                            "the prompt and --max-new-tokens", logging.getLogger("megatron_consa.generate"))
        with one_rank_model(info, fixed_consa_config(info.arch, info.allocation)) as model:
            result = generate(model, ids, max_new_tokens=args.max_new_tokens, sampling=sampling,
                              prefill_chunk=args.prefill_chunk, eos_token_id=_eos(tokenizer, info.path))
        tokens, cache, allocation, arch, dtype = result.tokens, result.cache, info.allocation, info.arch, info.dtype
    else:
        from transformers import AutoModelForCausalLM

        from megatron_consa.conversion.windows import CONSA_ATTENTION
        from megatron_consa.inference.hf import config_allocation, generate_hf

        arch = hf_arch
        tokenizer = tokenizer or tokenizer_from_path(model_dir, flag="--hf-path")
        ids = _prompt_ids(args, tokenizer, arch.vocab_size)
        warn_past_positions(ids.size(1) + args.max_new_tokens, arch.max_position_embeddings,
                            "the prompt and --max-new-tokens", logging.getLogger("megatron_consa.generate"))
        model, loading = AutoModelForCausalLM.from_pretrained(
            model_dir, attn_implementation=CONSA_ATTENTION, dtype=torch.float32, output_loading_info=True,
            ignore_mismatched_sizes=True)  # (listed, then refused below, not a RuntimeError)
        missing = sorted(loading["missing_keys"]) + sorted(key for key, *_ in loading["mismatched_keys"])
        if missing:  # (transformers would start them at random and only log it)
            raise UserInputError(f"--hf-path {model_dir}: the weights lack or misshape {len(missing)} of the model's "
                                 f"tensors ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}): export "
                                 "the checkpoint again with tools/convert_megatron_to_hf.py")
        tokens, cache = generate_hf(model.eval(), ids, max_new_tokens=args.max_new_tokens, sampling=sampling,
                                    eos_token_id=_eos(tokenizer, model_dir))
        allocation, dtype = config_allocation(model.config), torch.float32
    new = tokens[0, ids.size(1):].tolist()
    print(tokenizer.decode(new) if tokenizer is not None else " ".join(map(str, new)))
    if args.kv_report:
        _kv_report(cache, allocation, arch, tokens.size(1), dtype)
    return 0


def _eos(tokenizer, model_dir) -> list[int]:
    """Where both back ends stop: the model directory's generation_config.json EOS ids (as
    transformers' generate; an import and finalize carry the source's, training checkpoints
    their run's --hf-config directory's) and the tokenizer's end-of-sequence id. None of them:
    generation runs to --max-new-tokens."""
    from megatron_consa.conversion.hf_files import generation_eos_ids

    ids = generation_eos_ids(model_dir)
    eos = getattr(tokenizer, "eos", None) if tokenizer is not None else None
    return ids + [eos] if eos is not None and eos not in ids else ids


def _prompt_ids(args: argparse.Namespace, tokenizer, vocab_size: int):
    import torch

    if args.prompt is not None:
        if tokenizer is None:
            raise UserInputError("--prompt needs a tokenizer and the model directory has none: pass --tokenizer or --prompt-ids")
        ids = tokenizer.encode_prompt(args.prompt)  # with the BOS a Llama or Mistral tokenizer adds
        if not ids:
            raise UserInputError("--prompt encodes to no tokens: give some text")
    else:
        try:
            ids = [int(t) for t in args.prompt_ids.split(",") if t.strip()]
        except ValueError:
            raise UserInputError(f"--prompt-ids {args.prompt_ids!r}: write comma-separated integers, e.g. 5,17,3") from None
        if not ids:
            raise UserInputError("--prompt-ids is empty: give at least one token id")
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        source = "--prompt-ids" if args.prompt is None else "--prompt (its tokenizer)"
        raise UserInputError(f"{source}: token ids {bad[:5]} are outside the model's vocabulary (0..{vocab_size - 1})")
    return torch.tensor([ids], dtype=torch.long)


def _kv_report(cache, allocation, arch, total_tokens: int, dtype) -> None:
    import torch

    from megatron_consa.evaluation.kv_memory import KvCacheShape, all_fa_bytes, format_bytes

    cached = total_tokens - 1  # the last generated token is never fed back
    element = torch.empty((), dtype=dtype).element_size()
    shape = KvCacheShape(num_layers=arch.num_layers, num_kv_heads=arch.num_kv_heads, head_dim=arch.head_dim,
                         context_length=cached, bytes_per_element=element)
    name = allocation.source if allocation is not None else "all FA"
    print(f"KV cache after {cached} tokens ({name}): {format_bytes(cache.held_bytes)} held, "
          f"{format_bytes(cache.nbytes)} allocated; all FA: {format_bytes(all_fa_bytes(shape))}")


def cli() -> int:
    """The `consa-generate` console script: `main` with user errors reported as `error: ...`, exit 2."""
    return run_tool(main)


if __name__ == "__main__":
    sys.exit(cli())
