"""The in-memory index of a spool's unconfirmed entries (SPEC §8 [0169]: the trim rule asks
whether any unshipped entry touches some blocks).

Keeps true: `queue` holds the unconfirmed entries' locations in sequence order; `add` appends one
and `pop` removes the oldest, and after either, `waiting_bytes` is their total size and `blocks`
maps each volume id to every block some queued entry touches (with how many), so
`has_unshipped` and `unshipped_blocks` answer without reading the spool.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from typing import Protocol, TypeVar


class Location(Protocol):
    seq: int
    length: int
    volume_id: int
    lba: int
    block_count: int


L = TypeVar("L", bound=Location)


class PendingIndex(deque[L]):
    """Unconfirmed entries in sequence order, with a per-volume block index."""

    def __init__(self) -> None:
        super().__init__()
        self.waiting_bytes = 0
        self.blocks: dict[int, dict[int, int]] = {}

    def add(self, loc: L) -> None:
        self.append(loc)
        self.waiting_bytes += loc.length
        index = self.blocks.setdefault(loc.volume_id, {})
        for lba in range(loc.lba, loc.lba + loc.block_count):
            index[lba] = index.get(lba, 0) + 1

    def pop_oldest(self) -> L:
        loc = self.popleft()
        self.waiting_bytes -= loc.length
        index = self.blocks[loc.volume_id]
        for lba in range(loc.lba, loc.lba + loc.block_count):
            left = index[lba] - 1
            if left:
                index[lba] = left
            else:
                del index[lba]
        if not index:
            del self.blocks[loc.volume_id]
        return loc

    def has_unshipped(self, volume_id: int, ranges: Iterable[tuple[int, int]]) -> bool:
        """True when a queued entry of this volume touches any (first_lba, count) range."""
        index = self.blocks.get(volume_id)
        if not index:
            return False
        for first, count in ranges:
            if count > len(index):
                if any(first <= lba < first + count for lba in index):
                    return True
            elif any(lba in index for lba in range(first, first + count)):
                return True
        return False

    def unshipped_blocks(self, volume_id: int) -> set[int]:
        return set(self.blocks.get(volume_id, ()))
