"""Benchmark (SPEC §8, `jfs mount`): untar a generated tree into (a) a plain tmp directory, (p) a
trivial single-threaded Python pass-through FUSE file system over a plain directory (mfusepy, the
floor of a Python FUSE design on this machine), (b) a jfs image mounted with `jfs mount`, (c) a
`lab:LAB` mount (provider: sync copy to C + an entry per block), side by side in one run; then
10,000 empty files created in one directory on (a), (p) and (b). Prints the times, (b)/(a) (goal
<= 5x), (b)/(p) (goal <= 1.5x) and (c)/(b).

Every side runs the same `tar -xf` of the same archive and is timed up to `tar` exiting (data in
the file system, not necessarily on disk: the plain side is not fsynced either); the jfs sides
also show the time of `jfs umount` (commit of the last writes, volume marked clean).

Usage: python -m tools.bench.fuse [--mib 20] [--seed 1] [--rounds 1] [--dir-files 10000] [--no-lab]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from jfs.mounts import is_mounted

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


JFS = [sys.executable, "-m", "jfs.cli"]
VSTORE = [sys.executable, "-m", "vstore.cli"]
DURABLE = ["--durable"]  # every device flush an fsync, as on lab:LAB

PASSTHROUGH = """
import os, sys, mfusepy
class P(mfusepy.Operations):
    use_ns = True
    def __init__(self, root): self.root = root
    def _p(self, path): return self.root + path
    def getattr(self, path, fh=None):
        st = os.lstat(self._p(path))
        return {k: getattr(st, k) for k in ('st_mode', 'st_nlink', 'st_size', 'st_uid', 'st_gid', 'st_ino')} | {
            'st_atime': st.st_atime_ns, 'st_mtime': st.st_mtime_ns, 'st_ctime': st.st_ctime_ns}
    def readdir(self, path, fh): return ['.', '..', *os.listdir(self._p(path))]
    def mkdir(self, path, mode): os.mkdir(self._p(path), mode); return 0
    def rmdir(self, path): os.rmdir(self._p(path)); return 0
    def unlink(self, path): os.unlink(self._p(path)); return 0
    def rename(self, old, new): os.rename(self._p(old), self._p(new)); return 0
    def chmod(self, path, mode): os.chmod(self._p(path), mode); return 0
    def chown(self, path, uid, gid): return 0
    def utimens(self, path, times=None): os.utime(self._p(path), ns=times); return 0
    def truncate(self, path, length, fh=None): os.truncate(self._p(path), length); return 0
    def create(self, path, mode, fi=None): return os.open(self._p(path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    def open(self, path, flags): return os.open(self._p(path), flags)
    def read(self, path, size, offset, fh): return os.pread(fh, size, offset)
    def write(self, path, data, offset, fh): return os.pwrite(fh, data, offset)
    def flush(self, path, fh): return 0
    def release(self, path, fh): os.close(fh); return 0
    def fsync(self, path, datasync, fh): os.fsync(fh); return 0
mfusepy.FUSE(P(sys.argv[1]), sys.argv[2], foreground=True, nothreads=True, use_ino=True)
"""


def untar_passthrough(archive: Path, work: Path, name: str) -> float:
    """Untar onto the trivial pass-through FUSE file system over a plain directory."""
    back, mnt = work / f"{name}-back", work / f"{name}-mnt"
    back.mkdir()
    mnt.mkdir()
    with passthrough(back, mnt):
        return untar(archive, mnt)


class passthrough:  # noqa: N801 - a context manager used like a function
    """The pass-through file system of `back` mounted at `mnt` while the block runs."""

    def __init__(self, back: Path, mnt: Path) -> None:
        self.back, self.mnt = back, mnt

    def __enter__(self) -> Path:
        self.proc = subprocess.Popen([sys.executable, "-c", PASSTHROUGH, str(self.back), str(self.mnt)])
        deadline = time.monotonic() + 30
        while not is_mounted(self.mnt):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the pass-through file system did not mount")
            time.sleep(0.02)
        return self.mnt

    def __exit__(self, *exc: object) -> None:
        run(["fusermount3", "-u", str(self.mnt)])
        self.proc.wait(timeout=60)


def bench_mount(target: str, archive: Path, mnt: Path) -> tuple[float, float]:
    mnt.mkdir()
    run([*JFS, "mount", target, str(mnt), *DURABLE])
    try:
        t = untar(archive, mnt)
    finally:
        start = time.perf_counter()
        run([*JFS, "umount", str(mnt)])
        u = time.perf_counter() - start
    return t, u


def create_many(root: Path, n: int) -> tuple[float, float]:
    """(seconds to create `n` empty files in one new directory, seconds to stat each of them once)."""
    d = root / "many"
    d.mkdir()
    start = time.perf_counter()
    for i in range(n):
        os.close(os.open(d / f"f{i:06d}", os.O_WRONLY | os.O_CREAT, 0o644))
    made = time.perf_counter() - start
    start = time.perf_counter()
    for i in range(0, n, 7):
        os.stat(d / f"f{i:06d}")
    return made, (time.perf_counter() - start) * 7


def bench_dir(work: Path, n: int) -> None:
    plain = work / "dir-plain"
    plain.mkdir()
    a = create_many(plain, n)
    back, mnt = work / "dir-back", work / "dir-pt"
    back.mkdir()
    mnt.mkdir()
    with passthrough(back, mnt):
        p = create_many(mnt, n)
    img, jmnt = work / "dir.img", work / "dir-jfs"
    run([*JFS, "mkfs", str(img), "--size", "256M", "--inodes", str(n + 1024)])
    jmnt.mkdir()
    run([*JFS, "mount", str(img), str(jmnt), *DURABLE])
    try:
        b = create_many(jmnt, n)
    finally:
        run([*JFS, "umount", str(jmnt)])
    print(f"{n} empty files created in one directory (open O_CREAT + close each), then every 7th stat'ed:")
    for name, (c, st) in (("plain directory", a), ("pass-through FUSE", p), ("jfs image mount", b)):
        print(f"  {name:18s} create {c:6.2f} s ({n / c:7.0f}/s), stat {st / n * 1e6:6.1f} µs each")
    print(f"  jfs / plain = {b[0] / a[0]:.1f}x, jfs / pass-through = {b[0] / p[0]:.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=20, help="approximate size of the tree in MiB")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--dir", type=Path, default=None, help="work directory (default: a new tmp dir)")
    ap.add_argument("--rounds", type=int, default=1, help="untar rounds (sides alternate)")
    ap.add_argument("--dir-files", type=int, default=10000, help="files in one directory (0: skip)")
    ap.add_argument("--no-lab", action="store_true", help="skip the lab:LAB side")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="jfs-fuse-bench-", dir=args.dir))
    try:
        src = work / "src"
        total = make_tree(src, 100 * args.mib, args.seed, max_total=args.mib * MIB)
        files = sum(1 for p in src.rglob("*") if p.is_file())
        archive = work / "tree.tar"
        make_tar(src, archive)
        size = f"{max(256, (total * 3 // MIB) + 64)}M"
        lab = work / "lab"
        if not args.no_lab:
            run([*VSTORE, "lab", "init", str(lab), "--size", size, "--quiet"])
        print(f"untar of {files} files, {total / MIB:.1f} MiB (seed {args.seed}); "
              "time until tar exits, then jfs umount")
        for r in range(args.rounds):
            plain = work / f"plain{r}"
            plain.mkdir()
            a = untar(archive, plain)
            p = untar_passthrough(archive, work, f"pt{r}")
            img = work / f"disk{r}.img"
            run([*JFS, "mkfs", str(img), "--size", size, "--log-blocks", "16384"])
            b, bu = bench_mount(str(img), archive, work / f"mnt-img{r}")
            print(f"round {r + 1}:")
            print(f"(a) plain tmp directory:   {a:7.2f} s")
            print(f"(p) pass-through FUSE:     {p:7.2f} s  ({p / a:.1f}x plain: the floor)")
            print(f"(b) jfs image mount:       {b:7.2f} s  (+ umount {bu:.2f} s)")
            print(f"(b)/(a) = {b / a:.1f}x   (goal <= 5x: {'met' if b / a <= 5 else 'NOT met'})")
            print(f"(b)/(p) = {b / p:.2f}x  (goal <= 1.5x: {'met' if b / p <= 1.5 else 'NOT met'})")
        if not args.no_lab:
            run([*JFS, "mkfs", f"lab:{lab}", "--log-blocks", "16384"])
            c, cu = bench_mount(f"lab:{lab}", archive, work / "mnt-lab")
            print(f"(c) lab:LAB mount:         {c:7.2f} s  (+ umount {cu:.2f} s)")
            print(f"(c)/(b) = {c / b:.2f}x   (replication cost: sync copy to C + one entry per block write)")
        if args.dir_files:
            bench_dir(work, args.dir_files)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
