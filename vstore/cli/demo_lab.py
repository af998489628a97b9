"""What `vstore demo LAB` does to its lab and reads from it (SPEC §4, §8 [0171]-[0173]; DESIGN.md
"Surfaces"; DESIGN invariants 1 and 2): the files' content, the options' checks, the far link, the
kill of the primary host, the write loop, the recovery at the Sync site, and the probes that
measure what was lost. `vstore.cli.demo` runs these as named stages.

Keeps true:
- File contents are a pure function of the file's path and size (`content_for`), so anyone can
  recompute them and every read-back compares against it.
- A file counts as written once `write_file` returned: every block of it acknowledged, so the Sync
  site has it.
- The kill is one moment for the whole primary host: every process of it gets SIGKILL and is
  waited for; the images are read only after the survivors' daemons are down, read-only, with the
  metadata log replayed in memory.
"""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from jfs.fs import FileSystem, mkfs, open_image
from vstore.blocks.errors import TricopyError
from vstore.blocks.pids import alive
from vstore.blocks.units import format_size
from vstore.cli.common import progress_bars
from vstore.cli.demo_report import DEMO_DIR, DemoResult, Ui
from vstore.daemons.processes import clients, coordinator, running_pid
from vstore.lab.topology import load_topology
from vstore.net.keys import load_key
from vstore.net.linkproxy import LinkProxy, ProxyError
from vstore.net.rpc import JOURNAL_APPLIED, STATUS
from vstore.procedures.reactions import open_system
from vstore.procedures.recovery import recover
from vstore.targets import open_lab_target

log = logging.getLogger("vstore.demo")

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


# -- options ----------------------------------------------------------------------------------------
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


# -- the far link and the kill ----------------------------------------------------------------------
def far_link_wanted(opts: DemoOptions) -> bool:
    return opts.async_delay_ms > 0 or opts.async_bandwidth is not None or opts.auto_bandwidth is not None


def start_far_link(base_port: int, opts: DemoOptions) -> LinkProxy:
    """The relay that puts the Async site far away for the connections the primary host makes to it
    (vstore.net.linkproxy: bandwidth, delay, a bounded wire with backpressure, `sever()` for the kill)."""
    listen, target = ("127.0.0.1", base_port + 3), ("127.0.0.1", base_port + 2)
    try:
        return LinkProxy(listen, target, delay_ms=opts.async_delay_ms, bandwidth=opts.async_bandwidth).start()
    except ProxyError as exc:
        raise TricopyError(f"the emulated far link on port {base_port + 3}: {exc}; choose another --base-port") \
            from None


def kill_primary_host(lab: Path) -> dict[str, int]:
    """SIGKILL every process of the primary host, and wait until they are gone."""
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


# -- measuring --------------------------------------------------------------------------------------
def unreadable(fs: FileSystem, files: list[dict]) -> list[str]:
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


def read_back(lab: Path, files: list[dict]) -> list[str]:
    """Acknowledged files that the application (now at the Sync site) cannot read back intact."""
    device = open_lab_target(f"lab:{lab}", writable=False)
    try:
        return unreadable(FileSystem.mount(device, readonly=True), files)
    finally:
        device.close()


def settled_applied_seq(lab: Path, timeout: float = 3.0) -> int | None:
    """The Async site's last applied entry once it stopped changing (it finishes what arrived)."""
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


# -- writing and recovering -------------------------------------------------------------------------
def write_files(lab: Path, opts: DemoOptions, ui: Ui, result: DemoResult, link: LinkProxy | None) -> None:
    """mkfs and the files, through the primary's daemon; a file counts once `write_file` returned
    (every block of it acknowledged, so the Sync site has it). The file system stays mounted: the
    application is still running when the primary dies."""
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
    with progress_bars(ui.quiet or ui.as_json) as progress, open_system(lab) as system:
        report, steps = recover(system, "sync", progress)
        system.save()
    for line in steps.steps:
        log.info("recover: %s", line)
    return report.to_json()


