"""Ordered log entries and batches: the one declaration of each (SPEC §4 [0044]-[0045], DESIGN
"Entries" row).

Keeps true:
- One construct declaration of an entry: magic, version, gap-free sequence number (per
  consistency group, the first is 1), timestamp, volume id, LBA, block count, block size, payload
  and a CRC32 over all of it. A batch (what travels to the Async site) has its own header: magic,
  version, first/last sequence it covers, count, a "coalesced" flag, the entries as the spool
  holds them, and a CRC32 over the header and the entries' own CRCs (`batch_checksum`: each entry's
  CRC already covers its bytes, so a batch is checked in one pass over its payloads, and built
  from the spool's bytes without reading them again).
  A plain batch holds exactly the consecutive entries first..last; a coalesced one a strictly
  increasing subset of them ending at last (entries overwritten later in the same batch dropped).
- Sequence numbers are 1..`MAX_SEQ`; a saved "last confirmed/applied" number is valid only when
  `saved_seq_ok` (an integer, below MAX_SEQ so that a next entry exists).
- The spool's manifest (`SPOOL_MANIFEST`, two copies of one slot: magic, version, generation, the
  acknowledged watermark, the highest sequence number used, the durable reservation above it, the
  first sequence number and the expected size of the newest segment, CRC32) is what recovery trusts about what existed;
  `vstore.replication.spool` explains its fields.
- Bad bytes always give `FormatError`. The hot paths (`encode_entry`, `decode_entry`,
  `batch_parts`, `decode_batch`, `encode_manifest`) pack and unpack the same layouts with `struct`
  and never copy a payload (a decoded entry's payload is a view of the bytes it came from); the
  tests prove they agree with `ENTRY`, `BATCH` and `SPOOL_MANIFEST` byte for byte, damage included.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

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

from vstore.blocks.codec import check_version, crc32, is_count, parse_checked
from vstore.blocks.errors import FormatError

BLOCK_SIZE = 4096

ENTRY_MAGIC = b"TCEN"
ENTRY_VERSION = 1
BATCH_MAGIC = b"TCBA"
BATCH_VERSION = 2
MAX_SEQ = (1 << 64) - 1  # the largest sequence number an entry carries (its field is 64 bits)
MANIFEST_MAGIC = b"TCSM"
MANIFEST_VERSION = 1

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
_ENTRY_HEADER_FAST = struct.Struct(">4sHQQIQII")  # `_ENTRY_HEADER`'s layout (tests check they agree)
_CRC_FIELD = struct.Struct(">I")
_CRC_SIZE = 4

ENTRY = Struct(
    "body" / RawCopy(Struct(
        "header" / _ENTRY_HEADER,
        "payload" / Bytes(this.header.block_count * this.header.block_size),
    )),
    "crc" / Checksum(Int32ub, crc32, this.body.data),
)

_BATCH_HEADER = Struct(
    "magic" / Const(BATCH_MAGIC),
    "version" / Int16ub,
    "first_seq" / Int64ub,
    "last_seq" / Int64ub,
    "count" / Int32ub,
    "coalesced" / Flag,
)
BATCH_HEADER_SIZE = _BATCH_HEADER.sizeof() + 8  # and the entries' length prefix
_BATCH_HEADER_FAST = struct.Struct(">4sHQQIBQ")  # `_BATCH_HEADER` and the prefix (tests check they agree)


def batch_checksum(body: bytes | memoryview) -> int:
    """The CRC32 a batch ends with, over its header and then each entry's own CRC field, the
    entries found by their headers; over the whole body when the entries do not cut it exactly
    (such a batch is refused when decoded anyway)."""
    view = memoryview(body)
    crc = zlib.crc32(view[:BATCH_HEADER_SIZE])
    pos = BATCH_HEADER_SIZE
    while pos < len(view):
        if len(view) - pos < ENTRY_HEADER_SIZE:
            return crc32(view)
        *_, count, size = _ENTRY_HEADER_FAST.unpack_from(view, pos)
        pos += entry_size(count, size)
        if pos > len(view):
            return crc32(view)
        crc = zlib.crc32(view[pos - _CRC_SIZE:pos], crc)
    return crc & 0xFFFFFFFF


BATCH = Struct(
    "body" / RawCopy(Struct(
        "header" / _BATCH_HEADER,
        "entries" / Prefixed(Int64ub, GreedyBytes),
    )),
    "crc" / Checksum(Int32ub, batch_checksum, this.body.data),
    Terminated,
)

_MANIFEST_BODY = Struct(
    "magic" / Const(MANIFEST_MAGIC),
    "version" / Int16ub,
    "generation" / Int64ub,
    "acked_seq" / Int64ub,
    "high_seq" / Int64ub,
    "reserved_seq" / Int64ub,
    "active_first" / Int64ub,
    "active_end" / Int64ub,
)
_MANIFEST_BODY_FAST = struct.Struct(">4sHQQQQQQ")  # `_MANIFEST_BODY`'s layout (tests check they agree)
SPOOL_MANIFEST = Struct(
    "body" / RawCopy(_MANIFEST_BODY),
    "crc" / Checksum(Int32ub, crc32, this.body.data),
)
MANIFEST_SLOT_SIZE = SPOOL_MANIFEST.sizeof()  # the file holds two slots, written alternately


class Manifest(NamedTuple):
    """One slot of the spool's manifest (see `vstore.replication.spool` for what each field keeps)."""

    generation: int
    acked_seq: int
    high_seq: int
    reserved_seq: int
    active_first: int
    active_end: int


