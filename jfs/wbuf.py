"""Gathered writes of a jfs FUSE mount, the space they hold, and the errors open files have yet to hear.

The model is a kernel's page cache with delayed allocation and errseq (Linux
Documentation/filesystems/vfs.rst, "Handling errors during writeback"; `man 2 fsync`): consecutive
writes to a file are gathered and committed later as one `FileSystem.write` transaction, the space
that commit needs is reserved when a write is accepted, and a failure found later is reported to
each open file description once.

Keeps true:
- A byte that `write` accepted is committed, or its loss is reported (below); never dropped silently.
- A buffer holds (`FileSystem.reserve`) at every moment what its commit can need at most
  (`FileSystem.write_cost`: data and pointer blocks, log space), so `statfs` already counts it as
  used. A write whose share cannot be held, even after committing every buffer (which gives back
  over-estimates and what copy-on-write frees), is shortened to what fits or refused with ENOSPC:
  lack of space never costs data a write accepted.
- A commit that fails anyway (a device error, a write the storage refuses, ...) drops its buffer,
  gives back its hold and records the error on the inode (an error sequence). Every file
  description open on that inode then, or opened later while no description has heard it yet, gets
  the error once: its next fsync, flush (every close) or write fails with it. Then it is cleared for
  that description, so a later fsync succeeds, as on Linux. Release (after the last close) cannot
  report; what it loses goes to the next opener.
- Committing never raises: an operation that commits the buffers first (read, rename, statfs...) is
  not failed by another write's lost data.
"""

from __future__ import annotations

import errno
import logging
from dataclasses import dataclass, field

from jfs.errors import JfsError, LogFull, NoSpace
from jfs.fs import FileSystem
from vstore.blocks.errors import TricopyError

log = logging.getLogger("jfs.fuse")


def errno_of(exc: BaseException) -> int:
    """The POSIX error a FUSE request returns for `exc`."""
    if isinstance(exc, LogFull):
        return errno.ENOSPC
    if isinstance(exc, TricopyError):
        code = getattr(exc, "errno", None)
        return code if isinstance(code, int) and code > 0 else errno.EIO
    if isinstance(exc, OSError) and isinstance(exc.errno, int) and exc.errno > 0:
        return exc.errno
    return errno.EIO


class WriteError(JfsError):
    """Data an open file wrote earlier was lost; `errno` is that failure's."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.errno = code


@dataclass
class Pending:
    """Consecutive writes to one file, accepted and not yet committed, and what they hold."""

    ino: int
    offset: int
    chunks: list[bytes] = field(default_factory=list)
    size: int = 0
    held: tuple[int, int] = (0, 0)  # (blocks, log blocks) reserved for the commit

    @property
    def end(self) -> int:
        return self.offset + self.size


@dataclass
class _Lost:
    """The latest failure of an inode's gathered writes."""

    seq: int
    code: int
    what: str
    heard: bool = False  # some file description has been told


@dataclass
class _Handle:
    """An open file description: its inode and the last failure it was told of."""

    ino: int
    seen: int


