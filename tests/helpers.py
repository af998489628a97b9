"""Plain helpers shared by the tests: labs and their volumes, random block data, the CLI through typer's
CliRunner, jfs images and the trees on them, and the raw network protocol (an attacker or a recorder of
frames). The pytest fixtures built on these are in tests/conftest.py."""

from __future__ import annotations

import contextlib
import hashlib
import random
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import typer
from click.testing import Result
from typer.testing import CliRunner

from jfs.cli import app as jfs_app
from jfs.fs import FileSystem, mkfs
from jfs.scan import metadata_ranges
from vstore.blocks.device import ImageDevice, MemoryDevice, create_image
from vstore.cli.main import app as vstore_app
from vstore.daemons.processes import lab_down
from vstore.lab.system import System
from vstore.net.wire import (
    DEFAULT_MAX_PAYLOAD,
    FRAME_MAGIC,
    HEADER_SIZE,
    MAC_SIZE,
    Session,
    client_finish,
    client_hello,
    encode_request,
    parse_header,
)
from vstore.procedures.create import free_base_port, init_lab

BS = 4096

# -- labs and volumes ---------------------------------------------------------------------------------------


def make_lab(root: Path, name: str = "lab", **kw: Any) -> Path:
    """A fresh lab `root/name` (256 blocks of 4 KiB unless `size` is given)."""
    kw.setdefault("size", 256 * BS)
    lab = root / name
    init_lab(lab, **kw)
    return lab


@contextlib.contextmanager
def daemon_labs(root: Path) -> Iterator[Callable[..., Path]]:
    """A factory of labs on free loopback ports; on exit the daemons of every lab it made are stopped."""
    labs: list[Path] = []

    def make(name: str = "lab", **kw: Any) -> Path:
        lab = make_lab(root, name, base_port=free_base_port(), **kw)
        labs.append(lab)
        return lab

    try:
        yield make
    finally:
        for lab in labs:
            lab_down(lab)


def image(lab: Path, site: str, volume: str) -> bytes:
    """The whole content of one volume of a lab."""
    return (lab / site / f"{volume}.img").read_bytes()


def blocks(seed: int, count: int = 1) -> bytes:
    """`count` blocks of random data, the same for the same seed."""
    return random.Random(seed).randbytes(count * BS)


def open_lab(lab: Path) -> System:
    """The lab in this process (a context manager)."""
    return System(lab)


# -- the command line ---------------------------------------------------------------------------------------


def invoke(app: typer.Typer, *args: object, ok: bool = True, input: str | bytes | None = None) -> Result:
    """Run a typer app through CliRunner; with `ok`, assert it succeeded (showing its output)."""
    result = CliRunner().invoke(app, [str(a) for a in args], input=input)
    if ok:
        assert result.exit_code == 0, result.output + str(result.exception)
    return result


def vstore(*args: object, ok: bool = True, input: str | bytes | None = None) -> Result:
    """`vstore ARGS...` through CliRunner (see `invoke`)."""
    return invoke(vstore_app, *args, ok=ok, input=input)


def jfs(*args: object, ok: bool = True, input: str | bytes | None = None) -> Result:
    """`jfs ARGS...` through CliRunner (see `invoke`)."""
    return invoke(jfs_app, *args, ok=ok, input=input)


# -- jfs images and trees -----------------------------------------------------------------------------------


def mkfs_image(path: Path, size: int = 8 << 20, block_size: int = 4096, **mkfs_kw: Any) -> Path:
    """A new image file at `path` holding an empty jfs (mkfs with `mkfs_kw`)."""
    create_image(path, size, block_size)
    dev = ImageDevice(path, block_size)
    mkfs(dev, **mkfs_kw)
    dev.close()
    return path


