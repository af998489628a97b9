"""The host's mirror program and its mirror settings (SPEC §5 [0055]-[0074], Figs 6, 8, 9).

Keeps true:
- Settings per virtual volume (Fig 8): per member the external identifier (801), sync state
  (802: synced / not synced) and failure state (803: normal / failed / write-inhibited by failure
  Suspend); per program the protection setting (804).
- `MirrorGroup.fig9_write` is the Fig 9 procedure: with protection on, a write is refused before any
  member is touched when any member of any group is write-inhibited (steps 906-910, and [0128]
  for several virtual volumes); each member not failed is written in order; a member that fails
  is marked; if it failed because of the failure-Suspend write inhibit and protection is on, the
  written range is copied back from the inhibited member onto the members already written
  (undo, steps 918-921) and the write fails; otherwise the write succeeds when at least one member
  took it (steps 919-923) — without protection a write may succeed on B alone [0068].
- Reads come only from synced members (Fig 6), so a member being added is never read before it
  holds the data.
- `MirrorGroup.fig6_add_member` is the Fig 6 procedure: register not synced (writes reach it from now
  on), copy from a synced member (skipping ranges that need no copy), mark synced.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import StrEnum

from vstore.blocks.device import BlockDevice
from vstore.blocks.errors import TricopyError
from vstore.blocks.interrupts import deferred_interrupts
from vstore.blocks.ranges import COPY_CHUNK, copy_ranges, merge_ranges
from vstore.blocks.together import run_together
from vstore.replication.network import VolumeFailed
from vstore.replication.storage import AsyncCopyProgram, StorageSystem, WriteInhibited

log = logging.getLogger("vstore.mirror")


class SyncState(StrEnum):
    SYNCED = "synced"
    NOT_SYNCED = "not-synced"


class FailureState(StrEnum):
    NORMAL = "normal"
    FAILED = "failed"
    INHIBITED = "write-inhibited"


class MirrorWriteFailed(TricopyError):
    """No member of the mirror group accepted the write."""


class WriteNotIssued(TricopyError):
    """A member the Fig 9 loop did not reach because an earlier one was write-inhibited."""


@dataclass
class Member:
    volume: str  # volume name at the host's storage
    external_id: str  # 801
    sync: SyncState = SyncState.SYNCED  # 802
    failure: FailureState = FailureState.NORMAL  # 803
    reason: str | None = None

    def to_dict(self) -> dict:
        return {"volume": self.volume, "external_id": self.external_id, "sync": self.sync.value,
                "failure": self.failure.value, "reason": self.reason}

    @classmethod
    def from_dict(cls, d: dict) -> Member:
        return cls(d["volume"], d["external_id"], SyncState(d["sync"]), FailureState(d["failure"]), d.get("reason"))


@dataclass
class MirrorSettings:
    """Fig 8: one entry per virtual volume, plus the program-wide protection setting (804)."""

    protect: bool
    groups: dict[str, list[Member]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"protect": self.protect,
                "groups": {name: [m.to_dict() for m in members] for name, members in self.groups.items()}}

    @classmethod
    def from_dict(cls, d: dict) -> MirrorSettings:
        return cls(bool(d["protect"]), {n: [Member.from_dict(m) for m in ms] for n, ms in d["groups"].items()})


class MirrorProgram:
    """All mirror groups of the host; the write pre-check spans every group [0127]-[0128]."""

    def __init__(self, settings: MirrorSettings, storage: StorageSystem) -> None:
        self.settings = settings
        self.storage = storage
        self.async_program: AsyncCopyProgram | None = None  # set when a member is an async source
        # called after a write that a member refused because its volume failed (Fig 17)
        self.on_volume_failed: Callable[[Member, int, bytes], object] | None = None

    def group(self, virtual_volume: str) -> MirrorGroup:
        if virtual_volume not in self.settings.groups:
            known = ", ".join(sorted(self.settings.groups)) or "none"
            raise TricopyError(f"no virtual volume {virtual_volume!r} (virtual volumes: {known})")
        return MirrorGroup(self, virtual_volume)

    def inhibited_member(self) -> Member | None:
        for members in self.settings.groups.values():
            for m in members:
                if m.failure == FailureState.INHIBITED:
                    return m
        return None

    def refresh(self) -> list[str]:
        """After a resync: members no longer fenced by their storage return to normal."""
        cleared = []
        if self.storage.group_fenced() is None:
            for members in self.settings.groups.values():
                for m in members:
                    if m.failure == FailureState.INHIBITED:
                        m.failure, m.reason = FailureState.NORMAL, None
                        cleared.append(m.volume)
        return cleared


class MirrorGroup(BlockDevice):
    """A virtual volume backed by the members of one mirror group."""

    def __init__(self, program: MirrorProgram, virtual_volume: str) -> None:
        self.program = program
        self.virtual_volume = virtual_volume
        self.name = f"virtual volume {virtual_volume}"
        first = self.program.storage.volume(self.members[0].volume).device
        self.block_size = first.block_size
        self.num_blocks = first.num_blocks

    @property
    def members(self) -> list[Member]:
        return self.program.settings.groups[self.virtual_volume]

    @property
    def protect(self) -> bool:
        return self.program.settings.protect

    # -- Fig 9 -------------------------------------------------------------------------------------
    def _write(self, lba: int, data: bytes) -> None:
        with deferred_interrupts():  # a Ctrl-C lands after every member took the write, never between
            self.fig9_write(lba, data)  # `BlockDevice.write` checked the range

    def fig9_write(self, lba: int, data: bytes) -> None:
        """Fig 9 [0061]-[0068]: with protection on, refuse before any member is written while a
        member is write-inhibited; write the normal members in order; a member that became
        inhibited undoes the others; fail only when no member took the write; a failed volume
        hands over to the Fig 17 reaction."""
        if self.protect:  # steps 906-910
            blocked = self.program.inhibited_member()
            if blocked is not None:
                raise WriteInhibited(
                    f"write refused: member {blocked.volume} is write-inhibited by failure Suspend "
                    f"({blocked.reason}); heal the link and resync first"
                )
        targets = [m for m in self.members if m.failure == FailureState.NORMAL]
        outcomes = self._issue(targets, lba, data)  # steps 911-915
        if targets and outcomes.count(None) == len(outcomes):
            return  # every member took the write: nothing of steps 916-923 applies
        written = [m for m, outcome in zip(targets, outcomes, strict=True) if outcome is None]
        inhibited: tuple[Member, WriteInhibited] | None = None
        volume_failed: Member | None = None
        for member, outcome in zip(targets, outcomes, strict=True):  # steps 916-917
            if outcome is None or isinstance(outcome, WriteNotIssued):
                continue
            if isinstance(outcome, WriteInhibited):
                member.failure, member.reason = FailureState.INHIBITED, str(outcome)
                inhibited = inhibited or (member, outcome)
                continue
            member.failure, member.reason = FailureState.FAILED, str(outcome)
            log.warning("%s: member %s failed: %s", self.name, member.volume, outcome)
            if isinstance(outcome, VolumeFailed):
                volume_failed = member
        if inhibited is not None and self.protect:  # steps 918-921
            self._undo(inhibited[0], written, lba, len(data) // self.block_size)
            raise inhibited[1]
        if not written:  # steps 919-923
            raise MirrorWriteFailed(f"write to {self.name} failed on every member")
        if volume_failed is not None and self.program.on_volume_failed is not None:
            self.program.on_volume_failed(volume_failed, lba, data)  # Fig 17 keeps the Sync site lossless

    def _issue(self, targets: list[Member], lba: int, data: bytes) -> list[TricopyError | None]:
        """Write the target members in order; the outcome per member (None = written). Members are
        written one after the other, never concurrently: a member written before another one's
        write inhibit would make an entry for a write that is then refused (and undone), and the
        Async site must never see a write that was not acknowledged."""
        storage = self.program.storage
        outcomes: list[TricopyError | None] = []
        for member in targets:
            try:
                storage.host_write(member.volume, lba, data)
                outcomes.append(None)
            except TricopyError as exc:
                outcomes.append(exc)
                if isinstance(exc, WriteInhibited) and self.protect:
                    outcomes += [WriteNotIssued("not issued: an earlier member was write-inhibited")] * (
                        len(targets) - len(outcomes))
                    break
        return outcomes

    def _undo(self, inhibited: Member, written: list[Member], lba: int, count: int) -> None:
        """Steps 918-920: restore the range on already-written members from the inhibited one."""
        if not written:
            return
        old = self.program.storage.host_read(inhibited.volume, lba, count)
        for member in written:
            self.program.storage.host_write(member.volume, lba, old)
        log.info("%s: undid blocks %d+%d on %s from %s", self.name, lba, count,
                 ", ".join(m.volume for m in written), inhibited.volume)

    def _read(self, lba: int, count: int) -> bytes:
        for member in self.members:
            if member.sync == SyncState.SYNCED and member.failure != FailureState.FAILED:
                return self.program.storage.host_read(member.volume, lba, count)
        raise TricopyError(f"{self.name}: no synced member can be read")

    def flush(self) -> None:
        """Every write completed before it durable on each working member (A, B), their sync
        secondaries (C) and the spool holding B's entries."""
        storage = self.program.storage
        calls = [functools.partial(storage.flush_volume, m.volume) for m in self.members
                 if m.failure == FailureState.NORMAL]
        if self.program.async_program is not None:
            calls.append(self.program.async_program.log.flush)
        if calls:
            run_together(*calls)  # every sync of the flush at once

    def has_unshipped(self, ranges: Iterable[tuple[int, int]]) -> bool:
        """The trim-rule question for the file system on this virtual volume [0169]."""
        program = self.program.async_program
        if program is None:
            return False
        ranges = list(ranges)
        return any(program.has_unshipped(m.volume, ranges) for m in self.members if m.volume in program.volume_ids)

    # -- Fig 6 -------------------------------------------------------------------------------------
    def _chunks_not_skipped(self, skip: Iterable[tuple[int, int]], chunk: int) -> list[tuple[int, int]]:
        """The chunk-aligned runs of the volume holding any block outside `skip`."""
        runs, at = [], 0
        for first, count in merge_ranges(skip) + [(self.num_blocks, 0)]:
            if first > at:  # a gap at..first-1 that needs copying, widened to whole chunks
                start = at - at % chunk
                runs.append((start, min(self.num_blocks, -(-first // chunk) * chunk) - start))
            at = max(at, first + count)
        return merge_ranges(runs)

    def fig6_add_member(self, volume: str, external_id: str, *, skip: Iterable[tuple[int, int]] = (),
                        progress: Callable[[int], None] | None = None, chunk: int = COPY_CHUNK,
                        target_is_zero: bool = False) -> int:
        """Fig 6 [0070]-[0074]: add `volume` to the group: registered not synced (writes reach it
        from now on, reads do not), copied from a synced member, then synced (readable)."""
        storage = self.program.storage
        if any(m.volume == volume for m in self.members):
            raise TricopyError(f"{volume} is already a member of {self.name}")
        source = next((m for m in self.members if m.sync == SyncState.SYNCED
                       and m.failure == FailureState.NORMAL), None)
        if source is None:
            raise TricopyError(f"{self.name} has no synced member to copy from")
        member = Member(volume, external_id, SyncState.NOT_SYNCED)
        self.members.append(member)  # from here on every write reaches it, reads do not
        log.info("Fig 6: %s registered in %s as not synced", volume, self.name)
        wanted = self._chunks_not_skipped(skip, chunk)
        copied = copy_ranges(lambda lba, n: storage.host_read(source.volume, lba, n),
                             lambda lba, data: storage.host_write(volume, lba, data), wanted,
                             chunk=chunk, progress=progress, target_is_zero=target_is_zero)
        storage.flush_volume(volume)
        member.sync = SyncState.SYNCED
        log.info("Fig 6: %s synced from %s (%d blocks), now readable", volume, source.volume, copied)
        return copied
