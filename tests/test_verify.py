"""`vstore verify`: a single flipped block on C, on D and
on B is found and named exactly; a healthy lab reports nothing; blocks with unshipped entries or
recorded positions are skipped, not reported; exit codes and `--json` keys through CliRunner."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from tests.helpers import BS, blocks
from vstore import reports
from vstore.blocks.digests import READ_BLOCKS, digest, run_digests
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


@pytest.fixture(scope="module")
def shipped_mirror_lab(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Built once: a mirror lab with data on many blocks, everything shipped: all four volumes equal."""
    lab = tmp_path_factory.mktemp("verify") / "lab"
    init_lab(lab, mode="mirror", size=1 << 20)
    with System(lab) as system:
        dev = system.device(0)
        for i in range(12):
            dev.write(i * 20, blocks(i, 3))
        system.shipper().ship()
        system.save()
    return lab


@pytest.fixture
def lab(shipped_mirror_lab: Path, tmp_path: Path) -> Path:
    """A private copy of the shipped mirror lab."""
    return shutil.copytree(shipped_mirror_lab, tmp_path / "lab")


def flip(lab, site, volume, lba, offset=100):
    path = lab / site / f"{volume}.img"
    data = bytearray(path.read_bytes())
    data[lba * BS + offset] ^= 0x5A
    path.write_bytes(bytes(data))


def results(lab, **kw):
    with System(lab) as system:
        return {r["name"]: r for r in reports.verify(system, **kw)}


def test_healthy_lab_reports_nothing(lab):
    """On a lab whose copies are equal, every pair compares every block and reports no difference."""
    res = results(lab)
    assert set(res) == {"A->C", "B->D"}
    for r in res.values():
        assert r["differing_ranges"] == [] and r["blocks_compared"] == 256 and r["skipped_unshipped"] == 0
        assert "error" not in r


def test_cli_on_a_healthy_lab_says_equal_and_exits_0(lab):
    """`vstore verify` of a healthy lab exits 0 saying equal; `--json` lists both pairs with no difference."""
    r = run_verify(lab)
    assert r.exit_code == 0, r.output
    assert "equal" in r.stdout
    doc = json.loads(run_verify(lab, "--json").stdout)
    assert [p["name"] for p in doc["pairs"]] == ["A->C", "B->D"]
    assert all(p["differing_ranges"] == [] for p in doc["pairs"])


FLIPS = pytest.mark.parametrize(("site", "volume", "pair", "lba"), [
    ("sync", "C", "A->C", 41),      # a block with data, inside a chunk
    ("async", "D", "B->D", 250),    # an all-zero block
    ("primary", "B", "B->D", 63),   # the last block of the first chunk
])


def other_pair(pair: str) -> str:
    """The mirror lab's pair that is not `pair`."""
    return ({"A->C", "B->D"} - {pair}).pop()


@FLIPS
def test_single_flipped_block_is_named(lab, site, volume, pair, lba):
    """One flipped block on C, D or B is reported as exactly that block of its pair, and the other pair is clean."""
    flip(lab, site, volume, lba)
    res = results(lab)
    assert res[pair]["differing_ranges"] == [[lba, 1]]
    assert res[other_pair(pair)]["differing_ranges"] == []


@FLIPS
def test_cli_names_the_flipped_block_and_exits_1(lab, site, volume, pair, lba):
    """`vstore verify` exits 1 naming the pair and the block that differ."""
    flip(lab, site, volume, lba)
    r = run_verify(lab)
    assert r.exit_code == 1
    assert pair in r.stdout and str(lba) in r.stdout and "differ" in r.stdout


@FLIPS
def test_cli_json_names_the_flipped_block(lab, site, volume, pair, lba):
    """`vstore verify --json` exits 1 with one `pairs` list whose entry for the pair names the block."""
    flip(lab, site, volume, lba)
    r = run_verify(lab, "--json")
    assert r.exit_code == 1
    doc = json.loads(r.stdout)
    assert set(doc) == {"pairs"}
    by = {p["name"]: p for p in doc["pairs"]}
    assert by[pair]["differing_ranges"] == [[lba, 1]]
    assert {"name", "differing_ranges", "blocks_compared", "skipped_unshipped"} <= set(by[pair])


@FLIPS
def test_pair_option_verifies_only_that_pair(lab, site, volume, pair, lba):
    """`verify --pair P` compares P only: the other pair's flipped block does not count."""
    flip(lab, site, volume, lba)
    other = other_pair(pair)
    r = run_verify(lab, "--pair", other, "--json")
    assert r.exit_code == 0 and [p["name"] for p in json.loads(r.stdout)["pairs"]] == [other]


def test_adjacent_blocks_merge_into_one_range_and_small_chunks_agree(lab):
    """Adjacent differing blocks merge into one range, and every comparison chunk size finds the same ranges."""
    for lba in (62, 63, 64, 65, 130):
        flip(lab, "sync", "C", lba, offset=lba)
    for chunk in (1, 7, 64, 256):
        assert results(lab, chunk_blocks=chunk)["A->C"]["differing_ranges"] == [[62, 4], [130, 1]]


def test_unshipped_entries_and_recorded_positions_are_skipped(lab):
    """Blocks with unshipped entries are skipped and counted, not reported; a real difference beside them is."""
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
    """Blocks whose positions a pair recorded (not copied yet) are skipped and counted, not reported."""
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
    """A pair whose target cannot be reached is an error (exit 2), never reported as equal."""
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
    """An unknown pair or a missing lab fails with one sentence, exit 1, no traceback."""
    r = run_verify(lab, "--pair", "X->Y")
    assert r.exit_code == 1 and "no pair named" in r.stderr and "Traceback" not in r.output
    r = run_verify(tmp_path / "missing")
    assert r.exit_code == 1 and "does not exist" in r.stderr


@pytest.mark.parametrize(("count", "per"), [(1, 1), (7, 3), (1024, 64), (1500, 64), (2049, 1000), (3, 5)])
def test_run_digests_cover_every_block_once_in_runs_of_per(count: int, per: int) -> None:
    """One digest per run of `per` blocks, the last run shorter, whatever the read size inside."""
    data = bytes(i % 251 for i in range(count * 8))
    reads: list[int] = []

    def read(lba: int, n: int) -> bytes:
        reads.append(n)
        return data[lba * 8:(lba + n) * 8]

    got = run_digests(read, 0, count, per)
    assert got == [digest(data[i * 8:min(i + per, count) * 8]) for i in range(0, count, per)]
    assert max(reads) <= max(per, READ_BLOCKS)  # memory stays bounded however much is digested


def test_verify_finds_a_difference_past_the_first_digest_request(tmp_path: Path) -> None:
    """A lab larger than one digest request: a block flipped in the last chunk is still named."""
    lab = tmp_path / "big"
    init_lab(lab, size=20000 * BS)
    with System(lab) as system:
        system.device().write(19999, blocks(3))
        system.shipper().ship()
        system.storages["sync"].volume("C").device.write(19998, blocks(4))
        result = {r["name"]: r for r in reports.verify(system)}
    assert result["A->C"]["differing_ranges"] == [[19998, 1]]
    assert result["A->D"]["differing_ranges"] == []
