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
- A connection reads each frame straight into that frame's own buffer (`FrameCutter` under an
  `asyncio.BufferedProtocol`): nothing is read ahead of the frame being handled (but the one
  frame after a large request, below), so a peer's bytes wait in the kernel, never in this
  process, and a payload is never copied on its way in.
- Requests on one connection are handled one at a time in arrival order; connections are served
  concurrently. While a large request (`READ_AHEAD_BYTES`) is handled, the connection's next frame
  is received (at most one frame ahead: a connection holds at most two frames). A handler's
  `TricopyError` comes back to the caller as `RemoteError` with the same message; any other
  exception is logged with its traceback on the server and answered with a generic error, never
  crashing the server.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import sys
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass

from vstore.blocks.errors import FormatError, TricopyError
from vstore.net.keys import check_key
from vstore.net.wire import (
    DEFAULT_MAX_PAYLOAD,
    HEADER_SIZE,
    MAC_SIZE,
    MAX_HELLO_PAYLOAD,
    STATUS_ERROR,
    STATUS_INTERNAL,
    STATUS_OK,
    Buffer,
    Frame,
    FrameHeader,
    Session,
    decode_request,
    parse_header,
    response_parts,
    server_accept,
)

log = logging.getLogger(__name__)

DEFAULT_HANDSHAKE_TIMEOUT = 10.0
JOIN_BYTES = 16 << 10  # an answer up to this size is sent joined (a copy costs less than the sends)
READ_AHEAD_BYTES = 256 << 10  # a request this large is answered while the next frame is received

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


def _peer_address(transport: asyncio.BaseTransport) -> tuple[str, str]:
    """(host, "host:port") of the connection's peer."""
    peer = transport.get_extra_info("peername")
    if isinstance(peer, tuple) and len(peer) >= 2:
        return str(peer[0]), f"{peer[0]}:{peer[1]}"
    return str(peer), str(peer)


async def _call_handler(handler: Handler, method: str, args: dict, data: Buffer, peer: str) -> list[Buffer]:
    """Run the handler and encode its answer; never raises (errors become error responses)."""
    try:
        result, out = await handler(method, args, data)  # type: ignore[arg-type]
        return response_parts(STATUS_OK, result, out)
    except TricopyError as e:
        return response_parts(STATUS_ERROR, {"error": str(e), "kind": type(e).__name__})
    except Exception:
        log.exception("net: handler failed on %r from %s", method, peer)
        return response_parts(STATUS_INTERNAL, {
            "error": f"the site failed internally on {method!r} (see the site's log)", "kind": "internal"})


class FrameCutter:
    """The receiving end's frame boundaries. `buffer()` is where the next received bytes go: the
    rest of the header, then the rest of the frame's own bytearray; `filled(n)` says n bytes
    arrived there. A whole header is checked at once (`parse_header` against `limit`) and then
    waits (`waiting`): its frame is allocated only by `begin_body()`, so the caller decides
    whether it may hold that much (or at once, once `admitted`: an authenticated peer's frames
    within the checked limit). `take()` returns the whole frame and starts the next."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.admitted = False  # every checked header is admitted at once (an authenticated peer's)
        self.spare: bytearray | None = None  # a large frame's buffer nothing refers to any more, for the next
        self._head = bytearray(HEADER_SIZE)
        self.header: FrameHeader | None = None
        self._frame: bytearray | None = None
        self._got = 0

    @property
    def started(self) -> bool:
        """Some bytes of the next frame arrived."""
        return self._got > 0

    @property
    def begun(self) -> bool:
        """The frame of the checked header is allocated (being received)."""
        return self._frame is not None

    @property
    def done(self) -> bool:
        return self._frame is not None and self._got == len(self._frame)

    @property
    def waiting(self) -> bool:
        """Nothing more can be received before `begin_body()` or `take()`."""
        return self.header is not None and (self._frame is None or self.done)

    def buffer(self) -> memoryview:
        return memoryview(self._head if self._frame is None else self._frame)[self._got:]

    def filled(self, n: int) -> None:
        self._got += n
        if self._frame is None and self._got == HEADER_SIZE:
            self.header = parse_header(self._head, self.limit)
            if self.admitted:
                self.begin_body()

    def begin_body(self) -> None:
        assert self.header is not None and self._frame is None
        size = HEADER_SIZE + self.header.length + MAC_SIZE
        spare, self.spare = self.spare, None
        self._frame = spare if spare is not None and len(spare) == size else bytearray(size)
        self._frame[:HEADER_SIZE] = self._head

    def give_back(self, frame: bytearray) -> None:
        """`frame` (a large one) is answered: kept for the next frame of its size, unless anything
        (a view of it) still refers to it besides the caller's one name."""
        if len(frame) >= READ_AHEAD_BYTES and sys.getrefcount(frame) <= 3:  # the caller's, ours, getrefcount's
            self.spare = frame

    def take(self) -> bytearray:
        assert self._frame is not None and self.done
        frame, self._frame, self.header, self._got = self._frame, None, None, 0
        return frame


