"""Micro-batch streams for the training loop.

`SyntheticRecallData` makes a corpus that needs long-range attention: each
sequence is random "filler" tokens in which a random key segment appears
twice, the second copy more than a window after the first. Predicting the
second copy needs attention beyond the window, so a learned allocation has a
reason to keep some units FA. It is deterministic in (seed, sample index) and
needs no files, which makes it the data of the CPU demo and the tests.

Every stream yields dicts of `tokens`, `labels`, `loss_mask`, `position_ids`
([b, s] tensors); `micro_batches` slices the global batch of an iteration for
one data-parallel rank so that every layout sees the same samples.
"""

from __future__ import annotations

import faulthandler
import itertools
import signal
from dataclasses import dataclass
from typing import Iterator, Optional, Protocol

import torch
from torch import Tensor


class SampleSource(Protocol):
    """A deterministic map from a global sample index to a token sequence of seq_length + 1.

    A source may also have `eod_mask_id` (an int, or None): the token whose input positions
    carry no loss (`GPTSampleSource` under `--eod-mask-loss`)."""

    def sample(self, index: int) -> Tensor: ...


@dataclass
class SyntheticRecallData:
    vocab_size: int
    seq_length: int
    key_length: int = 8
    """Tokens in the repeated segment."""
    min_distance: int = 64
    """The copy starts at least this many tokens after the original."""
    seed: int = 0

    def __post_init__(self) -> None:
        if self.seq_length + 1 < self.min_distance + 2 * self.key_length + 1:
            raise ValueError(
                f"seq_length={self.seq_length} is too short for min_distance={self.min_distance} "
                f"and key_length={self.key_length}"
            )
        if self.vocab_size < 4:
            raise ValueError(f"vocab_size={self.vocab_size} must be >= 4")

    def sample(self, index: int) -> Tensor:
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + index) & 0x7FFFFFFFFFFF)
        n = self.seq_length + 1
        seq = torch.randint(2, self.vocab_size, (n,), generator=g)
        span = n - self.key_length - self.min_distance - self.key_length
        start = int(torch.randint(0, max(1, span), (1,), generator=g))
        copy_at = start + self.key_length + self.min_distance
        copy_at += int(torch.randint(0, max(1, n - copy_at - self.key_length + 1), (1,), generator=g))
        if start > 0:
            seq[start - 1] = 1  # marker token before the key
        seq[copy_at - 1] = 1  # the same marker announces the copy
        seq[copy_at : copy_at + self.key_length] = seq[start : start + self.key_length]
        return seq


@dataclass
class PeriodicSequenceData:
    """Sequences that repeat with a fixed period: x[p] = x[p - period] after the first period.

    The simplest long-range dependency: a head that attends `period - 1` tokens
    back predicts every token after the first period. With a window shorter
    than the period only full-attention heads can, so the LM loss has a clear
    reason to keep some units FA; a small model learns it in a few hundred
    steps on a CPU (the quickstart's data).
    """

    vocab_size: int
    seq_length: int
    period: int
    seed: int = 0

    def __post_init__(self) -> None:
        if not 1 < self.period <= self.seq_length:
            raise ValueError(f"period={self.period} must lie in (1, seq_length={self.seq_length}]")

    def sample(self, index: int) -> Tensor:
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + index) & 0x7FFFFFFFFFFF)
        head = torch.randint(0, self.vocab_size, (self.period,), generator=g)
        reps = (self.seq_length + 1 + self.period - 1) // self.period
        return head.repeat(reps)[: self.seq_length + 1]


def batch_from_samples(samples: list[Tensor], eod_mask_id: Optional[int] = None) -> dict[str, Tensor]:
    """[seq+1] samples -> shifted tokens/labels with a full loss mask, or with no loss where
    the input token is `eod_mask_id` (megatron-core's `eod_mask_loss`)."""
    data = torch.stack(samples)  # [b, s+1]
    tokens = data[:, :-1].contiguous()
    labels = data[:, 1:].contiguous()
    b, s = tokens.shape
    loss_mask = torch.ones(b, s, dtype=torch.float32)
    if eod_mask_id is not None:
        loss_mask[tokens == eod_mask_id] = 0.0
    return {
        "tokens": tokens,
        "labels": labels,
        "loss_mask": loss_mask,
        "position_ids": torch.arange(s).unsqueeze(0).expand(b, s).contiguous(),
    }


