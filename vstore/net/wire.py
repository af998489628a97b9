"""Authenticated frames and RPC payloads between site daemons, sans I/O (DESIGN "Sites and links":
declared frames, every frame authenticated under the per-deployment lab key, a nonce handshake,
replay refused; SPEC §2 "sites reach each other over a network", SPEC §4).

The asyncio server is `vstore.net.server`, the clients `vstore.net.client`, the lab key file
`vstore.net.keys`. Everything here is pure functions of bytes, except `read_raw_frame` (and its halves
`read_header`, `read_body`), which only cut an asyncio stream into frames by the header rule
below (`vstore.net.server.FrameCutter` is the same rule for a receiver that reads straight into
each frame's own buffer); `idle` bounds how long they wait for the peer's next bytes.

Keeps true:
- One frame format (`_FRAME`, protocol version 2): magic, version, type, flags, request id,
  sequence, payload length, payload, a 16-byte MAC over everything before it. The hot paths pack
  and unpack the header with `_HEADER_FAST`, the same layout as the declaration (tests check both
  agree byte for byte). A header claiming more than `max_payload` is refused from the header
  alone: the claimed length is never allocated or read. A HELLO is read with the limit
  `MAX_HELLO_PAYLOAD` (its payload is 34 bytes), so before the handshake a peer cannot make a site
  buffer more than a few hundred bytes of frame.
- The MAC of a session frame is AES-256-GCM's tag over the frame with no ciphertext (GMAC) under
  the direction's key, the nonce being the frame's sequence number (unique per key: each
  direction has its own key and counts up); it is computed over the frame's pieces as they are
  (`Session.seal_parts`), never over a joined copy. The HELLO, sent under the long-lived lab key
  where a nonce cannot be unique, carries HMAC-SHA256 truncated to 16 bytes instead.
- A connection starts with a nonce handshake. HELLO (client nonce, protocol version) is MACed with
  the lab key; WELCOME (server nonce) is MACed with the session key
  HMAC(lab key, b"tricopy-session" + client nonce + server nonce), which proves the server knows the
  lab key; the client's first request, MACed with that fresh session key, proves the client's.
  Each direction has its own key derived from the session key and a sequence that must be
  exactly previous + 1 (HELLO/WELCOME are 0), so a frame from another connection, a replayed,
  reordered or reflected frame, or a flipped bit fails verification (`AuthError`). A peer
  speaking another frame or protocol version is refused with a message naming both versions.
- RPC: a request is method + JSON object + binary data, a response is status + JSON object +
  binary data (`_REQUEST`, `_RESPONSE`; packed by hand in the same layout, which tests check
  against the declarations). Decoding never copies the binary data: it is a view of the frame.
  An error response decodes to `RemoteError` carrying the remote message and error class name.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import secrets
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

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
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from vstore.blocks.codec import parse_checked, parse_json_object
from vstore.blocks.errors import FormatError, TricopyError, brief
from vstore.replication.network import SiteDown

Buffer = bytes | bytearray | memoryview

# --------------------------------------------------------------------------------------------
# Wire formats (declared once)
# --------------------------------------------------------------------------------------------
FRAME_MAGIC = b"TCNF"
FRAME_VERSION = 2
PROTOCOL_VERSION = 2
MAC_SIZE = 16
NONCE_SIZE = 32
DEFAULT_MAX_PAYLOAD = 32 * 1024 * 1024
MAX_HELLO_PAYLOAD = 256  # a HELLO's payload is 34 bytes; anything claiming more is not one
_READ_CHUNK = 1 << 20
_ONE_SHOT_MAC = 64 << 10  # frames up to this size are MACed joined (cheaper than the streaming MAC's set-up)

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
_HEADER_FAST = struct.Struct(">4sBBBIQI")  # `_HEADER`'s layout, for the hot paths (tests check they agree)

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
_U8 = struct.Struct(">B")
_U32 = struct.Struct(">I")
_NONCE = struct.Struct(">QI")  # a session frame's GCM nonce: its sequence number, then zeros


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
# Keys and MACs
# --------------------------------------------------------------------------------------------
def _mac(key: bytes, data: bytes) -> bytes:
    return hmac.digest(key, data, hashlib.sha256)


def _hello_key(lab_key: bytes) -> bytes:
    return _mac(lab_key, b"tricopy-hello")


def session_key(lab_key: bytes, client_nonce: bytes, server_nonce: bytes) -> bytes:
    """The per-connection key both ends derive from the lab key and the two nonces."""
    return _mac(lab_key, b"tricopy-session" + client_nonce + server_nonce)


class _FrameKey:
    """One direction's MAC: GMAC (AES-256-GCM, no ciphertext) with the frame's sequence as nonce;
    for HELLO frames (the lab key's, sent again and again) truncated HMAC-SHA256."""

    def __init__(self, key: bytes, ftype: int) -> None:
        self.key = hashlib.sha256(key).digest() if len(key) != 32 else bytes(key)
        self.hello = ftype == T_HELLO
        self.aead = AESGCM(self.key)

    def tag(self, seq: int, parts: Sequence[Buffer]) -> bytes:
        if self.hello:
            h = hmac.new(self.key, digestmod=hashlib.sha256)
            for part in parts:
                h.update(part)
            return h.digest()[:MAC_SIZE]
        nonce = _NONCE.pack(seq, 0)
        if len(parts) == 1:
            return self.aead.encrypt(nonce, b"", parts[0])
        if sum(map(len, parts)) <= _ONE_SHOT_MAC:
            return self.aead.encrypt(nonce, b"", b"".join(parts))
        gcm = Cipher(algorithms.AES(self.key), modes.GCM(nonce)).encryptor()
        for part in parts:
            gcm.authenticate_additional_data(part)
        gcm.finalize()
        return gcm.tag

    def verify(self, seq: int, raw: Buffer) -> None:
        view = memoryview(raw)
        body, mac = view[:-MAC_SIZE], view[-MAC_SIZE:]
        if self.hello:
            good = hmac.compare_digest(self.tag(seq, [body]), mac)
        else:
            try:
                self.aead.decrypt(_NONCE.pack(seq, 0), mac, body)
                good = True
            except InvalidTag:
                good = False
        if not good:
            raise AuthError("network frame failed authentication (wrong key, another session's frame, or damaged)")


# --------------------------------------------------------------------------------------------
# Frames (sans I/O)
# --------------------------------------------------------------------------------------------
class FrameHeader(NamedTuple):
    """A frame header as `_HEADER` declares it (without the constant magic)."""

    version: int
    type: int
    flags: int
    request_id: int
    seq: int
    length: int


@dataclass(frozen=True)
class Frame:
    """One verified frame; `payload` is a view of the received bytes."""

    type: int
    request_id: int
    seq: int
    payload: Buffer


def parse_header(data: Buffer, max_payload: int) -> FrameHeader:
    """Check a frame header (magic, version, length bound) before any payload byte is read."""
    if len(data) < HEADER_SIZE:
        raise FormatError(f"network frame header: {len(data)} bytes where {HEADER_SIZE} were expected")
    magic, *fields = _HEADER_FAST.unpack_from(data)
    if magic != FRAME_MAGIC:
        raise FormatError(f"network frame header: bad magic {brief(bytes(magic))}, expected {FRAME_MAGIC!r} "
                          "(not a tricopy peer)")
    header = FrameHeader(*fields)
    if header.version != FRAME_VERSION:
        raise FormatError(f"network frame: format version {header.version} is not supported (this tricopy "
                          f"reads {FRAME_VERSION}); run the same tricopy version on every site")
    if header.length > max_payload:
        raise FormatError(f"network frame claims a {header.length}-byte payload, over the "
                          f"{max_payload}-byte limit")
    return header


def _pack_header(ftype: int, request_id: int, seq: int, length: int) -> bytes:
    return _HEADER_FAST.pack(FRAME_MAGIC, FRAME_VERSION, ftype, 0, request_id, seq, length)


def build_frame(key: bytes, ftype: int, request_id: int, seq: int, payload: Buffer) -> bytes:
    """Encode a frame and append its MAC under `key` (the MAC of its type)."""
    body = _pack_header(ftype, request_id, seq, len(payload)) + bytes(payload)
    return body + _FrameKey(key, ftype).tag(seq, [body])


def _open_frame(raw: Buffer, max_payload: int, key: _FrameKey, ftype: int, seq: int) -> Frame:
    """Check `raw` as one whole frame of type `ftype` and sequence `seq` MACed under `key`."""
    header = parse_header(raw, max_payload)
    if len(raw) != HEADER_SIZE + header.length + MAC_SIZE:
        raise FormatError(f"network frame: {len(raw)} bytes where its header announces "
                          f"{HEADER_SIZE + header.length + MAC_SIZE}")
    key.verify(header.seq, raw)
    if header.type != ftype:
        got = _TYPE_NAMES.get(header.type, f"type {header.type}")
        raise AuthError(f"expected a {_TYPE_NAMES[ftype]} frame, got {got}")
    if header.flags != 0:
        raise FormatError(f"network frame has unknown flags {header.flags:#x}")
    if header.seq != seq:
        raise AuthError(f"frame sequence {header.seq} where {seq} was expected (replayed or reordered frame)")
    view = memoryview(raw)
    return Frame(header.type, header.request_id, header.seq, view[HEADER_SIZE:len(view) - MAC_SIZE])


class Session:
    """The keys and sequence counters of one authenticated connection, seen from one end."""

    def __init__(self, send_key: bytes, recv_key: bytes, send_type: int, recv_type: int,
                 max_payload: int) -> None:
        self._send_key, self._recv_key = _FrameKey(send_key, send_type), _FrameKey(recv_key, recv_type)
        self._send_type, self._recv_type = send_type, recv_type
        self.max_payload = max_payload
        self.send_seq = 1
        self.recv_seq = 1

    def seal_parts(self, request_id: int, parts: Sequence[Buffer]) -> list[Buffer]:
        """The next frame this end sends, carrying the concatenation of `parts` as its payload, as
        buffers to send in order (header, the parts themselves, MAC): nothing is joined or copied."""
        length = sum(map(len, parts))
        if length > self.max_payload:
            raise TricopyError(f"message of {length} bytes exceeds the {self.max_payload}-byte frame limit")
        header = _pack_header(self._send_type, request_id, self.send_seq, length)
        pieces = [header, *parts]
        mac = self._send_key.tag(self.send_seq, pieces)
        self.send_seq += 1
        return [*pieces, mac]

    def seal(self, request_id: int, payload: Buffer) -> bytes:
        """Frame `payload` as the next frame this end sends (one joined buffer)."""
        return b"".join(self.seal_parts(request_id, [payload]))

    def open(self, raw: Buffer) -> Frame:
        """Verify `raw` as the next frame from the other end (MAC, type, exact sequence)."""
        frame = _open_frame(raw, self.max_payload, self._recv_key, self._recv_type, self.recv_seq)
        self.recv_seq += 1
        return frame


def _direction_keys(skey: bytes) -> tuple[bytes, bytes]:
    return _mac(skey, b"client-to-server"), _mac(skey, b"server-to-client")


def _check_protocol(found: int) -> None:
    if found != PROTOCOL_VERSION:
        raise FormatError(f"tricopy network protocol: format version {found} is not supported (this tricopy "
                          f"speaks {PROTOCOL_VERSION}); run the same tricopy version on every site")


def client_hello(lab_key: bytes) -> tuple[bytes, bytes]:
    """Start a handshake: returns (client nonce, HELLO frame)."""
    nonce = secrets.token_bytes(NONCE_SIZE)
    payload = _HELLO.build({"nonce": nonce, "protocol": PROTOCOL_VERSION})
    return nonce, build_frame(_hello_key(lab_key), T_HELLO, 0, 0, payload)


def server_accept(lab_key: bytes, raw_hello: Buffer, max_payload: int) -> tuple[Session, bytes]:
    """Check a HELLO frame; returns the server's session and the WELCOME frame to send."""
    frame = _open_frame(raw_hello, max_payload, _FrameKey(_hello_key(lab_key), T_HELLO), T_HELLO, 0)
    hello = parse_checked(_HELLO, frame.payload, "HELLO message")
    _check_protocol(hello.protocol)
    nonce = secrets.token_bytes(NONCE_SIZE)
    c2s, s2c = _direction_keys(session_key(lab_key, hello.nonce, nonce))
    welcome = build_frame(s2c, T_WELCOME, 0, 0, _WELCOME.build({"nonce": nonce, "protocol": PROTOCOL_VERSION}))
    return Session(s2c, c2s, T_RESPONSE, T_REQUEST, max_payload), welcome


def client_finish(lab_key: bytes, client_nonce: bytes, raw_welcome: Buffer, max_payload: int) -> Session:
    """Check the server's WELCOME (proof it knows the lab key); returns the client's session."""
    header = parse_header(raw_welcome, max_payload)
    welcome = parse_checked(_WELCOME, memoryview(raw_welcome)[HEADER_SIZE:HEADER_SIZE + header.length],
                            "WELCOME message")
    c2s, s2c = _direction_keys(session_key(lab_key, client_nonce, welcome.nonce))
    _open_frame(raw_welcome, max_payload, _FrameKey(s2c, T_WELCOME), T_WELCOME, 0)
    _check_protocol(welcome.protocol)
    return Session(c2s, s2c, T_REQUEST, T_RESPONSE, max_payload)


# --------------------------------------------------------------------------------------------
# RPC messages (sans I/O; the layouts of `_REQUEST` and `_RESPONSE`)
# --------------------------------------------------------------------------------------------
def _json_bytes(meta: dict | None) -> bytes:
    meta = {} if meta is None else meta
    if not isinstance(meta, dict):
        raise TypeError(f"RPC arguments/results must be a dict, not {type(meta).__name__}")
    return json.dumps(meta, separators=(",", ":")).encode()


def request_parts(method: str, args: dict | None, data: Buffer | list[Buffer] = b"") -> list[Buffer]:
    """The payload of a REQUEST frame as pieces; `data` is one buffer or a list of buffers whose
    concatenation is the request's data (none of it is copied)."""
    name = method.encode()
    if not 0 < len(name) < 256:
        raise TricopyError(f"RPC method name {method!r} must be 1..255 bytes")
    meta = _json_bytes(args)
    head = _U8.pack(len(name)) + name + _U32.pack(len(meta)) + meta
    if isinstance(data, list):
        return [head, *data]
    return [head, data] if len(data) else [head]


def encode_request(method: str, args: dict | None, data: Buffer) -> bytes:
    """The payload of a REQUEST frame."""
    return b"".join(request_parts(method, args, data))


def _meta_at(view: memoryview, at: int, what: str) -> tuple[memoryview, int]:
    if len(view) < at + 4:
        raise FormatError(f"{what}: truncated before its arguments' length")
    (size,) = _U32.unpack_from(view, at)
    end = at + 4 + size
    if end > len(view):
        raise FormatError(f"{what}: arguments of {size} bytes announced, {len(view) - at - 4} present")
    return view[at + 4:end], end


def decode_request(payload: Buffer) -> tuple[str, dict, memoryview]:
    """(method, args, data) from a REQUEST payload (data: a view of it); FormatError if malformed."""
    view = memoryview(payload)
    if not len(view):
        raise FormatError("RPC request: empty")
    size = view[0]
    if len(view) < 1 + size:
        raise FormatError(f"RPC request: method name of {size} bytes announced, {len(view) - 1} present")
    try:
        method = bytes(view[1:1 + size]).decode()
    except UnicodeDecodeError:
        raise FormatError("RPC request: method name is not UTF-8") from None
    if not method:
        raise FormatError("RPC request: empty method name")
    meta, end = _meta_at(view, 1 + size, "RPC request")
    return method, parse_json_object(bytes(meta), "RPC request arguments"), view[end:]


def response_parts(status: int, meta: dict | None, data: Buffer = b"") -> list[Buffer]:
    """The payload of a RESPONSE frame as pieces (the data is not copied)."""
    raw = _json_bytes(meta)
    head = _U8.pack(status) + _U32.pack(len(raw)) + raw
    return [head, data] if len(data) else [head]


def encode_response(status: int, meta: dict | None, data: Buffer = b"") -> bytes:
    """The payload of a RESPONSE frame."""
    return b"".join(response_parts(status, meta, data))


def decode_response(payload: Buffer) -> tuple[dict, memoryview]:
    """(result, data) from a RESPONSE payload; raises RemoteError for an error response."""
    view = memoryview(payload)
    if not len(view):
        raise FormatError("RPC response: empty")
    status = view[0]
    raw, end = _meta_at(view, 1, "RPC response")
    meta = parse_json_object(bytes(raw), "RPC response")
    if status == STATUS_OK:
        return meta, view[end:]
    if status in (STATUS_ERROR, STATUS_INTERNAL):
        raise RemoteError(str(meta.get("error", "remote site reported an error")), str(meta.get("kind", "internal")))
    raise FormatError(f"RPC response: unknown status {status}")


# --------------------------------------------------------------------------------------------
# Cutting a stream into frames (the one awaitable; both ends use it)
# --------------------------------------------------------------------------------------------
async def read_raw_frame(reader: asyncio.StreamReader, max_payload: int, idle: float | None = None) -> bytes | None:
    """One frame's bytes, or None at a clean end of stream; the header is checked first. With
    `idle`, TimeoutError when the peer sends nothing for that many seconds."""
    got = await read_header(reader, max_payload, idle)
    return None if got is None else await read_body(reader, *got, idle)


async def read_header(reader: asyncio.StreamReader, max_payload: int,
                      idle: float | None = None) -> tuple[bytes, FrameHeader] | None:
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


async def read_body(reader: asyncio.StreamReader, head: bytes, header: FrameHeader,
                    idle: float | None = None) -> bytes:
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
