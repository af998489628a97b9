"""The virtual storage provider with async copy function: program 2201 of embodiment 4
(SPEC §8 [0158]-[0163], Fig 22).

Keeps true: the provider is a block device for the file system on the primary host. A block
write is acknowledged only after (1) the storage wrote volume A, which it does only once the Sync
site holds the write (sync copy program: no acknowledged write is missing at C), and (2) the write
was stamped into an entry (gap-free sequence, timestamp) appended to the host's spool. `flush`
makes every write completed before it durable on A, C and in the spool (the two promises of
`vstore.blocks.device`).
Entries leave for the Async host in order and are deleted once it confirms them (vstore.replication.shipping).
`has_unshipped` answers the trim-rule question of [0169]: does any entry not yet confirmed by the
Async host (or any position recorded while the async pair was suspended) touch these blocks?

Order choice: A is written before the entry is appended, so a write refused by the fence
(WriteInhibited) leaves no entry behind and the Async site never receives a write the Sync site
refused. A Ctrl-C or SIGTERM never separates the two steps (`deferred_interrupts`). A host crash
between them leaves an unacknowledged write on A and C only; the embodiment-4 recovery copies
touched files from C, which covers it.
"""

from __future__ import annotations

from collections.abc import Iterable

from vstore.blocks.device import BlockDevice
from vstore.blocks.interrupts import deferred_interrupts
from vstore.blocks.together import run_together
from vstore.replication.storage import AsyncCopyProgram, StorageSystem


class Provider(BlockDevice):
    """Volume `volume` of the host's storage, replicated: sync by storage, async by entries."""

    def __init__(self, storage: StorageSystem, volume: str, program: AsyncCopyProgram) -> None:
        self.storage = storage
        self.volume = volume
        self.program = program
        device = storage.volume(volume).device
        self.block_size = device.block_size
        self.num_blocks = device.num_blocks
        self.name = f"provider volume {storage.site}:{volume}"

    def _write(self, lba: int, data: bytes) -> None:
        with deferred_interrupts():  # a Ctrl-C lands after A, C and the entry, never between them
            self.storage.host_write(self.volume, lba, data)
            self.program.record(self.volume, lba, data)

    def _read(self, lba: int, count: int) -> bytes:
        return self.storage.host_read(self.volume, lba, count)

    def flush(self) -> None:
        """Every write completed before it durable on A, at the Sync site (C) and in the spool."""
        run_together(lambda: self.storage.flush_volume(self.volume), self.program.log.flush)

    def has_unshipped(self, ranges: Iterable[tuple[int, int]]) -> bool:
        return self.program.has_unshipped(self.volume, ranges)
