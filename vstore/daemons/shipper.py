"""The shipping process: `vstore shipper --site NAME --config LAB/topology.toml` (SPEC §4
[0044]-[0045], DESIGN invariant 2).

Keeps true:
- It sends only acknowledged entries, in sequence order: before each read it asks the site's
  daemon for `spool.acked` (the last entry appended under the site lock, durable before its ack)
  and reads the spool's segment files read-only up to that entry (`SpoolReader`). It never writes
  the spool; the daemon trims it on `spool.confirm`.
- A batch is confirmed to the daemon only after the Async site answered that it stored, applied
  and recorded it (`journal.receive`). Batches go out with a bounded window in flight on one
  connection, which the Async site serves in order; each is sent as the spool's own bytes (views
  of one read, `socket.sendmsg` of header, entries and MAC: nothing joined). Confirmations are
  batched: one `spool.confirm` per round (up to `ROUND_BYTES` of entries), whose answer also
  says what is acknowledged next, so a busy round costs the daemon one request.
- A small round (fewer than `GATHER_ENTRIES` entries) runs on the event loop itself; a larger
  one in a worker thread (pread, crc32, GCM and sendmsg release the GIL).
- The connection to the Async site is kept from round to round and session to session; the
  shipper plans again (`spool.plan`) only when the daemon's answer says the plan changed (pair
  states, faults, the targets), and reconnects only when the plan's address did or the
  connection broke.
- After any disconnect or restart of either side it starts a new session from the Async site's
  applied sequence (`journal.applied`, after finishing a batch stored before a crash): no gap, no
  entry applied twice (the receive journal refuses both, so a stale sender cannot corrupt D).
- It waits for new entries in the daemon: `spool.acked` and `spool.confirm` are long polls
  (`SpoolWait`), answered once an entry past what was sent is acknowledged, or after `POLL_S`
  (when pair states and faults are looked at again); no busy polling, nothing per write. Rounds
  are grouped: while fewer than `GATHER_ENTRIES` wait, a round starts no sooner than `GATHER_S`
  after the previous one started, so at a steady write rate a round carries the writes of
  `GATHER_S` (one daemon request, one batch, one journal commit at the Async site for all of
  them) and an entry waits at most `GATHER_S` plus one round before it is sent; a write after a
  quiet spell goes at once. An unreachable Async site leaves entries waiting; pair-state
  work (a Suspended group's resync, a link failed on purpose) is done by the daemon, asked with
  `ship {"in_process": true}`.
"""

from __future__ import annotations

import asyncio
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
from vstore.net.client import AsyncClient, Client
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
from vstore.replication.entries import Entry, batch_parts
from vstore.replication.segments import SpoolReader
from vstore.replication.shipping import coalesce

log = logging.getLogger("vstore.shipper")

