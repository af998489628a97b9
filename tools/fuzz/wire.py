"""Fuzz target: the network frames, handshake and RPC payloads of `vstore.net.wire` (SPEC §2 "sites
reach each other over a network"; DESIGN "Sites and links", invariant 5).

Keeps true for every input: each parser returns or raises a project error (`FormatError`,
`AuthError`, `RemoteError`), nothing else. What is accepted is exact: an opened frame seals back to
the same bytes under the same key and advances the sequence by one; an accepted HELLO or WELCOME
completes a handshake whose sessions then talk to each other; a decoded request or response
encodes back to one that decodes the same; `read_raw_frame` cuts a stream into whole frames,
each within the payload limit, and stops at a clean end or with an error.

Input: one flags byte, then the bytes. Bits 0-2 choose what reads them: 0 a server opening a
REQUEST frame, 1 a client opening a RESPONSE frame, 2 a server reading HELLO, 3 a client reading
WELCOME, 4 `read_raw_frame` cutting a stream that a server then opens frame by frame (bit 3: with
an idle timeout, reading the payload piece by piece as a server does), 5 the RPC payload decoders
alone. Bit 7 replaces each frame's MAC with the right one, so the mutations reach
what lies behind the authentication.
"""

from __future__ import annotations

import asyncio
import json

from tools.fuzz import harness
from vstore.net import wire
from vstore.net.wire import (
    HEADER_SIZE,
    MAC_SIZE,
    NONCE_SIZE,
    T_HELLO,
    T_REQUEST,
    T_RESPONSE,
    Session,
    build_frame,
    client_finish,
    decode_request,
    decode_response,
    encode_request,
    encode_response,
    read_raw_frame,
    server_accept,
)

LAB_KEY = b"k" * 32
CLIENT_NONCE = b"c" * NONCE_SIZE
SERVER_NONCE = b"s" * NONCE_SIZE
MAX_PAYLOAD = 4096
C2S, S2C = wire._direction_keys(wire.session_key(LAB_KEY, CLIENT_NONCE, SERVER_NONCE))
_loop: asyncio.AbstractEventLoop | None = None


def server_session() -> Session:
    return Session(S2C, C2S, T_RESPONSE, T_REQUEST, MAX_PAYLOAD)


def client_session() -> Session:
    return Session(C2S, S2C, T_REQUEST, T_RESPONSE, MAX_PAYLOAD)


def seal(buf: bytearray, key: bytes, start: int = 0, end: int | None = None, ftype: int = T_REQUEST) -> None:
    """Put the right MAC under `key` (the MAC of frames of type `ftype`, for the sequence number
    the header says) into the last MAC_SIZE bytes of buf[start:end]."""
    end = len(buf) if end is None else end
    if end - start >= HEADER_SIZE + MAC_SIZE and end <= len(buf):
        seq = int.from_bytes(buf[start + 11:start + 19], "big")
        buf[end - MAC_SIZE:end] = wire._FrameKey(key, ftype).tag(seq, [bytes(buf[start:end - MAC_SIZE])])


def _same_json(a: dict, b: dict) -> bool:
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def _request(payload: bytes) -> str:
    got = harness.rejects(decode_request, payload)
    if not harness.ok(got):
        return harness.describe(got)
    method, args, data = got  # type: ignore[misc]
    assert method and isinstance(args, dict)
    m2, a2, d2 = decode_request(encode_request(method, args, data))
    assert (m2, d2) == (method, data) and _same_json(a2, args), "a request does not survive re-encoding"
    return "request"


def _response(payload: bytes) -> str:
    got = harness.rejects(decode_response, payload)
    if not harness.ok(got):
        return harness.describe(got)
    meta, data = got  # type: ignore[misc]
    m2, d2 = decode_response(encode_response(wire.STATUS_OK, meta, data))
    assert d2 == data and _same_json(m2, meta), "a response does not survive re-encoding"
    return "response"


def _open(session: Session, raw: bytes, key: bytes, decode: bool = True) -> str:
    seq = session.recv_seq
    frame = harness.rejects(session.open, raw)
    if not harness.ok(frame):
        assert session.recv_seq == seq, "a refused frame moved the sequence"
        return harness.describe(frame)
    assert isinstance(frame, wire.Frame) and session.recv_seq == seq + 1 and frame.seq == seq
    assert build_frame(key, frame.type, frame.request_id, frame.seq, frame.payload) == raw, \
        "an opened frame does not seal back to its bytes"
    if not decode:
        return "frame"
    return _request(frame.payload) if frame.type == T_REQUEST else _response(frame.payload)


def _hello(raw: bytes) -> str:
    got = harness.rejects(server_accept, LAB_KEY, raw, MAX_PAYLOAD)
    if not harness.ok(got):
        return harness.describe(got)
    server, welcome = got  # type: ignore[misc]
    client = client_finish(LAB_KEY, raw[HEADER_SIZE:HEADER_SIZE + NONCE_SIZE], welcome, MAX_PAYLOAD)
    _talk(client, server)
    return "handshake"


