"""RPC clients of a site daemon (DESIGN "Sites and links", "Process model": asyncio daemons with a
thread-safe synchronous facade; SPEC §4): `AsyncClient` (concurrent calls pipelined, for the
shipper's talk with its daemon), `Client` (blocking, for CLI commands; `call_many` pipelines, for
the shipper's batches) and `Peer` (a `Client` opened on first use, for daemons and the CLI).

Keeps true:
- Every connection runs the nonce handshake of `vstore.net.wire` first and then only exchanges
  frames sealed and opened by its `Session` (HMAC-SHA256, exact sequence: replays are refused).
- Callers get `ConnectionFailed` (a `SiteDown`) with "cannot reach site at host:port (...)" when
  the site cannot be reached, the connection breaks or a call times out; a client whose call
  failed that way closes its connection (`Client` and `Peer` reconnect on the next call; a call
  is repeated only by `Client` on a kept connection the site closed since, see
  `_exchange_renewing`).
- A site's refusal comes back as `RemoteError` with the site's message.
- A request's data goes out as it was given: `Client` sends header, payload pieces and MAC with
  one `socket.sendmsg` (under TLS, one write each), never joined; answers are received into one
  buffer per frame (`recv_into`); the data a call returns is that frame's data as `bytes`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator

from vstore.blocks.errors import FormatError
from vstore.net.keys import check_key
from vstore.net.wire import (
    DEFAULT_MAX_PAYLOAD,
    HEADER_SIZE,
    MAC_SIZE,
    AuthError,
    Buffer,
    ConnectionFailed,
    HandshakeFailed,
    RemoteError,
    Session,
    client_finish,
    client_hello,
    decode_response,
    parse_header,
    read_raw_frame,
    request_parts,
)

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 10.0
DEFAULT_WINDOW = 8
_IOV_MAX = 1024  # buffers one sendmsg takes at most (Linux's UIO_MAXIOV)


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
        key = check_key(key)
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
        raw = await read_raw_frame(reader, max_payload)
        if raw is None:
            raise EOFError("the site closed the connection")
        return client_finish(key, nonce, raw, max_payload)

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
            while (raw := await read_raw_frame(self._reader, self._session.max_payload)) is not None:
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

    async def _send(self, method: str, args: dict | None, data: Buffer) -> asyncio.Future[bytes]:
        """Send one request now; returns a future of the raw response payload."""
        if self._failure is not None:
            raise ConnectionFailed(*self._failure.args)
        payload = request_parts(method, args, data)
        async with self._send_lock:
            rid = self._next_id
            self._next_id = rid % 0xFFFFFFFF + 1
            fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
            self._pending[rid] = fut
            try:
                self._writer.writelines(self._session.seal_parts(rid, payload))
                await self._writer.drain()
            except (OSError, ssl.SSLError) as e:
                raise self._fail(e) from None
        return fut

    async def _await(self, fut: asyncio.Future[bytes], method: str, timeout: float | None) -> tuple[dict, bytes]:
        try:
            payload = await asyncio.wait_for(asyncio.shield(fut), timeout)
        except TimeoutError:
            raise self._fail(f"no answer to {method!r} within {timeout}s") from None
        meta, out = decode_response(payload)
        return meta, bytes(out)

    async def call(self, method: str, args: dict | None = None, data: Buffer = b"", *,
                   timeout: float | None = None) -> tuple[dict, bytes]:
        """Run `method` on the site; returns (result, data). RemoteError if the site refused it.

        Concurrent calls are pipelined on the connection, at most `window` in flight; `timeout`
        (default: the client's) bounds the wait for the answer, after which the client is closed.
        """
        async with self._window:
            fut = await self._send(method, args, data)
            return await self._await(fut, method, self.timeout if timeout is None else timeout)

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
        self._key = check_key(key)
        self._ssl = ssl_context
        self.timeout = timeout
        self.max_payload = max_payload
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._session: Session | None = None
        self._next_id = 1
        self._posted: deque[tuple[int, str, list[Buffer]]] = deque()  # (request id, method, payload) unanswered
        with self._lock:
            self._connect()

    # -- plumbing
    def _recv_into(self, view: memoryview, deadline: float) -> None:
        assert self._sock is not None
        while view:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("timed out")
            self._sock.settimeout(remaining)
            n = self._sock.recv_into(view)
            if not n:
                raise EOFError("connection closed by the site")
            view = view[n:]

    def _read_raw(self, deadline: float) -> bytearray:
        """One frame, received into its own buffer (the header checked before the rest is read)."""
        head = bytearray(HEADER_SIZE)
        self._recv_into(memoryview(head), deadline)
        header = parse_header(head, self.max_payload)
        frame = bytearray(HEADER_SIZE + header.length + MAC_SIZE)
        frame[:HEADER_SIZE] = head
        self._recv_into(memoryview(frame)[HEADER_SIZE:], deadline)
        return frame

    def _send_parts(self, parts: list[Buffer]) -> None:
        """Send the buffers in order: one sendmsg per kernel send, no joined copy."""
        assert self._sock is not None
        if isinstance(self._sock, ssl.SSLSocket):  # no sendmsg under TLS: one write per piece
            for part in parts:
                self._sock.sendall(part)
            return
        views = [memoryview(p).cast("B") for p in parts if len(p)]
        while views:
            sent = self._sock.sendmsg(views[:_IOV_MAX])
            while sent and views:
                if sent >= len(views[0]):
                    sent -= len(views[0])
                    views.pop(0)
                else:
                    views[0] = views[0][sent:]
                    sent = 0

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

    def _send(self, payload: list[Buffer]) -> int:
        assert self._sock is not None and self._session is not None
        rid = self._next_id
        self._next_id = rid % 0xFFFFFFFF + 1
        self._sock.settimeout(self.timeout)
        self._send_parts(self._session.seal_parts(rid, payload))
        return rid

    def _answer(self, rid: int, deadline: float) -> Buffer:
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

    def _exchange(self, payload: list[Buffer]) -> Buffer:
        deadline = time.monotonic() + self.timeout
        rid = self._send(payload)
        self._settle_posted(deadline)
        return self._answer(rid, deadline)

    def _exchange_renewing(self, payload: list[Buffer], reused: bool) -> Buffer:
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

    def post(self, method: str, args: dict | None = None, data: Buffer = b"") -> None:
        """Send a request without waiting for its answer (read before the next call's answer). For
        updates whose answer nobody waits on; once sent, the site serves it even if this process
        dies at once. ConnectionFailed if it cannot be sent."""
        payload = request_parts(method, args, data)
        with self._lock:
            if self._sock is None:
                self._connect()
            try:
                self._posted.append((self._send(payload), method, payload))
            except (OSError, FormatError) as e:
                self._drop()
                raise _unreachable(self.host, self.port, e) from None

    @contextlib.contextmanager
    def _guarded(self, what: str) -> Iterator[bool]:
        """Under the lock and connected (yields whether the connection was kept from before); a
        broken link or a timeout drops the connection and becomes ConnectionFailed."""
        with self._lock:
            reused = self._sock is not None
            if not reused:
                self._connect()
            try:
                yield reused
            except TimeoutError:
                self._drop()
                raise _unreachable(self.host, self.port, f"no answer to {what} within {self.timeout}s") from None
            except (OSError, EOFError, FormatError) as e:
                self._drop()
                raise _unreachable(self.host, self.port, e) from None
            except BaseException:  # e.g. KeyboardInterrupt mid-frame: the stream is out of step
                self._drop()
                raise

    def _settle_one(self, rid: int, results: list[tuple[dict, bytes]]) -> RemoteError | None:
        try:
            meta, out = decode_response(self._answer(rid, time.monotonic() + self.timeout))
        except RemoteError as e:
            return e
        results.append((meta, bytes(out)))
        return None

    # -- API
    def call_many(self, calls: Iterable[tuple[str, dict | None, Buffer | list[Buffer]]],
                  window: int = DEFAULT_WINDOW) -> list[tuple[dict, bytes]]:
        """Send calls in order with at most `window` unanswered (the site answers in order and works
        on one while the next is on its way); returns their results in order. On the first refusal
        no further call is sent, those in flight are read, then it is raised."""
        results: list[tuple[dict, bytes]] = []
        failure: RemoteError | None = None
        in_flight: deque[int] = deque()
        with self._guarded("a pipelined call"):
            self._settle_posted(time.monotonic() + self.timeout)
            for method, args, data in calls:
                while in_flight and (len(in_flight) >= window or failure is not None):
                    failure = self._settle_one(in_flight.popleft(), results) or failure
                if failure is not None:
                    break
                in_flight.append(self._send(request_parts(method, args, data)))
            while in_flight:
                failure = self._settle_one(in_flight.popleft(), results) or failure
        if failure is not None:
            raise failure
        return results

    def call(self, method: str, args: dict | None = None, data: Buffer = b"") -> tuple[dict, bytes]:
        """Run `method` on the site; returns (result, data). RemoteError if the site refused it."""
        payload = request_parts(method, args, data)
        with self._guarded(repr(method)) as reused:
            answer = self._exchange_renewing(payload, reused)
        meta, out = decode_response(answer)
        return meta, bytes(out)

    def close(self) -> None:
        """Close the connection (a later call reconnects)."""
        with self._lock:
            self._drop()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------------------------
# A client opened on first use
# --------------------------------------------------------------------------------------------
class Peer:
    """An RPC client that connects on first use (a daemon may start before its peers) and again
    after a failed call; calls are never retried.

    `app_info`: the `app.info` answer (volume 0) this very daemon gave just before, when the
    caller that made this peer had it (`vstore.daemons.processes.coordinator`); None otherwise.
    """

    def __init__(self, host: str, port: int, key: bytes, *, timeout: float = DEFAULT_TIMEOUT,
                 ssl_context: ssl.SSLContext | None = None, app_info: dict | None = None) -> None:
        self.host, self.port, self.key, self.timeout = host, port, key, timeout
        self.ssl_context = ssl_context
        self.app_info = app_info
        self._client: Client | None = None
        self._lock = threading.Lock()

    def _connected(self) -> Client:
        with self._lock:
            if self._client is None:
                self._client = Client(self.host, self.port, self.key, timeout=self.timeout,
                                      ssl_context=self.ssl_context)
            return self._client

    def call(self, method: str, args: dict | None = None, data: Buffer = b"") -> tuple[dict, bytes]:
        """`Client.call`, connecting first if needed."""
        return self._connected().call(method, args, data)

    def post(self, method: str, args: dict | None = None, data: Buffer = b"") -> None:
        """Send without waiting for the answer (`Client.post`), connecting first if needed."""
        self._connected().post(method, args, data)

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None

    def __enter__(self) -> Peer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
