"""The NBD server core (SPEC §6 [0133]-[0135]): the wire declarations and their fast paths, the
sans-I/O negotiation, and the server on a real image file driven by a raw-socket client that can
misbehave: bad clients get the right error or a closed connection, nothing is written half, and
other clients are still served."""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.helpers import assert_closed_by_server, blocks, raw_connect, recv_exactly, send_quietly
from vstore.blocks.device import BlockDevice, ImageDevice
from vstore.blocks.errors import TricopyError
from vstore.nbd import proto as p
from vstore.nbd.server import Export, NbdServer
from vstore.nbd.session import MAX_OPTION_DATA, ExportInfo, Negotiation, parse_request
from vstore.net.tls import create_lab_certificates, make_ssl_contexts
from vstore.replication.storage import WriteInhibited

BS = 4096
SIZE = 256 * BS


# ------------------------------------------------------------------------------------------------
# A device wrapper that counts calls and can fail or be slow; the server under test
# ------------------------------------------------------------------------------------------------
class Counting(BlockDevice):
    """Delegates to `inner`, counting each call; `fail` is raised by writes; `pause` widens each
    write so that concurrent ones would overlap; `max_inflight` is the most writes seen at once."""

    def __init__(self, inner: BlockDevice, fail: Exception | None = None, pause: float = 0.0) -> None:
        self.inner, self.fail, self.pause = inner, fail, pause
        self.block_size, self.num_blocks, self.name = inner.block_size, inner.num_blocks, "counting"
        self.calls: Counter[str] = Counter()
        self.inflight = self.max_inflight = 0
        self._lock = threading.Lock()

    @contextmanager
    def _writing(self, what: str) -> Iterator[None]:
        with self._lock:
            self.calls[what] += 1
            self.inflight += 1
            self.max_inflight = max(self.max_inflight, self.inflight)
        try:
            if self.fail is not None:
                raise self.fail
            if self.pause:
                time.sleep(self.pause)
            yield
        finally:
            with self._lock:
                self.inflight -= 1

    def _read(self, lba: int, count: int) -> bytes:
        self.calls["read"] += 1
        return self.inner.read(lba, count)

    def _write(self, lba: int, data: bytes) -> None:
        with self._writing("write"):
            self.inner.write(lba, data)

    def write_fua(self, lba: int, data: bytes) -> None:
        self.check_write(lba, data)
        with self._writing("write_fua"):
            self.inner.write_fua(lba, data)

    def write_zeroes(self, lba: int, count: int) -> None:
        self.check_writable(lba, count)
        with self._writing("write_zeroes"):
            self.inner.write_zeroes(lba, count)

    def flush(self) -> None:
        self.calls["flush"] += 1
        self.inner.flush()


