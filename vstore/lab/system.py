"""Three sites in one process: a lab directory opened as a running deployment (DESIGN.md
"Sites and links", "user surface").

Keeps true:
- Each site's data lives only in its own directory (`LAB/<site>/`): its raw volume images, its
  `state.json` (role, volumes with external ids, its copy of every pair it takes part in, and,
  for the site whose host runs the application, the mirror settings or provider settings), the
  primary host's entry spool (`spool/`) and the Async site's receive journal (`recv/`). Deleting
  a site's directory is a real disaster: `System` runs on whatever survives.
- A stored but unapplied batch at a receiving site is finished when the system opens, before any
  of its volumes is used (invariant 2).
- Damage found in the spool (`SpoolDamage`) suspends the async group as the system opens, with
  the damaged and unshipped entries' positions recorded (every block when unknown); the spool
  drops those entries only after `save` has stored the positions.
- `save` writes each reachable site's state atomically; a pair's copy at a site that is down or
  gone keeps its older version and loses to the newer copy when the site returns.
- One process at a time writes a lab: while open, the `System` holds the lab's claim (`LAB/.lock`,
  `vstore.blocks.holders`), exclusive, or `shared` among readers of replicas. A conflicting open is
  refused at once, naming the holder (a mount, another command), and so is any open while the lab's
  daemons serve it (they hold `LAB/run/daemons.lock`); none waits longer than a brief holder takes.
  An open that fails (a damaged state.json, a missing image) lets go of everything it took, the
  lab's claim and the images' claims, before the error leaves: the next open is not refused.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vstore.blocks.device import BlockDevice, ImageDevice
from vstore.blocks.errors import TricopyError
from vstore.blocks.holders import Claim, check_free, claim
from vstore.lab.copies import clear_finished
from vstore.lab.sitedir import (
    application_site,
    check_site_state,
    load_site_state,
    open_journal,
    open_spool,
    save_site_state,
    state_key,
)
from vstore.lab.topology import SITE_NAMES, Topology, load_topology
from vstore.net.remote import RemoteJournal, RemoteReceiver, RemoteStorage
from vstore.net.wire import ConnectionFailed
from vstore.replication.journal import AppliedJournal, BatchReceiver, ReceiveJournal, Receiver
from vstore.replication.mirror import Member, MirrorProgram, MirrorSettings
from vstore.replication.network import Faults, Network, SiteDown
from vstore.replication.pairs import PairKind, PairRegistry, PairState, split_ref
from vstore.replication.provider import Provider
from vstore.replication.shipping import GroupShipper
from vstore.replication.spool import EntryLog, SpoolDamage
from vstore.replication.storage import AsyncCopyProgram, SiteStorage, StorageSystem, Volume

log = logging.getLogger("vstore.site")

LAB_LOCK = ".lock"  # the lab's claim, held by an open System
DAEMONS_LOCK = "run/daemons.lock"  # held (shared) by the lab's daemons while they run, in LAB/run/ with their pid files
EVIDENCE_EVERY_S = 1.0  # how often a copy of the write-count evidence is refreshed when only the counts moved


# (system, failed member, lba, data) -> anything: the reaction to a member failing during a write
VolumeFailureReaction = Callable[["System", Member, int, bytes], object]


class System:
    """A lab opened in one process: three storages, the network between them and the host."""

    spool_damage: SpoolDamage | None = None  # damage found in the spool, the async group Suspended for it

    def __init__(self, lab_dir: Path, *, lock: bool = True, shared: bool = False, local: str | None = None,
                 peers: dict[str, Any] | None = None, entry_log: EntryLog | None = None,
                 volume_failure_reaction: VolumeFailureReaction | None = None,
                 unflushed: dict[str, set[int]] | None = None) -> None:
        """In one process (default) every site is opened from its directory. A site daemon passes
        `local` (its own site) and `peers` (RPC clients of the other sites' daemons): the other
        sites' state, volumes and receive journals are then reached over the network.
        `volume_failure_reaction`: what the mirror program does when a member volume fails during
        a write (Fig 17, handed down by `vstore.procedures.reactions.open_system`).
        `shared`: open to read replicas only, sharing the lab with other such readers (`_take_lock`);
        `lock=False`: take no claim (a site daemon, whose processes hold the lab together).
        `unflushed`: where the local storage remembers the extents its secondaries have not flushed
        (`StorageSystem.unflushed`; a daemon keeps it across the Systems it opens)."""
        self.volume_failure_reaction = volume_failure_reaction
        self.command = "the same command"  # what continues a stopped copy; the CLI names itself here
        self.copies_finished = False  # a checkpointed copy ended since the last save
        self.lab_dir = Path(lab_dir)
        self.topo: Topology = load_topology(self.lab_dir)
        self.local, self.peers = local, peers or {}
        self.unflushed = {} if unflushed is None else unflushed
        self.storages: dict[str, SiteStorage] = {}
        self._entry_log: EntryLog | None = None
        self.keep_entry_log = entry_log is not None  # a daemon keeps its spool open across requests
        self._claim = self._take_lock(shared) if lock else None
        try:
            self._open(shared, entry_log)
        except BaseException:  # a damaged state.json, a missing image...: nothing stays claimed or open
            self.close()
            raise

    def _open(self, shared: bool, entry_log: EntryLog | None) -> None:
        """Everything of `__init__` after the lab's claim: site states, pairs, storages, stored batches."""
        self.faults = Faults.load(self.lab_dir)
        self.states: dict[str, dict] = {}
        unreachable: set[str] = set()
        for site in SITE_NAMES:
            state = self._load_state(site, unreachable)
            if state is not None:
                self.states[site] = state
        self.network = Network(self.faults, set(self.states) | unreachable)
        self.network.unreachable = unreachable
        self.registry = self._merge_pairs()
        self._saved_pairs = {pair.name: pair.to_dict() for pair in self.registry}
        self._saved_revisions: dict[str, tuple] = {}
        self._local_saves: dict[str, tuple[str, float]] = {}
        self._put_states: dict[str, tuple[str, float]] = {}
        for site, state in self.states.items():
            self.storages[site] = self._open_storage(site, state)
        self._entry_log = entry_log
        self.entry_log_given = entry_log
        self._program: AsyncCopyProgram | None = None
        self._mirror: MirrorProgram | None = None
        self._mirror_site = ""
        self._providers: dict[tuple[str, str], Provider] = {}
        self._journals: dict[str, ReceiveJournal] = {}
        if self._claim is None or self._claim.exclusive:  # a reader who joins others: they finished them
            for site in self.receiving_sites():
                self.receiver(site).finish_stored()
        self._check_spool()
        if shared and self._claim is not None:
            self._claim.share()

    def _check_spool(self) -> None:
        """Open the spool of an async group now, so that damage in it suspends the group before
        anything reads the pairs (opening writes nothing; an unusable spool errs where it is used)."""
        try:
            site = self._active_or_none()
            if site is not None and not self.remote(site) and self.registry.group(PairKind.ASYNC, site):
                self.entry_log  # noqa: B018
        except TricopyError:
            pass

    # -- opening -----------------------------------------------------------------------------------
    def remote(self, site: str) -> bool:
        return site in self.peers and site != self.local

    def _load_state(self, site: str, unreachable: set[str]) -> dict | None:
        if self.remote(site):
            try:
                state = self.peers[site].call("state.get")[0].get("state")
            except ConnectionFailed:
                unreachable.add(site)
                return None
            return None if state is None else check_site_state(site, state)
        return load_site_state(self.site_dir(site))

    @property
    def lab_epoch(self) -> int:
        """The newest promotion epoch any present site has seen."""
        return max([int(st.get("epoch", 0)) for st in self.states.values()]
                   + [int((st.get("host") or {}).get("epoch", 0)) for st in self.states.values()], default=0)

    def stale(self, site: str) -> bool:
        """A site that missed a promotion (it was down or gone): its view of the pairs is old."""
        return site in self.states and int(self.states[site].get("epoch", 0)) < self.lab_epoch

    def _merge_pairs(self) -> PairRegistry:
        """Pairs as the freshest sites know them; a stale site's copy counts only for pairs no fresh
        site takes part in (so a pair deleted by a failover does not come back with the old site)."""
        fresh = [site for site in self.states if not self.stale(site)]
        copies = [self.states[site].get("pairs", {}) for site in fresh]
        for site in self.states:
            if site in fresh:
                continue
            copies.append({name: rec for name, rec in self.states[site].get("pairs", {}).items()
                           if not any(ref.split(":")[0] in fresh
                                      for ref in (rec["pair"]["source"], rec["pair"]["target"]))})
        return PairRegistry.merge_copies(copies)

    def _take_lock(self, shared: bool) -> Claim:
        """This process's claim on the lab (`LAB/.lock`): exclusive, or shared by readers of replicas,
        the first of whom holds it alone until the lab is open (so that it alone finishes stored
        batches; the claim is shared at the end of `__init__`). Refused at once, naming the holder,
        while another process has it, or while the lab's daemons serve it: they claim
        `DAEMONS_LOCK` first and check `LAB_LOCK` second, this claims `LAB_LOCK` first and checks
        `DAEMONS_LOCK` second, so of a daemon and a System starting together one sees the other."""
        resource = f"lab {self.lab_dir.absolute()}"
        held = claim(self.lab_dir / LAB_LOCK, exclusive=not shared, resource=resource, share_at_once=False)
        try:
            check_free(self.lab_dir / DAEMONS_LOCK, resource=resource)
        except BaseException:
            held.release()
            raise
        return held

    def site_dir(self, site: str) -> Path:
        return self.lab_dir / site

    def _open_storage(self, site: str, state: dict) -> SiteStorage:
        if self.remote(site):
            return RemoteStorage(site, self.peers[site], state.get("volumes", {}), self.topo.block_size,
                                 self.topo.num_blocks, self.storage)
        volumes: dict[str, Volume] = {}
        try:
            for name, spec in state.get("volumes", {}).items():
                device = ImageDevice(self.site_dir(site) / spec["file"], self.topo.block_size,
                                     durable=self.topo.durable, shared_claim=True)
                volumes[name] = Volume(site, name, device, spec["external_id"])
        except BaseException:  # the images opened so far let go of their claims
            for vol in volumes.values():
                vol.device.close()
            raise
        return StorageSystem(site, volumes, self.registry, self.network, self.storage,
                             fence_reject=self.topo.protect, unflushed=self.unflushed)

    def add_site(self, site: str, state: dict) -> None:
        """A site directory that (re)appeared while the system is open (failback restores it)."""
        self.states[site] = state
        self.network.present.add(site)
        self.storages[site] = self._open_storage(site, state)

    # -- look-ups ----------------------------------------------------------------------------------
    def storage(self, site: str) -> SiteStorage:
        if site not in self.storages:
            raise TricopyError(f"site {site} has no state (its directory {self.site_dir(site)} is missing)")
        return self.storages[site]

    def present(self, site: str) -> bool:
        return site in self.states

    def role(self, site: str) -> str:
        if site not in self.states:  # a daemon that does not answer may come back; a missing directory not
            return "unreachable" if site in self.network.unreachable else "lost"
        role = self.states[site]["role"]
        return f"stale-{role}" if role == "primary" and self.stale(site) else role

    @property
    def active_site(self) -> str:
        """The site whose host runs the application (role "primary")."""
        site = application_site(self.states, [s for s in self.states if self.network.site_up(s)])
        if site is not None:
            return site
        raise TricopyError("no site runs the application: the primary is lost; run `vstore recover` or "
                           "`vstore failover` first")

    def next_epoch(self) -> int:
        """The epoch for a new promotion: higher than any primary's so far."""
        return 1 + self.lab_epoch

    @property
    def host(self) -> dict:
        return self.states[self.active_site]["host"]

    def receiving_sites(self) -> list[str]:
        sites = {split_ref(p.target)[0] for p in self.registry if p.kind == PairKind.ASYNC}
        return [s for s in SITE_NAMES if s in sites and s in self.states and self.network.site_up(s)]

    # -- the async copy group ----------------------------------------------------------------------
    @property
    def entry_log(self) -> EntryLog:
        if self._entry_log is None:
            self._entry_log = open_spool(self.site_dir(self.active_site), self.topo, self.host)
        if self._entry_log.damage is not None and self._entry_log.damage is not self.spool_damage:
            self._suspend_for_spool_damage(self._entry_log, self._entry_log.damage)
        return self._entry_log

    def _suspend_for_spool_damage(self, entry_log: EntryLog, damage: SpoolDamage) -> None:
        """Entries of the spool are damaged or missing: the async group goes Suspend, loudly, with
        their positions and every unshipped entry's recorded (all blocks when unknown), in memory
        only: `save` stores the positions and only then lets the spool drop the entries."""
        self.spool_damage = damage
        ids = {name: int(vid) for name, vid in (self.host.get("async_volumes") or {}).items()}
        marks = None if damage.positions is None else [*damage.positions, *entry_log.pending_positions()]
        if marks is not None and any(vid not in ids.values() for vid, _, _ in marks):
            marks = None  # a position on no volume of the group: which blocks is not known
        reason = (f"spool damage: entries {damage.first_seq}..{damage.last_seq} damaged or missing; "
                  + ("all volumes need a full differential check" if marks is None else "their positions recorded"))
        for pair in self.registry.group(PairKind.ASYNC, self.active_site):
            if pair.state == PairState.SIMPLEX:
                continue
            vid = ids.get(split_ref(pair.source)[1])
            mine = [(lba, n) for v, lba, n in marks or () if v == vid]
            if marks is None or pair.state == PairState.INITIAL_COPYING or any(lba + n > pair.num_blocks
                                                                               for lba, n in mine):
                mine = [(0, pair.num_blocks)]
                pair.verify_first = True  # which blocks is not known: the resync compares digests first
            for lba, n in mine:
                pair.bitmap.mark(lba, n)
            if pair.state == PairState.DUPLEX:
                pair.transition(PairState.SUSPENDING, reason, failure=True)
            if pair.state != PairState.SUSPEND:
                pair.transition(PairState.SUSPEND, reason, failure=True)
            else:
                pair.reason, pair.failure = reason, True
        log.error("async group %s: Suspend: %s", self.active_site, damage)

    @property
    def async_program(self) -> AsyncCopyProgram:
        if self._program is None:
            site = self.active_site
            ids = {name: int(vid) for name, vid in self.host["async_volumes"].items()}
            self._program = AsyncCopyProgram(self.entry_log, self.registry, site, ids, self.topo.block_size)
            if self.topo.mode == "mirror":
                self.storage(site).async_program = self._program
        return self._program

    @property
    def mirror(self) -> MirrorProgram:
        if self._mirror is None:
            if "mirror" not in self.host:
                raise TricopyError("this lab runs in provider mode: it has no mirror program")
            self._mirror_site = self.active_site
            self._mirror = MirrorProgram(MirrorSettings.from_dict(self.host["mirror"]), self.storage(self.active_site))
            self._mirror.async_program = self.async_program
            reaction = self.volume_failure_reaction
            if reaction is not None:
                self._mirror.on_volume_failed = lambda member, lba, data: reaction(self, member, lba, data)
        return self._mirror

    def async_target_site(self) -> str:
        for pair in self.registry.group(PairKind.ASYNC, self.active_site):
            return split_ref(pair.target)[0]
        raise TricopyError("no async copy pair is set up from the site running the application")

    def journal(self, site: str) -> AppliedJournal:
        if self.remote(site):
            return RemoteJournal(self.peers[site])
        return self._local_journal(site)

    def _local_journal(self, site: str) -> ReceiveJournal:
        if site not in self._journals:
            self._journals[site] = open_journal(self.site_dir(site), self.topo)
        return self._journals[site]

    def receive_targets(self, site: str) -> dict[int, str]:
        """Entry volume id -> the volume at `site` that receives it."""
        targets = {}
        for pair in self.registry:
            if pair.kind == PairKind.ASYNC and split_ref(pair.target)[0] == site:
                src_site, src_vol = split_ref(pair.source)
                targets[self._volume_id(src_site, src_vol)] = split_ref(pair.target)[1]
        return targets

    def receiver(self, site: str) -> BatchReceiver:
        targets = self.receive_targets(site)
        if self.remote(site):
            return RemoteReceiver(self.peers[site], targets)
        storage = self.storage(site)
        return Receiver(self._local_journal(site), site, targets, storage.apply_copy, storage.flush_volume)

    def _volume_id(self, site: str, volume: str) -> int:
        host = self.states.get(site, {}).get("host") or {}
        ids = host.get("async_volumes") or {}
        if volume in ids:
            return int(ids[volume])
        digits = "".join(ch for ch in volume if ch.isdigit())
        return int(digits) if digits else 0

    def shipper(self) -> GroupShipper:
        target = self.async_target_site()
        return GroupShipper(self.async_program, self.storage(self.active_site), self.network, target,
                            lambda: self.receiver(target), lambda: self.storage(target),
                            coalescing=self.topo.coalesce)

    # -- what the application writes to -------------------------------------------------------------
    def virtual_volume_names(self) -> list[str]:
        if self.topo.mode == "mirror":
            return sorted(self.mirror.settings.groups)
        return list(self.host["provider_volumes"])

    def volume_name(self, index: int | str = 0) -> str:
        """The name of virtual volume `index` (its name, or its number)."""
        names = self.virtual_volume_names()
        if isinstance(index, str) and index in names:
            return index
        try:
            return names[int(index)]
        except (ValueError, IndexError):
            raise TricopyError(f"no virtual volume {index!r}; this lab has {', '.join(names)} "
                               f"(or 0..{len(names) - 1})") from None

    def device(self, index: int | str = 0) -> BlockDevice:
        """The application's view of virtual volume `index`: a mirror group or the provider."""
        name = self.volume_name(index)
        if self.topo.mode == "mirror":
            self.async_program  # noqa: B018 - the storage's async program must be armed before writes
            return self.mirror.group(name)
        key = (self.active_site, name)
        if key not in self._providers:
            self._providers[key] = Provider(self.storage(self.active_site), name, self.async_program)
        return self._providers[key]

    # -- persistence ---------------------------------------------------------------------------------
    def save(self, *, all_evidence: bool = False) -> None:
        if self._mirror is not None and (self.states.get(self._mirror_site) or {}).get("host"):
            self.states[self._mirror_site]["host"]["mirror"] = self._mirror.settings.to_dict()
        for pair in self.registry:
            if self._saved_revisions.get(pair.name) == pair.revision:
                continue
            now = pair.to_dict()
            if self._saved_pairs.get(pair.name) != now:  # a changed pair's copies become the newest
                self.registry.bump(pair)
                self._saved_pairs[pair.name] = now
            self._saved_revisions[pair.name] = pair.revision
        self._count_writes()
        host = self.states.get(self._active_or_none() or "", {}).get("host")
        if self._entry_log is not None and host:  # a spool found holding less lost entries
            host["spool_seq"] = max(int(host.get("spool_seq", 0)), self._entry_log.high_seq)
        epoch = self.lab_epoch
        for site, state in self.states.items():
            if not self.network.site_up(site):
                continue
            state["epoch"] = epoch
            state["pairs"] = self.registry.to_records(site)
            if self.remote(site):
                # Only what changed travels, and without waiting for the answer: the site applies
                # its state updates in order, before any later request on the same connection. A
                # change of the write-count evidence alone travels at most once a second (the
                # source's own `mirrored_writes` is saved with every write; see failback).
                doc = state_key(state)
                last_doc, last_time = self._put_states.get(site, ("", 0.0))
                if last_doc != doc or all_evidence or time.monotonic() - last_time >= EVIDENCE_EVERY_S:
                    try:
                        self.peers[site].post("state.put", {"state": state})
                    except SiteDown as exc:  # as if it had been unreachable when the lab was opened
                        log.warning("site %s did not get its state update: %s", site, exc)
                        self.network.unreachable.add(site)
                        continue
                    self._put_states[site] = (doc, time.monotonic())
            else:
                key = state_key(state)
                last_key, last_time = self._local_saves.get(site, (None, 0.0))
                if last_key != key or all_evidence or time.monotonic() - last_time >= EVIDENCE_EVERY_S:
                    save_site_state(self.site_dir(site), state, durable=self.topo.durable)
                    self._local_saves[site] = (key, time.monotonic())
        if self.copies_finished:  # the copies' results are in the saved state now
            clear_finished(self.lab_dir)
            self.copies_finished = False
        active = self._active_or_none()
        if self.spool_damage is not None and self._entry_log is not None and self._entry_log.damage is not None \
                and active is not None and self.network.site_up(active):
            self._entry_log.release_damage()  # the positions the damage touched are saved now

    def _count_writes(self) -> None:
        """Host writes per site, and how many of each source's writes its targets have seen: the
        evidence split-brain detection compares (a returning site's writes nobody else has)."""
        for site, storage in self.storages.items():
            state = self.states[site]
            state["write_count"] = int(state.get("write_count", 0)) + storage.host_writes
            storage.host_writes = 0
        for pair in self.registry:
            src, dst = split_ref(pair.source)[0], split_ref(pair.target)[0]
            if pair.state != PairState.DUPLEX or src not in self.states or dst not in self.states:
                continue
            if pair.kind == PairKind.SYNC:  # the source's own record: every write so far is on dst too
                self.states[src]["mirrored_writes"] = self.states[src]["write_count"]
            if pair.kind == PairKind.ASYNC and (src != self._active_or_none() or self.entry_log.stats().entries):
                continue
            self.states[dst].setdefault("seen_writes", {})[src] = self.states[src]["write_count"]

    def _active_or_none(self) -> str | None:
        try:
            return self.active_site
        except TricopyError:
            return None

    def reset_async_programs(self) -> None:
        """Close the entry log and forget the async and mirror programs: the host's role changed,
        so the next use opens them again from the new settings."""
        if self._entry_log is not None:
            self._entry_log.close()
        self._entry_log = None
        self._program = None
        self._mirror = None
        self._providers = {}
        for storage in self.storages.values():
            if isinstance(storage, StorageSystem):
                storage.async_program = None

    def close(self) -> None:
        if self._entry_log is not None and not self.keep_entry_log:
            self._entry_log.close()
        for storage in self.storages.values():
            for vol in storage.volumes.values():
                vol.device.close()
        if self._claim is not None:
            self._claim.release()
            self._claim = None

    def __enter__(self) -> System:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
