"""Fig 3 initial set-up (with Fig 6 inside it), the resync of suspended pairs and the repair of what
verify found (SPEC §5 [0075]-[0080], §3 [0041]).

Keeps true: each checks its preconditions before its first step changes any state and records its
steps in a `StepLog`; every copy goes through `vstore.procedures.copying`, so a stopped copy
continues where it stopped when the command is run again.

The failover figures (10, 13, 14, 17) are in `failover.py`, the failback figures (11, 12, 15, 16) in
`failback.py`, the embodiment-4 recovery in `recovery.py`.
"""

from __future__ import annotations

from vstore.blocks.errors import TricopyError
from vstore.lab.system import System
from vstore.procedures.copying import add_member, copy_blocks
from vstore.procedures.steps import Progress, StepLog, no_progress
from vstore.replication.compare import take_recorded
from vstore.replication.pairs import Pair, PairKind, PairState, split_ref


def start_pair(system: System, pair: Pair, steps: StepLog, progress: Progress = no_progress, *,
               initial_copy: bool = True, target_is_zero: bool = False) -> int:
    """Simplex -> Initial-Copying -> Duplex (or straight to Duplex without initial copy)."""
    if pair.state != PairState.SIMPLEX:
        raise TricopyError(f"pair {pair.name} is {pair.state.value}, not Simplex; it is already started")
    src_site, src_vol = split_ref(pair.source)
    dst_site, dst_vol = split_ref(pair.target)
    system.network.check(src_site, dst_site)
    copied = 0
    if initial_copy:
        pair.transition(PairState.INITIAL_COPYING, "initial copy")
        steps.step(f"{pair.name}: Initial-Copying {pair.source} -> {pair.target}")
        advance = progress(f"initial copy {pair.name}", pair.num_blocks)
        copied = copy_blocks(system, (src_site, src_vol), (dst_site, dst_vol), [(0, pair.num_blocks)], advance,
                             target_is_zero=target_is_zero)
    if pair.kind == PairKind.ASYNC and src_site == system.active_site:
        system.journal(dst_site).set_applied_seq(system.entry_log.next_seq - 1)
    pair.transition(PairState.DUPLEX, None)
    steps.step(f"{pair.name}: Duplex" + (f" after copying {copied} blocks" if initial_copy else " (no initial copy)"))
    return copied


def new_pair(system: System, kind: PairKind, source: str, target: str) -> Pair:
    src_vol, dst_vol = split_ref(source)[1], split_ref(target)[1]
    pair = Pair(name=f"{src_vol}->{dst_vol}", kind=kind, source=source, target=target,
                num_blocks=system.topo.num_blocks)
    return system.registry.add(pair)


def fig3_initial_setup(system: System, progress: Progress = no_progress, *, fresh_targets: bool = False) -> StepLog:
    """Fig 3 [0075]-[0080]: from A alone to A->C sync and B->D (or provider A->D) async, all Duplex.
    `fresh_targets`: B, C and D were just created (all zero), so zero chunks of A need not travel."""
    steps = StepLog("Fig 3 initial set-up")
    topo = system.topo
    site = system.active_site
    if len(system.registry):
        raise TricopyError("the lab already has pairs; initial set-up runs once on a new lab")
    for needed in ("sync", "async"):
        system.network.check(site, needed)
    pairs = []
    for i in range(topo.volumes):
        a, c, d = topo.volume_name("A", i), topo.volume_name("C", i), topo.volume_name("D", i)
        if topo.mode == "mirror":
            b = topo.volume_name("B", i)
            group = system.mirror.group(a)
            steps.step(f"Fig 6: add {b} to mirror group of virtual volume {a}")
            add_member(system, site, group, b, progress(f"Fig 6 add {b}", group.num_blocks),
                       target_is_zero=fresh_targets)
            pairs.append(new_pair(system, PairKind.ASYNC, f"{site}:{b}", f"async:{d}"))
        else:
            pairs.append(new_pair(system, PairKind.ASYNC, f"{site}:{a}", f"async:{d}"))
        pairs.append(new_pair(system, PairKind.SYNC, f"{site}:{a}", f"sync:{c}"))
    for pair in sorted(pairs, key=lambda p: p.kind.value):
        start_pair(system, pair, steps, progress, target_is_zero=fresh_targets)
    steps.step("all pairs Duplex: initial set-up complete")
    return steps


