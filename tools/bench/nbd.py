"""Benchmark: the NBD export under fio, side by side in one run (SPEC §6, embodiment 2).

fio (its `nbd` engine, libnbd) writes to three servers of a volume of the same size:
(a) `qemu-nbd` serving a plain image file (the peer any user would pick);
(b) tricopy's NBD server (`vstore.nbd`) serving a plain image file (`ImageDevice`): no replication;
(c) `vstore export LAB` of a provider-mode lab, the lab down (the replicated path in the export's
    process: A, C and the entry of every write);
(d) the same lab up: the export talks to the primary's daemon, which copies to the Sync site's daemon.
Jobs: 4 KiB random writes at queue depth 1 and 16, and 1 MiB sequential writes; no fsync requested
(`--fsync N` adds a flush every N writes to every job). Goals: (b) >= 0.5x (a) on 1 MiB sequential;
(c) >= 0.5x (b) with no fsync requested ((d) is shown beside it).

Usage: python -m tools.bench.nbd [--size-mib 256] [--seconds 5] [--fsync 0]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from vstore.blocks.device import ImageDevice
from vstore.daemons.processes import lab_down, lab_up
from vstore.nbd.server import Export, NbdServer
from vstore.procedures.create import free_base_port, init_lab

HOST = "127.0.0.1"
JOBS = (("4k randwrite qd1", "randwrite", "4k", 1), ("4k randwrite qd16", "randwrite", "4k", 16),
        ("1M write qd1", "write", "1m", 1))


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def fio(url: str, rw: str, bs: str, depth: int, size: int, seconds: float, fsync: int) -> dict:
    """fio's write result (bw_bytes, iops, clat percentiles) for one job against `url`."""
    argv = ["fio", "--name=bench", "--ioengine=nbd", f"--uri={url}", f"--rw={rw}", f"--bs={bs}",
            f"--iodepth={depth}", f"--size={size}", f"--runtime={seconds}", "--time_based", "--randrepeat=1",
            "--output-format=json"]
    if fsync:
        argv.append(f"--fsync={fsync}")
    done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds * 10 + 60)
    if done.returncode != 0:
        raise SystemExit(f"fio failed against {url}: {done.stderr.strip() or done.stdout[-500:]}")
    return json.loads(done.stdout[done.stdout.index("{"):])["jobs"][0]["write"]


@contextlib.contextmanager
def qemu_nbd(image: Path) -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen(["qemu-nbd", "-f", "raw", "-x", "A", "-b", HOST, "-p", str(port), "-t",
                             "--cache=writeback", str(image)], stderr=subprocess.PIPE)
    try:
        for _ in range(100):
            with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=0.1):
                break
            if proc.poll() is not None:
                raise SystemExit(f"qemu-nbd failed: {proc.stderr.read().decode() if proc.stderr else ''}")
        yield f"nbd://{HOST}:{port}/A"
    finally:
        proc.terminate()
        proc.wait()


@contextlib.contextmanager
def plain_export(image: Path) -> Iterator[str]:
    device = ImageDevice(image, 4096)
    try:
        with NbdServer([Export("A", device)], HOST, 0) as server:
            yield server.url()
    finally:
        device.close()


@contextlib.contextmanager
def lab_export(lab: Path) -> Iterator[str]:
    proc = subprocess.Popen([sys.executable, "-m", "vstore.cli", "export", str(lab), "--listen", f"{HOST}:0",
                             "--json"], stdout=subprocess.PIPE, text=True)
    text = ""
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            text += line
            with contextlib.suppress(json.JSONDecodeError):
                url = json.loads(text)["url"]
                break
        else:
            raise SystemExit("vstore export did not start")
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--seconds", type=float, default=5.0, help="fio runtime per job")
    ap.add_argument("--fsync", type=int, default=0, help="a flush every N writes (0: none requested)")
    args = ap.parse_args()
    for tool in ("fio", "qemu-nbd"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is not installed (apt-get install fio qemu-utils)")
    size = args.size_mib << 20
    results: dict[str, dict[str, dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for name in ("a.img", "b.img"):
            with open(root / name, "wb") as f:
                f.truncate(size)
        lab = root / "lab"
        init_lab(lab, size=size, base_port=free_base_port(), spool_capacity=8 << 30)
        servers = {"(a) qemu-nbd, plain image": lambda: qemu_nbd(root / "a.img"),
                   "(b) tricopy NBD, plain image": lambda: plain_export(root / "b.img"),
                   "(c) vstore export, lab down": lambda: lab_export(lab)}
        for label, make in servers.items():
            with make() as url:
                results[label] = {job: fio(url, rw, bs, qd, size, args.seconds, args.fsync)
                                  for job, rw, bs, qd in JOBS}
        lab_up(lab)
        try:
            with lab_export(lab) as url:
                results["(d) vstore export, lab up"] = {job: fio(url, rw, bs, qd, size, args.seconds, args.fsync)
                                                        for job, rw, bs, qd in JOBS}
        finally:
            lab_down(lab)
    flushes = f"a flush every {args.fsync} writes" if args.fsync else "no fsync requested"
    print(f"fio nbd engine, {args.seconds:.0f} s per job, {args.size_mib} MiB volume, {flushes}")
    print(f"{'server':<32}" + "".join(f"{job:>26}" for job, *_ in JOBS))
    for label, by_job in results.items():
        cells = [f"{r['bw_bytes'] / 1e6:8.1f} MB/s {r['iops']:7.0f}/s" for r in by_job.values()]
        print(f"{label:<32}" + "".join(f"{c:>26}" for c in cells))
    a, b, c = (results[k]["1M write qd1"]["bw_bytes"] for k in list(results)[:3])
    print(f"goal (b) >= 0.5x (a) on 1 MiB sequential: {b / a:.2f}x  {'met' if b >= 0.5 * a else 'NOT met'}")
    for job, *_ in JOBS:
        rb, rc = (results[k][job]["bw_bytes"] for k in list(results)[1:3])
        print(f"goal (c) >= 0.5x (b), {job}: {rc / rb:.2f}x  {'met' if rc >= 0.5 * rb else 'NOT met'}")


if __name__ == "__main__":
    main()
