"""`vstore verify`: a single flipped block on C, on D and
on B is found and named exactly; a healthy lab reports nothing; blocks with unshipped entries or
recorded positions are skipped, not reported; exit codes and `--json` keys through CliRunner."""

from __future__ import annotations

import json

import pytest
import typer
from typer.testing import CliRunner

from tests.labutil import BS, blocks
from vstore import reports
from vstore.cli import verify
from vstore.lab.system import System
from vstore.procedures.create import init_lab

runner = CliRunner()


def cli_app() -> typer.Typer:
    app = typer.Typer()
    verify.register(app)

    @app.command()
    def noop() -> None:  # a second command keeps typer in multi-command mode, like `vstore`
        pass

    return app


APP = cli_app()


def run_verify(lab, *args):
    return runner.invoke(APP, ["verify", str(lab), *args])


@pytest.fixture
def lab(tmp_path):
    """A mirror lab with data on many blocks, everything shipped: all four volumes equal."""
    lab = tmp_path / "lab"
    init_lab(lab, mode="mirror", size=1 << 20)
    with System(lab) as system:
        dev = system.device(0)
        for i in range(12):
            dev.write(i * 20, blocks(i, 3))
        system.shipper().ship()
        system.save()
    return lab


def flip(lab, site, volume, lba, offset=100):
    path = lab / site / f"{volume}.img"
    data = bytearray(path.read_bytes())
    data[lba * BS + offset] ^= 0x5A
    path.write_bytes(bytes(data))


def results(lab, **kw):
    with System(lab) as system:
        return {r["name"]: r for r in reports.verify(system, **kw)}


def test_healthy_lab_reports_nothing(lab):
    res = results(lab)
    assert set(res) == {"A->C", "B->D"}
    for r in res.values():
        assert r["differing_ranges"] == [] and r["blocks_compared"] == 256 and r["skipped_unshipped"] == 0
        assert "error" not in r
    r = run_verify(lab)
    assert r.exit_code == 0, r.output
    assert "equal" in r.stdout
    doc = json.loads(run_verify(lab, "--json").stdout)
    assert [p["name"] for p in doc["pairs"]] == ["A->C", "B->D"]
    assert all(p["differing_ranges"] == [] for p in doc["pairs"])


@pytest.mark.parametrize(("site", "volume", "pair", "lba"), [
    ("sync", "C", "A->C", 41),      # a block with data, inside a chunk
    ("async", "D", "B->D", 250),    # an all-zero block
    ("primary", "B", "B->D", 63),   # the last block of the first chunk
])
def test_single_flipped_block_is_named(lab, site, volume, pair, lba):
    flip(lab, site, volume, lba)
    res = results(lab)
    assert res[pair]["differing_ranges"] == [[lba, 1]]
    other = ({"A->C", "B->D"} - {pair}).pop()
    assert res[other]["differing_ranges"] == []
    r = run_verify(lab)
    assert r.exit_code == 1
    assert pair in r.stdout and str(lba) in r.stdout and "differ" in r.stdout
    r = run_verify(lab, "--json")
    assert r.exit_code == 1
    doc = json.loads(r.stdout)
    assert set(doc) == {"pairs"}
    by = {p["name"]: p for p in doc["pairs"]}
    assert by[pair]["differing_ranges"] == [[lba, 1]]
    assert {"name", "differing_ranges", "blocks_compared", "skipped_unshipped"} <= set(by[pair])
    r = run_verify(lab, "--pair", other, "--json")
    assert r.exit_code == 0 and [p["name"] for p in json.loads(r.stdout)["pairs"]] == [other]


def test_adjacent_blocks_merge_into_one_range_and_small_chunks_agree(lab):
    for lba in (62, 63, 64, 65, 130):
        flip(lab, "sync", "C", lba, offset=lba)
    for chunk in (1, 7, 64, 256):
        assert results(lab, chunk_blocks=chunk)["A->C"]["differing_ranges"] == [[62, 4], [130, 1]]


def test_unshipped_entries_and_recorded_positions_are_skipped(lab):
    with System(lab) as system:
        system.device(0).write(5, blocks(50, 2))  # unshipped: D lags on 5-6
        system.save()
    res = results(lab)
    assert res["B->D"]["differing_ranges"] == [] and res["B->D"]["skipped_unshipped"] == 2
    assert res["B->D"]["blocks_compared"] == 254
    assert res["A->C"]["differing_ranges"] == [] and res["A->C"]["skipped_unshipped"] == 0
    flip(lab, "async", "D", 9)  # a real difference next to the lagging blocks is still found
    assert results(lab)["B->D"]["differing_ranges"] == [[9, 1]]


def test_protection_off_recorded_positions_are_skipped(tmp_path):
    lab = tmp_path / "lab"
    init_lab(lab, mode="mirror", size=1 << 20, protect=False)
    with System(lab) as system:
        system.faults.set("link", "primary-sync", True)
        system.device(0).write(30, blocks(3, 2))  # recorded in A->C's bitmap
        system.faults.set("link", "primary-sync", False)
        system.shipper().ship()
        system.faults.save(system.lab_dir)
        system.save()
    res = results(lab)
    assert res["A->C"]["differing_ranges"] == [] and res["A->C"]["skipped_unshipped"] == 2
    assert res["B->D"]["differing_ranges"] == []


def test_unreachable_target_is_an_error_not_a_pass(lab):
    with System(lab) as system:
        system.faults.set("site", "async", True)
        system.faults.save(system.lab_dir)
    res = results(lab)
    assert "async" in res["B->D"]["error"] and res["A->C"]["differing_ranges"] == []
    r = run_verify(lab, "--json")
    assert r.exit_code == 2 and "error" in {p["name"]: p for p in json.loads(r.stdout)["pairs"]}["B->D"]
    r = run_verify(lab)
    assert r.exit_code == 2 and "cannot verify" in r.stdout


def test_user_errors(lab, tmp_path):
    r = run_verify(lab, "--pair", "X->Y")
    assert r.exit_code == 1 and "no pair named" in r.stderr and "Traceback" not in r.output
    r = run_verify(tmp_path / "missing")
    assert r.exit_code == 1 and "does not exist" in r.stderr
