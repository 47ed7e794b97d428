"""Early exits (Megatron-LM's --exit-interval, --exit-duration-in-mins, --exit-signal-handler) and manual
garbage collection (--manual-gc) in one process; tests/e2e/test_train_entry.py stops and resumes real runs."""

from __future__ import annotations

import os
import signal

import pytest

from megatron_consa.config import ConsaConfigError
from megatron_consa.training.early_exit import EXIT_SIGNAL, EarlyExit, ExitConfig


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_nothing_configured_never_stops():
    exit_ = EarlyExit(ExitConfig())
    assert [exit_.reason(k) for k in range(1, 50)] == [None] * 49


def test_interval_stops_at_its_multiples():
    exit_ = EarlyExit(ExitConfig(interval=4))
    assert [k for k in range(1, 13) if exit_.reason(k)] == [4, 8, 12]
    assert exit_.reason(8) == "--exit-interval 4"


def test_duration_counts_from_the_start():
    clock = FakeClock()
    exit_ = EarlyExit(ExitConfig(duration_in_mins=2.0), clock=clock)
    clock.now += 119.0
    assert exit_.reason(1) is None
    clock.now += 1.0
    assert exit_.reason(2) == "--exit-duration-in-mins 2: 2.00 minutes elapsed"


def test_sigterm_is_caught_only_inside_and_stops_after_the_step():
    before = signal.getsignal(EXIT_SIGNAL)
    with EarlyExit(ExitConfig(signal_handler=True)) as exit_:
        assert exit_.reason(1) is None
        os.kill(os.getpid(), EXIT_SIGNAL)  # would end the test process without the handler
        assert exit_.reason(2) == "--exit-signal-handler: SIGTERM received"
    assert signal.getsignal(EXIT_SIGNAL) is before


@pytest.mark.parametrize("config,field", [(ExitConfig(interval=0), "interval"),
                                          (ExitConfig(duration_in_mins=0.0), "duration_in_mins")])
def test_bad_values_are_refused(config, field):
    with pytest.raises(ConsaConfigError, match=f"ExitConfig.{field}"):
        EarlyExit(config)


def test_manual_gc_collects_at_the_same_iterations_and_restores_the_collector(monkeypatch):
    """--manual-gc: the automatic collector is off inside the run; collections at its start, at
    multiples of the interval and around evaluations; the collector is back on after it."""
    import gc

    from megatron_consa.training.arguments import parse_run_config
    from megatron_consa.training.manual_gc import ManualGC

    t = parse_run_config(["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length",
                          "32", "--train-iters", "9", "--mock-data", "--vocab-size", "64",
                          "--consa-target-warmup-iters", "1", "--manual-gc", "--manual-gc-interval", "4"]).training
    assert (t.manual_gc, t.manual_gc_interval, t.manual_gc_eval) == (True, 4, True)
    calls = []
    monkeypatch.setattr(gc, "collect", lambda generation=2: calls.append(generation) or 0)
    assert gc.isenabled()
    with ManualGC(t.manual_gc, interval=t.manual_gc_interval, around_eval=t.manual_gc_eval) as manual:
        assert not gc.isenabled() and calls == [2]
        for k in range(1, t.train_iters + 1):
            manual.after_step(k)
        assert calls == [2, 2, 2]  # iterations 4 and 8
        manual.before_eval()
        manual.after_eval()
        assert calls == [2, 2, 2, 2, 0]
    assert gc.isenabled()
    calls.clear()
    with ManualGC(False, interval=4) as manual:  # without --manual-gc: nothing at all
        assert gc.isenabled()
        for k in range(1, 9):
            manual.after_step(k)
        manual.before_eval()
    assert calls == [] and gc.isenabled()


def test_the_checkpoint_writer_queue_server_outlives_sigterm_but_not_its_parent(tmp_path):
    """compat.signals: the server of megatron-core's write-results queue ignores the SIGTERM a run
    saves on (megatron-core's own dies of it, and the save hangs), and still dies with the process
    that started it, however that ends (here SIGKILL)."""
    import subprocess
    import sys
    import time

    script = tmp_path / "start_server.py"
    script.write_text(
        "import time\n"
        "if __name__ == '__main__':\n"
        "    import megatron_consa\n"
        "    from megatron.core.dist_checkpointing.strategies import filesystem_async\n"
        "    from megatron_consa.compat.signals import _MANAGERS, keep_checkpoint_writer_through_sigterm\n"
        "    assert keep_checkpoint_writer_through_sigterm() and keep_checkpoint_writer_through_sigterm()\n"
        "    filesystem_async._results_queue.put('written')\n"
        "    assert filesystem_async.get_write_results_queue().get() == 'written'  # megatron-core's accessor: ours\n"
        "    print(_MANAGERS[0]._process.pid, flush=True)\n"
        "    time.sleep(120)\n"
    )
    parent = subprocess.Popen([sys.executable, "-W", "ignore", str(script)], stdout=subprocess.PIPE, text=True)
    try:
        server = int(parent.stdout.readline())
        alive = lambda pid: os.path.exists(f"/proc/{pid}") and "Z" not in open(f"/proc/{pid}/stat").read().split()[2]
        os.kill(server, signal.SIGTERM)
        time.sleep(0.5)
        assert alive(server), "the server died of SIGTERM"
        parent.kill()
        parent.wait()
        deadline = time.time() + 10
        while alive(server) and time.time() < deadline:
            time.sleep(0.05)
        assert not alive(server), "the server outlived its parent"
    finally:
        parent.kill()
