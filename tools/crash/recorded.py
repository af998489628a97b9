"""Power cuts of another process's files: run a module with every write and sync it makes to
chosen files streamed to a record file, then read that file back as a `FileRecorder` log.

`python -m tools.crash.recorded OUT [--watch SUFFIX]... -- MODULE [ARGS...]` runs MODULE as
`python -m MODULE ARGS...` would, in this process, with the recorder installed (default SUFFIX:
`.img`). A FUSE mount is such a process: its syscalls are out of reach of an in-process
`FileRecorder`, and a test kills it (the power cut) when it wants.

Keeps true:
- Every `os.pwrite`, `os.pwritev`, `os.write`, `os.ftruncate`, `os.posix_fallocate`, hole punch
  (`vstore.blocks.device.punch_hole`), `os.fdatasync`, `os.fsync`, `os.rename`/`os.replace` on a
  watched file (a path ending with a SUFFIX) is appended to OUT as one record, written with one
  `os.write` before the next call returns, so a SIGKILL loses no record of a call that returned.
  A write is recorded before it is made (a write a kill interrupted may or may not have landed,
  which the power-cut model allows anyway); a sync after it returned (only a completed sync counts).
- A file's content when it was first touched is recorded before its first write (`initial`).
- OUT is a sequence of `RECORD`s (one construct declaration: magic, version, CRC); `load` reads
  them into a `FileRecorder` (its ops split per `split` bytes, so a power cut may tear a write
  between blocks, as a disk does) and stops at a torn last record. Renames of watched files are
  recorded but not modelled: `load` refuses a log that has one.
- `sampled_states` bounds the crash states of one file: the ones `FileRecorder.states` yields
  (none of the unsynced writes, all, each prefix, each one left out) plus random subsets from a
  fixed seed, at most `limit` in all (the systematic ones first).
"""

from __future__ import annotations

import argparse
import os
import random
import runpy
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from construct import (
    Bytes,
    Checksum,
    Const,
    Enum,
    GreedyBytes,
    Int8ub,
    Int32ub,
    Int64ub,
    PascalString,
    Prefixed,
    RawCopy,
    Struct,
    this,
)

from tools.crash.files import FileRecorder, Op
from vstore.blocks import device as device_module
from vstore.blocks.codec import crc32

RECORD_MAGIC = b"FREC"
RECORD_VERSION = 1
KINDS = dict(initial=1, write=2, truncate=3, sync=4, rename=5)

RECORD = Prefixed(Int32ub, Struct(
    "body" / RawCopy(Struct(
        "magic" / Const(RECORD_MAGIC, Bytes(4)),
        "version" / Const(RECORD_VERSION, Int8ub),
        "kind" / Enum(Int8ub, **KINDS),
        "offset" / Int64ub,
        "path" / PascalString(Int32ub, "utf8"),
        "data" / Prefixed(Int64ub, GreedyBytes),
    )),
    "crc" / Checksum(Int32ub, crc32, this.body.data),
))


class StreamRecorder:
    """Installs wrappers of the os calls above that append a record to `out` for watched files."""

    def __init__(self, out: str | Path, watch: Callable[[str], bool]) -> None:
        self.fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        self.watch = watch
        self.seen: set[str] = set()
        self.lock = threading.Lock()
        self.real: dict[str, Callable[..., object]] = {}

    def _emit(self, kind: str, path: str, offset: int = 0, data: bytes = b"") -> None:
        raw = RECORD.build(dict(body=dict(value=dict(kind=kind, offset=offset, path=path, data=data))))
        view = memoryview(raw)
        while view:
            view = view[self.real["write"](self.fd, view):]  # type: ignore[operator]

    def _path(self, fd: int) -> str | None:
        """The watched file `fd` is open on (its initial content recorded the first time), or None."""
        try:
            path = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            return None
        if not self.watch(path):
            return None
        if path not in self.seen:
            self.seen.add(path)
            content = Path(path).read_bytes() if Path(path).is_file() else b""
            self._emit("initial", path, 0, content)
        return path

    def install(self) -> None:
        names = ("pwrite", "pwritev", "write", "ftruncate", "posix_fallocate", "fdatasync", "fsync",
                 "rename", "replace")
        self.real = {name: getattr(os, name) for name in names}
        self.real["punch_hole"] = device_module.punch_hole
        real, rec = self.real, self

        def pwrite(fd: int, data: bytes, offset: int) -> int:
            with rec.lock:
                path = rec._path(fd)
                if path is not None:
                    rec._emit("write", path, offset, bytes(data))
                return real["pwrite"](fd, data, offset)  # type: ignore[operator, no-any-return]

        def pwritev(fd: int, buffers: Sequence[bytes], offset: int, *flags: int) -> int:
            with rec.lock:
                path = rec._path(fd)
                if path is not None:
                    rec._emit("write", path, offset, b"".join(bytes(b) for b in buffers))
                return real["pwritev"](fd, buffers, offset, *flags)  # type: ignore[operator, no-any-return]

        def write(fd: int, data: bytes) -> int:
            with rec.lock:
                path = rec._path(fd)
                if path is not None:
                    rec._emit("write", path, os.lseek(fd, 0, os.SEEK_CUR), bytes(data))
                return real["write"](fd, data)  # type: ignore[operator, no-any-return]

        def ftruncate(fd: int, length: int) -> None:
            with rec.lock:
                path = rec._path(fd)
                if path is not None:
                    rec._emit("truncate", path, length)
                real["ftruncate"](fd, length)  # type: ignore[operator]

        def posix_fallocate(fd: int, offset: int, length: int) -> None:
            with rec.lock:
                path = rec._path(fd)
                if path is not None and offset + length > os.fstat(fd).st_size:  # grows the file
                    rec._emit("truncate", path, offset + length)
                real["posix_fallocate"](fd, offset, length)  # type: ignore[operator]

        def punch_hole(fd: int, offset: int, length: int) -> bool:
            with rec.lock:
                path = rec._path(fd)
                if path is not None:
                    rec._emit("write", path, offset, bytes(length))
                return real["punch_hole"](fd, offset, length)  # type: ignore[operator, no-any-return]

        def syncer(name: str) -> Callable[[int], None]:
            def sync(fd: int) -> None:
                real[name](fd)  # type: ignore[operator]
                with rec.lock:
                    path = rec._path(fd)
                    if path is not None:
                        rec._emit("sync", path)
            return sync

        def renamer(name: str) -> Callable[..., None]:
            def rename(src: str | Path, dst: str | Path, **kw: object) -> None:
                real[name](src, dst, **kw)  # type: ignore[operator]
                s, d = os.path.realpath(src), os.path.realpath(dst)
                if self.watch(s) or self.watch(d):
                    with rec.lock:
                        rec._emit("rename", d, 0, s.encode())
            return rename

        os.pwrite, os.pwritev, os.write, os.ftruncate = pwrite, pwritev, write, ftruncate  # type: ignore[assignment]
        os.posix_fallocate = posix_fallocate  # type: ignore[assignment]
        os.fdatasync, os.fsync = syncer("fdatasync"), syncer("fsync")  # type: ignore[assignment]
        os.rename, os.replace = renamer("rename"), renamer("replace")  # type: ignore[assignment]
        device_module.punch_hole = punch_hole  # type: ignore[assignment]


