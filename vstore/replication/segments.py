"""The spool's files read-only: segment names and listing, the manifest, what a segment holds entry
by entry (damage included), `SpoolDamage`, and the reader that follows the appending `EntryLog`
(SPEC §4 [0044]; DESIGN invariant 2).

Keeps true:
- A segment is named by the sequence number of its first entry (`seg-<20 digits>.log`); the
  segments of a spool, in name order, hold consecutive entries. The manifest (`manifest.bin`,
  `vstore.replication.entries.SPOOL_MANIFEST`) beside them says what was acknowledged and used.
- `scan_segment` reads every byte of a segment into valid entries (each checked against its CRC)
  and bad regions; it resynchronises on the next valid entry after damage and never trusts a
  damaged entry's header for more than a claim.
- `SpoolDamage` names what is lost: a range of sequence numbers and the block positions the
  entries touched, or `positions=None`: every volume needs a full differential check.
- `SpoolReader` never writes: it reads entries after+1..upto in order, each checked against its
  CRC (a damaged spool is never shipped), finds an entry past bytes it cannot read, and says so
  when an entry it was asked for is in no segment. Intact entries are read many at a time, one
  `pread` into one buffer, and handed out as views of it (never copied again).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from vstore.blocks.codec import load_json
from vstore.blocks.errors import FormatError
from vstore.blocks.ranges import merge_ranges
from vstore.blocks.schema import Count, validate
from vstore.replication.entries import (
    ENTRY_HEADER_SIZE,
    ENTRY_MAGIC,
    MAX_SEQ,
    Entry,
    Manifest,
    decode_entry,
    decode_manifest,
    entry_size,
    parse_entry_header,
    saved_seq_ok,
)

READ_BYTES = 16 << 20  # what one read returns at most (about)
MANIFEST_FILE = "manifest.bin"
CONFIRMED_FILE = "confirmed.json"
SEQ_RESERVE = 4096  # sequence numbers reserved (durably) ahead of use, so none is used twice after a loss

_SEGMENT_RE = re.compile(r"^seg-(\d{20})\.log$")

Position = tuple[int, int, int]  # (volume id, first lba, block count)
Claim = tuple[int, int, int, int, int]  # what a header says: seq, volume id, lba, block count, block size


def segment_files(spool_dir: Path) -> list[tuple[int, Path]]:
    """(first sequence number, path) of every segment file of a spool, in order (none if no spool)."""
    if not spool_dir.is_dir():
        return []
    found = []
    for path in spool_dir.iterdir():
        m = _SEGMENT_RE.match(path.name)
        if m:
            found.append((int(m.group(1)), path))
    return sorted(found)


def segment_name(first_seq: int) -> str:
    return f"seg-{first_seq:020d}.log"


class SpoolDamage(FormatError):
    """Entries the spool held are damaged or missing: `first_seq..last_seq`, touching `positions`
    (None: unknown, every volume of the group needs a full differential check)."""

    def __init__(self, spool_dir: Path, first_seq: int, last_seq: int, positions: list[Position] | None,
                 details: list[str]) -> None:
        self.spool_dir = spool_dir
        self.first_seq, self.last_seq = first_seq, last_seq
        self.positions = positions
        self.details = details
        where = "; ".join(details[:4]) + (f"; and {len(details) - 4} more" if len(details) > 4 else "")
        what = ("all volumes need a full differential check: the positions are unknown" if positions is None
                else f"they touch {len(positions)} block range(s), which must be copied again")
        super().__init__(f"spool {spool_dir}: entries {first_seq}..{last_seq} are damaged or missing ({where}); "
                         f"{what}; suspend the async group, record them and resynchronise it")

    def to_dict(self) -> dict[str, Any]:
        """What `vstore status --json` shows of it."""
        return {"first_seq": self.first_seq, "last_seq": self.last_seq, "all_volumes": self.positions is None,
                "positions": None if self.positions is None else [list(p) for p in self.positions[:64]],
                "details": self.details[:16], "message": str(self)}


@dataclass(slots=True)
class Found:
    """A valid entry of a segment (its payload stays on disk; never changed once made)."""

    seq: int
    offset: int
    length: int
    volume_id: int
    lba: int
    block_count: int
    timestamp_ns: int


@dataclass(frozen=True)
class Bad:
    """Bytes of a segment that are no valid entry: `offset..end` (end: the next valid entry or EOF).
    `claim` is what the header there says (seq, volume id, lba, block count, block size) when it
    parses; `claims` the headers found by following their lengths from there, `chained` when they
    end exactly at `end`; `short` when the region runs to EOF with fewer bytes than an entry (what
    a torn write leaves, never a full-length entry that fails its CRC)."""

    offset: int
    end: int
    error: str
    claim: Claim | None
    short: bool
    claims: tuple[Claim, ...] = ()
    chained: bool = False


def _claim(data: bytes, offset: int) -> tuple[tuple[int, int, int, int, int] | None, int | None]:
    """The header at `offset` if it parses, and the offset its entry would end at."""
    if len(data) - offset < ENTRY_HEADER_SIZE:
        return None, None
    try:
        h = parse_entry_header(data[offset:offset + ENTRY_HEADER_SIZE], "entry")
    except FormatError:
        return None, None
    return (h.seq, h.volume_id, h.lba, h.block_count, h.block_size), offset + entry_size(h.block_count, h.block_size)


def _next_valid(data: bytes, start: int) -> int | None:
    """The offset of the first decodable entry at or after `start`."""
    pos = data.find(ENTRY_MAGIC, start)
    while pos != -1:
        try:
            decode_entry(data, pos)
        except FormatError:
            pos = data.find(ENTRY_MAGIC, pos + 1)
        else:
            return pos
    return None


def scan_segment(data: bytes) -> list[Found | Bad]:
    """Every byte of a segment, in order, as valid entries and bad regions."""
    items: list[Found | Bad] = []
    offset = 0
    while offset < len(data):
        try:
            entry, end = decode_entry(data, offset)
        except FormatError as err:
            resume = _next_valid(data, offset + 1)
            stop = len(data) if resume is None else resume
            claim, claimed_end = _claim(data, offset)
            short = resume is None and (len(data) - offset < ENTRY_HEADER_SIZE
                                        or (claimed_end is not None and claimed_end > len(data)))
            claims, pos = [], offset
            while pos < stop:
                more, more_end = _claim(data, pos)
                if more is None or more_end is None or more_end > stop:
                    break
                claims.append(more)
                pos = more_end
            items.append(Bad(offset, stop, str(err), claim, short, tuple(claims), pos == stop))
            offset = stop
            continue
        items.append(Found(entry.seq, offset, end - offset, entry.volume_id, entry.lba, entry.block_count,
                           entry.timestamp_ns))
        offset = end
    return items


class ConfirmedDoc(msgspec.Struct, forbid_unknown_fields=True):
    """`spool/confirmed.json`: the last sequence number the Async site confirmed."""

    confirmed_seq: Count


def read_confirmed(spool_dir: Path) -> int:
    """The last sequence number the Async site confirmed (0 when none is saved)."""
    path = spool_dir / CONFIRMED_FILE
    try:
        value = validate(ConfirmedDoc, load_json(path), str(path)).confirmed_seq
    except FileNotFoundError:
        return 0
    if not saved_seq_ok(value):
        raise FormatError(f"{path}: confirmed_seq is missing or not a sequence number (an integer "
                          f"0..{MAX_SEQ - 1}); restore it from a backup or clear the spool")
    return value


def read_manifest(spool_dir: Path) -> tuple[Manifest | None, bool]:
    """The manifest's newest valid slot, and whether the file exists at all."""
    path = spool_dir / MANIFEST_FILE
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None, False
    return decode_manifest(raw, str(path)), True


