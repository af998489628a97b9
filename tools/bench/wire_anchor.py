"""The minimal shipping pair the network benchmark compares tricopy's shipping with, and the MAC
candidates it measured for the frames (`python -m tools.bench.network --macs`).

The minimal pair does only what shipping must: the sender preads 4 MiB of the spool's bytes, MACs
them with the frames' MAC (AES-256-GCM tag, the sequence number as nonce) and sends header, chunk
and tag with one `sendmsg`; the receiver `recv_into`s a preallocated buffer, verifies the tag and
pwrites the chunk (and, in its durable form, fdatasyncs it: what a receiver that keeps each
chunk on disk before the next one must do at least). No framing of entries, no journal, no
confirmation.
"""

from __future__ import annotations

import hashlib
import hmac
import multiprocessing as mp
import os
import socket
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from cryptography.hazmat.primitives.poly1305 import Poly1305

from vstore.net import wire

HOST = "127.0.0.1"
KEY = b"bench-key-".ljust(32, b"x")


ANCHOR_CHUNK = 4 << 20
_ANCHOR_HEAD = struct.Struct(">IQ")  # length, sequence


def _start(target: Callable[..., None], *args: Any) -> tuple[mp.Process, int]:
    port_q: mp.Queue = mp.Queue()
    proc = mp.Process(target=target, args=(port_q, *args), daemon=True)
    proc.start()
    return proc, port_q.get(timeout=30)


def _anchor_receiver(port_q: mp.Queue, out: str, sync: bool = False) -> None:
    """recv_into a preallocated buffer, verify the tag, pwrite (`sync`: then fdatasync); one byte
    back at the end."""
    aead = AESGCM(KEY)
    fd = os.open(out, os.O_WRONLY | os.O_CREAT, 0o600)
    buf = bytearray(ANCHOR_CHUNK + 16)
    head = bytearray(_ANCHOR_HEAD.size)
    with socket.create_server((HOST, 0)) as srv:
        port_q.put(srv.getsockname()[1])
        conn, _ = srv.accept()
        with conn:
            offset = 0
            while True:
                if conn.recv_into(head, len(head), socket.MSG_WAITALL) < len(head):
                    break
                length, seq = _ANCHOR_HEAD.unpack(head)
                view = memoryview(buf)[:length + 16]
                got = 0
                while got < len(view):
                    got += conn.recv_into(view[got:])
                aead.decrypt(struct.pack(">QI", seq, 0), bytes(view[length:]), view[:length])
                os.pwrite(fd, view[:length], offset)
                if sync:
                    os.fdatasync(fd)
                offset += length
            conn.sendall(b"k")
    os.close(fd)


def bench_anchor(source: Path, out: Path, *, sync: bool = False) -> tuple[float, float]:
    """(MB/s, sender CPU s) of the file `source` sent by pread + MAC + sendmsg to `_anchor_receiver`
    (`sync`: the receiver fdatasyncs each chunk)."""
    out.unlink(missing_ok=True)  # a new file each time: blocks allocated, as in the Async site's sparse image
    proc, port = _start(_anchor_receiver, str(out), sync)
    aead = AESGCM(KEY)
    fd = os.open(source, os.O_RDONLY)
    size = os.fstat(fd).st_size
    try:
        with socket.create_connection((HOST, port)) as sock:
            t0, c0 = time.perf_counter(), time.process_time()
            for seq, offset in enumerate(range(0, size, ANCHOR_CHUNK)):
                chunk = os.pread(fd, ANCHOR_CHUNK, offset)
                tag = aead.encrypt(struct.pack(">QI", seq, 0), b"", chunk)
                parts = [memoryview(_ANCHOR_HEAD.pack(len(chunk), seq)), memoryview(chunk), memoryview(tag)]
                while parts:
                    sent = sock.sendmsg(parts)
                    while parts and sent >= len(parts[0]):
                        sent -= len(parts.pop(0))
                    if parts and sent:
                        parts[0] = parts[0][sent:]
            sock.shutdown(socket.SHUT_WR)
            assert sock.recv(1) == b"k"
            elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    finally:
        os.close(fd)
        proc.join(timeout=30)
    return size / elapsed / 1e6, cpu


def _per_call(fn: Callable[[], object], seconds: float = 0.3) -> float:
    fn()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        fn()
        n += 1
    return (time.perf_counter() - t0) / n * 1e6


def _candidates(head: bytes, payload: bytes) -> list[tuple[str, Callable[[], object]]]:
    gcm, chacha = AESGCM(KEY), ChaCha20Poly1305(KEY)
    nonce = struct.pack(">QI", 1, 0)

    def hmac_sha256() -> object:
        h = hmac.new(KEY, head, hashlib.sha256)
        h.update(payload)
        return h.digest()

    def blake2b() -> object:
        h = hashlib.blake2b(head, key=KEY, digest_size=16)
        h.update(payload)
        return h.digest()

    def poly1305() -> object:
        p = Poly1305(hashlib.blake2b(nonce, key=KEY, digest_size=32).digest())
        p.update(head)
        p.update(payload)
        return p.finalize()

    frame_key = wire._FrameKey(KEY, wire.T_REQUEST)
    return [("HMAC-SHA256, incremental", hmac_sha256), ("keyed BLAKE2b, incremental", blake2b),
            ("Poly1305, per-frame key, incremental", poly1305),
            ("ChaCha20-Poly1305 tag, joined", lambda: chacha.encrypt(nonce, b"", head + payload)),
            ("AES-256-GCM tag, joined", lambda: gcm.encrypt(nonce, b"", head + payload)),
            ("AES-256-GCM tag, the frames' (pieces)", lambda: frame_key.tag(1, [head, payload])),
            ("copy of the payload (reference)", lambda: bytearray(payload))]


def bench_macs() -> list[str]:
    """(d): each MAC candidate per 4 KiB and 4 MiB frame, and one 4 KiB RPC round trip's codec."""
    lines = ["(d) MAC per frame (one core; pieces: 23-byte header and the payload; 16-byte tags)"]
    for size in (4096, 4 << 20):
        for name, fn in _candidates(b"h" * 23, os.urandom(size)):
            us = _per_call(fn)
            lines.append(f"    {size:>8} B  {name:<40} {us:10.1f} us  {size / us / 1e3:8.2f} GB/s")
    client, server = wire.Session(KEY, KEY[::-1], 3, 4, 1 << 26), wire.Session(KEY[::-1], KEY, 4, 3, 1 << 26)
    data = os.urandom(4096)

    def round_trip() -> None:
        parts = client.seal_parts(1, wire.request_parts("app.write", {"volume": 0, "lba": 7}, data))
        wire.decode_request(server.open(b"".join(parts)).payload)
        wire.decode_response(client.open(b"".join(server.seal_parts(1, wire.response_parts(0, {})))).payload)

    lines.append(f"    4 KiB RPC request + empty answer, both ends' codecs and MACs: {_per_call(round_trip):.1f} us")
    lines.append(f"    parse_header: {_per_call(lambda: wire.parse_header(wire._pack_header(3, 1, 1, 9), 99)):.2f} us")
    return lines
