"""Megatron-LM's step timers and memory figures (`--timing-log-level`, `--timing-log-option`,
`--log-timers-to-tensorboard`, `--log-memory-to-tensorboard`).

The timers are megatron-core's (`megatron.core.timers.Timers`): the trainer hands one set
to the model config (the pipeline schedules, the gradient all-reduces) and to the
optimizer config (its step's parts), as Megatron-LM does, and times its own parts
beside them. A log line reports the fixed list below, so that every rank gathers the
same names (a pipeline stage that never sends has no send timer: it reports nothing
for it rather than a different list).
"""

from __future__ import annotations

import resource
import sys
from typing import TYPE_CHECKING, Optional

import torch

from megatron_consa.compat import has_cuda
from megatron_consa.training.writers import MetricWriters

if TYPE_CHECKING:
    from megatron.core.timers import Timers

TIMERS_TO_LOG = (
    # Megatron-LM's training_log list, in its order (a timer that never ran is not reported)
    "forward-backward",
    "forward-compute",
    "backward-compute",
    "batch-generator",
    "forward-recv",
    "forward-send",
    "backward-recv",
    "backward-send",
    "forward-send-forward-recv",
    "forward-send-backward-recv",
    "backward-send-forward-recv",
    "backward-send-backward-recv",
    "forward-backward-send-forward-backward-recv",
    "layernorm-grads-all-reduce",
    "non-tensor-parallel-grads-all-reduce",  # (this megatron-core's name for the one above)
    "embedding-grads-all-reduce",
    "all-grads-sync",
    "params-all-gather",
    "optimizer-copy-to-main-grad",
    "optimizer-unscale-and-check-inf",
    "optimizer-clip-main-grad",
    "optimizer-count-zeros",
    "optimizer-inner-step",
    "optimizer-copy-main-to-model-params",
    "optimizer",
    # ConSA's own, level 1
    "consa-constraint",
    "consa-dual-step",
)


def build_timers(level: int, option: str) -> Optional["Timers"]:
    """megatron-core's timers at `level` (1, 2), reported over ranks by `option`; None at
    level 0 (nothing timed: megatron-core skips its timers, and `megatron.core.timers`,
    which imports wandb where installed, is not loaded)."""
    if level == 0:
        return None
    from megatron.core.timers import Timers

    return Timers(level, option)


def report_timers(timers: Optional["Timers"], *, iterations: int, writers: Optional[MetricWriters],
                  to_writers: bool, step: int) -> Optional[str]:
    """The timers' mean per iteration over the last `iterations`, then reset them. Every rank
    calls it (it gathers over all ranks); returns the log text (ms) where a timer ran, None
    without timers. With `to_writers`, `writers` (the last rank's; None elsewhere) get each
    timer's max over ranks as '<name>-time' (s), TensorBoard and W&B alike."""
    if timers is None:
        return None
    names = list(TIMERS_TO_LOG)
    iterations = max(1, iterations)
    if to_writers:
        # (megatron-core's Timers.write has the same gather, but W&B only through the module's run)
        min_max = timers._get_global_min_max_time(names, reset=False, barrier=False, normalizer=iterations)
        if writers is not None:
            for name, (_, slowest) in min_max.items():
                writers.add_scalar(f"{name}-time", slowest, step)
    return timers.get_all_timers_string(names, normalizer=iterations, reset=True)


def memory_scalars() -> dict[str, float]:
    """This process's memory as TensorBoard scalars: CUDA's allocator figures (Megatron-LM's
    names), or on the CPU the resident and peak resident bytes."""
    if has_cuda():
        stats = torch.cuda.memory_stats()
        return {
            "mem-reserved-bytes": stats["reserved_bytes.all.current"],
            "mem-allocated-bytes": stats["allocated_bytes.all.current"],
            "mem-max-allocated-bytes": stats["allocated_bytes.all.peak"],
            "mem-allocated-count": stats["allocation.all.current"],
        }
    scalars = {}
    try:
        with open("/proc/self/statm") as f:  # Linux
            scalars["mem-rss-bytes"] = float(int(f.read().split()[1]) * resource.getpagesize())
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    peak = float(peak if sys.platform == "darwin" else peak * 1024)
    # (the kernel's high-water mark trails the current figure by a few pages)
    scalars["mem-max-rss-bytes"] = max(peak, scalars.get("mem-rss-bytes", 0.0))
    return scalars
