"""Megatron-LM's progress log (`--log-progress`, training/progress.py): the lines and the cumulative
throughput's reading of earlier jobs, against figures worked out here. The runs that write it are
in tests/e2e/test_train_entry.py (a resume, and asynchronous saves with deletions)."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest

from megatron_consa.training.progress import PROGRESS_FILE, ProgressLog


def _line(when: datetime, size: int, event: str) -> str:
    return f"{when:%Y-%m-%d %H:%M:%S}\tJob ID: 7\t# GPUs: {size}\t{event}\n"


def _saved(it: int, flops: float) -> str:
    return (f"Saved checkpoint\tIteration: {it}\tJob throughput: 1.0 TFLOP/s/GPU\tCumulative throughput: 1.0 TFLOP/s/GPU"
            f"\tFloating-point operations: {flops:.2e}\tTokens (in billions): 0.00")


def _fields(path) -> list[str]:
    return path.read_text().splitlines()[-1].split("\t")


def test_cumulative_throughput_counts_from_the_first_job_of_this_world_size(tmp_path, monkeypatch):
    """Jobs at 4 ranks, a resize to 8 (the count starts again there), a junk line; the job now running
    at 8 ranks started at t0 + 3 h from 3e18 operations and saves at 5e18, 600 s after its own start:
    job throughput 2e18 / (600 s x 8) and cumulative (5e18 - 2e18) / ((1 h + 600 s) x 8) from the first
    8-rank job's start (t0 + 2 h, after the save of 2e18)."""
    t0 = datetime(2026, 1, 1, 0, 0, 0)
    log = tmp_path / PROGRESS_FILE
    log.write_text(
        _line(t0, 4, "Starting job") + _line(t0 + timedelta(hours=1), 4, _saved(10, 1e18))
        + _line(t0 + timedelta(hours=2), 8, _saved(20, 2e18)) + "not a progress line\n"
        + _line(t0 + timedelta(hours=2), 8, "Starting job") + _line(t0 + timedelta(hours=3), 8, _saved(30, 3e18))
        + _line(t0 + timedelta(hours=3), 8, "Starting job")
    )
    now = t0 + timedelta(hours=3, seconds=600)

    class Clock(datetime):
        @classmethod
        def now(cls, tz=None):
            return now

    monkeypatch.setattr("megatron_consa.training.progress.datetime", Clock)
    monkeypatch.setattr("megatron_consa.training.progress.time.time", lambda: 1000.0 + 600)
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    progress = ProgressLog(tmp_path, rank=0, world_size=8, start_time=1000.0, flops_at_start=3e18)
    progress.checkpoint_saved(50, flops=5e18, tokens=123_000_000_000)
    fields = _fields(log)
    assert fields[:4] == ["2026-01-01 03:10:00", "Job ID: 7", "# GPUs: 8", "Saved checkpoint"]
    assert fields[4] == "Iteration: 50"
    assert fields[5] == f"Job throughput: {2e18 / (600 * 8 * 1e12):.1f} TFLOP/s/GPU"
    assert fields[6] == f"Cumulative throughput: {3e18 / ((3600 + 600) * 8 * 1e12):.1f} TFLOP/s/GPU"
    assert fields[7:] == ["Floating-point operations: 5.00e+18", "Tokens (in billions): 123.00"]
    # an asynchronous save: scheduled, then in place (its count is the latest once in place); a deletion
    progress.checkpoint_saved(60, flops=6e18, tokens=0, asynchronous=True)
    assert _fields(log)[3:5] == ["Saving async checkpoint", "Iteration: 60"]
    progress.async_checkpoint_in_place(60)
    progress.checkpoint_deleted(50)
    assert [line.split("\t")[3:] for line in log.read_text().splitlines()[-2:]] == [
        ["Saved async checkpoint", "Iteration: 60"], ["Deleted checkpoint", "Iteration: 50"]]
    # only the first rank writes
    before = log.read_text()
    ProgressLog(tmp_path, rank=1, world_size=8, start_time=1000.0).starting_job()
    assert log.read_text() == before


