"""The signal handling of the commands: a signal inside ``deferred()`` is only noted there."""

from __future__ import annotations

import os
import signal

import pytest

from cost_fast.apps import signals


@pytest.fixture
def handlers():
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    signals.begin()
    signals.install()
    yield
    for s, handler in previous.items():
        signal.signal(s, handler)
    signals.begin()


def test_a_signal_in_a_deferred_block_is_raised_when_it_ends(handlers) -> None:
    reached_the_end = False
    with pytest.raises(signals.Interrupted) as caught:
        with signals.deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            with signals.deferred():  # nested: still deferred after the inner block
                pass
            reached_the_end = True  # what an import in the block would finish
    assert reached_the_end and caught.value.signum == signal.SIGTERM
    assert signals.received() == signal.SIGTERM


def test_outside_a_deferred_block_the_signal_raises_at_once(handlers) -> None:
    with pytest.raises(signals.Interrupted):
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(1000):  # the handler runs between bytecodes
            pass
        pytest.fail("the handler did not raise")


def test_a_deferred_block_without_a_signal_ends_quietly(handlers) -> None:
    with signals.deferred():
        pass
    assert signals.received() is None
