"""vstore.net.linkproxy through tools.faults.proxy: forwarding, delay, bandwidth (also changed while running),
drop, cut, sever, restore, the bounded wire (backpressure), idle/drain, loopback only."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import subprocess
import sys
import threading
import time

import pytest

from tests.helpers import HOST, KEY
from tools.faults.proxy import control_command
from vstore.net.client import Client
from vstore.net.linkproxy import BURST, CHUNK, LinkProxy, ProxyCore, ProxyError, parse_address
from vstore.net.server import bound_port, serve
from vstore.net.wire import ConnectionFailed


class TcpServer:
    """A blocking TCP server on a thread, one thread per connection passing what it reads to `received`."""

    def __init__(self) -> None:
        self.sock = socket.create_server((HOST, 0))
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.opened(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            try:
                while data := conn.recv(65536):
                    self.received(conn, data)
            except OSError:
                pass

    def opened(self, conn: socket.socket) -> None:
        """A new connection (called in accept order)."""

    def received(self, conn: socket.socket, data: bytes) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept() on Linux
        except OSError:
            pass
        self.sock.close()
        self.thread.join(timeout=5)


class EchoServer(TcpServer):
    def received(self, conn: socket.socket, data: bytes) -> None:
        conn.sendall(data)


class SinkServer(TcpServer):
    """Keeps every byte received, per connection (in accept order), in `buffers`."""

    def __init__(self) -> None:
        self.buffers: list[bytearray] = []
        self.by_conn: dict[socket.socket, bytearray] = {}
        self.lock = threading.Lock()
        super().__init__()

    def opened(self, conn: socket.socket) -> None:
        with self.lock:
            self.buffers.append(buf := bytearray())
            self.by_conn[conn] = buf

    def received(self, conn: socket.socket, data: bytes) -> None:
        with self.lock:
            self.by_conn[conn] += data

    def total(self) -> int:
        with self.lock:
            return sum(len(b) for b in self.buffers)


class RpcServer:
    """A `serve` site on its own loop thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = asyncio.run_coroutine_threadsafe(serve(HOST, 0, KEY, self.handle), self.loop).result(10)
        self.port = bound_port(self.server)

    async def handle(self, method: str, args: dict, data: bytes) -> tuple[dict, bytes]:
        return {"method": method, "args": args}, data

    def stop(self) -> None:
        async def shutdown() -> None:
            self.server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(shutdown(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


@pytest.fixture
def echo():
    server = EchoServer()
    yield server
    server.stop()


@pytest.fixture
def sink():
    server = SinkServer()
    yield server
    server.stop()


@pytest.fixture
def proxy(echo):
    p = LinkProxy(("127.0.0.1", 0), (HOST, echo.port)).start()
    yield p
    p.stop()


def connect(port: int) -> socket.socket:
    sock = socket.create_connection((HOST, port), timeout=5)
    sock.settimeout(5)
    return sock


def round_trip(sock: socket.socket, data: bytes) -> bytes:
    sock.sendall(data)
    buf = b""
    while len(buf) < len(data):
        chunk = sock.recv(65536)
        if not chunk:
            raise EOFError
        buf += chunk
    return buf


def is_closed(sock: socket.socket) -> bool:
    """True if the peer closed or reset the connection (read returns EOF or an error)."""
    try:
        return sock.recv(1) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


def assert_refused(port: int) -> None:
    """A new connection to the proxy gets nothing through (the connect itself may succeed or be reset)."""
    try:
        refused = connect(port)
    except (ConnectionResetError, ConnectionRefusedError):
        return
    assert is_closed(refused)
    refused.close()


def test_forwarding(proxy):
    """The proxy forwards bytes both ways unchanged and counts them."""
    with connect(proxy.port) as sock:
        for size in (1, 1000, 300_000):
            data = bytes(i % 251 for i in range(size))
            assert round_trip(sock, data) == data
    stats = proxy.stats()
    assert stats["mode"] == "forward" and stats["connections"] == 1
    assert stats["bytes_up"] >= 301_001


def test_rpc_through_proxy():
    """An RPC session works through the proxy."""
    site = RpcServer()
    try:
        with LinkProxy(target=(HOST, site.port)) as p, Client(HOST, p.port, KEY) as c:
            assert c.call("echo", {"a": 1}, b"x" * 100_000) == ({"method": "echo", "args": {"a": 1}}, b"x" * 100_000)
    finally:
        site.stop()


def test_delay_adds_latency(proxy):
    """A delay is added to each direction of a round trip."""
    with connect(proxy.port) as sock:
        round_trip(sock, b"warm")
        proxy.set_delay(50)
        t0 = time.monotonic()
        assert round_trip(sock, b"ping") == b"ping"
        elapsed = time.monotonic() - t0
    assert elapsed >= 2 * 0.050 * 0.9  # one-way delay each way; lower bound only
    assert proxy.stats()["delay_ms"] == 50


def test_delay_preserves_order(proxy):
    """A delayed stream arrives in order."""
    proxy.set_delay(5)
    with connect(proxy.port) as sock:
        data = b"".join(i.to_bytes(4, "big") for i in range(20000))
        assert round_trip(sock, data) == data


def test_bandwidth_limit(proxy):
    """A bandwidth limit holds a transfer to that rate; the limit can be removed."""
    proxy.set_bandwidth(200_000)
    with connect(proxy.port) as sock:
        t0 = time.monotonic()
        data = b"b" * 100_000
        assert round_trip(sock, data) == data
        elapsed = time.monotonic() - t0
    assert elapsed >= 0.4  # 100 kB at 200 kB/s each way; lower bound only
    proxy.set_bandwidth(None)
    assert proxy.stats()["bandwidth"] is None


def test_cut_closes_and_refuses_until_restore(proxy):
    """A cut closes open connections and refuses new ones until restore."""
    sock = connect(proxy.port)
    assert round_trip(sock, b"hi") == b"hi"
    proxy.cut()
    assert is_closed(sock)
    sock.close()
    assert_refused(proxy.port)
    assert proxy.stats()["mode"] == "cut" and proxy.stats()["open_connections"] == 0
    proxy.restore()
    with connect(proxy.port) as again:
        assert round_trip(again, b"back") == b"back"


def test_drop_black_holes_then_restore(proxy):
    """A drop black-holes traffic on a connection it keeps open; after restore the connection works again."""
    sock = connect(proxy.port)
    proxy.drop()
    sock.sendall(b"into the void")
    sock.settimeout(0.3)
    with pytest.raises(TimeoutError):
        sock.recv(100)
    assert not is_closed(sock)  # still open: a black hole, not a close
    assert proxy.stats()["bytes_dropped"] >= len(b"into the void")
    proxy.restore()
    sock.settimeout(5)
    assert round_trip(sock, b"after") == b"after"
    sock.close()


def test_sever_delivers_what_is_on_the_wire_and_loses_the_rest(sink):
    """The connecting site is lost: what it had transmitted still arrives, nothing else ever does."""
    data = bytes(i % 251 for i in range(60_000))
    with LinkProxy(target=(HOST, sink.port), delay_ms=300, bandwidth=20_000) as link:
        sock = connect(link.port)
        sock.sendall(data)
        time.sleep(0.1)  # the burst and a few paced pieces are on the wire, none has arrived yet
        link.sever()
        assert sink.total() == 0
        sock.sendall(b"z" * 10_000)  # what a dead sender's kernel still flushes never arrives
        assert not link.idle()
        assert link.drain(timeout=5)
        time.sleep(0.1)
        got = bytes(sink.buffers[0])
        assert 16_000 <= len(got) <= BURST + 10_000 and got == data[:len(got)]  # the burst, in 1000-byte pieces
        stats = link.stats()
        assert stats["mode"] == "sever" and stats["bytes_up"] == len(got) and stats["bytes_queued"] == 0
        assert stats["bytes_dropped"] == len(data) + 10_000 - len(got)
        assert_refused(link.port)  # new connections too
        link.restore()
        with connect(link.port) as again:
            again.sendall(b"back")
        deadline = time.monotonic() + 5
        while sink.total() < len(got) + 4 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert bytes(sink.buffers[-1]) == b"back"
        sock.close()


def test_the_wire_is_bounded_and_pushes_back(sink):
    """A slow link holds at most about `wire_bytes` per direction; the sender is held back by TCP."""
    wire = 64 << 10
    with LinkProxy(target=(HOST, sink.port), bandwidth=100_000, wire_bytes=wire) as link:
        sock = connect(link.port)

        def send() -> None:
            with contextlib.suppress(OSError):
                sock.sendall(b"w" * (32 << 20))

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        highest = 0
        for _ in range(25):
            time.sleep(0.02)
            highest = max(highest, link.stats()["bytes_queued"])
        assert 0 < highest <= wire + CHUNK
        assert sender.is_alive()  # 32 MiB cannot have left at 100 kB/s
        link.cut()
        sender.join(timeout=5)
        sock.close()


def test_bandwidth_changes_while_running(sink):
    """A bandwidth change applies at once to what is not yet transmitted."""
    with LinkProxy(target=(HOST, sink.port), bandwidth=10_000) as link, connect(link.port) as sock:
        sock.sendall(b"s" * 200_000)  # 20 s at 10 kB/s
        time.sleep(0.3)
        assert sink.total() < 40_000
        link.set_bandwidth(None)  # applies to what is not yet transmitted
        assert link.drain(timeout=5)
        deadline = time.monotonic() + 5
        while sink.total() < 200_000 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert sink.total() == 200_000 and link.stats()["bytes_up"] == 200_000


def test_port_in_use_is_a_proxy_error():
    """Listening on a port in use is a ProxyError naming it."""
    with socket.create_server((HOST, 0)) as busy:
        with pytest.raises(ProxyError, match="cannot listen on"):
            LinkProxy(busy.getsockname(), (HOST, 1)).start()


def test_rpc_drop_times_out_and_restore_recovers():
    """Through a drop or a cut an RPC call fails (times out); after restore the client reconnects."""
    site = RpcServer()
    try:
        with LinkProxy(target=(HOST, site.port)) as p, Client(HOST, p.port, KEY, timeout=0.5) as c:
            assert c.call("echo")[0]["method"] == "echo"
            p.drop()
            with pytest.raises(ConnectionFailed, match="no answer"):
                c.call("echo")
            p.restore()
            assert c.call("echo", {"n": 2})[0]["args"] == {"n": 2}  # reconnects
            p.cut()
            with pytest.raises(ConnectionFailed):
                c.call("echo")
            p.restore()
            assert c.call("echo", {"n": 3})[0]["args"] == {"n": 3}
    finally:
        site.stop()


@pytest.mark.parametrize("listen,target", [
    (("0.0.0.0", 0), (HOST, 1)),
    ((HOST, 0), ("10.1.2.3", 80)),
    ((HOST, 0), ("example.com", 80)),
])
def test_refuses_non_loopback(listen, target):
    """The proxy listens on and forwards to loopback addresses only."""
    with pytest.raises(ProxyError, match="not loopback"):
        LinkProxy(listen, target)


def test_parse_address():
    """Addresses parse as HOST:PORT or [IPv6]:PORT, loopback only."""
    assert parse_address("127.0.0.1:5000", "x") == ("127.0.0.1", 5000)
    assert parse_address("[::1]:7", "x") == ("::1", 7)
    with pytest.raises(ProxyError, match="not loopback"):
        parse_address("192.168.1.1:80", "target")
    with pytest.raises(ProxyError, match="must look like"):
        parse_address("127.0.0.1", "target")


def test_control_commands():
    """Each control command changes the proxy and answers ok; a bad one answers error."""
    core = ProxyCore((HOST, 0), (HOST, 1))
    assert control_command(core, "delay 30") == "ok delay 30 ms" and core.delay_ms == 30
    assert control_command(core, "bandwidth 1000000") == "ok bandwidth 1000000"
    assert control_command(core, "bandwidth off") == "ok bandwidth unlimited"
    assert control_command(core, "drop") == "ok drop" and core.dropping
    assert json.loads(control_command(core, "stats"))["mode"] == "drop"
    assert control_command(core, "restore") == "ok restore" and not core.dropping
    assert control_command(core, "sever") == "ok sever"
    assert json.loads(control_command(core, "stats"))["mode"] == "sever"
    assert control_command(core, "restore") == "ok restore" and not core.severed
    assert control_command(core, "delay -1").startswith("error")
    assert control_command(core, "explode").startswith("error unknown command")


def test_cli_with_control_port(echo):
    """The proxy program forwards data and obeys commands on its control port."""
    ports = []
    for _ in range(2):
        with socket.socket() as s:
            s.bind((HOST, 0))
            ports.append(s.getsockname()[1])
    listen, control = ports
    proc = subprocess.Popen([sys.executable, "-m", "tools.faults.proxy", "--listen", f"{HOST}:{listen}",
                             "--target", f"{HOST}:{echo.port}", "--control", f"{HOST}:{control}"],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith("fault proxy")
        assert proc.stdout.readline().startswith("control on")
        with connect(listen) as data_sock, connect(control) as ctl:
            assert round_trip(data_sock, b"x") == b"x"
            f = ctl.makefile("rw")
            f.write("delay 20\ncut\nstats\n")
            f.flush()
            assert f.readline().strip() == "ok delay 20 ms"
            assert f.readline().strip() == "ok cut"
            assert json.loads(f.readline())["mode"] == "cut"
            assert is_closed(data_sock)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_cli_refuses_non_loopback():
    """The proxy program refuses a non-loopback address with exit 2."""
    out = subprocess.run([sys.executable, "-m", "tools.faults.proxy", "--listen", "0.0.0.0:0",
                          "--target", "127.0.0.1:1"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and "not loopback" in out.stderr
