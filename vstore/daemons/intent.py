"""The write-intent record of the site running the application: a write in progress at a kill is
either fully present or absent (DESIGN invariant 5, "Process model").

An application write touches several places one after another: C (sync copy), the entry (spool,
hence D) and A (provider mode), or A, C, then B and its entry (mirror mode). A process killed
between two of them would leave the write on some copies and not on others, for good: A and D
would differ with nothing saying so. Real volume managers close that window with a write-intent
bitmap (md); this is its one-slot form, since a site daemon runs one application write at a time.

Keeps true:
- Before an application write starts, the record names its virtual volume and block range
  (`mark`); after a clean stop it says "idle" (`clear`). It is one fixed-size construct record
  (magic, version, CRC) rewritten in place and never synced on its own: a killed process leaves
  it in the page cache, which is what this record is for. The write path packs it with `struct`
  (`pack_intent`, the same bytes as the declaration: tested). (A power cut loses what was not
  flushed anyway; an application that needs a write to survive one flushes or writes FUA.)
- At start after an unclean stop the daemon re-drives the named range (`redo`): it reads the
  range as the application sees it now and writes it back through the normal write path, so C,
  the entry (hence D) and every mirror member end up equal: the in-doubt write is then either
  present everywhere or absent everywhere. Re-driving a write that had completed is harmless
  (the same bytes again).
"""

from __future__ import annotations

import logging
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from construct import Checksum, Const, Flag, Int16ub, Int32ub, Int64ub, PaddedString, RawCopy, Struct, this

from vstore.blocks.codec import check_version, crc32, create_file, parse_checked
from vstore.blocks.errors import FormatError
from vstore.lab.system import System

log = logging.getLogger("vstore.intent")

INTENT_MAGIC = b"TCWI"
INTENT_VERSION = 1
INTENT_FILE = "write-intent"

_INTENT = Struct(
    "body" / RawCopy(Struct(
        "magic" / Const(INTENT_MAGIC),
        "version" / Int16ub,
        "active" / Flag,
        "volume" / PaddedString(64, "utf8"),
        "lba" / Int64ub,
        "count" / Int32ub,
    )),
    "crc" / Checksum(Int32ub, crc32, this.body.data),
)
RECORD_SIZE = _INTENT.sizeof()
_BODY = struct.Struct(">4sHB64sQI")  # `_INTENT`'s body, packed on the write path (tests check they agree)
_CRC = struct.Struct(">I")


def pack_intent(active: bool, volume: str, lba: int, count: int) -> bytes:
    """`_INTENT.build` of one record, with `struct` (a name longer than the field: construct's error)."""
    name = volume.encode()
    if len(name) > 64 or not 0 <= lba < 1 << 64 or not 0 <= count < 1 << 32:
        return _INTENT.build(dict(body=dict(value=dict(version=INTENT_VERSION, active=active, volume=volume,
                                                       lba=lba, count=count))))
    body = _BODY.pack(INTENT_MAGIC, INTENT_VERSION, 1 if active else 0, name, lba, count)
    return body + _CRC.pack(crc32(body))


@dataclass(frozen=True)
class Intent:
    volume: str
    lba: int
    count: int


class WriteIntent:
    """The one-slot write-intent record in a site directory."""

    def __init__(self, site_dir: Path) -> None:
        self.path = site_dir / INTENT_FILE
        self._fd = create_file(self.path, os.O_RDWR | os.O_CREAT)

    def _put(self, active: bool, volume: str, lba: int, count: int) -> None:
        os.pwrite(self._fd, pack_intent(active, volume, lba, count), 0)

    def mark(self, volume: str, lba: int, count: int) -> None:
        """Before an application write of `count` blocks at `lba` of virtual volume `volume`."""
        self._put(True, volume, lba, count)

    def clear(self) -> None:
        self._put(False, "", 0, 0)

    def pending(self) -> Intent | None:
        """The write that was in progress when the process last stopped, if it did not stop cleanly.
        FormatError when the record is damaged (the range of the in-doubt write is then unknown)."""
        raw = os.pread(self._fd, RECORD_SIZE, 0)
        if not raw:
            return None
        where = f"write-intent record {self.path}"
        if len(raw) < RECORD_SIZE:
            raise FormatError(f"{where}: truncated ({len(raw)} of {RECORD_SIZE} bytes)")
        parsed = parse_checked(_INTENT, raw, where).body.value
        check_version(parsed.version, INTENT_VERSION, where)
        return Intent(parsed.volume, parsed.lba, parsed.count) if parsed.active else None

    def redo(self, system: System, site: str, extents: list[Intent] | None = None) -> None:
        """After an unclean stop of `site`'s daemon: re-drive the write that was in progress, and
        the `extents` a power cut may have left different (`ActivityLog.in_doubt`), through
        `system`, so each is the same on every copy, then clear the record. Raises (and keeps the
        record) while that fails. A damaged record, or a site that no longer runs the application
        (the failover settled those writes), is logged and cleared."""
        try:
            intent = self.pending()
        except FormatError as exc:
            log.error("%s; cannot tell which write was in progress at the last crash: run `vstore verify`", exc)
            intent = None
        todo = ([intent] if intent is not None else []) + list(extents or [])
        if not todo:
            self.clear()
            return
        if system.active_site != site:  # a stale primary
            log.warning("not re-driving %d write range(s) in doubt since the last crash: the application now runs "
                        "at %s", len(todo), system.active_site)
            self.clear()
            return
        for doubt in todo:
            dev = system.device(doubt.volume)
            count = min(doubt.count, dev.num_blocks - doubt.lba)
            if count > 0:
                dev.write(doubt.lba, dev.read(doubt.lba, count))
            dev.flush()
            log.warning("re-drove blocks %d..%d of volume %s (in doubt since the last crash) to every copy",
                        doubt.lba, doubt.lba + count - 1, doubt.volume)
        system.save()
        self.clear()

    def close(self) -> None:
        os.close(self._fd)
