"""The lab key: the one shared secret every frame's HMAC-SHA256 is keyed from (DESIGN "Sites and
links": every frame authenticated under the per-deployment lab key; SPEC §4).

Keeps true:
- A lab key is at least `MIN_KEY_BYTES` random bytes, stored as hex in a file only its owner can
  read or write (mode 0600). `load_key` refuses a missing, short, non-hex or group/other-readable
  file with one sentence saying what to type.
- `create_key` is the only writer of a key file, and `write_private` the only writer of any
  private file (the lab key, a TLS private key): created with mode 0600 from the start (never
  chmod-ed after writing) and never over an existing file.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from vstore.blocks.errors import TricopyError

MIN_KEY_BYTES = 32


def load_key(path: Path) -> bytes:
    """Read the lab key (hex) from `path`; refuse a missing, short, non-hex or group/other-readable file."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise TricopyError(f"lab key file {path} does not exist; create it with `vstore lab init` "
                           f"or write {2 * MIN_KEY_BYTES} hex digits into it and chmod 600 {path}") from None
    if mode & 0o077:
        raise TricopyError(f"lab key file {path} is accessible by group or others "
                           f"(mode {mode & 0o777:o}); run: chmod 600 {path}")
    text = path.read_text(encoding="ascii", errors="replace").strip()
    try:
        key = bytes.fromhex(text)
    except ValueError:
        raise TricopyError(f"lab key file {path} does not hold a hex key; "
                           f"write {2 * MIN_KEY_BYTES} hex digits into it") from None
    if len(key) < MIN_KEY_BYTES:
        raise TricopyError(f"lab key file {path} holds {len(key)} bytes of key; a lab key needs at "
                           f"least {MIN_KEY_BYTES} bytes ({2 * MIN_KEY_BYTES} hex digits)")
    return key


def write_private(path: Path, data: bytes) -> None:
    """Write `data` to a new file `path` created with mode 0600; FileExistsError if it exists."""
    fd = os.open(Path(path), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def create_key(path: Path) -> bytes:
    """Write a fresh random lab key to a new file `path` with mode 0600 and return it."""
    key = secrets.token_bytes(MIN_KEY_BYTES)
    write_private(path, (key.hex() + "\n").encode("ascii"))
    return key


def check_key(key: bytes) -> bytes:
    """`key` as bytes if it is long enough to be a lab key; TricopyError otherwise."""
    if not isinstance(key, bytes | bytearray) or len(key) < MIN_KEY_BYTES:
        raise TricopyError(f"a lab key must be at least {MIN_KEY_BYTES} bytes; load it with load_key()")
    return bytes(key)
