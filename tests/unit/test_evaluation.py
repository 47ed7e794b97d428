"""tools/evaluate.py and megatron_consa.evaluation against independent computations.

* perplexity (overall and beyond the window) equals a direct computation with a model
  the test builds itself from the checkpoint, on token rows it cuts itself;
* the retrieval generators put the needle's value at the requested distance, checked
  on the tokens, with a sentencepiece and a Hugging Face tokenizer;
* retrieval scoring counts exactly the samples an oracle gets right;
* the KV bytes equal the formula.

The checkpoint is the shipped dense demo model (`make demo`'s start: 4 layers x 4 KV
heads, window 8, its sentencepiece tokenizer beside it).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import re
import sys
from pathlib import Path

import pytest
import torch

from megatron_consa.allocation import make_preset
from megatron_consa.cli import run_tool
from megatron_consa.data.demo_corpus import stdlib_documents
from megatron_consa.data.tokenizer import HuggingFaceTokenizer, SentencePieceTokenizer
from megatron_consa.evaluation.retrieval import (
    KV_QUESTION,
    PASSKEY_NEEDLE_PREFIX,
    PASSKEY_QUESTION,
    RetrievalConfig,
    kv_recall_samples,
    passkey_samples,
    score_retrieval,
)

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "examples" / "checkpoints" / "demo_dense"
sys.path.insert(0, str(ROOT / "tests"))

from tokenizer_fixtures import hf_tokenizer_dir  # noqa: E402

W = 8  # the demo checkpoint's window


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


EVALUATE = _tool("evaluate")


@pytest.fixture(scope="module")
def docs() -> list[str]:
    return list(stdlib_documents(max_documents=8, chars=600))


@pytest.fixture(scope="module")
def tokenizers(docs, tmp_path_factory):
    hf_dir = hf_tokenizer_dir(docs * 4, tmp_path_factory.mktemp("hf_tok"))
    bos_dir = hf_tokenizer_dir(docs * 4, tmp_path_factory.mktemp("hf_bos_tok"), special="bos")  # as Llama's
    return {"sentencepiece": SentencePieceTokenizer(DEMO / "tokenizer.model"), "hf": HuggingFaceTokenizer(hf_dir),
            "hf_bos": HuggingFaceTokenizer(bos_dir)}


# ----------------------------------------------------------------------------- perplexity and KV bytes


def _direct_nll(rows: list[list[int]], fa) -> tuple[float, float]:
    """Mean NLL over all positions and over positions >= W, with a model built here from the checkpoint."""
    from megatron_consa.architecture import ArchitectureConfig
    from megatron_consa.config import ConsaConfig
    from megatron_consa.model import build_gpt_model, build_transformer_config
    from megatron_consa.training.checkpoint import load_model_weights

    arch = ArchitectureConfig(**json.loads((DEMO / "consa_run.json").read_text())["architecture"])
    consa = ConsaConfig(window=W, allocation=fa, backend="torch")
    model = build_gpt_model(build_transformer_config(arch, consa, params_dtype=torch.float32), arch,
                            use_transformer_engine=False)
    load_model_weights([model], DEMO)
    model.eval()
    every, beyond = [], []
    with torch.no_grad():
        for row in rows:
            x = torch.tensor(row[:-1]).unsqueeze(0)
            logp = torch.log_softmax(model(x, torch.arange(x.shape[1]).unsqueeze(0), attention_mask=None)[0].double(), -1)
            nll = [-float(logp[p, row[p + 1]]) for p in range(len(row) - 1)]
            every += nll
            beyond += nll[W:]
    return sum(every) / len(every), sum(beyond) / len(beyond)


def test_sequences_past_the_models_positions_are_warned_about(tmp_path, docs, single_rank_mcore, caplog):
    """--seq-length above the checkpoint's max_position_embeddings (the demo's 128) evaluates with a
    warning that names the flag and both figures (as generate's prompt and --max-new-tokens); within it, none."""
    text = tmp_path / "held_out.jsonl"
    text.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    for seq, warned in ((160, True), (128, False)):
        caplog.clear()
        argv = ["--load", str(DEMO), "--allocation", "all_fa", "--text", str(text), "--seq-length", str(seq),
                "--num-sequences", "1", "--no-progress"]
        with caplog.at_level("WARNING", logger="megatron_consa.evaluation.flags"):
            assert run_tool(EVALUATE.main, argv) == 0
        said = f"--seq-length {seq}: {seq} positions, past the model's max_position_embeddings (128)"
        assert (said in caplog.text) is warned, caplog.text


def test_sequences_within_the_window_are_warned_about(tmp_path, docs, single_rank_mcore, caplog):
    """--seq-length no longer than an SWA allocation's window + sinks leaves no position where FA
    and SWA differ: a warning names the allocations (not all_fa) and the fix; one position past it, none."""
    text = tmp_path / "held_out.jsonl"
    text.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    for seq, warned in ((W, True), (W + 1, False)):
        caplog.clear()
        argv = ["--load", str(DEMO), "--allocation", "all_fa", "--allocation", "all_swa", "--text", str(text),
                "--seq-length", str(seq), "--num-sequences", "1", "--no-progress"]
        with caplog.at_level("WARNING", logger="megatron_consa.evaluate"):
            assert run_tool(EVALUATE.main, argv) == 0
        said = (f"--seq-length {seq}: no position lies beyond the window of all_swa (W={W}, sinks=0), so their "
                "perplexity equals all-FA's")
        assert (said in caplog.text) is warned and "all_fa (" not in caplog.text, caplog.text


def test_perplexity_and_kv_bytes_equal_direct_computations(tmp_path, docs, single_rank_mcore, capsys):
    text = tmp_path / "held_out.jsonl"
    text.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    seq, n = 40, 3
    argv = ["--load", str(DEMO), "--allocation", "all_fa", "--allocation", "uniform_heads", "--target-sparsity", "0.5",
            "--text", str(text), "--seq-length", str(seq), "--num-sequences", str(n), "--batch-size", "2",
            "--kv-context-length", "1000", "--kv-batch-size", "3", "--kv-dtype", "fp32",
            "--output", str(tmp_path / "out" / "eval.json"), "--no-progress"]
    assert run_tool(EVALUATE.main, argv) == 0
    table = capsys.readouterr().out
    assert "| uniform_heads | 0.500 | 8 |" in table
    report = json.loads((tmp_path / "out" / "eval.json").read_text())

    import sentencepiece  # the rows, cut here: documents + EOS, stride seq

    sp = sentencepiece.SentencePieceProcessor(model_file=str(DEMO / "tokenizer.model"))
    stream = [t for d in docs for t in sp.encode(d) + [sp.eos_id()]]
    rows = [stream[i * seq:i * seq + seq + 1] for i in range(n)]
    uniform = make_preset("uniform_heads", num_layers=4, num_kv_heads=4, granularity="kv_head", target_sparsity=0.5,
                          window=W).fa
    results = {}
    for row in report["allocations"]:
        fa = [[1] * 4] * 4 if row["name"] == "all_fa" else uniform
        assert row["fa"] == fa and row["window"] == W
        every, beyond = _direct_nll(rows, fa)
        ppl = row["perplexity"]
        assert ppl["tokens"] == n * seq and ppl["tokens_beyond_window"] == n * (seq - W)
        assert ppl["mean_nll"] == pytest.approx(every, rel=1e-5)
        assert ppl["mean_nll_beyond_window"] == pytest.approx(beyond, rel=1e-5)
        assert ppl["perplexity"] == pytest.approx(torch.tensor(every).exp().item(), rel=1e-5)
        fa_heads = sum(map(sum, fa))
        assert row["kv_bytes"] == 2 * 3 * 16 * 4 * (fa_heads * 1000 + (16 - fa_heads) * min(1000, W))
        results[row["name"]] = beyond
    assert results["all_fa"] != results["uniform_heads"]  # the allocation reached the attention
    assert report["kv_context_length"] == 1000


def test_indexed_split_rows_are_windows_of_its_text(tmp_path, docs, tokenizers, single_rank_mcore, caplog):
    """--data-path: the rows megatron-core's GPTDataset draws from the split are the document's own tokens;
    a split that runs out gives its one epoch (more rows would repeat its text), with a warning."""
    from megatron_consa.data.indexed import write_indexed_dataset
    from megatron_consa.evaluation.sequences import indexed_split_sequences

    tok = tokenizers["sentencepiece"]
    text = " ".join(docs)
    write_indexed_dataset([text], tmp_path / "one", tokenizer_factory=lambda: tok)
    stream = tok.encode(text) + [tok.eod]  # the only document
    held = (len(stream) - 1) // 32
    assert held >= 5
    rows = indexed_split_sequences([str(tmp_path / "one")], tok, split="0,1,0", which="valid", seq_length=32,
                                   num_sequences=5)
    assert rows.shape == (5, 33)
    for row in rows.tolist():
        assert _find(stream, row), "a row is not a contiguous window of the document + EOD"
    with caplog.at_level(logging.WARNING, logger="megatron_consa.evaluation.sequences"):
        rows = indexed_split_sequences([str(tmp_path / "one")], tok, split="0,1,0", which="valid", seq_length=32,
                                       num_sequences=held + 7)
    assert rows.shape == (held, 33) and f"holds {held} sequences of 32 tokens" in caplog.text
    # every row of the one epoch once, no text twice
    assert sorted(rows.tolist()) == sorted(stream[32 * i:32 * i + 33] for i in range(held))
    # a blend whose parts run out: each part's drawn / held samples named (megatron-core's epochs per part)
    write_indexed_dataset([" ".join(reversed(docs))], tmp_path / "two", tokenizer_factory=lambda: tok)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="megatron_consa.evaluation.sequences"):
        rows = indexed_split_sequences(["1", str(tmp_path / "one"), "1", str(tmp_path / "two")], tok, split="0,1,0",
                                       which="valid", seq_length=32, num_sequences=3 * held)
    assert rows.shape == (3 * held, 33) and "parts of the --data-path blend run out" in caplog.text
    drawn = re.search(r"held: (\d+) / (\d+), (\d+) / (\d+)\)", caplog.text)
    assert drawn and int(drawn[1]) + int(drawn[3]) == 3 * held and int(drawn[2]) == held, caplog.text
    with pytest.raises(ValueError, match="--split 0,1,0: the test split of --data-path .* holds no document"):
        indexed_split_sequences([str(tmp_path / "one")], tok, split="0,1,0", which="test", seq_length=32,
                                num_sequences=1)


