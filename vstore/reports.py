"""Read-only reports of an open lab, shared by the site daemon and the command line.

Keeps true: these functions only read a `System` (pairs, states, spool positions, volumes) and never
change it; they import no terminal code (typer, rich), so a daemon answering `status`, `snapshot`
or `verify` loads only the replication stack. The documents are DESIGN.md's "JSON contract":
- `status_document`: `vstore status --json` (sites, pairs, states, entries waiting, the running
  NBD exports (`exports`: address, clients, requests and their rate), the damage
  found in the spool (`spool_damage`; the async group is then Suspend), and the copies
  a stopped command left unfinished; a pair whose target such a copy was writing is never shown
  Duplex: it is shown Suspend, with the command that continues the copy as its reason; and the
  `[limits]` every site's daemon serves its peers within);
- `snapshot_of`: the dashboard's snapshot, the status document plus volumes, queue and events;
- `verify`: `vstore verify --json`'s pairs, the blocks in which a pair's source and target differ
  (blocks with unshipped entries or recorded positions are skipped, not reported), as DRBD's
  online verify does.
"""

from __future__ import annotations

import time
from pathlib import Path

from vstore.blocks.errors import TricopyError
from vstore.blocks.ranges import ranges_of
from vstore.lab.copies import unfinished
from vstore.lab.served import running_exports
from vstore.lab.system import System
from vstore.lab.topology import load_topology
from vstore.procedures.create import INIT_MARKER, mode_warnings
from vstore.replication.compare import differing_blocks
from vstore.replication.entries import entry_size
from vstore.replication.network import LINK_NAMES, SITE_NAMES
from vstore.replication.pairs import Pair, PairKind, PairState, split_ref

EVENTS_SHOWN = 8


def status_document(system: System) -> dict:
    """The `vstore status --json` document; waiting entries are counted per async pair (volume),
    the oldest age is the consistency group's."""
    doc: dict = {"lab": str(system.lab_dir), "mode": system.topo.mode, "sites": {}, "pairs": []}
    for site in SITE_NAMES:
        doc["sites"][site] = {"up": system.network.site_up(site), "role": system.role(site),
                              "present": system.present(site)}
    doc["links"] = {name: name not in system.faults.links_down for name in LINK_NAMES}
    doc["unsafe_no_flush"] = system.topo.unsafe_no_flush  # flushes do nothing (benchmarks only)
    doc["limits"] = system.topo.limits.to_dict()  # what each site's daemon holds for its peers ([limits])
    try:
        active = system.active_site
        stats = system.entry_log.stats()
        per_volume: dict[int, list[int]] = {}  # entry volume id -> [entries, bytes] waiting
        for vid, _lba, count in system.entry_log.pending_positions():
            waiting_here = per_volume.setdefault(vid, [0, 0])
            waiting_here[0] += 1
            waiting_here[1] += entry_size(count, system.topo.block_size)
    except TricopyError:
        active, stats, per_volume = None, None, {}
    for pair in system.registry:
        waiting = {"entries_waiting": 0, "bytes_waiting": 0, "oldest_waiting_s": None}
        if pair.kind == PairKind.ASYNC and stats is not None and split_ref(pair.source)[0] == active:
            vid = system.async_program.volume_ids.get(split_ref(pair.source)[1])
            entries, nbytes = per_volume.get(vid, [0, 0])
            waiting = {"entries_waiting": entries, "bytes_waiting": nbytes,
                       "oldest_waiting_s": (time.time_ns() - stats.oldest_timestamp_ns) / 1e9
                       if stats.oldest_timestamp_ns and entries else None}
        doc["pairs"].append({"name": pair.name, "source": pair.source, "target": pair.target,
                             "kind": pair.kind.value, "state": pair.state.value, "reason": pair.reason,
                             "failure": pair.failure, "recorded_blocks": pair.bitmap.count(),
                             "verify_first": pair.verify_first, **waiting})
    doc["spool_damage"] = system.spool_damage.to_dict() if system.spool_damage is not None else None
    doc["unfinished_copies"] = unfinished(system.lab_dir)
    doc["unfinished_setup"] = (system.lab_dir / INIT_MARKER).is_file()
    doc["exports"] = running_exports(system.lab_dir)  # NBD servers of the lab's volume (`vstore export`)
    for copy in doc["unfinished_copies"]:
        for p in doc["pairs"]:
            if p["target"] == copy["target"] and p["state"] == PairState.DUPLEX.value:
                # the saved state predates a stopped copy into this target: it is not a copy of anything yet
                p.update(state=PairState.SUSPEND.value, failure=True,
                         reason=f"a copy {copy['source']} -> {copy['target']} stopped at block {copy['done']} of "
                                f"{copy['total']}; run `{copy['command']}` again to continue")
    return doc


