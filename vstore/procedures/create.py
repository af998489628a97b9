"""Creating a lab: the on-disk layout of DESIGN.md "user surface", then the Fig 3 set-up.

Keeps true: `init_lab` never overwrites anything — it refuses a directory that is not empty —
and leaves either a complete lab whose pairs are all Duplex, or an error naming what failed, or
(stopped by Ctrl-C or SIGTERM) a lab marked `LAB/run/init.json` whose set-up `lab init` continues
when run again, its copies resuming where they stopped. It refuses a lab whose images could not
grow to their full size on the disk unless told to overcommit.
Layout (one volume; with N > 1 volumes A0.img, A1.img, ...):

    LAB/topology.toml   LAB/lab.key (0600)
    LAB/primary/  A.img [B.img] spool/ state.json
    LAB/sync/     C.img state.json
    LAB/async/    D.img recv/ state.json
"""

from __future__ import annotations

import logging
import os
import random
import socket
from dataclasses import replace
from pathlib import Path

from vstore.blocks.codec import save_json_atomic
from vstore.blocks.device import create_image
from vstore.blocks.errors import TricopyError
from vstore.blocks.units import format_size
from vstore.lab.sitedir import RECV_DIR, SPOOL_DIR, external_id, new_site_state, save_site_state
from vstore.lab.system import System
from vstore.lab.topology import SITE_LETTERS, TOPOLOGY_FILE, Topology, default_sites, load_topology, validate
from vstore.net.keys import create_key
from vstore.net.tls import create_lab_certificates
from vstore.procedures.setup import fig3_initial_setup
from vstore.procedures.steps import Progress, StepLog, no_progress
from vstore.replication.mirror import Member, MirrorSettings

log = logging.getLogger("vstore.procedures")
INIT_MARKER = Path("run") / "init.json"  # present while the set-up of a new lab has not finished


def ephemeral_low() -> int:
    """The first port the kernel hands out to outgoing connections."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def ports_free(base: int, count: int) -> bool:
    socks = []
    try:
        for port in range(base, base + count):
            s = socket.socket()
            socks.append(s)
            s.bind(("127.0.0.1", port))
        return True
    except OSError:
        return False
    finally:
        for s in socks:
            s.close()


def free_base_port(count: int = 3) -> int:
    """`count` consecutive free loopback ports (best effort), below the kernel's ephemeral range: a
    daemon port inside that range can be taken as the source port of a connection to itself (TCP
    simultaneous open) while the daemon is down, which makes the restarted daemon's bind fail."""
    high = max(ephemeral_low() - count, 12000)
    for _ in range(100):
        base = random.randrange(10000, high)
        if ports_free(base, count):
            return base
    raise TricopyError("found no free loopback ports for the lab; pass --base-port")


def init_lab(lab: Path, *, mode: str = "provider", size: int = 64 << 20, volumes: int = 1, protect: bool = True,
             coalesce: bool = False, durable: bool = False, block_size: int = 4096, base_port: int = 7401,
             spool_capacity: int = 256 << 20, tls: bool = False, overcommit: bool = False,
             progress: Progress = no_progress, command: str = "the same command") -> StepLog:
    """Create the lab's files, then run the Fig 3 set-up. A set-up that was stopped (LAB/run/init.json
    still there) is continued instead: its copies resume where they stopped."""
    lab = Path(lab)
    topo = Topology(name=lab.name or "lab", mode=mode, size=size, block_size=block_size, volumes=volumes,
                    protect=protect, coalesce=coalesce, durable=durable, spool_capacity=spool_capacity,
                    sites=default_sites(base_port))
    validate(topo, "lab init")
    if (lab / INIT_MARKER).is_file():
        return continue_setup(lab, topo, progress, command)
    if lab.exists() and (not lab.is_dir() or any(lab.iterdir())):
        raise TricopyError(f"{lab} already exists and is not empty; choose a new directory (nothing was changed)")
    check_free_space(lab, topo, overcommit)
    lab.mkdir(parents=True, exist_ok=True)
    (lab / INIT_MARKER).parent.mkdir()
    save_json_atomic(lab / INIT_MARKER, {"command": command}, durable=durable)
    if tls:
        topo = replace(topo, tls=create_lab_certificates(lab, sorted({s.host for s in topo.sites.values()})))
    (lab / TOPOLOGY_FILE).write_text(topo.to_toml())
    create_key(lab / topo.key_file)
    for site in SITE_LETTERS:
        site_dir = lab / site
        site_dir.mkdir()
        vols: dict[str, dict] = {}
        for letter in topo.letters_at(site):
            for i in range(volumes):
                name = topo.volume_name(letter, i)
                create_image(site_dir / f"{name}.img", size, block_size)
                vols[name] = {"file": f"{name}.img", "external_id": external_id(site, len(vols))}
        host = primary_host(topo) if site == "primary" else None
        role = site
        save_site_state(site_dir, new_site_state(site, role, vols, host), durable=durable)
    (lab / "async" / RECV_DIR).mkdir()
    (lab / "primary" / SPOOL_DIR).mkdir()
    return set_up(lab, progress, command, fresh_targets=True)


