"""Decode with the hybrid KV cache: KV-cache bytes and decode tokens/s, side by side in one run.

A small Qwen3-shaped model (random weights, fp32) is prefilled with a random
context and then generates --new-tokens tokens greedily through transformers'
`generate`, three ways, same weights:

  stock           transformers' own generate: sdpa attention, DynamicCache, every head FA
  consa all FA    the consa attention + HybridCache, every head FA
  consa 75% SWA   the consa attention + HybridCache, head-wise uniform_heads at sparsity 0.75:
                  FA heads cache every token, SWA heads only the window W (+ sinks)

KV bytes are what each cache holds after the run (context + new - 1 tokens) and
must equal the formula of `megatron_consa.evaluation.kv_memory` (checked, the
run fails otherwise). Decode tokens/s is timed inside generate: one over the
median time between consecutive generated tokens (after the prefill, which is
reported apart). Every model first generates 2 tokens after a short context, so that
one-off costs (the SWA kernel's load or build, first allocations) land in no timing.

    python benchmarks/decode.py                                  # contexts 4096 and 16384, W=256, 32 new tokens
    python benchmarks/decode.py --contexts 4096 --new-tokens 16  # quicker
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

# Benchmarks set OpenMP threads to sleep at barriers (see benchmarks/model_step.py): on a
# shared machine spinning threads measure the scheduler, not the kernels.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--contexts", default="4096,16384", help="comma-separated context lengths (prefilled tokens)")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens generated after each context")
    p.add_argument("--window", type=int, default=256, help="sliding window W of the SWA heads")
    p.add_argument("--sink-tokens", type=int, default=0)
    p.add_argument("--sparsity", type=float, default=0.75, help="fraction of KV heads SWA (head-wise uniform_heads)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, help="also write the results here")
    return p.parse_args(argv)


def build_models(args):
    """The same random weights as a stock (sdpa) model, and the consa models (all FA; hybrid)."""
    import torch
    import transformers

    import megatron_consa  # noqa: F401  (registers the consa attention)
    from megatron_consa.allocation import make_preset
    from megatron_consa.architecture import ArchitectureConfig
    from megatron_consa.conversion.windows import CONSA_ATTENTION, hf_window_fields, set_window_fields

    common = dict(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=int(args.hidden * 2.75),
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        head_dim=args.head_dim, max_position_embeddings=max(map(int, args.contexts.split(","))) + args.new_tokens,
    )
    torch.manual_seed(0)
    stock = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**common, attn_implementation="sdpa")).eval()
    allocation = make_preset(
        "uniform_heads", num_layers=args.layers, num_kv_heads=args.kv_heads, granularity="kv_head",
        target_sparsity=args.sparsity, window=args.window, sink_tokens=args.sink_tokens,
    )
    models = {"stock": (stock, None)}
    for name, alloc in (("consa all FA", None), (f"consa {args.sparsity:.0%} SWA", allocation)):
        config = transformers.Qwen3Config(**common)
        set_window_fields(config, hf_window_fields(alloc, ArchitectureConfig.from_hf(config)))
        config._attn_implementation = CONSA_ATTENTION
        model = transformers.Qwen3ForCausalLM(config).eval()
        model.load_state_dict(stock.state_dict())
        models[name] = (model, alloc)
    return models


def run_one(model, allocation, context, args, new_tokens=None) -> dict:
    """Greedy generate of `new_tokens` (default --new-tokens) after `context` random tokens; times and the cache's
    bytes."""
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList

    from megatron_consa.inference.hf import HybridCache

    class Clock(LogitsProcessor):  # called once per generated token, after its forward
        def __init__(self):
            self.times = []

        def __call__(self, input_ids, scores):
            self.times.append(time.perf_counter())
            return scores

    new_tokens = args.new_tokens if new_tokens is None else new_tokens
    prompt = torch.randint(0, args.vocab, (1, context), generator=torch.Generator().manual_seed(context))
    clock = Clock()
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                  logits_processor=LogitsProcessorList([clock]), attention_mask=torch.ones_like(prompt))
    cache = None
    if model.config._attn_implementation != "sdpa":
        cache = HybridCache.for_model(model, max_length=context + new_tokens)
        kwargs["past_key_values"] = cache
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(prompt, return_dict_in_generate=True, **kwargs)
    held = cache.held_bytes if cache is not None else sum(
        layer.keys.nbytes + layer.values.nbytes for layer in out.past_key_values.layers
    )
    return {
        "prefill_s": clock.times[0] - start,
        # one over the median time between consecutive tokens: a load spike on a shared machine moves it little
        "decode_tokens_per_s": 1.0 / statistics.median(b - a for a, b in zip(clock.times, clock.times[1:])),
        "kv_bytes": held,
        "cached_tokens": context + new_tokens - 1,
    }


def formula_bytes(allocation, tokens: int, args) -> int:
    from megatron_consa.evaluation.kv_memory import KvCacheShape, all_fa_bytes, allocation_bytes

    shape = KvCacheShape(num_layers=args.layers, num_kv_heads=args.kv_heads, head_dim=args.head_dim,
                         context_length=tokens, bytes_per_element=4)
    return all_fa_bytes(shape) if allocation is None else allocation_bytes(shape, allocation)


def main(argv=None) -> int:
    args = parse_args(argv)
    warnings.filterwarnings("ignore")
    import torch

    torch.set_num_threads(args.threads)
    models = build_models(args)
    # one-off costs (the SWA kernel's load or build, first allocations) before any timing, in every arm alike
    for model, allocation in models.values():
        run_one(model, allocation, 2 * args.window + args.sink_tokens + 8, args, new_tokens=2)
    results = []
    for context in map(int, args.contexts.split(",")):
        rows = {}
        for name, (model, allocation) in models.items():
            r = run_one(model, allocation, context, args)
            r["formula_bytes"] = formula_bytes(allocation, r["cached_tokens"], args)
            if r["kv_bytes"] != r["formula_bytes"]:
                raise SystemExit(f"{name} at context {context}: the cache holds {r['kv_bytes']} bytes, "
                                 f"the kv_memory formula says {r['formula_bytes']}")
            rows[name] = r
            print(f"context {context}, {name}: {r}", file=sys.stderr, flush=True)
        base, stock = rows["consa all FA"]["decode_tokens_per_s"], rows["stock"]["decode_tokens_per_s"]
        for name, r in rows.items():
            results.append({"context": context, "model": name, **r, "vs_all_fa": r["decode_tokens_per_s"] / base,
                            "vs_stock": r["decode_tokens_per_s"] / stock})
    print("| context | model | KV cache (MiB) | = formula | prefill (s) | decode tokens/s | vs consa all FA | vs stock |")
    print("|---:|---|---:|---|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['context']} | {r['model']} | {r['kv_bytes'] / 2**20:.1f} | yes | {r['prefill_s']:.1f} | "
              f"{r['decode_tokens_per_s']:.1f} | {r['vs_all_fa']:.2f}x | {r['vs_stock']:.2f}x |")
    if args.json:
        from megatron_consa.files import write_json_atomic

        write_json_atomic(args.json, {"args": {k: str(v) for k, v in vars(args).items()}, "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
