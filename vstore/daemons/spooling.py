"""The entry spool as the daemon of the site running the application owns it, and the requests of
the shipper process (DESIGN "Daemons": shipping is its own process; SPEC §4 [0044]).

Keeps true:
- The daemon is the only writer of its spool: it appends entries (under the site lock, durable
  before the ack), answers `spool.acked` (the last acknowledged entry: the shipper never sends
  past it; and what the shipper's plan depends on, so that it plans again only when that changed)
  and `spool.plan`, and trims on `spool.confirm` once the Async site has applied a batch, which
  answers as `spool.acked` does (one request per shipping round). Those confirmations are lazy
  (`EntryLog.confirm(lazy=True)`: no sync per round; durable when a segment goes and at a clean
  stop): a position lost in a crash only makes the shipper start again from what the Async site's
  journal applied (`journal.applied`), skipping what it has.
- The shipper's rates kept from `spool.confirm` are what `ShipStats` declares (finite,
  non-negative), so status never shows what a peer made up.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated

import msgspec

from vstore.blocks.errors import TricopyError
from vstore.daemons.processes import RUN_DIR, SHIPPER, running_pid
from vstore.daemons.requests import NoArgs, rpc
from vstore.lab.sitedir import open_spool
from vstore.lab.topology import Topology
from vstore.net import rpc as names
from vstore.replication.network import link_name
from vstore.replication.shipping import DEFAULT_BATCH_ENTRIES
from vstore.replication.spool import EntryLog

Answer = tuple[dict, bytes]
Rate = Annotated[float, msgspec.Meta(ge=0, le=1e15)]


class ShipStats(msgspec.Struct, forbid_unknown_fields=True):
    """The shipper's recent rates (`Meter.rates`)."""

    entries_per_s: Rate = 0.0
    bytes_per_s: Rate = 0.0


class SpoolWait(msgspec.Struct, forbid_unknown_fields=True):
    """`spool.acked` (and `spool.confirm`) as a long poll: when `wait` > 0, the answer comes once an
    entry after `after` is acknowledged (or `wait` seconds passed), and then, while fewer than
    `GATHER_ENTRIES` wait, no sooner than `gather` seconds after the request came: what the
    shipper's round waits for, with no request per write."""

    after: Annotated[int, msgspec.Meta(ge=0)] = 0
    wait: Annotated[float, msgspec.Meta(ge=0, le=10)] = 0.0
    gather: Annotated[float, msgspec.Meta(ge=0, le=1)] = 0.0


class SpoolConfirm(SpoolWait, forbid_unknown_fields=True, kw_only=True):
    seq: Annotated[int, msgspec.Meta(ge=0)]
    stats: ShipStats = msgspec.field(default_factory=ShipStats)


GATHER_ENTRIES = 64  # entries waiting that end a long poll's gathering at once
WAITED = (names.SPOOL_ACKED, names.SPOOL_CONFIRM)  # the requests that may be long polls