# -- reading a record file back ---------------------------------------------------------------------
def records(out: str | Path) -> Iterator[tuple[str, str, int, bytes]]:
    """(kind, path, offset, data) of each whole record of `out`, in order; a torn last one ends it."""
    raw = memoryview(Path(out).read_bytes())
    pos = 0
    while pos + 4 <= len(raw):
        size = int.from_bytes(raw[pos:pos + 4], "big")
        if pos + 4 + size > len(raw):
            return  # the writer was killed inside this record
        value = RECORD.parse(raw[pos:pos + 4 + size])
        body = value.body.value
        yield str(body.kind), body.path, body.offset, bytes(body.data)
        pos += 4 + size


def load(out: str | Path, *, split: int = 4096) -> tuple[FileRecorder, list[int]]:
    """The log of `out` as a `FileRecorder` (writes split into `split`-byte pieces), and for each
    record of `out` the length of the recorder's log once that record is in it (so a test that
    counted records at some moment knows the matching point of the log)."""
    rec = FileRecorder(watch=lambda path: True)
    ends: list[int] = []
    for kind, path, offset, data in records(out):
        if kind == "initial":
            rec.initial.setdefault(path, data)
        elif kind == "write":
            first = offset - offset % split
            for start in range(first, offset + len(data), split):
                lo, hi = max(start, offset), min(start + split, offset + len(data))
                rec.ops.append(Op("write", path, lo, data[lo - offset:hi - offset]))
        elif kind == "truncate":
            rec.ops.append(Op("truncate", path, offset))
        elif kind == "sync":
            rec.ops.append(Op("sync", path))
        else:
            raise ValueError(f"{out}: a watched file was renamed ({data.decode()} -> {path}); "
                             "renames are not modelled")
        ends.append(len(rec.ops))
    return rec, ends


def count(out: str | Path) -> int:
    """How many whole records `out` holds now."""
    return sum(1 for _ in records(out))


def sampled_states(rec: FileRecorder, path: str, point: int, *, limit: int = 64,
                   seed: int = 0) -> Iterator[bytes]:
    """At most `limit` distinct contents a power cut at `point` may leave `path` with: those of
    `rec.states` first, then the durable writes plus random subsets of the unsynced ones (in log
    order), drawn with `seed`."""
    seen: set[bytes] = set()
    for data in rec.states(path, point):
        if len(seen) >= limit:
            return
        seen.add(data)
        yield data
    base, late = rec.durable(path, point), rec.unsynced(path, point)
    rng = random.Random(seed)
    for _ in range(4 * limit):
        if len(seen) >= limit or len(late) < 2:
            return
        chosen = [op for op in late if rng.random() < 0.5]
        data = rec.content(path, base + chosen)
        if data not in seen:
            seen.add(data)
            yield data


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if "--" not in args:
        raise SystemExit("usage: python -m tools.crash.recorded OUT [--watch SUFFIX]... -- MODULE [ARGS...]")
    cut = args.index("--")
    ap = argparse.ArgumentParser(prog="python -m tools.crash.recorded")
    ap.add_argument("out", type=Path)
    ap.add_argument("--watch", action="append", default=None, help="record files whose path ends so")
    opts = ap.parse_args(args[:cut])
    rest = args[cut + 1:]
    if not rest:
        raise SystemExit("name the module to run after --")
    suffixes = tuple(opts.watch or [".img"])
    StreamRecorder(opts.out, lambda path: path.endswith(suffixes)).install()
    sys.argv = [rest[0], *rest[1:]]
    runpy.run_module(rest[0], run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
