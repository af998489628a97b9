"""Creating a lab: the on-disk layout of DESIGN.md "user surface", then the Fig 3 set-up.

Keeps true: `init_lab` never overwrites anything — it refuses a directory that is not empty —
and leaves either a complete lab whose pairs are all Duplex, or an error naming what failed, or
(stopped by Ctrl-C or SIGTERM) a lab marked `LAB/run/init.json` whose set-up `lab init` continues
when run again, its copies resuming where they stopped. It refuses a lab whose images could not
grow to their full size on the disk unless told to overcommit.
A lab is private to its owner: every directory 0700, every file 0600, whatever the umask (the
writers of `vstore.blocks.codec`). With `group` the lab's administration is shared with that group:
directories 0770 (set-group-id, so later files keep the group), files 0660, the group recorded in
topology.toml; the lab key stays 0600. `mode_warnings` names, one line per kind of path, what is
open wider than that (shown by `lab up` and `status`).
Layout (one volume; with N > 1 volumes A0.img, A1.img, ...):

    LAB/topology.toml   LAB/lab.key (0600)   LAB/run/ (pid files, logs, copy checkpoints)
    LAB/primary/  A.img [B.img] spool/ state.json
    LAB/sync/     C.img state.json
    LAB/async/    D.img recv/ state.json
"""

from __future__ import annotations

import grp
import logging
import os
import random
import socket
import stat
from dataclasses import replace
from pathlib import Path

from vstore.blocks.codec import GROUP_DIR, PRIVATE_DIR, make_dir, save_json_atomic, write_file_atomic
from vstore.blocks.device import create_image
from vstore.blocks.errors import TricopyError, brief
from vstore.blocks.units import format_size
from vstore.lab.copies import COPIES_DIR
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
             coalesce: bool = False, unsafe_no_flush: bool = False, block_size: int = 4096, base_port: int = 7401,
             spool_capacity: int = 256 << 20, tls: bool = False, overcommit: bool = False,
             group: str | None = None, progress: Progress = no_progress,
             command: str = "the same command", durable: bool | None = None) -> StepLog:
    """Create the lab's files, then run the Fig 3 set-up. A set-up that was stopped (LAB/run/init.json
    still there) is continued instead: its copies resume where they stopped. `group`: share the
    lab's administration with this group (a name or a number) instead of keeping it private.
    `durable` is accepted from callers written when flushes could be turned off with it and changes
    nothing: flushes are durable unless `unsafe_no_flush`."""
    lab = Path(lab)
    gid, group_name = (None, None) if group is None else lab_group(group)
    topo = Topology(name=lab.name or "lab", mode=mode, size=size, block_size=block_size, volumes=volumes,
                    protect=protect, coalesce=coalesce, unsafe_no_flush=unsafe_no_flush,
                    spool_capacity=spool_capacity,
                    sites=default_sites(base_port), group=group_name)
    validate(topo, "lab init")
    if (lab / INIT_MARKER).is_file():
        return continue_setup(lab, topo, progress, command)
    if lab.exists() and (not lab.is_dir() or any(lab.iterdir())):
        raise TricopyError(f"{lab} already exists and is not empty; choose a new directory (nothing was changed)")
    check_free_space(lab, topo, overcommit)
    lab.mkdir(parents=True, exist_ok=True)
    if gid is not None:
        os.chown(lab, -1, gid)
    os.chmod(lab, PRIVATE_DIR if gid is None else GROUP_DIR)  # what is made inside follows (codec.dir_mode)
    make_dir(lab / INIT_MARKER.parent)
    make_dir(lab / COPIES_DIR)
    save_json_atomic(lab / INIT_MARKER, {"command": command}, durable=topo.durable)
    if tls:
        topo = replace(topo, tls=create_lab_certificates(lab, sorted({s.host for s in topo.sites.values()})))
    write_file_atomic(lab / TOPOLOGY_FILE, topo.to_toml().encode(), durable=topo.durable)
    create_key(lab / topo.key_file)
    for site in SITE_LETTERS:
        site_dir = lab / site
        make_dir(site_dir)
        vols: dict[str, dict] = {}
        for letter in topo.letters_at(site):
            for i in range(volumes):
                name = topo.volume_name(letter, i)
                create_image(site_dir / f"{name}.img", size, block_size)
                vols[name] = {"file": f"{name}.img", "external_id": external_id(site, len(vols))}
        host = primary_host(topo) if site == "primary" else None
        role = site
        save_site_state(site_dir, new_site_state(site, role, vols, host), durable=topo.durable)
    make_dir(lab / "async" / RECV_DIR)
    make_dir(lab / "primary" / SPOOL_DIR)
    return set_up(lab, progress, command, fresh_targets=True)


