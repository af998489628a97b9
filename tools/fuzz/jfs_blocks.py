"""Fuzz target: each jfs block parser on its own, a block of fuzzed bytes at a time (SPEC §8 [0160];
jfs/FORMAT.md): the superblock with its geometry, an inode slot, directory, pointer and bitmap
blocks, the log header, and the ring of transactions read by `scan_ring` and replayed.

Keeps true for every input: each parser returns or raises a project error (`FormatError`).
What parses is what its builder makes: built again and parsed, it gives the same values; a
geometry that passes `check` places its regions in order inside the volume; a log header that
parses has positions inside the ring; the ring scan returns consecutive transactions from the tail
whose records name inodes of the table, known operations and ranges of the data area, whose homes
ascend and are each a bitmap block, a recorded inode's table block or a block a record names, and
replaying them touches only those blocks.

Input: one flags byte, then the block (zero-padded or cut to the block size; the ring: up to its
size). Bits 0-2 choose the parser: 0 superblock, 1 inode, 2 directory block, 3 pointer block,
4 bitmap block, 5 log header, 6 and 7 the ring. Bit 7 recomputes the CRCs first.
"""

from __future__ import annotations

from jfs import layout as L
from jfs.codecs import DirBlock, Inode, bitmap_image, parse_bitmap, parse_dir_block, parse_ptr_block, ptr_image
from jfs.logring import BlockView, LogHead, read_header, replay_committed, scan_ring
from tools.fuzz import harness, jfsutil
from vstore.blocks.device import MemoryDevice

BS = jfsutil.BLOCK_SIZE
OPS = {str(op) for op in L.Op.encmapping}


def _superblock(raw: bytes) -> str:
    sb = harness.rejects(L.parse_checked, L.Superblock, raw[:L.SUPERBLOCK_BYTES], "superblock")
    if not harness.ok(sb):
        return harness.describe(sb)
    geo = L.Geometry.from_superblock(sb)
    checked = harness.rejects(geo.check)
    if not harness.ok(checked):
        return harness.describe(checked)
    assert 0 < geo.log_start < geo.ibitmap_start <= geo.bbitmap_start <= geo.itable_start <= geo.data_start
    assert geo.data_start < geo.data_end < geo.num_blocks
    return "usable superblock"


def _inode(raw: bytes) -> str:
    node = harness.rejects(Inode.parse, 5, raw[:L.INODE_SIZE])
    if not harness.ok(node):
        return harness.describe(node)
    if node is None:
        return "free inode"
    assert isinstance(node, Inode)
    assert Inode.parse(5, node.build()) == node, "an inode does not survive rebuilding"
    return "inode"


def _dir(raw: bytes) -> str:
    got = harness.rejects(parse_dir_block, BS, 40, raw, "directory block")
    if not harness.ok(got):
        return harness.describe(got)
    owner, block = got  # type: ignore[misc]
    assert isinstance(block, DirBlock) and block.used <= L.dir_capacity(BS)
    assert parse_dir_block(BS, 40, block.image(BS, owner), "again") == (owner, block)
    return f"directory block of {len(block.entries)}"


def _ptr(raw: bytes) -> str:
    v = harness.rejects(parse_ptr_block, BS, raw, "pointer block")
    if not harness.ok(v):
        return harness.describe(v)
    again = parse_ptr_block(BS, ptr_image(BS, v.level, v.owner, list(v.ptrs)), "again")
    assert (again.level, again.owner, list(again.ptrs)) == (v.level, v.owner, list(v.ptrs))
    return "pointer block"


def _bitmap(raw: bytes) -> str:
    bits = harness.rejects(parse_bitmap, BS, L.BLOCK_BITMAP_MAGIC, [raw], 26, "block bitmap")
    if not harness.ok(bits):
        return harness.describe(bits)
    assert isinstance(bits, bytearray) and len(bits) == L.bits_per_bitmap_block(BS) // 8
    assert parse_bitmap(BS, L.BLOCK_BITMAP_MAGIC, [bitmap_image(BS, L.BLOCK_BITMAP_MAGIC, 0, bytes(bits))],
                        26, "again") == bits
    return "bitmap"


def _device(geo: L.Geometry) -> MemoryDevice:
    return MemoryDevice(geo.num_blocks, BS, data=jfsutil.base_images()[0])


def _log_header(raw: bytes) -> str:
    geo = jfsutil.geometry()
    dev = _device(geo)
    dev.write(geo.log_start, raw)
    head = harness.rejects(read_header, BlockView(dev, readonly=True), geo)
    if not harness.ok(head):
        return harness.describe(head)
    assert isinstance(head, LogHead)
    ring = geo.log_blocks - 1
    assert head.tail_off < ring and head.head_off < ring and head.tail_seq <= head.head_seq
    dev.write(geo.log_start, head.build(BS))
    assert read_header(BlockView(dev, readonly=True), geo) == head
    return "log header"


