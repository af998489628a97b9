"""`vstore dashboard`: `collect()` and `--once` frames on
labs that are all Duplex, have entries waiting, are fenced, and have failed over; `--svg`; the
ship rate and sparkline of `History`; the Live loop refreshing on a file change (watchdog)."""

from __future__ import annotations

import io
import shutil
import threading
import time

import pytest
import typer
from rich.console import Console
from typer.testing import CliRunner

from tests.labutil import BS, blocks
from vstore.blocks.units import format_size
from vstore.cli import dashboard
from vstore.lab.system import System
from vstore.procedures.create import init_lab
from vstore.replication.storage import WriteInhibited

runner = CliRunner()


def make(tmp_path, mode, **kw):
    lab = tmp_path / "lab"
    init_lab(lab, mode=mode, size=1 << 20, **kw)
    return lab


def frame_text(snapshot, history=None, width=160) -> str:
    console = Console(record=True, width=width, file=io.StringIO())
    console.print(dashboard.render(snapshot, history or dashboard.History()))
    return console.export_text()


def cli_app() -> typer.Typer:
    app = typer.Typer()
    dashboard.register(app)

    @app.command()
    def noop() -> None:  # a second command keeps typer in multi-command mode, like `vstore`
        pass

    return app


def by_name(snapshot):
    return {p["name"]: p for p in snapshot["pairs"]}


def test_all_duplex_mirror_lab(tmp_path):
    lab = make(tmp_path, "mirror")
    snap = dashboard.collect(lab)
    pairs = by_name(snap)
    assert {n: p["state"] for n, p in pairs.items()} == {"A->C": "Duplex", "B->D": "Duplex"}
    assert pairs["B->D"]["entries_waiting"] == 0 and pairs["B->D"]["oldest_waiting_s"] is None
    assert pairs["A->C"]["direction"] == "primary -> sync"
    assert [v["name"] for v in snap["sites"]["primary"]["volumes"]] == ["A", "B"]
    assert all(s["up"] for s in snap["sites"].values())
    assert snap["events"] and snap["events"][0]["to"] == "Duplex"
    times = [e["time"] for e in snap["events"]]
    assert times == sorted(times, reverse=True)
    text = frame_text(snap)
    for word in ("primary", "sync", "async", "A->C", "B->D", "Duplex", "primary:B -> async:D", "vol C"):
        assert word in text
    assert "Suspend" not in text
    # the lock is released: another command can open the lab at once
    with System(lab) as system:
        assert system.role("primary") == "primary"


def test_entries_waiting_counts_and_bytes(tmp_path):
    lab = make(tmp_path, "provider")
    with System(lab) as system:
        dev = system.device(0)
        dev.write(1, blocks(1, 2))
        dev.write(10, blocks(2, 3))
        dev.write(40, blocks(3, 1))
        system.save()
        stats = system.entry_log.stats()
    snap = dashboard.collect(lab)
    ad = next(p for p in snap["pairs"] if p["kind"] == "async")
    assert ad["entries_waiting"] == 3 == stats.entries
    assert ad["bytes_waiting"] == stats.bytes
    assert 6 * BS <= ad["bytes_waiting"] < 6 * BS + 3 * 256  # payload plus small headers
    assert ad["oldest_waiting_s"] is not None and ad["oldest_waiting_s"] >= 0
    assert snap["queue"]["confirmed_seq"] == 0 and snap["queue"]["next_seq"] == 4
    row = next(line for line in frame_text(snap).splitlines() if ad["name"] in line and "async" in line)
    assert " 3 " in row and format_size(ad["bytes_waiting"]) in row

    with System(lab) as system:
        system.shipper().ship()
        system.save()
    snap = dashboard.collect(lab)
    ad = next(p for p in snap["pairs"] if p["kind"] == "async")
    assert ad["entries_waiting"] == 0 and ad["bytes_waiting"] == 0
    assert snap["queue"]["confirmed_seq"] == 3


def test_fenced_mirror_lab_shows_suspend_with_reason(tmp_path):
    lab = make(tmp_path, "mirror", protect=True)
    with System(lab) as system:
        system.faults.set("link", "primary-sync", True)
        system.faults.save(system.lab_dir)
        with pytest.raises(WriteInhibited):
            system.device(0).write(3, blocks(5))
        system.save()
    snap = dashboard.collect(lab)
    ac = by_name(snap)["A->C"]
    assert ac["state"] == "Suspend" and ac["failure"]
    assert "primary-sync" in ac["reason"] and "fenced" in ac["reason"]
    assert snap["links"]["primary-sync"] is False
    newest = snap["events"][0]
    assert newest["pair"] == "A->C" and newest["to"] == "Suspend" and newest["failure"]
    text = frame_text(snap)
    assert "links down: primary-sync" in text
    events = text[text.index("recent state changes"):]
    line = next(ln for ln in events.splitlines() if "A->C" in ln)  # newest first: the failure
    assert "failure" in line and "Suspend" in line and "primary-sync" in line and "fenced" in line
    narrow = frame_text(snap, width=80)  # an 80-column terminal drops columns, never the state or reason
    assert "Suspend" in narrow and "Duplex" in narrow and "A->C Suspend: link primary-sync is down" in narrow


