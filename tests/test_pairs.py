"""Pair state machine, written-positions bitmap and pair persistence (SPEC §3 [0034]-[0047])."""

from __future__ import annotations

import base64
import json
import logging

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vstore.blocks.errors import FormatError
from vstore.replication.pairs import (
    HISTORY_LIMIT,
    TRANSITIONS,
    IllegalTransition,
    Pair,
    PairKind,
    PairState,
    PositionBitmap,
)

S = PairState

# The legal moves as the SPEC states them, written out independently of the module's table.
EXPECTED = {
    "sync": {("Simplex", "Initial-Copying"), ("Simplex", "Duplex"), ("Initial-Copying", "Duplex"),
             ("Initial-Copying", "Suspend"), ("Initial-Copying", "Simplex"), ("Duplex", "Suspend"),
             ("Duplex", "Simplex"), ("Suspend", "Duplex-Pending"), ("Suspend", "Simplex"),
             ("Duplex-Pending", "Duplex"), ("Duplex-Pending", "Suspend"), ("Duplex-Pending", "Simplex")},
}
EXPECTED["async"] = (EXPECTED["sync"] - {("Duplex", "Suspend")}) | {
    ("Duplex", "Suspending"), ("Suspending", "Suspend"), ("Suspending", "Simplex")}

# Shortest path from Simplex to every state, per kind.
PATH_TO = {
    S.SIMPLEX: [], S.INITIAL_COPYING: [S.INITIAL_COPYING], S.DUPLEX: [S.DUPLEX],
    S.SUSPEND: [S.INITIAL_COPYING, S.SUSPEND], S.DUPLEX_PENDING: [S.INITIAL_COPYING, S.SUSPEND, S.DUPLEX_PENDING],
    S.SUSPENDING: [S.DUPLEX, S.SUSPENDING],
}


def pair_in(kind: PairKind, state: PairState, num_blocks: int = 64) -> Pair:
    p = Pair("A->C", kind, "primary:A", "sync:C", num_blocks)
    for step in PATH_TO[state]:
        p.transition(step)
    assert p.state is state
    return p


def reachable(kind: PairKind) -> list[PairState]:
    return [s for s in PairState if kind is PairKind.ASYNC or s is not S.SUSPENDING]


def test_table_matches_the_spec() -> None:
    """The transition table holds exactly the moves the SPEC allows for each pair kind."""
    for kind in PairKind:
        table = {(frm.value, to.value) for (k, frm), tos in TRANSITIONS.items() if k is kind for to in tos}
        assert table == EXPECTED[kind.value]
    assert (PairKind.SYNC, S.SUSPENDING) not in TRANSITIONS


@pytest.mark.parametrize("kind", list(PairKind))
def test_every_legal_transition_works(kind: PairKind) -> None:
    """Every legal transition moves the pair and is recorded in its history."""
    for frm, to in sorted(EXPECTED[kind.value]):
        p = pair_in(kind, S(frm))
        p.transition(S(to), "test")
        assert p.state is S(to)
        assert p.history[-1]["from"] == frm and p.history[-1]["to"] == to


@pytest.mark.parametrize("kind", list(PairKind))
def test_every_illegal_transition_raises_and_changes_nothing(kind: PairKind) -> None:
    """Every illegal transition raises, naming the pair and both states, and changes nothing."""
    for frm in reachable(kind):
        for to in PairState:
            if (frm.value, to.value) in EXPECTED[kind.value]:
                continue
            p = pair_in(kind, frm)
            before = p.to_dict()
            with pytest.raises(IllegalTransition) as err:
                p.transition(to, "nope")
            assert "A->C" in str(err.value) and frm.value in str(err.value) and to.value in str(err.value)
            assert p.to_dict() == before


def test_suspending_only_for_async() -> None:
    """Only an async pair passes through Suspending, and its suspension keeps the failure and reason."""
    sync = pair_in(PairKind.SYNC, S.DUPLEX)
    with pytest.raises(IllegalTransition):
        sync.transition(S.SUSPENDING)
    a = pair_in(PairKind.ASYNC, S.DUPLEX)
    with pytest.raises(IllegalTransition):
        a.transition(S.SUSPEND)
    a.transition(S.SUSPENDING, "entry log full", failure=True)
    a.transition(S.SUSPEND)
    assert a.failure and a.reason == "entry log full"  # the suspension carries on


def test_failure_flag_reason_and_log(caplog: pytest.LogCaptureFixture) -> None:
    """A transition sets the failure flag and reason and is logged; a later transition replaces them."""
    p = pair_in(PairKind.SYNC, S.DUPLEX)
    with caplog.at_level(logging.INFO, logger="vstore.pairs"):
        p.transition(S.SUSPEND, "link primary-sync down", failure=True)
    assert "pair A->C: Duplex -> Suspend (link primary-sync down)" in caplog.text
    assert p.failure and p.reason == "link primary-sync down"
    p.transition(S.DUPLEX_PENDING, "resync")
    assert not p.failure and p.reason == "resync"


def test_record_write_only_while_suspended() -> None:
    """Written positions are recorded only in Suspending and Suspend, and kept when leaving Suspend."""
    p = pair_in(PairKind.ASYNC, S.DUPLEX)
    p.record_write(1, 2)
    assert p.bitmap.count() == 0
    p.transition(S.SUSPENDING)
    p.record_write(1, 2)
    p.transition(S.SUSPEND)
    p.record_write(10, 1)
    p.transition(S.DUPLEX_PENDING)
    p.record_write(20, 1)  # Duplex-Pending: the caller copies, positions are not recorded
    assert p.bitmap.ranges() == [(1, 2), (10, 1)]  # leaving Suspend keeps the bitmap
    assert p.bitmap.take() == [(1, 2), (10, 1)] and p.bitmap.count() == 0


