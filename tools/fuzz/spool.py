"""Fuzz target: spool recovery, `EntryLog` reopening a directory of fuzzed segment files, manifest
and confirmed.json, and `SpoolReader` reading it (SPEC §4 [0044]; DESIGN invariants 2, 5, 6).

Keeps true for every input: opening returns or raises a project error. Opened the way the lab opens
it (damage recorded, repairs deferred) it changes no byte; opened plainly it raises `SpoolDamage`
exactly when the first way recorded damage, and its repairs only cut a torn tail or drop a segment
without a complete entry (every segment afterwards is a prefix of what it was; only the manifest
is rewritten) and write nothing beside the spool. A spool that opens holds the gap-free entries
confirmed+1..last, reads back the same through `EntryLog.pending` and `SpoolReader`, continues
above any damage (no sequence number used twice), opens again to the same state without changing
a byte, and takes the next append (after its damage is released).

Nothing acknowledged is lost: in recipe inputs the target writes a spool with `EntryLog` itself
(so it knows every acknowledged entry), damages it (bit flips, zeroed bytes, truncation, deleted
segments) and reopens it: every entry after the confirmed one is then returned intact or named
by the `SpoolDamage` (its blocks among the damage's positions unless its own header was hit). The
one loss allowed is that of a torn tail: the last append, after the watermark, cut short.

Input: one flags byte. Flag bit 3: a recipe (bytes: appends, segment size, confirmation, a last
append of two, then 4-byte mutations). Otherwise pieces cut at `harness.SEP`: the segments' first
sequence numbers (ASCII integers; a missing one is taken from the segment's first entry),
confirmed.json (absent when flag bit 1 is set), the manifest (when flag bit 2 is set), then up to 8
segment files; flag bit 0 recomputes the entries' CRCs.
"""

from __future__ import annotations

from pathlib import Path

from tools.fuzz import harness
from tools.fuzz.entries import seal_entries
from vstore.replication.entries import ENTRY_HEADER_SIZE, ENTRY_MAGIC, MAX_SEQ, Entry, entry_size
from vstore.replication.segments import MANIFEST_FILE, Found, SpoolReader, scan_segment, segment_name
from vstore.replication.spool import EntryLog, SpoolDamage

MAX_SEGMENTS = 8
BLOCK = 16
RECIPE = 8


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
    """Write the spool directory a (non-recipe) input describes."""
    flags, rest = (data[0], data[1:]) if data else (0, b"")
    pieces = rest.split(harness.SEP)
    header, confirmed = pieces[0], pieces[1] if len(pieces) > 1 else None
    first_segment = 2
    if flags & 4:
        if len(pieces) > 2:
            (spool / MANIFEST_FILE).write_bytes(pieces[2])
        first_segment = 3
    segments = [bytearray(s) for s in pieces[first_segment:first_segment + MAX_SEGMENTS]]
    if flags & 1:
        for seg in segments:
            seal_entries(seg, 0, len(seg))
    if confirmed is not None and not flags & 2:
        (spool / "confirmed.json").write_bytes(confirmed)
    for first, seg in zip(_names(header, [bytes(s) for s in segments]), segments, strict=True):
        (spool / segment_name(first)).write_bytes(bytes(seg))


def _reads_back(log: EntryLog, spool: Path) -> list[Entry]:
    """The invariants of an opened log; its pending entries."""
    confirmed, nxt, damage = log.confirmed_seq, log.next_seq, log.damage
    pending = log.pending()
    seqs = [e.seq for e in pending]
    assert seqs == list(range(confirmed + 1, confirmed + 1 + len(seqs))), "pending entries are not gap-free"
    last = seqs[-1] if seqs else confirmed
    if damage is None:
        assert nxt == last + 1, "next_seq does not follow the last entry"
    else:
        assert damage.first_seq == last + 1, "the damage does not start after the pending entries"
        assert nxt > damage.last_seq, "a sequence number of the damaged range would be used again"
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
    return pending


def _opened(log: EntryLog, spool: Path) -> str:
    confirmed, nxt = log.confirmed_seq, log.next_seq
    seqs = [e.seq for e in _reads_back(log, spool)]
    log.close()
    files = _files(spool)
    again = EntryLog(spool, durable=False, block_size=BLOCK)
    try:
        assert (again.confirmed_seq, again.next_seq) == (confirmed, nxt), "a second recovery differs"
        assert [e.seq for e in again.pending()] == seqs
        assert _files(spool) == files, "a second recovery changed the spool"
        _appends(again, nxt)
    finally:
        again.close()
    return f"opened with {len(seqs)} pending"


