"""The error types every tricopy layer raises for conditions a user can act on.

Keeps true: a `TricopyError` always carries one sentence that says what was wrong and what to do;
the command-line surfaces print that sentence (never a traceback) and exit non-zero. Programming
errors stay ordinary Python exceptions.
"""

from __future__ import annotations


class TricopyError(Exception):
    """A failure a user or operator can understand and act on."""


class BlockDeviceError(TricopyError):
    """A block access outside the device, misaligned, or on an unusable image."""


class FormatError(TricopyError):
    """Bytes that do not parse as the declared on-disk or on-wire structure (bad magic, CRC...)."""


class ReadOnlyError(BlockDeviceError):
    """A write to a device or volume opened read-only (e.g. a Duplex secondary)."""


def brief(value: object, limit: int = 40) -> str:
    """A value read from a user's or a peer's file, shown briefly in an error message: containers by
    their kind (a damaged one may be nested too deeply for repr), anything else cut to `limit`."""
    if isinstance(value, dict | list | tuple):
        return f"a {'table' if isinstance(value, dict) else 'list'} of {len(value)} items"
    return repr(value)[:limit]
