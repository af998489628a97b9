"""Failback procedures: returning the application to the primary site and restoring the original
layout A->C sync, B->D (or provider A->D) async (SPEC §5 Figs 11, 12, 15, 16; claims 7, 8, 11, 12),
with split-brain detection.

Keeps true:
- Every precondition is checked before the first step changes state: the primary site is
  reachable (its directory may be gone or empty: it is then restored with fresh images), the
  sites each figure copies between can talk, and no split brain is present unless the operator
  named the side to discard.
- **Split brain** is never merged silently: a returning site that holds host writes no surviving
  site ever received, while the current primary also took writes since its promotion, stops the
  failback with a message that says which side has which writes. `--discard-site NAME` resolves it:
  discarding the returning primary's writes runs the failback normally (its volumes are
  overwritten); discarding the current primary's writes re-initialises the layout from the
  returning primary's volumes.
- Each figure ends with the original layout, every pair Duplex.
"""

from __future__ import annotations

from vstore.blocks.errors import TricopyError
from vstore.lab.system import System
from vstore.procedures.copying import add_member, copy_blocks
from vstore.procedures.recovery import equalise
from vstore.procedures.roles import (
    drop_pair,
    drop_pairs_between,
    drop_pairs_of,
    make_primary,
    restore_site,
    volumes_of,
)
from vstore.procedures.setup import new_pair, start_pair
from vstore.procedures.steps import Progress, StepLog, no_progress
from vstore.replication.pairs import Pair, PairKind, PairState, split_ref


class SplitBrain(TricopyError):
    """Both sides were written independently; an operator must choose which writes to discard."""


# -- preconditions -----------------------------------------------------------------------------------
def split_brain_evidence(system: System) -> tuple[int, int, str]:
    """(writes only the returning primary has, writes the current primary took since promotion,
    current primary site)."""
    active = system.active_site
    returning = system.states.get("primary")
    if returning is None:
        return 0, 0, active
    seen = max((int(st.get("seen_writes", {}).get("primary", 0)) for site, st in system.states.items()
                if site != "primary"), default=0)
    seen = max(seen, int(returning.get("mirrored_writes", 0)))  # its own record of what reached C
    unseen = max(0, int(returning.get("write_count", 0)) - seen)
    host = system.states[active]["host"]
    since = int(system.states[active].get("write_count", 0)) - int(host.get("write_count_at_promotion", 0))
    return unseen, max(0, since), active


def returning_positions(system: System) -> str:
    """The block ranges the returning primary recorded while its pairs were suspended, if it kept any."""
    ranges = []
    for rec in (system.states.get("primary") or {}).get("pairs", {}).values():
        pair = Pair.from_dict(rec["pair"])
        ranges += [f"{pair.source.split(':')[1]} {a}+{n}" for a, n in pair.bitmap.ranges()]
    return f" (blocks {', '.join(sorted(set(ranges))[:12])})" if ranges else ""


def check_primary_can_return(system: System, needs_talk: list[tuple[str, str]]) -> None:
    active = system.active_site
    if active == "primary":
        raise TricopyError("the application already runs at the primary site; nothing to fail back")
    for a, b in needs_talk:
        for site in (a, b):
            if site in system.faults.sites_down:  # a lost directory is restored; a down site is not
                raise TricopyError(f"site {site} is still down; repair it (`vstore heal LAB {site}`) before "
                                   "failing back")
        if not system.network.link_up(a, b):
            raise TricopyError(f"link {a}-{b} is down; this failback copies over it")


def check_split_brain(system: System, discard_site: str | None) -> str | None:
    """Raise SplitBrain unless resolved; return the site whose writes are discarded, if any."""
    unseen, since, active = split_brain_evidence(system)
    if unseen and since:
        if discard_site is None:
            raise SplitBrain(
                f"split brain: site primary holds {unseen} volume write(s) that no surviving site received"
                f"{returning_positions(system)}, and site {active} took {since} volume write(s) since it became "
                "primary; nothing was changed. Choose the side "
                f"to discard: --discard-site primary (keep {active}'s data) or --discard-site {active} "
                "(keep the old primary's data)")
        if discard_site not in ("primary", active):
            raise TricopyError(f"--discard-site must be primary or {active}")
        return discard_site
    if discard_site is not None and discard_site not in ("primary", active):
        raise TricopyError(f"--discard-site must be primary or {active}")
    return discard_site


# -- building blocks ------------------------------------------------------------------------------------
def copy_site(system: System, src_site: str, dst_site: str, dst_letter: str, steps: StepLog,
              progress: Progress) -> None:
    """Plain full copy of every volume of src_site onto dst_site's volumes of one letter."""
    for s, d in zip(volumes_of(system, src_site), volumes_of(system, dst_site, dst_letter), strict=True):
        n = copy_blocks(system, (src_site, s), (dst_site, d), [(0, system.topo.num_blocks)],
                        progress(f"copy {src_site}:{s} -> {dst_site}:{d}", system.topo.num_blocks))
        steps.step(f"copied {src_site}:{s} -> {dst_site}:{d} ({n} blocks)")


