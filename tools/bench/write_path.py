"""Benchmark: 4 KiB random writes, raw `os.pwrite` on one image vs the full
embodiment-1 path in one process (mirror program -> A and B, sync copy of A to C, an entry per
write of B into the entry log), in the same durability mode, side by side in one run.

Usage: python -m tools.bench.write_path [--writes N] [--size-mib M]
Prints throughput (writes/s), p50/p99 latency (us) and the ratio full/raw for each mode.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

BS = 4096


def measure(write: Callable[[int, bytes], None], lbas: list[int], payloads: list[bytes]) -> tuple[float, float, float]:
    lat = []
    start = time.perf_counter()
    for lba, data in zip(lbas, payloads, strict=True):
        t0 = time.perf_counter()
        write(lba, data)
        lat.append(time.perf_counter() - t0)
    total = time.perf_counter() - start
    lat.sort()
    return len(lbas) / total, statistics.median(lat) * 1e6, lat[int(len(lat) * 0.99)] * 1e6


def raw_writer(path: Path, durable: bool) -> tuple[Callable[[int, bytes], None], Callable[[], None]]:
    fd = os.open(path, os.O_RDWR)

    def write(lba: int, data: bytes) -> None:
        os.pwrite(fd, data, lba * BS)
        if durable:
            os.fsync(fd)

    return write, lambda: os.close(fd)


def full_writer(lab: Path, durable: bool, size: int) -> tuple[Callable[[int, bytes], None], Callable[[], None]]:
    from vstore.procedures.create import init_lab
    from vstore.procedures.reactions import open_system
    init_lab(lab, mode="mirror", size=size, durable=durable, spool_capacity=4 << 30)
    system = open_system(lab)
    dev = system.device(0)

    def write(lba: int, data: bytes) -> None:
        # Durable mode: the path itself makes the write durable before it returns where the
        # design requires it: at C (the sync copy program fsyncs before acknowledging) and in
        # the entry log (fsync before acknowledging). A and B are acknowledged on cache
        # completion, as in SPEC §5 Fig 4.
        dev.write(lba, data)

    def close() -> None:
        system.save()
        system.close()

    return write, close


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--writes", type=int, default=5000)
    ap.add_argument("--size-mib", type=int, default=64)
    args = ap.parse_args()
    size = args.size_mib << 20
    rng = random.Random(42)
    lbas = [rng.randrange(size // BS) for _ in range(args.writes)]
    payloads = [rng.randbytes(BS) for _ in range(min(args.writes, 256))] * (args.writes // 256 + 1)
    payloads = payloads[:args.writes]
    print(f"{args.writes} random 4 KiB writes on a {args.size_mib} MiB volume")
    print(f"{'mode':<10} {'path':<22} {'writes/s':>10} {'p50 us':>9} {'p99 us':>9}")
    for durable in (False, True):
        n = args.writes if not durable else max(200, args.writes // 10)
        with tempfile.TemporaryDirectory() as tmp:
            raw_path = Path(tmp) / "raw.img"
            with open(raw_path, "wb") as f:
                f.truncate(size)
            w, close = raw_writer(raw_path, durable)
            raw = measure(w, lbas[:n], payloads[:n])
            close()
            w, close = full_writer(Path(tmp) / "lab", durable, size)
            full = measure(w, lbas[:n], payloads[:n])
            close()
        mode = "fsync" if durable else "no-fsync"
        print(f"{mode:<10} {'raw os.pwrite':<22} {raw[0]:>10.0f} {raw[1]:>9.1f} {raw[2]:>9.1f}")
        print(f"{mode:<10} {'embodiment-1 path':<22} {full[0]:>10.0f} {full[1]:>9.1f} {full[2]:>9.1f}")
        print(f"{mode:<10} ratio full/raw throughput = {full[0] / raw[0]:.3f}x  (goal >= 0.5x)")


if __name__ == "__main__":
    main()
