"""vstore.net: authenticated frames, handshake, RPC, and refusal of every kind of bad input."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import logging
import os
import random
import socket
import threading
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers import (
    HOST,
    KEY,
    assert_closed_by_server,
    handshake,
    raw_connect,
    read_frame,
    request,
    send_quietly,
)
from vstore.blocks.errors import FormatError, TricopyError
from vstore.net import wire
from vstore.net.client import AsyncClient, Client
from vstore.net.keys import create_key, load_key
from vstore.net.server import bound_port, serve
from vstore.net.tls import make_ssl_contexts
from vstore.net.wire import (
    _FRAME,
    _HEADER,
    _REQUEST,
    _RESPONSE,
    FRAME_MAGIC,
    FRAME_VERSION,
    HEADER_SIZE,
    T_REQUEST,
    T_RESPONSE,
    ConnectionFailed,
    HandshakeFailed,
    RemoteError,
    Session,
    build_frame,
    client_finish,
    client_hello,
    decode_request,
    decode_response,
    encode_request,
    encode_response,
    parse_header,
    request_parts,
    server_accept,
    session_key,
)

OTHER_KEY = bytes(range(1, 33))


class ServerThread:
    """A `serve` server on its own event loop thread, counting handler calls."""

    def __init__(self, key: bytes = KEY, port: int = 0, **kw) -> None:
        self.calls = 0
        self.kept: list = []
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = self.run(serve(HOST, port, key, self.handle, **kw))
        self.port = bound_port(self.server)

    def run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=10)

    async def handle(self, method: str, args: dict, data: bytes) -> tuple[dict, bytes]:
        self.calls += 1
        if method == "echo":
            return {"method": method, "args": args}, data
        if method == "fail":
            raise TricopyError(args["msg"])
        if method == "crash":
            raise RuntimeError("boom in handler")
        if method == "sleep":
            await asyncio.sleep(args["s"])
            return {}, b""
        if method == "big":
            return {}, b"x" * args["n"]
        if method == "keep":  # holds on to the request's data (a view of its frame) after answering
            self.kept.append(data)
            await asyncio.sleep(0)
            return {"kept": len(self.kept)}, b""
        raise TricopyError(f"unknown method {method}")

    def stop(self) -> None:
        async def shutdown() -> None:
            self.server.close()
            await self.server.wait_closed()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        self.run(shutdown())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


@pytest.fixture
def server():
    s = ServerThread(handshake_timeout=1.0)
    yield s
    s.stop()


def assert_still_serving(server: ServerThread) -> None:
    before = server.calls
    with Client(HOST, server.port, KEY) as c:
        assert c.call("echo", {"ok": True}) == ({"method": "echo", "args": {"ok": True}}, b"")
    assert server.calls == before + 1


def warnings_text(caplog) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)


# --------------------------------------------------------------------------------------------
# RPC
# --------------------------------------------------------------------------------------------
def test_round_trip_json_and_binary(server):
    """A call returns exactly the JSON arguments and binary payload sent, from empty to several MiB."""
    args = {"a": [1, 2.5, None, "é"], "b": {"nested": True}}
    rng = random.Random(1)
    with Client(HOST, server.port, KEY) as c:
        for size in (0, 1, 4096, 3 * 2**20 + 7):
            data = rng.randbytes(size)
            assert c.call("echo", args, data) == ({"method": "echo", "args": args}, data)
        assert c.call("echo") == ({"method": "echo", "args": {}}, b"")


def test_client_pipelines_with_window(server):
    """Pipelined calls through a window return every answer in request order, data given as one
    buffer or as a list of pieces; the connection serves plain calls afterwards."""
    with Client(HOST, server.port, KEY) as client:
        calls = [("echo", {"i": i}, bytes([i]) * 65536 if i % 2 else [bytes([i]) * 100, bytes([i]) * 65436])
                 for i in range(40)]
        results = client.call_many(calls, window=4)
        assert [r[0]["args"]["i"] for r in results] == list(range(40))
        assert all(r[1] == bytes([i]) * 65536 for i, r in enumerate(results))
        assert client.call("echo", {"x": 1}) == ({"method": "echo", "args": {"x": 1}}, b"")


def test_large_requests_pipelined_are_answered_in_order_with_their_own_data(server):
    """Large requests pipelined on one connection (the server receives the next one while it answers
    one, and reuses a large frame's buffer nothing refers to any more) each get their own data back,
    in order; data a handler still holds is never overwritten by later frames."""
    size = 512 << 10
    with Client(HOST, server.port, KEY) as client:
        calls = [(("keep" if i % 3 == 0 else "echo"), {"i": i}, bytes([i]) * size) for i in range(12)]
        results = client.call_many(calls, window=4)
        for i, (meta, data) in enumerate(results):
            if i % 3:
                assert (meta["args"]["i"], data) == (i, bytes([i]) * size)
            else:
                assert meta["kept"] == i // 3 + 1
        assert [bytes(v) for v in server.kept] == [bytes([i]) * size for i in range(0, 12, 3)]
        assert client.call("echo", {"x": 1}, b"small") == ({"method": "echo", "args": {"x": 1}}, b"small")


def test_call_many_stops_at_first_failure(server):
    """call_many raises the first failure and sends at most a window's worth of calls after it."""
    with Client(HOST, server.port, KEY) as client:
        calls = [("echo", {}, b"")] * 3 + [("fail", {"msg": "stop here"}, b"")] + [("echo", {}, b"")] * 20
        with pytest.raises(RemoteError, match="stop here"):
            client.call_many(calls, window=2)
        assert server.calls <= 4 + 2  # at most a window's worth sent after the failing call
        assert client.call_many([]) == []
        assert client.call("echo") == ({"method": "echo", "args": {}}, b"")


def test_handler_tricopy_error_becomes_remote_error(server):
    """A TricopyError in a handler reaches the client as a RemoteError with its message; the connection stays usable."""
    with Client(HOST, server.port, KEY) as c:
        with pytest.raises(RemoteError) as info:
            c.call("fail", {"msg": "volume C is read-only; suspend the pair first"})
        assert str(info.value) == "volume C is read-only; suspend the pair first"
        assert info.value.kind == "TricopyError"
        assert isinstance(info.value, TricopyError)
        assert c.call("echo")[0]["method"] == "echo"  # same connection still usable


def test_handler_crash_is_generic_error_and_logged(server, caplog):
    """A handler crash is logged at the server and reaches the client only as a generic internal error."""
    with Client(HOST, server.port, KEY) as c:
        with pytest.raises(RemoteError) as info:
            c.call("crash")
        assert "boom" not in str(info.value) and "internal" in str(info.value)
        assert info.value.kind == "internal"
        assert c.call("echo")[0]["method"] == "echo"
    assert any(r.exc_info and "boom in handler" in str(r.exc_info[1]) for r in caplog.records)


def test_concurrent_clients(server):
    """Many clients at once each get their own answers, and every call reaches the handler once."""
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            with Client(HOST, server.port, KEY) as c:
                for i in range(20):
                    data = os.urandom(1000 + i)
                    expected = ({"method": "echo", "args": {"n": n, "i": i}}, data)
                    assert c.call("echo", {"n": n, "i": i}, data) == expected
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)
    assert not errors
    assert server.calls == 160


