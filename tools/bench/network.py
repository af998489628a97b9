"""Benchmark: the network path of the site daemons, side by side in one run.

(a) Raw loopback TCP throughput between two processes (1 MiB `sendall`s into a sink process); for
    context, the authenticated RPC of `vstore.net` alone into a sink process that discards the data
    (64 KiB calls, 8 in flight).
(b) Async shipping throughput with real daemons: a provider-mode lab is brought up (`lab_up`: three
    site daemons and the shipper process), the shipper process is stopped, `--writes` application
    writes of 64 KiB (16 blocks) go to the primary daemon (`app.write`) and pile up in the spool,
    then the shipper is started and timed until the Async site has applied every entry (its
    daemon's `journal.applied`, polled every 5 ms). Throughput = writes x 64 KiB / elapsed, timed
    from the moment the shipper process is ready (its start-up is shown apart, and a second figure
    counts it). Beside it, in the same run: a minimal Python sender/receiver pair with the same MAC
    as the frames (pread 4 MiB + AES-256-GCM tag + sendmsg of header, chunk, tag; recv_into +
    verify + pwrite), over the same bytes; and the lag (entries acknowledged but not yet applied)
    while one client writes at full speed with the shipper running. Goals: shipping >= 0.7x the
    minimal sender and >= 0.3x raw TCP; the lag bounded.
(c) Sync write latency: a second provider-mode lab whose primary-sync link goes through the fault
    proxy (`vstore.net.linkproxy`) with 1 ms delay in each direction. `--samples` 4 KiB
    application writes to the primary daemon, each acknowledged only once C has it through the
    proxy, p50/p99. Beside it: the proxy's round trip alone (a raw TCP 4 KiB request / 1-byte reply
    through a second 1 ms proxy to an echo process; also an authenticated `ping` RPC to the sync
    daemon through the link's proxy), the application->primary daemon hop (`ping` to the primary
    directly) and a local 4 KiB write + flush under the lab's flush policy (`ImageDevice`).
    Goal: sync write p50 <= raw proxy RTT p50 + local write p50 + 150 us (the measured write
    includes the application->primary hop; the check does not subtract it).

Labs use the default: flushes are durable (the receive journal syncs each batch's own file and
its directory, and the volumes once per checkpoint: group commit); `--unsafe-no-flush` makes them
do nothing. For context (b) also shows the minimal pair with a receiver that fdatasyncs each 4 MiB
chunk.

(d) with `--macs`: what each MAC candidate costs per 4 KiB and per 4 MiB frame, and one 4 KiB RPC
    request plus its empty answer through both ends' codecs (seal, open, encode, decode).

Usage: python -m tools.bench.network [--mib 256] [--writes 1000] [--samples 300] [--unsafe-no-flush] [--quick] [--macs]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing as mp
import os
import random
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from tools.bench.wire_anchor import _start, bench_anchor, bench_macs
from vstore.blocks.device import ImageDevice, create_image
from vstore.daemons.processes import SHIPPER, lab_down, lab_up, running_pid, start_site, stop_site
from vstore.lab.topology import Topology, load_topology
from vstore.net.client import Client, Peer
from vstore.net.keys import load_key
from vstore.net.linkproxy import LinkProxy
from vstore.net.rpc import APP_WRITE, JOURNAL_APPLIED, PING, SPOOL_ACKED, STATUS
from vstore.net.server import bound_port, serve
from vstore.procedures.create import free_base_port, init_lab

HOST = "127.0.0.1"
KEY = b"bench-key-".ljust(32, b"x")
RAW_CHUNK = 1 << 20
BS = 4096
SHIP_WRITE = 64 << 10
POLL_S = 0.005
DELAY_MS = 1.0
BUDGET_US = 150.0
WARMUP = 10


# -- helpers -----------------------------------------------------------------------------------------
def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile `q` (0..100) of `values`."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


def _stop(proc: mp.Process) -> None:
    if proc.is_alive():
        proc.terminate()
    proc.join(timeout=30)


@contextlib.contextmanager
def running_lab(root: Path, name: str, *, size: int, durable: bool,
                spool_capacity: int = 256 << 20) -> Iterator[tuple[Path, Topology, bytes]]:
    """A provider-mode lab with its daemons (and shipper process) up; stopped on the way out."""
    lab = root / name
    init_lab(lab, mode="provider", size=size, unsafe_no_flush=not durable, spool_capacity=spool_capacity,
             base_port=free_base_port())
    try:
        lab_up(lab)
        topo = load_topology(lab)
        yield lab, topo, load_key(lab / topo.key_file)
    finally:
        lab_down(lab)


def peer(topo: Topology, key: bytes, site: str, timeout: float = 60.0) -> Peer:
    spec = topo.sites[site]
    return Peer(spec.host, spec.port, key, timeout=timeout)


# -- (a) raw TCP and the RPC transport ------------------------------------------------------------------
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
        server = await serve(HOST, 0, KEY, handler)
        port_q.put(bound_port(server))
        await asyncio.Event().wait()

    asyncio.run(main())


def bench_raw(total: int) -> float:
    """MB/s of `total` bytes sent with 1 MiB sendalls to a sink process (until its 1-byte ack)."""
    proc, port = _start(_raw_sink, total)
    try:
        chunk = b"r" * RAW_CHUNK
        with socket.create_connection((HOST, port)) as sock:
            t0 = time.perf_counter()
            for _ in range(total // RAW_CHUNK):
                sock.sendall(chunk)
            assert sock.recv(1) == b"k"
            elapsed = time.perf_counter() - t0
    finally:
        _stop(proc)
    return total / elapsed / 1e6


def bench_rpc(total: int, chunk_size: int, window: int) -> float:
    """MB/s of `total` bytes as authenticated RPC calls of `chunk_size` into a discarding process."""
    proc, port = _start(_rpc_sink)
    payload = b"p" * chunk_size

    try:
        with Client(HOST, port, KEY, timeout=60) as client:
            t0 = time.perf_counter()
            client.call_many((("ship", {"i": i}, payload) for i in range(total // chunk_size)), window)
            elapsed = time.perf_counter() - t0
    finally:
        _stop(proc)
    return total / elapsed / 1e6


def spool_bytes(lab: Path) -> Path:
    """One file holding the lab's spool segments, as the anchor's source (the same bytes)."""
    out = lab / "anchor-source.bin"
    with open(out, "wb") as f:
        for seg in sorted((lab / "primary" / "spool").glob("seg-*.log")):
            f.write(seg.read_bytes())
    return out


@dataclass
class Lag:
    writes: int
    seconds: float
    samples: list[int]
    drained_s: float  # after the last write, until the Async site applied everything


def measure_lag(topo: Topology, key: bytes, writes: int, slots: int) -> Lag:
    """One client writes 64 KiB at full speed with the shipper running; the lag is sampled meanwhile."""
    samples: list[int] = []
    done = threading.Event()

    def sample() -> None:
        with peer(topo, key, "primary") as primary, peer(topo, key, "async") as async_peer:
            while not done.is_set():
                samples.append(primary.call(SPOOL_ACKED)[0]["acked"] - applied_seq(async_peer))
                time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    data = random.Random(5).randbytes(SHIP_WRITE)
    with peer(topo, key, "primary") as primary, peer(topo, key, "async") as async_peer:
        sampler.start()
        t0 = time.perf_counter()
        for i in range(writes):
            primary.call(APP_WRITE, {"volume": 0, "lba": (i % slots) * (SHIP_WRITE // BS)}, data)
        seconds = time.perf_counter() - t0
        done.set()
        sampler.join()
        t1 = time.perf_counter()
        wait_applied(async_peer, primary.call(SPOOL_ACKED)[0]["acked"], timeout=300)
    return Lag(writes, seconds, samples, time.perf_counter() - t1)


# -- (b) shipping throughput -----------------------------------------------------------------------------
@dataclass
class ShipResult:
    writes: int
    write_seconds: float  # the writes into the spool, shipping stopped
    startup_seconds: float  # `start_site(lab, "shipper")` until the process is ready
    seconds: float  # from the shipper being ready until the Async site applied the last entry
    shipped: int  # entries applied in `seconds` (all of them unless some went before `ready`)
    cpu: dict[str, float]  # CPU seconds each process used from `ready` to the end (Linux /proc)
    anchor: tuple[float, float] = (0.0, 0.0)  # the minimal sender: MB/s, sender CPU seconds
    anchor_synced: float = 0.0  # the same with a receiver that fdatasyncs each 4 MiB chunk: MB/s (context)
    lag: Lag | None = None

    @property
    def mbs(self) -> float:
        return self.shipped * SHIP_WRITE / self.seconds / 1e6

    @property
    def mbs_with_startup(self) -> float:
        return self.writes * SHIP_WRITE / (self.seconds + self.startup_seconds) / 1e6


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU time of process `pid` (NaN where /proc is not available)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return float("nan")


def applied_seq(async_peer: Peer) -> int:
    return int(async_peer.call(JOURNAL_APPLIED)[0]["applied_seq"])


def wait_applied(async_peer: Peer, target: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while applied_seq(async_peer) < target:
        if time.monotonic() > deadline:
            raise TimeoutError(f"the Async site did not apply up to entry {target} within {timeout:.0f}s")
        time.sleep(POLL_S)


def waiting_entries(primary: Peer) -> int:
    status = primary.call(STATUS)[0]["status"]
    return sum(p["entries_waiting"] for p in status["pairs"])


def bench_shipping(root: Path, writes: int, durable: bool) -> ShipResult:
    """Stop the lab's shipper process, write into the spool, start the shipper and time it."""
    slots = min(writes, 1024)  # at most a 64 MiB volume; later writes wrap around (no coalescing)
    per = SHIP_WRITE // BS
    spool = max(256 << 20, writes * (SHIP_WRITE + 4096) * 2)
    with running_lab(root, "ship", size=slots * SHIP_WRITE, durable=durable, spool_capacity=spool) as (lab, topo, key):
        if not running_pid(lab, SHIPPER):
            raise RuntimeError(f"lab up started no {SHIPPER} process")
        with peer(topo, key, "primary") as primary, peer(topo, key, "async") as async_peer:
            base = applied_seq(async_peer)
            stop_site(lab, SHIPPER)
            data = [random.Random(i).randbytes(SHIP_WRITE) for i in range(min(writes, 16))]
            t0 = time.perf_counter()
            for i in range(writes):
                primary.call(APP_WRITE, {"volume": 0, "lba": (i % slots) * per}, data[i % len(data)])
            write_seconds = time.perf_counter() - t0
            waiting = waiting_entries(primary)
            if waiting != writes or applied_seq(async_peer) != base:
                raise RuntimeError(f"{waiting} entries waiting after {writes} writes with the shipper stopped")
            t0 = time.perf_counter()
            start_site(lab, SHIPPER)
            t_ready = time.perf_counter()
            pids = {name: running_pid(lab, name) for name in (SHIPPER, "primary", "async")}
            cpu0 = {name: cpu_seconds(pid) for name, pid in pids.items()}
            early = applied_seq(async_peer) - base  # applied before the process reported ready (normally 0)
            wait_applied(async_peer, base + waiting, timeout=300)
            done = time.perf_counter()
            cpu = {name: cpu_seconds(pid) - cpu0[name] for name, pid in pids.items()}
            deadline = time.monotonic() + 30  # the shipper confirms a batch to the primary after it was applied
            while (left := waiting_entries(primary)) != 0:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{left} entries not confirmed 30 s after the Async site applied them all")
                time.sleep(POLL_S)
        source = spool_bytes(lab)  # the segments are trimmed by now: the anchor sends what remains, or...
        if source.stat().st_size < writes * SHIP_WRITE:
            source.write_bytes(b"".join(data[i % len(data)] for i in range(writes)))
        anchor = bench_anchor(source, lab / "anchor-out.bin")
        synced = bench_anchor(source, lab / "anchor-out.bin", sync=True)[0]
        lag = measure_lag(topo, key, writes, slots)
    return ShipResult(writes, write_seconds, t_ready - t0, done - t_ready, writes - early, cpu, anchor, synced, lag)


