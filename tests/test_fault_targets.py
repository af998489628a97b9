"""`vstore fail` / `vstore heal` change exactly the site, link or site:volume they name: unknown
targets are usage errors listing the valid forms, a failed site volume fails for the copy programs,
and healing what is not failed says so without claiming a repair."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from vstore.cli.main import app
from vstore.daemons.processes import lab_down
from vstore.procedures.create import free_base_port, init_lab
from vstore.replication.network import Faults, UnknownFaultTarget, resolve_target

BS = 4096


def vstore(*args: object, ok: bool = True, stdin: bytes | None = None) -> Result:
    result = CliRunner().invoke(app, [str(a) for a in args], input=stdin)
    if ok:
        assert result.exit_code == 0, result.output + str(result.exception)
    return result


def block(seed: int) -> bytes:
    return random.Random(seed).randbytes(BS)


def faults_doc(lab: Path) -> dict:
    path = lab / "faults.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def pair_states(lab: Path) -> dict[str, tuple[str, str | None]]:
    doc = json.loads(vstore("status", lab, "--json").stdout)
    return {p["name"]: (p["state"], p["reason"]) for p in doc["pairs"]}


@pytest.fixture
def lab(tmp_path: Path) -> Path:
    path = tmp_path / "lab"
    init_lab(path, size=256 * BS)
    return path


@pytest.fixture
def mirror_lab(tmp_path: Path) -> Path:
    path = tmp_path / "mirror"
    init_lab(path, mode="mirror", size=256 * BS)
    return path


@pytest.mark.parametrize("target", ["nowhere", "volume:Z", "volume:mars:C", "volume:sync:D", "volume:sync:Z",
                                    "volume:", "primary-mars", "volume:sync:"])
def test_unknown_target_is_a_one_line_usage_error_listing_the_forms(lab: Path, target: str) -> None:
    """A target naming no site, link or existing site volume exits 2 with one line listing the valid forms."""
    for command in ("fail", "heal"):
        r = vstore(command, lab, target, ok=False)
        assert r.exit_code == 2, r.output
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and "unknown target" in lines[0], r.stderr
        assert "volume:SITE:VOLUME" in lines[0] and "primary-sync" in lines[0] and "primary" in lines[0]
        assert "Traceback" not in r.output and r.stdout == ""
    assert faults_doc(lab) == {}


def test_fail_volume_with_its_site_records_exactly_that_volume(lab: Path) -> None:
    """`fail volume:sync:C` records sync:C, and only it, and says so."""
    r = vstore("fail", lab, "volume:sync:C")
    assert r.stdout.strip() == "volume sync:C failed"
    assert faults_doc(lab) == {"sites_down": [], "links_down": [], "volumes_failed": ["sync:C"]}


def test_failed_sync_volume_fails_the_sync_copy_and_heal_resyncs_it(lab: Path) -> None:
    """A failed volume sync:C suspends A->C at the next write (the fence refuses it); heal makes it Duplex."""
    vstore("fail", lab, "volume:sync:C")
    c_before = (lab / "sync" / "C.img").read_bytes()
    r = vstore("write", lab, "--lba", 3, stdin=block(1), ok=False)
    assert r.exit_code == 1 and "volume C at site sync has failed" in r.stderr
    state, reason = pair_states(lab)["A->C"]
    assert state == "Suspend" and "volume C at site sync has failed" in (reason or "")
    assert (lab / "sync" / "C.img").read_bytes() == c_before
    r = vstore("read", lab, "--site", "sync", "--volume", "C", "--lba", 0, ok=False)
    assert r.exit_code == 1 and "has failed" in r.stderr
    r = vstore("heal", lab, "volume:sync:C")
    assert r.stdout.splitlines()[0] == "volume sync:C healed"
    assert pair_states(lab)["A->C"][0] == "Duplex"
    vstore("write", lab, "--lba", 3, stdin=block(2))
    assert (lab / "sync" / "C.img").read_bytes() == (lab / "primary" / "A.img").read_bytes()


def test_failed_async_volume_fails_shipping_until_healed(mirror_lab: Path) -> None:
    """A failed volume async:D makes `ship` fail naming it and leaves D unchanged; after heal D equals B."""
    vstore("write", mirror_lab, "--lba", 1, stdin=block(3))
    d_before = (mirror_lab / "async" / "D.img").read_bytes()
    vstore("fail", mirror_lab, "volume:async:D")
    r = vstore("ship", mirror_lab, ok=False)
    assert r.exit_code == 1 and "volume D at site async has failed" in r.stderr
    assert (mirror_lab / "async" / "D.img").read_bytes() == d_before
    vstore("heal", mirror_lab, "volume:async:D")
    vstore("ship", mirror_lab)
    assert (mirror_lab / "async" / "D.img").read_bytes() == (mirror_lab / "primary" / "B.img").read_bytes()


def test_short_volume_form_means_the_one_site_holding_it(mirror_lab: Path) -> None:
    """`volume:C` fails sync:C (the only C) and `volume:B` primary:B, each message naming site:volume."""
    r = vstore("fail", mirror_lab, "volume:C")
    assert r.stdout.startswith("volume sync:C failed") and "volume:C is sync:C" in r.stdout
    r = vstore("fail", mirror_lab, "volume:B")
    assert r.stdout.startswith("volume primary:B failed")
    assert faults_doc(mirror_lab)["volumes_failed"] == ["primary:B", "sync:C"]
    r = vstore("heal", mirror_lab, "volume:C")
    assert r.stdout.startswith("volume sync:C healed")
    assert faults_doc(mirror_lab)["volumes_failed"] == ["primary:B"]


def test_ambiguous_short_volume_form_is_refused() -> None:
    """A short `volume:X` held by two sites is refused, telling to name the site."""
    with pytest.raises(UnknownFaultTarget, match="name the site, e.g. volume:primary:X"):
        resolve_target("volume:X", {"primary": ["X"], "sync": ["X"]})
    assert resolve_target("volume:sync:X", {"primary": ["X"], "sync": ["X"]}).name == "sync:X"


def test_volume_names_of_a_several_volume_lab_are_exact(tmp_path: Path) -> None:
    """In a lab with C0 and C1, `volume:sync:C` is unknown (naming C0, C1) and `volume:sync:C1` fails C1."""
    lab = tmp_path / "two"
    init_lab(lab, size=64 * BS, volumes=2)
    r = vstore("fail", lab, "volume:sync:C", ok=False)
    assert r.exit_code == 2 and "sync:C0" in r.stderr and "sync:C1" in r.stderr
    vstore("fail", lab, "volume:sync:C1")
    assert faults_doc(lab)["volumes_failed"] == ["sync:C1"]


@pytest.mark.parametrize("target", ["async", "primary-sync", "volume:sync:C", "volume:C"])
def test_heal_of_what_is_not_failed_says_nothing_to_heal(lab: Path, target: str) -> None:
    """Healing a healthy target exits 0, says it is not failed, never claims "healed", changes nothing."""
    vstore("fail", lab, "sync-async")
    before = faults_doc(lab)
    r = vstore("heal", lab, target)
    assert "is not failed; nothing to heal" in r.stdout and "healed" not in r.stdout
    assert faults_doc(lab) == before


def test_fail_of_what_is_already_failed_changes_nothing(lab: Path) -> None:
    """Failing an already failed link says so and leaves the fault set as it was."""
    vstore("fail", lab, "primary-async")
    before = faults_doc(lab)
    r = vstore("fail", lab, "primary-async")
    assert r.stdout.strip() == "link primary-async is already failed; nothing changed"
    assert faults_doc(lab) == before


def test_site_and_link_targets_fail_and_heal(lab: Path) -> None:
    """Sites and links are failed and healed by name, and the status shows a failed link down."""
    vstore("fail", lab, "primary-sync")
    vstore("fail", lab, "async")
    assert faults_doc(lab)["links_down"] == ["primary-sync"] and faults_doc(lab)["sites_down"] == ["async"]
    assert json.loads(vstore("status", lab, "--json").stdout)["links"]["primary-sync"] is False
    assert vstore("heal", lab, "async").stdout.startswith("site async healed")
    assert vstore("heal", lab, "primary-sync").stdout.startswith("link primary-sync healed")
    assert faults_doc(lab) == {"sites_down": [], "links_down": [], "volumes_failed": []}


def test_fail_and_heal_a_link_of_a_running_lab(tmp_path: Path) -> None:
    """On a lab whose daemons run, a cut sync link fences writes and `heal` resyncs A->C to Duplex."""
    lab = tmp_path / "up"
    init_lab(lab, size=64 * BS, base_port=free_base_port())
    try:
        vstore("lab", "up", lab)
        vstore("fail", lab, "primary-sync")
        r = vstore("write", lab, "--lba", 2, stdin=block(4), ok=False)
        assert r.exit_code == 1 and "primary-sync" in r.stderr
        assert pair_states(lab)["A->C"][0] == "Suspend"
        assert vstore("heal", lab, "primary-sync").stdout.startswith("link primary-sync healed")
        assert pair_states(lab)["A->C"][0] == "Duplex"
        assert vstore("heal", lab, "primary-sync").stdout.startswith("link primary-sync is not failed")
        vstore("write", lab, "--lba", 2, stdin=block(5))
        assert vstore("read", lab, "--site", "sync", "--volume", "C", "--lba", 2).stdout_bytes == block(5)
    finally:
        lab_down(lab)


def test_failed_volume_of_a_destroyed_site_can_still_be_healed(lab: Path) -> None:
    """A volume failed before its site directory was lost stays nameable, so its fault can be removed."""
    vstore("fail", lab, "volume:sync:C")
    shutil.rmtree(lab / "sync")
    r = vstore("fail", lab, "volume:async:C", ok=False)
    assert r.exit_code == 2
    vstore("heal", lab, "volume:sync:C", ok=False)  # the resync may refuse: the site is gone
    assert faults_doc(lab)["volumes_failed"] == []


def test_fail_volume_of_a_destroyed_site_is_refused(lab: Path) -> None:
    """Failing a volume of a site whose directory is gone is a usage error saying the site has no state."""
    shutil.rmtree(lab / "sync")
    r = vstore("fail", lab, "volume:sync:C", ok=False)
    assert r.exit_code == 2 and "site sync has no state" in r.stderr


def test_fail_outside_a_lab_is_one_sentence(tmp_path: Path) -> None:
    """`fail` on a directory that is not a lab is one sentence and exit 1, no traceback."""
    r = vstore("fail", tmp_path, "primary", ok=False)
    assert r.exit_code == 1 and "not a tricopy lab" in r.stderr and "Traceback" not in r.output


def test_faults_set_records_only_well_formed_names() -> None:
    """`Faults.set` refuses a volume without its site and unknown sites or links, and reports changes."""
    faults = Faults()
    for kind, name in (("volume", "C"), ("volume", "mars:C"), ("site", "mars"), ("link", "a-b"), ("disk", "x")):
        with pytest.raises(UnknownFaultTarget):
            faults.set(kind, name, True)
    assert faults.to_dict() == {"sites_down": [], "links_down": [], "volumes_failed": []}
    assert faults.set("volume", "sync:C", True) is True
    assert faults.set("volume", "sync:C", True) is False
    assert faults.broken("volume", "sync:C")
    assert faults.set("volume", "sync:C", False) is True and not faults.broken("volume", "sync:C")


def test_fail_and_heal_help_keep_an_example() -> None:
    """`--help` of fail and heal shows an example and the volume:SITE:VOLUME form."""
    for command in ("fail", "heal"):
        text = vstore(command, "--help").stdout
        assert "Example: vstore" in text and "volume:SITE:VOLUME" in text
