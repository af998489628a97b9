"""A mounted jfs's in-memory state, and each operation as one metadata-log transaction (SPEC §8 [0160]-[0161]).

The model is xv6's begin_op()/log_write()/end_op() around the buffer cache: an operation runs
inside `_op()`, changes inodes, block maps, directory blocks and the allocators in memory while
`_Txn` collects what it touched, and at the end `_commit` turns that into block images (inode-table
blocks, bitmap blocks, pointer and directory blocks) and hands them, with the file data and one
record per touched inode, to `MetaLog.commit`. File data is copy-on-write: new data always goes to
freshly allocated blocks.

Keeps true:
- Any failure inside an operation (no space, log full, bad name...) leaves the volume unchanged:
  nothing reaches the log, and the in-memory state is reloaded from disk.
- A block or inode the operation frees becomes allocatable only after its transaction committed
  (the bitmap images carry the cleared bits; the in-memory bits are cleared after the commit).
- Directory blocks, pointer blocks, inodes and bitmaps reach their home location only through a
  committed transaction.
- The caches (`inodes`, `maps`, `dirs`, `itable`) always equal what the volume holds after the last
  commit. A commit that fails part-way (the device refused a write after the log was touched) may
  leave its transaction committed or not: before the next operation the log is opened again (its
  committed transaction replayed, exactly as at mount) and the state re-read, so memory never
  disagrees with the volume; until that succeeds every operation fails.
- Blocks and log space `reserve`d for writes not yet committed are never handed to another
  operation: `_alloc_blocks` and every transaction see only what is free beyond them, and `statfs`
  counts them as used. `write_cost` is an upper bound of what one `write` transaction allocates and
  logs, so a write whose cost was reserved (and released just before it) never lacks space.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

from jfs import layout as L
from jfs.alloc import Bitmap
from jfs.blockmap import FileMap, read_map, store_map
from jfs.codecs import DirBlock, Inode, bitmap_image, parse_bitmap
from jfs.errors import FileTooLarge, LogFull, NoSpace, ReadOnlyFs
from jfs.metalog import BlockView, MetaLog, RecordSpec
from vstore.blocks.device import BlockDevice
from vstore.blocks.errors import FormatError
from vstore.blocks.ranges import Ranges, merge_ranges, ranges_of


@dataclass
class _Txn:
    meta: dict[int, bytes] = field(default_factory=dict)
    data: dict[int, bytes] = field(default_factory=dict)
    records: dict[int, RecordSpec] = field(default_factory=dict)
    dirty_inodes: set[int] = field(default_factory=set)
    freed_blocks: set[int] = field(default_factory=set)
    freed_inodes: set[int] = field(default_factory=set)
    bitmap_dirty: set[tuple[str, int]] = field(default_factory=set)


class _Log(MetaLog):
    """The live metadata log, whose free space excludes the blocks `reserved` for writes not yet
    committed (so no other transaction takes them)."""

    reserved: int = 0

    def free(self) -> int:
        return super().free() - self.reserved


class Transactions:
    """The state of a mounted jfs (caches, allocators, the log) and the transaction machinery."""

    def __init__(self, device: BlockDevice, view: BlockView, sb: Any, *, log_full_wait: float = 0.0) -> None:
        self.device = device
        self.view = view
        self.sb = sb
        self.geo = L.Geometry.from_superblock(sb)
        self.bs = self.geo.block_size
        self.uuid: bytes = sb.uuid
        self.label: str = sb.label
        self.readonly = view.readonly
        self.log_full_wait = log_full_wait
        self.log = self._open_log()
        self.reserved_blocks = 0  # held by `reserve` for writes not yet committed
        self._txn: _Txn | None = None
        self._torn = False  # a commit failed after it may have written part of its transaction
        self._stale = False  # the in-memory state must be read again before the next operation
        self._load()

    def _open_log(self) -> _Log:
        """Open the log, replaying the transaction committed but not checkpointed (as at mount)."""
        log = _Log.open(self.view, self.geo, self.uuid, owned_ranges=self.data_ranges_of,
                        has_unshipped=self.device.has_unshipped, log_full_wait=self.log_full_wait)
        assert isinstance(log, _Log)
        return log

    # -- in-memory state loaded from disk ------------------------------------------------------
    def _load(self) -> None:
        geo = self.geo
        self.inodes: dict[int, Inode | None] = {}
        self.maps: dict[int, FileMap] = {}
        self.dirs: dict[int, list[DirBlock]] = {}
        self.itable: dict[int, bytes] = {}
        self.ibits = self._load_bitmap(geo.ibitmap_start, geo.ibitmap_blocks, L.INODE_BITMAP_MAGIC,
                                       geo.inode_count, 2, "inode bitmap")
        self.bbits = self._load_bitmap(geo.bbitmap_start, geo.bbitmap_blocks, L.BLOCK_BITMAP_MAGIC,
                                       geo.data_end, geo.data_start, "block bitmap")

    def _reload(self) -> None:
        """Read the state back from the volume after a failed operation; after a torn commit, first
        re-open the log so that its transaction is either replayed in full or not there at all."""
        self._stale = True
        self.inodes, self.maps, self.dirs, self.itable = {}, {}, {}, {}
        if self._torn:
            reserved = self.log.reserved
            self.log = self._open_log()
            self.log.reserved = reserved
            self._torn = False
        self._load()
        self._stale = False

    def _load_bitmap(self, start: int, count: int, magic: bytes, limit: int, first: int,
                     what: str) -> Bitmap:
        blocks = [self.view.read(start + k) for k in range(count)]
        return Bitmap(parse_bitmap(self.bs, magic, blocks, start, what), limit, first)

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
            if self._stale and self._txn is None:
                self._reload()  # reads, too, see the volume only once the log has settled it
            if not 0 < ino < self.geo.inode_count:
                raise FormatError(f"inode number {ino} is outside the inode table; run 'jfs fsck'")
            blk, off = self.geo.inode_location(ino)
            node = Inode.parse(ino, self._itable_block(blk)[off:off + L.INODE_SIZE])
            self.inodes[ino] = node
        if node is None:
            raise FormatError(f"a directory entry names free inode {ino}; run 'jfs fsck' to repair")
        return node

    # -- block maps -----------------------------------------------------------------------------
    def filemap(self, ino: int) -> FileMap:
        m = self.maps.get(ino)
        if m is None:
            m = self.maps[ino] = read_map(self.geo, self.view.read, self.inode(ino))
        return m

    def data_ranges_of(self, ino: int) -> Ranges:
        """Every block an inode owns (data and pointer blocks), for the trim rule [0169]."""
        try:
            if not 0 < ino < self.geo.inode_count or not self.ibits.test(ino):
                return []
            return ranges_of(self.filemap(ino).all_blocks())
        except FormatError:
            return [(self.geo.data_start, self.geo.data_end - self.geo.data_start)]

    def _store_map(self, ino: int, m: FileMap) -> list[int]:
        """Rebuild the pointer blocks of `m` into the transaction; returns the pointer blocks written."""
        t = self._t()
        written = store_map(m, self.inode(ino), self.bs, alloc=lambda: self._alloc_blocks(1)[0],
                            put=t.meta.__setitem__, free=self._free_block)
        self._dirty(ino)
        return written

    # -- reservations for writes not yet committed -------------------------------------------------
    def write_cost(self, path: str, offset: int, size: int) -> tuple[int, int]:
        """(blocks, log blocks) that one `write(path, offset, size bytes)` transaction can need at
        most: every touched block anew (copy-on-write), every pointer block over them, and a
        transaction that lists each of them as its own range and touches a bitmap block for each
        block allocated or freed."""
        if size <= 0:
            return 0, 0
        bs, p = self.bs, L.ptrs_per_block(self.bs)
        k0, k1 = offset // bs, (offset + size - 1) // bs
        ptrs = 0
        single, double = L.N_DIRECT, L.N_DIRECT + p  # first file block under each pointer tree
        if k1 >= single and k0 < double:
            ptrs += 1
        if k1 >= double:
            ptrs += 2 + (k1 - double) // p - (max(k0, double) - double) // p  # the root and its children
        blocks = k1 - k0 + 1 + ptrs
        meta = 1 + min(self.geo.bbitmap_blocks, 2 * blocks) + ptrs  # inode table, bitmaps, pointers
        body = 16 + 4 * meta + 16 + len(path.encode()) + 8 * blocks
        desc = -(-(L.TXN_HEAD_BYTES + body) // bs)
        return blocks, desc + meta + 1

    def reservable(self) -> tuple[int, int]:
        """(blocks, log blocks) that `reserve` can hold now (the log trimmed as far as the rule allows)."""
        if not self.readonly:
            self.log.trim()
        return max(0, self.bbits.nfree - self.reserved_blocks), max(0, self.log.free())

    def reserve(self, blocks: int, log_blocks: int) -> None:
        """Hold `blocks` free blocks and `log_blocks` log blocks for a write committed later, or raise
        NoSpace / LogFull and hold nothing."""
        if self.readonly:
            raise ReadOnlyFs("the file system is mounted read-only")
        if blocks > self.bbits.nfree - self.reserved_blocks:
            raise NoSpace("the file system has no free blocks left; delete files or use a larger image")
        if log_blocks > self.log.free():
            self.log.trim()
            if log_blocks > self.log.free():
                raise LogFull("the metadata log has no room for more writes until its records are shipped "
                              "to the Async site; ship them and retry")
        self.reserved_blocks += blocks
        self.log.reserved += log_blocks

    def release(self, blocks: int, log_blocks: int) -> None:
        """Give back what `reserve` held (before committing the write it was for, or instead of it)."""
        self.reserved_blocks = max(0, self.reserved_blocks - blocks)
        self.log.reserved = max(0, self.log.reserved - log_blocks)

    # -- allocation -------------------------------------------------------------------------------
    def _alloc_blocks(self, n: int) -> list[int]:
        if n > self.bbits.nfree - self.reserved_blocks:
            raise NoSpace("the file system has no free blocks left; delete files or use a larger image")
        out = self.bbits.alloc(n, "blocks")
        bpb = L.bits_per_bitmap_block(self.bs)
        self._t().bitmap_dirty.update(("b", i // bpb) for i in out)
        return out

    def _alloc_inode(self, typ: int, mode: int) -> Inode:
        ino = self.ibits.alloc(1, "inodes")[0]
        self._t().bitmap_dirty.add(("i", ino // L.bits_per_bitmap_block(self.bs)))
        now = time.time_ns()
        node = Inode(ino, typ, mode & 0o7777, 1 if typ == L.TYPE_FILE else 2,
                     self.log.head.head_seq & 0xFFFFFFFF, 0, now, now, now)
        self.inodes[ino] = node
        self.maps[ino] = FileMap([])
        if typ == L.TYPE_DIR:
            self.dirs[ino] = []
        self._dirty(ino)
        return node

    def _free_block(self, lba: int) -> None:
        if lba:
            self._t().freed_blocks.add(lba)
            self._t().meta.pop(lba, None)

    def _free_inode(self, ino: int) -> None:
        m = self.filemap(ino)
        for b in m.all_blocks():
            self._free_block(b)
        t = self._t()
        t.freed_inodes.add(ino)
        t.dirty_inodes.add(ino)

    # -- file content (copy-on-write) ---------------------------------------------------------------
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
        if self._stale:
            self._reload()  # an earlier failure could not read the volume back: it must work first
        self._txn = _Txn()
        try:
            yield self._txn
            self._commit(self._txn)
        except BaseException:
            self._txn = None
            with suppress(Exception):  # the operation's own error is the one to report
                self._reload()  # memory holds the failed operation: read the volume's state back
            raise  # when the reload failed too, the state stays `_stale`: retried before the next operation
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
            t.meta[start + k] = bitmap_image(self.bs, magic, k, bytes(chunk))
        self._torn = True  # from the first write on, a failure may leave part of it on the volume
        try:
            self.log.commit(t.meta, list(t.records.values()), t.data)
        except LogFull:
            self._torn = False  # refused before anything was written
            raise
        self._torn = False
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
