"""The precompiled `struct` packers of jfs (`jfs.packing`) agree byte for byte with the construct
declarations of `jfs.layout`, which stay the single source of truth: on random values, and on
damaged blocks (both refuse, or both read the same values)."""

from __future__ import annotations

import random
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from jfs import layout as L
from jfs import packing as P
from jfs.codecs import DirBlock
from vstore.blocks.errors import FormatError

BS = [2048, 4096]
u8 = st.integers(0, 0xFF)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)
u64 = st.integers(0, (1 << 64) - 1)
i64 = st.integers(-(1 << 63), (1 << 63) - 1)
names = st.text(st.characters(blacklist_characters="/\0", blacklist_categories=("Cs",)), min_size=1,
                max_size=30).filter(lambda n: len(n.encode()) <= L.MAX_NAME)


def outcome(fn: Any, *args: Any) -> Any:
    """What a parser gives: its values, or 'refused' for a FormatError."""
    try:
        return fn(*args)
    except FormatError:
        return "refused"


def damaged(raw: bytes, rng: random.Random) -> list[bytes]:
    """`raw` with one byte flipped, with a bad byte and the CRC fixed, and cut short."""
    out = []
    for _ in range(4):
        b = bytearray(raw)
        i = rng.randrange(len(b))
        b[i] ^= 1 << rng.randrange(8)
        out.append(bytes(b))
    return out + [raw[:len(raw) // 2]]


def reseal(raw: bytes, body_len: int, i: int, value: int) -> bytes:
    """`raw` with byte i set to `value` and the CRC recomputed (damage behind the checksum)."""
    b = bytearray(raw)
    b[i] = value
    b[body_len:body_len + 4] = L.crc32(bytes(b[:body_len])).to_bytes(4, "little")
    return bytes(b)


@settings(max_examples=150)
@given(st.fixed_dictionaries(dict(
    type=u8, mode=u16, nlink=u32, generation=u32, size=u64, atime_ns=i64, mtime_ns=i64, ctime_ns=i64,
    direct=st.lists(u32, min_size=12, max_size=12), indirect=u32, dindirect=u32, nblocks=u32)),
    st.integers(0, 10 ** 6))
def test_inode_agrees(values: dict[str, Any], seed: int) -> None:
    """An inode packed by struct is the construct build, and both read every damaged copy alike."""
    raw = P.pack_inode(P.InodeValues(**values))
    assert raw == L.build_checked(L.Inode, dict(values, reserved=0))

    def slow(b: bytes) -> Any:
        v = L.parse_checked(L.Inode, b, "inode")
        return P.InodeValues(v.type, v.mode, v.nlink, v.generation, v.size, v.atime_ns, v.mtime_ns,
                             v.ctime_ns, list(v.direct), v.indirect, v.dindirect, v.nblocks)

    rng = random.Random(seed)
    for b in [raw, *damaged(raw, rng), reseal(raw, 124, 2, rng.randrange(256))]:
        assert outcome(P.unpack_inode, b, "inode") == outcome(slow, b)


@settings(max_examples=100)
@given(st.sampled_from(BS), u32, st.dictionaries(names, st.tuples(u32, u8), max_size=60), st.integers(0, 10 ** 6))
def test_dir_block_agrees(bs: int, owner: int, entries: dict[str, tuple[int, int]], seed: int) -> None:
    """A directory block packed by struct is the construct build; damaged ones (also behind the CRC:
    counts and name lengths that overflow, bad UTF-8) read alike."""
    listed = [(n, i, t) for n, (i, t) in entries.items()]
    if sum(L.dir_entry_size(n) for n in entries) > L.dir_capacity(bs):
        return
    raw = P.pack_dir_block(bs, owner, listed)
    assert raw == L.build_checked(L.dir_block(bs), dict(count=len(listed), owner=owner, entries=[
        dict(ino=i, type=t, name=n) for n, i, t in listed]))

    def slow(b: bytes) -> Any:
        v = L.parse_checked(L.dir_block(bs), b, "dir")
        return v.owner, [(e.name, e.ino, e.type) for e in v.entries]

    rng = random.Random(seed)
    cases = [raw, *damaged(raw, rng)]
    for i in [6, 7, *(rng.randrange(12, 12 + 6 * len(listed) + 1) for _ in range(4))]:
        cases.append(reseal(raw, bs - 4, i, rng.choice([0, 0xFF, 0x80, rng.randrange(256)])))
    for b in cases:
        assert outcome(P.unpack_dir_block, bs, b, "dir") == outcome(slow, b)


@settings(max_examples=40)
@given(st.sampled_from(BS), st.integers(1, 2), u32, st.lists(u32, max_size=80), st.integers(0, 10 ** 6))
def test_ptr_block_agrees(bs: int, level: int, owner: int, ptrs: list[int], seed: int) -> None:
    """A pointer block packed by struct is the construct build; damaged ones read alike."""
    raw = P.pack_ptr_block(bs, level, owner, ptrs)
    full = ptrs + [0] * (L.ptrs_per_block(bs) - len(ptrs))
    assert raw == L.build_checked(L.ptr_block(bs), dict(level=level, reserved=0, owner=owner, ptrs=full))

    def slow(b: bytes) -> Any:
        v = L.parse_checked(L.ptr_block(bs), b, "ptr")
        return P.PtrValues(v.level, v.owner, list(v.ptrs))

    rng = random.Random(seed)
    for b in [raw, *damaged(raw, rng), reseal(raw, bs - 4, 5, 9)]:
        assert outcome(P.unpack_ptr_block, bs, b, "ptr") == outcome(slow, b)


@settings(max_examples=30)
@given(st.sampled_from(BS), st.sampled_from([L.INODE_BITMAP_MAGIC, L.BLOCK_BITMAP_MAGIC]), u32,
       st.integers(0, 10 ** 6))
def test_bitmap_block_agrees(bs: int, magic: bytes, index: int, seed: int) -> None:
    """A bitmap block packed by struct is the construct build; damaged ones read alike."""
    rng = random.Random(seed)
    bits = rng.randbytes(bs - L.BITMAP_HEADER_BYTES - 4)
    raw = P.pack_bitmap_block(bs, magic, index, bits)
    assert raw == L.build_checked(L.bitmap_block(bs, magic), dict(reserved=0, index=index, bits=bits))

    def slow(b: bytes) -> Any:
        v = L.parse_checked(L.bitmap_block(bs, magic), b, "bitmap")
        return v.index, v.bits

    for b in [raw, *damaged(raw, rng), reseal(raw, bs - 4, 4, 2)]:
        assert outcome(P.unpack_bitmap_block, bs, magic, b, "bitmap") == outcome(slow, b)


@settings(max_examples=60)
@given(st.sampled_from(BS), u16, st.binary(min_size=16, max_size=16), u64, u32, u64, u32, u64, u16, u32, u32,
       u32)
def test_log_structures_agree(bs: int, flags: int, uuid: bytes, tail_seq: int, tail_off: int, head_seq: int,
                              head_off: int, cp: int, desc: int, meta: int, body_len: int, crc: int) -> None:
    """Log header, transaction head and commit block packed by struct are the construct builds."""
    assert P.pack_log_header(bs, flags, uuid, tail_seq, tail_off, head_seq, head_off, cp) == L.build_checked(
        L.LogHeader, dict(flags=flags, uuid=uuid, tail_seq=tail_seq, tail_off=tail_off, head_seq=head_seq,
                          head_off=head_off, checkpoint_seq=cp), bs)
    assert P.pack_txn_head(desc, uuid, head_seq, meta, body_len, crc) == L.build_checked(
        L.TxnHead, dict(desc_blocks=desc, uuid=uuid, seq=head_seq, meta_blocks=meta, body_len=body_len,
                        prev_crc=crc))
    assert P.pack_commit(bs, uuid, head_seq, meta, crc) == L.build_checked(
        L.Commit, dict(reserved=0, uuid=uuid, seq=head_seq, total_blocks=meta, txn_crc=crc), bs)


@settings(max_examples=60)
@given(st.lists(u32, max_size=20), st.lists(st.tuples(
    u32, st.sampled_from(sorted(P.OPS)), st.one_of(st.just(""), names.map(lambda n: "/" + n)),
    st.lists(st.tuples(u32, u32), max_size=5)), max_size=8), st.lists(st.tuples(u32, u32, u32), max_size=6))
def test_txn_body_agrees(homes: list[int], records: list[tuple[int, str, str, list[tuple[int, int]]]],
                         runs: list[tuple[int, int, int]]) -> None:
    """A transaction body packed by struct is the construct build, and parses back to its records
    and data runs."""
    raw = P.pack_txn_body(homes, records, runs)
    assert raw == L.TxnBody.build(dict(homes=homes, records=[
        dict(ino=i, op=op, path=path, ranges=[dict(first=f, count=c) for f, c in ranges])
        for i, op, path, ranges in records], data=[dict(first=f, count=c, crc=x) for f, c, x in runs]))
    back = L.TxnBody.parse(raw)
    assert [(r.ino, str(r.op), r.path, [(x.first, x.count) for x in r.ranges]) for r in back.records] == records
    assert [(d.first, d.count, d.crc) for d in back.data] == runs
    assert set(P.OPS) == set(L.Op.encmapping) and all(L.Op.encmapping[k] == v for k, v in P.OPS.items())


@settings(max_examples=60)
@given(st.sampled_from(BS), u16, st.binary(min_size=16, max_size=16), u64, u32, u64, u32, u64, u16, u32, u32,
       u32, st.integers(0, 10 ** 6))
def test_log_structures_parse_alike(bs: int, flags: int, uuid: bytes, tail_seq: int, tail_off: int,
                                    head_seq: int, head_off: int, cp: int, desc: int, meta: int, body_len: int,
                                    crc: int, seed: int) -> None:
    """Log header, transaction head and commit block read by struct give the construct values, and
    the same refusal for damaged ones (a flipped bit, a bad version behind a good CRC, cut short)."""
    rng = random.Random(seed)
    cases = [
        (P.pack_log_header(bs, flags, uuid, tail_seq, tail_off, head_seq, head_off, cp), L.LogHeader,
         P.unpack_log_header, ("flags", "uuid", "tail_seq", "tail_off", "head_seq", "head_off", "checkpoint_seq")),
        (P.pack_txn_head(desc, uuid, head_seq, meta, body_len, crc), L.TxnHead, P.unpack_txn_head,
         ("desc_blocks", "uuid", "seq", "meta_blocks", "body_len", "prev_crc")),
        (P.pack_commit(bs, uuid, head_seq, meta, crc), L.Commit, P.unpack_commit,
         ("reserved", "uuid", "seq", "total_blocks", "txn_crc")),
    ]
    for raw, decl, fast, fields in cases:
        body_len_ = decl.sizeof() - 4

        def slow(b: bytes, decl: Any = decl, fields: tuple[str, ...] = fields) -> Any:
            v = L.parse_checked(decl, b[:decl.sizeof()], "log structure")
            return tuple(v[f] for f in fields)

        for b in [raw, *damaged(raw[:decl.sizeof()], rng), reseal(raw, body_len_, 4, 9)]:
            def quick(x: bytes, decl: Any = decl, fast: Any = fast) -> Any:
                return tuple(fast(x[:decl.sizeof()], "log structure"))

            assert outcome(quick, b) == outcome(slow, b)


@settings(max_examples=80)
@given(st.lists(u32, max_size=20), st.lists(st.tuples(
    u32, st.sampled_from(sorted(P.OPS)), st.one_of(st.just(""), names.map(lambda n: "/" + n)),
    st.lists(st.tuples(u32, u32), max_size=5)), max_size=8), st.lists(st.tuples(u32, u32, u32), max_size=6),
    st.integers(0, 10 ** 6))
def test_txn_body_parses_alike(homes: list[int], records: list[tuple[int, str, str, list[tuple[int, int]]]],
                               runs: list[tuple[int, int, int]], seed: int) -> None:
    """A transaction body read by struct gives the construct values (unknown operation codes stay
    numbers, trailing bytes are ignored), and both refuse the same damaged bodies."""
    rng = random.Random(seed)
    raw = P.pack_txn_body(homes, records, runs)

    def slow(b: bytes) -> Any:
        v = L.parse(L.TxnBody, b, "txn body")
        return list(v.homes), [(r.ino, r.op if isinstance(r.op, str) else int(r.op), r.path,
                                [(x.first, x.count) for x in r.ranges]) for r in v.records], \
            [(d.first, d.count, d.crc) for d in v.data]

    def fast(b: bytes) -> Any:
        h, recs, data = P.unpack_txn_body(b, "txn body")
        return h, [(r.ino, r.op, r.path, [(x.first, x.count) for x in r.ranges]) for r in recs], data

    variants = [raw, raw + rng.randbytes(7), raw[:rng.randrange(len(raw) + 1)]]
    for _ in range(6):
        b = bytearray(raw)
        b[rng.randrange(len(b))] = rng.randrange(256)
        variants.append(bytes(b))
    for b in variants:
        assert outcome(fast, b) == outcome(slow, b)


@settings(max_examples=60)
@given(st.lists(st.tuples(st.sampled_from(["add", "remove"]), st.sampled_from([f"n{i}" for i in range(12)]),
                          u32, st.sampled_from([1, 2])), max_size=30), u32)
def test_dir_block_image_kept_as_names_are_added_is_the_full_pack(changes: list[tuple[str, str, int, int]],
                                                                  owner: int) -> None:
    """A directory block's image, kept packed while names are appended and packed anew after any
    other change, is byte for byte the block `pack_dir_block` builds from its entries."""
    block = DirBlock(100, {})
    for op, name, ino, typ in changes:
        if op == "add":
            block.add(name, ino, typ)
        elif name in block.entries:
            block.remove(name)
        full = P.pack_dir_block(2048, owner, ((n, i, t) for n, (i, t) in block.entries.items()))
        assert block.image(2048, owner) == full
