"""The entry log's files as their one writer (`vstore.replication.spool.EntryLog`) holds them
(SPEC §4 [0044]): a segment file with its sequence range, size and open descriptor; where an
unconfirmed entry lives; what an append changed, so that a failed append is undone; and the
write helpers the log uses.

Keeps true: a `Segment`'s `size` is the length of its valid entries on disk, `last_seq` the
highest sequence number it may hold; an `EntryLoc` never changes once made; `write_all` writes
every byte or raises.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from vstore.replication.segments import Found


@dataclass(eq=False)
class Segment:
    path: Path
    first_seq: int
    last_seq: int  # the highest sequence number it may hold
    size: int
    fd: int | None = None


@dataclass(slots=True)
class EntryLoc(Found):
    """Where an unconfirmed entry lives (a valid entry of `segment`), and what it touches."""

    segment: Segment


@dataclass(frozen=True)
class Touch:
    """A segment written by the current append, and how to undo that."""

    segment: Segment
    size_before: int
    last_before: int
    new: bool


def write_all(fd: int, data: bytes) -> None:
    n = os.write(fd, data)
    if n != len(data):  # a short write (rare): continue after what went out
        view = memoryview(data)[n:]
        while view:
            view = view[os.write(fd, view):]


def close_fd(seg: Segment) -> None:
    if seg.fd is not None:
        os.close(seg.fd)
        seg.fd = None
