"""A mounted jfs's in-memory state, and each operation as one metadata-log transaction (SPEC §8 [0160]-[0161]).

The model is xv6's begin_op()/log_write()/end_op() around the buffer cache, with jbd2's running
transaction: an operation runs inside `_op()`, changes inodes, block maps, directory blocks and
the allocators in memory while `_Txn` collects what it touched; `_seal` turns its inodes into
inode-table images; then it is committed alone (`_write_txn`, `MetaLog.commit`), or, with `group`
set (the FUSE mount), a mode or time change or a `grouped` write (gathered writes an attribute
change finds) joins the running transaction, committed with the next other operation or by
`commit_pending`; `on_lost` hears which files' data a failed group took. Creates and removals
commit when they return, so a failing commit never takes back a file an application saw. File
data is copy-on-write (`jfs.cow`): new data always goes to freshly allocated blocks. Commits do
not flush: `fsync` (one flush), `sync` and unmount make them durable (`jfs.metalog`).

Keeps true:
- Any failure inside an operation (no space, log full, bad name...) leaves the volume unchanged:
  nothing of it reaches the log (what it allocated is given back, the running group is committed
  without it), and the in-memory state is reloaded from disk.
- A running group holds (`log.reserved`) the log space its commit can need at most (`_cost`); an
  operation that would not fit commits the group first, so a group never fails for lack of log
  space after its operations succeeded.
- An inode the operation frees becomes allocatable after its transaction is written; a block
  only once a durable log header starts replay past that transaction (`freeing`, released by
  `MetaLog.on_release`), so replay never rewrites a block reused since and never finds the data
  of a transaction it replays overwritten. The bitmap images carry the cleared bits at once.
  Allocation that finds no free block checkpoints the log (`sync`) to release them. Directory,
  pointer, inode and bitmap blocks reach their home only through a committed transaction.
- The caches (`inodes`, `maps`, `dirs`, `itable`) equal what the volume holds after the last
  commit. A commit that fails part-way may leave its transaction committed or not: before the
  next operation the log is opened again (replayed as at mount) and the state re-read, so memory
  never disagrees with the volume; until that succeeds every operation fails. A failed flush fails
  every later change (`DeviceFailed`, ext4's errors=remount-ro): what is durable is unknown.
- Blocks and log space `reserve`d for writes not yet committed are never handed to another
  operation: `_alloc_blocks` and every transaction see only what is free beyond them, and `statfs`
  counts them as used. `write_cost` is an upper bound of what one `write` transaction allocates and
  logs, so a write whose cost was reserved (and released just before it) never lacks space.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

from jfs import layout as L
from jfs.alloc import Bitmap
from jfs.blockmap import FileMap, read_map, store_map, write_cost
from jfs.codecs import DirBlock, Inode, bitmap_image, parse_bitmap
from jfs.cow import CopyOnWrite
from jfs.errors import DeviceFailed, LogFull, NoSpace, ReadOnlyFs
from jfs.layout import txn_digest
from jfs.logring import BlockView, block_runs
from jfs.metalog import MetaLog, RecordSpec, txn_blocks
from vstore.blocks.device import BlockDevice
from vstore.blocks.errors import FormatError, brief
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
    allocated: list[tuple[str, int]] = field(default_factory=list)  # ("b"|"i", number), to undo on failure
    runs: list[tuple[int, int, int]] = field(default_factory=list)  # (first, count, crc) of data written at join
    data_inos: set[int] = field(default_factory=set)  # files whose gathered data it holds (`on_lost`)


class _Log(MetaLog):
    """The live metadata log, whose free space excludes the blocks `reserved` for writes not yet
    committed (so no other transaction takes them)."""

    reserved: int = 0

    def free(self) -> int:
        return super().free() - self.reserved


class Transactions(CopyOnWrite):
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
        self.group = False  # group commit: operations join `_running`, committed by `commit_pending`
        self._running: _Txn | None = None
        self._running_hold = 0  # log blocks held for committing `_running`
        # told (inodes, error) when a running group holding those files' data fails to commit
        self.on_lost: Callable[[set[int], BaseException], None] | None = None
        self.marked_dirty = False  # the superblock says "in use"
        self.freeing: set[int] = set()  # blocks freed by committed transactions, not reusable yet
        self._freeing_by: list[tuple[int, set[int]]] = []  # (seq, blocks it freed), oldest first
        self._torn = False  # a commit failed after it may have written part of its transaction
        self._stale = False  # the in-memory state must be read again before the next operation
        self._load()

    def _open_log(self) -> _Log:
        """Open the log, replaying the transaction committed but not checkpointed (as at mount)."""
        log = _Log.open(self.view, self.geo, self.uuid, owned_ranges=self.data_ranges_of,
                        has_unshipped=self.device.has_unshipped, log_full_wait=self.log_full_wait)
        assert isinstance(log, _Log)
        log.on_release = self._release
        self.freeing, self._freeing_by = set(), []  # the replay left every transaction checkpointed
        return log

    def _release(self, durable_head: int) -> None:
        """The header on disk starts replay at `durable_head`: the blocks that the transactions
        before it freed may be reused."""
        while self._freeing_by and self._freeing_by[0][0] < durable_head:
            _, blocks = self._freeing_by.pop(0)
            for i in blocks:
                self.bbits.clear(i)
            self.freeing -= blocks

    # -- in-memory state loaded from disk ------------------------------------------------------
    def _load(self) -> None:
        geo = self.geo
        self.inodes: dict[int, Inode | None] = {}
        self.maps: dict[int, FileMap] = {}
        self.dirs: dict[int, list[DirBlock]] = {}
        self.dindex: dict[int, dict[str, DirBlock]] = {}  # directory -> name -> block holding it
        self.dcache: dict[str, int] = {}  # path -> inode, for `lookup`
        self.itable: dict[int, bytes] = {}
        self.ibits = self._load_bitmap(geo.ibitmap_start, geo.ibitmap_blocks, L.INODE_BITMAP_MAGIC,
                                       geo.inode_count, 2, "inode bitmap")
        self.bbits = self._load_bitmap(geo.bbitmap_start, geo.bbitmap_blocks, L.BLOCK_BITMAP_MAGIC,
                                       geo.data_end, geo.data_start, "block bitmap")
        for i in self.freeing:  # free in the images, not yet reusable
            self.bbits.set(i)

    def _reload(self) -> None:
        """Read the state back from the volume after a failed operation; after a torn commit, first
        re-open the log so that its transaction is either replayed in full or not there at all."""
        self._stale = True
        self.inodes, self.maps, self.dirs, self.itable = {}, {}, {}, {}
        self.dindex, self.dcache = {}, {}
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
        most (`blockmap.write_cost`)."""
        return write_cost(self.geo, len(path.encode()), offset, size)

    def reservable(self) -> tuple[int, int]:
        """(blocks, log blocks) that `reserve` can hold now (the log trimmed as far as the rule allows)."""
        if not self.readonly:
            self.log.trim()
        return max(0, self.bbits.nfree + len(self.freeing) - self.reserved_blocks), max(0, self.log.free())

    def reserve(self, blocks: int, log_blocks: int) -> None:
        """Hold `blocks` free blocks and `log_blocks` log blocks for a write committed later, or raise
        NoSpace / LogFull and hold nothing."""
        if self.readonly:
            raise ReadOnlyFs("the file system is mounted read-only")
        self._check_failed()
        if blocks > self.bbits.nfree - self.reserved_blocks and self.freeing:
            self.log.sync()  # blocks freed by committed transactions are reusable once checkpointed
        if blocks > self.bbits.nfree - self.reserved_blocks:
            raise NoSpace("the file system has no free blocks left; delete files or use a larger image")
        if log_blocks > self.log.free():
            if not self.log.room(log_blocks):
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
        if n > self.bbits.nfree - self.reserved_blocks and self.freeing:
            self.log.sync()  # blocks freed by committed transactions are reusable once checkpointed
        if n > self.bbits.nfree - self.reserved_blocks:
            raise NoSpace("the file system has no free blocks left; delete files or use a larger image")
        out = self.bbits.alloc(n, "blocks")
        bpb = L.bits_per_bitmap_block(self.bs)
        t = self._t()
        t.bitmap_dirty.update(("b", i // bpb) for i in out)
        t.allocated.extend(("b", i) for i in out)
        return out

    def _alloc_inode(self, typ: int, mode: int) -> Inode:
        ino = self.ibits.alloc(1, "inodes")[0]
        self._t().bitmap_dirty.add(("i", ino // L.bits_per_bitmap_block(self.bs)))
        self._t().allocated.append(("i", ino))
        now = time.time_ns()
        node = Inode(ino, typ, mode & 0o7777, 1 if typ == L.TYPE_FILE else 2,
                     self.log.head.head_seq & 0xFFFFFFFF, 0, now, now, now)
        self.inodes[ino] = node
        self.maps[ino] = FileMap([])
        if typ == L.TYPE_DIR:
            self.dirs[ino] = []
            self.dindex[ino] = {}
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
    def _op(self, joinable: bool = False) -> Iterator[_Txn]:
        """One operation. With `group` set, a `joinable` one (attributes) joins the running group;
        any other commits at once, together with the group."""
        if self.readonly:
            raise ReadOnlyFs("the file system is mounted read-only")
        self._check_failed()
        if self._stale:
            self._reload()  # an earlier failure could not read the volume back: it must work first
        t = self._txn = _Txn()
        try:
            yield t
            self._seal(t)
        except BaseException:
            self._abandon(t)
            raise
        finally:
            self._txn = None
        if self.group and joinable:
            self._join(t)
        elif self._running is not None:
            self._join(t)
            self.commit_pending()
        else:
            self._commit_now(t)

    def _check_failed(self) -> None:
        if self.log.failed is not None:
            raise DeviceFailed(f"a flush of the device failed ({brief(str(self.log.failed))}), so what is on "
                               "disk is unknown; no more changes are made: unmount, then run 'jfs fsck'")

    def _abandon(self, t: _Txn) -> None:
        """A failed operation: what it allocated is given back, what earlier operations of the
        running group did is committed, and memory is read back from the volume."""
        self._txn = None
        for kind, i in t.allocated:
            (self.ibits if kind == "i" else self.bbits).clear(i)
        with suppress(Exception):  # the operation's own error is the one to report
            self.commit_pending()
        with suppress(Exception):
            self._reload()  # memory holds the failed operation: read the volume's state back
        # when the reload failed too, the state stays `_stale`: retried before the next operation

    def _commit_now(self, t: _Txn) -> None:
        try:
            self._write_txn(t)
        except BaseException:
            with suppress(Exception):
                self._reload()
            raise

    def _seal(self, t: _Txn) -> None:
        """After a successful operation: its inodes into their table blocks, freed ones out of the caches."""
        geo, r = self.geo, self._running
        for ino in t.dirty_inodes:
            blk, off = geo.inode_location(ino)
            raw = bytearray(t.meta.get(blk) or (r.meta.get(blk) if r is not None else None)
                            or self._itable_block(blk))
            node = self.inodes.get(ino)
            raw[off:off + L.INODE_SIZE] = node.build() if node is not None and ino not in t.freed_inodes \
                else bytes(L.INODE_SIZE)
            t.meta[blk] = bytes(raw)
        for ino in t.freed_inodes:
            self.inodes[ino] = None
            for cache in (self.maps, self.dirs, self.dindex):
                cache.pop(ino, None)

    # -- durability -------------------------------------------------------------------------------
    def sync(self) -> None:
        """Every operation so far durable and checkpointed on disk (the header says so)."""
        self.commit_pending()
        if not self.readonly:
            self.log.sync()

    def trim(self) -> int:
        """Trim the metadata log under the [0168]-[0170] rule (the header on disk records it);
        returns records deleted."""
        if self.readonly:
            return 0
        self.commit_pending()
        self.log.sync()
        removed = self.log.trim()
        self.log.sync()
        return removed

    # -- group commit ------------------------------------------------------------------------------
    def _join(self, t: _Txn) -> None:
        """Add a sealed operation to the running group: its data goes to its (free) blocks now, its
        images and records wait for `commit_pending`. The group's log space is held as it grows;
        a group that would not fit is committed first, and one that grew large is committed."""
        if not (t.records or t.meta):
            return
        r = self._running
        if r is not None and not self._hold(self._cost(r, t)):
            self.commit_pending()
            r = None
        if r is None:
            if not self._hold(self._cost(None, t)):
                self._commit_now(t)  # LogFull (after waiting for shipping) as without grouping
                return
            r = self._running = _Txn()
        self.log._write_blocks(t.data)  # ordered mode holds: nothing points at them before the commit
        r.runs.extend((lba, len(run) // self.bs, txn_digest(run)) for lba, run in block_runs(t.data, self.bs))
        for lba in t.freed_blocks:
            r.meta.pop(lba, None)
        r.meta.update(t.meta)
        for ino, rec in t.records.items():
            old = r.records.get(ino)
            r.records[ino] = rec if old is None else RecordSpec(
                ino, rec.path or old.path, rec.op, merge_ranges(old.ranges + rec.ranges))
        for name in ("freed_blocks", "freed_inodes", "bitmap_dirty", "data_inos"):
            getattr(r, name).update(getattr(t, name))
        if self._running_hold > max(8, (self.geo.log_blocks - 1) // 8):
            self.commit_pending()

    def _cost(self, r: _Txn | None, t: _Txn) -> int:
        """Log blocks that committing `r` with `t` joined can need at most."""
        parts = [t] if r is None else [t, r]
        bitmaps = set().union(*(x.bitmap_dirty for x in parts))
        freed = sum(len(x.freed_blocks) + len(x.freed_inodes) for x in parts)
        metas = len(set().union(*(x.meta for x in parts))) + min(
            len(bitmaps) + freed, self.geo.ibitmap_blocks + self.geo.bbitmap_blocks)
        runs = len(t.data) + (len(r.runs) if r is not None else 0)
        return txn_blocks(self.bs, metas, [rec for x in parts for rec in x.records.values()], runs)

    def _hold(self, cost: int) -> bool:
        """Hold `cost` log blocks in all for the running group; False when they are not free."""
        more = cost - self._running_hold
        if more > self.log.free() and not self.log.room(more):
            return False
        self.log.reserved, self._running_hold = self.log.reserved + more, cost
        return True

    def commit_pending(self) -> None:
        """Commit the running group, if any; what its commit raises is raised (memory re-read),
        after `on_lost` was told which files' data it took with it."""
        r, self._running = self._running, None
        self.log.reserved, self._running_hold = max(0, self.log.reserved - self._running_hold), 0
        if r is None:
            return
        try:
            self._commit_now(r)
        except BaseException as exc:
            if r.data_inos and self.on_lost is not None:
                self.on_lost(r.data_inos, exc)
            raise

    def _write_txn(self, t: _Txn) -> None:
        if not t.records and not t.meta and not t.dirty_inodes:
            return
        geo = self.geo
        nbytes = L.bits_per_bitmap_block(self.bs) // 8
        touched = {("i", i // (nbytes * 8)) for i in t.freed_inodes} | t.bitmap_dirty \
            | {("b", i // (nbytes * 8)) for i in t.freed_blocks}
        freeing = t.freed_blocks | self.freeing if self.freeing else t.freed_blocks
        for kind, k in touched:
            inodes = kind == "i"
            chunk = (self.ibits if inodes else self.bbits).block_bytes(
                k, nbytes, t.freed_inodes if inodes else freeing)
            start = geo.ibitmap_start if inodes else geo.bbitmap_start
            t.meta[start + k] = bitmap_image(self.bs, L.INODE_BITMAP_MAGIC if inodes else L.BLOCK_BITMAP_MAGIC,
                                             k, chunk)
        self._torn = True  # from the first write on, a failure may leave part of it on the volume
        try:
            seq = self.log.commit(t.meta, list(t.records.values()), t.data, t.runs)
        except LogFull:
            self._torn = False  # refused before anything was written
            raise
        self._torn = False
        for lba, img in t.meta.items():
            if geo.itable_start <= lba < geo.data_start:
                self.itable[lba] = img
        if t.freed_blocks:  # reusable once a durable header has replay start past this transaction
            self._freeing_by.append((seq, set(t.freed_blocks)))
            self.freeing |= t.freed_blocks
        for i in t.freed_inodes:
            self.ibits.clear(i)