def test_lab_busy_probe(tmp_path):
    lab = make(tmp_path, "provider")
    assert not dashboard.lab_busy(lab)
    with System(lab):
        assert dashboard.lab_busy(lab)
    assert not dashboard.lab_busy(lab)


def test_failed_over_provider_lab(tmp_path):
    from jfs.fs import mkfs
    from vstore.procedures.recovery import recover
    lab = make(tmp_path, "provider")
    with System(lab) as system:
        mkfs(system.device(0))
        system.shipper().ship()
        system.save()
    shutil.rmtree(lab / "primary")
    with System(lab) as system:
        recover(system, "sync")
        system.save()
    snap = dashboard.collect(lab)
    assert snap["sites"]["primary"]["present"] is False and snap["sites"]["primary"]["up"] is False
    assert snap["sites"]["primary"]["role"] == "lost" and snap["sites"]["primary"]["volumes"] == []
    assert snap["sites"]["sync"]["role"] == "primary"
    (pair,) = snap["pairs"]
    assert pair["source"] == "sync:C" and pair["target"] == "async:D"
    assert pair["state"] == "Duplex" and pair["direction"] == "sync -> async"
    assert snap["queue"]["site"] == "sync"
    text = frame_text(snap)
    assert "LOST" in text and "sync:C -> async:D" in text and "A->C" not in text.split("recent state")[0]


def test_once_and_svg_through_the_cli(tmp_path):
    lab = make(tmp_path, "mirror")
    app = cli_app()
    r = runner.invoke(app, ["dashboard", str(lab), "--once"])
    assert r.exit_code == 0, r.output + str(r.exception)
    assert "A->C" in r.stdout and "B->D" in r.stdout and "Duplex" in r.stdout
    svg = tmp_path / "frame.svg"
    r = runner.invoke(app, ["dashboard", str(lab), "--svg", str(svg)])
    assert r.exit_code == 0, r.output + str(r.exception)
    body = svg.read_text()
    assert body.lstrip().startswith("<svg")
    assert "A-&gt;C" in body and "B-&gt;D" in body
    r = runner.invoke(app, ["dashboard", str(tmp_path / "nope"), "--once"])
    assert r.exit_code == 1 and "does not exist" in r.stderr and "Traceback" not in r.output


def snap_at(t, depth, confirmed, name="B->D"):
    return {"time": t, "pairs": [{"name": name, "kind": "async", "entries_waiting": depth, "confirmed_seq": confirmed},
                                 {"name": "A->C", "kind": "sync", "entries_waiting": 0, "confirmed_seq": None}]}


def test_history_rate_and_sparkline():
    h = dashboard.History(window_s=80, rate_window_s=30)
    assert h.rate("B->D") is None and h.sparkline("B->D") == ""
    h.add(snap_at(1000, 0, 10))
    assert h.rate("B->D") is None
    for i, depth in enumerate([2, 4, 8, 4, 0, 0, 1]):
        h.add(snap_at(1010 + 10 * i, depth, 10 + 5 * (i + 1)))
    assert h.rate("B->D") == pytest.approx(0.5)  # 5 entries confirmed every 10 s
    line = h.sparkline("B->D", width=8)
    assert len(line) == 8 and set(line) <= set(dashboard.SPARK_BLOCKS) | {" "}
    assert "█" in line and "▁" in line
    assert "A->C" not in h.samples
    # samples older than the window are dropped; a new spool (sequence restarts) does not go negative
    h.add(snap_at(2000, 0, 2))
    h.add(snap_at(2010, 0, 12))
    assert len(h.samples["B->D"]) == 2 and h.rate("B->D") == pytest.approx(1.0)
    assert dashboard.spark([0, 0]) == "▁▁" and dashboard.spark([0, 7]) == "▁█"


def test_live_refreshes_on_file_change_and_stops(tmp_path):
    lab = make(tmp_path, "provider")
    frames: list = []
    stop = threading.Event()
    console = Console(file=io.StringIO(), width=160)
    thread = threading.Thread(target=dashboard._live, args=(lab, dashboard.History(), 30.0, console),
                              kwargs={"stop": stop, "on_frame": frames.append}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 5
        while not frames and time.monotonic() < deadline:
            time.sleep(0.02)
        assert frames and frames[0]["pairs"][1]["entries_waiting"] == 0
        time.sleep(0.3)  # the observer is watching
        with System(lab) as system:
            system.device(0).write(7, blocks(7))
            system.save()
        deadline = time.monotonic() + 5  # far below the 30 s interval: only watchdog can wake it
        while time.monotonic() < deadline and not any(
                f and next(p for p in f["pairs"] if p["kind"] == "async")["entries_waiting"] == 1 for f in frames):
            time.sleep(0.02)
        assert any(f and next(p for p in f["pairs"] if p["kind"] == "async")["entries_waiting"] == 1 for f in frames)
    finally:
        stop.set()
        thread.join(timeout=5)
    assert not thread.is_alive()
