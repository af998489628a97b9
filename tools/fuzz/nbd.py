"""Fuzz target: NBD option haggling and transmission requests as `vstore.nbd.session` and the
export's read-modify-write see them (SPEC §6 [0133]-[0135]; DESIGN invariant 5: bad bytes give a
clear error and change nothing).

Keeps true for every input: the negotiation never asks for more than an option announced (nor
more than `MAX_OPTION_DATA`), answers each option with well-formed replies to that option (ACK
or an error last), enters transmission only with one of its exports (and, with TLS offered, only
after STARTTLS), and otherwise ends with a reason. A request header parses the same through the
`struct` fast path and the construct declaration; a refused request gets a known NBD error and
a sentence and changes nothing; a served one changes the export exactly as a byte model says.

Input: one flags byte, then the bytes. Bit 0 clear: the bytes are the client's side of a
negotiation (bit 1: the server offers TLS; bit 2: valid client flags are put first, so mutations
reach the options). Bit 0 set: the bytes are a transmission stream (headers, WRITE payloads) served
on a 64-block memory device (bit 1: structured replies negotiated; bit 2: read-only export).
"""

from __future__ import annotations

import re

from tools.fuzz import harness
from vstore.blocks.codec import parse_checked
from vstore.blocks.device import MemoryDevice
from vstore.blocks.errors import FormatError
from vstore.nbd import proto as p
from vstore.nbd.server import Export
from vstore.nbd.session import (
    MAX_OPTION_DATA,
    ExportInfo,
    Negotiation,
    Request,
    check_request,
    frame_error,
    parse_request,
)

BS = 512
BLOCKS = 64
MAX_PAYLOAD = 16 * BS
EXPORTS = [ExportInfo("A", BLOCKS * BS, BS), ExportInfo("B", 2 * BLOCKS * BS, 4096, readonly=True)]
ERRORS = {p.EPERM, p.EIO, p.EINVAL, p.ENOSPC, p.EOVERFLOW}


def _replies(raw: bytes, option: int) -> list[int]:
    """The reply types in `raw`, each checked to be a whole option reply to `option`."""
    types = []
    while raw:
        assert len(raw) >= 20, "a truncated option reply"
        length = 20 + int.from_bytes(raw[16:20], "big")
        reply = p.OPTION_REPLY.parse(raw[:length])
        assert reply.option == option, "a reply to another option"
        types.append(reply.type)
        raw = raw[length:]
    assert types, "an option without a reply"
    assert all(t in (p.REP_INFO, p.REP_SERVER) for t in types[:-1]), "an ACK or error before the last reply"
    assert types[-1] == p.REP_ACK or types[-1] & p.REP_ERR, "the last reply is neither ACK nor an error"
    return types


def _negotiate(stream: bytes, tls: bool) -> str:
    neg = Negotiation(EXPORTS, tls_available=tls)
    assert p.GREETING.parse(neg.greeting()).handshake_flags == p.FLAG_FIXED_NEWSTYLE | p.FLAG_NO_ZEROES
    at, option, answered = 0, 0, 0
    while neg.needed and at + neg.needed <= len(stream):
        n = neg.needed
        assert n <= MAX_OPTION_DATA, "asked for more than an option may carry"
        chunk = stream[at:at + n]
        if neg.phase == "header" and chunk[:8] == p.IHAVEOPT.to_bytes(8, "big"):
            option = int.from_bytes(chunk[8:12], "big")
        step = neg.feed(chunk)
        at += n
        if step.close is not None:
            assert step.close and neg.needed == 0 and step.export is None
            if step.reply:
                _replies(step.reply, option)
            return f"closed after {answered}: {re.sub(r'0x[0-9a-f]+', '#', step.close)[:30]}"
        if step.export is not None:
            assert step.export in EXPORTS and neg.needed == 0
            assert not tls or neg.tls_active, "transmission before STARTTLS on a TLS server"
            if option == p.OPT_EXPORT_NAME:
                assert len(step.reply) in (10, 134)
            else:
                assert _replies(step.reply, option)[-1] == p.REP_ACK
            return f"export {step.export.name} after {answered}"
        if step.reply:
            answered += 1
            _replies(step.reply, option)
        if step.starttls:
            assert tls
            neg.tls_started()
    return f"incomplete after {answered}"


def _request(raw: bytes) -> Request | FormatError:
    got = harness.rejects(parse_request, raw)
    declared = harness.rejects(parse_checked, p.REQUEST, raw, "request")
    assert harness.ok(got) == harness.ok(declared), "the fast path and the declaration disagree"
    if isinstance(got, Request):
        assert (got.flags, got.type, got.cookie, got.offset, got.length) == (
            declared.flags, declared.type, declared.cookie, declared.offset, declared.length)
    return got  # type: ignore[return-value]


