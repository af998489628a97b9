"""Embodiment-4 recovery after losing the primary: copy only the touched files (SPEC §8
[0171]-[0173]; DESIGN "Recovery (E4)"), and the equalising copy the failover and failback
procedures use.

Keeps true:
- The copy source holds every acknowledged write (after losing the primary that is the Sync site's
  volume C, invariant 1). By the trim rule (invariant 4) every file without a record in the
  source's metadata log already has the same data at the target, so copying the blocks of the
  files that have a record, plus the file-system metadata blocks that differ, makes every
  allocated block of the target equal to the source's. Of those candidate blocks (touched files
  and metadata) only the ones whose digests differ are copied (`replication.compare`: the two
  sites digest their own blocks): a file written and shipped long ago whose record is still in
  the log costs a comparison, not a copy, so the copy is the exact difference.
- When the source's log cannot prove what changed (its header or a record is damaged, records were
  lost, or the volume holds no jfs at all, as an ext4 on an NBD export or an attached file) the
  copy says so (`fallback_full_copy`) and compares the whole volume by digests at both sites,
  copying every block that differs; it never does a silent partial copy. `--full` copies all.
- Only after the copy is complete is replication re-established: `--to sync` makes the Sync site
  the primary with its own provider and an async copy C -> D; `--to async` swaps the roles
  (D primary, async copy D -> C). The report says how many files, blocks and bytes moved next to
  what a full copy would have moved.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

from jfs.scan import metadata_ranges, scan_log
from vstore.blocks.errors import TricopyError
from vstore.blocks.ranges import merge_ranges, ranges_of
from vstore.lab.system import System
from vstore.procedures.copying import copy_blocks
from vstore.procedures.roles import drop_pairs_of, make_primary, start_async_without_copy, volumes_of
from vstore.procedures.steps import Progress, StepLog, no_progress
from vstore.replication.compare import differing_blocks


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


def plan_volume(system: System, src: tuple[str, str], dst: tuple[str, str], report: RecoveryReport,
                steps: StepLog, *, full_copy: bool = False) -> list[tuple[int, int]]:
    """The block ranges of `src` to copy to `dst` (touched files + differing metadata, or all)."""
    device = system.storage(src[0]).volume(src[1]).device
    whole = [(0, device.num_blocks)]
    if full_copy:
        steps.step(f"{src[1]}: full copy requested; copying all of {src[1]} -> {dst[1]}")
        return whole
    if system.topo.mode != "provider":
        return compare_whole(system, src, dst, steps, "no metadata log of the lost primary tells what differs")
    scan = scan_log(device)
    if not scan.complete:
        report.fallback_full_copy = True
        report.problems.append(f"{src[1]}: {scan.problem}")
        return compare_whole(system, src, dst, steps, f"the metadata log cannot prove what changed ({scan.problem})")
    report.touched_files += len(scan.files)
    report.paths += [f.path or f"inode {f.inode}" for f in scan.files]
    files = merge_ranges([r for f in scan.files for r in f.blocks])
    candidates = merge_ranges(files + list(metadata_ranges(device)))
    exact = ranges_of(differing_blocks(system.storage(src[0]), src[1], system.storage(dst[0]), dst[1], candidates))
    steps.step(f"{src[1]}: metadata log names {len(scan.files)} touched files ({sum(n for _, n in files)} "
               f"blocks); of those and the metadata, {sum(n for _, n in exact)} blocks differ")
    return exact


def compare_whole(system: System, src: tuple[str, str], dst: tuple[str, str], steps: StepLog,
                  why: str) -> list[tuple[int, int]]:
    """Every block of `src` whose digest differs at `dst`: the copy when nothing names the changes."""
    device = system.storage(src[0]).volume(src[1]).device
    exact = ranges_of(differing_blocks(system.storage(src[0]), src[1], system.storage(dst[0]), dst[1],
                                       [(0, device.num_blocks)]))
    steps.step(f"{src[1]}: {why}; compared all {device.num_blocks} blocks with {dst[1]} by digests: "
               f"{sum(n for _, n in exact)} differ")
    return exact


def equalise(system: System, src_site: str, dst_site: str, steps: StepLog, progress: Progress = no_progress, *,
             full_copy: bool = False, report: RecoveryReport | None = None) -> RecoveryReport:
    """Make every volume of `dst_site` equal to `src_site`'s with the cheapest correct copy."""
    report = report or RecoveryReport(to=src_site)
    system.network.check(src_site, dst_site)
    srcs, dsts = volumes_of(system, src_site), volumes_of(system, dst_site)
    report.full_copy_bytes += sum(system.storage(src_site).volume(v).device.size_bytes for v in srcs)
    plans = [(s, d, plan_volume(system, (src_site, s), (dst_site, d), report, steps, full_copy=full_copy))
             for s, d in zip(srcs, dsts, strict=True)]
    total = sum(n for _, _, ranges in plans for _, n in ranges)
    advance = progress(f"copy {src_site} -> {dst_site}", total)
    copied = 0
    for s, d, ranges in plans:
        copied += copy_blocks(system, (src_site, s), (dst_site, d), ranges, advance)
    report.blocks_copied += copied
    report.bytes_copied += copied * system.topo.block_size
    steps.step(f"copied {copied} blocks ({copied * system.topo.block_size} bytes) {src_site} -> {dst_site}; "
               f"a full copy would move {report.full_copy_bytes} bytes")
    return report


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


def recover(system: System, to: str, progress: Progress = no_progress, *,
            full_copy: bool = False) -> tuple[RecoveryReport, StepLog]:
    """[0171]-[0173]: scan C's metadata log, copy touched files C -> D, re-establish async copy."""
    started = time.monotonic()
    check_preconditions(system, to)
    steps = StepLog(f"embodiment-4 recovery to {to}")
    report = equalise(system, "sync", "async", steps, progress, full_copy=full_copy, report=RecoveryReport(to=to))
    drop_pairs_of(system, "primary", steps)
    src, dst = ("sync", "async") if to == "sync" else ("async", "sync")
    make_primary(system, src, volumes_of(system, src), steps)
    start_async_without_copy(system, src, dst, list(zip(volumes_of(system, src), volumes_of(system, dst),
                                                        strict=True)), steps)
    report.seconds = time.monotonic() - started
    steps.step(f"application may resume at the {to} site")
    return report, steps