def set_up(lab: Path, progress: Progress, command: str, *, fresh_targets: bool) -> StepLog:
    """Fig 3 on the lab's files, then the set-up is done (the marker goes)."""
    with System(lab) as system:
        system.command = command
        steps = fig3_initial_setup(system, progress, fresh_targets=fresh_targets)
        system.save()
    (lab / INIT_MARKER).unlink()
    return steps


def continue_setup(lab: Path, asked: Topology, progress: Progress, command: str) -> StepLog:
    """The set-up of `lab` was stopped: run Fig 3 again, its finished copies skipped and the stopped
    one continued. The lab keeps the options it was created with; other options are refused."""
    topo = load_topology(lab)
    differ = [f"--{key.replace('_', '-')} {getattr(topo, key)}" for key in ("mode", "size", "volumes", "block_size")
              if getattr(topo, key) != getattr(asked, key)]
    if differ:
        raise TricopyError(f"the set-up of {lab} was stopped; it continues with the options it was created with "
                           f"({', '.join(differ)}); delete {lab} to start over with other options")
    log.warning("%s: continuing a stopped set-up", lab)
    # Blocks past a stopped copy's position may hold a half-written chunk of a killed run: copy them all.
    return set_up(lab, progress, command, fresh_targets=False)


def check_free_space(lab: Path, topo: Topology, overcommit: bool) -> None:
    """The images are sparse, but they can grow to their full size: refuse a lab the disk cannot
    hold at that size, unless asked to overcommit."""
    images = sum(len(topo.letters_at(site)) for site in SITE_LETTERS) * topo.volumes
    full = images * topo.size + topo.spool_capacity
    parent = next(p for p in [lab, *lab.absolute().parents] if p.exists())
    st = os.statvfs(parent)
    free = st.f_bavail * st.f_frsize
    if full > free and not overcommit:
        raise TricopyError(f"{images} images of {format_size(topo.size)} and a spool of "
                           f"{format_size(topo.spool_capacity)} can grow to {format_size(full)}, but {parent} has "
                           f"{format_size(free)} free; choose a smaller --size, or pass --overcommit to create "
                           "sparse images that may fill the disk (nothing was changed)")
    if full > free:
        log.warning("%s: the images can grow to %s; the disk has %s free (overcommitted)", lab,
                    format_size(full), format_size(free))


def primary_host(topo: Topology) -> dict:
    """The primary host's settings: the mirror group with A alone (Fig 3 start) or the provider."""
    host: dict = {"mode": topo.mode, "spool_capacity": topo.spool_capacity}
    if topo.mode == "mirror":
        groups = {topo.volume_name("A", i): [Member(topo.volume_name("A", i), external_id("primary", i))]
                  for i in range(topo.volumes)}
        host["mirror"] = MirrorSettings(topo.protect, groups).to_dict()
        host["async_volumes"] = {topo.volume_name("B", i): i for i in range(topo.volumes)}
    else:
        host["provider_volumes"] = topo.volume_names("A")
        host["async_volumes"] = {topo.volume_name("A", i): i for i in range(topo.volumes)}
    return host