def _welcome(raw: bytes) -> str:
    got = harness.rejects(client_finish, LAB_KEY, CLIENT_NONCE, raw, MAX_PAYLOAD)
    if not harness.ok(got):
        return harness.describe(got)
    nonce = raw[HEADER_SIZE:HEADER_SIZE + NONCE_SIZE]
    c2s, s2c = wire._direction_keys(wire.session_key(LAB_KEY, CLIENT_NONCE, nonce))
    _talk(got, Session(s2c, c2s, T_RESPONSE, T_REQUEST, MAX_PAYLOAD))  # type: ignore[arg-type]
    return "handshake"


def _talk(client: Session, server: Session) -> None:
    """The two ends of a finished handshake understand each other."""
    frame = server.open(client.seal(7, encode_request("ping", {"n": 1}, b"")))
    assert decode_request(frame.payload) == ("ping", {"n": 1}, b"")
    answer = client.open(server.seal(7, encode_response(wire.STATUS_OK, {"pong": True})))
    assert decode_response(answer.payload) == ({"pong": True}, b"")


async def _cut(stream: bytes, idle: float | None) -> tuple[list[bytes], str]:
    reader = asyncio.StreamReader()
    reader.feed_data(stream)
    reader.feed_eof()
    frames: list[bytes] = []
    while True:
        try:
            raw = await read_raw_frame(reader, MAX_PAYLOAD, idle)
        except harness.ALLOWED as err:
            return frames, harness.describe(err)
        if raw is None:
            return frames, "end"
        frames.append(raw)


def _stream(buf: bytearray, sealed: bool, idle: float | None) -> str:
    if sealed:  # seal each frame where the headers say the frames lie
        off = 0
        while off + HEADER_SIZE <= len(buf):
            end = off + HEADER_SIZE + int.from_bytes(buf[off + 19:off + 23], "big") + MAC_SIZE
            seal(buf, C2S, off, end)
            off = end
    global _loop
    if _loop is None:
        _loop = asyncio.new_event_loop()
    stream = bytes(buf)
    frames, end = _loop.run_until_complete(_cut(stream, idle))
    assert b"".join(frames) == stream[:sum(map(len, frames))], "frames are not the stream cut in order"
    if end == "end":
        assert sum(map(len, frames)) == len(stream)
    server = server_session()
    opened = [_open(server, raw, C2S, decode=False) for raw in frames]
    return f"{len(frames)} frames, {end}, {opened[-1] if opened else '-'}"


def outcome(data: bytes) -> str:
    if not data:
        return "empty"
    flags, buf = data[0], bytearray(data[1:])
    mode, sealed = flags & 7, bool(flags & 0x80)
    if mode == 4:
        return _stream(buf, sealed, 5.0 if flags & 8 else None)
    if mode == 3:
        nonce = bytes(buf[HEADER_SIZE:HEADER_SIZE + NONCE_SIZE])
        key = wire._direction_keys(wire.session_key(LAB_KEY, CLIENT_NONCE, nonce))[1]
    else:
        key = {0: C2S, 1: S2C, 2: wire._hello_key(LAB_KEY)}.get(mode, b"")
    if sealed and key:
        seal(buf, key, ftype=T_HELLO if mode == 2 else T_REQUEST)
    raw = bytes(buf)
    if mode == 0:
        return _open(server_session(), raw, C2S)
    if mode == 1:
        return _open(client_session(), raw, S2C)
    if mode == 2:
        return _hello(raw)
    if mode == 3:
        return _welcome(raw)
    return f"{_request(bytes(buf))} / {_response(bytes(buf))}"


def check(data: bytes) -> None:
    outcome(data)


def seeds() -> list[bytes]:
    client, server = client_session(), server_session()
    request = encode_request("vol.write", {"volume": "C", "lba": 3, "flush": True}, b"\1" * 64)
    response = encode_response(wire.STATUS_OK, {"applied_seq": 9}, b"\2" * 16)
    error = encode_response(wire.STATUS_ERROR, {"error": "no such volume", "kind": "TricopyError"})
    req_frames = [client.seal(1, request), client.seal(2, encode_request("ping", {}, b""))]
    resp_frame = server.seal(1, response)
    _, hello = wire.client_hello(LAB_KEY)
    welcome_payload = wire._WELCOME.build({"nonce": SERVER_NONCE, "protocol": wire.PROTOCOL_VERSION})
    welcome = build_frame(S2C, wire.T_WELCOME, 0, 0, welcome_payload)
    bodies = [(0, req_frames[0]), (1, resp_frame), (1, server_session().seal(1, error)), (2, hello),
              (3, welcome), (4, b"".join(req_frames)), (12, b"".join(req_frames)), (5, request), (5, response)]
    return [bytes([mode | sealed]) + body for mode, body in bodies for sealed in (0, 0x80)]


def main() -> None:
    harness.atheris_main("wire", check, seeds())


if __name__ == "__main__":
    main()
