"""Site daemons: `vstore serve --site NAME --config LAB/topology.toml` (DESIGN "Process model",
"Sites and links"); starting and stopping them (`vstore lab up|down`) is vstore/daemons/processes.py.

Keeps true:
- A daemon serves only its own site's directory: its volumes, its `state.json`, its receive
  journal, and (when its host runs the application) its entry spool. Everything about another site
  goes over the authenticated RPC of `vstore.net` to that site's daemon.
- Requests are dispatched through one table keyed by the method names of `vstore.net.rpc` (the
  `@rpc(NAME)` handlers below); a name not in it is refused with "unknown request 'NAME'".
- One request at a time touches the site (a lock serialises request handlers), so writes to the
  consistency group are sequenced in one place. A coordinating request (an application write,
  status, ship) works on a `System` with the other sites reached through `vstore.net.remote`, and
  saves what changed before answering; the `System` is kept between requests and reloaded from
  every site when a peer did not answer, a request failed, or faults.json changed.
- The receive journal and the spool are opened once, on first use: while the daemon runs it is the
  only writer of its site's directory (procedures run with the daemons stopped).
- Before an application write its range goes into the write-intent record (vstore/daemons/intent.py);
  a daemon restarted after a kill re-drives it, so that write ends on every copy or on none.
- Shipping is its own process (`vstore shipper`, vstore/daemons/shipper.py), started by `lab up` next to
  the daemon of the site running the application. That daemon owns the spool: it appends entries
  (under the site lock, durable before the ack), answers `spool.acked` (the last acknowledged
  entry: the shipper never sends past it) and `spool.plan`, and trims on `spool.confirm` once the
  Async site has applied a batch. Pair-state work (a Suspended async group's Duplex-Pending
  resync) stays in this daemon: the shipper asks for it with `ship {"in_process": true}`.
- The key file must be private (mode 0600) or the daemon refuses to start.
- While it runs, a daemon holds the lab's daemons' claim (`daemons_claim`, shared with the lab's other
  daemons): it does not start while another process has the lab open (a mount of lab:LAB with the
  daemons down, a command), and no process opens the lab in-process while it serves.
"""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from vstore.blocks.codec import load_json, save_json_atomic
from vstore.blocks.device import ImageDevice
from vstore.blocks.errors import FormatError, TricopyError
from vstore.blocks.holders import acting_as
from vstore.daemons.intent import WriteIntent
from vstore.daemons.processes import RUN_DIR, SHIPPER, daemons_claim, running_pid
from vstore.lab.sitedir import RECV_DIR, open_journal, open_spool
from vstore.lab.system import System
from vstore.lab.topology import SITE_NAMES, load_topology
from vstore.net import rpc as names
from vstore.net.client import Peer
from vstore.net.keys import load_key
from vstore.net.rpc import HandlerTable
from vstore.net.server import serve
from vstore.net.tls import contexts as tls_contexts
from vstore.net.wire import ConnectionFailed
from vstore.procedures.reactions import open_system
from vstore.procedures.setup import resync_all
from vstore.replication.journal import ReceiveJournal, Receiver
from vstore.replication.network import link_name
from vstore.replication.shipping import DEFAULT_BATCH_ENTRIES
from vstore.replication.spool import EntryLog
from vstore.reports import snapshot_of, status_document, verify

log = logging.getLogger("vstore.daemon")
Answer = tuple[dict, bytes]
# A handler runs as (daemon, args, data), or as (daemon, system, args, data) when `coordinated` (on
# the lab's `System`); after one that `saves`, the System is saved, even when the request failed.
HANDLERS = HandlerTable()
rpc = HANDLERS.handler


