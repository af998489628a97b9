"""The in-process network between the three sites and the faults a test or operator injects.

Keeps true: a message from site X to site Y is delivered only when both sites are up, the link
X-Y is up and (for volume access) the volume has not failed; otherwise the caller gets a
`LinkDown`, `SiteDown` or `VolumeFailed` naming the cause, which the copy programs turn into a
failure Suspend (SPEC §3 [0038]-[0039]). Links are undirected and named with the two site names
in topology order ("primary-sync", "primary-async", "sync-async").

The fault set is the lab's simulation control (`LAB/faults.json`), not any site's data: deleting a
site's directory is a disaster too, and `Network` treats a missing site directory as down.

Fault targets are exact: `resolve_target` accepts a site, a link, or a volume named with its site
(`volume:sync:C`) that exists in the given site volumes; the short `volume:C` only when exactly one
site has a volume C, and then it means that site's volume. Anything else is an `UnknownFaultTarget`
naming the valid forms. `Faults.set` records only well-formed names ("site:volume" for a volume, the
form `Network.check_volume` looks up) and says whether the fault set changed.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from vstore.blocks.codec import load_json, save_json_atomic
from vstore.blocks.errors import TricopyError


class LinkDown(TricopyError):
    """The link between two sites carries nothing."""


class SiteDown(TricopyError):
    """A site (host and storage) is unreachable or destroyed."""


class VolumeFailed(TricopyError):
    """A volume's devices failed: reads and writes to it are rejected."""


SITE_NAMES = ("primary", "sync", "async")


def _name_link(a: str, b: str) -> str:
    first, second = sorted((a, b), key=SITE_NAMES.index)
    return f"{first}-{second}"


_LINKS = {(a, b): _name_link(a, b) for a in SITE_NAMES for b in SITE_NAMES if a != b}


def link_name(a: str, b: str) -> str:
    """The link between sites a and b ("primary-sync"), whichever way round (asked on every write)."""
    try:
        return _LINKS[a, b]
    except KeyError:
        return _name_link(a, b)  # a name outside SITE_NAMES: the same ValueError as always


LINK_NAMES = tuple(link_name(a, b) for i, a in enumerate(SITE_NAMES) for b in SITE_NAMES[i + 1:])
FAULTS_FILE = "faults.json"  # in the lab directory; `Faults.load`/`Faults.save` are its one reader and writer


FAULT_KINDS = ("site", "link", "volume")
TARGET_FORMS = (f"a site ({', '.join(SITE_NAMES)}), a link ({', '.join(LINK_NAMES)}) "
                "or a volume with its site, volume:SITE:VOLUME (e.g. volume:sync:C)")


class UnknownFaultTarget(TricopyError):
    """A fault target that names no site, link or volume of the lab."""


@dataclass(frozen=True)
class FaultTarget:
    """A resolved fault target: `kind` is "site", "link" or "volume"; a volume's `name` is "site:volume"."""

    kind: str
    name: str
    typed: str  # what the user wrote, e.g. "volume:C" for the volume "sync:C"

    def __str__(self) -> str:
        return f"{self.kind} {self.name}"


def resolve_target(target: str, volumes: Mapping[str, Collection[str]]) -> FaultTarget:
    """`target` as a user typed it -> the one site, link or volume it names. `volumes` maps each site
    whose state is known to its volume names; a volume of a site not in it cannot be named."""
    if target in SITE_NAMES:
        return FaultTarget("site", target, target)
    if target in LINK_NAMES:
        return FaultTarget("link", target, target)
    if target.startswith("volume:"):
        return FaultTarget("volume", _volume_ref(target, target.removeprefix("volume:"), volumes), target)
    raise UnknownFaultTarget(f"unknown target {target!r}; use {TARGET_FORMS}")


def _volume_ref(target: str, ref: str, volumes: Mapping[str, Collection[str]]) -> str:
    """The "site:volume" that `volume:REF` names, or UnknownFaultTarget saying why there is none."""
    def unknown(why: str) -> UnknownFaultTarget:
        return UnknownFaultTarget(f"unknown target {target!r}: {why}; use {TARGET_FORMS}")

    existing = ", ".join(f"{site}:{vol}" for site in SITE_NAMES for vol in sorted(volumes.get(site, ())))
    site, sep, vol = ref.partition(":")
    if sep:
        if site not in SITE_NAMES:
            raise unknown(f"there is no site {site!r}")
        if site not in volumes:
            raise unknown(f"site {site} has no state (its directory is missing), so it has no volumes")
        if vol not in volumes[site]:
            raise unknown(f"site {site} has no volume {vol!r} (volumes: {existing or 'none'})")
        return f"{site}:{vol}"
    holders = [site for site in SITE_NAMES if ref in volumes.get(site, ())]
    if not holders:
        raise unknown(f"no site has a volume {ref!r} (volumes: {existing or 'none'})")
    if len(holders) > 1:
        raise unknown(f"volume {ref!r} exists at {' and '.join(holders)}; name the site, "
                      f"e.g. volume:{holders[0]}:{ref}")
    return f"{holders[0]}:{ref}"


