"""What `vstore demo LAB --ext4` does with a kernel file system on the replicated volume (SPEC §6
[0133]-[0135] embodiment 2, with §4 and §8 [0171]-[0173]; DESIGN invariants 1 and 2): the
application's volume attached as one file (`vstore attach`, through the daemons), a loop device and
the kernel's ext4 on it, the demo's files written and fsynced, the whole primary host killed, the
copies checked with e2fsprogs, and the ext4 mounted again at the Sync site. `vstore.cli.demo` runs
these as the same named stages as the jfs demo.

Keeps true:
- A file counts as written (acknowledged) once the fsync of the file and of its directory returned:
  the loop device turns it into a flush of the attached file, durable on A, C and the spool.
- File contents are `vstore.cli.demo_lab.content_for` of the same paths, so the same read-back
  rule holds: "lost at Sync" is every acknowledged file missing or different in a copy of C after
  `e2fsck -fy` (journal recovery); "in flight at Async" the same in a copy of D. A copy, never the
  image itself, is repaired, and an e2fsck that leaves errors (exit 4 or more) on a copy holding a
  file system is a problem the demo reports and fails on (write order, invariant 2).
- Everything the demo mounts is recorded in its `Ext4Stack` the moment it exists, and `release`
  takes it away innermost first (the ext4 mount, the loop device, the FUSE mount and its process),
  lazily where the device below is dead; the demo calls it after the kill, at the end of the
  verification and after any error or Ctrl-C, and it never raises.
- Root, loop devices, e2fsprogs and FUSE are checked before the lab is created; without them the
  demo stops with one sentence and changes nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from jfs.fuse import fuse_available
from jfs.mounts import is_mounted
from vstore.blocks.codec import fsync_path
from vstore.blocks.errors import TricopyError, brief
from vstore.blocks.pids import alive
from vstore.blocks.units import format_size
from vstore.cli.demo_lab import (
    CATCH_UP_TIMEOUT_S,
    MIN_BANDWIDTH,
    PRIMARY_HOST_PROCESSES,
    BacklogWatcher,
    DemoOptions,
    calibration_files,
    content_for,
    file_path,
    wait_for_async,
)
from vstore.cli.demo_report import DEMO_DIR, DemoResult, Ui
from vstore.daemons.processes import running_pid
from vstore.exports.attach import detach
from vstore.net.linkproxy import LinkProxy

log = logging.getLogger("vstore.demo")

WORK_DIR = "ext4"  # LAB/ext4: the mountpoints and the copies being checked
MKFS_OPTIONS = ("-q", "-F", "-L", "demo", "-E", "nodiscard,lazy_itable_init=0,lazy_journal_init=0")
TOOLS = ("losetup", "mkfs.ext4", "e2fsck", "debugfs", "dumpe2fs", "mount", "umount")
TOOL_TIMEOUT_S = 120.0
UNMOUNT_TIMEOUT_S = 30.0
LOOP_GONE_TIMEOUT_S = 10.0
FSCK_LEFT_ERRORS = 4  # e2fsck's exit bit: file system errors left uncorrected


# -- what the demo needs ----------------------------------------------------------------------------
def ext4_unavailable() -> str | None:
    """None when the ext4 demo can run here, else one sentence saying what is missing."""
    if os.geteuid() != 0:
        return "the ext4 demo needs root (loop devices and mount); run it as root or without --ext4"
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        return (f"the ext4 demo needs {', '.join(missing)}; install util-linux and e2fsprogs "
                "(apt-get install e2fsprogs) or run without --ext4")
    if not os.path.exists("/dev/loop-control"):
        return "the ext4 demo needs loop devices and /dev/loop-control is missing; modprobe loop or run without --ext4"
    why = fuse_available()
    if why is not None:
        return f"the ext4 demo needs FUSE: {why}"
    if shutil.which("fusermount3") is None and shutil.which("fusermount") is None:
        return "the ext4 demo needs fusermount3 (apt-get install fuse3) or run without --ext4"
    return None


def check_ext4_demo() -> None:
    why = ext4_unavailable()
    if why is not None:
        raise TricopyError(why)


def tool(*cmd: object, check: bool = True, timeout: float = TOOL_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    """Run a system tool; with `check`, a failure is one sentence naming the tool and its last words."""
    argv = [str(c) for c in cmd]
    try:
        res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise TricopyError(f"{argv[0]} did not finish within {timeout:.0f} s") from None
    if check and res.returncode != 0:
        lines = (res.stderr or res.stdout).strip().splitlines()
        raise TricopyError(f"{' '.join(argv[:2])} exited {res.returncode}: "
                           f"{brief(lines[-1] if lines else '', 200)}")
    return res


# -- what is mounted, and taking it away ------------------------------------------------------------
@dataclass
class Ext4Stack:
    """What the demo has mounted now: the attach (FUSE mountpoint and its process), the loop device
    on its file, the ext4 mountpoint. Each is set before the command that makes it runs, so an
    interrupt half way still leaves it recorded (a loop device not yet named is found by its file)."""

    attach_mp: Path | None = None
    attach_pid: int | None = None
    loop: str | None = None
    mount: Path | None = None

    def release(self) -> list[str]:
        """Take everything away, innermost first; returns what did not go cleanly (never raises)."""
        notes: list[str] = []
        for step in (self._unmount_ext4, self._detach_loops, self._detach_volume):
            try:
                step(notes)
            except (TricopyError, OSError) as exc:
                notes.append(f"{step.__name__.strip('_').replace('_', ' ')}: {exc}")
        for note in notes:
            log.warning("ext4 clean-up: %s", note)
        return notes

    def _unmount_ext4(self, notes: list[str]) -> None:
        if self.mount is not None and is_mounted(self.mount):
            if tool("umount", self.mount, check=False, timeout=UNMOUNT_TIMEOUT_S).returncode != 0:
                tool("umount", "-l", self.mount, check=False)
                notes.append(f"{self.mount} unmounted lazily")
        self.mount = None

    def _detach_loops(self, notes: list[str]) -> None:
        loops = [self.loop] if self.loop else []
        self.loop = None
        if self.attach_mp is not None and is_mounted(self.attach_mp):
            found = tool("losetup", "-n", "-O", "NAME", "-j", self.attach_mp / "A", check=False).stdout.split()
            loops += [dev for dev in found if dev not in loops]
        for dev in loops:
            tool("losetup", "-d", dev, check=False)
            if not loop_gone(dev):
                notes.append(f"{dev} is still attached")

    def _detach_volume(self, notes: list[str]) -> None:
        mp, pid = self.attach_mp, self.attach_pid
        if mp is None:
            return
        self.attach_mp = self.attach_pid = None
        if is_mounted(mp) and (pid is None or alive(pid)):
            try:
                detach(mp)
            except TricopyError as exc:
                notes.append(str(exc))
        if is_mounted(mp):
            fusermount = shutil.which("fusermount3") or shutil.which("fusermount") or "fusermount3"
            tool(fusermount, "-uz", mp, check=False)
        if pid is not None and alive(pid):
            os.kill(pid, signal.SIGTERM)
            notes.append(f"the attach process {pid} was stopped with SIGTERM")


def loop_gone(dev: str, timeout: float = LOOP_GONE_TIMEOUT_S) -> bool:
    """Wait until the loop device has no backing file any more (its release may be deferred)."""
    backing = Path("/sys/block") / Path(dev).name / "loop" / "backing_file"
    deadline = time.monotonic() + timeout
    while backing.exists():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def attach(lab: Path, mp: Path, stack: Ext4Stack) -> dict:
    """`vstore attach LAB MP --json`: the application's volume as MP/A, served by its own process."""
    mp.mkdir(parents=True, exist_ok=True)
    stack.attach_mp = mp
    res = tool(sys.executable, "-m", "vstore.cli", "attach", lab, mp, "--json")
    doc = json.loads(res.stdout.strip().splitlines()[-1])
    stack.attach_pid = int(doc["pid"])
    return doc


