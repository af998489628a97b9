"""Authenticated frames and RPC between site daemons over TCP (optionally TLS).

Implements DESIGN "Sites and links" (TCP links for daemons, construct frames, every frame
authenticated with HMAC-SHA256 under the per-deployment lab key, replay refused) and the
"Process model" (asyncio daemons with a thread-safe synchronous facade); SPEC §2 "sites reach
each other over a network".

Keeps true:
- One frame format (`_FRAME`): magic, version, type, flags, request id, sequence, payload length,
  payload, HMAC-SHA256 over everything before it. A header claiming more than `max_payload` is
  refused from the header alone: the claimed length is never allocated or read.
- A connection starts with a nonce handshake. HELLO (client nonce, protocol version) is MACed with
  the lab key; WELCOME (server nonce) is MACed with the session key
  HMAC(lab key, b"tricopy-session" + client nonce + server nonce), which proves the server knows the
  lab key; the client's first request, MACed with that fresh session key, proves the client's.
  Each direction has its own key derived from the session key and a sequence that must be
  exactly previous + 1 (HELLO/WELCOME are 0), so a frame from another connection, a replayed,
  reordered or reflected frame, or a flipped bit fails verification.
- Bad input (garbage, wrong MAC, wrong version, oversized, unexpected type, silent past the
  handshake timeout) closes only that connection, with a `logging.warning` naming the peer and
  the reason, and never reaches the handler; the server keeps serving everyone else.
- RPC: a request is method + JSON object + binary data, a response is status + JSON object +
  binary data (`_REQUEST`, `_RESPONSE`). Requests on one connection are handled one at a time in
  arrival order; connections are served concurrently. A handler's `TricopyError` comes back to
  the caller as `RemoteError` with the same message; any other exception is logged with its
  traceback on the server and answered with a generic error, never crashing the server.
- Callers get `ConnectionFailed` (a `SiteDown`) with "cannot reach site at host:port (...)" when
  the site cannot be reached, the connection breaks or a call times out; a client whose call
  failed that way closes its connection (the sync `Client` reconnects on its next call; calls are
  never retried because they may not be idempotent).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import os
import secrets
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
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

from vstore.blocks.codec import check_version, parse_checked
from vstore.blocks.errors import FormatError, TricopyError
from vstore.replication.network import SiteDown

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------
# Wire formats (declared once)
# --------------------------------------------------------------------------------------------
FRAME_MAGIC = b"TCNF"
FRAME_VERSION = 1
PROTOCOL_VERSION = 1
MAC_SIZE = 32
NONCE_SIZE = 32
MIN_KEY_BYTES = 32
DEFAULT_MAX_PAYLOAD = 32 * 1024 * 1024
DEFAULT_HANDSHAKE_TIMEOUT = 10.0
DEFAULT_TIMEOUT = 10.0
DEFAULT_WINDOW = 8

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

Handler = Callable[[str, dict, bytes], Awaitable[tuple[dict, bytes]]]


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
# Keys
# --------------------------------------------------------------------------------------------
def load_key(path: Path) -> bytes:
    """Read the lab key (hex) from `path`; refuse a missing, short, non-hex or group/other-readable file."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise TricopyError(f"lab key file {path} does not exist; create it with `vstore lab init` "
                           f"or write {2 * MIN_KEY_BYTES} hex digits into it and chmod 600 {path}") from None
    if mode & 0o077:
        raise TricopyError(f"lab key file {path} is accessible by group or others "
                           f"(mode {mode & 0o777:o}); run: chmod 600 {path}")
    text = path.read_text(encoding="ascii", errors="replace").strip()
    try:
        key = bytes.fromhex(text)
    except ValueError:
        raise TricopyError(f"lab key file {path} does not hold a hex key; "
                           f"write {2 * MIN_KEY_BYTES} hex digits into it") from None
    if len(key) < MIN_KEY_BYTES:
        raise TricopyError(f"lab key file {path} holds {len(key)} bytes of key; a lab key needs at "
                           f"least {MIN_KEY_BYTES} bytes ({2 * MIN_KEY_BYTES} hex digits)")
    return key


