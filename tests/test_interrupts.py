"""Ctrl-C and SIGTERM never cut a replicated write in two: it reaches A, C and D, or none of them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from vstore.blocks.interrupts import deferred_interrupts
from vstore.lab.system import System
from vstore.procedures.create import init_lab
from vstore.reports import verify

BS = 4096

# A process that writes 2 MiB through the lab's replicating device and is sent SIGINT (or SIGTERM)
# at the worst moment: after A and C took the write, while its entry is being appended.
WRITER = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from vstore.procedures.reactions import open_system
    from vstore.replication.spool import EntryLog

    sig = getattr(signal, sys.argv[2])
    real = EntryLog.append_many

    def interrupted_append(self, items, **kw):
        os.kill(os.getpid(), sig)  # arrives between the write to A and C and its entry
        return real(self, items, **kw)

    EntryLog.append_many = interrupted_append
    system = open_system(Path(sys.argv[1]))
    try:
        system.device(0).write(8, bytes([7]) * (512 * 4096))
    finally:
        system.save()
        system.close()
""")


def run_interrupted_writer(lab: Path, sig: str) -> int:
    return subprocess.run([sys.executable, "-c", WRITER, str(lab), sig], capture_output=True).returncode


def test_a_held_interrupt_arrives_when_the_block_ends() -> None:
    """A SIGINT sent inside `deferred_interrupts` lets the block finish, then raises KeyboardInterrupt."""
    finished = False
    with pytest.raises(KeyboardInterrupt):
        with deferred_interrupts():
            os.kill(os.getpid(), signal.SIGINT)
            finished = True
    assert finished


@pytest.mark.parametrize(("mode", "sig", "code"), [
    ("provider", "SIGINT", -signal.SIGINT),
    ("mirror", "SIGINT", -signal.SIGINT),
    ("provider", "SIGTERM", -signal.SIGTERM),
])
def test_an_interrupted_write_reaches_every_copy(tmp_path: Path, mode: str, sig: str, code: int) -> None:
    """A write interrupted between A and its entry still ends on A, C and D: verify finds no difference."""
    lab = tmp_path / "lab"
    init_lab(lab, mode=mode, size=1024 * BS)
    assert run_interrupted_writer(lab, sig) == code  # the interrupt took effect, after the write
    with System(lab) as system:
        system.shipper().ship()
        results = verify(system)
        system.save()
    assert results and all(r["differing_ranges"] == [] and "error" not in r for r in results), results
    d = (lab / "async" / "D.img").read_bytes()
    assert d[8 * BS:520 * BS] == bytes([7]) * (512 * BS)
