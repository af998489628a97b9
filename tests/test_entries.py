"""Entries, batches, the entry log (spool) and the receive journal (SPEC §4, DESIGN invariants 2, 6)."""

from __future__ import annotations

import hashlib
import logging
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vstore.blocks.codec import check_version, load_json, parse_checked, save_json_atomic
from vstore.blocks.errors import FormatError, TricopyError
from vstore.replication.entries import (
    BATCH,
    BATCH_MAGIC,
    BATCH_VERSION,
    ENTRY,
    ENTRY_HEADER_SIZE,
    ENTRY_MAGIC,
    ENTRY_VERSION,
    Entry,
    batch_parts,
    decode_batch,
    decode_entry,
    encode_batch,
    encode_batch_raw,
    encode_entry,
    entry_size,
)
from vstore.replication.journal import ReceiveJournal, Receiver
from vstore.replication.spool import EntryLog, EntryLogFull

BS = 512


def encode_entry_by_declaration(e: Entry) -> bytes:
    """An entry built through the full `ENTRY` declaration (slow: what the hot path must equal)."""
    header = dict(magic=ENTRY_MAGIC, version=ENTRY_VERSION, seq=e.seq, timestamp_ns=e.timestamp_ns,
                  volume_id=e.volume_id, lba=e.lba, block_count=e.block_count, block_size=e.block_size)
    return ENTRY.build(dict(body=dict(value=dict(header=header, payload=bytes(e.payload)))))


def decode_entry_by_declaration(buf: bytes) -> Entry:
    """An entry parsed through the full `ENTRY` declaration."""
    parsed = parse_checked(ENTRY, buf, "entry")
    h = parsed.body.value.header
    check_version(h.version, ENTRY_VERSION, "entry")
    return Entry(seq=h.seq, timestamp_ns=h.timestamp_ns, volume_id=h.volume_id, lba=h.lba,
                 block_count=h.block_count, payload=parsed.body.value.payload)
def encode_batch_by_declaration(entries: list[Entry], first: int, last: int, coalesced: bool) -> bytes:
    """A batch built through the full `BATCH` declaration."""
    header = dict(magic=BATCH_MAGIC, version=BATCH_VERSION, first_seq=first, last_seq=last, count=len(entries),
                  coalesced=coalesced)
    body = dict(header=header, entries=b"".join(encode_entry_by_declaration(e) for e in entries))
    return BATCH.build(dict(body=dict(value=body)))


def decode_batch_by_declaration(buf: bytes) -> tuple:
    """A batch parsed through the full `BATCH` declaration: its range, flag and entries."""
    b = parse_checked(BATCH, buf, "batch").body.value
    check_version(b.header.version, BATCH_VERSION, "batch")
    entries, offset = [], 0
    while offset < len(b.entries):
        size = entry_size(int.from_bytes(b.entries[offset + 34:offset + 38], "big"),
                          int.from_bytes(b.entries[offset + 38:offset + 42], "big"))
        entries.append(decode_entry_by_declaration(b.entries[offset:offset + size]))
        offset += size
    if len(entries) != b.header.count:
        raise FormatError("count")
    return b.header.first_seq, b.header.last_seq, bool(b.header.coalesced), entries


ONE = entry_size(1, BS)  # encoded size of a one-block entry
REPO = Path(__file__).resolve().parents[1]


