"""Creating a lab: the on-disk layout of DESIGN.md "user surface", then the Fig 3 set-up.

Keeps true: `init_lab` never overwrites anything — it refuses a directory that is not empty —
and leaves either a complete lab whose pairs are all Duplex, or an error naming what failed.
Layout (one volume; with N > 1 volumes A0.img, A1.img, ...):

    LAB/topology.toml   LAB/lab.key (0600)
    LAB/primary/  A.img [B.img] spool/ state.json
    LAB/sync/     C.img state.json
    LAB/async/    D.img recv/ state.json
"""

from __future__ import annotations

import random
import socket
from dataclasses import replace
from pathlib import Path

from vstore.blocks.device import create_image
from vstore.blocks.errors import TricopyError
from vstore.lab.sitedir import RECV_DIR, SPOOL_DIR, external_id, new_site_state, save_site_state
from vstore.lab.system import System
from vstore.lab.topology import SITE_LETTERS, TOPOLOGY_FILE, Topology, default_sites, validate
from vstore.net.keys import create_key
from vstore.net.tls import create_lab_certificates
from vstore.procedures.setup import Progress, StepLog, fig3_initial_setup, no_progress
from vstore.replication.mirror import Member, MirrorSettings


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
             spool_capacity: int = 256 << 20, tls: bool = False, progress: Progress = no_progress) -> StepLog:
    lab = Path(lab)
    topo = Topology(name=lab.name or "lab", mode=mode, size=size, block_size=block_size, volumes=volumes,
                    protect=protect, coalesce=coalesce, durable=durable, spool_capacity=spool_capacity,
                    sites=default_sites(base_port))
    validate(topo, "lab init")
    if lab.exists() and (not lab.is_dir() or any(lab.iterdir())):
        raise TricopyError(f"{lab} already exists and is not empty; choose a new directory (nothing was changed)")
    lab.mkdir(parents=True, exist_ok=True)
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
    with System(lab) as system:
        steps = fig3_initial_setup(system, progress, fresh_targets=True)
        system.save()
    return steps


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
