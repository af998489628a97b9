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
- `field_sites(image)` lists every field of every structure in an image (superblocks, log header,
  transaction descriptor with its homes and records, commit, inodes, bitmaps, pointer and
  directory blocks with their entries) as byte positions, so a mutation can change one field's
  value and `reseal` make it pass the checksums: the mutations then test what the checks behind
  the CRCs judge.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Any

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
    """Each transaction found in the ring gets a valid head, txn check (`txn_digest`) and commit block."""
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
        buf[commit + 36:commit + 40] = L.txn_digest(covered).to_bytes(4, "little")
        _put_crc(buf, commit, commit + _COMMIT_CRC)


def reseal(buf: bytearray, geo: L.Geometry) -> None:
    """Every CRC of the image `buf`, laid out as `geo` says."""
    itable = range(geo.itable_start, geo.itable_start + geo.itable_blocks)
    for lba in range(len(buf) // geo.block_size):
        if not geo.log_start < lba < geo.log_start + geo.log_blocks:
            reseal_block(buf, lba, geo.block_size, itable)
    reseal_ring(buf, geo)


@dataclass(frozen=True)
class Site:
    """One integer field of one structure: `width` bytes at `offset` of the image (little-endian)."""

    name: str
    offset: int
    width: int

    def get(self, buf: bytes | bytearray) -> int:
        return int.from_bytes(buf[self.offset:self.offset + self.width], "little")

    def put(self, buf: bytearray, value: int) -> None:
        buf[self.offset:self.offset + self.width] = (value % (1 << 8 * self.width)).to_bytes(self.width, "little")


def _fields(body: Any) -> list[tuple[str, int, int]]:
    """(name, offset, width) of each field of a fixed-size construct Struct (arrays element by element)."""
    out, off = [], 0
    for sc in body.subcons:
        size = sc.sizeof()
        if sc.name == "direct":
            out += [(f"direct[{i}]", off + 4 * i, 4) for i in range(L.N_DIRECT)]
        elif sc.name == "label":
            out.append((sc.name, off, 8))
        else:
            out.append((sc.name, off, min(size, 8)))
        off += size
    return out


def _struct_sites(kind: str, body: Any, at: int) -> list[Site]:
    return [Site(f"{kind}.{name}", at + off, width) for name, off, width in _fields(body)]


def _txn_sites(buf: bytes, geo: L.Geometry, off: int, what: str) -> list[Site]:
    """The fields of the transaction whose descriptor is at ring offset `off`."""
    bs, ring, first = geo.block_size, geo.log_blocks - 1, geo.log_start + 1
    at = (first + off) * bs
    sites = _struct_sites(what, L.TxnHeadBody, at)
    desc = int.from_bytes(buf[at + 6:at + 8], "little")
    meta = int.from_bytes(buf[at + 32:at + 36], "little")
    if 2 <= desc + meta + 1 <= ring:
        commit = (first + (off + desc + meta) % ring) * bs
        if buf[commit:commit + 4] == b"JTXC":
            sites += _struct_sites(f"{what}.commit", L.CommitBody, commit)
    body_end = at + min(bs, L.TXN_HEAD_BYTES + int.from_bytes(buf[at + 36:at + 40], "little"))
    pos = at + L.TXN_HEAD_BYTES

    def take(name: str, width: int) -> int:
        nonlocal pos
        if pos + width > body_end:
            raise IndexError(name)
        sites.append(Site(f"{what}.{name}", pos, width))
        value = int.from_bytes(buf[pos:pos + width], "little")
        pos += width
        return value

    try:
        for i in range(min(take("homes.count", 4), 64)):
            take(f"homes[{i}]", 4)
        for i in range(min(take("records.count", 4), 16)):
            take(f"record[{i}].ino", 4)
            take(f"record[{i}].op", 1)
            path_len = take(f"record[{i}].path_len", 2)
            pos += path_len
            for j in range(min(take(f"record[{i}].ranges.count", 4), 16)):
                take(f"record[{i}].range[{j}].first", 4)
                take(f"record[{i}].range[{j}].count", 4)
    except IndexError:
        pass  # the body ends (or says it does) before its fields do
    return sites


def field_sites(buf: bytes, geo: L.Geometry) -> list[Site]:
    """Every field of every structure found in the image `buf` laid out as `geo` says."""
    bs = geo.block_size
    sites = _struct_sites("superblock", L.SuperblockBody, 0)
    sites += _struct_sites("backup_superblock", L.SuperblockBody, geo.backup_sb * bs)
    sites += _struct_sites("log_header", L.LogHeaderBody, geo.log_start * bs)
    for off in range(geo.log_blocks - 1):
        at = (geo.log_start + 1 + off) * bs
        if buf[at:at + 4] == b"JTXD":
            sites += _txn_sites(buf, geo, off, f"txn@{off}")
    for k in range(geo.ibitmap_blocks + geo.bbitmap_blocks):
        at = (geo.ibitmap_start + k) * bs
        sites += [Site(f"bitmap{k}.{name}", at + off, width) for name, off, width in
                  (("magic", 0, 4), ("version", 4, 2), ("reserved", 6, 2), ("index", 8, 4))]
        sites += [Site(f"bitmap{k}.bits[{i}]", at + L.BITMAP_HEADER_BYTES + i, 1)
                  for i in sorted({0, geo.data_start // 8, geo.data_end // 8, geo.inode_count // 8})]
    for blk in range(geo.itable_blocks):
        for slot in range(geo.inodes_per_block):
            at = (geo.itable_start + blk) * bs + slot * L.INODE_SIZE
            if buf[at:at + 2] == b"IN":
                sites += _struct_sites(f"inode{blk * geo.inodes_per_block + slot}", L.InodeBody, at)
    for lba in range(geo.data_start, geo.data_end):
        at = lba * bs
        if buf[at:at + 4] == b"JPTR":
            sites += [Site(f"ptr@{lba}.{name}", at + off, width) for name, off, width in
                      (("magic", 0, 4), ("level", 6, 1), ("owner", 8, 4))]
            ptrs = [at + L.PTR_HEADER_BYTES + 4 * i for i in range(L.ptrs_per_block(bs))]
            used = [p for p in ptrs if any(buf[p:p + 4])]
            sites += [Site(f"ptr@{lba}.ptr", p, 4) for p in used[:4] + used[-2:] + ptrs[len(used):len(used) + 1]]
        elif buf[at:at + 4] == b"JDIR":
            sites += [Site(f"dir@{lba}.{name}", at + off, width) for name, off, width in
                      (("magic", 0, 4), ("count", 6, 2), ("owner", 8, 4))]
            pos = at + L.DIR_HEADER_BYTES
            for i in range(min(int.from_bytes(buf[at + 6:at + 8], "little"), 64)):
                if pos + L.DIR_ENTRY_FIXED > at + bs - 4:
                    break
                sites += [Site(f"dir@{lba}.entry[{i}].ino", pos, 4), Site(f"dir@{lba}.entry[{i}].type", pos + 4, 1),
                          Site(f"dir@{lba}.entry[{i}].name_len", pos + 5, 1)]
                if buf[pos + 5]:
                    sites.append(Site(f"dir@{lba}.entry[{i}].name[0]", pos + 6, 1))
                pos += L.DIR_ENTRY_FIXED + buf[pos + 5]
    return sites


def interesting(site: Site, value: int, geo: L.Geometry, choice: int) -> int:
    """The `choice`-th (modulo their number) value worth trying in a field holding `value`."""
    top = (1 << 8 * site.width) - 1
    values = (0, 1, 2, value + 1, value - 1, value ^ 1, value ^ 0x80, value * 2, top, top >> 1,
              geo.num_blocks - 1, geo.num_blocks, geo.data_start - 1, geo.data_start, geo.data_end,
              geo.inode_count - 1, geo.inode_count, geo.log_blocks - 1, geo.itable_start, 0xFFFFFFFF,
              L.max_file_blocks(geo.block_size) * geo.block_size + 1, geo.num_blocks * geo.block_size * 64)
    return values[choice % len(values)] % (top + 1)


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
    """(clean, mounted, crash with the last transaction written but not checkpointed) images of the same small tree."""
    dev = _Snapshots(NUM_BLOCKS, BLOCK_SIZE)
    mkfs(dev, label="fuzz", uuid=UUID, inodes=32, log_blocks=24)
    fs = FileSystem.mount(dev)
    _populate(fs)
    fs.sync()  # every transaction so far checkpointed: the header on disk is past them
    mounted = bytes(dev.buf)
    fs.write_file("/d/last", b"the last write")
    crash = bytes(dev.buf)  # the transaction written (data, log blocks, commit), not flushed, homes not written
    fs.unmount()
    return bytes(dev.buf), mounted, crash


def geometry() -> L.Geometry:
    return L.Geometry.from_superblock(L.parse_checked(L.Superblock, base_images()[0][:L.SUPERBLOCK_BYTES], "sb"))
