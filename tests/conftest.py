"""Shared pytest fixtures: fresh labs, the `vstore` and `jfs` commands through CliRunner, and jfs images.
The plain helpers they are built on are in tests/helpers.py."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import helpers


@pytest.fixture
def make_lab(tmp_path: Path) -> Callable[..., Path]:
    """A factory of fresh labs under the test's tmp_path: `make_lab(name="lab", **init_lab options)`."""

    def make(name: str = "lab", **kw: Any) -> Path:
        return helpers.make_lab(tmp_path, name, **kw)

    return make


@pytest.fixture
def daemon_lab(tmp_path: Path) -> Iterator[Callable[..., Path]]:
    """A factory of labs on free loopback ports, for tests that start daemons; they are all stopped after."""
    with helpers.daemon_labs(tmp_path) as make:
        yield make


@pytest.fixture
def vstore() -> Callable[..., Any]:
    """`vstore(*args, ok=True, input=None)`: the vstore command through CliRunner, asserting success if `ok`."""
    return helpers.vstore


@pytest.fixture
def jfs() -> Callable[..., Any]:
    """`jfs(*args, ok=True, input=None)`: the jfs command through CliRunner, asserting success if `ok`."""
    return helpers.jfs


@pytest.fixture
def make_image(tmp_path: Path) -> Callable[..., Path]:
    """A factory of empty jfs image files under tmp_path: `make_image(name, size, block_size, **mkfs options)`."""

    def make(name: str = "fs.img", size: int = 8 << 20, block_size: int = 4096, **mkfs_kw: Any) -> Path:
        return helpers.mkfs_image(tmp_path / name, size, block_size, **mkfs_kw)

    return make


@pytest.fixture
def jfs_image(make_image: Callable[..., Path]) -> Path:
    """An empty jfs on an 8 MiB image file of 4 KiB blocks."""
    return make_image()
