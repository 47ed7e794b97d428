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
* all-FA and all-SWA references, with the same N iterations;
* controls with as many weight updates as the learned workflow in all (the
  heuristic and all-FA, learn + N iterations from the dense start): the
  learned row trains longer than the others, and these say how much of its
  lead is that.

Each variant is then evaluated with tools/evaluate.py: perplexity beyond the
window on held-out text and on held-out recall documents (whose repeated key
lies beyond the window); each learned map is analysed against the heuristic,
the single-head ablation ranking and the other seed's map. Every step writes its
output directory and is skipped when that output exists, so the study resumes
where it stopped; `--parts` runs some steps only.

    python examples/study_small.py --out runs/study_small              # both seeds (about 20 min on 2 cores)
    python examples/study_small.py --out runs/study_small --seeds 1    # one seed
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cpu_workflow import (  # noqa: E402
    KEY_WORDS, REPEATS, ROOT, TRAIN_TEXT_DOCUMENTS, Workflow, absolute_path, data_flags, learned_map_row, write_corpus,
)

from megatron_consa.files import write_text_atomic  # noqa: E402

STARTS = {seed: ROOT / "examples" / "checkpoints" / f"dense_6l_seed{seed}" for seed in (1, 2)}
RULES = ["interleave:4", "top_swa", "bottom_swa", "uniform_heads", "random:1", "random:2", "heuristic"]
PARTS = ("learn", "continue", "evaluate", "report")
SAME_TOTAL_CONTROLS = ["heuristic", "all_fa"]
"""Trained as many steps as the learned workflow in all (joint learning + continued training)."""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", type=absolute_path, default="runs/study_small", help="output directory (resumed, not replaced)")
    p.add_argument("--seeds", type=int, nargs="+", default=sorted(STARTS), choices=sorted(STARTS),
                   help="pretraining seeds (dense starts) to run")
    p.add_argument("--target", type=float, default=0.75, help="SWA share of KV heads, for every variant")
    p.add_argument("--window", type=int, default=8)
    p.add_argument("--learn-iters", type=int, default=320, help="joint learning phase (controller defaults)")
    p.add_argument("--continue-iters", type=int, default=100, help="continued training, the same for every variant")
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    p.add_argument("--nproc", type=int, default=2, help="ranks per run (data parallel; 4 sequences each per iteration)")
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
    common = ["--hf-config", str(start), "--consa-window", str(args.window)] + data_flags(
        out, start / "tokenizer.model", global_batch_size=4 * args.nproc)  # 4 sequences per data-parallel rank
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
    scores = out / "heuristic_scores.json"
    if "continue" in args.parts:
        if not scores.is_file():
            flow.run(f"seed {seed}: heuristic scores (attention mass beyond the window, dense model)", [
                sys.executable, "tools/calibrate_heuristic.py", "--load", str(start), "--text",
                str(out / "corpus.jsonl"), "--seq-length", "128", "--num-sequences", "32", "--window",
                str(args.window), "--output", str(scores), "--no-progress"])
        for name, load, allocation, same_total in variants(out, start):
            save = out / "continued" / name
            if _done(save):
                continue
            budget = target if allocation in RULES else []  # all_fa/all_swa/files carry their own
            flow.train(f"seed {seed}: continued training, {name}", common + lr + budget + [
                "--load", str(load), "--consa-phase", "fixed", *(["--consa-allocation", allocation] if allocation else []),
                "--train-iters", str(args.continue_iters + (args.learn_iters if same_total else 0)),
                "--log-interval", "50", "--save", str(save),
                "--no-save-optim", *(["--consa-calibration-scores", str(scores)] if allocation == "heuristic" else [])])
    if "evaluate" in args.parts:
        held_out = write_held_out(out, seed)
        for name, *_ in variants(out, start):
            for kind, path in held_out.items():
                report = out / "eval" / f"{name}.{kind}.json"
                if not report.is_file():
                    flow.run(f"seed {seed}: evaluate {name} on held-out {kind}", [
                        sys.executable, "tools/evaluate.py", "--load", str(out / "continued" / name), "--allocation",
                        "checkpoint", "--text", str(path), "--seq-length", "128", "--num-sequences", "64",
                        "--output", str(report), "--no-progress"])
        ablation = out / "ablation_scores.json"
        if not ablation.is_file():
            flow.run(f"seed {seed}: ablation ranking (loss increase when one KV head alone is SWA, dense model)", [
                sys.executable, "tools/calibrate_heuristic.py", "--mode", "ablation", "--load", str(start), "--text",
                str(held_out["text"]), "--seq-length", "128", "--num-sequences", "32", "--window", str(args.window),
                "--output", str(ablation), "--no-progress"])


def analyze(args) -> None:
    """Each seed's learned map against the heuristic, the ablation ranking and the other seeds' learned maps."""
    flow = Workflow(args.out, args.nproc)
    for seed in args.seeds:
        out = args.out / f"seed{seed}"
        if (out / "analysis.json").is_file() or not (out / "finalized" / "allocation.json").is_file():
            continue
        compare = [out / "heuristic_scores.json", out / "ablation_scores.json"] + [
            args.out / f"seed{other}" / "finalized" / "allocation.json" for other in args.seeds if other != seed]
        flow.run(f"seed {seed}: analyze the learned allocation", [
            sys.executable, "tools/analyze_allocation.py", "--allocation", str(out / "finalized" / "allocation.json"),
            *sum((["--compare", str(f)] for f in compare if f.is_file()), []),
            "--heatmap", str(out / "allocation_heatmap.png"), "--output", str(out / "analysis.json")])


