"""Running a few blocking steps at once: the syncs of one flush (DESIGN "Block device": a flush is
durable on every copy it covers, so its syncs of A, C and the spool are independent).

Keeps true: `run_together(f, g, ...)` returns only when every call has returned, runs them
concurrently (the first in the calling thread, the others on a small shared pool; an fdatasync
or a network round trip releases the GIL), and raises the first exception any of them raised
after all of them ended, so no step is left running behind the caller's back.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

_POOL = ThreadPoolExecutor(max_workers=8, thread_name_prefix="tricopy-together")


def run_together(*calls: Callable[[], object]) -> None:
    """Run every call at once; wait for all; re-raise the first failure."""
    if len(calls) == 1:
        calls[0]()
        return
    futures = [_POOL.submit(call) for call in calls[1:]]
    failure: BaseException | None = None
    try:
        calls[0]()
    except BaseException as exc:  # the others still run to their end first
        failure = exc
    for future in futures:
        try:
            future.result()
        except BaseException as exc:
            failure = failure or exc
    if failure is not None:
        raise failure