def snapshot_of(system: System) -> dict:
    """One snapshot of an open `System` (see `collect`)."""
    doc = status_document(system)
    doc["time"] = time.time()
    pairs = {p.name: p for p in system.registry}
    for site, info in doc["sites"].items():
        volumes = []
        if site in system.storages:
            for name, vol in sorted(system.storages[site].volumes.items()):
                ref = f"{site}:{name}"
                roles = [f"source of {p.name}" for p in pairs.values() if p.source == ref]
                roles += [f"target of {p.name}" for p in pairs.values() if p.target == ref]
                volumes.append({"name": name, "external_id": vol.external_id,
                                "size": vol.device.num_blocks * vol.device.block_size, "pairs": roles})
        info["volumes"] = volumes
    try:
        log = system.entry_log
        queue: dict | None = {"site": system.active_site, "confirmed_seq": log.confirmed_seq,
                              "next_seq": log.next_seq}
    except TricopyError:
        queue = None
    doc["queue"] = queue
    for p in doc["pairs"]:
        pair = pairs[p["name"]]
        p["direction"] = f"{split_ref(pair.source)[0]} -> {split_ref(pair.target)[0]}"
        p["confirmed_seq"] = (queue["confirmed_seq"] if queue and p["kind"] == "async"
                              and split_ref(pair.source)[0] == queue["site"] else None)
    events = []
    for pair in pairs.values():
        last = len(pair.history) - 1
        for i, h in enumerate(pair.history):
            failure = i == last and pair.failure and h.get("to") in ("Suspend", "Suspending")
            events.append({"time": h.get("time", 0.0), "pair": pair.name, "from": h.get("from"), "to": h.get("to"),
                           "reason": h.get("reason"), "failure": failure})
    events.sort(key=lambda e: e["time"], reverse=True)
    doc["events"] = events[:EVENTS_SHOWN * 4]
    return doc


def excluded_blocks(system: System, pair: Pair) -> set[int]:
    """Blocks where the target may legitimately differ: unshipped entries and recorded positions."""
    excluded = {lba for first, n in pair.bitmap.ranges() for lba in range(first, first + n)}
    if pair.kind != PairKind.ASYNC:
        return excluded
    try:
        program = system.async_program
    except TricopyError:
        return excluded
    site, volume = split_ref(pair.source)
    if program.source_site == site and volume in program.volume_ids:
        excluded |= program.log.unshipped_blocks(program.volume_ids[volume])
    return excluded


def verify_pair(system: System, pair: Pair, chunk_blocks: int = 64) -> dict:
    """One pair's `{"name", "differing_ranges", "blocks_compared", "skipped_unshipped"}` (or `error`)."""
    result: dict = {"name": pair.name, "differing_ranges": [], "blocks_compared": 0, "skipped_unshipped": 0}
    src_site, src_vol = split_ref(pair.source)
    dst_site, dst_vol = split_ref(pair.target)
    try:
        if pair.state == PairState.INITIAL_COPYING:
            raise TricopyError("the initial copy has not finished; nothing to compare yet")
        system.network.check(src_site, dst_site)
        src, dst = system.storage(src_site), system.storage(dst_site)
        num_blocks = src.volume(src_vol).device.num_blocks
        if dst.volume(dst_vol).device.num_blocks != num_blocks:
            raise TricopyError(f"{pair.source} and {pair.target} differ in size")
        excluded = excluded_blocks(system, pair)
        differing = differing_blocks(src, src_vol, dst, dst_vol, [(0, num_blocks)], chunk_blocks=chunk_blocks,
                                     excluded=excluded)
    except TricopyError as exc:
        result["error"] = f"cannot verify {pair.source} -> {pair.target}: {exc}"
        return result
    skipped = sum(1 for lba in excluded if 0 <= lba < num_blocks)
    result.update(differing_ranges=[list(run) for run in ranges_of(differing)], blocks_compared=num_blocks - skipped,
                  skipped_unshipped=skipped)
    return result


def verify(system: System, pair_name: str | None = None, chunk_blocks: int = 64) -> list[dict]:
    """Verify every non-Simplex pair (or only `pair_name`); one result dict per pair."""
    if chunk_blocks < 1:
        raise TricopyError("chunk_blocks must be at least 1")
    if pair_name is not None:
        pair = system.registry.get(pair_name)
        if pair.state == PairState.SIMPLEX:
            raise TricopyError(f"pair {pair_name} is Simplex: its volumes are not kept equal, nothing to verify")
        pairs = [pair]
    else:
        pairs = [p for p in system.registry if p.state != PairState.SIMPLEX]
    return [verify_pair(system, p, chunk_blocks) for p in pairs]


def lab_warnings(lab: Path) -> list[str]:
    """What `status` and `lab up` warn about: flushes that do nothing, and paths open wider than the lab keeps them."""
    flush = ([f"{lab} was created --unsafe-no-flush: flushes do nothing, so a power cut may lose writes that "
              "were flushed (benchmarks only; set unsafe_no_flush = false in topology.toml while the lab is down)"]
             if load_topology(lab).unsafe_no_flush else [])
    return [*flush, *mode_warnings(lab)]
