"""A site's directory: the one place that names what is in it and opens it (DESIGN "Lab layout";
SPEC §3 [0031], §4 [0044]).

Keeps true:
- `LAB/SITE/state.json` is the site's state (format `tricopy-site-state`): its role, its volumes
  (image file and external identifier in the port+LUN style of [0031]), its copy of the pairs and,
  while its host runs the application, the host's settings. `spool/` is the entry log of the site
  running the application; `recv/` is the receive journal of a site receiving async entries.
- The site running the application is the one whose state says role "primary" with a host, the
  newest promotion epoch winning (an older one is a stale primary): `application_site` is the only
  code that decides it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

from vstore.blocks.codec import load_json, save_json_atomic
from vstore.blocks.errors import TricopyError
from vstore.lab.topology import SITE_NAMES, Topology
from vstore.replication.journal import ReceiveJournal
from vstore.replication.spool import EntryLog

STATE_FORMAT = "tricopy-site-state"
STATE_VERSION = 1
STATE_FILE = "state.json"
SPOOL_DIR = "spool"
RECV_DIR = "recv"


def external_id(site: str, index: int) -> str:
    """An external identifier in the port+LUN style of [0031]."""
    return f"{site}/port0/lun{index}"


def new_site_state(site: str, role: str, volumes: dict[str, dict], host: dict | None = None) -> dict:
    return {"format": STATE_FORMAT, "version": STATE_VERSION, "site": site, "role": role,
            "volumes": volumes, "pairs": {}, "host": host}


def check_site_state(site: str, state: object) -> dict:
    """`state` if it is a site state document, else a clear error."""
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise TricopyError(f"site {site}: not a tricopy site state")
    return state


def load_site_state(site_dir: Path) -> dict | None:
    """The state saved in a site directory, or None when the site has none (it is gone)."""
    path = site_dir / STATE_FILE
    if not path.is_file():
        return None
    return check_site_state(site_dir.name, load_json(path))


def save_site_state(site_dir: Path, state: dict, *, durable: bool) -> None:
    save_json_atomic(site_dir / STATE_FILE, state, durable=durable)


def application_site(states: Mapping[str, dict], up: Iterable[str] = SITE_NAMES) -> str | None:
    """The site whose host runs the application among the sites `up`, or None."""
    alive = set(up)
    candidates = [(int(state["host"].get("epoch", 0)), site) for site, state in states.items()
                  if site in alive and state.get("role") == "primary" and state.get("host")]
    return max(candidates)[1] if candidates else None


def lab_application_site(lab: Path) -> str | None:
    """`application_site` from the site directories present in `lab`."""
    states = {site: state for site in SITE_NAMES if (state := load_site_state(lab / site)) is not None}
    return application_site(states)


def open_spool(site_dir: Path, topo: Topology, host: Mapping) -> EntryLog:
    """The entry log of the site running the application, with the capacity its host names."""
    return EntryLog(site_dir / SPOOL_DIR, durable=topo.durable,
                    capacity_bytes=host.get("spool_capacity", topo.spool_capacity), block_size=topo.block_size)


def open_journal(site_dir: Path, topo: Topology) -> ReceiveJournal:
    """The receive journal of a site receiving async entries."""
    return ReceiveJournal(site_dir / RECV_DIR, durable=topo.durable)
