"""Helpers for tests that look at jfs trees on replicas."""

from __future__ import annotations

import hashlib
from pathlib import Path

from jfs.fs import FileSystem
from jfs.scan import metadata_ranges
from vstore.blocks.device import ImageDevice, MemoryDevice


def snapshot(path: Path) -> MemoryDevice:
    """A private in-memory copy of an image (so a read-only mount can replay without touching it)."""
    data = path.read_bytes()
    return MemoryDevice(len(data) // 4096, data=data, name=str(path))


def tree(fs: FileSystem, path: str = "/") -> dict[str, tuple]:
    out: dict[str, tuple] = {}
    for name in sorted(fs.listdir(path)):
        p = f"{path.rstrip('/')}/{name}"
        st = fs.stat(p)
        if st.type == "dir":
            out[p] = ("dir", st.mode)
            out.update(tree(fs, p))
        else:
            out[p] = ("file", st.mode, st.size, hashlib.sha256(fs.read(p)).hexdigest())
    return out


def image_tree(path: Path) -> dict[str, tuple]:
    fs = FileSystem.mount(snapshot(path))
    try:
        return tree(fs)
    finally:
        fs.unmount()


def allocated_blocks(path: Path) -> list[int]:
    """Metadata blocks plus every block owned by a reachable inode (after log replay)."""
    dev = snapshot(path)
    fs = FileSystem.mount(dev)
    blocks: set[int] = set()
    for first, n in metadata_ranges(dev):
        blocks.update(range(first, first + n))

    def walk(p: str) -> None:
        ino = fs.lookup(p)
        for first, n in fs.data_ranges_of(ino):
            blocks.update(range(first, first + n))
        if fs.stat(p).type == "dir":
            for name in fs.listdir(p):
                walk(f"{p.rstrip('/')}/{name}")

    walk("/")
    return sorted(blocks)


def same_allocated_blocks(c: Path, d: Path) -> list[int]:
    """Allocated blocks of C whose content differs in D (after replaying both logs in memory)."""
    cdev, ddev = snapshot(c), snapshot(d)
    FileSystem.mount(cdev).unmount()
    FileSystem.mount(ddev).unmount()
    return [b for b in allocated_blocks(c) if cdev.read(b) != ddev.read(b)]


def open_readonly(path: Path) -> ImageDevice:
    return ImageDevice(path, readonly=True)
