"""Site daemons: `vstore serve --site NAME --config LAB/topology.toml` and `vstore lab up|down`
(issue 6; DESIGN "Process model").

Keeps true:
- A daemon serves only its own site's directory: its volumes, its `state.json`, its receive
  journal, and (when its host runs the application) its entry spool. Everything about another site
  goes over the authenticated RPC of `vstore.net` to that site's daemon.
- One request at a time touches the site (a lock serialises request handlers and the shipper), so
  writes to the consistency group are sequenced in one place. A coordinating request (an
  application write, status, ship) opens a `System` for the moment of the request, with the other
  sites reached through `vstore.remote`, and saves it before answering.
- The daemon of the site running the application keeps a shipper thread: woken by watchdog events
  on its spool directory (and once a second), it ships waiting entries; an unreachable Async site
  leaves the entries waiting, and shipping resumes from the Async site's applied sequence when it
  answers again, with no gap and no entry applied twice (the journal refuses both).
- The key file must be private (mode 0600) or the daemon refuses to start.
"""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vstore.blockdev import ImageDevice
from vstore.entries import EntryLog, ReceiveJournal, decode_batch
from vstore.errors import TricopyError
from vstore.net import ConnectionFailed, load_key, serve
from vstore.remote import Peer
from vstore.statefile import load_json, save_json_atomic
from vstore.topology import SITE_NAMES, Topology, load_topology

log = logging.getLogger("vstore.daemon")
RUN_DIR = "run"


def clients(lab: Path, topo: Topology, key: bytes, *, timeout: float = 10.0) -> dict[str, Peer]:
    return {name: Peer(spec.host, spec.port, key, timeout=timeout) for name, spec in topo.sites.items()}


