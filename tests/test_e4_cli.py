"""The embodiment-4 user surface: jfs on lab targets (and the target registry), vstore ship/status,
recover --json with the primary's directory deleted, failover --to async after a double failure."""

from __future__ import annotations

import json
import os
import shutil
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest

from jfs import targets
from tests import helpers
from vstore.targets import open_lab_target


@pytest.fixture(scope="module")
def written_provider_lab(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Built once: a provider lab with a jfs of five files, shipped, then a rewrite and a new file not shipped."""
    lab = tmp_path_factory.mktemp("e4") / "lab"
    helpers.vstore("lab", "init", lab, "--size", "8M", "--quiet")
    helpers.jfs("mkfs", f"lab:{lab}")
    helpers.jfs("mkdir", f"lab:{lab}", "/docs")
    for i in range(5):
        helpers.jfs("write", f"lab:{lab}", f"/docs/f{i}", input=f"content {i}\n" * 300)
    helpers.vstore("ship", lab)
    helpers.jfs("write", f"lab:{lab}", "/docs/f1", input="rewritten, never shipped\n")
    helpers.jfs("write", f"lab:{lab}", "/late", input="late\n")
    return lab


@pytest.fixture
def provider_lab(written_provider_lab: Path, tmp_path: Path) -> Path:
    """A private copy of the written provider lab."""
    return shutil.copytree(written_provider_lab, tmp_path / "lab")


@pytest.fixture(scope="module")
def recovered_provider_lab(written_provider_lab: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """Built once: a copy of the written provider lab whose primary directory was deleted, recovered to Sync;
    (the lab, the `recover --json` report)."""
    lab = shutil.copytree(written_provider_lab, tmp_path_factory.mktemp("e4-recovered") / "lab")
    shutil.rmtree(lab / "primary")
    report = json.loads(helpers.vstore("recover", lab, "--to", "sync", "--json").stdout)
    return lab, report


@pytest.fixture
def recovered_lab(recovered_provider_lab: tuple[Path, dict], tmp_path: Path) -> Path:
    """A private copy of the recovered provider lab."""
    return shutil.copytree(recovered_provider_lab[0], tmp_path / "lab")


def test_a_provider_lab_has_no_mirror_volume(tmp_path, vstore):
    """A provider lab has no B volume: the primary holds A only."""
    lab = tmp_path / "lab"
    vstore("lab", "init", lab, "--size", "8M", "--quiet")
    assert not (lab / "primary" / "B.img").exists()


def test_unshipped_file_writes_wait_as_entries(provider_lab, vstore):
    """File writes not yet shipped wait as entries of the async pair."""
    doc = json.loads(vstore("status", provider_lab, "--json").stdout)
    ad = next(p for p in doc["pairs"] if p["kind"] == "async")
    assert ad["entries_waiting"] > 0


def test_the_sync_site_is_a_read_only_replica_with_every_acknowledged_write(provider_lab, jfs):
    """The Sync site already has every acknowledged write, and it refuses writes as a read-only replica."""
    lab = provider_lab
    assert jfs("read", f"lab:{lab}@sync", "/late").stdout == "late\n"
    r = jfs("write", f"lab:{lab}@sync", "/x", input="x", ok=False)
    assert r.exit_code != 0 and "read-only replica" in r.stderr


def test_the_log_of_a_replica_lists_its_records(provider_lab, jfs):
    """`jfs log --json` on a replica lists metadata-log records with seq, inode, path, op and blocks."""
    log = json.loads(jfs("log", f"lab:{provider_lab}@sync", "--json").stdout)
    assert {"seq", "inode", "path", "op", "blocks"} <= set(log["records"][0])


def test_a_lost_primary_is_named_when_its_volume_is_used(provider_lab, jfs):
    """With the primary's directory deleted, using the lab's volume says the primary is lost."""
    shutil.rmtree(provider_lab / "primary")
    r = jfs("ls", f"lab:{provider_lab}", ok=False)
    assert "primary is lost" in r.stderr


def test_recovery_to_sync_copies_a_small_part_of_the_volume(recovered_provider_lab):
    """`recover --to sync --json` reports its copy, which is far smaller than a full copy and no fallback."""
    _, rep = recovered_provider_lab
    for key in ("to", "touched_files", "blocks_copied", "bytes_copied", "full_copy_bytes", "fallback_full_copy",
                "seconds"):
        assert key in rep
    assert rep["to"] == "sync" and not rep["fallback_full_copy"]
    assert 0 < rep["bytes_copied"] < rep["full_copy_bytes"] / 20


def test_after_recovery_both_sites_hold_every_acknowledged_write(recovered_lab, jfs):
    """After recovery to Sync, the new primary holds every acknowledged write, and D is a clean copy of it."""
    lab = recovered_lab
    assert jfs("read", f"lab:{lab}", "/docs/f1").stdout == "rewritten, never shipped\n"
    assert jfs("read", f"lab:{lab}@async", "/late").stdout == "late\n"
    assert jfs("fsck", f"lab:{lab}@async", "-n").exit_code == 0


def test_the_recovered_sync_site_runs_the_application_and_replicates(recovered_lab, jfs, vstore):
    """After recovery Sync runs the application: a new write ships to Async and C->D is the one pair, Duplex."""
    lab = recovered_lab
    jfs("write", f"lab:{lab}", "/after", input="after\n")
    vstore("ship", lab)
    assert jfs("read", f"lab:{lab}@async", "/after").stdout == "after\n"
    doc = json.loads(vstore("status", lab, "--json").stdout)
    assert doc["sites"]["sync"]["role"] == "primary" and doc["sites"]["primary"]["up"] is False
    assert [(p["name"], p["state"]) for p in doc["pairs"]] == [("C->D", "Duplex")]


def test_recovery_to_the_site_already_running_the_application_is_refused(recovered_lab, vstore):
    """`recover --to sync` when Sync already runs the application is refused."""
    r = vstore("recover", recovered_lab, "--to", "sync", ok=False)
    assert r.exit_code == 1 and "already runs the application" in r.stderr


def test_double_failure_failover_to_async(tmp_path, vstore, jfs):
    """Failover to Async is refused while the primary is up; after a double failure D runs the application."""
    lab = tmp_path / "lab"
    vstore("lab", "init", lab, "--size", "8M", "--quiet")
    jfs("mkfs", f"lab:{lab}")
    jfs("write", f"lab:{lab}", "/a", input="shipped\n")
    vstore("ship", lab)
    jfs("write", f"lab:{lab}", "/b", input="in flight\n")
    r = vstore("failover", lab, "--to", "async", ok=False)
    assert "primary site is up" in r.stderr
    shutil.rmtree(lab / "primary")
    shutil.rmtree(lab / "sync")
    out = vstore("failover", lab, "--to", "async").stdout
    assert "fsck exit code 0" in out
    assert jfs("read", f"lab:{lab}", "/a").stdout == "shipped\n"
    assert "b" not in jfs("ls", f"lab:{lab}").stdout.split()
    jfs("write", f"lab:{lab}", "/c", input="new at async\n")
    assert jfs("fsck", f"lab:{lab}", "-n").exit_code == 0


def test_lab_targets_come_from_the_registry():
    """A `lab:` target is opened by the opener registered as the `jfs.targets` entry point `lab`."""
    assert targets.kind("lab", "lab:x") is open_lab_target


def test_target_names_split_and_resolve(tmp_path, monkeypatch):
    """A target splits into its prefix and rest, resolves against the working directory, and names a replica."""
    monkeypatch.chdir(tmp_path)
    assert targets.split("lab:rel@sync") == ("lab", "rel@sync")
    assert targets.absolute("lab:rel@sync") == f"lab:{tmp_path}/rel@sync"
    assert targets.absolute("lab:rel") == f"lab:{tmp_path}/rel"
    assert targets.replica("lab:rel@async") and not targets.replica("lab:rel")
    assert targets.absolute("disk.img") == os.path.join(tmp_path, "disk.img") and not targets.replica("disk.img")


def test_an_image_path_with_a_colon_is_an_image(tmp_path, monkeypatch, jfs):
    """An existing image is an image whatever its name; so is a path whose first part is not a word."""
    monkeypatch.chdir(tmp_path)
    jfs("mkfs", "./a:b.img", "--size", "1M")
    jfs("write", "a:b.img", "/x", input="x\n")
    assert jfs("read", "./a:b.img", "/x").stdout == "x\n"


def test_unknown_prefix_is_one_sentence(jfs):
    """A target prefix with no registered opener fails with one sentence naming the known ones."""
    r = jfs("ls", "nope:thing", ok=False)
    assert r.exit_code == 1 and isinstance(r.exception, SystemExit)
    assert "no opener is registered for nope: targets" in r.stderr and "known: lab:" in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_an_opener_that_cannot_be_loaded_is_one_sentence(monkeypatch, jfs):
    """A registered opener whose module cannot be imported fails with one sentence naming it."""
    broken = EntryPoint(name="lab", value="vstore.no_such_module:open_lab_target", group=targets.GROUP)
    monkeypatch.setattr(targets, "_registered", lambda: {"lab": broken})
    r = jfs("ls", "lab:/tmp/lab", ok=False)
    assert r.exit_code == 1 and isinstance(r.exception, SystemExit)
    assert "the opener of lab: targets (vstore.no_such_module:open_lab_target) cannot be loaded" in r.stderr


def test_fsck_of_a_target_without_an_opener_exits_8(monkeypatch, jfs):
    """`jfs fsck` of a target nothing can open exits 8 (the fsck operational-error code)."""
    monkeypatch.setattr(targets, "_registered", lambda: {})
    r = jfs("fsck", "lab:/tmp/lab", ok=False)
    assert r.exit_code == 8 and "no opener is registered for lab: targets" in r.stderr
