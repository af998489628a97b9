"""POSIX error semantics for file data on a real FUSE mount of jfs.

What `write()` accepted is in the file after fsync, close, unmount and remount, or the error came back
from that write; a failure after a write returned (the device refusing the commit) is reported by
fsync, close and the next write of every file description open then, once each (Linux errseq);
statfs counts buffered writes as used. Self-contained: the mount process is a small script that
serves an image through `jfs.fuse.serve`, optionally behind a device that fails writes on demand.
"""

from __future__ import annotations

import errno
import os
import random
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from jfs.fs import FileSystem, mkfs
from jfs.fsck import fsck
from jfs.fuse import fuse_available
from jfs.mounts import is_mounted
from vstore.blocks.device import BlockDevice, ImageDevice, MemoryDevice, create_image
from vstore.blocks.errors import TricopyError

needs_fuse = pytest.mark.skipif(fuse_available() is not None, reason=f"FUSE unavailable: {fuse_available()}")

ROOT = Path(__file__).resolve().parent.parent
MiB = 1 << 20
BS = 4096

# The mount process: serve IMAGE at MOUNTPOINT; while the file FAULT exists every device write fails,
# with OSError(EIO) (mode "oserror") or with a TricopyError like a fenced volume's (mode "fence").
SERVER = """
import errno, os, sys
from jfs.fs import open_image
from jfs.fuse import serve
from vstore.blocks.device import BlockDevice
from vstore.blocks.errors import TricopyError

class Refused(TricopyError):
    '''Like the fence's WriteInhibited: the storage refuses the write.'''

class Faulty(BlockDevice):
    def __init__(self, inner, fault, mode):
        self.inner, self.fault, self.mode = inner, fault, mode
        self.block_size, self.num_blocks, self.name = inner.block_size, inner.num_blocks, inner.name

    def _read(self, lba, count):
        return self.inner.read(lba, count)

    def _write(self, lba, data):
        if os.path.exists(self.fault):
            if self.mode == "fence":
                raise Refused(f"write to block {lba} refused (injected fence)")
            raise OSError(errno.EIO, f"injected write error at block {lba}")
        self.inner.write(lba, data)

    def flush(self):
        self.inner.flush()

    def close(self):
        self.inner.close()

image, mountpoint, fault, mode = sys.argv[1:5]
dev = Faulty(open_image(image), fault, mode)
try:
    serve(dev, mountpoint)
finally:
    dev.close()
"""


def make_image(path: Path, size: int = 16 * MiB) -> Path:
    create_image(path, size, BS)
    dev = ImageDevice(path, BS)
    try:
        mkfs(dev)
    finally:
        dev.close()
    return path


