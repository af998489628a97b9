"""`vstore demo LAB`: real daemons on 127.0.0.1 in a tmp directory. Nothing
acknowledged is lost at the Sync site, what the Async site misses is a suffix of the written files
(D is a prefix, invariant 2), every acknowledged file reads back from the new primary with the
content the demo wrote, and the demo never overwrites an existing directory."""

from __future__ import annotations

import hashlib
import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import helpers
from vstore.cli.demo_lab import PRIMARY_HOST_PROCESSES, content_for
from vstore.daemons.processes import lab_down, running_pid
from vstore.lab.topology import SITE_NAMES
from vstore.procedures.create import free_base_port

PROCESSES = (*SITE_NAMES, *PRIMARY_HOST_PROCESSES)


@pytest.fixture
def demo_lab(tmp_path):
    lab = tmp_path / "demo"
    yield lab
    if (lab / "topology.toml").is_file():
        lab_down(lab)


def nothing_running(lab) -> bool:
    return all(running_pid(lab, name) is None for name in PROCESSES)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, dict]]:
    """Run once for the module: `vstore demo --json` of 12 files of 6000 bytes, its daemons left up; (the lab,
    the JSON report). Read-only for the tests; afterwards `vstore lab down` must stop every process it left."""
    lab = tmp_path_factory.mktemp("demo") / "demo"
    try:
        doc = json.loads(helpers.vstore("demo", lab, "--files", 12, "--file-size", "6000", "--size", "8M",
                                        "--json").stdout)
        yield lab, doc
        helpers.vstore("lab", "down", lab)
        assert nothing_running(lab)
    finally:
        if (lab / "topology.toml").is_file():
            lab_down(lab)


def test_demo_reports_every_file_it_wrote(demo_run):
    """The demo's report names its lab and lists every file written, with its size and the sha256 of its content."""
    lab, doc = demo_run
    assert doc["lab"] == str(lab) and doc["files_written"] == 12 and doc["seconds"] > 0
    paths = [f["path"] for f in doc["files"]]
    assert len(set(paths)) == 12
    for f in doc["files"]:
        assert f["bytes"] == 6000
        assert f["sha256"] == hashlib.sha256(content_for(f["path"], f["bytes"])).hexdigest()


def test_demo_loses_nothing_at_sync(demo_run):
    """No acknowledged file is lost at the Sync site."""
    assert demo_run[1]["lost_at_sync"] == []


def test_what_async_misses_is_the_newest_files(demo_run):
    """The files in flight at the Async site are a suffix of the files written: D holds a prefix."""
    doc = demo_run[1]
    paths = [f["path"] for f in doc["files"]]
    in_flight = doc["in_flight_at_async"]
    assert set(in_flight) <= set(paths)
    assert in_flight == paths[len(paths) - len(in_flight):]  # D holds a prefix: only the newest can be missing


def test_recovery_at_sync_copies_less_than_the_whole_volume(demo_run):
    """The demo's recovery at Sync reports its copy, which is smaller than a full copy and no fallback."""
    recovery = demo_run[1]["recovery"]
    for key in ("to", "touched_files", "blocks_copied", "bytes_copied", "full_copy_bytes", "fallback_full_copy",
                "seconds"):
        assert key in recovery
    assert recovery["to"] == "sync" and not recovery["fallback_full_copy"]
    assert recovery["bytes_copied"] < recovery["full_copy_bytes"]


def test_after_the_demo_sync_runs_the_application_with_its_daemons_up(demo_run, vstore):
    """After the demo the primary is lost and its host processes killed; Sync runs the application, C->D Duplex."""
    lab, doc = demo_run
    assert doc["daemons"] == "up"
    assert set(doc["killed"]) <= set(PRIMARY_HOST_PROCESSES) and "primary" in doc["killed"]
    assert not (lab / "primary").exists()  # the primary site is lost
    assert "links" not in (lab / "topology.toml").read_text()  # no route through the demo's relay
    assert running_pid(lab, "sync") and running_pid(lab, "async")
    status = json.loads(vstore("status", lab, "--json").stdout)
    assert status["sites"]["sync"]["role"] == "primary"
    assert {p["name"]: p["state"] for p in status["pairs"]} == {"C->D": "Duplex"}


def test_every_acknowledged_file_reads_back_from_the_new_primary(demo_run, jfs):
    """Every file the demo wrote reads back through the new primary with the content the demo wrote."""
    lab, doc = demo_run
    assert doc["missing_at_new_primary"] == []
    for f in doc["files"]:  # through the new primary, as a user would
        assert jfs("read", f"lab:{lab}", f["path"]).stdout_bytes == content_for(f["path"], f["bytes"])


def test_demo_down_prints_the_report_and_stops_the_daemons(demo_lab, vstore, jfs):
    """`demo --down` prints the report and stops every process; the files still read back from the stopped lab."""
    out = vstore("demo", demo_lab, "--files", 3, "--size", "8M", "--async-bandwidth", "0", "--down",
                 "--quiet").stdout
    assert "lost at Sync (C)" in out and "nothing" in out and "in flight at Async (D)" in out
    assert "recovery at Sync" in out and "every acknowledged file readable" in out
    assert nothing_running(demo_lab)
    assert jfs("read", f"lab:{demo_lab}", "/demo/file-00002.txt").stdout_bytes == \
        content_for("/demo/file-00002.txt", 8192)


def test_demo_refuses_an_existing_directory(tmp_path, vstore):
    """The demo never touches a directory that exists and is not empty: one sentence, the contents kept."""
    lab = tmp_path / "busy"
    lab.mkdir()
    (lab / "keep.txt").write_text("mine")
    result = vstore("demo", lab, "--files", 2, ok=False)
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    assert "already exists and is not empty" in result.output and "Traceback" not in result.output
    assert [p.name for p in lab.iterdir()] == ["keep.txt"] and (lab / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("args, message", [
    (("--files", 0), "--files must be at least 1"),
    (("--files", 5000, "--size", "8M"), "do not fit"),
    (("--file-size", "lots"), "cannot read size"),
    (("--base-port", 80), "--base-port must be between"),
])
def test_demo_user_mistakes_are_one_sentence(tmp_path, args, message, vstore):
    """A bad demo option fails with one sentence naming it, before any lab directory is made."""
    lab = tmp_path / "new"
    result = vstore("demo", lab, *args, ok=False)
    assert result.exit_code == 1 and message in result.output and "Traceback" not in result.output
    assert not lab.exists()


def test_demo_far_link_port_in_use_stops_cleanly(tmp_path, vstore):
    """A demo whose far-link port is taken fails naming the port, stops every process and leaves no link route."""
    base = free_base_port(4)
    lab = tmp_path / "busy-port"
    with socket.create_server(("127.0.0.1", base + 3)):  # where the far link would listen
        result = vstore("demo", lab, "--files", 2, "--size", "8M", "--base-port", base, ok=False)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"far link on port {base + 3}" in result.output and "choose another --base-port" in result.output
    assert nothing_running(lab)
    assert "links" not in (lab / "topology.toml").read_text()
