"""Benchmark: 4 KiB random writes in one process, the replicated path against its floors, side by
side in one run.

1. No flush: raw `os.pwrite`; the design's minimal Python floor (a `pwrite` to A, a `pwrite` to C
   and one `struct`-packed entry with `zlib.crc32` appended to a spool file); the provider path
   (embodiment 4: A, C, the entry) and the mirror path (embodiment 1: A, B, C, B's entry).
   Goal: the path <= 3x the floor (CPU time per write).
2. Durable: a flush every 16 writes, and a flush after every write (fio's `--fsync=1`), against raw
   `pwrite` + `fdatasync` at the same points. The fdatasyncs and fsyncs this process makes are
   counted (every sync of the process goes through `os`, as strace would show them) per flush.
   Goal: >= 0.5x raw, and no sync but the one per file written since the last flush.

Usage: python -m tools.bench.write_path [--writes N] [--size-mib M] [--durable-writes N]
"""

from __future__ import annotations

import argparse
import os
import random
import struct
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

BS = 4096
ENTRY = struct.Struct(">4sHQQIQI")  # magic, version, seq, timestamp, volume, lba, count: the floor's header


@contextmanager
def sync_counter() -> Iterator[list[int]]:
    """Count os.fsync and os.fdatasync calls meanwhile (into the yielded one-item list)."""
    count = [0]
    real = os.fsync, os.fdatasync

    def counted(fn: Callable[[int], None]) -> Callable[[int], None]:
        def sync(fd: int) -> None:
            count[0] += 1
            fn(fd)
        return sync

    os.fsync, os.fdatasync = counted(real[0]), counted(real[1])  # type: ignore[assignment]
    try:
        yield count
    finally:
        os.fsync, os.fdatasync = real  # type: ignore[assignment]


def run(write: Callable[[int, bytes], None], flush: Callable[[], None] | None, every: int,
        lbas: list[int], payloads: list[bytes]) -> tuple[float, float, int]:
    """(wall s, CPU s, syncs) of the writes, with a flush after every `every` writes."""
    with sync_counter() as syncs:
        wall, cpu = time.perf_counter(), time.process_time()
        for i, (lba, data) in enumerate(zip(lbas, payloads, strict=True), 1):
            write(lba, data)
            if flush is not None and i % every == 0:
                flush()
        return time.perf_counter() - wall, time.process_time() - cpu, syncs[0]


def image(path: Path, size: int) -> int:
    with open(path, "wb") as f:
        f.truncate(size)
    return os.open(path, os.O_RDWR)


def raw(tmp: Path, size: int) -> tuple[Callable[[int, bytes], None], Callable[[], None], Callable[[], None]]:
    fd = image(tmp / "raw.img", size)
    return (lambda lba, data: os.pwrite(fd, data, lba * BS)), (lambda: os.fdatasync(fd)), (lambda: os.close(fd))


