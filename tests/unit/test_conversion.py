"""Hugging Face <-> megatron-consa conversion through the CLIs, against transformers' own forward.

One module-scoped set-up converts a tiny random checkpoint of every family
(Qwen3 with head_dim != hidden/heads, Qwen3 with mixed layer_types, Qwen2 with
QKV bias, Llama with tied embeddings, Mistral; the Qwen2 one sharded into an
index) at TP1 through tools/convert_hf_to_megatron.py, and loads every
checkpoint at TP2 and at PP2 in one 2-rank gloo launch. Exports: bit-exact round
trips, a layer-wise allocation in stock transformers, and a head-wise one (with
sinks) through the consa attention for every family, which stock transformers
without the package refuses.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

import transformers  # noqa: E402  a required dependency: a broken install fails here, never skips
from safetensors.torch import load_file, save_file  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "tests" / "distributed"))

from conversion_fixtures import (  # noqa: E402
    EXPORT, FAMILIES, IMPORT, TOL, WINDOW, assert_weights_equal, hf_logits, hf_model, read_weights, rel_err, save_hf, tokens,
    tool,
)

from megatron_consa.allocation import Allocation, make_preset  # noqa: E402
from megatron_consa.architecture import ArchitectureConfig  # noqa: E402
from megatron_consa.cli import run_tool  # noqa: E402
from megatron_consa.config import ConsaConfigError  # noqa: E402


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("conversion")
    out = {}
    for kind in FAMILIES:
        hf_dir = save_hf(kind, root / f"hf-{kind}", sharded=kind == "qwen2_bias")
        ckpt = root / f"mcore-{kind}"
        assert run_tool(IMPORT.main, ["--hf-path", str(hf_dir), "--save", str(ckpt), "--dtype", "fp32"]) == 0
        out[kind] = (hf_dir, ckpt)
    return root, out


@pytest.fixture(scope="module")
def layouts(converted, tmp_path_factory):
    from harness import launch

    _, out = converted
    results = launch(
        "conversion_layouts", 2, tmp_path_factory.mktemp("conv-launch"),
        checkpoints={k: str(c) for k, (_, c) in out.items()}, layouts={"tp2": (2, 1), "pp2": (1, 2)}, tokens=tokens(),
    )
    return results[0]


def test_sharded_index_and_sliding_source_are_imported(converted):
    _, out = converted
    assert (out["qwen2_bias"][0] / "model.safetensors.index.json").exists()
    alloc = Allocation.load(out["qwen3_hybrid"][1] / "allocation.json")
    assert alloc.window == WINDOW and alloc.fa == [[0, 0], [1, 1], [0, 0], [1, 1]]  # layer_types, 0-based
    for kind in FAMILIES:
        assert (out[kind][1] / "allocation.json").exists() == (kind == "qwen3_hybrid")
        assert (out[kind][1] / "config.json").exists()


def test_an_imported_sliding_window_checkpoint_is_its_own_hf_config(converted):
    """`--hf-config <imported checkpoint>`: its source's config.json has windows, and their
    allocation.json lies beside it; the source directory alone (no allocation.json) is refused."""
    import argparse

    from megatron_consa.training.arguments import ArgumentError, _arch_from_args

    hf_dir, ckpt = converted[1]["qwen3_hybrid"]
    arch = _arch_from_args(argparse.Namespace(hf_config=str(ckpt)))
    assert arch == ArchitectureConfig.from_hf(transformers.AutoConfig.from_pretrained(hf_dir), allow_sliding_window=True)
    with pytest.raises(ArgumentError, match="sliding_window"):
        _arch_from_args(argparse.Namespace(hf_config=str(hf_dir)))
    # a checkpoint a run from it saves describes itself too: its config.json without the windows
    # (the run's own are in its consa_run.json), the family's other fields kept
    from types import SimpleNamespace

    from megatron_consa.conversion.windows import allocation_from_hf
    from megatron_consa.data.gpt import DataConfig
    from megatron_consa.training.run import _checkpoint_extras

    saved = ckpt.parent / "trained-from-hybrid"
    saved.mkdir()
    run = SimpleNamespace(hf_config=str(ckpt), arch=arch,
                          data=DataConfig(data_path=["d"]))
    _checkpoint_extras(run, SimpleNamespace(save_to=lambda d: None))(saved)
    assert _arch_from_args(argparse.Namespace(hf_config=str(saved))) == arch
    written = transformers.AutoConfig.from_pretrained(saved)
    assert allocation_from_hf(written, arch) is None
    assert written.rope_parameters == transformers.AutoConfig.from_pretrained(hf_dir).rope_parameters


@pytest.mark.parametrize("kind", FAMILIES)
@pytest.mark.parametrize("layout", ["tp1", "tp2", "pp2"])
def test_imported_logits_equal_transformers(converted, layouts, kind, layout, single_rank_mcore):
    hf_dir, ckpt = converted[1][kind]
    if layout == "tp1":
        from scenarios import checkpoint_logits

        ours = checkpoint_logits(str(ckpt), tokens())
    else:
        ours = layouts[(kind, layout)]
    ref = hf_logits(hf_dir)
    assert ours.shape == ref.shape
    assert rel_err(ours, ref) < TOL, (kind, layout, rel_err(ours, ref))


def test_hybrid_import_really_slides(converted):
    hf_dir, _ = converted[1]["qwen3_hybrid"]
    model = hf_model("qwen3_hybrid")
    full = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**{**model.config.to_dict(), "use_sliding_window": False, "layer_types": None}))
    full.load_state_dict(model.state_dict())
    full.config._attn_implementation = "eager"
    assert rel_err(hf_logits(hf_dir), hf_logits(full)) > 1e-3  # the windows change the result at this length


def test_a_source_where_every_layer_slides_imports_runs_and_exports(tmp_path, single_rank_mcore):
    """Mistral-7B-v0.1's config (sliding_window on every layer) and Qwen with max_window_layers=0:
    imported as an all-SWA allocation, our logits equal transformers' (which slide at this
    length), and the export gives the stock field back."""
    from scenarios import checkpoint_logits

    from megatron_consa.conversion.windows import allocation_from_hf

    model = hf_model("mistral")
    config = transformers.MistralConfig(**{**model.config.to_dict(), "sliding_window": WINDOW})
    sliding = transformers.MistralForCausalLM(config).eval()
    sliding.load_state_dict(model.state_dict())
    sliding.config._attn_implementation = "eager"
    sliding.save_pretrained(tmp_path / "hf")
    assert rel_err(hf_logits(tmp_path / "hf"), hf_logits(model)) > 1e-3  # the window matters at this length
    ckpt, back = tmp_path / "mcore", tmp_path / "back"
    assert run_tool(IMPORT.main, ["--hf-path", str(tmp_path / "hf"), "--save", str(ckpt), "--dtype", "fp32"]) == 0
    allocation = Allocation.load(ckpt / "allocation.json")
    assert allocation.num_fa_kv_heads == 0 and allocation.window == WINDOW and allocation.target_sparsity is None
    assert rel_err(checkpoint_logits(str(ckpt), tokens()), hf_logits(tmp_path / "hf")) < TOL
    assert run_tool(EXPORT.main, ["--load", str(ckpt), "--save", str(back)]) == 0
    assert json.loads((back / "config.json").read_text())["sliding_window"] == WINDOW
    assert rel_err(hf_logits(back), hf_logits(tmp_path / "hf")) < TOL
    qwen = transformers.Qwen2Config(num_hidden_layers=2, hidden_size=32, intermediate_size=48, num_attention_heads=4,
                                    num_key_value_heads=2, vocab_size=64, use_sliding_window=True, sliding_window=8,
                                    max_window_layers=0)
    every = allocation_from_hf(qwen, ArchitectureConfig.from_hf(qwen, allow_sliding_window=True))
    assert every.num_fa_kv_heads == 0 and every.window == 8


def test_llama3_rope_scaling_is_carried_over_or_refused(tmp_path, single_rank_mcore):
    """Llama 3.x's llama3 RoPE scaling reaches our model: logits equal transformers' at positions where the scaling
    matters (512 tokens; dropping it changes transformers' own logits by far more than the tolerance)."""
    from conversion_fixtures import LLAMA3_ROPE
    from scenarios import checkpoint_logits

    model = hf_model("llama_tied")
    long = transformers.LlamaConfig(**{**model.config.to_dict(), "max_position_embeddings": 1024})
    scaled = transformers.LlamaForCausalLM(long).eval()
    scaled.load_state_dict(model.state_dict())
    plain = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{
        **long.to_dict(), "rope_parameters": {"rope_type": "default", "rope_theta": LLAMA3_ROPE["rope_theta"]}})).eval()
    plain.load_state_dict(model.state_dict())
    for m in (scaled, plain):
        m.config._attn_implementation = "eager"
    toks = torch.randint(0, model.config.vocab_size, (1, 512), generator=torch.Generator().manual_seed(3))
    ref = hf_logits(scaled, toks)
    assert rel_err(hf_logits(plain, toks), ref) > 10 * TOL  # dropping the scaling would fail the check below
    scaled.save_pretrained(tmp_path / "hf")
    assert run_tool(IMPORT.main, ["--hf-path", str(tmp_path / "hf"), "--save", str(tmp_path / "ckpt"), "--dtype", "fp32"]) == 0
    assert ArchitectureConfig.from_hf(scaled.config).rope_scaling_factor == LLAMA3_ROPE["factor"]
    assert rel_err(checkpoint_logits(str(tmp_path / "ckpt"), toks), ref) < TOL
    for bad, field in (({"rope_type": "yarn", "factor": 4.0}, "'yarn'"), ({"low_freq_factor": 2.0}, "low_freq_factor")):
        cfg = transformers.LlamaConfig(**{**long.to_dict(), "rope_parameters": {**LLAMA3_ROPE, **bad}})
        with pytest.raises(ConsaConfigError, match=field):
            ArchitectureConfig.from_hf(cfg)


