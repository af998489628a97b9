"""jfs: a journaling file system on any `BlockDevice` (SPEC §8, embodiment 4 [0158]-[0173]).

The model is a small Unix file system with xv6's log: every operation that changes the tree is one
metadata-log transaction (`jfs.txn` builds it, `jfs.metalog` commits it), names are resolved by
`jfs.dirs`, an inode's blocks are found through `jfs.blockmap`, and the bytes of every block come from
`jfs.codecs`. This module holds mkfs, mounting, and the operations an application sees (POSIX-like,
path based).

Keeps true:
- Every operation that changes the tree is one metadata-log transaction: it carries a record per
  touched inode (the file, and the parent directory whose blocks changed), commits atomically and
  is replayed at mount. A file's metadata is therefore logged between every open-for-write and
  close ([0161]).
- Ordered mode with copy-on-write data: new file data goes to freshly allocated blocks, written
  before the commit that makes it visible, its CRC in that commit; blocks a transaction frees become
  allocatable only once it is checkpointed on disk. A crash shows each file as of one committed
  transaction, never garbage and never a mix.
- Operations are durable at `fsync`, `sync`, unmount (and, in the FUSE mount, every commit
  interval), not when they return: after a power cut the volume shows the state after a prefix of
  the operations, which holds every operation before the last completed flush.
- The file system never asks what device it runs on: all I/O is `read`/`write`/`flush`, and the
  trim rule asks `device.has_unshipped` ([0169]). How long a full log waits for shipping is the
  caller's choice at mount (`log_full_wait`), since only the caller knows whether another process
  ships meanwhile.
- Any failure inside an operation (no space, log full, bad name...) leaves the volume unchanged;
  one the device causes part-way through a commit leaves the transaction either complete or absent
  (the log decides, as at mount), and memory is re-read to agree with it.
- Space can be held ahead for a write committed later (`write_cost`, `reserve`, `release`): held
  blocks and log space go to no other operation, and `statfs` reports them as used.
- mkfs writes the primary superblock last, after a flush of everything else, so a volume with a
  valid primary superblock is a complete empty file system.
- Mount uses block 0 when it is a usable superblock (`codecs.superblock_at`), else the backup in
  the last block: read-only, nothing is written; read-write, a warning is logged and block 0 is
  rewritten from the backup as the volume is marked dirty. A block 0 of zeros is no file system.
- `walk` meets each directory once: a directory named twice (a cycle) is a FormatError, never a loop.

Limits: names <= 255 UTF-8 bytes; files up to (12 + P + P*P) blocks, P pointers per block
(>= 64 GiB at 4 KiB blocks); access times are not updated by reads (noatime).
"""

from __future__ import annotations

import logging
import time
import uuid as uuidlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from jfs import layout as L
from jfs.codecs import (
    TYPE_NAMES,
    Inode,
    bitmap_images,
    fresh_bitmaps,
    read_superblock,
    superblock_at,
    superblock_image,
)
from jfs.dirs import Directories, join, split_path
from jfs.errors import (
    FileExists,
    FileNotFound,
    InvalidArgument,
    IsADirectory,
    NoSpace,
    NotADirectory,
    NotEmpty,
)
from jfs.logring import BlockView
from jfs.metalog import MetaLog
from vstore.blocks.device import BlockDevice, ImageDevice
from vstore.blocks.errors import BlockDeviceError, FormatError

# What a caller passes as `log_full_wait` for a device whose entries another process ships
# meanwhile (a lab that is up): a full metadata log waits this long for the shipper before LogFull.
LOG_FULL_WAIT_S = 60.0

log = logging.getLogger(__name__)


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
    now = time.time_ns()
    root = Inode(L.ROOT_INO, L.TYPE_DIR, 0o755, 2, 1, 0, now, now, now)
    blk, off = geo.inode_location(L.ROOT_INO)
    table = bytearray(bs)
    table[off:off + L.INODE_SIZE] = root.build()
    device.write(blk, bytes(table))
    sb = superblock_image(geo, uid, label, L.STATE_CLEAN, 0, now)
    device.write(geo.backup_sb, sb)
    device.flush()
    device.write(0, sb)
    device.flush()


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
    if head[:4] == b"JFSB":  # a jfs superblock, damaged, and no usable backup either
        raise FormatError(f"{path}: superblock (block 0) and its backup (last block) are both damaged; "
                          "'jfs fsck' needs one of them: restore the volume from a replica or a backup")
    raise FormatError(f"{path} is not a jfs image (no valid superblock); create one with 'jfs mkfs'")


def open_image(path: str | Path, *, readonly: bool = False, durable: bool = False) -> BlockDevice:
    """Open a jfs image with the block size its superblock states."""
    bs, _ = probe_image(path)
    return ImageDevice(path, bs, readonly=readonly, durable=durable)