def floor(tmp: Path, size: int, images: int = 2) -> tuple[Callable[[int, bytes], None], Callable[[], None],
                                                         Callable[[], None]]:
    """`images` pwrites (2: A and C; 3: A, B and C as the mirror path must) and one struct-packed,
    CRC'd entry appended: what any design of this path must do."""
    fds = [image(tmp / f"floor{images}-{i}.img", size) for i in range(images)]
    spool = os.open(tmp / f"floor{images}.spool", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    seq = [0]

    def write(lba: int, data: bytes) -> None:
        seq[0] += 1
        for fd in fds:
            os.pwrite(fd, data, lba * BS)
        head = ENTRY.pack(b"TCEN", 1, seq[0], time.time_ns(), 0, lba, 1)
        os.write(spool, head + data + struct.pack(">I", zlib.crc32(data, zlib.crc32(head))))

    def flush() -> None:
        for fd in (*fds, spool):
            os.fdatasync(fd)

    def close() -> None:
        for fd in (*fds, spool):
            os.close(fd)

    return write, flush, close


def lab_path(tmp: Path, size: int, mode: str) -> tuple[Callable[[int, bytes], None], Callable[[], None],
                                                        Callable[[], None]]:
    from vstore.procedures.create import init_lab
    from vstore.procedures.reactions import open_system
    init_lab(tmp / f"lab-{mode}", mode=mode, size=size, spool_capacity=4 << 30)
    system = open_system(tmp / f"lab-{mode}")
    dev = system.device(0)

    def close() -> None:
        system.save()
        system.close()

    return dev.write, dev.flush, close


def workload(n: int, size: int, seed: int = 42) -> tuple[list[int], list[bytes]]:
    rng = random.Random(seed)
    payloads = [rng.randbytes(BS) for _ in range(256)]
    return [rng.randrange(size // BS) for _ in range(n)], [payloads[i % 256] for i in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--writes", type=int, default=5000, help="writes of the no-flush comparison")
    ap.add_argument("--durable-writes", type=int, default=800, help="writes of each durable comparison")
    ap.add_argument("--size-mib", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3,
                    help="interleaved rounds of the no-flush comparison (least CPU counts)")
    ap.add_argument("--only-durable", choices=["provider", "mirror", "raw"],
                    help="run only this path's durable comparison, flush every 16 (to count its syncs with strace)")
    args = ap.parse_args()
    if args.only_durable:
        make = {"raw": raw, "provider": lambda t, s: lab_path(t, s, "provider"),
                "mirror": lambda t, s: lab_path(t, s, "mirror")}[args.only_durable]
        lbas, payloads = workload(args.durable_writes, args.size_mib << 20, seed=7)
        with tempfile.TemporaryDirectory() as tmp:
            write, flush, close = make(Path(tmp), args.size_mib << 20)
            wall, _, syncs = run(write, flush, 16, lbas, payloads)
            close()
        print(f"{args.only_durable}: {args.durable_writes} writes, {args.durable_writes // 16} flushes, "
              f"{syncs} syncs counted in process")
        return
    size = args.size_mib << 20
    makers = {"raw os.pwrite": raw, "floor (2 pwrite + entry)": floor,
              "mirror floor (3 pwrite + entry)": lambda t, s: floor(t, s, 3),
              "provider path": lambda t, s: lab_path(t, s, "provider"),
              "mirror path": lambda t, s: lab_path(t, s, "mirror")}
    lbas, payloads = workload(args.writes, size)
    print(f"1. {args.writes} random 4 KiB writes on a {args.size_mib} MiB volume, no flush; "
          f"least of {args.rounds} rounds")
    print(f"   {'path':<32} {'writes/s':>10} {'CPU us/write':>13} {'x floor (CPU)':>14}")
    cpu_of: dict[str, float] = {}
    wall_of: dict[str, float] = {}
    for round_ in range(args.rounds):  # interleaved rounds; the least CPU of each path counts (a noisy machine)
        with tempfile.TemporaryDirectory() as tmp:
            for name, make in makers.items():
                (Path(tmp) / str(round_)).mkdir(exist_ok=True)
                write, _, close = make(Path(tmp) / str(round_), size)
                wall, cpu, _ = run(write, None, 1, lbas, payloads)
                close()
                cpu_of[name] = min(cpu_of.get(name, float("inf")), cpu / args.writes * 1e6)
                wall_of[name] = min(wall_of.get(name, float("inf")), wall)
    for name in makers:
        ratio = cpu_of[name] / cpu_of["floor (2 pwrite + entry)"] if name != "raw os.pwrite" else float("nan")
        print(f"   {name:<32} {args.writes / wall_of[name]:>10.0f} {cpu_of[name]:>13.1f} {ratio:>13.2f}x")
    for name in ("provider path", "mirror path"):
        ratio = cpu_of[name] / cpu_of["floor (2 pwrite + entry)"]
        print(f"   {name}: {ratio:.2f}x the floor  (goal <= 3x: {'met' if ratio <= 3 else 'NOT met'})")
    ratio = cpu_of["mirror path"] / cpu_of["mirror floor (3 pwrite + entry)"]
    print(f"   mirror path: {ratio:.2f}x the mirror floor (context: the mirror path writes B too)")
    n = args.durable_writes
    lbas, payloads = workload(n, size, seed=7)
    for every in (16, 1):
        print(f"2. {n} random 4 KiB writes, a flush every {every} write(s)")
        print(f"   {'path':<26} {'writes/s':>10} {'syncs/flush':>12} {'x raw':>8}")
        rate: dict[str, float] = {}
        with tempfile.TemporaryDirectory() as tmp:
            for name, make in makers.items():
                if "floor" in name:
                    continue
                write, flush, close = make(Path(tmp), size)
                wall, _, syncs = run(write, flush, every, lbas, payloads)
                close()
                rate[name] = n / wall
                print(f"   {name:<26} {rate[name]:>10.0f} {syncs / (n // every):>12.2f} "
                      f"{rate[name] / rate['raw os.pwrite']:>7.3f}x")
        for name in ("provider path", "mirror path"):
            ratio = rate[name] / rate["raw os.pwrite"]
            print(f"   {name}: {ratio:.3f}x raw  (goal >= 0.5x: {'met' if ratio >= 0.5 else 'NOT met'})")


if __name__ == "__main__":
    main()
