"""`jfs mount`: a jfs volume as a real directory through FUSE (libfuse 3 via mfusepy); SPEC §8.

Programs (`cp -a`, `tar`, `rsync`, `git`, `sqlite3`) run on the mount; every change they make is a
`jfs.fs.FileSystem` operation, so it is one committed metadata-log transaction whose record names
the file ([0160], [0161]), and on `lab:LAB` every block goes through the provider (sync copy to C,
an entry for D).

Keeps true:
- Each FUSE request is one or more complete jfs operations; nothing half-done reaches the volume.
  Mode and time changes join a running transaction (`FileSystem.group`), and so do the file's
  gathered writes that such a change finds (they are committed first, as part of it): committed
  with the next other operation (a create, the next close with writes of its own...), at fsync,
  every commit interval and at unmount. What tar and cp -a write and set on a file (data,
  futimens, fchmod, close) rides with the next file's create: one transaction per file.
- The kernel keeps attributes, names, negative lookups and file pages for `CACHE_TIMEOUT` and
  sends writes of up to `MAX_WRITE`: the volume's claim is exclusive, so no other writer can make
  what it keeps stale. Its writeback cache stays off (`WRITEBACK_CACHE`).
  A failed operation returns the errno its `TricopyError` carries (ENOENT, EEXIST, ENOTEMPTY,
  ENOSPC, ENAMETOOLONG, EISDIR, ENOTDIR, EINVAL, EFBIG, EROFS); a full metadata log (`LogFull`,
  entries not yet shipped, [0169]) is reported as ENOSPC; anything unexpected as EIO.
- Writes are group-committed per open file (`jfs.wbuf`): consecutive `write` requests are gathered
  (up to `BUFFER_BYTES`) and committed as one `fs.write` transaction (or joined to the running
  one, above) at the latest on flush (every close()), fsync, release, or before any request that
  could observe or rename them (read, truncate, setattr, unlink, rmdir, rename). `getattr` reports the gathered size.
- POSIX error semantics for data: a byte `write` accepted stays, or the error is returned later.
  Each accepted write reserves the blocks and log space its commit can need, so `statfs` (df)
  counts gathered bytes as used and a write that cannot get its reservation returns ENOSPC itself
  (or a short count): running out of space never drops accepted data. A commit that still fails
  (EIO, a write the storage refuses) is reported, errseq-style, once to every file description
  open when it happened: its next fsync, close() (flush) or write fails with that errno; after that
  the description is clear again. No other request fails because of it, except the one whose
  commit took a running group with it (`FileSystem.on_lost` records that group's files' data).
- Operations are written when they return and made durable by a flush through the device (the
  provider's `flush()` on `lab:LAB`; an fsync of the image file when the image is mounted
  `durable`) only at fsync/fdatasync/fsyncdir, every commit interval (`COMMIT_INTERVAL`, `jfs
  mount --commit-interval`) and unmount: after a power cut the volume shows the state after a
  prefix of the operations holding every one before the last completed flush. `fsync` commits
  the file's gathered writes and then calls `fs.fsync(path)`: one flush before it returns.
- Unmount (`jfs umount`, `fusermount3 -u`) and SIGTERM/SIGINT/SIGHUP end the FUSE loop; then
  gathered writes are committed, the superblock is marked clean and the device closed (on
  `lab:LAB` that saves the lab state). SIGKILL leaves a dirty volume whose committed log is
  replayed at the next mount; every write whose fsync returned is in it.
- jfs stores no owners: every file belongs to the mounting user, and chown is accepted and
  ignored (like vfat's `quiet`). There are no symlinks, hard links, device nodes or xattrs
  (those requests fail with ENOSYS / EOPNOTSUPP).
- `serve` runs the FUSE loop in this process; `jfs.mounts` runs it as a background mount process
  and unmounts it. libfuse (mfusepy) is loaded only when a mount is checked for or served, so
  importing this module works on a machine without it.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import stat as statmod
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from jfs import layout as L
from jfs.fs import FileSystem
from jfs.mounts import check_mountpoint, write_state
from jfs.wbuf import WriteBuffer, errno_of
from vstore.blocks.device import BlockDevice
from vstore.blocks.errors import TricopyError
from vstore.blocks.interrupts import signals_belong_to_library


class FuseOSError(OSError):
    """A FUSE request's failure: libfuse answers it with `errno` (mfusepy turns any OSError so)."""

    def __init__(self, err: int) -> None:
        super().__init__(err, os.strerror(err))


