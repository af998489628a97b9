"""Block devices: whole-block access to a raw image file (DESIGN.md "Block device" layer).

Keeps true:
- A device is `num_blocks` blocks of `block_size` bytes. `read(lba, count)` and
  `write(lba, data)` address whole blocks; an access outside the device, a payload that is not a
  whole number of blocks, or an image whose size is not a whole number of blocks raises
  `BlockDeviceError` before a single byte is written (never a partial write).
- Images are raw: byte i of the volume is byte i of the file, so `cmp`/`dd` can inspect them.
- `flush()` makes every completed write durable (fsync) when the device was opened `durable`.
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
from collections.abc import Iterable
from pathlib import Path

from vstore.blocks.codec import create_file
from vstore.blocks.errors import BlockDeviceError, ReadOnlyError
from vstore.blocks.holders import Claim
from vstore.blocks.holders import claim as claim_lock

DEFAULT_BLOCK_SIZE = 4096

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

    def write(self, lba: int, data: bytes) -> None:
        count = self.check_payload(data)
        self.check_range(lba, count)
        if self.readonly:
            raise ReadOnlyError(f"{self.name} is read-only: writes are rejected")
        self._write(lba, bytes(data))

    @property
    def size_bytes(self) -> int:
        return self.num_blocks * self.block_size

    def has_unshipped(self, ranges: BlockRanges) -> bool:
        """True when a write to any of these blocks still waits to reach the Async site."""
        return False

    def flush(self) -> None:  # noqa: B027 - optional for in-memory devices
        """Make completed writes durable (fsync when the device is durable)."""

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
                 durable: bool = False, readonly: bool = False, claim: bool = False,
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
        view = memoryview(data)
        while view:
            n = os.pwrite(fd, view, off)
            view = view[n:]
            off += n

    def flush(self) -> None:
        if self.durable and self._fd is not None and not self.readonly:
            os.fsync(self._fd)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self.claim is not None:
            self.claim.release()


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
