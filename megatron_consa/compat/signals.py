"""Keep megatron-core's checkpoint-writer helper alive through the SIGTERM a run saves on.

megatron-core's `FileSystemWriterAsync` (the `torch_dist` save) collects its write results
through a queue served by a `multiprocessing` Manager process, spawned at the first save
(`dist_checkpointing/strategies/filesystem_async.py`, `get_write_results_queue`). A SIGTERM
that reaches every process of a job step (Slurm's `--signal`, `scancel --signal TERM`) kills
that server, and the save `--exit-signal-handler` then makes hangs on its broken queue.
`keep_checkpoint_writer_through_sigterm()` starts the server first, ignoring SIGTERM (it
still stops with its parent), and hands its queue to megatron-core.
"""

from __future__ import annotations

import multiprocessing
import signal
from multiprocessing.managers import SyncManager

_MANAGERS: list[SyncManager] = []  # (the queue's server lives as long as this process)


def keep_checkpoint_writer_through_sigterm() -> bool:
    """Start megatron-core's write-results queue in a server that ignores SIGTERM; False where
    megatron-core made its own already or has no such queue (then nothing changes)."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if getattr(filesystem_async, "_results_queue", "absent") is not None:
        return False
    manager = SyncManager(ctx=multiprocessing.get_context("spawn"))  # megatron-core's context
    manager.start(initializer=signal.signal, initargs=(signal.SIGTERM, signal.SIG_IGN))
    _MANAGERS.append(manager)
    filesystem_async._results_queue = manager.Queue()
    return True
