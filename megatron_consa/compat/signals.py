"""Keep megatron-core's checkpoint-writer helper alive through the SIGTERM a run saves on.

megatron-core's `FileSystemWriterAsync` (the `torch_dist` save) collects its write results
through a queue served by a `multiprocessing` Manager process, spawned at the first save
(`dist_checkpointing/strategies/filesystem_async.py`, `get_write_results_queue`). A SIGTERM
that reaches every process of a job step (Slurm's `--signal`, `scancel --signal TERM`) kills
that server, and the save `--exit-signal-handler` then makes hangs on its broken queue.
`keep_checkpoint_writer_through_sigterm()` starts the server first, ignoring SIGTERM, and
hands its queue to megatron-core. The server dies with this process however it ends (Linux's
parent-death signal), since SIGTERM no longer stops it.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from multiprocessing.managers import SyncManager

logger = logging.getLogger(__name__)

_MANAGERS: list[SyncManager] = []  # (the queue's server lives as long as this process)

# Run first in the server (a spawned interpreter: a builtin initializer with source text, so it
# imports nothing of this package, nor torch). PR_SET_PDEATHSIG = 1.
_SERVER_SETUP = """
import ctypes, os, signal
signal.signal(signal.SIGTERM, signal.SIG_IGN)
try:
    ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL), 0, 0, 0)
except (OSError, AttributeError):
    pass
if os.getppid() != {parent}:
    os._exit(0)
"""


def keep_checkpoint_writer_through_sigterm() -> bool:
    """Start megatron-core's write-results queue in a server that ignores SIGTERM; True when the
    queue is served so (now or by an earlier call), False where megatron-core made its own
    already (a save before this in the process: then a warning) or has no such queue."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if _MANAGERS:
        return True
    queue = getattr(filesystem_async, "_results_queue", "absent")
    if queue is not None:
        if queue != "absent":
            logger.warning("megatron-core's checkpoint-writer queue was made before --exit-signal-handler was set up: "
                           "a SIGTERM to every process of the job can kill its server and hang the save")
        return False
    manager = SyncManager(ctx=multiprocessing.get_context("spawn"))  # megatron-core's context
    manager.start(initializer=exec, initargs=(_SERVER_SETUP.format(parent=os.getpid()),))
    _MANAGERS.append(manager)
    filesystem_async._results_queue = manager.Queue()
    return True
