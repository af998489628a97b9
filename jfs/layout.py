"""On-disk formats of jfs, each declared once with construct (SPEC §8 [0160]; FORMAT.md).

The model is dissect's c_* structure files: this module only declares the structures and where the
regions lie (`Geometry`); `jfs.codecs` turns values into block images and back.

Keeps true:
- Every structure is little-endian and ends in a CRC-32 over the bytes before it; a structure that
  starts a region (superblock, log header, transaction descriptor/commit, bitmap, pointer and
  directory block, inode) starts with a magic and a version.
- Untrusted bytes are parsed only through `parse()`, which turns every construct error (bad magic,
  bad CRC, short data) into one `FormatError` sentence naming the structure and the block.
- `Geometry` is the single place that places the regions on the volume:
  superblock | log area | inode bitmap | block bitmap | inode table | data ... | backup superblock.
  `check` accepts exactly what `plan` makes: regions in order and of the size their contents
  need (the inode table holds `inode_count` inodes, every slot one).

The metadata log area (a fixed range sized at mkfs, [0160]) holds a header block and a ring of
transactions: descriptor block(s) (homes, records, and the CRC of each run of file data the
transaction points at), metadata block images, commit block (CRC over the transaction); each
descriptor names the CRC of the transaction before it, so replay follows one unbroken chain.
"""

from __future__ import annotations

import hashlib
import zlib
from dataclasses import dataclass
from functools import cache
from typing import Any

from construct import (
    Array,
    Bytes,
    Checksum,
    Const,
    ConstructError,
    Enum,
    FixedSized,
    Int8ul,
    Int16ul,
    Int32ul,
    Int64sl,
    Int64ul,
    PaddedString,
    PascalString,
    PrefixedArray,
    RawCopy,
    Struct,
    this,
)

from vstore.blocks.errors import FormatError

VERSION = 1
LOG_VERSION = 2  # the log header, transaction descriptor and commit block (FORMAT.md "Metadata log area")
MIN_BLOCK_SIZE = 2048
MAX_BLOCK_SIZE = 65536
INODE_SIZE = 128
N_DIRECT = 12
ROOT_INO = 1
MAX_NAME = 255
MAX_BLOCKS = 1 << 32  # block numbers are u32
LABEL_BYTES = 64

STATE_CLEAN = 1
STATE_DIRTY = 2

TYPE_FILE = 1
TYPE_DIR = 2

LOG_FLAG_RECORDS_LOST = 1  # records were discarded (fsck reset): the scan cannot prove what changed


def crc32(data: bytes) -> int:
    return zlib.crc32(data) & 0xFFFFFFFF


def txn_digest(data: bytes | memoryview) -> int:
    """The 32-bit check of a transaction (its descriptor and images) and of a data run: the first
    4 bytes of SHA-1 (little-endian; hardware-assisted here, 3x BLAKE2b), not CRC-32, since every
    block that ends in its own CRC-32 leaves a CRC-32 register in the same state, so a CRC over a
    run of such blocks cannot tell one sealed block from another."""
    return int.from_bytes(hashlib.sha1(data).digest()[:4], "little")


def _checked(body: Any) -> Struct:
    """`body` followed by a CRC-32 of its bytes."""
    return Struct("body" / RawCopy(body), "crc" / Checksum(Int32ul, crc32, this.body.data))


# -- superblock (block 0, backup in the last block) ------------------------------------------
SuperblockBody = Struct(
    "magic" / Const(b"JFSB"),
    "version" / Const(VERSION, Int16ul),
    "state" / Int16ul,
    "block_size" / Int32ul,
    "num_blocks" / Int64ul,
    "inode_count" / Int32ul,
    "inode_size" / Int16ul,
    "features" / Int16ul,
    "log_start" / Int32ul,
    "log_blocks" / Int32ul,
    "ibitmap_start" / Int32ul,
    "ibitmap_blocks" / Int32ul,
    "bbitmap_start" / Int32ul,
    "bbitmap_blocks" / Int32ul,
    "itable_start" / Int32ul,
    "itable_blocks" / Int32ul,
    "data_start" / Int32ul,
    "root_ino" / Int32ul,
    "checkpoint_seq" / Int64ul,
    "mkfs_time_ns" / Int64ul,
    "uuid" / Bytes(16),
    "label" / PaddedString(LABEL_BYTES, "utf8"),
)
Superblock = _checked(SuperblockBody)
SUPERBLOCK_BYTES = Superblock.sizeof()

# -- inode (INODE_SIZE bytes in the inode table; all-zero bytes = free slot) ---------------------
InodeBody = Struct(
    "magic" / Const(b"IN"),
    "version" / Const(VERSION, Int8ul),
    "type" / Int8ul,
    "mode" / Int16ul,
    "reserved" / Int16ul,
    "nlink" / Int32ul,
    "generation" / Int32ul,
    "size" / Int64ul,
    "atime_ns" / Int64sl,
    "mtime_ns" / Int64sl,
    "ctime_ns" / Int64sl,
    "direct" / Array(N_DIRECT, Int32ul),
    "indirect" / Int32ul,
    "dindirect" / Int32ul,
    "nblocks" / Int32ul,
)
Inode = _checked(FixedSized(INODE_SIZE - 4, InodeBody))
assert Inode.sizeof() == INODE_SIZE