@dataclass
class SegmentContents:
    first_seq: int
    path: Path
    size: int
    items: list[Found | Bad]
    covered: int = 0  # the highest sequence number this segment may hold


@dataclass
class SpoolContents:
    """What recovery found: the entries to keep pending, a torn tail to cut, or the damage."""

    segments: list[SegmentContents]
    pending: list[tuple[int, Found]]  # (segment index, entry): confirmed+1..last_good, in order
    last_good: int
    torn: tuple[int, Bad] | None
    cuts: list[tuple[int, int]]  # (segment index, offset): the torn tail, and harmless bytes it leaves last
    damage: SpoolDamage | None
    acked: int  # the manifest's watermark
    high: int  # every sequence number up to here may have been used
    reserved: int  # and up to here has been reserved durably
    generation: int  # of the manifest's newest slot (0: none)


class _Losses:
    """The sequence numbers found lost during a walk over the segments, and what they touched."""

    def __init__(self, confirmed: int) -> None:
        self.confirmed = confirmed
        self.firsts: list[int] = []
        self.last = 0
        self.details: list[str] = []
        self.known: dict[int, Position] = {}
        self.unknown = False
        self.harmless: set[tuple[int, int]] = set()  # (segment index, offset) of bad regions losing nothing

    def lost(self, first: int, last: int, why: str, claims: dict[int, Position] | None = None) -> bool:
        """Entries first..last are lost (False: none, or only confirmed ones); `claims`: what damaged
        headers say some of them touched."""
        first = max(first, self.confirmed + 1)
        if first > last:
            return False  # only entries the Async site already confirmed: nothing is lost
        self.firsts.append(first)
        self.last = max(self.last, last)
        self.details.append(why)
        claims = {s: pos for s, pos in (claims or {}).items() if first <= s <= last}
        for s, pos in claims.items():
            self.known.setdefault(s, pos)
        if len(claims) != last - first + 1:
            self.unknown = True
        return True

    def damage(self, spool_dir: Path, last: int) -> SpoolDamage | None:
        if not self.firsts:
            return None
        first = min(self.firsts)
        last = max(last, self.last, first)
        inside = sorted(s for s in self.known if first <= s <= last)
        positions = None
        if not self.unknown and len(inside) == last - first + 1:
            by_volume: dict[int, list[tuple[int, int]]] = {}
            for s in inside:
                vid, lba, count = self.known[s]
                by_volume.setdefault(vid, []).append((lba, count))
            positions = [(vid, lba, n) for vid in sorted(by_volume) for lba, n in merge_ranges(by_volume[vid])]
        return SpoolDamage(spool_dir, first, last, positions, self.details)


