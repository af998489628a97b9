"""The shipping process: `vstore shipper --site NAME --config LAB/topology.toml` (SPEC §4
[0044]-[0045], DESIGN invariant 2).

Keeps true:
- It sends only acknowledged entries, in sequence order: before each read it asks the site's
  daemon for `spool.acked` (the last entry appended under the site lock, durable before its ack)
  and reads the spool's segment files read-only up to that entry (`SpoolReader`). It never writes
  the spool; the daemon trims it on `spool.confirm`.
- A batch is confirmed to the daemon only after the Async site answered that it stored, applied
  and recorded it (`journal.receive`). Batches go out with a bounded window in flight on one
  connection, which the Async site serves in order.
- After any disconnect or restart of either side it starts a new session from the Async site's
  applied sequence (`journal.applied`, after finishing a batch stored before a crash): no gap, no
  entry applied twice (the receive journal refuses both, so a stale sender cannot corrupt D).
- It is woken by watchdog events on the spool directory (new or grown segment files) and once a
  second otherwise; no busy polling. An unreachable Async site leaves entries waiting; pair-state
  work (a Suspended group's resync, a link failed on purpose) is done by the daemon, asked with
  `ship {"in_process": true}`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path

from vstore.blocks.codec import make_dir
from vstore.blocks.errors import TricopyError
from vstore.daemons.processes import SHIPPER, running_pid
from vstore.lab.sitedir import SPOOL_DIR
from vstore.lab.topology import SITE_NAMES, load_topology
from vstore.lab.watch import watching
from vstore.net.client import AsyncClient
from vstore.net.keys import load_key
from vstore.net.rpc import (
    JOURNAL_APPLIED,
    JOURNAL_FINISH,
    JOURNAL_RECEIVE,
    SHIP,
    SPOOL_ACKED,
    SPOOL_CONFIRM,
    SPOOL_PLAN,
)
from vstore.net.tls import client_context
from vstore.net.wire import ConnectionFailed, RemoteError
from vstore.replication.entries import Entry, encode_batch_raw
from vstore.replication.segments import SpoolReader
from vstore.replication.shipping import coalesce

log = logging.getLogger("vstore.shipper")

WINDOW = 8  # batches in flight
PLAN_EVERY_S = 5.0


class RateMeter:
    """Entries and bytes sent per second over the last few seconds."""

    def __init__(self, span_s: float = 5.0) -> None:
        self.span = span_s
        self.samples: deque[tuple[float, int, int]] = deque()

    def add(self, entries: int, nbytes: int) -> None:
        now = time.monotonic()
        self.samples.append((now, entries, nbytes))
        while self.samples and self.samples[0][0] < now - self.span:
            self.samples.popleft()

    def rates(self) -> dict[str, float]:
        now = time.monotonic()
        recent = [s for s in self.samples if s[0] >= now - self.span]
        if not recent:
            return {"entries_per_s": 0.0, "bytes_per_s": 0.0}
        span = max(now - recent[0][0], 1.0)
        return {"entries_per_s": round(sum(s[1] for s in recent) / span, 1),
                "bytes_per_s": round(sum(s[2] for s in recent) / span, 1)}


class ShipperDaemon:
    """The shipping process of the site running the application (`vstore shipper`)."""

    def __init__(self, lab: Path, site: str) -> None:
        if site not in SITE_NAMES:
            raise TricopyError(f"unknown site {site!r}; use one of {', '.join(SITE_NAMES)}")
        self.lab, self.site = lab, site
        self.topo = load_topology(lab)
        self.key = load_key(lab / self.topo.key_file)
        self.tls = client_context(lab, self.topo.tls)
        self.spool_dir = lab / site / SPOOL_DIR
        self.reader = SpoolReader(self.spool_dir)
        self.meter = RateMeter()
        self.wake = asyncio.Event()
        self.stopping = False

    # -- one session: connected to the daemon and to the Async site -----------------------------
    async def session(self, daemon: AsyncClient) -> None:
        plan = (await daemon.call(SPOOL_PLAN))[0]
        if not plan.get("active"):
            log.info("site %s does not run the application; nothing to ship", self.site)
            await self.sleep(5.0)
            return
        if not plan["duplex"] or plan["blocked"]:
            await self.delegate(daemon, plan)
            return
        host, port = plan["address"]
        remote = await AsyncClient.connect(host, port, self.key, window=WINDOW, timeout=30.0, ssl_context=self.tls)
        try:
            await self.stream(daemon, remote, plan)
        finally:
            await remote.close()

    async def delegate(self, daemon: AsyncClient, plan: dict) -> None:
        """Suspended async group or a failed link: the daemon runs the in-process shipper (resync
        by Duplex-Pending, or Suspend with positions recorded)."""
        answer = (await daemon.call(SHIP, {"in_process": True}, timeout=600.0))[0]
        if answer.get("error"):
            log.warning("shipping to %s waits: %s", plan.get("target_site"), answer["error"])
            await self.sleep(1.0)

    async def stream(self, daemon: AsyncClient, remote: AsyncClient, plan: dict) -> None:
        targets = plan["targets"]
        await remote.call(JOURNAL_FINISH, {"targets": targets})
        applied = int((await remote.call(JOURNAL_APPLIED))[0]["applied_seq"])
        acked = (await daemon.call(SPOOL_ACKED))[0]
        if acked["confirmed"] < applied <= acked["acked"]:
            await daemon.call(SPOOL_CONFIRM, {"seq": applied, "stats": self.meter.rates()})
        sent = max(applied, acked["confirmed"])
        log.info("shipping to %s from entry %d (the Async site applied %d)", plan["target_site"], sent + 1, applied)
        planned_at = time.monotonic()
        while not self.stopping:
            acked = (await daemon.call(SPOOL_ACKED))[0]
            if not acked.get("active") or not acked["duplex"] or acked["version"] != plan["version"] \
                    or time.monotonic() - planned_at > PLAN_EVERY_S:
                return  # pair states or faults changed, or time to re-plan: a new session
            if acked["confirmed"] > sent:
                sent = acked["confirmed"]  # shipped by the daemon itself meanwhile
            entries = self.reader.read(sent, acked["acked"])
            if not entries:
                await self.sleep(1.0)
                continue
            await self.send(remote, entries, plan)
            sent = entries[-1][0].seq
            self.meter.add(len(entries), sum(len(raw) for _, raw in entries))
            await daemon.call(SPOOL_CONFIRM, {"seq": sent, "stats": self.meter.rates()})

    async def send(self, remote: AsyncClient, entries: list[tuple[Entry, bytes]], plan: dict) -> None:
        """Batches of `batch_entries`, built from the entries' bytes as the spool holds them."""
        step = int(plan["batch_entries"])

        def calls() -> Iterator[tuple[str, dict, bytes]]:  # built as the window lets them go
            for start in range(0, len(entries), step):
                batch = entries[start:start + step]
                first, last = batch[0][0].seq, batch[-1][0].seq
                raw = dict((e.seq, data) for e, data in batch)
                kept = coalesce([e for e, _ in batch]) if plan["coalescing"] else [e for e, _ in batch]
                data = encode_batch_raw([raw[e.seq] for e in kept], first, last, coalesced=len(kept) != len(batch))
                yield JOURNAL_RECEIVE, {"first_seq": first, "last_seq": last, "targets": plan["targets"]}, data

        await remote.call_many(calls())

    async def sleep(self, seconds: float) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.wake.wait(), seconds)
        self.wake.clear()

    # -- running --------------------------------------------------------------------------------
    async def run(self, ready: Path | None = None) -> None:
        loop = asyncio.get_running_loop()
        other = running_pid(self.lab, SHIPPER)
        if other and other != os.getpid():
            raise TricopyError(f"the shipper process of {self.lab} is already running (pid {other})")
        make_dir(self.spool_dir, parents=True, exist_ok=True)
        with watching(self.spool_dir, lambda: loop.call_soon_threadsafe(self.wake.set)):
            await self._serve(loop, ready)

    async def _serve(self, loop: asyncio.AbstractEventLoop, ready: Path | None) -> None:
        main = asyncio.current_task()

        def stop() -> None:
            self.stopping = True
            if main is not None:
                main.cancel()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop)
        if ready is not None:
            ready.write_text(str(os.getpid()))
        spec = self.topo.sites[self.site]
        log.info("shipper of site %s following %s", self.site, self.spool_dir)
        backoff = 0.1
        try:
            while not self.stopping:
                try:
                    async with await AsyncClient.connect(spec.host, spec.port, self.key, timeout=30.0,
                                                         ssl_context=self.tls) as daemon:
                        while not self.stopping:
                            await self.session(daemon)
                            backoff = 0.1
                except (ConnectionFailed, RemoteError, TricopyError, OSError) as exc:
                    self.reader.close()
                    log.warning("shipper: %s (entries keep waiting; retrying)", exc)
                    await self.sleep(backoff)
                    backoff = min(backoff * 2, 1.0)
        except asyncio.CancelledError:
            pass
        finally:
            self.reader.close()
