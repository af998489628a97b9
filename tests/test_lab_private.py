"""A lab is private by default and its whole-lab commands are serialised (DESIGN "user surface",
"Process model"): every directory 0700 and file 0600 after init, writes and shipping (0770/0660
with `lab init --group`), `lab up` warns about wider modes, two `lab up` at once give one success
and one refusal naming the holder, `lab down` leaves no process of the lab, and a failed open of
the lab releases everything it claimed."""

from __future__ import annotations

import grp
import json
import os
import stat
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import BS, blocks, image, open_lab
from vstore.blocks import pids
from vstore.blocks.device import ImageDevice
from vstore.blocks.errors import BlockDeviceError, FormatError
from vstore.daemons.processes import lab_up
from vstore.lab.system import System

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def usual_umask() -> Iterator[None]:
    """The umask most users have (022): the lab must be private in spite of it."""
    before = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(before)


def every_path(lab: Path) -> dict[str, os.stat_result]:
    """Every directory and file under `lab` (the lab itself included), by path relative to it."""
    found = {".": os.lstat(lab)}
    for root, dirs, files in os.walk(lab):
        for name in dirs + files:
            path = Path(root) / name
            found[str(path.relative_to(lab))] = os.lstat(path)
    return found


def wrong_modes(lab: Path, dir_mode: int, file_mode: int, *, key_mode: int = 0o600) -> dict[str, str]:
    """Paths whose permission bits are not the lab's (`path: mode`); empty when all are right."""
    wrong = {}
    for rel, st in every_path(lab).items():
        want = dir_mode if stat.S_ISDIR(st.st_mode) else key_mode if rel == "lab.key" else file_mode
        if st.st_mode & 0o777 != want:
            wrong[rel] = oct(st.st_mode & 0o7777)
    return wrong


def processes_naming(lab: Path) -> list[str]:
    """The command lines of every running process (but this one) that name `lab` (scan of /proc)."""
    needle = str(lab).encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if needle in cmdline:
            command = cmdline.replace(b"\0", b" ").decode(errors="replace")
            found.append(f"{entry.name}: {command}")
    return found


def wait_shipped(lab: Path, vstore) -> None:
    """Until the async pair has nothing waiting (the shipper process runs)."""
    for _ in range(400):
        doc = json.loads(vstore("status", lab, "--json").stdout)
        if all(p["entries_waiting"] == 0 for p in doc["pairs"]):
            return
        time.sleep(0.05)
    raise AssertionError("entries were not shipped")


def test_a_new_lab_is_private(make_lab):
    """After `lab init` (umask 022) every directory of the lab is 0700 and every file 0600."""
    lab = make_lab(mode="mirror", volumes=2)
    assert wrong_modes(lab, 0o700, 0o600) == {}


def test_waiting_entries_are_private(make_lab, vstore):
    """The spool's segments holding unshipped entries, written with the lab down, are 0600."""
    lab = make_lab(mode="provider")
    for i in range(3):
        vstore("write", lab, "--lba", i, input=blocks(i))
    assert list((lab / "primary" / "spool").iterdir())  # entries wait in a segment
    assert wrong_modes(lab, 0o700, 0o600) == {}


def test_the_lab_stays_private_after_writes_and_shipping_in_process(make_lab, vstore):
    """Writes (the spool's segments), shipping (the receive journal), a fault and its heal with the lab
    down create only 0600 files and 0700 directories."""
    lab = make_lab(mode="provider")
    for i in range(5):
        vstore("write", lab, "--lba", i, input=blocks(i))
    assert list((lab / "primary" / "spool").iterdir())  # entries wait in a segment
    vstore("ship", lab)
    vstore("fail", lab, "primary-async")
    vstore("heal", lab, "primary-async")
    assert image(lab, "async", "D")[:5 * BS] == blocks(0) + blocks(1) + blocks(2) + blocks(3) + blocks(4)
    assert wrong_modes(lab, 0o700, 0o600) == {}


def test_the_lab_stays_private_while_its_daemons_run_and_after(daemon_lab, vstore):
    """With the daemons up (logs, pid and ready files, claims, write intent, the daemon's spool segments
    and the shipped batches) and after `lab down`, every file is 0600 and every directory 0700."""
    lab = daemon_lab(mode="provider")
    vstore("lab", "up", lab)
    for i in range(5):
        vstore("write", lab, "--lba", i, input=blocks(i))
    wait_shipped(lab, vstore)
    assert {p.name for p in (lab / "run").iterdir()} >= {"primary.log", "shipper.pid", "async.ready"}
    assert wrong_modes(lab, 0o700, 0o600) == {}
    vstore("lab", "down", lab)
    assert wrong_modes(lab, 0o700, 0o600) == {}


