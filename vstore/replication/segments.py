"""The spool's segment files: their names, their listing, and a read-only reader that follows the
appending `EntryLog` (SPEC §4 [0044]; DESIGN invariant 2).

Keeps true:
- A segment is named by the sequence number of its first entry (`seg-<20 digits>.log`); the
  segments of a spool, in name order, hold consecutive entries.
- `SpoolReader` never writes: it reads entries after+1..upto in order, each checked against its
  CRC (a damaged spool is never shipped), and says so when an entry it was asked for is in no
  segment.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from vstore.blocks.errors import FormatError
from vstore.replication.entries import ENTRY_HEADER_SIZE, Entry, decode_entry, entry_size, parse_entry_header

READ_BYTES = 16 << 20  # what one read returns at most (about)

_SEGMENT_RE = re.compile(r"^seg-(\d{20})\.log$")


def segment_files(spool_dir: Path) -> list[tuple[int, Path]]:
    """(first sequence number, path) of every segment file of a spool, in order."""
    found = []
    for path in spool_dir.iterdir():
        m = _SEGMENT_RE.match(path.name)
        if m:
            found.append((int(m.group(1)), path))
    return sorted(found)


def segment_name(first_seq: int) -> str:
    return f"seg-{first_seq:020d}.log"


class SpoolReader:
    """Reads entries from the spool's segment files, read-only, following the appending daemon."""

    def __init__(self, spool_dir: Path) -> None:
        self.spool_dir = spool_dir
        self._fd: int | None = None
        self._first = 0  # first seq of the open segment
        self._offset = 0
        self._next = 0  # the seq expected at _offset

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._next = 0

    def _open(self, first_seq: int, path: Path) -> None:
        self.close()
        self._fd = os.open(path, os.O_RDONLY)
        self._first, self._offset, self._next = first_seq, 0, first_seq

    def _seek(self, seq: int) -> None:
        """Position at entry `seq` (scanning its segment's headers)."""
        candidates = [(first, path) for first, path in segment_files(self.spool_dir) if first <= seq]
        if not candidates:
            raise FormatError(f"entry {seq} is not in the spool {self.spool_dir} (already trimmed?)")
        self._open(*candidates[-1])
        while self._next < seq:
            if self._skip_one() is None:
                raise FormatError(f"entry {seq} is not in the spool {self.spool_dir}")

    def _header_at(self) -> Any | None:
        assert self._fd is not None
        raw = os.pread(self._fd, ENTRY_HEADER_SIZE, self._offset)
        if len(raw) < ENTRY_HEADER_SIZE:
            return None
        return parse_entry_header(raw, f"{self.spool_dir} segment {self._first} offset {self._offset}")

    def _skip_one(self) -> int | None:
        header = self._header_at()
        if header is None:
            return None
        self._offset += entry_size(header.block_count, header.block_size)
        self._next += 1
        return header.seq

    def _read_one(self) -> tuple[Entry, bytes] | None:
        assert self._fd is not None
        header = self._header_at()
        if header is None:
            return None
        length = entry_size(header.block_count, header.block_size)
        raw = os.pread(self._fd, length, self._offset)
        entry, _ = decode_entry(raw)  # checks the entry's CRC: a damaged spool is never shipped
        if entry.seq != self._next:
            raise FormatError(f"{self.spool_dir}: entry {entry.seq} found where {self._next} was expected")
        self._offset += length
        self._next += 1
        return entry, raw

    def read(self, after: int, upto: int, max_bytes: int = READ_BYTES) -> list[tuple[Entry, bytes]]:
        """Entries after+1 .. upto (at most about `max_bytes`), in order, each with its encoded bytes."""
        out: list[tuple[Entry, bytes]] = []
        size = 0
        if after >= upto:
            return out
        if self._fd is None or self._next != after + 1:
            self._seek(after + 1)
        while self._next <= upto and size < max_bytes:
            found = self._read_one()
            if found is None:  # the rest is in the next segment
                path = self.spool_dir / segment_name(self._next)
                if not path.is_file():
                    raise FormatError(f"{self.spool_dir}: acknowledged entry {self._next} is in no segment")
                self._open(self._next, path)
                continue
            out.append(found)
            size += len(found[1])
        return out
