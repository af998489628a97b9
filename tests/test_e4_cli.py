"""The embodiment-4 user surface: jfs on lab targets (and the target registry), vstore ship/status,
recover --json with the primary's directory deleted, failover --to async after a double failure."""

from __future__ import annotations

import json
import os
import shutil
from importlib.metadata import EntryPoint

from jfs import targets
from jfs.cli import app as jfs_app
from tests.labutil import invoke
from vstore.cli.main import app as vstore_app
from vstore.targets import open_lab_target


def vstore(*args, ok=True, input=None):
    return invoke(vstore_app, *args, ok=ok, input=input)


def jfs(*args, ok=True, input=None):
    return invoke(jfs_app, *args, ok=ok, input=input)


def test_provider_lab_recover_to_sync_with_primary_deleted(tmp_path):
    lab = tmp_path / "lab"
    vstore("lab", "init", lab, "--size", "8M", "--quiet")
    assert not (lab / "primary" / "B.img").exists()
    jfs("mkfs", f"lab:{lab}")
    jfs("mkdir", f"lab:{lab}", "/docs")
    for i in range(5):
        jfs("write", f"lab:{lab}", f"/docs/f{i}", input=f"content {i}\n" * 300)
    vstore("ship", lab)
    jfs("write", f"lab:{lab}", "/docs/f1", input="rewritten, never shipped\n")
    jfs("write", f"lab:{lab}", "/late", input="late\n")
    doc = json.loads(vstore("status", lab, "--json").stdout)
    ad = next(p for p in doc["pairs"] if p["kind"] == "async")
    assert ad["entries_waiting"] > 0
    # the Sync site already has every acknowledged write; it is a read-only replica
    assert jfs("read", f"lab:{lab}@sync", "/late").stdout == "late\n"
    r = jfs("write", f"lab:{lab}@sync", "/x", input="x", ok=False)
    assert r.exit_code != 0 and "read-only replica" in r.stderr
    log = json.loads(jfs("log", f"lab:{lab}@sync", "--json").stdout)
    assert {"seq", "inode", "path", "op", "blocks"} <= set(log["records"][0])

    shutil.rmtree(lab / "primary")
    r = jfs("ls", f"lab:{lab}", ok=False)
    assert "primary is lost" in r.stderr
    rep = json.loads(vstore("recover", lab, "--to", "sync", "--json").stdout)
    for key in ("to", "touched_files", "blocks_copied", "bytes_copied", "full_copy_bytes", "fallback_full_copy",
                "seconds"):
        assert key in rep
    assert rep["to"] == "sync" and not rep["fallback_full_copy"]
    assert 0 < rep["bytes_copied"] < rep["full_copy_bytes"] / 20
    assert jfs("read", f"lab:{lab}", "/docs/f1").stdout == "rewritten, never shipped\n"
    assert jfs("read", f"lab:{lab}@async", "/late").stdout == "late\n"
    assert jfs("fsck", f"lab:{lab}@async", "-n").exit_code == 0
    jfs("write", f"lab:{lab}", "/after", input="after\n")
    vstore("ship", lab)
    assert jfs("read", f"lab:{lab}@async", "/after").stdout == "after\n"
    doc = json.loads(vstore("status", lab, "--json").stdout)
    assert doc["sites"]["sync"]["role"] == "primary" and doc["sites"]["primary"]["up"] is False
    assert [(p["name"], p["state"]) for p in doc["pairs"]] == [("C->D", "Duplex")]
    r = vstore("recover", lab, "--to", "sync", ok=False)
    assert r.exit_code == 1 and "already runs the application" in r.stderr


def test_double_failure_failover_to_async(tmp_path):
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


def test_lab_targets_come_from_the_registry(tmp_path, monkeypatch):
    assert targets.kind("lab", "lab:x") is open_lab_target  # the `jfs.targets` entry point `lab`
    monkeypatch.chdir(tmp_path)
    assert targets.split("lab:rel@sync") == ("lab", "rel@sync")
    assert targets.absolute("lab:rel@sync") == f"lab:{tmp_path}/rel@sync"
    assert targets.absolute("lab:rel") == f"lab:{tmp_path}/rel"
    assert targets.replica("lab:rel@async") and not targets.replica("lab:rel")
    assert targets.absolute("disk.img") == os.path.join(tmp_path, "disk.img") and not targets.replica("disk.img")
    # an existing image is an image, whatever its name; so is a path whose first part is not a word
    jfs("mkfs", "./a:b.img", "--size", "1M")
    jfs("write", "a:b.img", "/x", input="x\n")
    assert jfs("read", "./a:b.img", "/x").stdout == "x\n"


def test_unknown_prefix_or_missing_opener_is_one_sentence(monkeypatch):
    r = jfs("ls", "nope:thing", ok=False)
    assert r.exit_code == 1 and isinstance(r.exception, SystemExit)
    assert "no opener is registered for nope: targets" in r.stderr and "known: lab:" in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    broken = EntryPoint(name="lab", value="vstore.no_such_module:open_lab_target", group=targets.GROUP)
    monkeypatch.setattr(targets, "_registered", lambda: {"lab": broken})
    r = jfs("ls", "lab:/tmp/lab", ok=False)
    assert r.exit_code == 1 and isinstance(r.exception, SystemExit)
    assert "the opener of lab: targets (vstore.no_such_module:open_lab_target) cannot be loaded" in r.stderr
    monkeypatch.setattr(targets, "_registered", lambda: {})
    r = jfs("fsck", "lab:/tmp/lab", ok=False)
    assert r.exit_code == 8 and "no opener is registered for lab: targets" in r.stderr