def _ring(data: bytes, sealed: bool) -> str:
    """The fuzzed bytes as the ring, under a header whose tail is at offset 0 with the sequence of
    the transaction found there (1 if none), every transaction still to be replayed."""
    geo = jfsutil.geometry()
    ring = geo.log_blocks - 1
    buf = bytearray(jfsutil.base_images()[0])
    start = (geo.log_start + 1) * BS
    buf[start:start + ring * BS] = data[:ring * BS].ljust(ring * BS, b"\0")
    if sealed:
        jfsutil.reseal_ring(buf, geo)
    dev = MemoryDevice(geo.num_blocks, BS, data=bytes(buf))
    view = BlockView(dev, readonly=True)
    tail = int.from_bytes(buf[start + 24:start + 32], "little") if buf[start:start + 4] == b"JTXD" else 1
    tail = min(max(tail, 1), 1 << 62)
    head = LogHead(jfsutil.UUID, 0, tail, 0, tail + ring, 0, tail - 1)
    scan = scan_ring(view, geo, head)
    seqs = [t.seq for t in scan.txns]
    assert seqs == list(range(tail, tail + len(seqs))) and sum(t.nblocks for t in scan.txns) <= ring
    for t in scan.txns:
        assert len(t.homes) == len(t.images) and all(len(img) == BS for img in t.images)
        assert t.homes == sorted(set(t.homes)), "homes out of order"
        named = {b for r in t.records for f, c in r.ranges for b in range(f, f + c)}
        tables = {geo.inode_location(r.ino)[0] for r in t.records}
        for h in t.homes:
            assert geo.ibitmap_start <= h < geo.itable_start or h in tables or h in named, \
                f"home {h} is no bitmap block, no recorded inode's table block and no recorded block"
        for r in t.records:
            assert 0 < r.ino < geo.inode_count, f"a record of inode {r.ino}"
            assert r.op in OPS, f"a record of operation {r.op}"
            assert all(c and geo.data_start <= f and f + c <= geo.data_end for f, c in r.ranges), \
                "a range outside the data"
    replayed = replay_committed(view, geo, scan)
    assert set(view.overlay) <= {h for t in replayed for h in t.homes} | {geo.log_start}
    assert bytes(dev.buf) == bytes(buf), "a read-only replay wrote to the device"
    return f"{len(seqs)} transactions, {'complete' if scan.problem is None else 'hole'}"


_PARSERS = (_superblock, _inode, _dir, _ptr, _bitmap, _log_header)


def outcome(data: bytes) -> str:
    if not data:
        return "empty"
    flags, body = data[0], data[1:]
    which, sealed = flags & 7, bool(flags & 0x80)
    if which >= len(_PARSERS):
        return _ring(body, sealed)
    block = bytearray(body[:BS].ljust(BS, b"\0"))
    if sealed:
        if which == 1:
            if block[:2] == b"IN":
                block[L.INODE_SIZE - 4:L.INODE_SIZE] = L.crc32(bytes(block[:L.INODE_SIZE - 4])).to_bytes(4, "little")
        else:
            jfsutil.reseal_block(block, 0, BS, range(0))
    return _PARSERS[which](bytes(block))


def check(data: bytes) -> None:
    outcome(data)


def seeds() -> list[bytes]:
    image = jfsutil.base_images()[0]
    geo = jfsutil.geometry()

    def blk(lba: int) -> bytes:
        return image[lba * BS:(lba + 1) * BS]

    dev = _device(geo)
    view = BlockView(dev, readonly=True)
    head = read_header(view, geo)
    txns = scan_ring(view, geo, head).txns
    data_blocks = [blk(b) for b in range(geo.data_start, geo.data_end)]
    dirs = [b for b in data_blocks if b[:4] == b"JDIR"][:2]
    ptrs = [b for b in data_blocks if b[:4] == b"JPTR"][:1]
    table = blk(geo.itable_start)
    inodes = [table[i:i + L.INODE_SIZE] for i in range(0, BS, L.INODE_SIZE) if table[i:i + 2] == b"IN"][:3]
    ring_start = (geo.log_start + 1) * BS
    first = txns[0].off if txns else 0
    ring = image[ring_start + first * BS:ring_start + (geo.log_blocks - 1) * BS]  # the live transactions first
    out: list[tuple[int, bytes]] = [(0, blk(0)), *((1, i) for i in inodes), *((2, d) for d in dirs),
                                    *((3, p) for p in ptrs), (4, blk(geo.bbitmap_start)), (5, blk(geo.log_start)),
                                    (6, ring)]
    return [bytes([which | sealed]) + body for which, body in out for sealed in (0, 0x80)]


def main() -> None:
    harness.atheris_main("jfs_blocks", check, seeds())


if __name__ == "__main__":
    main()
