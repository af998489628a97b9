"""The metadata log: atomic transactions with per-file records, replay, and trimming.

The model is xv6 log.c, plus records that name the files. A transaction is written the way xv6's
commit() writes one, top to bottom in `MetaLog.commit`: the file data it makes visible (ordered
mode), the log blocks ending in the commit block (the commit point), the home locations
(checkpoint, xv6's install_trans), and the log header that records the checkpoint. Mount, fsck and
the recovery scan all read the ring with `scan_ring` and apply what is committed but not yet
checkpointed with `replay_committed`.

Implements SPEC §8 [0160] (metadata log area), [0161] (a file's metadata is logged between
open-for-write and close: every jfs write commits a transaction with the file's record) and
[0168]-[0170] (trimming).

Keeps true:
- A transaction is descriptor block(s) (records + home addresses), the new images of the metadata
  blocks it changes, and a commit block whose CRC covers all of them. It is committed exactly when
  its commit block is on disk with a matching CRC, it overlaps no transaction before it, and what
  it names is what a commit writes (`_justified`: records of inodes in the table, known
  operations, ranges in the data area; ascending homes, each a bitmap block, a recorded inode's
  table block or a block a record names). Replay ignores anything else, so it never writes the
  superblocks, the log area, a block past the device or a block no record names (a file's data).
- A log header is read only when its positions are possible (`header_problem`: offsets inside
  the ring, ordered sequences, the checkpoint the transaction before the head, an empty log's
  tail at its head, no unknown flag), and the log is opened only when its transactions end at
  the head offset (`RingScan.broken`); else mount refuses with "run jfs fsck".
- Ordering per transaction: file data -> flush -> log blocks -> flush (commit point) ->
  home locations (checkpoint) -> flush -> log header with the new checkpoint sequence -> flush.
  At most one committed transaction is ever not yet checkpointed, so a block freed by a
  checkpointed transaction may be reused for file data without replay ever overwriting it.
- Replay re-writes the images of transactions newer than the checkpoint sequence, in order;
  doing it twice gives the same blocks (idempotent).
- The ring never overwrites a live record: a transaction that does not fit after trimming (and
  waiting up to `log_full_wait` seconds for shipping) fails with `LogFull` before anything is written.
- Trim rule ([0168]-[0170]): a record is deleted only when its transaction is checkpointed AND
  (another record of the same inode remains OR `has_unshipped(that inode's blocks)` is False).
  Records are deleted oldest first, a whole transaction at a time (the log tail moves). The log
  learns an inode's blocks and the shipping state only through the two callables it is given.
"""

from __future__ import annotations

import time
from bisect import bisect_right
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from jfs.errors import LogFull
from jfs.layout import (
    LOG_FLAG_RECORDS_LOST,
    TXN_HEAD_BYTES,
    Commit,
    Geometry,
    LogHeader,
    TxnBody,
    TxnHead,
    build_checked,
    crc32,
    parse,
    parse_checked,
)
from vstore.blocks.device import BlockDevice
from vstore.blocks.errors import FormatError
from vstore.blocks.ranges import Ranges, merge_ranges


@dataclass
class LogRecord:
    """Which file (inode, path when known) an operation changed, and the data blocks it wrote."""

    seq: int
    ino: int
    path: str | None
    op: str
    ranges: Ranges


@dataclass
class Txn:
    """A committed transaction found in the ring."""

    seq: int
    off: int
    nblocks: int
    homes: list[int]
    records: list[LogRecord]
    images: list[bytes] = field(default_factory=list)


@dataclass
class LogHead:
    """The log header's values (see FORMAT.md "Log header")."""

    uuid: bytes
    flags: int = 0
    tail_seq: int = 1
    tail_off: int = 0
    head_seq: int = 1
    head_off: int = 0
    checkpoint_seq: int = 0

    def build(self, block_size: int) -> bytes:
        return build_checked(LogHeader, dict(
            flags=self.flags, uuid=self.uuid, tail_seq=self.tail_seq, tail_off=self.tail_off,
            head_seq=self.head_seq, head_off=self.head_off, checkpoint_seq=self.checkpoint_seq,
        ), block_size)


