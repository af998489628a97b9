"""The NBD server: named exports of block devices served to unmodified clients (qemu, libnbd,
nbd-client) over TCP (SPEC §6 [0133]-[0135], the intermediate server of embodiment 2;
NetworkBlockDevice `doc/proto.md`). Negotiation and request rules are `vstore.nbd.session`.

Keeps true:
- One thread per connection, requests served one at a time in arrival order and answered in that
  order (proto.md allows any order; the device calls are blocking, so threads, not asyncio). Any
  number of connections share an export's device.
- A request's payload is received whole before anything is checked or written; a client that
  goes away between a header and its payload has written nothing. Bad bytes, a bad request or a
  failing device end in an NBD error reply or a closed connection with the reason logged, never in
  a half-written request or a stopped server; other connections go on being served.
- Every write to an export (WRITE, WRITE_ZEROES, TRIM, each with its read-modify-write of partial
  blocks) and every flush runs under the export's one lock, so writes enter the device one at a
  time, a partial-block write is never interleaved with an overlapping one (never torn), and a
  write is acknowledged only after it is in the device: a write issued after an acknowledgement
  lands after it. NBD_CMD_FLAG_FUA on WRITE is the device's `write_fua`; on WRITE_ZEROES and TRIM
  a `flush` after them; NBD_CMD_FLUSH is the device's `flush`.
- Errors: past the end EINVAL (ENOSPC for writes), a read over the maximum payload EINVAL, a
  WRITE over it closes the connection (its data cannot be skipped), read-only EPERM, a device
  error (`TricopyError`, `OSError`: a fenced write too) EIO with the reason logged and, with
  structured replies, sent to the client as the error message.
- The server listens on a loopback address only, unless it is given a TLS context: then it runs
  in FORCEDTLS mode (NBD_OPT_STARTTLS before anything else).
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import socket
import ssl
import threading
from collections import Counter
from collections.abc import Sequence
from typing import Protocol

from vstore.blocks.errors import FormatError, ReadOnlyError, TricopyError, brief
from vstore.nbd import proto as p
from vstore.nbd.session import (
    DEFAULT_MAX_PAYLOAD,
    ExportInfo,
    Negotiation,
    ProtocolError,
    Request,
    check_request,
    frame_error,
    parse_request,
)

log = logging.getLogger(__name__)

DEFAULT_PORT = 10809
NEGOTIATION_TIMEOUT = 30.0  # seconds a client may take over the handshake before it is dropped
MAX_CONNECTIONS = 64
ERRNO_NAMES = {p.EPERM: "EPERM", p.EIO: "EIO", p.EINVAL: "EINVAL", p.ENOSPC: "ENOSPC",
               p.EOVERFLOW: "EOVERFLOW", p.ENOTSUP: "ENOTSUP"}


class ExportDevice(Protocol):
    """What an export serves: whole blocks, as `vstore.blocks.device.BlockDevice` has them."""

    block_size: int
    readonly: bool

    @property
    def size_bytes(self) -> int: ...

    def read(self, lba: int, count: int = 1) -> bytes: ...

    def write(self, lba: int, data: bytes) -> None: ...

    def write_fua(self, lba: int, data: bytes) -> None: ...

    def write_zeroes(self, lba: int, count: int) -> None: ...

    def flush(self) -> None: ...


class Export:
    """A named device as NBD serves it: byte ranges made whole blocks (read-modify-write of the
    partial ones under the export's lock), TRIM as zeroes of the whole blocks inside its range,
    and the export's statistics. `exclusive`: reads take the lock too (a device that is not safe
    for a read concurrent with a write)."""

    def __init__(self, name: str, device: ExportDevice, *, readonly: bool = False, description: str = "",
                 max_payload: int = DEFAULT_MAX_PAYLOAD, exclusive: bool = False) -> None:
        if not name or len(name.encode()) > p.MAX_STRING:
            raise TricopyError(f"an NBD export name must be 1 to {p.MAX_STRING} bytes, got {brief(name)}")
        bs = device.block_size
        if bs <= 0 or bs & (bs - 1) or bs > 65536 or max_payload < max(bs, 4096):
            raise TricopyError(f"export {name}: NBD needs a power-of-two block size of at most 64 KiB and a maximum "
                               f"payload of at least the preferred block; got {bs} and {max_payload}")
        self.name = name
        self.device = device
        self.block_size = device.block_size
        self.info = ExportInfo(name=name, size=device.size_bytes, block_size=device.block_size,
                               readonly=readonly or device.readonly, max_payload=max_payload,
                               description=description)
        self.lock = threading.Lock()
        self.exclusive = exclusive
        self._stats_lock = threading.Lock()
        self._clients: dict[int, str] = {}
        self._requests: Counter[str] = Counter()
        self._bytes: Counter[str] = Counter()
        self._errors: Counter[str] = Counter()

    # -- I/O in bytes ----------------------------------------------------------------------------
    def _span(self, offset: int, length: int) -> tuple[int, int]:
        bs = self.block_size
        return offset // bs, -(-(offset + length) // bs)

    def read(self, offset: int, length: int) -> bytes:
        if length == 0:
            return b""
        first, end = self._span(offset, length)
        with self.lock if self.exclusive else contextlib.nullcontext():
            data = self.device.read(first, end - first)
        skip = offset - first * self.block_size
        return data if skip == 0 and len(data) == length else data[skip:skip + length]

    def _whole(self, offset: int, data: bytes) -> tuple[int, bytes]:
        """(first block, whole blocks) of a write of `data` at `offset`: the partial blocks at its
        ends are read and merged (call under the lock)."""
        bs = self.block_size
        first, end = self._span(offset, len(data))
        head = offset - first * bs
        if head == 0 and len(data) % bs == 0:
            return first, data
        buf = bytearray((end - first) * bs)
        if head:
            buf[:bs] = self.device.read(first, 1)
        if (offset + len(data)) % bs and (end - 1 > first or not head):
            buf[-bs:] = self.device.read(end - 1, 1)
        buf[head:head + len(data)] = data
        return first, bytes(buf)

    def write(self, offset: int, data: bytes, *, fua: bool = False) -> None:
        if not data:
            return
        with self.lock:
            lba, blocks = self._whole(offset, data)
            (self.device.write_fua if fua else self.device.write)(lba, blocks)

    def write_zeroes(self, offset: int, length: int, *, fua: bool = False, no_hole: bool = False) -> None:
        with self.lock:
            self._zero(offset, length, no_hole=no_hole)
            if fua:
                self.device.flush()

    def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        """Zeroes of the whole blocks inside the range (proto.md lets a server round a trim inward;
        what a trimmed range reads afterwards is unspecified, and zeros are one such content)."""
        bs = self.block_size
        first, end = -(-offset // bs), (offset + length) // bs
        if end <= first:
            return
        with self.lock:
            self.device.write_zeroes(first, end - first)
            if fua:
                self.device.flush()

    def _zero(self, offset: int, length: int, *, no_hole: bool) -> None:
        bs = self.block_size
        end = offset + length
        first, last = -(-offset // bs), end // bs  # the whole blocks inside
        if last <= first:  # inside one block, or across one boundary without a whole block
            if length:
                lba, blocks = self._whole(offset, bytes(length))
                self.device.write(lba, blocks)
            return
        if offset < first * bs:
            lba, blocks = self._whole(offset, bytes(first * bs - offset))
            self.device.write(lba, blocks)
        if no_hole:  # the client wants the blocks allocated: write real zeros
            step = max(1, self.info.max_payload // bs)
            for at in range(first, last, step):
                self.device.write(at, bytes(min(step, last - at) * bs))
        else:
            self.device.write_zeroes(first, last - first)
        if end > last * bs:
            lba, blocks = self._whole(last * bs, bytes(end - last * bs))
            self.device.write(lba, blocks)

    def flush(self) -> None:
        with self.lock:
            self.device.flush()

    # -- statistics ------------------------------------------------------------------------------
    def attach(self, conn_id: int, peer: str) -> None:
        with self._stats_lock:
            self._clients[conn_id] = peer

    def detach(self, conn_id: int) -> None:
        with self._stats_lock:
            self._clients.pop(conn_id, None)

    def count(self, command: str, nbytes: int, error: int = 0) -> None:
        with self._stats_lock:
            self._requests[command] += 1
            if error:
                self._errors[ERRNO_NAMES.get(error, str(error))] += 1
            else:
                self._bytes[command] += nbytes

    def stats(self) -> dict:
        """{name, size_bytes, block_size, readonly, clients: [peer], requests/bytes/errors: {...}}."""
        with self._stats_lock:
            return {"name": self.name, "size_bytes": self.info.size, "block_size": self.block_size,
                    "readonly": self.info.readonly, "clients": sorted(self._clients.values()),
                    "requests": dict(self._requests), "bytes": dict(self._bytes), "errors": dict(self._errors)}


def check_listen_address(host: str, tls: ssl.SSLContext | None) -> None:
    """Refuse to serve a volume in the clear beyond this machine."""
    if tls is not None:
        return
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host or None, None)} if host else set()
        loopback = bool(addresses) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses)
    except (socket.gaierror, ValueError, UnicodeError):
        raise TricopyError(f"cannot resolve the NBD listen address {brief(host)}; give an IP address") from None
    if not loopback:
        raise TricopyError(f"refusing to serve NBD on {brief(host)} without TLS: the volume's data would cross "
                           "the network in the clear; listen on 127.0.0.1 or use a lab with TLS certificates")


class _Gone(Exception):
    """The peer closed the connection."""


class _Connection:
    """One client: negotiation, then requests until NBD_CMD_DISC or a close."""

    def __init__(self, server: NbdServer, sock: socket.socket, peer: str, conn_id: int) -> None:
        self.server, self.sock, self.peer, self.id = server, sock, peer, conn_id
        self.export: Export | None = None

    def run(self) -> None:
        try:
            self.sock.settimeout(NEGOTIATION_TIMEOUT)
            found = self._negotiate()
            if found is not None:
                self.sock.settimeout(None)
                self._transmit(*found)
        except _Gone:
            log.info("NBD client %s closed the connection", self.peer)
        except (ProtocolError, FormatError) as err:
            log.warning("NBD client %s: %s; connection closed", self.peer, err)
        except (OSError, ssl.SSLError) as err:  # socket.timeout is an OSError
            if not self.server.closing:
                log.warning("NBD client %s: %s; connection closed", self.peer, err or type(err).__name__)
        except Exception:
            log.exception("NBD client %s: unexpected error; connection closed", self.peer)
        finally:
            if self.export is not None:
                self.export.detach(self.id)
            with contextlib.suppress(OSError):
                self.sock.close()
            self.server._forget(self)

    def shutdown(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)

    # -- bytes -----------------------------------------------------------------------------------
    def _recv(self, n: int) -> bytearray:
        buf = bytearray(n)
        view, got = memoryview(buf), 0
        while got < n:
            k = self.sock.recv_into(view[got:])
            if k == 0:
                raise _Gone
            got += k
        return buf

    def _send(self, head: bytes, data: bytes = b"") -> None:
        if len(data) < 65536:
            self.sock.sendall(head + data)
        else:
            self.sock.sendall(head)
            self.sock.sendall(data)

    # -- negotiation -----------------------------------------------------------------------------
    def _negotiate(self) -> tuple[Export, bool] | None:
        tls = self.server.tls
        neg = Negotiation([e.info for e in self.server.exports], tls_available=tls is not None)
        self._send(neg.greeting())
        while neg.needed:
            step = neg.feed(bytes(self._recv(neg.needed)))
            if step.reply:
                self._send(step.reply)
            if step.close is not None:
                log.log(logging.INFO if step.clean else logging.WARNING, "NBD client %s: %s; connection closed",
                        self.peer, step.close)
                return None
            if step.starttls and tls is not None:
                self.sock = tls.wrap_socket(self.sock, server_side=True)
                neg.tls_started()
            if step.export is not None:
                export = next(e for e in self.server.exports if e.info is step.export)
                self.export = export
                export.attach(self.id, self.peer)
                return export, neg.structured
        return None

    # -- transmission ----------------------------------------------------------------------------
    def _transmit(self, export: Export, structured: bool) -> None:
        info = export.info
        while True:
            req = parse_request(self._recv(p.REQUEST_SIZE))
            why = frame_error(req, info)
            if why is not None:
                export.count(req.name, 0, p.EINVAL)
                raise ProtocolError(why)
            payload = bytes(self._recv(req.length)) if req.type == p.CMD_WRITE else b""
            if req.type == p.CMD_DISC:
                log.info("NBD client %s disconnected (NBD_CMD_DISC)", self.peer)
                return
            code, message, data = self._serve(export, req, payload, structured)
            export.count(req.name, req.length, code)  # before the reply: a client that saw it sees the count
            self._reply(req, structured, code, message, data)

    def _serve(self, export: Export, req: Request, payload: bytes, structured: bool) -> tuple[int, str, bytes]:
        """(NBD error, message, read data) of one request."""
        refused = check_request(req, export.info, structured)
        if refused is not None:
            log.info("NBD client %s: %s refused: %s", self.peer, req.name, refused[1])
            return refused[0], refused[1], b""
        try:
            return 0, "", self._perform(export, req, payload)
        except ReadOnlyError as err:
            return p.EPERM, str(err), b""
        except (TricopyError, OSError) as err:
            log.error("NBD export %s: %s at byte %d (%d bytes) failed: %s", export.name, req.name,
                      req.offset, req.length, err)
            return p.EIO, f"{req.name} failed: {err}", b""

    def _perform(self, export: Export, req: Request, payload: bytes) -> bytes:
        fua = bool(req.flags & p.CMD_FLAG_FUA)
        if req.type == p.CMD_READ:
            return export.read(req.offset, req.length)
        if req.type == p.CMD_WRITE:
            export.write(req.offset, payload, fua=fua)
        elif req.type == p.CMD_FLUSH:
            export.flush()
        elif req.type == p.CMD_WRITE_ZEROES:
            export.write_zeroes(req.offset, req.length, fua=fua, no_hole=bool(req.flags & p.CMD_FLAG_NO_HOLE))
        elif req.type == p.CMD_TRIM:
            export.trim(req.offset, req.length, fua=fua)
        return b""

    def _reply(self, req: Request, structured: bool, error: int, message: str, data: bytes = b"") -> None:
        if structured and error:
            text = message.encode()[:1024].decode("utf-8", "ignore")
            payload = p.ERROR_CHUNK.build({"error": error, "message": text})
            self._send(p.CHUNK_FAST.pack(p.STRUCTURED_REPLY_MAGIC, p.REPLY_FLAG_DONE, p.REPLY_TYPE_ERROR,
                                         req.cookie, len(payload)) + payload)
        elif structured and req.type == p.CMD_READ:
            if data:
                self._send(p.OFFSET_DATA_FAST.pack(p.STRUCTURED_REPLY_MAGIC, p.REPLY_FLAG_DONE,
                                                   p.REPLY_TYPE_OFFSET_DATA, req.cookie, 8 + len(data), req.offset),
                           data)
            else:
                self._send(p.CHUNK_FAST.pack(p.STRUCTURED_REPLY_MAGIC, p.REPLY_FLAG_DONE, p.REPLY_TYPE_NONE,
                                             req.cookie, 0))
        else:
            self._send(p.SIMPLE_REPLY_FAST.pack(p.SIMPLE_REPLY_MAGIC, error, req.cookie), data)


class NbdServer:
    """Serves `exports` on host:port (port 0: any free port; `address` says which) until `close`."""

    def __init__(self, exports: Sequence[Export], host: str = "127.0.0.1", port: int = DEFAULT_PORT, *,
                 tls: ssl.SSLContext | None = None, max_connections: int = MAX_CONNECTIONS) -> None:
        names = [e.name for e in exports]
        if not exports or len(set(names)) != len(names):
            raise TricopyError(f"an NBD server needs one or more exports with distinct names, got {names}")
        check_listen_address(host, tls)
        self.exports = list(exports)
        self.host, self.port, self.tls = host, port, tls
        self.max_connections = max_connections
        self.closing = False
        self._listener: socket.socket | None = None
        self._accepter: threading.Thread | None = None
        self._lock = threading.Lock()
        self._connections: dict[_Connection, threading.Thread] = {}
        self._next_id = 0

    def start(self) -> NbdServer:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        try:
            listener = socket.create_server((self.host, self.port), family=family, backlog=16)
        except OSError as err:
            raise TricopyError(f"cannot listen for NBD on {self.host}:{self.port}: {err.strerror or err}") from None
        listener.settimeout(0.5)  # the accept loop looks at `closing` this often
        self._listener = listener
        self.port = listener.getsockname()[1]
        self._accepter = threading.Thread(target=self._accept_loop, name=f"nbd-accept-{self.port}", daemon=True)
        self._accepter.start()
        log.info("NBD server on %s:%d serving %s", self.host, self.port, ", ".join(e.name for e in self.exports))
        return self

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    def url(self, name: str | None = None) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"nbd://{host}:{self.port}/{name if name is not None else self.exports[0].name}"

    def serve_forever(self) -> None:
        """Start (if not started) and wait until `close` is called from another thread or a signal."""
        if self._accepter is None:
            self.start()
        assert self._accepter is not None
        while self._accepter.is_alive():
            self._accepter.join(0.5)

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self.closing:
            try:
                sock, addr = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                if self.closing:
                    return
                continue
            peer = f"{addr[0]}:{addr[1]}"
            with self._lock:
                if len(self._connections) >= self.max_connections:
                    log.warning("NBD client %s refused: %d connections already", peer, len(self._connections))
                    sock.close()
                    continue
                self._next_id += 1
                sock.settimeout(NEGOTIATION_TIMEOUT)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                conn = _Connection(self, sock, peer, self._next_id)
                thread = threading.Thread(target=conn.run, name=f"nbd-{peer}", daemon=True)
                self._connections[conn] = thread
            thread.start()

    def _forget(self, conn: _Connection) -> None:
        with self._lock:
            self._connections.pop(conn, None)

    def close(self) -> None:
        """Stop accepting, cut every connection, wait for their threads (a request in the device is
        finished first: its thread ends when it next reads the socket)."""
        self.closing = True
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.close()
        if self._accepter is not None and self._accepter is not threading.current_thread():
            self._accepter.join()
        with self._lock:
            conns = list(self._connections.items())
        for conn, _ in conns:
            conn.shutdown()
        for _, thread in conns:
            if thread is not threading.current_thread():
                thread.join()

    def stats(self) -> dict:
        """{listen, tls, connections, exports: [Export.stats()]}: for `status --json`."""
        with self._lock:
            connections = len(self._connections)
        return {"listen": f"{self.host}:{self.port}", "tls": self.tls is not None, "connections": connections,
                "exports": [e.stats() for e in self.exports]}

    def __enter__(self) -> NbdServer:
        return self.start() if self._accepter is None else self

    def __exit__(self, *exc: object) -> None:
        self.close()
