"""Failover and failback: Figs 10-17 in both modes, precondition refusals, split brain,
and procedures interrupted after each step and run again."""

from __future__ import annotations

import hashlib
import random
import shutil
from pathlib import Path

import pytest

from tests.helpers import BS, image
from vstore.blocks.errors import TricopyError
from vstore.lab.system import System
from vstore.procedures import failback as fb
from vstore.procedures import failover as fo
from vstore.procedures.create import init_lab
from vstore.procedures.reactions import open_system
from vstore.procedures.steps import StepLog
from vstore.replication.pairs import PairState

NBLOCKS = 64
SIZE = NBLOCKS * BS


class Model:
    """The primary as the application sees it: every acknowledged write, and each prefix."""

    def __init__(self) -> None:
        self.image = bytearray(SIZE)
        self.prefixes = {hashlib.sha256(self.image).hexdigest()}

    def write(self, system: System, rng: random.Random, n: int) -> None:
        dev = system.device(0)
        for _ in range(n):
            lba, count = rng.randrange(NBLOCKS - 3), rng.randint(1, 3)
            data = rng.randbytes(count * BS)
            dev.write(lba, data)
            self.image[lba * BS:(lba + count) * BS] = data
            self.prefixes.add(hashlib.sha256(self.image).hexdigest())

    def is_prefix(self, data: bytes) -> bool:
        return hashlib.sha256(data).hexdigest() in self.prefixes


def new_lab(tmp_path: Path, mode: str, **kw) -> tuple[Path, Model, random.Random]:
    lab = tmp_path / "lab"
    init_lab(lab, mode=mode, size=SIZE, **kw)
    model, rng = Model(), random.Random(hash((mode, tmp_path.name)) & 0xFFFF)
    with System(lab) as system:
        model.write(system, rng, 20)
        system.shipper().ship(7)  # some entries shipped, some in flight
        model.write(system, rng, 5)
        system.save()
    return lab, model, rng


def run(lab: Path, procedure, *args, **kw):
    with System(lab) as system:
        steps = procedure(system, *args, **kw)
        system.save()
    return steps


def write_at_new_primary(lab: Path, model: Model, rng: random.Random) -> None:
    with System(lab) as system:
        model.write(system, rng, 10)
        system.shipper().ship()
        system.save()


def assert_original_layout(lab: Path, mode: str, model: Model) -> None:
    vols = [("primary", "A"), ("sync", "C"), ("async", "D")] + ([("primary", "B")] if mode == "mirror" else [])
    for site, vol in vols:
        assert image(lab, site, vol) == bytes(model.image), f"{site}:{vol} differs from the acknowledged writes"
    with System(lab) as system:
        states = {p.name: p.state for p in system.registry}
        assert system.active_site == "primary"
    expected = {"A->C", "B->D"} if mode == "mirror" else {"A->C", "A->D"}
    assert set(states) == expected and set(states.values()) == {PairState.DUPLEX}
    # and the restored layout replicates again
    with System(lab) as system:
        rng = random.Random(99)
        model.write(system, rng, 5)
        system.shipper().ship()
        system.save()
    assert image(lab, "primary", "A") == image(lab, "sync", "C") == image(lab, "async", "D") == bytes(model.image)


