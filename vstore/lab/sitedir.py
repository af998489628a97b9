"""A site's directory: the one place that names what is in it and opens it (DESIGN "Lab layout";
SPEC §3 [0031], §4 [0044]).

Keeps true:
- `LAB/SITE/state.json` is the site's state (format `tricopy-site-state`): its role, its volumes
  (image file and external identifier in the port+LUN style of [0031]), its copy of the pairs and,
  while its host runs the application, the host's settings. `spool/` is the entry log of the site
  running the application; `recv/` is the receive journal of a site receiving async entries.
- A state document is used only after `check_site_state` (which `load_site_state` applies, and
  the daemon's `state.put` before it stores anything): it must be what `SiteState` declares, no
  unknown keys, every field in the type the code writes (role and names strings, counts
  non-negative integers, a volume's file a plain name inside the site directory, the pairs and
  the mirror settings loadable); anything else is one `FormatError` naming the key path and what
  is allowed there, before any of it is used.
- The site running the application is the one whose state says role "primary" with a host, the
  newest promotion epoch winning (an older one is a stale primary): `application_site` is the only
  code that decides it.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

from vstore.blocks.boot import boot_id
from vstore.blocks.codec import load_json, save_json_atomic
from vstore.blocks.errors import FormatError, TricopyError
from vstore.blocks.schema import Count, Positive, validate
from vstore.lab.topology import SITE_NAMES, Topology
from vstore.replication.journal import ReceiveJournal
from vstore.replication.mirror import FailureState, SyncState
from vstore.replication.pairs import PairRegistry
from vstore.replication.spool import EntryLog

STATE_FORMAT = "tricopy-site-state"
STATE_VERSION = 1
STATE_FILE = "state.json"
INCARNATION_FILE = "incarnation.json"  # which page cache the site's volumes live in (`site_incarnation`)
SPOOL_DIR = "spool"
RECV_DIR = "recv"


def external_id(site: str, index: int) -> str:
    """An external identifier in the port+LUN style of [0031]."""
    return f"{site}/port0/lun{index}"


def new_site_state(site: str, role: str, volumes: dict[str, dict], host: dict | None = None) -> dict:
    return {"format": STATE_FORMAT, "version": STATE_VERSION, "site": site, "role": role,
            "volumes": volumes, "pairs": {}, "host": host}


# -- the declaration of state.json (everything the code reads, in the types the code writes) -------------
PlainName = Annotated[str, msgspec.Meta(pattern=r"^(?!\.\.?$)[^/\x00]+$", max_length=255,
                                        description="a plain file name in the site directory: no '/', not '..'")]
VolumeId = Annotated[int, msgspec.Meta(ge=0, le=(1 << 32) - 1)]  # the entry's volume id field is 32 bits


class VolumeSpec(msgspec.Struct, forbid_unknown_fields=True):
    """A volume of the site: its image, a plain file in the site directory, and its external id [0031]."""

    file: PlainName
    external_id: str


class PairRecord(msgspec.Struct, forbid_unknown_fields=True):
    """A site's copy of a pair: the copy's version and the pair (checked by `PairRegistry`)."""

    pair: dict[str, Any]
    version: Count = 0


class MemberSpec(msgspec.Struct, forbid_unknown_fields=True):
    """A mirror group member (Fig 8: 802, 803)."""

    volume: str
    external_id: str
    sync: SyncState
    failure: FailureState
    reason: str | None = None


class MirrorSpec(msgspec.Struct, forbid_unknown_fields=True):
    """The mirror settings (Fig 8): protection (804) and each virtual volume's members."""

    protect: bool
    groups: dict[str, list[MemberSpec]]


class HostSpec(msgspec.Struct, forbid_unknown_fields=True):
    """The settings of the host running the application at this site."""

    async_volumes: dict[str, VolumeId]
    mode: Literal["provider", "mirror"] = "provider"
    epoch: Count = 0
    spool_capacity: Positive = 1
    write_count_at_promotion: Count = 0
    spool_seq: Count = 0  # the highest sequence number the spool had used when the state was saved
    provider_volumes: list[str] = []
    mirror: MirrorSpec | msgspec.UnsetType = msgspec.UNSET