def micro_batches(
    source: SampleSource,
    *,
    iteration: int,
    global_batch_size: int,
    micro_batch_size: int,
    dp_rank: int,
    dp_size: int,
) -> list[dict[str, Tensor]]:
    """The micro-batches of one iteration for one data-parallel rank.

    Sample order: global index = iteration * global_batch_size + j; micro-batch m
    of DP rank r holds j in [(m * dp_size + r) * mbs, ... + mbs).
    """
    n_micro = global_batch_size // (micro_batch_size * dp_size)
    base = iteration * global_batch_size
    out = []
    for m in range(n_micro):
        first = (m * dp_size + dp_rank) * micro_batch_size
        out.append(batch_from_samples([source.sample(base + first + i) for i in range(micro_batch_size)],
                                      getattr(source, "eod_mask_id", None)))
    return out


class _IterationBatches(torch.utils.data.Dataset):
    """Item k: (k, the micro-batches of iteration k for one data-parallel rank, stacked: one
    [micro-batches, b, s] tensor per key, so an item crosses from the worker as four shared-memory
    tensors, not four per micro-batch: each holds a file descriptor while in flight)."""

    def __init__(self, source: SampleSource, **layout: int) -> None:
        self.source, self.layout = source, layout

    def __getitem__(self, iteration: int):
        batches = micro_batches(self.source, iteration=iteration, **self.layout)
        return iteration, {key: torch.stack([b[key] for b in batches]) for key in batches[0]}


def _init_worker(_worker_id: int) -> None:
    """A SIGTERM meant for the job (Slurm's --signal reaches every process of a step) would kill the
    worker, and the trainer with it, before `--exit-signal-handler` saves: the trainer handles it
    and stops the workers itself (they also exit when their parent does). A worker killed by a
    fault (SIGSEGV, SIGBUS) prints its Python stack first, then torch's message: the trainer's
    error names the worker's pid only."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    faulthandler.enable(all_threads=True)


class PrefetchedBatches:
    """The micro-batches of one iteration after another, prepared ahead in `num_workers` worker
    processes (Megatron-LM's `--num-workers`: a torch DataLoader, each worker preparing whole
    iterations, two each in flight), or in this process when `num_workers` is 0.

    `get(k)` returns `micro_batches(source, iteration=k, ...)`, the same tensors either way;
    asked for another iteration than the next (a resume, a jump), it starts over from there.
    Workers are forked: the source need not be picklable (a megatron-core GPTDataset on its
    memory-mapped files is shared as it is). An error reading iteration k is raised by `get(k)`.
    """

    def __init__(self, source: SampleSource, *, num_workers: int, global_batch_size: int, micro_batch_size: int,
                 dp_rank: int, dp_size: int) -> None:
        self.source, self.num_workers = source, num_workers
        self.layout = dict(global_batch_size=global_batch_size, micro_batch_size=micro_batch_size,
                           dp_rank=dp_rank, dp_size=dp_size)
        self._loader = None
        self._next: Optional[int] = None

    def get(self, iteration: int) -> list[dict[str, Tensor]]:
        if not self.num_workers:
            return micro_batches(self.source, iteration=iteration, **self.layout)
        if self._loader is None or self._next != iteration:
            self.close()
            self._loader = iter(torch.utils.data.DataLoader(
                _IterationBatches(self.source, **self.layout), batch_size=None,
                sampler=itertools.count(iteration),  # (a run may step past its planned length: train(n))
                num_workers=self.num_workers, multiprocessing_context="fork", worker_init_fn=_init_worker,
            ))
        k, stacked = next(self._loader)
        if k != iteration:  # (the sampler hands the iterations in order)
            raise RuntimeError(f"the data loader gave iteration {k} for iteration {iteration}")
        self._next = iteration + 1
        keys = list(stacked)
        return [dict(zip(keys, parts)) for parts in zip(*(stacked[key].unbind(0) for key in keys))]

    def close(self) -> None:
        """Stop the worker processes (they stop with the trainer too)."""
        if self._loader is not None:
            workers = list(getattr(self._loader, "_workers", []))
            self._loader._shutdown_workers()
            for worker in workers:  # one stuck in a read: SIGTERM, the DataLoader's last resort, is ignored
                if worker.is_alive():
                    worker.kill()
            self._loader = None


def repeat_for_chunks(batches: list[dict[str, Tensor]], num_chunks: int) -> list[Iterator]:
    """One iterator per virtual-pipeline model chunk over the same micro-batches."""
    return [iter(batches) for _ in range(num_chunks)]