WINDOW = 8  # batches in flight
READ_STEP = 4 << 20  # what one spool read returns at most (about): a batch of 64 KiB entries
ROUND_BYTES = 64 << 20  # shipped between two confirmations at most (about)
GATHER_S = 0.05  # a round starts at most this long after the one before when few entries wait (the lag bound)
GATHER_ENTRIES = 64  # entries waiting that start a round at once (the daemon's `spooling.GATHER_ENTRIES`)
POLL_S = 1.0  # how long the daemon holds a long poll with nothing new (plan changes are seen this often)


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
        self.stopping = False
        self.remote: Client | None = None
        self.remote_address: tuple | None = None

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
        remote = await self.connect_remote(tuple(plan["address"]))
        try:
            await self.stream(daemon, remote, plan)
        except BaseException:
            self.drop_remote()
            raise

    async def connect_remote(self, address: tuple[str, int]) -> Client:
        """The connection to the Async site, kept while its address stays the same."""
        if self.remote is not None and self.remote_address != address:
            self.drop_remote()
        if self.remote is None:
            host, port = address
            self.remote = await asyncio.to_thread(Client, host, port, self.key, self.tls, 30.0)
            self.remote_address = address
        return self.remote

    def drop_remote(self) -> None:
        if self.remote is not None:
            self.remote.close()
        self.remote, self.remote_address = None, None

    async def delegate(self, daemon: AsyncClient, plan: dict) -> None:
        """Suspended async group or a failed link: the daemon runs the in-process shipper (resync
        by Duplex-Pending, or Suspend with positions recorded)."""
        self.drop_remote()
        answer = (await daemon.call(SHIP, {"in_process": True}, timeout=600.0))[0]
        if answer.get("error"):
            log.warning("shipping to %s waits: %s", plan.get("target_site"), answer["error"])
            await self.sleep(1.0)

    async def stream(self, daemon: AsyncClient, remote: Client, plan: dict) -> None:
        targets = plan["targets"]
        await asyncio.to_thread(remote.call, JOURNAL_FINISH, {"targets": targets})
        applied = int((await asyncio.to_thread(remote.call, JOURNAL_APPLIED))[0]["applied_seq"])
        acked = (await daemon.call(SPOOL_ACKED))[0]
        if acked["confirmed"] < applied <= acked["acked"]:
            acked = (await daemon.call(SPOOL_CONFIRM, {"seq": applied, "stats": self.meter.rates()}))[0]
        sent = max(applied, acked["confirmed"])
        log.info("shipping to %s from entry %d (the Async site applied %d)", plan["target_site"], sent + 1, applied)
        started = 0.0  # when the last round started
        while not self.stopping:
            if not acked.get("active") or not acked["duplex"] or acked["version"] != plan["version"] \
                    or acked.get("plan") != plan.get("plan"):
                return  # pair states, faults or targets changed: plan again
            if acked["confirmed"] > sent:
                sent = acked["confirmed"]  # shipped by the daemon itself meanwhile
            waiting = acked["acked"] - sent
            if waiting <= 0 or (waiting < GATHER_ENTRIES and started + GATHER_S > time.monotonic()):
                acked = (await daemon.call(SPOOL_ACKED, self.poll(sent, started)))[0]
                continue
            started = time.monotonic()
            if waiting < GATHER_ENTRIES:  # a small round: no hand-off to a worker thread
                last, count, nbytes = self.ship_round(remote, sent, acked["acked"], plan)
            else:
                last, count, nbytes = await asyncio.to_thread(self.ship_round, remote, sent, acked["acked"], plan)
            if not count:
                await self.sleep(0.1)
                acked = (await daemon.call(SPOOL_ACKED))[0]
                continue
            sent = last
            self.meter.add(count, nbytes)
            acked = (await daemon.call(SPOOL_CONFIRM, {"seq": sent, "stats": self.meter.rates(),
                                                       **self.poll(sent, started)}))[0]

    @staticmethod
    def poll(after: int, started: float) -> dict:
        """The long poll of the daemon's answer: once an entry after `after` is acknowledged, and
        not before `GATHER_S` after the round that `started` (unless many wait)."""
        gather = min(1.0, max(0.0, started + GATHER_S - time.monotonic()))
        return {"after": after, "wait": POLL_S, "gather": round(gather, 6)}

    def ship_round(self, remote: Client, after: int, upto: int, plan: dict) -> tuple[int, int, int]:
        """Ship entries after+1..upto (at most about `ROUND_BYTES`); (last entry, entries, bytes).
        Each batch is read just before it is sent, so reading overlaps the batches in flight."""
        step = int(plan["batch_entries"])
        done = [after, 0, 0]

        def calls() -> Iterator[tuple[str, dict, list]]:  # built as the window lets them go
            while done[0] < upto and done[2] < ROUND_BYTES:
                entries = self.reader.read(done[0], upto, max_bytes=READ_STEP)
                if not entries:
                    return
                for start in range(0, len(entries), step):
                    yield self.batch_call(entries[start:start + step], plan)
                done[0] = entries[-1][0].seq
                done[1] += len(entries)
                done[2] += sum(len(raw) for _, raw in entries)

        remote.call_many(calls(), WINDOW)
        return done[0], done[1], done[2]

    @staticmethod
    def batch_call(batch: list[tuple[Entry, bytes]], plan: dict) -> tuple[str, dict, list]:
        """One `journal.receive` of the entries' bytes as the spool holds them (views, not copies)."""
        first, last = batch[0][0].seq, batch[-1][0].seq
        kept = coalesce([e for e, _ in batch]) if plan["coalescing"] else [e for e, _ in batch]
        if len(kept) == len(batch):
            raws = [raw for _, raw in batch]
        else:
            by_seq = {e.seq: raw for e, raw in batch}
            raws = [by_seq[e.seq] for e in kept]
        data = batch_parts(raws, first, last, coalesced=len(kept) != len(batch))
        return JOURNAL_RECEIVE, {"first_seq": first, "last_seq": last, "targets": plan["targets"]}, data

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    # -- running --------------------------------------------------------------------------------
    async def run(self, ready: Path | None = None) -> None:
        loop = asyncio.get_running_loop()
        other = running_pid(self.lab, SHIPPER)
        if other and other != os.getpid():
            raise TricopyError(f"the shipper process of {self.lab} is already running (pid {other})")
        make_dir(self.spool_dir, parents=True, exist_ok=True)
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
                    self.drop_remote()
                    log.warning("shipper: %s (entries keep waiting; retrying)", exc)
                    await self.sleep(backoff)
                    backoff = min(backoff * 2, 1.0)
        except asyncio.CancelledError:
            pass
        finally:
            self.reader.close()
            self.drop_remote()