MODES = ["mirror", "provider"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("sync_first,old_images", [(True, False), (False, True)])
def test_fig10_then_fig11_or_fig12(tmp_path, mode, sync_first, old_images):
    """Failover to Sync loses no acknowledged write, and failback restores the original layout with every write."""
    lab, model, rng = new_lab(tmp_path, mode)
    if old_images:
        with System(lab) as system:
            system.faults.set("site", "primary", True)
            system.faults.save(system.lab_dir)
    else:
        shutil.rmtree(lab / "primary")
    steps = run(lab, fo.fig10_failover_to_sync)
    assert steps.steps and image(lab, "sync", "C") == bytes(model.image)  # nothing acknowledged lost at Sync
    assert image(lab, "async", "D") == image(lab, "sync", "C")  # resynced, C -> D Duplex
    write_at_new_primary(lab, model, rng)
    assert image(lab, "async", "D") == bytes(model.image)
    if old_images:
        r = pytest.raises(TricopyError, run, lab, fb.failback, sync_first=sync_first)
        assert "still down" in str(r.value)
        with System(lab) as system:
            system.faults.set("site", "primary", False)
            system.faults.save(system.lab_dir)
    run(lab, fb.failback, sync_first=sync_first)
    assert_original_layout(lab, mode, model)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("sync_first", [True, False])
def test_fig13_double_failure_then_fig15_or_fig16(tmp_path, mode, sync_first):
    """After a double failure D is a prefix of the acknowledged writes, and failback from Async restores the layout."""
    lab, model, rng = new_lab(tmp_path, mode)
    shutil.rmtree(lab / "primary")
    shutil.rmtree(lab / "sync")
    run(lab, fo.fig13_failover_to_async)
    assert model.is_prefix(image(lab, "async", "D")), "D is not a prefix of the acknowledged writes"
    d_now = image(lab, "async", "D")
    model.image[:] = d_now  # the application resumes from D's data
    with System(lab) as system:
        model.write(system, rng, 10)
        system.save()
    run(lab, fb.failback, sync_first=sync_first)
    assert_original_layout(lab, mode, model)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("sync_first", [True, False])
def test_fig14_catch_up_then_failback(tmp_path, mode, sync_first):
    """Failover to Async with catch-up from Sync loses no acknowledged write, and failback restores the layout."""
    lab, model, rng = new_lab(tmp_path, mode)
    shutil.rmtree(lab / "primary")
    run(lab, fo.fig14_failover_to_async_catch_up)
    assert image(lab, "async", "D") == image(lab, "sync", "C") == bytes(model.image)
    write_at_new_primary(lab, model, rng)  # D -> C async
    assert image(lab, "sync", "C") == bytes(model.image)
    run(lab, fb.failback, sync_first=sync_first)
    assert_original_layout(lab, mode, model)


def test_fig17_volume_a_failure_keeps_sync_lossless(tmp_path):
    """When volume A fails, B takes its place towards C with no acknowledged write lost, and D is kept aside."""
    lab, model, rng = new_lab(tmp_path, "mirror", protect=False)
    with open_system(lab) as system:
        system.faults.set("volume", "primary:A", True)
        system.faults.save(system.lab_dir)
        model.write(system, rng, 6)  # the first write meets the failed A
        names = {p.name: p.state for p in system.registry}
        system.save()
    assert names == {"B->C": PairState.DUPLEX}
    assert image(lab, "sync", "C") == image(lab, "primary", "B") == bytes(model.image)
    assert (lab / "async" / "D.backup-before-fig17.img").exists()  # [0126] safeguard


def test_preconditions_refuse_without_changing_state(tmp_path):
    """A procedure whose precondition does not hold is refused and changes no file of the lab."""
    lab, model, rng = new_lab(tmp_path, "mirror")
    snapshot = {p: p.read_bytes() for p in lab.rglob("*") if p.is_file() and p.name != ".lock"}
    with pytest.raises(TricopyError, match="primary site is up"):
        run(lab, fo.fig10_failover_to_sync)
    with pytest.raises(TricopyError, match="already runs the application at the primary|nothing to fail back"):
        run(lab, fb.failback)
    shutil.rmtree(lab / "primary")
    snapshot = {p: v for p, v in snapshot.items() if p.exists()}
    with System(lab) as system:
        system.faults.set("link", "sync-async", True)
        system.faults.save(system.lab_dir)
    snapshot[lab / "faults.json"] = (lab / "faults.json").read_bytes()
    with pytest.raises(TricopyError, match="sync-async"):
        run(lab, fo.fig14_failover_to_async_catch_up)
    after = {p: p.read_bytes() for p in lab.rglob("*") if p.is_file() and p.name != ".lock"}
    assert after == snapshot


@pytest.fixture
def split_brain(tmp_path: Path) -> tuple[Path, Model, Model]:
    """A mirror lab (no protection) in split brain: the sync link broke and the primary went on with 3 writes,
    then failed over to Sync, which took 10 writes; now the old primary and its link are back.
    (the lab, the model of what Sync holds, the model of what the old primary holds)."""
    lab, model, rng = new_lab(tmp_path, "mirror", protect=False)
    with System(lab) as system:  # the sync link breaks; the primary goes on writing (no protection)
        system.faults.set("link", "primary-sync", True)
        system.faults.save(system.lab_dir)
        old_primary = Model()
        old_primary.image[:] = model.image
        old_primary.write(system, random.Random(1), 3)
        system.save()
        system.faults.set("site", "primary", True)  # then the operator believes it dead
        system.faults.save(system.lab_dir)
    run(lab, fo.fig10_failover_to_sync)
    write_at_new_primary(lab, model, rng)
    with System(lab) as system:  # the old primary comes back with its own writes
        system.faults.set("site", "primary", False)
        system.faults.set("link", "primary-sync", False)
        system.faults.save(system.lab_dir)
    return lab, model, old_primary


def test_split_brain_is_detected_and_changes_nothing(split_brain):
    """Failback after a split brain is refused, naming the writes each side took, and changes nothing."""
    lab, _, old_primary = split_brain
    with pytest.raises(fb.SplitBrain) as err:
        run(lab, fb.failback)
    msg = str(err.value)
    assert "primary holds 6 volume write(s)" in msg  # 3 writes, each to A and B
    assert "sync took 10 volume write(s)" in msg and "(blocks A " in msg
    assert image(lab, "primary", "A") == bytes(old_primary.image)  # nothing changed


def test_split_brain_failback_discarding_the_primary_keeps_what_sync_took(split_brain):
    """Failback with discard_site="primary" restores the original layout holding Sync's writes."""
    lab, model, _ = split_brain
    run(lab, fb.failback, discard_site="primary")
    assert_original_layout(lab, "mirror", model)


def test_split_brain_failback_discarding_sync_keeps_what_the_old_primary_wrote(split_brain):
    """Failback with discard_site="sync" restores the original layout holding the old primary's writes."""
    lab, _, old_primary = split_brain
    run(lab, fb.failback, discard_site="sync")
    assert_original_layout(lab, "mirror", old_primary)


class InjectedCrash(Exception):
    pass


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("scenario", ["fig10+fig11", "fig13+fig15", "fig14+fig16", "fig10+fig12"])
def test_interrupted_procedures_can_be_rerun(tmp_path, monkeypatch, scenario, mode):
    """A failover or failback interrupted after any step completes when run again, with the same result."""
    lab0, model, rng = new_lab(tmp_path, mode)
    shutil.rmtree(lab0 / "primary")
    first, second = scenario.split("+")
    if first == "fig13":
        shutil.rmtree(lab0 / "sync")
    over = {"fig10": fo.fig10_failover_to_sync, "fig13": fo.fig13_failover_to_async,
            "fig14": fo.fig14_failover_to_async_catch_up}[first]
    back = {"fig11": dict(sync_first=True), "fig12": dict(sync_first=False), "fig15": dict(sync_first=False),
            "fig16": dict(sync_first=True)}[second]
    real_step = StepLog.step
    for phase in ("over", "back"):
        k = 0
        while True:
            lab = tmp_path / f"{phase}-{k}"
            shutil.copytree(lab0, lab)
            calls = {"n": 0}

            def crashing(self, text, k=k, calls=calls):
                real_step(self, text)
                calls["n"] += 1
                if calls["n"] > k:
                    raise InjectedCrash(f"after step {k}")

            monkeypatch.setattr(StepLog, "step", crashing)
            try:
                run(lab, over) if phase == "over" else run(lab, fb.failback, **back)
                crashed = False
            except InjectedCrash:
                crashed = True
            monkeypatch.setattr(StepLog, "step", real_step)
            if crashed:  # run it again, uninterrupted: it completes
                run(lab, over) if phase == "over" else run(lab, fb.failback, **back)
            if phase == "over":
                if first != "fig13":
                    assert image(lab, "sync", "C") == bytes(model.image)
            else:
                expected = Model()
                expected.image[:] = image(lab0, "async" if first != "fig10" else "sync",
                                        "D" if first != "fig10" else "C")
                assert_original_layout(lab, mode, expected)
            shutil.rmtree(lab)
            if not crashed:
                break
            k += 1
        if phase == "over":
            run(lab0, over)