def analyse_spool(spool_dir: Path, confirmed: int, block_size: int, known_seq: int = 0) -> SpoolContents:
    """Read every segment and the manifest (writing nothing) and tell a torn tail (bytes of the last append,
    after the acknowledged watermark, shorter than an entry) from lost entries (to `known_seq`: ones seen used)."""
    manifest, manifest_present = read_manifest(spool_dir)
    segs = []
    for first, path in segment_files(spool_dir):
        data = path.read_bytes()
        segs.append(SegmentContents(first, path, len(data), scan_segment(data)))
    found = [(si, it) for si, seg in enumerate(segs) for it in seg.items if isinstance(it, Found)]
    max_found = max((it.seq for _, it in found), default=0)
    if (manifest is not None or max_found) and confirmed > max(manifest.high_seq if manifest else 0, max_found):
        raise FormatError(f"{spool_dir / CONFIRMED_FILE}: confirmed_seq {confirmed} is beyond the last entry the "
                          f"spool ever held ({max(manifest.high_seq if manifest else 0, max_found)}); the file is "
                          "damaged: restore it from a backup, or resynchronise the async pair and clear the spool")
    acked = manifest.acked_seq if manifest else 0
    losses = _Losses(confirmed)
    if manifest_present and manifest is None:
        losses.lost(confirmed + 1, max(confirmed + 1, max_found), f"{spool_dir / MANIFEST_FILE} is damaged")
    complete = (manifest.active_first, manifest.active_end) if manifest else None
    high = manifest.high_seq if manifest else 0
    cursor, torn = _walk(segs, confirmed, (acked, high), block_size, losses, complete)
    if acked >= cursor:
        losses.lost(cursor, acked, f"entries {cursor}..{acked} were acknowledged but are in no segment")
    if manifest is not None and (af := manifest.active_first) and af not in {s.first_seq for s in segs}:
        losses.lost(min(af, cursor), max(af, manifest.high_seq), f"the newest segment {segment_name(af)} is missing")
    held = max(manifest.high_seq if manifest else 0, max_found, confirmed)
    if known_seq > held:  # the manifest, the newest segments or the whole spool are gone
        losses.lost(held + 1, known_seq, f"the site's state saw entries up to {known_seq}; the spool holds {held}")
    damage = losses.damage(spool_dir, max(max_found, acked))
    cuts = _cuts(segs, torn, losses.harmless)
    last_good = max(confirmed, damage.first_seq - 1 if damage else cursor - 1)
    pending, seen = [], set()
    for si, it in found:
        if confirmed < it.seq <= last_good and it.seq not in seen:
            seen.add(it.seq)
            pending.append((si, it))
    high = max(manifest.high_seq if manifest else 0, max_found, confirmed, damage.last_seq if damage else 0)
    reserved = max(manifest.reserved_seq if manifest else 0, high)
    if manifest_present and manifest is None or known_seq > held:  # what the lost manifest reserved
        reserved = min(high + SEQ_RESERVE, MAX_SEQ)
    for si, seg in enumerate(segs):
        seqs = [it.seq for it in seg.items if isinstance(it, Found)]
        clean = all(isinstance(it, Found) for it in seg.items) or any(si == k for k, _ in cuts)
        nxt = segs[si + 1].first_seq - 1 if si + 1 < len(segs) else (max(seqs, default=0) if clean else high)
        seg.covered = max([nxt, *seqs])
    return SpoolContents(segs, pending, last_good, torn, cuts, damage, acked, high, reserved,
                         manifest.generation if manifest else 0)


