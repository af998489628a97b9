"""Ordered log entries and batches: the one declaration of each (SPEC §4 [0044]-[0045], DESIGN
"Entries" row).

Keeps true:
- One construct declaration of an entry: magic, version, gap-free sequence number (per
  consistency group, the first is 1), timestamp, volume id, LBA, block count, block size, payload
  and a CRC32 over all of it. A batch (what travels to the Async site) has its own header: magic,
  version, first/last sequence it covers, count, a "coalesced" flag and a CRC over everything.
  A plain batch holds exactly the consecutive entries first..last; a coalesced one a strictly
  increasing subset of them ending at last (entries overwritten later in the same batch dropped).
- Sequence numbers are 1..`MAX_SEQ`; a saved "last confirmed/applied" number is valid only when
  `saved_seq_ok` (an integer, below MAX_SEQ so that a next entry exists).
- The spool's manifest (`SPOOL_MANIFEST`, two copies of one slot: magic, version, generation, the
  acknowledged watermark, the highest sequence number used, the durable reservation above it, the
  first sequence number and the expected size of the newest segment, CRC32) is what recovery trusts about what existed;
  `vstore.replication.spool` explains its fields.
- Bad bytes always give `FormatError`. The hot paths (`encode_entry`, `decode_entry`,
  `encode_manifest`) use the compiled header of the same declaration; the tests prove they agree
  with `ENTRY` and `SPOOL_MANIFEST` byte for byte.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
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

from vstore.blocks.codec import check_version, crc32, is_count, parse_checked
from vstore.blocks.errors import FormatError

BLOCK_SIZE = 4096

ENTRY_MAGIC = b"TCEN"
ENTRY_VERSION = 1
BATCH_MAGIC = b"TCBA"
BATCH_VERSION = 1
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
_ENTRY_HEADER_FAST = _ENTRY_HEADER.compile()
_CRC_FIELD = Int32ub
_CRC_SIZE = 4

ENTRY = Struct(
    "body" / RawCopy(Struct(
        "header" / _ENTRY_HEADER,
        "payload" / Bytes(this.header.block_count * this.header.block_size),
    )),
    "crc" / Checksum(Int32ub, crc32, this.body.data),
)

BATCH = Struct(
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
_MANIFEST_BODY_FAST = _MANIFEST_BODY.compile()
SPOOL_MANIFEST = Struct(
    "body" / RawCopy(_MANIFEST_BODY),
    "crc" / Checksum(Int32ub, crc32, this.body.data),
)
MANIFEST_SLOT_SIZE = SPOOL_MANIFEST.sizeof()  # the file holds two slots, written alternately


@dataclass(frozen=True)
class Manifest:
    """One slot of the spool's manifest (see `vstore.replication.spool` for what each field keeps)."""

    generation: int
    acked_seq: int
    high_seq: int
    reserved_seq: int
    active_first: int
    active_end: int


def encode_manifest(m: Manifest) -> bytes:
    body = dict(magic=MANIFEST_MAGIC, version=MANIFEST_VERSION, generation=m.generation, acked_seq=m.acked_seq,
                high_seq=m.high_seq, reserved_seq=m.reserved_seq, active_first=m.active_first,
                active_end=m.active_end)
    raw = _MANIFEST_BODY_FAST.build(body)  # once per append: the compiled body of the same declaration
    return raw + _CRC_FIELD.build(crc32(raw))


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
    header = dict(magic=ENTRY_MAGIC, version=ENTRY_VERSION, seq=e.seq, timestamp_ns=e.timestamp_ns,
                  volume_id=e.volume_id, lba=e.lba, block_count=e.block_count, block_size=e.block_size)
    try:
        # The hot path: the same declaration (ENTRY = header, payload, CRC32 over both), built
        # with the compiled header; tests check it equals ENTRY.build byte for byte.
        body = _ENTRY_HEADER_FAST.build(header) + bytes(e.payload)
    except Exception as err:  # construct integer range errors: a caller bug
        raise ValueError(f"entry {e.seq} cannot be encoded: {err}") from None
    return body + _CRC_FIELD.build(crc32(body))


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
    # The hot path of the same declaration (ENTRY: header, payload, CRC32 over both): the header
    # was parsed above; the CRC is checked over the body without building a parse tree, and tests
    # check that this agrees with parsing through ENTRY for good and damaged bytes alike.
    crc_at = end - _CRC_SIZE
    if crc32(view[offset:crc_at]) != int.from_bytes(view[crc_at:end], "big"):
        raise FormatError(f"{where}: checksum mismatch (the entry is damaged)")
    entry = Entry(seq=hdr.seq, timestamp_ns=hdr.timestamp_ns, volume_id=hdr.volume_id, lba=hdr.lba,
                  block_count=hdr.block_count, payload=bytes(view[offset + ENTRY_HEADER_SIZE:crc_at]))
    return entry, end


def parse_entry_header(raw: bytes | memoryview, where: str) -> Any:
    """The header of an entry (to find its length without reading its payload)."""
    hdr = parse_checked(_ENTRY_HEADER_FAST, raw[:ENTRY_HEADER_SIZE], where)
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


def encode_batch_raw(encoded_entries: Sequence[bytes], first_seq: int, last_seq: int, *, coalesced: bool) -> bytes:
    """A batch of entries that are already encoded (read from the spool: their own CRCs were
    checked there) covering first_seq..last_seq; `encode_batch` checks the sequences."""
    body = dict(magic=BATCH_MAGIC, version=BATCH_VERSION, first_seq=first_seq, last_seq=last_seq,
                count=len(encoded_entries), coalesced=coalesced, entries=b"".join(encoded_entries))
    return BATCH.build(dict(body=dict(value=body)))


def decode_batch(buf: bytes) -> Batch:
    """Decode a batch with its range; FormatError on any damage, a wrong count or bad sequences."""
    parsed = parse_checked(BATCH, buf, "batch")
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
