"""Model step benchmark: ConSA GPTModel vs megatron-core's stock GPTModel, side by side.

One process builds, with the same weights:
  stock FA      megatron-core GPTModel, local spec (DotProductAttention), causal
  stock SWA     the same with `window_size=(W-1, 0)` (megatron-core's own SWA: a dense mask)
  consa FA      ConSA, fixed allocation, every KV head FA
  consa 75%     ConSA, fixed allocation, 75% of KV heads SWA (uniform_heads preset:
                each layer's FA heads come first, so each type is already one slice)
  consa 75%, FA in the middle
                the same rows rolled by one head (SWA, FA..., SWA...), once in
                megatron's head order (the mixed layer gathers its heads by type,
                a copy of q, k and v: what every mixed layer did before the
                KV-group reordering) and once stored by type (each kernel reads a view)
  consa learn   ConSA learning mode (gates interior: both branches computed)
and times a forward+backward step of each (median over --reps, interleaved so
that background load hits all alike), with memory on a GPU: the peak, with every
model's weights resident (all are built first), and the step's own (the peak above
what was allocated before it: activations, gradients). Ratios are
against stock FA (or, with --skip-stock, against consa all FA).

With --transformer-engine (a GPU with Transformer Engine) every model is built
from the TE layer spec instead: stock is megatron-core's
`get_gpt_layer_with_transformer_engine_spec` (TEDotProductAttention; its SWA is
TE's own `window_size`), ConSA is its TE spec with the TE attention backend.

    python benchmarks/model_step.py --device cuda --dtype bf16 --seq-len 8192 --window 1024
    python benchmarks/model_step.py --device cuda --dtype bf16 --seq-len 8192 --window 1024 --transformer-engine
    python benchmarks/model_step.py --device cpu --seq-len 2048 --window 128 --hidden 256 --layers 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

# OpenMP threads spin at barriers by default. On a machine shared with other jobs a
# spinning thread holds the core its partner needs: the blocked SWA (many short
# parallel regions) then ran 5x slower while FA (one long region) did not. PASSIVE
# (threads sleep at barriers) measures the kernels rather than the scheduler; it is
# set before torch starts OpenMP. Export OMP_WAIT_POLICY yourself to override.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--window", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--skip-stock", action="store_true", help="leave out the stock models (their dense attention is O(n^2) memory); ratios are then vs consa all FA")
    p.add_argument("--transformer-engine", action="store_true",
                   help="build every model from the Transformer Engine layer spec (stock: megatron-core's; "
                        "ConSA: its TE spec and TE attention backend); needs CUDA and transformer_engine")
    p.add_argument("--json", type=str, default=None)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    warnings.filterwarnings("ignore")
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")  # one rank: an in-memory store
    import torch

    torch.set_num_threads(args.threads)
    import megatron_consa  # noqa: F401
    from megatron.core.transformer.module import Float16Module

    from megatron_consa.allocation import make_preset
    from megatron_consa.config import ConsaConfig
    from megatron_consa.controller import ConsaController, find_gates
    from megatron_consa.backends.select import transformer_engine_available
    from megatron_consa.model import ArchitectureConfig, build_gpt_model, build_transformer_config
    from megatron_consa.self_attention import to_stored_order
    from megatron_consa.training.config import ParallelConfig
    from megatron_consa.training.parallel import initialize_distributed

    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA device is visible", file=sys.stderr)
        return 2
    te = args.transformer_engine
    if te and (args.device != "cuda" or not transformer_engine_available()):
        print("error: --transformer-engine needs --device cuda and an importable transformer_engine", file=sys.stderr)
        return 2
    initialize_distributed(ParallelConfig(), seed=0)
    dev = torch.device(args.device)
    bf16 = args.dtype == "bf16"
    dtype = torch.bfloat16 if bf16 else torch.float32
    arch = ArchitectureConfig(
        vocab_size=1024, hidden_size=args.hidden, intermediate_size=4 * args.hidden, num_layers=args.layers,
        num_attention_heads=args.heads, num_kv_heads=args.kv_heads, head_dim=args.head_dim, qk_norm=True,
        rope_theta=10000.0, max_position_embeddings=args.seq_len,
    )
    common = dict(params_dtype=dtype, bf16=bf16)

    def stock(window):  # megatron-core's own layer spec and attention (its SWA: window_size)
        cfg = build_transformer_config(arch, ConsaConfig(), window_size=window, **common)
        return build_gpt_model(cfg, arch, use_transformer_engine=te, stock_attention=True), cfg

    def consa(**kw):
        backend = "te" if te else "torch"
        cfg = build_transformer_config(arch, ConsaConfig(window=args.window, backend=backend, **kw), **common)
        return build_gpt_model(cfg, arch, use_transformer_engine=te), cfg

    ref, ref_cfg = stock(None)
    quarter = make_preset(
        "uniform_heads", num_layers=arch.num_layers, num_kv_heads=arch.num_kv_heads, granularity="kv_head",
        target_sparsity=0.75, window=args.window,
    ).fa
    models = {} if args.skip_stock else {
        "stock FA": (ref, ref_cfg),
        "stock SWA (window_size)": stock((args.window - 1, 0)),
    }
    middle = [row[-1:] + row[:-1] for row in quarter]  # FA heads between SWA heads
    models.update({
        "consa all FA": consa(allocation=[[1] * arch.num_kv_heads] * arch.num_layers),
        "consa 75% SWA": consa(allocation=quarter),
        "consa 75% SWA, FA in the middle, megatron order (gathered)": consa(allocation=middle, permute_kv_groups=False),
        "consa 75% SWA, FA in the middle, stored by type (views)": consa(allocation=middle),
        "consa learning": consa(init_log_alpha=0.0),
    })
    state = ref.state_dict()
    prepared = {}
    for name, (model, cfg) in models.items():
        model.load_state_dict(to_stored_order(model, state), strict=False)
        model = model.to(dev)
        if bf16:
            model = Float16Module(cfg, model)
        prepared[name] = model.train()
    for gate in find_gates(prepared.values()):
        gate.log_alpha.data = gate.log_alpha.data.float()
    ctl = ConsaController(ConsaConfig(), total_cost=arch.num_layers * arch.num_kv_heads)
    ctl.begin_iteration(find_gates(prepared.values()))

    tokens = torch.randint(0, arch.vocab_size, (args.batch, args.seq_len), device=dev)
    pos = torch.arange(args.seq_len, device=dev).unsqueeze(0).expand_as(tokens)

    def step(model):
        loss = model(tokens, pos, attention_mask=None, labels=tokens).float().mean()
        loss.backward()
        model.zero_grad(set_to_none=True)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    times = {name: [] for name in prepared}
    peak, above = {}, {}
    for name, model in prepared.items():  # warm-up and peak memory
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            resident = torch.cuda.memory_allocated()  # every model's weights (all are on the GPU at once)
        step(model)
        sync()
        if dev.type == "cuda":
            peak[name] = torch.cuda.max_memory_allocated() / 2**30
            above[name] = (torch.cuda.max_memory_allocated() - resident) / 2**30  # this step's own
    for _ in range(args.reps):
        for name, model in prepared.items():
            sync()
            t0 = time.perf_counter()
            step(model)
            sync()
            times[name].append(time.perf_counter() - t0)

    base_name = "consa all FA" if args.skip_stock else "stock FA"
    base = statistics.median(times[base_name])
    rows = []
    print(f"\nfwd+bwd step, {args.device} {args.dtype}, {'TE' if te else 'local'} spec, b={args.batch} n={args.seq_len} W={args.window} "
          f"layers={args.layers} hidden={args.hidden} heads={args.heads}/{args.kv_heads}x{args.head_dim} "
          f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}"
          + (f" {torch.cuda.get_device_name()} torch {torch.__version__}" if dev.type == "cuda" else "") + "\n")
    print(f"| model | step (ms) | vs {base_name} |" + (" peak mem (GiB) | step mem (GiB) |" if peak else ""))
    print("|---|---:|---:|" + ("---:|---:|" if peak else ""))
    for name in prepared:
        med = statistics.median(times[name])
        row = {"model": name, "ms": med * 1e3, "ratio": med / base, "peak_gib": peak.get(name),
               "step_gib": above.get(name)}
        rows.append(row)
        mem = f" {peak[name]:.2f} | {above[name]:.2f} |" if peak else ""
        print(f"| {name} | {med * 1e3:.1f} | {med / base:.3f}x |{mem}")
    if args.json:
        from megatron_consa.files import write_json_atomic

        write_json_atomic(args.json, {"args": vars(args), "rows": rows})
    torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