def _cuts(segs: list[SegmentContents], torn: tuple[int, Bad] | None,
          harmless: set[tuple[int, int]]) -> list[tuple[int, int]]:
    """Where the repair cuts: the torn tail; and when that empties the last segment (which then
    goes), bad bytes that lose nothing at the end of the one before, which becomes the last."""
    cuts, k = [], len(segs) - 1
    if torn is not None:
        cuts.append((torn[0], torn[1].offset))
    while k > 0 and (segs[k].size == 0 or (k, 0) in cuts):
        tail = segs[k - 1].items[-1] if segs[k - 1].items else None
        if not isinstance(tail, Bad) or (k - 1, tail.offset) not in harmless:
            break
        cuts.append((k - 1, tail.offset))
        k -= 1
    return cuts


def _walk(segs: list[SegmentContents], confirmed: int, marks: tuple[int, int], block_size: int, losses: _Losses,
          complete: tuple[int, int] | None) -> tuple[int, tuple[int, Bad] | None]:
    """Follow the segments in order; return the sequence number after the last one accounted for,
    and the torn tail if the last bytes are one. `complete`: the newest segment and the size the
    last append gave it (a segment of that size holds all of that append's bytes: not torn)."""
    acked, high = marks
    cursor: int | None = None
    open_bad: tuple[int, int, Bad] | None = None  # (segment index, its first seq, region)

    def close(end: int) -> None:
        si, start, bad = open_bad  # type: ignore[misc]
        follow = " followed by valid entries" if bad.end < segs[si].size else ""
        claims = {}
        if bad.chained and all(c[0] == start + i and c[4] == block_size for i, c in enumerate(bad.claims)):
            claims = {c[0]: (c[1], c[2], c[3]) for c in bad.claims}
        if not losses.lost(start, end, f"{segs[si].path}: damaged entry at offset {bad.offset} ({bad.error}){follow}",
                           claims):
            losses.harmless.add((si, bad.offset))

    for si, seg in enumerate(segs):
        if open_bad is not None:
            close(seg.first_seq - 1)
            open_bad = None
        if cursor is None and seg.first_seq > confirmed + 1 or cursor is not None and seg.first_seq > cursor:
            start = confirmed + 1 if cursor is None else cursor
            losses.lost(start, seg.first_seq - 1, f"entries {start}..{seg.first_seq - 1} are in no segment")
        elif cursor is not None and seg.first_seq < cursor:
            losses.lost(seg.first_seq, cursor - 1, f"{seg.path} overlaps the segment before it")
        cursor = seg.first_seq
        for it in seg.items:
            if isinstance(it, Bad):
                open_bad = (si, cursor, it)
                continue
            if open_bad is not None:
                close(it.seq - 1)
                open_bad = None
            elif it.seq > cursor:
                losses.lost(cursor, it.seq - 1, f"{seg.path}: entries {cursor}..{it.seq - 1} are missing before "
                            f"offset {it.offset}")
            if it.seq < cursor:
                losses.lost(it.seq, cursor - 1, f"{seg.path}: entry {it.seq} at offset {it.offset} is out of order")
            if it.seq > confirmed:
                losses.known.setdefault(it.seq, (it.volume_id, it.lba, it.block_count))
            cursor = max(cursor, it.seq + 1)
    if cursor is None:
        return confirmed + 1, None
    if open_bad is None:
        return cursor, None
    si, start, bad = open_bad
    claim = bad.claim
    whole = complete == (segs[si].first_seq, segs[si].size)
    if bad.short and not whole and start > acked and (claim is None or (claim[0] == start and claim[4] == block_size)):
        return start, (si, bad)  # the last append, cut by a crash before it returned: never acknowledged
    end = max(start, acked, start + len(bad.claims) - 1 if bad.chained else high)  # a chain explains every byte
    close(end)
    return end + 1, None