def test_shared_sync_client_is_thread_safe(server):
    """One sync client shared by threads gives each thread its own answers."""
    with Client(HOST, server.port, KEY) as c:
        def worker(n: int) -> None:
            for i in range(20):
                assert c.call("echo", {"n": n, "i": i})[0]["args"] == {"n": n, "i": i}

        threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=20)
    assert server.calls == 80


def test_a_slow_connection_does_not_block_others(server):
    """A slow call on one connection does not delay calls on another."""
    async def main() -> None:
        slow = await AsyncClient.connect(HOST, server.port, KEY)
        fast = await AsyncClient.connect(HOST, server.port, KEY)
        sleeper = asyncio.create_task(slow.call("sleep", {"s": 1.0}))
        await asyncio.sleep(0.05)
        t0 = time.monotonic()
        await fast.call("echo")
        assert time.monotonic() - t0 < 0.9
        await sleeper
        await slow.close()
        await fast.close()

    asyncio.run(main())


def test_unreachable_site():
    """Connecting to a port nobody listens on fails with ConnectionFailed naming the address."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        port = s.getsockname()[1]
    with pytest.raises(ConnectionFailed, match=f"cannot reach site at {HOST}:{port}"):
        Client(HOST, port, KEY, timeout=2)

    async def main() -> None:
        with pytest.raises(ConnectionFailed, match=f"cannot reach site at {HOST}:{port}"):
            await AsyncClient.connect(HOST, port, KEY, timeout=2)

    asyncio.run(main())


def test_call_timeout_closes_async_client(server):
    """An async call with no answer in time fails and closes that client."""
    async def main() -> None:
        client = await AsyncClient.connect(HOST, server.port, KEY)
        with pytest.raises(ConnectionFailed, match="no answer to 'sleep'"):
            await client.call("sleep", {"s": 2}, timeout=0.2)
        with pytest.raises(ConnectionFailed):  # the timed-out client is closed for good
            await client.call("echo")
        await client.close()

    asyncio.run(main())


def test_sync_client_timeout_then_reconnects(server):
    """A sync call with no answer in time fails; the next call reconnects and succeeds."""
    with Client(HOST, server.port, KEY, timeout=0.3) as c:
        with pytest.raises(ConnectionFailed, match="no answer"):
            c.call("sleep", {"s": 1})
        assert c.call("echo")[0]["method"] == "echo"


def test_oversized_message_refused_before_sending():
    """A request or answer over max_payload is refused by the sender; the connection stays usable."""
    s = ServerThread(max_payload=1 << 20)
    try:
        with Client(HOST, s.port, KEY, max_payload=1 << 20) as c:
            with pytest.raises(TricopyError, match="exceeds"):
                c.call("echo", {}, b"x" * (2 << 20))
            with pytest.raises(RemoteError, match="exceeds"):
                c.call("big", {"n": 2 << 20})
            assert c.call("echo", {}, b"y" * 1000)[1] == b"y" * 1000
    finally:
        s.stop()


# --------------------------------------------------------------------------------------------
# Security: every bad input closes that connection, never reaches the handler
# --------------------------------------------------------------------------------------------
def test_garbage_from_keyless_client(server, caplog):
    """Garbage from a client without the key closes that connection, is logged, never reaches the handler."""
    sock = raw_connect(server.port)
    send_quietly(sock, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + os.urandom(64))
    assert_closed_by_server(sock)
    assert server.calls == 0
    assert f"closing connection from {HOST}:" in warnings_text(caplog)
    assert "bad magic" in warnings_text(caplog)
    assert_still_serving(server)


def test_wrong_key_is_refused(server, caplog):
    """A client with the wrong lab key fails the handshake and never reaches the handler."""
    with pytest.raises(HandshakeFailed, match="lab key"):
        Client(HOST, server.port, OTHER_KEY)

    async def main() -> None:
        with pytest.raises(HandshakeFailed):
            await AsyncClient.connect(HOST, server.port, OTHER_KEY)

    asyncio.run(main())
    assert server.calls == 0
    assert "failed authentication" in warnings_text(caplog)
    assert_still_serving(server)


def test_server_with_wrong_key_is_refused_by_client():
    """A client refuses a server that does not hold the lab key."""
    s = ServerThread(key=OTHER_KEY)
    try:
        with pytest.raises(HandshakeFailed):
            Client(HOST, s.port, KEY)
        assert s.calls == 0
    finally:
        s.stop()


def record_a_request(server: ServerThread) -> tuple[socket.socket, bytes, bytes]:
    """A legitimate session that sent one request and got its answer: (its socket, its HELLO, the request)."""
    sock = raw_connect(server.port)
    session, hello = handshake(sock)
    frame = request(session)
    sock.sendall(frame)
    session.open(read_frame(sock))
    assert server.calls == 1
    return sock, hello, frame


def test_frame_from_another_session_is_rejected(server):
    """A frame recorded in one session is refused in another authenticated session (its key differs)."""
    a, _, frame = record_a_request(server)
    b = raw_connect(server.port)
    handshake(b)
    b.sendall(frame)
    assert_closed_by_server(b)
    a.close()
    assert server.calls == 1
    assert_still_serving(server)


def test_replayed_conversation_is_rejected(server):
    """A whole conversation replayed byte for byte is refused: the server's new nonce gives a new session key."""
    a, hello, frame = record_a_request(server)
    c = raw_connect(server.port)
    c.sendall(hello)
    read_frame(c)  # WELCOME with a fresh nonce
    c.sendall(frame)
    assert_closed_by_server(c)
    a.close()
    assert server.calls == 1
    assert_still_serving(server)