def test_an_imported_sliding_window_model_runs_its_own_allocation(tmp_path, single_rank_mcore):
    """An imported Hugging Face Qwen3 with mixed layer_types: perplexity under `checkpoint` equals transformers'."""
    from conversion_fixtures import WINDOW, hf_logits, save_hf, tokens

    from megatron_consa.evaluation.models import CheckpointModels, model_logits_fn
    from megatron_consa.evaluation.perplexity import evaluate_perplexity

    hf_dir = save_hf("qwen3_hybrid", tmp_path / "hf")
    ckpt = tmp_path / "imported"
    assert run_tool(_tool("convert_hf_to_megatron").main, ["--hf-path", str(hf_dir), "--save", str(ckpt),
                                                           "--dtype", "fp32"]) == 0
    rows = tokens()  # [2, 24]
    with CheckpointModels(ckpt) as models:
        own = models.own_allocation()
        assert own.fa == [[0, 0], [1, 1], [0, 0], [1, 1]] and own.window == WINDOW
        ours = evaluate_perplexity(model_logits_fn(models.model()), rows, window=WINDOW)
    logp = torch.log_softmax(hf_logits(hf_dir, rows[:, :-1]).double(), -1)
    nll = -logp.gather(-1, rows[:, 1:].unsqueeze(-1)).squeeze(-1)  # [2, 23]
    assert ours.mean_nll == pytest.approx(nll.mean().item(), rel=1e-5)
    assert ours.mean_nll_beyond_window == pytest.approx(nll[:, WINDOW:].mean().item(), rel=1e-5)
    per_row = nll[:, WINDOW:].mean(dim=1)  # two rows: sample std = |a - b| / sqrt(2), over sqrt(2)
    assert ours.nll_beyond_window_std_error == pytest.approx(abs(per_row[0] - per_row[1]).item() / 2, rel=1e-5)
    assert ours.nll_beyond_window_per_sequence == pytest.approx(per_row.tolist(), rel=1e-5)