@contextmanager
def mounted(image: Path, mp: Path, *, fault: Path | None = None, mode: str = "oserror") -> Iterator[Path]:
    """Serve `image` at `mp` in a child process; unmount and wait for it to exit (volume clean)."""
    mp.mkdir(exist_ok=True)
    fault = fault or image.with_suffix(".no-fault")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-c", SERVER, str(image), str(mp), str(fault), mode],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while not is_mounted(mp):
            if proc.poll() is not None or time.monotonic() > deadline:
                out = proc.stdout.read().decode(errors="replace") if proc.poll() is not None else ""
                raise AssertionError(f"the mount did not come up: {out}")
            time.sleep(0.02)
        yield mp
    except BaseException:
        subprocess.run(["fusermount3", "-uz", str(mp)], capture_output=True)
        proc.kill()
        proc.wait(30)
        raise
    res = subprocess.run(["fusermount3", "-u", str(mp)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    out = proc.communicate(timeout=60)[0].decode(errors="replace")
    assert proc.returncode == 0, out


def assert_fsck_clean(image: Path | BlockDevice) -> None:
    dev = ImageDevice(image, BS, readonly=True) if isinstance(image, Path) else image
    try:
        result = fsck(dev)
    finally:
        if dev is not image:
            dev.close()
    assert result.exit_code == 0, [p.message for p in result.problems]


def free_bytes(image: Path) -> int:
    dev = ImageDevice(image, BS, readonly=True)
    try:
        return FileSystem.mount(dev, readonly=True).statfs().blocks_free * BS
    finally:
        dev.close()


def write_all(fd: int, data: bytes, offset: int | None = None) -> int:
    """os.write (or os.pwrite at `offset`) until all of `data` is taken; returns the bytes accepted
    before an error, which is re-raised with that count as `.accepted`."""
    done = 0
    while done < len(data):
        try:
            n = os.write(fd, data[done:]) if offset is None else os.pwrite(fd, data[done:], offset + done)
        except OSError as exc:
            exc.accepted = done  # type: ignore[attr-defined]
            raise
        assert n > 0
        done += n
    return done


def fill(fd: int, rng: random.Random, content: bytearray) -> OSError:
    """Append 1 MiB chunks until the volume refuses one; every accepted byte goes into `content`."""
    while True:
        chunk = rng.randbytes(MiB)
        try:
            write_all(fd, chunk)
        except OSError as exc:
            content += chunk[:exc.accepted]  # type: ignore[attr-defined]
            return exc
        content += chunk


# -- no space -----------------------------------------------------------------------------------------
@needs_fuse
def test_every_accepted_byte_survives_enospc(tmp_path: Path) -> None:
    """Every byte os.write accepted on a filling volume survives fsync, close, remount; the refused one got ENOSPC."""
    img = make_image(tmp_path / "disk.img")
    free = free_bytes(img)
    rng = random.Random(1)
    content = bytearray()
    with mounted(img, tmp_path / "mnt") as mp:
        fd = os.open(mp / "big", os.O_WRONLY | os.O_CREAT, 0o644)
        err = fill(fd, rng, content)
        assert err.errno == errno.ENOSPC
        assert len(content) > free - 64 * BS  # the volume was really filled
        # an overwrite needs new blocks (copy-on-write): it is kept, or refused by the write itself
        new = rng.randbytes(MiB)
        try:
            n = write_all(fd, new, 0)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
            n = exc.accepted  # type: ignore[attr-defined]
        content[:n] = new[:n]
        os.fsync(fd)  # nothing accepted was dropped: nothing to report
        os.close(fd)
    assert_fsck_clean(img)
    with mounted(img, tmp_path / "mnt") as mp:
        assert (mp / "big").read_bytes() == bytes(content)


@needs_fuse
def test_dd_onto_a_nearly_full_volume_keeps_what_fits(tmp_path: Path) -> None:
    """`dd bs=1M` onto a nearly full volume keeps every byte it reported, then ENOSPC: never a 0-byte file."""
    img = make_image(tmp_path / "disk.img")
    free = free_bytes(img)
    src = tmp_path / "src.bin"
    src.write_bytes(random.Random(2).randbytes(4 * MiB))
    filler = random.Random(3).randbytes(free - 2 * MiB)
    with mounted(img, tmp_path / "mnt") as mp:
        (mp / "filler").write_bytes(filler)
        res = subprocess.run(["dd", f"if={src}", f"of={mp / 'copy'}", "bs=1M"], capture_output=True, text=True)
        assert res.returncode != 0 and "No space left on device" in res.stderr, res.stderr
        kept = (mp / "copy").stat().st_size
        assert kept > MiB
    with mounted(img, tmp_path / "mnt") as mp:
        assert (mp / "copy").read_bytes() == src.read_bytes()[:kept]
        assert (mp / "filler").read_bytes() == filler


@needs_fuse
def test_statfs_counts_buffered_writes(tmp_path: Path) -> None:
    """statfs free space drops as soon as a buffered write is accepted; a full volume shows (almost) none."""
    img = make_image(tmp_path / "disk.img")
    with mounted(img, tmp_path / "mnt") as mp:
        before = os.statvfs(mp)
        fd = os.open(mp / "f", os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            write_all(fd, b"\1" * MiB)  # gathered, not yet committed
            after = os.statvfs(mp)
            assert before.f_bfree - after.f_bfree >= MiB // BS
            assert before.f_bavail - after.f_bavail >= MiB // BS
            err = fill(fd, random.Random(4), bytearray())
            assert err.errno == errno.ENOSPC
            full = os.statvfs(mp)
            assert full.f_bavail * full.f_frsize < 16 * BS  # df and write() agree: no room left
        finally:
            os.close(fd)


# -- failures after write() returned --------------------------------------------------------------
@needs_fuse
@pytest.mark.parametrize("mode", ["oserror", "fence"])
def test_commit_failure_reported_once_to_each_open_file(tmp_path: Path, mode: str) -> None:
    """A commit failing after write() returned is reported once to each open file: its fsync, close or next write."""
    img = make_image(tmp_path / "disk.img")
    fault = tmp_path / "fault"
    with mounted(img, tmp_path / "mnt", fault=fault, mode=mode) as mp:
        path = mp / "f"
        writer = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
        others = [os.open(path, os.O_WRONLY) for _ in range(3)]
        write_all(writer, b"a" * 100_000)  # accepted and gathered
        fault.touch()
        with pytest.raises(OSError) as exc:
            os.fsync(writer)
        assert exc.value.errno == errno.EIO
        fault.unlink()
        os.fsync(writer)  # reported once to this file description, then cleared
        late = os.open(path, os.O_WRONLY)  # opened after the failure was reported: never sees it
        closer, syncer, next_writer = others
        with pytest.raises(OSError) as exc:
            os.close(closer)
        assert exc.value.errno == errno.EIO
        with pytest.raises(OSError) as exc:
            os.fsync(syncer)
        assert exc.value.errno == errno.EIO
        os.fsync(syncer)
        os.close(syncer)
        with pytest.raises(OSError) as exc:
            os.write(next_writer, b"b")
        assert exc.value.errno == errno.EIO
        assert os.write(next_writer, b"b") == 1
        os.fsync(late)
        os.close(late)
        os.close(next_writer)
        os.close(writer)
        (mp / "after").write_bytes(b"the volume goes on")  # the failed commit left nothing half-done
    assert_fsck_clean(img)
    with mounted(img, tmp_path / "mnt") as mp:
        assert (mp / "after").read_bytes() == b"the volume goes on"
        assert (mp / "f").read_bytes() == b"b"  # the failed bytes are gone, the later write is there


@needs_fuse
@pytest.mark.parametrize("mode", ["oserror", "fence"])
def test_commit_failure_at_close_fails_close(tmp_path: Path, mode: str) -> None:
    """A buffered write whose commit fails at close() makes that close() fail with EIO; the next file is unaffected."""
    img = make_image(tmp_path / "disk.img")
    fault = tmp_path / "fault"
    with mounted(img, tmp_path / "mnt", fault=fault, mode=mode) as mp:
        fd = os.open(mp / "f", os.O_WRONLY | os.O_CREAT, 0o644)
        write_all(fd, b"x" * 300_000)
        fault.touch()
        with pytest.raises(OSError) as exc:
            os.close(fd)
        assert exc.value.errno == errno.EIO
        fault.unlink()
        fd = os.open(mp / "g", os.O_WRONLY | os.O_CREAT, 0o644)
        write_all(fd, b"y" * 300_000)
        os.fsync(fd)
        os.close(fd)
    assert_fsck_clean(img)
    with mounted(img, tmp_path / "mnt") as mp:
        assert (mp / "g").read_bytes() == b"y" * 300_000
        assert (mp / "f").stat().st_size == 0


# -- a commit the device fails part-way (no FUSE needed) -------------------------------------------
class Refused(TricopyError):
    """Like the fence's WriteInhibited: the storage refuses the write."""


class FailingDevice(MemoryDevice):
    """Counts writes; fails write number `fail_at` (and, when `sticky`, every later one) until healed."""

    def __init__(self, num_blocks: int) -> None:
        super().__init__(num_blocks, BS)
        self.writes: list[int] = []
        self.fail_at: int | None = None
        self.sticky = False

    def _write(self, lba: int, data: bytes) -> None:
        k = len(self.writes)
        if self.fail_at is not None and (k == self.fail_at or (self.sticky and k > self.fail_at)):
            raise Refused(f"write to block {lba} refused")
        self.writes.append(lba)
        super()._write(lba, data)


def write_and_fail(fail_at: int | None, sticky: bool) -> tuple[FailingDevice, FileSystem]:
    dev = FailingDevice(4096)
    mkfs(dev)
    fs = FileSystem.mount(dev)
    fs.write_file("/f", b"old" * 20_000)
    dev.writes.clear()
    dev.fail_at, dev.sticky = fail_at, sticky
    try:
        fs.write("/f", 10_000, b"new" * 30_000)
        fs.sync()  # the flushes, the homes and the header after the transaction
    except Refused:
        assert fail_at is not None
    return dev, fs


@pytest.mark.parametrize("sticky", [False, True], ids=["one write", "until healed"])
def test_commit_failing_at_any_write_leaves_the_file_old_or_new(sticky: bool) -> None:
    """A write and its sync that the device fails at any write (data, the transaction, a home, the
    header) leave the file old or new (as the log says: new once the transaction with its commit
    block was written); jfs goes on once the device heals."""
    dev, fs = write_and_fail(None, sticky)
    old = b"old" * 20_000
    new = fs.read("/f")
    ring = [i for i, lba in enumerate(dev.writes) if fs.geo.log_start < lba < fs.geo.log_start + fs.geo.log_blocks]
    assert len(ring) == 1 and ring[-1] < len(dev.writes) - 1  # the transaction in one write, homes after it
    for k in range(len(dev.writes)):
        dev, fs = write_and_fail(k, sticky)
        dev.fail_at = None
        expected = new if k > ring[-1] else old  # past the commit block, replay completes it
        assert fs.read("/f") == expected, k
        fs.write_file("/g", b"goes on")
        fs.unmount()
        assert_fsck_clean(dev)
        again = FileSystem.mount(dev)
        assert again.read("/f") == expected and again.read("/g") == b"goes on", k
