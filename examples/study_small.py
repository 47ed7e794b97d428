"""Small-model study: the ConSA workflow against every rule, at the same budget and continued-training steps.

For each dense start in examples/checkpoints (6 layers, 8 query / 4 KV heads,
pretrained by this repo's entry point, one per pretraining seed), through the
real entry points with torchrun and 2 ranks (DP=2):

* learned: joint learning (gates + weights) at the target -> finalize -> N
  iterations of continued training of the hybrid model (the paper's workflow);
* learned allocation, dense weights: the finalized allocation.json applied to
  the dense start, then the same N iterations (separates the allocation from
  the learning phase's extra training);
* every rule at the same budget (interleave:4, top_swa, bottom_swa,
  uniform_heads, two random draws, the heuristic calibrated on the dense start),
  each from the dense start with the same N iterations;
* all-FA and all-SWA references, with the same N iterations.

Each variant is then evaluated with tools/evaluate.py: perplexity on held-out
text beyond the window, and recall accuracy by distance. Every step writes its
output directory and is skipped when that output exists, so the study resumes
where it stopped; `--parts` runs some steps only.

    python examples/study_small.py --out runs/study_small              # both seeds (about 30 min on 2 cores)
    python examples/study_small.py --out runs/study_small --seeds 1    # one seed
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cpu_workflow import ROOT, Workflow, data_flags, write_corpus  # noqa: E402

STARTS = {seed: ROOT / "examples" / "checkpoints" / f"dense_6l_seed{seed}" for seed in (1, 2)}
RULES = ["interleave:4", "top_swa", "bottom_swa", "uniform_heads", "random:1", "random:2", "heuristic"]
PARTS = ("learn", "continue", "evaluate", "report")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/study_small"), help="output directory (resumed, not replaced)")
    p.add_argument("--seeds", type=int, nargs="+", default=sorted(STARTS), choices=sorted(STARTS),
                   help="pretraining seeds (dense starts) to run")
    p.add_argument("--target", type=float, default=0.75, help="SWA share of KV heads, for every variant")
    p.add_argument("--window", type=int, default=8)
    p.add_argument("--learn-iters", type=int, default=320, help="joint learning phase (controller defaults)")
    p.add_argument("--continue-iters", type=int, default=100, help="continued training, the same for every variant")
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    p.add_argument("--nproc", type=int, default=2)
    return p.parse_args(argv)


def _done(save: Path) -> bool:
    return (save / "latest_checkpointed_iteration.txt").is_file()


def run_seed(args, seed: int) -> None:
    start = STARTS[seed]
    out = args.out / f"seed{seed}"
    out.mkdir(parents=True, exist_ok=True)
    flow = Workflow(out, args.nproc)
    if not (out / "data" / "corpus_text_document.idx").exists():
        flow.run("preprocess", [sys.executable, "tools/preprocess_data.py", "--input", str(write_corpus(out)),
                                "--output-prefix", str(out / "data" / "corpus"), "--tokenizer-type",
                                "SentencePieceTokenizer", "--tokenizer-model", str(start / "tokenizer.model"),
                                "--workers", "2"])
    common = ["--hf-config", str(start), "--consa-window", str(args.window)] + data_flags(out, start / "tokenizer.model")
    target = ["--consa-target-sparsity", str(args.target)]
    lr = ["--lr", "1e-3", "--min-lr", "1e-4"]
    if "learn" in args.parts:
        if not _done(out / "learn"):
            flow.train(f"seed {seed}: learn (joint, target {args.target})", common + lr + [
                *target, "--load", str(start), "--consa-phase", "learn", "--consa-granularity", "kv_head",
                "--train-iters", str(args.learn_iters), "--log-interval", "40", "--save", str(out / "learn"),
                "--no-save-optim"])
        if not (out / "finalized" / "allocation.json").exists():
            flow.run(f"seed {seed}: finalize", [sys.executable, "tools/finalize_allocation.py", "--load",
                                                str(out / "learn"), "--save", str(out / "finalized")])
    if "continue" in args.parts:
        for name, load, allocation in variants(out, start):
            save = out / "continued" / name
            if _done(save):
                continue
            if allocation == "heuristic" and not (out / "heuristic_scores.json").is_file():
                print(f"seed {seed}: {name} skipped: no {out / 'heuristic_scores.json'} yet (calibrate first)")
                continue
            budget = target if allocation in RULES else []  # all_fa/all_swa/files carry their own
            flow.train(f"seed {seed}: continued training, {name}", common + lr + budget + [
                "--load", str(load), "--consa-phase", "fixed", *(["--consa-allocation", allocation] if allocation else []),
                "--train-iters", str(args.continue_iters), "--log-interval", "50", "--save", str(save),
                "--no-save-optim", *(["--calibration-scores", str(out / "heuristic_scores.json")]
                                     if allocation == "heuristic" else [])])


def variants(out: Path, start: Path) -> list[tuple[str, Path, str | None]]:
    """(name, checkpoint to start from, allocation file or preset; None: the checkpoint's own)."""
    rows = [("learned", out / "finalized" / "checkpoint", None),
            ("learned allocation, dense weights", start, str(out / "finalized" / "allocation.json"))]
    rows += [(rule, start, rule) for rule in RULES]
    rows += [("all_fa", start, "all_fa"), ("all_swa", start, "all_swa")]
    return [(name.replace(" ", "_").replace(",", "").replace(":", "_"), load, alloc) for name, load, alloc in rows]


def main(argv=None) -> int:
    args = parse_args(argv)
    for seed in args.seeds:
        run_seed(args, seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