def test_paired_difference_against_a_hand_computation():
    from megatron_consa.evaluation.perplexity import paired_difference

    a, b = [2.0, 3.0, 4.0, 5.0], [2.5, 3.1, 4.6, 5.2]  # differences 0.5, 0.1, 0.6, 0.2
    d = paired_difference(a, b)
    mean, sd = 0.35, (((0.15 ** 2) * 2 + (0.25 ** 2) * 2) / 3) ** 0.5
    assert d["mean"] == pytest.approx(mean) and d["std_error"] == pytest.approx(sd / 2)
    assert d["z"] == pytest.approx(mean / (sd / 2)) and d["larger_on"] == 4 and d["sequences"] == 4
    # the unpaired spread of either list (about 0.65 / 2) would hide a difference the pairing shows
    assert d["z"] > 2 > mean / ((torch.tensor(a).var().item() / 4 + torch.tensor(b).var().item() / 4) ** 0.5)
    with pytest.raises(ValueError, match="same sequences"):
        paired_difference(a, b[:3])


@pytest.mark.parametrize("after, chars", [(150, 1000), (400, 3000)])  # the small and the real study's corpora
def test_held_out_text_is_from_files_the_training_text_never_touched(after, chars):
    """The studies' held-out text: no file the training chunks came from (the chunks right after them began in the
    middle of a file whose beginning was trained on), and each document from another file."""
    import sysconfig
    from pathlib import Path

    from megatron_consa.data.demo_corpus import held_out_stdlib_documents

    train = "".join(stdlib_documents(max_documents=after, chars=chars))
    held_out = held_out_stdlib_documents(after_documents=after, max_documents=64, chars=chars)
    assert len(held_out) == 64
    sources = {}
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        try:
            sources[path.name] = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
    files = [[name for name, text in sources.items() if text.startswith(doc)] for doc in held_out]
    assert all(len(f) == 1 for f in files) and len({f[0] for f in files}) == 64  # a file's start, each its own file
    trained = [name for name, text in sources.items() if text[:chars // 2] in train]
    assert trained and not {f[0] for f in files} & set(trained)
    assert all(doc[:200] not in train for doc in held_out)
    # what the chunks that follow the training ones would have been: the rest of the last file trained on
    following = list(stdlib_documents(max_documents=after + 1, chars=chars))[after]
    assert any(following in sources[name] for name in trained)


# ----------------------------------------------------------------------------- retrieval generators, on tokens


def _find(seq: list[int], sub: list[int]) -> list[int]:
    return [i for i in range(len(seq) - len(sub) + 1) if seq[i:i + len(sub)] == sub]


@pytest.mark.parametrize("kind", ["sentencepiece", "hf", "hf_bos"])
def test_passkey_needle_sits_at_the_requested_distance(tokenizers, kind):
    tok = tokenizers[kind]
    config = RetrievalConfig(distances=(60, 150, 300), samples_per_distance=3, seed=5)
    samples = passkey_samples(tok, config)
    assert len(samples) == 9 and len({len(s.tokens) - len(s.answer) for s in samples}) == 1  # one context length
    question = tok.encode(PASSKEY_QUESTION)
    prefix = tok.encode(PASSKEY_NEEDLE_PREFIX)
    for s in samples:
        prompt = s.tokens[:s.prompt_length]
        assert s.tokens[s.prompt_length:] == s.answer
        digits = tok.decode(s.answer).strip()
        assert len(digits) == 5 and digits.isdigit()
        start, end = s.value_span
        assert prompt[start:end] == s.answer and prompt[start - len(prefix):start] == prefix
        assert prompt[-len(question):] == question
        # the distance: last prompt position minus the last value token's position
        assert (len(prompt) - 1) - (end - 1) == s.requested_distance == s.distance
        assert _find(prompt, s.answer) == [start]  # no copy of the value nearer the question
        assert (prompt[0] == tok.bos) == (kind == "hf_bos")  # a prompt starts as a training document
    assert len({tuple(s.answer) for s in samples}) > 1  # values vary


@pytest.mark.parametrize("kind", ["sentencepiece", "hf", "hf_bos"])
def test_kv_recall_value_sits_at_the_requested_distance(tokenizers, kind):
    tok = tokenizers[kind]
    config = RetrievalConfig(distances=(80, 200), samples_per_distance=3, context_length=400, seed=1)
    samples = kv_recall_samples(tok, config)
    question = tok.encode(KV_QUESTION)
    for s in samples:
        prompt = s.tokens[:s.prompt_length]
        start, end = s.value_span
        assert prompt[start:end] == s.answer == s.tokens[s.prompt_length:]
        # the queried key, as it ends the prompt, stands right before the value
        key_start = max(i for i in _find(prompt[:-1], question)) + len(question)
        key = prompt[key_start:]
        assert prompt[start - len(key):start] == key and len(_find(prompt, key)) == 2
        pair = len(key) + len(s.answer) + len(tok.encode(";"))
        assert s.requested_distance <= (len(prompt) - 1) - (end - 1) == s.distance < s.requested_distance + 2 * pair
        assert len(prompt) <= 400
        assert (prompt[0] == tok.bos) == (kind == "hf_bos")


@pytest.mark.parametrize("kind", ["hf", "hf_bos"])
def test_recall_scores_the_second_copy_of_the_key_with_the_documents_start(tokenizers, kind):
    """recall_accuracy's input starts as a training document does (the BOS of a tokenizer that adds
    one), and it scores exactly the positions after the second copy's first token: an oracle
    right there and wrong everywhere else scores 1.0."""
    from megatron_consa.data.demo_corpus import recall_documents
    from megatron_consa.evaluation.recall import recall_accuracy

    tok = tokenizers[kind]
    docs = recall_documents(6, key_words=8, repeats=3, seed=4)
    seen = []

    def oracle(tokens: torch.Tensor) -> torch.Tensor:
        row = tokens[0].tolist()
        seen.append(row[0])
        body = row[1:] if kind == "hf_bos" else row
        doc = next(d for d in docs if tok.encode(d)[:len(body)] == body)
        key = tok.encode(doc.split(" | ")[0] + " | ")
        second = len(row) - len(body) + len(key)  # where the key's second copy starts
        full = (row[:len(row) - len(body)] + tok.encode(doc))[1:len(row) + 1]
        logits = torch.zeros(1, len(row), tok.vocab_size)
        for p, nxt in enumerate(full):
            logits[0, p, nxt if p >= second + 1 else (nxt + 1) % tok.vocab_size] = 1.0
        return logits

    result = recall_accuracy(oracle, tok, docs, window=4, seq_length=96)
    assert result.scored_positions > 0 and result.accuracy == 1.0
    assert set(seen) == ({tok.bos} if kind == "hf_bos" else set(seen) - {tok.bos})


def test_too_short_distances_are_refused(tokenizers):
    with pytest.raises(ValueError, match="choose distances >="):
        passkey_samples(tokenizers["hf"], RetrievalConfig(distances=(3,), samples_per_distance=1))
    with pytest.raises(ValueError, match="context_length 100 is too short"):
        passkey_samples(tokenizers["hf"], RetrievalConfig(distances=(200,), samples_per_distance=1, context_length=100))


def test_scoring_counts_what_an_oracle_gets_right(tokenizers):
    tok = tokenizers["sentencepiece"]
    samples = passkey_samples(tok, RetrievalConfig(distances=(60, 90), samples_per_distance=3, seed=2))
    samples += kv_recall_samples(tok, RetrievalConfig(distances=(60,), samples_per_distance=2, seed=2))
    wrong = {1, 6}  # the oracle misses the last answer token of these samples
    full = {tuple(s.tokens[:-1]): (i, s) for i, s in enumerate(samples)}

    def oracle(tokens: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(tokens.shape[0], tokens.shape[1], tok.vocab_size)
        for b, row in enumerate(tokens.tolist()):
            i, s = full[tuple(row)]
            targets = s.tokens[1:]
            if i in wrong:
                targets = targets[:-1] + [(targets[-1] + 1) % tok.vocab_size]
            logits[b, torch.arange(len(targets)), torch.tensor(targets)] = 10.0
        return logits

    buckets = {(b.task, b.distance): b for b in score_retrieval(oracle, samples, batch_size=2)}
    assert {k: (b.samples, b.correct) for k, b in buckets.items()} == {
        ("passkey", 60): (3, 2), ("passkey", 90): (3, 3), ("kv", 60): (2, 1)}
    assert buckets[("passkey", 90)].accuracy == 1.0
    # answer NLL: log-softmax of a logit of 10 among vocab_size zeros, per answer token
    per_token = -torch.log_softmax(torch.tensor([10.0] + [0.0] * (tok.vocab_size - 1)), 0)[0].item()
    right = samples[3:6]
    assert buckets[("passkey", 90)].mean_answer_nll == pytest.approx(
        sum(len(s.answer) for s in right) / 3 * per_token, rel=1e-4)


# ----------------------------------------------------------------------------- the CLI end to end


def test_cli_retrieval_buckets_and_the_checkpoints_own_allocation(tmp_path, single_rank_mcore, capsys):
    argv = ["--load", str(DEMO), "--allocation", "checkpoint", "--allocation", "all_swa",
            "--retrieval", "passkey", "kv", "--distances", "60", "90", "--samples-per-distance", "2",
            "--output", str(tmp_path / "eval.json"), "--no-progress"]
    assert run_tool(EVALUATE.main, argv) == 0
    out = capsys.readouterr().out
    assert "passkey d=60" in out and "kv d=90" in out
    report = json.loads((tmp_path / "eval.json").read_text())
    checkpoint, swa = report["allocations"]
    assert checkpoint["fa"] == [[1] * 4] * 4 and swa["sparsity"] == 1.0
    for row in report["allocations"]:
        assert [(b["task"], b["distance"], b["samples"]) for b in row["retrieval"]] == [
            ("passkey", 60, 2), ("passkey", 90, 2), ("kv", 60, 2), ("kv", 90, 2)]
        assert row["perplexity"] is None
    ctx = report["kv_context_length"]  # default: the longest prompt + answer evaluated
    assert ctx > 90 + 64 and checkpoint["kv_bytes"] == 2 * 16 * 2 * 16 * ctx and swa["kv_bytes"] == 2 * 16 * 2 * 16 * W


@pytest.mark.parametrize("argv,flag", [
    (["--retrieval", "passkey"], "--retrieval needs --distances"),
    (["--retrieval", "passkey", "--distances", "2"], "--distances"),
    (["--allocation", "heuristic", "--target-sparsity", "0.5"], "--calibration-scores"),
    (["--allocation", "interleave:2"], "--allocation interleave:2: preset 'interleave:2': --target-sparsity is required"),
    (["--stdlib-text", "--text", "x.txt"], "--text and --stdlib-text"),
    (["--text", "missing.jsonl"], "--text missing.jsonl"),
    (["--retrieval", "passkey", "--distances", "64", "--haystack", "missing.txt"], "--haystack"),
    (["--batch-size", "0"], "--batch-size"),
    (["--kv-context-length", "-1"], "--kv-context-length"),
    # flags that would be ignored
    (["--stdlib-text", "--split", "1,0,0"], "--split 1,0,0 is for --data-path"),
    (["--stdlib-text", "--data-seed", "3"], "--data-seed 3 is for --data-path"),
    (["--context-length", "300"], "--context-length is for --retrieval"),
    (["--haystack", "x.txt"], "--haystack is for --retrieval"),
])
def test_cli_bad_input_is_one_error_line(argv, flag, capsys, single_rank_mcore):
    assert run_tool(EVALUATE.main, ["--load", str(DEMO), "--no-progress", "--kv-context-length", "64"] + argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and flag in err and len(err.strip().splitlines()) == 1


def test_cli_missing_checkpoint_and_nothing_to_measure(tmp_path, capsys):
    assert run_tool(EVALUATE.main, ["--load", str(tmp_path / "nothing"), "--kv-context-length", "64"]) == 2
    assert "--load" in capsys.readouterr().err
    assert run_tool(EVALUATE.main, ["--load", str(DEMO)]) == 2
    assert "--kv-context-length is needed" in capsys.readouterr().err


def test_cli_output_is_checked_before_the_checkpoint_loads(tmp_path, capsys):
    """--output naming a directory: exit 2 naming the flag, before --load is read (not a traceback
    after the evaluation)."""
    taken = tmp_path / "taken"
    taken.mkdir()
    assert run_tool(EVALUATE.main, ["--load", str(tmp_path / "nothing"), "--kv-context-length", "64",
                                    "--output", str(taken)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --output {taken}: is a directory") and len(err.strip().splitlines()) == 1
    assert not any(taken.iterdir()) and sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_cli_allocation_errors_name_the_file(tmp_path, capsys, single_rank_mcore):
    other = tmp_path / "other.json"
    make_preset("all_fa", num_layers=3, num_kv_heads=4, granularity="layer", target_sparsity=None, window=8).save(other)
    argv = ["--load", str(DEMO), "--kv-context-length", "64", "--allocation", "all_fa", "--allocation", str(other)]
    assert run_tool(EVALUATE.main, argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --allocation {other}: ") and "'num_layers' is 3" in err
    # a file's own field names stay as written (a preset's parameters are named by their flags)
    scores = tmp_path / "scores.json"
    scores.write_text(json.dumps({"kind": "attention_mass", "scores": [[0.1] * 2] * 4}))
    assert run_tool(EVALUATE.main, ["--load", str(DEMO), "--kv-context-length", "64", "--allocation", str(scores)]) == 2
    err = capsys.readouterr().err
    assert "sink_tokens, target_sparsity" in err and "--sink-tokens" not in err, err


def test_a_fixed_checkpoints_own_allocation_is_read_from_its_metadata(tmp_path):
    """finalize's checkpoint and fixed-phase saves keep their allocation in consa_run.json only:
    export, generation and evaluation read it from there (window, sinks and granularity too)."""
    import dataclasses
    import json

    from megatron_consa.architecture import ArchitectureConfig
    from megatron_consa.config import ConsaConfig
    from megatron_consa.conversion.checkpoint_model import read_checkpoint_info

    arch = ArchitectureConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_layers=2,
                              num_attention_heads=4, num_kv_heads=2)
    for consa, fa in ((ConsaConfig(window=8, sink_tokens=2, allocation=[[1, 0], [0, 0]]), [[1, 0], [0, 0]]),
                      (ConsaConfig(window=16, granularity="layer", allocation=[[0, 0], [1, 1]]), [[0, 0], [1, 1]]),
                      (ConsaConfig(window=8), None)):  # a learn phase: gates, no allocation
        ckpt = tmp_path / f"ckpt{consa.window}{consa.granularity}{fa is None}"
        ckpt.mkdir()
        (ckpt / "consa_run.json").write_text(json.dumps({"iteration": 0, "consa": consa.to_dict(),
                                                         "architecture": dataclasses.asdict(arch)}))
        own = read_checkpoint_info(ckpt).allocation
        if fa is None:
            assert own is None
        else:
            assert (own.fa, own.window, own.sink_tokens, own.granularity) == (
                fa, consa.window, consa.sink_tokens, consa.granularity)


def test_the_evaluation_split_defaults_to_the_training_runs():
    """--data-path without --split / --data-seed: the run's own (its valid split holds no training
    document); flags given win; a checkpoint that does not say (an import) gets Megatron's defaults."""
    from megatron_consa.evaluation.flags import with_training_split
    from megatron_consa.evaluation.sequences import DEFAULT_DATA_SEED, DEFAULT_SPLIT, SequenceSource

    unset = SequenceSource(seq_length=32, num_sequences=4, data_path=("corpus_text_document",))
    trained = {"data": {"data_path": ["corpus_text_document"], "split": "989,10,1", "seed": 7}}
    got = with_training_split(unset, trained)
    assert (got.split, got.seed) == ("989,10,1", 7)
    given = SequenceSource(seq_length=32, num_sequences=4, data_path=("x",), split="90,5,5", seed=3)
    assert with_training_split(given, trained) == given
    imported = with_training_split(unset, {"conversion": {}})
    assert (imported.split, imported.seed) == (DEFAULT_SPLIT, DEFAULT_DATA_SEED)
    text = SequenceSource(seq_length=32, num_sequences=4, text="a.txt")
    assert with_training_split(text, trained) == text  # no --data-path: nothing to split


def test_a_jsonl_without_the_field_names_the_tools_flag(tmp_path):
    """evaluate / calibrate_heuristic choose the field with --json-key (preprocess_data with --json-keys)."""
    from megatron_consa.data.indexed import DataError, iter_jsonl_texts
    from megatron_consa.evaluation.sequences import text_file_documents

    path = tmp_path / "held_out.jsonl"
    path.write_text(json.dumps({"content": "a document"}) + "\n")
    with pytest.raises(DataError, match=r"held_out.jsonl:1: no string field 'text' \(choose it with --json-key\)"):
        list(text_file_documents(path))
    assert list(text_file_documents(path, json_key="content")) == ["a document"]
    with pytest.raises(DataError, match=r"\(choose it with --json-keys\)"):
        list(iter_jsonl_texts([path]))


def test_the_kv_context_is_the_longest_input_the_model_reads():
    """The KV bytes' default context: teacher forcing feeds a retrieval sample's prompt and answer but its last
    token, as a perplexity sequence of seq_length + 1 tokens feeds seq_length: no cache ever holds the last token."""
    import torch

    from megatron_consa.evaluation.retrieval import RetrievalSample
    from megatron_consa.evaluation.suite import EvaluationRequest, kv_context_length

    sample = RetrievalSample(task="passkey", tokens=list(range(12)), prompt_length=10, answer=[10, 11],
                             value_span=(3, 5), requested_distance=5)
    assert kv_context_length(EvaluationRequest(allocations=()), [sample]) == 11
    with_ppl = EvaluationRequest(allocations=(), perplexity_sequences=torch.zeros(2, 17, dtype=torch.long))
    assert kv_context_length(with_ppl, [sample]) == 16 and kv_context_length(with_ppl, []) == 16
    assert kv_context_length(EvaluationRequest(allocations=(), kv_context_length=5), [sample]) == 5


def test_the_report_is_not_written_over_an_input(tmp_path, capsys):
    """--output naming the allocation file (or the text) evaluated: refused before any work, the input kept."""
    allocation = tmp_path / "alloc.json"
    allocation.write_text("{}")
    assert run_tool(EVALUATE.main, ["--load", str(DEMO), "--no-progress", "--stdlib-text", "--allocation", str(allocation),
                                    "--output", str(allocation)]) == 2
    assert f"--output {allocation} is --allocation {allocation}: writing it would replace" in capsys.readouterr().err
    assert allocation.read_text() == "{}"


def test_a_damaged_text_file_is_named_by_its_flag(tmp_path, capsys, single_rank_mcore):
    """--text FILE.json pretty-printed (a .json file is read as JSONL): the error names --text and says how it is
    read, one line, exit 2, nothing written."""
    bad = tmp_path / "docs.json"
    bad.write_text(json.dumps([{"text": "one"}, {"text": "two"}], indent=2))
    out = tmp_path / "eval.json"
    assert run_tool(EVALUATE.main, ["--load", str(DEMO), "--no-progress", "--text", str(bad), "--seq-length", "16",
                                    "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --text {bad}") and "one JSON object per line" in err, err
    assert err.count(str(bad)) == 1, err  # the path once: the flag's value, not repeated by the message
    assert len(err.strip().splitlines()) == 1 and not out.exists()