# -- directory entries --------------------------------------------------------------------------
DirEntry = Struct(
    "ino" / Int32ul,
    "type" / Int8ul,
    "name" / PascalString(Int8ul, "utf8"),
)
DIR_HEADER_BYTES = 12
DIR_ENTRY_FIXED = 6  # ino + type + name length


def dir_entry_size(name: str) -> int:
    return DIR_ENTRY_FIXED + len(name.encode())


@cache
def dir_block(block_size: int) -> Struct:
    body = Struct(
        "magic" / Const(b"JDIR"),
        "version" / Const(VERSION, Int16ul),
        "count" / Int16ul,
        "owner" / Int32ul,
        "entries" / Array(this.count, DirEntry),
    )
    return _checked(FixedSized(block_size - 4, body))


def dir_capacity(block_size: int) -> int:
    """Bytes of entries one directory block holds."""
    return block_size - 4 - DIR_HEADER_BYTES


# -- pointer (indirect) blocks ------------------------------------------------------------------
PTR_HEADER_BYTES = 12


def ptrs_per_block(block_size: int) -> int:
    return (block_size - PTR_HEADER_BYTES - 4) // 4


@cache
def ptr_block(block_size: int) -> Struct:
    body = Struct(
        "magic" / Const(b"JPTR"),
        "version" / Const(VERSION, Int16ul),
        "level" / Int8ul,
        "reserved" / Int8ul,
        "owner" / Int32ul,
        "ptrs" / Array(ptrs_per_block(block_size), Int32ul),
    )
    return _checked(FixedSized(block_size - 4, body))


def max_file_blocks(block_size: int) -> int:
    p = ptrs_per_block(block_size)
    return N_DIRECT + p + p * p


# -- bitmaps ------------------------------------------------------------------------------------
BITMAP_HEADER_BYTES = 12
INODE_BITMAP_MAGIC = b"JIBM"
BLOCK_BITMAP_MAGIC = b"JBBM"


def bits_per_bitmap_block(block_size: int) -> int:
    return (block_size - BITMAP_HEADER_BYTES - 4) * 8


@cache
def bitmap_block(block_size: int, magic: bytes) -> Struct:
    body = Struct(
        "magic" / Const(magic),
        "version" / Const(VERSION, Int16ul),
        "reserved" / Int16ul,
        "index" / Int32ul,
        "bits" / Bytes(block_size - BITMAP_HEADER_BYTES - 4),
    )
    return _checked(body)


# -- metadata log area --------------------------------------------------------------------------
LogHeaderBody = Struct(
    "magic" / Const(b"JLOG"),
    "version" / Const(LOG_VERSION, Int16ul),
    "flags" / Int16ul,
    "uuid" / Bytes(16),
    "tail_seq" / Int64ul,
    "tail_off" / Int32ul,
    "head_seq" / Int64ul,
    "head_off" / Int32ul,
    "checkpoint_seq" / Int64ul,
)
LogHeader = _checked(LogHeaderBody)

TxnHeadBody = Struct(
    "magic" / Const(b"JTXD"),
    "version" / Const(LOG_VERSION, Int16ul),
    "desc_blocks" / Int16ul,
    "uuid" / Bytes(16),
    "seq" / Int64ul,
    "meta_blocks" / Int32ul,
    "body_len" / Int32ul,
    "prev_crc" / Int32ul,  # the txn_crc of transaction seq - 1 (0 when unknown): the chain replay follows
)
TxnHead = _checked(TxnHeadBody)
TXN_HEAD_BYTES = TxnHead.sizeof()

Op = Enum(Int8ul, create=1, write=2, truncate=3, unlink=4, rename=5, mkdir=6, rmdir=7, setattr=8)
Range = Struct("first" / Int32ul, "count" / Int32ul)
Record = Struct(
    "ino" / Int32ul,
    "op" / Op,
    "path" / PascalString(Int16ul, "utf8"),
    "ranges" / PrefixedArray(Int32ul, Range),
)
DataRun = Struct("first" / Int32ul, "count" / Int32ul, "crc" / Int32ul)  # file data the transaction points at
TxnBody = Struct(
    "homes" / PrefixedArray(Int32ul, Int32ul),
    "records" / PrefixedArray(Int32ul, Record),
    "data" / PrefixedArray(Int32ul, DataRun),
)

CommitBody = Struct(
    "magic" / Const(b"JTXC"),
    "version" / Const(LOG_VERSION, Int16ul),
    "reserved" / Int16ul,
    "uuid" / Bytes(16),
    "seq" / Int64ul,
    "total_blocks" / Int32ul,
    "txn_crc" / Int32ul,
)
Commit = _checked(CommitBody)