def snapshot(path: Path) -> MemoryDevice:
    """A private in-memory copy of an image (so a read-only mount can replay without touching it)."""
    data = path.read_bytes()
    return MemoryDevice(len(data) // 4096, data=data, name=str(path))


def tree(fs: FileSystem, path: str = "/") -> dict[str, tuple]:
    """Every directory (type, mode) and file (type, mode, size, sha256) under `path`."""
    out: dict[str, tuple] = {}
    for name in sorted(fs.listdir(path)):
        p = f"{path.rstrip('/')}/{name}"
        st = fs.stat(p)
        if st.type == "dir":
            out[p] = ("dir", st.mode)
            out.update(tree(fs, p))
        else:
            out[p] = ("file", st.mode, st.size, hashlib.sha256(fs.read(p)).hexdigest())
    return out


def image_tree(path: Path) -> dict[str, tuple]:
    """The `tree` of an image file, after replaying its log in memory."""
    fs = FileSystem.mount(snapshot(path))
    try:
        return tree(fs)
    finally:
        fs.unmount()


def allocated_blocks(path: Path) -> list[int]:
    """Metadata blocks plus every block owned by a reachable inode (after log replay)."""
    dev = snapshot(path)
    fs = FileSystem.mount(dev)
    found: set[int] = set()
    for first, n in metadata_ranges(dev):
        found.update(range(first, first + n))

    def walk(p: str) -> None:
        ino = fs.lookup(p)
        for first, n in fs.data_ranges_of(ino):
            found.update(range(first, first + n))
        if fs.stat(p).type == "dir":
            for name in fs.listdir(p):
                walk(f"{p.rstrip('/')}/{name}")

    walk("/")
    return sorted(found)


def same_allocated_blocks(c: Path, d: Path) -> list[int]:
    """Allocated blocks of C whose content differs in D (after replaying both logs in memory)."""
    cdev, ddev = snapshot(c), snapshot(d)
    FileSystem.mount(cdev).unmount()
    FileSystem.mount(ddev).unmount()
    return [b for b in allocated_blocks(c) if cdev.read(b) != ddev.read(b)]


# -- the network protocol, byte by byte ---------------------------------------------------------------------

KEY = bytes(range(32))
HOST = "127.0.0.1"


def raw_connect(port: int, host: str = HOST) -> socket.socket:
    """A plain TCP connection with a 5 s timeout."""
    sock = socket.create_connection((host, port), timeout=5)
    sock.settimeout(5)
    return sock


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    """Exactly `n` bytes (EOFError if the peer closes first)."""
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError
        buf += chunk
    return buf


def read_frame(sock: socket.socket) -> bytes:
    """One whole frame as sent: header, payload and MAC."""
    head = recv_exactly(sock, HEADER_SIZE)
    header = parse_header(head, DEFAULT_MAX_PAYLOAD)
    return head + recv_exactly(sock, header.length + MAC_SIZE)


def handshake(sock: socket.socket, key: bytes = KEY) -> tuple[Session, bytes]:
    """The client side of the handshake; returns the session and the HELLO frame sent."""
    nonce, hello = client_hello(key)
    sock.sendall(hello)
    return client_finish(key, nonce, read_frame(sock), DEFAULT_MAX_PAYLOAD), hello


def request(session: Session, rid: int = 1, method: str = "echo") -> bytes:
    """A sealed request frame of `session`."""
    return session.seal(rid, encode_request(method, {"rid": rid}, b"payload"))


def send_quietly(sock: socket.socket, data: bytes) -> None:
    """Send, ignoring a server that already closed the connection."""
    try:
        sock.sendall(data)
    except (BrokenPipeError, ConnectionResetError):
        pass


def assert_closed_by_server(sock: socket.socket) -> None:
    """The server closes the connection (EOF or reset) without answering, within the timeout."""
    try:
        while True:
            data = sock.recv(65536)
            assert not data.startswith(FRAME_MAGIC), "server answered a bad frame"
            if not data:
                break
    except ConnectionResetError:
        pass
    finally:
        sock.close()