def test_max_window_layers_says_what_layer_types_does_or_that_none_slide():
    """Exported Qwen windows: layer_types (what transformers reads) and max_window_layers (what a reader without
    layer_types reads): the first sliding layer where every later one slides, else the layer count (none slide:
    such a reader runs full attention, never a wrong window); a config's own value meaning the same is kept."""
    from megatron_consa.conversion.windows import hf_window_fields, set_window_fields

    arch = ArchitectureConfig.from_hf(transformers.Qwen3Config(num_hidden_layers=4, num_key_value_heads=2,
                                                               num_attention_heads=4, hidden_size=64, head_dim=16))

    def fields(rows):
        allocation = Allocation(granularity="layer", num_layers=4, num_kv_heads=2, window=8, sink_tokens=0,
                                target_sparsity=None, fa=[[r, r] for r in rows]).validate()
        return hf_window_fields(allocation, arch)

    assert fields([1, 1, 0, 0])["max_window_layers"] == 2
    mixed = fields([0, 1, 0, 1])
    assert mixed["max_window_layers"] == 4 and mixed["layer_types"] == ["sliding_attention", "full_attention"] * 2
    for own, written in ((28, 28), (4, 4), (1, 4)):
        config = transformers.Qwen3Config(num_hidden_layers=4, max_window_layers=own)
        set_window_fields(config, mixed)
        assert config.max_window_layers == written and config.layer_types == mixed["layer_types"]
    config = transformers.Qwen3Config(num_hidden_layers=4, max_window_layers=28)
    set_window_fields(config, hf_window_fields(None, arch))  # all FA: the field is not written
    assert config.max_window_layers == 28 and not config.use_sliding_window


@pytest.mark.parametrize("kind", FAMILIES)
def test_round_trip_through_the_clis_is_bit_exact(converted, kind):
    root, out = converted
    hf_dir, ckpt = out[kind]
    back = root / f"back-{kind}"
    assert run_tool(EXPORT.main, ["--load", str(ckpt), "--save", str(back)]) == 0
    src = read_weights(hf_dir)
    src.pop("lm_head.weight", None) if kind == "llama_tied" else None
    assert_weights_equal(read_weights(back), src)
    source, exported = (json.loads((d / "config.json").read_text()) for d in (hf_dir, back))
    assert {k: (source.get(k), exported.get(k)) for k in source.keys() | exported.keys()
            if source.get(k) != exported.get(k)} == {}
    # the exported directory runs in stock transformers, windows included
    assert rel_err(hf_logits(back), hf_logits(hf_dir)) < TOL


def test_tp2_conversion_through_the_cli_round_trips(converted):
    root, out = converted
    hf_dir = out["qwen2_bias"][0]
    ckpt, back = root / "mcore-qwen2-tp2", root / "back-qwen2-tp2"
    assert run_tool(IMPORT.main, ["--hf-path", str(hf_dir), "--save", str(ckpt), "--tensor-model-parallel-size", "2"]) == 0
    meta = json.loads((ckpt / "consa_run.json").read_text())
    assert meta["conversion"]["tensor_model_parallel_size"] == 2
    assert run_tool(EXPORT.main, ["--load", str(ckpt), "--save", str(back)]) == 0
    assert_weights_equal(read_weights(back), read_weights(hf_dir))


def test_export_splits_into_files_with_an_index(converted, capsys):
    """--max-shard-size splits the export as save_pretrained does (model-0000i-of-0000n
    files of at most that size, a larger tensor alone, and the index); transformers loads
    it to the source's logits, and the weights are the source's bit for bit. A size
    save_pretrained would not take is refused, nothing written."""
    root, out = converted
    hf_dir, ckpt = out["qwen3"]
    back = root / "back-qwen3-split"
    limit = 40_000
    assert run_tool(EXPORT.main, ["--load", str(ckpt), "--save", str(back), "--max-shard-size", str(limit)]) == 0
    index = json.loads((back / "model.safetensors.index.json").read_text())
    files = sorted(back.glob("model-*.safetensors"))
    assert len(files) > 2 and not (back / "model.safetensors").exists()
    assert sorted(set(index["weight_map"].values())) == [f.name for f in files]
    weights = read_weights(back)
    assert sorted(index["weight_map"]) == sorted(weights)
    for f in files:
        part = load_file(str(f))
        assert all(index["weight_map"][n] == f.name for n in part)
        size = sum(t.numel() * t.element_size() for t in part.values())
        assert size <= limit or len(part) == 1, (f.name, size)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in weights.values())
    assert_weights_equal(weights, read_weights(hf_dir))
    assert rel_err(hf_logits(back), hf_logits(hf_dir)) < TOL
    for size in ("40KB", "39.0625KiB"):  # save_pretrained's decimal units, and binary ones: the same 40000 bytes
        again = root / f"back-qwen3-split-{size}"
        assert run_tool(EXPORT.main, ["--load", str(ckpt), "--save", str(again), "--max-shard-size", size]) == 0
        assert json.loads((again / "model.safetensors.index.json").read_text()) == index
    bad = root / "back-qwen3-bad-size"
    for size in ("5XB", "0", "0.5B"):
        _assert_refused(capsys, EXPORT, ["--load", str(ckpt), "--save", str(bad), "--max-shard-size", size],
                        f"--max-shard-size {size}: not a positive size", bad)