class _FrameStream(asyncio.BufferedProtocol):
    """One connection's bytes, received into the buffers of a `FrameCutter`: reading pauses
    whenever the cutter waits for the connection (a header to admit, a frame to take), so nothing
    is read ahead. Writes wait (`send`) while the transport's buffer is over its high-water mark."""

    def __init__(self, on_connect: Callable[[_FrameStream], Awaitable[None]]) -> None:
        self.cutter = FrameCutter(MAX_HELLO_PAYLOAD)
        self.transport: asyncio.Transport | None = None
        self._on_connect = on_connect
        self._loop = asyncio.get_running_loop()
        self._wake: asyncio.Future[None] | None = None
        self._error: Exception | None = None
        self._eof = False
        self._received = 0  # bytes so far: progress for the idle timeout
        self._can_write = asyncio.Event()
        self._can_write.set()
        self.task: asyncio.Task | None = None

    # -- protocol callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.task = self._loop.create_task(self._on_connect(self))

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.cutter.buffer()

    def buffer_updated(self, nbytes: int) -> None:
        self._received += nbytes
        try:
            self.cutter.filled(nbytes)
        except FormatError as e:
            self._error = e
        if self._error is not None or self.cutter.waiting:
            self._pause()
        self._notify()

    def eof_received(self) -> bool:
        self._eof = True
        self._notify()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._eof = True
        if exc is not None and self._error is None:
            self._error = exc
        self._can_write.set()
        self._notify()

    def pause_writing(self) -> None:
        self._can_write.clear()

    def resume_writing(self) -> None:
        self._can_write.set()

    # -- for the connection's task
    def _pause(self) -> None:
        if self.transport is not None and self.transport.is_reading():
            self.transport.pause_reading()

    def _notify(self) -> None:
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)

    async def _until(self, ready: Callable[[], bool], idle: float | None) -> bool:
        """Wait (reading) until `ready()`; False at a clean end of stream before any byte of a frame.
        TimeoutError when no byte arrives for `idle` seconds."""
        while not ready():
            if self._error is not None:
                raise self._error
            if self._eof:
                if not self.cutter.started:
                    return False
                raise FormatError("truncated network frame (end of stream inside a frame)")
            wake = self._wake = self._loop.create_future()
            assert self.transport is not None
            if not self.transport.is_reading() and not self.transport.is_closing():
                self.transport.resume_reading()
            seen = self._received
            timer = None if idle is None else self._loop.call_later(idle, self._idle, wake)
            try:
                await wake  # one future, woken by the protocol callbacks (or `_idle`)
            except TimeoutError:
                if self._received == seen:
                    raise
            finally:
                if timer is not None:
                    timer.cancel()
        return True

    @staticmethod
    def _idle(wake: asyncio.Future[None]) -> None:
        if not wake.done():
            wake.set_exception(TimeoutError())

    async def header(self, limit: int, idle: float | None = None) -> FrameHeader | None:
        """The next frame's header, checked against `limit`; None at a clean end of stream."""
        self.cutter.limit = limit
        if not await self._until(lambda: self.cutter.header is not None, idle):
            return None
        assert self.cutter.header is not None
        return self.cutter.header

    async def body(self, idle: float | None = None) -> bytearray:
        """The whole frame whose header `header` returned, received into its own buffer."""
        if not self.cutter.begun:
            self.cutter.begin_body()
        if not await self._until(lambda: self.cutter.done, idle):
            raise FormatError("truncated network frame (end of stream inside a frame)")
        return self.cutter.take()

    async def frame(self, limit: int, idle: float | None = None) -> bytearray | None:
        return None if await self.header(limit, idle) is None else await self.body(idle)

    async def send(self, parts: list[Buffer], idle: float) -> None:
        assert self.transport is not None
        if self.transport.is_closing():
            raise ConnectionResetError("connection closed")
        if sum(len(p) for p in parts) <= JOIN_BYTES:
            self.transport.write(b"".join(parts))  # one send, one segment, for a small answer
        else:
            for part in parts:
                self.transport.write(part)
        if not self._can_write.is_set():
            async with asyncio.timeout(idle):  # a peer that reads no answer is idle too
                await self._can_write.wait()


