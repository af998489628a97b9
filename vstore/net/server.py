"""The asyncio RPC server of a site daemon (DESIGN "Sites and links", "Process model"; SPEC §4):
`serve` answers authenticated requests (frames, handshake and payloads of `vstore.net.wire`).

Keeps true:
- Bad input (garbage, wrong MAC, wrong version, oversized, unexpected type, silent past the
  handshake timeout) closes only that connection, with a `logging.warning` naming the peer and
  the reason, and never reaches the handler; the server keeps serving everyone else.
- What a peer without the lab key can make the server hold is bounded (`ServerLimits`): a HELLO
  claiming more than `MAX_HELLO_PAYLOAD` bytes is refused from its header; at most
  `max_unauthenticated` connections (`max_unauthenticated_per_peer` from one address) are not yet
  authenticated, and a connection over either limit is closed at once, before anything is read;
  the frames such connections announce before their first authenticated request add up to at most
  `max_unauthenticated_bytes`. A connection is authenticated by its first request, sealed with the
  fresh session key; its header must come within `handshake_timeout` of the connection's start.
- At most `max_connections` authenticated connections are served at once: the first request of
  one more is answered with an error naming the limit, and the connection is closed. A connection
  whose peer sends nothing (or reads no answer) for `idle_timeout` seconds is closed.
- Requests on one connection are handled one at a time in arrival order; connections are served
  concurrently. A handler's `TricopyError` comes back to the caller as `RemoteError` with the
  same message; any other exception is logged with its traceback on the server and answered with
  a generic error, never crashing the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import Any

from vstore.blocks.errors import FormatError, TricopyError
from vstore.net.keys import check_key
from vstore.net.wire import (
    DEFAULT_MAX_PAYLOAD,
    MAX_HELLO_PAYLOAD,
    STATUS_ERROR,
    STATUS_INTERNAL,
    STATUS_OK,
    Frame,
    Session,
    decode_request,
    encode_response,
    read_body,
    read_header,
    read_raw_frame,
    server_accept,
)

log = logging.getLogger(__name__)

DEFAULT_HANDSHAKE_TIMEOUT = 10.0
READER_LIMIT = 64 * 1024  # what a connection's stream buffers ahead of the frame being read (x2 + one read)

Handler = Callable[[str, dict, bytes], Awaitable[tuple[dict, bytes]]]


@dataclass(frozen=True)
class ServerLimits:
    """What one server holds for its peers (topology.toml `[limits]`; the defaults are safe)."""

    max_unauthenticated: int = 64
    max_unauthenticated_per_peer: int = 16
    max_unauthenticated_bytes: int = 2 * DEFAULT_MAX_PAYLOAD
    max_connections: int = 128
    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT
    idle_timeout: float = 600.0

    def to_dict(self) -> dict:
        return asdict(self)


class _Refused(FormatError):
    """A connection over one of the server's limits."""


class _Gate:
    """The counts behind `ServerLimits`, for one server (one event loop: no lock needed)."""

    def __init__(self, limits: ServerLimits) -> None:
        self.limits = limits
        self.unauthenticated: Counter[str] = Counter()
        self.unauthenticated_bytes = 0
        self.authenticated = 0

    def admit(self, host: str) -> None:
        lim = self.limits
        if sum(self.unauthenticated.values()) >= lim.max_unauthenticated:
            raise _Refused(f"{lim.max_unauthenticated} connections are already not authenticated "
                           "(limits.max_unauthenticated)")
        if self.unauthenticated[host] >= lim.max_unauthenticated_per_peer:
            raise _Refused(f"{lim.max_unauthenticated_per_peer} connections from {host} are already not "
                           "authenticated (limits.max_unauthenticated_per_peer)")
        self.unauthenticated[host] += 1

    def leave_unauthenticated(self, host: str) -> None:
        self.unauthenticated[host] -= 1
        if self.unauthenticated[host] <= 0:
            del self.unauthenticated[host]

    def reserve(self, nbytes: int) -> None:
        """Room for a frame an unauthenticated connection announced, or _Refused."""
        if self.unauthenticated_bytes + nbytes > self.limits.max_unauthenticated_bytes:
            raise _Refused(f"its first request announces {nbytes} bytes while unauthenticated connections "
                           f"hold {self.unauthenticated_bytes} of at most {self.limits.max_unauthenticated_bytes} "
                           "(limits.max_unauthenticated_bytes)")
        self.unauthenticated_bytes += nbytes

    def release(self, nbytes: int) -> None:
        self.unauthenticated_bytes -= nbytes


def _peer_address(writer: asyncio.StreamWriter) -> tuple[str, str]:
    """(host, "host:port") of the connection's peer."""
    peer = writer.get_extra_info("peername")
    if isinstance(peer, tuple) and len(peer) >= 2:
        return str(peer[0]), f"{peer[0]}:{peer[1]}"
    return str(peer), str(peer)


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


