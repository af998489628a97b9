"""Embodiment 1 in one process: normal operation, the fence, Fig 9 undo, Fig 6, a full entry log,
coalescing."""

from __future__ import annotations

import pytest

from tests.helpers import BS, blocks, image, open_lab
from vstore.blocks.device import ImageDevice, create_image
from vstore.procedures.setup import resync_all
from vstore.replication.mirror import FailureState, SyncState
from vstore.replication.pairs import PairState
from vstore.replication.storage import Volume, WriteInhibited


def test_normal_operation_c_equals_a_after_every_write_and_d_equals_b_after_shipping(make_lab):
    """C equals A after every acknowledged write; D lags until shipping and then equals B."""
    lab = make_lab(mode="mirror")
    with open_lab(lab) as system:
        dev = system.device(0)
        for i in range(20):
            dev.write((i * 7) % 250, blocks(i, 1 + i % 4))
            assert image(lab, "primary", "A") == image(lab, "sync", "C")
        assert image(lab, "primary", "A") == image(lab, "primary", "B")
        assert image(lab, "primary", "B") != image(lab, "async", "D")
        report = system.shipper().ship()
        assert report.entries == 20 and report.error is None
        assert image(lab, "primary", "B") == image(lab, "async", "D")
        assert system.entry_log.stats().entries == 0
        system.save()


def cut(system, link):
    system.faults.set("link", link, True)


@pytest.mark.parametrize("unsafe_no_flush", [False, True])  # flushes durable (the default) or not
def test_fence_with_protection_rejects_and_changes_nothing(make_lab, unsafe_no_flush):
    """With protection, a write that cannot reach C is refused, changes no volume, and later writes are refused."""
    lab = make_lab(mode="mirror", protect=True, unsafe_no_flush=unsafe_no_flush)
    with open_lab(lab) as system:
        dev = system.device(0)
        dev.write(0, blocks(1))
        before = {v: image(lab, s, v) for s, v in [("primary", "A"), ("primary", "B"), ("sync", "C"), ("async", "D")]}
        cut(system, "primary-sync")
        with pytest.raises(WriteInhibited, match="fence"):
            dev.write(3, blocks(2))
        after = {v: image(lab, s, v) for s, v in [("primary", "A"), ("primary", "B"), ("sync", "C"), ("async", "D")]}
        assert before == after
        pair = system.registry.get("A->C")
        assert pair.state == PairState.SUSPEND and pair.failure
        assert "primary-sync" in pair.reason
        # every later write is refused up front (Fig 9 steps 906-910)
        with pytest.raises(WriteInhibited, match="write-inhibited"):
            dev.write(4, blocks(3))
        assert system.entry_log.stats().entries == 1  # only the first, acknowledged write
        system.save()


def test_protection_off_records_positions_and_duplex_pending_copies_exactly_them(make_lab):
    """Without protection, writes during a Suspend record their positions, and the resync copies exactly those."""
    lab = make_lab(mode="mirror", protect=False)
    with open_lab(lab) as system:
        dev = system.device(0)
        cut(system, "primary-sync")
        dev.write(10, blocks(1, 3))
        dev.write(50, blocks(2, 2))
        dev.write(11, blocks(3, 1))  # overlaps: 5 distinct blocks recorded
        pair = system.registry.get("A->C")
        assert pair.state == PairState.SUSPEND and pair.bitmap.count() == 5
        assert image(lab, "primary", "A") != image(lab, "sync", "C")
        system.faults.set("link", "primary-sync", False)
        copied = []
        steps = resync_all(system, lambda d, total: copied.append)
        assert sum(copied) == 5
        assert pair.state == PairState.DUPLEX
        assert any("Duplex-Pending" in s for s in steps.steps)
        assert image(lab, "primary", "A") == image(lab, "sync", "C")
        system.save()


@pytest.mark.parametrize("unsafe_no_flush", [False, True])
def test_mirror_without_protection_succeeds_on_b_alone(make_lab, unsafe_no_flush):
    """With the storage fencing A and no protection in the mirror program, a write succeeds on B alone ([0068])."""
    lab = make_lab(mode="mirror", protect=True, unsafe_no_flush=unsafe_no_flush)
    with open_lab(lab) as system:
        system.mirror.settings.protect = False
        dev = system.device(0)
        cut(system, "primary-sync")
        dev.write(7, blocks(9))
        a_member, b_member = system.mirror.settings.groups["A"]
        assert a_member.failure == FailureState.INHIBITED
        assert image(lab, "primary", "B")[7 * BS:8 * BS] == blocks(9)
        assert image(lab, "primary", "A")[7 * BS:8 * BS] == bytes(BS)