def mount_ext4(lab: Path, stack: Ext4Stack, *, mkfs: bool) -> tuple[dict, Path]:
    """Attach, loop device, (mkfs.ext4), mount; returns the attach document and the mountpoint."""
    work = lab / WORK_DIR
    doc = attach(lab, work / "attach", stack)
    stack.loop = tool("losetup", "--find", "--show", doc["file"]).stdout.strip()
    if mkfs:
        tool("mkfs.ext4", *MKFS_OPTIONS, stack.loop)
    else:  # the kernel replays the journal at mount, even read-only, when the file system needs it
        features = tool("dumpe2fs", "-h", stack.loop).stdout
        doc["journal_needed_recovery"] = any(line.startswith("Filesystem features:") and "needs_recovery" in line
                                             for line in features.splitlines())
    where = work / "mnt"
    where.mkdir(exist_ok=True)
    stack.mount = where
    tool("mount", *(() if mkfs else ("-o", "ro")), stack.loop, where)
    return doc, where


# -- reading files back -----------------------------------------------------------------------------
def mismatched(read: dict[str, bytes | None], files: list[dict]) -> list[str]:
    return [f["path"] for f in files if read.get(f["path"]) != content_for(f["path"], f["bytes"])]


def read_with_debugfs(image: Path, files: list[dict], scratch: Path) -> dict[str, bytes | None]:
    """Each file's bytes in the ext4 on `image` (None when absent), with one debugfs run."""
    scratch.mkdir(exist_ok=True)
    commands = scratch / "commands"
    commands.write_text("".join(f"dump {f['path']} {scratch / str(i)}\n" for i, f in enumerate(files)))
    tool("debugfs", "-f", commands, image)
    found: dict[str, bytes | None] = {}
    for i, f in enumerate(files):
        out = scratch / str(i)
        found[f["path"]] = out.read_bytes() if out.exists() else None
    shutil.rmtree(scratch)
    return found


