"""Embodiment-4 recovery after losing the primary: copy only the touched files (SPEC §8
[0171]-[0173]; DESIGN "Recovery (E4)").

Keeps true:
- The Sync site's volume C is the reference: it holds every acknowledged write (invariant 1).
  By the trim rule (invariant 4) every file without a record in C's metadata log already has the
  same data at the Async site, so copying the blocks of the files that have a record, plus the
  file-system metadata blocks that differ, makes every allocated block of D equal to C's.
- When C's log cannot prove what changed (its header or a record is damaged, records were lost)
  the recovery says so and copies the whole volume; it never does a silent partial copy.
- Only after the copy is complete is replication re-established: `--to sync` makes the Sync site
  the primary with its own provider and an async copy C -> D; `--to async` swaps the roles
  (D primary, async copy D -> C). The report says how many files, blocks and bytes moved next to
  what a full copy would have moved.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

from jfs.recover import metadata_ranges, scan_log
from vstore.errors import TricopyError
from vstore.procedures import Progress, StepLog, no_progress
from vstore.roles import drop_pairs_of, make_provider_primary, start_async_without_copy, volumes_of
from vstore.site import System

COMPARE_CHUNK = 64


@dataclass
class RecoveryReport:
    to: str
    touched_files: int = 0
    blocks_copied: int = 0
    bytes_copied: int = 0
    full_copy_bytes: int = 0
    fallback_full_copy: bool = False
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)


def merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for first, count in sorted(ranges):
        if out and first <= out[-1][0] + out[-1][1]:
            last_first, last_count = out[-1]
            out[-1] = (last_first, max(last_count, first + count - last_first))
        else:
            out.append((first, count))
    return out


def check_preconditions(system: System, to: str) -> None:
    if to not in ("sync", "async"):
        raise TricopyError(f"--to must be sync or async, not {to!r}")
    if system.topo.mode != "provider":
        raise TricopyError("recover is the embodiment-4 (provider mode) recovery; in mirror mode use "
                           "`vstore failover`")
    if system.network.site_up("primary") and system.role("primary") == "primary":
        raise TricopyError("the primary site is up and runs the application; recover is for after its loss "
                           "(delete LAB/primary or `vstore fail LAB primary` first)")
    for site in ("sync", "async"):
        if not system.network.site_up(site):
            raise TricopyError(f"site {site} is not available; recovery needs both the Sync and the Async site")
        if system.role(site) == "primary":
            raise TricopyError(f"site {site} already runs the application; nothing to recover")
    system.network.check("sync", "async")


def differing(system: System, ranges: list[tuple[int, int]], c: str, d: str) -> list[tuple[int, int]]:
    """The sub-ranges whose blocks differ between C and D (metadata is small: compare it)."""
    src, dst = system.storage("sync"), system.storage("async")
    out = []
    for first, count in ranges:
        for lba in range(first, first + count, COMPARE_CHUNK):
            n = min(COMPARE_CHUNK, first + count - lba)
            a, b = src.host_read(c, lba, n), dst.host_read(d, lba, n)
            if a == b:
                continue
            bs = len(a) // n
            out += [(lba + i, 1) for i in range(n) if a[i * bs:(i + 1) * bs] != b[i * bs:(i + 1) * bs]]
    return merge(out)


def plan_volume(system: System, c: str, d: str, report: RecoveryReport, steps: StepLog, *,
                full_copy: bool = False) -> list[tuple[int, int]]:
    """The block ranges of C to copy to D for one volume (touched files + differing metadata)."""
    device = system.storage("sync").volume(c).device
    if full_copy:
        steps.step(f"{c}: full copy requested; copying all of {c} -> {d}")
        return [(0, device.num_blocks)]
    scan = scan_log(device)
    if not scan.complete:
        report.fallback_full_copy = True
        report.problems.append(f"{c}: {scan.problem}")
        steps.step(f"{c}: the metadata log cannot prove what changed ({scan.problem}); FULL COPY of {c} -> {d}")
        return [(0, device.num_blocks)]
    report.touched_files += len(scan.files)
    report.paths += [f.path or f"inode {f.inode}" for f in scan.files]
    files = merge([r for f in scan.files for r in f.blocks])
    meta = differing(system, merge(list(metadata_ranges(device))), c, d)
    steps.step(f"{c}: metadata log names {len(scan.files)} touched files ({sum(n for _, n in files)} blocks); "
               f"{sum(n for _, n in meta)} metadata blocks differ")
    return merge(files + meta)


def recover(system: System, to: str, progress: Progress = no_progress, *,
            full_copy: bool = False) -> tuple[RecoveryReport, StepLog]:
    """[0171]-[0173]: scan C's metadata log, copy touched files C -> D, re-establish async copy."""
    started = time.monotonic()
    check_preconditions(system, to)
    steps = StepLog(f"embodiment-4 recovery to {to}")
    report = RecoveryReport(to=to)
    cs, ds = volumes_of(system, "sync"), volumes_of(system, "async")
    report.full_copy_bytes = sum(system.storage("sync").volume(c).device.size_bytes for c in cs)
    plans = [(c, d, plan_volume(system, c, d, report, steps, full_copy=full_copy)) for c, d in zip(cs, ds, strict=True)]
    total = sum(n for _, _, ranges in plans for _, n in ranges)
    advance = progress("recovery copy C -> D", total)
    for c, d, ranges in plans:
        report.blocks_copied += system.storage("sync").copy_to(c, "async", d, ranges, advance)
    report.bytes_copied = report.blocks_copied * system.topo.block_size
    steps.step(f"copied {report.blocks_copied} blocks ({report.bytes_copied} bytes) C -> D; "
               f"a full copy would move {report.full_copy_bytes} bytes")
    drop_pairs_of(system, "primary", steps)
    if to == "sync":
        make_provider_primary(system, "sync", cs, steps)
        start_async_without_copy(system, "sync", "async", list(zip(cs, ds, strict=True)), steps)
    else:
        make_provider_primary(system, "async", ds, steps)
        start_async_without_copy(system, "async", "sync", list(zip(ds, cs, strict=True)), steps)
    report.seconds = time.monotonic() - started
    steps.step(f"application may resume at the {to} site")
    return report, steps
