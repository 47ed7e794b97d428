"""The GPU example scripts (examples/*.sh, *.sbatch) and the small-model study
(examples/study_small.py) call our entry points with flags they accept.

CI has no GPU or Slurm, so the scripts run with `python`, `torchrun`, `srun` and
`scontrol` replaced by stubs that record their arguments; each recorded call of
`megatron_consa.train` or a `tools/*.py` is then parsed by that program's own
argument parser (stopped right after parsing). A renamed or mistyped flag in an
example fails here instead of on a user's cluster.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
STUB = f"""#!{sys.executable}
import json, os, sys
with open(os.environ["RECORD"], "a") as f:
    f.write(json.dumps([os.path.basename(sys.argv[0])] + sys.argv[1:]) + "\\n")
if os.path.basename(sys.argv[0]) == "scontrol":
    print("node001")
"""


class _Parsed(Exception):
    def __init__(self, namespace: argparse.Namespace) -> None:
        self.namespace = namespace


def _parse_with(main, argv: list[str], monkeypatch) -> argparse.Namespace:
    """Run `main(argv)` until its parser has parsed `argv`; a rejected flag fails the test."""
    original = argparse.ArgumentParser.parse_args

    def parse_and_stop(self, args=None, namespace=None):
        raise _Parsed(original(self, args, namespace))

    with monkeypatch.context() as m:
        m.setattr(argparse.ArgumentParser, "parse_args", parse_and_stop)
        try:
            main(argv)
        except _Parsed as parsed:
            return parsed.namespace
        except SystemExit as exc:
            pytest.fail(f"{argv}: the parser refused it (exit {exc.code})")
    pytest.fail(f"{argv}: nothing was parsed")


def _tool_main(script: str):
    spec = importlib.util.spec_from_file_location(f"_example_{Path(script).stem}", ROOT / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def _run_with_stubs(script: str, tmp_path: Path, env: dict) -> list[list[str]]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("python", "torchrun", "srun", "scontrol"):
        (bin_dir / name).write_text(STUB)
        (bin_dir / name).chmod(0o755)
    record = tmp_path / "calls.jsonl"
    proc = subprocess.run(["bash", str(ROOT / script)], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={**os.environ, **env, "PATH": f"{bin_dir}:{os.environ['PATH']}", "RECORD": str(record)})
    assert proc.returncode == 0, proc.stderr
    return [json.loads(line) for line in record.read_text().splitlines()]


def _check_calls(calls: list[list[str]], monkeypatch) -> list[tuple[str, argparse.Namespace]]:
    from megatron_consa.train import main as train_main

    parsed = []
    for call in calls:
        if call[0] == "scontrol":
            continue
        if "megatron_consa.train" in call:  # torchrun [srun] ... -m megatron_consa.train <flags>
            i = call.index("megatron_consa.train")
            assert call[i - 1] == "-m" and "torchrun" in call, call
            parsed.append(("train", _parse_with(train_main, call[i + 1:], monkeypatch)))
        else:
            assert call[0] == "python" and call[1].startswith("tools/"), call
            parsed.append((call[1], _parse_with(_tool_main(call[1]), call[2:], monkeypatch)))
    return parsed


def _qwen3_0_6b_config(directory: Path) -> Path:
    """Qwen3-0.6B's config.json (its real shape; no weights): what --hf-config reads."""
    from transformers import Qwen3Config

    Qwen3Config(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                rope_theta=1000000.0, tie_word_embeddings=True).save_pretrained(str(directory))
    return directory


def _check_learn_run(namespace: argparse.Namespace):
    """A learning run's flags pass every check that needs no file beyond --hf-config (the typed configs)."""
    from megatron_consa.training.arguments import run_config_from_args

    return run_config_from_args(namespace)