def test_frame_replayed_in_same_session_is_rejected(server, caplog):
    """A frame sent twice in one session is refused the second time and closes the connection."""
    sock = raw_connect(server.port)
    session, _ = handshake(sock)
    frame = request(session)
    sock.sendall(frame)
    session.open(read_frame(sock))
    sock.sendall(frame)
    assert_closed_by_server(sock)
    assert server.calls == 1
    assert "replayed or reordered" in warnings_text(caplog)
    assert_still_serving(server)


def test_reordered_frames_are_rejected(server):
    """Frames of one session that arrive out of order are refused."""
    sock = raw_connect(server.port)
    session, _ = handshake(sock)
    first, second = request(session, 1), request(session, 2)
    sock.sendall(second + first)
    assert_closed_by_server(sock)
    assert server.calls == 0
    assert_still_serving(server)


@pytest.mark.parametrize("where", ["header", "payload", "mac"])
def test_bit_flipped_frame_is_rejected(server, where):
    """One flipped bit anywhere in a frame (header, payload or MAC) is refused."""
    sock = raw_connect(server.port)
    session, _ = handshake(sock)
    frame = bytearray(request(session))
    index = {"header": HEADER_SIZE - 6, "payload": HEADER_SIZE + 3, "mac": len(frame) - 1}[where]
    frame[index] ^= 0x10
    send_quietly(sock, bytes(frame))
    assert_closed_by_server(sock)
    assert server.calls == 0
    assert_still_serving(server)


