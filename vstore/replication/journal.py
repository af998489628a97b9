"""The receive journal at the Async site and the one receiver that stores, applies and records a
batch (SPEC §4 [0044]-[0045]; DESIGN invariant 2).

Keeps true:
- `ReceiveJournal` stores a received batch durably before it is applied and remembers the last
  applied sequence, so that after a crash the stored batch is finished (applied again, which is
  idempotent) before the volume is used. A stored batch that does not start right after the last
  applied sequence (damaged files) is refused, never applied.
- `Receiver` is the only code that applies a batch: store, then write every entry to the volume its
  volume id names (a batch naming an unknown volume id is refused before anything is written) and
  flush those volumes, then mark applied. The lab in one process and the site daemon both use it;
  only how a volume is written differs. Given a `writev`, each run of entries that continue one
  another on one volume is one call (a `pwritev` of the received payloads, never joined).
- A batch costs one commit of the journal, whatever its number of entries: the batch file (fsync,
  rename, directory fsync), the volumes' flushes, then `applied.json` (fsync, rename, directory
  fsync). The batch is written in place into the file of a batch applied before (a spare,
  `.batch.spare*`), then renamed to batch.bin: whole, and no file allocated per batch. Retiring
  the applied batch needs no sync: a batch.bin covered by `applied.json` is dropped at open.
- Group commit (`group_commit`, the Async site's daemon): an applied batch is kept as
  `applied-LAST.bin` (a rename) instead of flushing the volumes and saving `applied.json`; a
  checkpoint (those volumes flushed, `applied.json`, the kept batches become spares) runs once
  `CHECKPOINT_BYTES`/`CHECKPOINT_BATCHES` are kept and at a clean stop: a batch costs one sync of
  its file and one of the directory. At open the kept batches continuing `applied.json` are applied
  again, in order, before anything else: a power cut losing the volumes' unsynced writes loses
  nothing acknowledged. One at or below `applied.json` is stale (a checkpoint's renames lost): a
  spare; one damaged or leaving a gap is refused like a damaged batch.bin, never applied.
- A received batch is checked whole (decoded, its range as the request says, every volume id
  known, right after the applied sequence) before any file is written; only then are the targets
  (`targets.json`, which volume each volume id lands on, kept by a daemon so that a stored batch
  can be finished at its next start) and the batch stored.
- `applied.json` and `targets.json` are read only as `AppliedDoc` and `Targets` declare them;
  anything else is one `FormatError` naming the key and what is allowed.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Protocol

import msgspec

from vstore.blocks.codec import (
    create_file,
    fsync_dir,
    load_json,
    make_dir,
    remove_stale_temps,
    save_json_atomic,
)
from vstore.blocks.errors import FormatError, TricopyError, brief
from vstore.blocks.schema import validate
from vstore.replication.entries import MAX_SEQ, Batch, Entry, decode_batch, encode_batch

log = logging.getLogger("vstore.journal")

# --------------------------------------------------------------------------------------------
_BATCH_FILE = "batch.bin"
_SPARE_FILE = ".batch.spare"  # the last applied batch's file, overwritten in place by the next one
_KEPT_PREFIX, _KEPT_SUFFIX = "applied-", ".bin"  # applied-LAST.bin: applied, kept until a checkpoint
CHECKPOINT_BYTES = 16 << 20  # kept batches' bytes that make the receiver checkpoint (group commit)
CHECKPOINT_BATCHES = 256  # ... or kept batches
_APPLIED_FILE = "applied.json"
TARGETS_FILE = "targets.json"

SavedSeq = Annotated[int, msgspec.Meta(ge=0)]
"""The last applied sequence: an integer 0..MAX_SEQ-1, so that a next entry exists (`check_saved_seq`:
msgspec bounds stop at 63 bits, entries' sequences use 64)."""
VolumeId = Annotated[int, msgspec.Meta(ge=0, le=(1 << 32) - 1)]  # an entry's volume id field is 32 bits
VolumeName = Annotated[str, msgspec.Meta(min_length=1, max_length=255)]
Targets = dict[VolumeId, VolumeName]
"""`recv/targets.json` (and a request's `targets`): volume id (a decimal string in JSON) -> volume."""


class AppliedDoc(msgspec.Struct, forbid_unknown_fields=True):
    """`recv/applied.json`: the last sequence applied to the site's volumes."""

    applied_seq: SavedSeq


def check_saved_seq(seq: int, what: str) -> int:
    """`seq` if it is a last applied sequence (0..MAX_SEQ-1), else FormatError naming `what`."""
    if not 0 <= seq < MAX_SEQ or isinstance(seq, bool):
        raise FormatError(f"{what} is {brief(seq)}, not a sequence number 0..{MAX_SEQ - 1}")
    return seq


class ReceiveJournal:
    """Receive a batch durably, then apply it, then confirm (DESIGN invariant 2).

    The stored batch survives a crash; until `mark_applied` it is returned by `stored()` and must
    be applied (again: applying a batch twice leaves the same blocks) before the volume is used.
    """

    def __init__(self, recv_dir: Path, *, durable: bool = True) -> None:
        self.recv_dir = Path(recv_dir)
        self.durable = durable
        self._lock = threading.RLock()
        make_dir(self.recv_dir, parents=True, exist_ok=True)
        remove_stale_temps(self.recv_dir)
        self._checkpointed = self._applied = self._load_applied()
        self._spares = sorted(self.recv_dir.glob(_SPARE_FILE + "*"), reverse=True)
        self._kept: list[tuple[int, Path, int]] = []  # (last seq, file, bytes) of the batches kept, in order
        self._replay: list[Batch] = []  # kept batches found at open, to apply again before anything else
        self._replay_error: FormatError | None = None  # a kept batch damaged or leaving a gap
        self.unflushed: set[str] = set()  # volumes written since the last checkpoint (for `Receiver`)
        self._targets_doc: dict | None = None
        self._load_kept()
        self._drop_batch_if_applied()

    @property
    def applied_seq(self) -> int:
        return self._applied

    @property
    def _batch_path(self) -> Path:
        return self.recv_dir / _BATCH_FILE

    def _load_applied(self) -> int:
        path = self.recv_dir / _APPLIED_FILE
        try:
            doc = load_json(path)
        except FileNotFoundError:
            return 0
        try:
            return check_saved_seq(validate(AppliedDoc, doc, str(path)).applied_seq, f"{path}: applied_seq")
        except FormatError as err:
            raise FormatError(f"{err}; restore it from a backup or resynchronise the async pair") from None

    def _load_kept(self) -> None:
        """The kept batches that continue applied.json (stale ones become spares), checked whole."""
        found = []  # (last seq, path)
        for path in self.recv_dir.glob(f"{_KEPT_PREFIX}*{_KEPT_SUFFIX}"):
            digits = path.name[len(_KEPT_PREFIX):-len(_KEPT_SUFFIX)]
            if not (digits.isdigit() and len(digits) < 21) or (last := int(digits)) <= self._checkpointed:
                self._retire(path)
            else:
                found.append((last, path))
        for last, path in sorted(found):
            try:
                batch = decode_batch(path.read_bytes())
                if batch.last_seq != last or batch.first_seq != self._applied + 1:
                    raise FormatError(f"it covers {batch.first_seq}..{batch.last_seq} after entry {self._applied}")
            except FormatError as err:
                self._replay_error = FormatError(f"{path}: {err}; resynchronise the async pair")
                log.error("%s", self._replay_error)
                return
            self._kept.append((last, path, path.stat().st_size))
            self._replay.append(batch)
            self._applied = last

    def _retire(self, path: Path) -> None:
        """A kept or applied batch's file becomes a spare (no sync: see the module's docstring)."""
        taken, n = {p.name for p in self._spares}, 0
        while (name := _SPARE_FILE if n == 0 else f"{_SPARE_FILE}.{n}") in taken:
            n += 1
        os.replace(path, self.recv_dir / name)
        self._spares.append(self.recv_dir / name)

    def replay(self) -> list[Batch]:
        """The kept batches found at open, to apply again (in order) before the volumes are used;
        FormatError when one is damaged or leaves a gap (resynchronise: `set_applied_seq`)."""
        with self._lock:
            if self._replay_error is not None:
                raise self._replay_error
            return list(self._replay)

    @property
    def needs_checkpoint(self) -> bool:
        return len(self._kept) >= CHECKPOINT_BATCHES or sum(n for _, _, n in self._kept) >= CHECKPOINT_BYTES

    def checkpoint(self) -> None:
        """The caller flushed every volume in `unflushed`: record the applied sequence, then the
        kept batches become spares."""
        with self._lock:
            if self._replay_error is not None:
                raise self._replay_error
            if self._checkpointed != self._applied or self._kept:
                self._save_applied(self._applied)
            self._drop_kept()

    def _drop_kept(self) -> None:
        for _, path, _ in self._kept:
            self._retire(path)
        self._kept, self._replay = [], []
        self.unflushed.clear()

    def saved_targets(self) -> dict[int, str] | None:
        """The targets kept with the last received batch (`store_encoded(..., targets=)`), or None."""
        path = self.recv_dir / TARGETS_FILE
        try:
            doc = load_json(path)
        except FileNotFoundError:
            return None
        try:
            return validate(Targets, doc, str(path), str_keys=True)
        except FormatError as err:
            raise FormatError(f"{err}; restore it from a backup or resynchronise the async pair") from None

    def _save_targets(self, targets: Mapping[int, str]) -> None:
        doc = {str(volume_id): volume for volume_id, volume in sorted(targets.items())}
        path = self.recv_dir / TARGETS_FILE
        if doc != self._targets_doc and (not path.is_file() or load_json(path) != doc):
            save_json_atomic(path, doc, durable=self.durable)
        self._targets_doc = doc

    def _drop_batch_if_applied(self) -> None:
        """A crash inside mark_applied (after saving applied_seq) leaves an applied batch.bin.
        A damaged batch stays where it is: `stored()` reports it, `set_applied_seq` clears it."""
        try:
            batch = self._read_stored()
        except FormatError as err:
            log.warning("%s", err)
            return
        if batch is not None and batch.last_seq <= self._applied:
            self._batch_path.unlink()

    def _save_applied(self, seq: int) -> None:
        save_json_atomic(self.recv_dir / _APPLIED_FILE, {"applied_seq": seq}, durable=self.durable)
        self._checkpointed = self._applied = seq

    def store(self, entries: Sequence[Entry], *, first_seq: int | None = None,
              last_seq: int | None = None) -> None:
        """Durably store the next batch; it must start right after applied_seq. A coalesced batch
        names the range it covers with first_seq/last_seq (see `encode_batch`)."""
        with self._lock:
            if not entries:
                raise TricopyError("refusing to store an empty batch")
            first = entries[0].seq if first_seq is None else first_seq
            self._check_next(first)
            self._write_batch(encode_batch(entries, first_seq=first_seq, last_seq=last_seq))

    def _check_next(self, first: int) -> None:
        if self._batch_path.exists():
            raise TricopyError(f"{self._batch_path}: a received batch is not applied yet; apply it "
                               "and mark it applied before storing the next one")
        if self._replay_error is not None:
            raise self._replay_error
        if first != self._applied + 1:
            raise FormatError(f"batch starts at entry {first} but entry {self._applied} was the "
                              f"last applied: gap or duplicate; resend from entry {self._applied + 1}")

    def store_encoded(self, batch: Batch, data: bytes, targets: Mapping[int, str] | None = None) -> None:
        """`store` for a batch received as bytes: `batch` is `decode_batch(data)` (so the
        bytes were checked); they are stored as they came, not encoded again. `targets`, when
        given, is kept first (`saved_targets`), once the batch is known to be the next one."""
        with self._lock:
            if not batch.entries:
                raise TricopyError("refusing to store an empty batch")
            self._check_next(batch.first_seq)
            if targets is not None:
                self._save_targets(targets)
            self._write_batch(data)

    def _write_batch(self, data: bytes) -> None:
        """batch.bin := data, whole or not at all: written into the spare file, then renamed."""
        spare = self._spares[-1] if self._spares else self.recv_dir / _SPARE_FILE
        fd = create_file(spare, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW)
        try:
            view, done = memoryview(data), 0
            while done < len(view):
                done += os.pwrite(fd, view[done:], done)
            if os.fstat(fd).st_size != len(view):
                os.ftruncate(fd, len(view))
            if self.durable:
                os.fdatasync(fd)
        finally:
            os.close(fd)
        os.replace(spare, self._batch_path)
        if self._spares:
            self._spares.pop()
        if self.durable:
            fsync_dir(self.recv_dir)

    def stored_batch(self) -> Batch | None:
        """The stored batch not yet applied, with its range, or None. A stored batch always starts
        right after applied_seq (`store` checks it): one that does not is damage, never applied."""
        with self._lock:
            batch = self._read_stored()
            if batch is not None and batch.first_seq != self._applied + 1:
                raise FormatError(f"{self._batch_path}: the stored batch covers {batch.first_seq}.."
                                  f"{batch.last_seq} but entry {self._applied} was the last applied; "
                                  "resynchronise the async pair")
            return batch

    def _read_stored(self) -> Batch | None:
        try:
            data = self._batch_path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            return decode_batch(data)
        except FormatError as err:
            raise FormatError(f"{self._batch_path}: {err}") from None

    def stored(self) -> list[Entry] | None:
        """The entries of the stored batch not yet applied, or None."""
        batch = self.stored_batch()
        return None if batch is None else batch.entries

    def mark_applied(self, last_seq: int | None = None, *, retain: bool = False) -> None:
        """Record the stored batch as applied, then delete it (`last_seq`: its last entry, when at
        hand). `retain`: keep it as `applied-LAST.bin` until the next `checkpoint`; without, the
        caller flushed every volume written since the last checkpoint, and the kept batches go too."""
        with self._lock:
            if last_seq is None:
                batch = self.stored_batch()
                if batch is None:
                    raise TricopyError(f"{self.recv_dir}: no stored batch to mark applied")
                last_seq = batch.last_seq
            elif not self._batch_path.exists():
                raise TricopyError(f"{self.recv_dir}: no stored batch to mark applied")
            if retain:
                kept = self.recv_dir / f"{_KEPT_PREFIX}{last_seq}{_KEPT_SUFFIX}"
                size = self._batch_path.stat().st_size
                os.replace(self._batch_path, kept)  # no sync: the next store's directory sync covers it
                self._kept.append((last_seq, kept, size))
                self._applied = last_seq
                return
            self._save_applied(last_seq)
            self._retire(self._batch_path)  # no sync: see the module's docstring
            self._drop_kept()

    def set_applied_seq(self, seq: int) -> None:
        """After a full/differential resync: D now reflects everything up to `seq`; any stored
        batch is obsolete and is deleted."""
        with self._lock:
            check_saved_seq(seq, "the applied sequence")
            kept = list(self.recv_dir.glob(f"{_KEPT_PREFIX}*{_KEPT_SUFFIX}"))  # damaged ones too
            for path in kept:  # obsolete: gone (durably) before the new sequence is saved
                path.unlink(missing_ok=True)
            if kept and self.durable:
                fsync_dir(self.recv_dir)
            self._kept.clear()
            self._replay.clear()
            self._replay_error = None
            self._save_applied(seq)
            self._batch_path.unlink(missing_ok=True)
            if self.durable:
                fsync_dir(self.recv_dir)


class AppliedJournal(Protocol):
    """What the sender and the procedures use of a receive journal, local or behind a daemon."""

    @property
    def applied_seq(self) -> int: ...

    def set_applied_seq(self, seq: int) -> None: ...


class BatchReceiver(Protocol):
    """What the sender uses of a receiving site: `Receiver`, or `vstore.net.remote.RemoteReceiver`."""

    @property
    def journal(self) -> AppliedJournal: ...

    @property
    def applied_seq(self) -> int: ...

    def receive(self, entries: Sequence[Entry], first_seq: int, last_seq: int,
                crash_after_store: bool = False) -> None: ...

    def finish_stored(self) -> int: ...


class SimulatedCrash(TricopyError):
    """Raised by a test hook to stop a procedure where a real crash would."""


class Receiver:
    """The Async site's side of shipping: store a batch durably, apply it in order, record it
    applied. `targets` maps an entry's volume id to the volume receiving it; `write` and `flush`
    reach those volumes (a storage system's copy-program writes, or a daemon's image files);
    `check(volume, lba, payload)`, when given, raises for an entry its volume cannot take (outside
    it, not whole blocks), so a received batch is refused before it is stored. `group_commit`: see
    the module's docstring (the owner calls `checkpoint` at a clean stop)."""

    def __init__(self, journal: ReceiveJournal, site: str, targets: Mapping[int, str],
                 write: Callable[[str, int, bytes], None], flush: Callable[[str], None],
                 check: Callable[[str, int, bytes], None] | None = None,
                 writev: Callable[[str, int, Sequence[bytes]], None] | None = None, *,
                 group_commit: bool = False) -> None:
        self.journal = journal
        self.group_commit = group_commit
        self.site = site
        self.targets = dict(targets)
        self._write = write
        self._writev = writev
        self._flush = flush
        self._check = check

    @property
    def applied_seq(self) -> int:
        return self.journal.applied_seq

    def receive(self, entries: Sequence[Entry], first_seq: int, last_seq: int,
                crash_after_store: bool = False) -> None:
        """Store the batch covering first_seq..last_seq, apply it, record it applied."""
        self._replay_kept()
        self.journal.store(entries, first_seq=first_seq, last_seq=last_seq)
        if crash_after_store:
            raise SimulatedCrash("Async site crashed after storing a batch, before applying it")
        self._apply(entries)
        self._applied(last_seq)

    def _applied(self, last_seq: int) -> None:
        self.journal.mark_applied(last_seq, retain=self.group_commit)
        if self.group_commit and self.journal.needs_checkpoint:
            self.checkpoint()

    def receive_encoded(self, data: bytes, first_seq: int, last_seq: int, *, keep_targets: bool = False) -> int:
        """`receive` for a batch that arrived as bytes: decoded once and checked whole (range,
        volume ids, sequence) before anything is stored, then stored as it came (with the
        targets first when `keep_targets`)."""
        batch = decode_batch(data)
        if (batch.first_seq, batch.last_seq) != (first_seq, last_seq):
            raise FormatError(f"batch covers {batch.first_seq}..{batch.last_seq}, the request says "
                              f"{first_seq}..{last_seq}")
        self._check_targets(batch.entries)
        self._replay_kept()
        self.journal.store_encoded(batch, data, self.targets if keep_targets else None)
        self._apply(batch.entries, checked=True)
        self._applied(batch.last_seq)
        return len(batch.entries)

    def finish_stored(self) -> int:
        """Apply the kept batches found at open and the stored batch (crash recovery); entries applied."""
        done = self._replay_kept()
        entries = self.journal.stored()
        if entries is not None:
            self._apply(entries, flush=True)
            self.journal.mark_applied()
            done += len(entries)
        elif done:
            self.checkpoint()
        return done

    def _replay_kept(self) -> int:
        """The kept batches a crash left (maybe not on disk) applied again, in order, then a checkpoint."""
        batches = self.journal.replay()
        if not batches:
            return 0
        for batch in batches:
            self._apply(batch.entries, flush=False)
        self.checkpoint()
        return sum(len(b.entries) for b in batches)

    def checkpoint(self) -> None:
        """Flush every volume written since the last checkpoint, then record the applied sequence."""
        for volume in sorted(self.journal.unflushed):
            self._flush(volume)
        self.journal.checkpoint()

    def _check_targets(self, entries: Sequence[Entry]) -> None:
        for e in entries:
            if e.volume_id not in self.targets:
                raise TricopyError(f"entry {e.seq} for unknown volume id {e.volume_id} at site {self.site}")
            if self._check is not None:
                self._check(self.targets[e.volume_id], e.lba, e.payload)

    def _apply(self, entries: Sequence[Entry], checked: bool = False, flush: bool | None = None) -> None:
        """Write the entries in order (a batch naming a volume id this site lacks writes nothing),
        then flush every volume written since the last checkpoint unless `flush` is False or, by
        default, in group commit."""
        if not checked:
            self._check_targets(entries)
        used: set[str] = set()
        if self._writev is None:
            for e in entries:
                volume = self.targets[e.volume_id]
                self._write(volume, e.lba, e.payload)
                used.add(volume)
        else:
            for volume, lba, payloads in runs(entries, self.targets):
                self._writev(volume, lba, payloads)
                used.add(volume)
        self.journal.unflushed |= used
        if flush is False or (flush is None and self.group_commit):
            return
        for volume in sorted(self.journal.unflushed):
            self._flush(volume)


def runs(entries: Sequence[Entry], targets: Mapping[int, str]) -> list[tuple[str, int, list[bytes]]]:
    """(volume, first lba, payloads) of each run of entries, in order, where an entry starts on the
    block right after the one before it on the same volume (so a run writes no block twice)."""
    out: list[tuple[str, int, list[bytes]]] = []
    end = -1
    for e in entries:
        volume = targets[e.volume_id]
        if out and out[-1][0] == volume and e.lba == end:
            out[-1][2].append(e.payload)
        else:
            out.append((volume, e.lba, [e.payload]))
        end = e.lba + e.block_count
    return out
