"""Block devices: whole-block access to a raw image file (DESIGN.md "Block device" layer).

Keeps true:
- A device is `num_blocks` blocks of `block_size` bytes. `read(lba, count)` and
  `write(lba, data)` address whole blocks; an access outside the device, a payload that is not a
  whole number of blocks, or an image whose size is not a whole number of blocks raises
  `BlockDeviceError` before a single byte is written (never a partial write).
- Images are raw: byte i of the volume is byte i of the file, so `cmp`/`dd` can inspect them.
- Two promises, as a disk with a volatile cache keeps them: a completed `write` is ordered and
  visible to every later read; a completed `flush()` has made every write completed before it
  durable (fdatasync), and `write_fua` is durable before it returns. No write is synced on its own.
  A flush with nothing written since the last one costs nothing, and flushes that wait at once
  share one fdatasync (group commit: a flush that waited for another's sync is covered by it when
  its writes were already issued). A device opened `durable=False` (a lab created
  `--unsafe-no-flush`, for benchmarks only) promises only the first.
- `write_zeroes(lba, count)` makes blocks read as zeros (an image punches a hole: a copy of a
  sparse volume stays sparse and costs no writes of zeros); `data_ranges` says where an image
  may hold data (the rest is a hole), so a copy reads only that.
- `has_unshipped(ranges)` answers the trim-rule question of SPEC §8 [0169]: does any write to
  these blocks still wait to be shipped to the Async site? A plain image never has any.
- An `ImageDevice` opened with `claim=True` holds the image's claim (`IMG.lock` beside it, see
  `vstore.blocks.holders`) until it is closed: exclusive when read-write, shared when read-only; a
  second writer, or a reader while a writer has it, is refused naming the holder. A lab's processes
  open its images with `shared_claim=True` (the lab's own claim keeps them to one writer), so a
  raw writer of a lab's image is refused while the lab is open or up.

Everything above (jfs, the mirror program, the provider) talks only to `BlockDevice`, so the file
system runs on a plain image, on a mirror group or on the provider alike.
"""

from __future__ import annotations

import errno
import os
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from vstore.blocks.codec import create_file
from vstore.blocks.errors import BlockDeviceError, ReadOnlyError
from vstore.blocks.holders import Claim
from vstore.blocks.holders import claim as claim_lock
from vstore.blocks.sparse import data_runs, punch_hole

DEFAULT_BLOCK_SIZE = 4096
ZERO_CHUNK = 1 << 20  # bytes of zeros written at once where a hole cannot be punched

BlockRanges = Iterable[tuple[int, int]]
"""(first_lba, count) pairs."""


