"""Crash states by the dm-log-writes/CrashMonkey method. Operations are written without a flush and
made durable by fsync, sync and unmount, so what a power cut leaves is the writes before the last
completed flush plus any subset of the ones after it. Every such state mounts, fscks clean and shows
the tree after a prefix of the operations that holds every operation before that flush; every
prefix of the block writes shows exactly the tree after its last commit."""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jfs import layout as L
from jfs.errors import JfsError
from jfs.fs import FileSystem, mkfs
from jfs.fsck import fsck
from jfs.fuse import JfsOperations
from tests.helpers import tree
from tools.crash.recording import RecordingDevice, Write
from vstore.blocks.device import MemoryDevice
from vstore.blocks.errors import FormatError

BS = 2048
NBLOCKS = 320

names = st.sampled_from(["/a", "/b", "/d/c", "/d"])
ops = st.one_of(
    st.tuples(st.just("write_file"), names, st.binary(max_size=5000)),
    st.tuples(st.just("write"), names, st.integers(0, 6000), st.binary(min_size=1, max_size=3000)),
    st.tuples(st.just("truncate"), names, st.integers(0, 7000)),
    st.tuples(st.just("unlink"), names),
    st.tuples(st.just("mkdir"), names),
    st.tuples(st.just("rmdir"), names),
    st.tuples(st.just("rename"), names, names),
    st.tuples(st.just("fsync")),
    st.tuples(st.just("sync")),
)


def fresh() -> tuple[RecordingDevice, FileSystem]:
    rec = RecordingDevice(MemoryDevice(NBLOCKS, BS))
    mkfs(rec, inodes=32, log_blocks=24)
    fs = FileSystem.mount(rec)
    rec.start()
    return rec, fs


def apply(fs: FileSystem, op: tuple[Any, ...]) -> None:
    try:
        getattr(fs, op[0])(*op[1:])
    except JfsError:
        pass


def is_commit(w: Write, geo: L.Geometry) -> bool:
    """A write of a commit block (the one structure in the ring that parses as a `Commit`)."""
    if not geo.log_start < w.lba < geo.log_start + geo.log_blocks:
        return False
    try:
        L.parse(L.Commit, w.data[:L.Commit.sizeof()], "commit")
    except FormatError:
        return False
    return True


def run(workload: list[tuple[Any, ...]]) -> tuple[RecordingDevice, L.Geometry, list[dict[str, Any]]]:
    """Run the workload; returns the recording and the tree after each commit (index 0: start)."""
    rec, fs = fresh()
    states = [tree(fs)]
    for op in workload:
        before = sum(is_commit(w, fs.geo) for w in rec.writes())
        apply(fs, op)
        after = sum(is_commit(w, fs.geo) for w in rec.writes())
        assert after - before in (0, 1)
        if after > before:
            states.append(tree(fs))
    return rec, fs.geo, states


def check_state(dev: MemoryDevice, allowed: list[dict[str, Any]]) -> None:
    result = fsck(dev, repair=False)
    assert result.exit_code == 0, result.problems
    fs = FileSystem.mount(dev)
    assert tree(fs) in allowed
    fs.unmount()
    assert fsck(dev).exit_code == 0


def check_power_cuts(rec: RecordingDevice, geo: L.Geometry, states: list[dict[str, Any]],
                     max_exhaustive: int = 10) -> int:
    """Every state `subset_states` gives: the tree after k commits, where k is at least the commits
    written before the epoch's opening flush and at most those written by its end."""
    epochs = rec.epochs()
    floor = [sum(is_commit(w, geo) for ep in epochs[:e] for w in ep) for e in range(len(epochs) + 1)]
    count = 0
    for e, _keep, dev in rec.subset_states(max_exhaustive=max_exhaustive):
        check_state(dev, states[floor[e]:floor[e + 1] + 1])
        count += 1
    return count


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(ops, min_size=1, max_size=5))
def test_every_prefix_is_the_last_committed_tree(workload: list[tuple[Any, ...]]) -> None:
    """Every prefix of the block writes mounts fsck-clean showing exactly the tree after its last commit."""
    rec, geo, states = run(workload)
    commits = 0
    for n, dev in rec.prefix_states():
        if n and is_commit(rec.writes()[n - 1], geo):
            commits += 1
        check_state(dev, [states[commits]])  # exactly: never a mix, nothing written before lost
    assert commits == len(states) - 1


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(ops, min_size=1, max_size=4))
def test_a_power_cut_leaves_a_prefix_holding_every_flushed_operation(workload: list[tuple[Any, ...]]) -> None:
    """Any subset of the writes after the last completed flush (the rest before it kept) shows the
    tree after a prefix of the commits, never a mix, and never fewer than were written before that
    flush."""
    rec, geo, states = run(workload)
    check_power_cuts(rec, geo, states, max_exhaustive=8)


