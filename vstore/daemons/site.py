"""Site daemons: `vstore serve --site NAME --config LAB/topology.toml` (DESIGN "Process model",
"Sites and links"); starting and stopping them (`vstore lab up|down`) is vstore/daemons/processes.py.

Keeps true:
- A daemon serves only its own site's directory: its volumes, its `state.json`, its receive
  journal, and (when its host runs the application) its entry spool. Everything about another site
  goes over the authenticated RPC of `vstore.net` to that site's daemon.
- Requests are dispatched through one table keyed by the method names of `vstore.net.rpc` (the
  `@rpc(NAME, ArgsStruct)` handlers here, in vstore/daemons/site_files.py and in
  vstore/daemons/spooling.py); a name not in it is refused with "unknown request 'NAME'", and a
  request's arguments are checked against their declaration (vstore/daemons/requests.py) before
  its handler runs: a refused request changed nothing.
- One request at a time touches the site (a lock serialises request handlers), so writes to the
  consistency group are sequenced in one place. A short request (`inline=True`: the application's
  requests, the volumes', the shipper's, carrying less than `INLINE_BYTES`) runs on the event loop
  itself when the lock is free, with no hand-off to a worker thread; anything else, or a short
  request while the site is busy, runs in a worker thread, so the loop never waits for the lock
  (and receives a large request's successor meanwhile). A coordinating request (an application write,
  status, ship) works on a `System` with the other sites reached through `vstore.net.remote`, and
  saves what changed before answering; the `System` is kept between requests and reloaded from
  every site when a peer did not answer, a request failed, or faults.json changed.
- The receive journal and the spool are opened once, on first use: while the daemon runs it is the
  only writer of its site's directory (procedures run with the daemons stopped).
- Before an application write its range goes into the write-intent record (vstore/daemons/intent.py);
  a daemon restarted after a kill re-drives it, so that write ends on every copy or on none. Its
  extents are in the activity log (vstore/daemons/activity.py), durably, before it is issued; a
  daemon back in a new boot (a power cut) re-drives them all, so A, C and D agree again on what
  was not flushed.
- `app.write` is acknowledged with the write in place on A and C and its entry in the spool;
  `app.flush` (and a FUA write) returns when everything before it is durable on A, C and the spool.
- Shipping is its own process (`vstore shipper`, vstore/daemons/shipper.py), started by `lab up` next to
  the daemon of the site running the application. That daemon owns the spool
  (vstore/daemons/spooling.py). Pair-state work (a Suspended async group's Duplex-Pending
  resync) stays in this daemon: the shipper asks for it with `ship {"in_process": true}`.
- Its server holds for its peers only what topology.toml's `[limits]` allow (`ServerLimits`).
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
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import msgspec

from vstore.blocks.errors import TricopyError
from vstore.blocks.holders import acting_as
from vstore.daemons.activity import ActivityLog
from vstore.daemons.intent import Intent, WriteIntent
from vstore.daemons.processes import SHIPPER, daemons_claim, running_pid
from vstore.daemons.requests import (
    HANDLERS,
    MAX_INT,
    BlockCount,
    Lba,
    Name,
    NoArgs,
    VirtualVolume,
    arguments,
    check_reply,
    rpc,
    unknown_request,
)
from vstore.daemons.site_files import SiteFiles
from vstore.daemons.spooling import WAITED, SpoolRequests
from vstore.lab.system import System
from vstore.lab.topology import SITE_NAMES, load_topology
from vstore.net import rpc as names
from vstore.net.client import Peer
from vstore.net.keys import load_key
from vstore.net.server import serve
from vstore.net.tls import contexts as tls_contexts
from vstore.net.wire import ConnectionFailed
from vstore.procedures.reactions import open_system
from vstore.procedures.setup import resync_all
from vstore.replication.spool import EntryLog
from vstore.replication.storage import StorageSystem
from vstore.reports import snapshot_of, status_document, verify

log = logging.getLogger("vstore.daemon")
INLINE_BYTES = 256 << 10  # an inline request carrying more data runs in a worker thread (the server reads ahead)
Answer = tuple[dict, bytes]
Ranges = Annotated[list[tuple[Lba, Annotated[int, msgspec.Meta(ge=0, le=MAX_INT)]]], msgspec.Meta(max_length=1 << 20)]


class AppInfo(msgspec.Struct, forbid_unknown_fields=True):
    volume: VirtualVolume = 0


class AppRead(msgspec.Struct, forbid_unknown_fields=True):
    lba: Lba
    count: BlockCount
    volume: VirtualVolume = 0


class AppWrite(msgspec.Struct, forbid_unknown_fields=True):
    lba: Lba
    volume: VirtualVolume = 0
    fua: bool = False  # durable on A, C and the spool before the answer


class AppFlush(msgspec.Struct, forbid_unknown_fields=True):
    volume: VirtualVolume = 0


class AppHasUnshipped(msgspec.Struct, forbid_unknown_fields=True):
    ranges: Ranges
    volume: VirtualVolume = 0


class Verify(msgspec.Struct, forbid_unknown_fields=True):
    pair: Name | None = None


class Ship(msgspec.Struct, forbid_unknown_fields=True):
    max: Annotated[int, msgspec.Meta(ge=0, le=MAX_INT)] | None = None
    in_process: bool = False
    timeout: Annotated[float, msgspec.Meta(gt=0, le=86400)] = 60.0


class SiteDaemon(SiteFiles, SpoolRequests):
    """The daemon of one site: start-up recovery, the serving loop and the coordinating requests
    (its own directory's requests are `SiteFiles`', the spool's `SpoolRequests`')."""

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
        self.init_files()
        self.entry_log: EntryLog | None = None
        self.ship_stats: dict = {}
        self.intent: WriteIntent | None = None
        self.activity: ActivityLog | None = None
        self._system: System | None = None
        self._system_version = 0
        self.unflushed: dict[str, set[int]] = {}  # kept across Systems: see StorageSystem.unflushed
        self.redo_needed = True  # until the record has been checked once, at start-up

    # -- coordination ---------------------------------------------------------------------------
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
                                                entry_log=self.spool(), unflushed=self.unflushed)
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

    def write_intent(self) -> WriteIntent:
        if self.intent is None:
            self.intent = WriteIntent(self.site_dir)
        return self.intent

    def activity_log(self) -> ActivityLog:
        if self.activity is None:
            self.activity = ActivityLog(self.site_dir, durable=self.topo.durable)
        return self.activity

    def redo_in_doubt_write(self, system: System) -> None:
        """Re-drive the write in progress at an unclean stop and, after a power cut, the extents
        of the activity log (`WriteIntent.redo`; raises while that fails), then start a fresh
        activity log. Only at start-up is anything in doubt (`redo_needed`; `redo_at_start`
        clears it elsewhere)."""
        activity = self.activity_log()
        doubt = activity.in_doubt()
        if doubt is None:
            log.error("the activity log is damaged: which blocks a power cut left different is unknown; run "
                      "`vstore verify --repair %s`", self.lab)
        self.write_intent().redo(system, self.site, [Intent(*d) for d in doubt or []])
        activity.start()
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

    # -- requests -------------------------------------------------------------------------------
    def handle(self, method: str, args: dict, data: bytes) -> Answer:
        """Answer one request through the handler table, its arguments checked against their
        declaration first, under the site lock (`ship` while a shipper process runs only waits for
        it, without the lock)."""
        route = HANDLERS.route(method)
        if route is None:
            raise unknown_request(method)
        checked = arguments(route, method, args)
        if method == names.SHIP and not checked.in_process and running_pid(self.lab, SHIPPER):
            return self.wait_drained(checked.timeout), b""
        with self.lock:
            if not route.options.get("coordinated"):
                return route.run(self, checked, data)
            with self.system() as system:
                try:
                    return route.run(self, system, checked, data)
                finally:
                    if route.options.get("saves"):
                        system.save()

    @rpc(names.PING, NoArgs, inline=True)
    def ping(self, args: NoArgs, data: bytes) -> Answer:
        return {"site": self.site, "pid": os.getpid()}, b""

    @rpc(names.APP_INFO, AppInfo, coordinated=True, inline=True)
    def app_info(self, system: System, args: AppInfo, data: bytes) -> Answer:
        dev = system.device(args.volume)
        return {"block_size": dev.block_size, "num_blocks": dev.num_blocks, "name": dev.name,
                "active": system.active_site}, b""

    @rpc(names.APP_WRITE, AppWrite, coordinated=True, saves=True, inline=True)
    def app_write(self, system: System, args: AppWrite, data: bytes) -> Answer:
        name = system.volume_name(args.volume)
        dev = system.device(name)
        count = dev.check_write(args.lba, data)
        if self.redo_needed:
            self.redo_in_doubt_write(system)
        self.activity_log().before_write(name, args.lba, count, dev.flush)
        self.write_intent().mark(name, args.lba, count)
        if args.fua:
            dev.write_fua(args.lba, data)
            self.activity_log().flushed(name)
        else:
            dev.write(args.lba, data)
        return {}, b""

    @rpc(names.APP_FLUSH, AppFlush, coordinated=True, saves=True, inline=True)
    def app_flush(self, system: System, args: AppFlush, data: bytes) -> Answer:
        name = system.volume_name(args.volume)
        system.device(name).flush()
        self.activity_log().flushed(name)
        return {}, b""

    @rpc(names.APP_READ, AppRead, coordinated=True, inline=True)
    def app_read(self, system: System, args: AppRead, data: bytes) -> Answer:
        dev = system.device(args.volume)
        check_reply(args.count, dev.block_size)
        return {}, dev.read(args.lba, args.count)

    @rpc(names.APP_HAS_UNSHIPPED, AppHasUnshipped, coordinated=True, inline=True)
    def app_has_unshipped(self, system: System, args: AppHasUnshipped, data: bytes) -> Answer:
        dev = system.device(args.volume)
        return {"answer": dev.has_unshipped(args.ranges)}, b""

    @rpc(names.STATUS, NoArgs, coordinated=True)
    def status(self, system: System, args: NoArgs, data: bytes) -> Answer:
        return {"status": self.with_shipping(status_document(system))}, b""

    @rpc(names.SNAPSHOT, NoArgs, coordinated=True)
    def snapshot(self, system: System, args: NoArgs, data: bytes) -> Answer:
        return {"snapshot": self.with_shipping(snapshot_of(system))}, b""

    @rpc(names.VERIFY, Verify, coordinated=True)
    def verify(self, system: System, args: Verify, data: bytes) -> Answer:
        return {"pairs": verify(system, args.pair)}, b""

    @rpc(names.RESYNC, NoArgs, coordinated=True, saves=True)
    def resync(self, system: System, args: NoArgs, data: bytes) -> Answer:
        return {"steps": resync_all(system).steps}, b""

    @rpc(names.SHIP, Ship, coordinated=True, saves=True)
    def ship(self, system: System, args: Ship, data: bytes) -> Answer:
        report = system.shipper().ship(args.max)
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

        appended = asyncio.Event()  # set after every request that may have appended to the spool

        async def run(method: str, args: dict, data: bytes) -> tuple[dict, bytes]:
            route = HANDLERS.route(method)
            if route is not None and route.options.get("inline") and len(data) < INLINE_BYTES \
                    and self.lock.acquire(blocking=False):
                try:  # a short request while the site is free: no hand-off to a worker thread
                    return self.handle(method, args, data)
                finally:
                    self.lock.release()
            return await asyncio.to_thread(self.handle, method, args, data)

        async def handler(method: str, args: dict, data: bytes) -> tuple[dict, bytes]:
            if method not in WAITED:
                try:
                    return await run(method, args, data)
                finally:
                    appended.set()
            answer = await run(method, args, data)
            return await self.long_poll(answer, args, lambda: run(names.SPOOL_ACKED, {}, b""), appended)

        with self.lock:  # the port first (one daemon per site), then recovery, then requests
            try:
                server = await serve(spec.host, spec.port, self.key, handler, ssl_context=self.server_tls,
                                     limits=self.topo.limits)
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
        self.close()

    def close(self) -> None:
        """A clean stop: the latest evidence to the other sites, then everything closed."""
        with self.lock:
            if self._system is not None:  # other sites get the latest write-count evidence
                with contextlib.suppress(ConnectionFailed, TricopyError):
                    storage = self._system.storages.get(self.site)
                    if isinstance(storage, StorageSystem):
                        storage.flush_secondaries()  # what C acknowledged from its cache, durable there
                    self._system.save(all_evidence=True)
            self.drop_system()
            if self.intent is not None:
                self.intent.clear()  # a clean stop: no write in progress
                self.intent.close()
                self.intent = None
            if self.activity is not None:
                self.activity.close()
                self.activity = None
            if self.entry_log is not None:
                with contextlib.suppress(TricopyError, OSError):
                    self.entry_log.confirm(self.entry_log.confirmed_seq)  # the lazy position, durably
                self.entry_log.close()
                self.entry_log = None
            self.close_files()
