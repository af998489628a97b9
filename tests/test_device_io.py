"""Block I/O beyond single writes: copies keep sparse images sparse (a hole of the source is not
read and becomes a hole of the target, also where the target held data; an all-zero chunk is never
written as zeros; the result reads exactly as the source), and `writev` writes consecutive buffers
as one write."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.helpers import BS, blocks
from vstore.blocks.device import ImageDevice, create_image
from vstore.blocks.errors import BlockDeviceError
from vstore.blocks.ranges import copy_ranges


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def test_a_copy_of_a_sparse_image_is_sparse_and_equal(tmp_path: Path) -> None:
    """Source: data in blocks 3 and 2000 of 4096, zeros written at 100-199. Target: data everywhere
    it could be wrong. After the copy the target reads as the source and holds little more than
    the two data blocks on disk."""
    src_path, dst_path = tmp_path / "src.img", tmp_path / "dst.img"
    create_image(src_path, 4096 * BS)
    create_image(dst_path, 4096 * BS)
    with ImageDevice(src_path) as src, ImageDevice(dst_path) as dst:
        src.write(3, blocks(1))
        src.write(2000, blocks(2))
        src.write(100, bytes(100 * BS))  # zeros, allocated
        for lba in range(0, 4096, 256):
            dst.write(lba, blocks(lba + 7) * 256)  # the target held data everywhere
        reads: list[tuple[int, int]] = []

        def read(lba: int, n: int) -> bytes:
            reads.append((lba, n))
            return src.read(lba, n)

        copied = copy_ranges(read, dst.write, [(0, 4096)], zero=dst.write_zeroes, data=src.data_ranges)
        assert copied == 4096
        assert dst.read(0, 4096) == src.read(0, 4096)
        assert sum(n for _, n in reads) < 4096  # the holes were not read
    assert allocated(dst_path) <= allocated(src_path) + 64 * BS


def test_data_ranges_name_where_an_image_holds_data(tmp_path: Path) -> None:
    """`data_ranges` covers every written block and leaves out the holes between them."""
    path = tmp_path / "img"
    create_image(path, 8192 * BS)
    with ImageDevice(path) as dev:
        dev.write(10, blocks(1))
        dev.write(5000, blocks(2) * 3)
        runs = dev.data_ranges(0, 8192)
        covered = {lba for first, n in runs for lba in range(first, first + n)}
        assert {10, 5000, 5001, 5002} <= covered
        assert len(covered) < 8192 // 4
        dev.write_zeroes(5000, 3)
        assert dev.read(5000, 3) == bytes(3 * BS)


def test_writev_writes_consecutive_buffers_and_refuses_partial_blocks(tmp_path: Path) -> None:
    """`writev` lands each buffer right after the previous one (views included), and a buffer that
    is not whole blocks, or a run past the end, is refused before anything is written."""
    path = tmp_path / "img"
    create_image(path, 64 * BS)
    with ImageDevice(path) as dev:
        dev.writev(5, [blocks(1), memoryview(blocks(2) + blocks(3)), blocks(4)])
        assert dev.read(5, 4) == blocks(1) + blocks(2) + blocks(3) + blocks(4)
        before = dev.read(0, 64)
        for bad in ([blocks(1)[:100]], [blocks(1)] * 70):
            with pytest.raises(BlockDeviceError):
                dev.writev(0, bad)
        assert dev.read(0, 64) == before
