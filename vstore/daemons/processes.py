"""The processes of a lab (DESIGN "Process model"): `vstore lab up|down`, which daemon is running,
and which one to ask.

Keeps true:
- Every process of a lab (a site daemon, or the shipper process of the site running the
  application) has its pid and log file in LAB/run/, the pid file written by `lab up` as soon as the
  process exists, before it is announced (its ready file, `NAME.ready`, says it serves); a process
  counts as running only while its pid is alive (one that `lab up` started from this process is
  reaped when it exits). `lab down` stops every process of the lab: those its pid files name and
  any other `vstore serve|shipper` whose command line names the lab's topology.toml (/proc), so
  none survives without a pid file. Pid files and logs are as private as the lab (`codec.file_mode`).
- Whole-lab commands are serialised: `lab up`, `lab down` and a procedure's `quiesced` hold the
  lab's control claim (`LAB/run/control.lock`, exclusive; nested calls in one thread share it).
  A second `lab up` meanwhile is refused at once naming the holder; `lab down` and a procedure wait
  for a brief holder like any claimant.
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
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vstore.blocks import pids
from vstore.blocks.codec import create_file, make_dir, write_file_atomic
from vstore.blocks.errors import TricopyError
from vstore.blocks.holders import BRIEF_WAIT, Claim, check_free, claim
from vstore.lab import served
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
EXPORT = "export"  # the NBD export `lab up --export` starts (`vstore export`), a client of the daemons
CONTROL_LOCK = "run/control.lock"  # held by a whole-lab command: lab up, lab down, a procedure's quiesced


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


def ready_file(lab: Path, site: str) -> Path:
    """Where a lab process (site daemon or shipper) writes its pid once it serves."""
    return lab / RUN_DIR / f"{site}.ready"


_held: dict[tuple[str, int], Claim] = {}  # (lab's real path, thread) -> the whole-lab claim it holds


@contextlib.contextmanager
def whole_lab(lab: Path, what: str, *, wait: float = BRIEF_WAIT) -> Iterator[None]:
    """Hold the lab's control claim for a whole-lab command (`what` names it in a refusal: "being
    started"): refused with `Busy`, naming the holder, while another command holds it and does not
    let go within `wait` seconds. A thread that holds it already (a procedure's `quiesced` calling
    `lab_up`) goes on; a directory that is no lab is left alone (the command says what is wrong)."""
    key = (os.path.realpath(lab), threading.get_ident())
    if key in _held or not (lab / "topology.toml").is_file():
        yield
        return
    make_dir(lab / RUN_DIR, exist_ok=True)
    held = claim(lab / CONTROL_LOCK, exclusive=True, resource=f"lab {lab.absolute()}", what=what, wait=wait)
    _held[key] = held
    try:
        yield
    finally:
        del _held[key]
        held.release()


def _vstore_daemon(argv: list[str], cwd: str, topology: str) -> str | None:
    """The lab process name (a site or "shipper") when `argv` is `vstore serve|shipper` with
    `--config` naming `topology` (relative names taken from the process's `cwd`), else None."""
    if not any(a == "vstore.cli" or os.path.basename(a) == "vstore" for a in argv[:3]):
        return None
    options: dict[str, str] = {}
    for i, arg in enumerate(argv):
        if arg.startswith("--") and "=" in arg:
            options[arg.split("=", 1)[0]] = arg.split("=", 1)[1]
        elif arg.startswith("--") and i + 1 < len(argv):
            options[arg] = argv[i + 1]
    config = options.get("--config")
    if config is None or os.path.realpath(os.path.join(cwd, config)) != topology:
        return None
    if SHIPPER in argv:
        return SHIPPER
    return options.get("--site") if "serve" in argv else None


def _vstore_export(argv: list[str], cwd: str, lab: str) -> bool:
    """Whether `argv` is `vstore export LAB` of this lab (a relative LAB taken from `cwd`)."""
    if not any(a == "vstore.cli" or os.path.basename(a) == "vstore" for a in argv[:3]) or EXPORT not in argv:
        return False
    at = argv.index(EXPORT)
    return at + 1 < len(argv) and os.path.realpath(os.path.join(cwd, argv[at + 1])) == lab


def lab_processes(lab: Path) -> dict[int, str]:
    """pid -> name (a site or "shipper") of every running process of the lab: the ones its pid
    files name, and every `vstore serve|shipper` whose command line names its topology.toml."""
    found = {pid: name for name in ALL_PROCESSES if (pid := running_pid(lab, name))}
    topology = os.path.realpath(lab / "topology.toml")
    try:
        entries = [e.name for e in os.scandir("/proc") if e.name.isdigit()]
    except OSError:
        return found  # no /proc: the pid files are all there is
    for entry in entries:
        pid = int(entry)
        if pid == os.getpid() or pid in found:
            continue
        try:
            raw = Path(f"/proc/{pid}/cmdline").read_bytes()
            cwd = os.readlink(f"/proc/{pid}/cwd")
        except OSError:
            continue  # gone meanwhile, or another user's
        argv = [a.decode(errors="replace") for a in raw.split(b"\0") if a]
        name = EXPORT if _vstore_export(argv, cwd, os.path.realpath(lab)) else _vstore_daemon(argv, cwd, topology)
        if name is not None and pids.alive(pid):
            found[pid] = name
    return found


def running_pid(lab: Path, site: str) -> int | None:
    """The pid of a lab process (`site` = a site or "shipper") while it runs, else None. A daemon
    started by this process (`lab up` inside a test or the demo) is our child and is reaped here."""
    return pids.running_pid(pid_file(lab, site))


PROCESSES = (*SITE_NAMES, SHIPPER)
ALL_PROCESSES = (*PROCESSES, EXPORT)  # what `lab down` stops, the export first


def is_up(lab: Path) -> bool:
    """A lab is up when any of its daemons (sites or shipper) is running."""
    return (lab / RUN_DIR).is_dir() and any(running_pid(lab, name) for name in PROCESSES)


def start_site(lab: Path, name: str, timeout: float = 15.0, *, listen: str = "127.0.0.1:10809") -> int:
    """Start a site's daemon (`name` = primary, sync or async) or the shipper process (`name` =
    "shipper", for the site running the application; `name` = "export": `vstore export` on
    `listen`) in the background; return its pid. Its pid
    file is written as soon as it exists; one that does not come up is stopped (and reaped, so
    that nothing it claimed is held any more) before the error is raised."""
    make_dir(lab / RUN_DIR, exist_ok=True)
    pid = running_pid(lab, name)
    if pid:
        return pid
    config = str((lab / "topology.toml").absolute())  # so that a scan of /proc finds it from anywhere
    if name == SHIPPER:
        site = lab_application_site(lab)
        if site is None:
            raise TricopyError(f"no site of {lab} runs the application: there is nothing to ship")
        argv = ["shipper", "--site", site, "--config", config]
    elif name == EXPORT:
        argv = ["export", str(lab.absolute()), "--listen", listen]
    else:
        argv = ["serve", "--site", name, "--config", config]
    ready = ready_file(lab, name)
    ready.unlink(missing_ok=True)
    log_path = lab / RUN_DIR / f"{name}.log"
    logfd = create_file(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        proc = subprocess.Popen([sys.executable, "-m", "vstore.cli", *argv], stdout=logfd, stderr=logfd,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    finally:
        os.close(logfd)
    try:
        write_file_atomic(pid_file(lab, name), f"{proc.pid}\n".encode(), durable=False)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                tail = log_path.read_text(errors="replace")[-400:].strip()
                raise TricopyError(f"the {name} daemon exited at start: {tail.splitlines()[-1] if tail else ''}")
            if pids.read_pid(ready) == proc.pid or (name == EXPORT and served.status_file(lab, proc.pid).exists()):
                return proc.pid
            time.sleep(0.02)
        raise TricopyError(f"the {name} daemon did not come up within {timeout:.0f}s; see {log_path}")
    except BaseException:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        if pids.read_pid(pid_file(lab, name)) == proc.pid:
            pid_file(lab, name).unlink(missing_ok=True)
        raise


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


def lab_up(lab: Path, *, export: str | None = None) -> dict[str, int]:
    """Start the daemon of every site present, then the shipper of the site running the application,
    then (`export` = HOST:PORT) the NBD export of the application's volume.
    Refused before anything starts while another whole-lab command runs (`whole_lab`) or a process
    has the lab open (`check_lab_free`)."""
    topo = load_topology(lab)
    load_key(lab / topo.key_file)  # refuse a bad key before starting anything
    with whole_lab(lab, "being started", wait=0):
        check_lab_free(lab)
        app_site = lab_application_site(lab)
        order = sorted((s for s in SITE_NAMES if (lab / s).is_dir()), key=lambda s: s == app_site)
        names = order + ([SHIPPER] if app_site in order else [])  # the application's site, then the shipper
        already = {name for name in names if running_pid(lab, name)}
        started: dict[str, int] = {}
        try:
            for name in names:
                started[name] = start_site(lab, name)
            if export is not None:
                started[EXPORT] = start_site(lab, EXPORT, listen=export)
        except TricopyError as exc:
            undone = [name for name in reversed(list(started)) if name not in already and stop_site(lab, name)]
            note = f"; stopped again what this call had started ({', '.join(undone)})" if undone else ""
            raise TricopyError(f"{exc}{note}") from None
        return started


def _stop(lab: Path, name: str, found: list[int], timeout: float) -> None:
    """SIGTERM to the processes `found` of one name, then SIGKILL to those still running after `timeout`."""
    for pid in found:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            continue
        except PermissionError:
            raise TricopyError(f"the {name} process of {lab} (pid {pid}) belongs to another user; "
                               f"ask them, or root, to stop it: kill {pid}") from None
    deadline = time.monotonic() + timeout
    while any(pids.alive(pid) for pid in found) and time.monotonic() < deadline:
        time.sleep(0.02)
    for pid in found:
        if pids.alive(pid):
            log.warning("the %s daemon (pid %d) did not stop within %.0fs: killing it", name, pid, timeout)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            pids.alive(pid)
    pid_file(lab, name).unlink(missing_ok=True)
    ready_file(lab, name).unlink(missing_ok=True)


def stop_site(lab: Path, name: str, timeout: float = 10.0) -> bool:
    """Stop every process of the lab called `name` (its pid file's, and any other found in /proc);
    False when none was running."""
    found = [pid for pid, n in lab_processes(lab).items() if n == name]
    _stop(lab, name, found, timeout)
    return bool(found)


def lab_down(lab: Path) -> list[str]:
    """Stop the shipper, then the site daemons (every process of the lab, `lab_processes`);
    returns the names of those that were running."""
    with whole_lab(lab, "being stopped"):
        running = lab_processes(lab)
        stopped = []
        for name in (EXPORT, SHIPPER, *SITE_NAMES):
            found = [pid for pid, n in running.items() if n == name]
            _stop(lab, name, found, 10.0)
            if found:
                stopped.append(name)
        return stopped


@contextlib.contextmanager
def quiesced(lab: Path, say: Any = None) -> Iterator[list[str]]:
    """Run a disaster procedure (failover, failback, recovery) with the lab's daemons stopped, then
    start the daemons of every site that exists afterwards (with their new roles). The procedures
    create, copy and re-role whole site directories, which no daemon may serve meanwhile. Yields the
    sites whose daemons were stopped (empty when the lab was down, and then nothing is started).
    The lab's control claim is held throughout (`whole_lab`): no `lab up` starts daemons meanwhile."""
    with whole_lab(lab, "changed by a procedure"):
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
