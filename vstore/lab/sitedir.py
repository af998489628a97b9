"""A site's directory: the one place that names what is in it and opens it (DESIGN "Lab layout";
SPEC §3 [0031], §4 [0044]).

Keeps true:
- `LAB/SITE/state.json` is the site's state (format `tricopy-site-state`): its role, its volumes
  (image file and external identifier in the port+LUN style of [0031]), its copy of the pairs and,
  while its host runs the application, the host's settings. `spool/` is the entry log of the site
  running the application; `recv/` is the receive journal of a site receiving async entries.
- A state document is used only after `check_site_state` (which `load_site_state` applies): every
  field the code reads has the type the code writes (role and names strings, counts non-negative
  integers, a volume's file a plain name inside the site directory, the pairs and the mirror
  settings loadable); anything else is one `FormatError` naming the field, before any of it is used.
- The site running the application is the one whose state says role "primary" with a host, the
  newest promotion epoch winning (an older one is a stale primary): `application_site` is the only
  code that decides it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from vstore.blocks.codec import is_count, load_json, save_json_atomic
from vstore.blocks.errors import FormatError, TricopyError
from vstore.lab.topology import SITE_NAMES, Topology
from vstore.replication.journal import ReceiveJournal
from vstore.replication.mirror import FailureState, MirrorSettings, SyncState
from vstore.replication.pairs import PairRegistry
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
    """`state` if it is a site state document whose fields have the types the code reads, else a
    clear error."""
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise TricopyError(f"site {site}: not a tricopy site state")
    problem = _state_problem(state)
    if problem is not None:
        raise FormatError(f"site {site}: its state {problem}; restore state.json from a backup or "
                          "re-create the site")
    return state


_COUNTS = ("epoch", "write_count", "mirrored_writes")
_HOST_COUNTS = ("epoch", "write_count_at_promotion")


def _str_map(value: object, ok: Callable[[object], bool]) -> bool:
    return isinstance(value, dict) and all(isinstance(k, str) and ok(v) for k, v in value.items())


def _plain_name(value: object) -> bool:
    """A file name that stays inside the directory it is joined to."""
    return isinstance(value, str) and value not in ("", ".", "..") and "/" not in value and "\0" not in value


def _state_problem(state: dict) -> str | None:
    """What is wrong with a state document's fields, or None."""
    version = state.get("version", STATE_VERSION)
    if version != STATE_VERSION or isinstance(version, bool):
        shown = version if isinstance(version, int) else "of another kind"
        return f"has format version {shown}; this tricopy reads {STATE_VERSION}"
    for key in ("role", "site"):
        if not isinstance(state.get(key, ""), str) or key == "role" and "role" not in state:
            return f"has no {key} name"
    for key in _COUNTS:
        if not is_count(state.get(key, 0)):
            return f"field {key!r} is not a non-negative integer"
    if not _str_map(state.get("seen_writes", {}), is_count):
        return "field 'seen_writes' is not a map of sites to counts"
    if not _str_map(state.get("volumes", {}), lambda v: isinstance(v, dict) and _plain_name(v.get("file"))
                    and isinstance(v.get("external_id"), str)):
        return "field 'volumes' is not a map of volumes to an image file name and an external identifier"
    host = state.get("host")
    if host is not None:
        problem = _host_problem(host)
        if problem is not None:
            return f"host settings {problem}"
    try:
        PairRegistry.merge_copies([state.get("pairs", {})])
    except FormatError as err:
        return f"pairs: {err}"
    return None


def _host_problem(host: object) -> str | None:
    if not isinstance(host, dict):
        return "are not an object"
    if not host:
        return None
    for key in _HOST_COUNTS:
        if not is_count(host.get(key, 0)):
            return f"field {key!r} is not a non-negative integer"
    capacity = host.get("spool_capacity", 1)
    if not is_count(capacity) or not capacity:
        return "field 'spool_capacity' is not a positive number of bytes"
    if not isinstance(host.get("mode", ""), str):
        return "field 'mode' is not a string"
    if not _str_map(host.get("async_volumes"), is_count):
        return "field 'async_volumes' is not a map of volumes to volume ids"
    volumes = host.get("provider_volumes", [])
    if not isinstance(volumes, list) or not all(isinstance(v, str) for v in volumes):
        return "field 'provider_volumes' is not a list of volume names"
    if "mirror" in host and not _mirror_ok(host["mirror"]):
        return "field 'mirror' is not mirror settings (protection and groups of members)"
    return None


def _mirror_ok(mirror: object) -> bool:
    def member_ok(m: object) -> bool:
        return (isinstance(m, dict) and isinstance(m.get("volume"), str) and isinstance(m.get("external_id"), str)
                and m.get("sync") in tuple(SyncState) and m.get("failure") in tuple(FailureState)
                and isinstance(m.get("reason"), str | None))

    if not isinstance(mirror, dict) or not isinstance(mirror.get("protect"), bool):
        return False
    if not _str_map(mirror.get("groups"), lambda ms: isinstance(ms, list) and all(member_ok(m) for m in ms)):
        return False
    MirrorSettings.from_dict(mirror)  # now it cannot fail
    return True


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
