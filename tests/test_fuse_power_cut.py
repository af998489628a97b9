"""A file fsynced through a jfs FUSE mount of `lab:LAB` survives a power cut of the Primary and of
the Sync site's page cache (SPEC §8 with the flush promise of SPEC §5: flushed = durable on A and C).

The mount process runs under `tools.crash.recorded`, which streams every write and sync it makes
to the lab's image files into a record file. The test writes files through the mount with plain
os calls, fsyncs one, goes on rewriting others and SIGKILLs the mount in the middle of that. A
power cut may come at any moment after the fsync returned, so for each image the writes reached
(A and C; B too in mirror mode) the cut points are: the fsync's return, the kill, and up to `CUTS`
moments in between, each just before a later sync of that image (all its writes since its last
sync in flight), sampled with a fixed seed. At each cut the states a power cut can leave the image
in are every write a sync of that image covered plus a subset of the later ones: the recorder's
systematic choices (none, all, each prefix, each one left out), then random subsets from a fixed
seed, at most `STATES` per image and cut; writes are split per 4 KiB block, so a multi-block write
may be torn. In every state the volume mounts (its log replays), fscks clean, and the fsynced
file reads back whole.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from jfs.fs import FileSystem
from jfs.fsck import fsck
from jfs.fuse import fuse_available
from jfs.mounts import is_mounted
from tests.helpers import BS, jfs
from tools.crash.recorded import count, load, sampled_states
from vstore.blocks.device import MemoryDevice

pytestmark = pytest.mark.skipif(fuse_available() is not None, reason=f"FUSE unavailable: {fuse_available()}")

ROOT = Path(__file__).resolve().parent.parent
STATES = 12  # crash states checked per image and cut point (systematic first, then seeded random)
CUTS = 10  # cut points per image besides the fsync's return and the kill, sampled with a fixed seed
KEPT = bytes(range(256)) * 700 + b"the end"  # 179 207 bytes: 44 blocks, the last one partial


def start_mount(lab: Path, mp: Path, out: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "tools.crash.recorded", str(out), "--",
                             "jfs.cli", "mount", f"lab:{lab}", str(mp), "--foreground"],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while not is_mounted(mp):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"the mount did not come up: {proc.communicate()[1].decode(errors='replace')}")
        time.sleep(0.02)
    return proc


def churn(mp: Path, stop: threading.Event) -> None:
    """Rewrite a few files until the mount goes away (not fsynced: each close commits them)."""
    i = 0
    try:
        while not stop.is_set():
            data = bytes([i % 251]) * (60_000 + 4096 * (i % 7))
            with open(mp / f"other{i % 3}", "wb") as f:
                f.write(data)
            os.chmod(mp / f"other{i % 3}", 0o600 + i % 2)
            i += 1
    except OSError:
        pass  # the mount was killed


def check_state(image: bytes, what: str) -> None:
    dev = MemoryDevice(len(image) // BS, BS, data=image, name=what)
    fs = FileSystem.mount(dev)  # replays the committed log, as the next mount does
    got = fs.read("/kept") if fs.exists("/kept") else None
    assert got == KEPT, f"{what}: the fsynced file is {'missing' if got is None else f'{len(got)} bytes, not whole'}"
    result = fsck(dev)
    assert result.exit_code == 0, (what, [p.message for p in result.problems])


@pytest.mark.parametrize("mode", ["provider", "mirror"])
def test_fsynced_file_survives_a_power_cut_of_primary_and_sync(make_lab, tmp_path: Path, mode: str) -> None:
    """Every power-cut state of A and C (and B in mirror mode) after the fsync returned, and after
    the mount was killed during later writes, mounts, fscks clean and holds the fsynced file whole."""
    lab = make_lab(mode=mode, size=4 << 20)
    jfs("mkfs", f"lab:{lab}", "--log-blocks", "64")
    mp, out = tmp_path / "mnt", tmp_path / "writes.rec"
    mp.mkdir()
    proc = start_mount(lab, mp, out)
    stop = threading.Event()
    writer = threading.Thread(target=churn, args=(mp, stop))
    try:
        (mp / "before").write_bytes(b"closed, not fsynced" * 1000)
        fd = os.open(mp / "kept", os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            for i in range(0, len(KEPT), 50_000):
                os.write(fd, KEPT[i:i + 50_000])
            os.fsync(fd)
            synced = count(out)  # the records of everything done up to the fsync's return
            writer.start()
            time.sleep(0.5)
            proc.send_signal(signal.SIGKILL)  # the power cut
            proc.wait(timeout=30)
        finally:
            with contextlib.suppress(OSError):  # the mount is gone
                os.close(fd)
    finally:
        stop.set()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        subprocess.run(["fusermount3", "-uz", str(mp)], capture_output=True)
        if writer.ident is not None:
            writer.join(timeout=60)
        if proc.stderr:
            proc.stderr.close()
    rec, ends = load(out, split=BS)
    images = [p for p in rec.files() if Path(p).name in ("A.img", "B.img", "C.img")]
    expected = {"provider": ["A.img", "C.img"], "mirror": ["A.img", "B.img", "C.img"]}[mode]
    assert sorted(Path(p).name for p in images) == expected
    fsynced, end = ends[synced - 1], len(rec.ops)
    assert end > fsynced  # the mount went on writing
    rng = random.Random(mode)
    for path in images:
        # a power cut may come at any moment after the fsync: the widest windows are just before
        # each later sync of this image (its writes since the last sync all in flight)
        windows = [i for i in range(fsynced, end) if rec.ops[i].kind == "sync" and rec.ops[i].path == path]
        cuts = [fsynced, end, *sorted(rng.sample(windows, min(CUTS, len(windows))))]
        for point in cuts:
            for k, state in enumerate(sampled_states(rec, path, point, limit=STATES, seed=point)):
                check_state(state, f"{Path(path).name} cut at op {point}, state {k}")
