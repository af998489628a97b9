"""A recording block device: the dm-log-writes / CrashMonkey method for crash-state testing.

Keeps true:
- Every `write` and `flush` that reaches the wrapped device is appended, in order, to `ops`
  (writes are split per block, so a crash may tear a multi-block write between blocks); the
  device's content at `start()` is kept, so any prefix of the log can be materialised.
- A crash state is the start image plus a prefix of the writes (`prefix_states`), or, inside one
  flush epoch (the writes between two flushes, which a disk may persist in any order), the
  completed epochs plus any subset of the open epoch's writes in any order (`epoch_states`), or
  any subset of it applied in log order (`subset_states`: every subset of a short epoch, else the
  systematic ones and seeded random ones), which is what a power cut leaves of unflushed writes.
- The wrapped device still answers `has_unshipped` (the file system must not notice the wrapper).
"""

from __future__ import annotations

import hashlib
import itertools
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from vstore.blocks.device import BlockDevice, BlockRanges, MemoryDevice


@dataclass(frozen=True)
class Write:
    lba: int
    data: bytes


FLUSH = None  # marker in the op log


class RecordingDevice(BlockDevice):
    """Passes I/O through to `base` and records every block write and flush."""

    def __init__(self, base: BlockDevice) -> None:
        self.base = base
        self.block_size = base.block_size
        self.num_blocks = base.num_blocks
        self.readonly = base.readonly
        self.name = f"recording({base.name})"
        self.ops: list[Write | None] = []
        self.initial = b""
        self.recording = False

    def start(self) -> None:
        """Snapshot the current content and start a fresh log."""
        self.initial = self.base.read(0, self.num_blocks)
        self.ops = []
        self.recording = True

    def _read(self, lba: int, count: int) -> bytes:
        return self.base.read(lba, count)

    def _write(self, lba: int, data: bytes) -> None:
        self.base.write(lba, data)
        if self.recording:
            bs = self.block_size
            for i in range(len(data) // bs):
                self.ops.append(Write(lba + i, data[i * bs:(i + 1) * bs]))

    def flush(self) -> None:
        self.base.flush()
        if self.recording:
            self.ops.append(FLUSH)

    def has_unshipped(self, ranges: BlockRanges) -> bool:
        return self.base.has_unshipped(ranges)

    def close(self) -> None:
        self.base.close()

    # -- crash states ------------------------------------------------------------------------
    def writes(self) -> list[Write]:
        return [op for op in self.ops if op is not None]

    def materialise(self, writes: Iterable[Write]) -> MemoryDevice:
        """The start image with `writes` applied in the given order."""
        dev = MemoryDevice(self.num_blocks, self.block_size, data=self.initial, name="crash-state")
        for w in writes:
            dev.write(w.lba, w.data)
        return dev

    def prefix(self, n: int) -> MemoryDevice:
        """The device after the first `n` block writes."""
        return self.materialise(self.writes()[:n])

    def prefix_states(self) -> Iterator[tuple[int, MemoryDevice]]:
        """Every prefix, 0..all writes, built incrementally: (n, device)."""
        dev = MemoryDevice(self.num_blocks, self.block_size, data=self.initial, name="crash-state")
        yield 0, MemoryDevice(self.num_blocks, self.block_size, data=bytes(dev.buf))
        for n, w in enumerate(self.writes(), 1):
            dev.write(w.lba, w.data)
            yield n, MemoryDevice(self.num_blocks, self.block_size, data=bytes(dev.buf))

    def epochs(self) -> list[list[Write]]:
        """The writes grouped by flush epoch."""
        out: list[list[Write]] = [[]]
        for op in self.ops:
            if op is None:
                out.append([])
            else:
                out[-1].append(op)
        return [e for e in out if e]

    def epoch_states(self, max_epoch: int = 6) -> Iterator[tuple[int, int, MemoryDevice]]:
        """Crash states with reordering inside one epoch: for each epoch (index e), every
        distinct result of applying the previous epochs and then a prefix of any permutation of
        epoch e's writes. Epochs longer than `max_epoch` use subsets in log order instead of all
        permutations (all prefixes of the log order and of the log order with one write left
        out). Yields (epoch index, writes of the epoch applied, device)."""
        before: list[Write] = []
        for e, epoch in enumerate(self.epochs()):
            base = self.materialise(before)
            seen: set[bytes] = set()
            orders: Iterable[tuple[Write, ...]]
            if len(epoch) <= max_epoch:
                orders = itertools.permutations(epoch)
            else:  # too many permutations: each single write left out, in log order
                orders = [tuple(epoch)] + [tuple(epoch[:i] + epoch[i + 1:]) for i in range(len(epoch))]
            for order in orders:
                applied: dict[int, bytes] = {}
                for k in range(len(order) + 1):
                    if k:
                        applied[order[k - 1].lba] = order[k - 1].data
                    key = hashlib.sha1(repr(sorted(applied.items())).encode()).digest()
                    if key in seen:
                        continue
                    seen.add(key)
                    dev = MemoryDevice(self.num_blocks, self.block_size, data=bytes(base.buf))
                    for lba, data in applied.items():
                        dev.write(lba, data)
                    yield e, k, dev
            before += epoch

    def subset_states(self, max_exhaustive: int = 10, samples: int = 48,
                      seed: int = 0) -> Iterator[tuple[int, tuple[int, ...], MemoryDevice]]:
        """What a power cut can leave: for each flush epoch e, the epochs before it plus a subset
        of e's writes (applied in log order, a later write of a block over an earlier one). Every
        subset when e has at most `max_exhaustive` writes; else none, all, each one left out,
        each one alone, each prefix, and `samples` seeded random subsets. Yields (epoch index,
        indexes of the writes kept, device)."""
        rng = random.Random(seed)
        before: list[Write] = []
        for e, epoch in enumerate(self.epochs()):
            n = len(epoch)
            picks: Iterable[tuple[int, ...]]
            if n <= max_exhaustive:
                picks = (tuple(i for i in range(n) if m >> i & 1) for m in range(1 << n))
            else:
                every = tuple(range(n))
                picks = [(), every, *((i,) for i in every), *(every[:i] + every[i + 1:] for i in every),
                         *(every[:i] for i in range(1, n)),
                         *(tuple(i for i in every if rng.random() < 0.5) for _ in range(samples))]
            base = self.materialise(before)
            seen: set[tuple[int, ...]] = set()
            for keep in picks:
                if keep in seen:
                    continue
                seen.add(keep)
                dev = MemoryDevice(self.num_blocks, self.block_size, data=bytes(base.buf))
                for i in keep:
                    dev.write(epoch[i].lba, epoch[i].data)
                yield e, keep, dev
            before += epoch
