"""Site daemons on 127.0.0.1 (DESIGN "Process model"): the same results as in one process, SIGKILL of each
daemon at random moments, the fence through a fault proxy, security against a running daemon,
and a key file with wrong permissions refused at start."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import threading
import time

import pytest

from jfs.cli import app as jfs_app
from tests.fsutil import image_tree
from tests.labutil import BS, blocks, image, invoke
from tests.test_net import assert_closed_by_server, handshake, read_frame
from tools.faults.killer import VICTIMS, run_once
from vstore.cli.main import app as vstore_app
from vstore.daemons.intent import WriteIntent
from vstore.daemons.processes import lab_down, lab_up, running_pid, site_peer, start_site, stop_site
from vstore.lab.topology import load_topology
from vstore.net.client import Peer
from vstore.net.keys import load_key
from vstore.net.linkproxy import LinkProxy
from vstore.net.wire import ConnectionFailed, encode_request
from vstore.procedures.create import free_base_port, init_lab


def vstore(*args, ok=True, input=None):
    return invoke(vstore_app, *args, ok=ok, input=input)


def jfs(*args, ok=True, input=None):
    return invoke(jfs_app, *args, ok=ok, input=input)


@pytest.fixture
def lab_factory(tmp_path):
    labs = []

    def make(name="lab", **kw):
        lab = tmp_path / name
        init_lab(lab, size=256 * BS, base_port=free_base_port(), **kw)
        labs.append(lab)
        return lab

    yield make
    for lab in labs:
        lab_down(lab)


def wait_shipped(lab, timeout=20.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        doc = json.loads(vstore("status", lab, "--json").stdout)
        if all(p["entries_waiting"] == 0 for p in doc["pairs"]):
            return doc
        time.sleep(0.1)
    raise AssertionError("entries were not shipped")


@pytest.mark.parametrize("mode", ["provider", "mirror"])
def test_daemons_give_the_same_results_as_one_process(lab_factory, mode):
    up, local = lab_factory("up", mode=mode), lab_factory("local", mode=mode)
    vstore("lab", "up", up)
    rng = random.Random(4)
    writes = [(rng.randrange(250), rng.randrange(1, 4), rng.randrange(10**6)) for _ in range(30)]
    for lab in (up, local):
        for lba, n, seed in writes:
            vstore("write", lab, "--lba", lba, input=blocks(seed, n))
    vstore("ship", local)
    doc = wait_shipped(up)
    assert {p["state"] for p in doc["pairs"]} == {"Duplex"}
    for site, vol in (("primary", "A"), ("sync", "C"), ("async", "D")):
        assert image(up, site, vol) == image(local, site, vol), f"{site}:{vol} differs"
    assert vstore("read", up, "--site", "sync", "--volume", "C", "--lba", writes[0][0]).stdout_bytes == \
        image(up, "sync", "C")[writes[0][0] * BS:(writes[0][0] + 1) * BS]
    r = vstore("verify", up, "--json")
    assert all(p["differing_ranges"] == [] for p in json.loads(r.stdout)["pairs"])
    frame = vstore("dashboard", up, "--once").stdout
    assert "A->C" in frame and "Duplex" in frame and "shipper process running" in frame
    r = vstore("heal", up, "primary-sync")
    assert "healed" in r.stdout
    r = vstore("failover", up, "--to", "sync", ok=False)  # the primary is alive: refused, daemons back up
    assert r.exit_code == 1 and "started the daemons" in r.stderr
    assert running_pid(up, "primary") and running_pid(up, "shipper")
    vstore("lab", "down", up)


def test_jfs_through_the_daemons(lab_factory):
    """The embodiment-4 workload through the daemons ends with the same file trees on A, C and D as
    in one process, and fsck finds C and D clean (the oracles of tests/test_jfs_* and tests/test_e4*)."""
    up, local = lab_factory("up", mode="provider"), lab_factory("local", mode="provider")
    vstore("lab", "up", up)

    def both(*args: str, input: str | None = None) -> None:
        for lab in (up, local):
            jfs(args[0], f"lab:{lab}", *args[1:], input=input)
        vstore("ship", local)  # in one process nothing ships by itself (the small log would fill)

    both("mkfs")
    both("mkdir", "/docs")
    for i in range(6):
        both("write", f"/docs/f{i}.txt", input=f"file {i}\n" * (i * 300 + 1))
    both("mv", "/docs/f1.txt", "/f1-moved.txt")
    both("rm", "/docs/f2.txt")
    both("write", "/hello", input="through the daemons\n")
    wait_shipped(up)
    assert jfs("read", f"lab:{up}", "/hello").stdout == "through the daemons\n"
    assert jfs("read", f"lab:{up}@sync", "/hello").stdout == "through the daemons\n"
    assert jfs("read", f"lab:{up}@async", "/hello").stdout == "through the daemons\n"
    r = jfs("write", f"lab:{up}@sync", "/x", input="x", ok=False)
    assert "read-only replica" in r.stderr
    vstore("lab", "down", up)
    expected = image_tree(local / "primary" / "A.img")
    assert "/f1-moved.txt" in expected and "/docs/f2.txt" not in expected
    for site, vol in (("primary", "A"), ("sync", "C"), ("async", "D")):
        assert image_tree(up / site / f"{vol}.img") == expected, f"{site}:{vol} differs from one process"
        assert image_tree(local / site / f"{vol}.img") == expected
    for site, vol in (("sync", "C"), ("async", "D")):
        assert jfs("fsck", str(up / site / f"{vol}.img"), "-n").exit_code == 0


@pytest.mark.parametrize("run", range(20))
def test_sigkill_at_random_moments(tmp_path, run):
    """20 seeded runs of the killer harness (tools/faults/killer.py runs 100+), four of each victim:
    each site daemon, the shipper process and the writing host process. Each run checks that no
    acknowledged write is missing at C, D is always a prefix, shipping resumes with no gap and no
    duplicate, and the write in progress at the kill is whole or absent."""
    victim = VICTIMS[run % len(VICTIMS)]
    assert run_once(tmp_path, random.Random(1000 + run), writes=30, victim=victim) == victim


@pytest.mark.parametrize(("mode", "landed_on"), [("provider", ["sync/C"]), ("provider", ["primary/A", "sync/C"]),
                                                  ("mirror", ["primary/A", "sync/C"])])
def test_restarted_primary_redrives_the_write_in_progress(lab_factory, mode, landed_on):
    """A primary killed inside a write leaves it on some copies only (here: written straight into
    the images, with the write-intent record naming it). The restarted daemon re-drives it: the
    write ends present everywhere or absent everywhere, and A, C and D (and B) are equal again."""
    lab = lab_factory(mode=mode)
    lab_up(lab)
    for i in range(4):
        vstore("write", lab, "--lba", i, input=blocks(i))
    wait_shipped(lab)
    lab_down(lab)
    for where in landed_on:  # the in-doubt write of block 7
        with open(lab / f"{where}.img", "r+b") as f:
            f.seek(7 * BS)
            f.write(blocks(77))
    intent = WriteIntent(lab / "primary", durable=False)
    intent.mark("0", 7, 1)
    intent.close()
    lab_up(lab)
    wait_shipped(lab)
    lab_down(lab)
    copies = {v: image(lab, site, v) for site, v in (("primary", "A"), ("sync", "C"), ("async", "D"))}
    if mode == "mirror":
        copies["B"] = image(lab, "primary", "B")
    expected = blocks(77) if "primary/A" in landed_on else bytes(BS)
    assert {name: c[7 * BS:8 * BS] == expected for name, c in copies.items()} == dict.fromkeys(copies, True)
    assert len(set(copies.values())) == 1
    assert "re-drove the write in progress" in (lab / "run" / "primary.log").read_text()


def test_shipper_is_its_own_process_and_resumes_after_restart(lab_factory):
    lab = lab_factory(mode="provider")
    started = lab_up(lab)
    assert set(started) == {"primary", "sync", "async", "shipper"}
    assert len(set(started.values())) == 4
    stop_site(lab, "shipper")
    for i in range(10):
        vstore("write", lab, "--lba", i, input=blocks(i))
    doc = json.loads(vstore("status", lab, "--json").stdout)
    assert doc["shipping"]["process"] == "stopped"
    assert [p["entries_waiting"] for p in doc["pairs"] if p["kind"] == "async"] == [10]
    assert image(lab, "async", "D")[:10 * BS] == bytes(10 * BS)  # nothing ships without the shipper
    start_site(lab, "shipper")
    doc = wait_shipped(lab)
    assert doc["shipping"]["process"] == "running" and doc["shipping"]["entries_per_s"] > 0
    assert image(lab, "async", "D") == image(lab, "primary", "A")
    r = vstore("ship", lab)
    assert "nothing is waiting" in r.stdout
    text = vstore("status", lab).stdout
    assert "shipper process: running" in text


def test_jfs_waits_for_the_shipper_when_its_metadata_log_is_full(lab_factory):
    """Through the daemons, a file system whose metadata log is full of records it may not trim yet
    (their blocks are not shipped) waits for the shipper process instead of failing."""
    from jfs.fs import FileSystem
    from vstore.targets import open_lab_target
    lab = lab_factory(mode="provider")
    lab_up(lab)
    jfs("mkfs", f"lab:{lab}")
    wait_shipped(lab)
    stop_site(lab, "shipper")
    outcome: dict = {}

    def write_files() -> None:
        try:
            dev = open_lab_target(f"lab:{lab}", writable=True)
            fs = FileSystem.mount(dev)
            for i in range(30):
                fs.write_file(f"/f{i}", f"file {i}\n".encode())
            fs.unmount()
            dev.close()
            outcome["ok"] = True
        except Exception as exc:  # noqa: BLE001 - reported to the test thread
            outcome["error"] = exc

    writer = threading.Thread(target=write_files)
    writer.start()
    writer.join(3)
    assert writer.is_alive() and not outcome, f"the writer should be waiting for shipping: {outcome}"
    start_site(lab, "shipper")
    writer.join(60)
    assert outcome == {"ok": True}
    wait_shipped(lab)
    assert jfs("read", f"lab:{lab}@async", "/f29").stdout == "file 29\n"


def test_full_spool_with_the_async_daemon_down_suspends_then_resyncs(lab_factory):
    """Invariant 6 through the daemons: with the Async site's daemon dead, a full spool turns the
    async pair Suspend with positions recorded (writes go on); once it is back, the shipper has the
    primary's daemon resync it (Duplex-Pending) and D equals A."""
    lab = lab_factory(mode="provider", spool_capacity=16 * (BS + 64))
    lab_up(lab)
    os.kill(running_pid(lab, "async"), signal.SIGKILL)
    for i in range(40):
        vstore("write", lab, "--lba", i, input=blocks(i))
    doc = json.loads(vstore("status", lab, "--json").stdout)
    pair = next(p for p in doc["pairs"] if p["kind"] == "async")
    assert pair["state"] == "Suspend" and "entry log full" in pair["reason"] and pair["recorded_blocks"] > 0
    start_site(lab, "async")
    end = time.monotonic() + 20
    while time.monotonic() < end:
        doc = json.loads(vstore("status", lab, "--json").stdout)
        if all(p["state"] == "Duplex" and p["entries_waiting"] == 0 for p in doc["pairs"]):
            break
        time.sleep(0.1)
    assert {p["state"] for p in doc["pairs"]} == {"Duplex"}
    lab_down(lab)
    assert image(lab, "async", "D") == image(lab, "primary", "A")