def test_a_log_begun_by_this_job_counts_from_the_loaded_checkpoint(tmp_path, monkeypatch):
    """--log-progress first given on a resume: the log holds no earlier save, so the cumulative figure
    starts from the loaded checkpoint's operations, as the job's does."""
    clock = {"now": datetime(2026, 1, 1, 0, 0, 0)}

    class Clock(datetime):
        @classmethod
        def now(cls, tz=None):
            return clock["now"]

    start = clock["now"].timestamp()
    monkeypatch.setattr("megatron_consa.training.progress.datetime", Clock)
    monkeypatch.setattr("megatron_consa.training.progress.time.time", lambda: start + 100)
    progress = ProgressLog(tmp_path, rank=0, world_size=2, start_time=start, flops_at_start=4e15)
    clock["now"] += timedelta(seconds=30)  # (the start line, written after the load, keeps the job's start)
    progress.starting_job()
    assert (tmp_path / PROGRESS_FILE).read_text().split("\t")[0] == "2026-01-01 00:00:00"
    clock["now"] += timedelta(seconds=70)
    progress.checkpoint_saved(8, flops=6e15, tokens=0)
    progress.checkpoint_saved(9, flops=8e15, tokens=0)  # (its own first save in the log does not move the start)
    for line, flops in zip((tmp_path / PROGRESS_FILE).read_text().splitlines()[1:], (2e15, 4e15)):
        job, cumulative = (float(f.split(": ")[1].split()[0]) for f in line.split("\t")[5:7])
        # (not 6e15 over the job's time: the operations before it are not its)
        assert job == cumulative == pytest.approx(flops / (100 * 2 * 1e12), abs=0.05)


def test_the_next_job_counts_from_the_first_jobs_loaded_operations(tmp_path, monkeypatch):
    """The log's first job started from a checkpoint that had counted 1e17 operations and trained 0.5e17 in 100 s;
    the next job saves at once, having trained nothing: its cumulative figure stays 0.5e17 over their time (from
    the first job's start line; reading the save before it, there is none, counted from 0 and jumped to 1.5e17)."""
    clock = {"now": datetime(2026, 1, 1, 0, 0, 0)}

    class Clock(datetime):
        @classmethod
        def now(cls, tz=None):
            return clock["now"]

    monkeypatch.setattr("megatron_consa.training.progress.datetime", Clock)
    t0 = clock["now"].timestamp()
    first = ProgressLog(tmp_path, rank=0, world_size=1, start_time=t0, flops_at_start=1e17)
    first.starting_job()
    clock["now"] += timedelta(seconds=100)
    monkeypatch.setattr("megatron_consa.training.progress.time.time", lambda: t0 + 100)
    first.checkpoint_saved(10, flops=1.5e17, tokens=0)
    clock["now"] += timedelta(seconds=100)
    monkeypatch.setattr("megatron_consa.training.progress.time.time", lambda: t0 + 200)
    second = ProgressLog(tmp_path, rank=0, world_size=1, start_time=t0 + 200, flops_at_start=1.5e17)
    second.starting_job()
    second.checkpoint_saved(10, flops=1.5e17, tokens=0)
    lines = (tmp_path / PROGRESS_FILE).read_text().splitlines()
    assert lines[0].split("\t")[3:] == ["Starting job", "Floating-point operations: 1e+17"]
    cumulative = [float(line.split("\t")[6].split(": ")[1].split()[0]) for line in (lines[1], lines[3])]
    assert cumulative == [pytest.approx(0.5e17 / (100 * 1e12), abs=0.05), pytest.approx(0.5e17 / (200 * 1e12),
                                                                                         abs=0.05)]
    # a start line without the count (Megatron-LM's): the save before it; a save line cut short is skipped
    (tmp_path / PROGRESS_FILE).write_text(lines[1].rsplit("\t", 2)[0] + "\n" + lines[0].rsplit("\t", 1)[0] + "\n")
    assert second._first_job_of_this_size()[1] == 0.0
    second.checkpoint_saved(11, flops=1.6e17, tokens=0)


def test_the_start_line_keeps_the_loaded_count_in_full(tmp_path, monkeypatch):
    """A count that two significant digits would round (1.2349e17): the job's cumulative figure equals its job
    figure, nothing of the rounding in it."""
    t0 = datetime(2026, 1, 1).timestamp()
    monkeypatch.setattr("megatron_consa.training.progress.time.time", lambda: t0 + 100)
    progress = ProgressLog(tmp_path, rank=0, world_size=1, start_time=t0, flops_at_start=1.2349e17)
    progress.starting_job()

    class Clock(datetime):
        @classmethod
        def now(cls, tz=None):
            return datetime.fromtimestamp(t0 + 100)

    monkeypatch.setattr("megatron_consa.training.progress.datetime", Clock)
    progress.checkpoint_saved(5, flops=1.2349e17 + 1e15, tokens=0)
    job, cumulative = (f.split(": ")[1] for f in _fields(tmp_path / PROGRESS_FILE)[5:7])
    assert job == cumulative == "10.0 TFLOP/s/GPU"