@pytest.mark.parametrize("after_handshake", [False, True])
def test_huge_length_rejected_from_header_alone(server, caplog, after_handshake):
    """A header claiming a payload over the limit is refused at once, without waiting for the payload."""
    sock = raw_connect(server.port)
    if after_handshake:
        handshake(sock)
    header = _HEADER.build({"version": FRAME_VERSION, "type": T_REQUEST, "flags": 0,
                                "request_id": 1, "seq": 1, "length": 0xFFFFFFFF})
    t0 = time.monotonic()
    sock.sendall(header)  # and nothing more: the server must not wait for 4 GiB
    assert_closed_by_server(sock)
    assert time.monotonic() - t0 < 0.9  # well before the 1 s handshake timeout
    assert server.calls == 0
    assert "over the" in warnings_text(caplog)
    assert_still_serving(server)


@pytest.mark.parametrize("version", [FRAME_VERSION - 1, FRAME_VERSION + 1])
def test_wrong_frame_version_is_rejected(server, caplog, version):
    """A frame of an unsupported format version (an older or newer tricopy) is refused, and the
    log names both versions."""
    sock = raw_connect(server.port)
    nonce, hello = client_hello(KEY)
    bad = bytearray(hello)
    bad[len(FRAME_MAGIC)] = version
    send_quietly(sock, bytes(bad))
    assert_closed_by_server(sock)
    assert f"format version {version} is not supported (this tricopy reads {FRAME_VERSION})" in warnings_text(caplog)
    assert_still_serving(server)


