"""`vstore demo LAB --ext4`: the demo with the kernel's ext4 on the replicated volume (SPEC §6
[0133]-[0135] with §8 [0171]-[0173]), real daemons, a real loop device and FUSE mount. Nothing
fsynced is lost at the Sync site, the ext4 left at the Sync site holds every fsynced file (read
here with e2fsprogs, not with the demo's own code), and the demo leaves no mount and no loop
device behind, whether it ends normally, is interrupted, or cannot run at all."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import helpers
from tests.test_attach import needs_loop
from tests.test_ext4_order import files_in, recover_copy
from vstore.cli.demo_lab import content_for
from vstore.daemons.processes import is_up, lab_down

pytestmark = [needs_loop, pytest.mark.timeout(170)]


def mounts_under(root: Path) -> list[str]:
    """Mount points at or below `root` (from /proc/self/mountinfo)."""
    prefix = str(root)
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    return [p for p in points if p == prefix or p.startswith(prefix + "/")]


def loops_under(root: Path) -> list[str]:
    """Loop devices whose backing file is below `root`."""
    found = []
    for backing in Path("/sys/block").glob("loop*/loop/backing_file"):
        try:
            if backing.read_text().strip().startswith(str(root) + "/"):
                found.append(backing.parent.parent.name)
        except OSError:
            continue
    return found


@pytest.fixture
def demo_lab(tmp_path: Path) -> Iterator[Path]:
    lab = tmp_path / "demo"
    yield lab
    if (lab / "topology.toml").is_file():
        lab_down(lab)


@pytest.fixture(scope="module")
def ext4_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, dict]]:
    """`vstore demo --ext4 --json --down` of 8 files of 6000 bytes on 16 MiB volumes, run once:
    (the lab, the JSON report)."""
    lab = tmp_path_factory.mktemp("demo-ext4") / "demo"
    try:
        doc = json.loads(helpers.vstore("demo", lab, "--ext4", "--files", 8, "--file-size", "6000", "--size", "16M",
                                        "--down", "--json").stdout)
        yield lab, doc
    finally:
        if (lab / "topology.toml").is_file():
            lab_down(lab)


def test_nothing_fsynced_is_lost_at_sync(ext4_run: tuple[Path, dict]) -> None:
    """The report lists the 8 files as written with the demo's content, none lost at the Sync site,
    none missing at the new primary, and both copies' e2fsck -fy ended with exit 0 or 1."""
    _, doc = ext4_run
    assert doc["file_system"] == "ext4" and doc["files_written"] == 8
    assert doc["lost_at_sync"] == [] and doc["missing_at_new_primary"] == []
    assert set(doc["ext4"]["e2fsck_exit"].values()) <= {0, 1}, doc["ext4"]
    assert doc["ext4"]["problems"] == []
    assert set(doc["in_flight_at_async"]) <= {f["path"] for f in doc["files"]}
    assert set(doc["timings"]) == {"init", "up", "write", "kill", "check", "recover", "verify"}
    assert set(doc["killed"]) == {"primary", "shipper", "attach"}


def test_recovery_compares_the_whole_volume(ext4_run: tuple[Path, dict]) -> None:
    """An ext4 volume has no jfs log to tell what changed: the recovery says so, compares every
    block of C and D by digests and copies only what differs (less than the whole volume; D equal
    to C afterwards is checked by the next test's reads)."""
    rec = ext4_run[1]["recovery"]
    assert rec["fallback_full_copy"] and rec["full_copy_bytes"] == 16 << 20
    assert rec["bytes_copied"] < rec["full_copy_bytes"]
    assert ext4_run[1]["ext4"]["recovery_copy"] == "whole volume compared"


def test_the_ext4_at_the_sync_site_holds_every_fsynced_file(ext4_run: tuple[Path, dict], tmp_path: Path) -> None:
    """A copy of C, now the primary's volume, repaired by e2fsck -fy, holds every file the demo
    acknowledged with the content `content_for` gives, read with debugfs; D, equalised by the
    recovery, holds them too."""
    lab, doc = ext4_run
    expected = {f["path"].lstrip("/"): f for f in doc["files"]}
    for image in (lab / "sync" / "C.img", lab / "async" / "D.img"):
        copy = recover_copy(image, tmp_path, image.name)
        hashes = files_in(copy, dict.fromkeys(expected, ("", 0)), tmp_path)
        for name, f in expected.items():
            assert hashes[name] == hashlib.sha256(content_for(f["path"], f["bytes"])).hexdigest(), (image.name, name)
            assert hashes[name] == f["sha256"]


def test_no_mount_or_loop_device_is_left(ext4_run: tuple[Path, dict]) -> None:
    """After the demo, nothing is mounted under the lab, no loop device is backed by a file in it,
    no daemon runs (--down), and its scratch directory is gone."""
    lab, doc = ext4_run
    assert mounts_under(lab) == [] and loops_under(lab) == []
    assert doc["daemons"] == "down" and not is_up(lab)
    assert not (lab / "ext4").exists()


def test_interrupted_while_writing_leaves_nothing_mounted(demo_lab: Path) -> None:
    """SIGINT while the files are being written: exit 130, one sentence naming the step, and no
    mount, loop device or daemon of the lab left."""
    proc = subprocess.Popen([sys.executable, "-m", "vstore.cli", "demo", str(demo_lab), "--ext4", "--files", "400",
                             "--file-size", "4K", "--size", "16M", "--async-delay", "0", "--async-bandwidth", "0",
                             "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        seen = ""
        for line in proc.stderr:  # the step lines; "mkfs" comes once the ext4 is mounted, before the files
            seen += line
            if "mkfs" in line:
                break
        assert "mkfs" in seen, seen
        time.sleep(0.5)
        os.kill(proc.pid, signal.SIGINT)
        rest = proc.communicate(timeout=120)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, seen + rest
    assert "interrupted at step 'write'" in rest and "Traceback" not in rest, rest
    assert mounts_under(demo_lab) == [] and loops_under(demo_lab) == []
    assert not is_up(demo_lab)


def test_without_the_tools_it_stops_in_one_sentence(demo_lab: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without debugfs the demo refuses before creating anything: exit 1, one sentence naming it."""
    real = shutil.which
    monkeypatch.setattr("vstore.cli.demo_ext4.shutil.which", lambda name: None if name == "debugfs" else real(name))
    res = helpers.vstore("demo", demo_lab, "--ext4", "--files", 2, ok=False)
    assert res.exit_code == 1 and "needs debugfs" in res.output and "Traceback" not in res.output, res.output
    assert not demo_lab.exists()
