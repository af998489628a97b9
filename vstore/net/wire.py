"""Authenticated frames and RPC payloads between site daemons, sans I/O (DESIGN "Sites and links":
construct frames, every frame authenticated with HMAC-SHA256 under the per-deployment lab key, a
nonce handshake, replay refused; SPEC §2 "sites reach each other over a network", SPEC §4).

The asyncio server is `vstore.net.server`, the clients `vstore.net.client`, the lab key file
`vstore.net.keys`. Everything here is pure functions of bytes, except `read_raw_frame` (and its halves
`read_header`, `read_body`), which only cut an asyncio stream into frames by the header rule
below, for both ends; `idle` bounds how long they wait for the peer's next bytes.

Keeps true:
- One frame format (`_FRAME`): magic, version, type, flags, request id, sequence, payload length,
  payload, HMAC-SHA256 over everything before it. A header claiming more than `max_payload` is
  refused from the header alone: the claimed length is never allocated or read. A HELLO is read
  with the limit `MAX_HELLO_PAYLOAD` (its payload is 34 bytes), so before the handshake a peer
  cannot make a site buffer more than a few hundred bytes of frame.
- A connection starts with a nonce handshake. HELLO (client nonce, protocol version) is MACed with
  the lab key; WELCOME (server nonce) is MACed with the session key
  HMAC(lab key, b"tricopy-session" + client nonce + server nonce), which proves the server knows the
  lab key; the client's first request, MACed with that fresh session key, proves the client's.
  Each direction has its own key derived from the session key and a sequence that must be
  exactly previous + 1 (HELLO/WELCOME are 0), so a frame from another connection, a replayed,
  reordered or reflected frame, or a flipped bit fails verification (`AuthError`).
- RPC: a request is method + JSON object + binary data, a response is status + JSON object +
  binary data (`_REQUEST`, `_RESPONSE`). An error response decodes to `RemoteError` carrying the
  remote message and error class name.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import secrets
from dataclasses import dataclass
from typing import Any

from construct import (
    Bytes,
    Const,
    GreedyBytes,
    Int8ub,
    Int16ub,
    Int32ub,
    Int64ub,
    Prefixed,
    Struct,
    Terminated,
    this,
)

from vstore.blocks.codec import check_version, parse_checked, parse_json_object
from vstore.blocks.errors import FormatError, TricopyError
from vstore.replication.network import SiteDown

# --------------------------------------------------------------------------------------------
# Wire formats (declared once)
# --------------------------------------------------------------------------------------------
FRAME_MAGIC = b"TCNF"
FRAME_VERSION = 1
PROTOCOL_VERSION = 1
MAC_SIZE = 32
NONCE_SIZE = 32
DEFAULT_MAX_PAYLOAD = 32 * 1024 * 1024
MAX_HELLO_PAYLOAD = 256  # a HELLO's payload is 34 bytes; anything claiming more is not one
_READ_CHUNK = 1 << 20

T_HELLO = 1
T_WELCOME = 2
T_REQUEST = 3
T_RESPONSE = 4
_TYPE_NAMES = {T_HELLO: "HELLO", T_WELCOME: "WELCOME", T_REQUEST: "REQUEST", T_RESPONSE: "RESPONSE"}

STATUS_OK = 0
STATUS_ERROR = 1  # a TricopyError raised by the handler: its message travels back
STATUS_INTERNAL = 2  # any other failure: a generic message, the traceback stays in the site's log

_HEADER = Struct(
    "magic" / Const(FRAME_MAGIC),
    "version" / Int8ub,
    "type" / Int8ub,
    "flags" / Int8ub,
    "request_id" / Int32ub,
    "seq" / Int64ub,
    "length" / Int32ub,
)
HEADER_SIZE = _HEADER.sizeof()

_FRAME = Struct(
    "header" / _HEADER,
    "payload" / Bytes(this.header.length),
    "mac" / Bytes(MAC_SIZE),
    Terminated,
)

_HELLO = Struct("nonce" / Bytes(NONCE_SIZE), "protocol" / Int16ub, Terminated)
_WELCOME = _HELLO

_REQUEST = Struct(
    "method" / Prefixed(Int8ub, GreedyBytes),
    "meta" / Prefixed(Int32ub, GreedyBytes),
    "data" / GreedyBytes,
)
_RESPONSE = Struct(
    "status" / Int8ub,
    "meta" / Prefixed(Int32ub, GreedyBytes),
    "data" / GreedyBytes,
)


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------
class AuthError(FormatError):
    """A frame whose MAC, sequence or type does not fit this connection (forged, replayed...)."""


class ConnectionFailed(SiteDown):
    """The site at host:port cannot be reached, dropped the connection or did not answer in time."""


class HandshakeFailed(ConnectionFailed):
    """The site closed the connection during the handshake (wrong lab key or protocol version)."""


class RemoteError(TricopyError):
    """A request the remote site refused; `kind` names the remote error class ("internal" if none)."""

    def __init__(self, message: str, kind: str = "TricopyError") -> None:
        super().__init__(message)
        self.kind = kind


# --------------------------------------------------------------------------------------------
# Key derivation
# --------------------------------------------------------------------------------------------
def _mac(key: bytes, data: bytes) -> bytes:
    return hmac.digest(key, data, hashlib.sha256)


def _hello_key(lab_key: bytes) -> bytes:
    return _mac(lab_key, b"tricopy-hello")


def session_key(lab_key: bytes, client_nonce: bytes, server_nonce: bytes) -> bytes:
    """The per-connection key both ends derive from the lab key and the two nonces."""
    return _mac(lab_key, b"tricopy-session" + client_nonce + server_nonce)


# --------------------------------------------------------------------------------------------
# Frames (sans I/O)
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Frame:
    """One verified frame."""

    type: int
    request_id: int
    seq: int
    payload: bytes


def parse_header(data: bytes, max_payload: int) -> Any:
    """Check a frame header (magic, version, length bound) before any payload byte is read."""
    header = parse_checked(_HEADER, data, "network frame header")
    check_version(header.version, FRAME_VERSION, "network frame")
    if header.length > max_payload:
        raise FormatError(f"network frame claims a {header.length}-byte payload, over the "
                          f"{max_payload}-byte limit")
    return header


def build_frame(key: bytes, ftype: int, request_id: int, seq: int, payload: bytes) -> bytes:
    """Encode a frame and append its HMAC-SHA256 under `key`."""
    header = {"version": FRAME_VERSION, "type": ftype, "flags": 0, "request_id": request_id,
              "seq": seq, "length": len(payload)}
    body = _HEADER.build(header) + payload
    return body + _mac(key, body)


def _verify(key: bytes, raw: bytes) -> None:
    if not hmac.compare_digest(_mac(key, raw[:-MAC_SIZE]), raw[-MAC_SIZE:]):
        raise AuthError("network frame failed authentication (wrong key, another session's frame, or damaged)")


def _parse_frame(raw: bytes, max_payload: int) -> Any:
    parse_header(raw[:HEADER_SIZE], max_payload)
    return parse_checked(_FRAME, raw, "network frame")


def _expect(frame: Any, ftype: int, seq: int) -> None:
    h = frame.header
    if h.type != ftype:
        got = _TYPE_NAMES.get(h.type, f"type {h.type}")
        raise AuthError(f"expected a {_TYPE_NAMES[ftype]} frame, got {got}")
    if h.flags != 0:
        raise FormatError(f"network frame has unknown flags {h.flags:#x}")
    if h.seq != seq:
        raise AuthError(f"frame sequence {h.seq} where {seq} was expected (replayed or reordered frame)")


class Session:
    """The keys and sequence counters of one authenticated connection, seen from one end."""

    def __init__(self, send_key: bytes, recv_key: bytes, send_type: int, recv_type: int,
                 max_payload: int) -> None:
        self._send_key, self._recv_key = send_key, recv_key
        self._send_type, self._recv_type = send_type, recv_type
        self.max_payload = max_payload
        self.send_seq = 1
        self.recv_seq = 1

    def seal(self, request_id: int, payload: bytes) -> bytes:
        """Frame `payload` as the next frame this end sends."""
        if len(payload) > self.max_payload:
            raise TricopyError(f"message of {len(payload)} bytes exceeds the {self.max_payload}-byte frame limit")
        raw = build_frame(self._send_key, self._send_type, request_id, self.send_seq, payload)
        self.send_seq += 1
        return raw

    def open(self, raw: bytes) -> Frame:
        """Verify `raw` as the next frame from the other end (MAC, type, exact sequence)."""
        parsed = _parse_frame(raw, self.max_payload)
        _verify(self._recv_key, raw)
        _expect(parsed, self._recv_type, self.recv_seq)
        self.recv_seq += 1
        h = parsed.header
        return Frame(h.type, h.request_id, h.seq, parsed.payload)


def _direction_keys(skey: bytes) -> tuple[bytes, bytes]:
    return _mac(skey, b"client-to-server"), _mac(skey, b"server-to-client")


def client_hello(lab_key: bytes) -> tuple[bytes, bytes]:
    """Start a handshake: returns (client nonce, HELLO frame)."""
    nonce = secrets.token_bytes(NONCE_SIZE)
    payload = _HELLO.build({"nonce": nonce, "protocol": PROTOCOL_VERSION})
    return nonce, build_frame(_hello_key(lab_key), T_HELLO, 0, 0, payload)


def server_accept(lab_key: bytes, raw_hello: bytes, max_payload: int) -> tuple[Session, bytes]:
    """Check a HELLO frame; returns the server's session and the WELCOME frame to send."""
    parsed = _parse_frame(raw_hello, max_payload)
    _verify(_hello_key(lab_key), raw_hello)
    _expect(parsed, T_HELLO, 0)
    hello = parse_checked(_HELLO, parsed.payload, "HELLO message")
    check_version(hello.protocol, PROTOCOL_VERSION, "tricopy network protocol")
    nonce = secrets.token_bytes(NONCE_SIZE)
    c2s, s2c = _direction_keys(session_key(lab_key, hello.nonce, nonce))
    welcome = build_frame(s2c, T_WELCOME, 0, 0, _WELCOME.build({"nonce": nonce, "protocol": PROTOCOL_VERSION}))
    return Session(s2c, c2s, T_RESPONSE, T_REQUEST, max_payload), welcome