def create_key(path: Path) -> bytes:
    """Write a fresh random lab key to a new file `path` with mode 0600 and return it."""
    key = secrets.token_bytes(MIN_KEY_BYTES)
    fd = os.open(Path(path), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key.hex() + "\n")
    return key


def _check_key(key: bytes) -> bytes:
    if not isinstance(key, bytes | bytearray) or len(key) < MIN_KEY_BYTES:
        raise TricopyError(f"a lab key must be at least {MIN_KEY_BYTES} bytes; load it with load_key()")
    return bytes(key)


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


def _json_object(raw: bytes, what: str) -> dict:
    try:
        value = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"{what}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise FormatError(f"{what}: JSON {type(value).__name__} where an object was expected")
    return value


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
    return method, _json_object(msg.meta, "RPC request arguments"), msg.data


def encode_response(status: int, meta: dict | None, data: bytes = b"") -> bytes:
    """The payload of a RESPONSE frame."""
    return _RESPONSE.build({"status": status, "meta": _json_bytes(meta), "data": bytes(data)})


def decode_response(payload: bytes) -> tuple[dict, bytes]:
    """(result, data) from a RESPONSE payload; raises RemoteError for an error response."""
    msg = parse_checked(_RESPONSE, payload, "RPC response")
    meta = _json_object(msg.meta, "RPC response")
    if msg.status == STATUS_OK:
        return meta, msg.data
    if msg.status in (STATUS_ERROR, STATUS_INTERNAL):
        raise RemoteError(str(meta.get("error", "remote site reported an error")), str(meta.get("kind", "internal")))
    raise FormatError(f"RPC response: unknown status {msg.status}")


# --------------------------------------------------------------------------------------------
# Server
# --------------------------------------------------------------------------------------------
async def _read_raw_frame(reader: asyncio.StreamReader, max_payload: int) -> bytes | None:
    """One frame's bytes, or None at a clean end of stream; the header is checked first."""
    try:
        head = await reader.readexactly(HEADER_SIZE)
    except asyncio.IncompleteReadError as e:
        if not e.partial:
            return None
        raise FormatError(f"truncated network frame ({len(e.partial)} bytes, then end of stream)") from None
    header = parse_header(head, max_payload)
    try:
        rest = await reader.readexactly(header.length + MAC_SIZE)
    except asyncio.IncompleteReadError as e:
        raise FormatError(f"truncated network frame (payload cut after {len(e.partial)} bytes)") from None
    return head + rest


def _peer_name(writer: asyncio.StreamWriter) -> str:
    peer = writer.get_extra_info("peername")
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"{peer[0]}:{peer[1]}"
    return str(peer)


async def _call_handler(handler: Handler, method: str, args: dict, data: bytes, peer: str) -> bytes:
    """Run the handler and encode its answer; never raises (errors become error responses)."""
    try:
        result, out = await handler(method, args, data)
        return encode_response(STATUS_OK, result, out)
    except TricopyError as e:
        return encode_response(STATUS_ERROR, {"error": str(e), "kind": type(e).__name__})
    except Exception:
        log.exception("net: handler failed on %r from %s", method, peer)
        return encode_response(STATUS_INTERNAL, {
            "error": f"the site failed internally on {method!r} (see the site's log)", "kind": "internal"})


async def _handshake(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, key: bytes,
                     max_payload: int) -> Session:
    raw = await _read_raw_frame(reader, max_payload)
    if raw is None:
        raise FormatError("connection closed before the handshake")
    session, welcome = server_accept(key, raw, max_payload)
    writer.write(welcome)
    await writer.drain()
    return session


