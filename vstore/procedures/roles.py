"""Moving the application between sites: which site's host runs it, and the async copy that
follows it (SPEC §5 [0086]-[0118], §8 [0172]-[0173]).

Keeps true: exactly one present, fresh site has role "primary" with host settings (provider or
mirror settings, its async volume ids and its promotion epoch; a newer epoch always wins, so an old
primary that returns is "stale" until a failback demotes it); a new primary gets a fresh entry
spool whose first entry follows whatever its async target last applied; pairs from a lost site are
deleted, never left pointing at a directory that is gone; a restored site comes back with fresh
images when its directory was lost.
"""

from __future__ import annotations

import shutil

from vstore.blocks.codec import make_dir
from vstore.blocks.device import create_image
from vstore.lab.sitedir import RECV_DIR, SPOOL_DIR, external_id, new_site_state, save_site_state
from vstore.lab.system import System
from vstore.lab.topology import SITE_LETTERS
from vstore.procedures.setup import new_pair
from vstore.procedures.steps import StepLog
from vstore.replication.mirror import Member, MirrorSettings
from vstore.replication.pairs import Pair, PairKind, PairState


def volumes_of(system: System, site: str, letter: str | None = None) -> list[str]:
    """The site's volumes of one letter in consistency-group order (A0, A1... / C... / D...)."""
    return system.topo.volume_names(letter or SITE_LETTERS[site][0])


def drop_pair(system: System, pair: Pair, steps: StepLog) -> None:
    """Set a pair Simplex (if it is not) and delete it."""
    if pair.state != PairState.SIMPLEX:
        pair.transition(PairState.SIMPLEX, "deleted by procedure")
    system.registry.remove(pair.name)
    steps.step(f"pair {pair.name} set Simplex and deleted")


def drop_pairs_of(system: System, site: str, steps: StepLog) -> None:
    for pair in list(system.registry.involving(site)):
        drop_pair(system, pair, steps)


def drop_pairs_between(system: System, a: str, b: str, steps: StepLog) -> None:
    for pair in list(system.registry.involving(a)):
        if pair in system.registry.involving(b):
            drop_pair(system, pair, steps)


def reset_spool(system: System, site: str) -> None:
    """A fresh, empty entry spool for `site`'s host (stale entries of an old role are obsolete)."""
    system.reset_async_programs()
    (system.states[site].get("host") or {}).pop("spool_seq", None)  # numbering starts again
    spool = system.site_dir(site) / SPOOL_DIR
    if spool.exists():
        shutil.rmtree(spool)
    make_dir(spool)


def make_primary(system: System, site: str, volumes: list[str], steps: StepLog, *,
                 async_volumes: list[str] | None = None) -> None:
    """Site `site`'s host runs the application on `volumes`: through its provider (provider mode) or
    a mirror group per virtual volume holding that one volume (mirror mode; Fig 6 adds members)."""
    epoch = system.next_epoch()
    for other, state in system.states.items():
        if other != site and state.get("role") == "primary":
            state["role"], state["host"] = "standby", None
    state = system.states[site]
    topo = system.topo
    host: dict = {"mode": topo.mode, "epoch": epoch, "spool_capacity": topo.spool_capacity,
                  "async_volumes": {v: i for i, v in enumerate(async_volumes or volumes)},
                  "write_count_at_promotion": int(state.get("write_count", 0))}
    if topo.mode == "provider":
        host["provider_volumes"] = list(volumes)
    else:
        storage = system.storage(site)
        groups = {topo.volume_name("A", i): [Member(v, storage.volume(v).external_id)] for i, v in enumerate(volumes)}
        host["mirror"] = MirrorSettings(topo.protect, groups).to_dict()
    state["role"], state["host"], state["epoch"] = "primary", host, host["epoch"]
    reset_spool(system, site)
    what = "the provider" if topo.mode == "provider" else "the mirror program"
    steps.step(f"site {site}: host runs the application through {what} on {', '.join(volumes)} "
               f"(epoch {host['epoch']})")


def start_async_without_copy(system: System, source_site: str, target_site: str, pairs: list[tuple[str, str]],
                             steps: StepLog) -> None:
    """New async pairs source -> target that start Duplex (the volumes were made equal first)."""
    for src_vol, dst_vol in pairs:
        pair = new_pair(system, PairKind.ASYNC, f"{source_site}:{src_vol}", f"{target_site}:{dst_vol}")
        pair.transition(PairState.DUPLEX, None)
        steps.step(f"pair {pair.name}: Duplex without initial copy")
    make_dir(system.site_dir(target_site) / RECV_DIR, exist_ok=True)
    system.journal(target_site).set_applied_seq(system.entry_log.next_seq - 1)
    if system.states[target_site].get("role") != "primary":
        system.states[target_site]["role"] = "async"


def restore_site(system: System, site: str, steps: StepLog) -> None:
    """A failed site returns: with fresh images when its directory was lost or emptied, else with
    its old images, demoted (no host settings, no pairs: the survivors' view is authoritative)."""
    site_dir = system.site_dir(site)
    if site not in system.states:
        make_dir(site_dir, exist_ok=True)
        volumes = {}
        for letter in system.topo.letters_at(site):
            for name in volumes_of(system, site, letter):
                path = site_dir / f"{name}.img"
                if path.exists():
                    path.unlink()
                create_image(path, system.topo.size, system.topo.block_size)
                volumes[name] = {"file": f"{name}.img", "external_id": external_id(site, len(volumes))}
        state = new_site_state(site, "standby", volumes)
        state["epoch"] = system.lab_epoch
        save_site_state(site_dir, state, durable=system.topo.durable)
        system.add_site(site, state)
        steps.step(f"site {site} restored with fresh images ({', '.join(volumes)}), no pairs, no settings")
        return
    state = system.states[site]
    if state.get("role") == "primary" and system.stale(site):
        state["role"], state["host"] = "standby", None
        steps.step(f"site {site} returned with its old images; demoted (its old role is stale)")
    state["epoch"] = system.lab_epoch
