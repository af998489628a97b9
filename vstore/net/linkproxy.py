"""A TCP proxy placed on a link between sites (127.0.0.1 only) that adds delay, limits bandwidth, drops or
cuts the connection on command; `topology.toml` can route a link through it (`[links.primary-sync]
via = "127.0.0.1:P"`; DESIGN "Sites and links", "Tools"). The fault proxy of `tools/faults/proxy.py` and
the far link of `vstore demo` are this one relay.

Keeps true:
- It listens and forwards only on loopback addresses (127.0.0.0/8, ::1, "localhost"); anything else is
  refused with a `ProxyError` before a socket is opened.
- Bytes are forwarded in order in each direction of each connection. Each direction is a link: bytes
  read are transmitted at `bandwidth` bytes/s (a token bucket with a `BURST` allowance; None:
  unlimited; settable while running, it applies to what is not yet transmitted), then spend
  `delay_ms` on the wire and are written out.
- At most about `wire_bytes` per direction are read and not yet written out; beyond that the proxy
  stops reading, so TCP pushes back on the sender as a full link would (with a delay, throughput is
  therefore at most about `wire_bytes` per `delay_ms`, as with a TCP window).
- `drop()` black-holes the link: connections stay open, bytes read are discarded (counted in
  `bytes_dropped`). `cut()` resets every current connection and resets new ones at once.
  `sever()` is the loss of the connecting side's site: bytes from it not yet transmitted are
  discarded, and so is whatever it still sends (a dead host's kernel may still flush), while bytes
  already on the wire arrive; new connections are reset. `restore()` ends drop, cut and sever
  (delay and bandwidth stay as set).
- `stats()` counts bytes written towards the target (`bytes_up`) and back (`bytes_down`); `idle()`
  is true when no byte read is waiting to be written out, and `drain(timeout)` waits for that.

`ProxyCore` lives on one asyncio event loop; `LinkProxy` runs one on its own loop in a daemon
thread, so synchronous code (tests, the demo, benchmarks) can drive it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

from vstore.blocks.errors import TricopyError

CHUNK = 64 * 1024  # bytes read at once
BURST = 16 * 1024  # bytes a bandwidth-limited direction may send at once after an idle spell
WIRE_BYTES = 256 * 1024  # bytes per direction read and not yet written out before reading stops
PACE_STEPS_PER_S = 20  # a limited direction transmits pieces of at most bandwidth / this bytes


class ProxyError(TricopyError):
    """A proxy address that is not loopback, or a proxy that cannot start."""


def check_loopback(address: tuple[str, int], what: str) -> tuple[str, int]:
    """Return `address` if its host is a loopback address; ProxyError otherwise."""
    host, port = address
    if host != "localhost":
        try:
            ok = ipaddress.ip_address(host).is_loopback
        except ValueError:
            ok = False
        if not ok:
            raise ProxyError(f"{what} address {host}:{port} is not loopback; the fault proxy only "
                             "works on 127.0.0.1 (or ::1)")
    if not 0 <= int(port) <= 65535:
        raise ProxyError(f"{what} port {port} is not a TCP port")
    return host, int(port)


def parse_address(text: str, what: str) -> tuple[str, int]:
    """'127.0.0.1:5000' -> ('127.0.0.1', 5000), loopback only."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise ProxyError(f"{what} address {text!r} must look like 127.0.0.1:PORT")
    return check_loopback((host.strip("[]"), int(port)), what)


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close a connection abruptly (RST), as a cut link would look to the peer."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class _Direction:
    """One direction of one connection: read -> transmit (bandwidth) -> wire (delay) -> write out."""

    def __init__(self, core: ProxyCore, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 name: str) -> None:
        self.core, self.reader, self.writer, self.name = core, reader, writer, name
        self.wire: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()
        self.queued = 0  # bytes read and not yet written out (or discarded)
        self.room = asyncio.Event()
        self.room.set()
        self.broken = False  # the destination is gone
        self.tokens, self.refilled = float(BURST), time.monotonic()

    def _account(self, n: int) -> None:
        self.queued += n
        if self.queued < self.core.wire_bytes:
            self.room.set()
        else:
            self.room.clear()

    def _discarding(self) -> bool:
        return self.core.dropping or self.broken or (self.name == "up" and self.core.severed)

    async def pump(self) -> None:
        """Read, transmit at the bandwidth, put on the wire; discard while the link drops or is severed."""
        try:
            while True:
                await self.room.wait()
                chunk = await self.reader.read(CHUNK)
                if not chunk:
                    break
                if self._discarding():
                    self.core.counters["bytes_dropped"] += len(chunk)
                    continue
                self._account(len(chunk))
                await self._transmit(chunk)
        except OSError:
            pass
        finally:
            self.wire.put_nowait(None)

    async def _transmit(self, chunk: bytes) -> None:
        pos = 0
        while pos < len(chunk):
            bps = self.core.bandwidth
            size = len(chunk) - pos
            if bps is not None:
                size = min(size, BURST, max(1, bps // PACE_STEPS_PER_S))
                await self._pace(size, bps)
            if self._discarding():  # severed or dropped while this piece waited for its turn
                self.core.counters["bytes_dropped"] += len(chunk) - pos
                self._account(pos - len(chunk))
                return
            self.wire.put_nowait((time.monotonic() + self.core.delay_ms / 1000, chunk[pos:pos + size]))
            pos += size

    async def _pace(self, n: int, bps: int) -> None:
        """Token bucket: BURST bytes at once, `bps` bytes/s sustained (n <= BURST)."""
        now = time.monotonic()
        self.tokens = min(float(BURST), self.tokens + (now - self.refilled) * bps)
        self.refilled = now
        if self.tokens < n:
            await asyncio.sleep((n - self.tokens) / bps)
            self.tokens, self.refilled = float(n), time.monotonic()
        self.tokens -= n

    async def deliver(self) -> None:
        """Write each piece out when its time on the wire is over; then pass the end of the stream on."""
        while (item := await self.wire.get()) is not None:
            due, piece = item
            if not self.broken:
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                try:
                    self.writer.write(piece)
                    await self.writer.drain()
                    self.core.counters[f"bytes_{self.name}"] += len(piece)
                except OSError:
                    self.broken = True  # nobody to write to any more: the rest only counts as done
            self._account(-len(piece))
        if not self.broken:
            with contextlib.suppress(OSError):
                self.writer.write_eof()


class ProxyCore:
    """The proxy itself, living on one event loop (use `LinkProxy` from synchronous code)."""

    def __init__(self, listen: tuple[str, int], target: tuple[str, int], *, delay_ms: float = 0.0,
                 bandwidth: int | None = None, wire_bytes: int = WIRE_BYTES) -> None:
        self.listen = check_loopback(listen, "listen")
        self.target = check_loopback(target, "target")
        self.delay_ms = 0.0
        self.bandwidth: int | None = None
        self.set_delay(delay_ms)
        self.set_bandwidth(bandwidth)
        if wire_bytes < 1:
            raise ProxyError(f"wire_bytes {wire_bytes} must be positive")
        self.wire_bytes = wire_bytes
        self.dropping = self.cutting = self.severed = False
        self.counters = {"connections": 0, "refused": 0, "bytes_up": 0, "bytes_down": 0, "bytes_dropped": 0}
        self._conns: dict[asyncio.Task, tuple[asyncio.StreamWriter, ...]] = {}
        self._directions: set[_Direction] = set()
        self._server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        assert self._server is not None, "proxy not started"
        return self._server.sockets[0].getsockname()[1]

    async def start(self) -> None:
        host, port = self.listen
        sock: socket.socket | None = None
        try:
            family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
            sock = socket.socket(family, kind, proto)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
            sock.listen(100)
        except OSError as e:
            if sock is not None:
                sock.close()
            raise ProxyError(f"cannot listen on {host}:{port} ({e.strerror or e})") from None
        self._server = await asyncio.start_server(self._on_client, sock=sock)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        self._close_all()
        for task in list(self._conns):
            with contextlib.suppress(BaseException):
                await task

    # -- faults (call on the proxy's loop)
    def set_delay(self, ms: float) -> None:
        if ms < 0:
            raise ProxyError(f"delay {ms} ms is negative")
        self.delay_ms = float(ms)

    def set_bandwidth(self, bps: int | None) -> None:
        if bps is not None and bps <= 0:
            raise ProxyError(f"bandwidth {bps} bytes/s must be positive (or None for unlimited)")
        self.bandwidth = None if bps is None else int(bps)

    def drop(self) -> None:
        self.dropping = True

    def cut(self) -> None:
        self.cutting = True
        self._close_all()

    def sever(self) -> None:
        self.severed = True

    def restore(self) -> None:
        self.dropping = self.cutting = self.severed = False

    def idle(self) -> bool:
        return all(d.queued == 0 for d in self._directions)

    async def wait_idle(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not self.idle() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        return self.idle()

    def stats(self) -> dict[str, Any]:
        mode = "cut" if self.cutting else "sever" if self.severed else "drop" if self.dropping else "forward"
        return {"mode": mode, "delay_ms": self.delay_ms, "bandwidth": self.bandwidth,
                "open_connections": len(self._conns), "bytes_queued": sum(d.queued for d in self._directions),
                **self.counters}

    # -- connections
    def _close_all(self) -> None:
        for task, writers in list(self._conns.items()):
            for w in writers:
                _reset(w)
            task.cancel()

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.cutting or self.severed:
            self.counters["refused"] += 1
            _reset(writer)
            return
        try:
            t_reader, t_writer = await asyncio.open_connection(*self.target)
        except OSError:
            self.counters["refused"] += 1
            _reset(writer)
            return
        task = asyncio.current_task()
        assert task is not None
        self._conns[task] = (writer, t_writer)
        self.counters["connections"] += 1
        directions = (_Direction(self, reader, t_writer, "up"), _Direction(self, t_reader, writer, "down"))
        self._directions.update(directions)
        tasks = [asyncio.create_task(step()) for d in directions for step in (d.pump, d.deliver)]
        try:
            await asyncio.gather(*tasks)
        except (asyncio.CancelledError, OSError):
            pass
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._directions.difference_update(directions)
            self._conns.pop(task, None)
            for w in (writer, t_writer):
                w.close()


class LinkProxy:
    """A `ProxyCore` on its own event loop in a daemon thread; every method is thread-safe."""

    def __init__(self, listen: tuple[str, int] = ("127.0.0.1", 0), target: tuple[str, int] = ("127.0.0.1", 0),
                 *, delay_ms: float = 0.0, bandwidth: int | None = None, wire_bytes: int = WIRE_BYTES) -> None:
        self._core = ProxyCore(listen, target, delay_ms=delay_ms, bandwidth=bandwidth, wire_bytes=wire_bytes)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> LinkProxy:
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(target=loop.run_forever, name="link-proxy", daemon=True)
        self._thread.start()
        try:
            asyncio.run_coroutine_threadsafe(self._core.start(), loop).result(timeout=10)
        except BaseException:
            self._shutdown_loop()
            raise
        return self

    def stop(self) -> None:
        if self._loop is None:
            return
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self._core.stop(), self._loop).result(timeout=10)
        self._shutdown_loop()

    def _shutdown_loop(self) -> None:
        assert self._loop is not None and self._thread is not None
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()
        self._loop = self._thread = None

    def _run(self, fn: Callable[[], Any]) -> Any:
        if self._loop is None:
            raise ProxyError("the link proxy is not running; call start() first")

        async def on_loop() -> Any:
            return fn()

        return asyncio.run_coroutine_threadsafe(on_loop(), self._loop).result(timeout=10)

    @property
    def port(self) -> int:
        return self._core.port

    def set_delay(self, ms: float) -> None:
        self._run(lambda: self._core.set_delay(ms))

    def set_bandwidth(self, bps: int | None) -> None:
        self._run(lambda: self._core.set_bandwidth(bps))

    def drop(self) -> None:
        self._run(self._core.drop)

    def cut(self) -> None:
        self._run(self._core.cut)

    def sever(self) -> None:
        self._run(self._core.sever)

    def restore(self) -> None:
        self._run(self._core.restore)

    def stats(self) -> dict[str, Any]:
        return self._run(self._core.stats)

    def idle(self) -> bool:
        return self._run(self._core.idle)

    def drain(self, timeout: float) -> bool:
        """Wait until every byte read has been written out (or `timeout`); True if it was."""
        if self._loop is None:
            raise ProxyError("the link proxy is not running; call start() first")
        return asyncio.run_coroutine_threadsafe(self._core.wait_idle(timeout), self._loop).result(timeout + 10)

    def __enter__(self) -> LinkProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
