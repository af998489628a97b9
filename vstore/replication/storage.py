"""A site's storage system: volumes, access control, the sync and async copy programs, failure
Suspend and the fence (SPEC §2 [0030]-[0033], §3 [0034]-[0047], §5 Fig 4 [0081]-[0084]).

Keeps true:
- **Access control** [0036]: a volume that is the target of a pair not in Simplex rejects host
  writes; only the copy programs write it.
- **Sync copy program** (invariant 1): a host write to the source of a Duplex sync pair is applied
  at the secondary *before* it is applied locally and acknowledged, so an acknowledged write is
  always on the secondary. When the secondary cannot be reached the pair enters failure Suspend
  with the reason, and then either
  - `fence_reject` (protection on, [0040]): this and every later write to any sync source of the
    consistency group is rejected with `WriteInhibited` and nothing is written, so primary and
    secondary stay identical (the mirror program undoes its other members, Fig 9); or
  - record mode: the write is applied locally and its position recorded in the pair's bitmap, for
    a later Duplex-Pending differential copy [0039], [0041].
- **Flush** (DESIGN "Block device": the two promises of a disk with a volatile cache): a host
  write is acknowledged once it is in place at the secondary and here; `flush_volume` makes every
  write completed before it durable at the secondary (first) and here. A secondary acknowledges
  writes from its cache, so the extents written since its last completed flush are remembered
  (`unflushed`) and recorded in the pair's bitmap when it fails: a power cut there may have lost
  them, and the resync copies them again.
- **Async copy program** (`AsyncCopyProgram`, [0043]-[0047]): every write to an async source in
  Duplex becomes one entry in the consistency group's entry log before the write is acknowledged
  (durable at the log's next flush). A full log never drops a write and never blocks: the group goes Suspending ->
  Suspend, recording the positions of the entries it could not ship and of every later write
  (invariant 6). The same program serves the storage (embodiment 1, volume B) and the host-side
  provider (embodiment 4, volume A).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

from vstore.blocks.device import BlockDevice
from vstore.blocks.digests import run_digests
from vstore.blocks.errors import ReadOnlyError, TricopyError
from vstore.blocks.ranges import COPY_CHUNK, copy_ranges
from vstore.blocks.together import run_together
from vstore.replication.entries import Entry
from vstore.replication.network import LinkDown, Network, SiteDown, VolumeFailed
from vstore.replication.pairs import Pair, PairKind, PairRegistry, PairState, split_ref
from vstore.replication.spool import EntryLog, EntryLogFull

log = logging.getLogger("vstore.storage")


class WriteInhibited(TricopyError):
    """Failure-Suspend write inhibit [0040]: the sync secondary is unreachable and protection is on."""


@dataclass
class Volume:
    site: str
    name: str
    device: BlockDevice
    external_id: str

    @property
    def ref(self) -> str:
        return f"{self.site}:{self.name}"


class SiteStorage(Protocol):
    """What the copy programs, the shipper and the procedures use of a site's storage: a
    `StorageSystem` in this process, or `vstore.net.remote.RemoteStorage` behind its daemon."""

    site: str
    volumes: dict[str, Volume]
    host_writes: int

    def volume(self, name: str) -> Volume: ...

    def host_read(self, volume: str, lba: int, count: int = 1) -> bytes: ...

    def digests(self, volume: str, lba: int, count: int, per: int) -> list[bytes]: ...

    def host_write(self, volume: str, lba: int, data: bytes) -> None: ...

    def apply_copy(self, volume: str, lba: int, data: bytes) -> None: ...

    def apply_zeroes(self, volume: str, lba: int, count: int) -> None: ...

    def flush_volume(self, volume: str) -> None: ...

    def copy_to(self, volume: str, dst_site: str, dst_volume: str, ranges: Iterable[tuple[int, int]],
                progress: Callable[[int], None] | None = None, chunk: int = COPY_CHUNK, *,
                target_is_zero: bool = False) -> int: ...

    def group_fenced(self) -> None: ...

    def close(self) -> None: ...


class StorageSystem:
    """One site's storage: its volumes and its sync copy program."""

    def __init__(self, site: str, volumes: dict[str, Volume], registry: PairRegistry, network: Network,
                 peers: Callable[[str], SiteStorage], *, fence_reject: bool,
                 unflushed: dict[str, set[int]] | None = None) -> None:
        self.site = site
        self.volumes = volumes
        self.registry = registry
        self.network = network
        self.peers = peers
        self.fence_reject = fence_reject
        self.async_program: AsyncCopyProgram | None = None  # embodiment 1: the storage makes the entries
        self.host_writes = 0  # acknowledged host writes since the system was opened
        # sync source -> extents written since its secondary's last flush (may outlive this object)
        self.unflushed: dict[str, set[int]] = {} if unflushed is None else unflushed

    # -- volumes -------------------------------------------------------------------------------
    def volume(self, name: str) -> Volume:
        try:
            return self.volumes[name]
        except KeyError:
            known = ", ".join(sorted(self.volumes)) or "none"
            raise TricopyError(f"site {self.site} has no volume {name!r} (volumes: {known})") from None

    def _device(self, name: str) -> BlockDevice:
        vol = self.volume(name)
        self.network.check_volume(self.site, name)
        return vol.device

    # -- host I/O ------------------------------------------------------------------------------
    def host_read(self, volume: str, lba: int, count: int = 1) -> bytes:
        return self._device(volume).read(lba, count)

    def digests(self, volume: str, lba: int, count: int, per: int) -> list[bytes]:
        """One digest per run of `per` blocks of lba..lba+count-1 (`vstore.blocks.digests`)."""
        device = self._device(volume)
        device.check_range(lba, count)
        return run_digests(device.read, lba, count, per, holes=device.data_ranges, block_size=device.block_size)

    def host_write(self, volume: str, lba: int, data: bytes) -> None:
        """A host write: access control, then the sync program, then the local write."""
        vol = self.volume(volume)
        self.network.check_volume(self.site, volume)
        device = vol.device
        count = device.check_write(lba, data)
        into = self.registry.into(vol.ref)
        if into is not None and into.state != PairState.SIMPLEX:
            raise ReadOnlyError(
                f"{vol.ref} is the secondary of pair {into.name} ({into.state.value}); host writes are rejected "
                "until the pair is deleted (failover)"
            )
        sync_pair = self.registry.from_source(vol.ref, PairKind.SYNC)
        if sync_pair is not None:
            self._sync_write(sync_pair, volume, lba, data, count)
        if self.async_program is not None:
            self.async_program.record(volume, lba, data)
        device._write(lba, data)  # checked above: once per layer
        self.host_writes += 1

    # -- sync copy program ---------------------------------------------------------------------
    def group_fenced(self) -> Pair | None:
        """The failure-Suspended sync pair that inhibits writes to every sync source here, if any."""
        if not self.fence_reject:
            return None
        for pair in self.registry.group_members(PairKind.SYNC, self.site):
            if pair.state == PairState.SUSPEND and pair.failure:
                return pair
        return None

    def _sync_write(self, pair: Pair, volume: str, lba: int, data: bytes, count: int) -> None:
        """The sync copy of a host write of `count` blocks to `volume`, the source of `pair`."""
        fenced = self.group_fenced()
        if fenced is not None:
            raise WriteInhibited(
                f"write to {pair.source} rejected: pair {fenced.name} is in failure Suspend "
                f"({fenced.reason}) and protection fences the primary volumes"
            )
        if pair.state in COPYING:
            try:
                self.forward(pair, lba, data)
                first, last = lba // EXTENT_BLOCKS, (lba + count - 1) // EXTENT_BLOCKS
                extents = self.unflushed.setdefault(volume, set())
                if first == last:
                    extents.add(first)
                else:
                    extents.update(range(first, last + 1))
                return
            except (LinkDown, SiteDown, VolumeFailed) as exc:
                self.failure_suspend(pair, str(exc))
                pair.record_write(lba, count)  # the target may or may not hold it: resync rewrites it
                if self.fence_reject:
                    raise WriteInhibited(
                        f"write to {pair.source} rejected: {exc}; pair {pair.name} is now in failure Suspend "
                        "and protection fences the primary volumes"
                    ) from None
        pair.record_write(lba, count)

    def forward(self, pair: Pair, lba: int, data: bytes) -> None:
        """Apply a write at the pair's secondary (raises when it cannot be reached)."""
        site, volume = split_ref(pair.target)
        self.network.check(self.site, site)
        self.network.check_volume(site, volume)  # the fault set is the lab's: a remote target's too
        self.peers(site).apply_copy(volume, lba, data)

    def apply_copy(self, volume: str, lba: int, data: bytes) -> None:
        """Receive side of a copy program: writes the secondary, bypassing host access control. The
        write is in place when this returns (invariant 1); durable at the next `flush_volume`."""
        self._device(volume).write(lba, data)

    def apply_zeroes(self, volume: str, lba: int, count: int) -> None:
        """Receive side of a copy of zeros (a hole of the source): a hole here too."""
        self._device(volume).write_zeroes(lba, count)

    def failure_suspend(self, pair: Pair, reason: str) -> None:
        """Failure Suspend [0038]-[0039]: the pair stops copying and records positions from now on.
        The extents written since the secondary's last completed flush are recorded too: the
        secondary acknowledged them from its cache and may have lost them (a power cut there)."""
        if pair.state == PairState.SUSPEND:
            return
        if pair.kind == PairKind.SYNC:
            for extent in self.unflushed.pop(split_ref(pair.source)[1], set()):
                first = extent * EXTENT_BLOCKS
                pair.bitmap.mark(first, min(EXTENT_BLOCKS, pair.num_blocks - first))
        if pair.kind == PairKind.ASYNC and pair.state == PairState.DUPLEX:
            pair.transition(PairState.SUSPENDING, reason, failure=True)
        fence = " writes fenced" if self.fence_reject and pair.kind == PairKind.SYNC else " positions recorded"
        pair.transition(PairState.SUSPEND, f"{reason};{fence}", failure=True)  # logged by the pair

    # -- copies between sites -------------------------------------------------------------------
    def copy_to(self, volume: str, dst_site: str, dst_volume: str, ranges: Iterable[tuple[int, int]],
                progress: Callable[[int], None] | None = None, chunk: int = COPY_CHUNK, *,
                target_is_zero: bool = False) -> int:
        """Copy block ranges of a local volume to a volume of another site; returns blocks copied.
        `target_is_zero` (a freshly created target): all-zero source chunks need not travel."""
        src = self._device(volume)
        self.network.check(self.site, dst_site)
        self.network.check_volume(dst_site, dst_volume)
        dst = self.peers(dst_site)
        copied = copy_ranges(src.read, lambda lba, data: dst.apply_copy(dst_volume, lba, data), ranges,
                             chunk=chunk, progress=progress, target_is_zero=target_is_zero,
                             zero=lambda lba, n: dst.apply_zeroes(dst_volume, lba, n), data=src.data_ranges)
        dst.flush_volume(dst_volume)
        return copied

    def snapshot(self, volume: str, name: str, chunk: int = 256) -> None:
        """A point-in-time copy of a volume as `<name>.img` beside it (sparse where it is zero)."""
        vol = self.volume(volume)
        src = self._device(volume)
        path = vol.device.path.with_name(f"{name}.img") if hasattr(vol.device, "path") else None
        if path is None:
            raise TricopyError(f"{vol.ref} is not an image file; cannot snapshot it")
        with open(path, "wb") as out:
            out.truncate(src.size_bytes)
            for lba in range(0, src.num_blocks, chunk):
                n = min(chunk, src.num_blocks - lba)
                data = src.read(lba, n)
                if data.count(0) != len(data):
                    out.seek(lba * src.block_size)
                    out.write(data)

    def flush_volume(self, volume: str) -> None:
        """Make every completed write to `volume` durable here and, while its sync pair copies, at
        its secondary too (the secondary first: a flush returns only when both copies hold it)."""
        device = self._device(volume)
        pair = self.registry.from_source(self.volume(volume).ref, PairKind.SYNC)
        failed: list[Exception] = []

        def secondary() -> None:
            try:
                self.forward_flush(pair)  # type: ignore[arg-type]
                self.unflushed.pop(volume, None)
            except (LinkDown, SiteDown, VolumeFailed) as exc:
                self.failure_suspend(pair, str(exc))  # type: ignore[arg-type]
                failed.append(exc)

        if pair is not None and pair.state in COPYING:
            run_together(device.flush, secondary)  # both syncs at once
        else:
            device.flush()
        if failed and self.fence_reject:
            raise WriteInhibited(f"flush of {pair.source} failed at its secondary: {failed[0]}; pair {pair.name} is "
                                 "now in failure Suspend and protection fences the primary volumes")

    def flush_secondaries(self) -> None:
        """Flush the secondary of every sync source with unflushed writes, where it answers (a clean
        stop: what C acknowledged is then durable there). One that does not answer keeps its
        extents remembered; no pair changes state."""
        for volume in list(self.unflushed):
            pair = self.registry.from_source(self.volume(volume).ref, PairKind.SYNC)
            if pair is None or pair.state not in COPYING:
                continue
            try:
                self.forward_flush(pair)
            except (LinkDown, SiteDown, VolumeFailed) as exc:
                log.warning("%s: its secondary did not flush at the stop: %s", pair.name, exc)
                continue
            self.unflushed.pop(volume, None)

    def forward_flush(self, pair: Pair) -> None:
        site, volume = split_ref(pair.target)
        self.network.check(self.site, site)
        self.network.check_volume(site, volume)
        self.peers(site).flush_volume(volume)


