"""The topology of a three-site deployment: `LAB/topology.toml` (DESIGN.md "user surface").

Keeps true: a topology names exactly three sites (primary, sync, async) with an address each, the
volume set (count, size, block size), the mode (`provider` = embodiment 4, `mirror` =
embodiment 1), the protection setting (SPEC §5 field 804 and the fence choice of [0040]) and the
key file. It is read once through `load_topology`, which turns every problem into one clear
sentence. Volume names follow DESIGN.md: A, B, C, D, or A0.., B0.. when `volumes` > 1.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import tomli_w

from vstore.blocks.errors import TricopyError
from vstore.replication.network import SITE_NAMES

MODES = ("provider", "mirror")
TOPOLOGY_FILE = "topology.toml"
# The volume letters of each site (DESIGN "Lab layout"): A (and B in mirror mode) at the primary
# site, C at the Sync site, D at the Async site; the first is the site's own copy of the data.
SITE_LETTERS = {"primary": ("A", "B"), "sync": ("C",), "async": ("D",)}


@dataclass(frozen=True)
class SiteSpec:
    name: str
    host: str = "127.0.0.1"
    port: int = 0


@dataclass(frozen=True)
class Topology:
    name: str
    mode: str
    size: int
    block_size: int = 4096
    volumes: int = 1
    protect: bool = True
    coalesce: bool = False
    durable: bool = False
    spool_capacity: int = 256 << 20
    key_file: str = "lab.key"
    sites: dict[str, SiteSpec] = field(default_factory=dict)
    links: dict[str, SiteSpec] = field(default_factory=dict)  # "primary-sync" -> where to connect instead
    tls: dict[str, str] | None = None  # [tls] cert, key, ca (paths relative to the lab); None = plain TCP

    def peer_address(self, from_site: str, to_site: str) -> SiteSpec:
        """Where `from_site` connects to reach `to_site`: the site itself, or a fault proxy that
        topology.toml places on that link ([links."primary-sync"] via = "127.0.0.1:PORT"). A proxy
        forwards to one address: the link's second site (sync for primary-sync, async for
        primary-async and sync-async), so only connections towards that site go through it."""
        first, second = sorted((from_site, to_site), key=SITE_NAMES.index)
        if to_site != second:
            return self.sites[to_site]
        return self.links.get(f"{first}-{second}", self.sites[to_site])

    @property
    def num_blocks(self) -> int:
        return self.size // self.block_size

    def volume_name(self, letter: str, index: int) -> str:
        """'A', 0 -> 'A' for a one-volume lab, 'A0' when there are several."""
        return letter if self.volumes == 1 else f"{letter}{index}"

    def volume_names(self, letter: str) -> list[str]:
        return [self.volume_name(letter, i) for i in range(self.volumes)]

    def letters_at(self, site: str) -> tuple[str, ...]:
        """The volume letters `site` holds in this lab (B only in mirror mode)."""
        letters = SITE_LETTERS[site]
        return letters if self.mode == "mirror" or site != "primary" else letters[:1]

    def to_toml(self) -> str:
        doc = {
            "lab": {
                "name": self.name, "mode": self.mode, "size": self.size, "block_size": self.block_size,
                "volumes": self.volumes, "protect": self.protect, "coalesce": self.coalesce,
                "durable": self.durable, "spool_capacity": self.spool_capacity, "key_file": self.key_file,
            },
            "sites": {s.name: {"host": s.host, "port": s.port} for s in self.sites.values()},
        }
        if self.tls:
            doc["tls"] = dict(self.tls)
        return "# tricopy lab topology (see README). Edit only while the lab is down.\n" + tomli_w.dumps(doc)


def default_sites(base_port: int = 7401) -> dict[str, SiteSpec]:
    return {name: SiteSpec(name, "127.0.0.1", base_port + i) for i, name in enumerate(SITE_NAMES)}


def load_topology(lab: Path) -> Topology:
    path = lab / TOPOLOGY_FILE
    if not path.is_file():
        raise TricopyError(f"{lab} is not a tricopy lab (no {TOPOLOGY_FILE}); create one with `vstore lab init {lab}`")
    try:
        doc = tomllib.loads(path.read_text())
        lab_doc = doc["lab"]
        sites = {
            name: SiteSpec(name, str(spec.get("host", "127.0.0.1")), int(spec.get("port", 0)))
            for name, spec in doc.get("sites", {}).items()
        }
        topo = Topology(
            name=str(lab_doc["name"]), mode=str(lab_doc["mode"]), size=int(lab_doc["size"]),
            block_size=int(lab_doc.get("block_size", 4096)), volumes=int(lab_doc.get("volumes", 1)),
            protect=bool(lab_doc.get("protect", True)), coalesce=bool(lab_doc.get("coalesce", False)),
            durable=bool(lab_doc.get("durable", False)),
            spool_capacity=int(lab_doc.get("spool_capacity", 256 << 20)),
            key_file=str(lab_doc.get("key_file", "lab.key")), sites=sites,
            links={name: _via(name, spec) for name, spec in doc.get("links", {}).items()},
            tls=_tls(doc["tls"]) if "tls" in doc else None,
        )
    except (tomllib.TOMLDecodeError, KeyError, TypeError, ValueError) as exc:
        raise TricopyError(f"{path} is not a valid topology file ({exc}); fix it or re-create the lab") from None
    validate(topo, path)
    return topo


def _tls(spec: dict) -> dict[str, str]:
    missing = [name for name in ("cert", "key", "ca") if not isinstance(spec.get(name), str)]
    if missing:
        raise ValueError(f"[tls] needs cert, key and ca file paths; missing {', '.join(missing)}")
    return {name: spec[name] for name in ("cert", "key", "ca")}


def _via(link: str, spec: dict) -> SiteSpec:
    host, _, port = str(spec["via"]).rpartition(":")
    return SiteSpec(link, host or "127.0.0.1", int(port))


def validate(topo: Topology, where: Path | str = "topology") -> None:
    if topo.mode not in MODES:
        raise TricopyError(f"{where}: mode must be one of {', '.join(MODES)}, not {topo.mode!r}")
    if set(topo.sites) != set(SITE_NAMES):
        raise TricopyError(f"{where}: sites must be exactly {', '.join(SITE_NAMES)}")
    if topo.block_size <= 0 or topo.block_size % 512:
        raise TricopyError(f"{where}: block_size must be a positive multiple of 512")
    if topo.size <= 0 or topo.size % topo.block_size:
        raise TricopyError(f"{where}: size must be a positive multiple of the block size {topo.block_size}")
    if not 1 <= topo.volumes <= 64:
        raise TricopyError(f"{where}: volumes must be between 1 and 64")