def encode_manifest(m: Manifest) -> bytes:
    """One slot of `SPOOL_MANIFEST`, packed with struct (once per append; tests check it equals the build)."""
    try:
        raw = _MANIFEST_BODY_FAST.pack(MANIFEST_MAGIC, MANIFEST_VERSION, m.generation, m.acked_seq, m.high_seq,
                                       m.reserved_seq, m.active_first, m.active_end)
    except struct.error as err:  # an integer out of its field's range: a caller bug
        raise ValueError(f"manifest slot {m.generation} cannot be encoded: {err}") from None
    return raw + _CRC_FIELD.pack(zlib.crc32(raw))


def decode_manifest(raw: bytes, where: str) -> Manifest | None:
    """The newest valid slot of a manifest file's bytes, or None when no slot is valid."""
    best: Manifest | None = None
    for i in range(2):
        chunk = raw[i * MANIFEST_SLOT_SIZE:(i + 1) * MANIFEST_SLOT_SIZE]
        try:
            b = parse_checked(SPOOL_MANIFEST, chunk, f"{where} slot {i}").body.value
            check_version(b.version, MANIFEST_VERSION, f"{where} slot {i}")
        except FormatError:
            continue
        slot = Manifest(b.generation, b.acked_seq, b.high_seq, b.reserved_seq, b.active_first, b.active_end)
        if slot.acked_seq > slot.high_seq or slot.high_seq > slot.reserved_seq:
            continue  # a slot contradicting itself is damaged, whatever its CRC says
        if best is None or slot.generation > best.generation:
            best = slot
    return best


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
    try:
        # The hot path: the same declaration (ENTRY = header, payload, CRC32 over both), packed
        # with struct; tests check it equals ENTRY.build byte for byte.
        head = _ENTRY_HEADER_FAST.pack(ENTRY_MAGIC, ENTRY_VERSION, e.seq, e.timestamp_ns, e.volume_id, e.lba,
                                       e.block_count, e.block_size)
    except struct.error as err:  # an integer out of its field's range: a caller bug
        raise ValueError(f"entry {e.seq} cannot be encoded: {err}") from None
    crc = zlib.crc32(e.payload, zlib.crc32(head))
    return b"".join((head, e.payload, _CRC_FIELD.pack(crc)))


class EntryHeader(NamedTuple):
    """An entry's header as `_ENTRY_HEADER` declares it."""

    magic: bytes
    version: int
    seq: int
    timestamp_ns: int
    volume_id: int
    lba: int
    block_count: int
    block_size: int


def decode_entry(buf: bytes | bytearray | memoryview, offset: int = 0) -> tuple[Entry, int]:
    """Decode the entry at `offset`; return it and the offset just after it. FormatError if bad.
    The entry's payload is a view of `buf`, not a copy."""
    view = memoryview(buf)
    where = f"entry at offset {offset}"
    if len(view) - offset < ENTRY_HEADER_SIZE:
        raise FormatError(f"{where}: truncated ({len(view) - offset} bytes, a header needs {ENTRY_HEADER_SIZE})")
    hdr = parse_entry_header(view[offset:offset + ENTRY_HEADER_SIZE], where)
    end = offset + entry_size(hdr.block_count, hdr.block_size)
    if end > len(view):
        raise FormatError(f"{where}: truncated (needs {end - offset} bytes, {len(view) - offset} present)")
    # The hot path of the same declaration (ENTRY: header, payload, CRC32 over both): the header
    # was parsed above; the CRC is checked over the body without building a parse tree, and tests
    # check that this agrees with parsing through ENTRY for good and damaged bytes alike.
    crc_at = end - _CRC_SIZE
    if crc32(view[offset:crc_at]) != _CRC_FIELD.unpack_from(view, crc_at)[0]:
        raise FormatError(f"{where}: checksum (CRC) mismatch (the entry is damaged)")
    entry = Entry(seq=hdr.seq, timestamp_ns=hdr.timestamp_ns, volume_id=hdr.volume_id, lba=hdr.lba,
                  block_count=hdr.block_count, payload=view[offset + ENTRY_HEADER_SIZE:crc_at])  # type: ignore[arg-type]
    return entry, end