def test_with_the_primary_daemon_down_status_and_replicas_still_answer(lab_factory):
    lab = lab_factory(mode="provider")
    vstore("lab", "up", lab)
    jfs("mkfs", f"lab:{lab}")
    jfs("write", f"lab:{lab}", "/f", input="kept\n")
    os.kill(running_pid(lab, "primary"), signal.SIGKILL)
    doc = json.loads(vstore("status", lab, "--json").stdout)
    assert doc["sites"]["primary"] == {"up": False, "role": "unreachable", "present": False}
    assert doc["sites"]["sync"]["up"] and doc["sites"]["async"]["up"]
    r = vstore("write", lab, "--lba", 1, input=blocks(1), ok=False)
    assert r.exit_code == 1 and "no site running the application answers" in r.stderr and "primary" in r.stderr
    assert jfs("read", f"lab:{lab}@sync", "/f").stdout == "kept\n"
    assert "A->C" in vstore("dashboard", lab, "--once").stdout


def test_recover_with_the_lab_up_stops_and_restarts_the_daemons(lab_factory):
    lab = lab_factory(mode="provider")
    vstore("lab", "up", lab)
    jfs("mkfs", f"lab:{lab}")
    jfs("write", f"lab:{lab}", "/kept", input="acknowledged before the disaster\n")
    for name in ("shipper", "primary"):  # the primary host dies
        os.kill(running_pid(lab, name), signal.SIGKILL)
    vstore("fail", lab, "primary")
    r = vstore("recover", lab, "--to", "sync", "--json")
    assert json.loads(r.stdout)["to"] == "sync"
    assert "stopped the daemons" in r.stderr and "started the daemons" in r.stderr
    assert running_pid(lab, "sync") and running_pid(lab, "shipper")
    assert jfs("read", f"lab:{lab}", "/kept").stdout == "acknowledged before the disaster\n"
    jfs("write", f"lab:{lab}", "/after", input="written at the Sync site\n")
    wait_shipped(lab)
    assert jfs("read", f"lab:{lab}@async", "/after").stdout == "written at the Sync site\n"


