"""Who holds a volume or a lab: exclusive and shared claims on a lock file, each naming its holder
(a block device opened O_EXCL; DRBD's single primary).

Keeps true:
- A claim is an `flock` on a lock file that sits next to what it guards (`IMG.lock` beside an
  image, `LAB/.lock` for a lab): exclusive for a writer, shared for a reader. Readers share with
  readers; a writer shares with nobody. The kernel drops an flock when its process dies, so a
  dead holder never keeps anything.
- Every claim writes a holder record into the lock file (pid and process start, command line, what
  it does, mount point, since when, how to make it let go), so a refused claimant names the holder
  in one sentence (`Busy`), e.g. "disk.img is mounted at /mnt/d (pid 1234, `jfs mount ...`, since
  10:02:03); unmount it first: jfs umount /mnt/d".
- Nobody waits for a *lasting* holder (a mount, a lab's daemons): refused at once. A brief holder
  (a command that is about to end) is waited for up to `wait` seconds, said on the log after a
  second, then refused by name. Never silently forever, never proceeding.
- A record with no lock behind it was left by a process that died holding the claim: the next
  claimant takes it over and says so (a warning on the `vstore.holders` log).
- The lock file is never replaced or removed (a rename would split holders onto two inodes). It
  is as private as what it guards (`codec.file_mode`: 0600, 0660 in a group-shared lab): its
  records name command lines and mount points.
  Records are one JSON line each (a claim, or the release of one); an exclusive claimant, being
  alone, starts the file afresh, so it holds only the claims of the current holders.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import secrets
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from vstore.blocks import pids
from vstore.blocks.codec import create_file
from vstore.blocks.errors import TricopyError

log = logging.getLogger("vstore.holders")

BRIEF_WAIT = 10.0  # seconds a claimant waits for a brief holder before it is refused
SAY_AFTER = 1.0  # a claimant still waiting after this long says for whom
POLL = 0.05


@dataclass(frozen=True)
class Holder:
    """One claim as its record states it."""

    token: str
    pid: int
    start: int | None  # the process's start (pids.started): with the pid it names one process for good
    argv: tuple[str, ...]
    what: str  # "mounted at /mnt/d", "in use", "open for reading", "served by the lab's daemons"
    exclusive: bool  # what the holder asked for (a reader's claim is exclusive while it is alone at first)
    lasting: bool  # holds as long as it runs (a mount, a daemon); else a command about to end
    since: float
    mountpoint: str | None = None
    release: str | None = None  # how to make it let go, e.g. "unmount it first: jfs umount /mnt/d"

    def alive(self) -> bool:
        """Whether the process that wrote this record still runs (the same process, not a reused pid)."""
        if self.start is None:  # written where process start times are unknown
            return pids.alive(self.pid)
        started = pids.started(self.pid)
        return started == self.start

    @property
    def command(self) -> str:
        return command_line(self.argv)

    @property
    def when(self) -> str:
        t = time.localtime(self.since)
        same_day = time.strftime("%Y-%m-%d", t) == time.strftime("%Y-%m-%d")
        return time.strftime("%H:%M:%S" if same_day else "%Y-%m-%d %H:%M:%S", t)

    def named(self) -> str:
        """`pid 1234, `jfs mount ...`, since 10:02:03`."""
        return f"pid {self.pid}, `{self.command}`, since {self.when}"

    def record(self) -> dict:
        return {"claim": self.token, "pid": self.pid, "start": self.start, "argv": list(self.argv),
                "what": self.what, "exclusive": self.exclusive, "lasting": self.lasting, "since": self.since,
                "mountpoint": self.mountpoint, "release": self.release}

    @classmethod
    def from_record(cls, rec: dict) -> Holder:
        return cls(token=str(rec["claim"]), pid=int(rec["pid"]),
                   start=None if rec.get("start") is None else int(rec["start"]),
                   argv=tuple(str(a) for a in rec.get("argv") or ()), what=str(rec.get("what") or "in use"),
                   exclusive=bool(rec.get("exclusive", True)), lasting=bool(rec.get("lasting", False)),
                   since=float(rec.get("since") or 0.0), mountpoint=rec.get("mountpoint"),
                   release=rec.get("release"))


class Busy(TricopyError):
    """A claim refused because another process holds it; the sentence names the holders."""

    def __init__(self, message: str, holders: list[Holder]) -> None:
        super().__init__(message)
        self.holders = holders


def command_line(argv: tuple[str, ...] | list[str]) -> str:
    """A command line as a user typed it: `python -m jfs.cli mount ...` -> `jfs mount ...`."""
    args = list(argv)
    if len(args) >= 3 and Path(args[0]).name.startswith("python") and args[1] == "-m":
        args = [args[2].removesuffix(".__main__").removesuffix(".cli"), *args[3:]]
    elif len(args) >= 2 and Path(args[0]).name.startswith("python") and not args[1].startswith("-"):
        args = args[1:]  # a script: `jfs ...`, `pytest ...`
    if args:
        args[0] = Path(args[0]).name
    text = " ".join(" ".join(args).split()) or "?"
    return text if len(text) <= 100 else text[:97] + "..."


def _own_argv() -> tuple[str, ...]:
    try:
        raw = Path("/proc/self/cmdline").read_bytes()
        argv = tuple(a.decode(errors="replace") for a in raw.split(b"\0") if a)
    except OSError:
        argv = ()
    return argv or (sys.executable, *sys.argv)


# -- how this process names itself ---------------------------------------------------------------------
@dataclass
class _Identity:
    what: str | None = None
    mountpoint: str | None = None
    release: str | None = None
    lasting: bool = False


_identity = _Identity()


@contextlib.contextmanager
def acting_as(what: str, *, mountpoint: str | None = None, release: str | None = None,
              lasting: bool = False) -> Iterator[None]:
    """The claims this process takes inside the block name it so (e.g. the jfs mount process:
    "mounted at MP", lasting, released by `jfs umount MP`), however deep below they are taken."""
    global _identity
    before = _identity
    _identity = _Identity(what, mountpoint, release, lasting)
    try:
        yield
    finally:
        _identity = before


# -- reading a lock file -------------------------------------------------------------------------------
def _parse(text: str) -> dict[str, Holder]:
    """token -> Holder for every claim not yet released (unparsable lines are skipped)."""
    claims: dict[str, Holder] = {}
    for line in text.splitlines():
        try:
            rec = json.loads(line)
            if "claim" in rec:
                claims[str(rec["claim"])] = Holder.from_record(rec)
            elif "release" in rec:
                claims.pop(str(rec["release"]), None)
        except (ValueError, TypeError, KeyError, AttributeError):
            continue  # a torn or foreign line: records are advisory, the flock is the truth
    return claims


def _read_fd(fd: int) -> str:
    return os.pread(fd, os.fstat(fd).st_size, 0).decode(errors="replace")


def holders(path: str | Path) -> list[Holder]:
    """The live holders a lock file names (no lock is taken: for messages and status)."""
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return []
    return [h for h in _parse(text).values() if h.alive()]


# -- claiming ------------------------------------------------------------------------------------------
@dataclass(eq=False)
class Claim:
    """A held claim (a context manager); `release()` lets go, and so does the end of the process."""

    path: Path
    resource: str
    holder: Holder
    exclusive: bool  # what the flock is now (a reader's claim is exclusive while it is alone at first)
    alone: bool  # nobody else held the lock when it was taken
    _fd: int | None = field(default=None, repr=False)

    def share(self) -> None:
        """Turn a reader's claim that started alone (exclusive) into a shared one, so that other
        readers may join. Refused (`Busy`) in the rare case another claimant took it meanwhile."""
        if self._fd is None or not self.exclusive:
            return
        try:
            fcntl.flock(self._fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:  # the conversion is not atomic: someone came in between, and has it now
            self.exclusive = False  # so release only marks our record released
            self.release()
            raise _busy(self.path, self.resource, waited=0.0) from None
        self.exclusive = False

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            if not self.exclusive:
                _append(fd, {"release": self.holder.token})
            if self.exclusive or _try_lock(fd, True):  # alone (now): leave the file empty for the next one
                os.ftruncate(fd, 0)
        except OSError:
            pass  # the lock goes anyway; a record left behind is taken over with a message
        finally:
            os.close(fd)

    def __enter__(self) -> Claim:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.release()


def _append(fd: int, rec: dict) -> None:
    os.write(fd, (json.dumps(rec, separators=(",", ":")) + "\n").encode())


def _try_lock(fd: int, exclusive: bool) -> bool:
    try:
        fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _worth_waiting(live: list[Holder], exclusive: bool) -> bool:
    """A brief holder ends soon; so does a reader's alone-at-first phase, for another reader."""
    return all(not h.lasting or (not exclusive and not h.exclusive) for h in live)


