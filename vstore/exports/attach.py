"""`vstore attach`: a lab's volume as one regular file through FUSE, so the kernel can put a loop
device and a real file system (ext4) on it (SPEC §6 [0133]-[0135], embodiment 2: the intermediate
server between unmodified programs and the replicated storage).

Keeps true:
- The mount holds a root directory (mode 0555) with exactly one regular file named after the volume:
  `A` for the application's volume (`lab:LAB`, the provider volume or the mirror group A+B), the
  site's volume letter (`A`, `C`, `D`) for one site's copy (`lab:LAB@SITE`). Its size is the volume's
  size and never changes.
- A read or write may start and end anywhere. Byte ranges become whole-block device I/O through
  `vstore.nbd.server.Export`, the one home of that mechanism (the NBD export uses it too): a write
  that does not cover its edge blocks merges them (read-modify-write) under the export's one lock,
  and reads take that lock too, so no read sees half a write and no write is torn. A FUSE write is
  answered when the device write returned: acknowledged in tricopy's sense (A and C have it, the
  entry exists). A read past the end is short; a write from the end on fails with ENOSPC, one that
  crosses the end is short. `fallocate` punch-hole / zero-range (what a loop device sends for a
  discard) writes zeros through the same path, replicated like any write.
- fsync, fdatasync and every close (FUSE flush) call the device's `flush()` (skipped when nothing
  was written since the last one succeeded): durable on A, C and the entry spool before the
  answer. A loop device turns the file system's flushes into fsync.
- The file's size and the directory are fixed: truncate to another size, chmod, chown, unlink,
  rename, link and rmdir fail with EPERM; create, mknod, mkdir and symlink with EACCES; times
  are accepted and ignored. A read-only attach (`readonly`, always so for `lab:LAB@SITE`) is
  mounted `ro` and refuses every write with EROFS. A device error is EIO, logged with its reason.
- libfuse's worker threads serve the requests, one at a time (one lock), never the main thread:
  the write path holds SIGINT/SIGTERM in the main thread while a write is under way
  (`vstore.blocks.interrupts`), which would take away the handlers libfuse installs to end its
  loop; in the workers a signal only ends the loop between requests. The kernel keeps the file's
  pages only for the application's volume, which this mount alone writes (its claim is
  exclusive); a site's copy is read with direct I/O, as the lab may write it while it is up.
- `serve` runs the FUSE loop in the calling process until the mount is unmounted
  (`fusermount3 -u`, `detach`) or SIGTERM/SIGINT/SIGHUP ends it; it then flushes the device. The
  caller closes the device (in process that saves the lab state and releases its claim).
  `vstore attach` runs `serve` in a background process as `jfs mount` does (`jfs.mounts`: state
  file, log, start), and `detach` unmounts and waits until that process exited, so when it
  returns the lab is saved and free.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import shutil
import stat as statmod
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from jfs.fuse import fuse_available
from jfs.mounts import is_mounted, read_state, state_path, write_state
from vstore.blocks.device import BlockDevice
from vstore.blocks.errors import ReadOnlyError, TricopyError
from vstore.blocks.pids import alive
from vstore.nbd.server import Export

log = logging.getLogger("vstore.exports.attach")

MAX_WRITE = 1 << 20  # largest FUSE write request asked of the kernel
EXIT_TIMEOUT = 120.0  # seconds for an unmounted attach process to flush, save the lab and exit
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
ROOT_INO, FILE_INO = 1, 2

F = TypeVar("F", bound=Callable[..., Any])


class FuseOSError(OSError):
    """A FUSE request's failure: libfuse answers it with `errno` (mfusepy turns any OSError so)."""

    def __init__(self, err: int) -> None:
        super().__init__(err, os.strerror(err))


