"""Hostile peers against real site daemons: a key holder cannot reach outside a daemon's site
directory nor make it fail internally, and a peer without the key cannot make it hold more than its
`[limits]` allow (DESIGN "Daemons", invariant 5; SPEC §4)."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import helpers
from tests.helpers import BS, assert_closed_by_server, blocks, handshake, image, read_frame
from vstore.daemons.processes import lab_up, running_pid, site_peer, start_site, stop_site
from vstore.lab.topology import load_topology
from vstore.net.keys import load_key
from vstore.net.wire import (
    _HEADER,
    DEFAULT_MAX_PAYLOAD,
    FRAME_VERSION,
    T_HELLO,
    ConnectionFailed,
    RemoteError,
    decode_response,
    encode_request,
)
from vstore.replication.entries import Entry, encode_batch

MiB = 1 << 20


def peak_rss(pid: int) -> int:
    """The highest resident set size the process has had (VmHWM of /proc/PID/status), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM in /proc/{pid}/status")


def with_limits(lab: Path, **limits: float) -> Path:
    """Append a [limits] table to the lab's topology.toml (before its daemons start)."""
    lines = "".join(f"{key} = {value}\n" for key, value in limits.items())
    with open(lab / "topology.toml", "a") as f:
        f.write(f"\n[limits]\n{lines}")
    return lab


def files_outside(root: Path, lab: Path) -> dict[str, bytes]:
    """Every file under `root` that is not in `lab`, with its content."""
    return {str(p): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file() and lab not in p.parents}


def authenticated(lab: Path, site: str, source: str = helpers.HOST) -> tuple[socket.socket, object]:
    """A raw connection to a site's daemon that has done the handshake and one request."""
    spec = load_topology(lab).sites[site]
    sock = socket.create_connection((spec.host, spec.port), timeout=5, source_address=(source, 0))
    session, _ = handshake(sock, load_key(lab / load_topology(lab).key_file))
    sock.sendall(session.seal(1, encode_request("ping", {}, b"")))
    return sock, session


def connect_from(lab: Path, site: str, source: str) -> socket.socket:
    spec = load_topology(lab).sites[site]
    sock = socket.create_connection((spec.host, spec.port), timeout=5, source_address=(source, 0))
    sock.settimeout(5)
    return sock


