"""Fuzz target: the pairs' saved state, `Pair.from_dict` and `PairRegistry.merge_copies`, and the
position bitmap, `PositionBitmap.from_bytes` (SPEC §3 [0034]-[0047]; DESIGN "Pairs", invariant 5).

Keeps true for every input: each returns or raises `FormatError`, within bounded memory and time
whatever block count a bitmap states. What is accepted round-trips: a bitmap's bytes decode to the
bitmap its own encoding decodes to, its ranges lie inside it and count its bits; a pair's
`to_dict` loads back to the same pair; a merged registry saves and merges back to itself.

Input: one flags byte, then the bytes. Bits 0-1 choose: 0 bitmap bytes, 1 one saved pair (JSON),
2 one site's saved pairs (JSON: name -> {"version", "pair"}). For bitmaps, bit 2 compresses the
bytes after the block count as the bits (so they inflate) and bit 3 recomputes the CRC.
"""

from __future__ import annotations

import base64
import json
import zlib

from tools.fuzz import harness
from vstore.blocks.codec import crc32, parse_json_object
from vstore.replication.pairs import Pair, PairKind, PairRegistry, PairState, PositionBitmap

ZBITS_AT = 18  # magic, version, block count, then the length of the compressed bits


def _bitmap_bytes(flags: int, body: bytes) -> bytes:
    buf = bytearray(body)
    if flags & 4 and len(buf) >= ZBITS_AT - 4:
        bits = zlib.compress(bytes(buf[ZBITS_AT - 4:]))
        buf[ZBITS_AT - 4:] = len(bits).to_bytes(4, "big") + bits + bytes(4)
    if flags & 8 and len(buf) >= ZBITS_AT:
        end = ZBITS_AT + int.from_bytes(buf[ZBITS_AT - 4:ZBITS_AT], "big")
        harness.seal_crc(buf, 0, end, crc32, "big")
    return bytes(buf)


def _bitmap(raw: bytes) -> str:
    got = harness.rejects(PositionBitmap.from_bytes, raw)
    if not harness.ok(got):
        return harness.describe(got)
    bm = got
    assert isinstance(bm, PositionBitmap)
    assert PositionBitmap.from_bytes(bm.to_bytes()) == bm, "a bitmap does not survive re-encoding"
    ranges = bm.ranges()
    assert all(0 <= first and count > 0 and first + count <= bm.num_blocks for first, count in ranges)
    assert sum(count for _, count in ranges) == bm.count()
    return f"bitmap of {bm.count()} marked"


def _pair(doc: dict) -> str:
    got = harness.rejects(Pair.from_dict, doc)
    if not harness.ok(got):
        return harness.describe(got)
    pair = got
    assert isinstance(pair, Pair) and pair.bitmap.num_blocks == pair.num_blocks
    assert Pair.from_dict(json.loads(json.dumps(pair.to_dict()))).to_dict() == pair.to_dict()
    return f"pair {pair.kind.value} {pair.state.value}"


def _registry(doc: dict) -> str:
    got = harness.rejects(PairRegistry.merge_copies, [doc])
    if not harness.ok(got):
        return harness.describe(got)
    reg = got
    assert isinstance(reg, PairRegistry)
    records = {p.name: {"version": reg.versions[p.name], "pair": p.to_dict()} for p in reg}
    again = PairRegistry.merge_copies([json.loads(json.dumps(records))])
    assert [p.to_dict() for p in again] == [p.to_dict() for p in reg] and again.versions == reg.versions
    return f"registry of {len(reg)}"


def outcome(data: bytes) -> str:
    if not data:
        return "empty"
    flags, body = data[0], data[1:]
    mode = flags & 3
    if mode == 0:
        return _bitmap(_bitmap_bytes(flags, body))
    doc = harness.rejects(parse_json_object, body, "fuzzed pair")
    if not harness.ok(doc):
        return "not a JSON object"
    assert isinstance(doc, dict)
    return _pair(doc) if mode == 1 else _registry(doc)


def check(data: bytes) -> None:
    outcome(data)


def _pairs() -> list[Pair]:
    sync = Pair("A->C", PairKind.SYNC, "primary:A", "sync:C", 256)
    sync.transition(PairState.INITIAL_COPYING, "initial copy")
    sync.transition(PairState.DUPLEX)
    sync.transition(PairState.SUSPEND, "link down", failure=True)
    sync.record_write(3, 17)
    asyn = Pair("B->D", PairKind.ASYNC, "primary:B", "async:D", 100)
    asyn.transition(PairState.DUPLEX)
    asyn.transition(PairState.SUSPENDING, "spool full")
    asyn.record_write(99, 1)
    return [sync, asyn, Pair("A->D", PairKind.ASYNC, "primary:A", "async:D", 0)]


def seeds() -> list[bytes]:
    pairs = _pairs()
    out = []
    for p in pairs:
        raw = p.bitmap.to_bytes()
        out += [b"\0" + raw, b"\x08" + raw, b"\x0c" + raw[:ZBITS_AT - 4] + bytes(p.bitmap._bits)]
        out.append(b"\1" + json.dumps(p.to_dict()).encode())
    records = {p.name: {"version": i, "pair": p.to_dict()} for i, p in enumerate(pairs)}
    out.append(b"\2" + json.dumps(records).encode())
    out.append(b"\1" + base64.b64encode(b"not a pair"))
    return out


def main() -> None:
    harness.atheris_main("pairs", check, seeds())


if __name__ == "__main__":
    main()
