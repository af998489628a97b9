"""Benchmark: write a tree of files (4 KiB-1 MiB, seeded) into a jfs image vs the same bytes as
plain files in a temporary directory; prints both times and the ratio.

Run: python -m tools.bench.jfs_write [--files 1000] [--seed 1]
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
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
