"""Shipping that keeps going: `vstore ship LAB --follow` (continuous, the patent's way) and
`--period S` (the prior art of [0006]-[0013]: the Async site is updated once per period).

Keeps true: the follower wakes when the spool changes (watchdog events on the spool directory, no
busy polling) or, in periodic mode, only once per period; it opens the lab only for the moment of
one round of shipping, so writers are not blocked between rounds; it stops after `duration`
seconds or on Ctrl-C, and a round that fails (the Async site unreachable) is reported, never
silently retried forever without a word.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from pathlib import Path

from vstore.lab.sitedir import SPOOL_DIR
from vstore.lab.system import System
from vstore.lab.watch import watching
from vstore.replication.shipping import ShipReport


def ship_round(lab: Path) -> ShipReport:
    with System(lab) as system:
        try:
            return system.shipper().ship()
        finally:
            system.save()


def follow(lab: Path, *, period: float | None = None, duration: float | None = None,
           on_round: Callable[[ShipReport], None] = lambda r: None, idle_wake: float = 1.0) -> int:
    """Ship rounds until `duration` passes; returns the number of entries shipped."""
    with System(lab) as system:
        spool = system.site_dir(system.active_site) / SPOOL_DIR
    wake = threading.Event()
    deadline = None if duration is None else time.monotonic() + duration
    shipped = 0
    with watching(spool, wake.set) if period is None else contextlib.nullcontext():
        while deadline is None or time.monotonic() < deadline:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if period is None:
                wake.wait(idle_wake if left is None else min(idle_wake, left))
                wake.clear()
            else:
                time.sleep(period if left is None else min(period, left))
                if deadline is not None and time.monotonic() >= deadline and left is not None and left < period:
                    break
            report = ship_round(lab)
            shipped += report.entries
            on_round(report)
    return shipped
