"""fsck passes 0 and 1: the superblock with its backup, and the metadata log (SPEC §8 [0160], [0171];
DESIGN.md "JFS"; FORMAT.md "Superblock", "Metadata log area").

The model is e2fsck's superblock and journal checks: pick the superblock to trust, then make the
log something mount can open, replaying what is committed. `jfs.fsck.Checker` runs these passes
before judging the tree; they see the volume only through the shared readers (`jfs.codecs`,
`jfs.metalog`).

Keeps true:
- The superblock is block 0 when it is usable (`codecs.superblock_at`: parses, every field
  possible, the regions `Geometry.plan` makes, the device's size), else the backup in the last
  block. When both are usable but differ, the one the log header agrees with (its UUID) wins, so
  a wrong but well-formed block 0 never overwrites the good backup.
- A log header whose positions are impossible, or whose transactions do not end where it says,
  is rebuilt from the chain of transactions found from its tail: they are kept (never replayed,
  since nothing proves which of them is checkpointed), every other ring block is zeroed (no stale
  transaction can be taken for a later one) and the log is flagged "records lost" ([0171]). Only
  a header that does not parse, or whose tail is impossible, resets the log to empty.
- Repairs are written through the checker's view: with `-n` they live in memory only, so the
  passes after see the same volume in both modes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from jfs import layout as L
from jfs.codecs import superblock_at, superblock_image
from jfs.logring import (
    MAX_SEQ,
    BlockView,
    LogHead,
    Txn,
    header_problem,
    parse_header,
    replay_committed,
    scan_ring,
)
from vstore.blocks.device import BlockDevice
from vstore.blocks.errors import FormatError


@dataclass
class Problem:
    code: str
    message: str
    fixed: bool


class Abort(Exception):
    """Checking cannot go on (e.g. no usable superblock)."""


class VolumeChecks:
    """Passes 0 and 1, and the bookkeeping every pass shares."""

    def __init__(self, device: BlockDevice, repair: bool) -> None:
        self.device = device
        self.repair = repair and not device.readonly
        self.view = BlockView(device, readonly=not self.repair)
        self.problems: list[Problem] = []
        self.replayed = 0

    def problem(self, code: str, message: str, fixable: bool = True) -> bool:
        """Record a problem; returns True when it is to be fixed now."""
        fixed = self.repair and fixable
        self.problems.append(Problem(code, message, fixed))
        return fixed

    # -- pass 0: superblock ----------------------------------------------------------------------
    def _usable(self, lba: int, what: str) -> tuple[Any, str]:
        try:
            return superblock_at(self.device, lba, what), ""
        except FormatError as exc:
            return None, str(exc).split(";")[0]

    def _log_agrees(self, sb: Any) -> bool:
        try:
            return bool(parse_header(self.view, L.Geometry.from_superblock(sb)).uuid == sb.uuid)
        except FormatError:
            return False

    def check_superblock(self) -> None:
        dev = self.device
        primary, why = self._usable(0, "superblock (block 0)")
        backup, why_backup = self._usable(dev.num_blocks - 1, "backup superblock")
        if primary is None and backup is None:
            self.problem("superblock-corrupt", f"neither the superblock nor its backup is usable ({why}; "
                         f"{why_backup})", False)
            raise Abort
        same = primary is not None and backup is not None and backup.uuid == primary.uuid \
            and L.Geometry.from_superblock(backup) == L.Geometry.from_superblock(primary)
        if primary is not None and backup is not None and not same \
                and self._log_agrees(backup) and not self._log_agrees(primary):
            primary, why = None, "the superblock differs from its backup, and the metadata log agrees with the backup"
        if primary is None:
            self.sb = backup
            if self.problem("superblock-corrupt", f"{why}; restored from the backup in the last block"):
                self._write_sb(0, L.STATE_DIRTY)
        else:
            self.sb = primary
        self.geo = L.Geometry.from_superblock(self.sb)
        if primary is not None and not same:
            if self.problem("backup-superblock", "the backup superblock is missing or differs; "
                            "rewritten from the superblock"):
                self._write_sb(self.geo.backup_sb, L.STATE_CLEAN)

    def _write_sb(self, lba: int, state: int) -> None:
        sb = self.sb
        self.view.write(lba, superblock_image(L.Geometry.from_superblock(sb), sb.uuid, sb.label, state,
                                              sb.checkpoint_seq, sb.mkfs_time_ns))

    # -- pass 1: log -----------------------------------------------------------------------------
    def check_log(self) -> None:
        geo, uuid = self.geo, self.sb.uuid
        try:
            head = parse_header(self.view, geo)
            if head.uuid != uuid:
                raise FormatError("log header UUID differs from the superblock")
        except FormatError as exc:
            self.problem("log-header-corrupt", f"{str(exc).split(';')[0]}; the log is reset")
            self._rewrite_log(LogHead(uuid, tail_seq=1, head_seq=1), [])
            return
        why = header_problem(head, geo)
        if why is not None and header_problem(_known_flags(head), geo) is None:
            self.problem("log-header-flags", "the log header has unknown flags; cleared")
            head = _known_flags(head)
            self.view.write(geo.log_start, head.build(geo.block_size))
            why = None
        code = "log-header-positions"
        if why is None:
            scan = scan_ring(self.view, geo, head)
            if scan.broken is None:
                self.replayed = len(replay_committed(self.view, geo, scan))  # a committed log is not an error
                return
            code, why = "log-record-corrupt", scan.broken
        ring = geo.log_blocks - 1
        if head.tail_off >= ring or not 1 <= head.tail_seq < MAX_SEQ - ring:
            self.problem(code, f"log header (block {geo.log_start}): {why}; the log is reset")
            seq = head.head_seq if 1 <= head.head_seq < MAX_SEQ - ring else 1
            self._rewrite_log(LogHead(uuid, tail_seq=seq, head_seq=seq), [])
            return
        chain = scan_ring(self.view, geo, LogHead(uuid, 0, head.tail_seq, head.tail_off,
                                                  head.tail_seq + ring, 0, head.tail_seq - 1)).txns
        self.problem(code, f"log header (block {geo.log_start}): {why}; the log is cut to the {len(chain)} "
                     "transaction(s) found from its tail, none replayed, and its records are flagged as lost")
        self._rewrite_log(head, chain)

    def _rewrite_log(self, head: LogHead, chain: list[Txn]) -> None:
        """The header of a log holding `chain` from `head`'s tail, flagged "records lost"; in repair
        every ring block outside the chain is zeroed."""
        geo, ring = self.geo, self.geo.log_blocks - 1
        used = sum(t.nblocks for t in chain)
        seq = head.tail_seq + len(chain)
        new = LogHead(head.uuid, L.LOG_FLAG_RECORDS_LOST, head.tail_seq, head.tail_off, seq,
                      (head.tail_off + used) % ring, seq - 1)
        off, left = new.head_off, ring - used
        while self.repair and left:
            n = min(left, ring - off, 256)
            self.view.write(geo.log_start + 1 + off, bytes(n * geo.block_size))
            off, left = (off + n) % ring, left - n
        self.view.write(geo.log_start, new.build(geo.block_size))


def _known_flags(head: LogHead) -> LogHead:
    return LogHead(head.uuid, head.flags & L.LOG_FLAG_RECORDS_LOST, head.tail_seq, head.tail_off,
                   head.head_seq, head.head_off, head.checkpoint_seq)