# -- parse/build helpers ------------------------------------------------------------------------
def parse(struct: Any, data: bytes, what: str) -> Any:
    """Parse untrusted bytes; any construct error becomes one clear `FormatError`."""
    try:
        return struct.parse(data)
    except (ConstructError, UnicodeDecodeError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise FormatError(f"{what} is corrupt ({reason}); run 'jfs fsck' to check and repair") from None


def parse_checked(struct: Any, data: bytes, what: str) -> Any:
    """Parse a `_checked` structure and return its body values."""
    return parse(struct, data, what).body.value


def build_checked(struct: Any, values: dict[str, Any], size: int | None = None) -> bytes:
    raw = struct.build({"body": {"value": values}})
    if size is not None:
        raw = raw.ljust(size, b"\0")
    return raw


def is_zero(data: bytes) -> bool:
    return not any(data)


# -- geometry -----------------------------------------------------------------------------------
def _ceil(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class Geometry:
    """Where each region lives, in blocks."""

    block_size: int
    num_blocks: int
    inode_count: int
    log_start: int
    log_blocks: int
    ibitmap_start: int
    ibitmap_blocks: int
    bbitmap_start: int
    bbitmap_blocks: int
    itable_start: int
    itable_blocks: int
    data_start: int

    @property
    def backup_sb(self) -> int:
        return self.num_blocks - 1

    @property
    def data_end(self) -> int:
        """One past the last data block (the backup superblock follows)."""
        return self.num_blocks - 1

    @property
    def inodes_per_block(self) -> int:
        return self.block_size // INODE_SIZE

    @classmethod
    def plan(cls, block_size: int, num_blocks: int, inodes: int | None = None,
             log_blocks: int | None = None) -> Geometry:
        if inodes is None:
            inodes = max(64, min(65536, num_blocks // 4))
        if log_blocks is None:
            log_blocks = max(32, min(8192, num_blocks // 32))
        log_blocks = max(log_blocks, 8)
        inodes = max(inodes, 8)
        itb = _ceil(inodes, block_size // INODE_SIZE)
        inodes = itb * (block_size // INODE_SIZE)  # the table's every slot is an inode
        ibm = _ceil(inodes, bits_per_bitmap_block(block_size))
        bbm = _ceil(num_blocks, bits_per_bitmap_block(block_size))
        log_start = 1
        ib = log_start + log_blocks
        bb = ib + ibm
        it = bb + bbm
        ds = it + itb
        return cls(block_size, num_blocks, inodes, log_start, log_blocks, ib, ibm, bb, bbm, it, itb, ds)

    @classmethod
    def from_superblock(cls, sb: Any) -> Geometry:
        return cls(sb.block_size, sb.num_blocks, sb.inode_count, sb.log_start, sb.log_blocks,
                   sb.ibitmap_start, sb.ibitmap_blocks, sb.bbitmap_start, sb.bbitmap_blocks,
                   sb.itable_start, sb.itable_blocks, sb.data_start)

    def check(self, what: str = "superblock") -> None:
        """Raise FormatError unless the regions are exactly what `plan` makes of the stated volume
        and inode count: in order, each region as large as it must be and no larger (so no single
        wrong field passes for a smaller or shifted file system)."""
        bs = self.block_size
        ok = (
            MIN_BLOCK_SIZE <= bs <= MAX_BLOCK_SIZE and bs & (bs - 1) == 0
            and self.num_blocks <= MAX_BLOCKS
            and self.log_start == 1 and self.log_blocks >= 8
            and ROOT_INO < self.inode_count == self.itable_blocks * self.inodes_per_block
            and self.ibitmap_start == self.log_start + self.log_blocks
            and self.ibitmap_blocks == _ceil(self.inode_count, bits_per_bitmap_block(bs))
            and self.bbitmap_start == self.ibitmap_start + self.ibitmap_blocks
            and self.bbitmap_blocks == _ceil(self.num_blocks, bits_per_bitmap_block(bs))
            and self.itable_start == self.bbitmap_start + self.bbitmap_blocks
            and self.data_start == self.itable_start + self.itable_blocks
            and self.data_start + 2 <= self.num_blocks
        )
        if not ok:
            raise FormatError(f"the {what} describes regions that do not fit the volume; "
                              "run 'jfs fsck' or re-create the file system")

    def metadata_ranges(self) -> list[tuple[int, int]]:
        """Superblock, log area, bitmaps, inode table, backup superblock."""
        return [(0, self.data_start), (self.backup_sb, 1)]

    def inode_location(self, ino: int) -> tuple[int, int]:
        """(block, byte offset) of inode `ino` in the inode table."""
        per = self.inodes_per_block
        return self.itable_start + ino // per, (ino % per) * INODE_SIZE
