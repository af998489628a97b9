"""An inode's block map: where file block k lives (SPEC §8 [0160]; FORMAT.md "Inode", "Pointer block").

The model is the classic Unix inode (xv6 bmap()): 12 direct pointers, one single-indirect pointer
block of P pointers and one double-indirect block of P single-indirect children, so a file has up to
12 + P + P*P blocks. A 0 pointer is a hole.

Keeps true:
- `walk` is the one reading of a pointer tree, used by the file system (`read_map`: every pointer
  block checked, any fault raises), by fsck (each pointer claimed, a bad one dropped and the block
  that held it rewritten) and by the recovery scan (what cannot be read is skipped). The strategy for
  reading a pointer block and for accepting a pointer is the caller's; the shape of the tree is
  decided here only.
- `FileMap.data[k]` is the block of file block k, with trailing holes removed; `all_blocks` is every
  block the inode owns (data and pointer blocks), which is what the trim rule ([0169]) and
  recovery ([0171]) ask about.
- `store_map` rewrites the pointer blocks in place (a block is freed when it has no pointer left,
  allocated when it gets its first) and hands only the images that changed to the transaction.
"""

from __future__ import annotations

from array import array
from collections.abc import Callable
from dataclasses import dataclass, field

from jfs import layout as L
from jfs.codecs import Inode, parse_ptr_block, ptr_image
from jfs.errors import FileTooLarge
from vstore.blocks.errors import FormatError


@dataclass
class FileMap:
    """Where an inode's blocks live: `data[k]` is the LBA of file block k (0 = hole), plus the
    pointer blocks (single indirect, double indirect and its children)."""

    data: list[int]
    indirect: int = 0
    dindirect: int = 0
    children: list[int] = field(default_factory=list)
    images: dict[int, bytes] = field(default_factory=dict)  # pointer block lba -> image as on disk
    bad: list[int] = field(default_factory=list)  # pointer blocks dropped because they could not be read
    repaired: dict[int, tuple[int, list[int]]] = field(default_factory=dict)  # lba -> (level, kept ptrs)

    def pointer_blocks(self) -> list[int]:
        return [b for b in [self.indirect, self.dindirect, *self.children] if b]

    def all_blocks(self) -> list[int]:
        return [b for b in self.data if b] + self.pointer_blocks()


PtrsOf = Callable[[int, int], list[int] | None]
"""(pointer block lba, level) -> its pointers, or None to drop the block (and everything under it)."""
Keep = Callable[[int, str], bool]
"""(lba, "data block" | "pointer block") -> False to drop that pointer (the slot becomes a hole)."""


def _keep_all(lba: int, what: str) -> bool:
    return True


def _end(values: list[int]) -> int:
    """One past the last non-zero value of a list of block numbers (0 when all are zero); the
    zeros are stripped at C speed."""
    return (len(array("I", values).tobytes().rstrip(b"\0")) + 3) // 4


def walk(geo: L.Geometry, node: Inode, ptrs_of: PtrsOf, keep: Keep = _keep_all) -> FileMap:
    """The block map of `node`, visiting pointers in file order (direct, indirect, double
    indirect child by child); `keep` sees every non-zero pointer before it is followed."""
    p = L.ptrs_per_block(geo.block_size)
    m = FileMap([b if b and keep(b, "data block") else 0 for b in node.direct])
    if node.indirect:
        ptrs = _pointers(m, node.indirect, 1, p, ptrs_of, keep, m.data)
        m.indirect = node.indirect if ptrs is not None else 0
        if ptrs is None:
            m.data += [0] * p
    if node.dindirect:
        m.data += [0] * (L.N_DIRECT + p - len(m.data))
        children = _pointers(m, node.dindirect, 2, p, ptrs_of, keep, m.data)
        m.dindirect = node.dindirect if children is not None else 0
        m.children = children or []
        del m.children[_end(m.children):]
    del m.data[_end(m.data):]
    return m


def _pointers(m: FileMap, lba: int, level: int, p: int, ptrs_of: PtrsOf, keep: Keep,
              out: list[int]) -> list[int] | None:
    """Follow pointer block `lba`: append the data blocks under it to `out` (holes included, up to
    the last pointer) and return its pointers as kept, or None when the block itself is dropped."""
    if not keep(lba, "pointer block"):
        return None
    got = ptrs_of(lba, level)
    if got is None:
        m.bad.append(lba)
        return None
    ptrs = list(got)
    last = _end(ptrs) - 1
    changed = False
    if level == 1 and keep is _keep_all:  # the common case, without a call per pointer
        out += ptrs[:last + 1]
        out += [0] * (p - (last + 1))
        return ptrs
    for j in range(last + 1):
        b = ptrs[j]
        if level == 1:
            if b and not keep(b, "data block"):
                ptrs[j], changed = 0, True
            out.append(ptrs[j])
        elif not b:
            out += [0] * p
        else:
            sub: list[int] = []
            if _pointers(m, b, 1, p, ptrs_of, keep, sub) is None:
                ptrs[j], changed = 0, True
                sub = []
            out += sub + [0] * (p - len(sub))
    if level == 1:
        out += [0] * (p - (last + 1))
    if changed:
        m.repaired[lba] = (level, ptrs)
    return ptrs