def _appends(log: EntryLog, nxt: int) -> None:
    entry = harness.rejects(log.append, 0, 0, bytes(BLOCK))
    if nxt <= MAX_SEQ:
        assert isinstance(entry, Entry) and entry.seq == nxt, f"the next append failed: {entry}"
        log.confirm(entry.seq)


def _released(spool: Path, nxt: int) -> str:
    """A damaged spool whose damage is released opens cleanly and goes on above it."""
    log = EntryLog(spool, durable=False, block_size=BLOCK, record_damage=True)
    try:
        released = harness.rejects(log.release_damage)
        if not harness.ok(released):
            return f"damage not released: {harness.describe(released)}"
        assert log.damage is None and log.next_seq == nxt
    finally:
        log.close()
    again = EntryLog(spool, durable=False, block_size=BLOCK)
    try:
        assert again.damage is None and again.next_seq == nxt and not again.pending()
        _appends(again, nxt)
    finally:
        again.close()
    return "damage released"


def raw_outcome(spool: Path) -> str:
    before = _files(spool)
    lab_way = harness.rejects(EntryLog, spool, durable=False, block_size=BLOCK, record_damage=True,
                              defer_repairs=True)
    assert _files(spool) == before, "opening the way the lab opens it changed the spool"
    damaged = isinstance(lab_way, EntryLog) and lab_way.damage is not None
    nxt = lab_way.next_seq if isinstance(lab_way, EntryLog) else 0
    if isinstance(lab_way, EntryLog):
        _reads_back(lab_way, spool)
        if damaged:
            assert not harness.ok(harness.rejects(lab_way.append, 0, 0, bytes(BLOCK))), "append past damage"
        lab_way.close()
    got = harness.rejects(EntryLog, spool, durable=False, block_size=BLOCK)
    after = _files(spool)
    assert set(after) - set(before) <= {MANIFEST_FILE}, f"recovery made files {sorted(set(after) - set(before))}"
    for name, content in after.items():
        if name != MANIFEST_FILE:
            assert before[name].startswith(content), f"recovery changed {name} beyond cutting its tail"
    if isinstance(lab_way, EntryLog):
        assert isinstance(got, SpoolDamage) == damaged, "the two ways of opening disagree about damage"
    if damaged:
        return _released(spool, nxt) + " " + harness.describe(got)
    if not harness.ok(got):
        return harness.describe(got)
    assert isinstance(got, EntryLog)
    return _opened(got, spool)


# -- recipes: "nothing acknowledged is lost" ---------------------------------------------------------
def _write_recipe(r: bytes, spool: Path) -> tuple[dict[int, Entry], int, int]:
    """The spool a recipe writes: its entries by seq, the watermark, the confirmed seq."""
    n = 1 + r[0] % 20
    segment_bytes = entry_size(1, BLOCK) * (1 + r[1] % 5)
    confirm = r[2] % (n + 1)
    group = n >= 2 and bool(r[3] & 1)
    log = EntryLog(spool, durable=False, segment_bytes=segment_bytes, block_size=BLOCK)
    items = [(i % 3, 5 * i, bytes([i + 1]) * BLOCK * (1 + i % 2)) for i in range(n)]
    entries = [log.append(*item) for item in items[:n - 2 if group else n]]
    entries += log.append_many(items[n - 2:]) if group else []
    if confirm:
        log.confirm(confirm)
    log.close()
    return {e.seq: e for e in entries}, n - 2 if group else n - 1, confirm


def _mutate(m: bytes, spool: Path, holders: dict[int, tuple[str, int]]) -> tuple[set[str], set[tuple[str, int]]]:
    """Apply 4-byte mutations to the segments; the segments cut short, and the entry headers (as
    written: `holders`) hit."""
    cut: set[str] = set()
    hit: set[tuple[str, int]] = set()
    for i in range(0, min(len(m), 16) - 3, 4):
        kind, which, hi, lo = m[i:i + 4]
        segs = sorted(spool.glob("seg-*.log"))
        if not segs:
            break
        seg = segs[which % len(segs)]
        data = bytearray(seg.read_bytes())
        where = (hi << 8 | lo) % max(len(data), 1)
        starts = [offset for name, offset in holders.values() if name == seg.name]
        if kind % 5 == 3:
            seg.unlink()
            continue
        if kind % 5 == 2:
            seg.write_bytes(bytes(data[:where]))
            cut.add(seg.name)
            continue
        span = range(where, min(where + (16 if kind % 5 == 4 else 1), len(data)))
        for pos in span:
            data[pos] = 0 if kind % 5 == 4 else data[pos] ^ (1 << (kind >> 5))
        hit |= {(seg.name, s) for s in starts if s < span.stop and span.start < s + ENTRY_HEADER_SIZE}
        seg.write_bytes(bytes(data))
    return cut, hit