class WriteBuffer:
    """The gathered writes and open file descriptions of one mount (callers serialize the calls)."""

    def __init__(self, fs: FileSystem, *, buffer_bytes: int, total_bytes: int) -> None:
        self.fs = fs
        self.buffer_bytes = buffer_bytes
        self.total_bytes = total_bytes
        self.log_limit = max(1, (fs.geo.log_blocks - 1) // 4)  # log blocks one buffer may hold
        self.pending: dict[str, Pending] = {}
        self.total = 0
        self.lost: dict[int, _Lost] = {}
        self.handles: dict[int, _Handle] = {}
        self.seq = 0
        self.next_fh = 1
        fs.on_lost = self._group_lost

    # -- open file descriptions -----------------------------------------------------------------
    def open(self, ino: int) -> int:
        """A new file description of `ino`; it will hear a failure nobody has heard yet."""
        self.next_fh += 1
        e = self.lost.get(ino)
        seen = 0 if e is None else e.seq if e.heard else e.seq - 1
        self.handles[self.next_fh] = _Handle(ino, seen)
        return self.next_fh

    def created(self, ino: int) -> int:
        """A file description of a new inode (a reused number carries no old failure)."""
        self.lost.pop(ino, None)
        return self.open(ino)

    def close(self, fh: int) -> None:
        h = self.handles.pop(fh, None)
        if h is None:
            return
        e = self.lost.get(h.ino)
        if e is not None and e.heard and all(o.ino != h.ino for o in self.handles.values()):
            del self.lost[h.ino]

    def check(self, fh: int) -> None:
        """Raise the failure this file description has not been told of yet (then it has)."""
        h = self.handles.get(fh)
        e = None if h is None else self.lost.get(h.ino)
        if h is None or e is None or e.seq <= h.seen:
            return
        h.seen, e.heard = e.seq, True
        raise WriteError(e.code, f"data written earlier could not be stored: {e.what}")

    def record(self, ino: int, exc: BaseException) -> None:
        self.seq += 1
        self.lost[ino] = _Lost(self.seq, errno_of(exc), str(exc) or type(exc).__name__)

    def _ino(self, fh: int, path: str) -> int:
        h = self.handles.get(fh)
        return h.ino if h is not None else self.fs.lookup(path)

    # -- buffers --------------------------------------------------------------------------------
    def end_of(self, path: str) -> int | None:
        """Where `path`'s gathered writes end (None when there are none)."""
        p = self.pending.get(path)
        return None if p is None else p.end

    def commit(self, path: str, *, grouped: bool = False) -> None:
        """Commit `path`'s gathered writes as one transaction (`grouped`: as part of the running
        group, see `FileSystem.write`); a failure is recorded, not raised."""
        p = self.pending.pop(path, None)
        if p is None:
            return
        self.total -= p.size
        self.fs.release(*p.held)
        try:
            self.fs.write(path, p.offset, b"".join(p.chunks), grouped=grouped)
        except (TricopyError, OSError) as exc:
            self.record(p.ino, exc)
            log.warning("%s: %d bytes written at offset %d are lost: %s", path, p.size, p.offset, exc)
        except Exception as exc:
            self.record(p.ino, exc)
            log.exception("%s: %d bytes written at offset %d are lost", path, p.size, p.offset)

    def _group_lost(self, inos: set[int], exc: BaseException) -> None:
        """The running group failed to commit, with the data these files wrote: record it."""
        for ino in inos:
            self.record(ino, exc)
        log.warning("gathered writes of %d file(s) are lost: %s", len(inos), exc)

    def commit_all(self) -> None:
        for path in list(self.pending):
            self.commit(path)

    def fsync(self, fh: int, path: str) -> None:
        """Commit `path`, flush the device, and raise what this file description has not heard."""
        self.commit(path)
        try:
            self.fs.fsync(path)
        except JfsError:
            raise
        except (TricopyError, OSError) as exc:
            self.record(self._ino(fh, path), exc)
        self.check(fh)

    def write(self, fh: int, path: str, offset: int, data: bytes) -> int:
        """Accept `data` at `offset` (all of it or, when space runs out, a first part); returns the
        bytes accepted. Raises an unheard failure of this file description instead, or NoSpace /
        LogFull when not one byte fits."""
        n = len(data)
        p = self._buffer(fh, path, offset, n)
        if not self._grow(path, p, n):
            if self.pending:
                self.commit_all()  # gives back over-estimates and the blocks copy-on-write frees
                p = self._buffer(fh, path, offset, n)
            n = self._fit(path, p, n)
        p.chunks.append(data[:n] if n < len(data) else data)
        p.size += n
        self.total += n
        self.pending[path] = p
        return n

    def _buffer(self, fh: int, path: str, offset: int, n: int) -> Pending:
        """The buffer `n` bytes at `offset` join: `path`'s when they extend it and it may grow,
        else a new one (after committing what would be too much)."""
        self.check(fh)
        p = self.pending.get(path)
        if p is not None and (offset != p.end or p.size + n > self.buffer_bytes
                              or self.fs.write_cost(path, p.offset, p.size + n)[1] > self.log_limit):
            self.commit(path)
            self.check(fh)  # what this file wrote could not be stored: say so before taking more
            p = None
        if self.total + n > self.total_bytes:
            self.commit_all()
            self.check(fh)
            p = None
        return p if p is not None else Pending(self._ino(fh, path), offset)

    def _grow(self, path: str, p: Pending, n: int) -> bool:
        """Hold what `p` needs with `n` more bytes; False (nothing held) when that is not free."""
        want = self.fs.write_cost(path, p.offset, p.size + n)
        try:
            self.fs.reserve(want[0] - p.held[0], want[1] - p.held[1])
        except (NoSpace, LogFull):
            return False
        p.held = want
        return True

    def _fit(self, path: str, p: Pending, n: int) -> int:
        """Hold room for the most of `n` more bytes that fits, and return how many that is."""
        blocks, log_blocks = self.fs.reservable()

        def fits(m: int) -> bool:
            b, lb = self.fs.write_cost(path, p.offset, p.size + m)
            return b - p.held[0] <= blocks and lb - p.held[1] <= log_blocks

        lo, hi = 0, n
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
        if lo == 0 or not self._grow(path, p, lo):
            if self.fs.write_cost(path, p.offset, p.size + 1)[0] - p.held[0] > blocks:
                raise NoSpace("the file system has no free blocks left; delete files or use a larger image")
            raise LogFull("the metadata log has no room for more writes until its records are shipped "
                          "to the Async site; ship them and retry")
        return lo