# -- (c) sync write latency through the proxy -----------------------------------------------------------
def _echo(port_q: mp.Queue, size: int) -> None:
    """Read `size`-byte requests, answer each with one byte (the shape of a sync write to C)."""
    with socket.create_server((HOST, 0)) as srv:
        port_q.put(srv.getsockname()[1])
        while True:
            conn, _ = srv.accept()
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with conn, contextlib.suppress(OSError):  # a reset when the proxy stops
                while True:
                    got = 0
                    while got < size:
                        chunk = conn.recv(size - got)
                        if not chunk:
                            break
                        got += len(chunk)
                    if got < size:
                        break
                    conn.sendall(b"k")


def time_calls(call: Callable[[int], object], samples: int) -> list[float]:
    """Microseconds per call, after WARMUP untimed calls."""
    for i in range(WARMUP):
        call(i)
    out = []
    for i in range(samples):
        t0 = time.perf_counter()
        call(i)
        out.append((time.perf_counter() - t0) * 1e6)
    return out


def raw_rtts(samples: int) -> tuple[list[float], list[float]]:
    """Raw TCP round trips (4 KiB request, 1-byte reply) to an echo process: (direct, via a proxy
    with DELAY_MS each way)."""
    proc, port = _start(_echo, BS)
    proxy = LinkProxy(listen=(HOST, 0), target=(HOST, port), delay_ms=DELAY_MS).start()
    request = b"e" * BS

    def measure(target: int) -> list[float]:
        with socket.create_connection((HOST, target)) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

            def call(_: int) -> None:
                sock.sendall(request)
                if sock.recv(1) != b"k":
                    raise RuntimeError("echo process closed the connection")

            return time_calls(call, samples)

    try:
        return measure(port), measure(proxy.port)
    finally:
        proxy.stop()
        _stop(proc)