EXTENT_BLOCKS = 256  # the unit in which writes not yet flushed at a secondary are remembered
COPYING = frozenset({PairState.DUPLEX, PairState.INITIAL_COPYING, PairState.DUPLEX_PENDING})


class AsyncCopyProgram:
    """Entries for every write to the async sources of one consistency group ([0043]-[0047])."""

    def __init__(self, entry_log: EntryLog, registry: PairRegistry, source_site: str,
                 volume_ids: dict[str, int], block_size: int) -> None:
        self.log = entry_log
        self.registry = registry
        self.source_site = source_site
        self.volume_ids = volume_ids  # source volume name -> entry volume id
        self.block_size = block_size

    def pairs(self) -> list[Pair]:
        return self.registry.group(PairKind.ASYNC, self.source_site)

    def pair_for_id(self, volume_id: int) -> Pair:
        for name, vid in self.volume_ids.items():
            if vid == volume_id:
                pair = self.registry.from_source(f"{self.source_site}:{name}", PairKind.ASYNC)
                if pair is not None:
                    return pair
        raise TricopyError(f"no async pair for volume id {volume_id}")

    def record(self, volume: str, lba: int, data: bytes) -> Entry | None:
        """Called for every acknowledged-to-be write of an async source: entry or position."""
        pair = self.registry.from_source(f"{self.source_site}:{volume}", PairKind.ASYNC)
        if pair is None or pair.state == PairState.SIMPLEX:
            return None
        count = len(data) // self.block_size
        if pair.state in (PairState.DUPLEX, PairState.INITIAL_COPYING, PairState.DUPLEX_PENDING):
            try:
                return self.log.append(self.volume_ids[volume], lba, data)
            except EntryLogFull as exc:
                self.suspend_group(f"entry log full ({exc})")
        pair.record_write(lba, count)
        return None

    def suspend_group(self, reason: str) -> int:
        """Suspending -> Suspend for the whole group: unshipped entries become recorded positions."""
        live = [p for p in self.pairs() if p.state == PairState.DUPLEX]
        for pair in live:
            pair.transition(PairState.SUSPENDING, reason, failure=True)
        discarded = self.log.pending_positions()
        for volume_id, lba, count in discarded:
            self.pair_for_id(volume_id).bitmap.mark(lba, count)
        if discarded:
            self.log.confirm(self.log.next_seq - 1)
        for pair in live:
            pair.transition(PairState.SUSPEND, f"{reason}; {len(discarded)} unshipped entries turned into "
                            "recorded positions", failure=True)
        if live:
            log.warning("async group %s: Suspend (%s)", self.source_site, reason)
        return len(discarded)

    def has_unshipped(self, volume: str, ranges: Iterable[tuple[int, int]]) -> bool:
        """The trim-rule question [0169]: unshipped entries, or positions recorded during Suspend."""
        ranges = list(ranges)
        if self.log.has_unshipped(self.volume_ids[volume], ranges):
            return True
        pair = self.registry.from_source(f"{self.source_site}:{volume}", PairKind.ASYNC)
        if pair is None or pair.bitmap.count() == 0:
            return False
        marked = pair.bitmap.ranges()
        return any(a < b0 + bn and b0 < a + n for a, n in ranges for b0, bn in marked)