def _request(method: F) -> F:
    """One FUSE request, served alone (under the operations' lock), its failures turned into
    errnos: a read-only device's refusal is EROFS, any other device error EIO (logged with why)."""

    @functools.wraps(method)
    def wrapper(self: AttachOperations, *args: Any) -> Any:
        try:
            with self._mutex:
                return method(self, *args)
        except FuseOSError:
            raise
        except ReadOnlyError as exc:
            log.warning("%s: %s", method.__name__, exc)
            raise FuseOSError(errno.EROFS) from None
        except (TricopyError, OSError) as exc:
            log.error("%s of %s failed: %s", method.__name__, self.device_name, exc)
            raise FuseOSError(errno.EIO) from None
        except Exception:
            log.exception("%s of %s failed unexpectedly", method.__name__, self.device_name)
            raise FuseOSError(errno.EIO) from None

    return wrapper  # type: ignore[return-value]


class AttachOperations:
    """The FUSE operations of an attached volume (paths as libfuse gives them: '/A'); mfusepy calls
    the methods it finds and leaves every other request to libfuse's default (ENOSYS)."""

    use_ns = True  # times in nanoseconds (mfusepy)

    def __init__(self, device: BlockDevice, name: str, *, readonly: bool, cache: bool = True,
                 on_ready: Callable[[], None] | None = None) -> None:
        if not name or "/" in name:
            raise TricopyError(f"the attached file needs a plain name, got {name!r}")
        self.readonly = readonly or bool(getattr(device, "readonly", False))
        self.export = Export(name, device, readonly=self.readonly, exclusive=True)
        self.device_name = device.name
        self.path = "/" + name
        self.size = device.size_bytes
        self.block_size = device.block_size
        self.cache = cache
        self.on_ready = on_ready
        self.started = False  # libfuse called init: the mount is live
        self.uid, self.gid = os.getuid(), os.getgid()
        self.mtime = self.ctime = time.time_ns()
        self._written = False  # a write since the last flush
        self._mutex = threading.Lock()  # one request at a time

    # -- names ----------------------------------------------------------------------------------
    def _file(self, path: str) -> None:
        if path != self.path:
            raise FuseOSError(errno.EISDIR if path == "/" else errno.ENOENT)

    def _writable(self) -> None:
        if self.readonly:
            raise FuseOSError(errno.EROFS)

    @_request
    def getattr(self, path: str, fh: int | None = None) -> dict[str, Any]:
        times = {"st_atime": self.mtime, "st_mtime": self.mtime, "st_ctime": self.ctime}
        ids = {"st_uid": self.uid, "st_gid": self.gid}
        if path == "/":
            return {"st_mode": statmod.S_IFDIR | 0o555, "st_ino": ROOT_INO, "st_nlink": 2, "st_size": 0, **ids,
                    **times}
        self._file(path)
        mode = 0o444 if self.readonly else 0o644
        return {"st_mode": statmod.S_IFREG | mode, "st_ino": FILE_INO, "st_nlink": 1, "st_size": self.size,
                "st_blocks": self.size // 512, "st_blksize": self.block_size, **ids, **times}

    @_request
    def readdir(self, path: str, fh: int) -> list[tuple[str, dict[str, int], int]]:
        if path != "/":
            raise FuseOSError(errno.ENOTDIR if path == self.path else errno.ENOENT)
        return [(".", {"st_ino": ROOT_INO, "st_mode": statmod.S_IFDIR}, 0),
                ("..", {"st_ino": ROOT_INO, "st_mode": statmod.S_IFDIR}, 0),
                (self.path[1:], {"st_ino": FILE_INO, "st_mode": statmod.S_IFREG}, 0)]

    @_request
    def statfs(self, path: str) -> dict[str, int]:
        blocks = self.size // self.block_size
        return {"f_bsize": self.block_size, "f_frsize": self.block_size, "f_blocks": blocks, "f_bfree": 0,
                "f_bavail": 0, "f_files": 1, "f_ffree": 0, "f_favail": 0, "f_namemax": 255}

    # -- what the fixed layout refuses ----------------------------------------------------------
    def _refuse_new(self, path: str, *args: Any) -> int:
        self._writable()
        raise FuseOSError(errno.EEXIST if path in ("/", self.path) else errno.EACCES)

    def _refuse_change(self, path: str, *args: Any) -> int:
        self._writable()
        if path not in ("/", self.path):
            raise FuseOSError(errno.ENOENT)
        raise FuseOSError(errno.EPERM)

    create = mkdir = mknod = _refuse_new
    chmod = chown = unlink = rmdir = rename = _refuse_change

    def symlink(self, target: str, source: str) -> int:  # mfusepy: symlink(link path, its target)
        return self._refuse_new(target)

    def link(self, target: str, source: str) -> int:
        self._writable()
        raise FuseOSError(errno.EPERM)

    @_request
    def utimens(self, path: str, times: tuple[int, int] | None = None) -> int:
        if path not in ("/", self.path):
            raise FuseOSError(errno.ENOENT)
        return 0  # accepted and ignored: the volume keeps no times

    @_request
    def truncate(self, path: str, length: int, fh: int | None = None) -> int:
        self._file(path)
        self._writable()
        if length != self.size:
            raise FuseOSError(errno.EPERM)  # a volume's size is fixed
        return 0

    # -- data -----------------------------------------------------------------------------------
    @_request
    def open(self, path: str, flags: int) -> int:
        self._file(path)
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC):
            self._writable()
        if flags & os.O_TRUNC:  # libfuse passes it here (atomic O_TRUNC): a truncate to 0, refused
            raise FuseOSError(errno.EPERM)
        return 0

    @_request
    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        self._file(path)
        length = max(0, min(size, self.size - offset))
        return self.export.read(offset, length) if length else b""

    @_request
    def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
        self._file(path)
        self._writable()
        if offset >= self.size:
            raise FuseOSError(errno.ENOSPC)
        data = data[:self.size - offset]
        self._written = True  # before: a write that fails half way still needs the next flush
        self.export.write(offset, data)
        self.mtime = self.ctime = time.time_ns()
        return len(data)

    @_request
    def fallocate(self, path: str, mode: int, offset: int, length: int, fh: int) -> int:
        self._file(path)
        self._writable()
        if offset < 0 or length <= 0:
            raise FuseOSError(errno.EINVAL)
        if offset + length > self.size and not mode & FALLOC_FL_KEEP_SIZE:
            raise FuseOSError(errno.EFBIG)  # it would grow the file: the volume's size is fixed
        if mode & ~(FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE):
            raise FuseOSError(errno.EOPNOTSUPP)
        if mode & (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE):
            length = min(length, self.size - offset)
            if length > 0:
                self._written = True
                self.export.write_zeroes(offset, length)
        return 0  # plain allocation inside the volume: every block exists already

    def _flush(self) -> None:
        """The device's flush, unless nothing was written since the last one that succeeded."""
        if not self.readonly and self._written:
            self.export.flush()
            self._written = False

    @_request
    def flush(self, path: str, fh: int) -> int:
        self._flush()
        return 0

    @_request
    def fsync(self, path: str, datasync: int, fh: int) -> int:
        self._flush()
        return 0

    @_request
    def release(self, path: str, fh: int) -> int:
        return 0

    def init_with_config(self, conn: Any, config: Any) -> None:
        """Large write requests; the page cache kept across opens only where this mount is the one
        writer (see the module docstring), direct I/O otherwise; then the mount is live."""
        self.started = True
        if conn is not None and hasattr(conn, "max_write"):
            conn.max_write = max(int(conn.max_write), MAX_WRITE)
        if config is not None and hasattr(config, "kernel_cache"):
            config.kernel_cache = 1 if self.cache else 0
            config.direct_io = 0 if self.cache else 1
        if self.on_ready is not None:
            self.on_ready()

    def destroy(self, path: str) -> None:
        try:
            self._flush()
        except (TricopyError, OSError) as exc:
            log.error("the last flush of %s failed: %s", self.device_name, exc)