def local_write(root: Path, samples: int, durable: bool) -> list[float]:
    path = root / "local.img"
    create_image(path, 16 << 20, BS)
    dev = ImageDevice(path, BS, durable=durable)
    rng = random.Random(2)
    data = rng.randbytes(BS)
    try:
        def call(_: int) -> None:
            dev.write(rng.randrange(dev.num_blocks), data)
            dev.flush()

        return time_calls(call, samples)
    finally:
        dev.close()


@dataclass
class LatencyResult:
    raw_direct: list[float]
    raw_rtt: list[float]
    ping_proxy: list[float]
    ping_primary: list[float]
    local: list[float]
    sync_write: list[float]


def bench_latency(root: Path, samples: int, durable: bool) -> LatencyResult:
    raw_direct, raw_rtt = raw_rtts(samples)
    local = local_write(root, samples, durable)
    proxy: LinkProxy | None = None
    # The sync daemon's port is only known once the lab exists: create the lab, then the proxy,
    # then route the link through it before the daemons start.
    lab = root / "latency"
    init_lab(lab, mode="provider", size=16 << 20, unsafe_no_flush=not durable, base_port=free_base_port())
    topo = load_topology(lab)
    try:
        proxy = LinkProxy(listen=(HOST, 0), target=(HOST, topo.sites["sync"].port), delay_ms=DELAY_MS).start()
        with open(lab / "topology.toml", "a") as f:
            f.write(f'\n[links.primary-sync]\nvia = "{HOST}:{proxy.port}"\n')
        lab_up(lab)
        key = load_key(lab / topo.key_file)
        rng = random.Random(3)
        blocks = topo.num_blocks
        data = [rng.randbytes(BS) for _ in range(16)]
        with Peer(HOST, proxy.port, key, timeout=30) as via_proxy, peer(topo, key, "primary") as primary:
            ping_proxy = time_calls(lambda _: via_proxy.call(PING), samples)
            ping_primary = time_calls(lambda _: primary.call(PING), samples)
            sync_write = time_calls(lambda i: primary.call(APP_WRITE, {"volume": 0, "lba": rng.randrange(blocks)},
                                                           data[i % len(data)]), samples)
    finally:
        lab_down(lab)
        if proxy is not None:
            proxy.stop()
    return LatencyResult(raw_direct, raw_rtt, ping_proxy, ping_primary, local, sync_write)