def resync_pair(system: System, pair: Pair, steps: StepLog, progress: Progress = no_progress) -> int:
    """Suspend -> Duplex-Pending -> Duplex [0041]: copy only the positions recorded during Suspend."""
    src_site, src_vol = split_ref(pair.source)
    dst_site, dst_vol = split_ref(pair.target)
    system.network.check(src_site, dst_site)
    pair.transition(PairState.DUPLEX_PENDING, "resync: copying recorded positions")
    ranges: list[tuple[int, int]] = []
    try:
        ranges = take_recorded(pair, system.storage(src_site), system.storage(dst_site))
        total = sum(n for _, n in ranges)
        steps.step(f"{pair.name}: Duplex-Pending, copying {total} recorded blocks")
        copied = copy_blocks(system, (src_site, src_vol), (dst_site, dst_vol), ranges,
                             progress(f"resync {pair.name}", total))
    except BaseException as exc:  # the positions stay recorded, whatever stopped the copy
        for first, n in ranges:
            pair.bitmap.mark(first, n)
        pair.transition(PairState.SUSPEND, f"resync interrupted: {exc}", failure=True)
        raise
    pair.transition(PairState.DUPLEX, None)
    steps.step(f"{pair.name}: Duplex")
    return copied


def repair_pair(system: System, pair: Pair, ranges: list[tuple[int, int]], steps: StepLog,
                progress: Progress = no_progress) -> list[tuple[int, int]]:
    """Copy exactly the block ranges verify found different, source -> target (DRBD's online verify
    followed by a resync of the out-of-sync blocks); returns the ranges copied.

    A Duplex pair is repaired in place. A Suspend pair whose positions were lost (`verify_first`:
    the spool's damaged entries took their headers with them) gets the differential check instead
    of a full copy: its positions become exactly the blocks that differ, then it is resynced (an
    async pair with its whole group). Any other state has its own copy (Initial-Copying,
    Duplex-Pending) or claims no equality (Simplex, a Suspend pair with exact positions)."""
    src_site, src_vol = split_ref(pair.source)
    dst_site, dst_vol = split_ref(pair.target)
    if pair.state == PairState.SUSPEND and pair.verify_first:
        system.network.check(src_site, dst_site)
        return differential_resync(system, pair, steps, progress)
    if pair.state != PairState.DUPLEX:
        raise TricopyError(f"pair {pair.name} is {pair.state.value}, not Duplex: repair copies only the "
                           "differences of a Duplex pair (resync or heal it first)")
    system.network.check(src_site, dst_site)
    total = sum(n for _, n in ranges)
    steps.step(f"{pair.name}: copying {total} differing blocks in {len(ranges)} ranges")
    copy_blocks(system, (src_site, src_vol), (dst_site, dst_vol), ranges, progress(f"repair {pair.name}", total))
    return ranges


def differential_resync(system: System, pair: Pair, steps: StepLog, progress: Progress = no_progress
                        ) -> list[tuple[int, int]]:
    """A Suspend pair whose recorded positions over-approximate (`verify_first`): compare digests of
    every recorded block, record exactly the differing ones, then resync; returns those ranges."""
    if pair.state != PairState.SUSPEND or not pair.verify_first:
        raise TricopyError(f"pair {pair.name} needs no differential check (it is {pair.state.value} "
                           "with its positions known)")
    src_site, dst_site = split_ref(pair.source)[0], split_ref(pair.target)[0]
    recorded = pair.bitmap.count()
    differing = take_recorded(pair, system.storage(src_site), system.storage(dst_site))
    for first, n in differing:
        pair.bitmap.mark(first, n)
    steps.step(f"{pair.name}: differential check of {recorded} recorded blocks: "
               f"{sum(n for _, n in differing)} differ in {len(differing)} ranges")
    if pair.kind == PairKind.SYNC:
        resync_pair(system, pair, steps, progress)
    else:
        group_recorded = sum(p.bitmap.count() for p in system.registry.group(PairKind.ASYNC, src_site))
        copied = system.shipper().resync(progress(f"resync async group {src_site}", group_recorded))
        steps.step(f"async group {src_site}: resynced {copied} recorded blocks, Duplex")
    return differing


def resync_all(system: System, progress: Progress = no_progress) -> StepLog:
    """Resync every suspended pair whose sites can talk again; clear the mirror write inhibit."""
    steps = StepLog("resync")
    for pair in system.registry:
        if pair.kind != PairKind.SYNC or pair.state != PairState.SUSPEND:
            continue
        if system.network.can_talk(split_ref(pair.source)[0], split_ref(pair.target)[0]):
            resync_pair(system, pair, steps, progress)
    try:
        active = system.active_site
    except TricopyError:
        return steps
    async_pairs = system.registry.group(PairKind.ASYNC, active)
    if any(p.state == PairState.SUSPEND for p in async_pairs):
        target = system.async_target_site()
        if system.network.can_talk(active, target):
            recorded = sum(p.bitmap.count() for p in async_pairs)
            copied = system.shipper().resync(progress(f"resync async group {active}", recorded))
            steps.step(f"async group {active}: resynced {copied} recorded blocks, Duplex")
    if system.topo.mode == "mirror":
        for volume in system.mirror.refresh():
            steps.step(f"mirror member {volume}: write inhibit cleared")
    return steps
