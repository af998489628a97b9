"""Small valid jfs images for the jfs fuzz targets, and the CRC resealing that lets mutations reach
behind the checksums (SPEC §8 [0160]; jfs/FORMAT.md).

Keeps true:
- `base_images()` are made by `jfs.fs.mkfs` and the file system itself on a `MemoryDevice`: a tree
  of files (one with a pointer block) and directories, cleanly unmounted; the same volume left
  mounted (dirty); and a crash state at the commit point of the last operation (its transaction
  committed in the log but not yet at its home locations, so mounting replays it). Built once.
- `reseal(image)` recomputes, by magic, the CRC of every structure it finds (superblocks, log
  header, inodes, bitmaps, pointer and directory blocks, transaction descriptors and commits with
  the CRC over the whole transaction); a block without a known magic is left as it is.
"""

from __future__ import annotations

from functools import cache

from jfs import layout as L
from jfs.fs import FileSystem, mkfs
from vstore.blocks.device import MemoryDevice

BLOCK_SIZE = 2048
NUM_BLOCKS = 96
UUID = bytes(range(16))
_SB_CRC = L.SUPERBLOCK_BYTES - 4
_LOG_CRC = L.LogHeader.sizeof() - 4
_HEAD_CRC = L.TXN_HEAD_BYTES - 4
_COMMIT_CRC = L.Commit.sizeof() - 4
_INODE_CRC = L.INODE_SIZE - 4


def _put_crc(buf: bytearray, start: int, end: int) -> None:
    if end + 4 <= len(buf):
        buf[end:end + 4] = L.crc32(bytes(buf[start:end])).to_bytes(4, "little")


def reseal_block(buf: bytearray, lba: int, bs: int, itable: range) -> None:
    """The CRCs of the structure in block `lba` of `buf` (found by its magic)."""
    at = lba * bs
    magic = bytes(buf[at:at + 4])
    if magic == b"JFSB":
        _put_crc(buf, at, at + _SB_CRC)
    elif magic == b"JLOG":
        _put_crc(buf, at, at + _LOG_CRC)
    elif magic in (b"JIBM", b"JBBM", b"JDIR", b"JPTR"):
        _put_crc(buf, at, at + bs - 4)
    elif lba in itable:
        for slot in range(at, at + bs, L.INODE_SIZE):
            if buf[slot:slot + 2] == b"IN":
                _put_crc(buf, slot, slot + _INODE_CRC)


def reseal_ring(buf: bytearray, geo: L.Geometry) -> None:
    """Each transaction found in the ring gets a valid head, txn CRC and commit block."""
    bs, ring, first = geo.block_size, geo.log_blocks - 1, geo.log_start + 1
    for off in range(ring):
        at = (first + off) * bs
        if buf[at:at + 4] != b"JTXD":
            continue
        _put_crc(buf, at, at + _HEAD_CRC)
        desc = int.from_bytes(buf[at + 6:at + 8], "little")
        meta = int.from_bytes(buf[at + 32:at + 36], "little")
        total = desc + meta + 1
        if not 2 <= total <= ring:
            continue
        blocks = [(first + (off + i) % ring) * bs for i in range(total)]
        commit = blocks[-1]
        if buf[commit:commit + 4] != b"JTXC":
            continue
        covered = b"".join(bytes(buf[b:b + bs]) for b in blocks[:-1])
        buf[commit + 36:commit + 40] = L.crc32(covered).to_bytes(4, "little")
        _put_crc(buf, commit, commit + _COMMIT_CRC)


def reseal(buf: bytearray, geo: L.Geometry) -> None:
    """Every CRC of the image `buf`, laid out as `geo` says."""
    itable = range(geo.itable_start, geo.itable_start + geo.itable_blocks)
    for lba in range(len(buf) // geo.block_size):
        if not geo.log_start < lba < geo.log_start + geo.log_blocks:
            reseal_block(buf, lba, geo.block_size, itable)
    reseal_ring(buf, geo)


class _Snapshots(MemoryDevice):
    """A memory device that keeps its content at every flush (the crash states between them)."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        super().__init__(num_blocks, block_size)
        self.at_flush: list[bytes] = []

    def flush(self) -> None:
        self.at_flush.append(bytes(self.buf))


def _populate(fs: FileSystem) -> None:
    fs.mkdir("/d")
    fs.mkdir("/d/e")
    fs.write_file("/a", b"hello jfs\n")
    fs.write_file("/d/b", bytes(range(256)) * 20)
    fs.write_file("/d/e/big", b"\x5a" * (BLOCK_SIZE * (L.N_DIRECT + 2)))  # needs a pointer block
    fs.write_file("/d/e/hole", b"")
    fs.truncate("/d/e/hole", BLOCK_SIZE * 3 + 5)
    fs.rename("/a", "/d/a2")
    fs.write_file("/gone", b"x")
    fs.unlink("/gone")


@cache
def base_images() -> tuple[bytes, ...]:
    """(clean, mounted, crash at the last commit point) images of the same small tree."""
    dev = _Snapshots(NUM_BLOCKS, BLOCK_SIZE)
    mkfs(dev, label="fuzz", uuid=UUID, inodes=32, log_blocks=24)
    fs = FileSystem.mount(dev)
    _populate(fs)
    mounted = bytes(dev.buf)
    dev.at_flush.clear()
    fs.write_file("/d/last", b"the last write")
    crash = dev.at_flush[1]  # data flushed, then the log blocks ending in the commit: the commit point
    fs.unmount()
    return bytes(dev.buf), mounted, crash


def geometry() -> L.Geometry:
    return L.Geometry.from_superblock(L.parse_checked(L.Superblock, base_images()[0][:L.SUPERBLOCK_BYTES], "sb"))
