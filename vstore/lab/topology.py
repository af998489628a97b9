"""The topology of a three-site deployment: `LAB/topology.toml` (DESIGN.md "user surface").

Keeps true: a topology names exactly three sites (primary, sync, async) with an address each, the
volume set (count, size, block size), the mode (`provider` = embodiment 4, `mirror` =
embodiment 1), the protection setting (SPEC §5 field 804 and the fence choice of [0040]) and the
key file. It is read once through `load_topology`, which turns every problem into one clear
sentence. Volume names follow DESIGN.md: A, B, C, D, or A0.., B0.. when `volumes` > 1.

What the file may hold is `TABLES`/`LAB_KEYS`/`SITE_KEYS`/`LINK_KEYS`/`TLS_KEYS`/`LIMIT_RANGES`
(`[limits]`: what each daemon's server holds for its peers, each value within its range, safe
defaults for what is left out; see `vstore.net.server.ServerLimits`): a key not there
is refused naming the key, its table and the known keys ("unknown key 'prot' in [sites.primary]
of LAB/topology.toml; known keys: host, port"), and a value of the wrong type is refused naming
the key. Every port is 1-65535; no two sites or link proxies share a host:port; a site's port (one
its daemon binds) is 1024 or more unless `[lab] allow_privileged_ports = true` opts in (a link's
`via` address is only connected to, so any port 1-65535 will do there). `[lab] group`, when present,
names the group that shares the lab's administration (its directories 0770, its files 0660); a lab
without it is private to its owner. A flush is durable (`durable`) unless `[lab] unsafe_no_flush =
true` says otherwise (for benchmarks; status warns); the `durable` key of labs made before flushes
were always durable is accepted and changes nothing.
"""
from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import tomli_w

from vstore.blocks.errors import TricopyError, brief
from vstore.net.server import ServerLimits
from vstore.net.wire import DEFAULT_MAX_PAYLOAD
from vstore.replication.network import LINK_NAMES, SITE_NAMES

MODES = ("provider", "mirror")
TOPOLOGY_FILE = "topology.toml"
# The volume letters of each site (DESIGN "Lab layout"): A (and B in mirror mode) at the primary
# site, C at the Sync site, D at the Async site; the first is the site's own copy of the data.
SITE_LETTERS = {"primary": ("A", "B"), "sync": ("C",), "async": ("D",)}
# What topology.toml may hold: its tables, and the keys of each with the type of their values.
TABLES = ("lab", "sites", "links", "tls", "limits")  # TOP holds these
TOP = "the top level"
LAB_KEYS: dict[str, type] = {"name": str, "mode": str, "size": int, "block_size": int, "volumes": int,
                             "protect": bool, "coalesce": bool, "durable": bool, "unsafe_no_flush": bool,
                             "spool_capacity": int,
                             "key_file": str, "allow_privileged_ports": bool, "group": str}
SITE_KEYS: dict[str, type] = {"host": str, "port": int}
LINK_KEYS: dict[str, type] = {"via": str}
TLS_KEYS: dict[str, type] = {"cert": str, "key": str, "ca": str}
# [limits]: what each site's server holds for its peers (vstore.net.server.ServerLimits), each within a range
LIMIT_RANGES: dict[str, tuple[type, float, float]] = {
    "max_unauthenticated": (int, 1, 100_000), "max_unauthenticated_per_peer": (int, 1, 100_000),
    "max_unauthenticated_bytes": (int, DEFAULT_MAX_PAYLOAD, 1 << 40), "max_connections": (int, 1, 100_000),
    "handshake_timeout": (float, 0.05, 3600.0), "idle_timeout": (float, 0.05, 7 * 86400.0)}
