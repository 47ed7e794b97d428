"""The heuristic's calibration scores and the ablation ranking find the head a model needs far back.

A tiny Llama-shaped model (2 layers x 2 KV heads, window 8) is built here with one
KV head wired to look far back: every sequence starts with one of four *anchor*
tokens, the rest of the sequence is drawn from the anchor's group of seven tokens,
and in layer 1 KV head 1 the keys of anchors (and only of anchors) meet a query
every token has, in the slowest RoPE dimension, so its attention sits on position
0 at every query; its values carry the anchor's identity to the output layer, which
predicts the anchor's group from it. Every other weight is random. Switched to SWA
(window 8), that head loses the anchor beyond position 7 and the model falls back
to a uniform guess; the other heads attend almost uniformly and matter little.
Both rankings must put that head first, and its layer first at layer granularity.

Also: the attention mass against a dense softmax reference, and the scores file
through tools/calibrate_heuristic.py into the `heuristic` preset of every tool that
takes one (evaluate, kv_budget, the trainer).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from megatron_consa.allocation import make_preset
from megatron_consa.architecture import ArchitectureConfig
from megatron_consa.cli import run_tool
from megatron_consa.config import ConsaConfig
from megatron_consa.evaluation.ablation import checkpoint_ablation
from megatron_consa.evaluation.calibration import attention_mass_scores, far_attention_mass
from megatron_consa.evaluation.models import CheckpointModels
from megatron_consa.unit_scores import UnitScores

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "examples" / "checkpoints" / "demo_dense"
W = 8
FAR = (1, 1)  # (layer, KV head) wired to attend to position 0
ANCHORS, GROUP = 4, 7  # anchor tokens 0..3; anchor k's group: tokens 4 + 7k .. 4 + 7k + 6
ARCH = ArchitectureConfig(vocab_size=ANCHORS * (1 + GROUP), hidden_size=32, intermediate_size=32, num_layers=2,
                          num_attention_heads=4, num_kv_heads=2, head_dim=8, rope_theta=1e9, qk_norm=False,
                          tie_word_embeddings=False, max_position_embeddings=64, model_type="llama")


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _far_looking_weights() -> dict[str, torch.Tensor]:
    """Hugging Face-named weights: random, except the far head's path (see the module docstring)."""
    from megatron_consa.conversion.keymap import expected_hf_shapes

    g = torch.Generator().manual_seed(0)
    hf = {name: (torch.ones(shape) if name.endswith("norm.weight") else 0.02 * torch.randn(shape, generator=g))
          for name, shape in expected_hf_shapes(ARCH).items()}
    d, rep = ARCH.head_dim, ARCH.num_attention_heads // ARCH.num_kv_heads
    emb = torch.zeros(ARCH.vocab_size, ARCH.hidden_size)
    emb[:, 1] = 1.0  # every token: a constant the far head's query reads
    emb[:ANCHORS, 0] = 1.0  # anchors only: what the far head's key reads
    emb[torch.arange(ANCHORS), 2 + torch.arange(ANCHORS)] = 1.0  # the anchor's identity (dims 2..5), its value
    emb[ANCHORS:, 10:] = 0.3 * torch.randn(ARCH.vocab_size - ANCHORS, ARCH.hidden_size - 10, generator=g)
    hf["model.embed_tokens.weight"] = emb
    layer, group = FAR
    p = f"model.layers.{layer}.self_attn."
    slow = d // 2 - 1  # the RoPE pair (slow, slow + d/2) turns by ~1e-7 rad per position at theta 1e9
    heads = range(group * rep, (group + 1) * rep)
    q, k, v, o = (hf[p + n] for n in ("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight"))
    k[group * d:(group + 1) * d] = 0.0
    k[group * d + slow, 0] = 2.5
    v[group * d:(group + 1) * d] = 0.0
    for j in range(ANCHORS):
        v[group * d + j, 2 + j] = 1.0  # value = the anchor's identity
    for h in heads:
        q[h * d:(h + 1) * d] = 0.0
        q[h * d + slow, 1] = 2.5
        o[:, h * d:(h + 1) * d] = 0.0
        for j in range(ANCHORS):
            o[6 + j, h * d + j] = 1.0  # ... written to residual dims 6..9
    head = torch.zeros(ARCH.vocab_size, ARCH.hidden_size)
    for a in range(ANCHORS):
        head[ANCHORS + a * GROUP:ANCHORS + (a + 1) * GROUP, 6 + a] = 2.0  # dim 6 + a -> the anchor's group
    hf["lm_head.weight"] = head
    return hf


