"""The activity log of the site running the application: which extents a power cut may have left
different on A, C and the spool (DESIGN invariant 5, "Process model"; the activity log of DRBD,
the write-intent bitmap of md).

Writes are acknowledged from page caches and made durable only by a flush (vstore.blocks.device).
A power cut at the primary loses some unflushed writes on A and some unflushed entries in the
spool, not necessarily the same ones, while C (another site) kept all of them: the copies would
differ with nothing saying so. The one-slot write-intent record does not help there: it is in
the same page cache.

Keeps true:
- Before an application write, every extent (`EXTENT_BLOCKS` blocks of a virtual volume) it
  touches is in the log's active set, and the record of that set is durable (pwrite + fdatasync)
  before the write is issued. Adding an extent is the only time the record is written, so a
  working set that fits costs nothing per write.
- The set holds at most `SLOTS` extents. An extent written since the last completed flush of its
  volume is dirty and stays; a clean one may be evicted to make room; when every slot is dirty the
  volume is flushed first (all of them become clean).
- The record names the boot it was written in (`vstore.blocks.boot`). At start, a record of
  another boot means a power cut (or a reboot) since: `in_doubt` returns its extents, which the
  daemon re-drives from A through the write path (`WriteIntent.redo`), so every copy ends equal;
  a record of this boot (the process was killed; the page cache kept everything) needs nothing.
- One construct declaration (magic, version, CRC); a damaged record counts as "every extent in
  doubt is unknown", which is logged and answered with a full verify.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

from construct import Array, Checksum, Const, Int16ub, Int32ub, Int64ub, PaddedString, RawCopy, Struct, this

from vstore.blocks.boot import boot_id
from vstore.blocks.codec import check_version, crc32, create_file, parse_checked
from vstore.blocks.errors import FormatError

log = logging.getLogger("vstore.activity")

ACTIVITY_MAGIC = b"TCAL"
ACTIVITY_VERSION = 1
ACTIVITY_FILE = "activity"
EXTENT_BLOCKS = 1024  # 4 MiB of 4 KiB blocks
SLOTS = 256

_ACTIVITY = Struct(
    "body" / RawCopy(Struct(
        "magic" / Const(ACTIVITY_MAGIC),
        "version" / Int16ub,
        "boot_id" / PaddedString(64, "ascii"),
        "count" / Int16ub,
        "extents" / Array(this.count, Struct("volume" / PaddedString(32, "utf8"), "extent" / Int64ub)),
    )),
    "crc" / Checksum(Int32ub, crc32, this.body.data),
)
MAX_RECORD = _ACTIVITY.build(dict(body=dict(value=dict(
    version=ACTIVITY_VERSION, boot_id="", count=SLOTS, extents=[dict(volume="", extent=0)] * SLOTS))))

Extent = tuple[str, int]  # (virtual volume, extent number)


class ActivityLog:
    """The active extents of the application's volumes, in `SITE/activity`."""

    def __init__(self, site_dir: Path, *, durable: bool, slots: int = SLOTS) -> None:
        self.path = site_dir / ACTIVITY_FILE
        self.durable = durable
        self.slots = slots
        self._fd = create_file(self.path, os.O_RDWR | os.O_CREAT)
        self.active: set[Extent] = set()  # what the record on disk names (after `start`)
        self.dirty: set[Extent] = set()  # written since the last flush of their volume
        self.stores = 0  # records written (the benchmarks count them)

    def in_doubt(self) -> list[tuple[str, int, int]] | None:
        """(volume, first block, blocks) of every extent a power cut since the record was written
        may have left different; [] when the machine has not booted since. None: the record is
        damaged, so what is in doubt is unknown."""
        raw = os.pread(self._fd, len(MAX_RECORD), 0)
        if not raw:
            return []
        where = f"activity log {self.path}"
        try:
            body = parse_checked(_ACTIVITY, raw, where).body.value
            check_version(body.version, ACTIVITY_VERSION, where)
        except FormatError as exc:
            log.error("%s", exc)
            return None
        if body.boot_id == boot_id()[:64]:
            return []
        return [(e.volume, e.extent * EXTENT_BLOCKS, EXTENT_BLOCKS) for e in body.extents]

    def start(self) -> None:
        """A fresh, empty record of this boot (after the in-doubt extents were settled)."""
        self.active, self.dirty = set(), set()
        self._store()

    def before_write(self, volume: str, lba: int, count: int, flush: Callable[[], None]) -> None:
        """Make the extents of this write active, durably, before it is issued; `flush` flushes
        `volume` (every slot dirty: the only way to free one)."""
        touched = {(volume, e) for e in range(lba // EXTENT_BLOCKS, (lba + count - 1) // EXTENT_BLOCKS + 1)}
        new = touched - self.active
        if new:
            room = self.slots - len(self.active)
            if room < len(new):
                clean = sorted(self.active - self.dirty)
                if len(clean) < len(new) - room:
                    flush()
                    self.flushed(volume)
                    clean = sorted(self.active - self.dirty)
                self.active -= set(clean[:len(new) - room])
            self.active |= new
            self._store()
        self.dirty |= touched

    def flushed(self, volume: str) -> None:
        """Every write to `volume` before now is durable on every copy: its extents are clean."""
        self.dirty = {e for e in self.dirty if e[0] != volume}

    def _store(self) -> None:
        extents = [dict(volume=v, extent=e) for v, e in sorted(self.active)]
        raw = _ACTIVITY.build(dict(body=dict(value=dict(version=ACTIVITY_VERSION, boot_id=boot_id()[:64],
                                                        count=len(extents), extents=extents))))
        os.pwrite(self._fd, raw, 0)
        if self.durable:
            os.fdatasync(self._fd)
        self.stores += 1

    def close(self) -> None:
        os.close(self._fd)
