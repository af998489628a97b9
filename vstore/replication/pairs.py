"""Remote-copy pairs: the state machine of SPEC §3 [0034]-[0047] and the written-positions bitmap.

Keeps true:
- A pair only moves along the explicit `TRANSITIONS` table, keyed by (kind, from-state); any other
  move raises `IllegalTransition` naming the pair and both states, and changes nothing.
  Suspending exists only for async pairs [0047]: an async pair leaves Duplex through Suspending
  (draining or recording the entries still held), a sync pair goes straight to Suspend.
- Every transition is logged and kept in the pair's history (last 50), with its reason, so a
  failure is never silent (DESIGN invariant 5). `failure` tells a failure Suspend [0038]-[0039]
  from a commanded one.
- While Suspend or Suspending, every write's position is recorded in a `PositionBitmap` [0039];
  Duplex-Pending copies only those positions [0041]. Leaving Suspend does not clear the bitmap:
  the caller `take()`s it when it starts the differential copy. Entering Initial-Copying clears it
  (a full copy supersedes any difference information). `verify_first` says the bitmap
  over-approximates (positions lost with damaged spool entries, so every block was recorded): the
  resync then compares digests and copies only the recorded blocks that differ.
- A pair holds no split-brain marker: split brain (both sides written after a failover) is
  detected by write counts, each site's host writes against the writes its pair targets have
  seen (`System` counts them, failback compares them), and is never merged silently.
- `PairRegistry` holds the pairs of one deployment: at most one pair has a given name; a volume is
  the source of at most one sync and one async pair and the target of at most one pair (so "where
  does a write to primary:A go?" has one answer). Pairs are addressed as "site:volume". Both sites
  of a pair persist it in their own state.json (SPEC §3: both storage systems keep the state);
  `merge_copies` picks the newer copy when both survive and the surviving one when a site's
  directory is gone.
- `to_dict`/`from_dict` round-trip exactly (the pair lives in each site's `state.json`); a saved
  pair with a missing field or a field of another type is refused with `FormatError`, and so is
  any damage to the bitmap's bytes (construct: magic, version, block count, zlib-compressed bits,
  CRC32), whose memory is sized by the bits it holds, never by the block count it states.

Choice where the patent allows one [0042]: Initial-Copying and Duplex-Pending stay two states.
"""

from __future__ import annotations

import base64
import binascii
import logging
import re
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from construct import (
    Checksum,
    Const,
    GreedyBytes,
    Int16ub,
    Int32ub,
    Int64ub,
    Prefixed,
    RawCopy,
    Struct,
    Terminated,
    this,
)

from vstore.blocks.codec import check_version, crc32, parse_checked
from vstore.blocks.errors import FormatError, TricopyError, brief

log = logging.getLogger(__name__)

HISTORY_LIMIT = 50


class PairState(StrEnum):
    SIMPLEX = "Simplex"
    INITIAL_COPYING = "Initial-Copying"
    DUPLEX = "Duplex"
    SUSPEND = "Suspend"
    DUPLEX_PENDING = "Duplex-Pending"
    SUSPENDING = "Suspending"


class PairKind(StrEnum):
    SYNC = "sync"
    ASYNC = "async"


S = PairState
_COMMON: dict[PairState, frozenset[PairState]] = {
    S.SIMPLEX: frozenset({S.INITIAL_COPYING, S.DUPLEX}),  # Duplex directly = start without initial copy
    S.INITIAL_COPYING: frozenset({S.DUPLEX, S.SUSPEND, S.SIMPLEX}),
    S.SUSPEND: frozenset({S.DUPLEX_PENDING, S.SIMPLEX}),
    S.DUPLEX_PENDING: frozenset({S.DUPLEX, S.SUSPEND, S.SIMPLEX}),
}
TRANSITIONS: dict[tuple[PairKind, PairState], frozenset[PairState]] = {
    **{(PairKind.SYNC, s): targets for s, targets in _COMMON.items()},
    **{(PairKind.ASYNC, s): targets for s, targets in _COMMON.items()},
    (PairKind.SYNC, S.DUPLEX): frozenset({S.SUSPEND, S.SIMPLEX}),
    (PairKind.ASYNC, S.DUPLEX): frozenset({S.SUSPENDING, S.SIMPLEX}),
    (PairKind.ASYNC, S.SUSPENDING): frozenset({S.SUSPEND, S.SIMPLEX}),
}
"""(kind, from) -> allowed targets. A sync pair is never Suspending."""
del S


