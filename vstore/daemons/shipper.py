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
from typing import Any

from vstore.blocks.errors import FormatError, TricopyError
from vstore.daemons.processes import SHIPPER, running_pid
from vstore.lab.topology import SITE_NAMES, load_topology
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
from vstore.replication.entries import (
    ENTRY_HEADER_SIZE,
    Entry,
    decode_entry,
    encode_batch_raw,
    entry_size,
    parse_entry_header,
    segment_files,
    segment_name,
)
from vstore.replication.shipping import coalesce

log = logging.getLogger("vstore.shipper")

READ_BYTES = 16 << 20  # entries read (and pipelined) per round
WINDOW = 8  # batches in flight
PLAN_EVERY_S = 5.0


class SpoolReader:
    """Reads entries from the spool's segment files, read-only, following the appending daemon."""

    def __init__(self, spool_dir: Path) -> None:
        self.spool_dir = spool_dir
        self._fd: int | None = None
        self._first = 0  # first seq of the open segment
        self._offset = 0
        self._next = 0  # the seq expected at _offset

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._next = 0

    def _open(self, first_seq: int, path: Path) -> None:
        self.close()
        self._fd = os.open(path, os.O_RDONLY)
        self._first, self._offset, self._next = first_seq, 0, first_seq

    def _seek(self, seq: int) -> None:
        """Position at entry `seq` (scanning its segment's headers)."""
        candidates = [(first, path) for first, path in segment_files(self.spool_dir) if first <= seq]
        if not candidates:
            raise FormatError(f"entry {seq} is not in the spool {self.spool_dir} (already trimmed?)")
        self._open(*candidates[-1])
        while self._next < seq:
            if self._skip_one() is None:
                raise FormatError(f"entry {seq} is not in the spool {self.spool_dir}")

    def _header_at(self) -> Any | None:
        assert self._fd is not None
        raw = os.pread(self._fd, ENTRY_HEADER_SIZE, self._offset)
        if len(raw) < ENTRY_HEADER_SIZE:
            return None
        return parse_entry_header(raw, f"{self.spool_dir} segment {self._first} offset {self._offset}")

    def _skip_one(self) -> int | None:
        header = self._header_at()
        if header is None:
            return None
        self._offset += entry_size(header.block_count, header.block_size)
        self._next += 1
        return header.seq

    def _read_one(self) -> tuple[Entry, bytes] | None:
        assert self._fd is not None
        header = self._header_at()
        if header is None:
            return None
        length = entry_size(header.block_count, header.block_size)
        raw = os.pread(self._fd, length, self._offset)
        entry, _ = decode_entry(raw)  # checks the entry's CRC: a damaged spool is never shipped
        if entry.seq != self._next:
            raise FormatError(f"{self.spool_dir}: entry {entry.seq} found where {self._next} was expected")
        self._offset += length
        self._next += 1
        return entry, raw

    def read(self, after: int, upto: int, max_bytes: int = READ_BYTES) -> list[tuple[Entry, bytes]]:
        """Entries after+1 .. upto (at most about `max_bytes`), in order, each with its encoded bytes."""
        out: list[tuple[Entry, bytes]] = []
        size = 0
        if after >= upto:
            return out
        if self._fd is None or self._next != after + 1:
            self._seek(after + 1)
        while self._next <= upto and size < max_bytes:
            found = self._read_one()
            if found is None:  # the rest is in the next segment
                path = self.spool_dir / segment_name(self._next)
                if not path.is_file():
                    raise FormatError(f"{self.spool_dir}: acknowledged entry {self._next} is in no segment")
                self._open(self._next, path)
                continue
            out.append(found)
            size += len(found[1])
        return out


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


class Shipper:
    """One site's shipping process."""

    def __init__(self, lab: Path, site: str) -> None:
        if site not in SITE_NAMES:
            raise TricopyError(f"unknown site {site!r}; use one of {', '.join(SITE_NAMES)}")
        self.lab, self.site = lab, site
        self.topo = load_topology(lab)
        self.key = load_key(lab / self.topo.key_file)
        self.tls = client_context(lab, self.topo.tls)
        self.spool_dir = lab / site / "spool"
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
        from watchdog.events import FileSystemEventHandler
        from watchdog.observers import Observer

        loop = asyncio.get_running_loop()
        wake = self.wake

        class Wake(FileSystemEventHandler):
            def on_any_event(self, event: Any) -> None:
                loop.call_soon_threadsafe(wake.set)

        other = running_pid(self.lab, SHIPPER)
        if other and other != os.getpid():
            raise TricopyError(f"the shipper process of {self.lab} is already running (pid {other})")
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        observer = Observer()
        observer.schedule(Wake(), str(self.spool_dir), recursive=False)
        observer.start()
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
            observer.stop()
            observer.join(2)
