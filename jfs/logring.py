"""The metadata log as stored: its header, the ring of transactions, and the one reading of it
(SPEC §8 [0160]; FORMAT.md "Metadata log area").

Mount, fsck and the recovery scan all read the ring with `scan_ring` and apply what is committed
but not yet checkpointed with `replay_committed`; `jfs.metalog.MetaLog` writes it.

Keeps true:
- A transaction is committed exactly when its commit block is on disk with a matching CRC, it
  overlaps no transaction before it, and what it names is what a commit writes (`_justified`:
  records of inodes in the table, known operations, ranges in the data area; ascending homes, each
  a bitmap block, a recorded inode's table block or a block a record names). Replay ignores
  anything else, so it never writes the superblocks, the log area, a block past the device or a
  block no record names (a file's data).
- A log header is read only when its positions are possible (`header_problem`), and the log is
  opened only when its transactions end at the head offset (`RingScan.broken`).
- Past the header's head, the committed transactions are the longest chain of valid ones: each
  with its commit CRC, the CRC of the one before it in its descriptor, and the file data it points
  at intact (CRC per data run); the first that fails ends it, and nothing after a gap is taken.
  After a power cut that left any subset of the unflushed writes, replay therefore gives the
  state after a prefix of the transactions, and every transaction before the last completed
  flush is in it.
- Replay re-writes the images of those transactions in order and records the checkpoint in the
  header; doing it twice gives the same blocks (idempotent). A transaction refused right after
  them gets its descriptor zeroed, so it can never become committed later.
"""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass, field
from typing import Any

from jfs.layout import (
    LOG_FLAG_RECORDS_LOST,
    TXN_HEAD_BYTES,
    Commit,
    Geometry,
    LogHeader,
    txn_digest,
)
from jfs.packing import pack_log_header, unpack_commit, unpack_log_header, unpack_txn_body, unpack_txn_head
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
    """A committed transaction found in the ring (`crc` its commit's txn_crc, `prev_crc` the one
    its descriptor names for the transaction before it, `data` its (first, count, crc) data runs)."""

    seq: int
    off: int
    nblocks: int
    homes: list[int]
    records: list[LogRecord]
    images: list[bytes] = field(default_factory=list)
    crc: int = 0
    prev_crc: int = 0
    data: list[tuple[int, int, int]] = field(default_factory=list)


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
        return pack_log_header(block_size, self.flags, self.uuid, self.tail_seq, self.tail_off, self.head_seq,
                               self.head_off, self.checkpoint_seq)


class BlockView:
    """Reads and writes through to a device, or into an overlay when the device must not change
    (read-only mount, `fsck -n`): replayed blocks then live only in memory. `pending` holds the
    metadata images of transactions not yet durable (their homes wait for a flush): reads see
    them, the device does not have them yet."""

    def __init__(self, device: BlockDevice, *, readonly: bool = False) -> None:
        self.device = device
        self.readonly = readonly or device.readonly
        self.overlay: dict[int, bytes] = {}
        self.pending: dict[int, tuple[int, bytes]] = {}  # lba -> (transaction seq, image)

    def read(self, lba: int, count: int = 1) -> bytes:
        if not self.overlay:
            if not self.pending:
                return self.device.read(lba, count)
            if count == 1:
                hit = self.pending.get(lba)
                return hit[1] if hit is not None else self.device.read(lba)
        bs = self.device.block_size
        raw = bytearray(self.device.read(lba, count))
        for i in range(count):
            hit = self.pending.get(lba + i)
            img = hit[1] if hit is not None else self.overlay.get(lba + i)
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
# Parsed with `jfs.packing`'s struct readers, which give what the `jfs.layout` declarations give.
MAX_SEQ = 1 << 63  # sequences stay far from the u64 limit
LOG_HEADER_BYTES = LogHeader.sizeof()
COMMIT_BYTES = Commit.sizeof()


