"""Power cuts at the file level: every write and sync a process makes to chosen files, and the
states a power cut can leave those files in (the method of ALICE / CrashMonkey, for files).

Keeps true:
- While a `FileRecorder` is active, every `os.pwrite`, `os.write` (at the file's end when it is
  open O_APPEND), `os.ftruncate`, `os.fdatasync` and `os.fsync` on a file whose path `watch`
  accepts is recorded in order, with the file's content when recording began; `mark(label)` puts
  a named point in the log (a flush that returned, say). The calls themselves still happen.
- A power cut at a point of the log leaves each file with every write it had synced before that
  point, plus any subset of the writes after its last sync (a disk's cache persists them in any
  order, or not at all); `states(point)` yields such contents: none of the unsynced writes, all
  of them, each prefix, and each one left out.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Op:
    kind: str  # "write", "truncate", "sync", "mark"
    path: str
    offset: int = 0
    data: bytes = b""
    label: str = ""


@dataclass
class FileRecorder:
    """Record writes and syncs of the files `watch(path)` accepts (use as a context manager)."""

    watch: Callable[[str], bool]
    ops: list[Op] = field(default_factory=list)
    initial: dict[str, bytes] = field(default_factory=dict)

    def __enter__(self) -> FileRecorder:
        self._real = {name: getattr(os, name) for name in ("pwrite", "write", "ftruncate", "fdatasync", "fsync")}
        rec = self

        def path_of(fd: int) -> str | None:
            try:
                path = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                return None
            if not rec.watch(path):
                return None
            if path not in rec.initial:
                rec.initial[path] = Path(path).read_bytes() if Path(path).is_file() else b""
            return path

        def pwrite(fd: int, data: bytes, offset: int) -> int:
            path = path_of(fd)
            n = rec._real["pwrite"](fd, data, offset)
            if path is not None:
                rec.ops.append(Op("write", path, offset, bytes(memoryview(data)[:n])))
            return n

        def write(fd: int, data: bytes) -> int:
            path = path_of(fd)
            if path is None:
                return rec._real["write"](fd, data)
            append = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_APPEND
            offset = os.fstat(fd).st_size if append else os.lseek(fd, 0, os.SEEK_CUR)
            n = rec._real["write"](fd, data)
            rec.ops.append(Op("write", path, offset, bytes(memoryview(data)[:n])))
            return n

        def ftruncate(fd: int, length: int) -> None:
            path = path_of(fd)
            rec._real["ftruncate"](fd, length)
            if path is not None:
                rec.ops.append(Op("truncate", path, length))

        def syncer(name: str) -> Callable[[int], None]:
            def sync(fd: int) -> None:
                path = path_of(fd)
                rec._real[name](fd)
                if path is not None:
                    rec.ops.append(Op("sync", path))
            return sync

        os.pwrite, os.write, os.ftruncate = pwrite, write, ftruncate  # type: ignore[assignment]
        os.fdatasync, os.fsync = syncer("fdatasync"), syncer("fsync")  # type: ignore[assignment]
        return self

    def __exit__(self, *exc: object) -> None:
        for name, fn in self._real.items():
            setattr(os, name, fn)

    def mark(self, label: str) -> int:
        """A named point of the log (its index)."""
        self.ops.append(Op("mark", "", label=label))
        return len(self.ops)

    # -- what the log says ------------------------------------------------------------------------
    def files(self) -> list[str]:
        return sorted({op.path for op in self.ops if op.path})

    def syncs(self, start: int = 0, end: int | None = None) -> list[str]:
        return [op.path for op in self.ops[start:end] if op.kind == "sync"]

    def writes(self, start: int = 0, end: int | None = None) -> list[Op]:
        return [op for op in self.ops[start:end] if op.kind in ("write", "truncate")]

    def unsynced(self, path: str, point: int) -> list[Op]:
        """The writes to `path` before `point` that no sync of it before `point` covers."""
        pending: list[Op] = []
        for op in self.ops[:point]:
            if op.path != path:
                continue
            if op.kind == "sync":
                pending = []
            elif op.kind in ("write", "truncate"):
                pending.append(op)
        return pending

    # -- power-cut states --------------------------------------------------------------------------
    def content(self, path: str, ops: list[Op]) -> bytes:
        buf = bytearray(self.initial.get(path, b""))
        for op in ops:
            if op.kind == "truncate":
                del buf[op.offset:]
                buf.extend(bytes(max(0, op.offset - len(buf))))
            else:
                if len(buf) < op.offset:
                    buf.extend(bytes(op.offset - len(buf)))
                buf[op.offset:op.offset + len(op.data)] = op.data
        return bytes(buf)

    def durable(self, path: str, point: int) -> list[Op]:
        """The writes to `path` a sync before `point` made durable."""
        out: list[Op] = []
        pending: list[Op] = []
        for op in self.ops[:point]:
            if op.path != path:
                continue
            if op.kind == "sync":
                out += pending
                pending = []
            elif op.kind in ("write", "truncate"):
                pending.append(op)
        return out

    def states(self, path: str, point: int) -> Iterator[bytes]:
        """Contents a power cut at `point` may leave `path` with (distinct ones only)."""
        base = self.durable(path, point)
        late = self.unsynced(path, point)
        choices = [late[:k] for k in range(len(late) + 1)]
        choices += [late[:i] + late[i + 1:] for i in range(len(late))]
        seen: set[bytes] = set()
        for chosen in choices:
            data = self.content(path, base + chosen)
            if data not in seen:
                seen.add(data)
                yield data
