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
- `save` writes each reachable site's state atomically; a pair's copy at a site that is down or
  gone keeps its older version and loses to the newer copy when the site returns.
- One command at a time works on a lab (an exclusive lock on `LAB/.lock`).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

from vstore.blocks.codec import load_json, save_json_atomic
from vstore.blocks.device import BlockDevice, ImageDevice
from vstore.blocks.errors import TricopyError
from vstore.lab.topology import SITE_NAMES, Topology, load_topology
from vstore.replication.entries import EntryLog, ReceiveJournal
from vstore.replication.mirror import MirrorProgram, MirrorSettings
from vstore.replication.network import Faults, Network, SiteDown
from vstore.replication.pairs import PairKind, PairState
from vstore.replication.provider import Provider
from vstore.replication.registry import PairRegistry, split_ref
from vstore.replication.shipping import Receiver, Shipper
from vstore.replication.storage import AsyncCopyProgram, StorageSystem, Volume

log = logging.getLogger("vstore.site")

STATE_FORMAT = "tricopy-site-state"
STATE_VERSION = 1
EVIDENCE_EVERY_S = 1.0  # how often another site's copy of the write-count evidence is refreshed


def external_id(site: str, index: int) -> str:
    """An external identifier in the port+LUN style of [0031]."""
    return f"{site}/port0/lun{index}"


def new_site_state(site: str, role: str, volumes: dict[str, dict], host: dict | None = None) -> dict:
    return {"format": STATE_FORMAT, "version": STATE_VERSION, "site": site, "role": role,
            "volumes": volumes, "pairs": {}, "host": host}


