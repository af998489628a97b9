"""Persisted state: atomic JSON files and checked parsing of construct formats.

Keeps true:
- `save_json_atomic` replaces a file all-or-nothing: the new content goes to a temporary file in
  the same directory, is fsynced, renamed over the old name and the directory is fsynced, so a
  crash at any moment leaves either the old or the new document, never a mix (DESIGN invariant 5;
  used for each site's `state.json`, the spool's confirmed sequence and the receive journal).
- `load_json` raises `FileNotFoundError` for a missing file and `FormatError` naming the file for
  anything that is not a JSON object; `parse_json_object` is the same rule for bytes from elsewhere
  (a network message). Neither lets another exception out: nesting too deep to decode and integers
  too long to convert are bad bytes like any other.
- `parse_checked` is the one door through which untrusted bytes enter a construct format: every
  construct failure (bad magic, CRC, truncation...) becomes a one-sentence `FormatError`.
- Private by default (a lab's replicas and unshipped entries; DESIGN "user surface"): every file
  the writers here create is 0600 and every directory 0700, whatever the umask, unless the
  directory it goes into is shared with its group (group rwx, nothing for others: a lab made with
  `lab init --group`); there files are 0660 and directories 0770 with the set-group-id bit, so
  later files keep the lab's group. `file_mode`/`dir_mode` are that one rule; `create_file` and
  `make_dir` apply it for any writer (an image, a lock file, a spool segment, a log, a pid file),
  `write_file_atomic` for replaced files.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import tempfile
import zlib
from pathlib import Path
from typing import Any

import construct

from vstore.blocks.errors import FormatError

PRIVATE_FILE = 0o600
PRIVATE_DIR = 0o700
GROUP_FILE = 0o660
GROUP_DIR = 0o2770  # rwx for owner and group, set-group-id: what is created inside keeps the group


def group_shared(directory: str | Path) -> bool:
    """A directory shared with its group and nobody else (group rwx, no bits for others)."""
    try:
        mode = os.stat(directory).st_mode
    except OSError:
        return False
    return mode & 0o070 == 0o070 and not mode & 0o007


def file_mode(directory: str | Path) -> int:
    """The mode of a new file in `directory`: 0660 where the directory is group-shared, else 0600."""
    return GROUP_FILE if group_shared(directory) else PRIVATE_FILE


def dir_mode(parent: str | Path) -> int:
    """The mode of a new directory in `parent`: 02770 where the parent is group-shared, else 0700."""
    return GROUP_DIR if group_shared(parent) else PRIVATE_DIR


def _ensure_mode(fd: int, mode: int, group_of: str | Path) -> None:
    """Give a file or directory we created `mode` (the umask may have narrowed or widened it) and,
    in a group-shared directory, that directory's group."""
    st = os.fstat(fd)
    if st.st_uid != os.geteuid():
        return  # somebody else's: left as its owner made it
    with contextlib.suppress(OSError):
        if mode & 0o070:
            parent_gid = os.stat(group_of).st_gid
            if st.st_gid != parent_gid:
                os.fchown(fd, -1, parent_gid)
        if stat.S_IMODE(st.st_mode) != mode:
            os.fchmod(fd, mode)


def create_file(path: str | Path, flags: int = os.O_WRONLY | os.O_CREAT | os.O_EXCL) -> int:
    """`os.open(path, flags)` for a writer that may create the file: a new file (or one of ours
    found wider or narrower) gets `file_mode` of its directory, whatever the umask. Returns the fd."""
    path = Path(path)
    mode = file_mode(path.parent)
    fd = os.open(path, flags | os.O_CLOEXEC, mode)
    if flags & os.O_CREAT:
        try:
            _ensure_mode(fd, mode, path.parent)
        except BaseException:
            os.close(fd)
            raise
    return fd