def _fsname(name: str) -> str:
    return "tricopy:" + "".join(c if c.isalnum() or c in "/._-@:" else "_" for c in name)[-200:]


def serve(device: BlockDevice, mountpoint: str | Path, name: str, *, readonly: bool = False, cache: bool = True,
          state: Path | None = None, on_ready: Callable[[], None] | None = None,
          describe: dict[str, Any] | None = None) -> None:
    """Serve `device` as the file `mountpoint/name` until unmounted or signalled (see the module
    docstring); `state` is written while serving (with `describe`), `on_ready` is called once the
    mount is live. The caller closes `device`."""
    why = fuse_available()
    if why is not None:
        raise TricopyError(why)
    import mfusepy  # loads libfuse: only when a mount is served

    mp = Path(mountpoint)
    check_empty_dir(mp)
    ops = AttachOperations(device, name, readonly=readonly, cache=cache, on_ready=on_ready)
    try:
        if state is not None:
            write_state(state, {"target": device.name, "mountpoint": str(mp.resolve()), **(describe or {}),
                                "pid": os.getpid()})
        opts: dict[str, Any] = dict(foreground=True, fsname=_fsname(device.name),
                                    subtype="vstore", ro=ops.readonly)
        try:
            mfusepy.FUSE(ops, str(mp), **opts)
        except RuntimeError as exc:
            if ops.started:  # the loop ended by a signal (SIGTERM/SIGINT/SIGHUP): a normal unmount
                log.info("FUSE loop ended (%s); detaching", exc)
                return
            raise TricopyError(f"libfuse could not mount {mp} (error {exc}); check that it is an empty "
                               "directory that is not mounted already") from None
    finally:
        try:
            ops.destroy("/")
        finally:
            if state is not None:
                state.unlink(missing_ok=True)