@pytest.fixture(scope="module")
def running_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Started once for the module: a provider lab with its daemons up. The tests using it only make
    requests that must be refused."""
    with helpers.daemon_labs(tmp_path_factory.mktemp("hostile")) as make:
        lab = make(mode="provider")
        lab_up(lab)
        yield lab


# -- a key holder stays inside the site directory ---------------------------------------------------------------

def test_state_put_cannot_point_a_volume_outside_the_site(running_lab: Path):
    """A state.put naming an image outside the site directory (relative, absolute or through a link)
    is refused before it is stored, and no file outside the lab is read or written."""
    lab = running_lab
    root = lab.parent
    victim = root / "victim.img"
    victim.write_bytes(blocks(5, 2))
    (root / "link.img").symlink_to(victim)
    (lab / "sync" / "link.img").symlink_to(victim)
    before = files_outside(root, lab)
    state_before = (lab / "sync" / "state.json").read_bytes()
    with site_peer(lab, "sync") as peer:
        state = peer.call("state.get")[0]["state"]
        for file in ("../../victim.img", str(victim), "link.img", "..", "x/../../victim.img"):
            hostile = {**state, "volumes": {**state["volumes"], "X": {"file": file, "external_id": "x"}}}
            with pytest.raises(RemoteError) as refused:
                peer.call("state.put", {"state": hostile})
            assert refused.value.kind != "internal" and "volume" in str(refused.value), refused.value
            with pytest.raises(RemoteError):
                peer.call("vol.write", {"volume": "X", "lba": 0}, blocks(6))
            with pytest.raises(RemoteError):
                peer.call("vol.read", {"volume": "X", "lba": 0, "count": 1})
        assert peer.call("ping")[0]["site"] == "sync"
    assert files_outside(root, lab) == before
    assert (lab / "sync" / "state.json").read_bytes() == state_before


def test_crafted_arguments_are_answered_with_a_clear_error(running_lab: Path):
    """Arguments of the wrong type, out of range or with unknown keys are refused with a project
    error naming the key and what is allowed, never "internal", and change no volume."""
    lab = running_lab
    crafted = [
        ("sync", "vol.read", {"volume": "C", "lba": -1, "count": 1}, "lba"),
        ("sync", "vol.read", {"volume": "C", "lba": 0, "count": "1"}, "count"),
        ("sync", "vol.read", {"volume": ["C"], "lba": 0, "count": 1}, "volume"),
        ("sync", "vol.write", {"volume": "C", "lba": 0, "flush": "yes"}, "flush"),
        ("sync", "vol.digest", {"volume": "C", "lba": 0, "count": 1 << 20, "per": 1}, "count"),
        ("sync", "vol.digest", {"volume": "C", "lba": 0, "count": 4, "per": 0}, "per"),
        ("sync", "vol.write", {"volume": "C", "lba": 0, "bogus": 1}, "bogus"),
        ("async", "journal.set_applied", {"seq": -5}, "seq"),
        ("async", "journal.set_applied", {"seq": 1 << 70}, "seq"),
        ("async", "journal.finish", {"targets": {"zero": "D"}}, "targets"),
        ("primary", "spool.confirm", {"seq": "x"}, "seq"),
        ("primary", "spool.confirm", {"seq": 0, "stats": {"entries_per_s": "fast"}}, "stats"),
        ("primary", "app.has_unshipped", {"volume": 0, "ranges": [[1]]}, "ranges"),
        ("primary", "app.read", {"volume": {}, "lba": 0, "count": 1}, "volume"),
        ("primary", "app.write", {"volume": 0, "lba": None}, "lba"),
        ("primary", "ship", {"max": -1}, "max"),
        ("primary", "verify", {"pair": 7}, "pair"),
        ("primary", "status", {"x": 1}, "unknown key"),
        ("primary", "state.put", {"state": [1, 2]}, "state"),
    ]
    images = {site: image(lab, site, volume) for site, volume in (("primary", "A"), ("sync", "C"), ("async", "D"))}
    for site, method, args, key in crafted:
        with site_peer(lab, site) as peer:
            with pytest.raises(RemoteError) as refused:
                peer.call(method, args, blocks(1) if method.endswith("write") else b"")
            message = str(refused.value)
            assert refused.value.kind != "internal", f"{method} {args}: {message}"
            assert key in message and method in message, f"{method} {args}: {message}"
    assert {site: image(lab, site, v) for site, v in (("primary", "A"), ("sync", "C"), ("async", "D"))} == images


# -- a peer without the key is bounded before authentication ----------------------------------------------------

def hello_header(length: int) -> bytes:
    return _HEADER.build({"version": FRAME_VERSION, "type": T_HELLO, "flags": 0, "request_id": 0, "seq": 0,
                          "length": length})


def test_an_oversized_hello_is_closed_at_once_and_memory_stays_bounded(running_lab: Path):
    """A HELLO header announcing 32 MiB closes the connection before its body is read, and 8
    connections sending such bodies leave the daemon's peak memory (VmHWM) nearly where it was."""
    lab = running_lab
    pid = running_pid(lab, "sync")
    assert pid
    spec = load_topology(lab).sites["sync"]
    claimed = DEFAULT_MAX_PAYLOAD - 1
    with socket.create_connection((spec.host, spec.port), timeout=5) as sock:
        sock.settimeout(5)
        sock.sendall(hello_header(claimed))  # and nothing more: the daemon must not wait for the body
        assert_closed_by_server(sock)
    before = peak_rss(pid)
    chunk = bytes(MiB)
    held = []
    for _ in range(8):
        sock = socket.create_connection((spec.host, spec.port), timeout=5)
        held.append(sock)
        try:
            sock.sendall(hello_header(claimed))
            for _ in range(claimed // MiB):  # the whole body but its last bytes: the frame never ends
                sock.sendall(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass
    grown = peak_rss(pid) - before
    for sock in held:
        sock.close()
    assert grown < 48 * MiB, f"the sync daemon's peak memory grew by {grown // MiB} MiB"
    with site_peer(lab, "sync") as peer:
        assert peer.call("ping")[0]["site"] == "sync"


def test_a_read_of_a_huge_range_is_refused_before_it_allocates(daemon_lab):
    """vol.read and app.read of more blocks than one answer holds are refused, naming how many fit,
    before the daemon reads them into memory (its peak memory stays where it was)."""
    lab = daemon_lab(mode="provider", size=128 * MiB)
    lab_up(lab)
    blocks_all = 128 * MiB // BS
    for site, method, args in (("sync", "vol.read", {"volume": "C", "lba": 0, "count": blocks_all}),
                               ("primary", "app.read", {"volume": 0, "lba": 0, "count": blocks_all})):
        pid = running_pid(lab, site)
        assert pid
        with site_peer(lab, site, timeout=30) as peer:
            peer.call("ping")
            before = peak_rss(pid)
            with pytest.raises(RemoteError) as refused:
                peer.call(method, args)
            grown = peak_rss(pid) - before
            assert "read at most" in str(refused.value), refused.value
            assert grown < 32 * MiB, f"{method}: the {site} daemon's peak memory grew by {grown // MiB} MiB"
            assert len(peer.call(method, {**args, "count": 256})[1]) == 256 * BS


def test_journal_receive_with_a_bad_request_leaves_no_file(daemon_lab):
    """journal.receive with a bad batch, targets of the wrong kind or an entry outside the volume is
    refused before anything is stored: recv/ is unchanged and the Async daemon starts again."""
    lab = daemon_lab(mode="provider")
    lab_up(lab)
    recv = lab / "async" / "recv"
    with site_peer(lab, "async") as peer:
        applied = int(peer.call("journal.applied")[0]["applied_seq"])
        nxt = applied + 1
        good = encode_batch([Entry(nxt, 1, 0, 2, 1, blocks(3))])
        outside = encode_batch([Entry(nxt, 1, 0, 1 << 40, 1, blocks(3))])
        before = {p.name: p.read_bytes() for p in recv.iterdir()}
        for targets, batch in (({"0": "D"}, b"garbage"), ({"0": ["D"]}, good), ({"0": "nope"}, good),
                               ({"0": "D"}, outside), ({"x": "D"}, good)):
            with pytest.raises(RemoteError) as refused:
                peer.call("journal.receive", {"first_seq": nxt, "last_seq": nxt, "targets": targets}, batch)
            assert refused.value.kind != "internal", refused.value
            assert {p.name: p.read_bytes() for p in recv.iterdir()} == before, targets
    stop_site(lab, "async")
    start_site(lab, "async")  # starts: nothing was left to finish
    with site_peer(lab, "async") as peer:
        assert int(peer.call("journal.applied")[0]["applied_seq"]) == applied


# -- limits after authentication, and their configuration ---------------------------------------------------------

def test_an_idle_authenticated_connection_is_closed(daemon_lab):
    """An authenticated connection that sends nothing for the configured idle timeout is closed by
    the daemon; a kept client connection closed that way is renewed on its next call."""
    lab = with_limits(daemon_lab(mode="provider"), idle_timeout=0.5)
    lab_up(lab)
    sock, session = authenticated(lab, "sync")
    assert decode_response(session.open(read_frame(sock)).payload)[0]["site"] == "sync"
    assert_closed_by_server(sock)  # within the socket's 5 s timeout, long after 0.5 s
    with site_peer(lab, "sync") as peer:
        assert peer.call("ping")[0]["site"] == "sync"
        time.sleep(1.0)
        assert peer.call("ping")[0]["site"] == "sync"


def test_connection_limits_hold_and_status_shows_them(daemon_lab, vstore):
    """Over max_unauthenticated_per_peer from one address, or over max_unauthenticated in all, a new
    connection is closed at once; over max_connections an authenticated one is refused naming the
    limit; `vstore status --json` shows the limits."""
    lab = with_limits(daemon_lab(mode="provider"), max_unauthenticated=3, max_unauthenticated_per_peer=2,
                      max_connections=4)
    lab_up(lab)
    status = json.loads(vstore("status", lab, "--json").stdout)
    assert status["limits"]["max_connections"] == 4 and status["limits"]["max_unauthenticated_per_peer"] == 2
    first = [connect_from(lab, "sync", "127.0.0.2") for _ in range(2)]
    assert_closed_by_server(connect_from(lab, "sync", "127.0.0.2"))  # a third from the same address
    other = connect_from(lab, "sync", "127.0.0.3")
    assert_closed_by_server(connect_from(lab, "sync", "127.0.0.4"))  # a fourth in all
    key = load_key(lab / load_topology(lab).key_file)
    session, _ = handshake(other, key)  # the one from another address was served
    other.sendall(session.seal(1, encode_request("ping", {}, b"")))
    assert decode_response(session.open(read_frame(other)).payload)[0]["site"] == "sync"
    for sock in first:
        sock.close()
    kept = [other]
    refusal = None
    for _ in range(6):
        sock, session = authenticated(lab, "sync", "127.0.0.5")
        try:
            decode_response(session.open(read_frame(sock)).payload)
        except RemoteError as err:
            refusal = err
            assert_closed_by_server(sock)
            break
        kept.append(sock)
    assert refusal is not None and "max_connections" in str(refusal), "no connection over the limit was refused"
    assert len(kept) <= 4
    for sock in kept:
        sock.close()
    deadline = time.monotonic() + 10
    while True:  # the daemon notices the closed connections, then serves new ones again
        try:
            with site_peer(lab, "sync") as peer:
                assert peer.call("ping")[0]["site"] == "sync"
            break
        except (RemoteError, ConnectionFailed):
            assert time.monotonic() < deadline, "the daemon did not serve again after the connections closed"
            time.sleep(0.1)
