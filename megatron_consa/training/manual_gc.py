"""Megatron-LM's `--manual-gc`: Python's garbage collections at the same iterations on every rank.

Python collects when its allocation counters cross thresholds, at moments that differ
between ranks; in a large process a collection takes tens of milliseconds, and in a
synchronous step every other rank waits for the one collecting. With manual collection the
automatic collector is off for the run, and `gc.collect()` runs at its start, every
`manual_gc_interval` iterations (0: never in between) and, unless `--no-manual-gc-eval`,
around each evaluation (everything before it, the youngest generation after it, as
Megatron-LM).
"""

from __future__ import annotations

import gc


class ManualGC:
    """Context manager for one run's loop; every method is a no-op when `enabled` is False."""

    def __init__(self, enabled: bool, *, interval: int = 0, around_eval: bool = True) -> None:
        self.enabled, self.interval, self.around_eval = enabled, interval, around_eval
        self._was_enabled = True

    def __enter__(self) -> "ManualGC":
        if self.enabled:
            self._was_enabled = gc.isenabled()
            gc.disable()
            gc.collect()
        return self

    def __exit__(self, *exc) -> None:
        if self.enabled and self._was_enabled:
            gc.enable()

    def after_step(self, iteration: int) -> None:
        """`iteration`: the steps done so far."""
        if self.enabled and self.interval and iteration % self.interval == 0:
            gc.collect()

    def before_eval(self) -> None:
        if self.enabled and self.around_eval:
            gc.collect()

    def after_eval(self) -> None:
        if self.enabled and self.around_eval:
            gc.collect(generation=0)  # what the evaluation made and dropped