log = logging.getLogger("jfs.fuse")

BUFFER_BYTES = 4 << 20  # per open file: gathered writes are committed at this size
TOTAL_BUFFER_BYTES = 64 << 20  # all files together
MAX_WRITE = 1 << 20  # largest FUSE write request asked of the kernel
FUSE_CAP_WRITEBACK_CACHE = 1 << 16  # libfuse 3 fuse_common.h
# Off: with the kernel's writeback cache a write(2) lands in the page cache and succeeds whatever
# the space left, so ENOSPC would surface only at writeback, losing bytes a write accepted (the
# POSIX error semantics above). jfs gathers writes itself instead (`jfs.wbuf`).
WRITEBACK_CACHE = False
CACHE_TIMEOUT = 60.0  # seconds the kernel may keep attributes and names (this mount is their only writer)
COMMIT_INTERVAL = 5.0  # seconds an operation waits at most to be durable (jbd2's commit interval)
UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2

F = TypeVar("F", bound=Callable[..., Any])


@functools.cache
def _mfusepy() -> tuple[Any, str | None]:
    """(the mfusepy module or None, why it cannot be loaded); it loads libfuse at import time."""
    try:
        import mfusepy
    except (ImportError, OSError) as exc:  # pragma: no cover - depends on the machine
        return None, (f"mfusepy cannot load libfuse 3 ({exc}); install the `fuse3` system package "
                      "and `pip install mfusepy`")
    return mfusepy, None


def fuse_available() -> str | None:
    """None when mounting can work here, else one sentence saying why not."""
    why = _mfusepy()[1]
    if why is not None:
        return why
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing; load the fuse kernel module (modprobe fuse) or run where FUSE is allowed"
    return None


def _request(method: F) -> F:
    """One FUSE request: serialized, and every error turned into its errno."""

    @functools.wraps(method)
    def wrapper(self: JfsOperations, *args: Any) -> Any:
        with self._mutex:
            try:
                return method(self, *args)
            except FuseOSError:
                raise
            except (TricopyError, OSError) as exc:
                code = errno_of(exc)
                if code in (errno.EIO, errno.ENOSPC) and method.__name__ != "getattr":
                    log.warning("%s%r: %s", method.__name__, args[:1], exc)
                raise FuseOSError(code) from None
            except Exception:
                log.exception("%s%r failed unexpectedly", method.__name__, args[:1])
                raise FuseOSError(errno.EIO) from None

    return wrapper  # type: ignore[return-value]