def check_copy(image: Path, files: list[dict], work: Path) -> tuple[list[str], int, str | None]:
    """A copy of `image` repaired by `e2fsck -fy`: the files missing or different in it, e2fsck's
    exit status, and a note when the copy holds no file system e2fsck recognises."""
    copy = work / f"{image.stem}-check.img"
    shutil.copyfile(image, copy)
    try:
        rc = tool("e2fsck", "-fy", copy, check=False).returncode
        if rc >= 8:
            return [f["path"] for f in files], rc, f"{image.name} holds no ext4 e2fsck can open (exit {rc})"
        return mismatched(read_with_debugfs(copy, files, work / f"{image.stem}-files"), files), rc, None
    finally:
        copy.unlink(missing_ok=True)


# -- the stages' work -------------------------------------------------------------------------------
@dataclass
class Ext4Demo:
    """The ext4 side of one demo run: what is mounted, and what was measured (`info`, the report's
    "ext4" document)."""

    lab: Path
    stack: Ext4Stack = field(default_factory=Ext4Stack)
    info: dict = field(default_factory=dict)

    def release(self) -> list[str]:
        return self.stack.release()

    def write(self, opts: DemoOptions, ui: Ui, result: DemoResult, link: LinkProxy | None) -> str:
        """`vstore attach` through the daemons, a loop device, mkfs.ext4, mount, and the files, each
        fsynced with its directory; the ext4 stays mounted: the application runs when the primary dies."""
        doc, fs = mount_ext4(self.lab, self.stack, mkfs=True)
        self.info.update(mkfs="mkfs.ext4 " + " ".join(MKFS_OPTIONS), loop_device=self.stack.loop,
                         attached=doc["file"], through=doc["through"])
        (fs / DEMO_DIR.strip("/")).mkdir()
        fsync_path(fs / DEMO_DIR.strip("/"))
        fsync_path(fs)
        caught_up = wait_for_async(self.lab, CATCH_UP_TIMEOUT_S)
        behind = f"has not caught up after {CATCH_UP_TIMEOUT_S:.0f}s (going on)"
        ui.step("mkfs", f"ext4 on {self.stack.loop} over {doc['file']} (lab:{self.lab} through the "
                f"{doc['through']}) with {DEMO_DIR}/; the Async site " + ("has it" if caught_up else behind))
        auto = link is not None and opts.auto_bandwidth is not None
        calibrate = calibration_files(opts.files) if auto else 0
        bars = ui.progress()
        watcher = BacklogWatcher(self.lab)
        watcher.thread.start()
        measured_from = time.monotonic()
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
                with open(fs / path.lstrip("/"), "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                fsync_path(fs / DEMO_DIR.strip("/"))  # the name too
                result.files.append({"path": path, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})
                if auto and i + 1 == calibrate and link is not None and opts.auto_bandwidth is not None:
                    rate = (link.stats()["bytes_up"] - sent_before) / max(time.monotonic() - measured_from, 1e-3)
                    bandwidth = max(MIN_BANDWIDTH, int(rate * opts.auto_bandwidth))
                    link.set_bandwidth(bandwidth)
                    result.async_link["bandwidth"] = bandwidth
                    log.info("far link: %d B/s measured over %d files; bandwidth set to %d B/s", rate, calibrate,
                             bandwidth)
                if bars is not None and task is not None:
                    bars.update(task, advance=len(data), files=i + 1, backlog=watcher.text(),
                                written=format_size((i + 1) * opts.file_size))
        finally:
            watcher.stop.set()
            if bars is not None:
                bars.stop()
        return f"kernel ext4 on lab:{self.lab}"

    def kill(self) -> dict[str, int]:
        """SIGKILL the primary host at one moment: its daemon, its shipper and the attach process
        serving the application's ext4; then the dead ext4 mount, loop device and FUSE mount are
        taken away (the application's host is gone)."""
        pids = {name: running_pid(self.lab, name) for name in PRIMARY_HOST_PROCESSES}
        pids["attach"] = self.stack.attach_pid
        killed = {name: pid for name, pid in pids.items() if pid is not None and alive(pid)}
        for pid in killed.values():
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while any(alive(pid) for pid in killed.values()):
            if time.monotonic() > deadline:
                raise TricopyError(f"the primary host's processes {sorted(killed.values())} did not die after "
                                   "SIGKILL")
            time.sleep(0.01)
        self.info["clean_up_after_kill"] = self.release() or ["every mount and loop device removed"]
        return killed

    def check(self, result: DemoResult) -> None:
        """The files lost at Sync and in flight at Async, read from repaired copies of C and D."""
        work = self.lab / WORK_DIR
        fsck: dict[str, int] = {}
        problems: list[str] = self.info.setdefault("problems", [])
        result.lost_at_sync, fsck["C"], note_c = check_copy(self.lab / "sync" / "C.img", result.files, work)
        result.in_flight_at_async, fsck["D"], result.async_note = check_copy(self.lab / "async" / "D.img",
                                                                             result.files, work)
        self.info["e2fsck_exit"] = fsck
        if note_c is not None:
            problems.append(f"Sync site: {note_c}")
        for site, rc in fsck.items():
            if FSCK_LEFT_ERRORS <= rc < 8:
                problems.append(f"e2fsck -fy left errors on a copy of {site} (exit {rc}): its writes were not "
                                "applied in order")

    def verify(self, result: DemoResult) -> str:
        """The ext4 mounted read-only at the Sync site, now the primary (attach, loop device, mount;
        the kernel replays its journal first if it needs to), every acknowledged file read through
        it; then everything taken away again."""
        try:
            doc, fs = mount_ext4(self.lab, self.stack, mkfs=False)
            assert self.stack.loop is not None
            read: dict[str, bytes | None] = {}
            for f in result.files:
                p = fs / f["path"].lstrip("/")
                read[f["path"]] = p.read_bytes() if p.is_file() else None
            result.missing_at_new_primary = mismatched(read, result.files)
            self.info["at_sync"] = {"mounted": "read-only", "through": doc["through"], "attached": doc["file"],
                                    "journal_replayed": doc["journal_needed_recovery"]}
        finally:
            notes = self.release()
        if notes:
            self.info.setdefault("problems", []).extend(notes)
        remove_work_dir(self.lab / WORK_DIR)
        replayed = "the kernel replayed its journal, then " if doc["journal_needed_recovery"] else ""
        return f"ext4 of lab:{self.lab} at the Sync site: {replayed}mounted read-only through the {doc['through']}"


def remove_work_dir(work: Path) -> None:
    """The empty mountpoints and LAB/ext4, never anything mounted or holding files."""
    for d in (work / "mnt", work / "attach", work):
        if d.is_dir() and not is_mounted(d):
            try:
                d.rmdir()
            except OSError:
                pass