def _check_name(kind: str, name: str) -> None:
    if kind not in FAULT_KINDS:
        raise UnknownFaultTarget(f"unknown fault kind {kind!r}; use one of {', '.join(FAULT_KINDS)}")
    site, sep, volume = name.partition(":")
    well_formed = {"site": name in SITE_NAMES, "link": name in LINK_NAMES,
                   "volume": bool(sep and volume) and site in SITE_NAMES}[kind]
    if not well_formed:
        form = {"site": ", ".join(SITE_NAMES), "link": ", ".join(LINK_NAMES), "volume": "SITE:VOLUME"}[kind]
        raise UnknownFaultTarget(f"{kind} {name!r} is not a fault target; a {kind} is named {form}")


@dataclass
class Faults:
    """What is broken right now (persisted as LAB/faults.json)."""

    sites_down: set[str] = field(default_factory=set)
    links_down: set[str] = field(default_factory=set)
    volumes_failed: set[str] = field(default_factory=set)  # "site:volume"

    def _group(self, kind: str) -> set[str]:
        return {"site": self.sites_down, "link": self.links_down, "volume": self.volumes_failed}[kind]

    def broken(self, kind: str, name: str) -> bool:
        """Whether the site, link or volume ("site:volume") is failed now."""
        _check_name(kind, name)
        return name in self._group(kind)

    def set(self, kind: str, name: str, broken: bool) -> bool:
        """Fail (`broken`) or heal a site, link or volume (name "site:volume"); True if that changed
        the fault set. A malformed name is an `UnknownFaultTarget`, never recorded."""
        _check_name(kind, name)
        group = self._group(kind)
        if (name in group) == broken:
            return False
        if broken:
            group.add(name)
        else:
            group.discard(name)
        return True

    def to_dict(self) -> dict:
        return {"sites_down": sorted(self.sites_down), "links_down": sorted(self.links_down),
                "volumes_failed": sorted(self.volumes_failed)}

    @classmethod
    def from_dict(cls, d: dict) -> Faults:
        return cls(set(d.get("sites_down", [])), set(d.get("links_down", [])), set(d.get("volumes_failed", [])))

    @classmethod
    def load(cls, lab: Path) -> Faults:
        """LAB/faults.json; no file means nothing is broken."""
        path = Path(lab) / FAULTS_FILE
        return cls.from_dict(load_json(path)) if path.is_file() else cls()

    def save(self, lab: Path) -> None:
        """Replace LAB/faults.json atomically (daemons notice the change by its modification time)."""
        save_json_atomic(Path(lab) / FAULTS_FILE, self.to_dict(), durable=False)


class Network:
    """Answers "can X reach Y now?" from the fault set and which site directories exist."""

    def __init__(self, faults: Faults, present: set[str]) -> None:
        self.faults = faults
        self.present = present
        self.unreachable: set[str] = set()  # daemons that did not answer

    def site_up(self, site: str) -> bool:
        return site in self.present and site not in self.faults.sites_down and site not in self.unreachable

    def link_up(self, a: str, b: str) -> bool:
        return link_name(a, b) not in self.faults.links_down

    def can_talk(self, a: str, b: str) -> bool:
        return a == b or (self.site_up(a) and self.site_up(b) and self.link_up(a, b))

    def check(self, src: str, dst: str) -> None:
        """Raise the precise reason why `src` cannot reach `dst`, or return."""
        for site in (src, dst):
            if not self.site_up(site):
                why = "destroyed (directory missing)" if site not in self.present else "down"
                raise SiteDown(f"site {site} is {why}")
        if src != dst and not self.link_up(src, dst):
            raise LinkDown(f"link {link_name(src, dst)} is down")

    def check_volume(self, site: str, volume: str) -> None:
        if self.faults.volumes_failed and f"{site}:{volume}" in self.faults.volumes_failed:
            raise VolumeFailed(f"volume {volume} at site {site} has failed")
