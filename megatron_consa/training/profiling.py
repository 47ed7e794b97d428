"""Megatron-LM's `--profile`: a few iterations of the run profiled on chosen ranks.

Two profilers, as in Megatron-LM:

- `--use-pytorch-profiler`: `torch.profiler` (CPU ops, and CUDA kernels where there is
  CUDA) over iterations [step_start, step_end), one warm-up iteration before them; the trace
  goes into the TensorBoard directory (`<host>_<pid>.<time>.pt.trace.json`, for TensorBoard's
  profiler plug-in, Perfetto or chrome://tracing). Each iteration is one `ProfilerStep#k`.
- otherwise CUDA's own profiler for Nsight Systems: `cudaProfilerStart` at step_start and
  `cudaProfilerStop` after step_end - 1, with NVTX ranges for every autograd op between
  (launch under `nsys profile --capture-range=cudaProfilerApi`). It needs CUDA.

Iterations are the run's own: a resumed run past step_start profiles nothing (it says so).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import torch

from megatron_consa.compat import has_cuda
from megatron_consa.config import ConsaConfigError

logger = logging.getLogger(__name__)


@dataclass
class ProfileConfig:
    enabled: bool = False
    """Profile the steps taken with step_start up to step_end - 1 iterations done (Megatron-LM's flags: 10 and 12
    profile the iterations the log numbers 11 and 12) on `ranks`."""
    step_start: int = 10
    """The iterations done before the first profiled step."""
    step_end: int = 12
    """The iterations done before the first step not profiled (the last profiled one's number in the log)."""
    ranks: tuple[int, ...] = (0,)
    """The global ranks that profile."""
    use_pytorch_profiler: bool = False
    """torch.profiler traces into `trace_dir` instead of CUDA's profiler for nsys."""
    trace_dir: Optional[str] = None
    """Where torch.profiler writes its traces (the run's TensorBoard directory)."""

    def validate(self) -> None:
        if not self.enabled:
            return
        if not 0 <= self.step_start < self.step_end:
            raise ConsaConfigError(
                f"ProfileConfig.step_start={self.step_start}, step_end={self.step_end}: profile at least one "
                "iteration, 0 <= step_start < step_end (--profile-step-start, --profile-step-end)"
            )
        if self.use_pytorch_profiler and not self.trace_dir:
            raise ConsaConfigError(
                "ProfileConfig.trace_dir is unset: torch.profiler writes its traces into the TensorBoard directory; "
                "give --tensorboard-dir"
            )
        if not self.use_pytorch_profiler and not has_cuda():
            raise ConsaConfigError(
                "ProfileConfig.use_pytorch_profiler=False starts CUDA's profiler (for nsys), and this machine has no "
                "CUDA: add --use-pytorch-profiler (traces into --tensorboard-dir)"
            )


class StepProfiler:
    """Around each training iteration: `before_step(k)` / `after_step(k)`, k the iterations done
    before it. A no-op on ranks not in `config.ranks` and when profiling is off."""

    def __init__(self, config: ProfileConfig, *, rank: int, world_size: int) -> None:
        config.validate()
        self.config = config
        self.active = config.enabled and rank in config.ranks
        missing = [r for r in config.ranks if not 0 <= r < world_size]
        if config.enabled and missing and rank == 0:
            logger.warning("--profile-ranks %s: no such rank in a world of %d; they profile nothing",
                           " ".join(map(str, missing)), world_size)
        self._torch: Optional[torch.profiler.profile] = None
        self._nvtx = None
        self._first: Optional[int] = None

    def before_step(self, iteration: int) -> None:
        if not self.active:
            return
        c = self.config
        if self._first is None:
            self._first = iteration
            if iteration > c.step_start:
                logger.warning("--profile-step-start %d: this run starts with %d iterations done, after it; nothing "
                               "is profiled", c.step_start, iteration)
        if c.use_pytorch_profiler:
            # one warm-up iteration before step_start, where the run has one (a resume may start at it)
            warmup = 1 if c.step_start > 0 and self._first < c.step_start else 0
            if self._torch is None and iteration == c.step_start - warmup:
                self._torch = torch.profiler.profile(
                    activities=[torch.profiler.ProfilerActivity.CPU]
                    + ([torch.profiler.ProfilerActivity.CUDA] if has_cuda() else []),
                    schedule=torch.profiler.schedule(wait=0, warmup=warmup, active=c.step_end - c.step_start, repeat=1),
                    on_trace_ready=torch.profiler.tensorboard_trace_handler(c.trace_dir),
                    record_shapes=True,
                    with_stack=True,
                )
                self._torch.start()
                logger.info("profiling iterations %d-%d (torch.profiler, into %s)", c.step_start + 1, c.step_end,
                            c.trace_dir)
        elif iteration == c.step_start:
            torch.cuda.cudart().cudaProfilerStart()
            self._nvtx = torch.autograd.profiler.emit_nvtx(record_shapes=True)
            self._nvtx.__enter__()
            logger.info("profiling iterations %d-%d (CUDA profiler)", c.step_start + 1, c.step_end)

    def after_step(self, iteration: int) -> None:
        """`iteration`: the iterations done, this one included."""
        if self._torch is not None:
            self._torch.step()
            if iteration == self.config.step_end:
                self.stop()
        elif self._nvtx is not None and iteration == self.config.step_end:
            self.stop()

    def stop(self) -> None:
        """End profiling now (at step_end, or when the run stops before it): the trace is written."""
        if self._torch is not None:
            self._torch.stop()
            self._torch = None
        if self._nvtx is not None:
            self._nvtx.__exit__(None, None, None)
            torch.cuda.cudart().cudaProfilerStop()
            self._nvtx = None

    def __enter__(self) -> "StepProfiler":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
