"""Write-order fidelity with a file system nobody here wrote (SPEC §4 [0044]-[0046], DESIGN
invariant 2): ext4 on a loop device over `vstore attach` of a lab that is up, a workload running,
and the primary's daemon SIGKILLed at a seeded random moment with entries in flight. D, which
applied a prefix of the entries in write order, must be an ext4 that e2fsck's journal recovery
brings back clean (exit 0 or 1, never 4), holding every file fsynced before the last entry it
applied; C, the sync copy, must hold every file whose fsync returned."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.test_attach import Vstore, attached, kernel_mount, loop_device, needs_loop, run
from vstore.blocks.errors import TricopyError
from vstore.daemons.processes import coordinator, lab_down, lab_up, running_pid
from vstore.net.rpc import SNAPSHOT

pytestmark = [needs_loop, pytest.mark.timeout(170)]
ROUNDS = 10


def next_seq(lab: Path) -> int:
    """The next sequence number the primary's entry log gives (every entry below it exists)."""
    return coordinator(lab).call(SNAPSHOT)[0]["snapshot"]["queue"]["next_seq"]


def workload(fs: Path, lab: Path, seed: int, kept: dict[str, tuple[str, int]], stop: threading.Event) -> None:
    """Files `keep-N` written once, fsynced and never touched again (recorded with the entry
    sequence number their fsync covers), among churn: appends, renames, deletes, unsynced writes.
    Runs until an I/O error (the primary is gone) or `stop`."""
    rng = random.Random(seed)
    churn: list[Path] = []
    i = 0
    try:
        while not stop.is_set():
            i += 1
            data = rng.randbytes(rng.randrange(1, 96) * 1024)
            keep = fs / f"keep-{i}"
            with open(keep, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            dirfd = os.open(fs, os.O_RDONLY)
            try:
                os.fsync(dirfd)  # the name too
            finally:
                os.close(dirfd)
            kept[keep.name] = (hashlib.sha256(data).hexdigest(), next_seq(lab) - 1)
            c = fs / f"churn-{i}"
            c.write_bytes(rng.randbytes(rng.randrange(1, 64) * 1024))
            churn.append(c)
            action = rng.random()
            if action < 0.3 and churn:
                victim = churn.pop(rng.randrange(len(churn)))
                victim.unlink()
            elif action < 0.6 and churn:
                victim = churn[rng.randrange(len(churn))]
                moved = victim.with_name(victim.name + "-moved")
                victim.rename(moved)
                churn[churn.index(victim)] = moved
            elif churn:
                with open(churn[rng.randrange(len(churn))], "ab") as f:
                    f.write(rng.randbytes(8192))
    except (OSError, TricopyError):
        return  # the primary was killed: writes (and the question to its daemon) fail from now on


def files_in(image: Path, names: dict[str, tuple[str, int]], tmp: Path) -> dict[str, str | None]:
    """sha256 of each named file in the ext4 image (None when absent), read with debugfs."""
    found: dict[str, str | None] = {}
    for name in names:
        out = tmp / "cat.bin"
        res = run("debugfs", "-R", f"dump /{name} {out}", image, check=False)
        found[name] = hashlib.sha256(out.read_bytes()).hexdigest() if res.returncode == 0 and out.exists() else None
        out.unlink(missing_ok=True)
    return found


def recover_copy(image: Path, tmp: Path, name: str) -> Path:
    """A copy of `image` after e2fsck -fy (journal recovery); the exit status must be 0 or 1."""
    copy = tmp / name
    shutil.copyfile(image, copy)
    res = run("e2fsck", "-fy", copy, check=False)
    assert res.returncode in (0, 1), f"e2fsck -fy of {name}: exit {res.returncode}\n{res.stdout}\n{res.stderr}"
    return copy


@pytest.mark.parametrize("seed", range(ROUNDS))
def test_ext4_on_d_is_a_consistent_past_after_the_primary_is_killed(seed: int, daemon_lab: Callable[..., Path],
                                                                   vstore: Vstore, tmp_path: Path) -> None:
    """See the module docstring; one seeded moment per round."""
    lab = daemon_lab(size=24 << 20)
    lab_up(lab)
    primary = running_pid(lab, "primary")
    assert primary is not None
    kept: dict[str, tuple[str, int]] = {}
    stop = threading.Event()
    with attached(vstore, lab, tmp_path / "mp") as mp, loop_device(mp / "A") as dev:
        run("mkfs.ext4", "-q", "-F", "-E", "nodiscard", dev)
        with kernel_mount(dev, tmp_path / "ext4") as fs:
            rng = random.Random(seed)
            kill_at = rng.uniform(0.8, 2.5)
            cutter = threading.Timer(kill_at - rng.uniform(0.2, 0.7), lambda: vstore("fail", lab, "primary-async"))
            killer = threading.Timer(kill_at, lambda: os.kill(primary, signal.SIGKILL))
            cutter.start()  # entries written after the cut wait in the spool: in flight when the primary dies
            killer.start()
            try:
                workload(fs, lab, seed, kept, stop)
            finally:
                stop.set()
                cutter.join()
                killer.join()
    lab_down(lab)
    applied = json.loads((lab / "async" / "recv" / "applied.json").read_text())["applied_seq"]
    assert kept, "the workload fsynced nothing before the kill"
    c = recover_copy(lab / "sync" / "C.img", tmp_path, "C.img")
    on_c = files_in(c, kept, tmp_path)
    assert {n: on_c[n] for n in kept} == {n: h for n, (h, _) in kept.items()}, "C lost an fsynced file"
    d = recover_copy(lab / "async" / "D.img", tmp_path, "D.img")
    shipped = {n: h for n, (h, seq) in kept.items() if seq <= applied}
    assert len(shipped) < len(kept), "no fsynced file was still in flight when the primary died"
    on_d = files_in(d, shipped, tmp_path)
    assert on_d == shipped, f"D (applied up to entry {applied}) lost a file fsynced before it"
