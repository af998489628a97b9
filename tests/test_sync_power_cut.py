"""A power cut at the Sync site, with the daemons up: C acknowledged writes from its page cache,
so the ones it had not flushed may be gone when it comes back. The primary notices the site came
back in a new boot (its `incarnation` changed), records the extents written since C's last flush,
and the resync copies them again; a daemon killed and restarted in the same boot (the page cache
kept everything) changes nothing. A power cut at the Async site loses nothing its receive journal
kept (the batches applied since the last checkpoint are applied again at start).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

import pytest

from tests.helpers import BS, blocks, image
from vstore.blocks.boot import SIMULATED_BOOT
from vstore.blocks.errors import FormatError
from vstore.daemons.processes import running_pid, site_peer, start_site
from vstore.lab.sitedir import RECV_DIR
from vstore.net.rpc import APP_FLUSH, APP_WRITE
from vstore.replication.entries import Entry
from vstore.replication.journal import ReceiveJournal


def app_write(lab: Path, lba: int, data: bytes) -> None:
    """An application write through the primary daemon, not flushed."""
    with site_peer(lab, "primary") as peer:
        peer.call(APP_WRITE, {"volume": 0, "lba": lba}, data)


def sync_pair(lab: Path, vstore) -> dict:  # noqa: ANN001
    doc = json.loads(vstore("status", lab, "--json").stdout)
    return next(p for p in doc["pairs"] if p["kind"] == "sync")


def kill_sync(lab: Path) -> None:
    pid = running_pid(lab, "sync")
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while running_pid(lab, "sync") and time.monotonic() < deadline:
        time.sleep(0.05)


@pytest.mark.parametrize("power_cut", [True, False])
def test_sync_site_back_in_a_new_boot_gets_its_unflushed_writes_again(daemon_lab, vstore, monkeypatch,
                                                                      power_cut: bool) -> None:
    """Blocks 10-11 written and not flushed, then the Sync daemon killed. After a power cut (a new
    boot; C lost the unflushed blocks) the next write finds the pair failed with those extents
    recorded, the resync copies them, and C equals A again. After a plain kill (same boot) the
    page cache kept them: the pair stays Duplex and nothing is recorded."""
    lab = daemon_lab(protect=False)  # record mode: the primary keeps writing while the pair is down
    vstore("lab", "up", lab)
    vstore("write", lab, "--lba", 5, input=blocks(5))  # flushed
    app_write(lab, 10, blocks(10) + blocks(11))
    kill_sync(lab)
    if power_cut:
        with open(lab / "sync" / "C.img", "r+b") as c:  # what the lost page cache held
            c.seek(10 * BS)
            c.write(bytes(2 * BS))
        monkeypatch.setenv(SIMULATED_BOOT, "after-the-power-cut")
    start_site(lab, "sync")
    app_write(lab, 20, blocks(20))
    pair = sync_pair(lab, vstore)
    if not power_cut:
        assert pair["state"] == "Duplex" and pair["recorded_blocks"] == 0
        assert image(lab, "sync", "C")[10 * BS:12 * BS] == blocks(10) + blocks(11)
        return
    assert pair["state"] == "Suspend" and "new boot" in pair["reason"]
    assert pair["recorded_blocks"] >= 12  # the extent holding blocks 10-11 (and the write after it)
    vstore("heal", lab, "sync")  # resync: Duplex-Pending copies the recorded blocks
    assert sync_pair(lab, vstore)["state"] == "Duplex"
    result = json.loads(vstore("verify", lab, "--json").stdout)["pairs"]
    assert all(not r["differing_ranges"] for r in result), result
    c = image(lab, "sync", "C")
    assert c[10 * BS:12 * BS] == blocks(10) + blocks(11) and c[20 * BS:21 * BS] == blocks(20)


def wait_shipped(lab: Path, vstore) -> None:  # noqa: ANN001
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        doc = json.loads(vstore("status", lab, "--json").stdout)
        if all(p["entries_waiting"] == 0 for p in doc["pairs"]):
            return
        time.sleep(0.2)


def test_primary_back_in_a_new_boot_makes_every_copy_equal_again(daemon_lab, vstore, monkeypatch) -> None:
    """Blocks 10-11 written and not flushed, the primary daemon killed, and A losing them in the
    power cut while C (another site) kept them. The primary, back in a new boot, re-drives the
    extents of its activity log from A before anything else: C and D end equal to A, and verify
    is clean, instead of C silently holding writes A does not."""
    lab = daemon_lab()
    vstore("lab", "up", lab)
    vstore("write", lab, "--lba", 5, input=blocks(5))
    app_write(lab, 10, blocks(10) + blocks(11))
    app_write(lab, 40, blocks(40))  # the last write: the one-slot intent names this one only
    os.kill(running_pid(lab, "primary"), signal.SIGKILL)
    time.sleep(0.3)
    with open(lab / "primary" / "A.img", "r+b") as a:  # the primary's page cache is gone: A lost them
        a.seek(10 * BS)
        a.write(bytes(2 * BS))
    assert image(lab, "sync", "C")[10 * BS:12 * BS] == blocks(10) + blocks(11)
    monkeypatch.setenv(SIMULATED_BOOT, "primary-after-the-power-cut")
    start_site(lab, "primary")
    vstore("write", lab, "--lba", 30, input=blocks(30))  # the re-drive happens first, at the latest here
    wait_shipped(lab, vstore)
    assert "in doubt since the last crash" in (lab / "run" / "primary.log").read_text()
    result = json.loads(vstore("verify", lab, "--json").stdout)["pairs"]
    assert all(not r["differing_ranges"] for r in result), result
    vstore("lab", "down", lab)
    a, c, d = image(lab, "primary", "A"), image(lab, "sync", "C"), image(lab, "async", "D")
    assert a[10 * BS:12 * BS] == c[10 * BS:12 * BS] == d[10 * BS:12 * BS] == bytes(2 * BS)
    assert a[5 * BS:6 * BS] == c[5 * BS:6 * BS] == d[5 * BS:6 * BS] == blocks(5)  # flushed: kept


def test_async_site_power_cut_loses_nothing_its_journal_kept(daemon_lab, vstore) -> None:
    """The Async site applies batches to D's page cache and keeps them in its journal until a
    checkpoint syncs D. A power cut there (D's unsynced writes lost: here D's image is zeroed while
    its daemon is dead) loses nothing: at start the kept batches are applied again, so D equals A."""
    lab = daemon_lab(mode="provider")
    vstore("lab", "up", lab)
    for i in range(6):
        app_write(lab, i, blocks(i))
    with site_peer(lab, "primary") as peer:
        peer.call(APP_FLUSH, {"volume": 0})
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and image(lab, "async", "D")[:6 * BS] != image(lab, "primary", "A")[:6 * BS]:
        time.sleep(0.05)
    assert list((lab / "async" / RECV_DIR).glob("applied-*.bin"))  # D not synced yet: the batches are kept
    pid = running_pid(lab, "async")
    os.kill(pid, signal.SIGKILL)
    while running_pid(lab, "async"):
        time.sleep(0.05)
    d = lab / "async" / "D.img"
    d.write_bytes(bytes(d.stat().st_size))  # what was not synced is gone
    start_site(lab, "async")
    vstore("lab", "down", lab)
    assert image(lab, "async", "D") == image(lab, "primary", "A")
    assert not list((lab / "async" / RECV_DIR).glob("applied-*.bin"))  # replayed, then checkpointed


def journal_with_kept(recv: Path, batches: int) -> ReceiveJournal:
    """A receive journal that stored, applied and kept `batches` one-entry batches (group commit)."""
    j = ReceiveJournal(recv)
    for seq in range(1, batches + 1):
        j.store([Entry(seq, 0, 0, seq, 1, blocks(seq))])
        j.mark_applied(seq, retain=True)
    return j


def test_receive_journal_kept_batches_after_a_crash(tmp_path: Path) -> None:
    """Reopened after a crash, the journal counts its kept batches as applied and hands them back to be
    applied again, in order; after a checkpoint (applied.json saved) a kept batch a crash left behind is
    stale and is never applied again; a kept batch that leaves a gap is refused, never applied, until a
    resync sets the applied sequence."""
    recv = tmp_path / "recv"
    journal_with_kept(recv, 3)
    j = ReceiveJournal(recv)  # the crash: nothing checkpointed
    assert j.applied_seq == 3 and [b.last_seq for b in j.replay()] == [1, 2, 3]
    with pytest.raises(FormatError, match="gap or duplicate"):
        j.store([Entry(3, 0, 0, 3, 1, blocks(3))])
    j.checkpoint()
    assert j.replay() == [] and (recv / "applied.json").is_file()
    os.link(recv / ".batch.spare", recv / "applied-1.bin")  # a retire that did not reach the disk
    assert ReceiveJournal(recv).replay() == []
    shutil.rmtree(recv)
    journal_with_kept(recv, 3)
    (recv / "applied-2.bin").unlink()  # damage: batch 3 does not follow batch 1
    j = ReceiveJournal(recv)
    with pytest.raises(FormatError, match="applied-3.bin"):
        j.replay()
    with pytest.raises(FormatError, match="applied-3.bin"):
        j.store([Entry(4, 0, 0, 4, 1, blocks(4))])
    j.set_applied_seq(10)
    assert j.replay() == [] and not list(recv.glob("applied-*.bin"))
    j.store([Entry(11, 0, 0, 11, 1, blocks(11))])