class JfsOperations:
    """The FUSE operations of a mounted jfs (paths as libfuse gives them: '/a/b'); mfusepy calls
    the methods it finds, and leaves every other request to libfuse's default (ENOSYS)."""

    use_ns = True  # times in nanoseconds (mfusepy)

    def __init__(self, fs: FileSystem, *, buffer_bytes: int = BUFFER_BYTES,
                 commit_interval: float = COMMIT_INTERVAL) -> None:
        self.fs = fs
        self.commit_interval = commit_interval
        self._mutex = threading.RLock()
        self.buffer = WriteBuffer(fs, buffer_bytes=buffer_bytes, total_bytes=TOTAL_BUFFER_BYTES)
        self.uid, self.gid = os.getuid(), os.getgid()
        self.started = False  # the kernel connection was set up (libfuse called init)
        self.last_commit = time.monotonic()
        fs.group = True  # attribute changes join one running transaction, committed as said above

    # -- gathered writes (a failure is recorded for the open files, never raised here) ------------
    def commit(self, path: str, *, grouped: bool = False) -> None:
        self.buffer.commit(path, grouped=grouped)

    def commit_all(self) -> None:
        self.buffer.commit_all()

    # -- attributes -----------------------------------------------------------------------------
    @_request
    def getattr(self, path: str, fh: int | None = None) -> dict[str, Any]:
        st = self.fs.stat(path)
        size = max(st.size, self.buffer.end_of(path) or 0)
        kind = statmod.S_IFDIR if st.type == "dir" else statmod.S_IFREG
        return {
            "st_mode": kind | st.mode, "st_ino": st.ino, "st_nlink": st.nlink, "st_size": size,
            "st_uid": self.uid, "st_gid": self.gid,
            "st_atime": st.atime_ns, "st_mtime": st.mtime_ns, "st_ctime": st.ctime_ns,
            "st_blocks": st.blocks * self.fs.bs // 512, "st_blksize": self.fs.bs,
        }

    @_request
    def chmod(self, path: str, mode: int) -> int:
        self.commit(path, grouped=True)  # the data rides in the same transaction as the mode
        self.fs.chmod(path, mode & 0o7777)
        return 0

    @_request
    def chown(self, path: str, uid: int, gid: int) -> int:
        self.fs.lookup(path)  # owners are not stored: accepted and ignored
        return 0

    @_request
    def utimens(self, path: str, times: tuple[int, int] | None = None) -> int:
        self.commit(path, grouped=True)  # the data rides in the same transaction as the times
        now = time.time_ns()
        if times is None:
            atime, mtime = now, now
        else:
            st = self.fs.stat(path)
            atime, mtime = (self._time(t, now, old) for t, old in zip(times, (st.atime_ns, st.mtime_ns),
                                                                       strict=True))
        self.fs.utimens(path, atime, mtime)
        return 0

    @staticmethod
    def _time(value: int, now: int, old: int) -> int:
        if value == UTIME_NOW:
            return now
        if value == UTIME_OMIT:
            return old
        return int(value)

    @_request
    def statfs(self, path: str) -> dict[str, int]:
        s = self.fs.statfs()  # blocks held for gathered writes count as used
        return {"f_bsize": s.block_size, "f_frsize": s.block_size, "f_blocks": s.blocks,
                "f_bfree": s.blocks_free, "f_bavail": s.blocks_free, "f_files": s.inodes,
                "f_ffree": s.inodes_free, "f_favail": s.inodes_free, "f_namemax": s.name_max}

    # -- directories ----------------------------------------------------------------------------
    @_request
    def readdir(self, path: str, fh: int) -> list[tuple[str, dict[str, int], int]]:
        parts = [x for x in path.split("/") if x]
        here = self.fs.lookup(path)
        up = self.fs.lookup("/" + "/".join(parts[:-1]))
        out = [(".", {"st_ino": here, "st_mode": statmod.S_IFDIR}, 0),
               ("..", {"st_ino": up, "st_mode": statmod.S_IFDIR}, 0)]
        for name, ino, kind in self.fs.scandir(path):
            mode = statmod.S_IFDIR if kind == "dir" else statmod.S_IFREG
            out.append((name, {"st_ino": ino, "st_mode": mode}, 0))
        return out

    @_request
    def mkdir(self, path: str, mode: int) -> int:
        self.fs.mkdir(path, mode & 0o7777)
        return 0

    @_request
    def rmdir(self, path: str) -> int:
        self.commit_all()
        self.fs.rmdir(path)
        return 0

    @_request
    def unlink(self, path: str) -> int:
        self.commit_all()
        self.fs.unlink(path)
        return 0

    @_request
    def rename(self, old: str, new: str) -> int:
        self.commit_all()
        self.fs.rename(old, new)
        return 0

    @_request
    def fsyncdir(self, path: str, datasync: int, fh: int) -> int:
        self.commit_all()
        self.fs.fsync(path)
        return 0

    # -- files ----------------------------------------------------------------------------------
    @_request
    def create(self, path: str, mode: int, flags: int = 0) -> int:
        return self.buffer.created(self.fs.create(path, mode & 0o7777))

    @_request
    def open(self, path: str, flags: int) -> int:
        st = self.fs.stat(path)
        if st.type == "dir" and flags & (os.O_WRONLY | os.O_RDWR):
            raise FuseOSError(errno.EISDIR)
        return self.buffer.open(st.ino)

    @_request
    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        self.commit(path)
        return self.fs.read(path, offset, size)

    @_request
    def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
        if offset + len(data) > L.max_file_blocks(self.fs.bs) * self.fs.bs:
            raise FuseOSError(errno.EFBIG)
        return self.buffer.write(fh, path, offset, data)

    @_request
    def truncate(self, path: str, length: int, fh: int | None = None) -> int:
        self.commit(path)
        self.fs.truncate(path, length)
        return 0

    @_request
    def flush(self, path: str, fh: int) -> int:
        self.commit(path)  # every close: the file's gathered writes committed (with the running group)
        self.buffer.check(fh)
        return 0

    @_request
    def fsync(self, path: str, datasync: int, fh: int) -> int:
        self.buffer.fsync(fh, path)
        return 0

    @_request
    def release(self, path: str, fh: int) -> int:
        self.commit(path)
        self.buffer.close(fh)
        return 0

    def init_with_config(self, conn: Any, config: Any) -> None:
        """Ask the kernel for large write requests (fewer round trips per MiB), its writeback cache
        (writes gathered in the page cache, sent in large requests) and long attribute, name and
        negative-lookup timeouts: every change of this volume goes through this mount (its claim
        is exclusive), so what the kernel keeps cannot go stale."""
        self.started = True
        if conn is not None and hasattr(conn, "max_write"):
            conn.max_write = max(int(conn.max_write), MAX_WRITE)
        if conn is not None and WRITEBACK_CACHE and int(getattr(conn, "capable", 0)) & FUSE_CAP_WRITEBACK_CACHE:
            conn.want = int(conn.want) | FUSE_CAP_WRITEBACK_CACHE
        if config is not None and hasattr(config, "attr_timeout"):
            config.attr_timeout = config.entry_timeout = config.negative_timeout = CACHE_TIMEOUT
            config.kernel_cache = 1

    def tick(self) -> None:
        """Every `commit_interval` seconds (called periodically): commit the running group and make
        every operation so far durable and checkpointed (`fs.sync`)."""
        with self._mutex:
            if time.monotonic() - self.last_commit >= self.commit_interval:
                self._commit_group(durable=True)

    def _commit_group(self, *, durable: bool = False) -> None:
        self.last_commit = time.monotonic()
        try:
            if durable and not self.fs.readonly:
                self.fs.sync()
            else:
                self.fs.commit_pending()
        except (TricopyError, OSError) as exc:
            log.warning("committing the running transaction failed: %s", exc)

    def destroy(self, path: str) -> None:
        with self._mutex:
            self.commit_all()  # what cannot be stored now is logged (jfs.wbuf)
            self._commit_group()


