"""Background jfs mounts: the mount process, its state file, and `jfs umount` (SPEC §8).

`jfs mount` without `--foreground` re-runs itself with `--foreground` (which serves the FUSE
operations of `jfs.fuse`) in a new session, and returns once the mountpoint is live.

Keeps true:
- The mount process keeps a small state file (pid, target, mountpoint) and its log in
  `$XDG_RUNTIME_DIR/jfs-mounts` (or the temp directory), named after the mountpoint, never in a lab
  or image directory. The state file exists exactly while the process serves; one left behind
  means the process was killed.
- `unmount` unmounts and waits for that process to exit, so when it returns the volume is clean
  (or, after a kill, its committed log is replayed at the next mount; the note says which).
- Whether a directory is mounted is read from /proc/self/mountinfo, never by touching the mount.
- The mount process holds its volume's claim (`vstore.blocks.holders`) from before the mount is
  live until after it has unmounted and the volume is clean: it opens the volume `as_mount`, so
  the claim names it ("mounted at MP", lasting: nobody waits for it, `jfs umount MP` releases it).
  `jfs mount` opens the target once for reading before it starts that process, so a volume that
  has a writer is refused at once, naming it, in the caller.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from vstore.blocks.errors import TricopyError
from vstore.blocks.holders import acting_as
from vstore.blocks.pids import alive

READY_TIMEOUT = 30.0  # seconds for a background mount to become live
EXIT_TIMEOUT = 120.0  # seconds for an unmounted mount process to finish and exit


def _unescape(field_: str) -> str:
    return field_.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")


def is_mounted(mp: str | Path) -> bool:
    """Whether `mp` is a mount point (read from /proc/self/mountinfo: never touches the mount)."""
    real = os.path.realpath(mp)
    try:
        with open("/proc/self/mountinfo") as f:
            return any(_unescape(line.split()[4]) == real for line in f if len(line.split()) > 4)
    except OSError:
        return os.path.ismount(mp)


def check_mountpoint(mp: Path) -> None:
    """Refuse a mountpoint that is not a directory, or is mounted already."""
    if not mp.is_dir():
        raise TricopyError(f"{mp} is not a directory; create it first (mkdir -p {mp})")
    if is_mounted(mp):
        raise TricopyError(f"{mp} is already a mount point; unmount it first (jfs umount {mp})")


def state_dir() -> Path:
    """The private directory of the mount state files (created 0700)."""
    base = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    d = Path(base) / "jfs-mounts"
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    return d


def state_path(mp: str | Path) -> Path:
    """The state file of the mount at `mp` (its log is the same name with `.log`)."""
    key = hashlib.sha256(os.path.realpath(mp).encode()).hexdigest()[:16]
    return state_dir() / f"{key}.json"


def write_state(path: Path, values: dict[str, Any]) -> None:
    """Replace a state file atomically."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(values))
    tmp.replace(path)


def read_state(mp: str | Path) -> dict[str, Any] | None:
    """The state of the mount at `mp`, or None when there is none."""
    try:
        return json.loads(state_path(mp).read_text())
    except (OSError, ValueError):
        return None


def as_mount(mountpoint: str | Path) -> AbstractContextManager[None]:
    """While the mount process opens its volume: the claims it takes name the mount at `mountpoint`."""
    return acting_as(f"mounted at {mountpoint}", mountpoint=str(mountpoint), lasting=True,
                     release=f"unmount it first: jfs umount {mountpoint}")


def foreground_argv(target: str, mountpoint: str, *, durable: bool) -> list[str]:
    """The command line of the mount process (`jfs mount ... --foreground`)."""
    argv = [sys.executable, "-m", "jfs.cli", "mount", target, mountpoint, "--foreground"]
    return [*argv, "--durable"] if durable else argv


def start_background(argv: list[str], mountpoint: Path, *, timeout: float = READY_TIMEOUT) -> int:
    """Run `argv` (a foreground mount) in a new session; return its pid once `mountpoint` is
    live. Raises TricopyError with the mount process's last message if it stops first."""
    logfile = state_path(mountpoint).with_suffix(".log")
    with open(logfile, "wb") as out:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True)
    deadline = time.monotonic() + timeout
    while not is_mounted(mountpoint):
        if proc.poll() is not None:
            lines = [x for x in logfile.read_text(errors="replace").splitlines() if x.strip()]
            raise TricopyError(lines[-1].removeprefix("jfs: ") if lines else
                               f"the mount process exited with status {proc.returncode}")
        if time.monotonic() > deadline:
            proc.send_signal(signal.SIGTERM)
            raise TricopyError(f"{mountpoint} did not become a mount point within {timeout:.0f} s; "
                               f"see {logfile}")
        time.sleep(0.02)
    return proc.pid


def _fuse_unmount(mp: Path) -> None:
    tool = shutil.which("fusermount3") or shutil.which("fusermount")
    cmd = [tool, "-u", str(mp)] if tool else ["umount", str(mp)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        msg = (res.stderr or res.stdout).strip().splitlines()
        detail = msg[-1] if msg else f"{cmd[0]} exited with {res.returncode}"
        raise TricopyError(f"could not unmount {mp}: {detail} (close the files open there and retry)")


def unmount(mountpoint: str | Path, *, timeout: float = EXIT_TIMEOUT) -> str:
    """Unmount a jfs mount and wait until its process has exited (volume clean); returns a note."""
    mp = Path(mountpoint)
    st = read_state(mp)
    if not is_mounted(mp):
        if st is not None and alive(int(st["pid"])):
            raise TricopyError(f"{mp} is not mounted but its mount process {st['pid']} is still running; "
                               "wait for it or stop it with kill -TERM")
        state_path(mp).unlink(missing_ok=True)
        raise TricopyError(f"{mp} is not mounted")
    _fuse_unmount(mp)
    if st is None:
        return f"unmounted {mp}"
    pid = int(st["pid"])
    deadline = time.monotonic() + timeout
    while alive(pid):
        if time.monotonic() > deadline:
            raise TricopyError(f"{mp} is unmounted but its mount process {pid} has not exited within "
                               f"{timeout:.0f} s; the volume is marked clean only when it exits")
        time.sleep(0.02)
    path = state_path(mp)
    if path.exists():  # the process died without cleaning up (killed): the log replays at next mount
        path.unlink(missing_ok=True)
        return f"unmounted {mp}; its mount process had stopped, the next mount replays the log"
    path.with_suffix(".log").unlink(missing_ok=True)  # kept only when something went wrong
    return f"unmounted {mp} ({st.get('target', 'jfs')} is clean)"
