"""Crash states by the dm-log-writes/CrashMonkey method: every prefix of the recorded block-write
log (and every reordering inside one flush epoch for short workloads) mounts, fscks clean, and
shows exactly the tree after the last committed transaction it contains."""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jfs import layout as L
from jfs.errors import JfsError
from jfs.fs import FileSystem, mkfs
from jfs.fsck import fsck
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


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(ops, min_size=1, max_size=5))
def test_every_prefix_is_the_last_committed_tree(workload: list[tuple[Any, ...]]) -> None:
    """Every prefix of the block writes mounts fsck-clean showing exactly the tree after its last commit."""
    rec, geo, states = run(workload)
    commits = 0
    for n, dev in rec.prefix_states():
        if n and is_commit(rec.writes()[n - 1], geo):
            commits += 1
        check_state(dev, [states[commits]])  # exactly: never a mix, nothing synced lost
    assert commits == len(states) - 1


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(ops, min_size=1, max_size=2))
def test_reordering_inside_a_flush_epoch(workload: list[tuple[Any, ...]]) -> None:
    """Any reordering of the writes inside one flush epoch shows the tree before or after that epoch's commit."""
    rec, geo, states = run(workload)
    epochs = rec.epochs()
    before = [sum(is_commit(w, geo) for ep in epochs[:e] for w in ep) for e in range(len(epochs))]
    for e, _k, dev in rec.epoch_states(max_epoch=5):
        has_commit = any(is_commit(w, geo) for w in epochs[e])
        allowed = [states[before[e]]] + ([states[before[e] + 1]] if has_commit else [])
        check_state(dev, allowed)


def test_fixed_workload_all_epoch_reorderings() -> None:
    """For a fixed workload, every reordering of every flush epoch shows a committed tree, never a mix."""
    rec, geo, states = run([("mkdir", "/d"), ("write_file", "/d/c", b"x" * 3000),
                            ("rename", "/d/c", "/a"), ("truncate", "/a", 10)])
    assert len(states) == 5
    epochs = rec.epochs()
    before = [sum(is_commit(w, geo) for ep in epochs[:e] for w in ep) for e in range(len(epochs))]
    count = 0
    for e, _k, dev in rec.epoch_states(max_epoch=6):
        has_commit = any(is_commit(w, geo) for w in epochs[e])
        check_state(dev, [states[before[e]]] + ([states[before[e] + 1]] if has_commit else []))
        count += 1
    assert count > len(rec.writes())


def test_a_commit_whose_header_never_landed_stays_uncommitted() -> None:
    """A commit block that reached the disk while the log header written in the same flush epoch
    did not (that flush never returned) is no commit: the mount shows the tree before it, and so
    do later mounts, fsck and the mount after it, although the transaction sits at the new head."""
    rec, geo, states = run([("write_file", "/a", b"1" * 3000), ("write_file", "/b", b"2" * 3000)])
    epochs = rec.epochs()
    e = max(i for i, ep in enumerate(epochs) if any(is_commit(w, geo) for w in ep))
    commit = next(w for w in epochs[e] if is_commit(w, geo))
    dev = rec.materialise([w for ep in epochs[:e] for w in ep] + [commit])
    for _ in range(2):
        fs = FileSystem.mount(dev)
        assert tree(fs) == states[-2]
        fs.unmount()
    assert fsck(dev).exit_code == 0
    fs = FileSystem.mount(dev)
    assert tree(fs) == states[-2]


def test_a_transaction_costs_two_flushes() -> None:
    """Each committed operation asks the device for exactly two flushes (ordering point, commit
    point); unmount adds two (the last homes, then the header) and one for the superblock."""
    rec, fs = fresh()
    ops = [("mkdir", "/d"), ("write_file", "/d/c", b"x" * 5000), ("rename", "/d/c", "/a"), ("unlink", "/a")]
    for op in ops:
        before = rec.ops.count(None)
        apply(fs, op)
        assert rec.ops.count(None) - before == 2, op
    before = rec.ops.count(None)
    fs.unmount()
    assert rec.ops.count(None) - before == 3
