"""The processes of a lab (DESIGN "Process model"): `vstore lab up|down`, which daemon is running,
and which one to ask.

Keeps true:
- Every process of a lab (a site daemon, or the shipper process of the site running the
  application) has its pid and log file in LAB/run/; a process counts as running only while its pid
  is alive (one that `lab up` started from this process is reaped when it exits).
- `lab up` starts the daemons of the sites present, the application's site last (its restart
  re-drives an in-doubt write through the others), then the shipper; `lab down` stops the shipper
  first. Stopping is SIGTERM, then SIGKILL after a timeout, said in the log.
- While they run, the lab's daemons hold its daemons' claim (`LAB/run/daemons.lock`, shared among
  them, `daemons_claim`), so no `System` opens the lab in another process meanwhile; and `lab up`
  refuses at once, naming the holder, while any process has the lab open (a mount of lab:LAB with
  the daemons down, a command), before it starts anything. A daemon checks that too, after
  claiming, so a lab opened between the two is caught (see `System._take_lock`).
- Requests go to the daemon of the site running the application (`coordinator`); status-like
  requests may go to any daemon that answers when no site runs it. The `app.info` answer the
  coordinator got from that very daemon travels with its `Peer` (`Peer.app_info`), not asked twice.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vstore.blocks import pids
from vstore.blocks.errors import TricopyError
from vstore.blocks.holders import Claim, check_free, claim
from vstore.lab.sitedir import lab_application_site
from vstore.lab.system import DAEMONS_LOCK, LAB_LOCK
from vstore.lab.topology import SITE_NAMES, Topology, load_topology
from vstore.net.client import Peer
from vstore.net.keys import load_key
from vstore.net.rpc import APP_INFO
from vstore.net.tls import client_context
from vstore.net.wire import ConnectionFailed

log = logging.getLogger("vstore.processes")
RUN_DIR = "run"
SHIPPER = "shipper"  # the shipping process's name in LAB/run (pid and log files)


def clients(lab: Path, topo: Topology, key: bytes, *, timeout: float = 10.0) -> dict[str, Peer]:
    """A client of every site's daemon, by site name (connected on first use)."""
    tls = client_context(lab, topo.tls)
    return {name: Peer(spec.host, spec.port, key, timeout=timeout, ssl_context=tls)
            for name, spec in topo.sites.items()}


def site_peer(lab: Path, site: str, *, timeout: float = 10.0) -> Peer:
    """A client of one site's daemon, with the lab's key (and TLS when the lab has it)."""
    topo = load_topology(lab)
    spec = topo.sites[site]
    return Peer(spec.host, spec.port, load_key(lab / topo.key_file), timeout=timeout,
                ssl_context=client_context(lab, topo.tls))


def pid_file(lab: Path, site: str) -> Path:
    return lab / RUN_DIR / f"{site}.pid"


def running_pid(lab: Path, site: str) -> int | None:
    """The pid of a lab process (`site` = a site or "shipper") while it runs, else None. A daemon
    started by this process (`lab up` inside a test or the demo) is our child and is reaped here."""
    return pids.running_pid(pid_file(lab, site))


PROCESSES = (*SITE_NAMES, SHIPPER)


def is_up(lab: Path) -> bool:
    """A lab is up when any of its daemons (sites or shipper) is running."""
    return (lab / RUN_DIR).is_dir() and any(running_pid(lab, name) for name in PROCESSES)