def parse_entry_header(raw: bytes | memoryview, where: str) -> EntryHeader:
    """The header of an entry (to find its length without reading its payload)."""
    if len(raw) < ENTRY_HEADER_SIZE:
        raise FormatError(f"{where}: truncated ({len(raw)} bytes, a header needs {ENTRY_HEADER_SIZE})")
    hdr = EntryHeader(*_ENTRY_HEADER_FAST.unpack_from(raw))
    if hdr.magic != ENTRY_MAGIC:
        raise FormatError(f"{where}: bad magic {bytes(hdr.magic)!r}, expected {ENTRY_MAGIC!r}")
    check_version(hdr.version, ENTRY_VERSION, where)
    if hdr.block_count == 0 or hdr.block_size == 0:
        raise FormatError(f"{where}: block count and block size must be positive (header damaged)")
    return hdr


def saved_seq_ok(value: object) -> bool:
    """Is `value` (read from a JSON state file) a usable last-confirmed or last-applied sequence?"""
    return is_count(value, MAX_SEQ)


def check_consecutive(seqs: Sequence[int], what: str) -> None:
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
        check_consecutive(seqs, what)
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


def batch_parts(encoded_entries: Sequence[bytes | memoryview], first_seq: int, last_seq: int, *,
                coalesced: bool) -> list[bytes | memoryview]:
    """A batch of entries that are already encoded (read from the spool: their own CRCs were
    checked there) covering first_seq..last_seq, as pieces to send in order: the entries are not
    copied or read again (`batch_checksum` takes only their CRC fields)."""
    length = sum(map(len, encoded_entries))
    head = _BATCH_HEADER_FAST.pack(BATCH_MAGIC, BATCH_VERSION, first_seq, last_seq, len(encoded_entries),
                                   bool(coalesced), length)
    crc = zlib.crc32(head)
    for raw in encoded_entries:
        crc = zlib.crc32(memoryview(raw)[len(raw) - _CRC_SIZE:], crc)
    return [head, *encoded_entries, _CRC_FIELD.pack(crc & 0xFFFFFFFF)]


def encode_batch_raw(encoded_entries: Sequence[bytes | memoryview], first_seq: int, last_seq: int, *,
                     coalesced: bool) -> bytes:
    """`batch_parts` joined; `encode_batch` checks the sequences."""
    return b"".join(batch_parts(encoded_entries, first_seq, last_seq, coalesced=coalesced))


def decode_batch(buf: bytes | bytearray | memoryview) -> Batch:
    """Decode a batch with its range; FormatError on any damage, a wrong count or bad sequences.
    One pass over the bytes (each entry's CRC); the entries' payloads are views of `buf`."""
    view = memoryview(buf)
    if len(view) < BATCH_HEADER_SIZE + _CRC_SIZE:
        raise FormatError(f"batch: truncated ({len(view)} bytes, a batch needs at least "
                          f"{BATCH_HEADER_SIZE + _CRC_SIZE})")
    magic, version, first, last, count, flag, length = _BATCH_HEADER_FAST.unpack_from(view)
    if magic != BATCH_MAGIC:
        raise FormatError(f"batch: bad magic {bytes(magic)!r}, expected {BATCH_MAGIC!r}")
    end = BATCH_HEADER_SIZE + length
    if end + _CRC_SIZE != len(view):
        raise FormatError(f"batch: entries of {length} bytes announced, so {end + _CRC_SIZE} bytes in all, "
                          f"but the batch has {len(view)}")
    if batch_checksum(view[:end]) != _CRC_FIELD.unpack_from(view, end)[0]:
        raise FormatError("batch: wrong CRC (the batch is damaged)")
    check_version(version, BATCH_VERSION, "batch")
    entries: list[Entry] = []
    body = view[BATCH_HEADER_SIZE:end]
    offset = 0
    while offset < len(body):
        entry, offset = decode_entry(body, offset)
        entries.append(entry)
    if len(entries) != count:
        raise FormatError(f"batch: header says {count} entries, body holds {len(entries)}")
    _check_batch(entries, first, last, bool(flag), "batch")
    return Batch(first, last, entries, bool(flag))
