"""Exclusive access: one writer per volume or lab, refused at once naming the holder (real FUSE
mounts, real daemons): a second mount, a write or mkfs under a mount, two writers through the
daemons, `lab up` under an in-process mount; a dead holder's claim is taken over with a warning,
and readers of a replica share."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from click.testing import Result
from typer.testing import CliRunner

from jfs.cli import app as jfs_app
from jfs.fuse import fuse_available
from jfs.mounts import is_mounted, read_state
from vstore.blocks.device import ImageDevice
from vstore.blocks.holders import Busy, acting_as
from vstore.blocks.pids import alive
from vstore.cli.main import app as vstore_app
from vstore.daemons.processes import PROCESSES, lab_down, running_pid
from vstore.lab.system import System
from vstore.procedures.create import free_base_port, init_lab
from vstore.targets import open_lab_target

needs_fuse = pytest.mark.skipif(fuse_available() is not None, reason=f"FUSE unavailable: {fuse_available()}")
AT_ONCE = 5.0  # seconds: a refusal never waits for a lasting holder (a brief one is waited for up to 10 s)


def invoke(app: object, *args: object, ok: bool = True, input: str | None = None) -> Result:
    result = CliRunner().invoke(app, [str(a) for a in args], input=input)  # type: ignore[arg-type]
    if ok:
        assert result.exit_code == 0, result.output + str(result.exception)
    return result


def jfs(*args: object, ok: bool = True, input: str | None = None) -> Result:
    return invoke(jfs_app, *args, ok=ok, input=input)


def vstore(*args: object, ok: bool = True) -> Result:
    return invoke(vstore_app, *args, ok=ok)


def refused(run: Callable[[], Result], *named: str, code: int = 1) -> str:
    """Run a command that must be refused at once with one sentence naming the holder; its stderr."""
    started = time.monotonic()
    result = run()
    took = time.monotonic() - started
    assert result.exit_code == code, result.output
    assert took < AT_ONCE, f"refused only after {took:.1f} s"
    for text in named:
        assert text in result.stderr, result.stderr
    assert "Traceback" not in result.output
    return result.stderr


def force_unmount(mp: Path) -> None:
    if is_mounted(mp):
        subprocess.run(["fusermount3", "-uz", str(mp)], capture_output=True)
    state = read_state(mp)
    if state is not None and alive(int(state["pid"])):
        os.kill(int(state["pid"]), signal.SIGKILL)


@pytest.fixture
def lab_of(tmp_path: Path) -> Iterator[Callable[[], Path]]:
    """A factory of labs (1 MiB volumes, free ports, a jfs on the application's volume); their
    daemons are stopped after the test."""
    labs: list[Path] = []

    def make() -> Path:
        lab = tmp_path / f"lab{len(labs)}"
        init_lab(lab, size=256 * 4096, base_port=free_base_port())
        labs.append(lab)
        jfs("mkfs", f"lab:{lab}")
        return lab

    yield make
    for lab in labs:
        lab_down(lab)


@pytest.fixture
def mounts(lab_of: Callable[[], Path]) -> Iterator[Callable[[str, Path], Path]]:
    """`mount(TARGET, MP)`: `jfs mount` in the background; every mount left is unmounted after the
    test (before the labs' daemons stop), forcibly if it must."""
    made: list[Path] = []

    def mount(target: str, mp: Path) -> Path:
        mp.mkdir(exist_ok=True)
        made.append(mp)
        jfs("mount", target, mp)
        assert is_mounted(mp)
        return mp

    yield mount
    for mp in reversed(made):
        if is_mounted(mp):
            CliRunner().invoke(jfs_app, ["umount", str(mp)])
        force_unmount(mp)


def umount(mp: Path) -> None:
    assert "clean" in jfs("umount", mp).stdout


@pytest.fixture
def image(tmp_path: Path) -> Path:
    img = tmp_path / "disk.img"
    jfs("mkfs", img, "--size", "16M")
    return img


@needs_fuse
def test_a_second_read_write_mount_of_an_image_is_refused_naming_the_first(image, mounts, tmp_path):
    """One image has one read-write mount: a second is refused at once, naming the first's mount point and pid."""
    first = mounts(str(image), tmp_path / "first")
    (first / "kept").write_bytes(b"written through the first mount")
    pid = read_state(first)["pid"]  # type: ignore[index]
    second = tmp_path / "second"
    second.mkdir()
    err = refused(lambda: jfs("mount", image, second, ok=False), f"mounted at {first}", f"pid {pid}", "since",
                  f"jfs umount {first}")
    assert err.count("\n") == 1  # one sentence
    assert not is_mounted(second)
    umount(first)
    assert jfs("read", image, "/kept").stdout == "written through the first mount"


@needs_fuse
def test_write_mkfs_force_and_fsck_on_a_mounted_image_are_refused(image, mounts, tmp_path):
    """No command writes an image under its mount: `jfs write`, `jfs mkfs --force` and a repairing fsck are refused."""
    mp = mounts(str(image), tmp_path / "mnt")
    (mp / "kept").write_bytes(b"through the mount")
    refused(lambda: jfs("write", image, "/other", input="x", ok=False), f"mounted at {mp}", "jfs umount")
    refused(lambda: jfs("mkfs", image, "--force", ok=False), f"mounted at {mp}")
    refused(lambda: jfs("fsck", image, ok=False), f"mounted at {mp}", code=8)  # fsck: operational error
    umount(mp)
    assert jfs("read", image, "/kept").stdout == "through the mount"  # mkfs did not run
    jfs("write", image, "/other", input="after the unmount")
    assert sorted(jfs("ls", image).stdout.split()).count("kept") == 1


@needs_fuse
def test_two_writers_of_a_lab_through_the_daemons_are_refused(lab_of, mounts, tmp_path):
    """Through the daemons, lab:LAB has one writer: a second mount or a `jfs write` is refused naming the mount."""
    lab = lab_of()
    vstore("lab", "up", lab)
    mp = mounts(f"lab:{lab}", tmp_path / "mnt")
    (mp / "first").write_bytes(b"through the mount")
    second = tmp_path / "second"
    second.mkdir()
    refused(lambda: jfs("mount", f"lab:{lab}", second, ok=False), f"lab:{lab}", f"mounted at {mp}",
            f"jfs umount {mp}")
    refused(lambda: jfs("write", f"lab:{lab}", "/second", input="x", ok=False), f"mounted at {mp}")
    with pytest.raises(Busy, match="mounted at"):
        open_lab_target(f"lab:{lab}", writable=True)
    assert "first" in jfs("ls", f"lab:{lab}@sync").stdout  # a replica is still read, through its daemon
    umount(mp)
    jfs("write", f"lab:{lab}", "/second", input="after the unmount")
    names = jfs("ls", f"lab:{lab}").stdout
    assert "first" in names and "second" in names


@needs_fuse
def test_lab_up_is_refused_while_the_lab_is_mounted_in_process(lab_of, mounts, tmp_path):
    """With the daemons down a mount holds the lab: `lab up` (and any in-process command) is refused naming it."""
    lab = lab_of()
    mp = mounts(f"lab:{lab}", tmp_path / "mnt")
    (mp / "kept").write_bytes(b"written in process")
    refused(lambda: vstore("lab", "up", lab, ok=False), f"lab {lab}", f"mounted at {mp}", f"jfs umount {mp}")
    assert all(running_pid(lab, name) is None for name in PROCESSES)  # nothing was started
    refused(lambda: vstore("status", lab, ok=False), f"mounted at {mp}")
    refused(lambda: jfs("write", f"lab:{lab}", "/other", input="x", ok=False), f"mounted at {mp}")
    umount(mp)
    vstore("lab", "up", lab)
    assert jfs("read", f"lab:{lab}", "/kept").stdout == "written in process"
    started = time.monotonic()  # and while the daemons serve it, nothing opens the lab in process
    with pytest.raises(Busy, match=f"served by the lab's daemons .*; stop them first: vstore lab down {lab}"):
        System(lab)
    assert time.monotonic() - started < AT_ONCE


@needs_fuse
@pytest.mark.parametrize("kind", ["image", "lab"])
def test_a_claim_left_by_a_killed_holder_is_taken_over_with_a_warning(kind, image, lab_of, tmp_path):
    """A holder killed with SIGKILL leaves no lock: the next writer takes its claim over and says so on stderr."""
    target = str(image) if kind == "image" else f"lab:{lab_of()}"
    mp = tmp_path / "mnt"
    mp.mkdir()
    holder = subprocess.Popen([sys.executable, "-m", "jfs.cli", "mount", target, str(mp), "--foreground"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while not is_mounted(mp):
            assert holder.poll() is None, holder.stderr.read() if holder.stderr else ""
            assert time.monotonic() < deadline, "the mount did not come up"
            time.sleep(0.02)
        refused(lambda: jfs("write", target, "/x", input="x", ok=False), f"mounted at {mp}", f"pid {holder.pid}")
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
        if holder.stderr:
            holder.stderr.close()
        force_unmount(mp)
    after = subprocess.run([sys.executable, "-m", "jfs.cli", "write", target, "/x"], input=b"after the kill",
                           capture_output=True, timeout=60)
    assert after.returncode == 0, after.stderr
    warning = after.stderr.decode()
    assert "took over" in warning and f"pid {holder.pid}" in warning and "died" in warning
    assert jfs("read", target, "/x").stdout == "after the kill"


@needs_fuse
def test_readers_of_a_replica_share(lab_of, image, mounts, tmp_path):
    """Readers share (two read-only mounts of lab:LAB@sync, two read-only image opens); a writer is refused."""
    lab = lab_of()
    jfs("write", f"lab:{lab}", "/f", input="replicated")
    one = mounts(f"lab:{lab}@sync", tmp_path / "one")
    two = mounts(f"lab:{lab}@sync", tmp_path / "two")
    assert (one / "f").read_bytes() == (two / "f").read_bytes() == b"replicated"
    assert jfs("read", f"lab:{lab}@sync", "/f").stdout == "replicated"  # a third reader, in this process
    refused(lambda: jfs("write", f"lab:{lab}", "/g", input="x", ok=False), f"mounted at {one}", f"mounted at {two}")
    umount(one)
    umount(two)
    jfs("write", f"lab:{lab}", "/g", input="after the readers")

    with acting_as("read by this test", lasting=True):  # a lasting reader: a writer is refused at once
        first, second = ImageDevice(image, claim=True, readonly=True), ImageDevice(image, claim=True, readonly=True)
    try:
        assert first.read(0) == second.read(0)
        refused(lambda: jfs("write", image, "/x", input="x", ok=False), "is read by this test", f"pid {os.getpid()}")
    finally:
        first.close()
        second.close()
    jfs("write", image, "/x", input="after the readers")


def test_a_raw_writer_of_a_lab_image_is_refused_while_the_lab_is_open(lab_of: Callable[[], Path]) -> None:
    """While a System has the lab open (or its daemons serve it), the lab's raw images refuse a jfs writer."""
    lab = lab_of()
    image = lab / "primary" / "A.img"
    with System(lab):  # a command's System is a brief holder: the writer waits for it a little, then is refused
        result = jfs("write", image, "/raw.txt", input="x", ok=False)
        assert result.exit_code == 1 and str(image) in result.stderr and "Traceback" not in result.output
    vstore("lab", "up", lab)
    try:
        refused(lambda: jfs("write", lab / "sync" / "C.img", "/raw.txt", input="x", ok=False), "C.img")
    finally:
        vstore("lab", "down", lab)
    jfs("write", image, "/raw.txt", input="x")  # nobody holds the lab: the image is free again
