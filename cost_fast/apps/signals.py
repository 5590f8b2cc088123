"""SIGINT and SIGTERM in the ``cost-fast`` commands: wherever a signal lands, the command ends
with one line and the exit status 128 + the signal's number, and leaves no staging folder.

``install`` (the first thing ``cost-fast`` does, before any heavy import) sets a handler for
both that notes the signal and raises ``Interrupted``, except inside ``deferred()``: there it
only notes it, and the block's end raises. The command's heavy imports run deferred, because an
exception raised while an extension module initialises can reach C++ code that cannot pass it
on (torch's pybind11 module set-up then aborts the process). Python may hand that exception on as
another one (a signal landing while a class body is created, during an import, reaches the
command as a ``RuntimeError``; an ``except ImportError`` may turn it into a message), or drop it
(a signal landing in a finalizer, whose exceptions are only printed): the note stays, so the
command reports the signal whatever exception ends it (``received``), and its long loops call
``check`` to end a run whose signal was dropped.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

_RECEIVED: list[int] = []  # the signals that came, in order
_DEFERRING: list[bool] = []  # non-empty inside deferred()


class Interrupted(BaseException):
    """A signal ended the run (a ``BaseException``: no ``except Exception`` swallows it)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _handler(signum: int, frame: object) -> None:
    _RECEIVED.append(signum)
    if not _DEFERRING:
        raise Interrupted(signum)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """A block in which a signal is only noted; ``Interrupted`` is raised when it ends (module
    docstring). Nested blocks defer until the outermost ends."""
    _DEFERRING.append(True)
    try:
        yield
    finally:
        _DEFERRING.pop()
    if not _DEFERRING:
        check()


def begin() -> None:
    """Forget the signals of an earlier command of this process (a command starts)."""
    _RECEIVED.clear()
    _DEFERRING.clear()


def install() -> None:
    """Handle SIGINT and SIGTERM (module docstring); only the main thread may set handlers."""
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, _handler)


def received() -> int | None:
    """The first signal that came, or None."""
    return _RECEIVED[0] if _RECEIVED else None


def check() -> None:
    """Raise ``Interrupted`` if a signal came whose exception was dropped on the way."""
    if _RECEIVED:
        raise Interrupted(_RECEIVED[0])