class System:
    """A lab opened in one process: three storages, the network between them and the host."""

    # What the mirror program does when a member volume fails during a write (Fig 17). The
    # procedures layer, which sits above the System, installs it (vstore/procedures/__init__.py).
    volume_failure_reaction: ClassVar[Callable[[System, Any, int, bytes], Any] | None] = None

    def __init__(self, lab_dir: Path, *, lock: bool = True, local: str | None = None,
                 peers: dict[str, Any] | None = None, entry_log: EntryLog | None = None) -> None:
        """In one process (default) every site is opened from its directory. A site daemon passes
        `local` (its own site) and `peers` (RPC clients of the other sites' daemons): the other
        sites' state, volumes and receive journals are then reached over the network."""
        self.lab_dir = Path(lab_dir)
        self.topo: Topology = load_topology(self.lab_dir)
        self.local, self.peers = local, peers or {}
        self._lock_fd = self._take_lock() if lock else None
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
        self._put_states: dict[str, tuple[str, float]] = {}
        self.storages: dict[str, StorageSystem] = {}
        for site, state in self.states.items():
            self.storages[site] = self._open_storage(site, state)
        self._entry_log: EntryLog | None = entry_log
        self.entry_log_given = entry_log
        self.keep_entry_log = entry_log is not None  # a daemon keeps its spool open across requests
        self._program: AsyncCopyProgram | None = None
        self._mirror: MirrorProgram | None = None
        self._mirror_site = ""
        self._journals: dict[str, ReceiveJournal] = {}
        for site in self.receiving_sites():
            self.receiver(site).finish_stored()

    # -- opening -----------------------------------------------------------------------------------
    def remote(self, site: str) -> bool:
        return site in self.peers and site != self.local

    def _load_state(self, site: str, unreachable: set[str]) -> dict | None:
        if self.remote(site):
            from vstore.net.wire import ConnectionFailed
            try:
                state = self.peers[site].call("state.get")[0].get("state")
            except ConnectionFailed:
                unreachable.add(site)
                return None
        else:
            path = self.site_dir(site) / "state.json"
            if not path.is_file():
                return None
            state = load_json(path)
        if state is not None and state.get("format") != STATE_FORMAT:
            raise TricopyError(f"site {site}: not a tricopy site state")
        return state

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

    def _take_lock(self) -> int:
        fd = os.open(self.lab_dir / ".lock", os.O_CREAT | os.O_RDWR, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)
        return fd

    def site_dir(self, site: str) -> Path:
        return self.lab_dir / site

    def _open_storage(self, site: str, state: dict) -> StorageSystem:
        if self.remote(site):
            from vstore.net.remote import RemoteStorage
            return RemoteStorage(site, self.peers[site], state.get("volumes", {}), self.topo.block_size,  # type: ignore[return-value]
                                 self.topo.num_blocks, self.storage)
        volumes = {}
        for name, spec in state.get("volumes", {}).items():
            device = ImageDevice(self.site_dir(site) / spec["file"], self.topo.block_size, durable=self.topo.durable)
            volumes[name] = Volume(site, name, device, spec["external_id"])
        return StorageSystem(site, volumes, self.registry, self.network, self.storage,
                             fence_reject=self.topo.protect)

    def add_site(self, site: str, state: dict) -> None:
        """A site directory that (re)appeared while the system is open (failback restores it)."""
        self.states[site] = state
        self.network.present.add(site)
        self.storages[site] = self._open_storage(site, state)

    # -- look-ups ----------------------------------------------------------------------------------
    def storage(self, site: str) -> StorageSystem:
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
        candidates = [(int(state["host"].get("epoch", 0)), site) for site, state in self.states.items()
                      if state.get("role") == "primary" and state.get("host") and self.network.site_up(site)]
        if candidates:
            return max(candidates)[1]  # the newest promotion wins; an older one is a stale primary
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
            self._entry_log = EntryLog(self.site_dir(self.active_site) / "spool", durable=self.topo.durable,
                                       capacity_bytes=self.host.get("spool_capacity", self.topo.spool_capacity),
                                       block_size=self.topo.block_size)
        return self._entry_log

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
            reaction = type(self).volume_failure_reaction
            if reaction is not None:
                self._mirror.on_volume_failed = lambda member, lba, data: reaction(self, member, lba, data)
        return self._mirror

    def async_target_site(self) -> str:
        for pair in self.registry.group(PairKind.ASYNC, self.active_site):
            return split_ref(pair.target)[0]
        raise TricopyError("no async copy pair is set up from the site running the application")

    def journal(self, site: str) -> ReceiveJournal:
        if self.remote(site):
            from vstore.net.remote import RemoteJournal
            return RemoteJournal(self.peers[site])  # type: ignore[return-value]
        if site not in self._journals:
            self._journals[site] = ReceiveJournal(self.site_dir(site) / "recv", durable=self.topo.durable)
        return self._journals[site]

    def receive_targets(self, site: str) -> dict[int, str]:
        """Entry volume id -> the volume at `site` that receives it."""
        targets = {}
        for pair in self.registry:
            if pair.kind == PairKind.ASYNC and split_ref(pair.target)[0] == site:
                src_site, src_vol = split_ref(pair.source)
                targets[self._volume_id(src_site, src_vol)] = split_ref(pair.target)[1]
        return targets

    def receiver(self, site: str) -> Receiver:
        targets = self.receive_targets(site)
        if self.remote(site):
            from vstore.net.remote import RemoteReceiver
            return RemoteReceiver(self.peers[site], targets)  # type: ignore[return-value]
        storage = self.storage(site)

        def apply(volume_id: int, lba: int, data: bytes) -> None:
            if volume_id not in targets:
                raise TricopyError(f"entry for unknown volume id {volume_id} at site {site}")
            storage.apply_copy(targets[volume_id], lba, data)

        def flush() -> None:
            for name in set(targets.values()):
                storage.flush_volume(name)

        return Receiver(self.journal(site), apply, flush)

    def _volume_id(self, site: str, volume: str) -> int:
        host = self.states.get(site, {}).get("host") or {}
        ids = host.get("async_volumes") or {}
        if volume in ids:
            return int(ids[volume])
        digits = "".join(ch for ch in volume if ch.isdigit())
        return int(digits) if digits else 0

    def shipper(self) -> Shipper:
        target = self.async_target_site()
        return Shipper(self.async_program, self.storage(self.active_site), self.network, target,
                       lambda: self.receiver(target), coalescing=self.topo.coalesce)

    # -- what the application writes to -------------------------------------------------------------
    def virtual_volume_names(self) -> list[str]:
        if self.topo.mode == "mirror":
            return sorted(self.mirror.settings.groups)
        return list(self.host["provider_volumes"])

    def device(self, index: int | str = 0) -> BlockDevice:
        """The application's view of virtual volume `index`: a mirror group or the provider."""
        names = self.virtual_volume_names()
        if isinstance(index, str) and index in names:
            name = index
        else:
            try:
                name = names[int(index)]
            except (ValueError, IndexError):
                raise TricopyError(f"no virtual volume {index!r}; this lab has {', '.join(names)} "
                                   f"(or 0..{len(names) - 1})") from None
        if self.topo.mode == "mirror":
            self.async_program  # noqa: B018 - the storage's async program must be armed before writes
            return self.mirror.group(name)
        return Provider(self.storage(self.active_site), name, self.async_program)

    # -- persistence ---------------------------------------------------------------------------------
    def save(self, *, all_evidence: bool = False) -> None:
        if self._mirror is not None and (self.states.get(self._mirror_site) or {}).get("host"):
            self.states[self._mirror_site]["host"]["mirror"] = self._mirror.settings.to_dict()
        for pair in self.registry:
            now = pair.to_dict()
            if self._saved_pairs.get(pair.name) != now:  # a changed pair's copies become the newest
                self.registry.bump(pair)
                self._saved_pairs[pair.name] = now
        self._count_writes()
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
                doc = json.dumps({k: v for k, v in state.items() if k != "seen_writes"}, sort_keys=True)
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
                save_json_atomic(self.site_dir(site) / "state.json", state, durable=self.topo.durable)

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

    def save_faults(self) -> None:
        self.faults.save(self.lab_dir)

    def close(self) -> None:
        if self._entry_log is not None and not self.keep_entry_log:
            self._entry_log.close()
        for storage in self.storages.values():
            for vol in storage.volumes.values():
                vol.device.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> System:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
