"""Round trips of every jfs operation on real image files; fsck 0 after random workloads; a
reopened image shows the same tree."""

from __future__ import annotations

import errno
import random
from collections.abc import Callable
from pathlib import Path

import pytest

from jfs import layout as L
from jfs.errors import (
    FileExists,
    FileNotFound,
    FileTooLarge,
    InvalidArgument,
    IsADirectory,
    NameTooLong,
    NoSpace,
    NotADirectory,
    NotEmpty,
)
from jfs.fs import FileSystem, open_image
from jfs.fsck import fsck
from tests.helpers import tree
from vstore.blocks.device import ImageDevice
from vstore.blocks.errors import FormatError


def remount(path: Path) -> tuple[FileSystem, ImageDevice]:
    dev = open_image(path)
    return FileSystem.mount(dev), dev  # type: ignore[return-value]


def test_every_operation_round_trips(jfs_image: Path) -> None:
    """Every operation reads back as done (data, size, mode, times, links); a remounted image shows the same tree."""
    path = jfs_image
    fs, dev = remount(path)
    fs.mkdir("/docs")
    fs.create("/docs/empty")
    fs.write_file("/docs/a.txt", b"alpha" * 3000)
    fs.write("/docs/a.txt", 4, b"XY")
    fs.write("/docs/a.txt", 20000, b"tail")
    data = bytearray(b"alpha" * 3000)
    data[4:6] = b"XY"
    data += bytes(20000 - len(data)) + b"tail"
    assert fs.read("/docs/a.txt") == bytes(data)
    assert fs.read("/docs/a.txt", 3, 4) == bytes(data[3:7])
    fs.truncate("/docs/a.txt", 5)
    fs.truncate("/docs/a.txt", 9000)
    assert fs.read("/docs/a.txt") == bytes(data[:5]) + bytes(8995)
    fs.rename("/docs/a.txt", "/b.txt")
    fs.chmod("/b.txt", 0o600)
    fs.utimens("/b.txt", 1, 2)
    st = fs.stat("/b.txt")
    assert (st.type, st.mode, st.size, st.atime_ns, st.mtime_ns, st.nlink) == ("file", 0o600, 9000, 1, 2, 1)
    assert fs.stat("/docs").nlink == 2 and fs.stat("/").nlink == 3
    fs.unlink("/docs/empty")
    fs.rmdir("/docs")
    fs.fsync("/b.txt")
    fs.sync()
    assert fs.listdir("/") == ["b.txt"]
    expected = tree(fs)
    fs.unmount()
    dev.close()
    fs, dev = remount(path)
    assert tree(fs) == expected
    fs.unmount()
    dev.close()
    assert fsck(open_image(path)).exit_code == 0


def test_rename_replaces_like_posix(jfs_image: Path) -> None:
    """rename replaces a file or an empty directory like POSIX, and refuses what POSIX refuses."""
    fs, dev = remount(jfs_image)
    fs.write_file("/a", b"new")
    fs.write_file("/b", b"old")
    fs.rename("/a", "/b")
    assert fs.listdir("/") == ["b"] and fs.read("/b") == b"new"
    fs.mkdir("/d1")
    fs.mkdir("/d2")
    fs.mkdir("/d1/sub")
    fs.rename("/d1", "/d2")  # empty directory target is replaced
    assert fs.listdir("/") == ["b", "d2"] and fs.listdir("/d2") == ["sub"]
    fs.mkdir("/d3")
    with pytest.raises(NotEmpty):
        fs.rename("/d3", "/d2")
    with pytest.raises(InvalidArgument):
        fs.rename("/d2", "/d2/sub/x")
    with pytest.raises(IsADirectory):
        fs.rename("/b", "/d3")
    with pytest.raises(NotADirectory):
        fs.rename("/d3", "/b")
    fs.unmount()
    assert fsck(dev).exit_code == 0


def test_errors_carry_errno_and_change_nothing(make_image: Callable[..., Path]) -> None:
    """A failing operation raises the error with the POSIX errno and changes neither the tree nor the free space."""
    fs, dev = remount(make_image(size=2 << 20))
    fs.write_file("/f", b"x")
    fs.mkdir("/d")
    fs.write_file("/d/g", b"y")
    cases = [
        (lambda: fs.read("/nope"), FileNotFound, errno.ENOENT),
        (lambda: fs.create("/f"), FileExists, errno.EEXIST),
        (lambda: fs.rmdir("/d"), NotEmpty, errno.ENOTEMPTY),
        (lambda: fs.create("/" + "n" * 256), NameTooLong, errno.ENAMETOOLONG),
        (lambda: fs.read("/d"), IsADirectory, errno.EISDIR),
        (lambda: fs.listdir("/f"), NotADirectory, errno.ENOTDIR),
        (lambda: fs.create("/f/x"), NotADirectory, errno.ENOTDIR),
        (lambda: fs.write_file("/huge", bytes(3 << 20)), NoSpace, errno.ENOSPC),
        (lambda: fs.write("/f", L.max_file_blocks(4096) * 4096, b"z"), FileTooLarge, errno.EFBIG),
    ]
    before = tree(fs)
    free = fs.statfs().blocks_free
    for call, exc, code in cases:
        with pytest.raises(exc) as info:
            call()
        assert info.value.errno == code
        assert str(info.value)
    assert tree(fs) == before and fs.statfs().blocks_free == free
    fs.create("/" + "n" * 255)
    fs.unmount()
    assert fsck(dev).exit_code == 0


