"""Precompiled `struct` packers of the hot jfs structures (SPEC §8 [0160]; FORMAT.md).

`jfs.layout` declares every structure once with construct; that declaration stays the single
source of truth. Building a block with construct costs 50-100x what `struct` does (an inode
147 µs vs 2 µs, a directory block of 150 entries 5 ms vs 0.1 ms), so the blocks written on every
transaction (inode, directory, pointer, bitmap, log header, transaction head and body, commit
block) and the blocks read when a tree is loaded (inode, directory, pointer) are packed and
unpacked here with the same byte layout.

Keeps true:
- Every function gives the bytes (or the values, or the `FormatError`) that the construct
  declaration gives; `tests/test_jfs_packing.py` checks both agree byte for byte, on random values
  and on damaged blocks.
- Parsing checks what the declaration checks: length, magic, version, CRC-32, counts that fit the
  block, UTF-8 names; any failure is one `FormatError` naming the structure (run fsck).
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterable, Sequence
from functools import cache
from typing import NamedTuple

from jfs import layout as L
from vstore.blocks.errors import FormatError

_CRC = struct.Struct("<I")
_INODE = struct.Struct("<2sBBHHIIQqqq12IIII")
_INODE_PAD = L.INODE_SIZE - 4 - _INODE.size
_DIR_HEAD = struct.Struct("<4sHHI")
_ENTRY_HEAD = struct.Struct("<IBB")
_PTR_HEAD = struct.Struct("<4sHBBI")
_BITMAP_HEAD = struct.Struct("<4sHHI")
_LOG_HEADER = struct.Struct("<4sHH16sQIQIQ")
_TXN_HEAD = struct.Struct("<4sHH16sQIII")
_COMMIT = struct.Struct("<4sHH16sQII")
_U32 = struct.Struct("<I")
_RECORD_HEAD = struct.Struct("<IBH")
_RANGE = struct.Struct("<II")
_DATA_RUN = struct.Struct("<III")

OPS = {"create": 1, "write": 2, "truncate": 3, "unlink": 4, "rename": 5, "mkdir": 6, "rmdir": 7, "setattr": 8}


def _crc(data: bytes | bytearray | memoryview) -> int:
    return zlib.crc32(data) & 0xFFFFFFFF


def _seal(body: bytes | bytearray, size: int | None = None) -> bytes:
    """`body` followed by its CRC-32, zero padded to `size`."""
    raw = bytes(body) + _CRC.pack(_crc(body))
    return raw if size is None else raw.ljust(size, b"\0")


def _corrupt(what: str, reason: str) -> FormatError:
    return FormatError(f"{what} is corrupt ({reason}); run 'jfs fsck' to check and repair")


def _open(raw: bytes, body_len: int, magic: bytes, what: str) -> memoryview:
    """The first `body_len` bytes of `raw`, after checking length, magic and CRC."""
    if len(raw) < body_len + 4:
        raise _corrupt(what, "too short")
    view = memoryview(raw)
    if bytes(view[:len(magic)]) != magic:
        raise _corrupt(what, "bad magic")
    if _CRC.unpack_from(view, body_len)[0] != _crc(view[:body_len]):
        raise _corrupt(what, "bad CRC")
    return view[:body_len]


def _check_version(version: int, what: str) -> None:
    if version != L.VERSION:
        raise _corrupt(what, f"version {version}")


def _check_log_version(version: int, what: str) -> None:
    if version == 1:
        raise FormatError(f"{what} is metadata log version 1, written by an older jfs that flushed every "
                          f"transaction; this jfs reads version {L.LOG_VERSION} only: if the volume was "
                          "unmounted cleanly, 'jfs fsck' rewrites its (empty) log as the new version; "
                          "if not, mount and unmount it once with the older jfs first")
    if version != L.LOG_VERSION:
        raise _corrupt(what, f"version {version}")


# -- inodes -------------------------------------------------------------------------------------
class InodeValues(NamedTuple):
    type: int
    mode: int
    nlink: int
    generation: int
    size: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    direct: list[int]
    indirect: int
    dindirect: int
    nblocks: int


def pack_inode(v: InodeValues) -> bytes:
    body = _INODE.pack(b"IN", L.VERSION, v.type, v.mode, 0, v.nlink, v.generation, v.size, v.atime_ns,
                       v.mtime_ns, v.ctime_ns, *v.direct, v.indirect, v.dindirect, v.nblocks)
    return _seal(body + bytes(_INODE_PAD))


def unpack_inode(raw: bytes, what: str) -> InodeValues:
    body = _open(raw, L.INODE_SIZE - 4, b"IN", what)
    f = _INODE.unpack_from(body)
    _check_version(f[1], what)
    return InodeValues(f[2], f[3], f[5], f[6], f[7], f[8], f[9], f[10], list(f[11:23]), f[23], f[24], f[25])


# -- directory blocks -----------------------------------------------------------------------------
def pack_dir_block(block_size: int, owner: int, entries: Iterable[tuple[str, int, int]]) -> bytes:
    """A directory block of `(name, ino, type)` entries; ValueError when they do not fit."""
    parts = [b""]
    count = 0
    for name, ino, typ in entries:
        enc = name.encode()
        parts.append(_ENTRY_HEAD.pack(ino, typ, len(enc)))
        parts.append(enc)
        count += 1
    parts[0] = _DIR_HEAD.pack(b"JDIR", L.VERSION, count, owner)
    body = b"".join(parts)
    if len(body) > block_size - 4:
        raise ValueError(f"directory entries need {len(body)} bytes, a block holds {block_size - 4}")
    return _seal(body.ljust(block_size - 4, b"\0"))


def pack_dir_entry(name: str, ino: int, typ: int) -> bytes:
    """One directory entry as `pack_dir_block` lays it out."""
    enc = name.encode()
    return _ENTRY_HEAD.pack(ino, typ, len(enc)) + enc


def pack_dir_block_packed(block_size: int, owner: int, count: int, packed: bytes | bytearray) -> bytes:
    """The directory block of `count` entries already packed (`pack_dir_entry`, in order): the
    bytes `pack_dir_block` gives for them."""
    if _DIR_HEAD.size + len(packed) > block_size - 4:
        raise ValueError(f"directory entries need {_DIR_HEAD.size + len(packed)} bytes, "
                         f"a block holds {block_size - 4}")
    body = bytearray(_DIR_HEAD.pack(b"JDIR", L.VERSION, count, owner))
    body += packed
    body += bytes(block_size - 4 - len(body))
    return bytes(body) + _CRC.pack(_crc(body))


def unpack_dir_block(block_size: int, raw: bytes, what: str) -> tuple[int, list[tuple[str, int, int]]]:
    """(owner, [(name, ino, type)] as stored) of a directory block."""
    body = _open(raw, block_size - 4, b"JDIR", what)
    _, version, count, owner = _DIR_HEAD.unpack_from(body)
    _check_version(version, what)
    out: list[tuple[str, int, int]] = []
    pos, end = _DIR_HEAD.size, block_size - 4
    unpack = _ENTRY_HEAD.unpack_from
    for _ in range(count):
        if pos + _ENTRY_HEAD.size > end:
            raise _corrupt(what, "entries overflow the block")
        ino, typ, n = unpack(body, pos)
        pos += _ENTRY_HEAD.size
        if pos + n > end:
            raise _corrupt(what, "entries overflow the block")
        try:
            name = str(body[pos:pos + n], "utf8")
        except UnicodeDecodeError:
            raise _corrupt(what, "a name is not UTF-8") from None
        pos += n
        out.append((name, ino, typ))
    return owner, out


# -- pointer blocks -------------------------------------------------------------------------------
@cache
def _ptrs(block_size: int) -> struct.Struct:
    return struct.Struct(f"<{L.ptrs_per_block(block_size)}I")


class PtrValues(NamedTuple):
    level: int
    owner: int
    ptrs: list[int]


def pack_ptr_block(block_size: int, level: int, owner: int, ptrs: Sequence[int]) -> bytes:
    p = L.ptrs_per_block(block_size)
    full = list(ptrs) + [0] * (p - len(ptrs))
    body = _PTR_HEAD.pack(b"JPTR", L.VERSION, level, 0, owner) + _ptrs(block_size).pack(*full)
    return _seal(body.ljust(block_size - 4, b"\0"))


def unpack_ptr_block(block_size: int, raw: bytes, what: str) -> PtrValues:
    body = _open(raw, block_size - 4, b"JPTR", what)
    _, version, level, _, owner = _PTR_HEAD.unpack_from(body)
    _check_version(version, what)
    return PtrValues(level, owner, list(_ptrs(block_size).unpack_from(body, _PTR_HEAD.size)))


# -- bitmaps ----------------------------------------------------------------------------------------
def pack_bitmap_block(block_size: int, magic: bytes, index: int, bits: bytes) -> bytes:
    if len(bits) != block_size - L.BITMAP_HEADER_BYTES - 4:
        raise ValueError(f"a bitmap block holds {block_size - L.BITMAP_HEADER_BYTES - 4} bytes of bits")
    return _seal(_BITMAP_HEAD.pack(magic, L.VERSION, 0, index) + bits)


def unpack_bitmap_block(block_size: int, magic: bytes, raw: bytes, what: str) -> tuple[int, bytes]:
    """(index, bits) of a bitmap block."""
    body = _open(raw, block_size - 4, magic, what)
    _, version, _, index = _BITMAP_HEAD.unpack_from(body)
    _check_version(version, what)
    return index, bytes(body[_BITMAP_HEAD.size:])


# -- the metadata log -------------------------------------------------------------------------------
def pack_log_header(block_size: int, flags: int, uuid: bytes, tail_seq: int, tail_off: int, head_seq: int,
                    head_off: int, checkpoint_seq: int) -> bytes:
    return _seal(_LOG_HEADER.pack(b"JLOG", L.LOG_VERSION, flags, uuid, tail_seq, tail_off, head_seq, head_off,
                                  checkpoint_seq), block_size)


def pack_txn_head(desc_blocks: int, uuid: bytes, seq: int, meta_blocks: int, body_len: int,
                  prev_crc: int = 0) -> bytes:
    return _seal(_TXN_HEAD.pack(b"JTXD", L.LOG_VERSION, desc_blocks, uuid, seq, meta_blocks, body_len, prev_crc))


def pack_commit(block_size: int, uuid: bytes, seq: int, total_blocks: int, txn_crc: int) -> bytes:
    return _seal(_COMMIT.pack(b"JTXC", L.LOG_VERSION, 0, uuid, seq, total_blocks, txn_crc), block_size)


def pack_txn_body(homes: Sequence[int], records: Iterable[tuple[int, str, str, Sequence[tuple[int, int]]]],
                  data: Sequence[tuple[int, int, int]] = ()) -> bytes:
    """The transaction body: home LBAs, (ino, op name, path, ranges) records, (first, count, crc)
    data runs."""
    parts = [_U32.pack(len(homes)), struct.pack(f"<{len(homes)}I", *homes)]
    recs = list(records)
    parts.append(_U32.pack(len(recs)))
    for ino, op, path, ranges in recs:
        enc = path.encode()
        parts.append(_RECORD_HEAD.pack(ino, OPS[op], len(enc)))
        parts.append(enc)
        parts.append(_U32.pack(len(ranges)))
        parts.extend(_RANGE.pack(first, count) for first, count in ranges)
    parts.append(_U32.pack(len(data)))
    parts.extend(_DATA_RUN.pack(first, count, crc) for first, count, crc in data)
    return b"".join(parts)


class LogHeaderValues(NamedTuple):
    flags: int
    uuid: bytes
    tail_seq: int
    tail_off: int
    head_seq: int
    head_off: int
    checkpoint_seq: int


def unpack_log_header(raw: bytes, what: str) -> LogHeaderValues:
    body = _open(raw, _LOG_HEADER.size, b"JLOG", what)
    f = _LOG_HEADER.unpack_from(body)
    _check_log_version(f[1], what)
    return LogHeaderValues(*f[2:])


class TxnHeadValues(NamedTuple):
    desc_blocks: int
    uuid: bytes
    seq: int
    meta_blocks: int
    body_len: int
    prev_crc: int


def unpack_txn_head(raw: bytes, what: str) -> TxnHeadValues:
    body = _open(raw, _TXN_HEAD.size, b"JTXD", what)
    f = _TXN_HEAD.unpack_from(body)
    _check_log_version(f[1], what)
    return TxnHeadValues(*f[2:])


class CommitValues(NamedTuple):
    reserved: int
    uuid: bytes
    seq: int
    total_blocks: int
    txn_crc: int


def unpack_commit(raw: bytes, what: str) -> CommitValues:
    body = _open(raw, _COMMIT.size, b"JTXC", what)
    f = _COMMIT.unpack_from(body)
    _check_log_version(f[1], what)
    return CommitValues(*f[2:])


class RangeValues(NamedTuple):
    first: int
    count: int


class RecordValues(NamedTuple):
    ino: int
    op: str | int  # the operation's name; an unknown code stays the number (as construct's Enum)
    path: str
    ranges: list[RangeValues]


_OP_NAMES = {code: name for name, code in OPS.items()}


def unpack_txn_body(raw: bytes, what: str) -> tuple[list[int], list[RecordValues], list[tuple[int, int, int]]]:
    """(homes, records, data runs) of a transaction body (trailing bytes ignored, as the
    declaration does)."""
    view = memoryview(raw)
    end = len(view)

    def need(pos: int, n: int) -> None:
        if pos + n > end:
            raise _corrupt(what, "it ends inside a field")

    need(0, 4)
    (nhomes,) = _U32.unpack_from(view, 0)
    need(4, 4 * nhomes)
    homes = list(struct.unpack_from(f"<{nhomes}I", view, 4))
    pos = 4 + 4 * nhomes
    need(pos, 4)
    (nrecs,) = _U32.unpack_from(view, pos)
    pos += 4
    records: list[RecordValues] = []
    for _ in range(nrecs):
        need(pos, _RECORD_HEAD.size)
        ino, code, n = _RECORD_HEAD.unpack_from(view, pos)
        pos += _RECORD_HEAD.size
        need(pos, n)
        try:
            path = str(view[pos:pos + n], "utf8")
        except UnicodeDecodeError:
            raise _corrupt(what, "a path is not UTF-8") from None
        pos += n
        need(pos, 4)
        (nranges,) = _U32.unpack_from(view, pos)
        pos += 4
        need(pos, _RANGE.size * nranges)
        flat = struct.unpack_from(f"<{2 * nranges}I", view, pos)
        pos += _RANGE.size * nranges
        ranges = [RangeValues(flat[i], flat[i + 1]) for i in range(0, len(flat), 2)]
        records.append(RecordValues(ino, _OP_NAMES.get(code, code), path, ranges))
    need(pos, 4)
    (nruns,) = _U32.unpack_from(view, pos)
    pos += 4
    need(pos, _DATA_RUN.size * nruns)
    flat = struct.unpack_from(f"<{3 * nruns}I", view, pos)
    runs = [(flat[i], flat[i + 1], flat[i + 2]) for i in range(0, len(flat), 3)]
    return homes, records, runs
