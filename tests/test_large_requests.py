"""A read or write of any size goes through the daemons: block data is split into requests that fit
the frame limit, each one an acknowledged application write."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from jfs import targets
from vstore.cli.main import app
from vstore.net.remote import MESSAGE_BYTES, spans
from vstore.net.wire import DEFAULT_MAX_PAYLOAD
from vstore.procedures.create import init_lab

BS = 4096


def vstore(*args: object) -> None:
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output


@pytest.fixture
def lab_up(tmp_path: Path) -> Iterator[Path]:
    lab = tmp_path / "lab"
    init_lab(lab, size=16384 * BS)  # 64 MiB
    vstore("lab", "up", lab)
    try:
        yield lab
    finally:
        vstore("lab", "down", lab)


def test_spans_cover_the_range_in_pieces_that_fit_a_frame() -> None:
    """The pieces of a range are consecutive, cover it exactly and each fits in one frame."""
    pieces = list(spans(10, 5000, BS))
    assert pieces[0][0] == 10 and sum(n for _, n in pieces) == 5000
    assert all(a + n == b for (a, n), (b, _) in zip(pieces, pieces[1:], strict=False))
    assert all(n * BS <= MESSAGE_BYTES < DEFAULT_MAX_PAYLOAD for _, n in pieces)


def test_a_write_larger_than_a_frame_reaches_the_volume(lab_up: Path) -> None:
    """A 40 MiB write and read of lab:LAB through the daemons round-trips (the frame limit is 32 MiB)."""
    data = random.Random(1).randbytes(40 << 20)
    dev = targets.open(f"lab:{lab_up}", writable=True)
    try:
        dev.write(100, data)
        dev.flush()
        assert dev.read(100, len(data) // BS) == data
    finally:
        dev.close()
    assert (lab_up / "sync" / "C.img").read_bytes()[100 * BS:100 * BS + len(data)] == data
