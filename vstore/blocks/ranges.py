"""Block ranges: lists of (first, count) runs, kept sorted and coalesced.

Keeps true: `merge_ranges` returns runs in ascending order with no two runs overlapping or
touching, and no run of count 0; every producer of block ranges in tricopy (the jfs metadata log,
the pairs' position bitmaps, verify) goes through it, so a range means the same thing everywhere.
`copy_ranges` is the one loop that copies block ranges between volumes (sync and async copy
programs, a remote site's copies, Fig 6's member copy): chunk by chunk, in ascending order.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from vstore.blocks.interrupts import deferred_interrupts

Ranges = list[tuple[int, int]]
COPY_CHUNK = 256  # blocks per read and write of a copy


def merge_ranges(ranges: Iterable[tuple[int, int]]) -> Ranges:
    """Sort and coalesce (first, count) ranges; overlapping and adjacent runs become one."""
    out: Ranges = []
    for first, count in sorted(r for r in ranges if r[1] > 0):
        if out and first <= out[-1][0] + out[-1][1]:
            last_first, last_count = out[-1]
            out[-1] = (last_first, max(last_count, first + count - last_first))
        else:
            out.append((first, count))
    return out


def ranges_of(blocks: Iterable[int]) -> Ranges:
    """Block numbers (in any order, repeats allowed) -> merged runs."""
    return merge_ranges((b, 1) for b in blocks)


def copy_ranges(read: Callable[[int, int], bytes], write: Callable[[int, bytes], None],
                ranges: Iterable[tuple[int, int]], *, chunk: int = COPY_CHUNK,
                progress: Callable[[int], None] | None = None, target_is_zero: bool = False) -> int:
    """Copy each (first, count) run in chunks: `read(lba, n)` then `write(lba, data)`; returns the
    blocks covered. With `target_is_zero` (a fresh target) an all-zero chunk is not written. A
    Ctrl-C lands between chunks, so every chunk reported done is wholly on the target."""
    copied = 0
    for first, count in ranges:
        for lba in range(first, first + count, chunk):
            n = min(chunk, first + count - lba)
            with deferred_interrupts():
                data = read(lba, n)
                if not (target_is_zero and data.count(0) == len(data)):
                    write(lba, data)
            copied += n
            if progress:
                progress(n)
    return copied
