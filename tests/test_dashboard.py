"""`vstore dashboard`: `collect()` and `--once` frames on
labs that are all Duplex, have entries waiting, are fenced, and have failed over; `--svg`; the
ship rate and sparkline of `History`; the Live loop refreshing on a file change (watchdog)."""

from __future__ import annotations

import io
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import typer
from rich.console import Console

from jfs.fs import mkfs
from tests.helpers import BS, blocks, invoke
from vstore.blocks.units import format_size
from vstore.cli import dashboard
from vstore.lab.system import System
from vstore.procedures.recovery import recover
from vstore.replication.storage import WriteInhibited


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


@pytest.fixture
def duplex_mirror_lab(make_lab: Callable[..., Path]) -> Path:
    """A new mirror lab: both pairs Duplex, nothing written."""
    return make_lab(mode="mirror")


def test_all_duplex_mirror_lab(duplex_mirror_lab):
    """`collect` of a new mirror lab: both pairs Duplex, nothing waiting, every site up, events newest first."""
    snap = dashboard.collect(duplex_mirror_lab)
    pairs = by_name(snap)
    assert {n: p["state"] for n, p in pairs.items()} == {"A->C": "Duplex", "B->D": "Duplex"}
    assert pairs["B->D"]["entries_waiting"] == 0 and pairs["B->D"]["oldest_waiting_s"] is None
    assert pairs["A->C"]["direction"] == "primary -> sync"
    assert [v["name"] for v in snap["sites"]["primary"]["volumes"]] == ["A", "B"]
    assert all(s["up"] for s in snap["sites"].values())
    assert snap["events"] and snap["events"][0]["to"] == "Duplex"
    times = [e["time"] for e in snap["events"]]
    assert times == sorted(times, reverse=True)


def test_frame_of_an_all_duplex_lab_names_every_site_pair_and_volume(duplex_mirror_lab):
    """The frame of an all-Duplex lab names every site, pair and volume, and no Suspend."""
    text = frame_text(dashboard.collect(duplex_mirror_lab))
    for word in ("primary", "sync", "async", "A->C", "B->D", "Duplex", "primary:B -> async:D", "vol C"):
        assert word in text
    assert "Suspend" not in text


def test_collect_releases_the_lab_lock(duplex_mirror_lab):
    """After `collect`, another command can open the lab at once."""
    dashboard.collect(duplex_mirror_lab)
    with System(duplex_mirror_lab) as system:
        assert system.role("primary") == "primary"


@pytest.fixture
def three_waiting_entries(make_lab: Callable[..., Path]) -> tuple[Path, Any]:
    """A provider lab with three writes (6 blocks) waiting to ship; (the lab, the entry log's stats)."""
    lab = make_lab(mode="provider")
    with System(lab) as system:
        dev = system.device(0)
        dev.write(1, blocks(1, 2))
        dev.write(10, blocks(2, 3))
        dev.write(40, blocks(3, 1))
        system.save()
        stats = system.entry_log.stats()
    return lab, stats


def test_entries_waiting_counts_and_bytes(three_waiting_entries):
    """The async pair shows the entries and bytes waiting as the entry log counts them, in the frame too."""
    lab, stats = three_waiting_entries
    snap = dashboard.collect(lab)
    ad = next(p for p in snap["pairs"] if p["kind"] == "async")
    assert ad["entries_waiting"] == 3 == stats.entries
    assert ad["bytes_waiting"] == stats.bytes
    assert 6 * BS <= ad["bytes_waiting"] < 6 * BS + 3 * 256  # payload plus small headers
    assert ad["oldest_waiting_s"] is not None and ad["oldest_waiting_s"] >= 0
    assert snap["queue"]["confirmed_seq"] == 0 and snap["queue"]["next_seq"] == 4
    row = next(line for line in frame_text(snap).splitlines() if ad["name"] in line and "async" in line)
    assert " 3 " in row and format_size(ad["bytes_waiting"]) in row


def test_nothing_waits_after_shipping(three_waiting_entries):
    """After shipping nothing waits and the queue's confirmed sequence is the last entry's."""
    lab, _ = three_waiting_entries
    with System(lab) as system:
        system.shipper().ship()
        system.save()
    snap = dashboard.collect(lab)
    ad = next(p for p in snap["pairs"] if p["kind"] == "async")
    assert ad["entries_waiting"] == 0 and ad["bytes_waiting"] == 0
    assert snap["queue"]["confirmed_seq"] == 3


def test_fenced_mirror_lab_shows_suspend_with_reason(make_lab):
    """A fenced lab shows A->C Suspend with its reason and the link down, newest event first, even at 80 columns."""
    lab = make_lab(mode="mirror", protect=True)
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


def test_lab_busy_probe(make_lab):
    """`lab_busy` is true exactly while a command holds the lab open."""
    lab = make_lab(mode="provider")
    assert not dashboard.lab_busy(lab)
    with System(lab):
        assert dashboard.lab_busy(lab)
    assert not dashboard.lab_busy(lab)


def test_failed_over_provider_lab(make_lab):
    """After recovery to Sync the primary shows as lost and the one pair is sync:C -> async:D, Duplex."""
    lab = make_lab(mode="provider")
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


def test_once_prints_one_frame_through_the_cli(duplex_mirror_lab):
    """`dashboard --once` prints one frame showing the pairs and their states."""
    r = invoke(cli_app(), "dashboard", duplex_mirror_lab, "--once")
    assert "A->C" in r.stdout and "B->D" in r.stdout and "Duplex" in r.stdout


def test_svg_writes_the_frame_as_svg_through_the_cli(duplex_mirror_lab, tmp_path):
    """`dashboard --svg FILE` writes the frame as an SVG image naming the pairs."""
    svg = tmp_path / "frame.svg"
    invoke(cli_app(), "dashboard", duplex_mirror_lab, "--svg", svg)
    body = svg.read_text()
    assert body.lstrip().startswith("<svg")
    assert "A-&gt;C" in body and "B-&gt;D" in body


def test_dashboard_of_a_missing_lab_is_one_sentence(tmp_path):
    """`dashboard` of a lab that does not exist fails with one sentence, no traceback."""
    r = invoke(cli_app(), "dashboard", tmp_path / "nope", "--once", ok=False)
    assert r.exit_code == 1 and "does not exist" in r.stderr and "Traceback" not in r.output


def snap_at(t, depth, confirmed, name="B->D"):
    return {"time": t, "pairs": [{"name": name, "kind": "async", "entries_waiting": depth, "confirmed_seq": confirmed},
                                 {"name": "A->C", "kind": "sync", "entries_waiting": 0, "confirmed_seq": None}]}


def test_history_rate_and_sparkline():
    """History gives the confirmed-entries rate and a queue-depth sparkline over its window, never negative."""
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


def test_live_refreshes_on_file_change_and_stops(make_lab):
    """The live view redraws when the lab's files change (long before its interval) and stops when told."""
    lab = make_lab(mode="provider")
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
