"""Process ids and pid files, shared by the jfs mount process and the site daemons.

Keeps true: `alive(pid)` is False for a process that has exited, including a zombie (our own child
that nobody reaped yet is reaped here; another's zombie is read from /proc), so a pid file never
keeps a dead process "running". `started(pid)` is when a running process started (None once it has
exited, zombie included), and never reaps: with the pid it names one process for good, since a pid
is reused but a (pid, start) pair is not.
"""

from __future__ import annotations

import os
from pathlib import Path


def alive(pid: int) -> bool:
    """True while process `pid` runs (a zombie has exited)."""
    try:
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False  # our child, just reaped
    except ChildProcessError:
        pass  # not our child
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def read_pid(path: Path) -> int | None:
    """The pid in a pid file, or None when the file is missing or does not hold a number."""
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def running_pid(path: Path) -> int | None:
    """The pid in a pid file when that process is alive, else None."""
    pid = read_pid(path)
    return pid if pid is not None and alive(pid) else None


def started(pid: int) -> int | None:
    """When process `pid` started (clock ticks after boot, /proc/PID/stat field 22), or None when it
    is not running (gone, a zombie, or no /proc). Reaps nothing, reads only."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    if not fields or fields[0] in ("Z", "X"):
        return None
    try:
        return int(fields[19])  # field 22 of the whole line; the first two (pid, comm) are cut off
    except (IndexError, ValueError):
        return None
