"""Fuzz target: the receive journal reopened over a fuzzed batch.bin and applied.json, and the
crash-recovery path that finishes the stored batch (SPEC §4 [0044]-[0045]; DESIGN invariants 2, 5).

Keeps true for every input: `ReceiveJournal` opens or raises a project error, and a refused
directory is left as it was; opening only deletes a batch already applied. A stored batch that is
returned starts right after the applied sequence; finishing it writes its entries in order to the
volumes their ids name (or refuses an unknown id, writing nothing), records its last sequence as
applied and deletes it; the journal then reopens to the same state and takes the next batch. A
stored batch that cannot be read is never applied, and `set_applied_seq` clears it.

The targets kept beside a batch (targets.json) load as `Targets` declares them (volume id -> volume
name) or raise a project error.

Input: one flags byte, then batch.bin, applied.json and (optionally) targets.json cut at
`harness.SEP`. Flag bit 0 recomputes the batch's CRCs; bit 1 leaves batch.bin out, bit 2 applied.json.
"""

from __future__ import annotations

from pathlib import Path

from tools.fuzz import harness
from tools.fuzz.entries import seal_batch
from vstore.replication.entries import MAX_SEQ, Batch, Entry, encode_batch
from vstore.replication.journal import TARGETS_FILE, ReceiveJournal, Receiver

VOLUMES = {0: "D0", 1: "D1"}


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def lay_out(data: bytes, recv: Path) -> None:
    flags, rest = (data[0], data[1:]) if data else (0, b"")
    batch, applied, targets = harness.split(rest, 3)
    if batch is not None and not flags & 2:
        buf = bytearray(batch)
        if flags & 1:
            seal_batch(buf)
        (recv / "batch.bin").write_bytes(bytes(buf))
    if applied is not None and not flags & 4:
        (recv / "applied.json").write_bytes(applied)
    if targets is not None:
        (recv / TARGETS_FILE).write_bytes(targets)


def _targets(journal: ReceiveJournal) -> None:
    kept = harness.rejects(journal.saved_targets)
    if harness.ok(kept) and kept is not None:
        assert isinstance(kept, dict)
        assert all(isinstance(k, int) and 0 <= k < 1 << 32 and isinstance(v, str) and v for k, v in kept.items())


def _finish(journal: ReceiveJournal, recv: Path) -> str:
    applied = journal.applied_seq
    writes: list[tuple[str, int, bytes]] = []
    receiver = Receiver(journal, "async", VOLUMES, lambda v, lba, data: writes.append((v, lba, data)),
                        lambda v: None)
    stored = harness.rejects(journal.stored_batch)
    if not harness.ok(stored):
        files = _files(recv)
        assert not harness.ok(harness.rejects(receiver.finish_stored)) and not writes, \
            "a stored batch that cannot be read was applied"
        assert _files(recv) == files
        journal.set_applied_seq(applied)
        assert journal.stored() is None
        return harness.describe(stored)
    if stored is None:
        assert receiver.finish_stored() == 0 and not writes
        result = "nothing stored"
    else:
        assert isinstance(stored, Batch) and stored.first_seq == applied + 1 <= stored.last_seq
        done = harness.rejects(receiver.finish_stored)
        if not harness.ok(done):
            assert any(e.volume_id not in VOLUMES for e in stored.entries), f"finishing failed: {done}"
            assert not writes, "a batch naming an unknown volume was partly applied"
            return harness.describe(done)
        assert done == len(stored.entries)
        assert writes == [(VOLUMES[e.volume_id], e.lba, e.payload) for e in stored.entries]
        assert journal.applied_seq == stored.last_seq and journal.stored() is None
        result = f"finished {done}"
    again = ReceiveJournal(recv, durable=False)
    assert again.applied_seq == journal.applied_seq and again.stored() is None
    if again.applied_seq < MAX_SEQ:
        nxt = again.applied_seq + 1
        again.store([Entry(nxt, 0, 0, 0, 1, b"x" * 8)])
        assert [e.seq for e in again.stored() or []] == [nxt]
    return result


def outcome(data: bytes) -> str:
    with harness.scratch() as site:
        recv = site / "recv"
        recv.mkdir()
        lay_out(data, recv)
        before = _files(recv)
        journal = harness.rejects(ReceiveJournal, recv, durable=False)
        after = _files(recv)
        if not harness.ok(journal):
            assert after == before, "a refused receive journal was changed"
            return harness.describe(journal)
        assert isinstance(journal, ReceiveJournal)
        assert after == before or (set(before) - set(after) == {"batch.bin"} and set(after) <= set(before)), \
            "opening changed more than an applied batch.bin"
        _targets(journal)
        return _finish(journal, recv)


def check(data: bytes) -> None:
    outcome(data)


def seeds() -> list[bytes]:
    e = [Entry(seq, 1_700_000_000_000_000_000 + seq, seq % 2, 4 * seq, 1, bytes([seq]) * 8) for seq in range(1, 6)]
    applied = b'{"applied_seq": 2}'
    plain = encode_batch(e[2:])
    coalesced = encode_batch([e[2], e[4]], first_seq=3, last_seq=5)
    first = encode_batch(e[:2])
    out = [b"\0" + harness.join(plain, applied), b"\0" + harness.join(coalesced, applied),
           b"\4" + first, b"\2" + harness.join(b"", applied), b"\0" + harness.join(first, applied),
           b"\6", b"\2" + harness.join(b"", applied, b'{"0": "D0", "1": "D1"}'),
           b"\2" + harness.join(b"", applied, b'{"x": 5}')]
    return out + [bytes([s[0] | 1]) + s[1:] for s in out]


def main() -> None:
    harness.atheris_main("journal", check, seeds())


if __name__ == "__main__":
    main()
