"""Values <-> block images for the structures that `jfs.layout` declares (SPEC §8 [0160]; FORMAT.md).

The model is dissect's c_*/logic split: `layout` declares each structure once with construct, this
module turns Python values into the exact bytes of a block and back, and everything above (the file
system, fsck, the recovery scan, mkfs) builds and reads blocks only through these functions.

Keeps true:
- Building then parsing gives back the same values; every parse of untrusted bytes goes through
  `layout.parse`/`parse_checked`, so a bad magic, CRC or length is one `FormatError` sentence.
- An all-zero inode slot is a free inode, never a corrupt one.
- A superblock is usable when it parses, every field holds a value the format allows, its regions
  are the ones `Geometry.plan` makes (`Geometry.check`) and it states the device's size
  (`superblock_at`); `find_superblock` takes block 0, else the backup in the last block.
- A directory block names each entry once (`parse_dir_block`); `parse_dir_entries` gives them as
  stored, for fsck to judge one by one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from jfs import layout as L
from jfs import packing as P
from vstore.blocks.device import BlockDevice
from vstore.blocks.errors import FormatError

TYPE_NAMES = {L.TYPE_FILE: "file", L.TYPE_DIR: "dir"}


# -- inodes -------------------------------------------------------------------------------------
@dataclass
class Inode:
    ino: int
    type: int
    mode: int
    nlink: int
    generation: int
    size: int = 0
    atime_ns: int = 0
    mtime_ns: int = 0
    ctime_ns: int = 0
    direct: list[int] = field(default_factory=lambda: [0] * L.N_DIRECT)
    indirect: int = 0
    dindirect: int = 0
    nblocks: int = 0

    def build(self) -> bytes:
        return P.pack_inode(P.InodeValues(self.type, self.mode, self.nlink, self.generation, self.size,
                                          self.atime_ns, self.mtime_ns, self.ctime_ns, self.direct,
                                          self.indirect, self.dindirect, self.nblocks))

    @classmethod
    def parse(cls, ino: int, raw: bytes) -> Inode | None:
        """None for a free (all-zero) slot; FormatError for a corrupt one."""
        if L.is_zero(raw):
            return None
        v = P.unpack_inode(raw, f"inode {ino}")
        if v.type not in TYPE_NAMES:
            raise FormatError(f"inode {ino} has unknown type {v.type}; run 'jfs fsck' to repair")
        return cls(ino, v.type, v.mode, v.nlink, v.generation, v.size, v.atime_ns, v.mtime_ns,
                   v.ctime_ns, list(v.direct), v.indirect, v.dindirect, v.nblocks)


# -- directory blocks -----------------------------------------------------------------------------
@dataclass
class DirBlock:
    """The entries of one directory block; `used` is the bytes they take, kept as they change.
    The packed entries are kept too while names are only appended (a growing directory), so the
    block image costs one new entry, not the whole block; any other change packs them anew."""

    lba: int
    entries: dict[str, tuple[int, int]]  # name -> (ino, type)
    used: int = -1
    packed: bytearray | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.used < 0:
            self.used = sum(L.dir_entry_size(n) for n in self.entries)

    def add(self, name: str, ino: int, typ: int) -> None:
        if name not in self.entries:
            self.used += L.dir_entry_size(name)
            if self.packed is not None:
                self.packed += P.pack_dir_entry(name, ino, typ)
        else:
            self.packed = None
        self.entries[name] = (ino, typ)

    def remove(self, name: str) -> None:
        del self.entries[name]
        self.used -= L.dir_entry_size(name)
        self.packed = None

    def image(self, block_size: int, owner: int) -> bytes:
        if self.packed is None:
            self.packed = bytearray(b"".join(P.pack_dir_entry(n, i, t) for n, (i, t) in self.entries.items()))
        return P.pack_dir_block_packed(block_size, owner, len(self.entries), self.packed)


def parse_dir_entries(block_size: int, raw: bytes, what: str) -> tuple[int, list[tuple[str, int, int]]]:
    """(owner inode, [(name, ino, type)] in stored order) of a directory block."""
    return P.unpack_dir_block(block_size, raw, what)


def parse_dir_block(block_size: int, lba: int, raw: bytes, what: str) -> tuple[int, DirBlock]:
    """(owner inode, entries) of the directory block at `lba`; a name stored twice is a FormatError."""
    owner, entries = parse_dir_entries(block_size, raw, what)
    block = DirBlock(lba, {name: (ino, typ) for name, ino, typ in entries})
    if len(block.entries) != len(entries):
        raise FormatError(f"{what} holds a name twice; run 'jfs fsck' to repair")
    return owner, block


# -- pointer blocks -------------------------------------------------------------------------------
def ptr_image(block_size: int, level: int, owner: int, ptrs: list[int]) -> bytes:
    """A pointer block; `ptrs` shorter than a block's worth is padded with holes."""
    return P.pack_ptr_block(block_size, level, owner, ptrs)


def parse_ptr_block(block_size: int, raw: bytes, what: str) -> P.PtrValues:
    """The values (level, owner, ptrs) of a pointer block."""
    return P.unpack_ptr_block(block_size, raw, what)