def _apply(model: bytearray, req: Request, payload: bytes) -> None:
    """What a served request does to the bytes (trim: the whole blocks inside)."""
    start, end = req.offset, req.offset + req.length
    if req.type == p.CMD_WRITE:
        model[start:end] = payload
    elif req.type == p.CMD_WRITE_ZEROES:
        model[start:end] = bytes(req.length)
    elif req.type == p.CMD_TRIM:
        first, last = -(-start // BS) * BS, end // BS * BS
        if last > first:
            model[first:last] = bytes(last - first)


def _transmit(stream: bytes, structured: bool, readonly: bool) -> str:
    seed = bytes(range(256)) * (BLOCKS * BS // 256)
    dev = MemoryDevice(BLOCKS, BS, data=seed)
    export = Export("A", dev, readonly=readonly, max_payload=MAX_PAYLOAD)
    model, at, served, refused = bytearray(seed), 0, 0, 0
    kinds: set[str] = set()
    while at + p.REQUEST_SIZE <= len(stream):
        req = _request(stream[at:at + p.REQUEST_SIZE])
        at += p.REQUEST_SIZE
        if not isinstance(req, Request):
            return f"bad header after {served}/{refused}"
        if frame_error(req, export.info) is not None:
            return f"framing lost after {served}/{refused}"
        payload = stream[at:at + req.length] if req.type == p.CMD_WRITE else b""
        if len(payload) < (req.length if req.type == p.CMD_WRITE else 0):
            return f"short payload after {served}/{refused}"
        at += len(payload)
        verdict = check_request(req, export.info, structured)
        if verdict is not None:
            code, message = verdict
            assert code in ERRORS and message
            refused += 1
            kinds.add(f"{req.name}:{code}")
        elif req.type == p.CMD_READ:
            assert export.read(req.offset, req.length) == model[req.offset:req.offset + req.length]
            served += 1
        else:
            fua = bool(req.flags & p.CMD_FLAG_FUA)
            if req.type == p.CMD_WRITE:
                export.write(req.offset, payload, fua=fua)
            elif req.type == p.CMD_WRITE_ZEROES:
                export.write_zeroes(req.offset, req.length, fua=fua, no_hole=bool(req.flags & p.CMD_FLAG_NO_HOLE))
            elif req.type == p.CMD_TRIM:
                export.trim(req.offset, req.length, fua=fua)
            else:
                export.flush()
            _apply(model, req, payload)
            served += 1
            kinds.add(req.name)
        assert bytes(dev.buf) == model, f"{req.name} at {req.offset}+{req.length} did not do what it says"
    return f"served {min(served, 3)} refused {min(refused, 3)}: {' '.join(sorted(kinds))}"


def outcome(data: bytes) -> str:
    if not data:
        return "empty"
    flags, body = data[0], data[1:]
    if flags & 1:
        return _transmit(body, bool(flags & 2), bool(flags & 4))
    if flags & 4:
        body = (p.FLAG_C_FIXED_NEWSTYLE | p.FLAG_C_NO_ZEROES).to_bytes(4, "big") + body
    return _negotiate(body, bool(flags & 2))


def check(data: bytes) -> None:
    outcome(data)


def _opt(option: int, data: bytes = b"") -> bytes:
    return p.OPTION_HEADER.build({"option": option, "length": len(data)}) + data


def _req(cmd: int, offset: int, length: int, data: bytes = b"", flags: int = 0) -> bytes:
    return p.REQUEST.build({"flags": flags, "type": cmd, "cookie": 7, "offset": offset, "length": length}) + data


def seeds() -> list[bytes]:
    go = p.INFO_REQUEST.build({"name": b"A", "requests": [p.INFO_BLOCK_SIZE, p.INFO_NAME]})
    haggle = (_opt(p.OPT_LIST) + _opt(p.OPT_STRUCTURED_REPLY) + _opt(99, b"x") + _opt(p.OPT_INFO, go)
              + _opt(p.OPT_GO, go))
    tls = _opt(p.OPT_LIST) + _opt(p.OPT_STARTTLS) + _opt(p.OPT_GO, go)
    requests = (_req(p.CMD_WRITE, 100, 700, bytes(range(256)) * 2 + bytes(188)) + _req(p.CMD_READ, 50, 900)
                + _req(p.CMD_WRITE_ZEROES, 1000, 1500, flags=p.CMD_FLAG_NO_HOLE) + _req(p.CMD_TRIM, 3, 2000)
                + _req(p.CMD_WRITE, BLOCKS * BS - 10, 20, bytes(20), flags=p.CMD_FLAG_FUA) + _req(p.CMD_FLUSH, 0, 0)
                + _req(p.CMD_READ, 0, 1 << 31))
    return [bytes([4]) + haggle, bytes([4]) + _opt(p.OPT_EXPORT_NAME, b"B"), bytes([6]) + tls,
            bytes([0]) + b"\0\0\0\1" + _opt(p.OPT_ABORT), bytes([1]) + requests, bytes([3]) + requests,
            bytes([5]) + requests]


def main() -> None:
    harness.atheris_main("nbd", check, seeds())


if __name__ == "__main__":
    main()
