"""Benchmark: one 4 KiB application write through the daemons over a 1 ms link, against the
limits named in the same run.

A provider-mode lab is brought up with its primary-sync link through the fault proxy
(`vstore.net.linkproxy`, 1 ms each way). Measured side by side:
- the link's raw round trip: a 4 KiB request and a 1-byte answer over plain TCP through a second
  proxy with the same delay, to an echo process;
- a local 4 KiB `pwrite` (what the primary's own write costs);
- `--writes` application writes (`app.write`, acknowledged once C holds the write and the entry is
  in the spool), p50 and p99, and the CPU they cost summed over every process of the lab (the
  three site daemons, the shipper) and the client's thread, per write (the proxy standing for
  the link runs in the client's process: its threads are shown apart, not counted);
- the same writes with an `app.flush` after every 16th (the flush's p50).
Goals: write p50 <= RTT p50 + local write p50 + 500 us; <= 2 ms CPU per write in total.

Usage: python -m tools.bench.app_write [--writes 500]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path

from vstore.daemons.processes import SHIPPER, lab_down, lab_up, running_pid
from vstore.lab.topology import load_topology
from vstore.net.client import Peer
from vstore.net.keys import load_key
from vstore.net.linkproxy import LinkProxy
from vstore.net.rpc import APP_FLUSH, APP_WRITE
from vstore.procedures.create import free_base_port, init_lab

HOST = "127.0.0.1"
BS = 4096
DELAY_MS = 1.0
PROCESSES = ("primary", "sync", "async", SHIPPER)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def cpu_seconds(pid: int | None) -> float:
    """utime + stime of a process, in seconds (0 when it is gone)."""
    if not pid:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _echo(port_q: mp.Queue) -> None:
    srv = socket.create_server((HOST, 0))
    port_q.put(srv.getsockname()[1])
    conn, _ = srv.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = bytearray(BS)
    while True:
        got = 0
        while got < BS:
            n = conn.recv_into(memoryview(buf)[got:])
            if not n:
                return
            got += n
        conn.sendall(b"k")


def raw_rtts(samples: int) -> list[float]:
    q: mp.Queue = mp.Queue()
    proc = mp.Process(target=_echo, args=(q,), daemon=True)
    proc.start()
    proxy = LinkProxy(listen=(HOST, 0), target=(HOST, q.get(timeout=30)), delay_ms=DELAY_MS).start()
    try:
        sock = socket.create_connection((HOST, proxy.port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        out = []
        for _ in range(samples):
            t0 = time.perf_counter()
            sock.sendall(bytes(BS))
            sock.recv(1)
            out.append(time.perf_counter() - t0)
        sock.close()
        return out
    finally:
        proxy.stop()
        proc.kill()


def local_writes(root: Path, samples: int) -> list[float]:
    path = root / "local.img"
    with open(path, "wb") as f:
        f.truncate(1 << 26)
    fd = os.open(path, os.O_RDWR)
    out = []
    for i in range(samples):
        t0 = time.perf_counter()
        os.pwrite(fd, bytes(BS), (i % 16000) * BS)
        out.append(time.perf_counter() - t0)
    os.close(fd)
    return out


def app_writes(root: Path, writes: int) -> tuple[list[float], float, list[float]]:
    """(write latencies, CPU s per write over every process, flush latencies)."""
    lab = root / "lab"
    init_lab(lab, mode="provider", size=64 << 20, base_port=free_base_port())
    topo = load_topology(lab)
    proxy = LinkProxy(listen=(HOST, 0), target=(HOST, topo.sites["sync"].port), delay_ms=DELAY_MS).start()
    try:
        with open(lab / "topology.toml", "a") as f:
            f.write(f'\n[links.primary-sync]\nvia = "{HOST}:{proxy.port}"\n')
        lab_up(lab)
        spec = topo.sites["primary"]
        primary = Peer(spec.host, spec.port, load_key(lab / topo.key_file), timeout=60.0)
        data = os.urandom(BS)
        for i in range(20):  # warm up: connections, the activity log's first extents
            primary.call(APP_WRITE, {"volume": 0, "lba": i}, data)
        pids = [running_pid(lab, name) for name in PROCESSES]
        each = [cpu_seconds(p) for p in pids] + [time.thread_time()]  # the client: this thread alone
        proxy_before = time.process_time() - each[-1]  # the proxy's threads (the link, not tricopy)
        before = sum(each)
        lat = []
        for i in range(writes):
            t0 = time.perf_counter()
            primary.call(APP_WRITE, {"volume": 0, "lba": (i * 37) % 16000}, data)
            lat.append(time.perf_counter() - t0)
        time.sleep(1.0)  # the shipper's share of these writes
        after = [cpu_seconds(p) for p in pids] + [time.thread_time()]
        link_cpu = time.process_time() - after[-1] - proxy_before
        cpu = (sum(after) - before) / writes
        names = (*PROCESSES, "client")
        print("CPU us per write by process: " + ", ".join(
            f"{name} {(a - b) / writes * 1e6:.0f}" for name, a, b in zip(names, after, each, strict=True))
            + f" (the link's proxy, not counted: {link_cpu / writes * 1e6:.0f})")
        flushes = []
        for i in range(writes):
            primary.call(APP_WRITE, {"volume": 0, "lba": (i * 41) % 16000}, data)
            if i % 16 == 15:
                t0 = time.perf_counter()
                primary.call(APP_FLUSH, {"volume": 0})
                flushes.append(time.perf_counter() - t0)
        primary.close()
        return lat, cpu, flushes
    finally:
        lab_down(lab)
        proxy.stop()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--writes", type=int, default=500)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        rtt = raw_rtts(args.writes)
        local = local_writes(Path(tmp), args.writes)
        lat, cpu, flushes = app_writes(Path(tmp), args.writes)
    us = 1e6
    print(f"4 KiB application writes through the daemons, primary-sync link {DELAY_MS:g} ms each way")
    print(f"{'measure':<40} {'p50 us':>9} {'p99 us':>9}")
    print(f"{'raw TCP round trip through the proxy':<40} {pct(rtt, .5) * us:>9.0f} {pct(rtt, .99) * us:>9.0f}")
    print(f"{'local 4 KiB pwrite':<40} {pct(local, .5) * us:>9.0f} {pct(local, .99) * us:>9.0f}")
    print(f"{'app.write':<40} {pct(lat, .5) * us:>9.0f} {pct(lat, .99) * us:>9.0f}")
    print(f"{'app.flush after 16 writes':<40} {pct(flushes, .5) * us:>9.0f} {pct(flushes, .99) * us:>9.0f}")
    bound = (pct(rtt, .5) + pct(local, .5)) * us + 500
    p50 = pct(lat, .5) * us
    print(f"goal: app.write p50 {p50:.0f} <= RTT + local write + 500 us = {bound:.0f} us: "
          f"{'met' if p50 <= bound else 'NOT met'} ({p50 / bound:.2f}x the bound)")
    verdict = "met" if cpu <= 0.002 else "NOT met"
    print(f"goal: CPU per write over every process {cpu * us:.0f} us <= 2000 us: {verdict}")
    print(f"(mean write {statistics.mean(lat) * us:.0f} us)")


if __name__ == "__main__":
    main()