def client_finish(lab_key: bytes, client_nonce: bytes, raw_welcome: bytes, max_payload: int) -> Session:
    """Check the server's WELCOME (proof it knows the lab key); returns the client's session."""
    parsed = _parse_frame(raw_welcome, max_payload)
    welcome = parse_checked(_WELCOME, parsed.payload, "WELCOME message")
    c2s, s2c = _direction_keys(session_key(lab_key, client_nonce, welcome.nonce))
    _verify(s2c, raw_welcome)
    _expect(parsed, T_WELCOME, 0)
    check_version(welcome.protocol, PROTOCOL_VERSION, "tricopy network protocol")
    return Session(c2s, s2c, T_REQUEST, T_RESPONSE, max_payload)


# --------------------------------------------------------------------------------------------
# RPC messages (sans I/O)
# --------------------------------------------------------------------------------------------
def _json_bytes(meta: dict | None) -> bytes:
    meta = {} if meta is None else meta
    if not isinstance(meta, dict):
        raise TypeError(f"RPC arguments/results must be a dict, not {type(meta).__name__}")
    return json.dumps(meta, separators=(",", ":")).encode()


def encode_request(method: str, args: dict | None, data: bytes) -> bytes:
    """The payload of a REQUEST frame."""
    name = method.encode()
    if not 0 < len(name) < 256:
        raise TricopyError(f"RPC method name {method!r} must be 1..255 bytes")
    return _REQUEST.build({"method": name, "meta": _json_bytes(args), "data": bytes(data)})