class SiteDaemon:
    """The daemon of one site: its request handlers (`@rpc`), start-up recovery and serving loop."""

    def __init__(self, lab: Path, site: str) -> None:
        if site not in SITE_NAMES:
            raise TricopyError(f"unknown site {site!r}; use one of {', '.join(SITE_NAMES)}")
        self.lab = lab
        self.site = site
        self.site_dir = lab / site
        self.topo = load_topology(lab)
        self.key = load_key(lab / self.topo.key_file)
        self.server_tls, self.client_tls = tls_contexts(lab, self.topo.tls)
        addresses = {name: self.topo.peer_address(site, name) for name in SITE_NAMES if name != site}  # maybe proxied
        self.peers = {name: Peer(spec.host, spec.port, self.key, timeout=5.0, ssl_context=self.client_tls)
                      for name, spec in addresses.items()}
        self.lock = threading.RLock()
        self.entry_log: EntryLog | None = None
        self._journal: ReceiveJournal | None = None
        self.ship_stats: dict = {}
        self._state_cache: tuple[tuple[int, int, int], dict] | None = None
        self.intent: WriteIntent | None = None
        self._system: System | None = None
        self._system_version = 0
        self.redo_needed = True  # until the record has been checked once, at start-up
        self.devices: dict[str, ImageDevice] = {}

    # -- local primitives -----------------------------------------------------------------------
    def state(self) -> dict | None:
        """This site's state.json, parsed again only when the file changed (it is replaced by rename,
        so a new inode). Read-only: callers never change the returned dict."""
        path = self.site_dir / "state.json"
        try:
            st = path.stat()
        except FileNotFoundError:
            return None
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        if self._state_cache is None or self._state_cache[0] != stamp:
            self._state_cache = (stamp, load_json(path))
        return self._state_cache[1]

    def device(self, volume: str) -> ImageDevice:
        if volume in self.devices:  # volumes change only while the daemons are down (procedures)
            return self.devices[volume]
        state = self.state()
        if state is None or volume not in state.get("volumes", {}):
            raise TricopyError(f"site {self.site} has no volume {volume!r}")
        self.devices[volume] = ImageDevice(self.site_dir / state["volumes"][volume]["file"],
                                           self.topo.block_size, durable=self.topo.durable, shared_claim=True)
        return self.devices[volume]

    def journal(self) -> ReceiveJournal:
        """This site's receive journal, opened on first use (a site that never receives has no recv/)."""
        if self._journal is None:
            self._journal = open_journal(self.site_dir, self.topo)
        return self._journal

    def receiver(self, targets: dict[str, str]) -> Receiver:
        """This site's receiver for entries whose volume ids `targets` maps to its volumes."""
        try:
            by_id = {int(volume_id): volume for volume_id, volume in targets.items()}
        except (TypeError, ValueError):
            raise FormatError(f"volume ids must be integers, got {sorted(targets)}") from None
        return Receiver(self.journal(), self.site, by_id,
                        lambda volume, lba, data: self.device(volume).write(lba, data),
                        lambda volume: self.device(volume).flush())

    # -- coordination ---------------------------------------------------------------------------
    def spool(self) -> EntryLog | None:
        """The entry log, open while this site runs the application (else None)."""
        state = self.state()
        host = (state or {}).get("host") or {}
        if state and state.get("role") == "primary" and host:
            if self.entry_log is None:
                self.entry_log = open_spool(self.site_dir, self.topo, host)
        return self.entry_log

    def system(self) -> contextlib.AbstractContextManager[System]:
        """The lab as this site sees it, for one request. The `System` is kept between requests
        (loading it costs a state request to every peer) while every peer answered when it was
        loaded and faults.json has not changed; a request that fails drops it, so the next one
        reloads every site's state from its owner."""
        faults = self.lab / "faults.json"
        version = faults.stat().st_mtime_ns if faults.is_file() else 0
        cached = self._system
        if cached is None or self._system_version != version or cached.network.unreachable \
                or cached.entry_log_given is not self.spool():
            self.drop_system()
            cached = self._system = open_system(self.lab, lock=False, local=self.site, peers=self.peers,
                                           entry_log=self.spool())
            self._system_version = version
        return self._borrow(cached)

    @contextlib.contextmanager
    def _borrow(self, system: System) -> Iterator[System]:
        try:
            yield system
        except BaseException:
            self.drop_system()
            raise

    def drop_system(self) -> None:
        if self._system is not None:
            self._system.close()
            self._system = None

    def async_group_duplex(self, state: dict) -> bool:
        """Every async pair from this site is Duplex (read from the local state file)."""
        pairs = [doc["pair"] for doc in state.get("pairs", {}).values()]
        mine = [p for p in pairs if p.get("kind") == "async" and str(p.get("source", "")).startswith(f"{self.site}:")]
        return bool(mine) and all(p.get("state") == "Duplex" for p in mine)

    def write_intent(self) -> WriteIntent:
        if self.intent is None:
            self.intent = WriteIntent(self.site_dir, durable=self.topo.durable)
        return self.intent

    def redo_in_doubt_write(self, system: System) -> None:
        """Re-drive the write in progress at an unclean stop (`WriteIntent.redo`; raises while that
        fails). Only at start-up is it in doubt (`redo_needed`; `redo_at_start` clears it elsewhere)."""
        self.write_intent().redo(system, self.site)
        self.redo_needed = False

    def redo_at_start(self) -> None:
        state = self.state() or {}
        if state.get("role") != "primary" or not state.get("host"):
            self.redo_needed = False  # this site does not run the application
            return
        try:
            with self.lock, self.system() as system:
                self.redo_in_doubt_write(system)
        except (ConnectionFailed, TricopyError) as exc:
            log.warning("the write in progress at the last crash is re-driven before the next write: %s", exc)

    async def retry_redo(self) -> None:
        """Until the in-doubt write is re-driven (its peers may start after this daemon, or the
        group may be fenced until `vstore heal`)."""
        pause = 0.5
        while self.redo_needed:
            await asyncio.sleep(pause)
            pause = min(pause * 2, 10.0)
            if self.redo_needed:
                await asyncio.to_thread(self.redo_at_start)

    def spool_acked(self) -> dict:
        """What the shipper may send: entries confirmed_seq+1 .. acked (all acknowledged: appends
        happen under the site lock, which this answer also holds)."""
        state = self.state() or {}
        spool = self.spool()
        if spool is None:
            return {"active": False}
        faults = self.lab / "faults.json"  # `vstore fail/heal` change it: the shipper re-plans
        return {"active": True, "acked": spool.next_seq - 1, "confirmed": spool.confirmed_seq,
                "duplex": self.async_group_duplex(state),
                "version": faults.stat().st_mtime_ns if faults.is_file() else 0}

    @rpc(names.SPOOL_PLAN)
    def spool_plan(self, args: dict, data: bytes) -> Answer:
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

    @rpc(names.SPOOL_CONFIRM)
    def spool_confirm(self, args: dict, data: bytes) -> Answer:
        """The Async site applied entries up to `seq`: trim the spool there; keep the shipper's rates."""
        seq, stats, spool = int(args["seq"]), dict(args.get("stats") or {}), self.spool()
        if spool is None:
            raise TricopyError(f"site {self.site} does not run the application: no spool to confirm")
        if spool.confirmed_seq < seq < spool.next_seq:
            spool.confirm(seq)
        self.ship_stats = {**stats, "confirmed_seq": spool.confirmed_seq, "time": time.time()}
        return {"confirmed": spool.confirmed_seq}, b""

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

    # -- requests -------------------------------------------------------------------------------
    def handle(self, method: str, args: dict, data: bytes) -> Answer:
        """Answer one request through the handler table, under the site lock (`ship` while a
        shipper process runs only waits for it, without the lock)."""
        if method == names.SHIP and not args.get("in_process") and running_pid(self.lab, SHIPPER):
            return self.wait_drained(float(args.get("timeout", 60.0))), b""
        route = HANDLERS.route(method)
        if route is None:
            raise TricopyError(f"unknown request {method!r}")
        with self.lock:
            if not route.options.get("coordinated"):
                return route.run(self, args, data)
            with self.system() as system:
                try:
                    return route.run(self, system, args, data)
                finally:
                    if route.options.get("saves"):
                        system.save()

    @rpc(names.PING)
    def ping(self, args: dict, data: bytes) -> Answer:
        return {"site": self.site, "pid": os.getpid()}, b""

    @rpc(names.STATE_GET)
    def state_get(self, args: dict, data: bytes) -> Answer:
        return {"state": self.state()}, b""

    @rpc(names.STATE_PUT)
    def state_put(self, args: dict, data: bytes) -> Answer:
        save_json_atomic(self.site_dir / "state.json", args["state"], durable=self.topo.durable)
        return {}, b""

    @rpc(names.VOL_READ)
    def vol_read(self, args: dict, data: bytes) -> Answer:
        return {}, self.device(args["volume"]).read(int(args["lba"]), int(args["count"]))

    @rpc(names.VOL_WRITE)
    def vol_write(self, args: dict, data: bytes) -> Answer:
        dev = self.device(args["volume"])
        dev.write(int(args["lba"]), data)
        if args.get("flush", True):
            dev.flush()
        return {}, b""

    @rpc(names.VOL_FLUSH)
    def vol_flush(self, args: dict, data: bytes) -> Answer:
        self.device(args["volume"]).flush()
        return {}, b""

    @rpc(names.JOURNAL_APPLIED)
    def journal_applied(self, args: dict, data: bytes) -> Answer:
        return {"applied_seq": self.journal().applied_seq}, b""

    @rpc(names.JOURNAL_SET_APPLIED)
    def journal_set_applied(self, args: dict, data: bytes) -> Answer:
        self.journal().set_applied_seq(int(args["seq"]))
        return {}, b""

    @rpc(names.JOURNAL_RECEIVE)
    def journal_receive(self, args: dict, data: bytes) -> Answer:
        """Store, apply, record: the batch is decoded once."""
        self.save_targets(args["targets"])
        applied = self.receiver(args["targets"]).receive_encoded(data, int(args["first_seq"]), int(args["last_seq"]))
        return {"applied": applied}, b""

    @rpc(names.JOURNAL_FINISH)
    def journal_finish(self, args: dict, data: bytes) -> Answer:
        return {"applied": self.receiver(args["targets"]).finish_stored()}, b""

    @rpc(names.SPOOL_ACKED)
    def spool_acked_request(self, args: dict, data: bytes) -> Answer:
        return self.spool_acked(), b""

    def save_targets(self, targets: dict[str, str]) -> None:
        """Remember which volume each entry volume id lands on, so a batch stored before a crash can
        be finished at start-up, before the volume is used (invariant 2)."""
        path = self.site_dir / RECV_DIR / "targets.json"
        if not path.is_file() or load_json(path) != targets:
            save_json_atomic(path, targets, durable=self.topo.durable)

    def finish_at_start(self) -> None:
        path = self.site_dir / RECV_DIR / "targets.json"
        if path.is_file() and (self.site_dir / RECV_DIR).is_dir():
            applied = self.receiver(load_json(path)).finish_stored()
            if applied:
                log.warning("finished a batch of %d entries stored before a crash", applied)

    @rpc(names.APP_INFO, coordinated=True)
    def app_info(self, system: System, args: dict, data: bytes) -> Answer:
        dev = system.device(args.get("volume", 0))
        return {"block_size": dev.block_size, "num_blocks": dev.num_blocks, "name": dev.name,
                "active": system.active_site}, b""

    @rpc(names.APP_WRITE, coordinated=True, saves=True)
    def app_write(self, system: System, args: dict, data: bytes) -> Answer:
        volume = args.get("volume", 0)
        dev = system.device(volume)
        count = dev.check_payload(data)
        dev.check_range(int(args["lba"]), count)
        if self.redo_needed:
            self.redo_in_doubt_write(system)
        self.write_intent().mark(str(volume), int(args["lba"]), count)
        dev.write(int(args["lba"]), data)
        dev.flush()
        return {}, b""

    @rpc(names.APP_READ, coordinated=True)
    def app_read(self, system: System, args: dict, data: bytes) -> Answer:
        return {}, system.device(args.get("volume", 0)).read(int(args["lba"]), int(args["count"]))

    @rpc(names.APP_HAS_UNSHIPPED, coordinated=True)
    def app_has_unshipped(self, system: System, args: dict, data: bytes) -> Answer:
        dev = system.device(args.get("volume", 0))
        return {"answer": dev.has_unshipped([tuple(r) for r in args["ranges"]])}, b""

    @rpc(names.STATUS, coordinated=True)
    def status(self, system: System, args: dict, data: bytes) -> Answer:
        return {"status": self.with_shipping(status_document(system))}, b""

    @rpc(names.SNAPSHOT, coordinated=True)
    def snapshot(self, system: System, args: dict, data: bytes) -> Answer:
        return {"snapshot": self.with_shipping(snapshot_of(system))}, b""

    @rpc(names.VERIFY, coordinated=True)
    def verify(self, system: System, args: dict, data: bytes) -> Answer:
        return {"pairs": verify(system, args.get("pair"))}, b""

    @rpc(names.RESYNC, coordinated=True, saves=True)
    def resync(self, system: System, args: dict, data: bytes) -> Answer:
        return {"steps": resync_all(system).steps}, b""

    @rpc(names.SHIP, coordinated=True, saves=True)
    def ship(self, system: System, args: dict, data: bytes) -> Answer:
        report = system.shipper().ship(args.get("max"))
        return {"entries": report.entries, "batches": report.batches, "error": report.error,
                "blocks_sent": report.blocks_sent, "blocks_written": report.blocks_written,
                "resynced_blocks": report.resynced_blocks}, b""

    # -- running --------------------------------------------------------------------------------
    async def run(self, ready: Path | None = None) -> None:
        """Serve until SIGTERM, holding the lab's daemons' claim from before the port opens until
        everything is closed (refused at once, naming the holder, while the lab is open elsewhere)."""
        with acting_as(f"served by the {self.site} daemon", lasting=True, release=f"vstore lab down {self.lab}"), \
                daemons_claim(self.lab):
            await self._serve(ready)

    async def _serve(self, ready: Path | None) -> None:
        spec = self.topo.sites[self.site]
        other = running_pid(self.lab, self.site)
        if other and other != os.getpid():
            raise TricopyError(f"the {self.site} daemon of {self.lab} is already running (pid {other})")
        with contextlib.suppress(ValueError, OSError):  # stderr may not be a file (tests)
            faulthandler.register(signal.SIGUSR1)  # `kill -USR1 PID` dumps every thread's stack to the log

        async def handler(method: str, args: dict, data: bytes) -> tuple[dict, bytes]:
            return await asyncio.to_thread(self.handle, method, args, data)

        with self.lock:  # the port first (one daemon per site), then recovery, then requests
            try:
                server = await serve(spec.host, spec.port, self.key, handler, ssl_context=self.server_tls)
            except OSError as exc:
                raise TricopyError(f"site {self.site} cannot listen on {spec.host}:{spec.port} "
                                   f"({exc.strerror or exc}); is its daemon already running?") from None
            for volume in (self.state() or {}).get("volumes", {}):
                self.device(volume)  # each image claimed (shared) while the daemon serves it
            self.finish_at_start()
            self.redo_at_start()
        retry = asyncio.create_task(self.retry_redo())
        loop = asyncio.get_running_loop()
        done = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, done.set)
        log.info("site %s serving on %s:%d", self.site, spec.host, spec.port)
        if ready is not None:
            ready.write_text(str(os.getpid()))
        await done.wait()
        retry.cancel()
        server.close()
        for peer in self.peers.values():  # peers hold connections to each other: drop ours
            peer.close()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(server.wait_closed(), 0.3)
        with self.lock:
            if self._system is not None:  # other sites get the latest write-count evidence
                with contextlib.suppress(ConnectionFailed, TricopyError):
                    self._system.save(all_evidence=True)
            self.drop_system()
            if self.intent is not None:
                self.intent.clear()  # a clean stop: no write in progress
                self.intent.close()
            if self.entry_log is not None:
                self.entry_log.close()
            for dev in self.devices.values():
                dev.close()
