"""`vstore demo LAB`: the whole story in one command (issue "vstore demo LAB"; SPEC §1 [0013]-[0015],
§4 and §8 [0171]-[0173]; DESIGN invariants 1 and 2).

Creates a provider-mode lab (embodiment 4), brings its daemons up with the Async site behind a far
link (a `vstore.linkproxy` relay on the primary-async link: limited bandwidth, optional delay), writes files
through jfs on `lab:LAB` with a live progress bar, kills every process of the primary host with
SIGKILL and deletes the primary site's directory (the site is lost), recovers at the Sync site
(`vstore.recovery.recover`: touched files only) and reports what was lost.

The far link has 30 ms of one-way delay by default (application writes wait only for the Sync site,
so the delay is felt by shipping alone), and its bandwidth is by default "auto": unlimited while
the file system is made, then set to 85% of the rate at which the first files' entries crossed it,
so the burst of writes outruns the link a little, as a burst does on a WAN sized for the average
load.

Keeps true:
- It never touches an existing lab: LAB must not exist or be an empty directory (one-sentence
  error otherwise, nothing changed).
- The report is measured, never assumed. "Lost at Sync" is every acknowledged file whose content,
  read from the Sync site's image C after the kill, differs from what was written (invariant 1
  says: none, and the command fails loudly if any). "In flight at Async" is every acknowledged file
  missing or different in the Async site's image D after the kill and before recovery, read
  read-only with jfs (invariant 2: D is a prefix, so these are the newest files); it may be empty
  when shipping caught up, and the output says so.
- The kill is one moment for the whole primary site: the relay first severs the primary's end
  (bytes not yet transmitted are lost, bytes already on the wire arrive), then SIGKILL.
- File contents are a pure function of the file's path and size (`content_for`), so anyone can
  recompute them; the JSON also carries each file's SHA-256.
- When the demo ends, successfully or not, nothing it started is left half-running: the relay is
  stopped, the topology no longer routes through it, and the daemons are either up with their new
  roles (`--keep-up`, the default) or stopped (`--down`, or after an error).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from vstore.blocks.errors import TricopyError
from vstore.blocks.units import format_size, parse_size
from vstore.net.linkproxy import LinkProxy, ProxyError
from vstore.net.rpc import JOURNAL_APPLIED, STATUS
from vstore.procedures.create import free_base_port

log = logging.getLogger("vstore.demo")

DEMO_DIR = "/demo"
PRIMARY_HOST_PROCESSES = ("primary", "shipper")  # the primary host's daemon and its shipper process
TRIM_EVERY_S = 1.0  # the application's file system trims its metadata log this often [0168]-[0170]
CATCH_UP_TIMEOUT_S = 30.0
LOG_FULL_WAIT_S = 120.0
AUTO_FRACTION = 0.85
MIN_BANDWIDTH = 16 << 10


# -- content ----------------------------------------------------------------------------------------
def file_path(index: int) -> str:
    return f"{DEMO_DIR}/file-{index:05d}.txt"


def content_for(path: str, size: int) -> bytes:
    """The bytes the demo writes to `path`: readable numbered lines naming the file, cut at `size`."""
    lines, n, total = [], 0, 0
    while total < size:
        line = f"{path} line {n:06d} written by vstore demo\n"
        lines.append(line)
        total += len(line)
        n += 1
    return "".join(lines).encode()[:size]


# -- the demo ---------------------------------------------------------------------------------------
@dataclass
class DemoOptions:
    files: int = 100
    file_size: int = 8192
    size: int = 64 << 20
    base_port: int | None = None
    async_delay_ms: float = 30.0
    async_bandwidth: int | None = None  # bytes/s; None: unlimited (or auto)
    auto_bandwidth: float | None = AUTO_FRACTION  # set the bandwidth to this share of the measured rate
    keep_up: bool = True


@dataclass
class DemoResult:
    lab: str
    files: list[dict] = field(default_factory=list)  # acknowledged: {"path", "bytes", "sha256"}
    lost_at_sync: list[str] = field(default_factory=list)
    in_flight_at_async: list[str] = field(default_factory=list)
    async_note: str | None = None
    recovery: dict = field(default_factory=dict)
    missing_at_new_primary: list[str] = field(default_factory=list)
    killed: dict[str, int] = field(default_factory=dict)
    async_link: dict = field(default_factory=dict)
    async_applied_seq: int | None = None
    timings: dict[str, float] = field(default_factory=dict)
    daemons: str = "down"
    seconds: float = 0.0
    options: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"lab": self.lab, "files_written": len(self.files),
                "bytes_written": sum(f["bytes"] for f in self.files), "files": self.files,
                "lost_at_sync": self.lost_at_sync, "in_flight_at_async": self.in_flight_at_async,
                "async_note": self.async_note, "async_applied_seq": self.async_applied_seq,
                "recovery": self.recovery, "new_primary": "sync",
                "missing_at_new_primary": self.missing_at_new_primary, "killed": self.killed,
                "async_link": self.async_link, "daemons": self.daemons, "timings": self.timings,
                "options": self.options, "seconds": round(self.seconds, 3)}


class Ui:
    """Step lines and progress bars (stdout for humans; stderr or nothing with --json / --quiet)."""

    def __init__(self, *, quiet: bool, as_json: bool) -> None:
        self.quiet, self.as_json = quiet, as_json
        self.console = Console(stderr=as_json)

    def step(self, name: str, text: str) -> None:
        log.info("demo %s: %s", name, text)
        if not self.quiet:
            self.console.print(f"[bold cyan]{name:>8}[/] {text}", highlight=False, soft_wrap=True)

    def progress(self) -> Progress | None:
        if self.quiet or self.as_json:
            return None
        return Progress(TextColumn("{task.description}"), BarColumn(bar_width=30),
                        TextColumn("{task.fields[files]}/{task.fields[total_files]} files, {task.fields[written]}"),
                        TimeElapsedColumn(), TextColumn("[yellow]{task.fields[backlog]}"),
                        console=Console(stderr=True), transient=False)


def check_lab_path(lab: Path) -> None:
    if lab.exists() and (not lab.is_dir() or any(lab.iterdir())):
        raise TricopyError(f"{lab} already exists and is not empty; the demo creates its own lab, so name a new "
                           "directory (nothing was changed)")


def check_options(opts: DemoOptions) -> None:
    if opts.files < 1:
        raise TricopyError("--files must be at least 1")
    if opts.file_size < 1:
        raise TricopyError("--file-size must be at least 1 byte")
    blocks_needed = opts.files * (-(-opts.file_size // 4096) + 1)
    if blocks_needed * 4096 > opts.size // 2:
        raise TricopyError(f"{opts.files} files of {format_size(opts.file_size)} do not fit comfortably in a "
                           f"{format_size(opts.size)} volume; pass a larger --size or fewer --files")
    if opts.base_port is not None and not 1024 <= opts.base_port <= 65531:
        raise TricopyError("--base-port must be between 1024 and 65531 (the lab uses it and the next three ports)")
    if opts.async_delay_ms < 0:
        raise TricopyError("--async-delay must not be negative")


def far_link_wanted(opts: DemoOptions) -> bool:
    return opts.async_delay_ms > 0 or opts.async_bandwidth is not None or opts.auto_bandwidth is not None


def start_far_link(base_port: int, opts: DemoOptions) -> LinkProxy:
    """The relay that puts the Async site far away for the connections the primary host makes to it
    (vstore.linkproxy: bandwidth, delay, a bounded wire with backpressure, `sever()` for the kill)."""
    listen, target = ("127.0.0.1", base_port + 3), ("127.0.0.1", base_port + 2)
    try:
        return LinkProxy(listen, target, delay_ms=opts.async_delay_ms, bandwidth=opts.async_bandwidth).start()
    except ProxyError as exc:
        raise TricopyError(f"the emulated far link on port {base_port + 3}: {exc}; choose another --base-port") \
            from None


def kill_primary_host(lab: Path) -> dict[str, int]:
    """SIGKILL every process of the primary host, and wait until they are gone."""
    from vstore.blocks.pids import alive
    from vstore.daemons.processes import running_pid
    killed = {}
    for name in PRIMARY_HOST_PROCESSES:
        pid = running_pid(lab, name)
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
            killed[name] = pid
    deadline = time.monotonic() + 10
    while any(alive(pid) for pid in killed.values()):
        if time.monotonic() > deadline:
            raise TricopyError(f"the primary host's processes {sorted(killed.values())} did not die after SIGKILL")
        time.sleep(0.01)
    return killed


def unreadable(fs: Any, files: list[dict]) -> list[str]:
    """The files of `files` that `fs` does not hold with the content the demo wrote."""
    bad = []
    for f in files:
        try:
            same = fs.read(f["path"]) == content_for(f["path"], f["bytes"])
        except TricopyError:
            same = False
        if not same:
            bad.append(f["path"])
    return bad


def compare_files(image: Path, files: list[dict]) -> tuple[list[str], str | None]:
    """The files of `files` whose content in the jfs on `image` (opened read-only, log replayed in
    memory) is missing or differs from `content_for`; plus a note when the image has no jfs at all."""
    from jfs.fs import FileSystem, open_image
    try:
        device = open_image(image, readonly=True)
    except TricopyError as exc:
        return [f["path"] for f in files], f"{image.name} holds no readable file system ({exc})"
    try:
        try:
            fs = FileSystem.mount(device, readonly=True)
        except TricopyError as exc:
            return [f["path"] for f in files], f"{image.name} holds no readable file system ({exc})"
        return unreadable(fs, files), None
    finally:
        device.close()


def settled_applied_seq(lab: Path, timeout: float = 3.0) -> int | None:
    """The Async site's last applied entry once it stopped changing (it finishes what arrived)."""
    from vstore.daemons.processes import clients
    from vstore.lab.topology import load_topology
    from vstore.net.keys import load_key
    topo = load_topology(lab)
    last: int | None = None
    deadline = time.monotonic() + timeout
    with clients(lab, topo, load_key(lab / topo.key_file))["async"] as client:
        while time.monotonic() < deadline:
            try:
                seq = int(client.call(JOURNAL_APPLIED)[0]["applied_seq"])
            except TricopyError:
                return last
            if seq == last:
                return seq
            last = seq
            time.sleep(0.15)
    return last


