"""The touched-files scan of recovery after losing the primary (SPEC §8 [0171]-[0173]).

The model: the metadata log names, per transaction, the files it changed ([0161]), and the trim
rule keeps a record until the Async site has that file's blocks ([0168]-[0170]). So after the
primary is lost, reading the log of the surviving Sync replica (the same `scan_ring` and
`replay_committed` as mount and fsck, into a read-only overlay) lists exactly the files the Async
site may lack, and their blocks (the same pointer-tree `walk` as the file system).

Keeps true:
- The scan only reads: it parses the superblock and the metadata log area of a replica (e.g. C)
  and never writes to it; a committed-but-not-checkpointed transaction is applied in memory.
- A file has a record in the log exactly when it changed since the log was last trimmed empty;
  by the trim rule ([0168]-[0170]) every other file already has the same data at the Async site.
- `complete` is False, with `problem` saying why, when the log cannot prove what changed (bad log
  header, a corrupt or missing committed transaction, records discarded by an fsck reset); a
  recovery tool must then fall back to a full copy. `touched_files` raises `IncompleteLog` then.
- A touched file's `blocks` are every block it owns now (data and pointer blocks, read from the
  replica's inode) merged with every range its records name, so copying them plus
  `metadata_ranges` makes the file identical at the target.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from jfs import layout as L
from jfs.blockmap import walk
from jfs.codecs import Inode, find_superblock, parse_ptr_block
from jfs.errors import IncompleteLog
from jfs.logring import BlockView, LogRecord, RingScan, damaged_after, read_header, replay_committed, scan_ring
from vstore.blocks.device import BlockDevice
from vstore.blocks.errors import FormatError
from vstore.blocks.ranges import Ranges, merge_ranges


@dataclass
class TouchedFile:
    inode: int
    path: str | None
    ops: list[str]
    blocks: Ranges
    newest_seq: int


@dataclass
class LogScan:
    files: list[TouchedFile] = field(default_factory=list)
    records: list[LogRecord] = field(default_factory=list)
    complete: bool = True
    problem: str | None = None


def _owned_blocks(view: BlockView, geo: L.Geometry, ino: int) -> Ranges:
    """Every block inode `ino` owns now, or [] when it is free or unreadable. A pointer block that
    cannot be read counts itself but nothing under it."""
    blk, off = geo.inode_location(ino)
    try:
        node = Inode.parse(ino, view.read(blk)[off:off + L.INODE_SIZE])
    except FormatError:
        return []
    if node is None:
        return []

    def ptrs_of(lba: int, level: int) -> list[int] | None:
        if not geo.data_start <= lba < geo.data_end:
            return None
        try:
            return list(parse_ptr_block(geo.block_size, view.read(lba), "pointer block").ptrs)
        except FormatError:
            return None

    m = walk(geo, node, ptrs_of)
    return merge_ranges((b, 1) for b in m.all_blocks() + m.bad if geo.data_start <= b < geo.data_end)


def scan_log(device: BlockDevice) -> LogScan:
    """Read the metadata log area and list each file that has a record."""
    try:
        sb = find_superblock(device)
    except FormatError as exc:
        return LogScan(complete=False, problem=str(exc))
    geo = L.Geometry.from_superblock(sb)
    view = BlockView(device, readonly=True)
    try:
        head = read_header(view, geo)
        if head.uuid != sb.uuid:
            raise FormatError("the log header belongs to another file system")
    except FormatError as exc:
        return LogScan(complete=False, problem=str(exc))
    ring = scan_ring(view, geo, head)
    if ring.problem is None:  # recovery reads a copy that lost no page cache: a refused written txn is damage
        damaged = damaged_after(view, geo, ring)
        if damaged is not None:
            ring = RingScan(ring.head, ring.txns, damaged, ring.broken)
    replay_committed(view, geo, ring)  # into the overlay: the replica is never written
    by_ino: dict[int, TouchedFile] = {}
    records: list[LogRecord] = []
    for t in ring.txns:
        for r in t.records:
            records.append(r)
            f = by_ino.get(r.ino)
            if f is None:
                f = by_ino[r.ino] = TouchedFile(r.ino, r.path, [], [], r.seq)
            if r.op not in f.ops:
                f.ops.append(r.op)
            f.path = r.path or f.path
            f.blocks = merge_ranges(f.blocks + r.ranges)
            f.newest_seq = max(f.newest_seq, r.seq)
    for f in by_ino.values():
        f.blocks = merge_ranges(f.blocks + _owned_blocks(view, geo, f.inode))
    files = sorted(by_ino.values(), key=lambda f: f.inode)
    return LogScan(files, records, ring.problem is None, ring.problem)


def touched_files(device: BlockDevice) -> list[TouchedFile]:
    """The files changed since the log was last trimmed empty; IncompleteLog when unprovable."""
    scan = scan_log(device)
    if not scan.complete:
        raise IncompleteLog(f"the metadata log cannot tell which files changed ({scan.problem}); "
                            "copy the whole volume instead")
    return scan.files


def metadata_ranges(device: BlockDevice) -> Ranges:
    """Block ranges that are file-system metadata (superblocks, log area, bitmaps, inode table)."""
    return L.Geometry.from_superblock(find_superblock(device)).metadata_ranges()
