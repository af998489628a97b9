"""Fuzz target: spool recovery, `EntryLog` reopening a directory of fuzzed segment files and
confirmed.json, and `SpoolReader` reading it (SPEC §4 [0044]; DESIGN invariants 2, 5, 6).

Keeps true for every input: opening returns or raises a project error; recovery only cuts a torn
tail or drops a segment without a complete entry, so every file afterwards is a prefix of what
it was, and it writes nothing beside the spool. A spool that opens holds the gap-free entries
confirmed+1..next-1, reads back the same through `EntryLog.pending` and `SpoolReader`, opens again
to the same state without changing a byte, and takes the next append.

Input: one flags byte, then pieces cut at `harness.SEP`: the segments' first sequence numbers
(ASCII integers; a missing one is taken from the segment's first entry), confirmed.json (absent
when flag bit 1 is set), then up to 8 segment files. Flag bit 0 recomputes the entries' CRCs.
"""

from __future__ import annotations

from pathlib import Path

from tools.fuzz import harness
from tools.fuzz.entries import seal_entries
from vstore.replication.entries import ENTRY_HEADER_SIZE, ENTRY_MAGIC, MAX_SEQ, Entry
from vstore.replication.segments import SpoolReader, segment_name
from vstore.replication.spool import EntryLog

MAX_SEGMENTS = 8
BLOCK = 16


def _names(header: bytes, segments: list[bytes]) -> list[int]:
    stated = [int(w) for w in header.split()[:MAX_SEGMENTS] if w.isdigit() and len(w) <= 20]
    names = []
    for i, seg in enumerate(segments):
        if i < len(stated):
            names.append(stated[i])
        elif len(seg) >= ENTRY_HEADER_SIZE and seg[:4] == ENTRY_MAGIC:
            names.append(int.from_bytes(seg[6:14], "big") % 10**20)
        else:
            names.append(i + 1)
    return names


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def lay_out(data: bytes, spool: Path) -> None:
    """Write the spool directory an input describes."""
    flags, rest = (data[0], data[1:]) if data else (0, b"")
    pieces = rest.split(harness.SEP)
    header, confirmed = pieces[0], pieces[1] if len(pieces) > 1 else None
    segments = [bytearray(s) for s in pieces[2:2 + MAX_SEGMENTS]]
    if flags & 1:
        for seg in segments:
            seal_entries(seg, 0, len(seg))
    if confirmed is not None and not flags & 2:
        (spool / "confirmed.json").write_bytes(confirmed)
    for first, seg in zip(_names(header, [bytes(s) for s in segments]), segments, strict=True):
        (spool / segment_name(first)).write_bytes(bytes(seg))


def _opened(log: EntryLog, spool: Path) -> str:
    confirmed, nxt = log.confirmed_seq, log.next_seq
    pending = log.pending()
    seqs = [e.seq for e in pending]
    assert seqs == list(range(confirmed + 1, confirmed + 1 + len(seqs))), "pending entries are not gap-free"
    assert not seqs or seqs[-1] == nxt - 1, "next_seq does not follow the last entry"
    assert nxt >= confirmed + 1
    assert log.pending_positions() == [(e.volume_id, e.lba, e.block_count) for e in pending]
    stats = log.stats()
    assert stats.entries == len(pending) and (stats.first_seq, stats.last_seq) == \
        ((seqs[0], seqs[-1]) if seqs else (None, None))
    for e in pending:
        assert log.has_unshipped(e.volume_id, [(e.lba, e.block_count)])
    if seqs:
        reader = SpoolReader(spool)
        try:
            got = reader.read(confirmed, seqs[-1], max_bytes=1 << 30)
        finally:
            reader.close()
        assert [entry for entry, _ in got] == pending, "SpoolReader and EntryLog disagree"
    log.close()
    files = _files(spool)
    again = EntryLog(spool, durable=False, block_size=BLOCK)
    try:
        assert (again.confirmed_seq, again.next_seq) == (confirmed, nxt), "a second recovery differs"
        assert [e.seq for e in again.pending()] == seqs
        assert _files(spool) == files, "a second recovery changed the spool"
        entry = harness.rejects(again.append, 0, 0, bytes(BLOCK))
        if nxt <= MAX_SEQ:
            assert isinstance(entry, Entry) and entry.seq == nxt, f"the next append failed: {entry}"
            again.confirm(entry.seq)
    finally:
        again.close()
    return f"opened with {len(seqs)} pending"


def outcome(data: bytes) -> str:
    with harness.scratch() as site:
        spool = site / "spool"
        spool.mkdir()
        lay_out(data, spool)
        before = _files(spool)
        got = harness.rejects(EntryLog, spool, durable=False, block_size=BLOCK)
        after = _files(spool)
        assert set(after) <= set(before), f"recovery made files {sorted(set(after) - set(before))}"
        for name, content in after.items():
            assert before[name].startswith(content), f"recovery changed {name} beyond cutting its tail"
        if not harness.ok(got):
            return harness.describe(got)
        assert isinstance(got, EntryLog)
        return _opened(got, spool)


def check(data: bytes) -> None:
    outcome(data)


def _spool_input(spool: Path, flags: int = 0, drop_confirmed: bool = False) -> bytes:
    files = _files(spool)
    segs = sorted(n for n in files if n.startswith("seg-"))
    header = b" ".join(str(int(n[4:24])).encode() for n in segs)
    confirmed = files.get("confirmed.json", b"")
    return bytes([flags | (2 if drop_confirmed or "confirmed.json" not in files else 0)]) + \
        harness.join(header, confirmed, *(files[n] for n in segs))


def seeds() -> list[bytes]:
    """Spools written by `EntryLog` itself: one segment, several, partly confirmed, and empty."""
    out = []
    with harness.scratch() as site:
        for case, (count, segment_bytes, confirm) in enumerate([(3, 1 << 20, 0), (7, 100, 2), (5, 200, 5)]):
            spool = site / f"s{case}"
            log = EntryLog(spool, durable=False, segment_bytes=segment_bytes, block_size=BLOCK)
            for i in range(count):
                log.append(i % 2, 3 * i, bytes([i]) * BLOCK * (1 + i % 3))
            if confirm:
                log.confirm(confirm)
            log.close()
            out += [_spool_input(spool), _spool_input(spool, flags=1)]
    out.append(b"\0")
    return out


def main() -> None:
    harness.atheris_main("spool", check, seeds())


if __name__ == "__main__":
    main()
