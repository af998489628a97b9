"""Block ranges: lists of (first, count) runs, kept sorted and coalesced.

Keeps true: `merge_ranges` returns runs in ascending order with no two runs overlapping or
touching, and no run of count 0; every producer of block ranges in tricopy (the jfs metadata log,
the pairs' position bitmaps, verify) goes through it, so a range means the same thing everywhere.
`copy_ranges` is the one loop that copies block ranges between volumes (sync and async copy
programs, a remote site's copies, Fig 6's member copy): chunk by chunk, in ascending order; the
source's holes and all-zero chunks become holes of the target, never zeros sent.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from vstore.blocks.interrupts import deferred_interrupts

Ranges = list[tuple[int, int]]
COPY_CHUNK = 256  # blocks per read and write of a copy
HOLE_CHUNK = 16384  # blocks of a source hole made zeros on the target at once


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
                progress: Callable[[int], None] | None = None, target_is_zero: bool = False,
                zero: Callable[[int, int], None] | None = None,
                data: Callable[[int, int], Ranges] | None = None) -> int:
    """Copy each (first, count) run in chunks: `read(lba, n)` then `write(lba, data)`; returns the
    blocks covered. `data(first, count)`: the runs of the source that may hold data (the rest
    reads as zeros and is not read); `zero(lba, n)`: make blocks of the target zeros without
    sending them (a hole), used for those and for every all-zero chunk. With `target_is_zero` (a
    fresh target) zeros are neither written nor sent. A Ctrl-C lands between chunks, so every
    chunk reported done is wholly on the target."""
    copied = 0
    for first, count in ranges:
        at = first
        for start, n in (data(first, count) if data is not None else [(first, count)]) + [(first + count, 0)]:
            if start > at:  # a hole of the source
                copied += _zeroes(at, start - at, zero, write, chunk, progress, target_is_zero, read)
            for lba in range(start, start + n, chunk):
                k = min(chunk, start + n - lba)
                with deferred_interrupts():
                    block = read(lba, k)
                    if block.count(0) != len(block):
                        write(lba, block)
                    elif target_is_zero:
                        pass
                    elif zero is not None:
                        zero(lba, k)
                    else:
                        write(lba, block)
                copied += k
                if progress:
                    progress(k)
            at = max(at, start + n)
    return copied


def _zeroes(lba: int, count: int, zero: Callable[[int, int], None] | None, write: Callable[[int, bytes], None],
            chunk: int, progress: Callable[[int], None] | None, target_is_zero: bool,
            read: Callable[[int, int], bytes]) -> int:
    """A hole of the source lba..lba+count-1 made zeros on the target (in large pieces: a hole
    costs nothing to punch, but a piece written as zeros is read first)."""
    chunk = chunk if zero is None or target_is_zero else max(chunk, HOLE_CHUNK)
    for first in range(lba, lba + count, chunk):
        k = min(chunk, lba + count - first)
        with deferred_interrupts():
            if target_is_zero:
                pass
            elif zero is not None:
                zero(first, k)
            else:
                write(first, read(first, k))
        if progress:
            progress(k)
    return count
