"""Benchmark: embodiment-4 recovery vs a full copy, side by side in one run.

A provider-mode lab (1 GiB by default) gets 2,000 files written through jfs and shipped (and never
trimmed: the metadata log still names most of them, as it does on a real volume whose log is not
full); then 1% of the files are rewritten without shipping and the primary is deleted. The surviving Sync and Async
sites are cloned twice (sparse copies) and measured:
  (a) `recover --to sync` (touched files only)        bytes and seconds
  (b) the same recovery forced to a full C -> D copy   bytes and seconds
  (c) the exact set of blocks where C and D differ     the lower limit, computed by comparing
and `cp --sparse=always` of C's image, the speed a full copy could stream at.
Seconds are the time from primary loss to a writable Sync site with replication re-established.

Usage: python -m tools.bench.recovery [--size-mib 1024] [--files 2000] [--rewrite-pct 1]
"""

from __future__ import annotations

import argparse
import random
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

BS = 4096


def differing_blocks(c: Path, d: Path, chunk: int = 256) -> int:
    n = 0
    with open(c, "rb") as fc, open(d, "rb") as fd:
        while True:
            a, b = fc.read(chunk * BS), fd.read(chunk * BS)
            if not a:
                return n
            if a != b:
                n += sum(a[i:i + BS] != b[i:i + BS] for i in range(0, len(a), BS))


def clone(src: Path, dst: Path) -> None:
    subprocess.run(["cp", "-a", "--sparse=always", str(src), str(dst)], check=True)


def build_lab(root: Path, size: int, files: int, rewrite_pct: float) -> Path:
    from jfs.fs import FileSystem, mkfs
    from vstore.lab.system import System
    from vstore.procedures.create import init_lab
    lab = root / "lab"
    init_lab(lab, mode="provider", size=size, spool_capacity=8 << 30)
    rng = random.Random(7)
    sizes = [rng.choice([4096, 16384, 65536, 200_000]) for _ in range(files)]
    with System(lab) as system:
        dev = system.device(0)
        mkfs(dev, label="bench")
        fs = FileSystem.mount(dev)
        shipper = system.shipper()
        for i, sz in enumerate(sizes):
            fs.write_file(f"/f{i:05d}", rng.randbytes(sz))
            if i % 50 == 49:
                shipper.ship()
        shipper.ship()  # shipped long ago, and never trimmed: the log still names most files
        for i in rng.sample(range(files), max(1, int(files * rewrite_pct / 100))):
            fs.write_file(f"/f{i:05d}", rng.randbytes(sizes[i]))
        # the primary dies now: entries of the rewrites are still in its spool
        system.save()
    shutil.rmtree(lab / "primary")
    return lab


def timed_recover(lab: Path, full: bool) -> tuple[int, float, int]:
    from vstore.lab.system import System
    from vstore.procedures.recovery import recover
    t0 = time.perf_counter()
    with System(lab) as system:
        report, _ = recover(system, "sync", full_copy=full)
        system.save()
    return report.bytes_copied, time.perf_counter() - t0, report.touched_files


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--files", type=int, default=2000)
    ap.add_argument("--rewrite-pct", type=float, default=1.0)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        lab = build_lab(root, args.size_mib << 20, args.files, args.rewrite_pct)
        print(f"lab: {args.size_mib} MiB, {args.files} files, {args.rewrite_pct}% rewritten after the last ship "
              f"(built in {time.perf_counter() - t0:.1f}s)")
        exact = differing_blocks(lab / "sync" / "C.img", lab / "async" / "D.img") * BS
        lab_a, lab_b = root / "a", root / "b"
        clone(lab, lab_a)
        clone(lab, lab_b)
        a_bytes, a_s, touched = timed_recover(lab_a, full=False)
        b_bytes, b_s, _ = timed_recover(lab_b, full=True)
        left = differing_blocks(lab_a / "sync" / "C.img", lab_a / "async" / "D.img")
        t0 = time.perf_counter()
        clone(lab / "sync" / "C.img", root / "cp-copy.img")
        cp_s = time.perf_counter() - t0
    print(f"{'method':<34} {'bytes':>14} {'seconds':>9}")
    print(f"{'(a) recover: touched files':<34} {a_bytes:>14} {a_s:>9.2f}   ({touched} touched files)")
    print(f"{'(b) full C -> D copy':<34} {b_bytes:>14} {b_s:>9.2f}")
    print(f"{'(c) exact differing blocks':<34} {exact:>14} {'-':>9}")
    print(f"{'cp --sparse=always of C.img':<34} {args.size_mib << 20:>14} {cp_s:>9.2f}")
    print(f"blocks still differing after (a): {left}")
    verdict = 'met' if a_bytes <= 1.2 * exact else 'NOT met'
    print(f"bytes (a)/(c) = {a_bytes / max(exact, 1):.2f}x   (goal <= 1.2x: {verdict})")
    mbs = b_bytes / b_s / 1e6
    print(f"full copy (b) streams {mbs:.0f} MB/s of image, cp --sparse=always {(args.size_mib << 20) / cp_s / 1e6:.0f} "
          "MB/s (the full copy includes the role change; both skip nothing but cp's holes)")
    print(f"bytes (b)/(a) = {b_bytes / max(a_bytes, 1):.0f}x less with (a)   (goal >= 50x)")
    print(f"time to writable Sync site with replication: (b)/(a) = {b_s / a_s:.0f}x faster with (a)   (goal >= 20x)")


if __name__ == "__main__":
    main()