class SiteState(msgspec.Struct, forbid_unknown_fields=True):
    """`LAB/SITE/state.json`, format `tricopy-site-state` version 1."""

    role: str
    format: Literal["tricopy-site-state"] = STATE_FORMAT
    version: Literal[1] = STATE_VERSION
    site: str = ""
    volumes: dict[str, VolumeSpec] = {}
    pairs: dict[str, PairRecord] = {}
    host: HostSpec | None = None  # an empty object is read as None
    epoch: Count = 0
    write_count: Count = 0
    mirrored_writes: Count = 0
    seen_writes: dict[str, Count] = {}


def check_site_state(site: str, state: object) -> dict:
    """`state` if it is a site state document as `SiteState` declares it, else a clear error."""
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise TricopyError(f"site {site}: not a tricopy site state")
    version = state.get("version", STATE_VERSION)
    if version != STATE_VERSION or isinstance(version, bool):
        shown = version if isinstance(version, int) else "of another kind"
        raise FormatError(f"site {site}: its state has format version {shown}; this tricopy reads "
                          f"{STATE_VERSION}; restore state.json from a backup or re-create the site")
    what = f"site {site}: its state"
    try:
        validate(SiteState, {**state, "host": None} if state.get("host") == {} else state, what)
        PairRegistry.merge_copies([state.get("pairs", {})])
    except FormatError as err:
        raise FormatError(f"{err}; restore state.json from a backup or re-create the site") from None
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
    """The entry log of the site running the application, with the capacity its host names. Opening
    writes nothing (a status or verify only reads it; repairs wait for the first append or confirm),
    and damage is recorded in `EntryLog.damage` for the `System` to suspend the async group."""
    return EntryLog(site_dir / SPOOL_DIR, durable=topo.durable,
                    capacity_bytes=host.get("spool_capacity", topo.spool_capacity), block_size=topo.block_size,
                    record_damage=True, defer_repairs=True, known_seq=int(host.get("spool_seq", 0)))


def open_journal(site_dir: Path, topo: Topology) -> ReceiveJournal:
    """The receive journal of a site receiving async entries."""
    return ReceiveJournal(site_dir / RECV_DIR, durable=topo.durable)


COUNTS = ("write_count", "mirrored_writes", "seen_writes", "pairs")


def state_key(state: dict) -> str:
    """A site state as saving compares it: everything but the write counts (which may wait up to
    a second, in `vstore.lab.system`), with the pairs by version (bumped when one changes); whether writes exist that no
    copy has seen, or that came after a promotion, counts at once (that is the split-brain evidence)."""
    host = dict(state.get("host") or {})
    host.pop("spool_seq", None)
    count = int(state.get("write_count", 0))
    evidence = (count > int(state.get("mirrored_writes", 0)), count > int(host.get("write_count_at_promotion", 0)))
    pairs = sorted((name, rec.get("version")) for name, rec in state.get("pairs", {}).items())
    rest = {k: v for k, v in state.items() if k not in COUNTS and k != "host"}
    return json.dumps([rest, host, evidence, pairs], sort_keys=True, default=str)


class Incarnation(msgspec.Struct, forbid_unknown_fields=True):
    """`SITE/incarnation.json`: the boot a site's daemon last ran in, and the name of its page cache."""

    boot_id: str
    incarnation: Annotated[str, msgspec.Meta(min_length=1, max_length=64)]


def site_incarnation(site_dir: Path, durable: bool = True) -> str:
    """The name of the page cache this site's volumes live in: the same as when its daemon last
    ran while the machine has not booted since (a killed process loses no cached write), a new one
    otherwise (a power cut may have lost what the site acknowledged from its cache but had not
    flushed; a peer that sees the name change treats those writes as lost). A missing or damaged
    record counts as a new boot."""
    path = site_dir / INCARNATION_FILE
    now = boot_id()
    try:
        saved = validate(Incarnation, load_json(path), str(path)) if path.is_file() else None
    except (FormatError, OSError):
        saved = None
    if saved is not None and saved.boot_id == now:
        return saved.incarnation
    name = secrets.token_hex(8)
    save_json_atomic(path, {"boot_id": now, "incarnation": name}, durable=durable)
    return name