MAX_PORT = 65535
FIRST_UNPRIVILEGED_PORT = 1024


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
    unsafe_no_flush: bool = False  # flush does nothing: a power cut may lose what was flushed (benchmarks only)
    spool_capacity: int = 256 << 20
    key_file: str = "lab.key"
    sites: dict[str, SiteSpec] = field(default_factory=dict)
    links: dict[str, SiteSpec] = field(default_factory=dict)  # "primary-sync" -> where to connect instead
    tls: dict[str, str] | None = None  # [tls] cert, key, ca (paths relative to the lab); None = plain TCP
    allow_privileged_ports: bool = False  # site ports below 1024 (a daemon that may bind them)
    group: str | None = None  # the group sharing the lab's administration (`lab init --group`); None = private
    limits: ServerLimits = field(default_factory=ServerLimits)  # [limits] of every site's server

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
    def durable(self) -> bool:
        """A flush makes the writes before it durable (fdatasync), on every copy it covers."""
        return not self.unsafe_no_flush

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
                "spool_capacity": self.spool_capacity, "key_file": self.key_file,
            },
            "sites": {s.name: {"host": s.host, "port": s.port} for s in self.sites.values()},
        }
        if self.unsafe_no_flush:
            doc["lab"]["unsafe_no_flush"] = True
        if self.allow_privileged_ports:
            doc["lab"]["allow_privileged_ports"] = True
        if self.group is not None:
            doc["lab"]["group"] = self.group
        if self.tls:
            doc["tls"] = dict(self.tls)
        if self.limits != ServerLimits():
            doc["limits"] = self.limits.to_dict()
        return "# tricopy lab topology (see README). Edit only while the lab is down.\n" + tomli_w.dumps(doc)


def default_sites(base_port: int = 7401) -> dict[str, SiteSpec]:
    return {name: SiteSpec(name, "127.0.0.1", base_port + i) for i, name in enumerate(SITE_NAMES)}


MAX_TOPOLOGY_BYTES = 8192  # a lab's topology.toml is a few hundred bytes


def load_topology(lab: Path) -> Topology:
    path = lab / TOPOLOGY_FILE
    if not path.is_file():
        raise TricopyError(f"{lab} is not a tricopy lab (no {TOPOLOGY_FILE}); create one with `vstore lab init {lab}`")
    if path.stat().st_size > MAX_TOPOLOGY_BYTES:  # tomllib's time grows with the square of a dotted key
        raise TricopyError(f"{path} is {path.stat().st_size} bytes, not a topology file (those are under "
                           f"{MAX_TOPOLOGY_BYTES} bytes); fix it or re-create the lab")
    try:
        doc = tomllib.loads(path.read_text())
    except (ValueError, RecursionError) as exc:  # TOMLDecodeError, bad UTF-8, a number of 5000 digits, deep nesting
        raise TricopyError(f"{path} is not a valid topology file ({str(exc)[:200]}); "
                           "fix it or re-create the lab") from None
    topo = _parse(doc, path)
    validate(topo, path)
    return topo


def _parse(doc: dict, path: Path) -> Topology:
    """The Topology a parsed topology.toml describes; unknown keys and wrong types are refused."""
    _known_keys(doc, TABLES, TOP, path, what="tables")
    if "lab" not in doc:
        raise TricopyError(f"{path} has no [lab] table; fix it or re-create the lab")
    lab = _table(doc, "lab", TOP, path)
    _known_keys(lab, LAB_KEYS, "[lab]", path)

    sites_doc = _table(doc, "sites", TOP, path) if "sites" in doc else {}
    _known_keys(sites_doc, SITE_NAMES, "[sites]", path)
    sites = {name: _site(name, _table(sites_doc, name, "[sites]", path), path) for name in sites_doc}
    links_doc = _table(doc, "links", TOP, path) if "links" in doc else {}
    _known_keys(links_doc, LINK_NAMES, "[links]", path)
    links = {name: _via(name, _table(links_doc, name, "[links]", path), path) for name in links_doc}
    return Topology(
        name=_value(lab, "name", str, "[lab]", path), mode=_value(lab, "mode", str, "[lab]", path),
        size=_value(lab, "size", int, "[lab]", path),
        block_size=_value(lab, "block_size", int, "[lab]", path, 4096),
        volumes=_value(lab, "volumes", int, "[lab]", path, 1),
        protect=_value(lab, "protect", bool, "[lab]", path, True),
        coalesce=_value(lab, "coalesce", bool, "[lab]", path, False),
        unsafe_no_flush=_value(lab, "unsafe_no_flush", bool, "[lab]", path, False),
        spool_capacity=_value(lab, "spool_capacity", int, "[lab]", path, 256 << 20),
        key_file=_value(lab, "key_file", str, "[lab]", path, "lab.key"), sites=sites, links=links,
        tls=_tls(_table(doc, "tls", TOP, path), path) if "tls" in doc else None,
        limits=_limits(_table(doc, "limits", TOP, path), path) if "limits" in doc else ServerLimits(),
        allow_privileged_ports=_value(lab, "allow_privileged_ports", bool, "[lab]", path, False),
        group=_value(lab, "group", str, "[lab]", path) if "group" in lab else None,
    )


