"""stem_megatron/training/signals.py: what a training process does with SIGINT, SIGTERM, SIGUSR1.

In-process (the handlers, signals sent to this process) and across 2 gloo ranks (the per-step
agreement: a signal that reached one rank stops every rank after the same step). The launched
runs are in tests/test_errors_training.py."""

import os
import signal
import time

import pytest
import torch

from stem_megatron.testing.distributed import run_distributed
from stem_megatron.training import signals
from stem_megatron.training.signals import StopSignals


@pytest.fixture
def restore_handlers():
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
    yield
    for s, h in saved.items():
        signal.signal(s, h)


def _kill(sig):
    os.kill(os.getpid(), sig)
    time.sleep(0.01)  # let the interpreter run the handler


def test_sigint_in_the_loop_asks_to_stop_without_saving(restore_handlers):
    s, before = StopSignals(), signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):  # still pending at the end of the block: honoured there
        with s.deferring_interrupt():
            _kill(signal.SIGINT)  # no KeyboardInterrupt here: the step finishes
            assert (s.requested, s.local()) == ("SIGINT", signals.INTERRUPT)
            _kill(signal.SIGINT)  # the same Ctrl-C delivered twice (group + launcher): still deferred
    assert signal.getsignal(signal.SIGINT) is before


def test_a_second_ctrl_c_stops_at_once(restore_handlers, monkeypatch):
    monkeypatch.setattr(signals, "REPEAT_WINDOW_S", 0.05)
    s = StopSignals()
    with pytest.raises(KeyboardInterrupt):
        with s.deferring_interrupt():
            _kill(signal.SIGINT)
            time.sleep(0.1)
            _kill(signal.SIGINT)
            pytest.fail("the second Ctrl-C did not interrupt")


def test_sigint_overrides_a_save_signal_and_works_when_ignored_on_entry(restore_handlers):
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # what a worker inherits from a shell's background job
    s = StopSignals()
    s.install()
    _kill(signal.SIGTERM)
    assert (s.requested, s.local()) == ("SIGTERM", signals.SAVE_AND_STOP)
    with pytest.raises(KeyboardInterrupt):
        with s.deferring_interrupt():
            _kill(signal.SIGINT)
            assert s.local() == signals.INTERRUPT
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN


# (what rank 0 received, what rank 1 received) -> what both agree on
CASES = [
    ((None, None), signals.NONE),
    ((None, "SIGINT"), signals.INTERRUPT),  # a Ctrl-C that reached one worker only stops both
    (("SIGTERM", None), signals.SAVE_AND_STOP),
    (("SIGUSR1", "SIGINT"), signals.INTERRUPT),
]


def _agree(rank, world_size):
    out = []
    for received, _ in CASES:
        s = StopSignals()
        sig = received[rank]
        if sig == "SIGINT":
            s.interrupted, s.requested = True, "SIGINT"
        elif sig:
            s.requested = sig
        out.append(s.agreed(torch.device("cpu")))
    return out


def test_every_rank_agrees_on_the_strongest_request():
    expected = [want for _, want in CASES]
    assert run_distributed(_agree, world_size=2, timeout=120) == [expected, expected]