def block(tag: int, count: int = 1) -> bytes:
    """Deterministic payload for a tag."""
    seed = hashlib.sha256(str(tag).encode()).digest()
    return (seed * (BS * count // len(seed) + 1))[:BS * count]


def make_entries(first: int, n: int) -> list[Entry]:
    return [Entry(seq=first + i, timestamp_ns=1000 + i, volume_id=i % 2, lba=i, block_count=1,
                  payload=block(first + i)) for i in range(n)]


def open_log(path: Path, **kw: object) -> EntryLog:
    kw.setdefault("durable", False)
    kw.setdefault("block_size", BS)
    return EntryLog(path, **kw)  # type: ignore[arg-type]


def segments(path: Path) -> list[Path]:
    return sorted(path.glob("seg-*.log"))


# -- entry and batch formats -----------------------------------------------------------------
@given(seq=st.integers(1, 2**63), ts=st.integers(0, 2**63), vol=st.integers(0, 2**31),
       lba=st.integers(0, 2**40), count=st.integers(1, 4))
@settings(max_examples=50)
def test_entry_round_trip(seq: int, ts: int, vol: int, lba: int, count: int) -> None:
    """An entry decodes to itself from any offset of a buffer, and decoding ends where it ends."""
    e = Entry(seq, ts, vol, lba, count, block(seq, count))
    data = b"junk" + encode_entry(e) + b"more"
    decoded, end = decode_entry(data, 4)
    assert decoded == e
    assert end == len(data) - 4


@given(seq=st.integers(1, 2**40), count=st.integers(1, 3), damage=st.lists(
    st.tuples(st.integers(0, 10**6), st.integers(1, 255)), max_size=3))
@settings(max_examples=200)
def test_fast_entry_decode_agrees_with_the_declaration(seq: int, count: int, damage: list) -> None:
    """`decode_entry` (compiled header, CRC over the body) accepts and refuses exactly what a parse
    through the `ENTRY` declaration does, and decodes the same entry."""
    raw = bytearray(encode_entry(Entry(seq, 5, 1, seq % 1000, count, block(seq, count))))
    for pos, xor in damage:
        raw[pos % len(raw)] ^= xor

    def outcome(decode):  # noqa: ANN001, ANN202
        try:
            return decode(bytes(raw))
        except FormatError:
            return "refused"

    assert outcome(lambda b: decode_entry(b)[0]) == outcome(decode_entry_by_declaration)


def test_store_encoded_keeps_the_received_bytes(tmp_path: Path) -> None:
    """A batch stored as received keeps those exact bytes; the journal refuses a second or a repeated batch."""
    entries = make_entries(1, 5)
    data = encode_batch_raw([encode_entry(e) for e in entries], 1, 5, coalesced=False)
    assert data == encode_batch(entries)
    j = ReceiveJournal(tmp_path / "recv", durable=False)
    batch = decode_batch(data)
    j.store_encoded(batch, data)
    assert (tmp_path / "recv").joinpath("batch.bin").read_bytes() == data
    with pytest.raises(TricopyError, match="not applied yet"):
        j.store_encoded(batch, data)
    j.mark_applied(batch.last_seq)
    assert j.applied_seq == 5 and j.stored() is None
    with pytest.raises(FormatError, match="gap or duplicate"):
        j.store_encoded(batch, data)


def test_every_flipped_bit_in_an_entry_is_refused() -> None:
    """A flipped bit in an entry's header or payload is refused."""
    data = encode_entry(make_entries(7, 1)[0])
    for pos in list(range(ENTRY_HEADER_SIZE + 8)) + [len(data) // 2, len(data) - 1]:
        bad = bytearray(data)
        bad[pos] ^= 0x04
        with pytest.raises(FormatError):
            decode_entry(bytes(bad))


def test_truncated_entry_is_refused() -> None:
    """An entry cut short anywhere is refused as truncated."""
    data = encode_entry(make_entries(1, 1)[0])
    for cut in (0, 10, ENTRY_HEADER_SIZE, len(data) - 1):
        with pytest.raises(FormatError, match="truncated"):
            decode_entry(data[:cut])


def test_batch_round_trip_and_damage() -> None:
    """A batch decodes to its entries; a flipped bit, a trailing byte or a bad magic is refused."""
    entries = make_entries(5, 4)
    data = encode_batch(entries)
    assert decode_batch(data).entries == entries
    assert decode_batch(encode_batch([])).entries == []
    bad = bytearray(data)
    bad[len(bad) // 2] ^= 1
    with pytest.raises(FormatError, match="CRC"):
        decode_batch(bytes(bad))
    with pytest.raises(FormatError):
        decode_batch(data + b"x")
    with pytest.raises(FormatError, match="bad magic"):
        decode_batch(b"XXXX" + data[4:])


def test_damaged_batch_changes_nothing_at_the_receiver(tmp_path: Path) -> None:
    """A damaged batch is refused before the receive journal stores anything."""
    j = ReceiveJournal(tmp_path, durable=False)
    data = encode_batch(make_entries(1, 2))
    for pos in range(0, len(data), 37):
        bad = bytearray(data)
        bad[pos] ^= 0x80
        with pytest.raises(FormatError):
            j.store(decode_batch(bytes(bad)).entries)
    assert j.stored() is None and j.applied_seq == 0 and sorted(p.name for p in tmp_path.iterdir()) == []


def test_batch_gap_is_refused() -> None:
    """A batch with a gap or a duplicate in its sequence numbers cannot be built."""
    entries = make_entries(1, 3)
    with pytest.raises(FormatError, match="gap or duplicate"):
        encode_batch([entries[0], entries[2]])
    with pytest.raises(FormatError, match="gap or duplicate"):
        encode_batch([entries[0], entries[0]])


def test_coalesced_batch_covers_its_range() -> None:
    """A coalesced batch names the whole sequence range it covers; kept entries must end it, inside and in order."""
    e = make_entries(10, 5)
    kept = [e[1], e[3], e[4]]  # 10 and 12 were overwritten later in the batch
    b = decode_batch(encode_batch(kept, first_seq=10, last_seq=14))
    assert (b.first_seq, b.last_seq, b.entries, b.coalesced) == (10, 14, kept, True)
    plain = decode_batch(encode_batch(e, first_seq=10, last_seq=14))
    assert not plain.coalesced and plain.entries == e
    for bad_kept, first, last in (([e[1], e[3]], 10, 14),   # must end at last_seq
                                  ([e[0], e[3], e[4]], 11, 14),  # entry before the range
                                  ([e[3], e[1], e[4]], 10, 14),  # out of order
                                  ([], 10, 14)):
        with pytest.raises(FormatError):
            encode_batch(bad_kept, first_seq=first, last_seq=last)


def test_receive_journal_coalesced_batch(tmp_path: Path) -> None:
    """The receive journal takes a coalesced batch as covering its whole range, and the next must follow it."""
    j = ReceiveJournal(tmp_path, durable=False)
    e = make_entries(1, 4)
    j.store([e[1], e[3]], first_seq=1, last_seq=4)
    assert j.stored() == [e[1], e[3]]
    j.mark_applied()
    assert j.applied_seq == 4
    with pytest.raises(FormatError, match="gap or duplicate"):
        j.store(make_entries(6, 1), first_seq=6, last_seq=6)
    j.store(make_entries(6, 1), first_seq=5, last_seq=6)
    save_json_atomic(tmp_path / "applied.json", {"applied_seq": 6})  # crash inside mark_applied
    assert ReceiveJournal(tmp_path).stored() is None


# -- the entry log -----------------------------------------------------------------------------
def test_append_pending_confirm_and_trim(tmp_path: Path) -> None:
    """Appended entries get consecutive seqs and stay pending until confirmed; confirmed segments are deleted."""
    log = open_log(tmp_path, segment_bytes=3 * ONE)
    appended = [log.append(1, i, block(i)) for i in range(10)]
    assert [e.seq for e in appended] == list(range(1, 11))
    assert log.pending() == appended
    assert log.pending(3) == appended[:3]
    assert len(segments(tmp_path)) == 4  # 3+3+3+1
    log.confirm(4)
    assert log.confirmed_seq == 4
    assert [e.seq for e in log.pending()] == list(range(5, 11))
    assert [p.name for p in segments(tmp_path)] == ["seg-00000000000000000004.log",
                                                   "seg-00000000000000000007.log",
                                                   "seg-00000000000000000010.log"]
    log.confirm(2)  # older confirmations are harmless
    with pytest.raises(TricopyError, match="last appended entry is 10"):
        log.confirm(11)
    log.confirm(10)
    assert segments(tmp_path) == [] and log.pending() == []
    assert log.stats().entries == 0
    log.close()


def test_reopen_keeps_sequence_gap_free(tmp_path: Path) -> None:
    """A reopened entry log continues its sequence with no gap, even with every segment trimmed."""
    log = open_log(tmp_path, segment_bytes=2 * ONE)
    for i in range(5):
        log.append(3, i, block(i))
    log.confirm(3)
    log.close()
    log = open_log(tmp_path)
    assert (log.next_seq, log.confirmed_seq) == (6, 3)
    assert [e.seq for e in log.pending()] == [4, 5]
    log.confirm(5)
    log.close()
    log = open_log(tmp_path)  # every segment trimmed: the sequence still continues
    assert log.next_seq == 6
    assert log.append(3, 0, block(0)).seq == 6
    log.close()


def test_append_many_group_commit(tmp_path: Path) -> None:
    """append_many gives consecutive seqs and its entries survive a reopen."""
    log = open_log(tmp_path, durable=True, segment_bytes=2 * ONE)
    out = log.append_many([(0, i, block(i)) for i in range(5)])
    assert [e.seq for e in out] == [1, 2, 3, 4, 5]
    assert log.append_many([]) == []
    log.close()
    log = open_log(tmp_path)
    assert log.pending() == out
    log.close()


def test_bad_payload_size_is_refused(tmp_path: Path) -> None:
    """A payload that is not whole blocks is refused and appends nothing."""
    log = open_log(tmp_path)
    with pytest.raises(ValueError):
        log.append(0, 0, b"x" * (BS + 1))
    assert log.next_seq == 1 and segments(tmp_path) == []


def test_capacity_refuses_without_writing(tmp_path: Path) -> None:
    """An append over the capacity raises EntryLogFull and writes nothing; a confirmation makes room."""
    one = len(encode_entry(make_entries(1, 1)[0]))
    log = open_log(tmp_path, capacity_bytes=3 * one)
    for i in range(3):
        log.append(0, i, block(i), timestamp_ns=1)
    before = {p.name: p.read_bytes() for p in segments(tmp_path)}
    with pytest.raises(EntryLogFull):
        log.append(0, 9, block(9))
    with pytest.raises(EntryLogFull):
        log.append_many([(0, 9, block(9))])
    assert {p.name: p.read_bytes() for p in segments(tmp_path)} == before
    assert log.next_seq == 4 and log.stats().bytes == 3 * one
    log.confirm(1)
    log.append(0, 9, block(9))  # room again after a confirmation
    with pytest.raises(EntryLogFull):
        log.append_many([(0, 1, block(1)), (0, 2, block(2))])
    assert log.next_seq == 5
    log.close()


def test_stats(tmp_path: Path) -> None:
    """stats counts the pending entries, their bytes, seqs and the oldest timestamp."""
    log = open_log(tmp_path)
    assert log.stats().oldest_timestamp_ns is None
    log.append(0, 0, block(0), timestamp_ns=111)
    log.append(0, 1, block(1), timestamp_ns=222)
    s = log.stats()
    assert (s.entries, s.oldest_timestamp_ns, s.first_seq, s.last_seq) == (2, 111, 1, 2)
    assert s.bytes == 2 * len(encode_entry(make_entries(1, 1)[0]))


ops = st.lists(st.one_of(
    st.tuples(st.just("append"), st.integers(0, 2), st.integers(0, 30), st.integers(1, 3)),
    st.tuples(st.just("confirm"), st.integers(0, 100)),
    st.tuples(st.just("reopen")),
), max_size=30)
queries = st.lists(st.tuples(st.integers(0, 2), st.integers(0, 35), st.integers(1, 40)), max_size=8)


@given(ops=ops, queries=queries)
@settings(max_examples=40, deadline=None)
def test_has_unshipped_matches_a_brute_force_model(ops: list[tuple], queries: list[tuple]) -> None:
    """has_unshipped and unshipped_blocks match a brute-force model through appends, confirms and reopens."""
    with tempfile.TemporaryDirectory() as d:
        log = open_log(Path(d), segment_bytes=1500)
        model: list[tuple[int, int, int, int]] = []  # (seq, vol, lba, count)
        confirmed = 0
        for op in ops:
            if op[0] == "append":
                _, vol, lba, count = op
                e = log.append(vol, lba, block(lba, count))
                model.append((e.seq, vol, lba, count))
            elif op[0] == "confirm" and model:
                confirmed = max(confirmed, min(op[1], model[-1][0]))
                log.confirm(min(op[1], model[-1][0]))
            elif op[0] == "reopen":
                log.close()
                log = open_log(Path(d), segment_bytes=1500)
            live = [m for m in model if m[0] > confirmed]
            for vol, first, count in queries:
                want = any(v == vol and lba < first + count and first < lba + n for _, v, lba, n in live)
                assert log.has_unshipped(vol, [(first, count)]) == want
            for vol in range(3):
                want_blocks = {b for _, v, lba, n in live if v == vol for b in range(lba, lba + n)}
                assert log.unshipped_blocks(vol) == want_blocks
        assert [e.seq for e in log.pending()] == [m[0] for m in model if m[0] > confirmed]
        log.close()


def test_corrupt_byte_in_a_middle_segment_is_refused(tmp_path: Path) -> None:
    """A damaged entry in a middle segment makes the log refuse to open, naming the segment and offset."""
    log = open_log(tmp_path, segment_bytes=2 * ONE)
    for i in range(6):
        log.append(0, i, block(i))
    log.close()
    middle = segments(tmp_path)[1]
    data = bytearray(middle.read_bytes())
    data[100] ^= 0xFF
    middle.write_bytes(bytes(data))
    with pytest.raises(FormatError, match=rf"{middle.name}: damaged entry at offset 0 .*followed by valid"):
        open_log(tmp_path)


def test_corrupt_entry_followed_by_good_ones_in_last_segment_is_refused(tmp_path: Path) -> None:
    """A damaged entry followed by valid ones is refused (not a torn tail), and nothing is changed."""
    log = open_log(tmp_path)
    for i in range(4):
        log.append(0, i, block(i))
    log.close()
    seg = segments(tmp_path)[0]
    data = bytearray(seg.read_bytes())
    one = len(data) // 4
    data[one + 200] ^= 0x01  # second entry's payload
    seg.write_bytes(bytes(data))
    with pytest.raises(FormatError, match=f"offset {one}"):
        open_log(tmp_path)
    assert seg.read_bytes() == bytes(data)  # nothing changed


def test_torn_tail_is_dropped_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A torn last entry is dropped with a warning; the entries before it and later appends are kept."""
    log = open_log(tmp_path)
    for i in range(3):
        log.append(0, i, block(i))
    log.close()
    seg = segments(tmp_path)[0]
    size = seg.stat().st_size
    os.truncate(seg, size - 100)
    with caplog.at_level(logging.WARNING, logger="vstore.entries"):
        log = open_log(tmp_path)
    assert "torn tail" in caplog.text
    assert seg.stat().st_size == size // 3 * 2
    assert [e.seq for e in log.pending()] == [1, 2]
    assert log.append(0, 7, block(7)).seq == 3
    log.close()
    log = open_log(tmp_path)
    assert [e.payload for e in log.pending()] == [block(0), block(1), block(7)]


def test_torn_first_entry_removes_the_segment(tmp_path: Path) -> None:
    """A segment whose only entry is torn is removed, and its seq is used again."""
    log = open_log(tmp_path, segment_bytes=BS)
    log.append(0, 0, block(0))
    log.append(0, 1, block(1))
    log.close()
    last = segments(tmp_path)[-1]
    os.truncate(last, 30)
    log = open_log(tmp_path)
    assert not last.exists()
    assert log.next_seq == 2
    assert log.append(0, 1, block(1)).seq == 2


SIGKILL_CHILD = """
import sys
sys.path.insert(0, {repo!r})
import hashlib
from pathlib import Path
from vstore.replication.spool import EntryLog

def block(tag, count=1):
    seed = hashlib.sha256(str(tag).encode()).digest()
    return (seed * (512 * count // len(seed) + 1))[:512 * count]

log = EntryLog(Path({spool!r}), durable=True, segment_bytes=4096, block_size=512)
print("ready", flush=True)
while True:
    seq = log.next_seq
    if seq % 3:
        e = log.append(seq % 5, seq, block(seq))
        print(e.seq, flush=True)
    else:
        out = log.append_many([(seq % 5, seq, block(seq)), (0, seq + 1, block(seq + 1, 2))])
        print(out[0].seq, out[1].seq, flush=True)
    if seq % 7 == 0:
        log.confirm(seq - 3)
"""


@pytest.mark.parametrize("round_", range(3))
def test_sigkill_keeps_every_acknowledged_entry(tmp_path: Path, round_: int) -> None:
    """Every seq the child printed (after append returned) survives SIGKILL, gap-free, intact."""
    spool = tmp_path / "spool"
    script = SIGKILL_CHILD.format(repo=str(REPO), spool=str(spool))
    acked: list[int] = []
    for _kill in range(2):  # kill, restart the child on the same spool, kill again
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(random.uniform(0.02, 0.25))
        os.kill(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        acked += [int(x) for line in out.split("\n")[:-1] for x in line.split()]  # complete lines only
        log = open_log(spool, durable=True)
        on_disk = {e.seq: e for e in log.pending()}
        assert list(on_disk) == list(range(log.confirmed_seq + 1, log.next_seq))
        assert acked and max(acked) < log.next_seq
        for seq in acked:
            if seq > log.confirmed_seq:
                e = on_disk[seq]
                assert e.lba == seq and e.payload == block(seq, e.block_count)
        log.close()


# -- the receive journal -----------------------------------------------------------------------
def test_receive_journal_store_apply(tmp_path: Path) -> None:
    """A stored batch is kept until marked applied; the applied seq survives a reopen."""
    j = ReceiveJournal(tmp_path)
    assert j.applied_seq == 0 and j.stored() is None
    batch = make_entries(1, 3)
    j.store(batch)
    assert j.stored() == batch
    with pytest.raises(TricopyError, match="not applied yet"):
        j.store(make_entries(4, 1))
    j.mark_applied()
    assert j.applied_seq == 3 and j.stored() is None
    assert not (tmp_path / "batch.bin").exists()
    j2 = ReceiveJournal(tmp_path)
    assert j2.applied_seq == 3
    with pytest.raises(TricopyError):
        j2.mark_applied()


def test_receive_journal_refuses_gaps_and_duplicates(tmp_path: Path) -> None:
    """The receive journal refuses a batch that does not follow the applied seq, and an empty one."""
    j = ReceiveJournal(tmp_path, durable=False)
    j.store(make_entries(1, 2))
    j.mark_applied()
    for first in (1, 2, 4):
        with pytest.raises(FormatError, match="gap or duplicate"):
            j.store(make_entries(first, 2))
    assert j.stored() is None
    with pytest.raises(TricopyError):
        j.store([])


def test_receive_journal_crash_before_mark_applied_keeps_the_batch(tmp_path: Path) -> None:
    """A crash before mark_applied leaves the stored batch to be applied again."""
    j = ReceiveJournal(tmp_path)
    j.store(make_entries(1, 2))
    # crash after applying some blocks, before mark_applied: the batch is still there to re-apply
    j = ReceiveJournal(tmp_path)
    assert j.applied_seq == 0 and j.stored() == make_entries(1, 2)


def test_receive_journal_crash_inside_mark_applied(tmp_path: Path) -> None:
    """A crash inside mark_applied (after the seq is saved) leaves no batch and the next one follows."""
    j = ReceiveJournal(tmp_path)
    j.store(make_entries(1, 2))
    save_json_atomic(tmp_path / "applied.json", {"applied_seq": 2})  # crash before batch.bin unlink
    j = ReceiveJournal(tmp_path)
    assert j.applied_seq == 2 and j.stored() is None
    j.store(make_entries(3, 1))


def test_receive_journal_crash_inside_store_leaves_nothing(tmp_path: Path) -> None:
    """A crash inside store leaves no batch and no temporary file after reopening."""
    (tmp_path / ".batch.bin.abc.tmp").write_bytes(b"half a batch")
    j = ReceiveJournal(tmp_path)
    assert j.stored() is None and not list(tmp_path.glob(".*.tmp"))


def test_receive_journal_damaged_batch_and_resync(tmp_path: Path) -> None:
    """A damaged stored batch is refused but the journal opens, so a resync can set the applied seq past it."""
    j = ReceiveJournal(tmp_path)
    j.store(make_entries(1, 2))
    path = tmp_path / "batch.bin"
    data = bytearray(path.read_bytes())
    data[-10] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(FormatError, match="batch.bin"):
        j.stored()
    j = ReceiveJournal(tmp_path)  # still opens, so that a resync can clear the damage
    with pytest.raises(FormatError, match="CRC"):
        j.stored()
    j.set_applied_seq(40)
    assert j.applied_seq == 40 and j.stored() is None
    assert ReceiveJournal(tmp_path).applied_seq == 40
    j.store(make_entries(41, 1))


# -- state files -------------------------------------------------------------------------------
def test_statefile_round_trip_and_errors(tmp_path: Path) -> None:
    """State files round-trip atomically, and a missing, non-JSON or non-object file is refused by name."""
    path = tmp_path / "state.json"
    save_json_atomic(path, {"a": [1, 2], "b": None})
    assert load_json(path) == {"a": [1, 2], "b": None}
    save_json_atomic(path, {"a": 3}, durable=False)
    assert load_json(path) == {"a": 3}
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]
    with pytest.raises(FileNotFoundError):
        load_json(tmp_path / "missing.json")
    path.write_text("{not json")
    with pytest.raises(FormatError, match="state.json is not valid JSON"):
        load_json(path)
    path.write_text("[1]")
    with pytest.raises(FormatError, match="not an object"):
        load_json(path)


def test_fast_encoder_matches_the_declaration():
    """The fast entry encoder gives the same bytes as building through the `ENTRY` declaration."""
    for n in (1, 3):
        e = Entry(seq=7, timestamp_ns=123, volume_id=2, lba=99, block_count=n, payload=bytes(range(256)) * 16 * n)
        assert encode_entry(e) == encode_entry_by_declaration(e)


@given(n=st.integers(0, 4), coalesce=st.booleans(), damage=st.lists(
    st.tuples(st.integers(0, 10**6), st.integers(1, 255)), max_size=2))
@settings(max_examples=200)
def test_batch_codec_agrees_with_the_declaration(n: int, coalesce: bool, damage: list) -> None:
    """`batch_parts` builds what `BATCH` builds, byte for byte; `decode_batch` (one pass, views)
    accepts and refuses what a parse through `BATCH` does, with the same range and entries."""
    entries = make_entries(3, n)
    kept = [e for i, e in enumerate(entries) if not coalesce or i % 2 or i == n - 1]
    first, last = (3, 2 + n) if n else (0, 0)
    flag = len(kept) != len(entries)
    raw = b"".join(batch_parts([encode_entry(e) for e in kept], first, last, coalesced=flag))
    assert raw == encode_batch_by_declaration(kept, first, last, flag)
    bad = bytearray(raw)
    for pos, xor in damage:
        bad[pos % len(bad)] ^= xor

    def outcome(decode):  # noqa: ANN001, ANN202
        try:
            return decode(bytes(bad))
        except FormatError:
            return "refused"

    fast = outcome(lambda b: (lambda x: (x.first_seq, x.last_seq, x.coalesced, x.entries))(decode_batch(b)))
    slow = outcome(decode_batch_by_declaration)
    assert fast == slow, (fast, slow)


def test_a_decoded_batch_holds_views_of_the_received_bytes() -> None:
    """Decoding a batch copies no payload: each entry's payload is a view into the batch's buffer."""
    data = bytearray(encode_batch(make_entries(1, 3)))
    batch = decode_batch(data)
    assert all(isinstance(e.payload, memoryview) and e.payload.obj is data for e in batch.entries)


def test_receiver_writes_runs_of_continuing_entries_with_one_writev(tmp_path: Path) -> None:
    """Given a `writev`, the receiver writes each run of entries that continue one another on one
    volume with one call of the received payloads (no join), in order, and the volumes end as
    entry-by-entry writes leave them, overwrites included."""
    entries = [Entry(1, 0, 0, 10, 1, block(1)), Entry(2, 0, 0, 11, 2, block(2, 2)),  # one run: 10..12
               Entry(3, 0, 1, 13, 1, block(3)),  # another volume
               Entry(4, 0, 0, 13, 1, block(4)), Entry(5, 0, 0, 11, 1, block(5))]  # 13 continues; 11 goes back
    calls: list[tuple[str, int, list]] = []
    images: dict[str, bytearray] = {"D0": bytearray(20 * BS), "D1": bytearray(20 * BS)}

    def writev(volume: str, lba: int, payloads: list) -> None:
        calls.append((volume, lba, payloads))
        data = b"".join(payloads)
        images[volume][lba * BS:lba * BS + len(data)] = data

    receiver = Receiver(ReceiveJournal(tmp_path, durable=False), "async", {0: "D0", 1: "D1"},
                        lambda v, lba, d: None, lambda v: None, writev=writev)
    data = encode_batch(entries)
    assert receiver.receive_encoded(data, 1, 5) == 5
    assert [(v, lba, len(p)) for v, lba, p in calls] == [("D0", 10, 2), ("D1", 13, 1), ("D0", 13, 1), ("D0", 11, 1)]
    assert all(isinstance(p, memoryview) for _, _, payloads in calls for p in payloads)
    expected = {"D0": bytearray(20 * BS), "D1": bytearray(20 * BS)}
    for e in entries:
        expected["D0" if e.volume_id == 0 else "D1"][e.lba * BS:(e.lba + e.block_count) * BS] = e.payload
    assert images == expected
