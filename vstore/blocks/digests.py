"""Digests of block runs: what two sites exchange instead of their blocks when they compare a
volume (DESIGN "Surfaces": online verify; SPEC §3 [0041]: a resync copies only what differs).

Keeps true: `run_digests` reads `count` blocks from `lba` at most `READ_BLOCKS` at a time (memory
bounded whatever is asked) and returns one BLAKE2b-128 digest per run of `per` blocks, the last run
possibly shorter; the same bytes give the same digests on every site, so equal digests mean equal
blocks (up to a 2^-128 collision). A read wholly inside a hole of a sparse image is not made: its
digests are those of zeros.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable

DIGEST_SIZE = 16
READ_BLOCKS = 1024  # blocks read at once while digesting


def digest(data: bytes | memoryview) -> bytes:
    """The digest of some bytes (BLAKE2b, 16 bytes)."""
    return hashlib.blake2b(data, digest_size=DIGEST_SIZE).digest()


def run_digests(read: Callable[[int, int], bytes], lba: int, count: int, per: int, *,
                holes: Callable[[int, int], list[tuple[int, int]]] | None = None,
                block_size: int = 0) -> list[bytes]:
    """One digest per run of `per` blocks of lba..lba+count-1, read through `read(lba, n)`.
    `holes(lba, n)`: where the source may hold data (a device's `data_ranges`); a read of
    `block_size`-byte blocks lying wholly outside them is not made: it is zeros."""
    if per < 1 or count < 0:
        raise ValueError(f"digests need a positive run length and a count >= 0, got per={per}, count={count}")
    step = max(per, READ_BLOCKS // per * per)
    out: list[bytes] = []
    for first in range(lba, lba + count, step):
        n = min(step, lba + count - first)
        if holes is not None and block_size and not holes(first, n):
            out.extend(_zero_digest(min(per, first + n - at) * block_size) for at in range(first, first + n, per))
            continue
        data = memoryview(read(first, n))
        size = len(data) // n if n else 0
        out.extend(digest(data[at:at + per * size]) for at in range(0, n * size, per * size))
    return out


@functools.cache
def _zero_digest(length: int) -> bytes:
    return digest(bytes(length))
