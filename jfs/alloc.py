"""The inode and block allocators: one bitmap each, loaded at mount (SPEC §8 [0160]; FORMAT.md "Bitmaps").

The model is xv6's balloc/ialloc: a bit per block (or inode), set when it is in use. Here the bits
live in memory between transactions; a transaction writes the bitmap blocks it changed through the
metadata log, like every other metadata block.

Keeps true:
- `nfree` is the number of clear bits below `limit` (mkfs sets every bit that names no allocatable
  block or inode: the reserved ones, the metadata blocks, the padding past the end).
- `alloc(n)` sets and returns n clear bits, searching on from where the last allocation ended and
  wrapping once to `first`; when fewer than n bits are clear it raises `NoSpace` before setting any.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from jfs.errors import NoSpace

_NOT_FULL = re.compile(b"[^\xff]")


class Bitmap:
    """Packed bits (LSB first) of an inode or block bitmap, split into bitmap blocks."""

    def __init__(self, bits: bytearray, limit: int, first_free: int) -> None:
        self.bits = bits
        self.limit = limit
        self.hint = first_free
        self.first = first_free
        self.nfree = sum(1 for i in range(first_free, limit) if not self.test(i)) \
            if limit < 4096 else self._count_free()

    def _count_free(self) -> int:
        used = sum(bin(b).count("1") for b in self.bits[: (self.limit + 7) // 8])
        return (self.limit + 7) // 8 * 8 - used

    def test(self, i: int) -> bool:
        return bool(self.bits[i >> 3] >> (i & 7) & 1)

    def set(self, i: int) -> None:
        if not self.test(i):
            self.bits[i >> 3] |= 1 << (i & 7)
            self.nfree -= 1

    def clear(self, i: int) -> None:
        if self.test(i):
            self.bits[i >> 3] &= ~(1 << (i & 7))
            self.nfree += 1

    def block_bytes(self, k: int, nbytes: int, cleared: Iterable[int] = ()) -> bytes:
        """The bits of bitmap block `k` (`nbytes` bytes a block), with those of `cleared` that
        fall in it shown clear (a transaction's freed bits, cleared in memory once it commits)."""
        chunk = bytearray(self.bits[k * nbytes:(k + 1) * nbytes])
        lo = k * nbytes * 8
        for i in cleared:
            if lo <= i < lo + nbytes * 8:
                chunk[(i - lo) >> 3] &= ~(1 << ((i - lo) & 7))
        return bytes(chunk)

    def alloc(self, n: int, what: str) -> list[int]:
        if n > self.nfree:
            raise NoSpace(f"the file system has no free {what} left; delete files or use a larger image")
        out: list[int] = []
        pos, wrapped = self.hint, False
        while len(out) < n:
            m = _NOT_FULL.search(self.bits, pos >> 3)
            if m is None or m.start() * 8 >= self.limit:
                if wrapped:
                    raise NoSpace(f"the file system has no free {what} left")
                pos, wrapped = self.first, True
                continue
            base = m.start() * 8
            for i in range(max(base, pos), base + 8):
                if i < self.limit and not self.test(i):
                    self.set(i)
                    out.append(i)
                    if len(out) == n:
                        break
            pos = base + 8
        self.hint = out[-1] + 1 if out else self.hint
        return out