def test_single_node_example_calls_parse(tmp_path, monkeypatch):
    out = tmp_path / "out"
    hf = _qwen3_0_6b_config(tmp_path / "Qwen3-0.6B")
    calls = _check_calls(_run_with_stubs("examples/qwen3_0.6b_tp2pp2_8gpu.sh", tmp_path, {
        "HF": str(hf), "DATA": "/data/corpus_text_document", "OUT": str(out)}), monkeypatch)
    names = [name for name, _ in calls]
    assert names == ["tools/convert_hf_to_megatron.py", "train", "tools/finalize_allocation.py", "train",
                     "tools/convert_megatron_to_hf.py", "tools/generate.py"]
    learn, fixed = calls[1][1], calls[3][1]
    assert (learn.consa_phase, learn.load, learn.save, learn.pretrained_checkpoint) == (
        "learn", f"{out}/learn", f"{out}/learn", f"{out}/imported")
    assert (fixed.consa_phase, fixed.load, fixed.save, fixed.pretrained_checkpoint) == (
        "fixed", f"{out}/fixed", f"{out}/fixed", f"{out}/finalized")
    # the first launch starts from the import's weights; a relaunch resumes --load
    (out / "imported").mkdir(parents=True)
    (out / "imported" / "consa_run.json").write_text("{}")
    run = _check_learn_run(learn)
    assert (run.arch.num_layers, run.consa.target_sparsity) == (28, 0.75)
    assert (run.checkpoint.load, run.checkpoint.finetune) == (f"{out}/imported", True)
    (out / "learn").mkdir()
    (out / "learn" / "latest_checkpointed_iteration.txt").write_text("250\n")
    learn.load, learn.finetune = f"{out}/learn", False  # (the namespace the first check changed)
    run = _check_learn_run(learn)
    assert (run.checkpoint.load, run.checkpoint.finetune) == (f"{out}/learn", False)


