"""Damage to the spool (SPEC §4 [0044], DESIGN invariants 2, 5, 6): the spool tells a torn tail (an
append cut by a crash, never acknowledged) from damage to acknowledged entries, never cuts the
latter away, never uses a sequence number twice, and refuses a `confirmed.json` past what it held;
the lab answers damage by suspending the async group with the positions recorded, and reading
commands change no byte of the spool."""

from __future__ import annotations

import io
import json
import os
import shutil
import time
from pathlib import Path

import pytest
from rich.console import Console

from tests.helpers import BS, blocks, image
from vstore.blocks.codec import save_json_atomic
from vstore.blocks.errors import FormatError
from vstore.cli.dashboard import collect, render
from vstore.replication.entries import SPOOL_MANIFEST, Manifest, decode_manifest, encode_manifest, entry_size
from vstore.replication.segments import MANIFEST_FILE
from vstore.replication.spool import EntryLog, SpoolDamage

SMALL = 512
ONE = entry_size(1, SMALL)


def payload(tag: int, count: int = 1) -> bytes:
    return bytes([tag % 256]) * SMALL * count


def spool_log(path: Path, **kw: object) -> EntryLog:
    kw.setdefault("durable", False)
    kw.setdefault("block_size", SMALL)
    return EntryLog(path, **kw)  # type: ignore[arg-type]


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def segments(folder: Path) -> list[Path]:
    return sorted(folder.glob("seg-*.log"))


def flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def written_log(path: Path, count: int, **kw: object) -> EntryLog:
    log = spool_log(path, **kw)
    for i in range(count):
        log.append(i % 2, 10 * i, payload(i))
    log.close()
    return log


def test_manifest_slots_agree_with_the_declaration() -> None:
    """A manifest slot is `SPOOL_MANIFEST` byte for byte; of two slots the newest valid one is read,
    and a damaged one is passed over."""
    old, new = Manifest(4, 1, 2, 9, 1, 100), Manifest(5, 2, 3, 9, 1, 150)
    fields = dict(magic=b"TCSM", version=1, generation=5, acked_seq=2, high_seq=3, reserved_seq=9,
                  active_first=1, active_end=150)
    assert encode_manifest(new) == SPOOL_MANIFEST.build(dict(body=dict(value=fields)))
    assert decode_manifest(encode_manifest(old) + encode_manifest(new), "m") == new
    damaged = bytearray(encode_manifest(new))
    damaged[20] ^= 4
    assert decode_manifest(encode_manifest(old) + bytes(damaged), "m") == old
    assert decode_manifest(b"\0" * 10, "m") is None


# -- the entry log --------------------------------------------------------------------------------
@pytest.mark.parametrize("which", [1, 2, 3])
def test_bit_flip_in_an_acknowledged_entry_is_damage_with_its_position(tmp_path: Path, which: int) -> None:
    """One flipped payload bit in any entry of the last segment (the last one included) is damage
    naming that entry and the blocks it touched, never a torn tail cut away: the file keeps every byte."""
    written_log(tmp_path, 3)
    seg = segments(tmp_path)[0]
    flip(seg, (which - 1) * ONE + 100)
    before = files(tmp_path)
    with pytest.raises(SpoolDamage) as raised:
        spool_log(tmp_path)
    assert (raised.value.first_seq, raised.value.last_seq) == (which, 3)
    assert raised.value.positions is not None
    assert ((which - 1) % 2, 10 * (which - 1), 1) in raised.value.positions
    assert files(tmp_path) == before


def test_recorded_damage_keeps_the_good_prefix_and_never_reuses_a_sequence(tmp_path: Path) -> None:
    """With damage recorded the entries before it stay pending, appends are refused, nothing is
    written until a confirmation past the damage, and the sequence then continues above every
    number ever used."""
    written_log(tmp_path, 4)
    flip(segments(tmp_path)[0], 2 * ONE + 60)  # entry 3
    before = files(tmp_path)
    log = spool_log(tmp_path, record_damage=True, defer_repairs=True)
    assert log.damage is not None and (log.damage.first_seq, log.damage.last_seq) == (3, 4)
    assert [e.seq for e in log.pending()] == [1, 2]
    assert log.next_seq > 4
    with pytest.raises(SpoolDamage):
        log.append(0, 0, payload(9))
    assert files(tmp_path) == before
    nxt = log.next_seq
    log.release_damage()
    assert log.damage is None and log.confirmed_seq == nxt - 1
    assert log.append(0, 0, payload(9)).seq == nxt
    log.close()
    again = spool_log(tmp_path)
    assert [e.seq for e in again.pending()] == [nxt]
    again.close()


