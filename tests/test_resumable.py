"""A long copy stopped by Ctrl-C continues where it stopped when the command runs again, and status
never shows a pair Duplex whose copy did not finish; shipping killed mid-way continues from what
the Async site applied."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.helpers import blocks
from vstore.blocks.errors import TricopyError
from vstore.daemons.processes import lab_down, lab_up, running_pid, site_peer
from vstore.lab.copies import unfinished
from vstore.lab.sitedir import RECV_DIR, SPOOL_DIR
from vstore.lab.system import System
from vstore.net.rpc import JOURNAL_APPLIED
from vstore.procedures import failback as fb
from vstore.procedures import failover as fo
from vstore.procedures.create import init_lab
from vstore.procedures.recovery import recover
from vstore.replication.segments import read_confirmed
from vstore.reports import status_document

BS = 4096
NBLOCKS = 4096  # 16 chunks of 256 blocks
SIZE = NBLOCKS * BS


class Stop:
    """A progress factory that raises KeyboardInterrupt once `after` blocks were reported done."""

    def __init__(self, after: int | None) -> None:
        self.after = after
        self.done = 0

    def __call__(self, description: str, total: int) -> Callable[[int], None]:
        def advance(n: int) -> None:
            self.done += n
            if self.after is not None and self.done >= self.after:
                raise KeyboardInterrupt

        return advance


def fill(lab: Path, seed: int = 1) -> None:
    """Random data on the application's volume (and so on every replica after shipping)."""
    rng = random.Random(seed)
    with System(lab) as system:
        dev = system.device(0)
        for lba in range(0, NBLOCKS, 512):
            dev.write(lba, rng.randbytes(256 * BS))
        system.shipper().ship()
        system.save()


def image(lab: Path, site: str, volume: str) -> bytes:
    return (lab / site / f"{volume}.img").read_bytes()


def test_a_stopped_recovery_copy_continues_and_status_is_honest(tmp_path: Path) -> None:
    """Recover stopped mid-copy: status shows the target's pair not Duplex; run again, it copies the rest only."""
    lab = tmp_path / "lab"
    init_lab(lab, size=SIZE)
    fill(lab)
    shutil.rmtree(lab / "primary")
    (lab / "async" / "D.img").write_bytes(bytes(SIZE))  # D lags far behind C
    with System(lab) as system, pytest.raises(KeyboardInterrupt):
        recover(system, "sync", Stop(after=1000), full_copy=True)
    left = unfinished(lab)
    assert [(c["source"], c["target"]) for c in left] == [("sync:C", "async:D")] and 1000 <= left[0]["done"] < NBLOCKS
    with System(lab) as system:
        doc = status_document(system)
    assert all(p["state"] != "Duplex" for p in doc["pairs"] if p["target"] == "async:D")
    assert doc["unfinished_copies"][0]["done"] == left[0]["done"]
    with System(lab) as system:
        report, _ = recover(system, "sync", Stop(after=None), full_copy=True)
        system.save()
    assert report.blocks_copied == NBLOCKS - left[0]["done"]  # the second run copied only the rest
    assert image(lab, "async", "D") == image(lab, "sync", "C")
    assert unfinished(lab) == [] and not any((lab / "run" / "copies").glob("*.json"))


def test_a_stopped_failback_copy_continues(tmp_path: Path) -> None:
    """Failback stopped while copying C back to the primary copies only the rest when run again."""
    lab = tmp_path / "lab"
    init_lab(lab, size=SIZE)
    fill(lab)
    shutil.rmtree(lab / "primary")
    with System(lab) as system:
        fo.fig10_failover_to_sync(system)
        system.save()
    fill(lab, seed=2)  # the application writes at the Sync site
    first = Stop(after=1500)
    with System(lab) as system, pytest.raises(KeyboardInterrupt):
        fb.failback(system, progress=first)
    stopped = {c["target"]: c["done"] for c in unfinished(lab)}
    assert stopped and all(0 < done < NBLOCKS for done in stopped.values())
    assert list(stopped) == ["primary:A"]
    with System(lab) as system:
        steps = fb.failback(system)
        system.save()
    assert f"C->A: Duplex after copying {NBLOCKS - stopped['primary:A']} blocks" in steps.steps  # only the rest
    assert image(lab, "primary", "A") == image(lab, "sync", "C")
    assert unfinished(lab) == []


def test_a_stopped_setup_continues_where_it_stopped(tmp_path: Path) -> None:
    """lab init stopped in its second initial copy: status says so; init again skips the finished copy."""
    lab = tmp_path / "lab"
    with pytest.raises(KeyboardInterrupt):
        init_lab(lab, size=SIZE, progress=Stop(after=NBLOCKS + 2000))  # A->D done, A->C stopped
    left = unfinished(lab)
    assert [c["target"] for c in left] == ["sync:C"]
    with System(lab) as system:
        doc = status_document(system)
    assert doc["unfinished_setup"] and doc["pairs"] == []
    steps = init_lab(lab, size=SIZE)
    assert any("A->D: Duplex after copying 0 blocks" in s for s in steps.steps), steps.steps
    assert any(f"A->C: Duplex after copying {NBLOCKS - left[0]['done']} blocks" in s for s in steps.steps)
    with System(lab) as system:
        assert {p["state"] for p in status_document(system)["pairs"]} == {"Duplex"}
    assert not (lab / "run" / "init.json").exists()


