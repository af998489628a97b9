"""Another site's storage, receive journal and the application's volume, reached over the
authenticated RPC of `vstore.net` (DESIGN "Sites and links", "Process model"; SPEC §4).

Keeps true: these classes offer exactly the methods the in-process code calls on a local
`StorageSystem`, `ReceiveJournal`/`Receiver` and `BlockDevice`, so the sync copy program, the
shipper and the procedures run unchanged whether a peer is in this process or behind a daemon.
Block data travels in requests of at most `MESSAGE_BYTES`, so a read or write of any size fits
the frame limit. A peer that cannot be reached raises `ConnectionFailed` (a `SiteDown`), which the
copy programs already turn into failure Suspend.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence

from vstore.blocks.device import BlockDevice
from vstore.blocks.digests import DIGEST_SIZE
from vstore.blocks.errors import TricopyError
from vstore.blocks.holders import Claim
from vstore.blocks.ranges import COPY_CHUNK, copy_ranges
from vstore.net.client import Peer
from vstore.net.rpc import (
    APP_FLUSH,
    APP_HAS_UNSHIPPED,
    APP_INFO,
    APP_READ,
    APP_WRITE,
    JOURNAL_APPLIED,
    JOURNAL_FINISH,
    JOURNAL_RECEIVE,
    JOURNAL_SET_APPLIED,
    VOL_DIGEST,
    VOL_FLUSH,
    VOL_READ,
    VOL_WRITE,
    VOL_ZERO,
)
from vstore.replication.entries import Entry, encode_batch
from vstore.replication.network import SiteDown
from vstore.replication.storage import SiteStorage, Volume

SEEN_INCARNATION: weakref.WeakKeyDictionary[Peer, str | None] = weakref.WeakKeyDictionary()
"""The page cache each peer connection last answered a copy-program write or flush from."""


class SiteRestarted(SiteDown):
    """A site answered from a new page cache: its unflushed writes may be gone."""


ZERO_BLOCKS = 1 << 20  # blocks one vol.zero may cover (its answer is small whatever the count)
MESSAGE_BYTES = 8 << 20  # block data per request, well inside the frame limit of vstore.net.wire


def spans(lba: int, count: int, block_size: int) -> Iterator[tuple[int, int]]:
    """(first, count) pieces of blocks lba..lba+count-1 of at most MESSAGE_BYTES each."""
    step = max(1, MESSAGE_BYTES // block_size)
    for first in range(lba, lba + count, step):
        yield first, min(step, lba + count - first)


class RemoteDevice(BlockDevice):
    """A volume of a remote site, read and written block-wise over RPC (copy-program writes)."""

    def __init__(self, client: Peer, site: str, volume: str, block_size: int, num_blocks: int) -> None:
        self.client, self.site, self.volume = client, site, volume
        self.block_size, self.num_blocks = block_size, num_blocks
        self.name = f"{site}:{volume} (remote)"

    def _read(self, lba: int, count: int) -> bytes:
        return b"".join(self.client.call(VOL_READ, {"volume": self.volume, "lba": first, "count": n})[1]
                        for first, n in spans(lba, count, self.block_size))

    def _write(self, lba: int, data: bytes) -> None:
        for first, n in spans(lba, len(data) // self.block_size, self.block_size):
            at = (first - lba) * self.block_size
            self.client.call(VOL_WRITE, {"volume": self.volume, "lba": first}, data[at:at + n * self.block_size])

    def flush(self) -> None:
        self.client.call(VOL_FLUSH, {"volume": self.volume})


class RemoteStorage:
    """The parts of `StorageSystem` that other sites use: copy-program apply, reads, copies."""

    def __init__(self, site: str, client: Peer, volumes: dict[str, dict], block_size: int, num_blocks: int,
                 peers: Callable[[str], SiteStorage]) -> None:
        self.site = site
        self.client = client
        self.peers = peers
        self.volumes = {name: Volume(site, name, RemoteDevice(client, site, name, block_size, num_blocks),
                                     spec["external_id"]) for name, spec in volumes.items()}
        self.host_writes = 0
        self.async_program = None

    def volume(self, name: str) -> Volume:
        if name not in self.volumes:
            raise TricopyError(f"site {self.site} has no volume {name!r}")
        return self.volumes[name]

    def host_read(self, volume: str, lba: int, count: int = 1) -> bytes:
        return self.volume(volume).device.read(lba, count)

    def digests(self, volume: str, lba: int, count: int, per: int) -> list[bytes]:
        """The digests computed by the site itself: only they cross the link."""
        self.volume(volume)
        _, data = self.client.call(VOL_DIGEST, {"volume": volume, "lba": lba, "count": count, "per": per})
        expected = -(-count // per)
        if len(data) != expected * DIGEST_SIZE:
            raise TricopyError(f"site {self.site} answered {len(data)} bytes of digests for {count} blocks "
                               f"in runs of {per}; expected {expected * DIGEST_SIZE}")
        return [data[i:i + DIGEST_SIZE] for i in range(0, len(data), DIGEST_SIZE)]

    def apply_copy(self, volume: str, lba: int, data: bytes) -> None:
        self._same_cache(self.client.call(VOL_WRITE, {"volume": volume, "lba": lba, "flush": False}, data)[0])

    def flush_volume(self, volume: str) -> None:
        self._same_cache(self.client.call(VOL_FLUSH, {"volume": volume})[0])

    def apply_zeroes(self, volume: str, lba: int, count: int) -> None:
        for first in range(lba, lba + count, ZERO_BLOCKS):
            n = min(ZERO_BLOCKS, lba + count - first)
            self._same_cache(self.client.call(VOL_ZERO, {"volume": volume, "lba": first, "count": n})[0])

    def _same_cache(self, answer: dict) -> None:
        """The site answered from the page cache it answered from before, or the writes it
        acknowledged since its last flush may be lost: `SiteRestarted` (the pair fails, and those
        extents are recorded for the resync)."""
        now = answer.get("incarnation")
        before = SEEN_INCARNATION.get(self.client)
        SEEN_INCARNATION[self.client] = now
        if before is not None and now != before:
            raise SiteRestarted(f"site {self.site} came back in a new boot (a power cut or a reboot): what it had "
                                "acknowledged from its cache since its last flush may be lost")

    def copy_to(self, volume: str, dst_site: str, dst_volume: str, ranges: Iterable[tuple[int, int]],
                progress: Callable[[int], None] | None = None, chunk: int = COPY_CHUNK, *,
                target_is_zero: bool = False) -> int:
        dst = self.peers(dst_site)
        return copy_ranges(lambda lba, n: self.host_read(volume, lba, n),
                           lambda lba, data: dst.apply_copy(dst_volume, lba, data), ranges,
                           chunk=chunk, progress=progress, target_is_zero=target_is_zero,
                           zero=lambda lba, n: dst.apply_zeroes(dst_volume, lba, n))

    def host_write(self, volume: str, lba: int, data: bytes) -> None:
        raise TricopyError(f"host writes to site {self.site} go through that site's own daemon")

    def group_fenced(self) -> None:
        return None

    def close(self) -> None:
        """Nothing to release: the client belongs to the caller."""


class RemoteJournal:
    """The receive journal of a remote Async site (`ReceiveJournal`'s interface)."""

    def __init__(self, client: Peer) -> None:
        self.client = client

    @property
    def applied_seq(self) -> int:
        return int(self.client.call(JOURNAL_APPLIED)[0]["applied_seq"])

    def set_applied_seq(self, seq: int) -> None:
        self.client.call(JOURNAL_SET_APPLIED, {"seq": seq})


class RemoteReceiver:
    """`shipping.Receiver` for a remote site: one RPC stores, applies and records a batch there."""

    def __init__(self, client: Peer, targets: dict[int, str]) -> None:
        self.client = client
        self.targets = {str(k): v for k, v in targets.items()}
        self.journal = RemoteJournal(client)

    @property
    def applied_seq(self) -> int:
        return self.journal.applied_seq

    def receive(self, batch: Sequence[Entry], first_seq: int, last_seq: int, crash_after_store: bool = False) -> None:
        self.client.call(JOURNAL_RECEIVE, {"first_seq": first_seq, "last_seq": last_seq, "targets": self.targets,
                                             "crash_after_store": crash_after_store},
                         encode_batch(batch, first_seq=first_seq, last_seq=last_seq))

    def finish_stored(self) -> int:
        return int(self.client.call(JOURNAL_FINISH, {"targets": self.targets})[0]["applied"])


class AppDevice(BlockDevice):
    """The application's volume at the site running it, through that site's daemon (what
    `jfs ... lab:LAB` uses while the lab is up). Each write returns when the daemon acknowledged
    it: A written (so C has it) and its entry in the spool; `flush` returns when every write before
    it is durable on A, C and in the spool, and `write_fua` when that write is. The volume's geometry comes
    from `app.info`, unless `client.app_info` already holds that daemon's answer for volume 0
    (used once). A `claim` given to it (the application writer's, see vstore.targets) is held until
    the device is closed."""

    def __init__(self, client: Peer, volume: int = 0, *, readonly: bool = False) -> None:
        info, client.app_info = client.app_info, None
        if info is None or volume != 0:
            info = client.call(APP_INFO, {"volume": volume})[0]
        self.client, self.volume, self.readonly, self.active = client, volume, readonly, str(info["active"])
        self.block_size, self.num_blocks = int(info["block_size"]), int(info["num_blocks"])
        self.name = f"{info['name']} (via the {info['active']} daemon)"
        # Another process (the shipper) ships this device's entries: a full jfs metadata log mounted on it
        # waits this long for shipping before LogFull (jfs `FileSystem.mount` reads it).
        self.log_full_wait = 60.0
        self.claim: Claim | None = None

    def _read(self, lba: int, count: int) -> bytes:
        return b"".join(self.client.call(APP_READ, {"volume": self.volume, "lba": first, "count": n})[1]
                        for first, n in spans(lba, count, self.block_size))

    def _write(self, lba: int, data: bytes, *, fua: bool = False) -> None:
        """Each request is one acknowledged application write; a large write is several."""
        args = {"volume": self.volume, "fua": True} if fua else {"volume": self.volume}
        for first, n in spans(lba, len(data) // self.block_size, self.block_size):
            at = (first - lba) * self.block_size
            self.client.call(APP_WRITE, {**args, "lba": first}, data[at:at + n * self.block_size])

    def write_fua(self, lba: int, data: bytes) -> None:
        self.check_write(lba, data)
        self._write(lba, data, fua=True)

    def flush(self) -> None:
        self.client.call(APP_FLUSH, {"volume": self.volume})

    def has_unshipped(self, ranges: Iterable[tuple[int, int]]) -> bool:
        answer = self.client.call(APP_HAS_UNSHIPPED, {"volume": self.volume, "ranges": [list(r) for r in ranges]})
        return bool(answer[0]["answer"])

    def close(self) -> None:
        self.client.close()
        if self.claim is not None:
            self.claim.release()