class SiteDaemon:
    def __init__(self, lab: Path, site: str) -> None:
        if site not in SITE_NAMES:
            raise TricopyError(f"unknown site {site!r}; use one of {', '.join(SITE_NAMES)}")
        self.lab = lab
        self.site = site
        self.topo = load_topology(lab)
        self.key = load_key(lab / self.topo.key_file)
        self.peers = {}
        for name in SITE_NAMES:
            if name != site:
                spec = self.topo.peer_address(site, name)  # maybe through a fault proxy on the link
                self.peers[name] = Peer(spec.host, spec.port, self.key, timeout=5.0)
        self.lock = threading.RLock()
        self.entry_log: EntryLog | None = None
        self.wake = threading.Event()
        self.stop = threading.Event()
        self.devices: dict[str, ImageDevice] = {}

    @property
    def site_dir(self) -> Path:
        return self.lab / self.site

    # -- local primitives -----------------------------------------------------------------------
    def state(self) -> dict | None:
        path = self.site_dir / "state.json"
        return load_json(path) if path.is_file() else None

    def device(self, volume: str) -> ImageDevice:
        state = self.state()
        if state is None or volume not in state.get("volumes", {}):
            raise TricopyError(f"site {self.site} has no volume {volume!r}")
        if volume not in self.devices:
            self.devices[volume] = ImageDevice(self.site_dir / state["volumes"][volume]["file"],
                                               self.topo.block_size, durable=self.topo.durable)
        return self.devices[volume]

    def journal(self) -> ReceiveJournal:
        return ReceiveJournal(self.site_dir / "recv", durable=self.topo.durable)

    def apply_batch(self, entries: list, targets: dict[str, str]) -> None:
        used = set()
        for e in entries:
            volume = targets.get(str(e.volume_id))
            if volume is None:
                raise TricopyError(f"entry {e.seq} for unknown volume id {e.volume_id} at site {self.site}")
            self.device(volume).write(e.lba, e.payload)
            used.add(volume)
        for volume in used:
            self.device(volume).flush()

    # -- coordination ---------------------------------------------------------------------------
    def system(self) -> Any:
        from vstore.site import System
        state = self.state()
        host = (state or {}).get("host") or {}
        if state and state.get("role") == "primary" and host:
            if self.entry_log is None:
                self.entry_log = EntryLog(self.site_dir / "spool", durable=self.topo.durable,
                                          capacity_bytes=host.get("spool_capacity", self.topo.spool_capacity),
                                          block_size=self.topo.block_size)
        return System(self.lab, lock=False, local=self.site, peers=self.peers, entry_log=self.entry_log)

    def handle(self, method: str, args: dict, data: bytes) -> tuple[dict, bytes]:
        with self.lock:
            return self._handle(method, args, data)

    def _handle(self, method: str, args: dict, data: bytes) -> tuple[dict, bytes]:
        if method == "ping":
            return {"site": self.site, "pid": os.getpid()}, b""
        if method == "state.get":
            return {"state": self.state()}, b""
        if method == "state.put":
            save_json_atomic(self.site_dir / "state.json", args["state"], durable=self.topo.durable)
            return {}, b""
        if method == "vol.read":
            return {}, self.device(args["volume"]).read(int(args["lba"]), int(args["count"]))
        if method == "vol.write":
            dev = self.device(args["volume"])
            dev.write(int(args["lba"]), data)
            if args.get("flush", True):
                dev.flush()
            return {}, b""
        if method == "vol.flush":
            self.device(args["volume"]).flush()
            return {}, b""
        if method == "journal.applied":
            return {"applied_seq": self.journal().applied_seq}, b""
        if method == "journal.set_applied":
            self.journal().set_applied_seq(int(args["seq"]))
            return {}, b""
        if method == "journal.receive":
            journal = self.journal()
            self.save_targets(args["targets"])
            journal.store(decode_batch(data), first_seq=int(args["first_seq"]), last_seq=int(args["last_seq"]))
            return {"applied": self._finish(journal, args["targets"])}, b""
        if method == "journal.finish":
            return {"applied": self._finish(self.journal(), args["targets"])}, b""
        return self._coordinate(method, args, data)

    def save_targets(self, targets: dict[str, str]) -> None:
        """Remember which volume each entry volume id lands on, so a batch stored before a crash can
        be finished at start-up, before the volume is used (invariant 2)."""
        path = self.site_dir / "recv" / "targets.json"
        if not path.is_file() or load_json(path) != targets:
            save_json_atomic(path, targets, durable=self.topo.durable)

    def finish_at_start(self) -> None:
        path = self.site_dir / "recv" / "targets.json"
        if path.is_file() and (self.site_dir / "recv").is_dir():
            applied = self._finish(self.journal(), load_json(path))
            if applied:
                log.warning("finished a batch of %d entries stored before a crash", applied)

    def _finish(self, journal: ReceiveJournal, targets: dict[str, str]) -> int:
        batch = journal.stored()
        if batch is None:
            return 0
        self.apply_batch(batch, targets)
        journal.mark_applied()
        return len(batch)

    def _coordinate(self, method: str, args: dict, data: bytes) -> tuple[dict, bytes]:
        with self.system() as system:
            changes = method in ("app.write", "ship", "resync")
            try:
                if method == "app.info":
                    dev = system.device(args.get("volume", 0))
                    return {"block_size": dev.block_size, "num_blocks": dev.num_blocks, "name": dev.name,
                            "active": system.active_site}, b""
                if method == "app.write":
                    dev = system.device(args.get("volume", 0))
                    dev.write(int(args["lba"]), data)
                    dev.flush()
                    self.wake.set()
                    return {}, b""
                if method == "app.read":
                    return {}, system.device(args.get("volume", 0)).read(int(args["lba"]), int(args["count"]))
                if method == "app.has_unshipped":
                    dev = system.device(args.get("volume", 0))
                    return {"answer": dev.has_unshipped([tuple(r) for r in args["ranges"]])}, b""
                if method == "status":
                    from vstore.cli import status_document
                    return {"status": status_document(system)}, b""
                if method == "snapshot":
                    from vstore.dashboard import snapshot_of
                    return {"snapshot": snapshot_of(system)}, b""
                if method == "verify":
                    from vstore.verify import verify
                    return {"pairs": verify(system, args.get("pair"))}, b""
                if method == "resync":
                    from vstore.procedures import resync_all
                    return {"steps": resync_all(system).steps}, b""
                if method == "ship":
                    report = system.shipper().ship(args.get("max"))
                    return {"entries": report.entries, "batches": report.batches, "error": report.error,
                            "blocks_sent": report.blocks_sent, "blocks_written": report.blocks_written,
                            "resynced_blocks": report.resynced_blocks}, b""
                raise TricopyError(f"unknown request {method!r}")
            finally:
                if changes:
                    system.save()

    # -- the shipper ----------------------------------------------------------------------------
    def ship_loop(self) -> None:
        from watchdog.events import FileSystemEventHandler
        from watchdog.observers import Observer

        daemon = self

        class Wake(FileSystemEventHandler):
            def on_any_event(self, event: Any) -> None:
                daemon.wake.set()

        observer = None
        spool = self.site_dir / "spool"
        if spool.is_dir():
            observer = Observer()
            observer.schedule(Wake(), str(spool), recursive=False)
            observer.start()
        try:
            while not self.stop.is_set():
                self.wake.wait(1.0)
                self.wake.clear()
                self.ship_once()
        finally:
            if observer is not None:
                observer.stop()
                observer.join()

    def ship_once(self) -> None:
        with self.lock:
            state = self.state()
            if not state or state.get("role") != "primary" or not state.get("host"):
                return
            try:
                with self.system() as system:
                    if system.entry_log.stats().entries == 0 and not any(
                            p.state.value == "Suspend" for p in system.async_program.pairs()):
                        return
                    target = system.async_target_site()
                    if not system.network.site_up(target):
                        return  # entries wait; shipping resumes when the Async site answers
                    system.shipper().ship()
                    system.save()
            except (ConnectionFailed, TricopyError) as exc:
                log.warning("shipper: %s (entries keep waiting)", exc)

    # -- running --------------------------------------------------------------------------------
    async def run(self, ready: Path | None = None) -> None:
        spec = self.topo.sites[self.site]
        faulthandler.register(signal.SIGUSR1)  # `kill -USR1 PID` dumps every thread's stack to the log
        self.finish_at_start()

        async def handler(method: str, args: dict, data: bytes) -> tuple[dict, bytes]:
            return await asyncio.to_thread(self.handle, method, args, data)

        server = await serve(spec.host, spec.port, self.key, handler)
        shipper = threading.Thread(target=self.ship_loop, name="shipper", daemon=True)
        shipper.start()
        loop = asyncio.get_running_loop()
        done = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, done.set)
        log.info("site %s serving on %s:%d", self.site, spec.host, spec.port)
        if ready is not None:
            ready.write_text(str(os.getpid()))
        await done.wait()
        self.stop.set()
        self.wake.set()
        server.close()
        for peer in self.peers.values():  # peers hold connections to each other: drop ours
            peer.close()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(server.wait_closed(), 0.3)
        shipper.join(5)
        with self.lock:
            if self.entry_log is not None:
                self.entry_log.close()
            for dev in self.devices.values():
                dev.close()


