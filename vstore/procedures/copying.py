"""The procedures' copies of block ranges between sites, continued where a stopped run left them
(SPEC §3 [0036]-[0042]; DESIGN "Procedures").

Keeps true: every long copy of a procedure (initial copy, resync, Fig 6 member copy, failback and
equalising copies) goes through `copy_blocks` or `add_member`, which keep a `CopyCheckpoint`: a
copy stopped by Ctrl-C, SIGTERM or an error records how far it got, and the same command run again
copies only the rest (when neither volume changed meanwhile). A copy between volumes that are not
image files in this process (a peer behind a daemon) is copied without a checkpoint.
"""

from __future__ import annotations

from pathlib import Path

from vstore.lab.copies import CopyCheckpoint, Ranges
from vstore.lab.system import System
from vstore.procedures.steps import Advance
from vstore.replication.mirror import MirrorGroup, SyncState


def image_of(system: System, site: str, volume: str) -> Path | None:
    """The image file of a volume opened in this process, else None."""
    if system.remote(site):
        return None
    path = getattr(system.storage(site).volume(volume).device, "path", None)
    return Path(path) if path is not None else None


def checkpoint(system: System, src: tuple[str, str], dst: tuple[str, str], ranges: Ranges) -> CopyCheckpoint | None:
    images = image_of(system, *src), image_of(system, *dst)
    if images[0] is None or images[1] is None:
        return None
    return CopyCheckpoint.start(system.lab_dir, ":".join(src), ":".join(dst), ranges, system.command,
                                (images[0], images[1]))


def copy_blocks(system: System, src: tuple[str, str], dst: tuple[str, str], ranges: Ranges, advance: Advance, *,
                target_is_zero: bool = False) -> int:
    """Copy `ranges` of src (site, volume) to dst through the source site's copy program; returns
    the blocks copied by this run."""
    storage = system.storage(src[0])
    cp = checkpoint(system, src, dst, ranges)
    if cp is None:
        return storage.copy_to(src[1], dst[0], dst[1], ranges, advance, target_is_zero=target_is_zero)
    try:
        copied = storage.copy_to(src[1], dst[0], dst[1], cp.remaining(), cp.progress(advance),
                                 target_is_zero=target_is_zero)
    except BaseException:
        cp.save()
        raise
    cp.finish()
    system.copies_finished = True
    return copied


def add_member(system: System, site: str, group: MirrorGroup, volume: str, advance: Advance, *,
               target_is_zero: bool = False) -> int:
    """Fig 6: add `site`'s `volume` to the mirror group, continuing a stopped member copy."""
    external = system.storage(site).volume(volume).external_id
    source = next(m.volume for m in group.members if m.sync == SyncState.SYNCED)
    cp = checkpoint(system, (site, source), (site, volume), [(0, group.num_blocks)])
    if cp is None:
        return group.fig6_add_member(volume, external, progress=advance, target_is_zero=target_is_zero)
    try:
        copied = group.fig6_add_member(volume, external, skip=cp.copied_ranges(), progress=cp.progress(advance),
                                       target_is_zero=target_is_zero)
    except BaseException:
        cp.save()
        raise
    cp.finish()
    system.copies_finished = True
    return copied
