"""jfs: a journaling file system on any `BlockDevice` (SPEC §8, embodiment 4 [0158]-[0173]).

Keeps true:
- Every operation that changes the tree is one metadata-log transaction (`jfs.metalog`): it
  carries a record per touched inode (the file, and the parent directory whose blocks changed),
  commits atomically and is replayed at mount. A file's metadata is therefore logged between every
  open-for-write and close ([0161]).
- Ordered mode with copy-on-write data: new file data goes to freshly allocated blocks, written
  and flushed before the commit that makes it visible; blocks a transaction frees become
  allocatable only after it commits. A crash shows each file as of one committed transaction,
  never garbage and never a mix.
- Directory blocks, pointer blocks, inodes and bitmaps are metadata: they reach their home
  location only through a committed transaction (checkpoint).
- The file system never asks what device it runs on: all I/O is `read`/`write`/`flush`, and the
  trim rule asks `device.has_unshipped` ([0169]).
- Any failure inside an operation (no space, log full, bad name...) leaves the volume unchanged:
  nothing reaches the log, and the in-memory state is reloaded from disk.

Limits: names <= 255 UTF-8 bytes; files up to (12 + P + P*P) blocks, P pointers per block
(>= 64 GiB at 4 KiB blocks); access times are not updated by reads (noatime).
"""

from __future__ import annotations

import re
import time
import uuid as uuidlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jfs import layout as L
from jfs.errors import (
    FileExists,
    FileNotFound,
    FileTooLarge,
    InvalidArgument,
    IsADirectory,
    NameTooLong,
    NoSpace,
    NotADirectory,
    NotEmpty,
    ReadOnlyFs,
)
from jfs.metalog import BlockView, MetaLog, Ranges, RecordSpec, merge_ranges, ranges_of
from vstore.blocks.device import BlockDevice, ImageDevice
from vstore.blocks.errors import BlockDeviceError, FormatError

_NOT_FULL = re.compile(b"[^\xff]")
TYPE_NAMES = {L.TYPE_FILE: "file", L.TYPE_DIR: "dir"}

# A full metadata log waits this long for the shipper to confirm entries (lab up) before LogFull.
LOG_FULL_WAIT_S = 60.0


