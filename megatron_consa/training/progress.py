"""Megatron-LM's progress log (`--log-progress`): `<save>/progress.txt`, one line per event.

Each line is Megatron-LM's, tab-separated, so the scripts that read its progress logs read
these: the time, the Slurm job id, the number of ranks, then the event:

    2026-12-07 10:00:00	Job ID: 4242	# GPUs: 8	Starting job	Floating-point operations: 2.5836e+18
    2026-12-07 10:20:00	Job ID: 4242	# GPUs: 8	Saved checkpoint	Iteration: 500	Job throughput: 312.4 TFLOP/s/GPU	Cumulative throughput: 309.9 TFLOP/s/GPU	Floating-point operations: 2.99e+18	Tokens (in billions): 1.05

With `--async-save` the save line reads "Saving async checkpoint" when the save is
scheduled and "Saved async checkpoint	Iteration: N" once it is in place; "Deleted
checkpoint	Iteration: N" when `--save-retain-interval` drops one.

Job throughput: the floating-point operations this process trained since it started,
over its wall time (evaluations and saves included) and ranks. Cumulative: the same
since the first job of this world size that the log records (a resize starts the count
again), from the operations the checkpoint it loaded had counted, which its start line
records (written once the checkpoint is loaded, stamped with the job's start; a start line
without them, Megatron-LM's, counts from the save before it). The operations are the
log line's TFLOP/s count (`training.flops`), summed over the iterations and kept in each
checkpoint. Only the first rank writes; nothing here is a collective.
"""

from __future__ import annotations

import os
import time
from datetime import datetime
from pathlib import Path
from typing import Optional

PROGRESS_FILE = "progress.txt"
_TIME_FORMAT = "%Y-%m-%d %H:%M:%S"


class ProgressLog:
    """Appends the events of a run to `<save>/progress.txt` (rank 0 writes; the others do nothing).

    `start_time` (`time.time()`) is when the job started; `flops_at_start` the operations the
    loaded checkpoint had counted (0 for a run from scratch or a new phase).
    """

    def __init__(self, save: str | os.PathLike, *, rank: int, world_size: int, start_time: float,
                 flops_at_start: float = 0.0):
        self.path = Path(save) / PROGRESS_FILE
        self.rank = rank
        self.world_size = world_size
        self.start_time = start_time
        self.flops_at_start = flops_at_start

    def _append(self, event: str, when: Optional[datetime] = None) -> None:
        if self.rank != 0:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        job = os.environ.get("SLURM_JOB_ID", "")
        stamp = (when or datetime.now()).strftime(_TIME_FORMAT)
        with open(self.path, "a") as f:
            f.write(f"{stamp}\tJob ID: {job}\t# GPUs: {self.world_size}\t{event}\n")

    def starting_job(self) -> None:
        """The job's start line, once `flops_at_start` is known (after the load), stamped with `start_time`; the
        count in full (the cumulative figures subtract it)."""
        self._append(f"Starting job\tFloating-point operations: {self.flops_at_start:.17g}",
                     when=datetime.fromtimestamp(self.start_time))

    def checkpoint_saved(self, iteration: int, *, flops: float, tokens: int, asynchronous: bool = False) -> None:
        """After a save (or, `asynchronous`, when it is scheduled): the throughputs and the counts so far."""
        if self.rank != 0:
            return
        now = time.time()
        job = (flops - self.flops_at_start) / (max(now - self.start_time, 1e-9) * 1e12 * self.world_size)
        first_start, first_flops = self._first_job_of_this_size()
        elapsed = (datetime.now() - first_start).total_seconds() if first_start else now - self.start_time
        cumulative = (flops - (self.flops_at_start if first_start is None else first_flops)) / (
            max(elapsed, 1e-9) * 1e12 * self.world_size)
        self._append(
            f"{'Saving async checkpoint' if asynchronous else 'Saved checkpoint'}\tIteration: {iteration}\t"
            f"Job throughput: {job:.1f} TFLOP/s/GPU\tCumulative throughput: {cumulative:.1f} TFLOP/s/GPU\t"
            f"Floating-point operations: {flops:.2e}\tTokens (in billions): {tokens / 1e9:.2f}"
        )

    def async_checkpoint_in_place(self, iteration: int) -> None:
        self._append(f"Saved async checkpoint\tIteration: {iteration}")

    def checkpoint_deleted(self, iteration: int) -> None:
        self._append(f"Deleted checkpoint\tIteration: {iteration}")

    def _first_job_of_this_size(self) -> tuple[Optional[datetime], float]:
        """When the earliest job of this world size that the log records (since the last resize)
        started, and the operations it started from: those its start line records, else (a line
        of Megatron-LM's) those counted by the checkpoint saved last before it (Megatron-LM's
        reading: an async save counts once it is in place)."""
        start: Optional[datetime] = None
        start_flops = latest = 0.0
        pending: Optional[float] = None
        if not self.path.is_file():
            return None, 0.0
        for line in self.path.read_text().splitlines():
            fields = line.split("\t")
            try:  # (a line another program wrote, or cut short, is skipped: the log never stops a run)
                size, event = int(fields[2].split(": ")[1]), fields[3]
                when = datetime.strptime(fields[0], _TIME_FORMAT)
                count = float(fields[7].split(": ")[1]) if event in ("Saved checkpoint",
                                                                    "Saving async checkpoint") else None
                if event == "Starting job" and len(fields) > 4:  # (Megatron-LM's start line has no count)
                    count = float(fields[4].split(": ")[1])
            except (IndexError, ValueError):
                continue
            if event == "Saved checkpoint":
                latest = count
            elif event == "Saving async checkpoint":
                pending = count
            elif event == "Saved async checkpoint" and pending is not None:
                latest, pending = pending, None
            if size != self.world_size:
                start = None
                continue
            if event == "Starting job" and start is None:
                start, start_flops = when, latest if count is None else count
        return start, start_flops