def test_readme_training_workflow_commands_parse(tmp_path, monkeypatch):
    """The commands of the README's "Training: the workflow" block, as written: each tool's call is
    accepted by its parser, and the learning run's flags pass every check into the typed configs (a
    flag left out, e.g. --min-lr under a low --lr, fails here instead of on a user's first launch). Step 4
    abbreviates step 2's flags with "..." and is not parsed."""
    import re
    import shlex

    from megatron_consa.train import main as train_main

    readme = (ROOT / "README.md").read_text()
    block = re.search(r"## Training: the workflow\n+```bash\n(.*?)```", readme, re.S)
    assert block, "README: no bash block under 'Training: the workflow'"
    commands = [shlex.split(c, comments=True) for c in block.group(1).replace("\\\n", " ").splitlines()]
    commands = [c for c in commands if c and "..." not in c]  # (step 4 abbreviates step 2's flags)
    _qwen3_0_6b_config(tmp_path / "Qwen3-0.6B")
    (tmp_path / "ckpt" / "imported").mkdir(parents=True)  # (what step 0 writes)
    (tmp_path / "ckpt" / "imported" / "consa_run.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    seen = []
    for cmd in commands:
        if cmd[0] == "torchrun":
            i = cmd.index("megatron_consa.train")
            run = _check_learn_run(_parse_with(train_main, cmd[i + 1:], monkeypatch))
            seen.append(("train", run.phase))
            # (ckpt/learn holds no checkpoint yet: the import's weights)
            assert run.checkpoint.load == "ckpt/imported" and run.checkpoint.finetune
            assert run.training.min_lr <= run.training.lr
        else:
            assert cmd[0] == "python" and cmd[1].startswith("tools/"), cmd
            _parse_with(_tool_main(str(ROOT / cmd[1])), cmd[2:], monkeypatch)
            seen.append((cmd[1], None))
    assert seen == [("tools/convert_hf_to_megatron.py", None), ("tools/preprocess_data.py", None),
                    ("train", "learn"), ("tools/finalize_allocation.py", None)]
    # the learn phase loads what step 0 writes
    assert commands[0][commands[0].index("--save") + 1] == "ckpt/imported"


def test_slurm_example_calls_parse(tmp_path, monkeypatch):
    out = tmp_path / "out"
    (out / "imported").mkdir(parents=True)
    (out / "imported" / "consa_run.json").write_text("{}")
    calls = _check_calls(_run_with_stubs("examples/slurm_multinode.sbatch", tmp_path, {
        "HF": str(_qwen3_0_6b_config(tmp_path / "Qwen3-0.6B")), "DATA": "/data/corpus_text_document", "OUT": str(out),
        "SLURM_JOB_NODELIST": "node[001-004]", "SLURM_NNODES": "4", "SLURM_JOB_ID": "77"}), monkeypatch)
    assert [name for name, _ in calls] == ["train"]
    learn = calls[0][1]
    assert learn.exit_signal_handler and learn.bf16 and (learn.load, learn.pretrained_checkpoint) == (
        f"{out}/learn", f"{out}/imported")
    run = _check_learn_run(learn)
    assert run.parallel.pipeline_model_parallel_size == learn.pipeline_model_parallel_size
    assert (run.checkpoint.load, run.checkpoint.finetune) == (f"{out}/imported", True)
    sbatch = (ROOT / "examples" / "slurm_multinode.sbatch").read_text()
    assert "#SBATCH --signal=TERM@" in sbatch  # the warning --exit-signal-handler acts on
    # the first line: a stop well before the limit, which needs no signal to reach the ranks in time
    hours, minutes, _ = (int(x) for x in sbatch.split("#SBATCH --time=")[1].split()[0].split(":"))
    assert run.exit.duration_in_mins is not None and (hours * 60 + minutes) - run.exit.duration_in_mins >= 20
    assert "SRUN_CPUS_PER_TASK" in sbatch


def test_study_small_calls_parse(tmp_path, monkeypatch):
    """examples/study_small.py (about 45 launches, half an hour on 2 cores: not run here) with its
    launcher recording instead of running: every entry-point call parses into our configs, every
    tool call is accepted by the tool's parser, and the report of an empty study is written."""
    sys.path.insert(0, str(ROOT / "examples"))
    import cpu_workflow

    from megatron_consa.training.arguments import parse_run_config

    calls: list[list[str]] = []

    def record(self, title, cmd, keep_last=20):
        calls.append(cmd)
        if "tools/finalize_allocation.py" in cmd:  # what the later steps look for
            save = Path(cmd[cmd.index("--save") + 1])
            save.mkdir(parents=True)
            (save / "allocation.json").write_text("{}")
        return 0.0

    monkeypatch.setattr(cpu_workflow.Workflow, "run", record)
    spec = importlib.util.spec_from_file_location("_example_study_small", ROOT / "examples" / "study_small.py")
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)
    monkeypatch.chdir(tmp_path)  # a relative --out: the launches run in the repository
    assert study.main(["--out", "study", "--seeds", "1"]) == 0
    trains, tools = [], []
    for cmd in calls:
        for flag in ("--save", "--output", "--output-prefix"):  # (the starts are the repository's)
            if flag in cmd:
                assert Path(cmd[cmd.index(flag) + 1]).is_relative_to(tmp_path / "study"), (flag, cmd)
        if "megatron_consa.train" in cmd:
            trains.append(parse_run_config(cmd[cmd.index("megatron_consa.train") + 1:]))
        else:
            assert cmd[1].startswith("tools/"), cmd
            tools.append(cmd[1])
            _parse_with(_tool_main(cmd[1]), cmd[2:], monkeypatch)
    variants = study.variants(tmp_path, tmp_path)
    assert len(trains) == 1 + len(variants)  # the learn phase, then every variant's continued training
    assert [t.phase for t in trains] == ["learn"] + ["fixed"] * len(variants)
    assert tools.count("tools/evaluate.py") == 2 * len(variants) and "tools/analyze_allocation.py" in tools
    assert (tmp_path / "study" / "study_small.md").is_file()