# -- lab up / down ------------------------------------------------------------------------------------
def pid_file(lab: Path, site: str) -> Path:
    return lab / RUN_DIR / f"{site}.pid"


def alive(pid: int) -> bool:
    """True while process `pid` runs. A daemon started by this process (`lab up` inside a test or
    the demo) is our child: once it exits it stays a zombie until reaped, so reap it here."""
    try:
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    except ChildProcessError:
        pass  # not our child
    try:
        os.kill(pid, 0)
        return True
    except OSError:
        return False


def running_pid(lab: Path, site: str) -> int | None:
    try:
        pid = int(pid_file(lab, site).read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if alive(pid) else None


def is_up(lab: Path) -> bool:
    """A lab is up when any of its site daemons is running."""
    return (lab / RUN_DIR).is_dir() and any(running_pid(lab, s) for s in SITE_NAMES)


def start_site(lab: Path, site: str, timeout: float = 15.0) -> int:
    (lab / RUN_DIR).mkdir(exist_ok=True)
    pid = running_pid(lab, site)
    if pid:
        return pid
    ready = pid_file(lab, site)
    ready.unlink(missing_ok=True)
    logf = open(lab / RUN_DIR / f"{site}.log", "ab")  # noqa: SIM115 - handed to the child
    proc = subprocess.Popen([sys.executable, "-m", "vstore.cli", "serve", "--site", site, "--config",
                             str(lab / "topology.toml")], stdout=logf, stderr=logf, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    logf.close()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = (lab / RUN_DIR / f"{site}.log").read_text()[-400:]
            raise TricopyError(f"the {site} daemon exited at start: {tail.strip().splitlines()[-1] if tail else ''}")
        if ready.exists() and ready.read_text().strip():
            return proc.pid
        time.sleep(0.05)
    proc.kill()
    raise TricopyError(f"the {site} daemon did not come up within {timeout:.0f}s; see {lab / RUN_DIR}/{site}.log")


def lab_up(lab: Path) -> dict[str, int]:
    topo = load_topology(lab)
    load_key(lab / topo.key_file)  # refuse a bad key before starting anything
    return {site: start_site(lab, site) for site in SITE_NAMES if (lab / site).is_dir()}


def stop_site(lab: Path, site: str, timeout: float = 10.0) -> bool:
    pid = running_pid(lab, site)
    if pid is None:
        pid_file(lab, site).unlink(missing_ok=True)
        return False
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive(pid):
            break
        time.sleep(0.02)
    else:
        log.warning("the %s daemon (pid %d) did not stop within %.0fs: killing it", site, pid, timeout)
        os.kill(pid, signal.SIGKILL)
        alive(pid)
    pid_file(lab, site).unlink(missing_ok=True)
    return True


def lab_down(lab: Path) -> list[str]:
    return [site for site in SITE_NAMES if stop_site(lab, site)]


@contextlib.contextmanager
def quiesced(lab: Path, say: Any = None) -> Iterator[list[str]]:
    """Run a disaster procedure (failover, failback, recovery) with the lab's daemons stopped, then
    start the daemons of every site that exists afterwards (with their new roles). The procedures
    create, copy and re-role whole site directories, which no daemon may serve meanwhile. Yields the
    sites whose daemons were stopped (empty when the lab was down, and then nothing is started)."""
    stopped = lab_down(lab) if is_up(lab) else []
    if stopped and say:
        say(f"stopped the daemons of {', '.join(stopped)} for the procedure")
    try:
        yield stopped
    finally:
        if stopped:
            started = lab_up(lab)
            if say:
                say(f"started the daemons of {', '.join(started)} again")


def coordinator(lab: Path) -> Peer:
    """The daemon to send application and status requests to: the site running the application,
    else the first site that answers."""
    topo = load_topology(lab)
    key = load_key(lab / topo.key_file)
    for client in clients(lab, topo, key).values():
        try:
            info = client.call("app.info")[0]
        except (ConnectionFailed, TricopyError):
            client.close()
            continue
        active = info["active"]
        if topo.sites[active]:
            spec = topo.sites[active]
            client.close()
            return Peer(spec.host, spec.port, key)
    raise TricopyError(f"no daemon of lab {lab} answers; start them with `vstore lab up {lab}`")