def test_a_lab_shared_with_a_group(make_lab, vstore):
    """`lab init --group G`: directories 0770 and files 0660 (the key 0600), all of group G, and G is
    recorded in topology.toml; files made later (state saved by a command) follow it."""
    group = grp.getgrgid(os.getegid())
    lab = make_lab(mode="mirror", group=group.gr_name)
    assert wrong_modes(lab, 0o770, 0o660) == {}
    assert {st.st_gid for st in every_path(lab).values()} == {group.gr_gid}
    assert tomllib.loads((lab / "topology.toml").read_text())["lab"]["group"] == group.gr_name
    vstore("fail", lab, "primary-sync")
    vstore("heal", lab, "primary-sync")
    assert wrong_modes(lab, 0o770, 0o660) == {}
    r = vstore("lab", "init", lab.parent / "other", "--group", "no-such-group-here", ok=False)
    assert r.exit_code == 1 and "no group" in r.stderr and not (lab.parent / "other").exists()


def test_lab_up_warns_once_per_kind_of_path_open_wider(daemon_lab, vstore):
    """`lab up` on a lab whose images and directories were opened to others says so, one line for the
    images and one for the directories (not one per file), with the chmod that closes them."""
    lab = daemon_lab(mode="mirror")
    for img in lab.glob("*/*.img"):
        img.chmod(0o644)
    for site in ("primary", "sync", "async"):
        (lab / site).chmod(0o755)
    r = vstore("lab", "up", lab)
    lines = [line for line in r.stderr.splitlines() if "open to" in line]
    assert len(lines) == 2, r.stderr
    assert any("4 images" in line and "every user" in line for line in lines), r.stderr
    assert any("3 directories" in line for line in lines), r.stderr
    assert all(f"chmod -R go-rwx {lab}" in line for line in lines)


def test_status_reports_paths_open_wider(make_lab, vstore):
    """`vstore status` lists paths open to others under "warnings" (--json) and in its table; a
    private lab has none."""
    lab = make_lab(mode="mirror")
    assert json.loads(vstore("status", lab, "--json").stdout)["warnings"] == []
    (lab / "primary" / "A.img").chmod(0o644)
    warnings = json.loads(vstore("status", lab, "--json").stdout)["warnings"]
    assert len(warnings) == 1 and "1 image" in warnings[0] and "every user" in warnings[0], warnings
    assert "every user" in vstore("status", lab).stdout


def test_two_lab_ups_at_once_one_succeeds_and_down_leaves_nothing(daemon_lab, vstore):
    """Two `vstore lab up` processes started together: exactly one succeeds, the other exits non-zero
    naming the holder (the first, `lab up`); after `lab down` no process of the lab is left."""
    lab = daemon_lab(mode="provider")
    # The lab is open here (a brief holder) while both start: the first to get the lab's control
    # claim waits for it, so both are certainly running at the same time.
    held = System(lab)
    try:
        procs = [subprocess.Popen([sys.executable, "-m", "vstore.cli", "lab", "up", str(lab)], cwd=REPO,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
        while all(p.poll() is None for p in procs):
            time.sleep(0.02)
    finally:
        held.close()
    results = [(p, *p.communicate(timeout=60)) for p in procs]
    won = [r for r in results if r[0].returncode == 0]
    lost = [r for r in results if r[0].returncode != 0]
    assert len(won) == 1 and len(lost) == 1, [(p.returncode, err) for p, _, err in results]
    refusal = " ".join(lost[0][2].split())
    assert "being started" in refusal and f"pid {won[0][0].pid}" in refusal and "lab up" in refusal, refusal
    vstore("lab", "down", lab)
    assert processes_naming(lab) == []


def test_lab_down_stops_a_process_whose_pid_file_is_gone(daemon_lab, vstore):
    """`lab down` finds a process of the lab without its pid file (by its command line) and stops it."""
    lab = daemon_lab(mode="provider")
    started = lab_up(lab)
    (lab / "run" / "shipper.pid").unlink()
    try:
        vstore("lab", "down", lab)
        assert not pids.alive(started["shipper"])
        assert processes_naming(lab) == []
    finally:
        if pids.alive(started["shipper"]):
            os.kill(started["shipper"], 9)


def test_a_failed_open_releases_the_lab_and_its_images(make_lab):
    """A System open that fails (a damaged state.json, a missing image) holds nothing afterwards: the
    next open in the same process, and a raw writer of an image, are not refused."""
    lab = make_lab(mode="provider")
    state = lab / "sync" / "state.json"
    good = state.read_bytes()
    state.write_bytes(b"{damaged")
    with pytest.raises(FormatError) as damaged:
        System(lab)
    state.write_bytes(good)
    with open_lab(lab) as system:  # refused (after a wait) while the failed open still held the lab
        assert system.present("sync")
    image_c = lab / "sync" / "C.img"
    image_c.rename(lab / "sync" / "C.moved")
    with pytest.raises(BlockDeviceError) as missing:
        System(lab)
    (lab / "sync" / "C.moved").rename(image_c)
    with ImageDevice(lab / "primary" / "A.img", claim=True):  # the primary's image was opened before C failed
        pass
    with open_lab(lab) as system:
        assert system.present("sync")
    assert damaged.value and missing.value  # both failures are still referenced here, as after a traceback