# -- small in-memory structures -----------------------------------------------------------------
class Bitmap:
    """Packed bits (LSB first) of an inode or block bitmap, split into bitmap blocks."""

    def __init__(self, bits: bytearray, limit: int, first_free: int) -> None:
        self.bits = bits
        self.limit = limit
        self.hint = first_free
        self.first = first_free
        self.nfree = sum(1 for i in range(first_free, limit) if not self.test(i)) \
            if limit < 4096 else self._count_free()

    def _count_free(self) -> int:
        used = sum(bin(b).count("1") for b in self.bits[: (self.limit + 7) // 8])
        return (self.limit + 7) // 8 * 8 - used

    def test(self, i: int) -> bool:
        return bool(self.bits[i >> 3] >> (i & 7) & 1)

    def set(self, i: int) -> None:
        if not self.test(i):
            self.bits[i >> 3] |= 1 << (i & 7)
            self.nfree -= 1

    def clear(self, i: int) -> None:
        if self.test(i):
            self.bits[i >> 3] &= ~(1 << (i & 7))
            self.nfree += 1

    def alloc(self, n: int, what: str) -> list[int]:
        if n > self.nfree:
            raise NoSpace(f"the file system has no free {what} left; delete files or use a larger image")
        out: list[int] = []
        pos, wrapped = self.hint, False
        while len(out) < n:
            m = _NOT_FULL.search(self.bits, pos >> 3)
            if m is None or m.start() * 8 >= self.limit:
                if wrapped:
                    raise NoSpace(f"the file system has no free {what} left")
                pos, wrapped = self.first, True
                continue
            base = m.start() * 8
            for i in range(max(base, pos), base + 8):
                if i < self.limit and not self.test(i):
                    self.set(i)
                    out.append(i)
                    if len(out) == n:
                        break
            pos = base + 8
        self.hint = out[-1] + 1 if out else self.hint
        return out


@dataclass
class Inode:
    ino: int
    type: int
    mode: int
    nlink: int
    generation: int
    size: int = 0
    atime_ns: int = 0
    mtime_ns: int = 0
    ctime_ns: int = 0
    direct: list[int] = field(default_factory=lambda: [0] * L.N_DIRECT)
    indirect: int = 0
    dindirect: int = 0
    nblocks: int = 0

    def build(self) -> bytes:
        return L.build_checked(L.Inode, dict(
            type=self.type, mode=self.mode, reserved=0, nlink=self.nlink, generation=self.generation,
            size=self.size, atime_ns=self.atime_ns, mtime_ns=self.mtime_ns, ctime_ns=self.ctime_ns,
            direct=self.direct, indirect=self.indirect, dindirect=self.dindirect, nblocks=self.nblocks))

    @classmethod
    def parse(cls, ino: int, raw: bytes) -> Inode | None:
        """None for a free (all-zero) slot; FormatError for a corrupt one."""
        if L.is_zero(raw):
            return None
        v = L.parse_checked(L.Inode, raw, f"inode {ino}")
        if v.type not in TYPE_NAMES:
            raise FormatError(f"inode {ino} has unknown type {v.type}; run 'jfs fsck' to repair")
        return cls(ino, v.type, v.mode, v.nlink, v.generation, v.size, v.atime_ns, v.mtime_ns,
                   v.ctime_ns, list(v.direct), v.indirect, v.dindirect, v.nblocks)


@dataclass
class FileMap:
    """Where an inode's blocks live: `data[k]` is the LBA of file block k (0 = hole), plus the
    pointer blocks (single indirect, double indirect and its children)."""

    data: list[int]
    indirect: int = 0
    dindirect: int = 0
    children: list[int] = field(default_factory=list)
    images: dict[int, bytes] = field(default_factory=dict)  # pointer block lba -> image

    def pointer_blocks(self) -> list[int]:
        return [b for b in [self.indirect, self.dindirect, *self.children] if b]

    def all_blocks(self) -> list[int]:
        return [b for b in self.data if b] + self.pointer_blocks()


@dataclass
class DirBlock:
    lba: int
    entries: dict[str, tuple[int, int]]  # name -> (ino, type)

    def used(self) -> int:
        return sum(L.dir_entry_size(n) for n in self.entries)


@dataclass
class StatResult:
    ino: int
    type: str
    mode: int
    nlink: int
    size: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    blocks: int  # file-system blocks owned (data and pointer blocks)
    generation: int


@dataclass
class StatFs:
    block_size: int
    blocks: int
    blocks_free: int
    inodes: int
    inodes_free: int
    name_max: int
    log_blocks: int
    log_used: int
    label: str
    uuid: str


@dataclass
class _Txn:
    meta: dict[int, bytes] = field(default_factory=dict)
    data: dict[int, bytes] = field(default_factory=dict)
    records: dict[int, RecordSpec] = field(default_factory=dict)
    dirty_inodes: set[int] = field(default_factory=set)
    freed_blocks: set[int] = field(default_factory=set)
    freed_inodes: set[int] = field(default_factory=set)
    bitmap_dirty: set[tuple[str, int]] = field(default_factory=set)


# -- paths --------------------------------------------------------------------------------------
def split_path(path: str) -> list[str]:
    parts: list[str] = []
    for comp in str(path).split("/"):
        if comp in ("", "."):
            continue
        if comp == "..":
            if parts:
                parts.pop()
            continue
        check_name(comp)
        parts.append(comp)
    return parts


def check_name(name: str) -> None:
    if "\0" in name or "/" in name or name in ("", ".", ".."):
        raise InvalidArgument(f"{name!r} is not a valid file name")
    if len(name.encode()) > L.MAX_NAME:
        raise NameTooLong(f"the name {name[:40]!r}... is {len(name.encode())} bytes; "
                          f"jfs allows at most {L.MAX_NAME}")


def join(parts: list[str]) -> str:
    return "/" + "/".join(parts)


def _now() -> int:
    return time.time_ns()


# -- mkfs and opening images ----------------------------------------------------------------------
def _uuid_bytes(value: str | bytes | uuidlib.UUID | None) -> bytes:
    if value is None:
        return uuidlib.uuid4().bytes
    if isinstance(value, uuidlib.UUID):
        return value.bytes
    if isinstance(value, bytes):
        if len(value) != 16:
            raise InvalidArgument("a UUID is 16 bytes")
        return value
    try:
        return uuidlib.UUID(value).bytes
    except ValueError:
        raise InvalidArgument(f"{value!r} is not a UUID (e.g. 12345678-1234-5678-1234-567812345678)") \
            from None


def superblock_values(geo: L.Geometry, uuid: bytes, label: str, state: int, cp_seq: int,
                      mkfs_time_ns: int) -> dict[str, Any]:
    return dict(
        state=state, block_size=geo.block_size, num_blocks=geo.num_blocks,
        inode_count=geo.inode_count, inode_size=L.INODE_SIZE, features=0,
        log_start=geo.log_start, log_blocks=geo.log_blocks,
        ibitmap_start=geo.ibitmap_start, ibitmap_blocks=geo.ibitmap_blocks,
        bbitmap_start=geo.bbitmap_start, bbitmap_blocks=geo.bbitmap_blocks,
        itable_start=geo.itable_start, itable_blocks=geo.itable_blocks, data_start=geo.data_start,
        root_ino=L.ROOT_INO, checkpoint_seq=cp_seq, mkfs_time_ns=mkfs_time_ns, uuid=uuid, label=label)


def bitmap_images(geo: L.Geometry, bits: bytes, magic: bytes) -> list[bytes]:
    nbytes = L.bits_per_bitmap_block(geo.block_size) // 8
    st = L.bitmap_block(geo.block_size, magic)
    count = len(bits) // nbytes
    return [L.build_checked(st, dict(reserved=0, index=k, bits=bits[k * nbytes:(k + 1) * nbytes]))
            for k in range(count)]


def fresh_bitmaps(geo: L.Geometry) -> tuple[bytearray, bytearray]:
    """Inode and block bitmaps of an empty file system (reserved and metadata bits set)."""
    bpb = L.bits_per_bitmap_block(geo.block_size)
    ib = bytearray(geo.ibitmap_blocks * bpb // 8)
    bb = bytearray(geo.bbitmap_blocks * bpb // 8)

    def setbit(buf: bytearray, i: int) -> None:
        buf[i >> 3] |= 1 << (i & 7)

    for i in [0, L.ROOT_INO, *range(geo.inode_count, len(ib) * 8)]:
        setbit(ib, i)
    for i in [*range(geo.data_start), *range(geo.data_end, len(bb) * 8)]:
        setbit(bb, i)
    return ib, bb


def mkfs(device: BlockDevice, *, label: str = "", uuid: str | bytes | uuidlib.UUID | None = None,
         inodes: int | None = None, log_blocks: int | None = None) -> None:
    """Write an empty jfs onto `device` (block size = the device's)."""
    bs = device.block_size
    if not (L.MIN_BLOCK_SIZE <= bs <= L.MAX_BLOCK_SIZE and bs & (bs - 1) == 0):
        raise InvalidArgument(f"block size {bs} is not supported; use a power of two from "
                              f"{L.MIN_BLOCK_SIZE} to {L.MAX_BLOCK_SIZE}")
    if len(label.encode()) > L.LABEL_BYTES:
        raise InvalidArgument(f"the label is longer than {L.LABEL_BYTES} bytes")
    geo = L.Geometry.plan(bs, device.num_blocks, inodes, log_blocks)
    if geo.data_start + 8 > geo.num_blocks:
        raise NoSpace(f"the device ({device.num_blocks} blocks of {bs} bytes) is too small for a jfs "
                      "with this many inodes and log blocks; use a larger image")
    uid = _uuid_bytes(uuid)
    ib, bb = fresh_bitmaps(geo)
    MetaLog.format(device, geo, uid)
    for k, img in enumerate(bitmap_images(geo, ib, L.INODE_BITMAP_MAGIC)):
        device.write(geo.ibitmap_start + k, img)
    for k, img in enumerate(bitmap_images(geo, bb, L.BLOCK_BITMAP_MAGIC)):
        device.write(geo.bbitmap_start + k, img)
    for lba in range(geo.itable_start, geo.data_start, 256):
        device.write(lba, bytes(min(256, geo.data_start - lba) * bs))
    now = _now()
    root = Inode(L.ROOT_INO, L.TYPE_DIR, 0o755, 2, 1, 0, now, now, now)
    blk, off = geo.inode_location(L.ROOT_INO)
    table = bytearray(bs)
    table[off:off + L.INODE_SIZE] = root.build()
    device.write(blk, bytes(table))
    sb = L.build_checked(L.Superblock, superblock_values(geo, uid, label, L.STATE_CLEAN, 0, now), bs)
    device.write(geo.backup_sb, sb)
    device.flush()
    device.write(0, sb)
    device.flush()


def read_superblock(raw: bytes, what: str = "superblock") -> Any:
    return L.parse_checked(L.Superblock, raw[:L.SUPERBLOCK_BYTES], what)


def probe_image(path: str | Path) -> tuple[int, bool]:
    """(block size, primary superblock valid) of a jfs image; FormatError if it is none."""
    path = Path(path)
    if not path.is_file():
        raise BlockDeviceError(f"{path}: no such image file; create it with 'jfs mkfs {path} --size 16M'")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(L.SUPERBLOCK_BYTES)
        try:
            sb = read_superblock(head)
            if sb.num_blocks * sb.block_size == size:
                return sb.block_size, True
        except FormatError:
            pass
        bs = L.MIN_BLOCK_SIZE
        while bs <= L.MAX_BLOCK_SIZE:
            if size >= 2 * bs and size % bs == 0:
                f.seek(size - bs)
                try:
                    sb = read_superblock(f.read(L.SUPERBLOCK_BYTES))
                    if sb.block_size == bs and sb.num_blocks * bs == size:
                        return bs, False
                except FormatError:
                    pass
            bs *= 2
    raise FormatError(f"{path} is not a jfs image (no valid superblock); create one with 'jfs mkfs'")


def open_image(path: str | Path, *, readonly: bool = False, durable: bool = False) -> BlockDevice:
    """Open a jfs image with the block size its superblock states."""
    bs, _ = probe_image(path)
    return ImageDevice(path, bs, readonly=readonly, durable=durable)


# -- the file system ------------------------------------------------------------------------------
class FileSystem:
    """A mounted jfs. Path-based operations; each change is one committed transaction."""

    def __init__(self, device: BlockDevice, view: BlockView, sb: Any) -> None:
        self.device = device
        self.view = view
        self.sb = sb
        self.geo = L.Geometry.from_superblock(sb)
        self.bs = self.geo.block_size
        self.uuid: bytes = sb.uuid
        self.label: str = sb.label
        self.readonly = view.readonly
        self.log = MetaLog.open(view, self.geo, self.uuid)
        self.log.data_ranges_of = self.data_ranges_of
        self._txn: _Txn | None = None
        self._load()

    # -- mount / unmount ---------------------------------------------------------------------
    @classmethod
    def mount(cls, device: BlockDevice, *, readonly: bool = False) -> FileSystem:
        """Mount: check the superblock, replay the committed log, mark the volume in use."""
        block0 = device.read(0)
        if not any(block0):
            raise FormatError(f"{device.name} holds no file system (block 0 is empty): make one with `jfs mkfs`; "
                              "on a replica, it arrives once the primary's writes are copied there")
        sb = read_superblock(block0, "superblock (block 0)")
        if sb.block_size != device.block_size or sb.num_blocks != device.num_blocks:
            raise FormatError(f"{device.name}: the superblock describes {sb.num_blocks} blocks of "
                              f"{sb.block_size} bytes but the device has {device.num_blocks} of "
                              f"{device.block_size}; open it with jfs.fs.open_image")
        L.Geometry.from_superblock(sb).check()
        fs = cls(device, BlockView(device, readonly=readonly), sb)
        if device.shipped_in_background:
            fs.log.wait_timeout = LOG_FULL_WAIT_S
        if not fs.readonly:
            fs._write_superblock(L.STATE_DIRTY)
        return fs

    def unmount(self) -> None:
        """Checkpoint (already done per transaction), mark clean, flush."""
        if not self.readonly:
            self._write_superblock(L.STATE_CLEAN)

    def _write_superblock(self, state: int) -> None:
        vals = superblock_values(self.geo, self.uuid, self.label, state,
                                 self.log.head.checkpoint_seq, self.sb.mkfs_time_ns)
        self.view.write(0, L.build_checked(L.Superblock, vals, self.bs))
        self.view.flush()

    def __enter__(self) -> FileSystem:
        return self

    def __exit__(self, *exc: object) -> None:
        self.unmount()

    # -- in-memory state loaded from disk ------------------------------------------------------
    def _load(self) -> None:
        geo = self.geo
        self.ibits = self._load_bitmap(geo.ibitmap_start, geo.ibitmap_blocks, L.INODE_BITMAP_MAGIC,
                                       geo.inode_count, 2, "inode bitmap")
        self.bbits = self._load_bitmap(geo.bbitmap_start, geo.bbitmap_blocks, L.BLOCK_BITMAP_MAGIC,
                                       geo.data_end, geo.data_start, "block bitmap")
        self.inodes: dict[int, Inode | None] = {}
        self.maps: dict[int, FileMap] = {}
        self.dirs: dict[int, list[DirBlock]] = {}
        self.itable: dict[int, bytes] = {}

    def _load_bitmap(self, start: int, count: int, magic: bytes, limit: int, first: int,
                     what: str) -> Bitmap:
        st = L.bitmap_block(self.bs, magic)
        bits = bytearray()
        for k in range(count):
            v = L.parse_checked(st, self.view.read(start + k), f"{what} block {start + k}")
            if v.index != k:
                raise FormatError(f"{what} block {start + k} is out of place; run 'jfs fsck'")
            bits += v.bits
        return Bitmap(bits, limit, first)

    def _itable_block(self, lba: int) -> bytes:
        raw = self.itable.get(lba)
        if raw is None:
            raw = self.view.read(lba)
            self.itable[lba] = raw
        return raw

    def inode(self, ino: int) -> Inode:
        if ino in self.inodes:
            node = self.inodes[ino]
        else:
            if not 0 < ino < self.geo.inode_count:
                raise FormatError(f"inode number {ino} is outside the inode table; run 'jfs fsck'")
            blk, off = self.geo.inode_location(ino)
            node = Inode.parse(ino, self._itable_block(blk)[off:off + L.INODE_SIZE])
            self.inodes[ino] = node
        if node is None:
            raise FormatError(f"a directory entry names free inode {ino}; run 'jfs fsck' to repair")
        return node

    # -- block maps -----------------------------------------------------------------------------
    def _ptrs(self, lba: int, level: int, owner: int, m: FileMap) -> list[int]:
        """The pointers of one pointer block (checked: magic, CRC, level, owner)."""
        if not self.geo.data_start <= lba < self.geo.data_end:
            raise FormatError(f"inode {owner} points outside the data area; run 'jfs fsck'")
        raw = self.view.read(lba)
        v = L.parse_checked(L.ptr_block(self.bs), raw, f"pointer block {lba} of inode {owner}")
        if v.level != level or v.owner != owner:
            raise FormatError(f"pointer block {lba} does not belong to inode {owner}; run 'jfs fsck'")
        m.images[lba] = raw
        return list(v.ptrs)

    def filemap(self, ino: int) -> FileMap:
        m = self.maps.get(ino)
        if m is not None:
            return m
        node = self.inode(ino)
        m = FileMap(list(node.direct), node.indirect, node.dindirect)
        if node.indirect:
            m.data += self._ptrs(node.indirect, 1, ino, m)
        if node.dindirect:
            m.children = self._ptrs(node.dindirect, 2, ino, m)
            while m.children and not m.children[-1]:
                m.children.pop()
            p = L.ptrs_per_block(self.bs)
            if len(m.data) < L.N_DIRECT + p:
                m.data += [0] * (L.N_DIRECT + p - len(m.data))
            for child in m.children:
                m.data += self._ptrs(child, 1, ino, m) if child else [0] * p
        while m.data and not m.data[-1]:
            m.data.pop()
        self.maps[ino] = m
        return m

    def data_ranges_of(self, ino: int) -> Ranges:
        """Every block an inode owns (data and pointer blocks), for the trim rule [0169]."""
        try:
            if not self.ibits.test(ino):
                return []
            return ranges_of(self.filemap(ino).all_blocks())
        except FormatError:
            return [(self.geo.data_start, self.geo.data_end - self.geo.data_start)]

    def _store_map(self, ino: int, m: FileMap) -> list[int]:
        """Rebuild the pointer blocks of `m` (in place where they exist) into the transaction;
        returns the pointer blocks written."""
        node = self.inode(ino)
        p = L.ptrs_per_block(self.bs)
        if len(m.data) > L.max_file_blocks(self.bs):
            raise FileTooLarge(f"files are limited to {L.max_file_blocks(self.bs) * self.bs} bytes")
        while m.data and not m.data[-1]:
            m.data.pop()
        data = m.data + [0] * max(0, L.N_DIRECT - len(m.data))
        node.direct = data[:L.N_DIRECT]
        written: list[int] = []
        ind = data[L.N_DIRECT:L.N_DIRECT + p]
        m.indirect = self._put_ptrs(m, m.indirect, ind, 1, ino, written)
        rest = data[L.N_DIRECT + p:]
        chunks = [rest[i:i + p] for i in range(0, len(rest), p)]
        old_children = m.children
        children = []
        for j, chunk in enumerate(chunks):
            old = old_children[j] if j < len(old_children) else 0
            children.append(self._put_ptrs(m, old, chunk, 1, ino, written))
        for old in old_children[len(chunks):]:
            self._free_block(old, m)
        while children and not children[-1]:
            children.pop()
        m.children = children
        m.dindirect = self._put_ptrs(m, m.dindirect, children, 2, ino, written)
        node.indirect, node.dindirect = m.indirect, m.dindirect
        node.nblocks = len(m.all_blocks())
        self._dirty(ino)
        return written

    def _put_ptrs(self, m: FileMap, lba: int, ptrs: list[int], level: int, owner: int,
                  written: list[int]) -> int:
        if not any(ptrs):
            self._free_block(lba, m)
            return 0
        if not lba:
            lba = self._alloc_blocks(1)[0]
        full = ptrs + [0] * (L.ptrs_per_block(self.bs) - len(ptrs))
        img = L.build_checked(L.ptr_block(self.bs), dict(level=level, reserved=0, owner=owner, ptrs=full))
        if m.images.get(lba) != img:
            m.images[lba] = img
            self._t().meta[lba] = img
            written.append(lba)
        return lba

    def _free_block(self, lba: int, m: FileMap | None = None) -> None:
        if lba:
            self._t().freed_blocks.add(lba)
            self._t().meta.pop(lba, None)
            if m is not None:
                m.images.pop(lba, None)

    # -- directories --------------------------------------------------------------------------------
    def dir_blocks(self, ino: int) -> list[DirBlock]:
        blocks = self.dirs.get(ino)
        if blocks is not None:
            return blocks
        node = self.inode(ino)
        if node.type != L.TYPE_DIR:
            raise NotADirectory(f"inode {ino} is not a directory")
        blocks = []
        st = L.dir_block(self.bs)
        for lba in self.filemap(ino).data:
            if not self.geo.data_start <= lba < self.geo.data_end:
                raise FormatError(f"directory inode {ino} points outside the data area; run 'jfs fsck'")
            v = L.parse_checked(st, self.view.read(lba), f"directory block {lba} of inode {ino}")
            blocks.append(DirBlock(lba, {e.name: (e.ino, e.type) for e in v.entries}))
        self.dirs[ino] = blocks
        return blocks

    def _entries(self, ino: int) -> dict[str, tuple[int, int]]:
        out: dict[str, tuple[int, int]] = {}
        for b in self.dir_blocks(ino):
            out.update(b.entries)
        return out

    def _lookup_in(self, dir_ino: int, name: str) -> tuple[int, int] | None:
        for b in self.dir_blocks(dir_ino):
            if name in b.entries:
                return b.entries[name]
        return None

    def _write_dir_block(self, dir_ino: int, b: DirBlock) -> None:
        img = L.build_checked(L.dir_block(self.bs), dict(
            count=len(b.entries), owner=dir_ino,
            entries=[dict(ino=i, type=t, name=n) for n, (i, t) in b.entries.items()]))
        self._t().meta[b.lba] = img

    def _dir_add(self, dir_ino: int, dir_path: str, op: str, name: str, ino: int, typ: int) -> None:
        blocks = self.dir_blocks(dir_ino)
        need = L.dir_entry_size(name)
        cap = L.dir_capacity(self.bs)
        target = next((b for b in blocks if b.used() + need <= cap), None)
        if target is None:
            m = self.filemap(dir_ino)
            lba = self._alloc_blocks(1)[0]
            target = DirBlock(lba, {})
            blocks.append(target)
            m.data.append(lba)
            node = self.inode(dir_ino)
            node.size = len(blocks) * self.bs
            self._record(dir_ino, dir_path, op, self._store_map(dir_ino, m))
        target.entries[name] = (ino, typ)
        self._write_dir_block(dir_ino, target)
        self._touch_dir(dir_ino, dir_path, op, [target.lba])

    def _dir_remove(self, dir_ino: int, dir_path: str, op: str, name: str) -> None:
        blocks = self.dir_blocks(dir_ino)
        idx = next(i for i, b in enumerate(blocks) if name in b.entries)
        b = blocks[idx]
        del b.entries[name]
        if not b.entries and idx == len(blocks) - 1:
            blocks.pop()
            m = self.filemap(dir_ino)
            m.data.pop()
            self._free_block(b.lba)
            self._t().meta.pop(b.lba, None)
            self.inode(dir_ino).size = len(blocks) * self.bs
            self._record(dir_ino, dir_path, op, self._store_map(dir_ino, m))
            self._touch_dir(dir_ino, dir_path, op, [])
        else:
            self._write_dir_block(dir_ino, b)
            self._touch_dir(dir_ino, dir_path, op, [b.lba])

    def _touch_dir(self, dir_ino: int, dir_path: str, op: str, blocks: list[int]) -> None:
        node = self.inode(dir_ino)
        node.mtime_ns = node.ctime_ns = _now()
        self._dirty(dir_ino)
        self._record(dir_ino, dir_path, op, blocks)

    # -- path resolution ------------------------------------------------------------------------------
    def _resolve(self, parts: list[str]) -> int:
        ino = L.ROOT_INO
        for i, name in enumerate(parts):
            if self.inode(ino).type != L.TYPE_DIR:
                raise NotADirectory(f"{join(parts[:i])} is not a directory")
            hit = self._lookup_in(ino, name)
            if hit is None:
                raise FileNotFound(f"{join(parts[:i + 1])}: no such file or directory")
            ino = hit[0]
        return ino

    def lookup(self, path: str) -> int:
        """The inode number of `path`."""
        return self._resolve(split_path(path))

    def _parent(self, path: str) -> tuple[int, str, str, list[str]]:
        """(parent inode, parent path, name, parts) of a path that names an entry."""
        parts = split_path(path)
        if not parts:
            raise InvalidArgument("the root directory cannot be created, removed or renamed")
        parent = self._resolve(parts[:-1])
        if self.inode(parent).type != L.TYPE_DIR:
            raise NotADirectory(f"{join(parts[:-1])} is not a directory")
        return parent, join(parts[:-1]), parts[-1], parts

    # -- transactions ---------------------------------------------------------------------------------
    def _t(self) -> _Txn:
        assert self._txn is not None, "metadata changes happen only inside an operation"
        return self._txn

    def _dirty(self, ino: int) -> None:
        self._t().dirty_inodes.add(ino)

    def _record(self, ino: int, path: str | None, op: str, blocks: list[int]) -> None:
        t = self._t()
        rec = t.records.get(ino)
        if rec is None:
            t.records[ino] = RecordSpec(ino, path, op, ranges_of(blocks))
        else:
            rec.ranges = merge_ranges(rec.ranges + ranges_of(blocks))
            rec.path = rec.path or path

    @contextmanager
    def _op(self) -> Iterator[_Txn]:
        if self.readonly:
            raise ReadOnlyFs("the file system is mounted read-only")
        self._txn = _Txn()
        try:
            yield self._txn
            self._commit(self._txn)
        except BaseException:
            self._txn = None
            self._load()  # nothing of the failed operation reached the volume: start over
            raise
        finally:
            self._txn = None

    def _commit(self, t: _Txn) -> None:
        if not t.records and not t.meta and not t.dirty_inodes:
            return
        geo = self.geo
        for ino in t.dirty_inodes:  # inodes into their table blocks
            blk, off = geo.inode_location(ino)
            raw = bytearray(t.meta.get(blk) or self._itable_block(blk))
            node = self.inodes.get(ino)
            raw[off:off + L.INODE_SIZE] = node.build() if node is not None and ino not in t.freed_inodes \
                else bytes(L.INODE_SIZE)
            t.meta[blk] = bytes(raw)
        for ino in t.freed_inodes:
            self.inodes[ino] = None
            self.maps.pop(ino, None)
            self.dirs.pop(ino, None)
        nbytes = L.bits_per_bitmap_block(self.bs) // 8
        for kind, k in self._bitmap_blocks_touched(t, nbytes):
            bm = self.ibits if kind == "i" else self.bbits
            freed = t.freed_inodes if kind == "i" else t.freed_blocks
            chunk = bytearray(bm.bits[k * nbytes:(k + 1) * nbytes])
            for i in freed:
                if k * nbytes * 8 <= i < (k + 1) * nbytes * 8:
                    j = i - k * nbytes * 8
                    chunk[j >> 3] &= ~(1 << (j & 7))
            magic = L.INODE_BITMAP_MAGIC if kind == "i" else L.BLOCK_BITMAP_MAGIC
            start = geo.ibitmap_start if kind == "i" else geo.bbitmap_start
            t.meta[start + k] = L.build_checked(L.bitmap_block(self.bs, magic),
                                                dict(reserved=0, index=k, bits=bytes(chunk)))
        self.log.commit(t.meta, list(t.records.values()), lambda: self._write_data(t))
        for lba, img in t.meta.items():
            if geo.itable_start <= lba < geo.data_start:
                self.itable[lba] = img
        for i in t.freed_blocks:
            self.bbits.clear(i)
        for i in t.freed_inodes:
            self.ibits.clear(i)

    def _bitmap_blocks_touched(self, t: _Txn, nbytes: int) -> set[tuple[str, int]]:
        bpb = nbytes * 8
        touched = {("i", i // bpb) for i in t.freed_inodes} | {("b", i // bpb) for i in t.freed_blocks}
        return touched | t.bitmap_dirty

    def _write_data(self, t: _Txn) -> None:
        run_start, run = 0, bytearray()
        for lba in sorted(t.data):
            if run and lba == run_start + len(run) // self.bs:
                run += t.data[lba]
                continue
            if run:
                self.view.write(run_start, bytes(run))
            run_start, run = lba, bytearray(t.data[lba])
        if run:
            self.view.write(run_start, bytes(run))

    def _alloc_blocks(self, n: int) -> list[int]:
        out = self.bbits.alloc(n, "blocks")
        bpb = L.bits_per_bitmap_block(self.bs)
        self._t().bitmap_dirty.update(("b", i // bpb) for i in out)
        return out

    def _alloc_inode(self, typ: int, mode: int) -> Inode:
        ino = self.ibits.alloc(1, "inodes")[0]
        self._t().bitmap_dirty.add(("i", ino // L.bits_per_bitmap_block(self.bs)))
        now = _now()
        node = Inode(ino, typ, mode & 0o7777, 1 if typ == L.TYPE_FILE else 2,
                     self.log.head.head_seq & 0xFFFFFFFF, 0, now, now, now)
        self.inodes[ino] = node
        self.maps[ino] = FileMap([])
        if typ == L.TYPE_DIR:
            self.dirs[ino] = []
        self._dirty(ino)
        return node

    def _free_inode(self, ino: int) -> None:
        m = self.filemap(ino)
        for b in m.all_blocks():
            self._free_block(b)
        t = self._t()
        t.freed_inodes.add(ino)
        t.dirty_inodes.add(ino)

    # -- file content ---------------------------------------------------------------------------------
    def _read_blocks(self, lbas: list[int]) -> bytes:
        out = bytearray()
        i = 0
        while i < len(lbas):
            if not lbas[i]:
                out += bytes(self.bs)
                i += 1
                continue
            j = i + 1
            while j < len(lbas) and lbas[j] == lbas[j - 1] + 1:
                j += 1
            if not all(self.geo.data_start <= b < self.geo.data_end for b in (lbas[i], lbas[j - 1])):
                raise FormatError("a file points outside the data area; run 'jfs fsck'")
            out += self.view.read(lbas[i], j - i)
            i = j
        return bytes(out)

    def _file(self, path: str) -> tuple[int, Inode]:
        ino = self.lookup(path)
        node = self.inode(ino)
        if node.type == L.TYPE_DIR:
            raise IsADirectory(f"{path} is a directory")
        return ino, node

    def _put_data(self, ino: int, offset: int, data: bytes) -> list[int]:
        """Copy-on-write `data` at `offset` into the file's map; returns the new data blocks."""
        bs, node, m = self.bs, self.inode(ino), self.filemap(ino)
        end = offset + len(data)
        if not data:
            return []
        if -(-end // bs) > L.max_file_blocks(bs):
            raise FileTooLarge(f"files are limited to {L.max_file_blocks(bs) * bs} bytes")
        k0, k1 = offset // bs, (end - 1) // bs
        if len(m.data) <= k1:
            m.data += [0] * (k1 + 1 - len(m.data))
        new = self._alloc_blocks(k1 - k0 + 1)
        t = self._t()
        for i, k in enumerate(range(k0, k1 + 1)):
            lo, hi = max(offset, k * bs), min(end, (k + 1) * bs)
            if hi - lo == bs:
                blk = data[lo - offset:hi - offset]
            else:
                old = m.data[k]
                base = bytearray(t.data.get(old) or (self.view.read(old) if old else bytes(bs)))
                base[lo - k * bs:hi - k * bs] = data[lo - offset:hi - offset]
                blk = bytes(base)
            if m.data[k]:
                self._free_block(m.data[k])
                t.data.pop(m.data[k], None)
            m.data[k] = new[i]
            t.data[new[i]] = blk
        node.size = max(node.size, end)
        return new

    def _set_size(self, ino: int, size: int) -> list[int]:
        """Truncate or extend (with a hole); returns data blocks written (a zeroed tail)."""
        bs, node, m = self.bs, self.inode(ino), self.filemap(ino)
        if -(-size // bs) > L.max_file_blocks(bs):
            raise FileTooLarge(f"files are limited to {L.max_file_blocks(bs) * bs} bytes")
        written: list[int] = []
        if size < node.size:
            keep = -(-size // bs)
            for b in m.data[keep:]:
                self._free_block(b)
            del m.data[keep:]
            if size % bs and keep <= len(m.data) and m.data[keep - 1]:
                old = self.view.read(m.data[keep - 1])
                tail = old[:size % bs] + bytes(bs - size % bs)
                if tail != old:
                    new = self._alloc_blocks(1)[0]
                    self._free_block(m.data[keep - 1])
                    m.data[keep - 1] = new
                    self._t().data[new] = tail
                    written.append(new)
        node.size = size
        return written

    # -- public operations ----------------------------------------------------------------------------
    def create(self, path: str, mode: int = 0o644) -> int:
        """Create an empty regular file; returns its inode number."""
        with self._op():
            return self._create(path, mode).ino

    def _create(self, path: str, mode: int, typ: int = L.TYPE_FILE) -> Inode:
        parent, ppath, name, parts = self._parent(path)
        if self._lookup_in(parent, name) is not None:
            raise FileExists(f"{join(parts)} already exists")
        node = self._alloc_inode(typ, mode)
        op = "mkdir" if typ == L.TYPE_DIR else "create"
        self._record(node.ino, join(parts), op, [])
        self._dir_add(parent, ppath, op, name, node.ino, typ)
        if typ == L.TYPE_DIR:
            self.inode(parent).nlink += 1
        return node

    def write_file(self, path: str, data: bytes) -> None:
        """Create `path` or replace its whole content with `data`, atomically."""
        with self._op():
            parts = split_path(path)
            try:
                ino, node = self._file(path)
                op = "write"
            except FileNotFound:
                node = self._create(path, 0o644)
                ino, op = node.ino, "create"
            blocks = self._set_size(ino, 0)
            blocks += self._put_data(ino, 0, bytes(data))
            blocks += self._store_map(ino, self.filemap(ino))
            node.mtime_ns = node.ctime_ns = _now()
            self._record(ino, join(parts), op, blocks)

    def write(self, path: str, offset: int, data: bytes) -> int:
        """Write `data` at `offset` (overwrite and/or extend); returns bytes written."""
        if offset < 0:
            raise InvalidArgument("a write offset cannot be negative")
        with self._op():
            ino, node = self._file(path)
            blocks = self._put_data(ino, offset, bytes(data))
            blocks += self._store_map(ino, self.filemap(ino))
            node.mtime_ns = node.ctime_ns = _now()
            self._record(ino, join(split_path(path)), "write", blocks)
        return len(data)

    def read(self, path: str, offset: int = 0, size: int | None = None) -> bytes:
        """Bytes `offset`..`offset+size` of a file (to the end when size is None)."""
        ino, node = self._file(path)
        end = node.size if size is None else min(node.size, offset + max(size, 0))
        if offset >= end:
            return b""
        m, bs = self.filemap(ino), self.bs
        k0, k1 = offset // bs, (end - 1) // bs
        lbas = [m.data[k] if k < len(m.data) else 0 for k in range(k0, k1 + 1)]
        raw = self._read_blocks(lbas)
        return raw[offset - k0 * bs:end - k0 * bs]

    def truncate(self, path: str, size: int) -> None:
        if size < 0:
            raise InvalidArgument("a file size cannot be negative")
        with self._op():
            ino, node = self._file(path)
            blocks = self._set_size(ino, size)
            blocks += self._store_map(ino, self.filemap(ino))
            node.mtime_ns = node.ctime_ns = _now()
            self._record(ino, join(split_path(path)), "truncate", blocks)

    def unlink(self, path: str) -> None:
        with self._op():
            parent, ppath, name, parts = self._parent(path)
            hit = self._lookup_in(parent, name)
            if hit is None:
                raise FileNotFound(f"{join(parts)}: no such file")
            if hit[1] == L.TYPE_DIR:
                raise IsADirectory(f"{join(parts)} is a directory; use rmdir")
            self._drop(hit[0], join(parts), "unlink")
            self._dir_remove(parent, ppath, "unlink", name)

    def _drop(self, ino: int, path: str, op: str) -> None:
        node = self.inode(ino)
        node.nlink = 0 if node.type == L.TYPE_DIR else node.nlink - 1
        self._record(ino, path, op, [])
        if node.nlink <= 0:
            self._free_inode(ino)
        else:
            node.ctime_ns = _now()
            self._dirty(ino)

    def mkdir(self, path: str, mode: int = 0o755) -> int:
        with self._op():
            return self._create(path, mode, L.TYPE_DIR).ino

    def rmdir(self, path: str) -> None:
        with self._op():
            parent, ppath, name, parts = self._parent(path)
            hit = self._lookup_in(parent, name)
            if hit is None:
                raise FileNotFound(f"{join(parts)}: no such directory")
            if hit[1] != L.TYPE_DIR:
                raise NotADirectory(f"{join(parts)} is not a directory")
            if self._entries(hit[0]):
                raise NotEmpty(f"{join(parts)} is not empty")
            self._drop(hit[0], join(parts), "rmdir")
            self._dir_remove(parent, ppath, "rmdir", name)
            self.inode(parent).nlink -= 1

    def rename(self, old: str, new: str) -> None:
        """Move `old` to `new`, replacing a file or an empty directory there (POSIX rename)."""
        with self._op():
            op_, opath, oname, oparts = self._parent(old)
            np_, npath, nname, nparts = self._parent(new)
            hit = self._lookup_in(op_, oname)
            if hit is None:
                raise FileNotFound(f"{join(oparts)}: no such file or directory")
            ino, typ = hit
            if oparts == nparts:
                return
            if typ == L.TYPE_DIR and nparts[:len(oparts)] == oparts:
                raise InvalidArgument(f"cannot move {join(oparts)} into itself")
            target = self._lookup_in(np_, nname)
            if target is not None:
                tino, ttyp = target
                if ttyp == L.TYPE_DIR and typ != L.TYPE_DIR:
                    raise IsADirectory(f"{join(nparts)} is a directory")
                if ttyp != L.TYPE_DIR and typ == L.TYPE_DIR:
                    raise NotADirectory(f"{join(nparts)} is not a directory")
                if ttyp == L.TYPE_DIR and self._entries(tino):
                    raise NotEmpty(f"{join(nparts)} is not empty")
                if tino == ino:
                    return
                self._drop(tino, join(nparts), "unlink" if ttyp == L.TYPE_FILE else "rmdir")
                self._dir_remove(np_, npath, "rename", nname)
                if ttyp == L.TYPE_DIR:
                    self.inode(np_).nlink -= 1
            self._dir_remove(op_, opath, "rename", oname)
            self._dir_add(np_, npath, "rename", nname, ino, typ)
            if typ == L.TYPE_DIR and op_ != np_:
                self.inode(op_).nlink -= 1
                self.inode(np_).nlink += 1
            node = self.inode(ino)
            node.ctime_ns = _now()
            self._dirty(ino)
            self._record(ino, join(nparts), "rename", [])

    def listdir(self, path: str = "/") -> list[str]:
        ino = self.lookup(path)
        if self.inode(ino).type != L.TYPE_DIR:
            raise NotADirectory(f"{path} is not a directory")
        return sorted(self._entries(ino))

    def scandir(self, path: str = "/") -> list[tuple[str, int, str]]:
        """(name, inode, "file"|"dir") of every entry of a directory, sorted by name."""
        ino = self.lookup(path)
        if self.inode(ino).type != L.TYPE_DIR:
            raise NotADirectory(f"{path} is not a directory")
        return [(n, i, TYPE_NAMES[t]) for n, (i, t) in sorted(self._entries(ino).items())]

    def stat(self, path: str) -> StatResult:
        node = self.inode(self.lookup(path))
        return StatResult(node.ino, TYPE_NAMES[node.type], node.mode, node.nlink, node.size,
                          node.atime_ns, node.mtime_ns, node.ctime_ns, node.nblocks, node.generation)

    def exists(self, path: str) -> bool:
        try:
            self.lookup(path)
            return True
        except (FileNotFound, NotADirectory):
            return False

    def chmod(self, path: str, mode: int) -> None:
        self._setattr(path, lambda n: setattr(n, "mode", mode & 0o7777))

    def utimens(self, path: str, atime_ns: int, mtime_ns: int) -> None:
        def apply(n: Inode) -> None:
            n.atime_ns, n.mtime_ns = atime_ns, mtime_ns
        self._setattr(path, apply)

    def _setattr(self, path: str, change: Callable[[Inode], None]) -> None:
        with self._op():
            ino = self.lookup(path)
            node = self.inode(ino)
            change(node)
            node.ctime_ns = _now()
            self._dirty(ino)
            self._record(ino, join(split_path(path)), "setattr", [])

    def open_for_write(self, path: str) -> int:
        """[0161] hook for a FUSE layer: resolve the file; every later write logs its metadata."""
        return self._file(path)[0]

    def fsync(self, path: str | None = None) -> None:
        """Durable before returning (every operation already committed and checkpointed)."""
        if path is not None:
            self.lookup(path)
        self.view.flush()

    def sync(self) -> None:
        self.view.flush()

    def trim(self) -> int:
        """Trim the metadata log under the [0168]-[0170] rule; returns records deleted."""
        if self.readonly:
            return 0
        return self.log.trim()

    def statfs(self) -> StatFs:
        return StatFs(self.bs, self.geo.num_blocks, self.bbits.nfree, self.geo.inode_count,
                      self.ibits.nfree, L.MAX_NAME, self.geo.log_blocks, self.log.used(), self.label,
                      str(uuidlib.UUID(bytes=self.uuid)))

    def walk(self, path: str = "/") -> Iterator[tuple[str, StatResult]]:
        """Every entry below `path` (depth first), with its stat."""
        base = split_path(path)
        for name in self.listdir(path):
            child = join([*base, name])
            st = self.stat(child)
            yield child, st
            if st.type == "dir":
                yield from self.walk(child)


def tree(fs: FileSystem) -> dict[str, bytes | None]:
    """Path -> content (None for directories): the whole tree, for tests and tools."""
    return {p: (None if st.type == "dir" else fs.read(p)) for p, st in fs.walk("/")}