def test_conversion_tools_show_only_their_own_lines(converted, tmp_path):
    """Run as a user runs them (a fresh process; the TP2 import spawns its ranks), the
    conversion tools print their own log lines and no library warnings (megatron-core's
    "Apex is not installed", deprecation notices), and --help prints nothing on stderr."""
    import subprocess

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for tool in ("convert_hf_to_megatron.py", "convert_megatron_to_hf.py", "convert_gguf_to_hf.py"):
        done = subprocess.run([sys.executable, str(ROOT / "tools" / tool), "--help"], capture_output=True, text=True, env=env)
        assert done.returncode == 0 and done.stderr == "", (tool, done.stderr)
    done = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "convert_hf_to_megatron.py"), "--hf-path", str(converted[1]["qwen3"][0]),
         "--save", str(tmp_path / "tp2"), "--tensor-model-parallel-size", "2"],
        capture_output=True, text=True, env=env,
    )
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines and all(line.startswith("INFO megatron_consa.") for line in lines), done.stderr


def _with_allocation(ckpt: Path, allocation: Allocation, copy: Path) -> Path:
    """A copy of a checkpoint whose allocation.json is `allocation` (our fixed-mode reference)."""
    import shutil

    shutil.copytree(ckpt, copy)
    allocation.save(copy / "allocation.json")
    return copy


