"""Holes in image files: where a sparse image holds data, and turning a range back into a hole
(DESIGN "Block device": images are raw and sparse; a hole reads as zeros).

Keeps true: `data_runs(fd, start, length)` returns the byte runs inside [start, start+length)
that may hold data (SEEK_DATA/SEEK_HOLE; everything else reads as zeros), or the whole range
where the file system cannot say; `punch_hole(fd, offset, length)` makes the range read as zeros
without writing them (fallocate PUNCH_HOLE, the file's size kept), or returns False where the
file system cannot, and the caller writes the zeros itself.
"""

from __future__ import annotations

import ctypes
import errno
import os

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def data_runs(fd: int, start: int, length: int) -> list[tuple[int, int]]:
    """(offset, length) runs of [start, start+length) that may hold data, in order."""
    end, out, at = start + length, [], start
    try:
        while at < end:
            try:
                data = os.lseek(fd, at, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # only a hole from here to the end of the file
                    break
                raise
            if data >= end:
                break
            hole = min(os.lseek(fd, data, os.SEEK_HOLE), end)
            out.append((data, hole - data))
            at = hole
    except OSError as exc:
        if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):  # no SEEK_DATA here: assume data everywhere
            return [(start, length)]
        raise
    return out


def punch_hole(fd: int, offset: int, length: int) -> bool:
    """Make [offset, offset+length) read as zeros, keeping the file's size; False if unsupported."""
    if _libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EOPNOTSUPP, errno.ENOSYS):
        return False
    raise OSError(err, os.strerror(err))