def test_sync_link_cut_through_the_proxy_fences_writes(lab_factory):
    lab = lab_factory(mode="mirror", protect=True)
    topo = load_topology(lab)
    proxy = LinkProxy(listen=("127.0.0.1", 0), target=("127.0.0.1", topo.sites["sync"].port), delay_ms=1).start()
    try:
        with open(lab / "topology.toml", "a") as f:
            f.write(f'\n[links.primary-sync]\nvia = "127.0.0.1:{proxy.port}"\n')
        vstore("lab", "up", lab)
        for i in range(5):
            vstore("write", lab, "--lba", i, input=blocks(i))
        proxy.cut()
        t0 = time.monotonic()
        r = vstore("write", lab, "--lba", 9, input=blocks(9), ok=False)
        assert r.exit_code == 1 and "fence" in r.stderr
        assert time.monotonic() - t0 < 30  # fails, not hangs (a loose bound: never a timing claim)
        wait_shipped(lab)
        pid = running_pid(lab, "primary")
        os.kill(pid, signal.SIGKILL)  # the primary dies after the link cut
        time.sleep(0.2)
    finally:
        proxy.stop()
        lab_down(lab)
    assert image(lab, "sync", "C") == image(lab, "async", "D")
    assert image(lab, "sync", "C")[9 * BS:10 * BS] == bytes(BS)


