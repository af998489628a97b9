"""Real programs on real FUSE mounts of jfs (SPEC §8): tar, sqlite3, SIGKILL during a copy, and a
lab whose primary is lost while the tree it holds is replicated."""

from __future__ import annotations

import errno
import hashlib
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from jfs import layout as L
from jfs.codecs import read_superblock
from jfs.fuse import fuse_available
from jfs.mounts import is_mounted
from tools.bench.fuse import make_tree

pytestmark = pytest.mark.skipif(fuse_available() is not None, reason=f"FUSE unavailable: {fuse_available()}")

JFS = [sys.executable, "-m", "jfs.cli"]
VSTORE = [sys.executable, "-m", "vstore.cli"]


def run(cmd: list[str], *, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and res.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {res.returncode}:\n{res.stdout}\n{res.stderr}")
    return res


def force_unmount(mp: Path) -> None:
    if is_mounted(mp):
        subprocess.run(["fusermount3", "-uz", str(mp)], capture_output=True)


@contextmanager
def mounted(target: str, mp: Path) -> Iterator[Path]:
    """`jfs mount` (background) ... `jfs umount`, which waits until the volume is clean."""
    mp.mkdir(exist_ok=True)
    run([*JFS, "mount", target, str(mp)])
    try:
        assert is_mounted(mp)
        yield mp
    except BaseException:
        subprocess.run([*JFS, "umount", str(mp)], capture_output=True, timeout=120)
        force_unmount(mp)
        raise
    run([*JFS, "umount", str(mp)])
    assert not is_mounted(mp)


def fsck(target: str, *extra: str) -> int:
    return run([*JFS, "fsck", target, *extra], check=False).returncode


def diff(a: Path, b: Path) -> str:
    res = subprocess.run(["diff", "-r", str(a), str(b)], capture_output=True, text=True)
    return res.stdout + res.stderr


def modes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mode for p in sorted(root.rglob("*"))}


def new_lab(tmp_path: Path, *, log_blocks: int = 16384, size: str = "128M") -> Path:
    lab = tmp_path / "lab"
    run([*VSTORE, "lab", "init", str(lab), "--size", size, "--spool-capacity", "1G", "--quiet"])
    run([*JFS, "mkfs", f"lab:{lab}", "--log-blocks", str(log_blocks)])
    return lab


# -- 1. untar a tree of ~500 files -------------------------------------------------------------------
def test_untar_fsck_remount_diff(tmp_path: Path) -> None:
    """A tree of ~500 files untarred onto a mount fscks clean and reads back identical, modes too, after a remount."""
    src = tmp_path / "src"
    total = make_tree(src, 500, seed=8)
    assert total > 20 << 20
    archive = tmp_path / "tree.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(src, arcname=".")
    img = tmp_path / "disk.img"
    run([*JFS, "mkfs", str(img), "--size", "128M"])
    mp = tmp_path / "mnt"
    with mounted(str(img), mp):
        run(["tar", "-xf", str(archive), "-C", str(mp)])
    assert fsck(str(img)) == 0
    with mounted(str(img), mp):
        assert diff(src, mp) == ""
        assert modes(mp) == modes(src)
        st = os.statvfs(mp)
        assert st.f_namemax == 255 and st.f_bfree < st.f_blocks


# -- 2. sqlite3, DELETE and WAL journals ---------------------------------------------------------
def sqlite_workload(db: Path, journal: str, n: int = 1000) -> None:
    con = sqlite3.connect(db, isolation_level=None)
    try:
        assert con.execute(f"PRAGMA journal_mode={journal}").fetchone()[0].upper() == journal
        con.execute("PRAGMA synchronous=FULL")
        con.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, k TEXT UNIQUE, v BLOB)")
        rng = random.Random(journal)
        for i in range(n):
            con.execute("BEGIN")
            con.execute("INSERT INTO t (k, v) VALUES (?, ?)", (f"key{i}", rng.randbytes(rng.randint(10, 3000))))
            if i % 7 == 0 and i:
                con.execute("UPDATE t SET v = ? WHERE id = ?", (b"x" * 100, rng.randint(1, i)))
            con.execute("COMMIT")
    finally:
        con.close()