class _Connection:
    """One client connection: handshake, first (authenticating) request, then requests until idle."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, key: bytes,
                 handler: Handler, max_payload: int, gate: _Gate) -> None:
        self.reader, self.writer, self.key, self.handler = reader, writer, key, handler
        self.max_payload, self.gate, self.limits = max_payload, gate, gate.limits
        self.host, self.peer = _peer_address(writer)
        self.phase = "no handshake"  # what the peer failed to send when a timeout closes the connection

    async def run(self) -> None:
        try:
            self.gate.admit(self.host)
        except _Refused as e:
            log.warning("net: refusing connection from %s: %s", self.peer, e)
            return
        authenticated = False
        try:
            try:
                session, first = await self._authenticate()
            finally:
                self.gate.leave_unauthenticated(self.host)
            if self.gate.authenticated >= self.limits.max_connections:
                await self._refuse_busy(session, first)
                return
            self.gate.authenticated += 1
            authenticated = True
            await self._answer(session, first)
            await self._serve(session)
        except TimeoutError:
            wait = self.limits.handshake_timeout if self.phase == "no handshake" else self.limits.idle_timeout
            log.warning("net: closing connection from %s: %s within %.1fs", self.peer, self.phase, wait)
        except FormatError as e:
            log.warning("net: closing connection from %s: %s", self.peer, e)
        except (ConnectionError, ssl.SSLError, OSError) as e:
            log.info("net: connection from %s lost: %s", self.peer, e)
        except Exception:
            log.exception("net: closing connection from %s after an unexpected error", self.peer)
        finally:
            if authenticated:
                self.gate.authenticated -= 1

    async def _authenticate(self) -> tuple[Session, Frame]:
        """The handshake and the first request's header within the handshake timeout, then that
        request's body (the peer may not pause for longer than the idle timeout), verified."""
        session, head, header = await asyncio.wait_for(self._handshake(), self.limits.handshake_timeout)
        self.phase = "nothing"
        self.gate.reserve(header.length)
        try:
            raw = await read_body(self.reader, head, header, self.limits.idle_timeout)
        finally:
            self.gate.release(header.length)
        return session, session.open(raw)  # the MAC under the fresh session key: this peer has the lab key

    async def _handshake(self) -> tuple[Session, bytes, Any]:
        raw = await read_raw_frame(self.reader, MAX_HELLO_PAYLOAD)
        if raw is None:
            raise FormatError("connection closed before the handshake")
        session, welcome = server_accept(self.key, raw, self.max_payload)
        self.writer.write(welcome)
        await self.writer.drain()
        got = await read_header(self.reader, session.max_payload)
        if got is None:
            raise ConnectionResetError("connection closed after the handshake, before any request")
        return session, *got

    async def _refuse_busy(self, session: Session, first: Frame) -> None:
        limit = self.limits.max_connections
        log.warning("net: refusing connection from %s: %d authenticated connections already (limits.max_connections)",
                    self.peer, limit)
        refusal = encode_response(STATUS_ERROR, {
            "error": f"the site already serves {limit} connections, its limit (limits.max_connections in "
                     "topology.toml); close idle clients or raise the limit", "kind": "TricopyError"})
        await self._send(session.seal(first.request_id, refusal))

    async def _serve(self, session: Session) -> None:
        idle = self.limits.idle_timeout
        while (raw := await read_raw_frame(self.reader, session.max_payload, idle)) is not None:
            await self._answer(session, session.open(raw))

    async def _answer(self, session: Session, frame: Frame) -> None:
        """Answer one verified request frame."""
        request_id = frame.request_id
        method, args, data = decode_request(frame.payload)
        payload = await _call_handler(self.handler, method, args, data, self.peer)
        try:
            reply = session.seal(request_id, payload)
        except TricopyError as e:
            log.warning("net: answer to %r for %s not sendable: %s", method, self.peer, e)
            refusal = encode_response(STATUS_ERROR, {"error": str(e), "kind": "TricopyError"})
            reply = session.seal(request_id, refusal)
        await self._send(reply)

    async def _send(self, frame: bytes) -> None:
        self.writer.write(frame)
        async with asyncio.timeout(self.limits.idle_timeout):  # a peer that reads no answer is idle too
            await self.writer.drain()


async def serve(host: str, port: int, key: bytes, handler: Handler, *, ssl_context: ssl.SSLContext | None = None,
                max_payload: int = DEFAULT_MAX_PAYLOAD, handshake_timeout: float | None = None,
                limits: ServerLimits | None = None) -> asyncio.Server:
    """Listen on host:port (0 = any free port) and answer authenticated RPC requests with `handler`,
    within `limits` (`handshake_timeout`, when given, overrides theirs)."""
    key = check_key(key)
    limits = limits or ServerLimits()
    if handshake_timeout is not None:
        limits = ServerLimits(**{**limits.to_dict(), "handshake_timeout": handshake_timeout})
    gate = _Gate(limits)

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await _Connection(reader, writer, key, handler, max_payload, gate).run()
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    return await asyncio.start_server(on_connect, host, port, ssl=ssl_context, limit=READER_LIMIT,
                                      ssl_handshake_timeout=limits.handshake_timeout if ssl_context else None)


def bound_port(server: asyncio.Server) -> int:
    """The TCP port a server from `serve` listens on (useful with port 0)."""
    return server.sockets[0].getsockname()[1]
