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
  commit.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from jfs import layout as L
from jfs.alloc import Bitmap
from jfs.blockmap import FileMap, read_map, store_map
from jfs.codecs import DirBlock, Inode, bitmap_image, parse_bitmap
from jfs.errors import FileTooLarge, ReadOnlyFs
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
        self.log = MetaLog.open(view, self.geo, self.uuid, owned_ranges=self.data_ranges_of,
                                has_unshipped=device.has_unshipped, log_full_wait=log_full_wait)
        self._txn: _Txn | None = None
        self._load()

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
            if not self.ibits.test(ino):
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

    # -- allocation -------------------------------------------------------------------------------
    def _alloc_blocks(self, n: int) -> list[int]:
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
            t.meta[start + k] = bitmap_image(self.bs, magic, k, bytes(chunk))
        self.log.commit(t.meta, list(t.records.values()), t.data)
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