def async_backlog(lab: Path) -> int | None:
    """Entries waiting for the Async site, from the coordinating daemon (None if it does not answer)."""
    from vstore.daemons.processes import coordinator
    try:
        with coordinator(lab) as client:
            doc = client.call(STATUS)[0]["status"]
        return sum(p["entries_waiting"] for p in doc["pairs"] if p["kind"] == "async")
    except (TricopyError, OSError):
        return None


def wait_for_async(lab: Path, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if async_backlog(lab) == 0:
            return True
        time.sleep(0.1)
    return False


class BacklogWatcher:
    """Polls the Async backlog once a second in the background for the progress bar."""

    def __init__(self, lab: Path) -> None:
        self.lab, self.stop = lab, threading.Event()
        self.value: int | None = None
        self.thread = threading.Thread(target=self._run, name="backlog", daemon=True)

    def _run(self) -> None:
        while not self.stop.wait(1.0):
            self.value = async_backlog(self.lab)

    def text(self) -> str:
        return "" if self.value is None else f"{self.value} entries to ship"


def calibration_files(files: int) -> int:
    """How many of the files are written over an unlimited link to measure the entry rate (auto)."""
    return max(1, min(20, files // 5))


def write_files(lab: Path, opts: DemoOptions, ui: Ui, result: DemoResult, link: LinkProxy | None) -> None:
    """mkfs and the files, through the primary's daemon; a file counts once `write_file` returned
    (every block of it acknowledged, so the Sync site has it). The file system stays mounted: the
    application is still running when the primary dies."""
    from jfs.fs import FileSystem, mkfs
    from vstore.targets import open_lab_target
    device = open_lab_target(f"lab:{lab}", writable=True)
    try:
        mkfs(device, label="demo")
        fs = FileSystem.mount(device, log_full_wait=LOG_FULL_WAIT_S)  # a full log waits for shipping
        fs.mkdir(DEMO_DIR)
        caught_up = wait_for_async(lab, CATCH_UP_TIMEOUT_S)
        fs.trim()
        ui.step("mkfs", f"jfs on lab:{lab} with {DEMO_DIR}/; the Async site "
                + ("has it" if caught_up else f"has not caught up after {CATCH_UP_TIMEOUT_S:.0f}s (going on)"))
        auto = link is not None and opts.auto_bandwidth is not None
        calibrate = calibration_files(opts.files) if auto else 0
        bars = ui.progress()
        watcher = BacklogWatcher(lab)
        watcher.thread.start()
        last_trim = measured_from = time.monotonic()
        sent_before = link.stats()["bytes_up"] if link is not None else 0
        try:
            task = None
            if bars is not None:
                bars.start()
                task = bars.add_task("writing", total=opts.files * opts.file_size, files=0,
                                     total_files=opts.files, written=format_size(0), backlog="")
            for i in range(opts.files):
                path = file_path(i)
                data = content_for(path, opts.file_size)
                fs.write_file(path, data)
                result.files.append({"path": path, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})
                if auto and i + 1 == calibrate and link is not None and opts.auto_bandwidth is not None:
                    rate = (link.stats()["bytes_up"] - sent_before) / max(time.monotonic() - measured_from, 1e-3)
                    bandwidth = max(MIN_BANDWIDTH, int(rate * opts.auto_bandwidth))
                    link.set_bandwidth(bandwidth)
                    result.async_link["bandwidth"] = bandwidth
                    log.info("far link: %d B/s measured over %d files; bandwidth set to %d B/s", rate, calibrate,
                             bandwidth)
                if time.monotonic() - last_trim >= TRIM_EVERY_S:
                    fs.trim()
                    last_trim = time.monotonic()
                if bars is not None and task is not None:
                    bars.update(task, advance=len(data), files=i + 1, backlog=watcher.text(),
                                written=format_size((i + 1) * opts.file_size))
        finally:
            watcher.stop.set()
            if bars is not None:
                bars.stop()
    finally:
        device.close()


def recover_at_sync(lab: Path, ui: Ui) -> dict:
    """`vstore recover LAB --to sync` on the lab (its daemons are down): touched files C -> D."""
    from vstore.lab.system import System
    from vstore.procedures.recovery import recover
    bars = None if ui.quiet or ui.as_json else Progress(
        TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} blocks"),
        TimeElapsedColumn(), console=Console(stderr=True))

    def progress(description: str, total: int) -> Any:
        if bars is None or total <= 0:
            return lambda n: None
        task = bars.add_task(description, total=total)
        return lambda n: bars.advance(task, n)

    if bars is not None:
        bars.start()
    try:
        with System(lab) as system:
            report, steps = recover(system, "sync", progress)
            system.save()
    finally:
        if bars is not None:
            bars.stop()
    for line in steps.steps:
        log.info("recover: %s", line)
    return report.to_json()


@contextlib.contextmanager
def interruptible() -> Iterator[threading.Event]:
    """Ctrl-C and SIGTERM unwind as KeyboardInterrupt, so the demo still stops the daemons and the
    relay it started; the event records that the user asked to stop (a clean-up step may turn the
    interrupt into another error on its way out)."""
    asked = threading.Event()

    def interrupt(signum: int, frame: Any) -> None:
        asked.set()
        raise KeyboardInterrupt

    previous = {}
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, interrupt)
    except ValueError:  # not the main thread: leave signals alone
        pass
    try:
        yield asked
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class DemoInterrupted(Exception):
    """The user stopped the demo (Ctrl-C or SIGTERM) after the lab was created."""


def run_demo(lab: Path, opts: DemoOptions, ui: Ui) -> DemoResult:
    with interruptible() as asked:
        return _run_demo(lab, opts, ui, asked)


def _run_demo(lab: Path, opts: DemoOptions, ui: Ui, asked: threading.Event) -> DemoResult:
    from vstore.daemons.processes import is_up, lab_down, lab_up
    from vstore.procedures.create import init_lab
    started = time.monotonic()
    check_options(opts)
    check_lab_path(lab)
    base_port = opts.base_port if opts.base_port is not None else free_base_port(4)
    result = DemoResult(lab=str(lab), options={
        "files": opts.files, "file_size": opts.file_size, "size": opts.size, "base_port": base_port,
        "keep_up": opts.keep_up})
    mark = time.monotonic()

    stage = "init"

    def timed(name: str, following: str) -> None:
        nonlocal mark, stage
        now = time.monotonic()
        result.timings[name] = round(now - mark, 3)
        mark, stage = now, following

    init_lab(lab, mode="provider", size=opts.size, base_port=base_port)
    topology = lab / "topology.toml"
    plain_topology = topology.read_text()
    timed("init", "up")
    ui.step("init", f"provider-mode lab {lab} ({format_size(opts.size)} volumes A, C, D; daemons on 127.0.0.1:"
            f"{base_port}-{base_port + 2}); every pair Duplex")
    link: LinkProxy | None = None
    try:
        if far_link_wanted(opts):
            link = start_far_link(base_port, opts)
            topology.write_text(plain_topology + f'\n[links.primary-async]\nvia = "127.0.0.1:{base_port + 3}"\n')
        result.async_link = {"relay": link is not None, "delay_ms": opts.async_delay_ms,
                             "bandwidth": opts.async_bandwidth, "auto": opts.auto_bandwidth is not None}
        lab_up(lab)
        timed("up", "write")
        if link is None:
            far = "the Async site is near (no emulated far link)"
        else:
            if opts.auto_bandwidth is not None:
                rate = (f"bandwidth {opts.auto_bandwidth:.0%} of the entry rate measured over the first "
                        f"{calibration_files(opts.files)} file(s)")
            else:
                rate = f"{format_size(opts.async_bandwidth)}/s" if opts.async_bandwidth else "unlimited bandwidth"
            far = f"the Async site is far: {rate}" + (f", {opts.async_delay_ms:g} ms each way"
                                                       if opts.async_delay_ms else "")
        ui.step("up", f"daemons of primary, sync and async running; {far}")

        write_files(lab, opts, ui, result, link)
        timed("write", "kill")
        linked = (f"; the far link ran at {format_size(result.async_link['bandwidth'])}/s"
                  if result.async_link.get("bandwidth") else "")
        ui.step("writing", f"{len(result.files)} files ({format_size(opts.files * opts.file_size)}) written "
                f"through jfs on lab:{lab} and acknowledged, each only once the Sync site had it{linked}")

        if link is not None:
            link.sever()  # the primary site's end of its far link goes with it
        result.killed = kill_primary_host(lab)
        timed("kill", "check")
        victims = ", ".join(f"{n} (pid {p})" for n, p in result.killed.items()) or "nothing (no process was running)"
        ui.step("kill", f"SIGKILL {victims}; the primary site is lost")
        if link is not None:
            link.drain(timeout=opts.async_delay_ms / 1000 + 2.0)  # what was already on the wire still arrives
            link.stop()
            link = None
        result.async_applied_seq = settled_applied_seq(lab)
        lab_down(lab)  # the survivors, so that their images can be read as they are
        topology.write_text(plain_topology)  # no relay any more
        shutil.rmtree(lab / "primary")
        result.lost_at_sync, _ = compare_files(lab / "sync" / "C.img", result.files)
        result.in_flight_at_async, result.async_note = compare_files(lab / "async" / "D.img", result.files)
        timed("check", "recover")
        ui.step("check", f"Sync site: {len(result.files) - len(result.lost_at_sync)} of {len(result.files)} "
                f"files intact; Async site: {len(result.in_flight_at_async)} file(s) were still in flight")

        result.recovery = recover_at_sync(lab, ui)
        timed("recover", "verify")
        rec = result.recovery
        ui.step("recover", f"at the Sync site: {rec['touched_files']} touched files, "
                f"{format_size(rec['bytes_copied'])} copied to the Async site instead of "
                f"{format_size(rec['full_copy_bytes'])}; async copy C -> D re-established")
        if opts.keep_up:
            lab_up(lab)
            result.daemons = "up"
        result.missing_at_new_primary = read_back(lab, result.files)
        timed("verify", "done")
        ui.step("verify", f"{len(result.files) - len(result.missing_at_new_primary)} of {len(result.files)} "
                f"acknowledged files read back from the new primary (lab:{lab}, now the Sync site)")
    except BaseException as exc:
        interrupted = asked.is_set() or isinstance(exc, KeyboardInterrupt)
        if not interrupted:
            log.warning("demo stopped at step %s: %s; stopping what it started", stage, exc)
        if link is not None:
            link.stop()
        if lab.is_dir() and is_up(lab):
            lab_down(lab)
        if topology.is_file() and topology.read_text() != plain_topology:
            topology.write_text(plain_topology)
        if interrupted:
            raise DemoInterrupted(f"interrupted at step {stage!r}; the lab in {lab} is left with its daemons "
                                  "stopped") from None
        if isinstance(exc, TricopyError):
            raise TricopyError(f"the demo stopped at step {stage!r}: {exc} (the lab in {lab} is left with its "
                               "daemons stopped)") from None
        raise
    result.seconds = time.monotonic() - started
    return result


def read_back(lab: Path, files: list[dict]) -> list[str]:
    """Acknowledged files that the application (now at the Sync site) cannot read back intact."""
    from jfs.fs import FileSystem
    from vstore.targets import open_lab_target
    device = open_lab_target(f"lab:{lab}", writable=False)
    try:
        return unreadable(FileSystem.mount(device, readonly=True), files)
    finally:
        device.close()


def listing(paths: list[str], limit: int = 8) -> str:
    shown = ", ".join(p.removeprefix(DEMO_DIR + "/") for p in paths[:limit])
    return shown + (f" ... and {len(paths) - limit} more" if len(paths) > limit else "")


def print_report(result: DemoResult, console: Console) -> None:
    n = len(result.files)
    nbytes = sum(f["bytes"] for f in result.files)
    rec = result.recovery
    table = Table(title=f"vstore demo {result.lab}", show_header=True)
    table.add_column("what")
    table.add_column("result")
    table.add_row("written and acknowledged", f"{n} files ({format_size(nbytes)})")
    table.add_row("lost at Sync (C)", "[green]nothing[/]: every acknowledged file read back identical from C"
                  if not result.lost_at_sync else f"[bold red]{len(result.lost_at_sync)} files:[/] "
                  f"{listing(result.lost_at_sync)}")
    written = [f["path"] for f in result.files]
    if result.in_flight_at_async:
        count = len(result.in_flight_at_async)
        if result.in_flight_at_async == written[-count:]:
            names = [p.removeprefix(DEMO_DIR + "/") for p in result.in_flight_at_async]
            inflight = f"[yellow]{count} files[/], the newest: {names[0]}" + (f" to {names[-1]}" if count > 1 else "")
        else:
            inflight = f"[yellow]{count} files[/]: {listing(result.in_flight_at_async)}"
    else:
        inflight = "[green]none[/]: shipping had caught up with every acknowledged file when the primary died"
    if result.async_note:
        inflight += f" ({result.async_note})"
    table.add_row("in flight at Async (D)", inflight)
    ratio = rec["full_copy_bytes"] / rec["bytes_copied"] if rec.get("bytes_copied") else float("inf")
    table.add_row("recovery at Sync", f"{rec['touched_files']} touched files, {rec['blocks_copied']} blocks "
                  f"({format_size(rec['bytes_copied'])}) copied C -> D instead of {format_size(rec['full_copy_bytes'])}"
                  f" ({ratio:.0f}x less) in {rec['seconds']:.2f}s"
                  + (" [yellow](full copy: the log could not prove what changed)[/]"
                     if rec.get("fallback_full_copy") else ""))
    table.add_row("new primary", "the Sync site: " + ("[green]every acknowledged file readable[/]"
                  if not result.missing_at_new_primary else
                  f"[bold red]{len(result.missing_at_new_primary)} files unreadable:[/] "
                  f"{listing(result.missing_at_new_primary)}"))
    table.add_row("daemons", "running: the Sync site runs the application, async copy C -> D"
                  if result.daemons == "up" else "stopped (`vstore lab up` starts them with the new roles)")
    table.add_row("took", f"{result.seconds:.1f}s")
    console.print(table)
    lab = result.lab
    first = result.files[0]["path"]
    console.print(f"try: jfs read lab:{lab} {first} | head -3;  vstore status {lab};  vstore failback {lab}"
                  + (f";  vstore lab down {lab}" if result.daemons == "up" else ""), highlight=False, soft_wrap=True)


def register(app: typer.Typer) -> None:
    """Add `vstore demo` to a typer app."""

    @app.command("demo")
    def demo_command(
        lab: Annotated[Path, typer.Argument(help="A new lab directory (must not exist, or be empty).",
                                            show_default=False)],
        files: Annotated[int, typer.Option("--files", help="How many files to write.")] = 100,
        file_size: Annotated[str, typer.Option("--file-size", help="Size of each file, e.g. 8K.")] = "8K",
        size: Annotated[str, typer.Option("--size", help="Size of every volume.")] = "64M",
        base_port: Annotated[int | None, typer.Option("--base-port", help="TCP port of the primary's daemon; sync, "
                                                      "async and the far-link relay use the next three "
                                                      "(default: free ports below the ephemeral range).")] = None,
        async_bandwidth: Annotated[str, typer.Option("--async-bandwidth", help="Bandwidth of the primary -> "
                                                     "async link per second: auto (85% of the rate the first "
                                                     "files need, so the Async site falls behind during the "
                                                     "writes), a size such as 256K, or 0 for unlimited.")
                                   ] = "auto",
        async_delay: Annotated[float, typer.Option("--async-delay", help="One-way delay (ms) added on that link: "
                                                   "a far Async site (0: none).")] = 30.0,
        keep_up: Annotated[bool, typer.Option("--keep-up/--down", help="Leave the daemons running at the end "
                                              "(default; stop them with `vstore lab down LAB`), or stop them.")] = True,
        as_json: Annotated[bool, typer.Option("--json", help="One JSON document on stdout (steps go to stderr).")
                           ] = False,
        quiet: Annotated[bool, typer.Option("--quiet", help="No step lines and no progress bars.")] = False,
    ) -> None:
        """The whole story in one command: create a provider-mode lab (embodiment 4) in LAB, start its
        daemons with the Async site far away (a loopback relay limits the bandwidth of the primary ->
        async link), write files through jfs with a live progress bar (each one acknowledged only once
        the Sync site has it), kill the primary host's processes with SIGKILL and delete LAB/primary (the
        site is lost), and recover at the Sync site, which copies only the touched files to the Async
        site and becomes the primary.

        The report says what was lost, measured, not assumed: at the Sync site nothing (every acknowledged
        file is read back from C and compared); at the Async site the files still in flight when the
        primary died (read from D before recovery; it may be none if shipping had caught up). Then every
        acknowledged file is read back from the new primary. Exit 1 if anything acknowledged was lost at
        the Sync site or is unreadable at the new primary.

        With the defaults it takes about ten seconds. The lab stays for exploring (`jfs ls lab:LAB /demo`,
        `vstore status LAB`, `vstore failback LAB`); remove it with `vstore lab down LAB && rm -rf LAB`.

        Example: vstore demo /tmp/demo --files 200   (afterwards: jfs ls lab:/tmp/demo /demo)
        """
        from vstore.cli.commands import die, user_errors
        ui = Ui(quiet=quiet, as_json=as_json)
        with user_errors():
            choice = async_bandwidth.strip().lower()
            bandwidth = None if choice in ("auto", "0", "off", "none") else parse_size(async_bandwidth)
            opts = DemoOptions(files=files, file_size=parse_size(file_size), size=parse_size(size),
                               base_port=base_port, async_delay_ms=async_delay, async_bandwidth=bandwidth,
                               auto_bandwidth=AUTO_FRACTION if choice == "auto" else None, keep_up=keep_up)
            try:
                result = run_demo(lab, opts, ui)
            except DemoInterrupted as exc:
                die(str(exc), 130)
        if as_json:
            print(json.dumps(result.to_json(), indent=2))
        else:
            print_report(result, ui.console)
        if result.lost_at_sync:
            die(f"{len(result.lost_at_sync)} acknowledged file(s) were lost at the Sync site, which must never "
                "happen (invariant 1); keep the lab for analysis")
        if result.missing_at_new_primary:
            die(f"{len(result.missing_at_new_primary)} acknowledged file(s) are not readable at the new primary; "
                "keep the lab for analysis")
