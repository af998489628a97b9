"""Site daemons on 127.0.0.1 (issue 6): the same results as in one process, SIGKILL of each
daemon at random moments, the fence through a fault proxy, security against a running daemon,
and a key file with wrong permissions refused at start."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import time

import pytest

from jfs.cli import app as jfs_app
from tests.labutil import BS, blocks, image, invoke
from tools.faults.killer import free_base_port, run_once
from tools.faults.proxy import FaultProxy
from vstore.cli import app as vstore_app
from vstore.daemon import lab_down, lab_up, running_pid
from vstore.lab import init_lab
from vstore.net import load_key
from vstore.remote import Peer
from vstore.topology import load_topology


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
    assert "A->C" in frame and "Duplex" in frame
    r = vstore("heal", up, "primary-sync")
    assert "healed" in r.stdout
    r = vstore("failover", up, "--to", "sync", ok=False)
    assert "lab down" in r.stderr  # procedures run on a lab that is down
    vstore("lab", "down", up)


def test_jfs_through_the_daemons(lab_factory):
    lab = lab_factory(mode="provider")
    vstore("lab", "up", lab)
    jfs("mkfs", f"lab:{lab}")
    jfs("write", f"lab:{lab}", "/hello", input="through the daemons\n")
    assert jfs("read", f"lab:{lab}", "/hello").stdout == "through the daemons\n"
    assert jfs("read", f"lab:{lab}@sync", "/hello").stdout == "through the daemons\n"
    wait_shipped(lab)
    assert jfs("read", f"lab:{lab}@async", "/hello").stdout == "through the daemons\n"
    r = jfs("write", f"lab:{lab}@sync", "/x", input="x", ok=False)
    assert "read-only replica" in r.stderr


def test_sigkill_of_each_daemon_once(tmp_path):
    """The killer harness (tools/faults/killer.py runs it 100+ times) once per victim. The issue's
    20 seeded runs are not in the suite yet: a rare hang in long runs is still being chased."""
    seen = set()
    seed = 0
    while len(seen) < 3 and seed < 40:
        rng = random.Random(seed)
        probe = random.Random(seed)
        probe.randrange(10**9), probe.choice(["provider", "mirror"])
        victim = probe.choice(["primary", "sync", "async"])
        if victim not in seen:
            assert run_once(tmp_path, rng, writes=30) == victim
            seen.add(victim)
        seed += 1
    assert seen == {"primary", "sync", "async"}


def test_sync_link_cut_through_the_proxy_fences_writes(lab_factory):
    lab = lab_factory(mode="mirror", protect=True)
    topo = load_topology(lab)
    proxy = FaultProxy(listen=("127.0.0.1", 0), target=("127.0.0.1", topo.sites["sync"].port), delay_ms=1).start()
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
    assert image(lab, "sync", "C") == before
    good = Peer(sync.host, sync.port, load_key(lab / topo.key_file), timeout=5)
    assert good.call("ping")[0]["site"] == "sync"
    good.close()


def test_key_file_with_wrong_permissions_is_refused_at_start(lab_factory):
    lab = lab_factory(mode="provider")
    os.chmod(lab / "lab.key", 0o644)
    r = vstore("lab", "up", lab, ok=False)
    assert r.exit_code == 1 and "chmod 600" in r.stderr
    assert running_pid(lab, "primary") is None
