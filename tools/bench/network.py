"""Benchmark (issue 6, part a): loopback throughput of raw TCP vs the authenticated RPC of vstore.net.

Two processes each time: a receiver (raw TCP sink, or a `net.serve` site whose handler discards the
data) and this process as the sender. Raw: `--mib` MiB sent in 1 MiB chunks with `sendall`. RPC:
the same volume as `AsyncClient` calls carrying `--chunk-kib` KiB each, `--window` in flight.
Prints MB/s for each and the ratio rpc/raw.

Usage: python -m tools.bench.network [--mib 256] [--chunk-kib 64] [--window 8]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import socket
import time

from vstore import net

HOST = "127.0.0.1"
KEY = b"bench-key-".ljust(32, b"x")
RAW_CHUNK = 1 << 20


def _raw_sink(port_q: mp.Queue, total: int) -> None:
    with socket.create_server((HOST, 0)) as srv:
        port_q.put(srv.getsockname()[1])
        conn, _ = srv.accept()
        with conn:
            got = 0
            while got < total:
                data = conn.recv(RAW_CHUNK)
                if not data:
                    break
                got += len(data)
            conn.sendall(b"k")


def _rpc_sink(port_q: mp.Queue) -> None:
    async def handler(method: str, args: dict, data: bytes) -> tuple[dict, bytes]:
        return {"n": len(data)}, b""

    async def main() -> None:
        server = await net.serve(HOST, 0, KEY, handler)
        port_q.put(net.bound_port(server))
        await asyncio.Event().wait()

    asyncio.run(main())


def _start(target, *args) -> tuple[mp.Process, int]:
    port_q: mp.Queue = mp.Queue()
    proc = mp.Process(target=target, args=(port_q, *args), daemon=True)
    proc.start()
    return proc, port_q.get(timeout=30)


def bench_raw(total: int) -> float:
    proc, port = _start(_raw_sink, total)
    chunk = b"r" * RAW_CHUNK
    with socket.create_connection((HOST, port)) as sock:
        t0 = time.perf_counter()
        for _ in range(total // RAW_CHUNK):
            sock.sendall(chunk)
        assert sock.recv(1) == b"k"
        elapsed = time.perf_counter() - t0
    proc.join(timeout=30)
    return total / elapsed / 1e6


def bench_rpc(total: int, chunk_size: int, window: int) -> float:
    proc, port = _start(_rpc_sink)
    payload = b"p" * chunk_size

    async def run() -> float:
        client = await net.AsyncClient.connect(HOST, port, KEY, window=window, timeout=60)
        async with client:
            t0 = time.perf_counter()
            await client.call_many(("ship", {"i": i}, payload) for i in range(total // chunk_size))
            return time.perf_counter() - t0

    try:
        elapsed = asyncio.run(run())
    finally:
        proc.terminate()
        proc.join(timeout=30)
    return total / elapsed / 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=256, help="MiB to send in each test")
    ap.add_argument("--chunk-kib", type=int, default=64, help="payload per RPC call (KiB)")
    ap.add_argument("--window", type=int, default=8, help="RPC calls in flight")
    args = ap.parse_args()
    total = args.mib << 20
    raw = bench_raw(total)
    rpc = bench_rpc(total, args.chunk_kib << 10, args.window)
    print(f"{args.mib} MiB over loopback, two processes")
    print(f"{'raw TCP, 1 MiB sendall':<40} {raw:>10.1f} MB/s")
    print(f"{f'RPC, {args.chunk_kib} KiB calls, window {args.window}':<40} {rpc:>10.1f} MB/s")
    print(f"ratio rpc/raw = {rpc / raw:.3f}x")


if __name__ == "__main__":
    main()