def check_db(path: Path, n: int = 1000) -> None:
    con = sqlite3.connect(path)
    try:
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert con.execute("SELECT count(*) FROM t").fetchone()[0] == n
    finally:
        con.close()


@pytest.mark.parametrize("journal", ["DELETE", "WAL"])
def test_sqlite_on_lab_mount(tmp_path: Path, journal: str) -> None:
    """sqlite3 (DELETE and WAL journals) on a lab mount keeps an intact database, the same at the Async site."""
    lab = new_lab(tmp_path)
    mp = tmp_path / "mnt"
    with mounted(f"lab:{lab}", mp):
        sqlite_workload(mp / "test.db", journal)
        check_db(mp / "test.db")
        assert os.listdir(mp) == ["test.db"]  # the journal / WAL is gone after the last close
    copy = tmp_path / "primary.db"
    copy.write_bytes(subprocess.run([*JFS, "read", f"lab:{lab}", "/test.db"], capture_output=True,
                                    check=True).stdout)
    check_db(copy)
    run([*VSTORE, "ship", str(lab)], timeout=300)
    far = tmp_path / "async.db"
    far.write_bytes(subprocess.run([*JFS, "read", f"lab:{lab}@async", "/test.db"], capture_output=True,
                                   check=True).stdout)
    check_db(far)
    assert far.read_bytes() == copy.read_bytes()


# -- 3. SIGKILL of the mount process during a copy ----------------------------------------------------
def copier(mp: Path, run_no: int, rng: random.Random, synced: dict[str, str], stop: threading.Event) -> None:
    """Write files (fsync each) until the mount dies; record each file whose fsync returned."""
    d = mp / f"run{run_no:02d}"
    try:
        d.mkdir()
        for j in range(80):
            if stop.is_set():
                return
            data = rng.randbytes(rng.choice([0, rng.randint(1, 4096), rng.randint(4096, 128 << 10)]))
            p = d / f"f{j:03d}"
            fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                for k in range(0, len(data), 8192):
                    os.write(fd, data[k:k + 8192])
                if j % 3 != 2:  # every third file is never fsynced
                    os.fsync(fd)
                    synced[str(p.relative_to(mp))] = hashlib.sha256(data).hexdigest()
            finally:
                os.close(fd)
    except OSError as exc:
        assert exc.errno in (errno.ENOTCONN, errno.ECONNABORTED, errno.EIO, errno.ENOENT), exc