# -- mountpoints and detaching ----------------------------------------------------------------------
def check_empty_dir(mp: Path) -> None:
    """Refuse a mountpoint that is not an empty directory, or is mounted already."""
    if not mp.is_dir():
        raise TricopyError(f"{mp} is not a directory; create an empty one first (mkdir -p {mp})")
    if is_mounted(mp):
        raise TricopyError(f"{mp} is already a mount point; detach or unmount it first (vstore detach {mp})")
    try:
        entries = os.listdir(mp)
    except OSError as exc:
        raise TricopyError(f"cannot read the directory {mp}: {exc.strerror}") from None
    if entries:
        raise TricopyError(f"{mp} is not empty ({len(entries)} entries); attach on an empty directory")


def detach(mountpoint: str | Path, *, timeout: float = EXIT_TIMEOUT) -> str:
    """Unmount an attached volume and wait until its process has flushed it, saved the lab and
    exited; returns a note. A file still open there (a loop device) is refused by the kernel."""
    mp = Path(mountpoint)
    st = read_state(mp)
    if not is_mounted(mp):
        if st is not None and alive(int(st["pid"])):
            raise TricopyError(f"{mp} is not mounted but its attach process {st['pid']} is still running; "
                               "wait for it or stop it with kill -TERM")
        state_path(mp).unlink(missing_ok=True)
        raise TricopyError(f"{mp} is not attached")
    tool = shutil.which("fusermount3") or shutil.which("fusermount")
    cmd = [tool, "-u", str(mp)] if tool else ["umount", str(mp)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        lines = (res.stderr or res.stdout).strip().splitlines()
        detail = lines[-1] if lines else f"{cmd[0]} exited with {res.returncode}"
        raise TricopyError(f"could not detach {mp}: {detail} (detach the loop devices on its file "
                           "(losetup -d) and close the files open there, then retry)")
    if st is None:
        return f"detached {mp}"
    pid = int(st["pid"])
    deadline = time.monotonic() + timeout
    while alive(pid):
        if time.monotonic() > deadline:
            raise TricopyError(f"{mp} is unmounted but its attach process {pid} has not exited within "
                               f"{timeout:.0f} s; the lab is saved when it exits")
        time.sleep(0.02)
    path = state_path(mp)
    if path.exists():  # the process died without cleaning up (killed)
        path.unlink(missing_ok=True)
        return f"detached {mp}; its attach process had stopped before flushing"
    path.with_suffix(".log").unlink(missing_ok=True)  # kept only when something went wrong
    what = "closed" if st.get("readonly") else "flushed, the lab saved"
    return f"detached {mp} ({st.get('target', 'the volume')} {what})"