@pytest.fixture(scope="module")
def far_checkpoint(tmp_path_factory, single_rank_mcore) -> Path:
    from megatron.core import dist_checkpointing

    from megatron_consa.conversion.keymap import hf_to_mcore
    from megatron_consa.model import build_gpt_model, build_transformer_config
    from megatron_consa.training.checkpoint import model_state_for_save, write_checkpoint_meta

    consa = ConsaConfig(window=W, allocation=[[1, 1], [1, 1]], backend="torch")
    model = build_gpt_model(build_transformer_config(ARCH, consa, params_dtype=torch.float32), ARCH,
                            use_transformer_engine=False)
    result = model.load_state_dict(hf_to_mcore(_far_looking_weights(), ARCH), strict=False)
    assert not result.unexpected_keys and all(k.endswith("_extra_state") for k in result.missing_keys)
    path = tmp_path_factory.mktemp("far") / "checkpoint"
    path.mkdir()
    dist_checkpointing.save(model_state_for_save([model], controller_state={}, iteration=0), str(path))
    write_checkpoint_meta(path, {"iteration": 0, "consa": consa.to_dict(), "architecture": dataclasses.asdict(ARCH)})
    return path


def _anchor_sequences(n: int, seq_length: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    rows = []
    for i in range(n):
        a = i % ANCHORS
        rows.append(torch.cat([torch.tensor([a]), ANCHORS + a * GROUP + torch.randint(0, GROUP, (seq_length,), generator=g)]))
    return torch.stack(rows)


def _top(scores: UnitScores) -> tuple[int, int]:
    flat = torch.tensor(scores.scores)
    return divmod(int(flat.argmax()), flat.shape[1])


def test_the_model_needs_the_far_head(far_checkpoint):
    """The construction works: with the far head FA the anchor's group is predicted, windowed it is not."""
    from megatron_consa.evaluation.models import model_logits_fn
    from megatron_consa.evaluation.perplexity import evaluate_perplexity

    seqs = _anchor_sequences(4, 40)
    with CheckpointModels(far_checkpoint) as models:
        fa = evaluate_perplexity(model_logits_fn(models.model([[1, 1], [1, 1]])), seqs, window=W)
        far_swa = evaluate_perplexity(model_logits_fn(models.model([[1, 1], [1, 0]], window=W)), seqs, window=W)
    assert fa.mean_nll_beyond_window < math.log(GROUP) + 0.05  # ~ uniform over the anchor's group
    assert far_swa.mean_nll_beyond_window > math.log(ARCH.vocab_size) - 0.05  # ~ uniform over the vocabulary


def test_attention_mass_ranks_the_far_head_first(far_checkpoint):
    seqs = _anchor_sequences(4, 40)
    with CheckpointModels(far_checkpoint) as models:
        scores = attention_mass_scores(models.model(models.all_fa()), seqs, window=W, batch_size=2, query_block=16)
    assert scores.kind == "attention_mass" and _top(scores) == FAR
    far = scores.scores[FAR[0]][FAR[1]]
    others = [v for l, row in enumerate(scores.scores) for h, v in enumerate(row) if (l, h) != FAR]
    assert far > 0.99 and max(others) < far - 0.2
    # the heuristic preset on these scores keeps exactly that head FA at a one-head budget
    alloc = make_preset("heuristic", num_layers=2, num_kv_heads=2, granularity="kv_head", target_sparsity=0.75,
                        window=W, calibration_scores=scores.scores)
    assert alloc.fa == [[0, 0], [0, 1]]


@pytest.mark.parametrize("granularity", ["kv_head", "layer"])
def test_ablation_ranks_the_far_head_first(far_checkpoint, granularity):
    seqs = _anchor_sequences(4, 40)
    with CheckpointModels(far_checkpoint) as models:
        scores = checkpoint_ablation(models, seqs, granularity=granularity, window=W, batch_size=2)
    assert scores.kind == "ablation" and scores.granularity == granularity
    if granularity == "kv_head":
        assert _top(scores) == FAR
    else:
        assert [row[0] for row in scores.scores].index(max(row[0] for row in scores.scores)) == FAR[0]
        assert scores.scores[FAR[0]] == [scores.scores[FAR[0]][0]] * 2  # a layer's value on every head
    far = scores.scores[FAR[0]][FAR[1]]
    assert far > 1.0  # log(32) - log(7) ~ 1.5 nats lost beyond the window
    assert all(abs(v) < 0.1 for l, row in enumerate(scores.scores) for h, v in enumerate(row)
               if (l, h) != FAR and (granularity == "kv_head" or l != FAR[0]))


@pytest.mark.parametrize("window,sinks", [(5, 0), (5, 2), (1, 0)])
def test_far_mass_equals_a_dense_softmax(window, sinks):
    g = torch.Generator().manual_seed(3)
    s, b, nq, ng, d = 19, 2, 4, 2, 8
    q, k = torch.randn(s, b, nq, d, generator=g), torch.randn(s, b, ng, d, generator=g)
    got = far_attention_mass(q, k, scale=0.4, window=window, sink_tokens=sinks, query_block=4)  # [b, ng, rep, s]
    for bi in range(b):
        for h in range(nq):
            for p in range(s):
                logits = torch.stack([q[p, bi, h] @ k[j, bi, h // 2] * 0.4 for j in range(p + 1)])
                probs = torch.softmax(logits.double(), 0)
                far = sum(float(probs[j]) for j in range(p + 1) if p - j >= window and j >= sinks)
                assert float(got[bi, h // 2, h % 2, p]) == pytest.approx(far, abs=1e-6)


# ----------------------------------------------------------------------------- the scores file through the tools


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory, single_rank_mcore):
    """tools/calibrate_heuristic.py on the demo checkpoint and stdlib text: (scores, allocation, directory)."""
    out = tmp_path_factory.mktemp("calibrated")
    argv = ["--load", str(DEMO), "--stdlib-text", "--seq-length", "48", "--num-sequences", "3", "--batch-size", "3",
            "--output", str(out / "scores.json"), "--target-sparsity", "0.75", "--save-allocation",
            str(out / "heuristic.json"), "--no-progress"]
    assert run_tool(_tool("calibrate_heuristic").main, argv) == 0
    return UnitScores.load(out / "scores.json"), json.loads((out / "heuristic.json").read_text()), out


def test_calibrate_cli_writes_what_the_library_computes(calibrated):
    from megatron_consa.evaluation.sequences import SequenceSource, load_sequences

    scores, allocation, _ = calibrated
    with CheckpointModels(DEMO) as models:
        seqs = load_sequences(SequenceSource(seq_length=48, num_sequences=3, stdlib=True), models.tokenizer())
        direct = attention_mass_scores(models.model(models.all_fa()), seqs, window=W)
    assert (scores.num_layers, scores.num_kv_heads, scores.window) == (4, 4, W)
    assert torch.allclose(torch.tensor(scores.scores), torch.tensor(direct.scores), atol=1e-6)
    expected = make_preset("heuristic", num_layers=4, num_kv_heads=4, granularity="kv_head", target_sparsity=0.75,
                           window=W, calibration_scores=scores.scores)
    assert allocation["fa"] == expected.fa and allocation["source"] == "heuristic"


@pytest.mark.parametrize("granularity", ["kv_head", "layer"])
def test_calibrate_cli_ablation_mode_writes_what_the_library_computes(granularity, tmp_path, single_rank_mcore):
    """--mode ablation through the CLI, at both granularities: the scores of the library's
    checkpoint_ablation on the same sequences (its ranking is checked on the far head above)."""
    from megatron_consa.evaluation.sequences import SequenceSource, load_sequences

    out = tmp_path / f"ablation-{granularity}.json"
    argv = ["--load", str(DEMO), "--mode", "ablation", "--granularity", granularity, "--stdlib-text", "--seq-length",
            "48", "--num-sequences", "2", "--batch-size", "2", "--output", str(out), "--no-progress"]
    assert run_tool(_tool("calibrate_heuristic").main, argv) == 0
    scores = UnitScores.load(out)
    assert scores.kind == "ablation" and scores.granularity == granularity and scores.window == W
    with CheckpointModels(DEMO) as models:
        seqs = load_sequences(SequenceSource(seq_length=48, num_sequences=2, stdlib=True), models.tokenizer())
        direct = checkpoint_ablation(models, seqs, granularity=granularity, window=W, batch_size=2)
    assert torch.allclose(torch.tensor(scores.scores), torch.tensor(direct.scores), atol=1e-6)
    assert len({round(v, 6) for row in scores.scores for v in row}) > 1  # not a constant table


def test_every_tool_with_a_preset_takes_the_scores(calibrated, capsys, monkeypatch, tmp_path):
    scores, allocation, out = calibrated
    # evaluate
    argv = ["--load", str(DEMO), "--allocation", "heuristic", "--target-sparsity", "0.75",
            "--calibration-scores", str(out / "scores.json"), "--kv-context-length", "64",
            "--output", str(tmp_path / "eval.json")]
    assert run_tool(_tool("evaluate").main, argv) == 0
    assert json.loads((tmp_path / "eval.json").read_text())["allocations"][0]["fa"] == allocation["fa"]
    # kv_budget
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text((DEMO / "config.json").read_text())
    kv_budget = _tool("kv_budget")
    common = ["--hf-config", str(tmp_path / "hf"), "--context-length", "100", "--window", str(W), "--preset",
              "heuristic", "--target-sparsity", "0.75", "--json"]
    capsys.readouterr()
    assert run_tool(kv_budget.main, common + ["--calibration-scores", str(out / "scores.json")]) == 0
    assert json.loads(capsys.readouterr().out)["allocation_bytes"] == 2 * 16 * 2 * (4 * 100 + 12 * W)
    assert run_tool(kv_budget.main, common) == 2
    assert "--calibration-scores" in capsys.readouterr().err
    # the trainer's fixed phase
    from megatron_consa.training.arguments import parse_run_config
    from megatron_consa.training.run import prepare_run

    monkeypatch.setenv("WORLD_SIZE", "1")
    model = ["--num-layers", "4", "--hidden-size", "128", "--ffn-hidden-size", "256", "--num-attention-heads", "8",
             "--num-query-groups", "4", "--kv-channels", "16", "--seq-length", "32", "--micro-batch-size", "1",
             "--mock-data", "--vocab-size", "512", "--train-iters", "5", "--consa-phase", "fixed",
             "--consa-window", str(W), "--consa-target-sparsity", "0.75", "--consa-allocation", "heuristic"]
    prepared = prepare_run(parse_run_config(model + ["--consa-calibration-scores", str(out / "scores.json")]),
                           world_size=1)
    assert prepared.allocation.fa == allocation["fa"] and prepared.run.consa.allocation == allocation["fa"]
    from megatron_consa.train import main as train_main

    assert train_main(model) == 2
    assert "--consa-calibration-scores" in capsys.readouterr().err


def test_calibrate_cli_bad_input_is_one_error_line(capsys, tmp_path):
    tool = _tool("calibrate_heuristic")
    cases = [
        ([], "no calibration data"),
        (["--stdlib-text", "--seq-length", "8"], "--seq-length 8"),
        (["--stdlib-text", "--save-allocation", str(tmp_path / "a.json")], "--save-allocation needs --target-sparsity"),
        (["--stdlib-text", "--save-allocation", str(tmp_path / "a.json"), "--target-sparsity", "1.5"],
         "--target-sparsity 1.5"),
        (["--stdlib-text", "--target-sparsity", "0.5"], "--target-sparsity is the budget of --save-allocation"),
        (["--stdlib-text", "--split", "1,0,0"], "--split 1,0,0 is for --data-path"),
    ]
    for extra, message in cases:
        assert run_tool(tool.main, ["--load", str(DEMO), "--output", str(tmp_path / "s.json")] + extra) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1
    assert not list(tmp_path.iterdir())  # nothing written


def test_calibrate_cli_outputs_are_checked_before_the_checkpoint_loads(capsys, tmp_path):
    tool = _tool("calibrate_heuristic")
    taken = tmp_path / "taken"
    taken.mkdir()
    missing = str(tmp_path / "no-checkpoint")
    cases = [
        (["--output", str(taken)], f"--output {taken}: is a directory"),
        (["--output", str(tmp_path / "s.json"), "--save-allocation", str(taken), "--target-sparsity", "0.5"],
         f"--save-allocation {taken}: is a directory"),
        (["--output", str(tmp_path / "s.json"), "--save-allocation", str(tmp_path / "s.json"), "--target-sparsity", "0.5"],
         "--output and --save-allocation both name"),
    ]
    for extra, message in cases:
        assert run_tool(tool.main, ["--load", missing, "--stdlib-text"] + extra) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["taken"]
    docs = tmp_path / "taken" / "docs.jsonl"  # the scores written over the text they are computed from
    docs.write_text('{"text": "one"}\n')
    assert run_tool(tool.main, ["--load", missing, "--text", str(docs), "--output", str(docs)]) == 2
    assert f"error: --output {docs} is --text {docs}: writing it would replace that input" in capsys.readouterr().err
    assert docs.read_text() == '{"text": "one"}\n'