class BlockDevice(ABC):
    """Fixed-size blocks addressed by LBA. Subclasses implement `_read`/`_write`/`flush`."""

    block_size: int
    num_blocks: int
    readonly: bool = False
    name: str = "device"

    # -- checks shared by every device -------------------------------------------------------
    def check_range(self, lba: int, count: int) -> None:
        if count <= 0:
            raise BlockDeviceError(f"{self.name}: block count must be positive, got {count}")
        if lba < 0 or lba + count > self.num_blocks:
            raise BlockDeviceError(
                f"{self.name}: blocks {lba}..{lba + count - 1} are outside the device "
                f"(it has blocks 0..{self.num_blocks - 1})"
            )

    def check_payload(self, data: bytes) -> int:
        if len(data) == 0 or len(data) % self.block_size:
            raise BlockDeviceError(
                f"{self.name}: a write must be a whole number of {self.block_size}-byte blocks, "
                f"got {len(data)} bytes"
            )
        return len(data) // self.block_size

    # -- public interface ---------------------------------------------------------------------
    def read(self, lba: int, count: int = 1) -> bytes:
        self.check_range(lba, count)
        return self._read(lba, count)

    def check_write(self, lba: int, data: bytes) -> int:
        """The block count of a write of `data` at `lba`, or the error refusing it."""
        count = self.check_payload(data)
        self.check_writable(lba, count)
        return count

    def check_writable(self, lba: int, count: int) -> None:
        """Refuse a write of `count` blocks at `lba` outside the device or to a read-only one."""
        self.check_range(lba, count)
        if self.readonly:
            raise ReadOnlyError(f"{self.name} is read-only: writes are rejected")

    def write(self, lba: int, data: bytes) -> None:
        self.check_write(lba, data)
        self._write(lba, data if type(data) is bytes else bytes(data))  # a caller's buffer may change later

    @property
    def size_bytes(self) -> int:
        return self.num_blocks * self.block_size

    def has_unshipped(self, ranges: BlockRanges) -> bool:
        """True when a write to any of these blocks still waits to reach the Async site."""
        return False

    def writev(self, lba: int, buffers: Sequence[bytes | memoryview]) -> None:
        """Write consecutive whole-block buffers from `lba` (checked once; an image writes them with
        one `pwritev`, without joining them)."""
        total = sum(len(b) for b in buffers)
        if total == 0 or total % self.block_size or any(len(b) % self.block_size for b in buffers):
            raise BlockDeviceError(f"{self.name}: a write must be whole {self.block_size}-byte blocks, "
                                   f"got buffers of {[len(b) for b in buffers]} bytes")
        self.check_writable(lba, total // self.block_size)
        self._writev(lba, buffers)

    def _writev(self, lba: int, buffers: Sequence[bytes | memoryview]) -> None:
        at = lba
        for b in buffers:
            self._write(at, bytes(b))
            at += len(b) // self.block_size

    def write_zeroes(self, lba: int, count: int) -> None:
        """Make `count` blocks from `lba` read as zeros (an image punches a hole instead of writing them)."""
        self.check_writable(lba, count)
        self._write_zeroes(lba, count)

    def _write_zeroes(self, lba: int, count: int) -> None:
        step = max(1, ZERO_CHUNK // self.block_size)
        for first in range(lba, lba + count, step):
            self._write(first, bytes(min(step, lba + count - first) * self.block_size))

    def data_ranges(self, lba: int, count: int) -> list[tuple[int, int]]:
        """(first, count) runs of the range that may hold data; the rest reads as zeros."""
        return [(lba, count)]

    def write_fua(self, lba: int, data: bytes) -> None:
        """A write that is durable before it returns (Forced Unit Access)."""
        self.write(lba, data)
        self.flush()

    def flush(self) -> None:  # noqa: B027 - optional for in-memory devices
        """Make every completed write durable (fdatasync when the device is durable)."""

    def close(self) -> None:  # noqa: B027
        """Release the device; further access is an error."""

    def __enter__(self) -> BlockDevice:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @abstractmethod
    def _read(self, lba: int, count: int) -> bytes: ...

    @abstractmethod
    def _write(self, lba: int, data: bytes) -> None: ...


def create_image(path: str | Path, size_bytes: int, block_size: int = DEFAULT_BLOCK_SIZE,
                 *, overwrite: bool = False) -> None:
    """Create a sparse raw image of `size_bytes` (a whole number of blocks), private (mode of
    `codec.file_mode`). Refuses to replace an existing file unless `overwrite`."""
    path = Path(path)
    if size_bytes <= 0 or size_bytes % block_size:
        raise BlockDeviceError(f"image size {size_bytes} is not a positive multiple of {block_size} bytes")
    if path.exists() and not overwrite:
        raise BlockDeviceError(f"{path} already exists; remove it first or choose another path")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = create_file(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)  # 0600, or 0660 in a group-shared lab
    try:
        os.ftruncate(fd, size_bytes)
    finally:
        os.close(fd)


def lock_path(image: str | Path) -> Path:
    """The lock file of an image: `IMG.lock` beside the file it resolves to (a symlink or another
    spelling of the path names the same lock)."""
    real = Path(os.path.realpath(image))
    return real.with_name(real.name + ".lock")


class ImageDevice(BlockDevice):
    """A block device on a raw image file."""

    def __init__(self, path: str | Path, block_size: int = DEFAULT_BLOCK_SIZE, *,
                 durable: bool = True, readonly: bool = False, claim: bool = False,
                 shared_claim: bool = False) -> None:
        """`claim`: hold the image's claim while open (see the module docstring). `shared_claim`:
        hold it shared even when writing, for a lab's volumes, whose one writer the lab's own claim
        already guarantees: processes of the lab share their images, a raw writer of one is refused.
        A lab's volume is also opened O_NOFOLLOW: its state names a plain file in the site directory,
        and a symbolic link there (which could lead out of it) is refused."""
        self.path = Path(path)
        self.name = str(self.path)
        self.block_size = block_size
        self.durable = durable
        self.readonly = readonly
        nofollow = os.O_NOFOLLOW if shared_claim else 0
        if nofollow and self.path.is_symlink():
            raise BlockDeviceError(f"{self.path} is a symbolic link; a lab's volume must be a plain image file "
                                   "in its site directory")
        if not self.path.is_file():
            raise BlockDeviceError(f"{self.path}: no such image file")
        size = self.path.stat().st_size
        if size == 0 or size % block_size:
            raise BlockDeviceError(
                f"{self.path}: image is {size} bytes, not a whole number of {block_size}-byte blocks "
                "(truncated or not an image)"
            )
        self.num_blocks = size // block_size
        self.claim: Claim | None = None
        if claim or shared_claim:
            self.claim = claim_lock(lock_path(self.path), exclusive=claim and not readonly, resource=str(self.path))
        flags = (os.O_RDONLY if readonly else os.O_RDWR) | nofollow
        try:
            self._fd: int | None = os.open(self.path, flags)
        except BaseException as exc:
            if self.claim is not None:
                self.claim.release()
            if isinstance(exc, OSError) and exc.errno == errno.ELOOP:
                raise BlockDeviceError(f"{self.path} became a symbolic link; a lab's volume must be a plain "
                                       "image file in its site directory") from None
            raise
        self._lock = threading.Lock()
        self._syncs = GroupSync(self.name)

    def _fdn(self) -> int:
        if self._fd is None:
            raise BlockDeviceError(f"{self.name}: device is closed")
        return self._fd

    def _read(self, lba: int, count: int) -> bytes:
        want = count * self.block_size
        data = os.pread(self._fdn(), want, lba * self.block_size)
        if len(data) != want:  # the file shrank under us
            raise BlockDeviceError(f"{self.name}: short read at block {lba} (image truncated?)")
        return data

    def _write(self, lba: int, data: bytes) -> None:
        fd = self._fdn()
        off = lba * self.block_size
        n = os.pwrite(fd, data, off)
        if n != len(data):  # a short write (rare): continue after what went out
            view = memoryview(data)[n:]
            while view:
                n = os.pwrite(fd, view, off + len(data) - len(view))
                view = view[n:]
        self._syncs.written()

    def _writev(self, lba: int, buffers: Sequence[bytes | memoryview]) -> None:
        fd, off = self._fdn(), lba * self.block_size
        views = [memoryview(b) for b in buffers]
        while views:
            n = os.pwritev(fd, views, off)
            off += n
            while views and n >= len(views[0]):  # a short write: continue after what went out
                n -= len(views[0])
                views.pop(0)
            if views and n:
                views[0] = views[0][n:]
        self._syncs.written()

    def _write_zeroes(self, lba: int, count: int) -> None:
        if not punch_hole(self._fdn(), lba * self.block_size, count * self.block_size):
            super()._write_zeroes(lba, count)
        self._syncs.written()

    def data_ranges(self, lba: int, count: int) -> list[tuple[int, int]]:
        bs, out = self.block_size, []
        for offset, length in data_runs(self._fdn(), lba * bs, count * bs):
            first, end = offset // bs, -(-(offset + length) // bs)
            if out and out[-1][0] + out[-1][1] >= first:
                out[-1] = (out[-1][0], max(end, out[-1][0] + out[-1][1]) - out[-1][0])
            else:
                out.append((first, end - first))
        return out

    def flush(self) -> None:
        if self.durable and self._fd is not None and not self.readonly:
            self._syncs.sync(lambda: os.fdatasync(self._fdn()))

    def close(self) -> None:
        """A clean close: what was written is flushed first (as a clean unmount does)."""
        if self._fd is not None:
            self.flush()
            os.close(self._fd)
            self._fd = None
        if self.claim is not None:
            self.claim.release()


class GroupSync:
    """Group commit for one file: `written()` after each write, `sync(fn)` for a flush. `fn` (the
    fdatasync) runs only when something was written since the last sync began, and a flush that
    finds another's sync in progress waits for it and then syncs only if writes came after it began.
    `syncs` counts the fdatasyncs done (the durability tests and benchmarks read it)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._lock = threading.Lock()  # held while a sync runs
        self._gen = 0  # bumped by every write
        self._synced = 0  # every write up to this generation is durable
        self.syncs = 0

    def written(self) -> None:
        self._gen += 1

    def sync(self, fn: Callable[[], None]) -> None:
        want = self._gen
        if self._synced >= want:
            return
        with self._lock:
            if self._synced >= want:  # another flush's sync covered these writes meanwhile
                return
            began = self._gen
            fn()
            self.syncs += 1
            self._synced = max(self._synced, began)


class MemoryDevice(BlockDevice):
    """A block device in memory (tests and scratch copies)."""

    def __init__(self, num_blocks: int, block_size: int = DEFAULT_BLOCK_SIZE, *,
                 data: bytes | None = None, name: str = "memory") -> None:
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.name = name
        self.buf = bytearray(data if data is not None else num_blocks * block_size)
        if len(self.buf) != num_blocks * block_size:
            raise BlockDeviceError(f"{name}: initial data is not {num_blocks} blocks")

    def _read(self, lba: int, count: int) -> bytes:
        bs = self.block_size
        return bytes(self.buf[lba * bs:(lba + count) * bs])

    def _write(self, lba: int, data: bytes) -> None:
        bs = self.block_size
        self.buf[lba * bs:lba * bs + len(data)] = data
