"""Helpers shared by the vstore tests: make a lab, read whole volumes, random block data."""

from __future__ import annotations

import random
from pathlib import Path

from vstore.lab.system import System
from vstore.procedures.create import init_lab

BS = 4096


def make_lab(tmp_path: Path, name: str = "lab", **kw) -> Path:
    kw.setdefault("size", 256 * BS)
    lab = tmp_path / name
    init_lab(lab, **kw)
    return lab


def image(lab: Path, site: str, volume: str) -> bytes:
    return (lab / site / f"{volume}.img").read_bytes()


def blocks(seed: int, count: int = 1) -> bytes:
    return random.Random(seed).randbytes(count * BS)


def open_lab(lab: Path) -> System:
    return System(lab)


def invoke(app, *args, ok: bool = True, input=None):
    """Run a typer app through CliRunner; with `ok`, assert it succeeded (showing its output)."""
    from typer.testing import CliRunner
    result = CliRunner().invoke(app, [str(a) for a in args], input=input)
    if ok:
        assert result.exit_code == 0, result.output + str(result.exception)
    return result