def test_a_link_proxy_is_used_only_towards_the_site_it_forwards_to(lab_factory):
    lab = lab_factory(mode="provider")
    with open(lab / "topology.toml", "a") as f:
        f.write('\n[links.primary-sync]\nvia = "127.0.0.1:9"\n')
    topo = load_topology(lab)
    assert topo.peer_address("primary", "sync").port == 9
    assert topo.peer_address("sync", "primary") == topo.sites["primary"]
    assert topo.peer_address("primary", "async") == topo.sites["async"]


def test_tls_lab(lab_factory):
    """`lab init --tls`: every daemon serves TLS only; the CLI, the daemons and the shipper use it."""
    lab = lab_factory(mode="mirror", tls=True)
    assert (lab / "tls" / "key.pem").stat().st_mode & 0o777 == 0o600
    vstore("lab", "up", lab)
    for i in range(5):
        vstore("write", lab, "--lba", i, input=blocks(i))
    wait_shipped(lab)
    assert image(lab, "async", "D") == image(lab, "primary", "B")
    assert image(lab, "sync", "C") == image(lab, "primary", "A")
    topo = load_topology(lab)
    plain = Peer(topo.sites["sync"].host, topo.sites["sync"].port, load_key(lab / topo.key_file), timeout=5)
    with pytest.raises(ConnectionFailed):  # the right key without TLS is not enough
        plain.call("ping")
    plain.close()
    with site_peer(lab, "sync") as peer:
        assert peer.call("ping")[0]["site"] == "sync"


