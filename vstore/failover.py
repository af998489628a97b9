"""Failover procedures: moving the application off a lost primary (SPEC §5 Figs 10, 13, 14).

Keeps true: each procedure checks every precondition before its first step changes state, and
logs its steps. Issue 4 delivers Fig 13 for provider mode (the double failure: Primary and Sync
both gone); the remaining figures and mirror mode follow in issue 5.
"""

from __future__ import annotations

from jfs.fs import FileSystem
from jfs.fsck import fsck
from vstore.errors import FormatError, TricopyError
from vstore.procedures import StepLog
from vstore.roles import drop_pair, drop_pairs_of, make_provider_primary, volumes_of
from vstore.site import System


def application_recovery(system: System, volumes: list[str], steps: StepLog) -> None:
    """Replay each volume's jfs metadata log through the new primary's provider, then fsck -n."""
    for index, volume in enumerate(volumes):
        device = system.device(index)
        try:
            fs = FileSystem.mount(device)
        except FormatError as exc:
            steps.step(f"{volume}: no mountable jfs ({exc}); the application recovers it itself")
            continue
        fs.unmount()
        result = fsck(device)
        steps.step(f"{volume}: jfs log replayed; fsck exit code {result.exit_code}"
                   + ("" if result.exit_code == 0 else f" ({len(result.problems)} problems: run `jfs fsck`)"))


def failover_to_async(system: System) -> StepLog:
    """Fig 13 [0102]-[0103]: make D writable and start the application on it."""
    steps = StepLog("Fig 13 failover to the Async site")
    if not system.network.site_up("async"):
        raise TricopyError("the Async site is not available; nothing to fail over to")
    if system.role("async") == "primary":
        raise TricopyError("the Async site already runs the application")
    if system.network.site_up("primary") and system.role("primary") == "primary":
        raise TricopyError("the primary site is up and runs the application; fail over only after losing it")
    if system.topo.mode != "provider":
        raise TricopyError("failover --to async in mirror mode arrives with issue 5; this lab is in mirror mode")
    ds = volumes_of(system, "async")
    for pair in list(system.registry):
        if pair.target.startswith("async:"):
            drop_pair(system, pair, steps)
    drop_pairs_of(system, "primary", steps)
    make_provider_primary(system, "async", ds, steps)
    application_recovery(system, ds, steps)
    steps.step("application runs at the Async site")
    return steps