# -- the file system ------------------------------------------------------------------------------
class FileSystem(Directories):
    """A mounted jfs. Path-based operations; each change is one committed transaction."""

    # -- mount / unmount ---------------------------------------------------------------------
    @classmethod
    def mount(cls, device: BlockDevice, *, readonly: bool = False, log_full_wait: float | None = None,
              session: bool = True) -> FileSystem:
        """Mount: check the superblock, replay the committed log, mark the volume in use. A full
        metadata log waits up to `log_full_wait` seconds for shipping before `LogFull`; by default,
        as long as the device says (`log_full_wait` on a device whose writes another process ships),
        else not at all. `session=False` (one short command) leaves the superblock's state as it
        is: the log alone keeps the volume consistent, and nothing is written unless it changes."""
        if log_full_wait is None:
            log_full_wait = float(getattr(device, "log_full_wait", 0.0))
        block0 = device.read(0)
        if not any(block0):
            raise FormatError(f"{device.name} holds no file system (block 0 is empty): make one with `jfs mkfs`; "
                              "on a replica, it arrives once the primary's writes are copied there")
        damaged: FormatError | None = None
        try:
            sb = superblock_at(device, 0, "superblock (block 0)")
        except FormatError as exc:
            damaged = exc
            try:
                sb = superblock_at(device, device.num_blocks - 1, "backup superblock")
            except FormatError:
                raise damaged from None
        fs = cls(device, BlockView(device, readonly=readonly), sb, log_full_wait=log_full_wait)
        if damaged is not None:
            log.warning("%s: %s; mounted with the backup superblock (last block)%s", device.name,
                        str(damaged).split(";")[0], "" if fs.readonly else ", which now replaces it")
        if not fs.readonly and (session or damaged is not None):
            fs._write_superblock(L.STATE_DIRTY)
            fs.marked_dirty = True
        return fs

    def unmount(self) -> None:
        """Commit what is pending, checkpoint the log on disk, mark clean (when marked dirty)."""
        if self.readonly:
            return
        self.commit_pending()
        self.log.sync()
        if self.marked_dirty:
            self._write_superblock(L.STATE_CLEAN)
            self.marked_dirty = False

    def _write_superblock(self, state: int) -> None:
        self.view.write(0, superblock_image(self.geo, self.uuid, self.label, state,
                                            self.log.checkpointed(), self.sb.mkfs_time_ns))
        self.view.flush()

    def __enter__(self) -> FileSystem:
        return self

    def __exit__(self, *exc: object) -> None:
        self.unmount()

    # -- public operations ----------------------------------------------------------------------------
    def _file(self, path: str) -> tuple[int, Inode]:
        ino = self.lookup(path)
        node = self.inode(ino)
        if node.type == L.TYPE_DIR:
            raise IsADirectory(f"{path} is a directory")
        return ino, node

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
            node.mtime_ns = node.ctime_ns = time.time_ns()
            self._record(ino, join(parts), op, blocks)

    def write(self, path: str, offset: int, data: bytes, *, grouped: bool = False) -> int:
        """Write `data` at `offset` (overwrite and/or extend); returns bytes written. `grouped`
        (with `group` set): the write joins the running group like an attribute change: committed
        with the next other operation or `commit_pending`, and `on_lost` hears if that fails."""
        if offset < 0:
            raise InvalidArgument("a write offset cannot be negative")
        with self._op(joinable=grouped) as t:
            ino, node = self._file(path)
            blocks = self._put_data(ino, offset, bytes(data))
            blocks += self._store_map(ino, self.filemap(ino))
            node.mtime_ns = node.ctime_ns = time.time_ns()
            self._record(ino, join(split_path(path)), "write", blocks)
            if grouped:
                t.data_inos.add(ino)
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
        lo, hi = offset - k0 * bs, end - k0 * bs
        return raw if lo == 0 and hi == len(raw) else raw[lo:hi]

    def truncate(self, path: str, size: int) -> None:
        if size < 0:
            raise InvalidArgument("a file size cannot be negative")
        with self._op():
            ino, node = self._file(path)
            blocks = self._set_size(ino, size)
            blocks += self._store_map(ino, self.filemap(ino))
            node.mtime_ns = node.ctime_ns = time.time_ns()
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
            node.ctime_ns = time.time_ns()
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
            node.ctime_ns = time.time_ns()
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
        with self._op(joinable=True):
            ino = self.lookup(path)
            node = self.inode(ino)
            change(node)
            node.ctime_ns = time.time_ns()
            self._dirty(ino)
            self._record(ino, join(split_path(path)), "setattr", [])

    def fsync(self, path: str | None = None) -> None:
        """Durable before returning: what is pending is committed, then one flush makes every
        transaction written so far durable (their homes follow at the next flush)."""
        if path is not None:
            self.lookup(path)
        self.commit_pending()
        if self.log.written and not self.readonly:
            self.log.flush()

    def statfs(self) -> StatFs:
        """Sizes and free counts; blocks held for writes not yet committed (`reserve`) count as used."""
        free = max(0, self.bbits.nfree + len(self.freeing) - self.reserved_blocks)
        return StatFs(self.bs, self.geo.num_blocks, free, self.geo.inode_count,
                      self.ibits.nfree, L.MAX_NAME, self.geo.log_blocks, self.log.used(), self.label,
                      str(uuidlib.UUID(bytes=self.uuid)))

    def walk(self, path: str = "/") -> Iterator[tuple[str, StatResult]]:
        """Every entry below `path` (depth first, in name order), with its stat. A directory named
        a second time (a cycle; fsck removes such entries) is a FormatError, never a loop."""
        seen = {self.lookup(path)}
        todo = [(split_path(path), iter(self.listdir(path)))]
        while todo:
            base, names = todo[-1]
            name = next(names, None)
            if name is None:
                todo.pop()
                continue
            parts = [*base, name]
            st = self.stat(join(parts))
            yield join(parts), st
            if st.type == "dir":
                if st.ino in seen:
                    raise FormatError(f"{join(parts)} names a directory already met on the way; run 'jfs fsck'")
                seen.add(st.ino)
                todo.append((parts, iter(self.listdir(join(parts)))))