def lab_group(group: str) -> tuple[int, str]:
    """(gid, name) of the group `lab init --group` names, refused unless this user may give files to it."""
    try:
        entry = grp.getgrgid(int(group)) if group.isdigit() else grp.getgrnam(group)
    except (KeyError, OverflowError):
        raise TricopyError(f"there is no group {brief(group)} on this host; name an existing group "
                           "(see `getent group`), or leave out --group for a private lab") from None
    if os.geteuid() != 0 and entry.gr_gid not in (os.getegid(), *os.getgroups()):
        raise TricopyError(f"you are not a member of group {entry.gr_name}, so the lab's files cannot be given "
                           "to it; choose one of your groups (see `id`) or leave out --group (nothing was changed)")
    return entry.gr_gid, entry.gr_name


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


def _path_kind(rel: Path, topo: Topology) -> str | None:
    """What a path of a lab is, for `mode_warnings` (None: public by nature, a TLS certificate)."""
    name, parts = rel.name, rel.parts
    if topo.tls and str(rel) in (topo.tls["cert"], topo.tls["ca"]):
        return None
    if str(rel) == topo.key_file or (topo.tls and str(rel) == topo.tls["key"]):
        return "key files"
    if rel == Path(TOPOLOGY_FILE):
        return "topology"
    if name.endswith(".img"):
        return "images"
    if name.endswith(".lock"):
        return "lock files"
    if parts[0] == "run":
        return "logs" if name.endswith(".log") else "run files (pid files, copy checkpoints)"
    if len(parts) > 2 and parts[1] == SPOOL_DIR:
        return "spool files"
    if len(parts) > 2 and parts[1] == RECV_DIR:
        return "receive journal files"
    return "state files" if name.endswith(".json") else "other files (write intent...)"


def mode_warnings(lab: Path) -> list[str]:
    """One line per kind of path of `lab` that is open wider than the lab keeps it (0700/0600, or
    0770/0660 for a lab shared with its group; key files 0600): who else can reach it, how many,
    an example, and the chmod that closes it. Empty when everything is as private as it should be."""
    lab = Path(lab)
    topo = load_topology(lab)
    shared = topo.group is not None
    found: dict[str, list] = {}  # kind -> [count, bits beyond, example, its mode]
    for root, dirs, files in os.walk(lab):
        for name in ["", *dirs, *files]:
            path = Path(root) / name if name else Path(root)
            if name == "" and path != lab:
                continue  # a directory is seen once, from its parent
            try:
                st = os.lstat(path)
            except OSError:
                continue  # gone meanwhile
            if stat.S_ISLNK(st.st_mode):
                continue
            rel = path.relative_to(lab)
            is_dir = stat.S_ISDIR(st.st_mode)
            kind = "directories" if is_dir else _path_kind(rel, topo)
            if kind is None:
                continue
            keep = (0o770 if is_dir else 0o660) if shared and kind != "key files" else (0o700 if is_dir else 0o600)
            wider = st.st_mode & 0o077 & ~keep
            if wider:
                entry = found.setdefault(kind, [0, 0, rel, stat.S_IMODE(st.st_mode)])
                entry[0] += 1
                entry[1] |= wider
    lines = []
    for kind, (count, wider, example, mode) in found.items():
        who = " and ".join(w for w, bits in (("its group", 0o070), ("every user", 0o007)) if wider & bits)
        if kind == "key files":
            close = f"chmod 600 {lab / example}"
        else:
            close = f"chmod -R {'o-rwx' if shared else 'go-rwx'} {lab}"
        lines.append(f"{count} {kind} of {lab} {'are' if count > 1 else 'is'} open to {who} (e.g. {example}, "
                     f"mode {mode:04o}); close {'them' if count > 1 else 'it'}: {close}")
    return lines