@functools.cache
def _fuse_class() -> type:
    """mfusepy's FUSE, except that rename flags (RENAME_NOREPLACE / RENAME_EXCHANGE), which mfusepy
    would drop, are refused with EINVAL so callers fall back to a plain rename."""
    mfusepy = _mfusepy()[0]

    class Fuse(mfusepy.FUSE):  # type: ignore[misc]
        def rename_fuse_3(self, old: bytes, new: bytes, flags: int) -> int:
            if flags:
                return -errno.EINVAL
            return super().rename_fuse_3(old, new, flags)  # type: ignore[no-any-return]

    return Fuse


# -- running a mount ------------------------------------------------------------------------------
def _fsname(name: str) -> str:
    return "jfs:" + "".join(c if c.isalnum() or c in "/._-@:" else "_" for c in name)[-200:]


def serve(device: BlockDevice, mountpoint: str | Path, *, readonly: bool = False,
          state: Path | None = None, commit_interval: float = COMMIT_INTERVAL) -> None:
    """Mount the jfs on `device` at `mountpoint` and serve it until unmounted or signalled, then
    leave the volume clean. The caller closes `device`."""
    why = fuse_available()
    if why is not None:
        raise TricopyError(why)
    mp = Path(mountpoint)
    check_mountpoint(mp)
    fs = FileSystem.mount(device, readonly=readonly)
    ops = JfsOperations(fs, commit_interval=commit_interval)
    done = threading.Event()
    ticker = threading.Thread(target=_tick, args=(ops, done), name="jfs-commit", daemon=True)
    ticker.start()
    try:
        if state is not None:
            write_state(state, {"pid": os.getpid(), "target": device.name, "mountpoint": str(mp.resolve())})
        opts: dict[str, Any] = dict(foreground=True, nothreads=True, fsname=_fsname(device.name),
                                    subtype="jfs", use_ino=True)
        if readonly:
            opts["ro"] = True
        signals_belong_to_library()  # libfuse's handlers end its loop between requests: keep them
        try:
            _fuse_class()(ops, str(mp), **opts)
        except RuntimeError as exc:
            if ops.started:  # the loop ended by a signal (SIGTERM/SIGINT/SIGHUP): a normal unmount
                log.info("FUSE loop ended (%s); unmounting", exc)
                return
            raise TricopyError(f"libfuse could not mount {mp} (error {exc}); check that it is an empty "
                               "directory that is not mounted already") from None
    finally:
        done.set()
        ticker.join()
        with ops._mutex:
            try:
                ops.commit_all()
            finally:
                fs.unmount()
                if state is not None:
                    state.unlink(missing_ok=True)


def _tick(ops: JfsOperations, done: threading.Event) -> None:
    while not done.wait(min(1.0, ops.commit_interval)):
        ops.tick()