def test_file_of_64_mib_uses_double_indirect(make_image: Callable[..., Path]) -> None:
    """A sparse 64 MiB file uses the double-indirect block, reads back after a remount and truncates away from it."""
    fs, dev = remount(make_image(size=4 << 20, block_size=2048))
    end = 64 << 20
    fs.create("/sparse")
    fs.write("/sparse", end - 5, b"12345")
    fs.write("/sparse", 100_000, b"mid")
    assert fs.stat("/sparse").size == end
    assert fs.read("/sparse", end - 5) == b"12345"
    assert fs.read("/sparse", 99_998, 7) == b"\0\0mid\0\0"
    node = fs.inode(fs.lookup("/sparse"))
    assert node.dindirect and node.indirect
    fs.unmount()
    fs, dev = remount(dev.path)
    assert fs.read("/sparse", end - 5) == b"12345"
    fs.truncate("/sparse", 10)
    assert fs.inode(fs.lookup("/sparse")).dindirect == 0
    fs.unmount()
    assert fsck(dev).exit_code == 0


def random_workload(fs: FileSystem, rng: random.Random, steps: int) -> dict[str, bytes | None]:
    """Random operations checked against an independent model."""
    model: dict[str, bytes | None] = {}
    names = ["a", "b", "c", "d/x", "d/y", "e/z"]
    for _ in range(steps):
        op = rng.choice(["write_file", "write", "truncate", "unlink", "mkdir", "rmdir", "rename"])
        p = "/" + rng.choice(names)
        parent = p.rsplit("/", 1)[0]
        parent_ok = parent == "" or model.get(parent, b"") is None
        try:
            if op == "write_file":
                data = rng.randbytes(rng.choice([0, 10, 5000, 70_000]))
                fs.write_file(p, data)
                assert parent_ok and model.get(p, b"") is not None
                model[p] = data
            elif op == "write":
                off, data = rng.randrange(0, 20_000), rng.randbytes(rng.randrange(1, 9000))
                fs.write(p, off, data)
                old = bytearray(model[p] or b"")
                old += bytes(max(0, off + len(data) - len(old)))
                old[off:off + len(data)] = data
                model[p] = bytes(old)
            elif op == "truncate":
                size = rng.randrange(0, 30_000)
                fs.truncate(p, size)
                old = model[p] or b""
                model[p] = old[:size] + bytes(max(0, size - len(old)))
            elif op == "unlink":
                fs.unlink(p)
                del model[p]
            elif op == "mkdir":
                d = "/" + rng.choice(["d", "e"])
                fs.mkdir(d)
                model[d] = None
            elif op == "rmdir":
                d = "/" + rng.choice(["d", "e"])
                fs.rmdir(d)
                del model[d]
            elif op == "rename":
                q = "/" + rng.choice(names)
                fs.rename(p, q)
                if p != q:
                    model[q] = model.pop(p)
        except (FileNotFound, FileExists, NotEmpty, IsADirectory, NotADirectory, KeyError):
            pass
        for path, content in model.items():
            if content is not None:
                assert fs.read(path) == content, path
    return model


@pytest.mark.parametrize("seed", range(4))
def test_random_workloads_fsck_clean_and_reopen(make_image: Callable[..., Path], seed: int) -> None:
    """After random operations checked against a model, fsck is clean and a reopened image shows the same tree."""
    path = make_image(block_size=2048 if seed % 2 else 4096, log_blocks=24)
    fs, dev = remount(path)
    random_workload(fs, random.Random(seed), 120)
    expected = tree(fs)
    fs.unmount()
    dev.close()
    result = fsck(open_image(path, readonly=True))
    assert result.exit_code == 0, result.problems
    fs, dev = remount(path)
    assert tree(fs) == expected
    dev.close()


def test_open_image_rejects_non_jfs(tmp_path: Path) -> None:
    """Opening a file that is not a jfs image is refused with FormatError."""
    bad = tmp_path / "junk.img"
    bad.write_bytes(b"x" * 8192)
    with pytest.raises(FormatError, match="not a jfs image"):
        open_image(bad)


def test_mount_without_unmount_replays(jfs_image: Path) -> None:
    """A file committed before a crash (no unmount) is there after the next mount replays the log."""
    path = jfs_image
    fs, dev = remount(path)
    fs.write_file("/kept", b"data")
    dev.close()  # no unmount: a crash after the last commit
    fs, dev = remount(path)
    assert fs.read("/kept") == b"data"
    fs.unmount()
