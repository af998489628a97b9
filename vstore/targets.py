"""`lab:LAB[@SITE]` targets: a lab's volume as a block device for jfs (DESIGN.md "user surface", SPEC §8).

Keeps true:
- `lab:LAB` is the application's volume at the site that runs it, written through the replicating
  path (the provider in provider mode, the mirror group in mirror mode), so every block the file
  system writes is sync-copied and becomes an entry; `lab:LAB@sync` / `lab:LAB@async` is that site's
  replica, read-only unless that site runs the application (after a failover or recovery).
- While the lab is up, the volume is reached through the daemons (the coordinator for the
  application's volume, the site's own daemon for a replica); otherwise the lab is opened in this
  process. Closing the device flushes it and saves every site's state.
- One writer at a time: in process, the device holds the lab's claim (the `System`'s, `LAB/.lock`)
  until closed, exclusive for the application's volume, shared for a replica (replica readers share);
  through the daemons, the application's volume holds the application writer's claim
  (`LAB/run/app-0.lock`, `APP_LOCK`), exclusive when writable, shared when read-only, taken here in
  the client's process since every client of `lab:LAB` names the lab's directory. A second writer
  (or a reader of the application's volume while a writer has it) is refused at once, naming it.
- `parse_lab_target` is the one parser of `lab:LAB[@SITE]`. jfs reaches this module only through
  its target registry: `open_lab_target` is registered as the `jfs.targets` entry point `lab`, and
  besides opening it answers jfs's two other questions about a target (`absolute`, `replica`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from vstore.blocks.device import BlockDevice
from vstore.blocks.errors import ReadOnlyError, TricopyError
from vstore.blocks.holders import claim
from vstore.daemons.processes import RUN_DIR, clients, coordinator, is_up
from vstore.lab.system import System
from vstore.lab.topology import SITE_NAMES, load_topology
from vstore.net.keys import load_key
from vstore.net.remote import AppDevice, RemoteDevice
from vstore.net.rpc import STATE_GET
from vstore.procedures.reactions import open_system
from vstore.procedures.roles import volumes_of

PREFIX = "lab:"
APP_LOCK = "app-0.lock"  # in LAB/run/: the claim of the application's volume through the daemons


def parse_lab_target(target: str) -> tuple[Path, str | None]:
    """`lab:LAB[@SITE]` -> (LAB, SITE or None); a TricopyError names what is wrong."""
    body = target.removeprefix(PREFIX)
    lab, _, site = body.partition("@")
    if not lab:
        raise TricopyError(f"{target}: name a lab directory, e.g. lab:/tmp/lab or lab:/tmp/lab@sync")
    if site and site not in SITE_NAMES:
        raise TricopyError(f"{target}: unknown site {site!r}; use one of {', '.join(SITE_NAMES)}")
    return Path(lab), site or None


class LabDevice(BlockDevice):
    """A lab volume that keeps its System open until closed."""

    def __init__(self, system: System, inner: BlockDevice, *, readonly: bool, name: str) -> None:
        self.system = system
        self.inner = inner
        self.readonly = readonly
        self.block_size = inner.block_size
        self.num_blocks = inner.num_blocks
        self.name = name

    def _read(self, lba: int, count: int) -> bytes:
        return self.inner.read(lba, count)

    def _write(self, lba: int, data: bytes) -> None:
        if self.readonly:
            raise ReadOnlyError(f"{self.name} is a read-only replica")
        self.inner.write(lba, data)

    def flush(self) -> None:
        if not self.readonly:
            self.inner.flush()

    def has_unshipped(self, ranges: Iterable[tuple[int, int]]) -> bool:
        return self.inner.has_unshipped(ranges)

    def close(self) -> None:
        if self.system is None:
            return
        try:
            if not self.readonly:
                self.inner.flush()
                self.system.save()
        finally:
            self.system.close()
            self.system = None  # type: ignore[assignment]


def open_through_daemons(lab: Path, site: str | None, *, writable: bool, target: str) -> BlockDevice:
    """While the lab is up: the application's volume via the coordinating daemon, or a replica
    read block by block from its site's daemon."""
    try:
        client = coordinator(lab)
    except TricopyError:
        if site is None or writable:
            raise
        client = None  # no site runs the application: a replica can still be read from its daemon
    if client is not None:
        device = AppDevice(client, 0, readonly=not writable)
        active = device.active
        if site is None or site == active:
            try:
                device.claim = claim(lab / RUN_DIR / APP_LOCK, exclusive=writable, resource=f"lab:{lab.absolute()}")
            except BaseException:
                device.close()
                raise
            return device
        device.close()
        if writable:
            raise TricopyError(f"{target} is a read-only replica: the application runs at {active}")
    topo = load_topology(lab)
    replica = clients(lab, topo, load_key(lab / topo.key_file))[site]
    state = replica.call(STATE_GET)[0]["state"] or {}
    volume = next((v for v in sorted(state.get("volumes", {})) if v[0] in "CD" or site == "primary"), None)
    if volume is None:
        raise TricopyError(f"site {site} has no volume to read")
    remote = RemoteDevice(replica, site, volume, topo.block_size, topo.num_blocks)
    remote.readonly = True
    return remote


def open_lab(target: str, *, writable: bool) -> BlockDevice:
    """The block device `lab:LAB[@SITE]` names (see the module docstring)."""
    lab, site = parse_lab_target(target)
    if not lab.is_dir():
        raise TricopyError(f"{lab} does not exist; create a lab with `vstore lab init {lab}`")
    if is_up(lab):
        return open_through_daemons(lab, site, writable=writable, target=target)
    shared = site is not None and not writable  # a replica's readers share the lab
    system = open_system(lab, shared=shared)
    try:
        try:
            active = system.active_site
        except TricopyError:
            active = None
        if shared and site == active:  # the application's volume after all: only under the exclusive claim
            system.close()
            system = open_system(lab)
            active = system.active_site
        if site is None or site == active:
            if active is None:
                raise TricopyError(f"{target}: no site runs the application (the primary is lost); run "
                                   f"`vstore recover {lab} --to sync` or name a replica with @sync / @async")
            return LabDevice(system, system.device(0), readonly=not writable, name=f"lab:{lab}@{active}")
        if writable:
            raise TricopyError(f"{target} is a read-only replica: the application runs at {active}; "
                               "fail over or recover to make it writable")
        system.network.check(site, site)
        volume = volumes_of(system, site)[0]
        inner = system.storage(site).volume(volume).device
        return LabDevice(system, inner, readonly=True, name=f"lab:{lab}@{site}")
    except BaseException:
        system.close()
        raise


class LabTargets:
    """The `lab:` kind of jfs target: open one, and say what jfs must know of it before opening."""

    def __call__(self, target: str, *, writable: bool) -> BlockDevice:
        return open_lab(target, writable=writable)

    def absolute(self, target: str) -> str:
        """TARGET with its lab directory made absolute (a mount process does not share our directory)."""
        lab, site = parse_lab_target(target)
        return f"{PREFIX}{os.path.abspath(lab)}" + (f"@{site}" if site else "")

    def replica(self, target: str) -> bool:
        """Whether TARGET names one site's replica (`@SITE`), which jfs mounts read-only."""
        return parse_lab_target(target)[1] is not None


open_lab_target = LabTargets()
