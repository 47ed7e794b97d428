"""KV-cache accounting (megatron_consa.evaluation.kv_memory) and tools/kv_budget.py against the formula."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from megatron_consa.allocation import make_preset
from megatron_consa.evaluation.kv_memory import (
    KvCacheShape,
    all_fa_bytes,
    allocation_bytes,
    parse_bytes,
    sparsity_for_budget,
)

ROOT = Path(__file__).resolve().parents[2]
L, G, D = 28, 8, 128  # Qwen3-0.6B's KV shape


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _formula(n_fa_heads, n_swa_heads, n, window, sinks, batch, head_dim, nbytes):
    return 2 * batch * head_dim * nbytes * (n_fa_heads * n + n_swa_heads * min(n, window + sinks))


def test_bytes_equal_the_formula():
    shape = KvCacheShape(num_layers=L, num_kv_heads=G, head_dim=D, context_length=32768, batch_size=4, bytes_per_element=2)
    assert all_fa_bytes(shape) == _formula(L * G, 0, 32768, 0, 0, 4, D, 2) == 14 * 2**30  # 14 GiB for batch 4 at 32k
    alloc = make_preset("uniform_heads", num_layers=L, num_kv_heads=G, granularity="kv_head",
                        target_sparsity=0.75, window=4096, sink_tokens=4)
    assert allocation_bytes(shape, alloc) == _formula(56, 168, 32768, 4096, 4, 4, D, 2)
    short = KvCacheShape(num_layers=L, num_kv_heads=G, head_dim=D, context_length=1000)
    assert allocation_bytes(short, alloc) == all_fa_bytes(short)  # window longer than the context


@pytest.mark.parametrize("granularity", ["kv_head", "layer"])
def test_budget_gives_the_largest_fa_share_that_fits(granularity):
    shape = KvCacheShape(num_layers=L, num_kv_heads=G, head_dim=D, context_length=16384, batch_size=2)
    budget = int(0.4 * all_fa_bytes(shape))
    fit = sparsity_for_budget(shape, budget, window=1024, granularity=granularity)
    alloc = make_preset("bottom_swa", num_layers=L, num_kv_heads=G, granularity=granularity,
                        target_sparsity=fit.target_sparsity, window=1024)
    used = allocation_bytes(shape, alloc)
    assert used == fit.kv_bytes <= budget
    unit_heads = 1 if granularity == "kv_head" else G
    assert alloc.num_fa_kv_heads == fit.fa_units * unit_heads
    one_more = _formula(alloc.num_fa_kv_heads + unit_heads, L * G - alloc.num_fa_kv_heads - unit_heads,
                        16384, 1024, 0, 2, D, 2)
    assert one_more > budget  # the next unit would not fit


def test_budget_below_all_swa_is_refused():
    shape = KvCacheShape(num_layers=L, num_kv_heads=G, head_dim=D, context_length=16384)
    with pytest.raises(ValueError, match="below the all-SWA KV cache"):
        sparsity_for_budget(shape, 1000, window=1024)


def test_parse_bytes():
    assert parse_bytes("24GiB") == 24 * 2**30 and parse_bytes("1.5 GB") == 1_500_000_000 and parse_bytes("77") == 77
    with pytest.raises(ValueError, match="byte count"):
        parse_bytes("lots")
    for text in ("1e400", "-5GB", "1e400KiB"):  # (a ValueError the tool reports on its flag, no traceback)
        with pytest.raises(ValueError, match="not a finite, non-negative byte count"):
            parse_bytes(text)


def test_cli_reports_formula_values(tmp_path, capsys):
    config = {"model_type": "qwen3", "vocab_size": 1000, "hidden_size": 1024, "intermediate_size": 3072,
              "num_hidden_layers": L, "num_attention_heads": 16, "num_key_value_heads": G, "head_dim": D}
    (tmp_path / "config.json").write_text(json.dumps(config))
    alloc = make_preset("top_swa", num_layers=L, num_kv_heads=G, granularity="layer", target_sparsity=0.5, window=512)
    alloc.save(tmp_path / "allocation.json")
    tool = _tool("kv_budget")
    rc = tool.main(["--hf-config", str(tmp_path), "--context-length", "8192", "--batch-size", "3", "--dtype", "fp32",
                    "--allocation", str(tmp_path / "allocation.json"), "--budget", "1GiB", "--json"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert report["all_fa_bytes"] == _formula(L * G, 0, 8192, 0, 0, 3, D, 4)
    assert report["allocation_bytes"] == _formula(14 * G, 14 * G, 8192, 512, 0, 3, D, 4)
    fit_units = report["fitting_fa_units"]  # in the allocation file's units: layers
    assert report["granularity"] == "layer"
    assert report["fitting_bytes"] == _formula(fit_units * G, (L - fit_units) * G, 8192, 512, 0, 3, D, 4) <= 2**30
    assert report["fitting_target_sparsity"] == pytest.approx(1 - fit_units / L)
    rc = tool.main(["--hf-config", str(tmp_path), "--context-length", "8192", "--batch-size", "3", "--dtype", "fp32",
                    "--allocation", str(tmp_path / "allocation.json"), "--budget", "1GiB", "--json",
                    "--granularity", "kv_head"])
    heads = json.loads(capsys.readouterr().out)["fitting_fa_units"]  # asked for KV heads: a finer answer
    assert heads >= fit_units * G
    assert _formula(heads, L * G - heads, 8192, 512, 0, 3, D, 4) <= 2**30 < _formula(heads + 1, L * G - heads - 1, 8192, 512, 0, 3, D, 4)


def test_cli_preset_reports_its_bytes(tmp_path, capsys):
    """The README's command: a preset at a target, without --granularity (KV heads)."""
    config = {"model_type": "qwen3", "vocab_size": 1000, "hidden_size": 1024, "intermediate_size": 3072,
              "num_hidden_layers": L, "num_attention_heads": 16, "num_key_value_heads": G, "head_dim": D}
    (tmp_path / "config.json").write_text(json.dumps(config))
    rc = _tool("kv_budget").main(["--hf-config", str(tmp_path), "--context-length", "8192", "--batch-size", "2",
                                  "--dtype", "bf16", "--window", "512", "--preset", "uniform_heads",
                                  "--target-sparsity", "0.75", "--json"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    fa = L * G // 4
    assert report["sparsity"] == 0.75
    assert report["allocation_bytes"] == _formula(fa, L * G - fa, 8192, 512, 0, 2, D, 2)


def test_cli_errors_name_the_fix(tmp_path, capsys):
    tool = _tool("kv_budget")
    from megatron_consa.cli import run_tool

    assert run_tool(tool.main, ["--hf-config", str(tmp_path / "nope"), "--context-length", "10"]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": 10}))
    assert run_tool(tool.main, ["--hf-config", str(tmp_path), "--context-length", "10"]) == 2
    assert "model_type='gpt2' is not supported" in capsys.readouterr().err
    (tmp_path / "config.json").write_text(json.dumps(_qwen3_config()))
    for flag, value, least in (("--window", "0", 1), ("--window", "-50", 1), ("--sink-tokens", "-1", 0),
                               ("--batch-size", "0", 1), ("--context-length", "0", 1)):
        argv = ["--hf-config", str(tmp_path), "--context-length", "10", "--budget", "1KiB", "--window", "8", flag, value]
        with pytest.raises(SystemExit) as exit:
            tool.main(argv)
        assert exit.value.code == 2
        assert f"error: {flag} {value}: must be >= {least}" in capsys.readouterr().err
    base = ["--hf-config", str(tmp_path), "--context-length", "4096", "--window", "8"]
    assert run_tool(tool.main, base + ["--budget", "abc"]) == 2
    assert capsys.readouterr().err.startswith("error: --budget abc: cannot read 'abc' as a byte count")
    assert run_tool(tool.main, base + ["--budget", "1KiB"]) == 2  # below the all-SWA cache
    err = capsys.readouterr().err
    assert err.startswith("error: --budget 1KiB: ") and "below the all-SWA KV cache" in err, err


def _qwen3_config(**fields) -> dict:
    return {"model_type": "qwen3", "vocab_size": 1000, "hidden_size": 1024, "intermediate_size": 3072,
            "num_hidden_layers": L, "num_attention_heads": 16, "num_key_value_heads": G, "head_dim": D, **fields}


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    return err


def test_cli_invalid_config_is_one_error_line_naming_the_file(tmp_path, capsys):
    """A config.json transformers' validation refuses (huggingface_hub's strict dataclasses, not a
    ValueError) is a user error naming the file and the problem, not a traceback."""
    from megatron_consa.cli import run_tool

    tool = _tool("kv_budget")
    (tmp_path / "config.json").write_text(json.dumps(_qwen3_config(layer_types=["full_attention"] * (L + 1))))
    assert run_tool(tool.main, ["--hf-config", str(tmp_path), "--context-length", "10"]) == 2
    err = _one_error_line(capsys)
    assert f"--hf-config {tmp_path}" in err and str(tmp_path / "config.json") in err
    assert f"`num_hidden_layers` ({L}) must be equal to the number of `layer_types` ({L + 1})" in err
    (tmp_path / "config.json").write_text(json.dumps(_qwen3_config(hidden_size="wide")))
    assert run_tool(tool.main, ["--hf-config", str(tmp_path / "config.json"), "--context-length", "10"]) == 2
    assert "'hidden_size' expected int" in _one_error_line(capsys)
    (tmp_path / "config.json").write_text('{"model_type": "qwen3", ')
    assert run_tool(tool.main, ["--hf-config", str(tmp_path), "--context-length", "10"]) == 2
    assert "config.json: not valid JSON" in _one_error_line(capsys)


def test_cli_takes_a_training_save_directory_as_hf_config(tmp_path, capsys):
    """As training's --hf-config does: a --save directory means its latest checkpoint's config.json,
    finalize's output its checkpoint's."""
    from megatron_consa.cli import run_tool
    from megatron_consa.training.checkpoint import CONSA_META_FILE, FINALIZED_CHECKPOINT_DIR, TRACKER_FILE

    save = tmp_path / "run"
    for iteration, layers in ((5, 2), (10, 3)):  # the latest (10) is the one read
        ckpt = save / f"iter_{iteration:07d}"
        ckpt.mkdir(parents=True)
        (ckpt / CONSA_META_FILE).write_text("{}")
        (ckpt / "config.json").write_text(json.dumps(_qwen3_config(num_hidden_layers=layers)))
    (save / TRACKER_FILE).write_text("10")
    tool = _tool("kv_budget")
    assert run_tool(tool.main, ["--hf-config", str(save), "--context-length", "10", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["num_layers"] == 3
    finalized = tmp_path / "finalized"
    finalized.mkdir()
    (save / "iter_0000005").rename(finalized / FINALIZED_CHECKPOINT_DIR)
    assert run_tool(tool.main, ["--hf-config", str(finalized), "--context-length", "10", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["num_layers"] == 2
    (save / TRACKER_FILE).write_text("20")  # names a checkpoint that is not there
    assert run_tool(tool.main, ["--hf-config", str(save), "--context-length", "10"]) == 2
    err = _one_error_line(capsys)
    assert f"--hf-config {save}" in err and "iter_0000020, which is not a complete checkpoint" in err
    assert "--load" not in err


def test_cli_errors_name_the_flag_not_the_field(tmp_path, capsys):
    from megatron_consa.cli import run_tool

    tool = _tool("kv_budget")
    (tmp_path / "config.json").write_text(json.dumps(_qwen3_config()))
    base = ["--hf-config", str(tmp_path), "--context-length", "10"]
    assert run_tool(tool.main, base + ["--preset", "uniform_heads", "--window", "8"]) == 2
    err = _one_error_line(capsys)
    assert "--target-sparsity is required" in err and "target_sparsity" not in err
    assert run_tool(tool.main, base + ["--preset", "uniform_heads", "--window", "8", "--target-sparsity", "1.5"]) == 2
    assert "--target-sparsity is 1.5" in _one_error_line(capsys)
    # a preset with a sparsity of its own refuses a target instead of silently ignoring it
    assert run_tool(tool.main, base + ["--preset", "all_fa", "--window", "8", "--target-sparsity", "0.5"]) == 2
    assert "--target-sparsity 0.5 with --preset all_fa: that preset's sparsity is 0" in _one_error_line(capsys)
    assert run_tool(tool.main, base + ["--preset", "all_fa", "--window", "8"]) == 0
    capsys.readouterr()
    # flags that would be ignored are refused, and an empty context (0 bytes: no ratio to all-FA) too
    for extra, said in ((["--target-sparsity", "0.5"], "--target-sparsity is a --preset's target"),
                        (["--preset", "uniform_heads", "--window", "8", "--target-sparsity", "0.5",
                          "--calibration-scores", str(tmp_path / "s.json")],
                         "--calibration-scores are the heuristic's"),
                        (["--context-length", "0", "--preset", "uniform_heads", "--window", "8", "--target-sparsity",
                          "0.5"], "--context-length")):
        with pytest.raises(SystemExit) as exit_:
            run_tool(tool.main, base + extra)
        assert exit_.value.code == 2 and said in capsys.readouterr().err, extra
    assert run_tool(tool.main, base + ["--budget", "1e400", "--window", "8"]) == 2
    assert "--budget 1e400" in _one_error_line(capsys)
    other = tmp_path / "other.json"
    make_preset("all_fa", num_layers=L - 1, num_kv_heads=G, granularity="layer", target_sparsity=None,
                window=8).save(other)
    assert run_tool(tool.main, base + ["--allocation", str(other)]) == 2
    err = _one_error_line(capsys)
    assert err.startswith(f"error: --allocation {other}: ") and f"'num_layers' is {L - 1}" in err
    assert run_tool(tool.main, base + ["--allocation", str(tmp_path)]) == 2  # a directory, not the file
    assert f"--allocation {tmp_path}: a directory" in _one_error_line(capsys)
