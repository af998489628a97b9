"""`vstore verify --repair` copies exactly what verify found different, source -> target, and the
second verify is clean."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from vstore.cli.main import app
from vstore.procedures.create import init_lab

BS = 4096


def vstore(*args: object, code: int = 0) -> str:
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == code, result.output
    return result.output


def damage(image: Path, lba: int, count: int) -> None:
    with open(image, "r+b") as f:
        f.seek(lba * BS)
        f.write(b"\xee" * (count * BS))


def json_of(output: str) -> dict:
    return json.loads(output[output.index("{"):])


@pytest.fixture
def lab(tmp_path: Path) -> Path:
    lab = tmp_path / "lab"
    init_lab(lab, size=512 * BS)
    (lab / "primary" / "A.img").write_bytes(bytes(range(256)) * (512 * BS // 256))
    vstore("verify", lab, "--repair", "--json")  # the targets take A's new content
    return lab


def test_repair_copies_exactly_the_differing_ranges(lab: Path) -> None:
    """After damage to C and D, --repair copies those ranges only and verify is clean again."""
    damage(lab / "sync" / "C.img", 10, 3)
    damage(lab / "async" / "D.img", 200, 1)
    before = json_of(vstore("verify", lab, "--json", code=1))
    assert {p["name"]: p["differing_ranges"] for p in before["pairs"]} == {"A->C": [[10, 3]], "A->D": [[200, 1]]}
    after = json_of(vstore("verify", lab, "--repair", "--json"))
    assert {p["name"]: p["repaired_ranges"] for p in after["pairs"]} == {"A->C": [[10, 3]], "A->D": [[200, 1]]}
    assert all(p["differing_ranges"] == [] for p in after["pairs"])
    a = (lab / "primary" / "A.img").read_bytes()
    assert (lab / "sync" / "C.img").read_bytes() == a == (lab / "async" / "D.img").read_bytes()


def test_repair_of_equal_pairs_copies_nothing(lab: Path) -> None:
    """On equal replicas --repair copies nothing and exits 0."""
    after = json_of(vstore("verify", lab, "--repair", "--json"))
    assert all(p["repaired_ranges"] == [] and p["differing_ranges"] == [] for p in after["pairs"])


def test_repair_while_the_lab_is_up(lab: Path) -> None:
    """With the daemons up, --repair stops them, repairs, and starts them again."""
    damage(lab / "async" / "D.img", 50, 2)
    vstore("lab", "up", lab)
    try:
        assert json_of(vstore("verify", lab, "--json", code=1))["pairs"][1]["differing_ranges"] == [[50, 2]]
        after = json_of(vstore("verify", lab, "--repair", "--json"))
        assert {p["name"]: p["repaired_ranges"] for p in after["pairs"]}["A->D"] == [[50, 2]]
        assert all(p["differing_ranges"] == [] for p in json_of(vstore("verify", lab, "--json"))["pairs"])
    finally:
        vstore("lab", "down", lab)