def start_site(lab: Path, name: str, timeout: float = 15.0) -> int:
    """Start a site's daemon (`name` = primary, sync or async) or the shipper process (`name` =
    "shipper", for the site running the application) in the background; return its pid."""
    (lab / RUN_DIR).mkdir(exist_ok=True)
    pid = running_pid(lab, name)
    if pid:
        return pid
    config = str(lab / "topology.toml")
    if name == SHIPPER:
        site = lab_application_site(lab)
        if site is None:
            raise TricopyError(f"no site of {lab} runs the application: there is nothing to ship")
        argv = ["shipper", "--site", site, "--config", config]
    else:
        argv = ["serve", "--site", name, "--config", config]
    ready = pid_file(lab, name)
    ready.unlink(missing_ok=True)
    logf = open(lab / RUN_DIR / f"{name}.log", "ab")  # noqa: SIM115 - handed to the child
    proc = subprocess.Popen([sys.executable, "-m", "vstore.cli", *argv], stdout=logf, stderr=logf,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    logf.close()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = (lab / RUN_DIR / f"{name}.log").read_text()[-400:]
            raise TricopyError(f"the {name} daemon exited at start: {tail.strip().splitlines()[-1] if tail else ''}")
        if ready.exists() and ready.read_text().strip():
            return proc.pid
        time.sleep(0.02)
    proc.kill()
    raise TricopyError(f"the {name} daemon did not come up within {timeout:.0f}s; see {lab / RUN_DIR}/{name}.log")


def check_lab_free(lab: Path) -> None:
    """Refuse (`Busy`, naming the holder) while a process has the lab open: the daemons would write
    under it (a brief holder, a command about to end, is waited for)."""
    check_free(lab / LAB_LOCK, resource=f"lab {lab.absolute()}")


def daemons_claim(lab: Path) -> Claim:
    """The claim a daemon of the lab holds while it runs (its command line names its site): shared
    with the lab's other daemons, refused while a process has the lab open (`check_lab_free`)."""
    (lab / RUN_DIR).mkdir(exist_ok=True)
    held = claim(lab / DAEMONS_LOCK, exclusive=False, resource=f"lab {lab.absolute()}", lasting=True,
                 what="served by the lab's daemons", release=f"stop them first: vstore lab down {lab}")
    try:
        check_lab_free(lab)  # claimed first, checked second (System._take_lock does the reverse)
    except BaseException:
        held.release()
        raise
    return held


def lab_up(lab: Path) -> dict[str, int]:
    """Start the daemon of every site present, then the shipper of the site running the application.
    Refused before anything starts while a process has the lab open (`check_lab_free`)."""
    topo = load_topology(lab)
    load_key(lab / topo.key_file)  # refuse a bad key before starting anything
    check_lab_free(lab)
    app_site = lab_application_site(lab)
    order = sorted((s for s in SITE_NAMES if (lab / s).is_dir()), key=lambda s: s == app_site)
    names = order + ([SHIPPER] if app_site in order else [])  # the application's site, then the shipper, last
    already = {name for name in names if running_pid(lab, name)}
    started: dict[str, int] = {}
    try:
        for name in names:
            started[name] = start_site(lab, name)
    except TricopyError as exc:
        undone = [name for name in reversed(list(started)) if name not in already and stop_site(lab, name)]
        note = f"; stopped again what this call had started ({', '.join(undone)})" if undone else ""
        raise TricopyError(f"{exc}{note}") from None
    return started


def stop_site(lab: Path, name: str, timeout: float = 10.0) -> bool:
    pid = running_pid(lab, name)
    if pid is None:
        pid_file(lab, name).unlink(missing_ok=True)
        return False
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pids.alive(pid):
            break
        time.sleep(0.02)
    else:
        log.warning("the %s daemon (pid %d) did not stop within %.0fs: killing it", name, pid, timeout)
        os.kill(pid, signal.SIGKILL)
        pids.alive(pid)
    pid_file(lab, name).unlink(missing_ok=True)
    return True


def lab_down(lab: Path) -> list[str]:
    """Stop the shipper, then the site daemons; returns the names of those that were running."""
    return [name for name in (SHIPPER, *SITE_NAMES) if stop_site(lab, name)]


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


def coordinator(lab: Path, *, application: bool = True) -> Peer:
    """The daemon to send requests to: the one of the site running the application. With
    `application=False` (status, dashboard, verify) any daemon that answers will do when no site
    runs the application (the primary's daemon is down or the primary is lost)."""
    topo = load_topology(lab)
    key = load_key(lab / topo.key_file)
    answering: list[str] = []
    for name, client in clients(lab, topo, key).items():
        try:
            info = client.call(APP_INFO)[0]
        except ConnectionFailed:
            continue
        except TricopyError:  # it answers, but sees no site running the application
            answering.append(name)
            continue
        finally:
            client.close()
        active = info["active"]
        spec = topo.sites[active]
        return Peer(spec.host, spec.port, key, ssl_context=client_context(lab, topo.tls),
                    app_info=info if name == active else None)
    if not answering:
        raise TricopyError(f"no daemon of lab {lab} answers; start them with `vstore lab up {lab}`")
    if not application:
        spec = topo.sites[answering[0]]
        return Peer(spec.host, spec.port, key, ssl_context=client_context(lab, topo.tls))
    silent = [s for s in SITE_NAMES if s not in answering]
    raise TricopyError(f"no site running the application answers (the daemons of {', '.join(answering)} do, "
                       f"{', '.join(silent) or 'none'} do not; see {lab / RUN_DIR}/*.log): start them again with "
                       f"`vstore lab up {lab}`, or if the primary is lost, `vstore recover {lab} --to sync`")