@pytest.mark.parametrize("unsafe_no_flush", [False, True])
def test_fig9_undo_restores_b_from_inhibited_a(make_lab, unsafe_no_flush):
    """A write refused after it reached B is undone: B is restored from the inhibited A (Fig 9)."""
    lab = make_lab(mode="mirror", protect=True, unsafe_no_flush=unsafe_no_flush)
    with open_lab(lab) as system:
        group = system.mirror.settings.groups["A"]
        group.reverse()  # write B first, then A: "any order" (Fig 4)
        dev = system.device(0)
        dev.write(5, blocks(1))
        cut(system, "primary-sync")
        with pytest.raises(WriteInhibited):
            dev.write(5, blocks(2))
        assert image(lab, "primary", "B")[5 * BS:6 * BS] == blocks(1)
        assert image(lab, "primary", "A") == image(lab, "primary", "B")


def test_fig6_new_member_is_never_read_before_synced(make_lab):
    """A member added to a mirror group is never read before its copy finishes; reads come from synced members."""
    lab = make_lab(mode="mirror")
    with open_lab(lab) as system:
        group = system.device(0)
        group.write(0, blocks(4, 8))
        storage = system.storage("primary")
        # make a spare volume at the primary to add as a third member
        create_image(lab / "primary" / "E.img", 256 * BS)
        storage.volumes["E"] = Volume("primary", "E", ImageDevice(lab / "primary" / "E.img"), "primary/port0/lun9")
        reads: list[str] = []
        real_read = storage.host_read

        def spy(volume, lba, count=1):
            reads.append(volume)
            return real_read(volume, lba, count)

        storage.host_read = spy
        seen_states = []

        def progress(n):
            member = group.members[-1]
            seen_states.append(member.sync)
            assert group.read(0, 8) == blocks(4, 8)  # reads during the copy come from synced members

        group.fig6_add_member("E", "primary/port0/lun9", progress=progress, chunk=64)
        assert SyncState.NOT_SYNCED in seen_states
        assert all(v in ("A", "B") for v in reads)  # E, not yet synced, was never read
        assert group.members[-1].sync == SyncState.SYNCED
        assert image(lab, "primary", "E") == image(lab, "primary", "A")


def test_full_entry_log_suspends_records_positions_and_resyncs(make_lab):
    """A full entry log suspends the async pair recording positions; shipping resyncs them, then entries flow."""
    lab = make_lab(mode="mirror", spool_capacity=16 * BS)
    with open_lab(lab) as system:
        dev = system.device(0)
        for i in range(40):  # far more than 16 blocks of entries
            dev.write(i * 3, blocks(100 + i))
        pair = system.registry.get("B->D")
        assert pair.state == PairState.SUSPEND and pair.failure and "entry log full" in pair.reason
        assert pair.bitmap.count() == 40  # every write not shipped is a recorded position
        report = system.shipper().ship()
        assert report.resynced_blocks == 40
        assert pair.state == PairState.DUPLEX
        assert image(lab, "primary", "B") == image(lab, "async", "D")
        dev.write(1, blocks(999))  # entries flow again
        assert system.entry_log.stats().entries == 1
        system.shipper().ship()
        assert image(lab, "primary", "B") == image(lab, "async", "D")
        system.save()


def test_coalescing_ships_fewer_blocks_and_keeps_prefix(make_lab):
    """Coalescing ships far fewer blocks than were written and still leaves D equal to B."""
    lab = make_lab(mode="mirror", coalesce=True)
    with open_lab(lab) as system:
        dev = system.device(0)
        for i in range(200):
            dev.write(i % 5, blocks(i))
        report = system.shipper().ship()
        assert report.blocks_written == 200
        assert report.blocks_sent < report.blocks_written / 4
        assert image(lab, "primary", "B") == image(lab, "async", "D")


def test_state_persists_across_commands(make_lab):
    """Pair states, recorded positions and waiting entries survive closing and reopening the lab."""
    lab = make_lab(mode="mirror", protect=False)
    with open_lab(lab) as system:
        cut(system, "primary-sync")
        system.faults.save(system.lab_dir)
        system.device(0).write(2, blocks(5))
        system.save()
    with open_lab(lab) as system:
        pair = system.registry.get("A->C")
        assert pair.state == PairState.SUSPEND and pair.bitmap.count() == 1
        assert system.entry_log.stats().entries == 1


def test_one_inhibited_a_fences_every_a_of_the_consistency_group(make_lab):
    """A failure Suspend of one pair (C0 failed) refuses writes to every A of the group, A1 too ([0127]-[0128])."""
    lab = make_lab(mode="mirror", volumes=2, protect=True)
    with open_lab(lab) as system:
        system.device(1).write(0, blocks(1))
        system.faults.set("volume", "sync:C0", True)
        with pytest.raises(WriteInhibited):
            system.device(0).write(0, blocks(2))
        assert system.registry.get("A0->C0").state == PairState.SUSPEND
        assert system.registry.get("A1->C1").state == PairState.DUPLEX
        before = image(lab, "primary", "A1"), image(lab, "primary", "B1"), image(lab, "sync", "C1")
        with pytest.raises(WriteInhibited):
            system.device(1).write(3, blocks(3))
        assert (image(lab, "primary", "A1"), image(lab, "primary", "B1"), image(lab, "sync", "C1")) == before
