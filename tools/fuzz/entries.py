"""Fuzz target: entry and batch decoding, `decode_entry` and `decode_batch` (SPEC §4 [0044]-[0045];
DESIGN "Entries", invariant 5).

Keeps true for every input: decoding returns, or raises `FormatError`; nothing else. What decodes
is canonical: an entry encodes back to exactly the bytes it came from, a batch re-encodes to a
batch that decodes to the same range and entries (and to the same bytes when its flag byte is 0
or 1), and a batch's sequence numbers obey the plain/coalesced rule.

Input: one flags byte, then the bytes to decode. Flag bit 0 recomputes every CRC (of each entry
found by walking the headers, then the batch's `batch_checksum`) before decoding, so the mutations reach the checks
behind the checksums.
"""

from __future__ import annotations

from tools.fuzz import harness
from vstore.blocks.codec import crc32
from vstore.replication.entries import (
    BATCH_MAGIC,
    ENTRY_HEADER_SIZE,
    ENTRY_MAGIC,
    Batch,
    Entry,
    batch_checksum,
    decode_batch,
    decode_entry,
    encode_batch,
    encode_batch_raw,
    encode_entry,
)

BATCH_HEADER = 27  # magic, version, first, last, count, coalesced flag
BATCH_ENTRIES_AT = BATCH_HEADER + 8  # after the entries' length prefix


def seal_entries(buf: bytearray, start: int, end: int) -> None:
    """Recompute the CRC of each entry from `start` on, following their headers up to `end`."""
    off = start
    while off + ENTRY_HEADER_SIZE <= end and buf[off:off + 4] == ENTRY_MAGIC:
        count = int.from_bytes(buf[off + 34:off + 38], "big")
        size = int.from_bytes(buf[off + 38:off + 42], "big")
        stop = off + ENTRY_HEADER_SIZE + count * size
        if stop + 4 > end:
            return
        harness.seal_crc(buf, off, stop, crc32, "big")
        off = stop + 4


def seal_batch(buf: bytearray) -> None:
    """Recompute the CRCs of a batch's entries and of the batch itself."""
    if len(buf) < BATCH_ENTRIES_AT or buf[:4] != BATCH_MAGIC:
        return
    end = BATCH_ENTRIES_AT + int.from_bytes(buf[BATCH_HEADER:BATCH_ENTRIES_AT], "big")
    if end + 4 <= len(buf):
        seal_entries(buf, BATCH_ENTRIES_AT, end)
        harness.seal_crc(buf, 0, end, batch_checksum, "big")


def _entries(raw: bytes) -> str:
    """Decode entries one after the other, as the spool does, checking each is canonical."""
    offset, decoded = 0, 0
    while offset < len(raw):
        got = harness.rejects(decode_entry, raw, offset)
        if not harness.ok(got):
            return harness.describe(got)
        entry, end = got  # type: ignore[misc]
        assert isinstance(entry, Entry) and offset < end <= len(raw)
        assert encode_entry(entry) == raw[offset:end], "an entry decoded from bytes it does not encode to"
        assert entry.block_count * entry.block_size == len(entry.payload)
        offset, decoded = end, decoded + 1
    return f"{decoded} entries"


def _batch(raw: bytes) -> str:
    got = harness.rejects(decode_batch, raw)
    if not harness.ok(got):
        return harness.describe(got)
    batch = got
    assert isinstance(batch, Batch)
    again = encode_batch_raw([encode_entry(e) for e in batch.entries], batch.first_seq, batch.last_seq,
                             coalesced=batch.coalesced)
    assert decode_batch(again) == batch, "a batch does not survive re-encoding"
    if raw[BATCH_HEADER - 1] in (0, 1):
        assert again == raw, "a batch decoded from bytes it does not encode to"
    seqs = [e.seq for e in batch.entries]
    if batch.coalesced:
        assert seqs and seqs[-1] == batch.last_seq and seqs[0] >= batch.first_seq >= 1
        assert all(a < b for a, b in zip(seqs, seqs[1:], strict=False))
    else:
        assert seqs == list(range(batch.first_seq, batch.last_seq + 1)) or (not seqs and batch.last_seq == 0)
    return f"batch of {len(seqs)}"


def outcome(data: bytes) -> str:
    if not data:
        return "empty"
    buf = bytearray(data[1:])
    if data[0] & 1:
        seal_entries(buf, 0, len(buf))
        seal_batch(buf)
    raw = bytes(buf)
    return f"{_entries(raw)} / {_batch(raw)}"


def check(data: bytes) -> None:
    outcome(data)


def seeds() -> list[bytes]:
    one = Entry(1, 1_700_000_000_000_000_000, 0, 7, 1, bytes(range(16)))
    two = Entry(2, 1_700_000_000_000_000_001, 1, 0, 2, b"\xaa" * 1024)
    three = Entry(3, 1_700_000_000_000_000_002, 0, 9, 1, b"\x01" * 8)
    plain = encode_batch([one, two, three])
    coalesced = encode_batch([one, three], first_seq=1, last_seq=3)
    bodies = [encode_entry(one), encode_entry(one) + encode_entry(two) + encode_entry(three), plain,
              coalesced, encode_batch([])]
    return [flags + body for body in bodies for flags in (b"\0", b"\1")]


def main() -> None:
    harness.atheris_main("entries", check, seeds())


if __name__ == "__main__":
    main()