def test_request_before_handshake_is_rejected(server):
    """A request before the handshake is refused, never reaching the handler."""
    sock = raw_connect(server.port)
    skey = session_key(KEY, b"\0" * 32, b"\0" * 32)
    send_quietly(sock, build_frame(skey, T_REQUEST, 1, 1, encode_request("echo", {}, b"")))
    assert_closed_by_server(sock)
    assert server.calls == 0


def test_plain_garbage_bytes(server):
    """Random bytes of any length close the connection and never reach the handler."""
    rng = random.Random(7)
    for size in (HEADER_SIZE, 100, 5000):
        sock = raw_connect(server.port)
        send_quietly(sock, rng.randbytes(size))
        assert_closed_by_server(sock)
    assert server.calls == 0
    assert_still_serving(server)


def test_handshake_timeout_closes_silent_connection(server, caplog):
    """A connection that does not finish the handshake in time is closed."""
    sock = raw_connect(server.port)
    t0 = time.monotonic()
    sock.sendall(FRAME_MAGIC)  # a few bytes, then silence
    assert_closed_by_server(sock)
    assert 0.8 < time.monotonic() - t0 < 5
    assert "no handshake within" in warnings_text(caplog)
    assert_still_serving(server)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=300))
def test_frame_parsing_of_arbitrary_bytes_only_raises_format_error(data):
    """Parsing arbitrary bytes as a frame or a message raises only FormatError (or RemoteError)."""
    session = Session(KEY, KEY, T_REQUEST, T_RESPONSE, 1 << 20)
    for parse in (session.open, lambda raw: server_accept(KEY, raw, 1 << 20),
                  lambda raw: client_finish(KEY, b"\0" * 32, raw, 1 << 20)):
        with pytest.raises(FormatError):
            parse(data)
    for decode in (decode_request, decode_response):
        try:
            decode(data)
        except (FormatError, RemoteError):
            pass


# --------------------------------------------------------------------------------------------
# Keys
# --------------------------------------------------------------------------------------------
def test_missing_key_file_is_refused(tmp_path: Path):
    """A key file that does not exist is refused by name."""
    with pytest.raises(TricopyError, match="does not exist"):
        load_key(tmp_path / "lab.key")


def test_key_file_readable_by_others_is_refused(tmp_path: Path):
    """A key file is loaded only with mode 600; otherwise the error names the chmod to run."""
    path = tmp_path / "lab.key"
    path.write_text(KEY.hex() + "\n")
    path.chmod(0o644)
    with pytest.raises(TricopyError, match=f"chmod 600 {path}"):
        load_key(path)
    path.chmod(0o600)
    assert load_key(path) == KEY


def test_key_file_must_hold_a_long_hex_key(tmp_path: Path):
    """A key file holds at least 32 bytes in hex; anything else is refused."""
    path = tmp_path / "lab.key"
    path.write_text("zz" * 32)
    path.chmod(0o600)
    with pytest.raises(TricopyError, match="not hold a hex key"):
        load_key(path)
    path.write_text("ab" * 16)
    with pytest.raises(TricopyError, match="at least 32 bytes"):
        load_key(path)


def test_create_key(tmp_path: Path):
    """A created key file has mode 600, loads back as the same 32 bytes, and is never overwritten."""
    path = tmp_path / "new.key"
    key = create_key(path)
    assert path.stat().st_mode & 0o777 == 0o600
    assert load_key(path) == key and len(key) == 32
    with pytest.raises(FileExistsError):
        create_key(path)