def test_fixed_workload_every_power_cut() -> None:
    """For a fixed workload with fsync and sync between its operations, every state a power cut
    can leave (every subset of each epoch's writes, or the systematic and sampled ones of a long
    epoch) shows a prefix of the commits holding every commit before the last flush."""
    rec, geo, states = run([("mkdir", "/d"), ("write_file", "/d/c", b"x" * 3000), ("fsync",),
                            ("rename", "/d/c", "/a"), ("truncate", "/a", 10), ("sync",),
                            ("write_file", "/b", b"y" * 5000), ("unlink", "/a")])
    assert len(states) == 7
    count = check_power_cuts(rec, geo, states)
    assert count > len(rec.writes())


def _commits_of(rec: RecordingDevice, geo: L.Geometry, writes: list[Write]) -> list[int]:
    return [i for i, w in enumerate(writes) if is_commit(w, geo)]


def test_nothing_after_a_torn_transaction_is_replayed() -> None:
    """A power cut that kept the second transaction's commit but lost one of its images, and kept
    the third whole: replay stops at the torn one (state after the first), never applies the third
    after the gap, and a later mount that writes a new second transaction of the same size in its
    place never revives the stale third (it names the CRC of the transaction before it)."""
    rec, geo, states = run([("write_file", "/a", b"1" * 3000), ("write_file", "/b", b"2" * 3000),
                            ("write_file", "/c", b"3" * 3000)])
    writes = rec.writes()
    c1, c2, _c3 = _commits_of(rec, geo, writes)
    image = next(i for i in range(c1 + 1, c2) if geo.log_start < writes[i].lba < geo.log_start + geo.log_blocks
                 and writes[i].lba != writes[c2].lba and i > c1 + 1)
    dev = rec.materialise(w for i, w in enumerate(writes) if i != image)
    for _ in range(2):
        fs = FileSystem.mount(dev)
        assert tree(fs) == states[1]
        fs.unmount()
    assert fsck(dev).exit_code == 0
    fs = FileSystem.mount(dev)
    fs.write_file("/b", b"4" * 3000)  # the same shape as the torn one: the stale third follows it
    crashed = MemoryDevice(NBLOCKS, BS, data=bytes(dev.buf))  # written, never flushed
    fs = FileSystem.mount(crashed)
    assert "/c" not in tree(fs) and fs.read("/b") == b"4" * 3000
    fs.unmount()
    assert fsck(crashed).exit_code == 0


def test_a_transaction_whose_data_is_missing_is_not_committed() -> None:
    """The commit of a write reached the disk but one of the file data blocks it points at did
    not: the transaction is torn (its data CRC fails), so the mount shows the tree before it."""
    rec, geo, states = run([("write_file", "/a", b"1" * 3000), ("write_file", "/b", b"2" * 5000)])
    writes = rec.writes()
    c1, _c2 = _commits_of(rec, geo, writes)
    data = next(i for i in range(c1 + 1, len(writes)) if writes[i].lba >= geo.data_start)
    check_state(rec.materialise(w for i, w in enumerate(writes) if i != data), [states[1]])


def test_operations_flush_only_at_fsync_sync_and_unmount() -> None:
    """An operation asks the device for no flush; fsync for one (what was written is durable);
    sync for the flushes that make it checkpointed on disk (homes, then the header); unmount adds
    one for the superblock."""
    rec, fs = fresh()
    ops = [("mkdir", "/d"), ("write_file", "/d/c", b"x" * 5000), ("rename", "/d/c", "/a"), ("unlink", "/a")]
    for op in ops:
        before = rec.ops.count(None)
        apply(fs, op)
        assert rec.ops.count(None) - before == 0, op
    before = rec.ops.count(None)
    fs.fsync()
    assert rec.ops.count(None) - before == 1
    fs.fsync()  # nothing new written: nothing to make durable
    assert rec.ops.count(None) - before == 1
    fs.sync()  # the homes of those transactions, then the header that says they are checkpointed
    assert rec.ops.count(None) - before == 3
    fs.unmount()
    assert rec.ops.count(None) - before == 4


def durable_part(rec: RecordingDevice) -> MemoryDevice:
    """What a power cut that kept none of the writes after the last flush leaves."""
    last = max((i for i, op in enumerate(rec.ops) if op is None), default=0)
    return rec.materialise(op for op in rec.ops[:last] if op is not None)


def test_the_commit_interval_makes_the_mount_s_operations_durable() -> None:
    """In the FUSE operations, a created and written file is not durable when its requests return
    (a power cut keeping nothing unflushed loses it), and is once the commit interval has passed
    (`tick`): the same power cut then keeps it, fsck clean."""
    rec, fs = fresh()
    ops = JfsOperations(fs, commit_interval=0.0)
    fh = ops.create("/a", 0o100644)
    ops.write("/a", b"kept" * 500, 0, fh)
    ops.flush("/a", fh)
    ops.release("/a", fh)
    assert not FileSystem.mount(durable_part(rec)).exists("/a")
    ops.tick()
    dev = durable_part(rec)
    assert fsck(dev).exit_code == 0
    assert FileSystem.mount(dev).read("/a") == b"kept" * 500