# -- bitmaps ----------------------------------------------------------------------------------------
def bitmap_image(block_size: int, magic: bytes, index: int, bits: bytes) -> bytes:
    return P.pack_bitmap_block(block_size, magic, index, bits)


def bitmap_images(geo: L.Geometry, bits: bytes, magic: bytes) -> list[bytes]:
    nbytes = L.bits_per_bitmap_block(geo.block_size) // 8
    return [bitmap_image(geo.block_size, magic, k, bits[k * nbytes:(k + 1) * nbytes])
            for k in range(len(bits) // nbytes)]


def parse_bitmap(block_size: int, magic: bytes, blocks: list[bytes], first_lba: int, what: str) -> bytearray:
    """The bits of a whole bitmap from its blocks (each checked: magic, CRC, index)."""
    bits = bytearray()
    for k, raw in enumerate(blocks):
        index, chunk = P.unpack_bitmap_block(block_size, magic, raw, f"{what} block {first_lba + k}")
        if index != k:
            raise FormatError(f"{what} block {first_lba + k} is out of place; run 'jfs fsck'")
        bits += chunk
    return bits


def fresh_bitmaps(geo: L.Geometry) -> tuple[bytearray, bytearray]:
    """Inode and block bitmaps of an empty file system (reserved and metadata bits set)."""
    bpb = L.bits_per_bitmap_block(geo.block_size)
    ib = bytearray(geo.ibitmap_blocks * bpb // 8)
    bb = bytearray(geo.bbitmap_blocks * bpb // 8)
    for buf, runs in ((ib, [(0, 1), (L.ROOT_INO, L.ROOT_INO + 1), (geo.inode_count, len(ib) * 8)]),
                      (bb, [(0, geo.data_start), (geo.data_end, len(bb) * 8)])):
        for start, end in runs:
            _set_bits(buf, start, end)
    return ib, bb


def _set_bits(buf: bytearray, start: int, end: int) -> None:
    """Set bits start..end-1 (LSB first), whole bytes at a time where it can."""
    while start < end and start % 8:
        buf[start >> 3] |= 1 << (start & 7)
        start += 1
    whole = end - end % 8
    if start < whole:
        buf[start >> 3:whole >> 3] = b"\xff" * ((whole - start) >> 3)
        start = whole
    while start < end:
        buf[start >> 3] |= 1 << (start & 7)
        start += 1


# -- superblock ---------------------------------------------------------------------------------------
def superblock_image(geo: L.Geometry, uuid: bytes, label: str, state: int, cp_seq: int,
                     mkfs_time_ns: int) -> bytes:
    return L.build_checked(L.Superblock, dict(
        state=state, block_size=geo.block_size, num_blocks=geo.num_blocks,
        inode_count=geo.inode_count, inode_size=L.INODE_SIZE, features=0,
        log_start=geo.log_start, log_blocks=geo.log_blocks,
        ibitmap_start=geo.ibitmap_start, ibitmap_blocks=geo.ibitmap_blocks,
        bbitmap_start=geo.bbitmap_start, bbitmap_blocks=geo.bbitmap_blocks,
        itable_start=geo.itable_start, itable_blocks=geo.itable_blocks, data_start=geo.data_start,
        root_ino=L.ROOT_INO, checkpoint_seq=cp_seq, mkfs_time_ns=mkfs_time_ns, uuid=uuid, label=label),
        geo.block_size)


def read_superblock(raw: bytes, what: str = "superblock") -> Any:
    """The superblock values in `raw` (a block, or at least its first SUPERBLOCK_BYTES)."""
    return L.parse_checked(L.Superblock, raw[:L.SUPERBLOCK_BYTES], what)


def check_superblock(sb: Any, what: str) -> None:
    """FormatError unless every field of a parsed superblock holds a value the format allows."""
    if sb.inode_size != L.INODE_SIZE or sb.root_ino != L.ROOT_INO or sb.features \
            or sb.state not in (L.STATE_CLEAN, L.STATE_DIRTY):
        raise FormatError(f"the {what} states an impossible inode size, root inode, feature set or "
                          "state; run 'jfs fsck' to check and repair")
    L.Geometry.from_superblock(sb).check(what)


def superblock_at(device: BlockDevice, lba: int, what: str) -> Any:
    """The superblock stored at `lba`: parsed, every field possible, its regions as `plan` makes
    them and its size the device's; FormatError otherwise."""
    sb = read_superblock(device.read(lba), what)
    if sb.block_size != device.block_size or sb.num_blocks != device.num_blocks:
        raise FormatError(f"the {what} describes {sb.num_blocks} blocks of {sb.block_size} bytes but "
                          f"{device.name} has {device.num_blocks} of {device.block_size}; open it with "
                          "jfs.fs.open_image")
    check_superblock(sb, what)
    return sb


def find_superblock(device: BlockDevice) -> Any:
    """The superblock of block 0, or its backup in the last block when block 0 is not usable."""
    try:
        return superblock_at(device, 0, "superblock (block 0)")
    except FormatError as primary:
        try:
            return superblock_at(device, device.num_blocks - 1, "backup superblock")
        except FormatError:
            raise primary from None