def start_pairs(system: System, kind: PairKind, src_site: str, src_letter: str, dst_site: str, dst_letter: str,
                steps: StepLog, progress: Progress, *, initial_copy: bool) -> list[Pair]:
    pairs = []
    for s, d in zip(volumes_of(system, src_site, src_letter), volumes_of(system, dst_site, dst_letter), strict=True):
        pair = new_pair(system, kind, f"{src_site}:{s}", f"{dst_site}:{d}")
        start_pair(system, pair, steps, progress, initial_copy=initial_copy)
        pairs.append(pair)
    return pairs


def add_members(system: System, letter: str, steps: StepLog, progress: Progress) -> None:
    """Fig 6 for every virtual volume: add the primary's volume `letter` to its mirror group."""
    for i, name in enumerate(volumes_of(system, "primary", letter)):
        group = system.mirror.group(system.topo.volume_name("A", i))
        steps.step(f"Fig 6: add {name} to the mirror group of virtual volume {group.virtual_volume}")
        add_member(system, "primary", group, name, progress(f"Fig 6 add {name}", group.num_blocks))


def original_async_letter(system: System) -> str:
    return "B" if system.topo.mode == "mirror" else "A"


def primary_host(system: System, first_letter: str, steps: StepLog) -> None:
    """The primary's host runs the application; the async source is B (mirror) or A (provider)."""
    make_primary(system, "primary", volumes_of(system, "primary", first_letter), steps,
                 async_volumes=volumes_of(system, "primary", original_async_letter(system)))


def reinit_from_primary(system: System, steps: StepLog, progress: Progress) -> StepLog:
    """--discard-site <current primary>: the returning primary's data wins; rebuild from it."""
    active = system.active_site
    steps.step(f"discarding every write site {active} took since its promotion")
    drop_pairs_of(system, active, steps)
    for other in ("sync", "async"):
        drop_pairs_of(system, other, steps)
    primary_host(system, "A", steps)
    if system.topo.mode == "mirror":
        add_members(system, "B", steps, progress)
    start_pairs(system, PairKind.SYNC, "primary", "A", "sync", "C", steps, progress, initial_copy=True)
    start_pairs(system, PairKind.ASYNC, "primary", original_async_letter(system), "async", "D", steps, progress,
                initial_copy=True)
    steps.step("original layout re-initialised from the old primary's volumes")
    return steps


def prologue(system: System, name: str, needs_talk: list[tuple[str, str]], discard_site: str | None,
             progress: Progress) -> tuple[StepLog, bool]:
    """Shared preconditions and the primary's return; True when the discard re-initialised instead."""
    check_primary_can_return(system, needs_talk)
    discard = check_split_brain(system, discard_site)
    steps = StepLog(name)
    for site in ("primary", "sync", "async"):
        if site == "primary" or site not in system.states:
            restore_site(system, site, steps)
    if discard == system.active_site:
        reinit_from_primary(system, steps, progress)
        return steps, True
    if discard == "primary":
        steps.step("discarding the writes only the old primary held (its volumes are overwritten)")
    drop_pairs_of(system, "primary", steps)
    return steps, False


def resume_async_first(system: System, first: str, steps: StepLog, progress: Progress, *,
                       c_needs_copy: bool) -> StepLog:
    """Figs 12 and 15 end alike: the primary's `first` volume (B, or A in provider mode) already
    equals D: async first -> D without initial copy, restart, add A (Fig 6), sync A -> C."""
    primary_host(system, first, steps)
    start_pairs(system, PairKind.ASYNC, "primary", first, "async", "D", steps, progress, initial_copy=False)
    steps.step("restart the application at the primary site")
    if system.topo.mode == "mirror":
        add_members(system, "A", steps, progress)
    start_pairs(system, PairKind.SYNC, "primary", "A", "sync", "C", steps, progress, initial_copy=c_needs_copy)
    steps.step("original layout restored: every pair Duplex")
    return steps


def ship_all(system: System, steps: StepLog) -> None:
    """Confirm the async copy is complete: ship every waiting entry (Fig 12 / Fig 16)."""
    report = system.shipper().ship()
    if report.error:
        raise TricopyError(f"cannot make the async copy complete: {report.error}")
    left = system.entry_log.stats().entries
    if left:
        raise TricopyError(f"{left} entries are still waiting; the copy is not complete")
    steps.step(f"async copy complete ({report.entries} entries shipped), the two sites hold the same data")


