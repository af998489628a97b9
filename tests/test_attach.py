"""`vstore attach`: a lab's volume as one file through FUSE, with clients nobody here wrote on it
(os.pwrite at any offset, losetup, mkfs.ext4, the kernel's ext4, e2fsck), in process and through the
daemons; and what the attach refuses (SPEC §6 [0133]-[0135])."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from jfs.fuse import fuse_available
from jfs.mounts import is_mounted, state_path
from tests.helpers import BS
from tools.bench.fuse import make_tree
from vstore.blocks.pids import alive

pytestmark = pytest.mark.skipif(fuse_available() is not None, reason=f"FUSE unavailable: {fuse_available()}")
needs_loop = pytest.mark.skipif(os.geteuid() != 0 or not all(shutil.which(t) for t in
                                                             ("losetup", "mkfs.ext4", "e2fsck", "mount")),
                                reason="loop devices, mkfs.ext4 and mount need root and e2fsprogs")

Vstore = Callable[..., Any]


def run(*cmd: object, check: bool = True) -> subprocess.CompletedProcess[str]:
    res = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=120)
    if check and res.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} exited {res.returncode}:\n{res.stdout}\n{res.stderr}")
    return res


@contextmanager
def attached(vstore: Vstore, lab: Path, mp: Path, *options: str) -> Iterator[Path]:
    """`vstore attach` (background) ... `vstore detach`; after a failure the mount is forced away."""
    mp.mkdir(exist_ok=True)
    vstore("attach", lab, mp, *options)
    try:
        assert is_mounted(mp)
        yield mp
    except BaseException:
        if is_mounted(mp):
            vstore("detach", mp, ok=False)
        if is_mounted(mp):
            run("fusermount3", "-uz", mp, check=False)
        raise
    vstore("detach", mp)
    assert not is_mounted(mp)


@contextmanager
def loop_device(file: Path, *options: str) -> Iterator[str]:
    dev = run("losetup", "--find", "--show", *options, file).stdout.strip()
    try:
        yield dev
    finally:
        run("losetup", "-d", dev, check=False)


@contextmanager
def kernel_mount(source: str | Path, where: Path, *options: str) -> Iterator[Path]:
    where.mkdir(exist_ok=True)
    run("mount", *options, source, where)
    try:
        yield where
    finally:
        if run("umount", where, check=False).returncode != 0:
            run("umount", "-l", where, check=False)


def tree_of(root: Path) -> dict[str, tuple]:
    """Every directory, symlink (its target) and file (mode, sha256) under root, lost+found aside."""
    found: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not (dirpath == str(root) and d == "lost+found"))
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if p.is_symlink():
                found[rel] = ("link", os.readlink(p))
            elif p.is_dir():
                found[rel] = ("dir",)
            else:
                found[rel] = ("file", p.stat().st_mode & 0o7777, hashlib.sha256(p.read_bytes()).hexdigest())
    return found


def source_tree(root: Path, seed: int) -> Path:
    """A generated tree: a few hundred files in nested directories, and a symlink."""
    make_tree(root, 300, seed, max_size=512 << 10, max_total=6 << 20)
    (root / "link-to-first").symlink_to("file0000.bin" if (root / "file0000.bin").exists() else "nowhere")
    return root


def fsck_clean(image: Path) -> None:
    res = run("e2fsck", "-fn", image, check=False)
    assert res.returncode == 0, f"e2fsck -fn {image}: {res.returncode}\n{res.stdout}\n{res.stderr}"


def images_equal(a: Path, b: Path) -> None:
    assert run("cmp", a, b, check=False).returncode == 0, f"{a} and {b} differ"


def write_patterns(file: Path, size: int, seed: int) -> bytearray:
    """Random aligned and unaligned os.pwrite calls, fsync; returns the bytes the file must hold."""
    rng = random.Random(seed)
    model = bytearray(size)
    fd = os.open(file, os.O_RDWR)
    try:
        model[:] = os.pread(fd, size, 0)
        for i in range(120):
            if i % 3 == 0:  # whole blocks
                length, offset = rng.randint(1, 8) * BS, rng.randrange(size // BS - 8) * BS
            else:  # anywhere, any length, across block edges
                length = rng.randint(1, 3 * BS)
                offset = rng.randrange(size - length)
            data = rng.randbytes(length)
            assert os.pwrite(fd, data, offset) == length
            model[offset:offset + length] = data
        os.fsync(fd)
        assert os.pread(fd, size, 0) == model
    finally:
        os.close(fd)
    return model


def test_patterns_at_any_offset_reach_a_c_and_d(make_lab: Callable[..., Path], vstore: Vstore,
                                                tmp_path: Path) -> None:
    """Writes at random offsets and lengths (aligned or not) through the attached file read back as
    written; after detaching, A holds exactly them, C equals A byte for byte, and after shipping so
    does D."""
    lab = make_lab(size=1 << 20)
    with attached(vstore, lab, tmp_path / "mp") as mp:
        assert os.listdir(mp) == ["A"] and (mp / "A").stat().st_size == 1 << 20
        model = write_patterns(mp / "A", 1 << 20, seed=7)
    a = lab / "primary" / "A.img"
    assert a.read_bytes() == model
    images_equal(a, lab / "sync" / "C.img")
    vstore("ship", lab, "--quiet")
    images_equal(a, lab / "async" / "D.img")


def ext4_workload(vstore: Vstore, lab: Path, tmp_path: Path) -> dict[str, tuple]:
    """attach, loop device, mkfs.ext4, mount, copy a generated tree in, sync, umount, losetup -d,
    detach; returns the tree written. While the ext4 is still mounted, after `sync`, C already
    equals A (every acknowledged write is on both), and a copy of C taken then is a file system
    e2fsck repairs by its journal alone (exit 0 or 1)."""
    src = source_tree(tmp_path / "src", seed=3)
    with attached(vstore, lab, tmp_path / "mp") as mp, loop_device(mp / "A") as dev:
        run("mkfs.ext4", "-q", "-F", dev)
        with kernel_mount(dev, tmp_path / "ext4") as fs:
            shutil.copytree(src, fs / "tree", symlinks=True)
            run("sync")
            images_equal(lab / "primary" / "A.img", lab / "sync" / "C.img")
            live = tmp_path / "C-live.img"
            shutil.copyfile(lab / "sync" / "C.img", live)
            res = run("e2fsck", "-fy", live, check=False)
            assert res.returncode in (0, 1), f"e2fsck -fy of C taken while mounted: {res.returncode}\n{res.stdout}"
            live.unlink()
            assert tree_of(fs / "tree") == tree_of(src)
    return tree_of(src)


def check_copies(lab: Path, vstore: Vstore, tmp_path: Path, expected: dict[str, tuple], *,
                 mirror: bool = False) -> None:
    """e2fsck -fn clean on A (and B), C, and after shipping on D; D equals A; a copy of C mounted
    read-only holds the tree."""
    a, c = lab / "primary" / "A.img", lab / "sync" / "C.img"
    fsck_clean(a)
    fsck_clean(c)
    images_equal(a, c)
    if mirror:
        images_equal(a, lab / "primary" / "B.img")
    vstore("ship", lab, "--quiet")
    d = lab / "async" / "D.img"
    fsck_clean(d)
    images_equal(a, d)
    copy = tmp_path / "C-copy.img"
    shutil.copyfile(c, copy)
    with kernel_mount(copy, tmp_path / "c-ro", "-o", "loop,ro") as fs:
        assert tree_of(fs / "tree") == expected


@needs_loop
@pytest.mark.parametrize("mode", ["provider", "mirror"])
def test_ext4_on_a_loop_device_over_the_attached_file(mode: str, make_lab: Callable[..., Path], vstore: Vstore,
                                                      tmp_path: Path) -> None:
    """The kernel's ext4 on a loop device over the attached file (lab down, the volume written in
    the attach process): every copy passes e2fsck -fn, C and D equal A, and C holds the tree."""
    lab = make_lab(mode=mode, size=32 << 20)
    expected = ext4_workload(vstore, lab, tmp_path)
    check_copies(lab, vstore, tmp_path, expected, mirror=mode == "mirror")


@needs_loop
def test_ext4_through_the_daemons(daemon_lab: Callable[..., Path], vstore: Vstore, tmp_path: Path) -> None:
    """The same with the lab up: the attached file writes through the primary's daemon; after the
    lab is down, every copy passes e2fsck -fn, C and D equal A, and C holds the tree."""
    lab = daemon_lab(size=32 << 20)
    vstore("lab", "up", lab)
    try:
        expected = ext4_workload(vstore, lab, tmp_path)
    finally:
        vstore("lab", "down", lab)
    check_copies(lab, vstore, tmp_path, expected)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_detaches_cleanly(sig: signal.Signals, make_lab: Callable[..., Path], vstore: Vstore,
                                   tmp_path: Path) -> None:
    """SIGTERM or SIGINT to the attach process unmounts, flushes and saves the lab: the process
    exits 0, the mountpoint is free, what was written is on A and C, and the lab can be attached
    again at once."""
    lab = make_lab(size=64 * BS)
    mp = tmp_path / "mp"
    mp.mkdir()
    doc = json.loads(vstore("attach", lab, mp, "--json").stdout)
    assert doc["file"] == str(mp.resolve() / "A") and doc["size_bytes"] == 64 * BS and not doc["readonly"]
    try:
        fd = os.open(mp / "A", os.O_WRONLY)
        os.pwrite(fd, b"signalled", 3 * BS + 7)
        os.close(fd)
        os.kill(doc["pid"], sig)
        deadline = time.monotonic() + 60
        while alive(doc["pid"]) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive(doc["pid"]) and not is_mounted(mp)
        assert not state_path(mp).exists()  # removed by the process itself: it ended cleanly
    finally:
        if is_mounted(mp):
            run("fusermount3", "-uz", mp, check=False)
    for image in (lab / "primary" / "A.img", lab / "sync" / "C.img"):
        assert image.read_bytes()[3 * BS + 7:3 * BS + 16] == b"signalled"
    with attached(vstore, lab, mp):
        pass


# -- what the attach refuses ------------------------------------------------------------------------
def test_the_fixed_layout_refuses_changes_with_the_right_errno(make_lab: Callable[..., Path], vstore: Vstore,
                                                               tmp_path: Path) -> None:
    """The volume's file keeps its size and the directory its one name: truncate, unlink, rename,
    chmod are EPERM, create and mkdir EACCES, a write from the end on ENOSPC; nothing is written."""
    lab = make_lab(size=64 * BS)
    before = (lab / "primary" / "A.img").read_bytes()
    with attached(vstore, lab, tmp_path / "mp") as mp:
        f = mp / "A"
        cases: list[tuple[int, Callable[[], object]]] = [
            (errno.EPERM, lambda: os.truncate(f, 0)),
            (errno.EPERM, lambda: os.truncate(f, 128 * BS)),
            (errno.EPERM, lambda: os.open(f, os.O_WRONLY | os.O_TRUNC)),
            (errno.EPERM, lambda: f.unlink()),
            (errno.EPERM, lambda: f.rename(mp / "B")),
            (errno.EPERM, lambda: f.chmod(0o600)),
            (errno.EACCES, lambda: (mp / "new").write_bytes(b"x")),
            (errno.EACCES, lambda: (mp / "dir").mkdir()),
        ]
        for code, action in cases:
            with pytest.raises(OSError) as info:
                action()
            assert info.value.errno == code, (action, info.value)
        fd = os.open(f, os.O_WRONLY)
        try:
            with pytest.raises(OSError) as info:
                os.pwrite(fd, b"x", 64 * BS)
            assert info.value.errno == errno.ENOSPC
            assert os.pwrite(fd, b"y" * 10, 64 * BS - 4) == 4  # crossing the end: short
        finally:
            os.close(fd)
        assert os.listdir(mp) == ["A"] and f.stat().st_size == 64 * BS
    after = (lab / "primary" / "A.img").read_bytes()
    assert after[:-4] == before[:-4] and after[-4:] == b"yyyy"


def test_read_only_attaches_refuse_writes_with_erofs(make_lab: Callable[..., Path], vstore: Vstore,
                                                     tmp_path: Path) -> None:
    """`--readonly` and `--site sync` (a replica, named C) read the volume and refuse every write
    with EROFS; the images are unchanged."""
    lab = make_lab(size=64 * BS)
    vstore("write", lab, "--lba", "3", input=b"\x5a" * BS)
    images = {p: p.read_bytes() for p in (lab / "primary" / "A.img", lab / "sync" / "C.img")}
    for options, name in ((("--readonly",), "A"), (("--site", "sync"), "C")):
        with attached(vstore, lab, tmp_path / "mp", *options) as mp:
            f = mp / name
            assert os.listdir(mp) == [name]
            assert f.read_bytes()[3 * BS:4 * BS] == b"\x5a" * BS
            for action, args in ((os.open, (f, os.O_RDWR)), (os.truncate, (f, 0)), (os.unlink, (f,))):
                with pytest.raises(OSError) as info:
                    action(*args)
                assert info.value.errno == errno.EROFS, action
    assert {p: p.read_bytes() for p in images} == images


def test_a_fenced_write_is_eio_and_written_nowhere(make_lab: Callable[..., Path], vstore: Vstore,
                                                   tmp_path: Path) -> None:
    """With protection on and the sync link cut, a write through the attached file fails with EIO,
    the attach process logs why, and A and C are unchanged."""
    lab = make_lab(size=64 * BS)
    images = {p: p.read_bytes() for p in (lab / "primary" / "A.img", lab / "sync" / "C.img")}
    vstore("fail", lab, "primary-sync")
    with attached(vstore, lab, tmp_path / "mp") as mp:
        fd = os.open(mp / "A", os.O_WRONLY)
        try:
            with pytest.raises(OSError) as info:
                os.pwrite(fd, b"z" * 100, 5000)
            assert info.value.errno == errno.EIO
        finally:
            os.close(fd)
        log = state_path(mp).with_suffix(".log").read_text()
        assert "primary-sync is down" in log.replace("\n", " ")
    assert {p: p.read_bytes() for p in images} == images


def test_cli_refuses_bad_input_in_one_sentence(make_lab: Callable[..., Path], vstore: Vstore, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A missing lab, a mountpoint that is missing, a file or not empty, an unknown site, FUSE
    missing, and a lab already attached elsewhere: exit 1 with one sentence, nothing mounted."""
    lab = make_lab(size=64 * BS)
    empty, full, file = tmp_path / "empty", tmp_path / "full", tmp_path / "file"
    empty.mkdir()
    full.mkdir()
    (full / "x").write_text("x")
    file.write_text("x")
    cases = [((tmp_path / "nolab", empty), "does not exist"), ((lab, tmp_path / "nodir"), "not a directory"),
             ((lab, file), "not a directory"), ((lab, full), "not empty"),
             ((lab, empty, "--site", "moon"), "unknown site")]
    for args, words in cases:
        res = vstore("attach", *args, ok=False)
        assert res.exit_code == 1 and words in res.output and "Traceback" not in res.output, res.output
    with attached(vstore, lab, tmp_path / "mp"):
        res = vstore("attach", lab, empty, ok=False)
        assert res.exit_code == 1 and "attached at" in res.output, res.output
    assert not is_mounted(empty)
    monkeypatch.setattr("vstore.cli.attach.fuse_available", lambda: "/dev/fuse is missing; load the fuse module")
    res = vstore("attach", lab, empty, ok=False)
    assert res.exit_code == 1 and "/dev/fuse is missing" in res.output
    res = vstore("detach", empty, ok=False)
    assert res.exit_code == 1 and "not attached" in res.output
