"""The `vstore` command for embodiment 1 in one process, run through typer's
CliRunner and, once, as a real subprocess."""

from __future__ import annotations

import json
import subprocess
import sys

from typer.testing import CliRunner

from tests.labutil import BS, blocks, image
from vstore.cli.main import app

runner = CliRunner()


def run(*args, input=None, ok=True):
    result = runner.invoke(app, [str(a) for a in args], input=input)
    if ok:
        assert result.exit_code == 0, result.output + str(result.exception)
    return result


def test_mirror_lab_end_to_end(tmp_path):
    lab = tmp_path / "lab"
    run("lab", "init", lab, "--mode", "mirror", "--size", "1M", "--quiet")
    for f in ("topology.toml", "lab.key", "primary/A.img", "primary/B.img", "primary/spool", "primary/state.json",
              "sync/C.img", "sync/state.json", "async/D.img", "async/recv", "async/state.json"):
        assert (lab / f).exists(), f
    assert (lab / "lab.key").stat().st_mode & 0o777 == 0o600
    doc = json.loads(run("status", lab, "--json").stdout)
    assert doc["mode"] == "mirror" and set(doc["sites"]) == {"primary", "sync", "async"}
    assert {p["name"]: p["state"] for p in doc["pairs"]} == {"A->C": "Duplex", "B->D": "Duplex"}
    for key in ("name", "source", "target", "kind", "state", "reason", "entries_waiting", "bytes_waiting",
                "oldest_waiting_s"):
        assert key in doc["pairs"][0]

    data = tmp_path / "data"
    data.write_bytes(blocks(1, 3))
    run("write", lab, "--lba", 4, "--file", data)
    run("write", lab, "--lba", 9, input=blocks(2, 1))
    assert image(lab, "primary", "A") == image(lab, "sync", "C")
    doc = json.loads(run("status", lab, "--json").stdout)
    bd = next(p for p in doc["pairs"] if p["name"] == "B->D")
    assert bd["entries_waiting"] == 2 and bd["bytes_waiting"] >= 4 * BS and bd["oldest_waiting_s"] >= 0
    out = run("read", lab, "--site", "sync", "--volume", "C", "--lba", 4, "--count", 3).stdout_bytes
    assert out == blocks(1, 3)
    run("ship", lab, "--max", "1")
    assert json.loads(run("status", lab, "--json").stdout)["pairs"][1]["entries_waiting"] == 1
    run("ship", lab)
    assert image(lab, "primary", "B") == image(lab, "async", "D")

    # fence: cut the sync link, the write is refused naming the fence, nothing changes
    run("fail", lab, "primary-sync")
    before = [image(lab, s, v) for s, v in (("primary", "A"), ("primary", "B"), ("sync", "C"))]
    r = run("write", lab, "--lba", 0, input=blocks(3), ok=False)
    assert r.exit_code == 1 and "fence" in r.stderr and "Traceback" not in r.output
    assert before == [image(lab, s, v) for s, v in (("primary", "A"), ("primary", "B"), ("sync", "C"))]
    doc = json.loads(run("status", lab, "--json").stdout)
    ac = next(p for p in doc["pairs"] if p["name"] == "A->C")
    assert ac["state"] == "Suspend" and "primary-sync" in ac["reason"]
    run("heal", lab, "primary-sync")
    run("write", lab, "--lba", 0, input=blocks(3))
    assert image(lab, "primary", "A") == image(lab, "sync", "C")


def test_bad_input_gives_one_clear_sentence(tmp_path):
    lab = tmp_path / "lab"
    run("lab", "init", lab, "--mode", "mirror", "--size", "1M", "--quiet")
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
        r = run(*args, input=stdin, ok=False)
        assert r.exit_code != 0 and words in r.stderr, (args, r.output)
        assert "Traceback" not in r.output
    a_before = image(lab, "primary", "A")
    assert a_before == image(lab, "sync", "C")
    # a truncated image: clear error, nothing changed
    c = lab / "sync" / "C.img"
    c.write_bytes(c.read_bytes()[:1000])
    r = run("status", lab, ok=False)
    assert "not a whole number" in r.stderr


def test_console_script_runs_as_a_process(tmp_path):
    lab = tmp_path / "lab"
    r = subprocess.run([sys.executable, "-m", "vstore.cli", "lab", "init", str(lab), "--size", "1M", "--mode",
                        "mirror", "--quiet"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([sys.executable, "-m", "vstore.cli", "status", str(lab), "--json"], capture_output=True,
                       text=True)
    assert json.loads(r.stdout)["pairs"][0]["state"] == "Duplex"


def test_status_counts_waiting_entries_per_volume(tmp_path):
    lab = tmp_path / "lab"
    run("lab", "init", lab, "--mode", "mirror", "--size", "1M", "--volumes", "2", "--quiet")
    run("write", lab, "--volume", "0", "--lba", 1, input=blocks(1, 2))
    run("write", lab, "--volume", "0", "--lba", 5, input=blocks(2, 1))
    run("write", lab, "--volume", "1", "--lba", 5, input=blocks(3, 1))
    pairs = {p["name"]: p for p in json.loads(run("status", lab, "--json").stdout)["pairs"]}
    assert pairs["B0->D0"]["entries_waiting"] == 2 and pairs["B1->D1"]["entries_waiting"] == 1
    assert pairs["B0->D0"]["bytes_waiting"] > 3 * BS and BS < pairs["B1->D1"]["bytes_waiting"] < 2 * BS