async def _serve_requests(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, session: Session,
                          handler: Handler, peer: str) -> None:
    while (raw := await _read_raw_frame(reader, session.max_payload)) is not None:
        frame = session.open(raw)
        method, args, data = decode_request(frame.payload)
        payload = await _call_handler(handler, method, args, data, peer)
        try:
            reply = session.seal(frame.request_id, payload)
        except TricopyError as e:
            log.warning("net: answer to %r for %s not sendable: %s", method, peer, e)
            refusal = encode_response(STATUS_ERROR, {"error": str(e), "kind": "TricopyError"})
            reply = session.seal(frame.request_id, refusal)
        writer.write(reply)
        await writer.drain()


async def _serve_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, key: bytes,
                            handler: Handler, max_payload: int, handshake_timeout: float) -> None:
    peer = _peer_name(writer)
    try:
        session = await asyncio.wait_for(_handshake(reader, writer, key, max_payload), handshake_timeout)
        await _serve_requests(reader, writer, session, handler, peer)
    except TimeoutError:
        log.warning("net: closing connection from %s: no handshake within %.1fs", peer, handshake_timeout)
    except FormatError as e:
        log.warning("net: closing connection from %s: %s", peer, e)
    except (ConnectionError, ssl.SSLError, OSError) as e:
        log.info("net: connection from %s lost: %s", peer, e)
    except Exception:
        log.exception("net: closing connection from %s after an unexpected error", peer)
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


async def serve(host: str, port: int, key: bytes, handler: Handler, *, ssl_context: ssl.SSLContext | None = None,
                max_payload: int = DEFAULT_MAX_PAYLOAD,
                handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT) -> asyncio.Server:
    """Listen on host:port (0 = any free port) and answer authenticated RPC requests with `handler`."""
    key = _check_key(key)

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _serve_connection(reader, writer, key, handler, max_payload, handshake_timeout)

    limit = 2 ** 20
    return await asyncio.start_server(on_connect, host, port, ssl=ssl_context, limit=limit,
                                      ssl_handshake_timeout=handshake_timeout if ssl_context else None)


def bound_port(server: asyncio.Server) -> int:
    """The TCP port a server from `serve` listens on (useful with port 0)."""
    return server.sockets[0].getsockname()[1]


# --------------------------------------------------------------------------------------------
# Async client
# --------------------------------------------------------------------------------------------
def _unreachable(host: str, port: int, reason: object) -> ConnectionFailed:
    return ConnectionFailed(f"cannot reach site at {host}:{port} ({reason})")


def _is_self_connected(sock: socket.socket | None) -> bool:
    """True for a loopback socket connected to itself (TCP simultaneous open: with nobody listening
    on a port inside the ephemeral range, the kernel may pick that very port as the source port).
    Such a socket talks to itself and holds the port the site's daemon needs to restart."""
    if sock is None:
        return False
    try:
        return sock.getsockname() == sock.getpeername()
    except OSError:
        return False


def _handshake_error(host: str, port: int, e: Exception) -> Exception:
    """What a failed handshake means to the caller: no answer, a broken link, or a refusal."""
    if isinstance(e, TimeoutError):
        return _unreachable(host, port, "no answer to the handshake")
    if isinstance(e, EOFError | FormatError):  # the site hung up on our HELLO, or its WELCOME is bad
        return HandshakeFailed(f"cannot reach site at {host}:{port} (handshake failed: {e}; "
                               "is the lab key the same on both sites?)")
    if isinstance(e, OSError):
        return _unreachable(host, port, str(e) or type(e).__name__)
    return e


