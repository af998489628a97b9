"""Interrupts that wait for the end of a step that must not be cut in two (DESIGN invariant 3: a
write reaches every copy or none).

Keeps true: inside `deferred_interrupts()`, a SIGINT (Ctrl-C) or SIGTERM that arrives is held and
takes effect when the block ends — as the KeyboardInterrupt or termination it would have been —
so a replicated write that has begun (A, C and its entry; or A, C and B) is finished first. In a
thread other than the main one (where Python cannot handle signals) it changes nothing. Blocks
nest: a signal held by an inner block is passed on to the outer one. Inside
`terminate_as_interrupt()` SIGTERM unwinds as Ctrl-C does, so a long command can say where it stopped.
"""

from __future__ import annotations

import _signal
import contextlib
import os
import signal
import threading
from collections.abc import Iterator
from types import FrameType

HELD = (int(signal.SIGINT), int(signal.SIGTERM))


_depth = 0  # deferred_interrupts blocks open in the main thread: an inner one needs nothing of its own
_foreign = False  # set by `signals_belong_to_library`: never swap handlers in this process


def signals_belong_to_library() -> None:
    """This process's SIGINT/SIGTERM handlers were installed by a C library Python does not see
    (libfuse: they end its loop between requests, so no request is cut in two). From now on
    `deferred_interrupts` leaves them alone: swapping them back would install what Python believes
    is there (the default action) over the library's."""
    global _foreign
    _foreign = True


class deferred_interrupts:  # noqa: N801 - used as a function: `with deferred_interrupts():`
    """Hold SIGINT and SIGTERM until the block ends, then deliver them (the handlers are swapped
    with `_signal`, which skips the enum conversions of `signal.signal`, and this is a plain class,
    not a generator: it is on every write)."""

    __slots__ = ("pending", "previous")

    def __init__(self) -> None:
        self.pending: list[int] = []
        self.previous: dict[int, object] | None = None

    def _hold(self, signum: int, frame: FrameType | None) -> None:
        self.pending.append(signum)

    def __enter__(self) -> None:
        global _depth
        if _depth or _foreign or threading.current_thread() is not threading.main_thread():
            return
        self.previous = {sig: _signal.signal(sig, self._hold) for sig in HELD}
        _depth += 1

    def __exit__(self, *exc: object) -> None:
        global _depth
        previous = self.previous
        if previous is None:
            return
        _depth -= 1
        for sig, handler in previous.items():
            _signal.signal(sig, handler)
        for sig in dict.fromkeys(self.pending):
            deliver(sig, previous[sig])


def deliver(sig: int, handler: signal.Handlers | int | object) -> None:
    """What `sig` would have done under `handler` had it not been held."""
    if callable(handler):
        handler(sig, None)  # Python's SIGINT handler raises KeyboardInterrupt here
    elif handler == signal.SIG_DFL:
        os.kill(os.getpid(), sig)  # the default action (termination), now that it is restored


class Terminated(KeyboardInterrupt):
    """SIGTERM, turned into the same unwinding as Ctrl-C inside `terminate_as_interrupt`."""


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """Inside the block SIGTERM unwinds like Ctrl-C (`Terminated`, a KeyboardInterrupt), so a long
    command stops at a consistent point and says so instead of dying mid-step."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: FrameType | None) -> None:
        raise Terminated("terminated (SIGTERM)")

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