def test_short_key_refused_in_api():
    """A client with a key shorter than 32 bytes is refused before connecting."""
    with pytest.raises(TricopyError, match="at least 32 bytes"):
        Client(HOST, 1, b"short")


# --------------------------------------------------------------------------------------------
# TLS
# --------------------------------------------------------------------------------------------
def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    x509 = pytest.importorskip("cryptography.x509", reason="the cryptography package is not installed")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    pkey = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tricopy-test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(pkey.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(HOST))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(pkey, hashes.SHA256()))
    cert_path, key_path = tmp_path / "site.crt", tmp_path / "site.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(pkey.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                            serialization.NoEncryption()))
    return cert_path, key_path


def test_tls_round_trip(tmp_path: Path):
    """A TLS site serves sync and async clients with TLS and refuses a plain-TCP client."""
    cert, pkey = _self_signed(tmp_path)
    server_ctx, client_ctx = make_ssl_contexts(cert, pkey, cert)
    s = ServerThread(ssl_context=server_ctx)
    try:
        with Client(HOST, s.port, KEY, ssl_context=client_ctx) as c:
            assert c.call("echo", {"tls": 1}, b"z" * 100000) == ({"method": "echo", "args": {"tls": 1}}, b"z" * 100000)

        async def main() -> None:
            async with await AsyncClient.connect(HOST, s.port, KEY, ssl_context=client_ctx) as ac:
                assert (await ac.call("echo", {"a": 1}))[0]["args"] == {"a": 1}

        asyncio.run(main())
        with pytest.raises(ConnectionFailed):  # a plain-TCP client cannot talk to a TLS site
            Client(HOST, s.port, KEY, timeout=2)
    finally:
        s.stop()


def test_a_kept_connection_to_a_restarted_site_is_renewed_once():
    """A site restarted between two calls closed the client's kept connection: the next call is
    sent again once on a new connection instead of failing (every request is safe to repeat)."""
    first = ServerThread()
    port = first.port
    client = Client(HOST, port, KEY, timeout=5)
    assert client.call("echo", {"n": 1})[0]["args"] == {"n": 1}
    first.stop()
    second = ServerThread(port=port)
    try:
        assert client.call("echo", {"n": 2})[0]["args"] == {"n": 2}
        assert second.calls == 1
    finally:
        second.stop()
    with pytest.raises(ConnectionFailed):  # nobody listens: one new connection, then a clear failure
        client.call("echo", {"n": 3})
    client.close()


def test_posted_requests_a_restarted_site_never_answered_are_sent_again():
    """A posted request a restarted site never answered is sent again on the new connection."""
    first = ServerThread()
    port = first.port
    client = Client(HOST, port, KEY, timeout=5)
    client.call("echo")
    first.stop()  # the posted request below goes to a connection nobody serves any more
    client.post("echo", {"posted": 1})
    second = ServerThread(port=port)
    try:
        assert client.call("echo", {"n": 2})[0]["args"] == {"n": 2}
        assert second.calls == 2  # the posted request again, then the call
    finally:
        second.stop()
        client.close()


# --------------------------------------------------------------------------------------------
# The hand-packed codecs agree with the declarations
# --------------------------------------------------------------------------------------------
@settings(max_examples=200, deadline=None)
@given(st.integers(0, 255), st.integers(0, 255), st.integers(0, 2**32 - 1), st.integers(0, 2**64 - 1),
       st.integers(0, 2**32 - 1))
def test_packed_frame_header_agrees_with_the_declaration(ftype, flags, rid, seq, length):
    """The struct header of the hot path is `_HEADER` byte for byte, both ways."""
    fields = {"version": FRAME_VERSION, "type": ftype, "flags": flags, "request_id": rid, "seq": seq,
              "length": length}
    declared = _HEADER.build(fields)
    assert wire._HEADER_FAST.pack(FRAME_MAGIC, *fields.values()) == declared
    if flags == 0:
        assert wire._pack_header(ftype, rid, seq, length) == declared
    parsed = parse_header(declared, 2**32)
    assert parsed._asdict() == {k: v for k, v in _HEADER.parse(declared).items() if k in fields}


