"""Failover procedures: moving the application off a lost primary, and switching the sync source
when volume A fails (SPEC §5 Figs 10, 13, 14, 7/17; claims 6, 9, 10).

Keeps true: each procedure checks every precondition before its first step changes any state and
logs every step; on-disk state is saved by the caller only after the procedure returned, so a
procedure interrupted at any step can simply be run again. In provider mode the equalising copies
are the touched-files copy of embodiment 4; in mirror mode they are full copies with progress.
"""

from __future__ import annotations

import logging

from jfs.fs import FileSystem
from jfs.fsck import fsck
from vstore.blocks.errors import FormatError, TricopyError
from vstore.lab.system import System
from vstore.procedures.recovery import equalise
from vstore.procedures.roles import drop_pair, drop_pairs_of, make_primary, start_async_without_copy, volumes_of
from vstore.procedures.steps import Progress, StepLog, no_progress

log = logging.getLogger("vstore.failover")


def application_recovery(system: System, volumes: list[str], steps: StepLog) -> None:
    """Application recovery on the new primary: replay each volume's jfs log, then fsck -n."""
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


def require_primary_lost(system: System) -> None:
    if system.network.site_up("primary") and system.role("primary") == "primary":
        raise TricopyError("the primary site is up and runs the application; fail over only after losing it "
                           "(delete LAB/primary or `vstore fail LAB primary`)")


def require_up(system: System, *sites: str) -> None:
    for site in sites:
        if not system.network.site_up(site):
            raise TricopyError(f"site {site} is not available (down or its directory is gone)")
        if system.role(site) == "primary":
            raise TricopyError(f"site {site} already runs the application")


def fig10_failover_to_sync(system: System, progress: Progress = no_progress) -> StepLog:
    """Fig 10 [0086]-[0091]: C writable, application on C, async copy C -> D when they can talk."""
    require_primary_lost(system)
    require_up(system, "sync")
    steps = StepLog("Fig 10 failover to the Sync site")
    can_talk = system.network.site_up("async") and system.network.can_talk("sync", "async")
    drop_pairs_of(system, "primary", steps)  # A->C Simplex (C writable), B->D Simplex
    cs, ds = volumes_of(system, "sync"), volumes_of(system, "async")
    make_primary(system, "sync", cs, steps)
    steps.step("application started at the Sync site on C")
    if can_talk:
        equalise(system, "sync", "async", steps, progress)
        start_async_without_copy(system, "sync", "async", list(zip(cs, ds, strict=True)), steps)
        steps.step("async copy C -> D Duplex: the Sync site's updates reach the Async site")
    else:
        steps.step("the Sync and Async sites cannot talk: async copy C -> D not started (run failover again "
                   "or failback once they can)")
    return steps


def fig13_failover_to_async(system: System, progress: Progress = no_progress) -> StepLog:
    """Fig 13 [0102]-[0103]: make D writable and start the application on it (with recovery)."""
    require_primary_lost(system)
    require_up(system, "async")
    steps = StepLog("Fig 13 failover to the Async site")
    for pair in list(system.registry):
        if pair.target.startswith("async:"):
            drop_pair(system, pair, steps)
    drop_pairs_of(system, "primary", steps)
    ds = volumes_of(system, "async")
    make_primary(system, "async", ds, steps)
    application_recovery(system, ds, steps)
    steps.step("application runs at the Async site")
    return steps


def fig14_failover_to_async_catch_up(system: System, progress: Progress = no_progress) -> StepLog:
    """Fig 14 [0104]-[0107]: make D equal to C first, then async D -> C, application on D."""
    require_primary_lost(system)
    require_up(system, "sync", "async")
    if not system.network.can_talk("sync", "async"):
        raise TricopyError("Fig 14 needs the Sync and Async sites to talk (link sync-async is down); "
                           "use `vstore failover --to async` without --catch-up (Fig 13) instead")
    steps = StepLog("Fig 14 failover to the Async site after catching up from the Sync site")
    drop_pairs_of(system, "primary", steps)
    equalise(system, "sync", "async", steps, progress)
    cs, ds = volumes_of(system, "sync"), volumes_of(system, "async")
    make_primary(system, "async", ds, steps)
    start_async_without_copy(system, "async", "sync", list(zip(ds, cs, strict=True)), steps)
    application_recovery(system, ds, steps)
    steps.step("application runs at the Async site; its updates are copied to the Sync site")
    return steps
