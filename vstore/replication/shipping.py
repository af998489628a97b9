"""Shipping ordered entries to the Async site and applying them there (SPEC §4 [0044]-[0045],
DESIGN invariant 2).

Keeps true:
- Entries leave the primary in sequence order, in batches. The Async site first stores a batch
  durably in its receive journal, then applies it to its volumes, then records it applied; only
  then does the primary confirm (and trim) those entries. A crash between store and apply is
  finished by `Receiver.finish_stored` before the volumes are used, so D always equals the
  primary after some prefix of acknowledged writes: the prefix ends at a batch boundary.
- Coalescing [0045] happens only inside one batch (which D applies atomically): an entry whose
  every block is written again later in the same batch is not sent.
- When the Async site cannot be reached, the async group enters failure Suspend with its
  unshipped entries turned into recorded positions (never dropped); when it can be reached again
  `resync` runs Duplex-Pending (copying exactly the recorded blocks, or of a pair whose positions
  were lost with the spool's entries, exactly the blocks that differ) and returns to Duplex.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from vstore.replication.compare import take_recorded
from vstore.replication.entries import Entry
from vstore.replication.journal import BatchReceiver
from vstore.replication.network import LinkDown, Network, SiteDown, VolumeFailed
from vstore.replication.pairs import PairState, split_ref
from vstore.replication.storage import AsyncCopyProgram, SiteStorage

log = logging.getLogger("vstore.shipping")

DEFAULT_BATCH_ENTRIES = 64


def coalesce(batch: Sequence[Entry]) -> list[Entry]:
    """Drop entries all of whose blocks are written again later in the batch (order kept)."""
    later: dict[int, set[int]] = {}
    kept: list[Entry] = []
    for entry in reversed(batch):
        seen = later.setdefault(entry.volume_id, set())
        blocks = range(entry.lba, entry.lba + entry.block_count)
        if not all(b in seen for b in blocks):
            kept.append(entry)
        seen.update(blocks)
    kept.reverse()
    return kept


@dataclass
class ShipReport:
    entries: int = 0
    batches: int = 0
    blocks_written: int = 0
    blocks_sent: int = 0
    resynced_blocks: int = 0
    error: str | None = None


class GroupShipper:
    """The primary's sender for one consistency group, in this process (the daemons ship with
    `vstore.daemons.shipper.ShipperDaemon`; pair-state work such as resync is done here for both)."""

    def __init__(self, program: AsyncCopyProgram, source: SiteStorage, network: Network,
                 target_site: str, receiver: Callable[[], BatchReceiver], target: Callable[[], SiteStorage], *,
                 batch_entries: int = DEFAULT_BATCH_ENTRIES, coalescing: bool = False) -> None:
        self.program = program
        self.source = source
        self.network = network
        self.target_site = target_site
        self.receiver = receiver
        self.target = target
        self.batch_entries = batch_entries
        self.coalescing = coalescing

    def ship(self, max_entries: int | None = None, *, crash_after_store_batch: int | None = None,
             progress: Callable[[int], None] | None = None) -> ShipReport:
        """Send waiting entries (at most `max_entries`), batch by batch, in sequence order."""
        report = ShipReport()
        try:
            self.network.check(self.source.site, self.target_site)
            for pair in self.program.pairs():
                self.network.check_volume(*split_ref(pair.target))
        except (LinkDown, SiteDown, VolumeFailed) as exc:
            if self.program.log.stats().entries:
                self.program.suspend_group(str(exc))
            report.error = str(exc)
            return report
        report.resynced_blocks = self.resync()
        receiver = self.receiver()
        receiver.finish_stored()
        self.skip_confirmed(receiver)
        pending = self.program.log.pending(max_entries)
        for start in range(0, len(pending), self.batch_entries):
            batch = pending[start:start + self.batch_entries]
            to_send = coalesce(batch) if self.coalescing else list(batch)
            receiver.receive(to_send, batch[0].seq, batch[-1].seq,
                             crash_after_store=crash_after_store_batch == report.batches)
            self.program.log.confirm(batch[-1].seq)
            report.entries += len(batch)
            report.batches += 1
            report.blocks_written += sum(e.block_count for e in batch)
            report.blocks_sent += sum(e.block_count for e in to_send)
            if progress:
                progress(len(batch))
        return report

    def skip_confirmed(self, receiver: BatchReceiver) -> None:
        """Resume from the Async site's applied sequence: entries it already has are confirmed,
        never sent twice (after a crash between its apply and our confirm)."""
        log_ = self.program.log
        applied = receiver.applied_seq
        if log_.confirmed_seq < applied < log_.next_seq:
            log_.confirm(applied)

    def resync(self, progress: Callable[[int], None] | None = None) -> int:
        """Duplex-Pending for every Suspended pair of the group: copy exactly the recorded blocks (of
        a pair whose positions are not known exactly, those that differ: `take_recorded`)."""
        suspended = [p for p in self.program.pairs() if p.state == PairState.SUSPEND]
        if not suspended:
            return 0
        self.network.check(self.source.site, self.target_site)
        receiver = self.receiver()
        receiver.finish_stored()
        copied = 0
        for pair in suspended:
            pair.transition(PairState.DUPLEX_PENDING, "resync: copying recorded positions")
            ranges: list[tuple[int, int]] = []
            try:
                ranges = take_recorded(pair, self.source, self.target())
                copied += self.source.copy_to(split_ref(pair.source)[1], *split_ref(pair.target), ranges, progress)
            except (LinkDown, SiteDown, VolumeFailed) as exc:
                for r in ranges:
                    pair.bitmap.mark(*r)
                pair.transition(PairState.SUSPEND, f"resync interrupted: {exc}", failure=True)
                raise
        receiver.journal.set_applied_seq(self.program.log.next_seq - 1)
        for pair in suspended:
            pair.transition(PairState.DUPLEX, None)
        log.info("async group %s: resynced %d blocks", self.source.site, copied)
        return copied
