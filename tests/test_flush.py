"""Flush semantics, checked below the devices: every write and sync the lab makes to its images
and its spool is recorded (tools/crash/files.py), in process, in both modes.

- No write is synced on its own: between flushes no image or spool segment is fdatasync'ed.
- A flush returns only after every file a write before it touched (A, C, B in mirror mode, the
  spool's segment) was synced after that write: the copies the promise covers hold it durably.
- A flush with nothing written since the last one syncs nothing; a FUA write is durable when it returns.
- Power cuts: at every point after a flush returned, every state a power cut can leave C and the
  spool in (any subset of the unsynced writes) still holds every flushed write, and the spool
  reopened from it holds every flushed entry.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import pytest

from tests.helpers import BS, blocks
from tools.crash.files import FileRecorder
from vstore.lab.system import System
from vstore.replication.spool import EntryLog


def data_files(lab: Path):  # noqa: ANN201
    root = str(lab.resolve())

    def watch(path: str) -> bool:
        return path.startswith(root) and (path.endswith(".img") or "/spool/" in path)

    return watch


def images_and_segments(paths: list[str]) -> list[str]:
    return [p for p in paths if p.endswith(".img") or Path(p).name.startswith("seg-")]


@pytest.mark.parametrize("mode", ["provider", "mirror"])
def test_writes_are_not_synced_and_a_flush_syncs_every_copy_once(make_lab, mode: str) -> None:
    """20 writes make no fdatasync of any image or segment; the flush then syncs each file they
    touched (A, C, B in mirror mode, the segment) after its last write, once, and a second flush
    with nothing written syncs nothing."""
    lab = make_lab(mode=mode)
    with System(lab) as system, FileRecorder(data_files(lab)) as rec:
        device = system.device()
        for i in range(20):
            device.write((i * 7) % 200, blocks(i))
        written = rec.mark("written")
        assert images_and_segments(rec.syncs(0, written)) == []
        device.flush()
        flushed = rec.mark("flushed")
        device.flush()
        again = rec.mark("again")
    touched = sorted({op.path for op in rec.writes(0, written)})
    names = sorted(Path(p).name for p in images_and_segments(touched))
    expected = {"provider": ["A.img", "C.img"], "mirror": ["A.img", "B.img", "C.img"]}[mode]
    assert [n for n in names if n.endswith(".img")] == expected
    assert any(n.startswith("seg-") for n in names)
    synced = images_and_segments(rec.syncs(written, flushed))
    assert sorted(synced) == sorted(images_and_segments(touched))  # each one, exactly once
    for path in images_and_segments(touched):
        assert rec.unsynced(path, flushed) == [], f"{path} has writes the flush did not sync"
    assert images_and_segments(rec.syncs(flushed, again)) == []


def test_a_fua_write_is_durable_when_it_returns(make_lab) -> None:
    """`write_fua` returns only after A, C and the spool segment hold it durably."""
    lab = make_lab()
    with System(lab) as system, FileRecorder(data_files(lab)) as rec:
        system.device().write_fua(5, blocks(1))
        done = rec.mark("fua returned")
    for path in images_and_segments(rec.files()):
        assert rec.unsynced(path, done) == [], path


def test_unsafe_no_flush_syncs_nothing(make_lab) -> None:
    """A lab created --unsafe-no-flush (benchmarks) keeps only the first promise: no sync at all."""
    lab = make_lab(unsafe_no_flush=True)
    with System(lab) as system, FileRecorder(data_files(lab)) as rec:
        system.device().write(1, blocks(2))
        system.device().flush()
    assert images_and_segments(rec.syncs()) == []


def spool_from(rec: FileRecorder, lab: Path, point: int, chooser: random.Random, into: Path) -> Path:
    """A copy of the spool as a power cut at `point` may leave it (each file a random possible state)."""
    spool = lab / "primary" / "spool"
    if into.exists():
        shutil.rmtree(into)
    shutil.copytree(spool, into)
    for path in rec.files():
        if "/spool/" in path:
            states = list(rec.states(path, point))
            (into / Path(path).name).write_bytes(chooser.choice(states))
    return into


@pytest.mark.parametrize("mode", ["provider", "mirror"])
def test_power_cut_after_a_flush_keeps_everything_flushed(make_lab, tmp_path: Path, mode: str) -> None:
    """Rounds of random writes, each ended by a flush, some followed by unflushed writes. At every
    point where a flush had returned, every power-cut state of C holds each block's flushed
    content (or a later write of it), and the spool reopened from power-cut states holds every
    entry appended before that flush, intact."""
    lab = make_lab(mode=mode)
    rng = random.Random(7)
    checks: list[tuple[int, dict[int, list[bytes]], int]] = []  # (point, block -> allowed contents, flushed seq)
    history: dict[int, list[bytes]] = {}
    with System(lab) as system, FileRecorder(data_files(lab)) as rec:
        device = system.device()
        for round_ in range(6):
            for _ in range(rng.randint(1, 6)):
                lba, tag = rng.randrange(64), rng.randrange(1 << 30)
                device.write(lba, blocks(tag))
                history.setdefault(lba, []).append(blocks(tag))
            device.flush()
            point = rec.mark(f"flush {round_}")
            checks.append((point, {lba: list(values) for lba, values in history.items()},
                           system.entry_log.next_seq - 1))
            for _ in range(rng.randint(0, 3)):  # written, not flushed: may or may not survive
                lba, tag = rng.randrange(64), rng.randrange(1 << 30)
                device.write(lba, blocks(tag))
                history.setdefault(lba, []).append(blocks(tag))
        c_path = str((lab / "sync" / "C.img").resolve())
        end = rec.mark("end")
    chooser = random.Random(11)
    for point, flushed, last_seq in checks:
        for cut in (point, end):  # right after the flush, and after the later unflushed writes
            for state in rec.states(c_path, cut):
                for lba, values in flushed.items():
                    got = state[lba * BS:(lba + 1) * BS]
                    allowed = history[lba][history[lba].index(values[-1]):]  # the flushed one or later
                    assert got in allowed, f"C block {lba} lost its flushed content at a power cut"
            for _ in range(4):
                spool = spool_from(rec, lab, cut, chooser, tmp_path / "cut")
                log = EntryLog(spool, durable=False, block_size=BS, record_damage=True, defer_repairs=True)
                seqs = {e.seq for e in log.pending()}
                assert set(range(1, last_seq + 1)) <= seqs, f"flushed entries lost at a power cut: {log.damage}"
                log.close()
