"""Early exits (Megatron-LM's --exit-interval, --exit-duration-in-mins, --exit-signal-handler)
in one process; tests/e2e/test_train_entry.py stops and resumes real runs with them."""

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