def _busy(path: Path, resource: str, *, waited: float, text: str | None = None) -> Busy:
    if text is None:
        try:
            text = path.read_text(errors="replace")
        except OSError:
            text = ""
    live = [h for h in _parse(text).values() if h.alive()]
    if not live:
        return Busy(f"{resource} is in use by another process (it left no record in {path}); "
                    "try again once it has finished", [])
    parts: dict[str, list[Holder]] = {}
    for h in live:
        parts.setdefault(h.what, []).append(h)
    said = "; ".join(f"{what} ({'; '.join(h.named() for h in group)})" for what, group in parts.items())
    release = next((h.release for h in live if h.release), None)
    if waited > 0:
        advice = f"it still held it after {waited:.0f} s; try again once it has finished"
    else:
        advice = release or "try again once it has finished"
    return Busy(f"{resource} is {said}; {advice}", live)


def _acquire(fd: int, path: Path, resource: str, *, exclusive: bool, wait: float) -> None:
    """Take the flock, waiting only for brief holders and at most `wait` seconds; else `Busy`."""
    started = time.monotonic()
    said = False
    while not _try_lock(fd, exclusive):
        text = _read_fd(fd)
        live = [h for h in _parse(text).values() if h.alive()]
        waited = time.monotonic() - started
        if waited >= wait or not _worth_waiting(live, exclusive):
            raise _busy(path, resource, waited=waited if live and waited >= wait > 0 else 0.0, text=text)
        if not said and waited >= SAY_AFTER and live:
            log.warning("waiting for %s to let go of %s", "; ".join(f"{h.what} ({h.named()})" for h in live),
                        resource)
            said = True
        time.sleep(POLL)