def test_sigkill_during_copy(tmp_path: Path) -> None:
    """A mount killed during a copy leaves an image that replays clean, with every file whose fsync returned intact."""
    img = tmp_path / "disk.img"
    run([*JFS, "mkfs", str(img), "--size", "128M"])
    mp = tmp_path / "mnt"
    mp.mkdir()
    synced: dict[str, str] = {}
    for run_no in range(10):
        rng = random.Random(1000 + run_no)
        proc = subprocess.Popen([*JFS, "mount", str(img), str(mp), "--foreground"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 30
            while not is_mounted(mp):
                assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
                assert time.monotonic() < deadline, "the mount did not come up"
                time.sleep(0.02)
            stop = threading.Event()
            t = threading.Thread(target=copier, args=(mp, run_no, rng, synced, stop))
            t.start()
            time.sleep(rng.uniform(0.02, 0.8))
            proc.kill()
            proc.wait(timeout=30)
            stop.set()
            t.join(timeout=60)
            assert not t.is_alive()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            if proc.stderr:
                proc.stderr.close()
            force_unmount(mp)
        sb = read_superblock(img.read_bytes()[:4096])
        assert sb.state == L.STATE_DIRTY  # killed: not unmounted
        assert fsck(str(img), "-n") == 0  # the committed log replays; nothing else is wrong
        with mounted(str(img), mp):
            for rel, digest in synced.items():
                assert hashlib.sha256((mp / rel).read_bytes()).hexdigest() == digest, rel
        assert fsck(str(img)) == 0
    assert len(synced) > 10


# -- 4. lose the primary while a tree is on it ---------------------------------------------------------
def test_lab_primary_lost_recover_to_sync(tmp_path: Path) -> None:
    """A tree copied onto a lab mount is whole at Sync after losing the primary, and at Async read-only."""
    src = tmp_path / "src"
    make_tree(src, 80, seed=4)
    lab = new_lab(tmp_path)
    mp = tmp_path / "mnt"
    with mounted(f"lab:{lab}", mp):
        run(["cp", "-a", f"{src}/.", str(mp)])
        assert diff(src, mp) == ""
    shutil.rmtree(lab / "primary")
    run([*VSTORE, "recover", str(lab), "--to", "sync"], timeout=300)
    with mounted(f"lab:{lab}", mp):  # now the Sync site's volume
        assert diff(src, mp) == ""
        assert modes(mp) == modes(src)
    run([*VSTORE, "ship", str(lab)], timeout=300)
    far = tmp_path / "far"
    with mounted(f"lab:{lab}@async", far):
        assert diff(src, far) == ""
        with pytest.raises(OSError) as exc:
            (far / "new").write_bytes(b"x")
        assert exc.value.errno == errno.EROFS


# -- errno mapping --------------------------------------------------------------------------------------
def test_errors_map_to_errno(tmp_path: Path) -> None:
    """Through FUSE, every jfs error reaches programs as the POSIX errno, and the image stays fsck-clean."""
    img = tmp_path / "disk.img"
    run([*JFS, "mkfs", str(img), "--size", "16M"])
    mp = tmp_path / "mnt"
    with mounted(str(img), mp):
        (mp / "d").mkdir()
        (mp / "d" / "f").write_bytes(b"hello")
        (mp / "f").write_bytes(b"x")

        def err(fn: object, *args: object) -> int:
            with pytest.raises(OSError) as exc:
                fn(*args)  # type: ignore[operator]
            return exc.value.errno

        assert err(os.stat, mp / "missing") == errno.ENOENT
        assert err(os.mkdir, mp / "d") == errno.EEXIST
        assert err(os.rmdir, mp / "d") == errno.ENOTEMPTY
        assert err(os.open, mp / ("n" * 256), os.O_CREAT | os.O_WRONLY) == errno.ENAMETOOLONG
        assert err(os.unlink, mp / "d") == errno.EISDIR
        assert err(os.rename, mp / "f", mp / "d") == errno.EISDIR
        assert err(os.rmdir, mp / "f") == errno.ENOTDIR
        assert err(os.stat, mp / "f" / "x") == errno.ENOTDIR
        os.rename(mp / "f", mp / "d" / "f")  # replace semantics
        assert (mp / "d" / "f").read_bytes() == b"x"
        fd = os.open(mp / "big", os.O_WRONLY | os.O_CREAT)
        try:
            with pytest.raises(OSError) as exc:
                for _ in range(64):
                    os.write(fd, b"\1" * (1 << 20))
                os.fsync(fd)
            assert exc.value.errno == errno.ENOSPC
        finally:
            os.close(fd)
        os.unlink(mp / "big")
    assert fsck(str(img)) == 0


def test_sigterm_leaves_image_clean(tmp_path: Path) -> None:
    """SIGTERM to the mount process unmounts cleanly: the image is marked clean and keeps what was written."""
    img = tmp_path / "disk.img"
    run([*JFS, "mkfs", str(img), "--size", "16M"])
    mp = tmp_path / "mnt"
    mp.mkdir()
    proc = subprocess.Popen([*JFS, "mount", str(img), str(mp), "--foreground"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not is_mounted(mp):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
        (mp / "a").write_bytes(b"kept")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        force_unmount(mp)
    assert not is_mounted(mp)
    assert read_superblock(img.read_bytes()[:4096]).state == L.STATE_CLEAN
    assert fsck(str(img)) == 0
    assert run([*JFS, "read", str(img), "/a"]).stdout == "kept"