@pytest.mark.parametrize("field, value", [
    ("intermediate_size", 40), ("vocab_size", 300), ("tie_word_embeddings", True), ("rope_theta", 12345.0),
    ("rms_norm_eps", 1e-3), ("num_key_value_heads", 4),
])
def test_export_refuses_a_config_json_that_describes_another_model(converted, tmp_path, capsys, field, value):
    """The checkpoint's config.json is what the export writes: one that no longer describes the weights (edited by
    hand, copied from another model) is refused by the field, nothing written; another RoPE base or epsilon would
    load in transformers and compute another function, another width would fail only in from_pretrained."""
    import shutil

    _, out = converted
    ckpt = tmp_path / "ckpt"
    shutil.copytree(out["qwen3"][1], ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    where = config["rope_parameters"] if field == "rope_theta" and "rope_parameters" in config else config
    assert where[field] != value
    where[field] = value
    (ckpt / "config.json").write_text(json.dumps(config))
    save = tmp_path / "hf"
    assert run_tool(EXPORT.main, ["--load", str(ckpt), "--save", str(save)]) == 2
    err = capsys.readouterr().err
    name = {"num_key_value_heads": "num_kv_heads", "rope_theta": "rope_theta"}.get(field, field)
    assert f"with {name}=" in err and "remove that config.json" in err, err
    assert not save.exists()


def test_a_checkpoint_from_a_newer_version_is_refused_by_its_unknown_field(converted, tmp_path, capsys):
    """An architecture field this version does not know is named (not a TypeError traceback, and not dropped: it
    could change the model) by every reader of a checkpoint: the export, finalize and the training entry point."""
    import shutil

    from megatron_consa.training.arguments import ArgumentError, parse_run_config
    from megatron_consa.training.finalize import FinalizeError, FinalizeRequest, finalize_checkpoint
    from megatron_consa.training.run import prepare_run

    _, out = converted
    ckpt = tmp_path / "ckpt"
    shutil.copytree(out["qwen3"][1], ckpt)
    meta = json.loads((ckpt / "consa_run.json").read_text())
    meta["architecture"]["sliding_window_pattern"] = 6
    (ckpt / "consa_run.json").write_text(json.dumps(meta))
    assert run_tool(EXPORT.main, ["--load", str(ckpt), "--save", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert "'sliding_window_pattern'" in err and "newer version" in err and "upgrade megatron-consa" in err, err
    assert not (tmp_path / "hf").exists()
    with pytest.raises(FinalizeError, match=f"--load {ckpt}: .*'sliding_window_pattern'.*upgrade megatron-consa"):
        finalize_checkpoint(FinalizeRequest(load=str(ckpt), save=str(tmp_path / "final")))
    assert not (tmp_path / "final").exists()
    base = ["--hf-config", str(ckpt), "--load", str(ckpt), "--mock-data", "--seq-length", "16", "--train-iters", "4",
            "--consa-target-warmup-iters", "1"]
    with pytest.raises(ArgumentError, match=f"--load {ckpt}: .*'sliding_window_pattern'.*upgrade megatron-consa"):
        prepare_run(parse_run_config(base), world_size=1)
    del meta["architecture"]["hidden_size"], meta["architecture"]["sliding_window_pattern"]
    with pytest.raises(ConsaConfigError, match="lacks 'hidden_size'.*damaged"):
        ArchitectureConfig.from_record(meta["architecture"], str(ckpt))


def test_layer_wise_hybrid_export_runs_in_stock_transformers(converted, single_rank_mcore):
    """A learned-style layer allocation on a Qwen3 import: stock transformers == our fixed-mode model."""
    from scenarios import checkpoint_logits

    root, out = converted
    _, ckpt = out["qwen3"]
    alloc = make_preset("interleave:2", num_layers=4, num_kv_heads=2, granularity="layer", target_sparsity=0.5, window=WINDOW)
    alloc.save(root / "interleave.json")
    back = root / "hybrid-export"
    assert run_tool(EXPORT.main, ["--load", str(ckpt), "--save", str(back), "--allocation", str(root / "interleave.json")]) == 0
    config = json.loads((back / "config.json").read_text())
    assert config["use_sliding_window"] is True and config["sliding_window"] == WINDOW
    assert config["layer_types"] == ["sliding_attention" if r[0] == 0 else "full_attention" for r in alloc.fa]
    # our fixed-mode model with the same allocation: point the checkpoint at it through a copy
    ours = checkpoint_logits(str(_with_allocation(ckpt, alloc, root / "mcore-qwen3-interleave")), tokens())
    stock = hf_logits(back)
    assert rel_err(ours, stock) < TOL
    assert rel_err(stock, hf_logits(out["qwen3"][0])) > 1e-3  # the hybrid differs from the all-FA source


# ----------------------------------------------------------------- head-wise export (consa attention)

HEAD_WISE = [[1, 1], [1, 0], [0, 0], [0, 1]]  # an all-FA layer, two mixed layers, an all-SWA layer
HEAD_WISE_KINDS = {"qwen3": 2, "qwen2_bias": 1, "llama_tied": 1, "mistral": 0}  # family -> sink tokens


def _consa_logits(hf_dir: Path) -> torch.Tensor:
    """Logits of an export loaded the way a user does: config.json names the attention."""
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    with torch.no_grad():
        return model.eval()(tokens()).logits


@pytest.fixture(scope="module")
def head_wise_exports(converted):
    root, out = converted
    exports = {}
    for kind, sinks in HEAD_WISE_KINDS.items():
        alloc = Allocation(granularity="kv_head", num_layers=4, num_kv_heads=2, window=WINDOW, sink_tokens=sinks,
                           target_sparsity=None, fa=HEAD_WISE).validate()
        alloc.save(root / f"head-wise-{kind}.json")
        back = root / f"head-wise-export-{kind}"
        argv = ["--load", str(out[kind][1]), "--save", str(back), "--allocation", str(root / f"head-wise-{kind}.json")]
        assert run_tool(EXPORT.main, argv) == 0
        exports[kind] = (back, alloc)
    return exports


@pytest.mark.parametrize("kind", list(HEAD_WISE_KINDS))
def test_head_wise_export_runs_with_the_consa_attention(converted, head_wise_exports, kind, single_rank_mcore):
    """A head-wise allocation (sinks too) in config.json: the registered consa attention == our fixed-mode model."""
    from scenarios import checkpoint_logits

    from megatron_consa.architecture import ArchitectureConfig
    from megatron_consa.config import ConsaConfigError
    from megatron_consa.conversion.hf_files import load_hf_config
    from megatron_consa.conversion.windows import CONSA_ATTENTION_IN_CONFIG

    root, out = converted
    back, alloc = head_wise_exports[kind]
    config = json.loads((back / "config.json").read_text())
    assert config["attn_implementation"] == CONSA_ATTENTION_IN_CONFIG
    assert config["consa"]["fa"] == HEAD_WISE and config["consa"]["window"] == WINDOW
    assert config["consa"]["sink_tokens"] == HEAD_WISE_KINDS[kind]
    assert config.get("sliding_window") is None and "sliding_attention" not in config.get("layer_types", [])
    ours = checkpoint_logits(str(_with_allocation(out[kind][1], alloc, root / f"mcore-head-wise-{kind}")), tokens())
    served = _consa_logits(back)
    assert rel_err(served, ours) < TOL, (kind, rel_err(served, ours))
    assert rel_err(served, hf_logits(out[kind][0])) > 1e-3  # the windows change the result at this length
    with pytest.raises(ConsaConfigError, match="carries a hybrid FA/SWA allocation in its 'consa' field"):
        ArchitectureConfig.from_hf(load_hf_config(back))  # never silently built as all FA


def test_head_wise_export_without_the_package_fails_loudly(converted, head_wise_exports, tmp_path):
    """Stock transformers, in a fresh process that has not imported megatron_consa, refuses the export,
    and so it does after the model was loaded with the package and saved again by transformers (after a
    forward, before any, or its config alone). Importing the package afterwards (transformers already
    loaded) registers the attention at once."""
    import shutil
    import subprocess

    from megatron_consa.conversion.windows import CONSA_ATTENTION_IN_CONFIG

    back, _ = head_wise_exports["qwen3"]
    model = transformers.AutoModelForCausalLM.from_pretrained(back, dtype=torch.float32)
    model.save_pretrained(tmp_path / "resaved-unrun")
    with torch.no_grad():
        model(tokens()[:, :4])
    model.save_pretrained(tmp_path / "resaved")
    shutil.copytree(back, tmp_path / "config-resaved")
    transformers.AutoConfig.from_pretrained(back).save_pretrained(tmp_path / "config-resaved")
    for copy in ("resaved-unrun", "resaved", "config-resaved"):
        assert json.loads((tmp_path / copy / "config.json").read_text())["attn_implementation"] == \
            CONSA_ATTENTION_IN_CONFIG, copy
    script = (
        "import json, sys\n"
        "from transformers import AutoModelForCausalLM\n"
        "errors = []\n"
        "for path in sys.argv[1:]:\n"
        "    try:\n"
        "        AutoModelForCausalLM.from_pretrained(path)\n"
        "        errors.append(None)\n"
        "    except Exception as err:\n"
        "        errors.append(f'{type(err).__name__}: {err}')\n"
        "assert 'megatron_consa' not in sys.modules\n"
        "print(json.dumps(errors))\n"
        "import megatron_consa\n"
        "print(json.dumps(AutoModelForCausalLM.from_pretrained(sys.argv[1]).config._attn_implementation))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    copies = [str(tmp_path / copy) for copy in ("resaved", "resaved-unrun", "config-resaved")]
    run = subprocess.run([sys.executable, "-c", script, str(back), *copies], capture_output=True,
                         text=True, cwd=tmp_path, timeout=600, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    errors = json.loads(run.stdout.strip().splitlines()[-2])
    for error in errors:
        assert error is not None and "import megatron_consa" in error, errors
    loaded_with = json.loads(run.stdout.strip().splitlines()[-1])  # loaded once the package is imported
    assert loaded_with == CONSA_ATTENTION_IN_CONFIG


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_head_wise_export_refuses_another_attention(converted, head_wise_exports, implementation):
    """Asked for another attention (from_pretrained's argument, or set_attn_implementation), a head-wise export is
    refused: its stock fields say all FA, so any other attention would drop its windows silently. A layer-wise
    export, which stock attention runs, still loads with it."""
    back, _ = head_wise_exports["qwen3"]
    with pytest.raises(ValueError, match=rf"attn_implementation='{implementation}'.*runs only with the consa attention"):
        transformers.AutoModelForCausalLM.from_pretrained(back, attn_implementation=implementation)
    model = transformers.AutoModelForCausalLM.from_pretrained(back)
    with pytest.raises(ValueError, match="runs only with the consa attention"):
        model.set_attn_implementation(implementation)
    config = transformers.AutoConfig.from_pretrained(back)
    del config.consa  # (the same model, all FA: nothing to guard)
    plain = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=implementation)
    assert plain.config._attn_implementation == implementation


def test_head_wise_export_imports_back(converted, head_wise_exports, tmp_path):
    """The consa export is a source the importer reads: its allocation comes back as allocation.json."""
    back, alloc = head_wise_exports["qwen3"]
    ckpt = tmp_path / "reimported"
    assert run_tool(IMPORT.main, ["--hf-path", str(back), "--save", str(ckpt)]) == 0
    again = Allocation.load(ckpt / "allocation.json")
    assert (again.fa, again.window, again.sink_tokens) == (alloc.fa, alloc.window, alloc.sink_tokens)
    assert json.loads((ckpt / "consa_run.json").read_text())["allocation"] == "allocation.json"


# ----------------------------------------------------------------- a sentencepiece checkpoint

DEMO = ROOT / "examples" / "checkpoints" / "demo_dense"  # trained with a sentencepiece model (NFKC, EOS 1, no BOS)


@pytest.mark.parametrize("bos", [False, True])
def test_a_sentencepiece_checkpoint_exports_the_tokenizer_transformers_loads(tmp_path, capsys, bos):
    """The demo checkpoint (only a tokenizer.model; config.json with null BOS/EOS ids) and a copy with a
    sentencepiece model that has a BOS: AutoTokenizer on the export (a qwen3 config, whose default would be
    Qwen2's byte-level tokenizer) encodes and decodes as sentencepiece itself on varied text, config.json and
    the generation config transformers derives from it carry the model's BOS/EOS ids (none for a model
    without), and tools/generate.py prints the same text from the checkpoint and from its export."""
    import shutil

    import sentencepiece

    from megatron_consa.data.demo_corpus import stdlib_documents
    from tokenizer_fixtures import assert_same_as_sentencepiece, varied_texts

    ckpt = DEMO
    if bos:  # the same checkpoint with a sentencepiece model that has a BOS (sentencepiece's defaults otherwise)
        ckpt = tmp_path / "ckpt"
        shutil.copytree(DEMO, ckpt)
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=iter(stdlib_documents(max_documents=40)), model_prefix=str(tmp_path / "sp"),
            vocab_size=512, byte_fallback=True, bos_id=2, eos_id=1, unk_id=0, pad_id=-1, minloglevel=2, num_threads=1)
        shutil.copy(tmp_path / "sp.model", ckpt / "tokenizer.model")  # the model's vocabulary size: any id it emits decodes
    assert json.loads((ckpt / "config.json").read_text())["eos_token_id"] is None  # what the export must not keep
    back = tmp_path / "hf"
    assert run_tool(EXPORT.main, ["--load", str(ckpt), "--save", str(back)]) == 0
    sp = sentencepiece.SentencePieceProcessor(model_file=str(ckpt / "tokenizer.model"))
    tokenizer = transformers.AutoTokenizer.from_pretrained(back)
    assert_same_as_sentencepiece(tokenizer, ckpt / "tokenizer.model", varied_texts())
    want = (2 if bos else None, 1)
    assert (sp.bos_id() if sp.bos_id() >= 0 else None, sp.eos_id()) == want
    config = json.loads((back / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"]) == want
    generation = transformers.GenerationConfig.from_model_config(transformers.AutoConfig.from_pretrained(back))
    assert (generation.bos_token_id, generation.eos_token_id) == want  # where model.generate stops
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == want
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    assert {f.name: f.stat().st_mode for f in back.iterdir()} == dict.fromkeys(
        ["allocation.json", "config.json", "model.safetensors", "tokenizer.json", "tokenizer.model", "tokenizer_config.json"],
        plain.stat().st_mode)
    texts = []
    for source in (["--load", str(ckpt)], ["--hf-path", str(back)]):
        argv = [*source, "--prompt", "def fibonacci(n):\n    return", "--max-new-tokens", "12"]
        assert run_tool(tool("generate").main, argv) == 0
        texts.append(capsys.readouterr().out)
    assert texts[0] == texts[1] and texts[0].strip(), texts


def test_a_sentencepiece_model_without_a_hugging_face_equivalent_is_refused(tmp_path, capsys):
    """A checkpoint whose sentencepiece model transformers cannot reproduce (a word model) is not exported
    with a tokenizer AutoTokenizer would replace: exit 2 naming the file, before the weights are read."""
    import shutil

    import sentencepiece

    from megatron_consa.data.demo_corpus import stdlib_documents

    ckpt = tmp_path / "ckpt"
    shutil.copytree(DEMO, ckpt)
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(stdlib_documents(max_documents=20)), model_prefix=str(tmp_path / "word"),
        model_type="word", vocab_size=300, bos_id=-1, eos_id=1, unk_id=0, minloglevel=2, num_threads=1)
    shutil.copy(tmp_path / "word.model", ckpt / "tokenizer.model")
    _assert_refused(capsys, EXPORT, ["--load", str(ckpt), "--save", str(tmp_path / "hf")],
                    f"{ckpt / 'tokenizer.model'}: a sentencepiece 'word' model has no Hugging Face tokenizer", tmp_path / "hf")


# ----------------------------------------------------------------- file modes

def test_every_output_file_gets_the_mode_a_plain_write_gives(converted, tmp_path, monkeypatch):
    """safetensors writes a private temporary file (0600) and renames it into place: the weight files of an
    export (one file or shards) and of a GGUF conversion get the mode of every other file written, which
    is the umask's (an unusual one here, 002), as a file written with open() gets; tokenizer files copied
    from the source too (not the source's mode)."""
    import os
    import stat

    from megatron_consa.conversion import gguf
    from megatron_consa.files import _umask
    from tokenizer_fixtures import hf_tokenizer_dir

    _, out = converted
    _umask.cache_clear()
    old = os.umask(0o002)
    try:
        plain = tmp_path / "plain.txt"
        plain.write_text("x")
        want = stat.S_IMODE(plain.stat().st_mode)
        assert want == 0o664
        exported = tmp_path / "split"
        assert run_tool(EXPORT.main, ["--load", str(out["qwen3"][1]), "--save", str(exported), "--max-shard-size", "40000"]) == 0
        one = tmp_path / "one"
        assert run_tool(EXPORT.main, ["--load", str(out["llama_tied"][1]), "--save", str(one)]) == 0
        # the GGUF conversion's writing, with transformers' GGUF reading stood in for by a tiny model
        source = tmp_path / "model.gguf"
        source.write_bytes(b"GGUF")
        tok = hf_tokenizer_dir(["def f(x):\n    return x\n"] * 8, tmp_path / "tok")
        monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", lambda **kw: hf_model("llama_tied"))
        monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained",
                            lambda **kw: transformers.PreTrainedTokenizerFast.from_pretrained(str(tok)))
        dequantized = gguf.gguf_to_hf(source, tmp_path / "gguf")
    finally:
        os.umask(old)
        _umask.cache_clear()
    for directory in (exported, one, dequantized):
        weights = sorted(directory.glob("model*.safetensors"))
        assert len(weights) > 2 if directory == exported else len(weights) == 1, directory
        modes = {f.name: stat.S_IMODE(f.stat().st_mode) for f in directory.iterdir()}
        assert modes == dict.fromkeys(modes, want), (directory, modes)
        assert stat.S_IMODE(directory.stat().st_mode) == 0o775


# ----------------------------------------------------------------- bad input


def _assert_refused(capsys, tool, argv, message, nothing_at):
    assert run_tool(tool.main, argv) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert not nothing_at.exists(), f"{nothing_at} was left behind"
    assert not list(nothing_at.parent.glob(f".{nothing_at.name}.tmp-*")), "a temporary directory was left behind"


def test_bad_inputs_are_refused_with_a_clear_error_and_nothing_written(tmp_path, capsys, converted):
    root, out = converted
    save = tmp_path / "out"
    # unsupported architecture
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": 10, "n_layer": 2}))
    _assert_refused(capsys, IMPORT, ["--hf-path", str(gpt2), "--save", str(save)], "model_type='gpt2' is not supported", save)
    # missing weight file (a shard named by the index)
    broken = tmp_path / "broken"
    import shutil

    shutil.copytree(out["qwen2_bias"][0], broken)
    shard = sorted(broken.glob("model-*.safetensors"))[-1]
    shard.unlink()
    _assert_refused(capsys, IMPORT, ["--hf-path", str(broken), "--save", str(save)], f"missing from {broken}: ['{shard.name}']", save)
    # pickle only
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(out["qwen3"][0] / "config.json", pickled)
    (pickled / "pytorch_model.bin").write_bytes(b"not read")
    _assert_refused(capsys, IMPORT, ["--hf-path", str(pickled), "--save", str(save)], "pickle files are not read", save)
    # a tensor with the wrong shape
    bad_shape = tmp_path / "bad_shape"
    shutil.copytree(out["qwen3"][0], bad_shape)
    state = load_file(str(bad_shape / "model.safetensors"))
    state["model.layers.1.self_attn.k_proj.weight"] = state["model.layers.1.self_attn.k_proj.weight"][:-1].clone()
    save_file(state, str(bad_shape / "model.safetensors"), metadata={"format": "pt"})
    _assert_refused(capsys, IMPORT, ["--hf-path", str(bad_shape), "--save", str(save)], "'model.layers.1.self_attn.k_proj.weight' has shape [47, 64]", save)
    # heads not divisible by TP
    _assert_refused(
        capsys, IMPORT, ["--hf-path", str(out["qwen3"][0]), "--save", str(save), "--tensor-model-parallel-size", "3"],
        "num_attention_heads=4 is not divisible by --tensor-model-parallel-size=3", save,
    )
    for flag in ("--tensor-model-parallel-size", "--pipeline-model-parallel-size"):
        _assert_refused(capsys, IMPORT, ["--hf-path", str(out["qwen3"][0]), "--save", str(save), flag, "0"],
                        f"{flag}=0: must be >= 1", save)
    # a checkpoint whose tokenizer transformers cannot read: named by the flag that gave it
    damaged = shutil.copytree(out["qwen3"][1], tmp_path / "damaged_tokenizer")
    (damaged / "tokenizer.json").write_text("{not json")
    _assert_refused(capsys, EXPORT, ["--load", str(damaged), "--save", str(save)],
                    f"error: --load {damaged}: transformers cannot read the tokenizer there", save)
    # an allocation made for another model
    other = make_preset("all_swa", num_layers=6, num_kv_heads=2, granularity="layer", target_sparsity=None, window=8)
    other.save(tmp_path / "other.json")
    _assert_refused(
        capsys, EXPORT, ["--load", str(out["qwen3"][1]), "--save", str(save), "--allocation", str(tmp_path / "other.json")],
        f"--allocation {tmp_path / 'other.json'}: allocation field 'num_layers' is 6 but the model/config has num_layers=4",
        save,
    )


def test_a_damaged_source_is_refused_naming_the_file(tmp_path, capsys):
    """An invalid config.json (which transformers' validation refuses with huggingface_hub's strict
    dataclass errors, not a ValueError) and a truncated model.safetensors: one error line naming
    the file, exit 2, nothing written; what the converter and generate --hf-path both read."""
    import shutil

    from megatron_consa.cli import UserInputError
    from megatron_consa.conversion.hf_files import load_hf_config, safetensors_meta

    good = save_hf("qwen3", tmp_path / "good")
    save = tmp_path / "out"
    bad_config = tmp_path / "bad_config"
    shutil.copytree(good, bad_config)
    config = json.loads((good / "config.json").read_text())
    layers = config["num_hidden_layers"]
    config["layer_types"] = ["full_attention"] * (layers + 1)
    (bad_config / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserInputError) as caught:  # a ValueError: training's `except ValueError` takes it too
        load_hf_config(bad_config)
    assert isinstance(caught.value, ValueError)
    message = f"`num_hidden_layers` ({layers}) must be equal to the number of `layer_types` ({layers + 1})"
    _assert_refused(capsys, IMPORT, ["--hf-path", str(bad_config), "--save", str(save)],
                    f"{bad_config / 'config.json'}: not a valid qwen3 config: {message}", save)
    truncated = tmp_path / "truncated"
    shutil.copytree(good, truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ValueError, match="it may be truncated"):
        safetensors_meta(truncated)
    _assert_refused(capsys, IMPORT, ["--hf-path", str(truncated), "--save", str(save)],
                    f"{weights}: not a readable safetensors file", save)
    from conversion_fixtures import tool

    generate = tool("generate")
    for source, message in ((bad_config, message), (truncated, f"{weights}: not a readable safetensors file")):
        assert run_tool(generate.main, ["--hf-path", str(source), "--prompt-ids", "1,2"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: --hf-path {source}: ") and message in err and len(err.strip().splitlines()) == 1
    # a source missing its files: the import's errors name the flag too
    weightless = tmp_path / "weightless"
    weightless.mkdir()
    shutil.copy(good / "config.json", weightless)
    for source, message in ((tmp_path / "nowhere", f"error: --hf-path {tmp_path / 'nowhere'} does not exist"),
                            (weightless, f"error: --hf-path {weightless}: no model.safetensors or "
                                         f"model.safetensors.index.json in {weightless}")):
        _assert_refused(capsys, IMPORT, ["--hf-path", str(source), "--save", str(save)], message, save)


def test_existing_output_is_refused_unless_overwrite(tmp_path, capsys, converted):
    _, out = converted
    hf_qwen3, hf_llama = out["qwen3"][0], out["llama_tied"][0]
    target = tmp_path / "ckpt"
    assert run_tool(IMPORT.main, ["--hf-path", str(hf_qwen3), "--save", str(target)]) == 0
    before = (target / "consa_run.json").read_text()
    assert run_tool(IMPORT.main, ["--hf-path", str(hf_qwen3), "--save", str(target)]) == 0  # same conversion: no-op
    assert run_tool(IMPORT.main, ["--hf-path", str(hf_llama), "--save", str(target)]) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert (target / "consa_run.json").read_text() == before  # untouched
    assert run_tool(IMPORT.main, ["--hf-path", str(hf_llama), "--save", str(target), "--overwrite"]) == 0
    assert json.loads((target / "consa_run.json").read_text())["architecture"]["model_type"] == "llama"
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "keep.txt").write_text("x")
    assert run_tool(EXPORT.main, ["--load", str(target), "--save", str(tmp_path / "hf")]) == 2
    assert "pass --overwrite" in capsys.readouterr().err and (tmp_path / "hf" / "keep.txt").exists()
    (target / "consa_run.json").write_text("{not json")  # a damaged record: named, not a bare JSON error
    assert run_tool(IMPORT.main, ["--hf-path", str(hf_llama), "--save", str(target)]) == 2
    err = capsys.readouterr().err
    assert f"{target / 'consa_run.json'}: not valid JSON" in err and "--save holds a damaged checkpoint" in err, err


def test_an_output_that_is_or_holds_the_input_is_refused_even_with_overwrite(tmp_path, capsys, converted):
    """Writing --save replaces that directory whole: were it the input, or a folder holding it, --overwrite
    would delete the input. Refused before any work, without pointing at --overwrite, input untouched."""
    import shutil

    from megatron_consa.conversion import gguf

    _, out = converted
    hf = tmp_path / "models" / "hf"
    shutil.copytree(out["qwen3"][0], hf)
    ckpt = tmp_path / "models" / "ckpt"
    assert run_tool(IMPORT.main, ["--hf-path", str(hf), "--save", str(ckpt)]) == 0
    capsys.readouterr()
    held = {p: sorted(q.name for q in p.iterdir()) for p in (hf, ckpt)}
    for tool, argv, flag, source in (
            (IMPORT, ["--hf-path", str(hf), "--save", str(hf)], "--hf-path", hf),
            (IMPORT, ["--hf-path", str(hf), "--save", str(tmp_path / "models")], "--hf-path", hf),
            (EXPORT, ["--load", str(ckpt), "--save", str(ckpt)], "--load", ckpt),
            (EXPORT, ["--load", str(ckpt) + "/", "--save", str(tmp_path / "models" / ".." / "models")], "--load", ckpt)):
        for extra in ([], ["--overwrite"]):
            assert run_tool(tool.main, argv + extra) == 2, argv + extra
            err = capsys.readouterr().err
            assert f" {flag} " in err and "would replace that input, deleting it; choose another --save" in err, err
            assert "--overwrite" not in err, err
    allocation = tmp_path / "models" / "ckpt" / "allocation.json"
    assert run_tool(EXPORT.main, ["--load", str(out["qwen3"][1]), "--allocation", str(allocation), "--save",
                                  str(ckpt), "--overwrite"]) == 2
    assert "holds --allocation" in capsys.readouterr().err
    with pytest.raises(FileExistsError, match="--save .* is --gguf-file .*: writing it would replace"):
        gguf.gguf_to_hf(hf / "model.safetensors", hf / "model.safetensors", overwrite=True)
    assert {p: sorted(q.name for q in p.iterdir()) for p in (hf, ckpt)} == held


def test_a_rerun_over_a_changed_source_is_refused_not_skipped(tmp_path, capsys, converted):
    """The same command after the source changed in place (an edited config.json; weights
    re-saved with the same shapes, so the same sizes) is not "nothing to do": it is refused
    without --overwrite, naming the change, and --overwrite converts the new source."""
    import shutil

    import torch
    from safetensors.torch import save_file

    source = tmp_path / "src"
    shutil.copytree(converted[1]["qwen3"][0], source)
    target = tmp_path / "ckpt"
    argv = ["--hf-path", str(source), "--save", str(target)]
    assert run_tool(IMPORT.main, argv) == 0
    before = (target / "consa_run.json").read_text()
    assert run_tool(IMPORT.main, argv) == 0  # unchanged source: a no-op
    assert (target / "consa_run.json").read_text() == before

    config = json.loads((source / "config.json").read_text())
    config["rms_norm_eps"] = config["rms_norm_eps"] * 10
    (source / "config.json").write_text(json.dumps(config))
    assert run_tool(IMPORT.main, argv) == 2
    err = capsys.readouterr().err
    assert "as its files were before (they changed since)" in err and "pass --overwrite" in err, err
    assert (target / "consa_run.json").read_text() == before  # untouched

    assert run_tool(IMPORT.main, argv + ["--overwrite"]) == 0
    assert json.loads((target / "consa_run.json").read_text())["architecture"]["rms_norm_eps"] == config["rms_norm_eps"]
    weights = source / "model.safetensors"
    size = weights.stat().st_size
    state = load_file(str(weights))
    save_file({k: v + 1.0 if v.is_floating_point() else v for k, v in state.items()}, str(weights),
              metadata={"format": "pt"})
    assert weights.stat().st_size == size
    assert run_tool(IMPORT.main, argv) == 2
    assert "they changed since" in capsys.readouterr().err
    assert run_tool(IMPORT.main, argv + ["--overwrite"]) == 0
    (source / "merges.txt").write_text("#version: 0.2\n")  # a tokenizer file the import copies, not JSON
    assert run_tool(IMPORT.main, argv + ["--overwrite"]) == 0 and (target / "merges.txt").is_file()
    (source / "merges.txt").write_text("#version: 0.2\na b\n")
    assert run_tool(IMPORT.main, argv) == 2
    assert "they changed since" in capsys.readouterr().err
    # an output whose record is an earlier converter's (names and sizes): said so, not "changed"
    assert run_tool(IMPORT.main, argv + ["--overwrite"]) == 0
    meta = json.loads((target / "consa_run.json").read_text())
    meta["conversion"]["source_files"] = [[e[0], 1] for e in meta["conversion"]["source_files"]]
    (target / "consa_run.json").write_text(json.dumps(meta))
    assert run_tool(IMPORT.main, argv) == 2
    assert "recorded by an earlier version of the converter" in capsys.readouterr().err


def test_a_tied_config_with_its_own_head_in_the_weights(tmp_path, capsys, single_rank_mcore):
    """tie_word_embeddings=true with an lm_head.weight in the file: a copy of the embedding
    imports tied; a different head (which transformers computes with) is refused naming the
    field and the fix, and with the fix applied the import equals transformers' logits."""
    from safetensors.torch import save_file
    from scenarios import checkpoint_logits

    source = save_hf("llama_tied", tmp_path / "src")
    weights = source / "model.safetensors"
    state = load_file(str(weights))
    assert "lm_head.weight" not in state
    save_file({**state, "lm_head.weight": state["model.embed_tokens.weight"].clone()}, str(weights),
              metadata={"format": "pt"})
    assert run_tool(IMPORT.main, ["--hf-path", str(source), "--save", str(tmp_path / "copy")]) == 0
    assert rel_err(checkpoint_logits(str(tmp_path / "copy"), tokens()), hf_logits(source)) < TOL

    head = torch.randn_like(state["model.embed_tokens.weight"], generator=torch.Generator().manual_seed(5))
    save_file({**state, "lm_head.weight": head}, str(weights), metadata={"format": "pt"})
    ref = hf_logits(source)
    save = tmp_path / "ckpt"
    _assert_refused(capsys, IMPORT, ["--hf-path", str(source), "--save", str(save)],
                    'the weights hold an lm_head.weight that differs from model.embed_tokens.weight', save)
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": False}))
    assert rel_err(hf_logits(source), ref) == 0  # transformers computed with the file's head all along
    assert run_tool(IMPORT.main, ["--hf-path", str(source), "--save", str(save)]) == 0
    assert rel_err(checkpoint_logits(str(save), tokens()), ref) < TOL


def test_imported_checkpoint_starts_a_learning_run(converted, single_rank_mcore):
    """The training code loads a converted checkpoint with weights_only (gates at init_log_alpha)."""
    from megatron_consa.config import ConsaConfig
    from megatron_consa.model import ArchitectureConfig, unwrap_model
    from megatron_consa.training.checkpoint import load_checkpoint, read_checkpoint_meta
    from megatron_consa.training.config import ParallelConfig, TrainingConfig
    from megatron_consa.training.data import PeriodicSequenceData
    from megatron_consa.training.loop import ConsaTrainer
    from megatron_consa.training.parallel import initialize_distributed

    hf_dir, ckpt = converted[1]["qwen3"]
    arch = ArchitectureConfig(**read_checkpoint_meta(ckpt)["architecture"])
    training = TrainingConfig(train_iters=1, micro_batch_size=1, global_batch_size=1, seq_length=16, lr=1e-3, min_lr=1e-3, lr_decay_style="constant")
    initialize_distributed(ParallelConfig(), seed=training.seed)
    trainer = ConsaTrainer(
        arch=arch, consa=ConsaConfig(window=WINDOW, backend="torch", target_warmup_iters=0), parallel=ParallelConfig(), training=training,
        data=PeriodicSequenceData(vocab_size=arch.vocab_size, seq_length=16, period=5),
    )
    assert load_checkpoint(trainer, ckpt, weights_only=True) == 0
    hf = load_file(str(hf_dir / "model.safetensors"))
    got = unwrap_model(trainer.chunks[0]).state_dict()
    assert torch.equal(got["embedding.word_embeddings.weight"], hf["model.embed_tokens.weight"])
    assert torch.equal(got["decoder.layers.3.mlp.linear_fc2.weight"], hf["model.layers.3.mlp.down_proj.weight"])
    record = trainer.train_step()
    assert torch.isfinite(torch.tensor(record.loss))


def _reference_shard(full: dict, arch, layout) -> dict:
    """The rank's state dict as megatron-core shards the fused model: chunks of the fused
    tensors (QKV and fc1 by rows, [gate_r; up_r] for fc1, proj and fc2 by columns), the
    stage's layers renumbered, a tied embedding as the last stage's output layer."""
    import re

    tp, r = layout.tp_size, layout.tp_rank
    per = arch.num_layers // layout.pp_size
    first = layout.pp_rank * per

    def chunk(key, t):
        name = re.sub(r"^decoder\.layers\.\d+\.", "", key)
        if name in ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias",
                    "embedding.word_embeddings.weight", "output_layer.weight"):
            return t.chunk(tp, 0)[r]
        if name in ("self_attention.linear_proj.weight", "mlp.linear_fc2.weight"):
            return t.chunk(tp, 1)[r]
        if name == "mlp.linear_fc1.weight":
            gate, up = t.chunk(2, 0)
            return torch.cat([gate.chunk(tp, 0)[r], up.chunk(tp, 0)[r]])
        return t

    out = {}
    for key, t in full.items():
        m = re.match(r"decoder\.layers\.(\d+)\.(.*)", key)
        if m and first <= int(m.group(1)) < first + per:
            out[f"decoder.layers.{int(m.group(1)) - first}.{m.group(2)}"] = chunk(key, t)
        elif key.startswith("embedding.") and layout.pp_rank == 0:
            out[key] = chunk(key, t)
        elif key.startswith(("decoder.final_layernorm", "output_layer")) and layout.pp_rank == layout.pp_size - 1:
            out[key] = chunk(key, t)
    if arch.tie_word_embeddings and layout.pp_size > 1 and layout.pp_rank == layout.pp_size - 1:
        out["output_layer.weight"] = chunk("output_layer.weight", full["embedding.word_embeddings.weight"])
    return out


def test_each_import_rank_reads_only_its_shard(converted, tmp_path):
    """A rank of a TP x PP import reads its pipeline stage's tensors only, and of each split
    tensor only its tensor-parallel slice (a replicated one whole): what it reads, fused,
    equals megatron-core's chunk of the whole fused model. TP1-4 x PP1-2, over a QK-norm
    model, a QKV-bias one from a sharded index, a tied one, and one with 4 KV groups (TP4)."""
    from megatron_consa.conversion.hf_files import read_safetensors
    from megatron_consa.conversion.importer import read_rank_state
    from megatron_consa.conversion.keymap import hf_to_mcore
    from megatron_consa.conversion.sharding import RankLayout, hf_tensor_part

    config = transformers.Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=8, num_key_value_heads=4, head_dim=8)
    torch.manual_seed(0)
    transformers.Qwen3ForCausalLM(config).save_pretrained(tmp_path / "g4")
    cases = [(converted[1][k][0], tp, pp) for k in ("qwen3", "qwen2_bias", "llama_tied") for tp in (1, 2) for pp in (1, 2)]
    cases += [(tmp_path / "g4", 4, 2)]
    for hf_dir, tp, pp in cases:
        arch = ArchitectureConfig.from_hf(transformers.AutoConfig.from_pretrained(hf_dir))
        everything = read_safetensors(hf_dir)
        full = hf_to_mcore(everything, arch)
        seen: dict = {}
        for pp_rank in range(pp):
            for tp_rank in range(tp):
                layout = RankLayout(tp_rank, tp, pp_rank, pp)
                read = read_safetensors(hf_dir, part=lambda n, s: hf_tensor_part(n, s, arch, layout))
                per = arch.num_layers // pp
                layers = {int(k.split(".")[2]) for k in read if k.startswith("model.layers.")}
                assert layers == set(range(pp_rank * per, (pp_rank + 1) * per)), (hf_dir.name, tp, pp, layout)
                for name, t in read.items():
                    whole = everything[name]
                    split = t.shape != whole.shape
                    assert t.numel() == whole.numel() // (tp if split else 1), (name, layout)
                    assert split == (tp > 1 and not name.endswith(("norm.weight",))), (name, layout)
                    seen.setdefault(name, []).append(t)
                expected = _reference_shard(full, arch, layout)
                got = read_rank_state(hf_dir, arch, layout)
                assert sorted(got) == sorted(expected), (hf_dir.name, layout)
                assert all(torch.equal(got[k], expected[k]) for k in got), (hf_dir.name, layout)
        # together the ranks read every tensor: the split ones once (the tied embedding once
        # more, on the last stage), the replicated ones once per TP rank
        assert set(seen) == set(everything), hf_dir.name
        tied_twice = arch.tie_word_embeddings and pp > 1
        for name, parts in seen.items():
            copies = 2 if tied_twice and name == "model.embed_tokens.weight" else 1
            replicated = parts[0].shape == everything[name].shape
            assert sum(t.numel() for t in parts) == everything[name].numel() * copies * (tp if replicated else 1), name


def test_import_checks_the_whole_checkpoint_from_its_headers(converted, monkeypatch, tmp_path):
    """The checks before an import (shapes, names, dtype) read the safetensors headers, not
    the tensors: a process that read them all would hold the whole model at once."""
    import types

    import safetensors

    from megatron_consa.conversion.importer import ImportRequest, prepare_import

    real = safetensors.safe_open

    class HeadersOnly:
        def __init__(self, *args, **kwargs):
            self._handle = real(*args, **kwargs)

        def __enter__(self):
            self._open = self._handle.__enter__()
            return self

        def __exit__(self, *exc):
            return self._handle.__exit__(*exc)

        def keys(self):
            return self._open.keys()

        def get_slice(self, name):
            part = self._open.get_slice(name)
            return types.SimpleNamespace(get_shape=part.get_shape, get_dtype=part.get_dtype)

        def get_tensor(self, name):
            raise AssertionError(f"prepare_import read tensor {name}")

    monkeypatch.setattr(safetensors, "safe_open", HeadersOnly)
    for kind in ("qwen3", "qwen2_bias"):  # one file; a sharded index
        prepared = prepare_import(ImportRequest(hf_path=str(converted[1][kind][0]), save=str(tmp_path / kind)))
        assert prepared.dtype == torch.float32 and prepared.arch.num_layers == 4
    bad = tmp_path / "bad"
    import shutil

    shutil.copytree(converted[1]["qwen3"][0], bad)
    weights = load_file(str(bad / "model.safetensors"))
    weights["model.layers.2.mlp.up_proj.weight"] = weights["model.layers.2.mlp.up_proj.weight"][:-1]
    save_file(weights, str(bad / "model.safetensors"))
    with pytest.raises(ValueError, match="model.layers.2.mlp.up_proj.weight"):
        prepare_import(ImportRequest(hf_path=str(bad), save=str(tmp_path / "out")))


def test_a_bf16_source_imports_at_its_own_dtype_and_round_trips(converted, tmp_path):
    """Hugging Face releases are mostly bf16: imported without --dtype the checkpoint is bf16 (not
    upcast), and the export gives the source's bf16 tensors back bit for bit."""
    from conversion_fixtures import hf_model

    from megatron_consa.conversion.checkpoint_model import read_checkpoint_info

    source = tmp_path / "hf-bf16"
    hf_model("qwen3").to(torch.bfloat16).save_pretrained(source)
    ckpt, back = tmp_path / "mcore-bf16", tmp_path / "back-bf16"
    assert run_tool(IMPORT.main, ["--hf-path", str(source), "--save", str(ckpt), "--tensor-model-parallel-size", "2"]) == 0
    assert read_checkpoint_info(ckpt).dtype == torch.bfloat16
    assert json.loads((ckpt / "consa_run.json").read_text())["conversion"]["dtype"] == "bfloat16"
    assert run_tool(EXPORT.main, ["--load", str(ckpt), "--save", str(back)]) == 0
    weights = read_weights(back)
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}
    assert_weights_equal(weights, read_weights(source))
    assert json.loads((back / "config.json").read_text())["dtype"] == "bfloat16"
