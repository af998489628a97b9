"""Trim rule [0168]-[0170] with a device that reports unshipped writes, LogFull, and the exactness
of the touched-files scan [0171]."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import pytest

from jfs.errors import IncompleteLog, LogFull
from jfs.fs import FileSystem, open_image
from jfs.fsck import fsck
from jfs.scan import metadata_ranges, scan_log, touched_files
from tests.helpers import tree
from vstore.blocks.device import ImageDevice


class ShippingDevice(ImageDevice):
    """An image whose writes stay "unshipped" until `ship()` (like the provider's entries)."""

    def __init__(self, path: Path, block_size: int = 4096) -> None:
        super().__init__(path, block_size)
        self.pending: set[int] = set()

    def _write(self, lba: int, data: bytes) -> None:
        super()._write(lba, data)
        self.pending.update(range(lba, lba + len(data) // self.block_size))

    def has_unshipped(self, ranges: Iterable[tuple[int, int]]) -> bool:
        return any(b in self.pending for first, count in ranges for b in range(first, first + count))

    def ship(self) -> None:
        self.pending.clear()


def live_inodes(fs: FileSystem) -> list[int]:
    return [r.ino for r in fs.log.records()]


def test_record_with_unshipped_blocks_is_never_trimmed(jfs_image: Path) -> None:
    """A log record is trimmed only when a newer record of its file exists or its blocks are shipped, never before."""
    dev = ShippingDevice(jfs_image)
    fs = FileSystem.mount(dev)
    dev.ship()
    fs.write_file("/a", b"1" * 10000)  # records /a and / (its directory block)
    ino_a = fs.lookup("/a")
    assert fs.trim() == 0  # the only records, and their blocks are unshipped [0169]
    dev.ship()
    fs.write_file("/a", b"2" * 10000)  # a second record of /a, with unshipped blocks
    assert fs.trim() == 2  # /a has a newer record [0168]; /'s blocks are shipped [0169]
    assert live_inodes(fs) == [ino_a]
    assert fs.trim() == 0  # the last record of /a: its blocks are unshipped
    assert {f.inode for f in touched_files(dev)} == {ino_a}
    dev.ship()  # the Async site confirmed the entries
    assert fs.trim() == 1 and live_inodes(fs) == []
    assert touched_files(dev) == []
    fs.unmount()


def test_checkpointed_record_of_other_file_trims_independently(jfs_image: Path) -> None:
    """Each file's records trim on their own: a shipped file's record goes while another file's unshipped one stays."""
    dev = ShippingDevice(jfs_image)
    fs = FileSystem.mount(dev)
    fs.write_file("/a", b"a" * 5000)
    dev.ship()
    fs.write_file("/b", b"b" * 5000)  # unshipped; / also touched again
    assert fs.trim() == 2  # /a's record goes: its blocks are shipped; / has a newer record
    assert fs.trim() == 0
    assert {r.path for r in fs.log.records()} == {"/b", "/"}
    fs.unmount()


def test_full_log_fails_with_logfull_and_changes_nothing(make_image: Callable[..., Path]) -> None:
    """A log full of untrimmable records fails the write with LogFull naming the Async site and changes nothing."""
    dev = ShippingDevice(make_image(log_blocks=16))
    fs = FileSystem.mount(dev)
    dev.ship()
    with pytest.raises(LogFull, match="shipped"):
        for i in range(100):
            fs.write_file(f"/f{i}", b"x" * 100)
    before = tree(fs)
    records = len(fs.log.records())
    with pytest.raises(LogFull) as info:
        fs.write_file("/late", b"y")
    assert "Async site" in str(info.value)
    assert tree(fs) == before and len(fs.log.records()) == records
    fs.unmount()
    dev.close()
    assert fsck(open_image(dev.path)).exit_code == 0
    dev = ShippingDevice(dev.path)
    fs = FileSystem.mount(dev)
    assert tree(fs) == before
    dev.ship()
    fs.write_file("/late", b"y")  # trimming now makes room
    assert fs.read("/late") == b"y"
    fs.unmount()


def test_touched_files_are_exactly_the_changed_files(jfs_image: Path) -> None:
    """touched_files lists exactly the files changed since the last trim, each with all its blocks."""
    path = jfs_image
    dev = open_image(path)
    fs = FileSystem.mount(dev)
    for name in "abcd":
        fs.write_file(f"/{name}", name.encode() * 9000)
    fs.mkdir("/quiet")
    fs.write_file("/quiet/q", b"q")
    fs.trim()
    assert fs.log.records() == [] and touched_files(dev) == []
    ino = {n: fs.lookup(f"/{n}") for n in "abcd"}
    fs.write("/b", 100, b"B" * 5000)
    fs.write_file("/e", b"e" * 100)
    fs.unlink("/c")
    fs.rename("/d", "/f")
    fs.unmount()
    files = {f.inode: f for f in touched_files(dev)}
    assert set(files) == {ino["b"], fs.lookup("/e"), ino["c"], ino["d"], 1}
    assert files[ino["d"]].path == "/f" and files[ino["c"]].ops == ["unlink"]
    b_blocks = {x for first, n in files[ino["b"]].blocks for x in range(first, first + n)}
    assert set(fs.filemap(ino["b"]).all_blocks()) <= b_blocks  # the whole file, not just the write
    assert files[1].blocks and files[1].newest_seq == max(f.newest_seq for f in files.values())
    scan = scan_log(dev)
    assert scan.complete and scan.problem is None
    meta = metadata_ranges(dev)
    assert meta[0] == (0, fs.geo.data_start) and meta[-1] == (fs.geo.num_blocks - 1, 1)


def test_scan_reports_incomplete_log(jfs_image: Path) -> None:
    """A damaged log makes the scan incomplete (recovery must copy the whole volume) until a trim empties it."""
    path = jfs_image
    dev = open_image(path)
    fs = FileSystem.mount(dev)
    fs.write_file("/a", b"a")
    fs.write_file("/b", b"b")
    fs.unmount()
    first = fs.log.txns[0]
    lba = fs.geo.log_start + 1 + first.off
    raw = bytearray(dev.read(lba))
    raw[40] ^= 0xFF
    dev.write(lba, bytes(raw))
    scan = scan_log(dev)
    assert not scan.complete and "missing or corrupt" in (scan.problem or "")
    with pytest.raises(IncompleteLog, match="whole volume"):
        touched_files(dev)
    assert fsck(dev, repair=True).exit_code == 1
    scan = scan_log(dev)
    assert not scan.complete and "discarded" in (scan.problem or "")  # records lost stays visible
    fs = FileSystem.mount(dev)
    fs.trim()  # log empty and nothing unshipped: the scan is provable again
    assert scan_log(dev).complete
    fs.unmount()
