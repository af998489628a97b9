"""The in-process network between the three sites and the faults a test or operator injects.

Keeps true: a message from site X to site Y is delivered only when both sites are up, the link
X-Y is up and (for volume access) the volume has not failed; otherwise the caller gets a
`LinkDown`, `SiteDown` or `VolumeFailed` naming the cause, which the copy programs turn into a
failure Suspend (SPEC §3 [0038]-[0039]). Links are undirected and named with the two site names
in topology order ("primary-sync", "primary-async", "sync-async").

The fault set is the lab's simulation control (`LAB/faults.json`), not any site's data: deleting a
site's directory is a disaster too, and `Network` treats a missing site directory as down.
"""

from __future__ import annotations

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


def link_name(a: str, b: str) -> str:
    first, second = sorted((a, b), key=SITE_NAMES.index)
    return f"{first}-{second}"


LINK_NAMES = tuple(link_name(a, b) for i, a in enumerate(SITE_NAMES) for b in SITE_NAMES[i + 1:])
FAULTS_FILE = "faults.json"  # in the lab directory; `Faults.load`/`Faults.save` are its one reader and writer


@dataclass
class Faults:
    """What is broken right now (persisted as LAB/faults.json)."""

    sites_down: set[str] = field(default_factory=set)
    links_down: set[str] = field(default_factory=set)
    volumes_failed: set[str] = field(default_factory=set)  # "site:volume"

    def set(self, kind: str, name: str, broken: bool) -> None:
        """kind is "site", "link" or "volume" (name "site:volume")."""
        group = {"site": self.sites_down, "link": self.links_down, "volume": self.volumes_failed}[kind]
        if broken:
            group.add(name)
        else:
            group.discard(name)

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
        if f"{site}:{volume}" in self.faults.volumes_failed:
            raise VolumeFailed(f"volume {volume} at site {site} has failed")