class AsyncClient:
    """An authenticated connection to one site; calls may be pipelined up to `window` in flight."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, session: Session,
                 address: tuple[str, int], timeout: float | None, window: int) -> None:
        self._reader, self._writer, self._session = reader, writer, session
        self._address = address
        self.timeout = timeout
        self._window = asyncio.Semaphore(window)
        self._send_lock = asyncio.Lock()
        self._pending: dict[int, asyncio.Future[bytes]] = {}
        self._next_id = 1
        self._failure: ConnectionFailed | None = None
        self._reader_task = asyncio.create_task(self._read_loop())

    @classmethod
    async def connect(cls, host: str, port: int, key: bytes, *, ssl_context: ssl.SSLContext | None = None,
                      timeout: float | None = DEFAULT_TIMEOUT, max_payload: int = DEFAULT_MAX_PAYLOAD,
                      window: int = DEFAULT_WINDOW) -> AsyncClient:
        """Open a connection to host:port and run the handshake; ConnectionFailed if that fails."""
        key = _check_key(key)
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(host, port, ssl=ssl_context, limit=2 ** 20), timeout)
        except (OSError, TimeoutError, ssl.SSLError) as e:
            raise _unreachable(host, port, str(e) or type(e).__name__) from None
        if _is_self_connected(writer.get_extra_info("socket")):
            writer.close()
            raise _unreachable(host, port, "nobody listens (the connection reached itself)")
        try:
            session = await asyncio.wait_for(cls._handshake(reader, writer, key, max_payload), timeout)
        except BaseException as e:
            writer.close()
            if isinstance(e, Exception):
                raise _handshake_error(host, port, e) from None
            raise
        return cls(reader, writer, session, (host, port), timeout, window)

    @staticmethod
    async def _handshake(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, key: bytes,
                         max_payload: int) -> Session:
        nonce, hello = client_hello(key)
        writer.write(hello)
        await writer.drain()
        raw = await _read_raw_frame(reader, max_payload)
        if raw is None:
            raise EOFError("the site closed the connection")
        return client_finish(key, nonce, raw, max_payload)

    @property
    def closed(self) -> bool:
        return self._failure is not None

    def _fail(self, reason: object) -> ConnectionFailed:
        if self._failure is None:
            host, port = self._address
            self._failure = _unreachable(host, port, reason)
            for fut in self._pending.values():
                if not fut.done():
                    fut.set_exception(ConnectionFailed(*self._failure.args))
                    fut.exception()  # mark retrieved: a caller that gave up must not log a warning
            self._pending.clear()
            self._writer.close()
            if self._reader_task is not asyncio.current_task():
                self._reader_task.cancel()
        return ConnectionFailed(*self._failure.args)

    async def _read_loop(self) -> None:
        try:
            while (raw := await _read_raw_frame(self._reader, self._session.max_payload)) is not None:
                frame = self._session.open(raw)
                fut = self._pending.pop(frame.request_id, None)
                if fut is None:
                    raise AuthError(f"response to unknown request {frame.request_id}")
                if not fut.done():
                    fut.set_result(frame.payload)
            self._fail("connection closed by the site")
        except asyncio.CancelledError:
            raise
        except FormatError as e:
            log.warning("net: closing connection to %s:%s: %s", *self._address, e)
            self._fail(e)
        except (OSError, ssl.SSLError) as e:
            self._fail(e)

    async def _send(self, method: str, args: dict | None, data: bytes) -> asyncio.Future[bytes]:
        """Send one request now; returns a future of the raw response payload."""
        if self._failure is not None:
            raise ConnectionFailed(*self._failure.args)
        payload = encode_request(method, args, data)
        async with self._send_lock:
            rid = self._next_id
            self._next_id = rid % 0xFFFFFFFF + 1
            fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
            self._pending[rid] = fut
            try:
                self._writer.write(self._session.seal(rid, payload))
                await self._writer.drain()
            except (OSError, ssl.SSLError) as e:
                raise self._fail(e) from None
        return fut

    async def _await(self, fut: asyncio.Future[bytes], method: str, timeout: float | None) -> tuple[dict, bytes]:
        try:
            payload = await asyncio.wait_for(asyncio.shield(fut), timeout)
        except TimeoutError:
            raise self._fail(f"no answer to {method!r} within {timeout}s") from None
        return decode_response(payload)

    async def call(self, method: str, args: dict | None = None, data: bytes = b"", *,
                   timeout: float | None = None) -> tuple[dict, bytes]:
        """Run `method` on the site; returns (result, data). RemoteError if the site refused it.

        Concurrent calls are pipelined on the connection, at most `window` in flight; `timeout`
        (default: the client's) bounds the wait for the answer, after which the client is closed.
        """
        async with self._window:
            fut = await self._send(method, args, data)
            return await self._await(fut, method, self.timeout if timeout is None else timeout)

    async def call_many(self, calls: Iterable[tuple[str, dict | None, bytes]]) -> list[tuple[dict, bytes]]:
        """Send calls in order with at most `window` in flight; returns their results in order.

        On the first failure no further call is sent; the calls already in flight are awaited,
        then that first failure is raised.
        """
        results: list[tuple[dict, bytes]] = []
        in_flight: deque[tuple[str, asyncio.Future[bytes]]] = deque()
        failure: BaseException | None = None

        async def settle_oldest() -> None:
            nonlocal failure
            method, fut = in_flight.popleft()
            try:
                results.append(await self._await(fut, method, self.timeout))
            except Exception as e:
                failure = failure or e
            finally:
                self._window.release()

        try:
            for method, args, data in calls:
                while in_flight and self._window.locked():
                    await settle_oldest()
                await self._window.acquire()
                try:
                    in_flight.append((method, await self._send(method, args, data)))
                except BaseException:
                    self._window.release()
                    raise
                while in_flight and in_flight[0][1].done():
                    await settle_oldest()
                if failure is not None:
                    break
        except Exception as e:
            failure = failure or e
        while in_flight:
            await settle_oldest()
        if failure is not None:
            raise failure
        return results

    async def close(self) -> None:
        """Close the connection; pending calls fail with ConnectionFailed."""
        self._fail("client closed the connection")
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._reader_task
        with contextlib.suppress(Exception):
            await self._writer.wait_closed()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


# --------------------------------------------------------------------------------------------
# Synchronous, thread-safe client (for CLI commands)
# --------------------------------------------------------------------------------------------
class Client:
    """A blocking client; one call at a time (a lock), reconnecting lazily after a failure."""

    def __init__(self, host: str, port: int, key: bytes, ssl_context: ssl.SSLContext | None = None,
                 timeout: float = DEFAULT_TIMEOUT, max_payload: int = DEFAULT_MAX_PAYLOAD) -> None:
        self.host, self.port = host, port
        self._key = _check_key(key)
        self._ssl = ssl_context
        self.timeout = timeout
        self.max_payload = max_payload
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._session: Session | None = None
        self._next_id = 1
        self._posted: deque[tuple[int, str, bytes]] = deque()  # (request id, method, payload) unanswered
        with self._lock:
            self._connect()

    # -- plumbing
    def _recv_exactly(self, n: int, deadline: float) -> bytes:
        assert self._sock is not None
        buf = bytearray()
        while len(buf) < n:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("timed out")
            self._sock.settimeout(remaining)
            chunk = self._sock.recv(min(n - len(buf), 1 << 20))
            if not chunk:
                raise EOFError("connection closed by the site")
            buf += chunk
        return bytes(buf)

    def _read_raw(self, deadline: float) -> bytes:
        head = self._recv_exactly(HEADER_SIZE, deadline)
        header = parse_header(head, self.max_payload)
        return head + self._recv_exactly(header.length + MAC_SIZE, deadline)

    def _connect(self) -> None:
        deadline = time.monotonic() + self.timeout
        try:
            sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
            if _is_self_connected(sock):
                sock.close()
                raise ConnectionRefusedError("nobody listens (the connection reached itself)")
            if self._ssl is not None:
                sock = self._ssl.wrap_socket(sock, server_hostname=self.host)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except (OSError, ssl.SSLError) as e:
            raise _unreachable(self.host, self.port, e) from None
        self._sock = sock
        try:
            nonce, hello = client_hello(self._key)
            sock.sendall(hello)
            self._session = client_finish(self._key, nonce, self._read_raw(deadline), self.max_payload)
        except (OSError, EOFError, FormatError) as e:
            self._drop()
            raise _handshake_error(self.host, self.port, e) from None

    def _drop(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
        self._sock, self._session = None, None
        self._posted.clear()

    def _send(self, payload: bytes) -> int:
        assert self._sock is not None and self._session is not None
        rid = self._next_id
        self._next_id = rid % 0xFFFFFFFF + 1
        self._sock.settimeout(self.timeout)
        self._sock.sendall(self._session.seal(rid, payload))
        return rid

    def _answer(self, rid: int, deadline: float) -> bytes:
        assert self._session is not None
        frame = self._session.open(self._read_raw(deadline))
        if frame.request_id != rid:
            raise AuthError(f"response to request {frame.request_id} where {rid} was expected")
        return frame.payload

    def _settle_posted(self, deadline: float) -> None:
        """Read the answers to posted requests (the site answers in order)."""
        while self._posted:
            rid, method, _ = self._posted[0]
            answer = self._answer(rid, deadline)
            self._posted.popleft()
            try:
                decode_response(answer)
            except RemoteError as e:
                log.warning("net: posted request %r refused by %s:%d: %s", method, self.host, self.port, e)

    def _exchange(self, payload: bytes) -> bytes:
        deadline = time.monotonic() + self.timeout
        rid = self._send(payload)
        self._settle_posted(deadline)
        return self._answer(rid, deadline)

    def _exchange_renewing(self, payload: bytes, reused: bool) -> bytes:
        """`_exchange`; when a kept connection turns out closed by the site (it restarted since),
        once more on a new one, after the posted requests it never answered. Every request is safe
        to repeat (writes and state updates are idempotent, the receive journal refuses a batch
        twice)."""
        try:
            return self._exchange(payload)
        except (OSError, EOFError) as e:
            if not reused or isinstance(e, TimeoutError):
                raise
        unanswered = [(method, again) for _, method, again in self._posted]
        self._drop()
        self._connect()
        for method, again in unanswered:
            self._posted.append((self._send(again), method, again))
        return self._exchange(payload)

    def post(self, method: str, args: dict | None = None, data: bytes = b"") -> None:
        """Send a request without waiting for its answer (read before the next call's answer). For
        updates whose answer nobody waits on; once sent, the site serves it even if this process
        dies at once. ConnectionFailed if it cannot be sent."""
        payload = encode_request(method, args, data)
        with self._lock:
            if self._sock is None:
                self._connect()
            try:
                self._posted.append((self._send(payload), method, payload))
            except (OSError, FormatError) as e:
                self._drop()
                raise _unreachable(self.host, self.port, e) from None

    # -- API
    def call(self, method: str, args: dict | None = None, data: bytes = b"") -> tuple[dict, bytes]:
        """Run `method` on the site; returns (result, data). RemoteError if the site refused it."""
        payload = encode_request(method, args, data)
        with self._lock:
            reused = self._sock is not None
            if not reused:
                self._connect()
            try:
                answer = self._exchange_renewing(payload, reused)
            except TimeoutError:
                self._drop()
                raise _unreachable(self.host, self.port, f"no answer to {method!r} within {self.timeout}s") from None
            except (OSError, EOFError, FormatError) as e:
                self._drop()
                raise _unreachable(self.host, self.port, e) from None
            except BaseException:  # e.g. KeyboardInterrupt mid-frame: the stream is out of step
                self._drop()
                raise
        return decode_response(answer)

    def close(self) -> None:
        """Close the connection (a later call reconnects)."""
        with self._lock:
            self._drop()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------------------------
# TLS (optional, in addition to the frame MACs)
# --------------------------------------------------------------------------------------------
def make_ssl_contexts(cert: Path, key: Path, ca: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(server context, client context) for mutual TLS: both ends present `cert` and trust `ca`."""
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.minimum_version = ssl.TLSVersion.TLSv1_2
    server.load_cert_chain(str(cert), str(key))
    server.load_verify_locations(str(ca))
    server.verify_mode = ssl.CERT_REQUIRED
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.minimum_version = ssl.TLSVersion.TLSv1_2
    client.load_cert_chain(str(cert), str(key))
    client.load_verify_locations(str(ca))
    return server, client