def test_initial_copy_clears_the_bitmap() -> None:
    """Starting an initial copy clears the recorded positions."""
    p = pair_in(PairKind.SYNC, S.SUSPEND)
    p.record_write(3, 3)
    p.transition(S.SIMPLEX)
    assert p.bitmap.count() == 3
    p.transition(S.INITIAL_COPYING)
    assert p.bitmap.count() == 0


def test_history_is_bounded() -> None:
    """A pair's history keeps only the newest HISTORY_LIMIT transitions."""
    p = pair_in(PairKind.SYNC, S.DUPLEX)
    for _ in range(40):
        p.transition(S.SUSPEND)
        p.transition(S.DUPLEX_PENDING)
        p.transition(S.DUPLEX)
    assert len(p.history) == HISTORY_LIMIT
    assert p.history[-1]["to"] == "Duplex"


# -- bitmap ------------------------------------------------------------------------------------
marks = st.lists(st.tuples(st.integers(0, 199), st.integers(1, 40)), max_size=20)


def model_ranges(blocks: set[int]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for b in sorted(blocks):
        if out and out[-1][0] + out[-1][1] == b:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((b, 1))
    return out


@given(num_blocks=st.integers(1, 240), marks=marks, other=marks)
@settings(max_examples=150)
def test_bitmap_against_a_set_model(num_blocks: int, marks: list, other: list) -> None:
    """The position bitmap agrees with a set model: marks, ranges, merge, take and a bytes round trip."""
    bm, bm2 = PositionBitmap(num_blocks), PositionBitmap(num_blocks)
    model: set[int] = set()
    model2: set[int] = set()
    for target, todo, ms in ((bm, marks, model), (bm2, other, model2)):
        for lba, count in todo:
            if lba >= num_blocks:
                continue
            count = min(count, num_blocks - lba)
            target.mark(lba, count)
            ms.update(range(lba, lba + count))
    assert bm.ranges() == model_ranges(model) and bm.count() == len(model)
    back = PositionBitmap.from_bytes(bm.to_bytes())
    assert back == bm and back.ranges() == bm.ranges()
    for lba, count in bm2.ranges():
        bm.mark(lba, count)
    assert bm.ranges() == model_ranges(model | model2)
    assert bm.take() == model_ranges(model | model2)
    assert bm.count() == 0 and bm.ranges() == []


def test_bitmap_edges() -> None:
    """The bitmap covers its whole range and refuses marks outside it or of no blocks."""
    bm = PositionBitmap(1000)
    bm.mark(0, 1000)
    assert bm.ranges() == [(0, 1000)] and bm.count() == 1000
    for lba, count in ((999, 2), (-1, 1), (5, 0), (1000, 1)):
        with pytest.raises(ValueError):
            bm.mark(lba, count)
    empty = PositionBitmap(0)
    assert PositionBitmap.from_bytes(empty.to_bytes()) == empty


def test_damaged_bitmap_bytes_are_refused() -> None:
    """Any flipped bit, truncation or extra byte in a saved bitmap is refused."""
    bm = PositionBitmap(300)
    bm.mark(7, 50)
    data = bm.to_bytes()
    for pos in range(len(data)):
        bad = bytearray(data)
        bad[pos] ^= 0x10
        with pytest.raises(FormatError, match="position bitmap"):
            PositionBitmap.from_bytes(bytes(bad))
    for bad in (data[:-1], data + b"\0", b"", b"TCBM"):
        with pytest.raises(FormatError):
            PositionBitmap.from_bytes(bad)


# -- persistence -------------------------------------------------------------------------------
def test_pair_round_trip_through_json() -> None:
    """A pair saved as JSON loads back equal, with its state, kind and positions, and still works."""
    p = pair_in(PairKind.ASYNC, S.DUPLEX, num_blocks=1 << 14)
    p.transition(S.SUSPENDING, "link down", failure=True)
    p.record_write(100, 300)
    p.transition(S.SUSPEND)
    q = Pair.from_dict(json.loads(json.dumps(p.to_dict())))
    assert q == p and q.to_dict() == p.to_dict()
    assert isinstance(q.state, PairState) and isinstance(q.kind, PairKind)
    q.transition(S.DUPLEX_PENDING)  # still a working pair
    assert q.bitmap.take() == [(100, 300)]


def test_damaged_pair_dict_is_refused() -> None:
    """A saved pair with a missing key, an unknown state or a damaged or mismatched bitmap is refused."""
    d = pair_in(PairKind.SYNC, S.DUPLEX).to_dict()
    for key in ("name", "kind", "bitmap", "state"):
        broken = dict(d)
        del broken[key]
        with pytest.raises(FormatError, match=key):
            Pair.from_dict(broken)
    with pytest.raises(FormatError, match="invalid"):
        Pair.from_dict({**d, "state": "Mirrored"})
    with pytest.raises(FormatError):
        Pair.from_dict({**d, "bitmap": "!!!"})
    raw = bytearray(base64.b64decode(d["bitmap"]))
    raw[-1] ^= 1
    with pytest.raises(FormatError, match="position bitmap"):
        Pair.from_dict({**d, "bitmap": base64.b64encode(bytes(raw)).decode()})
    with pytest.raises(FormatError):
        Pair.from_dict({**d, "num_blocks": 65})  # bitmap no longer matches the volumes