# -- the four figures -----------------------------------------------------------------------------------
def fig11_failback_sync_first(system: System, progress: Progress = no_progress,
                              discard_site: str | None = None) -> StepLog:
    """Fig 11 [0091]-[0096]: sync copy C -> A first, reverse it, then restart and async B -> D."""
    if system.active_site != "sync":
        raise TricopyError("Fig 11 fails back from the Sync site, but the application runs at "
                           f"{system.active_site}; use the failback for that site")
    steps, done = prologue(system, "Fig 11 failback from the Sync site (sync first)",
                           [("sync", "primary"), ("primary", "async")], discard_site, progress)
    if done:
        return steps
    drop_pairs_between(system, "sync", "async", steps)  # C->D Simplex
    c_to_a = start_pairs(system, PairKind.SYNC, "sync", "C", "primary", "A", steps, progress, initial_copy=True)
    steps.step("stop the application at the Sync site")
    for pair in c_to_a:  # reverse: drop C->A, A->C without initial copy
        drop_pair(system, pair, steps)
    primary_host(system, "A", steps)
    start_pairs(system, PairKind.SYNC, "primary", "A", "sync", "C", steps, progress, initial_copy=False)
    steps.step("restart the application at the primary site")
    if system.topo.mode == "mirror":
        add_members(system, "B", steps, progress)
    start_pairs(system, PairKind.ASYNC, "primary", original_async_letter(system), "async", "D", steps, progress,
                initial_copy=True)
    steps.step("original layout restored: every pair Duplex")
    return steps


def fig12_failback_async_first(system: System, progress: Progress = no_progress,
                               discard_site: str | None = None) -> StepLog:
    """Fig 12 [0097]-[0101]: C and D synced, copy C -> B, async B -> D, then add A and sync A -> C."""
    if system.active_site != "sync":
        raise TricopyError("Fig 12 fails back from the Sync site, but the application runs at "
                           f"{system.active_site}; use the failback for that site")
    steps, done = prologue(system, "Fig 12 failback from the Sync site (async first)",
                           [("sync", "primary"), ("sync", "async"), ("primary", "async")], discard_site, progress)
    if done:
        return steps
    steps.step("stop the application at the Sync site")
    ship_all(system, steps)
    drop_pairs_between(system, "sync", "async", steps)
    first = original_async_letter(system)  # B in mirror mode, A in provider mode
    copy_site(system, "sync", "primary", first, steps, progress)
    return resume_async_first(system, first, steps, progress, c_needs_copy=False)


def fig15_failback_from_async(system: System, progress: Progress = no_progress,
                              discard_site: str | None = None) -> StepLog:
    """Fig 15 [0108]-[0113]: async D -> B first, reverse it, then add A and sync A -> C."""
    if system.active_site != "async":
        raise TricopyError("Fig 15 fails back from the Async site, but the application runs at "
                           f"{system.active_site}; use the failback for that site")
    steps, done = prologue(system, "Fig 15 failback from the Async site (async first)",
                           [("async", "primary"), ("primary", "sync")], discard_site, progress)
    if done:
        return steps
    drop_pairs_between(system, "async", "sync", steps)  # any D->C pair
    first = original_async_letter(system)
    d_to_b = start_pairs(system, PairKind.ASYNC, "async", "D", "primary", first, steps, progress, initial_copy=True)
    steps.step("stop the application at the Async site")
    for pair in d_to_b:
        drop_pair(system, pair, steps)
    return resume_async_first(system, first, steps, progress, c_needs_copy=True)


def fig16_failback_from_async_sync_first(system: System, progress: Progress = no_progress,
                                         discard_site: str | None = None) -> StepLog:
    """Fig 16 [0114]-[0118]: make C equal to D, copy D -> A, sync A -> C, then add B and async B -> D."""
    if system.active_site != "async":
        raise TricopyError("Fig 16 fails back from the Async site, but the application runs at "
                           f"{system.active_site}; use the failback for that site")
    steps, done = prologue(system, "Fig 16 failback from the Async site (sync first)",
                           [("async", "primary"), ("async", "sync"), ("primary", "sync")], discard_site, progress)
    if done:
        return steps
    steps.step("stop the application at the Async site")
    d_to_c = [p for p in system.registry.involving("sync") if split_ref(p.source)[0] == "async"]
    if d_to_c and all(p.state == PairState.DUPLEX for p in d_to_c):
        ship_all(system, steps)
    else:
        equalise(system, "async", "sync", steps, progress)
    drop_pairs_between(system, "async", "sync", steps)
    copy_site(system, "async", "primary", "A", steps, progress)
    primary_host(system, "A", steps)
    start_pairs(system, PairKind.SYNC, "primary", "A", "sync", "C", steps, progress, initial_copy=False)
    steps.step("restart the application at the primary site")
    if system.topo.mode == "mirror":
        add_members(system, "B", steps, progress)
    start_pairs(system, PairKind.ASYNC, "primary", original_async_letter(system), "async", "D", steps, progress,
                initial_copy=False)
    steps.step("original layout restored: every pair Duplex")
    return steps


def failback(system: System, *, sync_first: bool = True, progress: Progress = no_progress,
             discard_site: str | None = None) -> StepLog:
    """Pick the figure: from the Sync site Fig 11 (sync first) or 12; from the Async site Fig 16
    (sync first) or 15."""
    active = system.active_site
    if active == "sync":
        fig = fig11_failback_sync_first if sync_first else fig12_failback_async_first
    elif active == "async":
        fig = fig16_failback_from_async_sync_first if sync_first else fig15_failback_from_async
    else:
        raise TricopyError("the application already runs at the primary site; nothing to fail back")
    steps = fig(system, progress, discard_site)
    for site in ("sync", "async"):
        system.states[site]["role"] = site
    return steps