def _take_over(resource: str, stale: list[Holder]) -> None:
    for h in stale:
        log.warning("%s: took over the claim of pid %d (%s, `%s`, since %s), which %s without letting go of it",
                    resource, h.pid, h.what, h.command, h.when, "ended" if h.alive() else "died")


def _open_lock(path: Path, *, exclusive: bool) -> int | None:
    try:
        return create_file(path, os.O_RDWR | os.O_CREAT | os.O_APPEND)  # private, like what it guards
    except OSError as exc:
        if not exclusive and exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            return None  # read-only media: a reader there can conflict with no writer through this file
        raise TricopyError(f"cannot claim {path.with_suffix('') if path.suffix == '.lock' else path}: "
                           f"{path}: {exc.strerror or exc} (the lock file must be creatable next to it)") from None


def claim(path: str | Path, *, exclusive: bool, resource: str | None = None, what: str | None = None,
          lasting: bool | None = None, release: str | None = None, mountpoint: str | None = None,
          wait: float = BRIEF_WAIT, share_at_once: bool = True) -> Claim:
    """Claim the lock file `path` for this process: `exclusive` for a writer, shared for a reader.

    Refused with `Busy` (naming the holders, see the module docstring) while a conflicting claim is
    held; a brief holder is waited for up to `wait` seconds first. `resource` names what is claimed
    in messages (default: `path` without `.lock`); `what`, `lasting`, `release`, `mountpoint`
    describe this holder (defaults: `acting_as`, else "in use" / "open for reading", brief).

    A reader that finds nobody else starts exclusive (`alone`), takes over stale records, and turns
    shared at once, or with `share_at_once=False` when it calls `Claim.share()` (so that the first
    reader can prepare, alone, what the readers then share)."""
    path = Path(path)
    resource = resource or (str(path)[:-len(".lock")] if path.name.endswith(".lock") else str(path))
    ident = _identity
    holder = Holder(token=secrets.token_hex(6), pid=os.getpid(), start=pids.started(os.getpid()),
                    argv=_own_argv(), what=what or ident.what or ("in use" if exclusive else "open for reading"),
                    exclusive=exclusive, lasting=ident.lasting if lasting is None else lasting, since=time.time(),
                    mountpoint=mountpoint or ident.mountpoint, release=release or ident.release)
    fd = _open_lock(path, exclusive=exclusive)
    if fd is None:
        return Claim(path, resource, holder, exclusive=False, alone=False)
    try:
        alone = _try_lock(fd, True)
        if not alone:
            _acquire(fd, path, resource, exclusive=exclusive, wait=wait)
            alone = exclusive
        records = _parse(_read_fd(fd))
        if alone:  # nobody else holds it: every record left is stale; start the file afresh
            _take_over(resource, list(records.values()))
            os.ftruncate(fd, 0)
        else:  # shared with live readers: only the dead ones' records are stale
            stale = [h for h in records.values() if not h.alive()]
            _take_over(resource, stale)
            for h in stale:
                _append(fd, {"release": h.token})
        _append(fd, holder.record())
    except BaseException:
        os.close(fd)
        raise
    held = Claim(path, resource, holder, exclusive=alone or exclusive, alone=alone, _fd=fd)
    if alone and not exclusive and share_at_once:
        held.share()
    return held


def check_free(path: str | Path, *, resource: str | None = None, exclusive: bool = True,
               wait: float = BRIEF_WAIT) -> None:
    """Raise `Busy` (naming the holders) if a claim on `path` is held that a claim `exclusive` (or
    shared) would conflict with; takes nothing and writes nothing. A missing file is free."""
    path = Path(path)
    resource = resource or (str(path)[:-len(".lock")] if path.name.endswith(".lock") else str(path))
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return
    try:
        _acquire(fd, path, resource, exclusive=exclusive, wait=wait)
    finally:
        os.close(fd)  # drops the lock the probe took
