"""The `vstore` command for embodiment 1 in one process, run through typer's
CliRunner and, once, as a real subprocess."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests import helpers
from tests.helpers import BS, blocks, image


@pytest.fixture(scope="module")
def new_mirror_lab(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Made once: a new 1 MiB mirror lab made by `vstore lab init` (read-only for the tests)."""
    lab = tmp_path_factory.mktemp("cli") / "lab"
    helpers.vstore("lab", "init", lab, "--mode", "mirror", "--size", "1M", "--quiet")
    return lab


@pytest.fixture
def mirror_lab(new_mirror_lab: Path, tmp_path: Path) -> Path:
    """A private copy of the new mirror lab."""
    return shutil.copytree(new_mirror_lab, tmp_path / "lab")


@pytest.fixture(scope="module")
def written_mirror_lab(new_mirror_lab: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Made once: the new mirror lab after two acknowledged writes, neither shipped: 3 blocks at 4 (from a
    file), 1 at 9."""
    root = tmp_path_factory.mktemp("cli-written")
    lab = shutil.copytree(new_mirror_lab, root / "lab")
    data = root / "data"
    data.write_bytes(blocks(1, 3))
    helpers.vstore("write", lab, "--lba", 4, "--file", data)
    helpers.vstore("write", lab, "--lba", 9, input=blocks(2, 1))
    return lab


@pytest.fixture
def written_lab(written_mirror_lab: Path, tmp_path: Path) -> Path:
    """A private copy of the written mirror lab."""
    return shutil.copytree(written_mirror_lab, tmp_path / "lab")


def test_lab_init_creates_every_site_file_and_a_private_key(new_mirror_lab):
    """`lab init` creates the topology, the volumes and state of every site, and a key only the owner reads."""
    lab = new_mirror_lab
    for f in ("topology.toml", "lab.key", "primary/A.img", "primary/B.img", "primary/spool", "primary/state.json",
              "sync/C.img", "sync/state.json", "async/D.img", "async/recv", "async/state.json"):
        assert (lab / f).exists(), f
    assert (lab / "lab.key").stat().st_mode & 0o777 == 0o600


def test_status_of_a_new_lab_shows_every_site_and_duplex_pairs(mirror_lab, vstore):
    """`status --json` of a new mirror lab names its three sites and both pairs Duplex, with every pair key."""
    doc = json.loads(vstore("status", mirror_lab, "--json").stdout)
    assert doc["mode"] == "mirror" and set(doc["sites"]) == {"primary", "sync", "async"}
    assert {p["name"]: p["state"] for p in doc["pairs"]} == {"A->C": "Duplex", "B->D": "Duplex"}
    for key in ("name", "source", "target", "kind", "state", "reason", "entries_waiting", "bytes_waiting",
                "oldest_waiting_s"):
        assert key in doc["pairs"][0]


def test_acknowledged_writes_are_on_c_and_wait_for_shipping(written_lab, vstore):
    """An acknowledged write is on C at once (and reads back from it) and waits as an entry for D."""
    lab = written_lab
    assert image(lab, "primary", "A") == image(lab, "sync", "C")
    doc = json.loads(vstore("status", lab, "--json").stdout)
    bd = next(p for p in doc["pairs"] if p["name"] == "B->D")
    assert bd["entries_waiting"] == 2 and bd["bytes_waiting"] >= 4 * BS and bd["oldest_waiting_s"] >= 0
    out = vstore("read", lab, "--site", "sync", "--volume", "C", "--lba", 4, "--count", 3).stdout_bytes
    assert out == blocks(1, 3)


def test_ship_max_ships_that_many_entries_and_ship_catches_d_up(written_lab, vstore):
    """`ship --max N` ships N entries; a plain `ship` ships the rest, and then D equals B."""
    lab = written_lab
    vstore("ship", lab, "--max", "1")
    assert json.loads(vstore("status", lab, "--json").stdout)["pairs"][1]["entries_waiting"] == 1
    vstore("ship", lab)
    assert image(lab, "primary", "B") == image(lab, "async", "D")


def test_cut_sync_link_refuses_writes_naming_the_fence_and_changes_nothing(mirror_lab, vstore):
    """With the sync link cut, a write is refused naming the fence, no volume changes, and A->C is Suspend."""
    lab = mirror_lab
    vstore("fail", lab, "primary-sync")
    before = [image(lab, s, v) for s, v in (("primary", "A"), ("primary", "B"), ("sync", "C"))]
    r = vstore("write", lab, "--lba", 0, input=blocks(3), ok=False)
    assert r.exit_code == 1 and "fence" in r.stderr and "Traceback" not in r.output
    assert before == [image(lab, s, v) for s, v in (("primary", "A"), ("primary", "B"), ("sync", "C"))]
    doc = json.loads(vstore("status", lab, "--json").stdout)
    ac = next(p for p in doc["pairs"] if p["name"] == "A->C")
    assert ac["state"] == "Suspend" and "primary-sync" in ac["reason"]


def test_healed_sync_link_takes_writes_again(mirror_lab, vstore):
    """After `heal` of a cut sync link, writes are accepted again and reach C."""
    lab = mirror_lab
    vstore("fail", lab, "primary-sync")
    vstore("write", lab, "--lba", 0, input=blocks(3), ok=False)
    vstore("heal", lab, "primary-sync")
    vstore("write", lab, "--lba", 0, input=blocks(3))
    assert image(lab, "primary", "A") == image(lab, "sync", "C")


def test_bad_input_gives_one_clear_sentence(mirror_lab, tmp_path, vstore):
    """Every kind of bad input fails with one clear sentence, no traceback, and leaves A equal to C."""
    lab = mirror_lab
    cases = [
        (["write", lab, "--lba", 10_000], blocks(1), "outside the device"),
        (["write", lab, "--lba", 0], b"short", "whole number"),
        (["read", lab, "--site", "mars", "--volume", "C", "--lba", 0], None, "unknown site"),
        (["fail", lab, "nowhere"], None, "unknown target"),
        (["status", tmp_path / "nolab"], None, "does not exist"),
        (["lab", "init", lab], None, "not empty"),
        (["lab", "init", tmp_path / "x", "--size", "12Q"], None, "cannot read size"),
    ]
    for args, stdin, words in cases:
        r = vstore(*args, input=stdin, ok=False)
        assert r.exit_code != 0 and words in r.stderr, (args, r.output)
        assert "Traceback" not in r.output
    a_before = image(lab, "primary", "A")
    assert a_before == image(lab, "sync", "C")


def test_truncated_image_is_a_clear_error(mirror_lab, vstore):
    """A volume image cut short is reported as not a whole number of blocks."""
    c = mirror_lab / "sync" / "C.img"
    c.write_bytes(c.read_bytes()[:1000])
    r = vstore("status", mirror_lab, ok=False)
    assert "not a whole number" in r.stderr


def test_console_script_runs_as_a_process(tmp_path):
    """`python -m vstore.cli` works as a real process: init a lab, then read its status as JSON."""
    lab = tmp_path / "lab"
    r = subprocess.run([sys.executable, "-m", "vstore.cli", "lab", "init", str(lab), "--size", "1M", "--mode",
                        "mirror", "--quiet"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([sys.executable, "-m", "vstore.cli", "status", str(lab), "--json"], capture_output=True,
                       text=True)
    assert json.loads(r.stdout)["pairs"][0]["state"] == "Duplex"


def test_status_counts_waiting_entries_per_volume(tmp_path, vstore):
    """`status` counts the entries and bytes waiting for each volume's async pair separately."""
    lab = tmp_path / "lab"
    vstore("lab", "init", lab, "--mode", "mirror", "--size", "1M", "--volumes", "2", "--quiet")
    vstore("write", lab, "--volume", "0", "--lba", 1, input=blocks(1, 2))
    vstore("write", lab, "--volume", "0", "--lba", 5, input=blocks(2, 1))
    vstore("write", lab, "--volume", "1", "--lba", 5, input=blocks(3, 1))
    pairs = {p["name"]: p for p in json.loads(vstore("status", lab, "--json").stdout)["pairs"]}
    assert pairs["B0->D0"]["entries_waiting"] == 2 and pairs["B1->D1"]["entries_waiting"] == 1
    assert pairs["B0->D0"]["bytes_waiting"] > 3 * BS and BS < pairs["B1->D1"]["bytes_waiting"] < 2 * BS