@contextmanager
def serving(tmp_path: Path, size: int = SIZE, *, readonly: bool = False,
            wrap: Callable[[BlockDevice], BlockDevice] | None = None, tls: ssl.SSLContext | None = None,
            seed: int = 7) -> Iterator[tuple[NbdServer, Path, BlockDevice]]:
    """An NBD server on port 0 with export "A" on an image of `size` bytes filled with seeded
    random data (so that a stray write of zeros shows); yields (server, image path, device)."""
    img = tmp_path / "A.img"
    img.write_bytes(blocks(seed, size // BS))
    dev = ImageDevice(img)
    served = wrap(dev) if wrap else dev
    server = NbdServer([Export("A", served, readonly=readonly, description="volume A")], port=0, tls=tls).start()
    try:
        yield server, img, served
    finally:
        server.close()
        dev.close()


# ------------------------------------------------------------------------------------------------
# A raw NBD client (speaks exactly what it is told to)
# ------------------------------------------------------------------------------------------------
class Raw:
    def __init__(self, port: int) -> None:
        self.sock = raw_connect(port)
        self.structured = False

    def recv(self, n: int) -> bytes:
        return recv_exactly(self.sock, n)

    def greet(self, flags: int = p.FLAG_C_FIXED_NEWSTYLE | p.FLAG_C_NO_ZEROES) -> int:
        greeting = p.GREETING.parse(self.recv(18))
        self.sock.sendall(p.CLIENT_FLAGS.build({"flags": flags}))
        return greeting.handshake_flags

    def option(self, option: int, data: bytes = b"") -> None:
        self.sock.sendall(p.OPTION_HEADER.build({"option": option, "length": len(data)}) + data)

    def reply(self) -> tuple[int, int, bytes]:
        head = self.recv(16)
        length = int.from_bytes(self.recv(4), "big")
        parsed = p.OPTION_REPLY.parse(head + length.to_bytes(4, "big") + self.recv(length))
        return parsed.option, parsed.type, parsed.data

    def replies(self) -> list[tuple[int, bytes]]:
        """Option replies up to the final one (ACK or an error)."""
        out = []
        while True:
            _, rtype, data = self.reply()
            out.append((rtype, data))
            if rtype not in (p.REP_INFO, p.REP_SERVER):
                return out

    def go(self, name: str = "A", *, structured: bool = False, option: int = p.OPT_GO) -> list[tuple[int, bytes]]:
        if structured:
            self.option(p.OPT_STRUCTURED_REPLY)
            assert self.replies() == [(p.REP_ACK, b"")]
            self.structured = True
        self.option(option, p.INFO_REQUEST.build({"name": name.encode(), "requests": [p.INFO_BLOCK_SIZE]}))
        return self.replies()

    def connect(self, name: str = "A", *, structured: bool = False) -> Raw:
        self.greet()
        assert self.go(name, structured=structured)[-1][0] == p.REP_ACK
        return self

    def send(self, cmd: int, offset: int = 0, length: int = 0, data: bytes = b"", flags: int = 0,
             cookie: int = 1) -> None:
        self.sock.sendall(p.REQUEST.build({"flags": flags, "type": cmd, "cookie": cookie, "offset": offset,
                                           "length": length}) + data)

    def answer(self, length: int = 0) -> tuple[int, bytes]:
        """(error, data) of the reply to a request (data of a successful read of `length` bytes);
        a structured error's message is returned as the data."""
        magic = int.from_bytes(self.recv(4), "big")
        if magic == p.SIMPLE_REPLY_MAGIC:
            reply = p.SIMPLE_REPLY.parse(magic.to_bytes(4, "big") + self.recv(12))
            return reply.error, (self.recv(length) if length and not reply.error else b"")
        chunk = p.CHUNK_HEADER.parse(magic.to_bytes(4, "big") + self.recv(16))
        payload = self.recv(chunk.length)
        assert chunk.flags & p.REPLY_FLAG_DONE
        if chunk.type == p.REPLY_TYPE_ERROR:
            err = p.ERROR_CHUNK.parse(payload)
            return err.error, err.message.encode()
        if chunk.type == p.REPLY_TYPE_OFFSET_DATA:
            return 0, payload[8:]
        assert chunk.type == p.REPLY_TYPE_NONE
        return 0, b""

    def call(self, cmd: int, offset: int = 0, length: int = 0, data: bytes = b"", flags: int = 0) -> tuple[int, bytes]:
        self.send(cmd, offset, length, data, flags)
        return self.answer(length if cmd == p.CMD_READ else 0)

    def close(self) -> None:
        send_quietly(self.sock, p.REQUEST.build({"flags": 0, "type": p.CMD_DISC, "cookie": 0, "offset": 0,
                                                 "length": 0}))
        self.sock.close()


def second_client_served(server: NbdServer, img: Path) -> None:
    """Another client connects, reads block 3 and gets the image's bytes."""
    c = Raw(server.port).connect()
    assert c.call(p.CMD_READ, 3 * BS, BS) == (0, img.read_bytes()[3 * BS:4 * BS])
    c.close()


# ------------------------------------------------------------------------------------------------
# Declarations and fast paths
# ------------------------------------------------------------------------------------------------
EXTREMES = [0, 1, 0x7F, 0xFFFF, 0xFFFFFFFF, (1 << 63) - 1, (1 << 64) - 1]


@pytest.mark.parametrize("value", EXTREMES)
def test_struct_fast_paths_agree_with_the_declarations(value: int):
    """The request header, the simple reply and the structured chunk headers packed with struct
    are byte for byte the construct declarations, at the edges of every field."""
    v16, v32, v64 = value & 0xFFFF, value & 0xFFFFFFFF, value
    req = {"flags": v16, "type": v16 ^ 1, "cookie": v64, "offset": v64 ^ 5, "length": v32}
    raw = p.REQUEST.build(req)
    assert raw == p.REQUEST_FAST.pack(p.REQUEST_MAGIC, v16, v16 ^ 1, v64, v64 ^ 5, v32)
    got = parse_request(raw)
    assert (got.flags, got.type, got.cookie, got.offset, got.length) == tuple(req.values())
    assert p.SIMPLE_REPLY.build({"error": v32, "cookie": v64}) == p.SIMPLE_REPLY_FAST.pack(
        p.SIMPLE_REPLY_MAGIC, v32, v64)
    assert p.CHUNK_HEADER.build({"flags": v16, "type": v16, "cookie": v64, "length": v32}) == p.CHUNK_FAST.pack(
        p.STRUCTURED_REPLY_MAGIC, v16, v16, v64, v32)
    assert (p.CHUNK_HEADER.build({"flags": 1, "type": 1, "cookie": v64, "length": v32})
            + p.OFFSET_DATA_HEAD.build({"offset": v64})) == p.OFFSET_DATA_FAST.pack(
        p.STRUCTURED_REPLY_MAGIC, 1, 1, v64, v32, v64)


def test_sizes_are_the_protocol_documents():
    """Each fixed structure has the size proto.md gives it (reply lengths 12 and 14 for the infos)."""
    assert p.REQUEST.sizeof() == 28 and p.SIMPLE_REPLY.sizeof() == 16 and p.CHUNK_HEADER.sizeof() == 20
    assert p.GREETING.sizeof() == 18 and p.OPTION_HEADER.sizeof() == p.OPTION_HEADER_SIZE
    assert len(p.INFO_EXPORT_DATA.build({"size": 1, "transmission_flags": 1})) == 12
    assert len(p.INFO_BLOCK_SIZE_DATA.build({"minimum": 1, "preferred": 1, "maximum": 1})) == 14
    assert len(p.EXPORT_NAME_REPLY.build({"size": 1, "transmission_flags": 1}, zeroes=True)) == 134
    assert len(p.EXPORT_NAME_REPLY.build({"size": 1, "transmission_flags": 1}, zeroes=False)) == 10


def test_request_with_a_bad_magic_is_a_format_error():
    """A request header without NBD_REQUEST_MAGIC is refused as bad bytes, not served."""
    with pytest.raises(TricopyError, match="bad magic"):
        parse_request(b"\0" * 28)


# ------------------------------------------------------------------------------------------------
# Negotiation without I/O
# ------------------------------------------------------------------------------------------------
def feed_all(neg: Negotiation, stream: bytes) -> list:
    """Feed `stream` in the pieces `needed` asks for; the steps taken."""
    steps = []
    while neg.needed and len(stream) >= neg.needed:
        n = neg.needed
        steps.append(neg.feed(stream[:n]))
        stream = stream[n:]
    return steps


def split_replies(raw: bytes) -> list[tuple[int, bytes]]:
    """(type, data) of each option reply in `raw`."""
    out = []
    while raw:
        length = 20 + int.from_bytes(raw[16:20], "big")
        reply = p.OPTION_REPLY.parse(raw[:length])
        out.append((reply.type, reply.data))
        raw = raw[length:]
    return out


def opt(option: int, data: bytes = b"") -> bytes:
    return p.OPTION_HEADER.build({"option": option, "length": len(data)}) + data


def test_negotiation_answers_every_option_and_ends_in_go():
    """LIST names each export, INFO and GO send NBD_INFO_EXPORT and NBD_INFO_BLOCK_SIZE (minimum =
    the block size) then ACK, an unknown option gets ERR_UNSUP, and only GO enters transmission."""
    info = ExportInfo("A", SIZE, BS)
    neg = Negotiation([info, ExportInfo("B", 2 * SIZE, 512, readonly=True)])
    go = p.INFO_REQUEST.build({"name": b"B", "requests": [p.INFO_NAME, p.INFO_BLOCK_SIZE]})
    stream = b"\0\0\0\3" + opt(p.OPT_LIST) + opt(99, b"xyz") + opt(p.OPT_INFO, go) + opt(p.OPT_GO, go)
    steps = [s for s in feed_all(neg, stream) if s.reply]  # one step answers each option
    assert [s.export for s in steps] == [None, None, None, neg.exports[1]]
    listed = split_replies(steps[0].reply)
    assert [(t, p.REP_SERVER_DATA.parse(d).name) for t, d in listed[:2]] == [(p.REP_SERVER, b"A"), (p.REP_SERVER, b"B")]
    assert listed[2] == (p.REP_ACK, b"")
    assert split_replies(steps[1].reply)[0][0] == p.REP_ERR_UNSUP
    assert split_replies(steps[2].reply) == split_replies(steps[3].reply)  # INFO and GO say the same
    infos = split_replies(steps[3].reply)
    assert (p.REP_INFO, p.INFO_BLOCK_SIZE_DATA.build({"minimum": 512, "preferred": 4096,
                                                      "maximum": info.max_payload})) in infos
    assert (p.REP_INFO, p.INFO_NAME_DATA.build({"name": b"B"})) in infos
    assert infos[-1] == (p.REP_ACK, b"")
    assert neg.needed == 0


@pytest.mark.parametrize(("stream", "reason"), [
    (b"\0\0\0\4", "client flags"),
    (b"\0\0\0\1" + b"GARBAGE!" + bytes(8), "bad magic"),
    (b"\0\0\0\1" + p.OPTION_HEADER.build({"option": p.OPT_GO, "length": MAX_OPTION_DATA + 1}), "announces"),
    (b"\0\0\0\1" + opt(p.OPT_EXPORT_NAME, b"nosuch"), "names no export"),
    (b"\0\0\0\1" + opt(p.OPT_ABORT), "ABORT"),
])
def test_negotiation_ends_the_session_where_it_cannot_answer(stream: bytes, reason: str):
    """Unknown client flags, a bad option magic, an oversized option, EXPORT_NAME of an unknown
    export and ABORT end the session with a reason, before reading anything more."""
    neg = Negotiation([ExportInfo("A", SIZE, BS)])
    steps = feed_all(neg, stream)
    assert steps[-1].close is not None and reason in steps[-1].close
    assert neg.needed == 0


# ------------------------------------------------------------------------------------------------
# The server: good clients
# ------------------------------------------------------------------------------------------------
def test_export_name_honours_no_zeroes(tmp_path: Path):
    """NBD_OPT_EXPORT_NAME is answered with size and flags, followed by 124 zeroes unless the
    client set NBD_FLAG_C_NO_ZEROES; the connection then serves reads."""
    with serving(tmp_path) as (server, img, _):
        for flags, length in ((p.FLAG_C_FIXED_NEWSTYLE, 134), (p.FLAG_C_FIXED_NEWSTYLE | p.FLAG_C_NO_ZEROES, 10)):
            c = Raw(server.port)
            assert c.greet(flags) == p.FLAG_FIXED_NEWSTYLE | p.FLAG_NO_ZEROES
            c.option(p.OPT_EXPORT_NAME, b"A")
            reply = p.EXPORT_NAME_REPLY.parse(c.recv(length), zeroes=length == 134)
            assert reply.size == SIZE and reply.transmission_flags & p.FLAG_HAS_FLAGS
            assert not reply.transmission_flags & p.FLAG_READ_ONLY
            assert c.call(p.CMD_READ, 0, BS) == (0, img.read_bytes()[:BS])
            c.close()


def test_unaligned_requests_are_served_by_read_modify_write(tmp_path: Path):
    """Writes, zeroes and reads at offsets and lengths that are not whole blocks change exactly
    the bytes asked for: the image equals a byte model after each."""
    with serving(tmp_path) as (server, img, _):
        model = bytearray(img.read_bytes())
        c = Raw(server.port).connect()
        for n, (offset, length) in enumerate([(1, 10), (BS - 3, 7), (5000, 3 * BS), (2 * BS, BS + 1),
                                              (10 * BS + 100, 100), (SIZE - 17, 17), (0, BS)]):
            data = blocks(100 + n, 4)[:length]
            assert c.call(p.CMD_WRITE, offset, length, data) == (0, b"")
            model[offset:offset + length] = data
            assert img.read_bytes() == model, (offset, length)
            assert c.call(p.CMD_READ, offset + 1, length - 1) == (0, bytes(model[offset + 1:offset + length]))
        for offset, length in [(3, 5), (BS - 1, 2), (BS + 7, 3 * BS), (20 * BS, 2 * BS)]:
            assert c.call(p.CMD_WRITE_ZEROES, offset, length) == (0, b"")
            model[offset:offset + length] = bytes(length)
            assert img.read_bytes() == model, (offset, length)
        assert c.call(p.CMD_WRITE_ZEROES, 30 * BS + 5, 2 * BS, flags=p.CMD_FLAG_NO_HOLE) == (0, b"")
        model[30 * BS + 5:32 * BS + 5] = bytes(2 * BS)
        assert img.read_bytes() == model
        c.close()


def test_trim_zeroes_only_the_whole_blocks_inside_its_range(tmp_path: Path):
    """TRIM (advertised, so it must do something correct) makes the whole blocks inside the range
    read as zeros and leaves the partial blocks at its ends alone."""
    with serving(tmp_path) as (server, img, _):
        before = img.read_bytes()
        c = Raw(server.port).connect()
        assert c.call(p.CMD_TRIM, 4 * BS + 10, 3 * BS) == (0, b"")
        after = img.read_bytes()
        assert after[5 * BS:7 * BS] == bytes(2 * BS)
        assert after[:5 * BS] == before[:5 * BS] and after[7 * BS:] == before[7 * BS:]
        c.close()


def test_fua_and_flush_reach_the_device(tmp_path: Path):
    """WRITE with NBD_CMD_FLAG_FUA is the device's write_fua, FLUSH its flush, and WRITE_ZEROES
    with FUA is followed by a flush; a plain WRITE neither."""
    with serving(tmp_path, wrap=Counting) as (server, _, dev):
        assert isinstance(dev, Counting)
        c = Raw(server.port).connect()
        assert c.call(p.CMD_WRITE, 0, BS, blocks(1)) == (0, b"")
        assert (dev.calls["write_fua"], dev.calls["flush"]) == (0, 0)
        assert c.call(p.CMD_WRITE, BS, BS, blocks(2), flags=p.CMD_FLAG_FUA) == (0, b"")
        assert (dev.calls["write_fua"], dev.calls["flush"]) == (1, 0)
        assert c.call(p.CMD_FLUSH) == (0, b"")
        assert dev.calls["flush"] == 1
        assert c.call(p.CMD_WRITE_ZEROES, 0, BS, flags=p.CMD_FLAG_FUA) == (0, b"")
        assert (dev.calls["write_zeroes"], dev.calls["flush"]) == (1, 2)
        c.close()


def test_structured_replies_carry_data_and_error_messages(tmp_path: Path):
    """With NBD_OPT_STRUCTURED_REPLY a read is one OFFSET_DATA chunk marked DONE and an error is an
    ERROR chunk whose message says what was wrong."""
    with serving(tmp_path) as (server, img, _):
        c = Raw(server.port).connect(structured=True)
        assert c.call(p.CMD_READ, BS + 5, 100) == (0, img.read_bytes()[BS + 5:BS + 105])
        error, message = c.call(p.CMD_READ, SIZE - 10, 20)
        assert error == p.EINVAL and b"past the end" in message
        assert c.call(p.CMD_READ, 0, 0) == (0, b"")
        c.close()


def test_readonly_export_refuses_writes_with_eperm(tmp_path: Path):
    """A read-only export says NBD_FLAG_READ_ONLY and answers WRITE, WRITE_ZEROES and TRIM with
    EPERM, leaving the image as it was."""
    with serving(tmp_path, readonly=True) as (server, img, _):
        before = img.read_bytes()
        c = Raw(server.port)
        c.greet()
        infos = c.go()
        export = next(p.INFO_EXPORT_DATA.parse(d) for t, d in infos if t == p.REP_INFO and d[:2] == b"\0\0")
        assert export.transmission_flags & p.FLAG_READ_ONLY
        assert c.call(p.CMD_WRITE, 0, BS, blocks(9))[0] == p.EPERM
        assert c.call(p.CMD_WRITE_ZEROES, 0, BS)[0] == p.EPERM
        assert c.call(p.CMD_TRIM, 0, BS)[0] == p.EPERM
        assert img.read_bytes() == before
        c.close()


def test_device_errors_become_eio_and_the_connection_goes_on(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    """A device that refuses a write (a fence) makes WRITE fail with EIO, the reason logged and sent
    as the structured error message; reads on the same connection still work."""
    fence = WriteInhibited("write to A rejected: pair A-C is in failure Suspend")
    with serving(tmp_path, wrap=lambda d: Counting(d, fail=fence)) as (server, img, _):
        before = img.read_bytes()
        c = Raw(server.port).connect(structured=True)
        with caplog.at_level(logging.ERROR, logger="vstore.nbd.server"):
            error, message = c.call(p.CMD_WRITE, 0, BS, blocks(3))
        assert error == p.EIO and b"failure Suspend" in message
        assert "failure Suspend" in caplog.text
        assert c.call(p.CMD_READ, 0, BS) == (0, before[:BS])
        assert img.read_bytes() == before
        c.close()


def test_overlapping_writes_from_two_clients_enter_the_device_one_at_a_time(tmp_path: Path):
    """Two connections writing overlapping unaligned ranges never have two device writes in flight
    at once, and no read-modify-write loses the other's bytes: each range's part that the other
    does not overlap holds its writer's last data."""
    with serving(tmp_path, wrap=lambda d: Counting(d, pause=0.002)) as (server, img, dev):
        assert isinstance(dev, Counting)
        ranges = {0: (100, 5000), 1: (3000, 6000)}  # bytes [100, 5100) and [3000, 9000)
        last: dict[int, bytes] = {}

        def writer(k: int) -> None:
            c = Raw(server.port).connect()
            offset, length = ranges[k]
            for i in range(25):
                data = bytes([16 * k + i % 16]) * length
                assert c.call(p.CMD_WRITE, offset, length, data) == (0, b"")
                last[k] = data
            c.close()

        threads = [threading.Thread(target=writer, args=(k,)) for k in ranges]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert dev.max_inflight == 1
        image = img.read_bytes()
        assert image[100:3000] == last[0][:2900]
        assert image[5100:9000] == last[1][2100:]


# ------------------------------------------------------------------------------------------------
# The server: bad clients
# ------------------------------------------------------------------------------------------------
def test_unknown_option_is_refused_and_negotiation_goes_on(tmp_path: Path):
    """An unknown option gets NBD_REP_ERR_UNSUP (its data skipped exactly), an unknown export
    NBD_REP_ERR_UNKNOWN, and the same client then enters transmission with NBD_OPT_GO."""
    with serving(tmp_path) as (server, img, _):
        c = Raw(server.port)
        c.greet()
        c.option(4242, b"some option data")
        assert c.replies()[-1][0] == p.REP_ERR_UNSUP
        assert c.go("nosuch")[-1][0] == p.REP_ERR_UNKNOWN
        assert c.go()[-1][0] == p.REP_ACK
        assert c.call(p.CMD_READ, 0, 8) == (0, img.read_bytes()[:8])
        c.close()


@pytest.mark.parametrize("garbage", [b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"\xff" * 64])
def test_garbage_before_the_handshake_closes_that_connection_only(tmp_path: Path, garbage: bytes):
    """Bytes that are not an NBD client's flags and options get the connection closed; nothing is
    written and the next client is served."""
    with serving(tmp_path) as (server, img, _):
        before = img.read_bytes()
        c = Raw(server.port)
        c.recv(18)
        send_quietly(c.sock, garbage)
        assert_closed_by_server(c.sock)
        assert img.read_bytes() == before
        second_client_served(server, img)


def test_garbage_after_the_handshake_closes_that_connection_only(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    """After NBD_OPT_GO, bytes that are not a request header close the connection with the reason
    logged (the framing is lost), and nothing is written even when the garbage looks like write data."""
    with serving(tmp_path) as (server, img, _):
        before = img.read_bytes()
        c = Raw(server.port).connect()
        with caplog.at_level(logging.WARNING, logger="vstore.nbd.server"):
            send_quietly(c.sock, b"\x00\x00\x00\x01" + blocks(5))
            assert_closed_by_server(c.sock)
            second_client_served(server, img)
        assert "bad magic" in caplog.text and "connection closed" in caplog.text
        assert img.read_bytes() == before


def test_requests_past_the_end_are_refused_and_the_connection_goes_on(tmp_path: Path):
    """A read past the end is EINVAL; a write (its payload read and dropped) and write-zeroes past
    the end are ENOSPC; an unknown command and an undocumented flag are EINVAL; the image is
    unchanged and the same connection then serves a read."""
    with serving(tmp_path) as (server, img, _):
        before = img.read_bytes()
        c = Raw(server.port).connect()
        assert c.call(p.CMD_READ, SIZE - BS, 2 * BS)[0] == p.EINVAL
        assert c.call(p.CMD_WRITE, SIZE - BS, 2 * BS, blocks(4, 2))[0] == p.ENOSPC
        assert c.call(p.CMD_WRITE_ZEROES, SIZE, BS)[0] == p.ENOSPC
        assert c.call(p.CMD_TRIM, (1 << 64) - BS, BS)[0] == p.EINVAL
        assert c.call(77, 0, BS)[0] == p.EINVAL
        assert c.call(p.CMD_WRITE, 0, BS, blocks(4), flags=p.CMD_FLAG_NO_HOLE)[0] == p.EINVAL
        assert c.call(p.CMD_FLUSH, 0, 1)[0] == p.EINVAL
        assert img.read_bytes() == before
        assert c.call(p.CMD_READ, 0, BS) == (0, before[:BS])
        c.close()


def test_a_4_gib_length(tmp_path: Path):
    """A READ of 2^32-1 bytes is refused with EINVAL and the connection goes on; a WRITE of
    2^32-1 bytes closes the connection (its payload cannot be skipped) with nothing written; a
    second client is served."""
    with serving(tmp_path) as (server, img, _):
        before = img.read_bytes()
        c = Raw(server.port).connect()
        assert c.call(p.CMD_READ, 0, 0xFFFFFFFF)[0] == p.EINVAL
        assert c.call(p.CMD_READ, 0, 4) == (0, before[:4])
        c.send(p.CMD_WRITE, 0, 0xFFFFFFFF)
        send_quietly(c.sock, blocks(6, 4))
        assert_closed_by_server(c.sock)
        assert img.read_bytes() == before
        second_client_served(server, img)


def test_disconnect_between_header_and_payload_writes_nothing(tmp_path: Path):
    """A client that sends a WRITE header and part of its payload, then goes away, has written
    nothing (the payload is received whole before the device sees it); others are served."""
    with serving(tmp_path, wrap=Counting) as (server, img, dev):
        assert isinstance(dev, Counting)
        before = img.read_bytes()
        c = Raw(server.port).connect()
        c.send(p.CMD_WRITE, 0, 4 * BS, blocks(8, 4)[:3 * BS + 100])
        c.sock.shutdown(socket.SHUT_WR)
        assert_closed_by_server(c.sock)
        second_client_served(server, img)
        assert img.read_bytes() == before
        assert dev.calls["write"] == dev.calls["write_fua"] == 0


def test_oversized_option_and_option_flood_close_the_connection(tmp_path: Path):
    """An option announcing more data than the server reads, or an endless stream of options,
    closes that connection; the next client is served."""
    with serving(tmp_path) as (server, img, _):
        c = Raw(server.port)
        c.greet()
        c.sock.sendall(p.OPTION_HEADER.build({"option": p.OPT_GO, "length": 0xFFFFFFFF}))
        assert_closed_by_server(c.sock)
        c = Raw(server.port)
        c.greet()
        send_quietly(c.sock, opt(4242) * 1500)
        try:
            while c.reply()[1] == p.REP_ERR_UNSUP:
                pass
        except (EOFError, ConnectionResetError):
            pass
        second_client_served(server, img)


# ------------------------------------------------------------------------------------------------
# Listen address, TLS, statistics
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("host", ["0.0.0.0", "", "192.0.2.1"])
def test_non_loopback_listen_address_needs_tls(tmp_path: Path, host: str):
    """Without a TLS context the server refuses an address beyond the machine, with a sentence
    saying what to do."""
    dev = Counting(ImageDevice(_image(tmp_path)))
    with pytest.raises(TricopyError, match="without TLS"):
        NbdServer([Export("A", dev)], host=host, port=0)
    NbdServer([Export("A", dev)], host=host, port=0, tls=ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))  # allowed


def _image(tmp_path: Path) -> Path:
    img = tmp_path / "plain.img"
    img.write_bytes(bytes(SIZE))
    return img


def test_starttls_is_required_and_then_serves(tmp_path: Path):
    """With a TLS context the server is FORCEDTLS: an option before NBD_OPT_STARTTLS gets
    NBD_REP_ERR_TLS_REQD; after STARTTLS the session speaks TLS, and GO, reads and writes work."""
    paths = create_lab_certificates(tmp_path, ["127.0.0.1"])
    server_ctx, client_ctx = make_ssl_contexts(*(tmp_path / paths[k] for k in ("cert", "key", "ca")))
    with serving(tmp_path, tls=server_ctx) as (server, img, _):
        c = Raw(server.port)
        c.greet()
        c.option(p.OPT_LIST)
        assert c.replies()[-1][0] == p.REP_ERR_TLS_REQD
        c.option(p.OPT_STARTTLS)
        assert c.replies() == [(p.REP_ACK, b"")]
        c.sock = client_ctx.wrap_socket(c.sock, server_hostname="127.0.0.1")
        assert c.go()[-1][0] == p.REP_ACK
        assert c.call(p.CMD_WRITE, 0, BS, blocks(11)) == (0, b"")
        assert c.call(p.CMD_READ, 0, BS) == (0, blocks(11))
        c.close()
        assert img.read_bytes()[:BS] == blocks(11)


def test_stats_count_clients_requests_and_bytes(tmp_path: Path):
    """The stats name each connected client by address and count requests, bytes and errors by
    command."""
    with serving(tmp_path) as (server, img, _):
        c = Raw(server.port).connect()
        c.call(p.CMD_WRITE, 0, 2 * BS, blocks(1, 2))
        c.call(p.CMD_READ, 0, BS)
        c.call(p.CMD_READ, SIZE, BS)
        export = server.stats()["exports"][0]
        assert export["clients"] == [f"127.0.0.1:{c.sock.getsockname()[1]}"]
        assert export["requests"] == {"write": 1, "read": 2}
        assert export["bytes"] == {"write": 2 * BS, "read": BS}
        assert export["errors"] == {"EINVAL": 1}
        c.close()
        second_client_served(server, img)
        assert server.stats()["exports"][0]["requests"]["read"] == 3


def test_close_cuts_connected_clients_and_returns(tmp_path: Path):
    """Closing the server ends a connection idle in transmission (the client sees the end) and a
    connection still negotiating; close returns once their threads are gone."""
    with serving(tmp_path) as (server, _, _):
        idle = Raw(server.port).connect()
        negotiating = Raw(server.port)
        negotiating.recv(18)
        server.close()
        assert server.stats()["connections"] == 0
        assert_closed_by_server(idle.sock)
        assert_closed_by_server(negotiating.sock)
