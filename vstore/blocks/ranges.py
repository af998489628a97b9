"""Block ranges: lists of (first, count) runs, kept sorted and coalesced.

Keeps true: `merge_ranges` returns runs in ascending order with no two runs overlapping or
touching, and no run of count 0; every producer of block ranges in tricopy (the jfs metadata log,
the pairs' position bitmaps, verify) goes through it, so a range means the same thing everywhere.
"""

from __future__ import annotations

from collections.abc import Iterable

Ranges = list[tuple[int, int]]


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


def overlaps(ranges: Iterable[tuple[int, int]], first: int, count: int) -> bool:
    """True when any run touches a block of [first, first + count)."""
    end = first + count
    return any(f < end and first < f + c for f, c in ranges)
