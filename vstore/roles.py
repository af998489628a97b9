"""Moving the application between sites: which site's host runs it, and the async copy that
follows it (SPEC §5 [0086]-[0118], §8 [0172]-[0173]).

Keeps true: exactly one present site has role "primary" with host settings (provider or mirror
settings and its async volume ids); a new primary gets a fresh entry spool whose sequence starts
after whatever the new async target last applied; pairs from a lost site are deleted, never left
pointing at a directory that is gone.
"""

from __future__ import annotations

import shutil

from vstore.pairs import Pair, PairKind, PairState
from vstore.procedures import StepLog, new_pair
from vstore.site import System


def drop_pair(system: System, pair: Pair, steps: StepLog) -> None:
    """Set a pair Simplex (if it is not) and delete it."""
    if pair.state != PairState.SIMPLEX:
        pair.transition(PairState.SIMPLEX, "deleted by procedure")
    system.registry.remove(pair.name)
    steps.step(f"pair {pair.name} set Simplex and deleted")


def drop_pairs_of(system: System, site: str, steps: StepLog) -> None:
    for pair in list(system.registry.involving(site)):
        drop_pair(system, pair, steps)


def reset_spool(system: System, site: str) -> None:
    """A fresh, empty entry spool for `site`'s host (stale entries of an old role are obsolete)."""
    if system._entry_log is not None:
        system._entry_log.close()
    system._entry_log = None
    system._program = None
    system._mirror = None
    spool = system.site_dir(site) / "spool"
    if spool.exists():
        shutil.rmtree(spool)
    spool.mkdir()


def make_provider_primary(system: System, site: str, volumes: list[str], steps: StepLog) -> None:
    """Site `site`'s host runs the application on `volumes` through its own provider."""
    for other, state in system.states.items():
        if other != site and state.get("role") == "primary":
            state["role"], state["host"] = "standby", None
    state = system.states[site]
    epoch = system.next_epoch()
    state["role"] = "primary"
    state["host"] = {"mode": "provider", "epoch": epoch, "spool_capacity": system.topo.spool_capacity,
                     "provider_volumes": list(volumes), "async_volumes": {v: i for i, v in enumerate(volumes)}}
    reset_spool(system, site)
    steps.step(f"site {site}: host runs the application through the provider on {', '.join(volumes)}")


def start_async_without_copy(system: System, source_site: str, target_site: str, pairs: list[tuple[str, str]],
                             steps: StepLog) -> None:
    """New async pairs source -> target that start Duplex (the volumes were made equal first)."""
    for src_vol, dst_vol in pairs:
        pair = new_pair(system, PairKind.ASYNC, f"{source_site}:{src_vol}", f"{target_site}:{dst_vol}")
        pair.transition(PairState.DUPLEX, None)
        steps.step(f"pair {pair.name}: Duplex without initial copy")
    system.journal(target_site).set_applied_seq(system.entry_log.next_seq - 1)
    system.states[target_site]["role"] = "async"
    (system.site_dir(target_site) / "recv").mkdir(exist_ok=True)


SITE_LETTER = {"primary": "A", "sync": "C", "async": "D"}


def volumes_of(system: System, site: str) -> list[str]:
    """The site's main volumes in consistency-group order (A0, A1... / C... / D...)."""
    return system.topo.volume_names(SITE_LETTER[site])
