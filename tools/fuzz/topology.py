"""Fuzz target: a lab's topology.toml through `load_topology` (DESIGN "The user surface" and "Sites and
links"; SPEC §2 sites and their addresses).

Keeps true for every input: loading returns a `Topology` or raises a project error (one sentence
naming the file), nothing else. A topology that loads is valid (`validate` passes, each of the
three sites has its own address), and writing it with `to_toml` and loading that gives it back
(but for `[links]`, which `to_toml` does not write: only a hand-edited lab routes a link through a
proxy). Loading writes nothing.

Input: the bytes of topology.toml.
"""

from __future__ import annotations

import dataclasses

from tools.fuzz import harness
from vstore.lab.topology import TOPOLOGY_FILE, Topology, default_sites, load_topology, validate


def outcome(data: bytes) -> str:
    with harness.scratch("lab") as lab:
        (lab / TOPOLOGY_FILE).write_bytes(data)
        got = harness.rejects(load_topology, lab)
        assert sorted(p.name for p in lab.iterdir()) == [TOPOLOGY_FILE]
        assert (lab / TOPOLOGY_FILE).read_bytes() == data, "loading changed topology.toml"
        if not harness.ok(got):
            return harness.describe(got)
        topo = got
        assert isinstance(topo, Topology)
        validate(topo)
        assert len({(s.host, s.port) for s in topo.sites.values()}) == 3
        (lab / TOPOLOGY_FILE).write_text(topo.to_toml())
        again = load_topology(lab)
        assert again == dataclasses.replace(topo, links={}), "a topology written by to_toml loads back different"
        return f"{topo.mode} topology"


def check(data: bytes) -> None:
    outcome(data)


def seeds() -> list[bytes]:
    plain = Topology("lab", "provider", 1 << 20, sites=default_sites())
    mirror = Topology("fuzz", "mirror", 8 << 20, block_size=512, volumes=3, protect=False, coalesce=True,
                      unsafe_no_flush=False, spool_capacity=1 << 16, key_file="k.key", sites=default_sites(9000),
                      tls={"cert": "c.pem", "key": "k.pem", "ca": "ca.pem"}, allow_privileged_ports=True)
    out = [t.to_toml().encode() for t in (plain, mirror)]
    out.append(out[0] + b'\n[links.primary-sync]\nvia = "127.0.0.1:9999"\n[links.sync-async]\nvia = ":9998"\n')
    out.append(b'[lab]\nname = "x"\nmode = "provider"\nsize = 65536\n[sites]\n'
               + b"".join(f'{n} = {{ host = "h{i}", port = {2000 + i} }}\n'.encode()
                          for i, n in enumerate(default_sites())))
    return out


def main() -> None:
    harness.atheris_main("topology", check, seeds())


if __name__ == "__main__":
    main()
