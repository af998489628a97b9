"""Comparing a pair's source and target by digests, and the differential resync it allows (SPEC §3
[0041]: Duplex-Pending copies only what the target lacks; DESIGN "Surfaces": online verify in the
manner of DRBD).

Keeps true:
- `differing_blocks` moves only digests between the sites (`SiteStorage.digests`): one per chunk
  of `chunk_blocks` blocks, and one per block only inside a chunk whose digests differ. A block in
  `excluded` is never reported.
- `take_recorded` is how every resync takes a pair's recorded positions. When the positions are
  known exactly it returns them. When they are not (`Pair.verify_first`: the spool lost entries
  together with their headers, so every block was recorded), it returns exactly the recorded blocks
  whose digests differ: copying those makes the target equal to the source, as copying all of them
  would, while the source is not written meanwhile (a resync runs under the site's request lock,
  or with the lab's daemons stopped).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from vstore.blocks.ranges import Ranges, ranges_of
from vstore.replication.pairs import Pair, split_ref
from vstore.replication.storage import SiteStorage

log = logging.getLogger("vstore.compare")

CHUNK_BLOCKS = 64  # blocks per digest of the first pass
BLOCKS_PER_REQUEST = 16384  # blocks digested per call, so a request stays bounded


def differing_blocks(src: SiteStorage, src_vol: str, dst: SiteStorage, dst_vol: str,
                     ranges: Iterable[tuple[int, int]], *, chunk_blocks: int = CHUNK_BLOCKS,
                     excluded: frozenset[int] | set[int] = frozenset()) -> list[int]:
    """The blocks of `ranges` (ascending) whose contents differ between the two volumes."""
    out: list[int] = []
    for first, count in ranges:
        for at in range(first, first + count, BLOCKS_PER_REQUEST):
            n = min(BLOCKS_PER_REQUEST, first + count - at)
            mine = src.digests(src_vol, at, n, chunk_blocks)
            theirs = dst.digests(dst_vol, at, n, chunk_blocks)
            for i, (a, b) in enumerate(zip(mine, theirs, strict=True)):
                if a != b:
                    out.extend(_differing_in_chunk(src, src_vol, dst, dst_vol, at + i * chunk_blocks,
                                                   min(chunk_blocks, at + n - (at + i * chunk_blocks)), excluded))
    return out


def _differing_in_chunk(src: SiteStorage, src_vol: str, dst: SiteStorage, dst_vol: str, lba: int, n: int,
                        excluded: frozenset[int] | set[int]) -> list[int]:
    mine, theirs = src.digests(src_vol, lba, n, 1), dst.digests(dst_vol, lba, n, 1)
    return [lba + i for i in range(n) if mine[i] != theirs[i] and lba + i not in excluded]


def take_recorded(pair: Pair, src: SiteStorage, dst: SiteStorage) -> Ranges:
    """Take the pair's recorded positions for a resync: all of them, or, when they are not known
    exactly (`verify_first`), only those whose blocks differ. The pair's positions are cleared;
    the caller marks the returned ranges again if its copy fails."""
    ranges = pair.bitmap.take()
    if not pair.verify_first:
        return ranges
    recorded = sum(n for _, n in ranges)
    try:
        differing = ranges_of(differing_blocks(src, split_ref(pair.source)[1], dst, split_ref(pair.target)[1],
                                               ranges))
    except BaseException:
        for first, n in ranges:
            pair.bitmap.mark(first, n)
        raise
    pair.verify_first = False
    log.warning("pair %s: differential check of %d recorded blocks: %d differ", pair.name, recorded,
                sum(n for _, n in differing))
    return differing