class SpoolReader:
    """Reads entries from the spool's segment files, read-only, following the appending daemon."""

    def __init__(self, spool_dir: Path) -> None:
        self.spool_dir = spool_dir
        self._fd: int | None = None
        self._first = 0  # first seq of the open segment
        self._offset = 0
        self._next = 0  # the seq expected at _offset

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._next = 0

    def _open(self, first_seq: int, path: Path) -> None:
        self.close()
        self._fd = os.open(path, os.O_RDONLY)
        self._first, self._offset, self._next = first_seq, 0, first_seq

    def _find(self, seq: int) -> bool:
        """Position at entry `seq` of the open segment by scanning it whole (past damaged bytes)."""
        assert self._fd is not None
        size = os.fstat(self._fd).st_size
        for item in scan_segment(os.pread(self._fd, size, 0)):
            if isinstance(item, Found) and item.seq == seq:
                self._offset, self._next = item.offset, seq
                return True
        return False

    def _seek(self, seq: int) -> None:
        """Position at entry `seq` (reading its segment's entries up to it, else scanning it)."""
        candidates = [(first, path) for first, path in segment_files(self.spool_dir) if first <= seq]
        if not candidates:
            raise FormatError(f"entry {seq} is not in the spool {self.spool_dir} (already trimmed?)")
        self._open(*candidates[-1])
        while self._next < seq and self._read_run(seq - 1, READ_BYTES):
            pass
        if self._next != seq and not self._find(seq):
            raise FormatError(f"entry {seq} is not in the spool {self.spool_dir} (damaged or already trimmed)")

    def _read_run(self, upto: int, budget: int) -> list[tuple[Entry, memoryview]]:
        """The intact entries from the current position on (up to `upto`, about `budget` bytes),
        read with one pread: each entry and its bytes are views of that one buffer. Stops before
        anything that is not the next entry, whole and checked against its CRC."""
        assert self._fd is not None
        avail = os.fstat(self._fd).st_size - self._offset
        if avail < ENTRY_HEADER_SIZE:
            return []
        view = memoryview(os.pread(self._fd, min(avail, max(budget, ENTRY_HEADER_SIZE)), self._offset))
        try:
            first = parse_entry_header(view[:ENTRY_HEADER_SIZE], "entry")
        except FormatError:
            return []
        if len(view) < entry_size(first.block_count, first.block_size) <= avail:  # one entry over the budget
            view = memoryview(os.pread(self._fd, entry_size(first.block_count, first.block_size), self._offset))
        out: list[tuple[Entry, memoryview]] = []
        pos = 0
        while self._next <= upto and len(view) - pos >= ENTRY_HEADER_SIZE:
            try:
                entry, end = decode_entry(view, pos)
            except FormatError:
                break
            if entry.seq != self._next:
                break
            out.append((entry, view[pos:end]))
            pos, self._next = end, self._next + 1
        self._offset += pos
        return out

    def read(self, after: int, upto: int, max_bytes: int = READ_BYTES) -> list[tuple[Entry, bytes]]:
        """Entries after+1 .. upto (at most about `max_bytes`), in order, each with its encoded
        bytes (views of the buffers they were read into)."""
        out: list[tuple[Entry, bytes]] = []
        size = 0
        if after >= upto:
            return out
        if self._fd is None or self._next != after + 1:
            self._seek(after + 1)
        while self._next <= upto and size < max_bytes:
            run = self._read_run(upto, max_bytes - size)
            if run:
                out.extend(run)  # type: ignore[arg-type]
                size += sum(len(raw) for _, raw in run)
                continue
            assert self._fd is not None
            if os.fstat(self._fd).st_size - self._offset >= ENTRY_HEADER_SIZE and self._find(self._next):
                continue  # bytes that are no entry before it: read on past them
            path = self.spool_dir / segment_name(self._next)  # the rest is in the next segment
            if not path.is_file():
                raise FormatError(f"{self.spool_dir}: acknowledged entry {self._next} is in no segment")
            self._open(self._next, path)
        return out
