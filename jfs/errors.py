"""File-system errors a user (or the FUSE layer) can act on (SPEC §8; DESIGN.md "JFS").

The model is the kernel's errno contract: each failure has one POSIX code.

Keeps true: every jfs error is a `TricopyError` with one sentence of explanation and an `errno`
so the FUSE layer maps it to the POSIX error without guessing.
"""

from __future__ import annotations

import errno as _errno

from vstore.blocks.errors import TricopyError


class JfsError(TricopyError):
    """Base of file-system errors; `errno` is the POSIX code a FUSE layer returns."""

    errno: int = _errno.EIO


class FileNotFound(JfsError):
    errno = _errno.ENOENT


class FileExists(JfsError):
    errno = _errno.EEXIST


class NotEmpty(JfsError):
    errno = _errno.ENOTEMPTY


class NoSpace(JfsError):
    errno = _errno.ENOSPC


class NameTooLong(JfsError):
    errno = _errno.ENAMETOOLONG


class IsADirectory(JfsError):
    errno = _errno.EISDIR


class NotADirectory(JfsError):
    errno = _errno.ENOTDIR


class InvalidArgument(JfsError):
    errno = _errno.EINVAL


class FileTooLarge(JfsError):
    errno = _errno.EFBIG


class LogFull(JfsError):
    """The metadata log has no room and no record may be trimmed yet ([0169])."""

    errno = _errno.EAGAIN


class IncompleteLog(JfsError):
    """The metadata log cannot prove which files changed (corrupt or discarded records)."""


class ReadOnlyFs(JfsError):
    errno = _errno.EROFS


class DeviceFailed(JfsError):
    """A flush of the device failed: the volume takes no more changes until it is checked."""