def read_map(geo: L.Geometry, read: Callable[[int], bytes], node: Inode) -> FileMap:
    """The file system's reading: the inode's size must fit a file, and every pointer block must lie
    in the data area, parse, and name this inode and its level; anything else is a `FormatError`
    (run fsck)."""
    images: dict[int, bytes] = {}
    owner = node.ino
    if node.size > L.max_file_blocks(geo.block_size) * geo.block_size:
        raise FormatError(f"inode {owner} states a size of {node.size} bytes, more than a file can hold; "
                          "run 'jfs fsck'")

    def ptrs_of(lba: int, level: int) -> list[int]:
        if not geo.data_start <= lba < geo.data_end:
            raise FormatError(f"inode {owner} points outside the data area; run 'jfs fsck'")
        raw = read(lba)
        v = parse_ptr_block(geo.block_size, raw, f"pointer block {lba} of inode {owner}")
        if v.level != level or v.owner != owner:
            raise FormatError(f"pointer block {lba} does not belong to inode {owner}; run 'jfs fsck'")
        images[lba] = raw
        return list(v.ptrs)

    m = walk(geo, node, ptrs_of)
    m.images = images
    return m


def store_map(m: FileMap, node: Inode, block_size: int, *, alloc: Callable[[], int],
              put: Callable[[int, bytes], None], free: Callable[[int], None]) -> list[int]:
    """Rebuild the pointer blocks of `m` (in place where they exist) and point `node` at them;
    `alloc` gives a new block, `put` takes a changed pointer-block image into the transaction,
    `free` releases a block. Returns the pointer blocks written."""
    p = L.ptrs_per_block(block_size)
    if len(m.data) > L.max_file_blocks(block_size):
        raise FileTooLarge(f"files are limited to {L.max_file_blocks(block_size) * block_size} bytes")
    while m.data and not m.data[-1]:
        m.data.pop()
    data = m.data + [0] * max(0, L.N_DIRECT - len(m.data))
    node.direct = data[:L.N_DIRECT]
    written: list[int] = []

    def put_ptrs(lba: int, ptrs: list[int], level: int) -> int:
        if not any(ptrs):
            release(lba)
            return 0
        if not lba:
            lba = alloc()
        img = ptr_image(block_size, level, node.ino, ptrs)
        if m.images.get(lba) != img:
            m.images[lba] = img
            put(lba, img)
            written.append(lba)
        return lba

    def release(lba: int) -> None:
        if lba:
            m.images.pop(lba, None)
            free(lba)

    m.indirect = put_ptrs(m.indirect, data[L.N_DIRECT:L.N_DIRECT + p], 1)
    rest = data[L.N_DIRECT + p:]
    chunks = [rest[i:i + p] for i in range(0, len(rest), p)]
    old_children = m.children
    children = [put_ptrs(old_children[j] if j < len(old_children) else 0, chunk, 1)
                for j, chunk in enumerate(chunks)]
    for old in old_children[len(chunks):]:
        release(old)
    while children and not children[-1]:
        children.pop()
    m.children = children
    m.dindirect = put_ptrs(m.dindirect, children, 2)
    node.indirect, node.dindirect = m.indirect, m.dindirect
    node.nblocks = len(m.all_blocks())
    return written


def write_cost(geo: L.Geometry, path_bytes: int, offset: int, size: int) -> tuple[int, int]:
    """(blocks, log blocks) that one transaction writing `size` bytes at `offset` of a file (whose
    path is `path_bytes` long) can need at most: every touched block anew (copy-on-write), every
    pointer block over them, and a transaction that lists each of them as its own range and
    data run and touches a bitmap block for each block allocated or freed."""
    if size <= 0:
        return 0, 0
    bs, p = geo.block_size, L.ptrs_per_block(geo.block_size)
    k0, k1 = offset // bs, (offset + size - 1) // bs
    ptrs = 0
    single, double = L.N_DIRECT, L.N_DIRECT + p  # first file block under each pointer tree
    if k1 >= single and k0 < double:
        ptrs += 1
    if k1 >= double:
        ptrs += 2 + (k1 - double) // p - (max(k0, double) - double) // p  # the root and its children
    blocks = k1 - k0 + 1 + ptrs
    meta = 1 + min(geo.bbitmap_blocks, 2 * blocks) + ptrs  # inode table, bitmaps, pointers
    body = 16 + 4 * meta + 16 + path_bytes + 8 * blocks + 4 + 12 * blocks  # ... and each as its own data run
    desc = -(-(L.TXN_HEAD_BYTES + body) // bs)
    return blocks, desc + meta + 1
