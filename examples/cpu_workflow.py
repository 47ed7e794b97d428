"""The ConSA workflow on a CPU, through the real entry points and torchrun with 2 ranks.

`make demo` runs it (under 3 minutes on 2 cores, plus the install; no downloads):

1. corpus: the Python standard library's own sources mixed with a long-range
   recall task (a key of random words, repeated; `megatron_consa.data.demo_corpus`);
2. tools/preprocess_data.py: .bin/.idx with the start checkpoint's tokenizer;
3. learn: gates + augmented Lagrangian at every controller default, target sparsity
   0.75 at KV-head granularity, TP=2, starting from the dense (all-FA) model the
   repo ships in examples/checkpoints/demo_dense (ConSA starts from a pretrained model);
4. tools/finalize_allocation.py: allocation.json at the exact budget, heatmap PNG,
   fixed-mode checkpoint;
5. fixed: continued training of the hybrid model, PP=2;
6. recall accuracy beyond the window: the hybrid vs the dense model run all-FA and all-SWA.

    python examples/cpu_workflow.py --out runs/demo              # make demo
    python examples/cpu_workflow.py --out runs/workflow --pretrain
        # make workflow: pretrain the dense start too (sentencepiece trained on the corpus), then 2-6
    python examples/cpu_workflow.py --make-start examples/checkpoints/demo_dense
        # the command that made the shipped dense checkpoint (pretraining only)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHIPPED_START = ROOT / "examples" / "checkpoints" / "demo_dense"
KEY_WORDS, REPEATS = 12, 6
"""The recall task: a key of 12 random words, repeated 6 times per document."""
TRAIN_TEXT_DOCUMENTS = 150
"""Standard-library chunks in the corpus (the first ones, in sorted path order); later ones are held out."""


def absolute_path(text: str) -> Path:
    """An argparse type: the path made absolute against the caller's working directory (the
    tools run with the repository as theirs)."""
    return Path(text).expanduser().resolve()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", type=absolute_path, default="runs/demo", help="output directory (replaced)")
    p.add_argument("--start", type=absolute_path, default=SHIPPED_START,
                   help="dense checkpoint (with tokenizer.model and config.json) the allocation is learned from")
    p.add_argument("--pretrain", action="store_true",
                   help="pretrain the dense start here instead of using --start (adds about 1.5 minutes)")
    p.add_argument("--make-start", type=absolute_path, metavar="DIR",
                   help="only pretrain a dense start checkpoint and write it to DIR (how --start's default was made)")
    p.add_argument("--pretrain-iters", type=int, default=400, help="iterations of a pretrained start")
    p.add_argument("--num-layers", type=int, default=4, help="layers of a pretrained start")
    p.add_argument("--seed", type=int, default=1234, help="seed of a pretrained start")
    p.add_argument("--learn-iters", type=int, default=320,
                   help="allocation phase: the 200-iteration target warm-up, then settling on the target")
    p.add_argument("--fixed-iters", type=int, default=100, help="continued training of the hybrid model")
    p.add_argument("--target", type=float, default=0.75, help="SWA share of KV heads")
    p.add_argument("--window", type=int, default=8, help="SWA window (the recall key repeats further apart)")
    p.add_argument("--nproc", type=_even_ranks, default=2,
                   help="ranks per phase (torchrun --nproc-per-node): even, as learn runs TP=2 and the fixed phase "
                        "PP=2; the global batch is 4 sequences per data-parallel rank")
    return p.parse_args(argv)


MARKER = ".cpu_workflow_run"
"""The file that marks --out as this workflow's: a later run replaces such a directory only."""


def _even_ranks(text: str) -> int:
    n = int(text)
    if n < 2 or n % 2:
        raise argparse.ArgumentTypeError(f"{n}: the workflow's layouts (TP=2, PP=2) need an even number of ranks >= 2")
    return n