def parse_header(view: BlockView, geo: Geometry) -> LogHead:
    """The log header's values as stored (magic, version and CRC checked, positions not)."""
    v = unpack_log_header(view.read(geo.log_start)[:LOG_HEADER_BYTES], f"log header (block {geo.log_start})")
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
        head = unpack_txn_head(_read_ring(view, geo, off, 1)[:TXN_HEAD_BYTES], "txn")
    except FormatError:
        return None
    total = head.desc_blocks + head.meta_blocks + 1
    if head.uuid != uuid or head.seq != seq or head.desc_blocks < 1 or total > ring:
        return None
    raw = _read_ring(view, geo, off, total)
    try:
        commit = unpack_commit(raw[-bs:][:COMMIT_BYTES], "commit")
    except FormatError:
        return None
    if commit.uuid != uuid or commit.seq != seq or commit.total_blocks != total \
            or commit.txn_crc != txn_digest(memoryview(raw)[:-bs]):
        return None
    desc_end = head.desc_blocks * bs
    body_raw = raw[TXN_HEAD_BYTES:TXN_HEAD_BYTES + head.body_len]
    if TXN_HEAD_BYTES + head.body_len > desc_end:
        return None
    try:
        homes, body_records, data = unpack_txn_body(body_raw, "txn body")
    except FormatError:
        return None
    if len(homes) != head.meta_blocks or not _justified(geo, homes, body_records) \
            or not all(n and geo.data_start <= a and a + n <= geo.data_end for a, n, _ in data):
        return None
    records = [LogRecord(seq, r.ino, r.path or None, str(r.op), [(x.first, x.count) for x in r.ranges])
               for r in body_records]
    images = [raw[desc_end + i * bs:desc_end + (i + 1) * bs] for i in range(head.meta_blocks)]
    return Txn(seq, off, total, homes, records, images, commit.txn_crc, head.prev_crc, data)


def data_intact(view: BlockView, txn: Txn) -> bool:
    """Whether every run of file data `txn` points at holds what it held when `txn` was written
    (after a power cut, any of the unflushed writes before its commit block may be missing)."""
    return all(txn_digest(view.read(first, count)) == crc for first, count, crc in txn.data)


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
    """Every committed transaction from the tail on, none overlapping another: the checkpointed
    ones (before the head), then the longest run of valid transactions past the head, each
    naming the CRC of the one before it and its file data intact (`data_intact`); the first that
    is not ends the scan, so nothing after a gap is ever taken. `problem` names a checkpointed
    transaction that is missing or corrupt (a hole in the middle of the log), or a head offset
    other than where the checkpointed transactions end."""
    txns: list[Txn] = []
    off, seq, ring = head.tail_off, head.tail_seq, geo.log_blocks - 1
    used = 0
    head_at = off if seq == head.head_seq else None  # where transaction head_seq starts
    while used < ring and seq < MAX_SEQ:
        txn = read_txn(view, geo, head.uuid, off, seq)
        if txn is None or used + txn.nblocks > ring:
            break
        if seq >= head.head_seq and ((txns and txn.prev_crc != txns[-1].crc) or not data_intact(view, txn)):
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


def damaged_after(view: BlockView, geo: Geometry, ring: RingScan) -> str | None:
    """Why the end of `ring`'s chain is damage rather than the end of what was written: the block
    where the next transaction would start holds that transaction's head (this file system, the
    next sequence number), yet the transaction was refused. After a power cut that is a torn
    commit; on a copy that lost no page cache (the Sync site after losing the primary) it is a
    damaged transaction whose records (and every later one's) the chain cannot show."""
    if ring.txns:
        last = ring.txns[-1]
        off, seq = (last.off + last.nblocks) % (geo.log_blocks - 1), last.seq + 1
    else:
        off, seq = ring.head.tail_off, ring.head.tail_seq
    try:
        head = unpack_txn_head(_read_ring(view, geo, off, 1)[:TXN_HEAD_BYTES], "txn")
    except FormatError:
        return None
    if head.uuid != ring.head.uuid or head.seq != seq:
        return None
    return (f"log transaction {seq} (ring offset {off}) was written but is damaged: the records from "
            "it on cannot be read")


def replay_committed(view: BlockView, geo: Geometry, ring: RingScan) -> list[Txn]:
    """Write the images of every committed transaction the checkpoint does not cover yet (the
    valid chain past the head), in order, then record the checkpoint in the log header
    (`ring.head` is updated). A transaction that parses right after them but was refused (its
    data or its chain did not hold: torn by a power cut, or left from an earlier try) has its
    descriptor zeroed, so that it can never pass later for the transaction written there next.
    Returns the transactions replayed. Through a read-only view the replay lives in the overlay
    only."""
    pending = [t for t in ring.txns if t.seq > ring.head.checkpoint_seq]
    for t in pending:
        for lba, img in zip(t.homes, t.images, strict=True):
            view.write(lba, img)
    head = ring.head
    seq, off = head.head_seq, head.head_off
    if pending:
        last = pending[-1]
        seq, off = last.seq + 1, (last.off + last.nblocks) % (geo.log_blocks - 1)
    torn = read_txn(view, geo, head.uuid, off, seq) is not None
    if torn:
        view.write(geo.log_start + 1 + off, bytes(geo.block_size))
    if pending or torn:
        view.flush()
    if pending:
        head.checkpoint_seq = seq - 1
        head.head_seq = seq
        head.head_off = off
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