def test_bad_clients_are_refused_and_the_daemon_keeps_serving(lab_factory):
    lab = lab_factory(mode="provider")
    lab_up(lab)
    topo = load_topology(lab)
    sync = topo.sites["sync"]
    before = image(lab, "sync", "C")
    with socket.create_connection((sync.host, sync.port), timeout=5) as s:  # garbage
        s.sendall(os.urandom(4096))
        s.settimeout(5)
        try:
            assert s.recv(100) == b""
        except ConnectionResetError:
            pass
    wrong = Peer(sync.host, sync.port, b"x" * 32, timeout=5)
    with pytest.raises(Exception):  # noqa: B017 - the handshake fails whatever the exact class
        wrong.call("vol.write", {"volume": "C", "lba": 0}, blocks(1))
    wrong.close()
    with socket.create_connection((sync.host, sync.port), timeout=5) as s:  # a header claiming 4 GiB
        s.sendall(b"TCNF" + bytes([1, 1, 0]) + bytes(12) + b"\xff\xff\xff\xff")
        s.settimeout(5)
        try:
            s.recv(100)
        except ConnectionResetError:
            pass
    assert image(lab, "sync", "C") == before  # garbage, a wrong key and a huge length wrote nothing
    key = load_key(lab / topo.key_file)
    with socket.create_connection((sync.host, sync.port), timeout=5) as s:  # a recorded session
        session, _ = handshake(s, key)
        recorded = session.seal(1, encode_request("vol.write", {"volume": "C", "lba": 3}, blocks(33)))
        s.sendall(recorded)
        session.open(read_frame(s))
    assert image(lab, "sync", "C")[3 * BS:4 * BS] == blocks(33)  # written by that legitimate session
    with Peer(sync.host, sync.port, key, timeout=5) as peer:
        peer.call("vol.write", {"volume": "C", "lba": 3}, blocks(34))
    with socket.create_connection((sync.host, sync.port), timeout=5) as s:  # replayed in a new session
        handshake(s, key)
        s.sendall(recorded)
        assert_closed_by_server(s)
    with socket.create_connection((sync.host, sync.port), timeout=5) as s:  # bit-flipped
        session, _ = handshake(s, key)
        frame = bytearray(session.seal(1, encode_request("vol.write", {"volume": "C", "lba": 3}, blocks(35))))
        frame[-100] ^= 0x10
        s.sendall(bytes(frame))
        assert_closed_by_server(s)
    assert image(lab, "sync", "C")[3 * BS:4 * BS] == blocks(34)  # neither the replay nor the flipped frame
    good = Peer(sync.host, sync.port, key, timeout=5)
    assert good.call("ping")[0]["site"] == "sync"
    good.close()


def test_a_second_daemon_or_shipper_for_a_running_site_is_refused(lab_factory):
    lab = lab_factory(mode="provider")
    lab_up(lab)
    config = str(lab / "topology.toml")
    r = vstore("serve", "--site", "primary", "--config", config, ok=False)
    assert r.exit_code == 1 and "already running" in r.stderr
    r = vstore("shipper", "--site", "primary", "--config", config, ok=False)
    assert r.exit_code == 1 and "already running" in r.stderr
    pid_file = lab / "run" / "sync.pid"
    sync_pid = pid_file.read_text()
    pid_file.unlink()  # even without its pid file, the port tells
    r = vstore("serve", "--site", "sync", "--config", config, ok=False)
    pid_file.write_text(sync_pid)  # so that lab down stops it
    assert r.exit_code == 1 and "cannot listen" in r.stderr
    r = vstore("ship", lab, "--follow", "--duration", "1", ok=False)
    assert r.exit_code == 1 and "shipper process already follows" in r.stderr
    assert running_pid(lab, "primary") and running_pid(lab, "shipper")


def test_lab_up_that_cannot_start_a_site_stops_what_it_started(lab_factory):
    lab = lab_factory(mode="provider")
    topo = load_topology(lab)
    with socket.create_server(("127.0.0.1", topo.sites["async"].port)):  # another program holds the port
        r = vstore("lab", "up", lab, ok=False)
    assert r.exit_code == 1 and "cannot listen" in r.stderr and "stopped again" in r.stderr
    assert all(running_pid(lab, name) is None for name in ("primary", "sync", "async", "shipper"))


def test_key_file_with_wrong_permissions_is_refused_at_start(lab_factory):
    lab = lab_factory(mode="provider")
    os.chmod(lab / "lab.key", 0o644)
    r = vstore("lab", "up", lab, ok=False)
    assert r.exit_code == 1 and "chmod 600" in r.stderr
    assert running_pid(lab, "primary") is None