class Workflow:
    """The steps, each a real command line (printed), run from the repository root."""

    def __init__(self, out: Path, nproc: int):
        self.out, self.nproc, self.start_time = out, nproc, time.time()
        threads = max(1, (os.cpu_count() or 1) // nproc)  # the cores shared by the ranks of a training launch
        self.env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": str(threads)}

    def run(self, title: str, cmd: list[str], keep_last: int = 20) -> float:
        """Run one step; its wall time in seconds."""
        print(f"\n=== {title} ({self.elapsed()})\n$ {' '.join(cmd)}", flush=True)
        start = time.time()
        proc = subprocess.run(cmd, env=self.env, cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        lines = [line for line in proc.stdout.splitlines() if not _noise(line)]
        print("\n".join(lines[-keep_last:]), flush=True)
        if proc.returncode != 0:
            raise SystemExit(f"error: step '{title}' failed (exit {proc.returncode})")
        return time.time() - start

    def train(self, title: str, args: list[str]) -> float:
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(self.nproc),
                    "--standalone", "-m", "megatron_consa.train"]  # torchrun picks its own port: no race
        return self.run(title, torchrun + args)

    def elapsed(self) -> str:
        return f"{time.time() - self.start_time:.0f} s"


def learned_map_row(label: str, analysis: dict) -> str:
    """A markdown row of a learned map's patterns (tools/analyze_allocation.py --output JSON): FA share per depth
    third, depth centroid, FA blocks, and its overlap (Jaccard, shared / chance) with the attention-mass heuristic,
    the ablation ranking and another learned allocation ("-" where not compared)."""
    st = analysis["stats"]
    overlaps = {c["kind"]: c["overlap"] for c in analysis["comparisons"]}

    def cell(kind: str) -> str:
        o = overlaps.get(kind)
        return "-" if o is None else f"{o['jaccard']:.2f} ({o['shared_fa']} / {o['chance_shared_fa']:.1f})"

    return (f"| {label} | {' / '.join(f'{x:.2f}' for x in st['fa_fraction_by_third'])} | "
            f"{st['fa_depth_centroid']:.3f} | {st['num_fa_blocks']} | {cell('attention_mass')} | {cell('ablation')} | "
            f"{cell('allocation')} |")


def _noise(line: str) -> bool:
    """torchrun's and the libraries' warnings (the tools' own lines are kept)."""
    return line.startswith(("W1", "[W", "  warnings.warn", "/")) or "Warning" in line or "warn(" in line


def write_corpus(out: Path) -> Path:
    from megatron_consa.data.demo_corpus import write_demo_corpus

    stats = write_demo_corpus(out / "corpus.jsonl", text_documents=TRAIN_TEXT_DOCUMENTS, recall=1500, key_words=KEY_WORDS,
                              repeats=REPEATS)
    print(f"corpus: {stats['documents']} documents ({stats['recall']} recall) -> {out / 'corpus.jsonl'}")
    return out / "corpus.jsonl"


def data_flags(out: Path, tokenizer_model: Path, global_batch_size: int = 8) -> list[str]:
    return ["--data-path", str(out / "data" / "corpus_text_document"), "--split", "95,5,0",
            "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", str(tokenizer_model),
            "--seq-length", "128", "--micro-batch-size", "4", "--global-batch-size", str(global_batch_size),
            "--weight-decay", "0", "--eval-iters", "4"]


def pretrain(flow: Workflow, args) -> Path:
    """Sentencepiece on the corpus, then a dense (all-FA) model, saved weights-only; returns its directory."""
    out = flow.out
    flow.run("preprocess (a sentencepiece tokenizer trained on the corpus)", [
        sys.executable, "tools/preprocess_data.py", "--input", str(write_corpus(out)), "--output-prefix",
        str(out / "data" / "corpus"), "--train-sentencepiece", "512", "--workers", "2"])
    model = ["--num-layers", str(args.num_layers), "--hidden-size", "128", "--ffn-hidden-size", "256",
             "--num-attention-heads", "8", "--num-query-groups", "4", "--kv-channels", "16", "--qk-layernorm",
             "--rotary-base", "10000"]
    flow.train(f"dense pretraining (all FA), DP={flow.nproc}", model + data_flags(
            out, out / "data" / "corpus.model", global_batch_size=4 * flow.nproc) + [
        "--consa-phase", "fixed", "--consa-allocation", "all_fa", "--consa-window", str(args.window),
        "--train-iters", str(args.pretrain_iters), "--lr", "3e-3", "--min-lr", "3e-3", "--lr-decay-style",
        "constant", "--lr-warmup-iters", "10", "--seed", str(args.seed), "--log-interval", "50", "--eval-interval",
        str(args.pretrain_iters), "--save", str(out / "pretrain"), "--no-save-optim"])
    from megatron_consa.training.checkpoint import resolve_load_dir

    return resolve_load_dir(out / "pretrain")


def learn_finalize_fixed(flow: Workflow, args, start: Path) -> dict:
    out = flow.out
    if not (start / "tokenizer.model").is_file() or not (start / "config.json").is_file():
        raise SystemExit(f"error: --start {start}: not a dense start checkpoint (needs tokenizer.model and "
                         "config.json; make one with --make-start DIR)")
    if not (out / "data" / "corpus_text_document.idx").exists():
        flow.run("preprocess", [
            sys.executable, "tools/preprocess_data.py", "--input", str(write_corpus(out)), "--output-prefix",
            str(out / "data" / "corpus"), "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model",
            str(start / "tokenizer.model"), "--workers", "2"])
    # TP=2 and PP=2 leave nproc / 2 data-parallel ranks: one micro-batch of 4 sequences each per iteration.
    common = ["--hf-config", str(start), "--consa-window", str(args.window)] + data_flags(
        out, start / "tokenizer.model", global_batch_size=4 * (flow.nproc // 2))
    flow.train(f"learn the allocation (target sparsity {args.target}), TP=2", common + [
        "--tensor-model-parallel-size", "2", "--load", str(start), "--consa-phase", "learn",
        "--consa-granularity", "kv_head", "--consa-target-sparsity", str(args.target),
        "--train-iters", str(args.learn_iters), "--lr", "1e-3", "--min-lr", "1e-4", "--log-interval", "40",
        "--save", str(out / "learn"), "--tensorboard-dir", str(out / "tensorboard" / "learn")])
    flow.run("finalize", [sys.executable, "tools/finalize_allocation.py", "--load", str(out / "learn"), "--save",
                          str(out / "finalized")])
    flow.train("continued training of the hybrid model, PP=2", common + [
        "--pipeline-model-parallel-size", "2", "--load", str(out / "finalized" / "checkpoint"),
        "--consa-phase", "fixed", "--train-iters", str(args.fixed_iters), "--lr", "1e-3", "--min-lr", "1e-4",
        "--log-interval", "25", "--eval-interval", str(args.fixed_iters), "--save", str(out / "fixed"),
        "--tensorboard-dir", str(out / "tensorboard" / "fixed")])
    print(f"\n=== recall beyond the window ({flow.elapsed()})", flush=True)
    rows = _recall_table(out, start, window=args.window)
    (out / "recall.json").write_text(json.dumps(rows, indent=1))
    return {"recall": rows}


def _recall_table(out: Path, start: Path, *, window: int) -> list[dict]:
    import torch

    from megatron_consa.data.demo_corpus import recall_documents
    from megatron_consa.data.tokenizer import build_tokenizer
    from megatron_consa.evaluation.recall import checkpoint_logits_fn, recall_accuracy
    from megatron_consa.training.checkpoint import read_checkpoint_meta, resolve_load_dir

    torch.set_num_threads(2)
    tok = build_tokenizer("SentencePieceTokenizer", str(start / "tokenizer.model"))
    docs = recall_documents(32, key_words=KEY_WORDS, repeats=REPEATS, seed=10_000)  # held out: another seed
    arch = read_checkpoint_meta(start)["architecture"]
    L, G = arch["num_layers"], arch["num_kv_heads"]
    hybrid = read_checkpoint_meta(resolve_load_dir(out / "fixed"))["consa"]["allocation"]
    cases = [
        ("dense model, all FA", start, [[1] * G for _ in range(L)]),
        ("dense model, all SWA", start, [[0] * G for _ in range(L)]),
        ("ConSA hybrid after continued training", out / "fixed", hybrid),
    ]
    rows = []
    for name, ckpt, fa in cases:
        fn, close = checkpoint_logits_fn(ckpt, fa, window=window)
        try:
            r = recall_accuracy(fn, tok, docs, window=window, seq_length=128)
        finally:
            close()
        rows.append({"model": name, "accuracy": r.accuracy, "positions": r.scored_positions,
                     "swa_share": 1 - sum(map(sum, fa)) / (L * G)})
    return rows


def make_start(args) -> int:
    """Pretrain a dense start in a scratch directory, then move its checkpoint to --make-start (atomically)."""
    target = args.make_start.resolve()
    if target.exists():
        raise SystemExit(f"error: --make-start {target} exists: remove it first")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".make-start-", dir=target.parent) as scratch:
        flow = Workflow(Path(scratch), args.nproc)
        checkpoint = pretrain(flow, args)
        checkpoint.rename(target)
    print(f"\ndense start checkpoint: {target} ({sum(f.stat().st_size for f in target.iterdir()) / 1e6:.1f} MB)")
    return 0


def main(argv=None) -> int:
    import logging
    import warnings

    from megatron_consa.cli import setup_logging

    warnings.simplefilter("ignore")  # this process only loads checkpoints for the recall table
    setup_logging(level=logging.WARNING)
    args = parse_args(argv)
    if args.make_start:
        return make_start(args)
    out = args.out
    if out.exists() and any(out.iterdir()):
        # never delete a directory this workflow did not write (runs before the marker: their corpus)
        if not (out / MARKER).is_file() and not (out / "corpus.jsonl").is_file():
            raise SystemExit(f"error: --out {out}: exists, is not empty and is not a run of this workflow "
                             f"(no {MARKER}); choose another directory")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("written by examples/cpu_workflow.py; a next run with this --out replaces it\n")
    flow = Workflow(out, args.nproc)
    start = pretrain(flow, args) if args.pretrain else args.start.resolve()
    results = learn_finalize_fixed(flow, args, start)

    from megatron_consa.allocation import Allocation

    allocation = Allocation.load(out / "finalized" / "allocation.json")
    print("\n" + allocation.summary())
    print("\n| model | KV heads SWA | recall accuracy beyond the window |\n|---|---:|---:|")
    for row in results["recall"]:
        print(f"| {row['model']} | {row['swa_share']:.2f} | {row['accuracy']:.3f} |")
    print(f"\nallocation:  {out / 'finalized' / 'allocation.json'}"
          f"\nheatmap:     {out / 'finalized' / 'allocation_heatmap.png'}"
          f"\nrecall:      {out / 'recall.json'}"
          f"\nTensorBoard: {out / 'tensorboard'}\n(total {flow.elapsed()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
