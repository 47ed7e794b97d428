"""Controller settling: the damped controller (library defaults) beside the earlier one.

For the grid of issue 6 (shapes 4x4 to 28x8, both granularities, targets 0.25
to 0.875 where representable, gates-only and joint) on the toy problem of
`megatron_consa.toy`, and for the quickstart model in the real `ConsaTrainer`
(megatron-core optimizer, scheduler, clipping, co-trained weights), it reports
the iteration from which s_hat stays within 0.01 of the target to the end of
the run, the tail's max |s_hat - t| (last 10%), and whether finalize accepts
the run. "old" is the controller shipped before (plain dual ascent, no fixed
quadratic term, integrating through the warm-up) at the old quickstart's
schedule; "new" is every ConsaConfig default.

    python benchmarks/controller.py                  # toy grid + real trainer (about 15 min on 2 cores)
    python benchmarks/controller.py --skip-trainer   # toy grid only (about 2 min)

Writes a markdown table and JSON (--out, default runs/bench_controller).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from pathlib import Path

SHAPES = [(4, 4), (8, 4), (16, 8), (28, 8)]
TARGETS = [0.25, 0.5, 0.75, 0.875]
TOLERANCE = 0.01


def _representable(target: float, units: int) -> bool:
    return abs((1 - target) * units - round((1 - target) * units)) < 1e-9


def _settle_iteration(s_hat: list[float], target: float) -> int | None:
    """The step index (0: the first step) from which s_hat stays within TOLERANCE of `target`; None: never."""
    last_bad = max((k for k, s in enumerate(s_hat) if abs(s - target) > TOLERANCE), default=-1)
    return None if last_bad + 1 >= len(s_hat) else last_bad + 1


def _summary(rows: list[dict]) -> dict:
    ok = [r for r in rows if r["settled_by"] is not None and r["settled_by"] <= 1000 and r["finalize_ok"]]
    return {
        "cases": len(rows),
        "settled_within_1000": len(ok),
        # None ("never") as soon as one case never settles
        "worst_settle": None if any(r["settled_by"] is None for r in rows) else max(
            (r["settled_by"] for r in rows), default=None),
        "worst_tail_gap": max((r["tail_gap"] for r in rows), default=0.0),
    }


def toy_grid(iterations: int) -> list[dict]:
    import torch

    from megatron_consa.config import ConsaConfig
    from megatron_consa.toy import TOY_MODES, legacy_controller_config, run_toy

    torch.set_num_threads(1)
    rows = []
    for (L, G), gran, mode in itertools.product(SHAPES, ("layer", "kv_head"), TOY_MODES):
        units = L if gran == "layer" else L * G
        for target in TARGETS:
            if not _representable(target, units):
                continue
            new = ConsaConfig(granularity=gran, target_sparsity=target)
            for name, cfg in (("old", legacy_controller_config(new, iterations=iterations)), ("new", new)):
                run = run_toy(cfg, num_layers=L, num_kv_heads=G, iterations=iterations, mode=mode)
                tail = run.s_hat[int(0.9 * iterations):]
                rows.append({
                    "controller": name, "shape": f"{L}x{G}", "granularity": gran, "mode": mode, "target": target,
                    "settled_by": _settle_iteration(run.s_hat, target),
                    "tail_gap": max(abs(s - target) for s in tail),
                    "finalize_ok": run.report.settled,
                })
    return rows


def trainer_runs(iterations: int, pretrain_iters: int) -> list[dict]:
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")  # one rank: an in-memory store
    import logging

    import torch

    import megatron_consa  # noqa: F401
    from megatron_consa.config import ConsaConfig
    from megatron_consa.model import ArchitectureConfig, unwrap_model
    from megatron_consa.toy import legacy_controller_config
    from megatron_consa.training.config import ParallelConfig, TrainingConfig
    from megatron_consa.training.data import PeriodicSequenceData
    from megatron_consa.training.loop import ConsaTrainer
    from megatron_consa.training.parallel import initialize_distributed

    logging.getLogger("megatron").setLevel(logging.ERROR)
    torch.set_num_threads(2)
    window, seq = 8, 96
    # the quickstart's model and data (examples/cpu_quickstart.py)
    arch = ArchitectureConfig(
        vocab_size=32, hidden_size=128, intermediate_size=256, num_layers=4, num_attention_heads=8,
        num_kv_heads=4, head_dim=16, qk_norm=True, rope_theta=10000.0, max_position_embeddings=seq,
    )
    common = dict(micro_batch_size=4, global_batch_size=8, seq_length=seq, weight_decay=0.0, log_interval=0)
    data = PeriodicSequenceData(vocab_size=32, seq_length=seq, period=3 * window // 2)
    parallel = ParallelConfig()
    pre = TrainingConfig(train_iters=pretrain_iters, lr=5e-3, min_lr=5e-3, lr_decay_style="constant",
                         lr_warmup_iters=10, **common)
    initialize_distributed(parallel, seed=pre.seed)
    all_fa = ConsaConfig(window=window, allocation=[[1] * 4 for _ in range(4)])
    dense = ConsaTrainer(arch=arch, consa=all_fa, parallel=parallel, training=pre, data=data)
    dense.train()
    dense_state = {k: v.clone() if torch.is_tensor(v) else v for k, v in unwrap_model(dense.chunks[0]).state_dict().items()}
    del dense
    rows = []
    training = TrainingConfig(train_iters=iterations, lr=2e-3, min_lr=2e-4, **common)
    for gran, target in (("kv_head", 0.5), ("kv_head", 0.75), ("layer", 0.5), ("layer", 0.75)):
        new = ConsaConfig(window=window, granularity=gran, target_sparsity=target)
        for name, consa in (("old", legacy_controller_config(new, iterations=iterations)), ("new", new)):
            trainer = ConsaTrainer(arch=arch, consa=consa, parallel=parallel, training=training, data=data)
            unwrap_model(trainer.chunks[0]).load_state_dict(dense_state, strict=False)
            start = time.time()
            history = trainer.train()
            s_hat = [r.s_hat for r in history]
            rows.append({
                "controller": name, "shape": "4x4 (quickstart)", "granularity": gran, "mode": "joint",
                "target": target, "settled_by": _settle_iteration(s_hat, target),
                "tail_gap": max(abs(s - target) for s in s_hat[int(0.9 * iterations):]),
                "finalize_ok": trainer.settle_report().settled, "final_loss": history[-1].loss,
                "seconds": round(time.time() - start, 1),
            })
            print(json.dumps(rows[-1]), flush=True)
            del trainer
    torch.distributed.destroy_process_group()
    return rows


def markdown(rows: list[dict], title: str) -> str:
    out = [f"**{title}**", "", "| controller | cases | settled within 1000 it. (and finalize accepts) | worst settle it. | worst tail gap |",
           "|---|---:|---:|---:|---:|"]
    for name in ("old", "new"):
        s = _summary([r for r in rows if r["controller"] == name])
        if not s["cases"]:
            continue
        worst = "never" if s["worst_settle"] is None else s["worst_settle"]
        out.append(f"| {name} | {s['cases']} | {s['settled_within_1000']} | {worst} | {s['worst_tail_gap']:.4f} |")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--toy-iters", type=int, default=1500, help="iterations per toy run (default 1500)")
    p.add_argument("--trainer-iters", type=int, default=600, help="allocation-phase iterations in the trainer")
    p.add_argument("--pretrain-iters", type=int, default=250, help="dense pretraining of the quickstart model")
    p.add_argument("--skip-trainer", action="store_true", help="toy grid only")
    p.add_argument("--skip-toy", action="store_true", help="real trainer only")
    p.add_argument("--out", type=Path, default=Path("runs/bench_controller"))
    args = p.parse_args(argv)
    import warnings

    from megatron_consa.files import write_json_atomic, write_text_atomic

    warnings.filterwarnings("ignore")
    start = time.time()
    toy = [] if args.skip_toy else toy_grid(args.toy_iters)
    text = [markdown(toy, f"Toy grid ({args.toy_iters} iterations per run, {len(toy) // 2} cases)") if toy else ""]
    print(text[0], flush=True)
    if toy:
        write_json_atomic(args.out / "controller_toy.json", toy)
    trainer = [] if args.skip_trainer else trainer_runs(args.trainer_iters, args.pretrain_iters)
    if trainer:
        text.append(markdown(trainer, f"Quickstart model in ConsaTrainer ({args.trainer_iters} iterations)"))
        text.append("")
        text.append("| controller | granularity | target | settled by it. | tail gap | finalize | final loss |")
        text.append("|---|---|---:|---:|---:|---|---:|")
        for r in trainer:
            settled = "never" if r["settled_by"] is None else r["settled_by"]
            text.append(f"| {r['controller']} | {r['granularity']} | {r['target']} | {settled} | "
                        f"{r['tail_gap']:.4f} | {'accepts' if r['finalize_ok'] else 'refuses'} | {r['final_loss']:.3f} |")
    report = "\n\n".join(text) if not trainer else "\n\n".join(text[:2]) + "\n" + "\n".join(text[2:])
    print(report)
    print(f"\n({time.time() - start:.0f} s)")
    write_text_atomic(args.out / "controller.md", report + "\n")
    write_json_atomic(args.out / "controller.json", {"toy": toy, "trainer": trainer})
    return 0


if __name__ == "__main__":
    sys.exit(main())