def write_held_out(out: Path, seed: int) -> dict[str, Path]:
    """Text the runs never trained on: stdlib files the corpus took no chunk from, and recall documents of another
    seed. Made afresh on every call (a few ms): where an output directory holds other text (an earlier version's),
    it is replaced and what was computed from it (evaluations; the ablation ranking and the analysis) is removed,
    so a resumed study evaluates this version's text."""
    from megatron_consa.data.demo_corpus import held_out_stdlib_documents, recall_documents
    from megatron_consa.files import atomic_output

    files = {"text": out / "held_out_text.jsonl", "recall": out / "held_out_recall.jsonl"}
    text = held_out_stdlib_documents(after_documents=TRAIN_TEXT_DOCUMENTS, max_documents=64)
    recall = recall_documents(64, key_words=KEY_WORDS, repeats=REPEATS, seed=10_000 + seed)
    for kind, docs in (("text", text), ("recall", recall)):
        content = "".join(json.dumps({"text": d}) + "\n" for d in docs)
        if files[kind].is_file() and files[kind].read_text() == content:
            continue
        stale = list((out / "eval").glob(f"*.{kind}.json"))
        if kind == "text":  # (the ablation ranks heads by their loss on it; the analysis compares with that)
            stale += [f for f in (out / "ablation_scores.json", out / "analysis.json") if f.is_file()]
        for f in stale:
            f.unlink()
        with atomic_output(files[kind]) as tmp:
            tmp.write_text(content)
    return files


def variants(out: Path, start: Path) -> list[tuple[str, Path, str | None, bool]]:
    """(name, checkpoint to start from, allocation file or preset (None: the checkpoint's own), same_total).

    same_total: trained for learn + continue iterations from the dense start, as many weight updates as the
    learned workflow's joint learning plus continued training (a control: the learned row trains longer)."""
    rows = [("learned", out / "finalized" / "checkpoint", None, False),
            ("learned allocation, dense weights", start, str(out / "finalized" / "allocation.json"), False)]
    rows += [(rule, start, rule, False) for rule in RULES]
    rows += [("all_fa", start, "all_fa", False), ("all_swa", start, "all_swa", False)]
    rows += [(f"{rule}, same total steps", start, rule, True) for rule in SAME_TOTAL_CONTROLS]
    return [(name.replace(" ", "_").replace(",", "").replace(":", "_"), load, alloc, same_total)
            for name, load, alloc, same_total in rows]


def report(args) -> tuple[str, dict]:
    """Perplexity beyond the window per variant and seed (held-out text, held-out recall), the seed mean and spread;
    the learned maps' pattern statistics. Markdown, and the same numbers as JSON."""
    seeds = [seed for seed in args.seeds if (args.out / f"seed{seed}" / "eval").is_dir()]
    names = [name for name, *_ in variants(args.out / "seed1", STARTS[1])]
    summary: dict = {"target": args.target, "window": args.window, "learn_iters": args.learn_iters,
                     "continue_iters": args.continue_iters, "seeds": seeds, "variants": {}, "learned_maps": {}}
    lines = [f"Perplexity beyond the window (W={args.window}) after {args.continue_iters} iterations of continued "
             f"training, target sparsity {args.target} (all_fa/all_swa: 0 and 1), seeds {seeds}; held-out text "
             "(64 x 128 tokens) and held-out recall documents. Lower is better.", "",
             "| variant | " + " | ".join(f"text s{s} | recall s{s}" for s in seeds) + " | text mean | recall mean |",
             "|---|" + "---:|" * (2 * len(seeds) + 2)]
    for name in names:
        cells, values = [], {"text": [], "recall": []}
        for seed in seeds:
            for kind in ("text", "recall"):
                f = args.out / f"seed{seed}" / "eval" / f"{name}.{kind}.json"
                value = json.loads(f.read_text())["allocations"][0]["perplexity"]["perplexity_beyond_window"] \
                    if f.is_file() else float("nan")
                cells.append(f"{value:.3f}")
                values[kind].append(value)
        means = {kind: sum(v) / len(v) if v else float("nan") for kind, v in values.items()}
        summary["variants"][name] = {"per_seed": {str(s): {k: values[k][i] for k in values} for i, s in enumerate(seeds)},
                                     "mean": means}
        label = f"**{name}**" if name == "learned" else name
        lines.append(f"| {label} | " + " | ".join(cells) + " | " + " | ".join(f"{m:.3f}" for m in means.values()) + " |")
    maps = [(seed, json.loads(f.read_text())) for seed in seeds
            if (f := args.out / f"seed{seed}" / "analysis.json").is_file()]
    if maps:
        lines += ["", "| learned map | FA bottom / middle / top third | FA depth centroid | FA layer blocks | vs heuristic "
                  "(Jaccard, shared / chance) | vs ablation | vs the other seed |", "|---|---:|---:|---:|---:|---:|---:|"]
        for seed, a in maps:
            summary["learned_maps"][str(seed)] = {
                "stats": a["stats"], "overlaps": {c["kind"]: c["overlap"] for c in a["comparisons"]}}
            lines.append(learned_map_row(f"seed {seed}", a))
    return "\n".join(lines) + "\n", summary


def main(argv=None) -> int:
    args = parse_args(argv)
    for seed in args.seeds:
        run_seed(args, seed)
    if "evaluate" in args.parts:
        analyze(args)
    if "report" in args.parts:
        table, summary = report(args)
        write_text_atomic(args.out / "study_small.md", table)
        write_text_atomic(args.out / "study_small.json", json.dumps(summary, indent=1) + "\n")
        print("\n" + table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
