"""Benchmark: write a tree of files (4 KiB-1 MiB, seeded) into a jfs image vs the same bytes as
plain files in a temporary directory; prints both times and the ratio.

With `--one-dir N [N ...]`: create N empty files in one directory of an in-process mount (image
not durable), and print the create cost by decile and the cost of a warm and a cold lookup, so
that a cost growing with the directory's size shows.

Run: python -m tools.bench.jfs_write [--files 1000] [--seed 1] [--one-dir 1000 10000]
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import time
from pathlib import Path

from jfs.fs import FileSystem, mkfs, open_image
from vstore.blocks.device import ImageDevice, create_image


def workload(files: int, seed: int) -> list[tuple[str, bytes]]:
    rng = random.Random(seed)
    out = []
    for i in range(files):
        size = rng.randint(4 << 10, 1 << 20)
        out.append((f"/d{i % 20:02d}/f{i:05d}.bin", rng.randbytes(size)))
    return out


def bench_jfs(tree: list[tuple[str, bytes]], root: Path) -> float:
    total = sum(len(d) for _, d in tree)
    img = root / "bench.img"
    create_image(img, max(64 << 20, (total * 5 // 4) // 4096 * 4096 + (32 << 20)), 4096)
    dev = ImageDevice(img)
    mkfs(dev)
    dev.close()
    start = time.perf_counter()
    dev = open_image(img, durable=True)
    fs = FileSystem.mount(dev)
    for d in sorted({p.rsplit("/", 1)[0] for p, _ in tree}):
        fs.mkdir(d)
    for path, data in tree:
        fs.write_file(path, data)
        fs.fsync(path)  # durable per file, as the plain side's fsync (jfs commits do not flush)
    fs.unmount()
    dev.close()
    return time.perf_counter() - start


def bench_plain(tree: list[tuple[str, bytes]], root: Path) -> float:
    base = root / "plain"
    start = time.perf_counter()
    for d in sorted({p.rsplit("/", 1)[0] for p, _ in tree}):
        (base / d.lstrip("/")).mkdir(parents=True)
    for path, data in tree:
        with open(base / path.lstrip("/"), "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    return time.perf_counter() - start


def bench_one_dir(n: int, root: Path) -> None:
    """Create `n` empty files in /d; print ms per create by decile and µs per stat (warm, cold)."""
    img = root / f"dir{n}.img"
    create_image(img, 64 << 20, 4096)
    dev = ImageDevice(img)
    mkfs(dev, inodes=max(1024, n + 64))
    fs = FileSystem.mount(dev)
    fs.mkdir("/d")
    deciles = []
    cpu0, start = time.process_time(), time.perf_counter()
    step = max(1, n // 10)
    t = time.perf_counter()
    for i in range(n):
        fs.create(f"/d/f{i:06d}")
        if (i + 1) % step == 0:
            now = time.perf_counter()
            deciles.append((now - t) / step * 1000)
            t = now
    total, cpu = time.perf_counter() - start, time.process_time() - cpu0
    names = [f"/d/f{i:06d}" for i in range(0, n, max(1, n // 200))]
    t = time.perf_counter()
    for p in names:
        fs.stat(p)
    warm = (time.perf_counter() - t) / len(names) * 1e6
    fs.unmount()
    dev.close()
    dev = ImageDevice(img)
    fs = FileSystem.mount(dev)
    t = time.perf_counter()
    fs.stat(names[-1])  # loads the directory
    cold = (time.perf_counter() - t) * 1e6
    blocks = len(fs.dir_blocks(fs.lookup("/d")))
    fs.unmount()
    dev.close()
    print(f"{n:>6} files in one directory: create {total:6.2f} s (CPU {cpu:.2f} s), "
          f"{n / total:7.0f}/s; ms per create by decile: {' '.join(f'{d:.2f}' for d in deciles)}")
    print(f"        stat warm {warm:.1f} µs, first stat after mount (loads {blocks} dir blocks) {cold:.0f} µs")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--one-dir", type=int, nargs="*", default=None, metavar="N")
    args = ap.parse_args()
    if args.one_dir:
        with tempfile.TemporaryDirectory() as tmp:
            for n in args.one_dir:
                bench_one_dir(n, Path(tmp))
        return
    tree = workload(args.files, args.seed)
    total = sum(len(d) for _, d in tree)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t_jfs = bench_jfs(tree, root)
        t_plain = bench_plain(tree, root)
    print(f"files: {args.files}, bytes: {total} ({total / 2**20:.1f} MiB), seed {args.seed}")
    print("both sides durable: jfs image opened durable (fsync per flush), plain files fsync'd per file")
    print(f"jfs image:   {t_jfs:8.2f} s  ({total / 2**20 / t_jfs:7.1f} MiB/s)")
    print(f"plain files: {t_plain:8.2f} s  ({total / 2**20 / t_plain:7.1f} MiB/s)")
    print(f"ratio jfs/plain: {t_jfs / t_plain:.2f}x")


if __name__ == "__main__":
    main()