def make_dir(path: str | Path, *, parents: bool = False, exist_ok: bool = False) -> None:
    """mkdir with `dir_mode` of its parent, whatever the umask (missing parents, with `parents`,
    are made the same way; an existing directory of ours, with `exist_ok`, is given that mode)."""
    path = Path(path)
    if parents and not path.parent.exists():
        make_dir(path.parent, parents=True, exist_ok=True)
    mode = dir_mode(path.parent)
    try:
        os.mkdir(path, mode)
    except FileExistsError:
        if not exist_ok or not path.is_dir():
            raise
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        _ensure_mode(fd, mode, path.parent)
    finally:
        os.close(fd)


def fsync_path(path: Path) -> None:
    """fsync a file (or a directory) by its path."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """fsync a directory so that a rename or a new file inside it survives a crash."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file_atomic(path: Path, data: bytes, *, durable: bool = True) -> None:
    """Replace `path` with `data` atomically (temp file in the same dir, fsync, rename, fsync dir);
    the new file has `file_mode` of its directory."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            _ensure_mode(f.fileno(), file_mode(path.parent), path.parent)
            f.write(data)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)


def remove_stale_temps(directory: Path) -> None:
    """Delete temporary files left by a crash inside `write_file_atomic`."""
    for tmp in Path(directory).glob(".*.tmp"):
        tmp.unlink(missing_ok=True)


def save_json_atomic(path: Path, data: dict, *, durable: bool = True) -> None:
    """Write `data` as JSON to `path` so that a crash leaves the old or the new file, never a mix."""
    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    write_file_atomic(Path(path), text.encode(), durable=durable)


def _decode_json(raw: bytes) -> Any:
    """`json.loads`, with every way bytes can fail to be JSON as one ValueError."""
    try:
        return json.loads(raw)
    except RecursionError:
        raise ValueError("nested too deeply") from None
    # json.JSONDecodeError, UnicodeDecodeError and "Exceeds the limit ... for integer string
    # conversion" are ValueErrors themselves


def load_json(path: Path) -> dict:
    """Read a JSON object from `path`; FileNotFoundError if missing, FormatError if not valid."""
    path = Path(path)
    text = path.read_bytes()
    try:
        data = _decode_json(text)
    except ValueError as e:
        raise FormatError(
            f"{path} is not valid JSON ({e}); restore it from a backup or re-create the site state"
        ) from None
    if not isinstance(data, dict):
        raise FormatError(f"{path} holds a JSON {type(data).__name__}, not an object; restore it from a backup")
    return data


def parse_json_object(raw: bytes, what: str) -> dict:
    """The JSON object in `raw`; FormatError("<what>: ...") for anything else."""
    try:
        value = _decode_json(raw)
    except ValueError as e:
        raise FormatError(f"{what}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise FormatError(f"{what}: JSON {type(value).__name__} where an object was expected")
    return value


def is_count(value: object, limit: int | None = None) -> bool:
    """A JSON value that is a non-negative integer (not a bool), below `limit` when given."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0 and (limit is None or value < limit)


def crc32(data: bytes) -> int:
    """The CRC32 every tricopy format stores (zlib's polynomial)."""
    return zlib.crc32(data) & 0xFFFFFFFF


def _describe(err: construct.ConstructError) -> str:
    if isinstance(err, construct.ChecksumError):
        return "CRC mismatch (the bytes were damaged)"
    if isinstance(err, construct.ConstError):
        return "bad magic number (not this kind of data)"
    if isinstance(err, construct.StreamError | construct.TerminatedError):
        return "wrong length (truncated or trailing bytes)"
    return str(err).splitlines()[0] if str(err) else type(err).__name__


def parse_checked(fmt: construct.Construct, data: bytes, what: str) -> Any:
    """Parse `data` with `fmt`; any construct failure becomes FormatError("<what>: <reason>")."""
    try:
        return fmt.parse(bytes(data))
    except construct.ConstructError as e:
        raise FormatError(f"{what}: {_describe(e)}") from None


def check_version(found: int, expected: int, what: str) -> None:
    """Refuse a format version this code does not know."""
    if found != expected:
        raise FormatError(f"{what}: format version {found} is not supported (this tricopy reads {expected})")
