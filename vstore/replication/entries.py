"""Ordered log entries for asynchronous copy, the entry log (spool) and the receive journal.

SPEC §4 [0044]-[0045], DESIGN "Entries" row and invariants 2 and 6.

Keeps true:
- One construct declaration of an entry: magic, version, gap-free sequence number (per
  consistency group, the first is 1), timestamp, volume id, LBA, block count, block size, payload
  and a CRC32 over all of it. A batch (what travels to the Async site) has its own header: magic,
  version, first/last sequence it covers, count, a "coalesced" flag and a CRC over everything.
  A plain batch holds exactly the consecutive entries first..last; a coalesced one a strictly
  increasing subset of them ending at last (entries overwritten later in the same batch dropped).
  Bad bytes always give `FormatError` and never change any state.
- `EntryLog` (the primary's spool) holds every appended entry until the secondary confirms it.
  An append is durable (fsync) before it returns when the log is durable. Past its capacity it
  refuses the append with `EntryLogFull` and writes nothing (invariant 6: the caller moves the
  pair to Suspending -> Suspend and records positions instead; it never drops or blocks).
  After a crash, reopening recovers every complete entry; only a torn tail of the last segment is
  dropped (with a warning), while damage followed by valid entries is refused. Sequence numbers
  stay gap-free across trims and reopens. It answers "does any unshipped entry touch these
  blocks?" from an in-memory index (the JFS trim rule, SPEC §8 [0169]).
- `ReceiveJournal` (the Async site) stores a received batch durably before it is applied and
  remembers the last applied sequence, so that after a crash the stored batch is finished (applied
  again, which is idempotent) before the volume is used (invariant 2).

Choices where the patent says "may": coalescing of repeated writes [0045] is left to the shipper,
inside one batch that the Async site applies atomically through `ReceiveJournal`.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from construct import (
    Bytes,
    Checksum,
    Const,
    Flag,
    GreedyBytes,
    Int16ub,
    Int32ub,
    Int64ub,
    Prefixed,
    RawCopy,
    Struct,
    Terminated,
    this,
)

from vstore.blocks.codec import (
    check_version,
    crc32,
    fsync_dir,
    load_json,
    parse_checked,
    remove_stale_temps,
    save_json_atomic,
    write_file_atomic,
)
from vstore.blocks.errors import FormatError, TricopyError

log = logging.getLogger(__name__)

BLOCK_SIZE = 4096

# --------------------------------------------------------------------------------------------
# On-disk / on-wire formats (declared once)
# --------------------------------------------------------------------------------------------
ENTRY_MAGIC = b"TCEN"
ENTRY_VERSION = 1
BATCH_MAGIC = b"TCBA"
BATCH_VERSION = 1

_ENTRY_HEADER = Struct(
    "magic" / Const(ENTRY_MAGIC),
    "version" / Int16ub,
    "seq" / Int64ub,
    "timestamp_ns" / Int64ub,
    "volume_id" / Int32ub,
    "lba" / Int64ub,
    "block_count" / Int32ub,
    "block_size" / Int32ub,
)
ENTRY_HEADER_SIZE = _ENTRY_HEADER.sizeof()
_ENTRY_HEADER_FAST = _ENTRY_HEADER.compile()
_CRC_FIELD = Int32ub
_CRC_SIZE = 4

_ENTRY = Struct(
    "body" / RawCopy(Struct(
        "header" / _ENTRY_HEADER,
        "payload" / Bytes(this.header.block_count * this.header.block_size),
    )),
    "crc" / Checksum(Int32ub, crc32, this.body.data),
)

_BATCH = Struct(
    "body" / RawCopy(Struct(
        "magic" / Const(BATCH_MAGIC),
        "version" / Int16ub,
        "first_seq" / Int64ub,
        "last_seq" / Int64ub,
        "count" / Int32ub,
        "coalesced" / Flag,
        "entries" / Prefixed(Int64ub, GreedyBytes),
    )),
    "crc" / Checksum(Int32ub, crc32, this.body.data),
    Terminated,
)


@dataclass(frozen=True)
class Entry:
    """One write, in the time order of its consistency group."""

    seq: int
    timestamp_ns: int
    volume_id: int
    lba: int
    block_count: int
    payload: bytes

    @property
    def block_size(self) -> int:
        return len(self.payload) // self.block_count

    def blocks(self) -> range:
        return range(self.lba, self.lba + self.block_count)


def entry_size(block_count: int, block_size: int) -> int:
    """Encoded size in bytes of an entry with this many blocks."""
    return ENTRY_HEADER_SIZE + block_count * block_size + _CRC_SIZE


def encode_entry(e: Entry) -> bytes:
    """The on-disk/on-wire bytes of one entry."""
    if e.block_count <= 0 or not e.payload or len(e.payload) % e.block_count:
        raise ValueError(
            f"entry {e.seq}: payload of {len(e.payload)} bytes is not {e.block_count} whole blocks"
        )
    header = dict(magic=ENTRY_MAGIC, version=ENTRY_VERSION, seq=e.seq, timestamp_ns=e.timestamp_ns,
                  volume_id=e.volume_id, lba=e.lba, block_count=e.block_count, block_size=e.block_size)
    try:
        # The hot path: the same declaration (_ENTRY = header, payload, CRC32 over both), built
        # with the compiled header; tests check it equals _ENTRY.build byte for byte.
        body = _ENTRY_HEADER_FAST.build(header) + bytes(e.payload)
    except Exception as err:  # construct integer range errors: a caller bug
        raise ValueError(f"entry {e.seq} cannot be encoded: {err}") from None
    return body + _CRC_FIELD.build(crc32(body))


def encode_entry_reference(e: Entry) -> bytes:
    """`encode_entry` through the full `_ENTRY` declaration (slow; the tests' reference)."""
    header = dict(magic=ENTRY_MAGIC, version=ENTRY_VERSION, seq=e.seq, timestamp_ns=e.timestamp_ns,
                  volume_id=e.volume_id, lba=e.lba, block_count=e.block_count, block_size=e.block_size)
    return _ENTRY.build(dict(body=dict(value=dict(header=header, payload=bytes(e.payload)))))


def decode_entry(buf: bytes | memoryview, offset: int = 0) -> tuple[Entry, int]:
    """Decode the entry at `offset`; return it and the offset just after it. FormatError if bad."""
    view = memoryview(buf)
    where = f"entry at offset {offset}"
    if len(view) - offset < ENTRY_HEADER_SIZE:
        raise FormatError(f"{where}: truncated ({len(view) - offset} bytes, a header needs {ENTRY_HEADER_SIZE})")
    hdr = parse_entry_header(view[offset:offset + ENTRY_HEADER_SIZE], where)
    end = offset + entry_size(hdr.block_count, hdr.block_size)
    if end > len(view):
        raise FormatError(f"{where}: truncated (needs {end - offset} bytes, {len(view) - offset} present)")
    # The hot path of the same declaration (_ENTRY: header, payload, CRC32 over both): the header
    # was parsed above; the CRC is checked over the body without building a parse tree, and tests
    # check that this agrees with parsing through _ENTRY for good and damaged bytes alike.
    crc_at = end - _CRC_SIZE
    if crc32(view[offset:crc_at]) != int.from_bytes(view[crc_at:end], "big"):
        raise FormatError(f"{where}: checksum mismatch (the entry is damaged)")
    entry = Entry(seq=hdr.seq, timestamp_ns=hdr.timestamp_ns, volume_id=hdr.volume_id, lba=hdr.lba,
                  block_count=hdr.block_count, payload=bytes(view[offset + ENTRY_HEADER_SIZE:crc_at]))
    return entry, end


def decode_entry_reference(buf: bytes) -> Entry:
    """`decode_entry` through the full `_ENTRY` declaration (slow; the tests' reference)."""
    parsed = parse_checked(_ENTRY, buf, "entry")
    h = parsed.body.value.header
    check_version(h.version, ENTRY_VERSION, "entry")
    return Entry(seq=h.seq, timestamp_ns=h.timestamp_ns, volume_id=h.volume_id, lba=h.lba,
                 block_count=h.block_count, payload=parsed.body.value.payload)


def parse_entry_header(raw: bytes | memoryview, where: str) -> Any:
    """The header of an entry (to find its length without reading its payload)."""
    hdr = parse_checked(_ENTRY_HEADER_FAST, raw[:ENTRY_HEADER_SIZE], where)
    check_version(hdr.version, ENTRY_VERSION, where)
    if hdr.block_count == 0 or hdr.block_size == 0:
        raise FormatError(f"{where}: block count and block size must be positive (header damaged)")
    return hdr


def _check_consecutive(seqs: Sequence[int], what: str) -> None:
    for prev, cur in zip(seqs, seqs[1:], strict=False):
        if cur != prev + 1:
            raise FormatError(f"{what}: gap or duplicate in sequence numbers ({prev} then {cur})")


@dataclass(frozen=True)
class Batch:
    """A decoded batch: the sequence range it covers and the entries it carries."""

    first_seq: int
    last_seq: int
    entries: list[Entry]
    coalesced: bool = False


def _check_batch(entries: Sequence[Entry], first: int, last: int, coalesced: bool, what: str) -> None:
    seqs = [e.seq for e in entries]
    if not coalesced:
        _check_consecutive(seqs, what)
        if seqs and (seqs[0], seqs[-1]) != (first, last) or not seqs and (first, last) != (0, 0):
            raise FormatError(f"{what}: covers {first}..{last} but holds entries {seqs[:1]}..{seqs[-1:]}")
        return
    if not seqs or seqs[0] < first or seqs[-1] != last or first < 1:
        raise FormatError(f"{what}: coalesced entries {seqs[:1]}..{seqs[-1:]} do not end the range {first}..{last}")
    for prev, cur in zip(seqs, seqs[1:], strict=False):
        if cur <= prev:
            raise FormatError(f"{what}: entries out of order or duplicated ({prev} then {cur})")


def encode_batch(entries: Sequence[Entry], *, first_seq: int | None = None, last_seq: int | None = None) -> bytes:
    """One batch. Without first_seq/last_seq the entries must be consecutive (an empty batch covers
    0..0). With them, the batch covers first_seq..last_seq and may be coalesced: a strictly
    increasing subset of that range that ends at last_seq."""
    plain_first, plain_last = (entries[0].seq, entries[-1].seq) if entries else (0, 0)
    first = plain_first if first_seq is None else first_seq
    last = plain_last if last_seq is None else last_seq
    explicit = first_seq is not None or last_seq is not None
    coalesced = explicit and len(entries) != (last - first + 1 if entries else 0)
    _check_batch(entries, first, last, coalesced, "batch")
    return encode_batch_raw([encode_entry(e) for e in entries], first, last, coalesced=coalesced)


def encode_batch_raw(encoded_entries: Sequence[bytes], first_seq: int, last_seq: int, *, coalesced: bool) -> bytes:
    """A batch of entries that are already encoded (read from the spool: their own CRCs were
    checked there) covering first_seq..last_seq; `encode_batch` checks the sequences."""
    body = dict(magic=BATCH_MAGIC, version=BATCH_VERSION, first_seq=first_seq, last_seq=last_seq,
                count=len(encoded_entries), coalesced=coalesced, entries=b"".join(encoded_entries))
    return _BATCH.build(dict(body=dict(value=body)))


def decode_batch_full(buf: bytes) -> Batch:
    """Decode a batch with its range; FormatError on any damage, a wrong count or bad sequences."""
    parsed = parse_checked(_BATCH, buf, "batch")
    b = parsed.body.value
    check_version(b.version, BATCH_VERSION, "batch")
    entries: list[Entry] = []
    offset = 0
    while offset < len(b.entries):
        entry, offset = decode_entry(b.entries, offset)
        entries.append(entry)
    if len(entries) != b.count:
        raise FormatError(f"batch: header says {b.count} entries, body holds {len(entries)}")
    _check_batch(entries, b.first_seq, b.last_seq, b.coalesced, "batch")
    return Batch(b.first_seq, b.last_seq, entries, b.coalesced)


def decode_batch(buf: bytes) -> list[Entry]:
    """The entries of a batch, checked as `decode_batch_full` does."""
    return decode_batch_full(buf).entries


# --------------------------------------------------------------------------------------------
# The entry log (spool) on the primary host
# --------------------------------------------------------------------------------------------
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


_SEGMENT_RE = re.compile(r"^seg-(\d{20})\.log$")
_CONFIRMED_FILE = "confirmed.json"


def segment_files(spool_dir: Path) -> list[tuple[int, Path]]:
    """(first sequence number, path) of every segment file of a spool, in order."""
    found = []
    for path in spool_dir.iterdir():
        m = _SEGMENT_RE.match(path.name)
        if m:
            found.append((int(m.group(1)), path))
    return sorted(found)


def segment_name(first_seq: int) -> str:
    return f"seg-{first_seq:020d}.log"


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
        if not isinstance(value, int) or value < 0:
            raise FormatError(f"{path}: confirmed_seq is missing or not a non-negative integer")
        return value

    def _segment_files(self) -> list[tuple[int, Path]]:
        return segment_files(self.spool_dir)

    def _recover(self) -> int:
        """Load every segment; return the highest sequence number ever used."""
        files = self._segment_files()
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
        _check_consecutive([loc.seq for loc in locs], str(path))
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

    def discard_pending(self) -> list[Entry]:
        """Confirm everything waiting; return the discarded entries (their positions go to a bitmap)."""
        with self._lock:
            entries = self.pending()
            if entries:
                self.confirm(entries[-1].seq)
            return entries

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


# --------------------------------------------------------------------------------------------
# The receive journal at the Async site
# --------------------------------------------------------------------------------------------
_BATCH_FILE = "batch.bin"
_APPLIED_FILE = "applied.json"


class ReceiveJournal:
    """Receive a batch durably, then apply it, then confirm (DESIGN invariant 2).

    The stored batch survives a crash; until `mark_applied` it is returned by `stored()` and must
    be applied (again: applying a batch twice leaves the same blocks) before the volume is used.
    """

    def __init__(self, recv_dir: Path, *, durable: bool = True) -> None:
        self.recv_dir = Path(recv_dir)
        self.durable = durable
        self._lock = threading.RLock()
        self.recv_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(self.recv_dir)
        self._applied = self._load_applied()
        self._drop_batch_if_applied()

    @property
    def applied_seq(self) -> int:
        return self._applied

    @property
    def _batch_path(self) -> Path:
        return self.recv_dir / _BATCH_FILE

    def _load_applied(self) -> int:
        path = self.recv_dir / _APPLIED_FILE
        try:
            value = load_json(path).get("applied_seq")
        except FileNotFoundError:
            return 0
        if not isinstance(value, int) or value < 0:
            raise FormatError(f"{path}: applied_seq is missing or not a non-negative integer")
        return value

    def _drop_batch_if_applied(self) -> None:
        """A crash inside mark_applied (after saving applied_seq) leaves an applied batch.bin.
        A damaged batch stays where it is: `stored()` reports it, `set_applied_seq` clears it."""
        try:
            batch = self.stored_batch()
        except FormatError as err:
            log.warning("%s", err)
            return
        if batch is not None and batch.last_seq <= self._applied:
            self._batch_path.unlink()

    def _save_applied(self, seq: int) -> None:
        save_json_atomic(self.recv_dir / _APPLIED_FILE, {"applied_seq": seq}, durable=self.durable)
        self._applied = seq

    def store(self, entries: Sequence[Entry], *, first_seq: int | None = None,
              last_seq: int | None = None) -> None:
        """Durably store the next batch; it must start right after applied_seq. A coalesced batch
        names the range it covers with first_seq/last_seq (see `encode_batch`)."""
        with self._lock:
            if not entries:
                raise TricopyError("refusing to store an empty batch")
            first = entries[0].seq if first_seq is None else first_seq
            self._check_next(first)
            data = encode_batch(entries, first_seq=first_seq, last_seq=last_seq)
            write_file_atomic(self._batch_path, data, durable=self.durable)

    def _check_next(self, first: int) -> None:
        if self._batch_path.exists():
            raise TricopyError(f"{self._batch_path}: a received batch is not applied yet; apply it "
                               "and mark it applied before storing the next one")
        if first != self._applied + 1:
            raise FormatError(f"batch starts at entry {first} but entry {self._applied} was the "
                              f"last applied: gap or duplicate; resend from entry {self._applied + 1}")

    def store_encoded(self, batch: Batch, data: bytes) -> None:
        """`store` for a batch received as bytes: `batch` is `decode_batch_full(data)` (so the
        bytes were checked); they are stored as they came, not encoded again."""
        with self._lock:
            if not batch.entries:
                raise TricopyError("refusing to store an empty batch")
            self._check_next(batch.first_seq)
            write_file_atomic(self._batch_path, data, durable=self.durable)

    def stored_batch(self) -> Batch | None:
        """The stored batch not yet applied, with its range, or None."""
        with self._lock:
            try:
                data = self._batch_path.read_bytes()
            except FileNotFoundError:
                return None
            try:
                return decode_batch_full(data)
            except FormatError as err:
                raise FormatError(f"{self._batch_path}: {err}") from None

    def stored(self) -> list[Entry] | None:
        """The entries of the stored batch not yet applied, or None."""
        batch = self.stored_batch()
        return None if batch is None else batch.entries

    def mark_applied(self, last_seq: int | None = None) -> None:
        """Record the stored batch as applied, then delete it. `last_seq`: the stored batch's last
        entry when the caller has it at hand (it just stored the batch), saving a re-read."""
        with self._lock:
            if last_seq is None:
                batch = self.stored_batch()
                if batch is None:
                    raise TricopyError(f"{self.recv_dir}: no stored batch to mark applied")
                last_seq = batch.last_seq
            elif not self._batch_path.exists():
                raise TricopyError(f"{self.recv_dir}: no stored batch to mark applied")
            self._save_applied(last_seq)
            self._batch_path.unlink()
            if self.durable:
                fsync_dir(self.recv_dir)

    def set_applied_seq(self, seq: int) -> None:
        """After a full/differential resync: D now reflects everything up to `seq`; any stored
        batch is obsolete and is deleted."""
        with self._lock:
            if seq < 0:
                raise ValueError(f"applied sequence must be >= 0, got {seq}")
            self._save_applied(seq)
            self._batch_path.unlink(missing_ok=True)
            if self.durable:
                fsync_dir(self.recv_dir)