def _place(where: str, path: Path, key: str | None = None) -> str:
    """Where in topology.toml: "in [sites.primary] of PATH" or "at the top level of PATH", with
    ", line N" when `key` is found written there."""
    line = _line_of(path, where, key) if key is not None else None
    return f"{'at' if where == TOP else 'in'} {where} of {path}" + (f", line {line}" if line else "")


_HEADER = re.compile(r"^\[\[?\s*([^\]]*?)\s*\]\]?\s*(#.*)?$")


def _line_of(path: Path, where: str, key: str) -> int | None:
    """The line of topology.toml where `key` of table `where` is written: `key = ...` under its
    header, or, for an inline table (`primary = { ... }` under [sites]), the line naming it."""
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        return None
    wanted = [(where, key)]
    if where.startswith("[") and "." in where:  # [sites.primary]: also `primary = {...}` under [sites]
        parent, _, name = where[1:-1].rpartition(".")
        wanted.append((f"[{parent}]", name))
    for table, name in wanted:
        current = TOP
        pattern = re.compile(rf"^\s*(?:{re.escape(name)}|\"{re.escape(name)}\")\s*[=.]")
        for number, text in enumerate(lines, 1):
            header = _HEADER.match(text.strip())
            if header:
                current = f"[{header.group(1)}]"
                inside = f"{table[1:-1]}." if table != TOP else ""
                if f"{header.group(1)}.".startswith(f"{inside}{name}."):  # the table's own header
                    return number
            elif current == table and pattern.match(text):
                return number
    return None


def _known_keys(table: Mapping, known: Mapping | tuple[str, ...], where: str, path: Path, *,
                what: str = "keys") -> None:
    for key in table:
        if key not in known:
            raise TricopyError(f"unknown key {brief(key)} {_place(where, path, str(key))}; "
                               f"known {what}: {', '.join(known)}")


def _table(doc: Mapping, key: str, where: str, path: Path) -> dict:
    value = doc[key]
    if not isinstance(value, dict):
        name = key if where == TOP else f"{where[1:-1]}.{key}"
        raise TricopyError(f"{key!r} {_place(where, path, key)} must be a table ([{name}]), not {brief(value)}")
    return value


_TYPE_NAMES: dict[type, str] = {str: "a string", int: "an integer", bool: "true or false"}
T = TypeVar("T")


