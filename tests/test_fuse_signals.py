"""Signals to a jfs mount of a replicated volume: libfuse's own handlers end its loop between
requests, and the replicated write path (which holds SIGINT/SIGTERM around each write in a main
thread) must not put the default action back over them."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.test_fuse import JFS, force_unmount, fsck, is_mounted, run


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_after_replicated_writes_unmounts_cleanly(make_lab, tmp_path: Path, sig: int) -> None:
    """After writes through lab:LAB (each held against signals while it reaches A, C and the spool),
    SIGTERM or SIGINT still ends the mount as an unmount: exit 0, nothing left mounted, the file on
    the volume and fsck clean."""
    lab = make_lab(size=16 << 20)
    target = f"lab:{lab}"
    run([*JFS, "mkfs", target])
    mp = tmp_path / "mnt"
    mp.mkdir()
    proc = subprocess.Popen([*JFS, "mount", target, str(mp), "--foreground"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while not is_mounted(mp):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
        (mp / "a").write_bytes(b"kept" * 1000)
        (mp / "b").write_bytes(b"more")
        proc.send_signal(sig)
        assert proc.wait(timeout=60) == 0, proc.stderr.read() if proc.stderr else ""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        force_unmount(mp)
    assert not is_mounted(mp)
    assert fsck(target) == 0
    assert run([*JFS, "read", target, "/a"]).stdout == "kept" * 1000
