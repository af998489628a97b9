"""Copy checkpoints: a long copy that is stopped continues where it stopped (DESIGN "Procedures";
SPEC §3 [0036]-[0042] Initial-Copying and Duplex-Pending).

Keeps true:
- While a copy into a volume runs, `LAB/run/copies/SITE-VOLUME.json` says what is being copied
  (source, target, the block ranges, the command that continues it) and how many blocks of those
  ranges, in order, are already on the target. It is saved at most every `SAVE_EVERY_S` seconds
  and when the copy is stopped (Ctrl-C, SIGTERM, an error). When the copy ends it is kept, marked
  complete, until the procedure that made it has saved the lab's state (`clear_finished`, called by
  `System.save`): a procedure run again after a stop skips the copies it had already finished.
- A checkpoint is used only when everything it describes still holds: the same source, target and
  ranges, and neither image changed since it was saved (size and modification time of both
  files). Otherwise the copy starts from its first block again, and says why. So a resumed copy
  never skips a block that differs.
- `unfinished(lab)` lists the checkpoints of copies that did not end, so status can say which
  target is not a copy of its source yet.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from vstore.blocks.codec import load_json, make_dir, save_json_atomic
from vstore.blocks.errors import FormatError

log = logging.getLogger("vstore.copies")

FORMAT = "tricopy-copy-checkpoint"
VERSION = 1
COPIES_DIR = Path("run") / "copies"
SAVE_EVERY_S = 1.0

Ranges = list[tuple[int, int]]


def stamp(path: Path) -> list[int]:
    """What changes when an image is written: its size and modification time."""
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def skip_blocks(ranges: Ranges, done: int) -> tuple[Ranges, Ranges]:
    """(the first `done` blocks of `ranges`, the rest), both as ranges in order."""
    head: Ranges = []
    rest: Ranges = []
    for first, count in ranges:
        take = min(count, max(0, done))
        if take:
            head.append((first, take))
        if count > take:
            rest.append((first + take, count - take))
        done -= take
    return head, rest


@dataclass
class CopyCheckpoint:
    """One copy's progress (see the module docstring)."""

    path: Path
    source: str
    target: str
    ranges: Ranges
    command: str
    images: tuple[Path, Path]
    done: int = 0
    resumed_from: int = 0
    _saved_at: float = field(default=0.0, repr=False)

    @classmethod
    def start(cls, lab: Path, source: str, target: str, ranges: Ranges, command: str,
              images: tuple[Path, Path]) -> CopyCheckpoint:
        """The checkpoint of this copy: resumed from what a stopped run saved, when that still holds."""
        path = Path(lab) / COPIES_DIR / (target.replace(":", "-") + ".json")
        cp = cls(path, source, target, [(int(f), int(n)) for f, n in ranges], command, images)
        done, why = cp._saved_done()
        if done:
            cp.done = cp.resumed_from = done
            log.warning("%s -> %s: continuing a stopped copy at block %d of %d", source, target, done, cp.total)
        elif why:
            log.warning("%s -> %s: a stopped copy cannot be continued (%s); copying from the start",
                        source, target, why)
        return cp

    @property
    def total(self) -> int:
        return sum(n for _, n in self.ranges)

    def copied_ranges(self) -> Ranges:
        return skip_blocks(self.ranges, self.done)[0]

    def remaining(self) -> Ranges:
        return skip_blocks(self.ranges, self.done)[1]

    def _saved_done(self) -> tuple[int, str]:
        try:
            doc = load_json(self.path)
        except FileNotFoundError:
            return 0, ""
        except FormatError as exc:
            return 0, str(exc)
        if doc.get("format") != FORMAT or doc.get("version") != VERSION:
            return 0, f"{self.path} is not a copy checkpoint of this version"
        if (doc.get("source"), doc.get("target")) != (self.source, self.target):
            return 0, f"it copied {doc.get('source')} -> {doc.get('target')}"
        if [tuple(r) for r in doc.get("ranges", [])] != self.ranges:
            return 0, "it copied other block ranges"
        if doc.get("stamps") != [stamp(p) for p in self.images]:
            return 0, "a volume was written since it stopped"
        done = doc.get("done")
        if not isinstance(done, int) or not 0 <= done <= self.total:
            return 0, f"{self.path} records an impossible position {done!r}"
        return done, ""

    def progress(self, advance: Callable[[int], None]) -> Callable[[int], None]:
        """`advance`, also counting the blocks done and saving now and then."""
        if self.done:
            advance(self.done)

        def counted(n: int) -> None:
            self.done += n
            advance(n)
            if time.monotonic() - self._saved_at >= SAVE_EVERY_S:
                self.save()

        return counted

    def save(self) -> None:
        """Record the position durably, with the images' stamps as they are now."""
        for image in self.images:
            fd = os.open(image, os.O_RDONLY)
            try:
                os.fsync(fd)  # the blocks counted as done are on disk before the record says so
            finally:
                os.close(fd)
        make_dir(self.path.parent, parents=True, exist_ok=True)
        save_json_atomic(self.path, {
            "format": FORMAT, "version": VERSION, "source": self.source, "target": self.target,
            "ranges": [list(r) for r in self.ranges], "done": self.done, "total": self.total,
            "command": self.command, "stamps": [stamp(p) for p in self.images], "time": time.time(),
        }, durable=True)
        self._saved_at = time.monotonic()

    def finish(self) -> None:
        """The copy ended: every block is on the target."""
        self.done = self.total
        self.save()


def unfinished(lab: Path) -> list[dict]:
    """The checkpoints stopped copies left: `{"source", "target", "done", "total", "command"}` each."""
    found = []
    folder = Path(lab) / COPIES_DIR
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            doc = load_json(path)
        except FormatError as exc:
            log.warning("%s", exc)
            continue
        if doc.get("format") == FORMAT and doc.get("done") != doc.get("total"):
            found.append({k: doc.get(k) for k in ("source", "target", "done", "total", "command")})
    return found


def clear_finished(lab: Path) -> None:
    """Delete the checkpoints of copies that ended (their procedure's result is now saved)."""
    folder = Path(lab) / COPIES_DIR
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            doc = load_json(path)
        except FormatError:
            continue
        if doc.get("format") == FORMAT and doc.get("done") == doc.get("total"):
            path.unlink(missing_ok=True)
