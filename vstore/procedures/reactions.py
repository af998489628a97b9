"""The Fig 17 reaction, handed to the `System` by whoever opens it for application writes (SPEC §5
[0119]-[0126]).

Keeps true: when volume A fails during a write in mirror mode, the Sync site stays lossless: D is
backed up ([0126] safeguard), A->C is deleted, B->D set Simplex, sync B->C started without initial
copy (B and C hold the same data up to this write) and the write re-issued to B. The System sits
below the procedures and cannot import this; `open_system` passes it in at open, so every opener
of a System for application writes (the CLI, the site daemon, lab targets, the demo) gets it and
a System opened without it reports the member failure as the mirror program does by itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vstore.blocks.errors import TricopyError
from vstore.lab.system import System
from vstore.procedures.roles import drop_pair
from vstore.procedures.setup import new_pair
from vstore.procedures.steps import StepLog
from vstore.replication.mirror import Member
from vstore.replication.pairs import PairKind, PairState, split_ref


def open_system(lab: Path, **options: Any) -> System:
    """A `System` for application writes: `System(lab, **options)` with the Fig 17 reaction."""
    return System(lab, volume_failure_reaction=fig17_switch_sync_source, **options)


def fig17_switch_sync_source(system: System, failed: Member, lba: int, data: bytes) -> StepLog:
    """Fig 7/17 [0119]-[0126]: volume A failed during a write in mirror mode. Keep the Sync site
    lossless: back up D ([0126] safeguard), delete A->C, set B->D Simplex, start sync B->C without
    initial copy (B and C hold the same data up to this write) and re-issue the write to B."""
    steps = StepLog("Fig 17 volume A failure: sync copy from B")
    site = system.active_site
    a_ref = f"{site}:{failed.volume}"
    ac = system.registry.from_source(a_ref, PairKind.SYNC)
    if ac is None:
        raise TricopyError(f"{failed.volume} failed and has no sync pair; nothing to switch")
    group = next(g for g in system.mirror.settings.groups.values() if failed in g)
    b = next((m for m in group if m is not failed and m.failure.value == "normal"), None)
    if b is None:
        raise TricopyError(f"{failed.volume} failed and the mirror group has no healthy member to take over")
    b_ref = f"{site}:{b.volume}"
    bd = system.registry.from_source(b_ref, PairKind.ASYNC)
    sync_site, c = split_ref(ac.target)
    if bd is not None:
        dst_site, d = split_ref(bd.target)
        backup = f"{d}.backup-before-fig17"
        system.storage(dst_site).snapshot(d, backup)
        steps.step(f"[0126] safeguard: {dst_site}:{d} backed up as {backup}.img before the switch")
        drop_pair(system, bd, steps)
    drop_pair(system, ac, steps)
    pair = new_pair(system, PairKind.SYNC, b_ref, f"{sync_site}:{c}")
    pair.transition(PairState.DUPLEX, None)
    steps.step(f"pair {pair.name}: sync copy started without initial copy")
    system.storage(site).host_write(b.volume, lba, data)
    steps.step(f"failed write re-issued to {b.volume}: {b.volume} and {c} agree")
    return steps
