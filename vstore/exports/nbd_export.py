"""`vstore export`: the application's volume of a lab served over NBD to unmodified clients
(SPEC §6 [0133]-[0135], embodiment 2's intermediate server; the protocol is `vstore.nbd`).

Keeps true:
- The export serves the very device `lab:LAB[@SITE]` names (`vstore.targets.open_lab`): with the
  lab down, the lab opened in this process under its exclusive claim; with the lab up, the
  application's volume through the primary's daemon (`AppDevice`), as any other application, so
  the daemon's fence, write order and claims apply unchanged. An NBD WRITE is answered after the
  device's write returned (A and C have it, the entry exists); FLUSH and FUA after the device's
  flush (durable on A, C and the spool). Writes enter the device one at a time in the order they
  are acknowledged (the export's lock, `vstore.nbd.server.Export`).
- A replica (`--site` of a site not running the application) is served read-only.
- While it serves, the process keeps LAB/run/exports/PID.json (`vstore.lab.served`) up to date
  about once a second: address, exports, clients, request counts and rate; `status --json` and
  the dashboard show it. The file goes when the export stops; a device closes with a flush.
- A non-loopback listen address needs the lab's TLS (`[tls]` in topology.toml): the server then
  requires NBD_OPT_STARTTLS with the lab's certificates; without TLS it is refused.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from vstore.blocks.device import BlockDevice
from vstore.blocks.errors import TricopyError
from vstore.lab import served
from vstore.lab.topology import load_topology
from vstore.nbd.server import DEFAULT_PORT, Export, NbdServer
from vstore.net.tls import contexts
from vstore.targets import open_lab

log = logging.getLogger("vstore.export")
STATUS_EVERY = 1.0  # seconds between two status files


def parse_listen(text: str) -> tuple[str, int]:
    """HOST:PORT (an IPv6 host in brackets), or HOST alone for the NBD port."""
    host, sep, port = text.rpartition(":") if not text.endswith("]") else (text, "", "")
    if not sep:
        host, port = text, str(DEFAULT_PORT)
    host = host.strip("[]")
    if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise TricopyError(f"--listen wants HOST:PORT such as 127.0.0.1:{DEFAULT_PORT}, got {text!r}")
    return host, int(port)


def target_of(lab: Path, site: str | None) -> str:
    return f"lab:{lab}" + (f"@{site}" if site else "")


@contextlib.contextmanager
def lab_export(lab: Path, *, name: str | None = None, listen: str = f"127.0.0.1:{DEFAULT_PORT}",
               readonly: bool = False, site: str | None = None) -> Iterator[NbdServer]:
    """An NBD server of the lab's application volume (or of `site`'s replica), serving until the
    block ends; then the connections are cut, the device flushed and closed."""
    lab = Path(lab)
    host, port = parse_listen(listen)
    if not lab.is_dir():
        raise TricopyError(f"{lab} does not exist; create a lab with `vstore lab init {lab}`")
    tls = contexts(lab, load_topology(lab).tls)[0]
    device = _open(lab, site, readonly)
    try:
        export = Export(name or "A", device, readonly=device.readonly,
                        description=f"tricopy {target_of(lab, site)}")
        server = NbdServer([export], host, port, tls=tls).start()
        try:
            yield server
        finally:
            server.close()
    finally:
        device.close()


def _open(lab: Path, site: str | None, readonly: bool) -> BlockDevice:
    """The device, writable when it can be: the application's volume unless `readonly`; a replica read-only."""
    target = target_of(lab, site)
    if readonly:
        return open_lab(target, writable=False)
    try:
        return open_lab(target, writable=True)
    except TricopyError as exc:
        if site is None or "read-only replica" not in str(exc):
            raise
        return open_lab(target, writable=False)


def status_of(lab: Path, server: NbdServer, started: float, rate: float) -> dict:
    doc = server.stats()
    return {"lab": str(lab.absolute()), "url": server.url(), "started": started, "updated": time.time(),
            "requests_per_s": round(rate, 1), **doc}


def serve(lab: Path, *, stop: threading.Event, on_ready: Callable[[dict], None] | None = None,
          **options: object) -> None:
    """Serve until `stop` is set, keeping the lab's status file of this export."""
    lab = Path(lab)
    with lab_export(lab, **options) as server:  # type: ignore[arg-type]
        started, last, last_requests = time.time(), time.monotonic(), 0
        doc = status_of(lab, server, started, 0.0)
        served.save_status(lab, doc)
        log.info("exporting %s as %s", target_of(lab, options.get("site")), server.url())  # type: ignore[arg-type]
        if on_ready is not None:
            on_ready(doc)
        try:
            while not stop.wait(STATUS_EVERY):
                now = time.monotonic()
                requests = sum(sum(e["requests"].values()) for e in server.stats()["exports"])
                rate = (requests - last_requests) / max(now - last, 1e-6)
                last, last_requests = now, requests
                served.save_status(lab, status_of(lab, server, started, rate))
        finally:
            served.remove_status(lab)
