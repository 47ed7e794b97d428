"""Megatron-LM's early exits: save and stop before the run's last iteration.

A cluster job has a time limit; a requeued one resumes from the latest checkpoint
(`--load` of the `--save` directory), so what a stop loses is the work since the
last save. Three ways to stop right after a step, with a checkpoint of it:

* ``--exit-interval N``: at every iteration that is a multiple of N;
* ``--exit-duration-in-mins M``: once this process has run M minutes;
* ``--exit-signal-handler``: once the process received SIGTERM (Slurm's
  ``--signal=TERM@<seconds>`` before the time limit, torchrun's forwarding of a
  SIGTERM it received, a ``scancel --signal=TERM``).

Elapsed time and signals differ between ranks, so those two are agreed on with one
all-reduce (MAX) per step: every rank stops after the same iteration, as the
checkpoint needs. `--exit-interval` needs no collective.
"""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

EXIT_SIGNAL = signal.SIGTERM


@dataclass
class ExitConfig:
    """When a run stops early (after saving, when it saves)."""

    interval: Optional[int] = None
    """Stop at an iteration that is a multiple of this (`--exit-interval`)."""
    duration_in_mins: Optional[float] = None
    """Stop once the process has run this many minutes (`--exit-duration-in-mins`)."""
    signal_handler: bool = False
    """Stop after the step during which SIGTERM arrived (`--exit-signal-handler`)."""

    def validate(self) -> None:
        from megatron_consa.config import ConsaConfigError

        if self.interval is not None and (not isinstance(self.interval, int) or self.interval < 1):
            raise ConsaConfigError(f"ExitConfig.interval={self.interval!r}: must be an integer >= 1")
        if self.duration_in_mins is not None and not self.duration_in_mins > 0:
            raise ConsaConfigError(f"ExitConfig.duration_in_mins={self.duration_in_mins!r}: must be > 0")

    @property
    def needs_agreement(self) -> bool:
        """Whether deciding to stop takes a collective (elapsed time, signals: per rank)."""
        return self.duration_in_mins is not None or self.signal_handler


class EarlyExit:
    """Decides, after each step, whether the run stops there (the same answer on every rank).

    Use as a context manager: with `signal_handler`, SIGTERM is caught between
    `__enter__` and `__exit__` (and handled as before outside).
    """

    def __init__(self, config: ExitConfig, *, start_time: Optional[float] = None, clock=time.monotonic) -> None:
        config.validate()
        self.config = config
        self._clock = clock
        self._start = clock() if start_time is None else start_time
        self._signalled = False
        self._previous_handler = None

    def __enter__(self) -> "EarlyExit":
        if self.config.signal_handler:
            from megatron_consa.compat.signals import keep_checkpoint_writer_through_sigterm

            self._previous_handler = signal.signal(EXIT_SIGNAL, self._on_signal)
            keep_checkpoint_writer_through_sigterm()  # the save this signal asks for needs it
        return self

    def __exit__(self, *exc) -> None:
        if self.config.signal_handler:
            signal.signal(EXIT_SIGNAL, self._previous_handler)

    def _on_signal(self, signum, frame) -> None:
        self._signalled = True

    def signalled(self) -> bool:
        """Whether any rank received the exit signal (a collective on every rank): the same answer everywhere."""
        from megatron_consa.training.parallel import device

        flag = torch.tensor([float(self._signalled)], dtype=torch.float64, device=device())
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def reason(self, iteration: int) -> Optional[str]:
        """Why the run stops after `iteration` (a flag, in words), or None; a collective on
        every rank when the config takes one (see `ExitConfig.needs_agreement`)."""
        c = self.config
        if c.needs_agreement:
            from megatron_consa.training.parallel import device

            minutes = (self._clock() - self._start) / 60.0
            local = [float(c.duration_in_mins is not None and minutes >= c.duration_in_mins), float(self._signalled)]
            flags = torch.tensor(local, dtype=torch.float64, device=device())
            if dist.is_initialized():
                dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            timed_out, signalled = (bool(v) for v in flags.tolist())
            if signalled:
                return f"--exit-signal-handler: {EXIT_SIGNAL.name} received"
            if timed_out:
                return f"--exit-duration-in-mins {c.duration_in_mins:g}: {minutes:.2f} minutes elapsed"
        if c.interval and iteration % c.interval == 0:
            return f"--exit-interval {c.interval}"
        return None


__all__ = ["EXIT_SIGNAL", "EarlyExit", "ExitConfig"]