def test_truncated_acknowledged_entries_are_damage(tmp_path: Path) -> None:
    """Cutting a segment inside an entry whose append had returned before the next began is
    damage (the watermark covers it), not a torn tail."""
    written_log(tmp_path, 4)
    seg = segments(tmp_path)[0]
    os.truncate(seg, ONE + 30)  # inside entry 2; entries 2 and 3 were acknowledged by later appends
    with pytest.raises(SpoolDamage) as raised:
        spool_log(tmp_path)
    assert raised.value.first_seq == 2 and raised.value.last_seq >= 3
    assert seg.stat().st_size == ONE + 30


def test_deleted_newest_segment_is_detected_and_no_sequence_is_reused(tmp_path: Path) -> None:
    """A deleted newest segment is damage whose positions are unknown (every volume needs a full
    differential check); the next sequence number is above every one that segment could hold."""
    written_log(tmp_path, 5, segment_bytes=2 * ONE)
    newest = segments(tmp_path)[-1]
    assert newest.name == "seg-00000000000000000005.log"
    newest.unlink()
    with pytest.raises(SpoolDamage, match="all volumes need a full differential check") as raised:
        spool_log(tmp_path)
    assert raised.value.positions is None and raised.value.first_seq == 5
    log = spool_log(tmp_path, record_damage=True)
    assert [e.seq for e in log.pending()] == [1, 2, 3, 4]
    assert log.next_seq > 5
    log.release_damage()
    assert log.append(0, 0, payload(7)).seq > 5
    log.close()


def test_deleted_segments_after_confirmation_are_damage(tmp_path: Path) -> None:
    """With every segment gone, acknowledged entries after the confirmed one are missing: damage,
    and the sequence does not fall back to confirmed+1."""
    log = written_log(tmp_path, 4)
    log = spool_log(tmp_path)
    log.confirm(1)
    log.close()
    for seg in segments(tmp_path):
        seg.unlink()
    with pytest.raises(SpoolDamage):
        spool_log(tmp_path)
    log = spool_log(tmp_path, record_damage=True)
    assert log.next_seq > 4
    log.close()


def test_confirmed_beyond_the_spool_is_refused(tmp_path: Path) -> None:
    """A confirmed.json past the last entry the spool ever held is refused, naming the file and
    both numbers, and no segment is deleted."""
    written_log(tmp_path, 3)
    save_json_atomic(tmp_path / "confirmed.json", {"confirmed_seq": 2**64 - 10})
    before = files(tmp_path)
    with pytest.raises(FormatError, match=rf"confirmed.json: confirmed_seq {2**64 - 10} .*\(3\)"):
        spool_log(tmp_path)
    with pytest.raises(FormatError, match="beyond the last entry"):
        spool_log(tmp_path, record_damage=True, defer_repairs=True)
    assert files(tmp_path) == before


def test_confirmed_beyond_a_fully_trimmed_spool_is_refused(tmp_path: Path) -> None:
    """With every entry confirmed and trimmed, the manifest still knows the last one: a larger
    confirmed.json is refused."""
    log = written_log(tmp_path, 3)
    log = spool_log(tmp_path)
    log.confirm(3)
    log.close()
    assert segments(tmp_path) == [] and (tmp_path / MANIFEST_FILE).is_file()
    save_json_atomic(tmp_path / "confirmed.json", {"confirmed_seq": 9})
    with pytest.raises(FormatError, match="confirmed_seq 9 is beyond the last entry the spool ever held \\(3\\)"):
        spool_log(tmp_path)


def test_deferred_open_of_a_torn_spool_writes_nothing(tmp_path: Path) -> None:
    """Opened the way read-only commands open it, even a spool with a torn tail is left as it is;
    the tail is cut at the first append."""
    written_log(tmp_path, 3)
    seg = segments(tmp_path)[0]
    os.truncate(seg, 3 * ONE - 20)  # the last append, never followed by another: torn
    before = files(tmp_path)
    log = spool_log(tmp_path, record_damage=True, defer_repairs=True)
    assert log.damage is None and [e.seq for e in log.pending()] == [1, 2]
    assert files(tmp_path) == before
    assert log.append(0, 0, payload(5)).seq == 3
    assert seg.stat().st_size == 3 * ONE
    log.close()


# -- the lab --------------------------------------------------------------------------------------
def spool_dir(lab: Path) -> Path:
    return lab / "primary" / "spool"


def pair(lab: Path, vstore, name: str) -> dict:  # noqa: ANN001
    doc = json.loads(vstore("status", lab, "--json").stdout)
    return next(p for p in doc["pairs"] if p["name"] == name) | {"spool_damage": doc["spool_damage"]}