# -- report ------------------------------------------------------------------------------------------------
def report(args: argparse.Namespace, raw: float, rpc: float, ship: ShipResult, lat: LatencyResult) -> str:
    durability = ("flushes durable (the default)" if not args.unsafe_no_flush
                  else "--unsafe-no-flush (flushes do nothing)")
    lines = [f"tricopy network benchmark; labs: provider mode, {durability}", ""]
    lines.append(f"(a) loopback throughput, {args.mib} MiB, two processes")
    lines.append(f"    raw TCP, 1 MiB sendall                       {raw:10.1f} MB/s")
    lines.append(f"    RPC alone, 64 KiB calls, window 8 (context)  {rpc:10.1f} MB/s   {rpc / raw:.3f}x raw")
    lines.append(f"    RPC alone, 4 MiB calls, window 8 (context)   {args.rpc4m:10.1f} MB/s   "
                 f"{args.rpc4m / raw:.3f}x raw")
    lines.append("")
    lines.append(f"(b) async shipping, {ship.writes} x 64 KiB writes waiting in the spool, then the shipper "
                 "process started")
    lines.append(f"    writes into the spool (shipper stopped)      {ship.write_seconds:10.2f} s "
                 f"({ship.writes / ship.write_seconds:.0f} writes/s)")
    lines.append(f"    shipper process start-up (until ready)       {ship.startup_seconds:10.2f} s")
    lines.append(f"    ready -> Async site applied the last entry   {ship.seconds:10.2f} s "
                 f"({ship.shipped} entries)")
    cpu = ", ".join(f"{name} {seconds:.2f} s" for name, seconds in ship.cpu.items())
    lines.append(f"    CPU used meanwhile: {cpu} (of {ship.seconds:.2f} s wall, 2 cores shared)")
    ratio = ship.mbs / raw
    lines.append(f"    shipping throughput (from ready)             {ship.mbs:10.1f} MB/s   {ratio:.3f}x raw")
    lines.append(f"    same, counting the process start-up          {ship.mbs_with_startup:10.1f} MB/s   "
                 f"{ship.mbs_with_startup / raw:.3f}x raw")
    anchor, anchor_cpu = ship.anchor
    lines.append(f"    minimal sender/receiver, same MAC and bytes     {anchor:10.1f} MB/s   {anchor / raw:.3f}x raw "
                 f"(sender CPU {anchor_cpu:.2f} s)")
    lines.append(f"    same, the receiver fdatasyncs each chunk (context) {ship.anchor_synced:7.1f} MB/s   "
                 f"shipping is {ship.mbs / max(ship.anchor_synced, 1e-9):.2f}x it")
    for goal, base, name in ((0.7, anchor, "the minimal sender"), (0.3, raw, "(a) raw TCP")):
        verdict = "met" if ship.mbs >= goal * base else f"NOT met ({ship.mbs / base:.3f}x)"
        lines.append(f"    goal (b) >= {goal}x {name}: {verdict}")
    if ship.lag is not None:
        lag = ship.lag
        samples = lag.samples or [0]
        half = samples[len(samples) // 2:] or [0]
        mean = sum(samples) / len(samples)
        lines.append(f"    lag at full write rate: {lag.writes} writes in {lag.seconds:.2f} s "
                     f"({lag.writes / lag.seconds:.0f} writes/s); entries waiting mean {mean:.1f}, max "
                     f"{max(samples)}, 2nd half max {max(half)}; drained {lag.drained_s:.2f} s after the last")
    lines.append("")
    lines.append(f"(c) 4 KiB sync write latency, primary-sync link through the fault proxy at {DELAY_MS:g} ms "
                 f"each way, {len(lat.sync_write)} samples (shipping running)")
    rows = [
        ("raw TCP 4 KiB -> 1 B, direct (no proxy)", lat.raw_direct),
        ("proxy RTT: raw TCP 4 KiB -> 1 B, via proxy", lat.raw_rtt),
        ("proxy RTT: RPC ping to sync, via proxy", lat.ping_proxy),
        ("app -> primary daemon hop: RPC ping", lat.ping_primary),
        ("local 4 KiB write + flush (ImageDevice)", lat.local),
        ("sync write: app.write to the primary", lat.sync_write),
    ]
    lines.append(f"    {'':<44} {'p50 us':>10} {'p99 us':>10}")
    for name, values in rows:
        lines.append(f"    {name:<44} {pct(values, 50):10.1f} {pct(values, 99):10.1f}")
    p50 = pct(lat.sync_write, 50)
    local = pct(lat.local, 50)
    for label, rtt in (("raw proxy RTT", pct(lat.raw_rtt, 50)), ("RPC ping via proxy", pct(lat.ping_proxy, 50))):
        bound = rtt + local + BUDGET_US
        verdict = "met" if p50 <= bound else f"NOT met by {p50 - bound:.0f} us ({p50 / bound:.2f}x the bound)"
        goal = "goal" if label == "raw proxy RTT" else "same check with the RPC ping as RTT (context)"
        lines.append(f"    {goal}: sync write p50 {p50:.0f} <= {label} p50 {rtt:.0f} + local write p50 "
                     f"{local:.0f} + {BUDGET_US:.0f} = {bound:.0f} us: {verdict}")
    lines.append("    (the sync write is timed at the application, so it includes the app -> primary hop)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=256, help="(a) MiB to send")
    ap.add_argument("--writes", type=int, default=1000, help="(b) 64 KiB writes to ship")
    ap.add_argument("--samples", type=int, default=300, help="(c) timed 4 KiB writes and round trips")
    ap.add_argument("--unsafe-no-flush", action="store_true", help="labs whose flushes do nothing (default: durable)")
    ap.add_argument("--quick", action="store_true", help="a fast smoke run (small sizes)")
    ap.add_argument("--macs", action="store_true", help="(d) the MAC candidates and the RPC codec")
    args = ap.parse_args(argv)
    if args.quick:
        args.mib, args.writes, args.samples = 16, 32, 20
    if args.macs:
        print("\n".join(bench_macs()), flush=True)
    total = args.mib << 20
    raw = bench_raw(total)
    rpc = bench_rpc(total, 64 << 10, 8)
    args.rpc4m = bench_rpc(total, 4 << 20, 8)
    with tempfile.TemporaryDirectory(prefix="bench-network-") as tmp:
        ship = bench_shipping(Path(tmp), args.writes, not args.unsafe_no_flush)
        lat = bench_latency(Path(tmp), args.samples, not args.unsafe_no_flush)
    print(report(args, raw, rpc, ship, lat), flush=True)


if __name__ == "__main__":
    main()
