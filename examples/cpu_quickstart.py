"""CPU quickstart: learn a FA/SWA allocation for a small Qwen3-style model, then finalize it.

What `make quickstart` runs: the library API in one process (gloo), no torchrun, no downloads:

1. pretrain a 4-layer Qwen3-style GPTModel (8 query heads, 4 KV heads,
   QK-norm), all heads FA, on generated sequences that repeat with a period
   longer than the sliding window: it learns to copy from one period back,
   which only full-attention heads can do (the stand-in for a pretrained
   checkpoint, which ConSA normally starts from);
2. allocation phase: the same weights, now with ConSA gates at KV-head
   granularity, trained jointly (weights + gates) under the augmented
   Lagrangian with every controller default of `ConsaConfig` (only target,
   granularity and window are chosen); the log shows s_hat next to the target;
3. finalize: the tail of s_hat must have stayed on the target; the units with
   the largest log_alpha stay FA so the SWA share is exactly the target; write
   allocation.json and print the allocation.

    python examples/cpu_quickstart.py --pretrain-iters 250 --iters 320 --target 0.75 --out runs/quickstart
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import sys
import time
from pathlib import Path


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pretrain-iters", type=int, default=250, help="dense (all-FA) pretraining iterations (default: 250)")
    p.add_argument("--iters", type=int, default=320,
                   help="allocation-phase iterations: the 200-iteration target warm-up, then settling (default: 320)")
    p.add_argument("--target", type=float, default=0.75, help="SWA share of KV heads to reach, in [0, 1) (default: 0.75)")
    p.add_argument("--granularity", choices=["kv_head", "layer"], default="kv_head", help="gate per KV head or per layer")
    p.add_argument("--window", type=int, default=8, help="sliding window W in tokens (default: 8)")
    p.add_argument("--seq-length", type=int, default=96, help="tokens per sequence (default: 96)")
    p.add_argument("--allow-off-target", action="store_true",
                   help="finalize even if the s_hat tail did not settle on the target (for experiments)")
    p.add_argument("--out", type=Path, default=Path("runs/quickstart"), help="output directory (allocation.json, tensorboard/)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.iters < 1 or args.pretrain_iters < 1:
        print("error: --iters and --pretrain-iters must be >= 1", file=sys.stderr)
        return 2
    if args.window < 2:
        print(f"error: --window={args.window}: use 2 or more (the data repeats every 1.5 windows)", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("megatron", "torch", "py.warnings"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    import warnings

    warnings.filterwarnings("ignore")
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")  # one rank: an in-memory store

    import torch

    torch.set_num_threads(args.threads)
    import megatron_consa  # noqa: F401
    from megatron_consa.allocation import AllocationError
    from megatron_consa.config import ConsaConfig, ConsaConfigError
    from megatron_consa.model import ArchitectureConfig, unwrap_model
    from megatron_consa.training.config import ParallelConfig, TrainingConfig
    from megatron_consa.training.data import PeriodicSequenceData
    from megatron_consa.training.loop import ConsaTrainer, check_learning_run
    from megatron_consa.training.parallel import initialize_distributed

    arch = ArchitectureConfig(
        vocab_size=32, hidden_size=128, intermediate_size=256, num_layers=4, num_attention_heads=8,
        num_kv_heads=4, head_dim=16, qk_norm=True, rope_theta=10000.0, max_position_embeddings=args.seq_length,
    )
    common = dict(micro_batch_size=4, global_batch_size=8, seq_length=args.seq_length, weight_decay=0.0)
    pretraining = TrainingConfig(
        train_iters=args.pretrain_iters, lr=5e-3, min_lr=5e-3, lr_decay_style="constant", lr_warmup_iters=10,
        log_interval=max(1, args.pretrain_iters // 5), **common,
    )
    training = TrainingConfig(
        train_iters=args.iters, lr=2e-3, min_lr=2e-4, log_interval=max(1, args.iters // 15),
        tensorboard_dir=str(args.out / "tensorboard"), **common,
    )
    try:
        consa = ConsaConfig(
            window=args.window,
            granularity=args.granularity,
            target_sparsity=args.target,
        )
        check_learning_run(consa, arch=arch, training=training, tp_size=1)
    except ConsaConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    # Sequences repeating with period 1.5 W: predicting them needs a head that looks
    # further back than the window, i.e. a full-attention head.
    data = PeriodicSequenceData(vocab_size=arch.vocab_size, seq_length=args.seq_length, period=3 * args.window // 2)
    parallel = ParallelConfig()
    initialize_distributed(parallel, seed=training.seed)

    all_fa = dataclasses.replace(consa, allocation=[[1] * arch.num_kv_heads for _ in range(arch.num_layers)])
    logging.info("phase 1: dense pretraining, %d iterations", args.pretrain_iters)
    dense = ConsaTrainer(arch=arch, consa=all_fa, parallel=parallel, training=pretraining, data=data)
    dense_history = dense.train()

    trainer = ConsaTrainer(arch=arch, consa=consa, parallel=parallel, training=training, data=data)
    # Same weights; the gates (absent from the dense model) start at init_log_alpha.
    missing, unexpected = unwrap_model(trainer.chunks[0]).load_state_dict(
        unwrap_model(dense.chunks[0]).state_dict(), strict=False
    )
    assert not unexpected and all(k.endswith("log_alpha") or "_extra_state" in k for k in missing)
    del dense
    logging.info("phase 2: learning an allocation: %d layers x %d KV heads, window %d, target sparsity %.3f",
                 arch.num_layers, arch.num_kv_heads, args.window, args.target)
    start = time.time()
    history = trainer.train()
    trainer.close()
    logging.info("allocation phase took %.1f s; loss %.3f (dense model: %.3f, untrained: %.3f); "
                 "s_hat %.3f for target %.3f", time.time() - start, history[-1].loss, dense_history[-1].loss,
                 dense_history[0].loss, history[-1].s_hat, args.target)

    report = trainer.settle_report()
    logging.info("settling: %s", report.describe())
    try:
        allocation = trainer.finalize(tolerance=math.inf if args.allow_off_target else None)
    except AllocationError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    allocation.save(args.out / "allocation.json")
    print()
    print(allocation.summary())
    undecided = allocation.metadata.get("undecided_units")
    if undecided:
        print(f"note: {len(undecided)} units near the FA/SWA boundary had (nearly) equal log_alpha and were "
              f"ranked by differences below the margin (exact ties by unit index): {undecided}")
    print(f"\nwrote {args.out / 'allocation.json'}; TensorBoard logs in {args.out / 'tensorboard'}")
    torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