def test_bit_flip_in_the_last_segment_suspends_and_the_write_reaches_d(make_lab, vstore) -> None:
    """A flipped bit in the newest entry of the lab's spool: status (like verify and the dashboard,
    changing no byte of the spool) shows the async pair Suspend with the damage; verify --repair
    leaves verify clean; the next ship resynchronises the recorded blocks, so every acknowledged
    write reaches D."""
    lab = make_lab()
    for i in range(3):
        vstore("write", lab, "--lba", 10 + i, input=blocks(i))
    seg = segments(spool_dir(lab))[-1]
    flip(seg, seg.stat().st_size - 100)  # the payload of the last entry
    before = files(spool_dir(lab))
    status = pair(lab, vstore, "A->D")
    assert status["state"] == "Suspend" and status["failure"] and "spool damage" in status["reason"]
    assert status["spool_damage"]["last_seq"] == 3 and not status["spool_damage"]["all_volumes"]
    assert status["recorded_blocks"] == 3  # the damaged entry and the unshipped ones before it
    assert "spool damage: " in vstore("status", lab).stdout  # loud in the table too
    vstore("verify", lab, "--json", ok=False)
    snapshot = collect(lab)
    assert snapshot["spool_damage"]["first_seq"] == 3
    console = Console(record=True, width=160, file=io.StringIO())
    console.print(render(snapshot))
    assert "SPOOL DAMAGE: " in console.export_text()  # and in the dashboard's header
    assert files(spool_dir(lab)) == before  # status, verify and the dashboard only read it
    repaired = vstore("verify", lab, "--repair", "--json")
    assert all(not r["differing_ranges"] for r in json.loads(repaired.stdout)["pairs"])
    vstore("write", lab, "--lba", 20, input=blocks(9))
    vstore("ship", lab)
    after = pair(lab, vstore, "A->D")
    assert after["state"] == "Duplex" and after["spool_damage"] is None
    result = json.loads(vstore("verify", lab, "--json").stdout)["pairs"]
    assert all(not r["differing_ranges"] and r["skipped_unshipped"] == 0 for r in result)
    d = image(lab, "async", "D")
    for i in range(3):
        assert d[(10 + i) * BS:(11 + i) * BS] == blocks(i)
    assert d[20 * BS:21 * BS] == blocks(9)


def test_deleted_spool_segment_in_a_lab_resyncs_every_volume(make_lab, vstore) -> None:
    """A lab whose (only, so newest) spool segment is gone: the async pair goes Suspend with every block
    recorded (the lost positions are unknown), the next ship copies them, and verify is clean."""
    lab = make_lab()
    for i in range(2):
        vstore("write", lab, "--lba", 3 + i, input=blocks(40 + i))
    for seg in segments(spool_dir(lab)):
        seg.unlink()
    status = pair(lab, vstore, "A->D")
    assert status["state"] == "Suspend" and status["spool_damage"]["all_volumes"]
    vstore("ship", lab)
    assert pair(lab, vstore, "A->D")["state"] == "Duplex"
    assert all(not r["differing_ranges"] for r in json.loads(vstore("verify", lab, "--json").stdout)["pairs"])
    d = image(lab, "async", "D")
    assert d[3 * BS:5 * BS] == blocks(40) + blocks(41)
    vstore("write", lab, "--lba", 7, input=blocks(50))
    vstore("ship", lab)
    assert image(lab, "async", "D")[7 * BS:8 * BS] == blocks(50)


@pytest.mark.parametrize("lose", ["the spool directory", "the manifest and the segments"])
def test_a_lost_spool_is_damage_and_no_sequence_is_reused(make_lab, vstore, lose: str) -> None:
    """The spool's files gone altogether (its directory, or the manifest with the segments) after
    acknowledged, unshipped writes: the site's state saw those entries, so the async pair goes Suspend
    with every block recorded instead of numbering new entries from 1 again; the next ship
    resynchronises D, later writes reach it, and verify is clean."""
    lab = make_lab()
    for i in range(3):
        vstore("write", lab, "--lba", 3 + i, input=blocks(60 + i))
    state = json.loads((lab / "primary" / "state.json").read_text())
    assert state["host"]["spool_seq"] == 3
    if lose == "the spool directory":
        shutil.rmtree(spool_dir(lab))
    else:
        for path in [*segments(spool_dir(lab)), spool_dir(lab) / MANIFEST_FILE]:
            path.unlink()
    status = pair(lab, vstore, "A->D")
    assert status["state"] == "Suspend" and status["spool_damage"]["all_volumes"], status
    assert status["spool_damage"]["last_seq"] == 3
    vstore("ship", lab)
    assert pair(lab, vstore, "A->D")["state"] == "Duplex"
    vstore("write", lab, "--lba", 9, input=blocks(70))
    vstore("ship", lab)
    d = image(lab, "async", "D")
    assert d[3 * BS:6 * BS] == blocks(60) + blocks(61) + blocks(62) and d[9 * BS:10 * BS] == blocks(70)
    assert all(not r["differing_ranges"] for r in json.loads(vstore("verify", lab, "--json").stdout)["pairs"])
    assert json.loads((lab / "primary" / "state.json").read_text())["host"]["spool_seq"] > 3