def _holders(spool: Path) -> dict[int, tuple[str, int]]:
    """seq -> (segment name, offset) of every entry as written."""
    out = {}
    for seg in sorted(spool.glob("seg-*.log")):
        for it in scan_segment(seg.read_bytes()):
            if isinstance(it, Found):
                out[it.seq] = (seg.name, it.offset)
    return out


def _covers(positions: list[tuple[int, int, int]], e: Entry) -> bool:
    return any(v == e.volume_id and lba <= e.lba and e.lba + e.block_count <= lba + n for v, lba, n in positions)


def recipe_outcome(data: bytes, spool: Path) -> str:
    r = data[1:5].ljust(4, b"\0")
    written, acked, confirmed = _write_recipe(r, spool)
    holders = _holders(spool)
    cut, hit = _mutate(data[5:], spool, holders)
    before = _files(spool)
    log = harness.rejects(EntryLog, spool, durable=False, block_size=BLOCK, record_damage=True, defer_repairs=True)
    assert isinstance(log, EntryLog), f"a damaged spool did not open the way the lab opens it: {log}"
    assert _files(spool) == before, "opening the way the lab opens it changed the spool"
    try:
        assert log.confirmed_seq == confirmed
        pending = {e.seq: e for e in _reads_back(log, spool)}
        damage = log.damage
        for seq, entry in written.items():
            if seq <= confirmed:
                continue
            if seq in pending:
                assert pending[seq] == entry, f"entry {seq} came back different"
            elif damage is not None and damage.first_seq <= seq <= damage.last_seq:
                if damage.positions is not None and holders[seq] not in hit:
                    assert _covers(damage.positions, entry), f"the damage does not name entry {seq}'s blocks"
            else:
                assert seq > acked and holders[seq][0] in cut, f"acknowledged entry {seq} was lost silently"
        assert log.next_seq > (max(written) if damage is not None else acked), "a sequence number is used again"
        nxt = log.next_seq
    finally:
        log.close()
    if damage is not None:
        return f"recipe: damage, {_released(spool, nxt)}"
    return "recipe: " + raw_outcome(spool)


def outcome(data: bytes) -> str:
    with harness.scratch() as site:
        spool = site / "spool"
        spool.mkdir()
        if data and data[0] & RECIPE:
            return recipe_outcome(data, spool)
        lay_out(data, spool)
        return raw_outcome(spool)


def check(data: bytes) -> None:
    outcome(data)


def _spool_input(spool: Path, flags: int = 0, drop_confirmed: bool = False) -> bytes:
    files = _files(spool)
    segs = sorted(n for n in files if n.startswith("seg-"))
    header = b" ".join(str(int(n[4:24])).encode() for n in segs)
    confirmed = files.get("confirmed.json", b"")
    manifest = [files[MANIFEST_FILE]] if MANIFEST_FILE in files else []
    flags |= (2 if drop_confirmed or "confirmed.json" not in files else 0) | (4 if manifest else 0)
    return bytes([flags]) + harness.join(header, confirmed, *manifest, *(files[n] for n in segs))


def seeds() -> list[bytes]:
    """Spools written by `EntryLog` itself (one segment, several, partly confirmed, and empty), and
    recipes: flipped bits, truncations and deleted segments of spools it writes."""
    out = []
    with harness.scratch() as site:
        for case, (count, segment_bytes, confirm) in enumerate([(3, 1 << 20, 0), (7, 100, 2), (5, 200, 5)]):
            spool = site / f"s{case}"
            log = EntryLog(spool, durable=False, segment_bytes=segment_bytes, block_size=BLOCK)
            for i in range(count):
                log.append(i % 2, 3 * i, bytes([i]) * BLOCK * (1 + i % 2))
            if confirm:
                log.confirm(confirm)
            log.close()
            out += [_spool_input(spool), _spool_input(spool, flags=1)]
    out.append(b"\0")
    recipe = bytes([RECIPE])
    out += [recipe + bytes([6, 1, 0, 0]), recipe + bytes([9, 2, 3, 1, 0, 1, 0, 90]),
            recipe + bytes([5, 0, 1, 0, 2, 0, 1, 10]), recipe + bytes([12, 1, 2, 0, 3, 0, 0, 0]),
            recipe + bytes([7, 3, 0, 1, 4, 1, 0, 40, 0, 0, 0, 5])]
    return out


def main() -> None:
    harness.atheris_main("spool", check, seeds())


if __name__ == "__main__":
    main()