class _Connection:
    """One client connection: handshake, first (authenticating) request, then requests until idle."""

    def __init__(self, stream: _FrameStream, key: bytes, handler: Handler, max_payload: int, gate: _Gate) -> None:
        self.stream, self.key, self.handler = stream, key, handler
        self.max_payload, self.gate, self.limits = max_payload, gate, gate.limits
        assert stream.transport is not None
        self.host, self.peer = _peer_address(stream.transport)
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
            self.stream.cutter.admitted = True  # from now on a checked header's frame is received at once
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
        session, header = await asyncio.wait_for(self._handshake(), self.limits.handshake_timeout)
        self.phase = "nothing"
        self.gate.reserve(header.length)
        try:
            raw = await self.stream.body(self.limits.idle_timeout)
        finally:
            self.gate.release(header.length)
        return session, session.open(raw)  # the MAC under the fresh session key: this peer has the lab key

    async def _handshake(self) -> tuple[Session, FrameHeader]:
        raw = await self.stream.frame(MAX_HELLO_PAYLOAD)
        if raw is None:
            raise FormatError("connection closed before the handshake")
        session, welcome = server_accept(self.key, raw, self.max_payload)
        await self.stream.send([welcome], self.limits.idle_timeout)
        header = await self.stream.header(session.max_payload)
        if header is None:
            raise ConnectionResetError("connection closed after the handshake, before any request")
        return session, header

    async def _refuse_busy(self, session: Session, first: Frame) -> None:
        limit = self.limits.max_connections
        log.warning("net: refusing connection from %s: %d authenticated connections already (limits.max_connections)",
                    self.peer, limit)
        refusal = response_parts(STATUS_ERROR, {
            "error": f"the site already serves {limit} connections, its limit (limits.max_connections in "
                     "topology.toml); close idle clients or raise the limit", "kind": "TricopyError"})
        await self.stream.send(session.seal_parts(first.request_id, refusal), self.limits.idle_timeout)

    async def _serve(self, session: Session) -> None:
        """Answer requests in order. While a large request (`READ_AHEAD_BYTES`) is being answered,
        the next frame is received meanwhile (one at most), so a bulk stream's transfer overlaps
        its handling; a quiet peer waiting for a long answer is not idle."""
        idle = self.limits.idle_timeout
        answering: asyncio.Task | None = None
        answered: bytearray | None = None  # the frame `answering` answers
        cutter = self.stream.cutter
        try:
            while True:
                try:
                    raw = await self.stream.frame(session.max_payload, idle)
                except TimeoutError:
                    if answering is None or answering.done():
                        raise
                    await answering  # the peer waits for this answer: not idle
                    answering = None
                    continue
                if raw is None:
                    break
                frame = session.open(raw)
                if answering is not None:
                    await answering
                    answering = None
                    if answered is not None:
                        cutter.give_back(answered)
                        answered = None
                if len(raw) >= READ_AHEAD_BYTES:
                    answering, answered = asyncio.ensure_future(self._answer(session, frame)), raw
                else:
                    await self._answer(session, frame)
                del frame, raw
            if answering is not None:
                await answering
                answering = None
        finally:
            if answering is not None:
                answering.cancel()

    async def _answer(self, session: Session, frame: Frame) -> None:
        """Answer one verified request frame."""
        request_id = frame.request_id
        method, args, data = decode_request(frame.payload)
        payload = await _call_handler(self.handler, method, args, data, self.peer)
        try:
            reply = session.seal_parts(request_id, payload)
        except TricopyError as e:
            log.warning("net: answer to %r for %s not sendable: %s", method, self.peer, e)
            refusal = response_parts(STATUS_ERROR, {"error": str(e), "kind": "TricopyError"})
            reply = session.seal_parts(request_id, refusal)
        await self.stream.send(reply, self.limits.idle_timeout)


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

    async def on_connect(stream: _FrameStream) -> None:
        try:
            await _Connection(stream, key, handler, max_payload, gate).run()
        finally:
            assert stream.transport is not None
            stream.transport.close()

    loop = asyncio.get_running_loop()
    return await loop.create_server(lambda: _FrameStream(on_connect), host, port, ssl=ssl_context,
                                    ssl_handshake_timeout=limits.handshake_timeout if ssl_context else None)


def bound_port(server: asyncio.Server) -> int:
    """The TCP port a server from `serve` listens on (useful with port 0)."""
    return server.sockets[0].getsockname()[1]
