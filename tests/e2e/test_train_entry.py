"""The training entry point as users launch it: torchrun, real data files, phases, resume, bad input."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_consa.allocation import Allocation
from megatron_consa.backends.select import transformer_engine_available

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))

from checkpoint_contents import checkpoint_contents, differing_keys  # noqa: E402
from tokenizer_fixtures import hf_tokenizer_dir  # noqa: E402
PY = sys.executable
ENV = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}

MODEL = ["--num-layers", "4", "--hidden-size", "64", "--ffn-hidden-size", "128", "--num-attention-heads", "4",
         "--num-query-groups", "2", "--kv-channels", "16", "--qk-layernorm", "--rotary-base", "10000",
         "--seq-length", "64", "--micro-batch-size", "2", "--global-batch-size", "4", "--weight-decay", "0"]


def _torchrun_cmd(args: list[str], nproc: int = 2) -> list[str]:
    # --standalone: the rendezvous store binds a port of the OS's choosing, none to race for
    return [PY, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
            "-m", "megatron_consa.train", *args]


def _train(args: list[str], **kw):
    return subprocess.run([PY, "-m", "megatron_consa.train", *args], cwd=ROOT, env=kw.get("env", ENV),
                          capture_output=True, text=True, timeout=kw.get("timeout", 600))


def _ok(proc) -> str:
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-4000:])
    return proc.stdout + proc.stderr


def _losses(log: str) -> list[float]:
    return [float(line.split("| loss ")[1].split()[0]) for line in log.splitlines()
            if "| loss " in line and "iter " in line and "validation |" not in line and "test |" not in line]  # training


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The demo corpus (stdlib text + recall task), preprocessed with a sentencepiece model trained on it."""
    from megatron_consa.data.demo_corpus import write_demo_corpus

    d = tmp_path_factory.mktemp("corpus")
    write_demo_corpus(d / "corpus.jsonl", text_documents=60, recall=120, key_words=8, repeats=4)
    # a dotted prefix (sentencepiece appends .model: the tool must not replace a suffix)
    proc = subprocess.run([PY, "tools/preprocess_data.py", "--input", str(d / "corpus.jsonl"), "--output-prefix",
                           str(d / "c.en"), "--train-sentencepiece", "512", "--workers", "2"],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    _ok(proc)
    assert (d / "c.en_text_document.bin").stat().st_size > 0 and (d / "c.en.model").exists()
    return {"data": str(d / "c.en_text_document"), "tok": str(d / "c.en.model"), "dir": d}


def test_hugging_face_tokenizer_directory_preprocesses_and_trains(corpus, tmp_path):
    """--tokenizer-type HuggingFaceTokenizer: the .bin holds the tokenizer's own ids + EOD, and a run trains on it,
    with Megatron-LM's data and profiling flags: megatron-core's GPTDataset read in 2 forked data-loader workers,
    the loss per token without EOD inputs, and iterations 1-2 profiled by torch.profiler; under
    --deterministic-mode (torch's deterministic algorithms)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from transformers import AutoTokenizer

    docs = [json.loads(line)["text"] for line in (corpus["dir"] / "corpus.jsonl").read_text().splitlines()]
    tok_dir = hf_tokenizer_dir(docs, tmp_path / "hf_tokenizer")
    _ok(subprocess.run([PY, "tools/preprocess_data.py", "--input", str(corpus["dir"] / "corpus.jsonl"),
                        "--output-prefix", str(tmp_path / "hf"), "--tokenizer-type", "HuggingFaceTokenizer",
                        "--tokenizer-model", str(tok_dir), "--workers", "2"],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300))
    reference = AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
    written = IndexedDataset(str(tmp_path / "hf_text_document"))
    assert len(written) == len(docs)
    for i in (0, len(docs) // 2, len(docs) - 1):  # document order kept, EOD appended
        expected = reference.encode(docs[i], add_special_tokens=False) + [reference.eos_token_id]
        assert written[i].tolist() == expected
    log = _ok(_train(MODEL + [
        "--data-path", str(tmp_path / "hf_text_document"), "--split", "80,10,10", "--tokenizer-type",
        "HuggingFaceTokenizer", "--tokenizer-model", str(tok_dir), "--consa-phase", "fixed", "--consa-allocation",
        "all_fa", "--train-iters", "12", "--lr", "3e-3", "--log-interval", "4", "--save", str(tmp_path / "run"),
        "--no-save-optim", "--num-workers", "2", "--eod-mask-loss", "--calculate-per-token-loss", "--profile",
        "--use-pytorch-profiler", "--profile-step-start", "1", "--profile-step-end", "3", "--tensorboard-dir",
        str(tmp_path / "tb"), "--tensorboard-log-interval", "4", "--eval-interval", "5", "--eval-iters", "1",
        "--log-validation-ppl-to-tensorboard", "--deterministic-mode"]))
    losses = _losses(log)
    assert len(losses) == 4 and losses[-1] < losses[0]  # iterations 1 (the first), 4, 8 and 12
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb")).Reload()
    assert [e.step for e in events.Scalars("consa/loss")] == [4, 8, 12]  # every --tensorboard-log-interval
    valid = {e.step: e.value for e in events.Scalars("consa/valid_loss")}
    ppl = {e.step: e.value for e in events.Scalars("consa/valid_ppl")}
    # every --eval-interval and, as Megatron-LM, once more after the last iteration; then the test split once
    assert list(valid) == list(ppl) == [5, 10, 12] and all(abs(ppl[k] - math.exp(valid[k])) < 1e-3 * ppl[k] for k in ppl)
    test = {e.step: e.value for e in events.Scalars("consa/test_loss")}
    assert list(test) == [12] and f"test | iter 12 | loss {test[12]:.4f}" in log
    assert [e.step for e in events.Scalars("consa/test_ppl")] == [12]
    traces = list((tmp_path / "tb").glob("*.pt.trace.json"))
    assert len(traces) == 1, traces
    steps = set(re.findall(r'"ProfilerStep#(\d+)"', traces[0].read_text()))
    assert steps == {"1", "2"}, steps  # (torch's step numbers: the log's iterations 2 and 3; 1 is the warm-up)
    saved = tmp_path / "run" / "iter_0000012"
    assert AutoTokenizer.from_pretrained(str(saved), local_files_only=True).encode("x = 1") == \
        reference.encode("x = 1")  # the checkpoint carries its tokenizer
    # --no-save-optim: weights only, marked not resumable, described by its own config.json
    meta = json.loads((saved / "consa_run.json").read_text())
    assert meta["resumable"] is False and not list(saved.glob("rng_rank*"))
    assert meta["training"]["deterministic_mode"]  # (every operation of the run has a deterministic kernel)
    # what evaluation's --data-path defaults its --split and seed to
    assert meta["data"] == {"data_path": [str(tmp_path / "hf_text_document")], "split": "80,10,10", "seed": 1234,
                            "mock": False, "eod_mask_loss": True}
    assert b"optimizer" not in (saved / ".metadata").read_bytes()  # dist_checkpointing's index of the shards
    config = json.loads((saved / "config.json").read_text())
    assert config["num_hidden_layers"] == 4
    # the run's tokenizer's special ids (a plain HF generate stops at its EOS), not Llama's defaults
    assert config["eos_token_id"] == reference.eos_token_id and config.get("bos_token_id") == reference.bos_token_id


def _final_state(save: Path) -> dict:
    from megatron_consa.compat import ensure_importable

    ensure_importable()
    from megatron_consa.training.checkpoint import read_common_state, resolve_load_dir

    common = read_common_state(resolve_load_dir(save))
    return {"records": common["train_records"], "controller": common["consa_controller"],
            "log_alpha": common["consa_log_alpha"]}


RESUME_RUN = MODEL + ["--mock-data", "--vocab-size", "128", "--split", "90,10,0", "--consa-phase", "learn",
                      "--consa-target-sparsity", "0.5", "--consa-window", "8", "--consa-target-warmup-iters", "6",
                      "--consa-init-log-alpha", "0.5", "--train-iters", "16", "--lr", "3e-3", "--log-interval", "1",
                      "--save-interval", "4", "--eval-interval", "4", "--eval-iters", "2"]


def _validation(log: str) -> dict[int, str]:
    return {int(k): loss for k, loss in re.findall(r"validation \| iter (\d+) \| loss ([0-9.]+)", log)}


@pytest.fixture(scope="module")
def whole_run(tmp_path_factory) -> tuple[Path, str]:
    """RESUME_RUN uninterrupted, saving every 4 iterations (synchronously): its --save directory and log."""
    save = tmp_path_factory.mktemp("whole") / "whole"
    return save, _ok(_train(RESUME_RUN + ["--save", str(save)]))


def test_sigkill_and_resume_is_bit_exact(tmp_path, whole_run, capsys):
    whole_save, whole_log = whole_run
    assert "test | iter" not in whole_log  # --split 90,10,0: no test split to evaluate after training
    assert list(_validation(whole_log)) == [4, 8, 12, 16]  # (16 is a multiple: no second evaluation at the end)
    killed = tmp_path / "killed"
    proc = subprocess.Popen([PY, "-m", "megatron_consa.train", *RESUME_RUN, "--save", str(killed)], cwd=ROOT, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    tracker = killed / "latest_checkpointed_iteration.txt"
    deadline = time.time() + 300
    while time.time() < deadline and not (tracker.exists() and tracker.read_text().strip() == "8"):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the run and the checkpoint writer's helper processes
    proc.wait()
    last = int(tracker.read_text())
    assert 8 <= last < 16, f"the run was not killed mid-way (latest checkpoint {last})"
    resumed_log = _ok(_train(RESUME_RUN + ["--save", str(killed), "--load", str(killed), "--log-progress"]))
    _check_progress_log(killed, resumed_from=last)
    validated = _validation(resumed_log)  # the evaluations after the resume read the batches the whole run read
    assert sorted(validated) == list(range(last + 4, 17, 4)) and validated == {k: _validation(whole_log)[k] for k in validated}
    whole, resumed = _final_state(whole_save), _final_state(killed)
    assert len(resumed["records"]) == 16
    assert resumed["records"] == whole["records"]  # loss, s_hat, lambdas, lr of every iteration, bit for bit
    assert resumed["controller"] == whole["controller"] and resumed["log_alpha"] == whole["log_alpha"]
    # --ckpt-step: back to an earlier checkpoint of the directory, which then follows the same run
    again = tmp_path / "again"
    log = _ok(_train(RESUME_RUN + ["--load", str(killed), "--ckpt-step", "8", "--save", str(again)]))
    assert f"resumed from {killed / 'iter_0000008'} (iteration 8)" in log
    assert _final_state(again)["records"] == whole["records"]
    # ... and into the same directory, whose later checkpoints are the earlier run's until overwritten; the
    # retention never deletes one after the iteration saved (16, the latest before, at the save of 12)
    log = _ok(_train(RESUME_RUN + ["--load", str(killed), "--ckpt-step", "8", "--save", str(killed),
                                   "--save-retain-interval", "12", "--exit-interval", "12"]))
    assert "--ckpt-step 8 with --save the --load directory: its checkpoints at 12, 16 are the earlier run's" in log
    assert (killed / "latest_checkpointed_iteration.txt").read_text().strip() == "12"
    assert sorted(p.name for p in killed.glob("iter_*")) == [f"iter_{k:07d}" for k in (4, 8, 12, 16)]
    assert _final_state(killed)["records"] == whole["records"][:12]
    err = _bad(RESUME_RUN + ["--load", str(killed), "--ckpt-step", "6"], capsys)
    assert "--ckpt-step 6: --load" in err and "has no complete checkpoint of iteration 6 (it holds 4, 8, 12, 16)" in err
    assert "add --load DIR" in _bad(RESUME_RUN + ["--ckpt-step", "8"], capsys)
    # --exit-signal-handler: a SIGTERM (Slurm's warning before the time limit) saves after the step and exits 0
    termed = tmp_path / "termed"
    proc = subprocess.Popen([PY, "-m", "megatron_consa.train", *RESUME_RUN, "--save", str(termed),
                             "--exit-signal-handler"], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    tracker = termed / "latest_checkpointed_iteration.txt"
    deadline = time.time() + 300
    while time.time() < deadline and not tracker.exists():
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    log = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, log[-3000:]
    last = int(tracker.read_text())
    assert 4 <= last < 16 and f"stopping after iteration {last} of 16 (--exit-signal-handler: SIGTERM received)" in log
    _ok(_train(RESUME_RUN + ["--save", str(termed), "--load", str(termed)]))
    assert _final_state(termed)["records"] == whole["records"]


def _progress_events(save: Path) -> list[list[str]]:
    """progress.txt's lines as [event, field, ...], each after Megatron-LM's date, job id and rank count."""
    lines = [line.split("\t") for line in (save / "progress.txt").read_text().splitlines()]
    for line in lines:
        assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", line[0]) and line[1].startswith("Job ID: ")
        assert line[2] == "# GPUs: 1", line  # (these runs are one process)
    return [line[3:] for line in lines]


def _check_progress_log(save: Path, *, resumed_from: int) -> None:
    """--log-progress on the resumed run: its start, then a line per save whose floating-point operations
    count every iteration since the run began (the killed run's ones from the checkpoint), at the TFLOP/s
    count's operations per iteration (`iteration_flops`, tested against a count of its own)."""
    from megatron_consa.architecture import ArchitectureConfig
    from megatron_consa.training.flops import iteration_flops

    meta = json.loads((save / "iter_0000016" / "consa_run.json").read_text())
    per_iteration = iteration_flops(ArchitectureConfig(**meta["architecture"]),
                                    seq_length=meta["training"]["seq_length"],
                                    global_batch_size=meta["training"]["global_batch_size"])
    events = _progress_events(save)
    # the start line records the operations the resumed checkpoint had counted
    assert events[0][0] == "Starting job" and float(events[0][1].split(": ")[1]) == pytest.approx(
        resumed_from * per_iteration, rel=1e-12), events
    assert len(events) == 1 + len(range(resumed_from + 4, 17, 4)), events
    for event, k in zip(events[1:], range(resumed_from + 4, 17, 4)):
        assert event[:2] == ["Saved checkpoint", f"Iteration: {k}"], event
        job, cumulative = (float(re.fullmatch(rf"{name} throughput: ([0-9.]+) TFLOP/s/GPU", field).group(1))
                           for name, field in (("Job", event[2]), ("Cumulative", event[3])))
        assert job >= 0 and cumulative >= 0
        assert event[4] == f"Floating-point operations: {k * per_iteration:.2e}"
        tokens = k * meta["training"]["global_batch_size"] * meta["training"]["seq_length"]
        assert event[5] == f"Tokens (in billions): {tokens / 1e9:.2f}"


def test_pretrained_checkpoint_starts_a_phase_and_the_same_command_resumes_it(tmp_path, whole_run, capsys):
    """--load D --save D --pretrained-checkpoint P (Megatron-LM's): the first launch starts from P's weights (as
    --load P --finetune), stopped by --exit-interval at 4; the same command launched again resumes D at 4, and
    the two launches together equal one uninterrupted run from P's weights bit for bit. Relaunching a
    --finetune command over a --save that holds checkpoints is refused, pointing at this."""
    whole_save, _ = whole_run
    run = _with(RESUME_RUN, "--train-iters", "8")
    reference = tmp_path / "reference"
    _ok(_train(run + ["--load", str(whole_save), "--finetune", "--save", str(reference)]))
    phase = tmp_path / "phase"
    command = run + ["--load", str(phase), "--save", str(phase), "--pretrained-checkpoint", str(whole_save),
                     "--exit-interval", "4"]
    log = _ok(_train(command))
    assert f"--load {phase} holds no checkpoint yet: starting from the weights of --pretrained-checkpoint" in log
    assert "stopping after iteration 4 of 8" in log
    log = _ok(_train(command))
    assert f"resumed from {phase / 'iter_0000004'} (iteration 4)" in log
    assert _final_state(phase)["records"] == _final_state(reference)["records"]
    err = _bad(run + ["--load", str(whole_save), "--finetune", "--save", str(phase)], capsys)
    assert f"--save {phase} holds the checkpoints of an earlier run (iterations 4, 8)" in err
    assert f"--load {phase} --save {phase} --pretrained-checkpoint {whole_save}" in err
    # a resume whose --save is another run's directory (a typo, say) would replace its checkpoints and marker
    err = _bad(run + ["--load", str(whole_save), "--save", str(phase)], capsys)
    assert f"--save {phase} holds the checkpoints of another run (iterations 4, 8); this run resumes " in err, err
    assert f"--save {whole_save} to continue where it was saved" in err, err
    assert "drop --finetune (it starts over" in _bad(run + ["--load", str(phase), "--finetune", "--save", str(phase)],
                                                     capsys)
    assert "drop --finetune" in _bad(command + ["--finetune"], capsys)
    from megatron_consa.training.arguments import parse_run_config

    # --no-load-rng / --no-load-optim (for the resumes of a --no-save-rng / --no-save-optim run) do not stop the
    # first launch, whose start reads weights only
    fresh = _with(_with(command, "--load", str(tmp_path / "fresh")), "--save", str(tmp_path / "fresh"))
    started = parse_run_config(fresh + ["--no-load-rng", "--no-load-optim"]).checkpoint
    assert (started.load, started.finetune, started.started_from_pretrained) == (str(whole_save), True, True)
    assert "no checkpoint there" in _bad(_with(command, "--pretrained-checkpoint", str(tmp_path / "none")) + [
        "--load", str(tmp_path / "empty")], capsys)


def test_use_checkpoint_schedule_extends_a_run_on_its_saved_schedule(tmp_path, whole_run, capsys):
    """--use-checkpoint-opt_param-scheduler: back at iteration 8 of the whole run, with --train-iters 20 and
    another --lr, --min-lr and warm-up, the run takes the checkpoint's rates and schedule: iterations 9-16
    are the whole run's bit for bit (loss, lr, gates), and 17-20 stay at its final rate (its decay ended at
    its own 16). Without the flag that resume is refused."""
    whole_save, _ = whole_run
    extended = tmp_path / "extended"
    run = _with(_with(RESUME_RUN, "--train-iters", "20"), "--lr", "1e-2") + [
        "--min-lr", "1e-3", "--lr-warmup-iters", "2", "--load", str(whole_save), "--ckpt-step", "8",
        "--save", str(extended)]
    assert "the run was saved with --lr 0.003, this run asks for --lr 0.01" in _bad(run, capsys)
    assert "give one of --use-checkpoint-opt_param-scheduler and --override-opt-param-scheduler" in _bad(
        run + ["--use-checkpoint-opt_param-scheduler", "--override-opt-param-scheduler"], capsys)
    log = _ok(_train(run + ["--use-checkpoint-opt_param-scheduler"]))
    assert "--use-checkpoint-opt_param-scheduler: the checkpoint's schedule, not this run's flags: lr 0.003 (not " \
           "0.01), min_lr 3e-05 (not 0.001), lr_warmup_iters 0 (not 2), lr_decay_iters 16 (not None)" in log
    whole, ours = _final_state(whole_save)["records"], _final_state(extended)["records"]
    assert len(ours) == 20 and ours[:16] == whole
    assert all(r["lr"] == pytest.approx(3e-5) for r in ours[16:])
    meta = json.loads((extended / "iter_0000020" / "consa_run.json").read_text())["training"]
    assert (meta["lr"], meta["min_lr"], meta["lr_decay_iters"], meta["train_iters"]) == (3e-3, 3e-5, 16, 20)


def test_async_save_writes_what_the_synchronous_save_writes(tmp_path, whole_run):
    """--async-save (with --ckpt-assume-constant-structure: planned once): training goes on while
    a background process writes each checkpoint, and each, once in place, holds bit for bit what
    the synchronous run saved at that iteration (the state at the save, not a later one), with
    the same metadata and RNG states; the marker names the last. Saved every 2 iterations with
    --save-retain-interval 4: those at 2, 6, 10, 14 are deleted once the next is in place. Killed
    while finalizing a save, the run leaves the previous checkpoint latest."""
    import torch

    whole_save, _ = whole_run
    save = tmp_path / "async"
    log = _ok(_train(_with(RESUME_RUN, "--save-interval", "2") + [
        "--save", str(save), "--async-save", "--ckpt-assume-constant-structure", "--save-retain-interval", "4",
        "--log-progress"]))
    # --log-progress: each save when scheduled and when in place, and each deletion once the next is in place
    events = [e[:2] for e in _progress_events(save)]
    assert events[0] == ["Starting job", "Floating-point operations: 0"] and all(len(e) == 2 for e in events)
    for k in range(2, 17, 2):
        saving, saved = events.index(["Saving async checkpoint", f"Iteration: {k}"]), \
            events.index(["Saved async checkpoint", f"Iteration: {k}"])
        assert saving < saved
        if k % 4:
            assert events.index(["Deleted checkpoint", f"Iteration: {k}"]) > events.index(
                ["Saved async checkpoint", f"Iteration: {k + 2}"])
    assert len(events) == 1 + 8 * 2 + 4
    # the save after iteration 4 is finalized after a later step at the earliest (the 5th)
    assert log.index("saved checkpoint at iteration 4 ") > log.index("iter      5/16 |")
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == "16"
    assert sorted(p.name for p in save.iterdir()) == [
        "iter_0000004", "iter_0000008", "iter_0000012", "iter_0000016", "latest_checkpointed_iteration.txt",
        "progress.txt"]
    for it in (4, 8, 12, 16):
        name = f"iter_{it:07d}"
        assert json.loads((save / name / "consa_run.json").read_text()) == json.loads(
            (whole_save / name / "consa_run.json").read_text())
        ours, reference = checkpoint_contents(save / name), checkpoint_contents(whole_save / name)
        assert len(reference) > 100 and not differing_keys(reference, ours), differing_keys(reference, ours)[:5]
        rng = [torch.load(d / name / "rng_rank00000.pt", weights_only=False)["torch"] for d in (save, whole_save)]
        assert torch.equal(*rng)
    killed = tmp_path / "killed"
    _kill_during_the_save_at_8(RESUME_RUN + ["--save", str(killed), "--async-save"])
    assert not (killed / "iter_0000008").exists() and (killed / "iter_0000008.tmp-8").is_dir()


def _kill_during_the_save_at_8(args: list[str]) -> None:
    """Run `args`, SIGKILLed (MEGATRON_CONSA_KILL_DURING_SAVE) once the shards of the save at iteration 8 are
    written, before they are renamed into place: the checkpoint at 4 must stay the latest."""
    env = {**ENV, "MEGATRON_CONSA_KILL_DURING_SAVE": "8"}
    # Its own session: the checkpoint writer's helper processes outlive a SIGKILLed parent; end them too.
    proc = subprocess.Popen([PY, "-m", "megatron_consa.train", *args], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        assert proc.wait(timeout=600) == -signal.SIGKILL
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    save = Path(args[args.index("--save") + 1])
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == "4"


def test_sigterm_during_the_final_save_waits_for_it_and_skips_the_evaluation_after(tmp_path):
    """--exit-signal-handler: a SIGTERM that arrives while the final checkpoint is being saved (here sent by
    the process to itself when that save starts) does not kill the process halfway through the save: the
    checkpoint is written and marked latest, the evaluation after training (the job is ending) is skipped,
    exit 0."""
    driver = (
        "import os, signal, sys\n"
        "import megatron_consa\n"
        "import megatron_consa.training.checkpoint as ck\n"
        "save = ck.save_run_checkpoint\n"
        "def final_save_signalled(trainer, *a, **k):\n"
        "    if trainer.iteration == trainer.training.train_iters:\n"
        "        os.kill(os.getpid(), signal.SIGTERM)\n"
        "    return save(trainer, *a, **k)\n"
        "ck.save_run_checkpoint = final_save_signalled\n"
        "from megatron_consa.train import main\n"
        "sys.exit(main(sys.argv[1:]))\n")
    run = MODEL + ["--mock-data", "--vocab-size", "128", "--train-iters", "3", "--consa-target-warmup-iters", "1",
                   "--eval-interval", "2", "--eval-iters", "1", "--save", str(tmp_path / "run"), "--exit-signal-handler"]
    proc = subprocess.run([PY, "-c", driver, *run], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    log = _ok(proc)
    assert (tmp_path / "run" / "latest_checkpointed_iteration.txt").read_text().strip() == "3"
    assert (tmp_path / "run" / "iter_0000003" / "consa_run.json").is_file()
    assert ("stopping after the final save (--exit-signal-handler: SIGTERM received): the evaluation after "
            "training is skipped") in log, log[-2000:]
    assert "validation | iter 2" in log and "validation | iter 3" not in log, log[-2000:]


def test_sigterm_to_one_rank_stops_every_rank_after_the_same_step(tmp_path):
    """Under torchrun (2 ranks, DP=2), a SIGTERM that reaches one worker only, and every process it
    started (its data-loader process, megatron-core's checkpoint-writer queue server, a background
    checkpoint writer if one is at work, as Slurm's --signal reaches every process of a step): the
    ranks agree (one all-reduce per step), save one consistent checkpoint (asynchronously, the
    replicas sharing the writes), exit 0; the resume finishes."""
    run = _with(RESUME_RUN, "--global-batch-size", "4") + ["--save", str(tmp_path / "run"), "--async-save"]
    proc = subprocess.Popen(_torchrun_cmd(run + ["--exit-signal-handler", "--num-workers", "1"]), cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    tracker = tmp_path / "run" / "latest_checkpointed_iteration.txt"
    deadline = time.time() + 300
    while time.time() < deadline and not tracker.exists():
        time.sleep(0.05)
    workers = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    assert len(workers) == 2, workers
    started = Path(f"/proc/{workers[0]}/task/{workers[0]}/children").read_text().split()
    rank0 = Path(f"/proc/{workers[0]}/cmdline").read_bytes()
    commands = [Path(f"/proc/{pid}/cmdline").read_bytes() for pid in started]
    # (forked: the loader, and a checkpoint writer while one writes)
    assert commands.count(rank0) >= 1 and any(b"spawn_main" in c for c in commands), commands
    for pid in [workers[0], *started]:
        os.kill(int(pid), signal.SIGTERM)
    log = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, log[-3000:]
    last = int(tracker.read_text())
    assert 4 <= last < 16 and f"stopping after iteration {last} of 16 (--exit-signal-handler" in log
    meta = json.loads((tmp_path / "run" / f"iter_{last:07d}" / "consa_run.json").read_text())
    assert meta["iteration"] == last and meta["world_size"] == 2
    log = _ok(subprocess.run(_torchrun_cmd(run + ["--load", str(tmp_path / "run")]), cwd=ROOT, env=ENV,
                             capture_output=True, text=True, timeout=600))
    assert f"resumed from {tmp_path / 'run' / f'iter_{last:07d}'} (iteration {last})" in log
    assert int(tracker.read_text()) == 16


@pytest.mark.parametrize("precision", ["--bf16", "--fp16"])
def test_mixed_precision_learning_saves_and_resumes_bit_exact(tmp_path, precision, capsys, monkeypatch):
    """A bf16 / fp16 learning run as users launch it (fp16 at the shipped loss scale): it
    saves (the float32 gates once broke megatron-core's mixed-precision checkpoint), logs
    its grad norm (and loss scale), and a run stopped by --exit-interval resumes to the
    same records, bit for bit (saved with --no-save-rng, resumed with --no-load-rng, which
    it needs: nothing in a step draws from the RNGs)."""
    run = _with(RESUME_RUN, "--train-iters", "8") + [precision, "--save-interval", "8"]
    whole_log = _ok(_train(run + ["--save", str(tmp_path / "whole")]))
    assert "| grad norm " in whole_log
    assert ("| loss scale 65536 |" in whole_log) == (precision == "--fp16")
    stopped = tmp_path / "stopped"
    # (collections at other moments, batches read ahead in a worker process: the same run)
    gc = ["--manual-gc", "--manual-gc-interval", "2", "--num-workers", "1"]
    log = _ok(_train(run + gc + ["--save", str(stopped), "--exit-interval", "3", "--no-save-rng"]))
    assert f"stopping after iteration 3 of 8 (--exit-interval 3): saved to {stopped}" in log
    assert (stopped / "latest_checkpointed_iteration.txt").read_text().strip() == "3"
    assert not list((stopped / "iter_0000003").glob("rng_rank*"))
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert "saved without its RNG states (--no-save-rng): resume with --no-load-rng" in _bad(
        run + gc + ["--save", str(stopped), "--load", str(stopped)], capsys)
    _ok(_train(run + gc + ["--save", str(stopped), "--load", str(stopped), "--no-load-rng"]))
    whole, resumed = _final_state(tmp_path / "whole"), _final_state(stopped)
    assert len(resumed["records"]) == 8 and not any(r["skipped"] for r in whole["records"])
    assert resumed["records"] == whole["records"]
    assert resumed["controller"] == whole["controller"] and resumed["log_alpha"] == whole["log_alpha"]


def test_killed_during_a_save_resumes_the_previous_checkpoint(tmp_path):
    save = tmp_path / "run"
    _kill_during_the_save_at_8(RESUME_RUN + ["--save", str(save)])
    assert not (save / "iter_0000008").exists()  # only its temporary directory
    resumed = _ok(_train(RESUME_RUN + ["--save", str(save), "--load", str(save)]))
    assert "resumed from" in resumed and "iter_0000004" in resumed
    assert len(_final_state(save)["records"]) == 16
    # launched again once finished (a requeue): nothing trained, the last checkpoint is left as it is
    final = save / "iter_0000016"
    stamp = (final / "consa_run.json").stat().st_mtime_ns
    again = _ok(_train(RESUME_RUN + ["--save", str(save), "--load", str(save)]))
    assert "nothing to train" in again and (final / "consa_run.json").stat().st_mtime_ns == stamp
    from megatron_consa.training.checkpoint import resolve_load_dir

    final.rename(save / "iter_0000016.old")  # killed between a save's two renames
    assert resolve_load_dir(save) == save / "iter_0000016.old"


def test_a_diverging_run_stops_at_the_first_non_finite_step_and_saves_nothing_of_it(tmp_path):
    """--lr 1e30: the first step throws the weights to ~1e30 and the next gradient is NaN. The
    run stops there on its own (Megatron-LM's --check-for-nan-in-loss-and-grad, on by default),
    exit status 3, with the step's checkpoint not written; the last one stays marked latest."""
    save = tmp_path / "run"
    run = BASE + ["--lr", "1e30", "--min-lr", "0", "--save", str(save), "--save-interval", "1"]
    proc = _train(run)
    assert proc.returncode == 3, proc.stderr[-3000:]
    found = re.search(r"error: iteration (\d+): [^\n]*nan[^\n]*: training diverged", proc.stderr)
    assert found, proc.stderr[-3000:]
    step = int(found.group(1))  # (counted from 1, as the log lines and checkpoints count)
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == str(step - 1)  # the steps before it
    assert not (save / f"iter_{step:07d}").exists()
    assert _ok(_train(_with(run, "--save", str(tmp_path / "on")) + ["--no-check-for-nan-in-loss-and-grad"]))


# ----------------------------------------------------------------------------- bad input


def _with(args: list[str], flag: str, value: str) -> list[str]:
    """`args` with `flag`'s value replaced."""
    i = args.index(flag)
    return args[:i + 1] + [value] + args[i + 2:]


def _bad(argv: list[str], capsys) -> str:
    from megatron_consa.train import main

    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    return err


BASE = MODEL + ["--mock-data", "--vocab-size", "128", "--train-iters", "5", "--consa-target-warmup-iters", "1"]


def test_bad_input_is_refused_before_any_work(tmp_path, capsys, corpus, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "precious.txt").write_text("x")
    empty = tmp_path / "empty"
    (tmp_path / "empty.bin").write_bytes(b"")
    (tmp_path / "empty.idx").write_bytes(b"")
    no_mock = [a for a in BASE if a != "--mock-data"]
    assert "--data-path" in _bad(no_mock + ["--save", str(keep)], capsys)
    assert "does not exist" in _bad(no_mock + ["--data-path", str(tmp_path / "nothing")], capsys)
    assert "is empty" in _bad(no_mock + ["--data-path", str(empty)], capsys)
    small_vocab = _with(no_mock, "--vocab-size", "64") + [
        "--data-path", corpus["data"], "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", corpus["tok"]]
    err = _bad(small_vocab + ["--save", str(tmp_path / "never")], capsys)
    assert "--tokenizer-model" in err and "model's vocabulary is 64" in err
    assert not (tmp_path / "never").exists()  # (a refused run makes no --save directory)
    assert "--consa-target-sparsity" in _bad(BASE + ["--consa-target-sparsity", "1.5"], capsys)
    assert "drop one of them" in _bad(BASE + ["--data-path", corpus["data"]], capsys)  # --mock-data would ignore it
    assert "without --train-data-path" in _bad(no_mock + ["--valid-data-path", corpus["data"]], capsys)
    err = _bad(no_mock + ["--train-data-path", corpus["data"], "--split", "9,1,0"], capsys)  # --split is of --data-path
    assert "--train-data-path with --data-path or --split" in err and "not both" in err
    err = _bad(no_mock + ["--train-data-path", corpus["data"], "--eval-interval", "2"], capsys)
    assert "--eval-interval reads the validation blend: give --valid-data-path" in err
    err = _bad(BASE + ["--lr", "1e-5", "--min-lr", "1e-4"], capsys)  # megatron-core's scheduler would assert
    assert "--min-lr" in err and "lr=1e-05" in err
    err = _bad(BASE + ["--bf16", "--loss-scale", "1024"], capsys)  # it would do nothing
    assert "--loss-scale" in err and "--fp16 only" in err
    err = _bad(BASE + ["--fp16", "--initial-loss-scale", "8", "--min-loss-scale", "16"], capsys)
    assert "--min-loss-scale (TrainingConfig.min_loss_scale)=16.0" in err and "initial_loss_scale=8.0" in err
    assert "--hysteresis (TrainingConfig.hysteresis)=0" in _bad(BASE + ["--fp16", "--hysteresis", "0"], capsys)
    assert "no CUDA: add --use-pytorch-profiler" in _bad(BASE + ["--profile"], capsys)  # nsys's profiler: CUDA only
    assert "give --tensorboard-dir" in _bad(BASE + ["--profile", "--use-pytorch-profiler"], capsys)
    assert "--wandb-save-dir DIR, or --save DIR (then DIR/wandb)" in _bad(BASE + ["--wandb-project", "p"], capsys)
    err = _bad(BASE + ["--profile", "--use-pytorch-profiler", "--tensorboard-dir", str(tmp_path / "tb"),
                       "--profile-step-start", "3", "--profile-step-end", "3"], capsys)
    assert "0 <= step_start < step_end (--profile-step-start, --profile-step-end)" in err
    other = Allocation(granularity="kv_head", num_layers=2, num_kv_heads=2, window=8, sink_tokens=0,
                       target_sparsity=0.5, fa=[[1, 0], [0, 1]])
    other.save(tmp_path / "other.json")
    err = _bad(BASE + ["--consa-phase", "fixed", "--consa-allocation", str(tmp_path / "other.json")], capsys)
    assert "--consa-allocation" in err and "num_layers" in err
    assert "--load" in _bad(BASE + ["--load", str(keep)], capsys)
    (tmp_path / "a_file").write_text("")
    assert "--save" in _bad(BASE + ["--save", str(tmp_path / "a_file" / "sub")], capsys)
    monkeypatch.setenv("WORLD_SIZE", "4")
    err = _bad(BASE + ["--tensor-model-parallel-size", "4"], capsys)
    assert "--tensor-model-parallel-size" in err and "num_query_groups=2" in err
    monkeypatch.setenv("WORLD_SIZE", "1")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2}))
    unshaped = BASE[BASE.index("--seq-length"):]  # no shape flags: --hf-config describes the model
    assert "model_type='gpt2'" in _bad(unshaped + ["--hf-config", str(tmp_path / "hf")], capsys)
    err = _bad(BASE + ["--hf-config", str(tmp_path / "hf")], capsys)  # shape flags it would ignore
    assert "--num-layers, --hidden-size" in err and "would be ignored" in err
    (tmp_path / "hf" / "model.safetensors").write_bytes(b"")  # a Hugging Face model where a checkpoint goes
    assert "it is a Hugging Face model: import it with tools/convert_hf_to_megatron.py" in _bad(
        BASE + ["--load", str(tmp_path / "hf")], capsys)
    for flag in ("--num-layers", "--eval-iters", "--num-layers-per-virtual-pipeline-stage", "--exit-interval"):
        assert f"{flag} 0: must be >= 1" in _bad(BASE + [flag, "0"], capsys)
    assert "--exit-duration-in-mins 0.0: must be > 0" in _bad(BASE + ["--exit-duration-in-mins", "0"], capsys)
    assert "--reset-attention-mask" in _bad(BASE + ["--reset-attention-mask"], capsys)
    assert "--add-qkv-bias" in _bad(BASE + ["--add-qkv-bias"], capsys)  # with --qk-layernorm: no HF family
    if not transformer_engine_available():
        err = _bad(BASE + ["--transformer-impl", "transformer_engine"], capsys)
        assert "--transformer-impl" in err and "transformer_engine" in err
    err = _bad(_with(BASE, "--consa-target-warmup-iters", "9"), capsys)
    assert "--consa-target-warmup-iters" in err and "--train-iters" in err
    # a resumable learn checkpoint (its metadata) resumed under another target or noise seed
    from megatron_consa.config import ConsaConfig

    learned = tmp_path / "learned"
    learned.mkdir()
    saved_consa = {**ConsaConfig().to_dict(), "target_sparsity": 0.5, "target_warmup_iters": 1}
    saved_training = {"lr": 3e-4, "min_lr": 3e-5, "weight_decay": 0.0, "train_iters": 5, "lr_warmup_iters": 0,
                      "lr_decay_style": "cosine"}
    (learned / "consa_run.json").write_text(json.dumps({"resumable": True, "consa": saved_consa, "architecture": {},
                                                        "training": saved_training}))
    err = _bad(BASE + ["--load", str(learned), "--consa-target-sparsity", "0.25"], capsys)
    assert "--consa-target-sparsity 0.5" in err and "--finetune" in err
    err = _bad(BASE + ["--load", str(learned), "--consa-target-sparsity", "0.5", "--consa-noise-seed", "7"], capsys)
    assert "--consa-noise-seed" in err
    for flag, value in (("--consa-lagrangian-lr", "9.0"), ("--consa-lagrangian-rho", "9.0")):  # the multipliers' step
        err = _bad(BASE + ["--load", str(learned), "--consa-target-sparsity", "0.5", flag, value], capsys)
        name = flag[len("--consa-"):].replace("-", "_")
        assert f"the learn phase was run with {flag} {saved_consa[name]}, this run asks for 9.0" in err, err
    same = BASE + ["--load", str(learned), "--consa-target-sparsity", "0.5"]
    err = _bad(same + ["--lr", "1e-3", "--min-lr", "1e-4"], capsys)  # the optimizer's groups are keyed by lr
    assert "--lr 0.0003" in err and "--finetune" in err
    err = _bad(_with(same, "--train-iters", "9"), capsys)  # megatron would keep the saved schedule silently
    assert "--train-iters 5" in err and "--override-opt-param-scheduler" in err
    (learned / "consa_run.json").write_text(json.dumps({
        "resumable": True, "consa": saved_consa, "architecture": {}, "training": {**saved_training, "lr_decay_iters": None}}))
    err = _bad(same + ["--lr-decay-iters", "4"], capsys)
    assert "saved without --lr-decay-iters, this run asks for 4: resume without --lr-decay-iters" in err
    err = _bad(same + ["--weight-decay-incr-style", "cosine", "--start-weight-decay", "0", "--end-weight-decay", "0.1"],
               capsys)  # (saved before the flag: a constant decay)
    assert "saved with --weight-decay-incr-style constant, this run asks for cosine" in err
    assert "--override-opt-param-scheduler" in err
    (learned / "consa_run.json").write_text(json.dumps({  # its data position is iteration x global batch
        "resumable": True, "consa": saved_consa, "architecture": {}, "training": {**saved_training, "global_batch_size": 8}}))
    err = _bad(same, capsys)
    assert "--global-batch-size 8" in err and "skip or repeat samples" in err and "--finetune" in err
    # fp32 and bf16/fp16 optimizer states do not load into each other (dist_checkpointing: no fp32_param)
    (learned / "consa_run.json").write_text(json.dumps({
        "resumable": True, "consa": saved_consa, "architecture": {},
        "training": {**saved_training, "bf16": False, "fp16": False}}))
    err = _bad(same + ["--bf16"], capsys)
    assert "saved in fp32" in err and "asks for --bf16" in err and "--finetune" in err
    (learned / "consa_run.json").write_text(json.dumps({
        "resumable": True, "consa": saved_consa, "architecture": {},
        "training": {**saved_training, "bf16": True, "fp16": False}}))
    err = _bad(same + ["--fp16"], capsys)
    assert "saved in --bf16, this run asks for --fp16" in err
    # the distributed optimizer's state reshards over DP only, and is not the standard one's
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    saved_parallel = {"tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 1,
                      "virtual_pipeline_model_parallel_size": None, "use_distributed_optimizer": True}
    (sharded / "consa_run.json").write_text(json.dumps({"resumable": True, "consa": saved_consa, "architecture": {},
                                                        "training": saved_training, "parallel": saved_parallel}))
    resumed = _with(BASE + ["--load", str(sharded), "--consa-target-sparsity", "0.5"], "--train-iters", "5")
    err = _bad(resumed, capsys)
    assert "saved with --use-distributed-optimizer, this run does not use it" in err and "--finetune" in err
    err = _bad(resumed + ["--use-distributed-optimizer"], capsys)
    assert "--tensor-model-parallel-size 2" in err and "data-parallel ranks only" in err
    saved_parallel.update(tensor_model_parallel_size=1, pipeline_model_parallel_size=2,
                          decoder_first_pipeline_num_layers=1)  # its stages: layers 0 | 1-3
    (sharded / "consa_run.json").write_text(json.dumps({"resumable": True, "consa": saved_consa, "architecture": {},
                                                        "training": saved_training, "parallel": saved_parallel}))
    monkeypatch.setenv("WORLD_SIZE", "2")
    err = _bad(resumed + ["--use-distributed-optimizer", "--pipeline-model-parallel-size", "2"], capsys)
    assert "pipeline stages of [1, 3] layers" in err and "this run's stages have [2, 2]" in err, err
    assert "--decoder-first-pipeline-num-layers 1 --decoder-last-pipeline-num-layers 3" in err
    monkeypatch.setenv("WORLD_SIZE", "1")
    fixed = tmp_path / "fixed"  # a resumable fixed phase resumed with another allocation
    fixed.mkdir()
    fixed_consa = {**ConsaConfig().to_dict(), "allocation": [[1, 0], [0, 1], [0, 0], [0, 0]]}
    (fixed / "consa_run.json").write_text(json.dumps({"resumable": True, "consa": fixed_consa, "architecture": {},
                                                      "training": saved_training}))
    err = _bad(BASE + ["--load", str(fixed), "--consa-phase", "fixed", "--consa-allocation", "all_fa",
                       "--consa-target-sparsity", "0.5"], capsys)
    assert "another allocation" in err and "--finetune" in err
    assert sorted(p.name for p in keep.iterdir()) == ["precious.txt"]  # nothing written or overwritten


def test_a_fixed_phase_refuses_allocation_flags_its_allocation_contradicts(tmp_path, capsys):
    """The fixed phase runs its allocation's window, sinks and granularity (from a file or a checkpoint):
    a --consa-* flag that says otherwise is refused, naming the allocation's value, instead of being
    ignored; flags that agree are accepted."""
    from megatron_consa.config import ConsaConfig

    fa = [[1, 0], [0, 0], [0, 1], [0, 0]]  # 0.75 SWA
    finalized = tmp_path / "finalized"
    finalized.mkdir()
    consa = {**ConsaConfig().to_dict(), "allocation": fa, "window": 8, "granularity": "kv_head"}
    (finalized / "consa_run.json").write_text(json.dumps({"resumable": False, "consa": consa, "architecture": {}}))
    run = BASE + ["--consa-phase", "fixed", "--load", str(finalized), "--finetune"]
    for flags, message in ((["--consa-window", "16"], "--consa-window 16: the fixed phase runs the allocation of "
                                                      f"--load {finalized}, whose window is 8; drop the flag"),
                           (["--consa-granularity", "layer"], "whose granularity is kv_head"),
                           (["--consa-sink-tokens", "4"], "whose number of sink tokens is 0"),
                           (["--consa-target-sparsity", "0.5"], "whose sparsity is 0.75;")):
        assert message in _bad(run + flags, capsys)
    from megatron_consa.allocation import Allocation
    from megatron_consa.training.arguments import parse_run_config
    from megatron_consa.training.run import prepare_run

    path = tmp_path / "allocation.json"
    Allocation(granularity="kv_head", num_layers=4, num_kv_heads=2, window=8, sink_tokens=0, target_sparsity=0.7,
               fa=fa).save(path)  # (a budget rounded to whole units: 0.75 for a target of 0.7)
    from_file = BASE + ["--consa-phase", "fixed", "--consa-allocation", str(path)]
    err = _bad(from_file + ["--consa-window", "16"], capsys)
    assert f"--consa-allocation {path}, whose window is 8" in err
    err = _bad(from_file + ["--consa-target-sparsity", "0.5"], capsys)
    assert "whose sparsity is 0.75 (made for a target of 0.7)" in err
    for target in ("0.7", "0.75"):  # the target it was made for, or the sparsity it has
        assert prepare_run(parse_run_config(from_file + ["--consa-target-sparsity", target]), world_size=1)
    agreeing = prepare_run(parse_run_config(run + ["--consa-window", "8", "--consa-target-sparsity", "0.75"]),
                           world_size=1)
    assert (agreeing.run.consa.window, agreeing.run.consa.allocation) == (8, fa)


def test_finalize_refuses_what_it_must_and_writes_nothing(tmp_path, capsys):
    """tools/finalize_allocation.py as shipped: a learn run that did not settle is refused
    (exit 2, nothing written); --tolerance loosens the judgement; a non-empty --save needs
    --overwrite; a fixed checkpoint has no gates to finalize."""
    import importlib.util

    from megatron_consa.cli import run_tool

    spec = importlib.util.spec_from_file_location("finalize_allocation", ROOT / "tools" / "finalize_allocation.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    # (with W&B, offline: its files go under --save, beside the checkpoints, as in Megatron-LM)
    _ok(_train(MODEL + ["--mock-data", "--vocab-size", "128", "--consa-phase", "learn", "--consa-target-sparsity",
                        "0.5", "--consa-target-warmup-iters", "1", "--train-iters", "6", "--save", str(tmp_path / "learn"),
                        "--wandb-project", "consa-e2e", "--wandb-exp-name", "learn"],
               env={**ENV, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}))
    from wandb_records import config, history, run_file

    logged = history(run_file(tmp_path / "learn" / "wandb"))
    assert list(logged["consa/loss"]) == list(range(1, 7)) and list(logged["consa/s_hat"]) == list(range(1, 7))
    assert logged["consa/allocation_heatmap"][6]["_type"] == "image-file"  # at the save
    assert config(run_file(tmp_path / "learn" / "wandb"))["training"]["train_iters"] == 6

    def refused(argv, message, nothing_at):
        assert run_tool(tool.main, argv) == 2
        err = capsys.readouterr().err
        assert message in err, err
        assert nothing_at is None or not nothing_at.exists()

    load = ["--load", str(tmp_path / "learn")]
    refused(load + ["--save", str(tmp_path / "fin")], "did not settle", tmp_path / "fin")
    assert run_tool(tool.main, load + ["--save", str(tmp_path / "fin"), "--tolerance", "1"]) == 0
    allocation = Allocation.load(tmp_path / "fin" / "allocation.json")
    assert allocation.achieved_sparsity == 0.5 and (tmp_path / "fin" / "checkpoint" / "consa_run.json").is_file()
    # the run's data record goes along: evaluating the finalized checkpoint holds out that run's valid split
    learned = json.loads((tmp_path / "learn" / "iter_0000006" / "consa_run.json").read_text())
    finalized = json.loads((tmp_path / "fin" / "checkpoint" / "consa_run.json").read_text())
    assert learned.get("data") and finalized.get("data") == learned["data"], (learned, finalized)
    before = (tmp_path / "fin" / "allocation.json").read_bytes()
    refused(load + ["--save", str(tmp_path / "fin"), "--tolerance", "1"], "--overwrite", None)
    assert (tmp_path / "fin" / "allocation.json").read_bytes() == before
    refused(["--load", str(tmp_path / "fin"), "--save", str(tmp_path / "again")], "no gates to finalize",
            tmp_path / "again")
    # --finetune: the resumable learn checkpoint's weights under a new optimizer (another --lr, which a
    # resume refuses), from iteration 0
    log = _ok(_train(MODEL + ["--mock-data", "--vocab-size", "128", "--consa-phase", "learn", "--consa-target-sparsity",
                              "0.5", "--consa-target-warmup-iters", "1", "--train-iters", "2", "--lr", "1e-2",
                              "--load", str(tmp_path / "learn"), "--finetune", "--save", str(tmp_path / "ft")]))
    assert "started from the weights of" in log and "(iteration 6)" in log
    assert (tmp_path / "ft" / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
