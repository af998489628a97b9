"""The live metadata log of a mounted jfs: atomic transactions with per-file records, and trimming.

The model is ext4's jbd2 in data=ordered mode with a commit interval: `MetaLog.commit` writes the
file data a transaction makes visible, then the transaction (descriptor, images, commit block) in
the ring, and returns without a flush. `flush` (fsync, `sync`, the commit interval, unmount, a
log that needs room) moves the pipeline: written -> durable (homes written) -> checkpointed
(header). Reading the stored log (mount, fsck, the recovery scan) is `jfs.logring`.

Implements SPEC §8 [0160] (metadata log area), [0161] (a file's metadata is logged between
open-for-write and close: every jfs write commits a transaction with the file's record) and
[0168]-[0170] (trimming).

Keeps true:
- A transaction is descriptor block(s) (records, home addresses, the check (`txn_digest`) of
  each run of file data it points at, the check of the transaction before it), the new images of
  the metadata blocks it changes, and a commit block whose check covers them: replay can tell it complete
  or torn on its own, whatever subset of the unflushed writes a power cut left (`jfs.logring`).
- No flush per transaction. A transaction's homes are written only after a flush made it durable
  (until then reads see them in `view.pending`); the header moves past it only after a further
  flush made those homes durable, and `on_release` hears the head of each header once it is
  durable: blocks a transaction freed may be reused only after that (replay starts at that head,
  so it never rewrites a block reused since). `sync` flushes until all three are on disk. A home
  write that fails is retried at the next flush; the header never passes its transaction before.
- A failed flush fails the log (`failed`): nothing more is committed (ext4's errors=remount-ro).
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
from jfs.layout import TXN_HEAD_BYTES, Geometry, txn_digest
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


def txn_blocks(block_size: int, metas: int, records: list[RecordSpec], runs: int = 0) -> int:
    """Log blocks at most of a transaction of `metas` images, `records` (ranges not merged) and
    `runs` data runs."""
    body = 12 + 4 * metas + sum(11 + len((r.path or "").encode()) + 8 * len(r.ranges) for r in records) \
        + 12 * runs
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
        self._used = sum(t.nblocks for t in txns)  # their ring blocks
        self.owned_ranges = owned_ranges
        self.has_unshipped = has_unshipped
        self.log_full_wait = log_full_wait
        self.ring = geo.log_blocks - 1
        self.written: list[Txn] = []  # committed in the ring, not flushed yet; homes held in `view.pending`
        self.to_home: list[Txn] = []  # flushed; homes not written yet (a write of them failed)
        self.durable: list[Txn] = []  # flushed; homes written, not flushed yet
        self._homes: dict[int, dict[int, bytes]] = {}  # seq -> homes, of `written`
        self.ckpt_seq = head.head_seq - 1  # the last transaction whose homes are durable
        self.on_disk = head.build(geo.block_size)  # the header image last written
        self._header_head = head.head_seq  # the head that header records
        self._header_unflushed = False  # that header was written after the last flush
        self.durable_head = head.head_seq  # the head of the last header known durable
        self.undurable = 0  # ring blocks trimmed in memory, not yet by a header that is on disk
        self._put_covers = 0  # of those, the ones the header last written records
        self.flushes = 0  # device flushes this log asked for
        self.last_crc = txns[-1].crc if txns else 0  # the chain: named by the next transaction
        self.failed: BaseException | None = None  # a flush failed: nothing more is written
        # told the durable head after each flush: what transactions before it freed may be reused
        self.on_release: Callable[[int], None] | None = None
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
        view.pending.clear()  # images of transactions not durable: the log decides which stand
        ring = scan_ring(view, geo, head)
        if ring.broken:
            raise FormatError(f"metadata log: {ring.broken}; run 'jfs fsck' to repair")
        replay_committed(view, geo, ring)
        return cls(view, geo, ring.head, ring.txns, owned_ranges=owned_ranges, has_unshipped=has_unshipped,
                   log_full_wait=log_full_wait)

    # -- the header and the flushes ----------------------------------------------------------------
    def checkpointed(self) -> int:
        """The last transaction whose homes are on disk."""
        return self.ckpt_seq

    def unflushed(self) -> bool:
        """Whether a committed transaction, a home or the header still waits for a flush."""
        return bool(self.written or self.to_home or self.durable) or self._header_unflushed

    def _header_image(self) -> bytes:
        """The header as it may be written now: checkpointed up to `ckpt_seq`, replay from the next."""
        h = self.head
        first = self._uncheckpointed()
        seq, off = (first[0].seq, first[0].off) if first else (h.head_seq, h.head_off)
        return LogHead(h.uuid, h.flags, h.tail_seq, h.tail_off, seq, off, seq - 1).build(self.geo.block_size)

    def _uncheckpointed(self) -> list[Txn]:
        """The oldest transaction whose homes are not durable, if any, as a list of at most one."""
        return (self.durable or self.to_home or self.written)[:1]

    def _put_header(self) -> None:
        """Write the header when it says something new; durable at the next flush."""
        img = self._header_image()
        if img == self.on_disk:
            return
        self.view.write(self.geo.log_start, img)
        self.on_disk, self._put_covers = img, self.undurable
        self._header_unflushed = True
        first = self._uncheckpointed()
        self._header_head = first[0].seq if first else self.head.head_seq

    def flush(self) -> None:
        """One device flush, the pipeline moved one step: the transactions written before it are
        durable and their homes are written now; those whose homes were written before it are
        checkpointed, and the header says so (durable at the next flush)."""
        if self.failed is not None:
            raise self.failed
        try:
            self.view.flush()
        except BaseException as exc:
            self.failed = exc  # what reached the disk is unknown: like ext4's errors=remount-ro
            raise
        self.flushes += 1
        self._header_unflushed = False
        self.durable_head = self._header_head
        self.undurable -= self._put_covers
        self._put_covers = 0
        if self.durable:
            self.ckpt_seq = self.durable[-1].seq
        self.durable = []
        self.to_home += self.written
        self.written = []
        pending = self.view.pending
        while self.to_home:  # durable now: their homes may be overwritten (a failed write is retried)
            t = self.to_home[0]
            homes = self._homes[t.seq]
            self._write_blocks(homes)
            for lba in homes:
                if pending.get(lba, (0,))[0] == t.seq:
                    del pending[lba]
            del self._homes[t.seq]
            self.durable.append(self.to_home.pop(0))
        self._put_header()
        if self.on_release is not None:
            self.on_release(self.durable_head)

    def sync(self) -> None:
        """Make every committed transaction checkpointed on disk, and the header say so durably."""
        while True:
            if not (self.written or self.to_home or self.durable):
                self._put_header()  # the header alone changed (a trim): durable at this flush
            if not self.unflushed():
                return
            self.flush()

    # -- space ---------------------------------------------------------------------------------
    def used(self) -> int:
        return self._used

    def free(self) -> int:
        return self.ring - self.used()

    def records(self) -> list[LogRecord]:
        return [r for t in self.txns for r in t.records]

    def room(self, nblocks: int) -> bool:
        """Whether `nblocks` are free, after trimming and, when that is not enough, after a
        checkpoint (`sync`) and trimming again."""
        if self.free() >= nblocks:
            return True
        self.trim()
        if self.free() < nblocks and self.ckpt_seq < self.head.head_seq - 1:
            self.sync()
            self.trim()
        return self.free() >= nblocks

    def reserve(self, nblocks: int) -> None:
        """Make room for a transaction of `nblocks` (trimming, checkpointing, waiting up to
        `log_full_wait` for shipping) or raise LogFull; nothing is written to the ring here."""
        if nblocks > self.ring:
            raise LogFull(f"this change needs {nblocks} log blocks but the metadata log has only "
                          f"{self.ring}; re-create the file system with a larger log")
        deadline = time.monotonic() + self.log_full_wait
        while not self.room(nblocks):
            if time.monotonic() >= deadline:
                raise LogFull("the metadata log is full and its records cannot be trimmed until the "
                              "pending writes are shipped to the Async site; ship them and retry")
            time.sleep(0.05)

    # -- commit ----------------------------------------------------------------------------------
    def commit(self, homes: dict[int, bytes], records: list[RecordSpec], data: dict[int, bytes],
               runs: list[tuple[int, int, int]] | None = None) -> int:
        """Write one transaction, without a flush: `homes` (lba -> new image) are the metadata
        blocks it changes, `records` name the files, `data` (lba -> block) is the file data it
        makes visible (written first), `runs` the (first, count, crc) of data written earlier
        that it points at too. Returns its sequence. It is durable at the next `flush`; its homes
        are written after that one. Nothing is written when there is no room (LogFull)."""
        if self.failed is not None:
            raise self.failed
        all_runs = list(runs or []) + [(lba, len(run) // self.geo.block_size, txn_digest(run))
                                       for lba, run in block_runs(data, self.geo.block_size)]
        desc, images, total = self._encode(homes, records, all_runs)
        self.reserve(total)
        if self.ring - self.used() - self.undurable < total:
            self.sync()  # the room was made by a trim that the header on disk does not know yet
        seq, off = self.head.head_seq, self.head.head_off
        body = desc + images
        crc = txn_digest(body)
        self._write_blocks(data)  # ordered mode: the data precedes the commit that points at it
        self._write_ring(off, body + self._commit_block(seq, total, crc))
        recs = [LogRecord(seq, r.ino, r.path, r.op, merge_ranges(r.ranges)) for r in records]
        txn = Txn(seq, off, total, sorted(homes), recs, crc=crc, prev_crc=self.last_crc)
        self.txns.append(txn)
        self._used += total
        self.written.append(txn)
        self._homes[seq] = homes
        pending = self.view.pending
        for lba, img in homes.items():
            pending[lba] = (seq, img)
        self.last_crc = crc
        self.head.checkpoint_seq = seq
        self.head.head_seq = seq + 1
        self.head.head_off = (off + total) % self.ring
        return seq

    def _encode(self, homes: dict[int, bytes], records: list[RecordSpec],
                runs: list[tuple[int, int, int]]) -> tuple[bytes, bytes, int]:
        """(descriptor blocks, metadata images, total blocks with the commit block)."""
        bs = self.geo.block_size
        lbas = sorted(homes)
        body = pack_txn_body(lbas, ((r.ino, r.op, r.path or "", merge_ranges(r.ranges)) for r in records), runs)
        desc_blocks = -(-(TXN_HEAD_BYTES + len(body)) // bs)
        head = pack_txn_head(desc_blocks, self.head.uuid, self.head.head_seq, len(lbas), len(body), self.last_crc)
        desc = (head + body).ljust(desc_blocks * bs, b"\0")
        images = b"".join(homes[lba] for lba in lbas)
        return desc, images, desc_blocks + len(lbas) + 1

    def _commit_block(self, seq: int, total: int, crc: int) -> bytes:
        return pack_commit(self.geo.block_size, self.head.uuid, seq, total, crc)

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
            self._used -= txn.nblocks
            removed += len(txn.records)
            self.undurable += txn.nblocks
            self.head.tail_seq = txn.seq + 1
            self.head.tail_off = (txn.off + txn.nblocks) % self.ring
        if not self.txns and self.head.flags & LOG_FLAG_RECORDS_LOST:
            if not self.has_unshipped([(0, self.geo.num_blocks)]):
                self.head.flags &= ~LOG_FLAG_RECORDS_LOST
                self.sync()
        return removed