class IllegalTransition(TricopyError):
    """A pair state change that the state machine does not allow."""


def allowed_targets(kind: PairKind, state: PairState) -> frozenset[PairState]:
    return TRANSITIONS.get((kind, state), frozenset())


# --------------------------------------------------------------------------------------------
# Written-positions bitmap
# --------------------------------------------------------------------------------------------
BITMAP_MAGIC = b"TCBM"
BITMAP_VERSION = 1

_BITMAP = Struct(
    "body" / RawCopy(Struct(
        "magic" / Const(BITMAP_MAGIC),
        "version" / Int16ub,
        "num_blocks" / Int64ub,
        "zbits" / Prefixed(Int32ub, GreedyBytes),  # zlib-compressed bits, LSB first; inflated after the CRC check
    )),
    "crc" / Checksum(Int32ub, crc32, this.body.data),
    Terminated,
)
_NONZERO_RUN = re.compile(rb"[^\x00]+")


class PositionBitmap:
    """One bit per block: written while the pair was Suspend or Suspending [0039]."""

    def __init__(self, num_blocks: int, bits: bytes | None = None) -> None:
        """A clear bitmap, or one holding `bits` (exactly one bit per block, rounded up to bytes)."""
        if num_blocks < 0:
            raise ValueError(f"a bitmap needs a non-negative block count, got {num_blocks}")
        size = (num_blocks + 7) // 8
        if bits is not None and len(bits) != size:
            raise ValueError(f"{len(bits)} bytes of bits do not fit a {num_blocks}-block bitmap")
        self.num_blocks = num_blocks
        self._bits = bytearray(size) if bits is None else bytearray(bits)
        self._encoded: tuple[bytes, bytes] | None = None  # (bits, their encoding): saved on every write
        self.changes = 0  # bumped by every mark and clear: a pair's `revision` includes it

    def mark(self, lba: int, count: int = 1) -> None:
        if count <= 0 or lba < 0 or lba + count > self.num_blocks:
            raise ValueError(f"blocks {lba}..{lba + count - 1} are outside a {self.num_blocks}-block bitmap")
        self.changes += 1
        end = lba + count
        while lba < end and lba % 8:
            self._set(lba)
            lba += 1
        full_end = end - end % 8
        if lba < full_end:
            self._bits[lba // 8:full_end // 8] = b"\xff" * ((full_end - lba) // 8)
            lba = full_end
        while lba < end:
            self._set(lba)
            lba += 1

    def _set(self, lba: int) -> None:
        self._bits[lba >> 3] |= 1 << (lba & 7)

    def ranges(self) -> list[tuple[int, int]]:
        """The marked blocks as merged (first, count) ranges, in order."""
        out: list[tuple[int, int]] = []
        for run in _NONZERO_RUN.finditer(self._bits):
            for byte_index in range(run.start(), run.end()):
                self._add_byte(out, byte_index, self._bits[byte_index])
        return out

    @staticmethod
    def _add_byte(out: list[tuple[int, int]], byte_index: int, byte: int) -> None:
        base = byte_index * 8
        for bit in range(8):
            if byte >> bit & 1:
                lba = base + bit
                if out and out[-1][0] + out[-1][1] == lba:
                    out[-1] = (out[-1][0], out[-1][1] + 1)
                else:
                    out.append((lba, 1))

    def count(self) -> int:
        return int.from_bytes(self._bits, "little").bit_count()

    def take(self) -> list[tuple[int, int]]:
        """The ranges, then clear them (Duplex-Pending consumes them)."""
        ranges = self.ranges()
        self.clear()
        return ranges

    def clear(self) -> None:
        self._bits = bytearray(len(self._bits))
        self.changes += 1

    def to_bytes(self) -> bytes:
        bits = bytes(self._bits)
        if self._encoded is not None and self._encoded[0] == bits:  # encode only what changed
            return self._encoded[1]
        body = dict(magic=BITMAP_MAGIC, version=BITMAP_VERSION, num_blocks=self.num_blocks, zbits=zlib.compress(bits))
        encoded = _BITMAP.build(dict(body=dict(value=body)))
        self._encoded = (bits, encoded)
        return encoded

    @classmethod
    def from_bytes(cls, data: bytes) -> PositionBitmap:
        body = parse_checked(_BITMAP, data, "position bitmap").body.value
        check_version(body.version, BITMAP_VERSION, "position bitmap")
        # inflated before anything is allocated: the stated block count alone never sizes memory
        bitmap = cls(body.num_blocks, _inflate(body.zbits, (body.num_blocks + 7) // 8))
        if body.num_blocks % 8 and bitmap._bits[-1] >> (body.num_blocks % 8):
            raise FormatError("position bitmap: bits are set beyond its last block")
        return bitmap

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PositionBitmap):
            return NotImplemented
        return self.num_blocks == other.num_blocks and self._bits == other._bits

    def __repr__(self) -> str:
        return f"PositionBitmap(num_blocks={self.num_blocks}, marked={self.count()})"


def _inflate(zbits: bytes, expected: int) -> bytes:
    """Decompress at most `expected` bytes; anything else is damage (or a zip bomb)."""
    try:
        d = zlib.decompressobj()
        bits = d.decompress(zbits, expected + 1)
        complete = d.eof and not d.unconsumed_tail
    except zlib.error as err:
        raise FormatError(f"position bitmap: compressed bits are damaged ({err})") from None
    if len(bits) != expected or not complete:
        raise FormatError(f"position bitmap: holds {len(bits)} bytes of bits, expected {expected}")
    return bits


# --------------------------------------------------------------------------------------------
# The pair
# --------------------------------------------------------------------------------------------
@dataclass
class Pair:
    """A source volume and a secondary volume linked by sync or async copy."""

    name: str
    kind: PairKind
    source: str  # "site:volume"
    target: str
    num_blocks: int
    state: PairState = PairState.SIMPLEX
    reason: str | None = None
    failure: bool = False  # Suspend/Suspending entered by a failure (volume, storage, link)
    bitmap: PositionBitmap = field(default=None)  # type: ignore[assignment]  # set in __post_init__
    history: list[dict] = field(default_factory=list)
    verify_first: bool = False  # the bitmap over-approximates: a resync compares digests before copying

    def __post_init__(self) -> None:
        self.kind = PairKind(self.kind)
        self.state = PairState(self.state)
        if self.bitmap is None:
            self.bitmap = PositionBitmap(self.num_blocks)
        elif self.bitmap.num_blocks != self.num_blocks:
            raise ValueError(f"pair {self.name}: bitmap has {self.bitmap.num_blocks} blocks, "
                             f"the volumes {self.num_blocks}")

    def can_transition(self, to: PairState) -> bool:
        return PairState(to) in allowed_targets(self.kind, self.state)

    def transition(self, to: PairState, reason: str | None = None, *, failure: bool = False) -> None:
        """Move to `to` if the table allows it (else IllegalTransition); log and record it."""
        to = PairState(to)
        old = self.state
        if not self.can_transition(to):
            allowed = ", ".join(sorted(s.value for s in allowed_targets(self.kind, old))) or "nothing"
            raise IllegalTransition(
                f"pair {self.name} ({self.kind.value}): cannot go from {old.value} to {to.value} "
                f"(allowed from {old.value}: {allowed})"
            )
        if to in (PairState.SUSPEND, PairState.SUSPENDING):
            # Suspending -> Suspend completes the same suspension: keep its failure flag and reason
            carried = old is PairState.SUSPENDING
            self.failure = failure or (carried and self.failure)
            self.reason = reason if reason is not None or not carried else self.reason
        else:
            self.failure = False
            self.reason = reason
        if to is PairState.INITIAL_COPYING:
            self.bitmap.clear()
            self.verify_first = False
        self.state = to
        self._record(old, to, self.reason)

    def _record(self, old: PairState, to: PairState, reason: str | None) -> None:
        self.history.append({"time": time.time(), "from": old.value, "to": to.value, "reason": reason})
        del self.history[:-HISTORY_LIMIT]
        level = logging.WARNING if self.failure else logging.INFO
        suffix = f" ({reason})" if reason else ""
        log.log(level, "pair %s: %s -> %s%s", self.name, old.value, to.value, suffix)

    def record_write(self, lba: int, count: int) -> None:
        """Record a written position while Suspend or Suspending; otherwise nothing to do."""
        if self.state in (PairState.SUSPEND, PairState.SUSPENDING):
            self.bitmap.mark(lba, count)

    @property
    def revision(self) -> tuple:
        """Changes whenever anything `to_dict` holds does (the state, reason, failure, history,
        positions): saving compares revisions instead of whole documents."""
        last = self.history[-1].get("time") if self.history else None
        return (self.state, self.reason, self.failure, self.verify_first, len(self.history), last,
                id(self.bitmap), self.bitmap.changes)

    def to_dict(self) -> dict[str, Any]:
        """The saved form (shared while the pair does not change: do not modify it)."""
        cached = self.__dict__.get("_saved")
        if cached is not None and cached[0] == self.revision:
            return cached[1]
        doc = self._document()
        self.__dict__["_saved"] = (self.revision, doc)
        return doc

    def _document(self) -> dict[str, Any]:
        return {
            "name": self.name, "kind": self.kind.value, "source": self.source, "target": self.target,
            "num_blocks": self.num_blocks, "state": self.state.value, "reason": self.reason,
            "failure": self.failure, "bitmap": base64.b64encode(self.bitmap.to_bytes()).decode("ascii"),
            "history": [dict(h) for h in self.history], "verify_first": self.verify_first,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Pair:
        """Rebuild a pair from `to_dict` output; FormatError naming the field if it is damaged."""
        name = d.get("name") if isinstance(d, dict) and isinstance(d.get("name"), str) else "?"
        try:
            if not isinstance(d, dict):
                raise TypeError(f"a JSON {type(d).__name__}, not an object")
            _check_fields(d)
            bitmap = PositionBitmap.from_bytes(base64.b64decode(d["bitmap"], validate=True))
            pair = cls(name=str(d["name"]), kind=PairKind(d["kind"]), source=str(d["source"]),
                       target=str(d["target"]), num_blocks=int(d["num_blocks"]), state=PairState(d["state"]),
                       reason=d.get("reason"), failure=bool(d.get("failure", False)), bitmap=bitmap,
                       history=[dict(h) for h in d.get("history", [])],
                       verify_first=bool(d.get("verify_first", False)))
        except KeyError as err:
            raise FormatError(f"pair {name}: saved state lacks the field {err}") from None
        except (ValueError, TypeError, binascii.Error) as err:
            raise FormatError(f"pair {name}: saved state is invalid ({err})") from None
        except FormatError as err:
            raise FormatError(f"pair {name}: {err}") from None
        return pair


_PAIR_FIELDS: dict[str, tuple[type, ...]] = {
    "name": (str,), "kind": (str,), "source": (str,), "target": (str,), "num_blocks": (int,),
    "state": (str,), "bitmap": (str,)}
_OPTIONAL_FIELDS: dict[str, tuple[type, ...]] = {"reason": (str, type(None)), "failure": (bool,), "history": (list,),
                                                  "verify_first": (bool,)}


def _check_fields(d: dict[str, Any]) -> None:
    """Each field of a saved pair has the JSON type `to_dict` gives it (KeyError names a missing one)."""
    for key, types in [*_PAIR_FIELDS.items(), *((k, t) for k, t in _OPTIONAL_FIELDS.items() if k in d)]:
        value = d[key]
        if not isinstance(value, types) or (types == (int,) and (isinstance(value, bool) or value < 0)):
            raise TypeError(f"field {key!r} holds {brief(value)}")
    if not all(isinstance(h, dict) and all(isinstance(v, _SCALARS) for v in h.values()) for h in d.get("history", [])):
        raise TypeError("field 'history' holds something other than transition records")


_SCALARS = (str, int, float, type(None))


# --------------------------------------------------------------------------------------------
# The registry of a deployment's pairs
# --------------------------------------------------------------------------------------------
def split_ref(ref: str) -> tuple[str, str]:
    site, _, volume = ref.partition(":")
    return site, volume


class PairRegistry:
    """The pairs of one deployment, by name (see "Keeps true" above)."""

    def __init__(self, pairs: dict[str, Pair] | None = None) -> None:
        self.pairs: dict[str, Pair] = dict(pairs or {})
        self.versions: dict[str, int] = {name: 0 for name in self.pairs}
        # `group`'s, `from_source`'s and `into`'s answers, until a pair is added or removed
        self._groups: dict[tuple[PairKind, str], tuple[Pair, ...]] = {}
        self._ends: dict[tuple[str, PairKind | None], Pair | None] = {}

    def __iter__(self) -> Iterator[Pair]:
        return iter(sorted(self.pairs.values(), key=lambda p: p.name))

    def __len__(self) -> int:
        return len(self.pairs)

    def get(self, name: str) -> Pair:
        try:
            return self.pairs[name]
        except KeyError:
            known = ", ".join(sorted(self.pairs)) or "none"
            raise TricopyError(f"no pair named {name!r} (pairs: {known})") from None

    def add(self, pair: Pair) -> Pair:
        if pair.name in self.pairs:
            raise TricopyError(f"pair {pair.name} already exists; delete it first")
        for other in self.pairs.values():
            if other.target == pair.target:
                raise TricopyError(f"{pair.target} is already the target of pair {other.name}")
            if other.source == pair.source and other.kind == pair.kind:
                raise TricopyError(f"{pair.source} is already the source of {pair.kind.value} pair {other.name}")
        self.pairs[pair.name] = pair
        self.versions[pair.name] = 0
        self._groups.clear()
        self._ends.clear()
        return pair

    def remove(self, name: str) -> None:
        self.get(name)
        del self.pairs[name]
        self.versions.pop(name, None)
        self._groups.clear()
        self._ends.clear()

    def from_source(self, ref: str, kind: PairKind) -> Pair | None:
        """The pair of this kind whose source is `ref` (asked on every write: answered from a cache)."""
        try:
            return self._ends[ref, kind]
        except KeyError:
            found = next((p for p in self.pairs.values() if p.source == ref and p.kind == kind), None)
            self._ends[ref, kind] = found
            return found

    def into(self, ref: str) -> Pair | None:
        """The pair whose target is `ref`."""
        try:
            return self._ends[ref, None]
        except KeyError:
            found = next((p for p in self.pairs.values() if p.target == ref), None)
            self._ends[ref, None] = found
            return found

    def involving(self, site: str) -> list[Pair]:
        return [p for p in self if split_ref(p.source)[0] == site or split_ref(p.target)[0] == site]

    def group(self, kind: PairKind, source_site: str) -> list[Pair]:
        """The pairs of one consistency group: same kind, same source site [0128] (a new list each time)."""
        return list(self.group_members(kind, source_site))

    def group_members(self, kind: PairKind, source_site: str) -> tuple[Pair, ...]:
        """`group`, as the registry keeps it (asked on every write; valid until a pair is added or removed)."""
        key = (kind, source_site)
        if key not in self._groups:  # a pair's kind and volumes never change: only membership does
            self._groups[key] = tuple(p for p in self if p.kind == kind and split_ref(p.source)[0] == source_site)
        return self._groups[key]

    # -- persistence ---------------------------------------------------------------------------
    def bump(self, pair: Pair) -> None:
        self.versions[pair.name] = self.versions.get(pair.name, 0) + 1

    def to_records(self, site: str) -> dict[str, dict]:
        return {p.name: {"version": self.versions.get(p.name, 0), "pair": p.to_dict()} for p in self.involving(site)}

    @classmethod
    def merge_copies(cls, copies: list[dict[str, dict]]) -> PairRegistry:
        """Each site's saved pairs -> one registry; a pair present twice keeps its newer copy. A
        damaged record (not {"version": n, "pair": {...}}, or filed under another pair's name) is
        refused with FormatError."""
        best: dict[str, dict] = {}
        for records in copies:
            if not isinstance(records, dict):
                raise FormatError(f"saved pairs: a JSON {type(records).__name__}, not an object of pairs")
            for name, rec in records.items():
                _check_record(name, rec)
                if name not in best or rec.get("version", 0) > best[name].get("version", 0):
                    best[name] = rec
        reg = cls({name: Pair.from_dict(rec["pair"]) for name, rec in best.items()})
        reg.versions = {name: int(rec.get("version", 0)) for name, rec in best.items()}
        return reg


def _check_record(name: str, rec: object) -> None:
    if not isinstance(rec, dict) or not isinstance(rec.get("pair"), dict):
        raise FormatError(f"saved pair {name}: not a record with the pair's state")
    version = rec.get("version", 0)
    if not isinstance(version, int) or isinstance(version, bool) or version < 0:
        raise FormatError(f"saved pair {name}: version {brief(version)} is not a non-negative integer")
    if rec["pair"].get("name") != name:
        raise FormatError(f"saved pair {name}: the record holds pair {brief(rec['pair'].get('name'))}")
