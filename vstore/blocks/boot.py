"""Which boot of the machine this is (DESIGN "Block device": a completed write may still be in a
page cache, a flushed one is durable).

Keeps true: a page cache is lost only with the boot it belongs to (a power cut, a crash of the
machine, a reboot), never when a process is killed. So whether what a site acknowledged from its
cache can have been lost since it last ran is whether `boot_id()` changed. The kernel's boot id
is read once per process; the environment variable `TRICOPY_SIMULATED_BOOT`, when set, is added
to it: the tests simulate a power cut by starting a site's daemon with a new value (and throwing
away what the site had not synced), since they cannot cut the power.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

KERNEL_BOOT_ID = Path("/proc/sys/kernel/random/boot_id")
SIMULATED_BOOT = "TRICOPY_SIMULATED_BOOT"


@functools.cache
def _kernel_boot_id() -> str:
    try:
        return KERNEL_BOOT_ID.read_text().strip()
    except OSError:
        return "unknown"


def boot_id() -> str:
    """This boot of the machine (plus the simulated boot, when a test set one)."""
    simulated = os.environ.get(SIMULATED_BOOT)
    return f"{_kernel_boot_id()}+{simulated}" if simulated else _kernel_boot_id()
