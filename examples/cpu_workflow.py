"""The whole ConSA workflow on a CPU, through the real entry points and torchrun with 2 ranks.

What `make demo` runs (about 8 minutes on 2 cores, no downloads):

1. corpus: the Python standard library's sources mixed with a long-range recall
   task (a key of random words, repeated; `megatron_consa.data.demo_corpus`);
2. tools/preprocess_data.py: a sentencepiece tokenizer trained on it, .bin/.idx;
3. dense pretraining: `--consa-phase fixed --consa-allocation all_fa` (the stand-in
   for the pretrained checkpoint ConSA normally starts from), DP=2;
4. learn: gates + augmented Lagrangian at every controller default, target sparsity
   0.75 at KV-head granularity, TP=2;
5. tools/finalize_allocation.py: allocation.json at the exact budget, heatmap PNG,
   fixed-mode checkpoint;
6. fixed: continued training of the hybrid model, PP=2;
7. recall accuracy beyond the window: hybrid vs all-FA vs all-SWA.

    python examples/cpu_workflow.py --out runs/demo
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="output directory (replaced)")
    p.add_argument("--pretrain-iters", type=int, default=400)
    p.add_argument("--learn-iters", type=int, default=400, help="allocation phase (more than the 200 warm-up)")
    p.add_argument("--fixed-iters", type=int, default=100)
    p.add_argument("--target", type=float, default=0.75, help="SWA share of KV heads")
    p.add_argument("--window", type=int, default=8)
    p.add_argument("--nproc", type=int, default=2, help="ranks per phase (torchrun --nproc-per-node)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    out = args.out
    if out.exists():
        import shutil

        shutil.rmtree(out)
    out.mkdir(parents=True)
    py = sys.executable
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    start = time.time()

    def step(title: str, cmd: list[str]) -> None:
        print(f"\n=== {title} ({time.time() - start:.0f} s)\n$ {' '.join(cmd)}", flush=True)
        proc = subprocess.run(cmd, env=env, cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        lines = [l for l in proc.stdout.splitlines() if not l.startswith(("W1", "[W", "  warnings.warn", "/"))
                 and "Warning" not in l and "warn(" not in l]
        print("\n".join(lines[-25:]), flush=True)
        if proc.returncode != 0:
            raise SystemExit(f"error: step '{title}' failed (exit {proc.returncode})")

    from megatron_consa.data.demo_corpus import write_demo_corpus

    key_words = 12
    stats = write_demo_corpus(out / "corpus.jsonl", text_documents=150, recall=1500, key_words=key_words, repeats=6)
    print(f"corpus: {stats['documents']} documents ({stats['recall']} recall) -> {out / 'corpus.jsonl'}")
    step("preprocess", [py, "tools/preprocess_data.py", "--input", str(out / "corpus.jsonl"), "--output-prefix",
                        str(out / "data" / "corpus"), "--train-sentencepiece", "512", "--workers", "2"])
    torchrun = [py, "-m", "torch.distributed.run", "--nproc-per-node", str(args.nproc), "--master-port",
                str(_free_port()), "-m", "megatron_consa.train"]
    common = [
        "--data-path", str(out / "data" / "corpus_text_document"), "--split", "95,5,0",
        "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", str(out / "data" / "corpus.model"),
        "--num-layers", "4", "--hidden-size", "128", "--ffn-hidden-size", "256", "--num-attention-heads", "8",
        "--num-query-groups", "4", "--kv-channels", "16", "--qk-layernorm", "--rotary-base", "10000",
        "--seq-length", "128", "--micro-batch-size", "4", "--global-batch-size", "8", "--weight-decay", "0",
        "--consa-window", str(args.window), "--eval-iters", "4",
    ]
    step("dense pretraining (all FA), DP=2", torchrun + common + [
        "--consa-phase", "fixed", "--consa-allocation", "all_fa", "--train-iters", str(args.pretrain_iters),
        "--lr", "3e-3", "--min-lr", "3e-3", "--lr-decay-style", "constant", "--lr-warmup-iters", "10",
        "--log-interval", "50", "--eval-interval", str(args.pretrain_iters), "--save", str(out / "pretrain")])
    step(f"learn the allocation (target sparsity {args.target}), TP=2", torchrun + common + [
        "--tensor-model-parallel-size", "2", "--load", str(out / "pretrain"), "--finetune",
        "--consa-phase", "learn", "--consa-granularity", "kv_head", "--consa-target-sparsity", str(args.target),
        "--train-iters", str(args.learn_iters), "--lr", "1e-3", "--min-lr", "1e-4", "--log-interval", "50",
        "--save", str(out / "learn"), "--tensorboard-dir", str(out / "tensorboard" / "learn")])
    step("finalize", [py, "tools/finalize_allocation.py", "--load", str(out / "learn"), "--save",
                      str(out / "finalized")])
    step("continued training of the hybrid model, PP=2", torchrun + common + [
        "--pipeline-model-parallel-size", "2", "--load", str(out / "finalized" / "checkpoint"),
        "--consa-phase", "fixed", "--train-iters", str(args.fixed_iters), "--lr", "1e-3", "--min-lr", "1e-4",
        "--log-interval", "25", "--eval-interval", str(args.fixed_iters), "--save", str(out / "fixed")])

    print(f"\n=== recall beyond the window ({time.time() - start:.0f} s)", flush=True)
    results = _recall_table(out, window=args.window, key_words=key_words)
    (out / "recall.json").write_text(json.dumps(results, indent=1))
    from megatron_consa.allocation import Allocation

    allocation = Allocation.load(out / "finalized" / "allocation.json")
    print("\n" + allocation.summary())
    print("\n| model | KV heads SWA | recall accuracy beyond the window |\n|---|---:|---:|")
    for row in results:
        print(f"| {row['model']} | {row['swa_share']:.2f} | {row['accuracy']:.3f} |")
    print(f"\nallocation: {out / 'finalized' / 'allocation.json'}\nheatmap:    {out / 'finalized' / 'allocation_heatmap.png'}"
          f"\nTensorBoard: {out / 'tensorboard'}\n(total {time.time() - start:.0f} s)")
    return 0


def _recall_table(out: Path, *, window: int, key_words: int) -> list[dict]:
    from megatron_consa.data.demo_corpus import recall_documents
    from megatron_consa.data.tokenizer import build_tokenizer
    from megatron_consa.evaluation.recall import checkpoint_logits_fn, recall_accuracy
    from megatron_consa.training.checkpoint import read_checkpoint_meta, resolve_load_dir

    import torch

    torch.set_num_threads(2)
    tok = build_tokenizer("SentencePieceTokenizer", str(out / "data" / "corpus.model"))
    docs = recall_documents(32, key_words=key_words, repeats=6, seed=10_000)  # held out: another seed
    meta = read_checkpoint_meta(resolve_load_dir(out / "pretrain"))
    L, G = meta["architecture"]["num_layers"], meta["architecture"]["num_kv_heads"]
    hybrid = (read_checkpoint_meta(resolve_load_dir(out / "fixed"))["consa"])["allocation"]
    cases = [
        ("dense model, all FA", out / "pretrain", [[1] * G for _ in range(L)]),
        ("dense model, all SWA", out / "pretrain", [[0] * G for _ in range(L)]),
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


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    sys.exit(main())