def test_study_small_replaces_other_held_out_text_and_its_evaluations(tmp_path):
    """A resumed study in an output directory written by an earlier version (other held-out text) evaluates this
    version's text: the file is replaced and the reports on the old text go; reports on the same text stay."""
    spec = importlib.util.spec_from_file_location("_example_study_small", ROOT / "examples" / "study_small.py")
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)
    files = study.write_held_out(tmp_path, seed=0)
    (tmp_path / "eval").mkdir()
    reports = {kind: tmp_path / "eval" / f"learned.{kind}.json" for kind in files}
    from_text = [tmp_path / "ablation_scores.json", tmp_path / "analysis.json"]  # (ranked on the held-out text)
    for report in [*reports.values(), *from_text]:
        report.write_text("{}")
    assert study.write_held_out(tmp_path, seed=0) == files and all(r.is_file() for r in [*reports.values(), *from_text])
    current = files["text"].read_text()
    files["text"].write_text('{"text": "the rest of a file the gates learned on"}\n')
    study.write_held_out(tmp_path, seed=0)
    assert files["text"].read_text() == current
    assert not reports["text"].exists() and reports["recall"].is_file()
    assert not any(f.exists() for f in from_text)


@pytest.mark.parametrize("script", ["cpu_workflow", "study_small", "study_real"])
def test_example_paths_are_taken_from_the_callers_directory(script, tmp_path, monkeypatch):
    """The examples launch the tools with the repository as their working directory: a relative
    --out (or the default) is the caller's, made absolute before it is handed on."""
    sys.path.insert(0, str(ROOT / "examples"))
    spec = importlib.util.spec_from_file_location(f"_example_paths_{script}", ROOT / "examples" / f"{script}.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # (its dataclasses look themselves up there)
    spec.loader.exec_module(module)
    monkeypatch.chdir(tmp_path)
    assert module.parse_args(["--out", "rel"]).out == tmp_path / "rel"
    default = module.parse_args([]).out
    assert default.is_absolute() and default.is_relative_to(tmp_path)


def test_study_real_restores_an_earlier_runs_learned_maps(tmp_path, monkeypatch):
    """--restore-learned: each run's learned FA map and allocation-phase cost from an earlier report at the
    same settings, where they are absent (then evaluate / report re-evaluate them); other settings refused."""
    import dataclasses

    sys.path.insert(0, str(ROOT / "examples"))
    spec = importlib.util.spec_from_file_location("_example_restore_study_real", ROOT / "examples" / "study_real.py")
    study = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, study)
    spec.loader.exec_module(study)
    from megatron_consa.allocation import Allocation

    fa = [[1, 0, 0]] * 15 + [[0, 1, 1]] * 15  # 30 layers x 3 KV heads, 45 FA
    cost = {"iterations": 160, "tokens": 10240, "wall_s": 1.0, "processes": 1, "cores": 2}
    report = {"settings": json.loads(json.dumps(dataclasses.asdict(study.QUICK))), "references": [], "runs": {
        "kv_head_0500": {"target": 0.5, "granularity": "kv_head", "allocation_phase": cost,
                         "allocations": [{"allocation": "top_swa", "fa": [[0] * 3] * 30},
                                         {"allocation": "learned", "fa": fa}]}}}
    (tmp_path / "report.json").write_text(json.dumps(report))
    out = tmp_path / "out"
    study.restore_learned(out, study.QUICK, tmp_path / "report.json")
    restored = Allocation.load(out / "finalized_kv_head_0500" / "allocation.json")
    assert restored.fa == fa and restored.window == study.QUICK.window and restored.granularity == "kv_head"
    assert restored.achieved_sparsity == 0.5 and json.loads((out / "cost_kv_head_0500.json").read_text()) == cost
    with pytest.raises(SystemExit, match="settings"):
        study.restore_learned(tmp_path / "other", study.Settings(), tmp_path / "report.json")
    with pytest.raises(SystemExit):  # it replaces learning
        study.parse_args(["--restore-learned", str(tmp_path / "report.json")])