def decode_request(payload: bytes) -> tuple[str, dict, bytes]:
    """(method, args, data) from a REQUEST payload; FormatError if malformed."""
    msg = parse_checked(_REQUEST, payload, "RPC request")
    try:
        method = msg.method.decode()
    except UnicodeDecodeError:
        raise FormatError("RPC request: method name is not UTF-8") from None
    if not method:
        raise FormatError("RPC request: empty method name")
    return method, parse_json_object(msg.meta, "RPC request arguments"), msg.data


def encode_response(status: int, meta: dict | None, data: bytes = b"") -> bytes:
    """The payload of a RESPONSE frame."""
    return _RESPONSE.build({"status": status, "meta": _json_bytes(meta), "data": bytes(data)})


def decode_response(payload: bytes) -> tuple[dict, bytes]:
    """(result, data) from a RESPONSE payload; raises RemoteError for an error response."""
    msg = parse_checked(_RESPONSE, payload, "RPC response")
    meta = parse_json_object(msg.meta, "RPC response")
    if msg.status == STATUS_OK:
        return meta, msg.data
    if msg.status in (STATUS_ERROR, STATUS_INTERNAL):
        raise RemoteError(str(meta.get("error", "remote site reported an error")), str(meta.get("kind", "internal")))
    raise FormatError(f"RPC response: unknown status {msg.status}")


# --------------------------------------------------------------------------------------------
# Cutting a stream into frames (the one awaitable; both ends use it)
# --------------------------------------------------------------------------------------------
async def read_raw_frame(reader: asyncio.StreamReader, max_payload: int, idle: float | None = None) -> bytes | None:
    """One frame's bytes, or None at a clean end of stream; the header is checked first. With
    `idle`, TimeoutError when the peer sends nothing for that many seconds."""
    got = await read_header(reader, max_payload, idle)
    return None if got is None else await read_body(reader, *got, idle)


async def read_header(reader: asyncio.StreamReader, max_payload: int,
                      idle: float | None = None) -> tuple[bytes, Any] | None:
    """(header bytes, parsed header) of the next frame, checked against `max_payload` before any
    payload byte is read; None at a clean end of stream."""
    try:
        async with asyncio.timeout(idle):
            head = await reader.readexactly(HEADER_SIZE)
    except asyncio.IncompleteReadError as e:
        if not e.partial:
            return None
        raise FormatError(f"truncated network frame ({len(e.partial)} bytes, then end of stream)") from None
    return head, parse_header(head, max_payload)


async def read_body(reader: asyncio.StreamReader, head: bytes, header: Any, idle: float | None = None) -> bytes:
    """The whole frame whose header `read_header` returned: header, payload and MAC."""
    want = header.length + MAC_SIZE
    try:
        if idle is None:
            return head + await reader.readexactly(want)
        parts = [head]
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(idle) as deadline:
            while want:
                chunk = await reader.read(min(want, _READ_CHUNK))
                if not chunk:
                    raise asyncio.IncompleteReadError(b"".join(parts[1:]), None)
                parts.append(chunk)
                want -= len(chunk)
                deadline.reschedule(loop.time() + idle)
        return b"".join(parts)
    except asyncio.IncompleteReadError as e:
        raise FormatError(f"truncated network frame (payload cut after {len(e.partial)} bytes)") from None
