"""While lab:LAB is mounted through the daemons it has one writer: `vstore write` is refused naming
the mount, and `vstore lab down` is refused too unless forced."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from jfs.fuse import fuse_available
from jfs.mounts import is_mounted

pytestmark = pytest.mark.skipif(fuse_available() is not None, reason=f"FUSE unavailable: {fuse_available()}")


@pytest.fixture
def mounted_lab(daemon_lab: Callable[..., Path], vstore: Callable[..., Any], jfs: Callable[..., Any],
                tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    lab = daemon_lab(size=256 * 4096)
    jfs("mkfs", f"lab:{lab}")
    vstore("lab", "up", lab)
    mp = tmp_path / "mnt"
    mp.mkdir()
    jfs("mount", f"lab:{lab}", mp)
    try:
        yield lab, mp
    finally:
        if is_mounted(mp):
            if jfs("umount", mp, ok=False).exit_code != 0:
                subprocess.run(["fusermount3", "-uz", str(mp)], capture_output=True)


def test_vstore_write_is_refused_while_lab_is_mounted(mounted_lab: tuple[Path, Path],
                                                      vstore: Callable[..., Any]) -> None:
    """A block write through the daemons is refused while a mount of lab:LAB is its writer, naming the mount."""
    lab, mp = mounted_lab
    result = vstore("write", lab, "--lba", "200", input=b"x" * 4096, ok=False)
    assert result.exit_code == 1 and str(mp) in result.stderr and "Traceback" not in result.output


def test_lab_down_is_refused_while_lab_is_mounted(mounted_lab: tuple[Path, Path], vstore: Callable[..., Any],
                                                  jfs: Callable[..., Any]) -> None:
    """`lab down` names the mount and stops nothing; after the unmount it stops the daemons."""
    lab, mp = mounted_lab
    result = vstore("lab", "down", lab, ok=False)
    assert result.exit_code == 1 and str(mp) in result.stderr
    assert "nothing was running" not in result.output
    (mp / "kept.txt").write_text("still replicated")  # the daemons still serve the mount
    jfs("umount", mp)
    assert "primary" in vstore("lab", "down", lab).output
    assert jfs("read", f"lab:{lab}", "/kept.txt").output == "still replicated"