def _value(table: Mapping, key: str, kind: type[T], where: str, path: Path, default: T | None = None) -> T:
    """table[key] checked to be of `kind` (an integer is never a bool); `default` when absent,
    a missing required key (default None) is an error."""
    if key not in table:
        if default is None:
            raise TricopyError(f"missing key {key!r} {_place(where, path)}")
        return default
    value = table[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise TricopyError(f"{key} {_place(where, path, key)} must be {_TYPE_NAMES[kind]}, not {brief(value)}")
    return value


def _site(name: str, spec: dict, path: Path) -> SiteSpec:
    where = f"[sites.{name}]"
    _known_keys(spec, SITE_KEYS, where, path)
    host = _value(spec, "host", str, where, path, "127.0.0.1")
    return SiteSpec(name, host, _value(spec, "port", int, where, path))


def _limits(spec: dict, path: Path) -> ServerLimits:
    """[limits]: every key known, each value a number of its kind within its range; the rest default."""
    _known_keys(spec, LIMIT_RANGES, "[limits]", path)
    values: dict[str, float] = {}
    for key, value in spec.items():
        kind, low, high = LIMIT_RANGES[key]
        number = isinstance(value, int | float) and not isinstance(value, bool) and (kind is float or
                                                                                      isinstance(value, int))
        if not number or not low <= value <= high:
            what = "an integer" if kind is int else "a number of seconds"
            raise TricopyError(f"{key} in [limits] of {path} must be {what} from {low:g} to {high:g}, "
                               f"not {brief(value)}")
        values[key] = kind(value)
    return ServerLimits(**values)  # type: ignore[arg-type]


def _tls(spec: dict, path: Path) -> dict[str, str]:
    _known_keys(spec, TLS_KEYS, "[tls]", path)
    missing = [name for name in TLS_KEYS if not isinstance(spec.get(name), str)]
    if missing:
        raise TricopyError(f"[tls] of {path} needs cert, key and ca file paths; missing {', '.join(missing)}")
    return {name: spec[name] for name in TLS_KEYS}


def _via(link: str, spec: dict, path: Path) -> SiteSpec:
    where = f"[links.{link}]"
    _known_keys(spec, LINK_KEYS, where, path)
    via = _value(spec, "via", str, where, path)
    host, _, port = via.rpartition(":")
    if not (port.isascii() and port.isdigit() and len(port) <= 5):
        raise TricopyError(f"via {_place(where, path, 'via')} must be HOST:PORT (e.g. \"127.0.0.1:9000\"), "
                           f"not {brief(via, 60)}")
    return SiteSpec(link, host or "127.0.0.1", int(port))


def validate(topo: Topology, where: Path | str = "topology") -> None:
    if topo.mode not in MODES:
        raise TricopyError(f"{where}: mode must be one of {', '.join(MODES)}, not {brief(topo.mode)}")
    if set(topo.sites) != set(SITE_NAMES):
        raise TricopyError(f"{where}: sites must be exactly {', '.join(SITE_NAMES)}")
    if topo.block_size <= 0 or topo.block_size % 512:
        raise TricopyError(f"{where}: block_size must be a positive multiple of 512")
    if topo.size <= 0 or topo.size % topo.block_size:
        raise TricopyError(f"{where}: size must be a positive multiple of the block size {topo.block_size}")
    if not 1 <= topo.volumes <= 64:
        raise TricopyError(f"{where}: volumes must be between 1 and 64")
    if topo.spool_capacity <= 0:
        raise TricopyError(f"{where}: spool_capacity must be a positive number of bytes")
    unknown = sorted(set(topo.links) - set(LINK_NAMES))
    if unknown:
        raise TricopyError(f"{where}: unknown link {brief(unknown[0])}; links are {', '.join(LINK_NAMES)}")
    validate_addresses(topo, where)


def validate_addresses(topo: Topology, where: Path | str = "topology") -> None:
    """Every port 1-65535, a site's port unprivileged unless allowed, no host:port used twice."""
    seen: dict[tuple[str, int], str] = {}
    entries = [(f"site {name}", spec, True) for name, spec in topo.sites.items()]
    entries += [(f"link {name} (via)", spec, False) for name, spec in topo.links.items()]
    for what, spec, binds in entries:
        if not 1 <= spec.port <= MAX_PORT:
            raise TricopyError(f"{where}: the port of {what} is {spec.port}; a port is 1-{MAX_PORT}")
        if binds and spec.port < FIRST_UNPRIVILEGED_PORT and not topo.allow_privileged_ports:
            raise TricopyError(f"{where}: the port of {what} is {spec.port}, a privileged port (below "
                               f"{FIRST_UNPRIVILEGED_PORT}); use {FIRST_UNPRIVILEGED_PORT}-{MAX_PORT}, or set "
                               "allow_privileged_ports = true under [lab] if its daemon may bind it")
        address = (spec.host, spec.port)
        if address in seen:
            raise TricopyError(f"{where}: {seen[address]} and {what} both use {spec.host}:{spec.port}; "
                               "every site and link proxy needs its own address")
        seen[address] = what
