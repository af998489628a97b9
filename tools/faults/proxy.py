"""A TCP fault proxy for loopback links between site daemons (DESIGN "Tools": delay, bandwidth, drop, cut).

Keeps true:
- It listens and forwards only on loopback addresses (127.0.0.0/8, ::1, "localhost"); anything else
  is refused with a `ProxyError` before a socket is opened.
- Bytes are forwarded in order in each direction. A delay holds every chunk `delay_ms` after it
  was read before writing it (so it adds latency without capping throughput); a bandwidth limit
  paces the writes to at most `bandwidth` bytes/s per direction and connection.
- `drop()` black-holes the link: connections stay open, bytes read are discarded (counted in
  stats). `cut()` closes every current connection and resets new ones at once. `restore()`
  ends drop and cut (delay and bandwidth stay as set; set them to 0 / None to clear them).

Use it in-process (`FaultProxy`, running its own event loop in a background thread so synchronous
tests can drive it) or as a command:
    python -m tools.faults.proxy --listen 127.0.0.1:P --target 127.0.0.1:Q [--delay-ms MS]
        [--bandwidth BYTES_PER_S] [--control 127.0.0.1:C]
where the control port takes text lines `delay 30`, `bandwidth 1000000` (or `bandwidth off`),
`drop`, `cut`, `restore`, `stats` and answers one line to each ("ok ..." / "error ..." / JSON).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from vstore.errors import TricopyError

CHUNK = 64 * 1024


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


class _Pipe:
    """One direction of one connection: read chunks, hold them for the delay, pace, write."""

    def __init__(self, proxy: ProxyCore, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 direction: str) -> None:
        self.proxy, self.reader, self.writer, self.direction = proxy, reader, writer, direction
        self.queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()
        self.next_free = 0.0

    async def pump_in(self) -> None:
        try:
            while chunk := await self.reader.read(CHUNK):
                if self.proxy.dropping:
                    self.proxy.counters["bytes_dropped"] += len(chunk)
                    continue
                self.queue.put_nowait((time.monotonic() + self.proxy.delay_ms / 1000, chunk))
        except (OSError, asyncio.IncompleteReadError):
            pass
        self.queue.put_nowait(None)

    async def pump_out(self) -> None:
        while (item := await self.queue.get()) is not None:
            due, chunk = item
            await self._sleep_until(due)
            for piece in self._pieces(chunk):
                await self._pace(len(piece))
                self.writer.write(piece)
                await self.writer.drain()
                self.proxy.counters[f"bytes_{self.direction}"] += len(piece)
        with contextlib.suppress(OSError):
            self.writer.write_eof()

    @staticmethod
    async def _sleep_until(when: float) -> None:
        delay = when - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)

    def _pieces(self, chunk: bytes) -> list[bytes]:
        bps = self.proxy.bandwidth
        size = CHUNK if bps is None else max(1, min(CHUNK, bps // 20))
        return [chunk[i:i + size] for i in range(0, len(chunk), size)]

    async def _pace(self, n: int) -> None:
        bps = self.proxy.bandwidth
        if bps is None:
            return
        start = max(time.monotonic(), self.next_free)
        self.next_free = start + n / bps
        await self._sleep_until(start)


class ProxyCore:
    """The proxy itself, living on one event loop (use `FaultProxy` from synchronous code)."""

    def __init__(self, listen: tuple[str, int], target: tuple[str, int], *, delay_ms: float = 0.0,
                 bandwidth: int | None = None) -> None:
        self.listen = check_loopback(listen, "listen")
        self.target = check_loopback(target, "target")
        self.delay_ms = 0.0
        self.bandwidth: int | None = None
        self.set_delay(delay_ms)
        self.set_bandwidth(bandwidth)
        self.dropping = False
        self.cutting = False
        self.counters = {"connections": 0, "refused": 0, "bytes_up": 0, "bytes_down": 0, "bytes_dropped": 0}
        self._conns: dict[asyncio.Task, tuple[asyncio.StreamWriter, ...]] = {}
        self._server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        assert self._server is not None, "proxy not started"
        return self._server.sockets[0].getsockname()[1]

    async def start(self) -> None:
        try:
            self._server = await asyncio.start_server(self._on_client, *self.listen)
        except OSError as e:
            raise ProxyError(f"fault proxy cannot listen on {self.listen[0]}:{self.listen[1]} ({e})") from None

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

    def restore(self) -> None:
        self.dropping = self.cutting = False

    def stats(self) -> dict[str, Any]:
        mode = "cut" if self.cutting else "drop" if self.dropping else "forward"
        return {"mode": mode, "delay_ms": self.delay_ms, "bandwidth": self.bandwidth,
                "open_connections": len(self._conns), **self.counters}

    # -- connections
    def _close_all(self) -> None:
        for task, writers in list(self._conns.items()):
            for w in writers:
                _reset(w)
            task.cancel()

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.cutting:
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
        try:
            await self._forward(reader, writer, t_reader, t_writer)
        except (asyncio.CancelledError, OSError):
            pass
        finally:
            self._conns.pop(task, None)
            for w in (writer, t_writer):
                w.close()

    async def _forward(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                       t_reader: asyncio.StreamReader, t_writer: asyncio.StreamWriter) -> None:
        up = _Pipe(self, reader, t_writer, "up")
        down = _Pipe(self, t_reader, writer, "down")
        tasks = [asyncio.create_task(coro) for coro in (up.pump_in(), up.pump_out(), down.pump_in(), down.pump_out())]
        try:
            await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


class FaultProxy:
    """A `ProxyCore` on its own event loop in a daemon thread; every method is thread-safe."""

    def __init__(self, listen: tuple[str, int] = ("127.0.0.1", 0), target: tuple[str, int] = ("127.0.0.1", 0),
                 *, delay_ms: float = 0.0, bandwidth: int | None = None) -> None:
        self._core = ProxyCore(listen, target, delay_ms=delay_ms, bandwidth=bandwidth)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> FaultProxy:
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(target=loop.run_forever, name="fault-proxy", daemon=True)
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
            raise ProxyError("the fault proxy is not running; call start() first")

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

    def restore(self) -> None:
        self._run(self._core.restore)

    def stats(self) -> dict[str, Any]:
        return self._run(self._core.stats)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------
def control_command(core: ProxyCore, line: str) -> str:
    """Apply one control line to the proxy and return the one-line answer."""
    words = line.split()
    if not words:
        return "error empty command"
    cmd, args = words[0].lower(), words[1:]
    try:
        if cmd == "delay" and len(args) == 1:
            core.set_delay(float(args[0]))
            return f"ok delay {core.delay_ms:g} ms"
        if cmd == "bandwidth" and len(args) == 1:
            core.set_bandwidth(None if args[0].lower() in ("off", "none", "0") else int(args[0]))
            return f"ok bandwidth {core.bandwidth or 'unlimited'}"
        if cmd in ("drop", "cut", "restore") and not args:
            getattr(core, cmd)()
            return f"ok {cmd}"
        if cmd == "stats" and not args:
            return json.dumps(core.stats(), sort_keys=True)
    except (ValueError, ProxyError) as e:
        return f"error {e}"
    return f"error unknown command {line.strip()!r} (delay MS, bandwidth BPS|off, drop, cut, restore, stats)"


async def _control_client(core: ProxyCore, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while line := await reader.readline():
            writer.write((control_command(core, line.decode(errors="replace")) + "\n").encode())
            await writer.drain()
    except OSError:
        pass
    finally:
        writer.close()


async def _main(args: argparse.Namespace) -> None:
    core = ProxyCore(parse_address(args.listen, "listen"), parse_address(args.target, "target"),
                     delay_ms=args.delay_ms, bandwidth=args.bandwidth)
    await core.start()
    print(f"fault proxy {core.listen[0]}:{core.port} -> {core.target[0]}:{core.target[1]}", flush=True)
    if args.control:
        host, port = parse_address(args.control, "control")
        ctl = await asyncio.start_server(lambda r, w: _control_client(core, r, w), host, port)
        print(f"control on {host}:{ctl.sockets[0].getsockname()[1]}", flush=True)
    await asyncio.Event().wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.faults.proxy", description=__doc__.splitlines()[0])
    parser.add_argument("--listen", required=True, help="127.0.0.1:PORT to accept connections on")
    parser.add_argument("--target", required=True, help="127.0.0.1:PORT to forward to")
    parser.add_argument("--delay-ms", type=float, default=0.0, help="one-way delay added to each chunk")
    parser.add_argument("--bandwidth", type=int, default=None, help="bytes/s per direction and connection")
    parser.add_argument("--control", default=None, help="127.0.0.1:PORT for text control lines")
    args = parser.parse_args(argv)
    try:
        asyncio.run(_main(args))
    except ProxyError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