def lose_unshipped_positions(lab: Path, vstore) -> None:  # noqa: ANN001
    """Five writes shipped, then two acknowledged ones whose entries are lost with their headers."""
    for i in range(5):
        vstore("write", lab, "--lba", 30 + i, input=blocks(80 + i))
    vstore("ship", lab)
    vstore("write", lab, "--lba", 3, input=blocks(90))
    vstore("write", lab, "--lba", 200, input=blocks(91))
    for seg in segments(spool_dir(lab)):
        seg.unlink()


def async_name(lab: Path, vstore) -> str:  # noqa: ANN001
    doc = json.loads(vstore("status", lab, "--json").stdout)
    return next(p["name"] for p in doc["pairs"] if p["kind"] == "async")


def assert_d_has_every_write(lab: Path, vstore) -> None:  # noqa: ANN001
    d = image(lab, "async", "D")
    assert d[30 * BS:35 * BS] == b"".join(blocks(80 + i) for i in range(5))
    assert d[3 * BS:4 * BS] == blocks(90) and d[200 * BS:201 * BS] == blocks(91)
    result = json.loads(vstore("verify", lab, "--json").stdout)["pairs"]
    assert all(not r["differing_ranges"] and r["skipped_unshipped"] == 0 for r in result), result


@pytest.mark.parametrize("mode", ["provider", "mirror"])
def test_lost_positions_resync_copies_only_the_blocks_that_differ(make_lab, vstore, mode: str) -> None:
    """Entries lost with their headers: every block is recorded, but the resync is a differential
    check (digests of source and target compared first): of the 256 recorded blocks it copies the
    two whose writes were lost, not the whole volume."""
    lab = make_lab(mode=mode)
    lose_unshipped_positions(lab, vstore)
    status = pair(lab, vstore, async_name(lab, vstore))
    assert status["state"] == "Suspend" and status["spool_damage"]["all_volumes"]
    assert status["verify_first"] and status["recorded_blocks"] == 256
    report = json.loads(vstore("ship", lab, "--json").stdout)
    assert report["resynced_blocks"] == 2 and report["error"] is None
    after = pair(lab, vstore, async_name(lab, vstore))
    assert after["state"] == "Duplex" and not after["verify_first"] and after["recorded_blocks"] == 0
    assert_d_has_every_write(lab, vstore)


def test_verify_repair_gives_lost_positions_the_differential_check(make_lab, vstore) -> None:
    """`verify --repair` on the Suspend pair whose positions were lost: it copies exactly the
    differing blocks, names them in `repaired_ranges`, and leaves every pair Duplex and equal."""
    lab = make_lab()
    lose_unshipped_positions(lab, vstore)
    first = {r["name"]: r for r in json.loads(vstore("verify", lab, "--json").stdout)["pairs"]}
    assert first["A->D"]["skipped_unshipped"] == 256  # nothing claimed equal while Suspend
    repaired = {r["name"]: r for r in json.loads(vstore("verify", lab, "--repair", "--json").stdout)["pairs"]}
    assert repaired["A->D"]["repaired_ranges"] == [[3, 1], [200, 1]]
    assert repaired["A->C"]["repaired_ranges"] == []
    assert all(not r["differing_ranges"] and r["skipped_unshipped"] == 0 for r in repaired.values())
    assert pair(lab, vstore, "A->D")["state"] == "Duplex"
    assert_d_has_every_write(lab, vstore)


def test_lost_positions_resync_through_the_daemons_moves_only_digests(daemon_lab, vstore) -> None:
    """The same loss found by the daemons at `lab up`: the coordinating daemon's resync compares the
    digests the Async site's daemon computes (`vol.digest`) and copies only the two lost writes."""
    lab = daemon_lab()
    lose_unshipped_positions(lab, vstore)
    vstore("lab", "up", lab)
    vstore("ship", lab)
    deadline = time.monotonic() + 30
    while pair(lab, vstore, "A->D")["state"] != "Duplex" and time.monotonic() < deadline:
        time.sleep(0.2)
    assert pair(lab, vstore, "A->D")["state"] == "Duplex"
    logged = (lab / "run" / "primary.log").read_text()
    assert "differential check of 256 recorded blocks: 2 differ" in logged
    vstore("lab", "down", lab)
    assert_d_has_every_write(lab, vstore)