class SpoolRequests:
    """The spool and the shipper's requests (a mixin of `SiteDaemon`, which sets what is declared
    here and provides `state()` and `system()`)."""

    lab: Path
    site: str
    site_dir: Path
    topo: Topology
    lock: threading.RLock
    entry_log: EntryLog | None
    ship_stats: dict

    def spool(self) -> EntryLog | None:
        """The entry log, open while this site runs the application (else None)."""
        state = self.state()
        host = (state or {}).get("host") or {}
        if state and state.get("role") == "primary" and host:
            if self.entry_log is None:
                self.entry_log = open_spool(self.site_dir, self.topo, host)
        return self.entry_log

    def async_group_duplex(self, state: dict) -> bool:
        """Every async pair from this site is Duplex (read from the local state file)."""
        pairs = [doc["pair"] for doc in state.get("pairs", {}).values()]
        mine = [p for p in pairs if p.get("kind") == "async" and str(p.get("source", "")).startswith(f"{self.site}:")]
        return bool(mine) and all(p.get("state") == "Duplex" for p in mine)

    def spool_acked(self) -> dict:
        """What the shipper may send: entries confirmed_seq+1 .. acked (all acknowledged: appends
        happen under the site lock, which this answer also holds)."""
        state = self.state() or {}
        spool = self.spool()
        if spool is None:
            return {"active": False}
        faults = self.lab / "faults.json"  # `vstore fail/heal` change it: the shipper re-plans
        acked = spool.next_seq - 1
        if spool.damage is not None:  # never past damaged entries: the group is Suspended for them
            acked = min(acked, spool.damage.first_seq - 1)
        return {"active": True, "acked": acked, "confirmed": spool.confirmed_seq,
                "duplex": self.async_group_duplex(state) and spool.damage is None,  # damage: the daemon resyncs
                "version": faults.stat().st_mtime_ns if faults.is_file() else 0, "plan": self.async_pairs(state)}

    def async_pairs(self, state: dict) -> list[list]:
        """[source, target, state] of each async pair from this site: when it changes, so may the
        shipper's plan (where to, which targets)."""
        pairs = [doc["pair"] for doc in state.get("pairs", {}).values()]
        return sorted([str(p.get("source")), str(p.get("target")), str(p.get("state"))] for p in pairs
                      if p.get("kind") == "async" and str(p.get("source", "")).startswith(f"{self.site}:"))

    @rpc(names.SPOOL_ACKED, SpoolWait, inline=True)
    def spool_acked_request(self, args: SpoolWait, data: bytes) -> Answer:
        return self.spool_acked(), b""

    async def long_poll(self, answer: Answer, args: dict, again: Callable[[], Awaitable[Answer]],
                        appended: asyncio.Event) -> Answer:
        """A `spool.acked`/`spool.confirm` answer held as `SpoolWait` says (its arguments were
        checked by the request itself); `again` answers `spool.acked` anew, `appended` is set
        after every request that may have appended. Holds no lock while it waits."""
        wait = float(args.get("wait", 0))
        if wait <= 0 or not answer[0].get("active"):
            return answer
        loop = asyncio.get_running_loop()
        start = loop.time()
        after, gather = int(args.get("after", 0)), float(args.get("gather", 0))
        while answer[0].get("active") and answer[0]["acked"] <= after:
            appended.clear()  # before looking again: a write answered from now on wakes this poll
            answer = await again()
            remaining = start + wait - loop.time()
            if not (answer[0].get("active") and answer[0]["acked"] <= after) or remaining <= 0:
                break
            try:
                await asyncio.wait_for(appended.wait(), remaining)
            except TimeoutError:
                return await again()
        rest = start + gather - loop.time()
        if answer[0].get("active") and 0 < answer[0]["acked"] - after < GATHER_ENTRIES and rest > 0:
            await asyncio.sleep(rest)  # let the writes of the next moments join the shipper's round
            answer = await again()
        return answer

    @rpc(names.SPOOL_PLAN, NoArgs)
    def spool_plan(self, args: NoArgs, data: bytes) -> Answer:
        """Where and how to ship: the Async site's address (through a fault proxy if the link has
        one), which volume each entry volume id lands on, batching, and whether a fault blocks it."""
        answer = self.spool_acked()
        if not answer["active"]:
            return answer, b""
        with self.system() as system:
            target = system.async_target_site()
            faults = system.faults
            blocked = None
            if target in faults.sites_down:
                blocked = f"site {target} is down"
            elif link_name(self.site, target) in faults.links_down:
                blocked = f"link {link_name(self.site, target)} is down"
            elif failed := sorted(f"{target}:{v}" for v in system.receive_targets(target).values()
                                  if f"{target}:{v}" in faults.volumes_failed):
                blocked = f"volume {failed[0]} has failed"
            spec = self.topo.peer_address(self.site, target)
            return {**answer, "target_site": target, "address": [spec.host, spec.port],
                    "targets": {str(k): v for k, v in system.receive_targets(target).items()},
                    "coalescing": self.topo.coalesce, "batch_entries": DEFAULT_BATCH_ENTRIES,
                    "blocked": blocked}, b""

    @rpc(names.SPOOL_CONFIRM, SpoolConfirm, inline=True)
    def spool_confirm(self, args: SpoolConfirm, data: bytes) -> Answer:
        """The Async site applied entries up to `seq`: trim the spool there; keep the shipper's rates.
        The answer is `spool.acked`'s, after the trim: what the shipper may send next."""
        spool = self.spool()
        if spool is None:
            raise TricopyError(f"site {self.site} does not run the application: no spool to confirm")
        if spool.confirmed_seq < args.seq < spool.next_seq:
            spool.confirm(args.seq, lazy=True)  # durable as a segment goes, and at a clean stop
        self.ship_stats = {**msgspec.structs.asdict(args.stats), "confirmed_seq": spool.confirmed_seq,
                           "time": time.time()}
        return self.spool_acked(), b""

    def shipping_status(self) -> dict:
        """The shipper process as status shows it: running or not, send rate, last confirmation."""
        pid = running_pid(self.lab, SHIPPER)
        doc: dict = {"process": "running" if pid else "stopped", "pid": pid,
                     "entries_per_s": 0.0, "bytes_per_s": 0.0, "last_confirm_s": None}
        if self.ship_stats:
            doc.update({k: self.ship_stats.get(k, 0.0) for k in ("entries_per_s", "bytes_per_s")})
            doc["last_confirm_s"] = round(time.time() - self.ship_stats["time"], 3)
        return doc

    def with_shipping(self, doc: dict) -> dict:
        """Status and dashboard documents of the site running the application name its shipper."""
        if self.entry_log is not None:
            doc["shipping"] = self.shipping_status()
        return doc

    def wait_drained(self, timeout: float) -> dict:
        """`vstore ship` while a shipper process runs: wait (without the site lock) until it has
        shipped everything acknowledged so far."""
        with self.lock:
            start = self.spool_acked()
        if not start.get("active"):
            raise TricopyError(f"site {self.site} does not run the application: nothing to ship")
        deadline = time.monotonic() + timeout
        while True:
            with self.lock:
                now = self.spool_acked()
            if now["confirmed"] >= start["acked"] or time.monotonic() >= deadline:
                break
            time.sleep(0.02)
        error = None if now["confirmed"] >= start["acked"] else (
            f"the shipper process has not shipped entries up to {start['acked']} within {timeout:.0f}s "
            f"(confirmed {now['confirmed']}); see {self.lab / RUN_DIR}/{SHIPPER}.log")
        return {"entries": now["confirmed"] - start["confirmed"], "batches": None, "error": error,
                "blocks_sent": None, "blocks_written": None, "resynced_blocks": 0}
