"""The live metadata log of a mounted jfs: atomic transactions with per-file records, and trimming.

The model is xv6 log.c with jbd2's commit: a transaction is written top to bottom in
`MetaLog.commit`: the file data it makes visible (ordered mode) with the log blocks, a flush, the
commit block, a flush (the commit point), then the home locations (checkpoint, xv6's
install_trans), which the next flush makes durable. Reading the stored log (mount, fsck, the
recovery scan) is `jfs.logring`.

Implements SPEC §8 [0160] (metadata log area), [0161] (a file's metadata is logged between
open-for-write and close: every jfs write commits a transaction with the file's record) and
[0168]-[0170] (trimming).

Keeps true:
- A transaction is descriptor block(s) (records + home addresses), the new images of the metadata
  blocks it changes, and a commit block whose CRC covers all of them (see `jfs.logring`).
- Two flushes per transaction, the ordering points journaling needs: (1) after the file data, the
  descriptor and images, and the previous transaction's homes; then the log header recording that
  previous transaction as checkpointed, and the commit block; (2) the commit point. The homes are
  written after (2) and become durable at the next transaction's (1), or at `sync`. So the header
  on disk is at most one transaction behind, which replay covers: at most one committed
  transaction is ever not checkpointed on disk, and a block freed by a checkpointed transaction
  may be reused for file data without replay ever overwriting it.
- The ring never overwrites a live record, nor one that the header on disk still counts as live:
  a transaction that does not fit after trimming (and waiting up to `log_full_wait` seconds for
  shipping) fails with `LogFull` before anything is written, and ring space that a trim freed is
  reused only once a header recording that trim is on disk.
- Trim rule ([0168]-[0170]): a record is deleted only when its transaction is checkpointed AND
  (another record of the same inode remains OR `has_unshipped(that inode's blocks)` is False).
  Records are deleted oldest first, a whole transaction at a time (the log tail moves). The log
  learns an inode's blocks and the shipping state only through the two callables it is given.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from jfs.errors import LogFull
from jfs.layout import TXN_HEAD_BYTES, Geometry, crc32
from jfs.logring import (
    LOG_FLAG_RECORDS_LOST,
    BlockView,
    LogHead,
    LogRecord,
    Txn,
    block_runs,
    read_header,
    replay_committed,
    scan_ring,
)
from jfs.packing import pack_commit, pack_txn_body, pack_txn_head
from vstore.blocks.device import BlockDevice
from vstore.blocks.errors import FormatError
from vstore.blocks.ranges import Ranges, merge_ranges


@dataclass
class RecordSpec:
    """A record to put in the next transaction."""

    ino: int
    path: str | None
    op: str
    ranges: Ranges


def txn_blocks(block_size: int, metas: int, records: list[RecordSpec]) -> int:
    """Log blocks at most of a transaction of `metas` images and `records` (ranges not merged)."""
    body = 8 + 4 * metas + sum(11 + len((r.path or "").encode()) + 8 * len(r.ranges) for r in records)
    return -(-(TXN_HEAD_BYTES + body) // block_size) + metas + 1


class MetaLog:
    """The metadata log of a mounted file system. `owned_ranges(ino)` is every block inode `ino`
    owns now; `has_unshipped(ranges)` asks the device whether writes to those blocks still wait to
    reach the Async site ([0169]); `log_full_wait` is how long a full log waits for that shipping
    (done meanwhile by another process) before `LogFull`. `head` is the log as committed in memory
    (`checkpoint_seq` the last committed transaction); what the header on disk may claim lags by the
    transaction whose homes are not flushed yet (`unflushed`)."""

    def __init__(self, view: BlockView, geo: Geometry, head: LogHead, txns: list[Txn], *,
                 owned_ranges: Callable[[int], Ranges], has_unshipped: Callable[[Ranges], bool],
                 log_full_wait: float = 0.0) -> None:
        self.view = view
        self.geo = geo
        self.head = head
        self.txns = txns  # live (untrimmed) transactions, oldest first
        self.owned_ranges = owned_ranges
        self.has_unshipped = has_unshipped
        self.log_full_wait = log_full_wait
        self.ring = geo.log_blocks - 1
        self.unflushed: Txn | None = None  # committed; its homes are written but not flushed
        self.on_disk = head.build(geo.block_size)  # the header image last written
        self.undurable = 0  # ring blocks trimmed in memory, not yet by a header that is on disk
        self._put_covers = 0  # of those, the ones the header last written records
        self.flushes = 0  # device flushes this log asked for
        for t in txns:
            t.images = []

    # -- set-up ------------------------------------------------------------------------------
    @staticmethod
    def format(device: BlockDevice, geo: Geometry, uuid: bytes) -> None:
        """Write an empty log area (zeroed ring, fresh header)."""
        bs = geo.block_size
        chunk = 256
        for lba in range(geo.log_start + 1, geo.log_start + geo.log_blocks, chunk):
            n = min(chunk, geo.log_start + geo.log_blocks - lba)
            device.write(lba, bytes(n * bs))
        device.write(geo.log_start, LogHead(uuid).build(bs))

    @classmethod
    def open(cls, view: BlockView, geo: Geometry, uuid: bytes, *, owned_ranges: Callable[[int], Ranges],
             has_unshipped: Callable[[Ranges], bool], log_full_wait: float = 0.0) -> MetaLog:
        """Read the header, scan the ring and replay what is committed but not checkpointed."""
        head = read_header(view, geo)
        if head.uuid != uuid:
            raise FormatError("the log area belongs to another file system (UUID differs); "
                              "run 'jfs fsck' to check and repair")
        ring = scan_ring(view, geo, head)
        if ring.broken:
            raise FormatError(f"metadata log: {ring.broken}; run 'jfs fsck' to repair")
        replay_committed(view, geo, ring)
        return cls(view, geo, ring.head, ring.txns, owned_ranges=owned_ranges, has_unshipped=has_unshipped,
                   log_full_wait=log_full_wait)

    # -- the header and the flushes ----------------------------------------------------------------
    def checkpointed(self) -> int:
        """The last transaction whose homes are on disk."""
        return self.head.head_seq - (2 if self.unflushed is not None else 1)

    def _header_image(self) -> bytes:
        """The header as it may be written now: checkpointed up to `checkpointed()`, the
        transaction after that (if committed) to be replayed."""
        h, u = self.head, self.unflushed
        if u is None:
            return h.build(self.geo.block_size)
        return LogHead(h.uuid, h.flags, h.tail_seq, h.tail_off, u.seq, u.off, u.seq - 1).build(self.geo.block_size)

    def _put_header(self) -> bool:
        """Write the header when it says something new; durable at the next flush."""
        img = self._header_image()
        if img == self.on_disk:
            return False
        self.view.write(self.geo.log_start, img)
        self.on_disk, self._put_covers = img, self.undurable
        return True

    def _flush(self) -> None:
        self.view.flush()
        self.flushes += 1
        self.unflushed = None  # its homes were written before this flush
        self.undurable -= self._put_covers
        self._put_covers = 0

    def sync(self) -> None:
        """Make every committed transaction checkpointed on disk, and the header say so."""
        if self.unflushed is not None:
            self._flush()
        if self._put_header():
            self._flush()

    # -- space ---------------------------------------------------------------------------------
    def used(self) -> int:
        return sum(t.nblocks for t in self.txns)

    def free(self) -> int:
        return self.ring - self.used()

    def records(self) -> list[LogRecord]:
        return [r for t in self.txns for r in t.records]

    def reserve(self, nblocks: int) -> None:
        """Make room for a transaction of `nblocks` (trimming, waiting up to `log_full_wait` for
        shipping) or raise LogFull; nothing is written to the ring here."""
        if nblocks > self.ring:
            raise LogFull(f"this change needs {nblocks} log blocks but the metadata log has only "
                          f"{self.ring}; re-create the file system with a larger log")
        deadline = time.monotonic() + self.log_full_wait
        while self.free() < nblocks:
            self.trim()
            if self.free() >= nblocks:
                break
            if time.monotonic() >= deadline:
                raise LogFull("the metadata log is full and its records cannot be trimmed until the "
                              "pending writes are shipped to the Async site; ship them and retry")
            time.sleep(0.05)

    # -- commit ----------------------------------------------------------------------------------
    def commit(self, homes: dict[int, bytes], records: list[RecordSpec], data: dict[int, bytes]) -> int:
        """Commit one transaction: `homes` (lba -> new image) are the metadata blocks it changes,
        `records` name the files, `data` (lba -> block) is the file data it makes visible. Returns
        its sequence. Nothing is written when there is no room (LogFull)."""
        desc, images, total = self._encode(homes, records)
        self.reserve(total)
        if self.ring - self.used() - self.undurable < total:
            self.sync()  # the room was made by a trim that the header on disk does not know yet
        seq, off = self.head.head_seq, self.head.head_off
        body = desc + images
        self._write_blocks(data)  # ordered mode: the data is on disk before anything points at it
        self._write_ring(off, body)
        self._flush()  # (1): data, descriptor, images and the previous transaction's homes
        self._put_header()  # the previous transaction checkpointed, the trims since
        self._write_ring((off + total - 1) % self.ring, self._commit_block(seq, total, body))
        self._flush()  # (2): the commit point
        self._write_blocks(homes)  # checkpoint, as contiguous runs; durable at the next flush
        recs = [LogRecord(seq, r.ino, r.path, r.op, merge_ranges(r.ranges)) for r in records]
        txn = Txn(seq, off, total, sorted(homes), recs)
        self.txns.append(txn)
        self.unflushed = txn
        self.head.checkpoint_seq = seq
        self.head.head_seq = seq + 1
        self.head.head_off = (off + total) % self.ring
        return seq

    def _encode(self, homes: dict[int, bytes], records: list[RecordSpec]) -> tuple[bytes, bytes, int]:
        """(descriptor blocks, metadata images, total blocks with the commit block)."""
        bs = self.geo.block_size
        lbas = sorted(homes)
        body = pack_txn_body(lbas, ((r.ino, r.op, r.path or "", merge_ranges(r.ranges)) for r in records))
        desc_blocks = -(-(TXN_HEAD_BYTES + len(body)) // bs)
        head = pack_txn_head(desc_blocks, self.head.uuid, self.head.head_seq, len(lbas), len(body))
        desc = (head + body).ljust(desc_blocks * bs, b"\0")
        images = b"".join(homes[lba] for lba in lbas)
        return desc, images, desc_blocks + len(lbas) + 1

    def _commit_block(self, seq: int, total: int, covered: bytes) -> bytes:
        return pack_commit(self.geo.block_size, self.head.uuid, seq, total, crc32(covered))

    def _write_blocks(self, blocks: dict[int, bytes]) -> None:
        for lba, run in block_runs(blocks, self.geo.block_size):
            self.view.write(lba, run)

    def _write_ring(self, off: int, data: bytes) -> None:
        bs = self.geo.block_size
        nblocks = len(data) // bs
        i = 0
        while i < nblocks:
            n = min(nblocks - i, self.ring - off)
            self.view.write(self.geo.log_start + 1 + off, data[i * bs:(i + n) * bs])
            i += n
            off = (off + n) % self.ring

    # -- trimming [0168]-[0170] ------------------------------------------------------------------
    def _deletable(self, rec: LogRecord, remaining: Counter[int]) -> bool:
        if remaining[rec.ino] > 1:  # another record of the same file remains [0168]
            return True
        ranges = merge_ranges(list(rec.ranges) + list(self.owned_ranges(rec.ino)))
        return not ranges or not self.has_unshipped(ranges)  # [0169]

    def trim(self) -> int:
        """Delete every record the trim rule allows, oldest first; returns how many. The header
        records the new tail with the next commit (or `sync`)."""
        remaining: Counter[int] = Counter(r.ino for r in self.records())
        removed = 0
        while self.txns and self.txns[0].seq <= self.checkpointed():
            txn = self.txns[0]
            if not all(self._deletable(r, remaining) for r in txn.records):
                break
            for r in txn.records:
                remaining[r.ino] -= 1
            self.txns.pop(0)
            removed += len(txn.records)
            self.undurable += txn.nblocks
            self.head.tail_seq = txn.seq + 1
            self.head.tail_off = (txn.off + txn.nblocks) % self.ring
        if not self.txns and self.head.flags & LOG_FLAG_RECORDS_LOST:
            if not self.has_unshipped([(0, self.geo.num_blocks)]):
                self.head.flags &= ~LOG_FLAG_RECORDS_LOST
                self.sync()
        return removed