def test_a_stopped_setup_refuses_other_options(tmp_path: Path) -> None:
    """A stopped set-up continues only with the options it was created with."""
    lab = tmp_path / "lab"
    with pytest.raises(KeyboardInterrupt):
        init_lab(lab, size=SIZE, progress=Stop(after=100))
    with pytest.raises(TricopyError, match="continues with the options it was created with"):
        init_lab(lab, size=2 * SIZE)


# The CLI: SIGINT arrives while `vstore recover` copies (sent from inside the copy loop, at block 1024).
INTERRUPTED_CLI = textwrap.dedent("""
    import os, signal, sys
    import vstore.blocks.ranges as ranges
    real = ranges.copy_ranges

    def copy_ranges(read, write, todo, **kw):
        seen = [0]
        def advance(n, progress=kw.pop("progress", None)):
            seen[0] += n
            if progress:
                progress(n)
            if seen[0] == 1024:
                os.kill(os.getpid(), getattr(signal, os.environ['STOP_WITH']))
        return real(read, write, todo, progress=advance, **kw)

    ranges.copy_ranges = copy_ranges
    import vstore.replication.storage as storage
    storage.copy_ranges = copy_ranges
    from vstore.cli.main import app
    sys.argv = ["vstore", *sys.argv[1:]]
    app()
""")


@pytest.mark.parametrize(("sig", "word"), [("SIGINT", "interrupted"), ("SIGTERM", "terminated")])
def test_the_cli_says_where_a_stopped_copy_is_and_how_to_continue(tmp_path: Path, sig: str, word: str) -> None:
    """Ctrl-C or SIGTERM of `vstore recover`: exit 130, the copy's position and the command that continues it."""
    lab = tmp_path / "lab"
    init_lab(lab, size=SIZE)
    fill(lab)
    shutil.rmtree(lab / "primary")
    (lab / "async" / "D.img").write_bytes(bytes(SIZE))
    stopped = subprocess.run([sys.executable, "-c", INTERRUPTED_CLI, "recover", str(lab), "--to", "sync", "--full",
                              "--quiet"], capture_output=True, text=True, env={**os.environ, "STOP_WITH": sig})
    assert stopped.returncode == 130, stopped.stderr
    assert word in stopped.stderr and "sync:C -> async:D: 1024 of 4096 blocks copied" in stopped.stderr
    assert f"vstore recover {lab} --to sync --full --quiet" in stopped.stderr
    status = subprocess.run([sys.executable, "-m", "vstore.cli", "status", str(lab)], capture_output=True, text=True)
    assert "unfinished copy sync:C -> async:D: 1024 of 4096 blocks" in status.stdout
    done = subprocess.run([sys.executable, "-m", "vstore.cli", "recover", str(lab), "--to", "sync", "--full",
                           "--json"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert '"blocks_copied": 3072' in done.stdout
    assert image(lab, "async", "D") == image(lab, "sync", "C")


def test_init_refuses_a_lab_the_disk_cannot_hold(tmp_path: Path) -> None:
    """lab init refuses images that could not grow to their full size, and creates nothing."""
    with pytest.raises(TricopyError, match="can grow to .* pass --overcommit"):
        init_lab(tmp_path / "huge", size=1 << 50)
    assert not (tmp_path / "huge").exists()


def wait_applied(lab: Path, seq: int, timeout: float = 20.0) -> None:
    """Until the Async site's daemon says it applied entry `seq` (or later)."""
    end = time.monotonic() + timeout
    with site_peer(lab, "async") as peer:
        while peer.call(JOURNAL_APPLIED)[0]["applied_seq"] < seq:
            assert time.monotonic() < end, f"entry {seq} was not applied"
            time.sleep(0.05)


def test_a_lost_lazy_confirmation_only_reships_what_the_async_site_skips(daemon_lab, vstore):
    """The primary daemon keeps the shipper's confirmations lazily (no sync per round) and the Async
    site keeps its applied batches until a checkpoint: after both are SIGKILLed, the spool's confirmed
    position on disk is older than what the Async site applied, yet after the restart nothing is
    sent twice (no batch refused as a duplicate) and D equals A."""
    lab = daemon_lab(mode="provider")
    lab_up(lab)
    for i in range(5):
        vstore("write", lab, "--lba", i, input=blocks(i))
    wait_applied(lab, 5)
    assert read_confirmed(lab / "primary" / SPOOL_DIR) < 5  # lazily confirmed: not on disk yet
    assert list((lab / "async" / RECV_DIR).glob("applied-*.bin"))  # kept until a checkpoint
    for site in ("primary", "async"):
        os.kill(running_pid(lab, site), signal.SIGKILL)
    lab_down(lab)
    lab_up(lab)
    with site_peer(lab, "async") as peer:
        assert peer.call(JOURNAL_APPLIED)[0]["applied_seq"] == 5  # the kept batches count
    for i in range(5, 8):
        vstore("write", lab, "--lba", i, input=blocks(i))
    vstore("ship", lab)  # with the shipper running: waits until it shipped everything acknowledged
    lab_down(lab)
    logs = "".join((lab / "run" / f"{name}.log").read_text() for name in ("shipper", "async"))
    assert "gap or duplicate" not in logs
    assert image(lab, "async", "D") == image(lab, "primary", "A")
    assert read_confirmed(lab / "primary" / SPOOL_DIR) >= 8  # a clean stop makes the position durable