class BlockView:
    """Reads and writes through to a device, or into an overlay when the device must not change
    (read-only mount, `fsck -n`): replayed blocks then live only in memory."""

    def __init__(self, device: BlockDevice, *, readonly: bool = False) -> None:
        self.device = device
        self.readonly = readonly or device.readonly
        self.overlay: dict[int, bytes] = {}

    def read(self, lba: int, count: int = 1) -> bytes:
        if not self.overlay:
            return self.device.read(lba, count)
        bs = self.device.block_size
        raw = bytearray(self.device.read(lba, count))
        for i in range(count):
            img = self.overlay.get(lba + i)
            if img is not None:
                raw[i * bs:(i + 1) * bs] = img
        return bytes(raw)

    def write(self, lba: int, data: bytes) -> None:
        if self.readonly:
            bs = self.device.block_size
            for i in range(len(data) // bs):
                self.overlay[lba + i] = bytes(data[i * bs:(i + 1) * bs])
        else:
            self.device.write(lba, data)

    def flush(self) -> None:
        if not self.readonly:
            self.device.flush()


# -- reading the log (shared by mount, fsck and the recovery scan) ------------------------------
MAX_SEQ = 1 << 63  # sequences stay far from the u64 limit


def parse_header(view: BlockView, geo: Geometry) -> LogHead:
    """The log header's values as stored (magic, version and CRC checked, positions not)."""
    v = parse_checked(LogHeader, view.read(geo.log_start), f"log header (block {geo.log_start})")
    return LogHead(v.uuid, v.flags, v.tail_seq, v.tail_off, v.head_seq, v.head_off, v.checkpoint_seq)


def header_problem(head: LogHead, geo: Geometry) -> str | None:
    """What makes the positions of a parsed log header impossible, or None."""
    ring = geo.log_blocks - 1
    checks = ((head.tail_off < ring and head.head_off < ring, "a position lies outside the ring"),
              (1 <= head.tail_seq <= head.head_seq < MAX_SEQ and head.head_seq - head.tail_seq <= ring // 2,
               "its sequences are out of order"),
              (head.checkpoint_seq == head.head_seq - 1, "its checkpoint is not the transaction before the head"),
              (head.tail_seq != head.head_seq or head.tail_off == head.head_off,
               "the log is empty but its tail and head differ"),
              (not head.flags & ~LOG_FLAG_RECORDS_LOST, "it has unknown flags"))
    return next((why for ok, why in checks if not ok), None)


def read_header(view: BlockView, geo: Geometry) -> LogHead:
    head = parse_header(view, geo)
    problem = header_problem(head, geo)
    if problem is not None:
        raise FormatError(f"log header (block {geo.log_start}) holds impossible positions ({problem}); "
                          "run 'jfs fsck' to check and repair")
    return head


def _read_ring(view: BlockView, geo: Geometry, off: int, count: int) -> bytes:
    ring = geo.log_blocks - 1
    out = bytearray()
    while count:
        n = min(count, ring - off)
        out += view.read(geo.log_start + 1 + off, n)
        count -= n
        off = (off + n) % ring
    return bytes(out)


def read_txn(view: BlockView, geo: Geometry, uuid: bytes, off: int, seq: int) -> Txn | None:
    """The committed transaction `seq` at ring offset `off`, or None when there is none (end of
    the log, torn or corrupt transaction)."""
    bs, ring = geo.block_size, geo.log_blocks - 1
    try:
        head = parse_checked(TxnHead, _read_ring(view, geo, off, 1)[:TxnHead.sizeof()], "txn")
    except FormatError:
        return None
    total = head.desc_blocks + head.meta_blocks + 1
    if head.uuid != uuid or head.seq != seq or head.desc_blocks < 1 or total > ring:
        return None
    raw = _read_ring(view, geo, off, total)
    try:
        commit = parse_checked(Commit, raw[-bs:][:Commit.sizeof()], "commit")
    except FormatError:
        return None
    if commit.uuid != uuid or commit.seq != seq or commit.total_blocks != total \
            or commit.txn_crc != crc32(raw[:-bs]):
        return None
    desc_end = head.desc_blocks * bs
    body_raw = raw[TXN_HEAD_BYTES:TXN_HEAD_BYTES + head.body_len]
    if TXN_HEAD_BYTES + head.body_len > desc_end:
        return None
    try:
        body = parse(TxnBody, body_raw, "txn body")
    except FormatError:
        return None
    records = [LogRecord(seq, r.ino, r.path or None, str(r.op),
                         [(x.first, x.count) for x in r.ranges]) for r in body.records]
    if len(body.homes) != head.meta_blocks or not _justified(geo, list(body.homes), body.records):
        return None
    images = [raw[desc_end + i * bs:desc_end + (i + 1) * bs] for i in range(head.meta_blocks)]
    return Txn(seq, off, total, list(body.homes), records, images)


def _justified(geo: Geometry, homes: list[int], records: Any) -> bool:
    """Whether what a transaction names is what a commit can write: each record names an inode of
    the table, a known operation, an absolute path (or none) and ranges inside the data area; the
    homes ascend, each a bitmap block, the inode-table block of a recorded inode, or a block of
    the data area that a record's ranges name (its directory or pointer block)."""
    tables = set()
    named: Ranges = []
    for r in records:
        if not 0 < r.ino < geo.inode_count or not isinstance(r.op, str) \
                or (r.path and (r.path[0] != "/" or "\0" in r.path)):
            return False
        for x in r.ranges:
            if not (x.count and geo.data_start <= x.first and x.first + x.count <= geo.data_end):
                return False
            named.append((x.first, x.count))
        tables.add(geo.inode_location(r.ino)[0])
    if any(a >= b for a, b in zip(homes, homes[1:], strict=False)):
        return False
    runs = merge_ranges(named)
    starts = [first for first, _ in runs]
    for h in homes:
        if geo.ibitmap_start <= h < geo.itable_start or h in tables:
            continue
        i = bisect_right(starts, h) - 1
        if not (geo.data_start <= h and i >= 0 and h < runs[i][0] + runs[i][1]):
            return False
    return True


@dataclass
class RingScan:
    """The transactions found; `broken` says why the log is not what its header claims (the log
    must be repaired), `problem` why it cannot prove what changed (`broken`, or records lost)."""

    head: LogHead
    txns: list[Txn]
    problem: str | None
    broken: str | None = None


def scan_ring(view: BlockView, geo: Geometry, head: LogHead) -> RingScan:
    """Every committed transaction from the tail on, none overlapping another. `problem` names a
    checkpointed transaction that is missing or corrupt (a hole in the middle of the log), or a
    head offset other than where the checkpointed transactions end."""
    txns: list[Txn] = []
    off, seq, ring = head.tail_off, head.tail_seq, geo.log_blocks - 1
    used = 0
    head_at = off if seq == head.head_seq else None  # where transaction head_seq starts
    while used < ring and seq <= head.head_seq:
        txn = read_txn(view, geo, head.uuid, off, seq)
        if txn is None or used + txn.nblocks > ring:
            break
        txns.append(txn)
        used += txn.nblocks
        off = (off + txn.nblocks) % ring
        seq += 1
        if seq == head.head_seq:
            head_at = off
    broken = None
    if seq < head.head_seq:
        broken = (f"log transaction {seq} (ring offset {off}) is missing or corrupt although the "
                  f"log header says transactions up to {head.head_seq - 1} are committed")
    elif head_at != head.head_off:
        broken = (f"the checkpointed log transactions end at ring offset {head_at} but the log "
                  f"header puts the next one at {head.head_off}")
    problem = broken
    if problem is None and head.flags & LOG_FLAG_RECORDS_LOST:
        problem = "log records were discarded by an earlier repair; the log cannot prove what changed"
    return RingScan(head, txns, problem, broken)


def replay_committed(view: BlockView, geo: Geometry, ring: RingScan) -> list[Txn]:
    """Write the images of every committed transaction the checkpoint does not cover yet, in order,
    then record the checkpoint in the log header (`ring.head` is updated). Returns the transactions
    replayed. Through a read-only view the replay lives in the overlay only."""
    pending = [t for t in ring.txns if t.seq > ring.head.checkpoint_seq]
    for t in pending:
        for lba, img in zip(t.homes, t.images, strict=True):
            view.write(lba, img)
    if pending:
        view.flush()
        last, head = pending[-1], ring.head
        head.checkpoint_seq = last.seq
        head.head_seq = last.seq + 1
        head.head_off = (last.off + last.nblocks) % (geo.log_blocks - 1)
        view.write(geo.log_start, head.build(geo.block_size))
        view.flush()
    return pending


def block_runs(blocks: dict[int, bytes], block_size: int) -> list[tuple[int, bytes]]:
    """(first lba, bytes) of each run of consecutive blocks, in ascending order."""
    runs: list[tuple[int, bytes]] = []
    run_start, run = 0, bytearray()
    for lba in sorted(blocks):
        if run and lba == run_start + len(run) // block_size:
            run += blocks[lba]
            continue
        if run:
            runs.append((run_start, bytes(run)))
        run_start, run = lba, bytearray(blocks[lba])
    if run:
        runs.append((run_start, bytes(run)))
    return runs


# -- the live log ---------------------------------------------------------------------------------
@dataclass
class RecordSpec:
    """A record to put in the next transaction."""

    ino: int
    path: str | None
    op: str
    ranges: Ranges


class MetaLog:
    """The metadata log of a mounted file system. `owned_ranges(ino)` is every block inode `ino`
    owns now; `has_unshipped(ranges)` asks the device whether writes to those blocks still wait to
    reach the Async site ([0169]); `log_full_wait` is how long a full log waits for that shipping
    (done meanwhile by another process) before `LogFull`."""

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

    def _write_header(self) -> None:
        self.view.write(self.geo.log_start, self.head.build(self.geo.block_size))
        self.view.flush()

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
        seq, off = self.head.head_seq, self.head.head_off
        self._write_blocks(data)  # ordered mode: the data is on disk before anything points at it
        self.view.flush()
        self._write_ring(off, desc + images + self._commit_block(seq, total, desc + images))
        self.view.flush()  # commit point
        self._write_blocks(homes)  # checkpoint: the home locations, as contiguous runs
        self.view.flush()
        recs = [LogRecord(seq, r.ino, r.path, r.op, merge_ranges(r.ranges)) for r in records]
        self.txns.append(Txn(seq, off, total, sorted(homes), recs))
        self.head.checkpoint_seq = seq
        self.head.head_seq = seq + 1
        self.head.head_off = (off + total) % self.ring
        self._write_header()  # the transaction is checkpointed
        return seq

    def _encode(self, homes: dict[int, bytes], records: list[RecordSpec]) -> tuple[bytes, bytes, int]:
        """(descriptor blocks, metadata images, total blocks with the commit block)."""
        bs = self.geo.block_size
        lbas = sorted(homes)
        body = TxnBody.build(dict(homes=lbas, records=[
            dict(ino=r.ino, op=r.op, path=r.path or "",
                 ranges=[dict(first=f, count=c) for f, c in merge_ranges(r.ranges)])
            for r in records]))
        desc_blocks = -(-(TXN_HEAD_BYTES + len(body)) // bs)
        head = build_checked(TxnHead, dict(desc_blocks=desc_blocks, uuid=self.head.uuid,
                                           seq=self.head.head_seq, meta_blocks=len(lbas),
                                           body_len=len(body)))
        desc = (head + body).ljust(desc_blocks * bs, b"\0")
        images = b"".join(homes[lba] for lba in lbas)
        return desc, images, desc_blocks + len(lbas) + 1

    def _commit_block(self, seq: int, total: int, covered: bytes) -> bytes:
        return build_checked(Commit, dict(reserved=0, uuid=self.head.uuid, seq=seq, total_blocks=total,
                                          txn_crc=crc32(covered)), self.geo.block_size)

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
        """Delete every record the trim rule allows, oldest first; returns how many."""
        remaining: Counter[int] = Counter(r.ino for r in self.records())
        removed = 0
        while self.txns and self.txns[0].seq <= self.head.checkpoint_seq:
            txn = self.txns[0]
            if not all(self._deletable(r, remaining) for r in txn.records):
                break
            for r in txn.records:
                remaining[r.ino] -= 1
            self.txns.pop(0)
            removed += len(txn.records)
            self.head.tail_seq = txn.seq + 1
            self.head.tail_off = (txn.off + txn.nblocks) % self.ring
        if not self.txns and self.head.flags & LOG_FLAG_RECORDS_LOST:
            if not self.has_unshipped([(0, self.geo.num_blocks)]):
                self.head.flags &= ~LOG_FLAG_RECORDS_LOST
                self._write_header()
                return removed
        if removed:
            self._write_header()
        return removed