@settings(max_examples=200, deadline=None)
@given(st.text(min_size=1, max_size=60).filter(lambda m: len(m.encode()) < 256),
       st.dictionaries(st.text(max_size=8), st.integers() | st.text(max_size=8), max_size=4),
       st.binary(max_size=300), st.integers(0, 2))
def test_packed_rpc_payloads_agree_with_the_declarations(method, args, data, status):
    """Requests and responses packed by hand are what `_REQUEST`/`_RESPONSE` build, and decode to
    what those declarations parse, data included."""
    raw = encode_request(method, args, data)
    declared = _REQUEST.parse(raw)
    assert _REQUEST.build(declared) == raw
    got_method, got_args, got_data = decode_request(raw)
    assert (got_method.encode(), got_args, bytes(got_data)) == (declared.method, args, declared.data)
    response = encode_response(status, args, data)
    parsed = _RESPONSE.parse(response)
    assert (parsed.status, parsed.data) == (status, data)
    assert _RESPONSE.build(parsed) == response
    if status == 0:
        assert decode_response(response) == (args, data)


def test_sealed_frame_parses_through_the_frame_declaration():
    """A frame sealed from pieces is one `_FRAME`: header, payload, then the 16-byte MAC."""
    client = Session(KEY, OTHER_KEY, T_REQUEST, T_RESPONSE, 1 << 24)
    data = os.urandom(300_000)
    raw = b"".join(client.seal_parts(5, request_parts("journal.receive", {"first_seq": 1}, data)))
    parsed = _FRAME.parse(raw)
    assert (parsed.header.type, parsed.header.request_id, parsed.header.seq) == (T_REQUEST, 5, 1)
    assert len(parsed.mac) == wire.MAC_SIZE
    server = Session(OTHER_KEY, KEY, T_RESPONSE, T_REQUEST, 1 << 24)
    frame = server.open(raw)
    assert decode_request(frame.payload) == ("journal.receive", {"first_seq": 1}, data)


def test_streamed_and_joined_macs_agree():
    """The MAC of a frame sealed from many pieces (the streaming MAC) is the one-shot MAC of the
    same bytes, so a receiver verifying the whole frame accepts it."""
    pieces = [os.urandom(n) for n in (23, 7, 1 << 20, 5)]
    key = wire._FrameKey(KEY, T_REQUEST)
    assert key.tag(9, pieces) == key.tag(9, [b"".join(pieces)])
    with pytest.raises(wire.AuthError):
        key.verify(10, b"".join(pieces) + key.tag(9, pieces))  # another sequence number: another nonce


class _SpySocket:
    """A socket that records what each send call is given."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock, self.sent = sock, []

    def sendmsg(self, buffers, *rest):
        self.sent.append(("sendmsg", list(buffers)))
        return self.sock.sendmsg(buffers, *rest)

    def sendall(self, data, *rest):
        self.sent.append(("sendall", [data]))
        return self.sock.sendall(data, *rest)

    def __getattr__(self, name):
        return getattr(self.sock, name)


def test_request_data_is_sent_without_being_joined(server):
    """A call's data goes to the kernel as the caller's own buffer (sendmsg of header, data, MAC),
    never copied into a joined frame first."""
    data = bytearray(os.urandom(2 << 20))
    with Client(HOST, server.port, KEY) as c:
        spy = _SpySocket(c._sock)
        c._sock = spy  # type: ignore[assignment]
        assert c.call("echo", {}, data) == ({"method": "echo", "args": {}}, bytes(data))
    calls = [bufs for kind, bufs in spy.sent]
    assert all(kind == "sendmsg" for kind, _ in spy.sent)
    assert any(isinstance(b, memoryview) and b.obj is data for bufs in calls for b in bufs)
