"""Benchmark (SPEC §8, `jfs mount`): untar a generated tree into (a) a plain tmp directory, (b) a jfs image
mounted with `jfs mount`, (c) a `lab:LAB` mount (provider: sync copy to C + an entry per block),
side by side in one run; prints the times, (b)/(a) (goal <= 5x) and (c)/(b).

Every side runs the same `tar -xf` of the same archive and is timed up to `tar` exiting (data in
the file system, not necessarily on disk: the plain side is not fsynced either); the jfs sides
also show the time of `jfs umount` (commit of the last writes, volume marked clean).

Usage: python -m tools.bench.fuse [--mib 20] [--seed 1]
"""

from __future__ import annotations

import argparse
import random
import shutil
import subprocess
import tarfile
import tempfile
import time
from pathlib import Path

MIB = 1 << 20


def make_tree(root: Path, files: int, seed: int, *, max_size: int = 2 * MIB, max_total: int | None = None) -> int:
    """Write a seeded tree of `files` files (nested directories, sizes 0 B..max_size, mostly
    small) under `root`, stopping early once `max_total` bytes are written; returns the total."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    dirs = [root]
    total = 0
    for i in range(files):
        if rng.random() < 0.15 or len(dirs) == 1:
            parent = rng.choice(dirs[-8:] if len(dirs) > 8 else dirs)
            if len(parent.relative_to(root).parts) < 5:
                d = parent / f"dir{len(dirs):03d}"
                d.mkdir()
                dirs.append(d)
        r = rng.random()
        if i == 0:
            size = 0
        elif i == 1:
            size = max_size
        elif r < 0.08:
            size = 0
        elif r < 0.68:
            size = rng.randint(1, 16 << 10)
        elif r < 0.96:
            size = rng.randint(16 << 10, 256 << 10)
        else:
            size = rng.randint(256 << 10, max_size)
        path = rng.choice(dirs) / f"file{i:04d}.{rng.choice(['bin', 'txt', 'dat'])}"
        path.write_bytes(rng.randbytes(size))
        path.chmod(rng.choice([0o644, 0o600, 0o755, 0o640]))
        total += size
        if max_total is not None and total >= max_total:
            break
    return total


def make_tar(src: Path, archive: Path) -> None:
    with tarfile.open(archive, "w") as tar:
        tar.add(src, arcname=".")


def run(cmd: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw)  # type: ignore[call-overload]


def untar(archive: Path, dest: Path) -> float:
    start = time.perf_counter()
    run(["tar", "-xf", str(archive), "-C", str(dest)])
    return time.perf_counter() - start


def bench_mount(target: str, archive: Path, mnt: Path) -> tuple[float, float]:
    mnt.mkdir()
    run(["jfs", "mount", target, str(mnt)])
    try:
        t = untar(archive, mnt)
    finally:
        start = time.perf_counter()
        run(["jfs", "umount", str(mnt)])
        u = time.perf_counter() - start
    return t, u


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=20, help="approximate size of the tree in MiB")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--dir", type=Path, default=None, help="work directory (default: a new tmp dir)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="jfs-fuse-bench-", dir=args.dir))
    try:
        src = work / "src"
        total = make_tree(src, 100 * args.mib, args.seed, max_total=args.mib * MIB)
        files = sum(1 for p in src.rglob("*") if p.is_file())
        archive = work / "tree.tar"
        make_tar(src, archive)
        size = f"{max(256, (total * 3 // MIB) + 64)}M"
        img = work / "disk.img"
        run(["jfs", "mkfs", str(img), "--size", size, "--log-blocks", "16384"])
        lab = work / "lab"
        run(["vstore", "lab", "init", str(lab), "--size", size, "--quiet"])
        run(["jfs", "mkfs", f"lab:{lab}", "--log-blocks", "16384"])
        plain = work / "plain"
        plain.mkdir()
        a = untar(archive, plain)
        plain2 = work / "plain2"
        plain2.mkdir()
        start = time.perf_counter()
        untar(archive, plain2)
        run(["sync", "-f", str(plain2)])
        a2 = time.perf_counter() - start
        b, bu = bench_mount(str(img), archive, work / "mnt-img")
        c, cu = bench_mount(f"lab:{lab}", archive, work / "mnt-lab")
        print(f"untar of {files} files, {total / MIB:.1f} MiB (seed {args.seed}); "
              "time until tar exits, then jfs umount")
        print(f"(a) plain tmp directory:   {a:7.2f} s  (context: untar + sync -f to disk {a2:.2f} s)")
        print(f"(b) jfs image mount:       {b:7.2f} s  (+ umount {bu:.2f} s)")
        print(f"(c) lab:LAB mount:         {c:7.2f} s  (+ umount {cu:.2f} s)")
        print(f"(b)/(a) = {b / a:.1f}x   (goal <= 5x: {'met' if b / a <= 5 else 'NOT met'})")
        print(f"(c)/(b) = {c / b:.2f}x   (replication cost: sync copy to C + one entry per block write)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
