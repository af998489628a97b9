"""Fuzz target: a site's state.json, through `load_site_state` (the file) and `check_site_state` (a
state a peer sent), and what reads it next: `application_site`, the pairs, the mirror settings
(DESIGN "The user surface" lab layout, invariant 5; SPEC §3 [0034] both sides keep the pair state).

Keeps true for every input: loading returns a state or raises a project error. A state that loads
is what `SiteState` declares (no unknown key) and has every field the code reads in the type the
code writes: `application_site` answers, the
pairs merge into a registry, the mirror settings load, counts are non-negative integers, every
volume's image file lies inside the site directory; saving it and loading it again gives the same
document, and nothing is written beside the site directory.

Input: one flags byte, then the JSON bytes. Bits 0-1 choose the site (primary, sync, async);
bit 2 hands the document to `check_site_state` as a peer's answer instead of writing a file.
"""

from __future__ import annotations

import json
from pathlib import Path

from tools.fuzz import harness
from vstore.blocks.codec import parse_json_object
from vstore.lab.sitedir import (
    STATE_FILE,
    HostSpec,
    SiteState,
    application_site,
    check_site_state,
    lab_application_site,
    load_site_state,
    new_site_state,
    save_site_state,
)
from vstore.lab.topology import SITE_NAMES
from vstore.replication.mirror import Member, MirrorSettings
from vstore.replication.pairs import Pair, PairKind, PairRegistry, PairState


def _count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _usable(site: str, site_dir: Path, state: dict) -> None:
    """Everything the code reads of a state works, and it holds no key its declaration lacks."""
    assert set(state) <= set(SiteState.__struct_fields__), "a state with an unknown key loaded"
    assert set(state.get("host") or {}) <= set(HostSpec.__struct_fields__), "host settings with an unknown key"
    assert application_site({site: state}) in (site, None)
    registry = PairRegistry.merge_copies([state.get("pairs", {})])
    assert all(isinstance(p, Pair) for p in registry)
    assert all(_count(state.get(k, 0)) for k in ("epoch", "write_count", "mirrored_writes"))
    for spec in state.get("volumes", {}).values():
        image = (site_dir / spec["file"]).resolve()
        assert image.parent == site_dir.resolve(), f"a volume's image {spec['file']!r} is outside the site"
        assert isinstance(spec["external_id"], str)
    host = state.get("host") or {}
    if host:
        assert all(_count(vid) for vid in host["async_volumes"].values())
        assert _count(host.get("epoch", 0)) and _count(host.get("spool_capacity", 1))
        if "mirror" in host:
            MirrorSettings.from_dict(host["mirror"])


def outcome(data: bytes) -> str:
    if not data:
        return "empty"
    flags, raw = data[0], data[1:]
    site = SITE_NAMES[flags & 3 if flags & 3 < len(SITE_NAMES) else 0]
    with harness.scratch("lab") as lab:
        site_dir = lab / site
        site_dir.mkdir()
        if flags & 4:
            doc = harness.rejects(parse_json_object, raw, "a peer's state")
            if not harness.ok(doc):
                return "not a JSON object"
            got = harness.rejects(check_site_state, site, doc)
        else:
            (site_dir / STATE_FILE).write_bytes(raw)
            got = harness.rejects(load_site_state, site_dir)
            assert (site_dir / STATE_FILE).read_bytes() == raw, "loading changed state.json"
        if not harness.ok(got):
            return harness.describe(got)
        assert isinstance(got, dict)
        _usable(site, site_dir, got)
        text = json.dumps(got, sort_keys=True)
        save_site_state(site_dir, got, durable=False)
        again = load_site_state(site_dir)
        assert json.dumps(again, sort_keys=True) == text, "a saved state loads back different"
        assert lab_application_site(lab) in (site, None)
        assert sorted(p.name for p in site_dir.iterdir()) == [STATE_FILE]
        return f"state of {got['role']!r:.20}"


def check(data: bytes) -> None:
    outcome(data)


def seeds() -> list[bytes]:
    sync = Pair("A->C", PairKind.SYNC, "primary:A", "sync:C", 64)
    sync.transition(PairState.DUPLEX)
    asyn = Pair("B->D", PairKind.ASYNC, "primary:B", "async:D", 64)
    asyn.transition(PairState.DUPLEX)
    asyn.transition(PairState.SUSPENDING, "spool full", failure=True)
    asyn.record_write(5, 3)
    records = {p.name: {"version": 3, "pair": p.to_dict()} for p in (sync, asyn)}
    volumes = {"A": {"file": "A.img", "external_id": "primary/port0/lun0"},
               "B": {"file": "B.img", "external_id": "primary/port0/lun1"}}
    mirror = MirrorSettings(True, {"A": [Member("A", "primary/port0/lun0"), Member("B", "primary/port0/lun1")]})
    host = {"mode": "mirror", "epoch": 2, "spool_capacity": 1 << 20, "async_volumes": {"B": 0},
            "write_count_at_promotion": 4, "mirror": mirror.to_dict()}
    primary = {**new_site_state("primary", "primary", volumes, host), "pairs": records, "epoch": 2,
               "write_count": 9, "mirrored_writes": 9}
    provider = new_site_state("primary", "primary", {"A": volumes["A"]},
                              {"mode": "provider", "spool_capacity": 4096, "provider_volumes": ["A"],
                               "async_volumes": {"A": 0}})
    replica = {**new_site_state("async", "async", {"D": {"file": "D.img", "external_id": "async/port0/lun0"}}),
               "pairs": {"B->D": records["B->D"]}, "seen_writes": {"primary": 7}, "epoch": 2}
    docs = [(0, primary), (0, provider), (2, replica), (1, new_site_state("sync", "standby", {}))]
    return [bytes([site | peer]) + json.dumps(doc, indent=1).encode() for site, doc in docs for peer in (0, 4)]


def main() -> None:
    harness.atheris_main("sitestate", check, seeds())


if __name__ == "__main__":
    main()
