"""The entry log (spool) on the primary host (SPEC §4 [0044], §8 [0169]; DESIGN invariant 6).

Keeps true:
- `EntryLog` holds every appended entry until the secondary confirms it. An append is durable
  (fsync) before it returns when the log is durable. Past its capacity it refuses the append with
  `EntryLogFull` and writes nothing (invariant 6: the caller moves the pair to Suspending ->
  Suspend and records positions instead; it never drops or blocks).
- After a crash, reopening recovers every complete entry; only a torn tail of the last segment is
  dropped (with a warning), while damage followed by valid entries is refused. Sequence numbers
  stay gap-free across trims and reopens.
- It answers "does any unshipped entry touch these blocks?" from an in-memory index (the JFS trim
  rule, SPEC §8 [0169]).
- Segment files are named and read by `vstore.replication.segments`; this is their only writer.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from vstore.blocks.codec import fsync_dir, load_json, remove_stale_temps, save_json_atomic
from vstore.blocks.errors import FormatError, TricopyError
from vstore.replication.entries import (
    BLOCK_SIZE,
    ENTRY_MAGIC,
    MAX_SEQ,
    Entry,
    check_consecutive,
    decode_entry,
    encode_entry,
    saved_seq_ok,
)
from vstore.replication.segments import segment_files, segment_name

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


@dataclass(eq=False)
class _Segment:
    path: Path
    first_seq: int
    last_seq: int
    size: int
    fd: int | None = None


@dataclass(frozen=True)
class _Loc:
    """Where an unconfirmed entry lives, and what it touches (payload stays on disk)."""

    seq: int
    segment: _Segment
    offset: int
    length: int
    volume_id: int
    lba: int
    block_count: int
    timestamp_ns: int


@dataclass(frozen=True)
class _Touch:
    """A segment written by the current append, and how to undo that."""

    segment: _Segment
    size_before: int
    last_before: int
    new: bool


_CONFIRMED_FILE = "confirmed.json"


class EntryLog:
    """Durable, append-only spool of entries waiting for the secondary's confirmation."""

    def __init__(self, spool_dir: Path, *, durable: bool = True, capacity_bytes: int = 256 << 20,
                 segment_bytes: int = 4 << 20, block_size: int = BLOCK_SIZE) -> None:
        self.spool_dir = Path(spool_dir)
        self.durable = durable
        self.capacity_bytes = capacity_bytes
        self.segment_bytes = segment_bytes
        self.block_size = block_size
        self._lock = threading.RLock()
        self._segments: list[_Segment] = []
        self._pending: deque[_Loc] = deque()
        self._index: dict[int, dict[int, int]] = {}
        self._waiting_bytes = 0
        self._closed = False
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(self.spool_dir)
        self._confirmed = self._load_confirmed()
        self._next_seq = self._recover() + 1

    # -- properties ---------------------------------------------------------------------------
    @property
    def next_seq(self) -> int:
        return self._next_seq

    @property
    def confirmed_seq(self) -> int:
        return self._confirmed

    # -- recovery -----------------------------------------------------------------------------
    def _load_confirmed(self) -> int:
        path = self.spool_dir / _CONFIRMED_FILE
        try:
            value = load_json(path).get("confirmed_seq")
        except FileNotFoundError:
            return 0
        if not saved_seq_ok(value):
            raise FormatError(f"{path}: confirmed_seq is missing or not a sequence number (an integer "
                              f"0..{MAX_SEQ - 1}); restore it from a backup or clear the spool")
        return value

    def _recover(self) -> int:
        """Load every segment; return the highest sequence number ever used."""
        files = segment_files(self.spool_dir)
        last_seq = 0
        for i, (first_seq, path) in enumerate(files):
            is_last = i == len(files) - 1
            entries = self._load_segment(path, first_seq, is_last)
            if not entries:
                path.unlink()
                continue
            if last_seq and entries[0].seq != last_seq + 1:
                raise FormatError(f"{path}: starts at entry {entries[0].seq} but the previous segment "
                                  f"ended at {last_seq}; entries are missing from the spool")
            last_seq = entries[-1].seq
            self._adopt_segment(entries)
        self._check_no_gap_after_confirmed()
        self._trim_confirmed_segments()
        return max(last_seq, self._confirmed)

    def _load_segment(self, path: Path, first_seq: int, is_last: bool) -> list[_Loc]:
        data = path.read_bytes()
        seg = _Segment(path, first_seq, 0, 0)
        locs: list[_Loc] = []
        offset = 0
        while offset < len(data):
            try:
                entry, end = decode_entry(data, offset)
            except FormatError as err:
                self._handle_damage(path, data, offset, locs, is_last, err)
                break
            locs.append(_Loc(entry.seq, seg, offset, end - offset, entry.volume_id, entry.lba,
                             entry.block_count, entry.timestamp_ns))
            offset = end
        if locs and locs[0].seq != first_seq:
            raise FormatError(f"{path}: first entry is {locs[0].seq}, not {first_seq} as its name says")
        check_consecutive([loc.seq for loc in locs], str(path))
        seg.size = offset if not locs else locs[-1].offset + locs[-1].length
        seg.last_seq = locs[-1].seq if locs else 0
        return locs

    def _handle_damage(self, path: Path, data: bytes, offset: int, locs: list[_Loc],
                       is_last: bool, err: FormatError) -> None:
        """A bad entry: drop it if it is the torn tail of the last segment, else refuse."""
        last_good = locs[-1].seq if locs else 0
        if not is_last or _valid_entry_after(data, offset + 1, last_good):
            raise FormatError(
                f"{path}: damaged entry at offset {offset} ({err}) followed by valid entries; the spool "
                "is corrupt: resynchronise the async pair (full copy) and clear the spool"
            )
        log.warning("%s: dropping a torn tail of %d bytes at offset %d (%s); the write was never "
                    "acknowledged", path, len(data) - offset, offset, err)
        os.truncate(path, offset)
        if self.durable:
            _fsync_path(path)

    def _adopt_segment(self, locs: list[_Loc]) -> None:
        seg = locs[0].segment
        self._segments.append(seg)
        for loc in locs:
            if loc.seq > self._confirmed:
                self._add_pending(loc)

    def _check_no_gap_after_confirmed(self) -> None:
        if self._pending and self._pending[0].seq != self._confirmed + 1:
            raise FormatError(
                f"{self.spool_dir}: entries {self._confirmed + 1}..{self._pending[0].seq - 1} are missing "
                "from the spool; resynchronise the async pair (full copy) and clear the spool"
            )

    # -- in-memory index ----------------------------------------------------------------------
    def _add_pending(self, loc: _Loc) -> None:
        self._pending.append(loc)
        self._waiting_bytes += loc.length
        index = self._index.setdefault(loc.volume_id, {})
        for lba in range(loc.lba, loc.lba + loc.block_count):
            index[lba] = index.get(lba, 0) + 1

    def _pop_pending(self) -> _Loc:
        loc = self._pending.popleft()
        self._waiting_bytes -= loc.length
        index = self._index[loc.volume_id]
        for lba in range(loc.lba, loc.lba + loc.block_count):
            left = index[lba] - 1
            if left:
                index[lba] = left
            else:
                del index[lba]
        if not index:
            del self._index[loc.volume_id]
        return loc

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
        """Append one entry (durable before return when the log is durable)."""
        return self.append_many([(volume_id, lba, payload)], timestamp_ns=timestamp_ns)[0]

    def append_many(self, items: Sequence[tuple[int, int, bytes]], *,
                    timestamp_ns: int | None = None) -> list[Entry]:
        """Group commit: append all items with one fsync per touched segment; all or nothing."""
        with self._lock:
            self._check_open()
            entries = self._make_entries(items, timestamp_ns)
            encoded = [encode_entry(e) for e in entries]
            need = sum(len(b) for b in encoded)
            if self._waiting_bytes + need > self.capacity_bytes:
                raise EntryLogFull(
                    f"entry log {self.spool_dir} is full ({self._waiting_bytes} of {self.capacity_bytes} "
                    f"bytes waiting, {need} more needed); suspend the async pair and record positions"
                )
            if not entries:
                return []
            self._write_entries(entries, encoded)
            self._next_seq = entries[-1].seq + 1
            return entries

    def _write_entries(self, entries: list[Entry], encoded: list[bytes]) -> None:
        """Write and sync; on an OS error undo everything written and re-raise."""
        touched: list[_Touch] = []
        new_locs: list[_Loc] = []
        try:
            for entry, data in zip(entries, encoded, strict=True):
                seg = self._segment_for(entry.seq, touched)
                _write_all(seg.fd, data)  # type: ignore[arg-type]
                new_locs.append(_Loc(entry.seq, seg, seg.size, len(data), entry.volume_id, entry.lba,
                                     entry.block_count, entry.timestamp_ns))
                seg.size += len(data)
                seg.last_seq = entry.seq
            self._sync(touched)
        except BaseException:
            self._undo(touched)
            raise
        for t in touched:
            if t.segment is not self._segments[-1]:
                _close_fd(t.segment)
        for loc in new_locs:
            self._add_pending(loc)

    def _segment_for(self, seq: int, touched: list[_Touch]) -> _Segment:
        """The segment the entry `seq` goes to: the active one, or a new one past segment_bytes."""
        active = self._segments[-1] if self._segments else None
        if active is None or active.size >= self.segment_bytes:
            path = self.spool_dir / segment_name(seq)
            active = _Segment(path, seq, seq - 1, 0)
            active.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o644)
            self._segments.append(active)
            touched.append(_Touch(active, 0, seq - 1, new=True))
        elif not touched or touched[-1].segment is not active:
            if active.fd is None:
                active.fd = os.open(active.path, os.O_WRONLY | os.O_APPEND)
            touched.append(_Touch(active, active.size, active.last_seq, new=False))
        return active

    def _sync(self, touched: list[_Touch]) -> None:
        if not self.durable:
            return
        for t in touched:
            os.fsync(t.segment.fd)  # type: ignore[arg-type]
        if any(t.new for t in touched):
            fsync_dir(self.spool_dir)

    def _undo(self, touched: list[_Touch]) -> None:
        for t in reversed(touched):
            seg = t.segment
            if t.new:
                if seg in self._segments:
                    self._segments.remove(seg)
                _close_fd(seg)
                seg.path.unlink(missing_ok=True)
            elif seg.fd is not None:
                os.ftruncate(seg.fd, t.size_before)
                seg.size, seg.last_seq = t.size_before, t.last_before

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

    def _read_locs(self, locs: list[_Loc]) -> Iterator[Entry]:
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

    def confirm(self, seq: int) -> None:
        """Mark every entry <= seq confirmed (durably) and delete fully confirmed segments."""
        with self._lock:
            self._check_open()
            if seq >= self._next_seq:
                raise TricopyError(f"cannot confirm entry {seq}: the last appended entry is "
                                   f"{self._next_seq - 1}")
            if seq <= self._confirmed:
                return
            save_json_atomic(self.spool_dir / _CONFIRMED_FILE, {"confirmed_seq": seq}, durable=self.durable)
            self._confirmed = seq
            while self._pending and self._pending[0].seq <= seq:
                self._pop_pending()
            self._trim_confirmed_segments()

    def _trim_confirmed_segments(self) -> None:
        while self._segments and self._segments[0].last_seq <= self._confirmed:
            seg = self._segments.pop(0)
            _close_fd(seg)
            seg.path.unlink(missing_ok=True)

    # -- questions ----------------------------------------------------------------------------
    def has_unshipped(self, volume_id: int, ranges: Iterable[tuple[int, int]]) -> bool:
        """True when an unconfirmed entry of this volume touches any (first_lba, count) range."""
        with self._lock:
            index = self._index.get(volume_id)
            if not index:
                return False
            for first, count in ranges:
                if count > len(index):
                    if any(first <= lba < first + count for lba in index):
                        return True
                elif any(lba in index for lba in range(first, first + count)):
                    return True
            return False

    def unshipped_blocks(self, volume_id: int) -> set[int]:
        with self._lock:
            return set(self._index.get(volume_id, ()))

    def stats(self) -> LogStats:
        with self._lock:
            if not self._pending:
                return LogStats(0, 0, None, None, None)
            return LogStats(len(self._pending), self._waiting_bytes, self._pending[0].timestamp_ns,
                            self._pending[0].seq, self._pending[-1].seq)

    def close(self) -> None:
        with self._lock:
            for seg in self._segments:
                _close_fd(seg)
            self._closed = True

    def __enter__(self) -> EntryLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _valid_entry_after(data: bytes, start: int, last_good: int) -> bool:
    """Is there a decodable entry with a later sequence number anywhere after `start`?"""
    pos = data.find(ENTRY_MAGIC, start)
    while pos != -1:
        try:
            entry, _ = decode_entry(data, pos)
        except FormatError:
            pass
        else:
            if entry.seq > last_good:
                return True
        pos = data.find(ENTRY_MAGIC, pos + 1)
    return False


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _close_fd(seg: _Segment) -> None:
    if seg.fd is not None:
        os.close(seg.fd)
        seg.fd = None
