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
from collections.abc import Iterator
from pathlib import Path

import pytest
from construct import ConstructError

from jfs.fs import FileSystem
from tests import helpers
from tests.helpers import BS, assert_closed_by_server, blocks, handshake, image, image_tree, read_frame
from tools.faults.killer import VICTIMS, run_once
from vstore.daemons.intent import _INTENT, INTENT_VERSION, WriteIntent, pack_intent
from vstore.daemons.processes import lab_down, lab_up, running_pid, site_peer, start_site, stop_site
from vstore.lab.topology import load_topology
from vstore.net.client import Peer
from vstore.net.keys import load_key
from vstore.net.linkproxy import LinkProxy
from vstore.net.rpc import SPOOL_ACKED
from vstore.net.wire import ConnectionFailed, RemoteError, encode_request
from vstore.targets import open_lab_target


def wait_shipped(lab, timeout=20.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        doc = json.loads(helpers.vstore("status", lab, "--json").stdout)
        if all(p["entries_waiting"] == 0 for p in doc["pairs"]):
            return doc
        time.sleep(0.1)
    raise AssertionError("entries were not shipped")


@pytest.fixture(scope="class", params=["provider", "mirror"])
def same_workload(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple]:
    """Built once per mode: the same 30 writes on a lab with its daemons up (shipped by the shipper process)
    and on a lab in one process (shipped by `vstore ship`); (the running lab, the one-process lab, the writes,
    the final status)."""
    with helpers.daemon_labs(tmp_path_factory.mktemp(f"same-{request.param}")) as make:
        up, local = make("up", mode=request.param), make("local", mode=request.param)
        helpers.vstore("lab", "up", up)
        rng = random.Random(4)
        writes = [(rng.randrange(250), rng.randrange(1, 4), rng.randrange(10**6)) for _ in range(30)]
        for lab in (up, local):
            for lba, n, seed in writes:
                helpers.vstore("write", lab, "--lba", lba, input=blocks(seed, n))
        helpers.vstore("ship", local)
        yield up, local, writes, wait_shipped(up)
        helpers.vstore("lab", "down", up)


class TestTheDaemonsGiveTheSameResultsAsOneProcess:
    def test_every_volume_equals_the_one_process_result(self, same_workload):
        """After the same writes, every pair is Duplex and A, C and D equal those of the lab in one process."""
        up, local, _, doc = same_workload
        assert {p["state"] for p in doc["pairs"]} == {"Duplex"}
        for site, vol in (("primary", "A"), ("sync", "C"), ("async", "D")):
            assert image(up, site, vol) == image(local, site, vol), f"{site}:{vol} differs"

    def test_read_through_the_daemons_returns_the_block_on_c(self, same_workload, vstore):
        """`vstore read` of a replica through its daemon returns exactly the block in C's image."""
        up, _, writes, _ = same_workload
        assert vstore("read", up, "--site", "sync", "--volume", "C", "--lba", writes[0][0]).stdout_bytes == \
            image(up, "sync", "C")[writes[0][0] * BS:(writes[0][0] + 1) * BS]

    def test_verify_through_the_daemons_finds_no_difference(self, same_workload, vstore):
        """`vstore verify` through the daemons reports no differing range on a shipped lab."""
        r = vstore("verify", same_workload[0], "--json")
        assert all(p["differing_ranges"] == [] for p in json.loads(r.stdout)["pairs"])

    def test_dashboard_shows_the_pairs_and_the_shipper_process(self, same_workload, vstore):
        """The dashboard of a running lab shows its pairs Duplex and the shipper process running."""
        frame = " ".join(vstore("dashboard", same_workload[0], "--once").stdout.split())  # as words: wrap-proof
        assert "A->C" in frame and "Duplex" in frame and "shipper process running" in frame

    def test_heal_through_the_daemons(self, same_workload, vstore):
        """`vstore fail` then `vstore heal` of a link work on a running lab."""
        vstore("fail", same_workload[0], "primary-sync")
        r = vstore("heal", same_workload[0], "primary-sync")
        assert "healed" in r.stdout

    def test_failover_with_the_primary_alive_is_refused_and_the_daemons_come_back(self, same_workload, vstore):
        """A failover refused because the primary is alive leaves the daemons running again."""
        up = same_workload[0]
        r = vstore("failover", up, "--to", "sync", ok=False)
        assert r.exit_code == 1 and "started the daemons" in r.stderr
        assert running_pid(up, "primary") and running_pid(up, "shipper")


def test_jfs_through_the_daemons(daemon_lab, vstore, jfs):
    """The embodiment-4 workload through the daemons ends with the same file trees on A, C and D as
    in one process, and fsck finds C and D clean (the oracles of the jfs and embodiment-4 tests)."""
    up, local = daemon_lab("up", mode="provider"), daemon_lab("local", mode="provider")
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
def test_restarted_primary_redrives_the_write_in_progress(daemon_lab, mode, landed_on, vstore):
    """A primary killed inside a write leaves it on some copies only (here: written straight into
    the images, with the write-intent record naming it). The restarted daemon re-drives it: the
    write ends present everywhere or absent everywhere, and A, C and D (and B) are equal again."""
    lab = daemon_lab(mode=mode)
    lab_up(lab)
    for i in range(4):
        vstore("write", lab, "--lba", i, input=blocks(i))
    wait_shipped(lab)
    lab_down(lab)
    for where in landed_on:  # the in-doubt write of block 7
        with open(lab / f"{where}.img", "r+b") as f:
            f.seek(7 * BS)
            f.write(blocks(77))
    intent = WriteIntent(lab / "primary")
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
    assert "re-drove blocks 7..7 of volume" in (lab / "run" / "primary.log").read_text()


def test_shipper_is_its_own_process_and_resumes_after_restart(daemon_lab, vstore):
    """The shipper is a process of its own: while it is stopped nothing ships, and once restarted D catches up."""
    lab = daemon_lab(mode="provider")
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


def test_jfs_waits_for_the_shipper_when_its_metadata_log_is_full(daemon_lab, jfs):
    """Through the daemons, a file system whose metadata log is full of records it may not trim yet
    (their blocks are not shipped) waits for the shipper process instead of failing."""
    lab = daemon_lab(mode="provider")
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


def test_full_spool_with_the_async_daemon_down_suspends_then_resyncs(daemon_lab, vstore):
    """Invariant 6 through the daemons: with the Async site's daemon dead, a full spool turns the
    async pair Suspend with positions recorded (writes go on); once it is back, the shipper has the
    primary's daemon resync it (Duplex-Pending) and D equals A."""
    lab = daemon_lab(mode="provider", spool_capacity=16 * (BS + 64))
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


def test_with_the_primary_daemon_down_status_and_replicas_still_answer(daemon_lab, vstore, jfs):
    """With the primary's daemon dead, writes fail naming it while status, the dashboard and replicas still answer."""
    lab = daemon_lab(mode="provider")
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


def test_recover_with_the_lab_up_stops_and_restarts_the_daemons(daemon_lab, vstore, jfs):
    """Recovery on a running lab stops the daemons, recovers, and starts them again in the new roles."""
    lab = daemon_lab(mode="provider")
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


def test_sync_link_cut_through_the_proxy_fences_writes(daemon_lab, vstore):
    """A sync link cut in a real proxy fences writes (failing, never hanging); C and D never hold the refused one."""
    lab = daemon_lab(mode="mirror", protect=True)
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


def test_a_link_proxy_is_used_only_towards_the_site_it_forwards_to(daemon_lab):
    """A `links.X-Y.via` proxy is used by X towards Y only, never in the other direction or towards others."""
    lab = daemon_lab(mode="provider")
    with open(lab / "topology.toml", "a") as f:
        f.write('\n[links.primary-sync]\nvia = "127.0.0.1:9"\n')
    topo = load_topology(lab)
    assert topo.peer_address("primary", "sync").port == 9
    assert topo.peer_address("sync", "primary") == topo.sites["primary"]
    assert topo.peer_address("primary", "async") == topo.sites["async"]


def test_tls_lab(daemon_lab, vstore):
    """`lab init --tls`: every daemon serves TLS only; the CLI, the daemons and the shipper use it."""
    lab = daemon_lab(mode="mirror", tls=True)
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


@pytest.fixture(scope="class")
def running_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Started once for the class: a provider lab with its daemons and shipper process up. The tests of
    the class only make requests that must be refused and leave the lab as it was."""
    with helpers.daemon_labs(tmp_path_factory.mktemp("running")) as make:
        lab = make(mode="provider")
        lab_up(lab)
        yield lab


class TestARunningLabRefusesBadClients:
    def test_garbage_a_wrong_key_and_a_huge_length_write_nothing(self, running_lab):
        """Garbage bytes, a client with a wrong key and a header claiming 4 GiB are refused and write nothing."""
        lab = running_lab
        sync = load_topology(lab).sites["sync"]
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
        good = Peer(sync.host, sync.port, load_key(lab / load_topology(lab).key_file), timeout=5)
        assert good.call("ping")[0]["site"] == "sync"
        good.close()

    def test_a_second_daemon_for_a_running_site_is_refused(self, running_lab, vstore):
        """`vstore serve` for a site whose daemon runs is refused, and the running daemon stays up."""
        r = vstore("serve", "--site", "primary", "--config", str(running_lab / "topology.toml"), ok=False)
        assert r.exit_code == 1 and "already running" in r.stderr
        assert running_pid(running_lab, "primary") and running_pid(running_lab, "shipper")

    def test_a_second_shipper_for_a_running_site_is_refused(self, running_lab, vstore):
        """`vstore shipper` while the shipper process runs is refused, and the running one stays up."""
        r = vstore("shipper", "--site", "primary", "--config", str(running_lab / "topology.toml"), ok=False)
        assert r.exit_code == 1 and "already running" in r.stderr
        assert running_pid(running_lab, "primary") and running_pid(running_lab, "shipper")

    def test_a_daemon_without_a_pid_file_is_still_found_by_its_port(self, running_lab, vstore):
        """A second daemon for a site is refused even when the first one's pid file is gone: its port is taken."""
        lab = running_lab
        pid_file = lab / "run" / "sync.pid"
        sync_pid = pid_file.read_text()
        pid_file.unlink()  # even without its pid file, the port tells
        r = vstore("serve", "--site", "sync", "--config", str(lab / "topology.toml"), ok=False)
        pid_file.write_text(sync_pid)  # so that lab down stops it
        assert r.exit_code == 1 and "cannot listen" in r.stderr

    def test_ship_follow_is_refused_while_the_shipper_process_follows(self, running_lab, vstore):
        """`vstore ship --follow` is refused while the shipper process already follows the entry log."""
        r = vstore("ship", running_lab, "--follow", "--duration", "1", ok=False)
        assert r.exit_code == 1 and "shipper process already follows" in r.stderr
        assert running_pid(running_lab, "primary") and running_pid(running_lab, "shipper")


def test_replayed_or_bit_flipped_frames_write_nothing(daemon_lab):
    """A recorded write replayed in a new session and a bit-flipped frame are refused and write nothing."""
    lab = daemon_lab(mode="provider")
    lab_up(lab)
    topo = load_topology(lab)
    sync = topo.sites["sync"]
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


def test_lab_up_that_cannot_start_a_site_stops_what_it_started(daemon_lab, vstore):
    """`lab up` that cannot start one site fails naming it and stops every process it had started."""
    lab = daemon_lab(mode="provider")
    topo = load_topology(lab)
    with socket.create_server(("127.0.0.1", topo.sites["async"].port)):  # another program holds the port
        r = vstore("lab", "up", lab, ok=False)
    assert r.exit_code == 1 and "cannot listen" in r.stderr and "stopped again" in r.stderr
    assert all(running_pid(lab, name) is None for name in ("primary", "sync", "async", "shipper"))


def test_key_file_with_wrong_permissions_is_refused_at_start(daemon_lab, vstore):
    """A lab key readable by others is refused at `lab up` with the chmod to run, and no daemon starts."""
    lab = daemon_lab(mode="provider")
    os.chmod(lab / "lab.key", 0o644)
    r = vstore("lab", "up", lab, ok=False)
    assert r.exit_code == 1 and "chmod 600" in r.stderr
    assert running_pid(lab, "primary") is None


def test_spool_acked_is_a_long_poll_answered_by_the_next_write(daemon_lab, vstore):
    """`spool.acked` with `wait` holds its answer until an entry past `after` is acknowledged (or the
    wait ends, answering what is acknowledged then); without `wait` it answers at once."""
    lab = daemon_lab(mode="provider")
    lab_up(lab)
    stop_site(lab, "shipper")
    vstore("write", lab, "--lba", 0, input=blocks(0))
    with site_peer(lab, "primary") as peer:
        now = peer.call(SPOOL_ACKED)[0]["acked"]
        assert peer.call(SPOOL_ACKED, {"after": now, "wait": 0.2})[0]["acked"] == now  # nothing new: the wait ends
        answers: list[dict] = []
        poll = threading.Thread(target=lambda: answers.append(
            site_peer(lab, "primary").call(SPOOL_ACKED, {"after": now, "wait": 10.0})[0]))
        poll.start()
        vstore("write", lab, "--lba", 1, input=blocks(1))
        poll.join()
        assert answers[0]["acked"] == now + 1
        with pytest.raises(RemoteError, match="wait"):
            peer.call(SPOOL_ACKED, {"after": now, "wait": 100.0})


def test_the_write_intent_record_packed_on_the_write_path_is_the_declared_one():
    """`pack_intent` (struct, the write path) gives the bytes of the construct declaration, names of
    every length up to the field's included; a name too long for the field is refused as before."""
    for active, volume, lba, count in ((True, "0", 7, 1), (False, "", 0, 0), (True, "é" * 32, (1 << 64) - 1, 9),
                                       (True, "v" * 64, 1 << 40, (1 << 32) - 1)):
        declared = _INTENT.build(dict(body=dict(value=dict(version=INTENT_VERSION, active=active, volume=volume,
                                                           lba=lba, count=count))))
        assert pack_intent(active, volume, lba, count) == declared
    with pytest.raises(ConstructError):
        pack_intent(True, "v" * 65, 0, 1)
