"""The entry log (spool) on the primary host (SPEC §4 [0044], §8 [0169]; DESIGN invariant 6).

Keeps true:
- `EntryLog` holds every appended entry until the secondary confirms it. An append is in place
  when it returns; `flush` makes every append before it durable (one fdatasync per segment written
  since the last flush, none when nothing was: group commit). Past its capacity it refuses the append with
  `EntryLogFull` and writes nothing (invariant 6: the caller moves the pair to Suspending ->
  Suspend and records positions instead; it never drops or blocks).
- What existed is known after a crash or damage. Before an append writes its entries, one pwrite
  puts a slot of the manifest (`manifest.bin`, `SPOOL_MANIFEST`, two slots written in turn) in
  place: `acked_seq`, the watermark (every entry whose append had returned before this one began),
  `high_seq` (the last sequence number this append uses), `reserved_seq` (a ceiling above it,
  fsynced each time it is crossed, every `SEQ_RESERVE` numbers) and the newest segment with the
  size this append gives it (fsynced when a segment is made). The watermark is exact after a
  process crash; after a power loss it may lag behind the last appends (the reservation and the
  newest segment do not), and entries found past it are kept. An eager `confirm` fsyncs it
  first; a lazy one (the daemon's) keeps the position in memory until a segment can go, and a
  position lost in a crash only means entries the Async site applied are offered again, skipped.
- Recovery cuts only a torn tail: bytes at the end of the last segment, after the watermark,
  shorter than an entry and than that append left the segment: the append a crash cut before it
  returned (its sequence number is used again). Anything else lost past the confirmed sequence
  (a full-length entry failing its CRC, entries up to the watermark gone, a deleted newest
  segment, a gap) is `SpoolDamage`, with the range and the positions the entries' headers name
  (or none: every volume needs a full differential check). It is raised at open, or with
  `record_damage` kept in `damage`: nothing past it is pending, appends are refused, and a
  `confirm` past it (the caller recorded the positions elsewhere) ends it. The sequence then
  continues above the reservation: no sequence number is ever used twice.
- `confirmed.json` is believed only up to the highest sequence number the spool ever held; beyond
  that it is refused (FormatError naming the file and both numbers) and nothing is deleted.
- With `defer_repairs` opening writes nothing (read-only commands such as status): the torn tail
  is cut and empty or confirmed segments removed at the first append or confirm.
- It answers "does any unshipped entry touch these blocks?" from an in-memory index (the JFS trim
  rule, SPEC §8 [0169]). Segment files are named and read by `vstore.replication.segments`; this
  is their only writer.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from vstore.blocks.codec import create_file, fsync_dir, fsync_path, make_dir, remove_stale_temps, save_json_atomic
from vstore.blocks.errors import FormatError, TricopyError
from vstore.replication.entries import (
    BLOCK_SIZE,
    MANIFEST_SLOT_SIZE,
    MAX_SEQ,
    Entry,
    Manifest,
    decode_entry,
    encode_entry,
    encode_manifest,
)
from vstore.replication.pending import PendingIndex
from vstore.replication.segments import (
    CONFIRMED_FILE,
    MANIFEST_FILE,
    SEQ_RESERVE,
    SpoolDamage,
    analyse_spool,
    read_confirmed,
    segment_name,
)
from vstore.replication.spool_files import EntryLoc, Segment, Touch, close_fd, write_all

log = logging.getLogger("vstore.spool")


class EntryLogFull(TricopyError):
    """The entry log has no room for these entries; nothing was written."""


@dataclass
class LogStats:
    entries: int
    bytes: int
    oldest_timestamp_ns: int | None
    first_seq: int | None
    last_seq: int | None


class EntryLog:
    """Durable, append-only spool of entries waiting for the secondary's confirmation."""

    def __init__(self, spool_dir: Path, *, durable: bool = True, capacity_bytes: int = 256 << 20,
                 segment_bytes: int = 4 << 20, block_size: int = BLOCK_SIZE, record_damage: bool = False,
                 defer_repairs: bool = False, known_seq: int = 0) -> None:
        """`record_damage`: keep a `SpoolDamage` in `damage` instead of raising it; `defer_repairs`:
        write nothing until the first append or confirm; `known_seq`: a sequence number the site's
        state saw used (a spool holding less lost its files)."""
        self.spool_dir = Path(spool_dir)
        self.durable = durable
        self.capacity_bytes = capacity_bytes
        self.segment_bytes = segment_bytes
        self.block_size = block_size
        self._lock = threading.RLock()
        self._segments: list[Segment] = []
        self._pending: PendingIndex[EntryLoc] = PendingIndex()
        self._closed, self._repaired = False, False
        self._manifest_fd: int | None = None
        self._unsynced: list[Segment] = []  # segments appended to since the last flush
        self.syncs = 0  # fdatasyncs of segments (the durability tests and benchmarks count them)
        self._confirmed = read_confirmed(self.spool_dir)
        self._recover(record_damage, known_seq)
        if not defer_repairs:
            self._repair()

    # -- properties ---------------------------------------------------------------------------
    @property
    def next_seq(self) -> int:
        return self._next_seq

    @property
    def confirmed_seq(self) -> int:
        return self._confirmed

    @property
    def high_seq(self) -> int:
        """The highest sequence number this spool ever gave an entry."""
        return self._high

    # -- recovery -----------------------------------------------------------------------------
    def _recover(self, record_damage: bool, known_seq: int) -> None:
        """Read the segments and the manifest (writing nothing): pending entries, torn tail, damage."""
        found = analyse_spool(self.spool_dir, self._confirmed, self.block_size, known_seq)
        if found.damage is not None and not record_damage:
            raise found.damage
        self._segments = [Segment(c.path, c.first_seq, c.covered, c.size) for c in found.segments]
        for si, it in found.pending:
            self._pending.add(EntryLoc(it.seq, it.offset, it.length, it.volume_id, it.lba, it.block_count,
                                   it.timestamp_ns, segment=self._segments[si]))
        self._cuts = [(self._segments[si], offset) for si, offset in found.cuts]
        if found.torn is not None:
            seg, bad = self._segments[found.torn[0]], found.torn[1]
            log.warning("%s: a torn tail of %d bytes at offset %d (%s) is dropped; the write was never "
                        "acknowledged", seg.path, seg.size - bad.offset, bad.offset, bad.error)
        self.damage: SpoolDamage | None = found.damage
        if found.damage is not None:
            log.error("%s", found.damage)
        self._generation = found.generation  # of the manifest's newest slot
        self._acked, self._high, self._reserved = found.last_good, found.high, found.reserved
        self._next_seq = found.reserved + 1 if found.damage is not None else found.last_good + 1

    def _repair(self) -> None:
        """What recovery found to do on disk, once, before the first change: cut the torn tail,
        remove empty segments and confirmed ones."""
        if self._repaired:
            return
        self._repaired = True
        make_dir(self.spool_dir, parents=True, exist_ok=True)
        remove_stale_temps(self.spool_dir)
        changed = False
        for seg, offset in self._cuts:
            os.truncate(seg.path, offset)
            seg.size, changed = offset, True
            if self.durable:
                fsync_path(seg.path)
        for seg in [s for s in self._segments if s.size == 0]:
            self._segments.remove(seg)
            seg.path.unlink(missing_ok=True)
            changed = True
        if changed and (self._manifest_fd is not None or (self.spool_dir / MANIFEST_FILE).exists()):
            self._write_manifest(sync=True)
        self._trim_confirmed_segments()

    def _write_manifest(self, *, sync: bool, newest: tuple[int, int] | None = None) -> None:
        """Put the next manifest slot in place; `sync`: durable now (when the log is durable);
        `newest`: (first seq, size) of the newest segment once the write under way is done."""
        new = False
        if self._manifest_fd is None:
            path = self.spool_dir / MANIFEST_FILE
            new = not path.exists()
            self._manifest_fd = create_file(path, os.O_RDWR | os.O_CREAT)
        self._generation += 1
        if newest is None:
            newest = (self._segments[-1].first_seq, self._segments[-1].size) if self._segments else (0, 0)
        slot = Manifest(self._generation, min(self._acked, self._high), self._high, self._reserved, *newest)
        os.pwrite(self._manifest_fd, encode_manifest(slot), (self._generation % 2) * MANIFEST_SLOT_SIZE)
        if self.durable and (sync or new):
            os.fsync(self._manifest_fd)
            if new:
                fsync_dir(self.spool_dir)

    # -- appending ----------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise TricopyError(f"entry log {self.spool_dir} is closed")

    def _make_entries(self, items: Sequence[tuple[int, int, bytes]], timestamp_ns: int | None) -> list[Entry]:
        stamp = time.time_ns() if timestamp_ns is None else timestamp_ns
        if self._next_seq + len(items) - 1 > MAX_SEQ:
            raise TricopyError(f"entry log {self.spool_dir}: sequence numbers are used up (the next is "
                               f"{self._next_seq}); resynchronise the async pair and clear the spool")
        entries = []
        for i, (volume_id, lba, payload) in enumerate(items):
            if not payload or len(payload) % self.block_size:
                raise ValueError(f"entry payload must be a whole number of {self.block_size}-byte blocks, "
                                 f"got {len(payload)} bytes")
            entries.append(Entry(self._next_seq + i, stamp, volume_id, lba,
                                 len(payload) // self.block_size, bytes(payload)))
        return entries

    def append(self, volume_id: int, lba: int, payload: bytes, *, timestamp_ns: int | None = None) -> Entry:
        """Append one entry (durable at the next `flush`). The common case, an entry that fits the
        active segment below the reservation, takes `append_many`'s steps for one entry in one
        segment (manifest slot, then the entry); any other case is `append_many`'s."""
        with self._lock:
            seg = self._segments[-1] if self._segments else None
            seq, n = self._next_seq, len(payload) // self.block_size
            if (seg is None or seg.fd is None or seg.size >= self.segment_bytes or not self._repaired
                    or self._closed or self.damage is not None or seq >= self._reserved or seq > MAX_SEQ
                    or not payload or n * self.block_size != len(payload)):
                return self.append_many([(volume_id, lba, payload)], timestamp_ns=timestamp_ns)[0]
            entry = Entry(seq, time.time_ns() if timestamp_ns is None else timestamp_ns, volume_id, lba, n,
                          bytes(payload))
            data = encode_entry(entry)
            self._check_room(len(data))
            self._high = max(self._high, seq)
            size, last = seg.size, seg.last_seq
            try:
                self._write_manifest(sync=False, newest=(seg.first_seq, size + len(data)))
                write_all(seg.fd, data)
            except BaseException:
                self._undo([Touch(seg, size, last, new=False)])
                raise
            self._pending.add(EntryLoc(seq, seg.size, len(data), volume_id, lba, n, entry.timestamp_ns, segment=seg))
            seg.size += len(data)
            seg.last_seq = seq
            if not self._unsynced or self._unsynced[-1] is not seg:
                self._unsynced.append(seg)
            self._next_seq = seq + 1
            self._acked = seq  # on disk with the next append's manifest slot
            return entry

    def _check_room(self, need: int) -> None:
        """Refuse (EntryLogFull) an append of `need` bytes past the capacity."""
        if self._pending.waiting_bytes + need > self.capacity_bytes:
            raise EntryLogFull(
                f"entry log {self.spool_dir} is full ({self._pending.waiting_bytes} of {self.capacity_bytes} "
                f"bytes waiting, {need} more needed); suspend the async pair and record positions"
            )

    def append_many(self, items: Sequence[tuple[int, int, bytes]], *,
                    timestamp_ns: int | None = None) -> list[Entry]:
        """Append all items, all or nothing (durable at the next `flush`).
        Refused with the `SpoolDamage` while damage is recorded and not yet confirmed past."""
        with self._lock:
            self._check_open()
            if self.damage is not None:
                raise self.damage
            self._repair()
            entries = self._make_entries(items, timestamp_ns)
            encoded = [encode_entry(e) for e in entries]
            self._check_room(sum(len(b) for b in encoded))
            if not entries:
                return []
            self._write_entries(entries, encoded)
            self._next_seq = entries[-1].seq + 1
            self._acked = entries[-1].seq  # on disk with the next append's manifest slot
            return entries

    def _write_entries(self, entries: list[Entry], encoded: list[bytes]) -> None:
        """Manifest slot, then the entries; on an OS error undo what was written and re-raise."""
        touched: list[Touch] = []
        new_locs: list[EntryLoc] = []
        try:
            plan = self._plan(entries, encoded, touched)
            new_segment = any(t.new for t in touched)
            if new_segment and self.durable:
                fsync_dir(self.spool_dir)
            self._high = max(self._high, entries[-1].seq)
            crossed = self._high > self._reserved
            if crossed:
                self._reserved = min(self._high + SEQ_RESERVE, MAX_SEQ)
            last = plan[-1][0]
            self._write_manifest(sync=new_segment or crossed,
                                 newest=(last.first_seq, last.size + sum(len(d) for g, _, d in plan if g is last)))
            for seg, entry, data in plan:
                write_all(seg.fd, data)  # type: ignore[arg-type]
                new_locs.append(EntryLoc(entry.seq, seg.size, len(data), entry.volume_id, entry.lba,
                                     entry.block_count, entry.timestamp_ns, segment=seg))
                seg.size += len(data)
                seg.last_seq = entry.seq
        except BaseException:
            self._undo(touched)
            raise
        for t in touched:
            if t.segment is not self._segments[-1]:
                self._sync_segment(t.segment)  # a full segment is made durable as it is left
                close_fd(t.segment)
            elif not any(u is t.segment for u in self._unsynced):
                self._unsynced.append(t.segment)
        for loc in new_locs:
            self._pending.add(loc)

    def _plan(self, entries: list[Entry], encoded: list[bytes],
              touched: list[Touch]) -> list[tuple[Segment, Entry, bytes]]:
        """The segment each entry goes to: the active one, or new ones (made now) past segment_bytes."""
        plan = []
        active = self._segments[-1] if self._segments else None
        size = active.size if active is not None else 0
        for entry, data in zip(entries, encoded, strict=True):
            if active is None or size >= self.segment_bytes:
                path = self.spool_dir / segment_name(entry.seq)
                active = Segment(path, entry.seq, entry.seq - 1, 0)
                active.fd = create_file(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND)
                self._segments.append(active)
                touched.append(Touch(active, 0, entry.seq - 1, new=True))
                size = 0
            elif not touched or touched[-1].segment is not active:
                if active.fd is None:
                    active.fd = os.open(active.path, os.O_WRONLY | os.O_APPEND)
                touched.append(Touch(active, active.size, active.last_seq, new=False))
            plan.append((active, entry, data))
            size += len(data)
        return plan

    def _sync_segment(self, seg: Segment) -> None:
        if self.durable and seg.fd is not None:
            os.fdatasync(seg.fd)
            self.syncs += 1
        self._unsynced = [u for u in self._unsynced if u is not seg]

    def flush(self) -> None:
        """Make every entry appended so far durable (nothing to do when none was since the last flush)."""
        with self._lock:
            for seg in list(self._unsynced):
                self._sync_segment(seg)

    def _undo(self, touched: list[Touch]) -> None:
        for t in reversed(touched):
            seg = t.segment
            if t.new:
                if seg in self._segments:
                    self._segments.remove(seg)
                close_fd(seg)
                seg.path.unlink(missing_ok=True)
            elif seg.fd is not None:
                os.ftruncate(seg.fd, t.size_before)
                seg.size, seg.last_seq = t.size_before, t.last_before
        if any(t.new for t in touched) and self._manifest_fd is not None:
            try:  # the manifest must not name a segment that is gone
                self._write_manifest(sync=True)
            except OSError as exc:
                log.warning("%s: the manifest could not be put back after a failed append: %s", self.spool_dir, exc)

    # -- reading and confirming ---------------------------------------------------------------
    def pending(self, max_entries: int | None = None) -> list[Entry]:
        """Unconfirmed entries (seq > confirmed_seq) in sequence order, read back from the spool."""
        with self._lock:
            self._check_open()
            locs = list(self._pending)[:max_entries] if max_entries is not None else list(self._pending)
            return list(self._read_locs(locs))

    def pending_positions(self) -> list[tuple[int, int, int]]:
        """(volume_id, lba, block_count) of every unconfirmed entry, without reading payloads."""
        with self._lock:
            return [(loc.volume_id, loc.lba, loc.block_count) for loc in self._pending]

    def _read_locs(self, locs: list[EntryLoc]) -> Iterator[Entry]:
        fds: dict[Path, int] = {}
        try:
            for loc in locs:
                fd = fds.get(loc.segment.path)
                if fd is None:
                    fd = fds[loc.segment.path] = os.open(loc.segment.path, os.O_RDONLY)
                data = os.pread(fd, loc.length, loc.offset)
                try:
                    entry, _ = decode_entry(data)
                except FormatError as err:
                    raise FormatError(f"{loc.segment.path}: {err}; the spool was damaged after it "
                                      "was written") from None
                yield entry
        finally:
            for fd in fds.values():
                os.close(fd)

    _lazy_confirmed_from: int | None = None
    """While lazy confirmations are only in memory: the confirmed sequence confirmed.json holds."""

    def confirm(self, seq: int, *, lazy: bool = False) -> None:
        """Mark every entry <= seq confirmed and delete fully confirmed segments. A confirmation
        past recorded damage ends it: the caller has recorded those positions.

        Durably (the manifest, then confirmed.json), unless `lazy`: then the position is kept in
        memory and written only when a segment can be deleted, at an eager `confirm` (of any
        sequence, `confirmed_seq` included) or past damage. A lazy position lost in a crash is only
        an older one: the entries after it are kept and shipped again from what the Async site's
        journal says it applied, which skips them. A segment is deleted only once the position
        covering it is durable, so the spool never misses an entry past the position on disk."""
        with self._lock:
            self._check_open()
            if seq >= self._next_seq:
                raise TricopyError(f"cannot confirm entry {seq}: the last appended entry is "
                                   f"{self._next_seq - 1}")
            if seq <= self._confirmed:
                if not lazy and self._lazy_confirmed_from is not None:
                    self._save_confirmed(self._confirmed)
                    self._trim_confirmed_segments()
                return
            self._repair()
            self._high = max(self._high, seq)
            self._reserved = max(self._reserved, self._high)
            self._acked = max(self._acked, seq)
            damage = self.damage
            past_damage = damage is not None and seq >= damage.first_seq
            eager = not lazy or past_damage or self._frees_segment(seq)
            if eager:
                self._save_confirmed(seq)
            elif self._lazy_confirmed_from is None:
                self._lazy_confirmed_from = self._confirmed
            self._confirmed = seq
            while self._pending and self._pending[0].seq <= seq:
                self._pending.pop_oldest()
            if damage is not None and past_damage:
                self.damage = None if seq >= damage.last_seq else SpoolDamage(
                    self.spool_dir, seq + 1, damage.last_seq, damage.positions, damage.details)
                if self.damage is None:
                    log.warning("%s: damaged entries %d..%d confirmed: their positions are recorded elsewhere",
                                self.spool_dir, damage.first_seq, damage.last_seq)
            if eager:
                self._trim_confirmed_segments()

    def _frees_segment(self, seq: int) -> bool:
        """Confirming up to `seq` lets a segment go that a lazy confirmation should not keep: a full
        one (the newest, still being appended to, stays until it is full or an eager confirm)."""
        segs = self._segments
        return bool(segs) and segs[0].last_seq <= seq and (len(segs) > 1 or segs[0].size >= self.segment_bytes)

    def _save_confirmed(self, seq: int) -> None:
        """confirmed.json := seq, durably, after a manifest slot naming it (confirmed_seq never goes
        past what the manifest holds)."""
        self._write_manifest(sync=True)
        save_json_atomic(self.spool_dir / CONFIRMED_FILE, {"confirmed_seq": seq}, durable=self.durable)
        self._lazy_confirmed_from = None

    def release_damage(self) -> None:
        """The caller has durably recorded the positions of the damage and of every pending entry
        (the async group is Suspend): confirm them all, so the spool holds nothing damaged."""
        with self._lock:
            if self.damage is not None:
                if self._next_seq > MAX_SEQ:
                    raise TricopyError(f"entry log {self.spool_dir}: sequence numbers are used up; "
                                       "resynchronise the async pair and clear the spool")
                self.confirm(self._next_seq - 1)

    def _trim_confirmed_segments(self) -> None:
        doomed = 0
        while doomed < len(self._segments) and self._segments[doomed].last_seq <= self._confirmed:
            doomed += 1
        if not doomed:
            return
        if doomed == len(self._segments):  # the newest goes too: the manifest stops naming it first
            self._write_manifest(sync=True, newest=(0, 0))
        for seg in self._segments[:doomed]:
            close_fd(seg)
            seg.path.unlink(missing_ok=True)
        del self._segments[:doomed]

    # -- questions ----------------------------------------------------------------------------
    def has_unshipped(self, volume_id: int, ranges: Iterable[tuple[int, int]]) -> bool:
        """True when an unconfirmed entry of this volume touches any (first_lba, count) range."""
        with self._lock:
            return self._pending.has_unshipped(volume_id, ranges)

    def unshipped_blocks(self, volume_id: int) -> set[int]:
        with self._lock:
            return self._pending.unshipped_blocks(volume_id)

    def stats(self) -> LogStats:
        with self._lock:
            if not self._pending:
                return LogStats(0, 0, None, None, None)
            return LogStats(len(self._pending), self._pending.waiting_bytes, self._pending[0].timestamp_ns,
                            self._pending[0].seq, self._pending[-1].seq)

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self.flush()
            for seg in self._segments:
                close_fd(seg)
            if self._manifest_fd is not None:
                os.close(self._manifest_fd)
                self._manifest_fd = None
            self._closed = True

    def __enter__(self) -> EntryLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
