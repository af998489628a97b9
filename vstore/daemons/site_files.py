"""What a site daemon keeps of its own site directory, and the requests that read and write it:
`state.json`, the volumes, the receive journal (DESIGN "Daemons": a daemon serves only its own
site directory; "Lab layout"; SPEC §4 [0044]-[0045]).

Keeps true:
- Every path the daemon opens lies in its site directory: `state.json` is read and stored only as
  `check_site_state` declares it (a volume's file a plain name there), `state.put` refuses a state
  whose volumes are not regular image files of this site before anything is stored, and the
  images are opened O_NOFOLLOW (`ImageDevice` of a lab's volume), so no state, stored or sent,
  makes the daemon open a file outside its site.
- `journal.receive` checks the whole request (arguments, the batch decoded, its range, every
  volume id mapped to a volume of this site, every entry inside its volume and of whole blocks,
  the next sequence) before the targets or the batch are stored; a refused request leaves no
  file behind, and a stored batch can always be finished at the next start.
- `vol.write` and `vol.flush` answer with the site's `incarnation` (`site_incarnation`): the same
  name as long as the site's page cache lives, so the primary can tell a restart that kept what
  this site acknowledged from its cache from a power cut that may have lost it.
- A read is bounded before it allocates (`check_reply`); `vol.digest` answers only digests, reading
  a bounded number of blocks at a time.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path
from typing import Annotated, Any

import msgspec

from vstore.blocks.codec import load_json, save_json_atomic
from vstore.blocks.device import ImageDevice
from vstore.blocks.digests import run_digests
from vstore.blocks.errors import FormatError, TricopyError, brief
from vstore.daemons.requests import BlockCount, Lba, Name, NoArgs, check_reply, rpc
from vstore.lab.sitedir import RECV_DIR, STATE_FILE, check_site_state, open_journal, site_incarnation
from vstore.lab.topology import Topology
from vstore.net import rpc as names
from vstore.replication.journal import TARGETS_FILE, ReceiveJournal, Receiver, Targets

log = logging.getLogger("vstore.daemon")
Answer = tuple[dict, bytes]
MAX_DIGEST_BLOCKS = 1 << 16  # blocks digested per vol.digest request: at most 1 MiB of digests in the answer


class StatePut(msgspec.Struct, forbid_unknown_fields=True):
    state: dict[str, Any]


class VolRead(msgspec.Struct, forbid_unknown_fields=True):
    volume: Name
    lba: Lba
    count: BlockCount


class VolWrite(msgspec.Struct, forbid_unknown_fields=True):
    volume: Name
    lba: Lba
    flush: bool = True


class VolFlush(msgspec.Struct, forbid_unknown_fields=True):
    volume: Name


class VolZero(msgspec.Struct, forbid_unknown_fields=True):
    volume: Name
    lba: Lba
    count: Annotated[int, msgspec.Meta(ge=1, le=1 << 20)]


class VolDigest(msgspec.Struct, forbid_unknown_fields=True):
    volume: Name
    lba: Lba
    count: Annotated[int, msgspec.Meta(ge=1, le=MAX_DIGEST_BLOCKS)]
    per: Annotated[int, msgspec.Meta(ge=1, le=MAX_DIGEST_BLOCKS)]


class JournalSetApplied(msgspec.Struct, forbid_unknown_fields=True):
    seq: Lba  # a last applied sequence: the journal checks it is below MAX_SEQ


class JournalReceive(msgspec.Struct, forbid_unknown_fields=True):
    first_seq: Lba
    last_seq: Lba
    targets: Targets
    crash_after_store: bool = False  # the in-process test hook; a daemon never simulates a crash


class JournalFinish(msgspec.Struct, forbid_unknown_fields=True):
    targets: Targets


class SiteFiles:
    """The daemon's own site directory: its state, volumes and receive journal (a mixin of
    `SiteDaemon`, which sets `site`, `site_dir` and `topo`)."""

    site: str
    site_dir: Path
    topo: Topology

    def init_files(self) -> None:
        self._state_cache: tuple[tuple[int, int, int], dict] | None = None
        self._journal: ReceiveJournal | None = None
        self.devices: dict[str, ImageDevice] = {}
        self._incarnation: str | None = None

    @property
    def incarnation(self) -> str:
        """The name of the page cache this site's volumes live in (`site_incarnation`): a peer
        that sees it change knows that writes acknowledged here but not flushed may be lost."""
        if self._incarnation is None:
            self._incarnation = site_incarnation(self.site_dir, self.topo.durable)
        return self._incarnation

    # -- local primitives -----------------------------------------------------------------------
    def state(self) -> dict | None:
        """This site's state.json, parsed and checked again only when the file changed (it is
        replaced by rename, so a new inode). Read-only: callers never change the returned dict."""
        path = self.site_dir / STATE_FILE
        try:
            st = path.stat()
        except FileNotFoundError:
            return None
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        if self._state_cache is None or self._state_cache[0] != stamp:
            self._state_cache = (stamp, check_site_state(self.site, load_json(path)))
        return self._state_cache[1]

    def device(self, volume: str) -> ImageDevice:
        if volume in self.devices:  # volumes change only while the daemons are down (procedures)
            return self.devices[volume]
        state = self.state()
        if state is None or volume not in state.get("volumes", {}):
            raise TricopyError(f"site {self.site} has no volume {brief(volume)}")
        self.devices[volume] = ImageDevice(self.site_dir / state["volumes"][volume]["file"],
                                           self.topo.block_size, durable=self.topo.durable, shared_claim=True)
        return self.devices[volume]

    def journal(self) -> ReceiveJournal:
        """This site's receive journal, opened on first use (a site that never receives has no recv/)."""
        if self._journal is None:
            self._journal = open_journal(self.site_dir, self.topo)
        return self._journal

    def receiver(self, targets: dict[int, str]) -> Receiver:
        """This site's receiver for entries whose volume ids `targets` maps to its volumes (each
        one checked to be a volume here first)."""
        for volume in sorted(set(targets.values())):
            self.device(volume)
        return Receiver(self.journal(), self.site, targets,
                        lambda volume, lba, data: self.device(volume).write(lba, data),
                        lambda volume: self.device(volume).flush(), self._check_entry,
                        writev=lambda volume, lba, bufs: self.device(volume).writev(lba, bufs), group_commit=True)

    def _check_entry(self, volume: str, lba: int, payload: bytes) -> None:
        dev = self.device(volume)
        dev.check_range(lba, dev.check_payload(payload))

    def finish_at_start(self) -> None:
        """Finish a batch stored before a crash, with the targets kept beside it."""
        if (self.site_dir / RECV_DIR / TARGETS_FILE).is_file():
            targets = self.journal().saved_targets() or {}
            applied = self.receiver(targets).finish_stored()
            if applied:
                log.warning("finished a batch of %d entries stored before a crash", applied)

    def check_volume_files(self, state: dict) -> None:
        """Each volume of `state` is a regular image file (not a link) in this site directory."""
        for name, spec in state.get("volumes", {}).items():
            try:
                mode = os.lstat(self.site_dir / spec["file"]).st_mode
            except OSError:
                mode = 0
            if not stat.S_ISREG(mode):
                raise FormatError(f"site {self.site}: the state names {brief(spec['file'])} as the image of "
                                  f"volume {brief(name)}, which is not an image file in {self.site_dir}")

    def close_files(self) -> None:
        if self._journal is not None:
            try:  # a clean stop: the kept batches' volumes flushed, the applied sequence recorded
                self.receiver({}).checkpoint()
            except (TricopyError, OSError) as exc:
                log.warning("the receive journal keeps its batches until the next start: %s", exc)
        for dev in self.devices.values():
            dev.close()
        self.devices.clear()

    # -- requests -------------------------------------------------------------------------------
    @rpc(names.STATE_GET, NoArgs, inline=True)
    def state_get(self, args: NoArgs, data: bytes) -> Answer:
        return {"state": self.state()}, b""

    @rpc(names.STATE_PUT, StatePut)
    def state_put(self, args: StatePut, data: bytes) -> Answer:
        state = check_site_state(self.site, args.state)
        self.check_volume_files(state)
        save_json_atomic(self.site_dir / STATE_FILE, state, durable=self.topo.durable)
        return {}, b""

    @rpc(names.VOL_READ, VolRead, inline=True)
    def vol_read(self, args: VolRead, data: bytes) -> Answer:
        dev = self.device(args.volume)
        check_reply(args.count, dev.block_size)
        return {}, dev.read(args.lba, args.count)

    @rpc(names.VOL_WRITE, VolWrite, inline=True)
    def vol_write(self, args: VolWrite, data: bytes) -> Answer:
        dev = self.device(args.volume)
        dev.write(args.lba, data)
        if args.flush:
            dev.flush()
        return {"incarnation": self.incarnation}, b""

    @rpc(names.VOL_ZERO, VolZero, inline=True)
    def vol_zero(self, args: VolZero, data: bytes) -> Answer:
        self.device(args.volume).write_zeroes(args.lba, args.count)
        return {"incarnation": self.incarnation}, b""

    @rpc(names.VOL_DIGEST, VolDigest)
    def vol_digest(self, args: VolDigest, data: bytes) -> Answer:
        """The digests of a volume's runs, computed here so that only they cross the link."""
        dev = self.device(args.volume)
        dev.check_range(args.lba, args.count)
        return {}, b"".join(run_digests(dev.read, args.lba, args.count, args.per, holes=dev.data_ranges,
                                        block_size=dev.block_size))

    @rpc(names.VOL_FLUSH, VolFlush, inline=True)
    def vol_flush(self, args: VolFlush, data: bytes) -> Answer:
        self.device(args.volume).flush()
        return {"incarnation": self.incarnation}, b""

    @rpc(names.JOURNAL_APPLIED, NoArgs, inline=True)
    def journal_applied(self, args: NoArgs, data: bytes) -> Answer:
        return {"applied_seq": self.journal().applied_seq}, b""

    @rpc(names.JOURNAL_SET_APPLIED, JournalSetApplied)
    def journal_set_applied(self, args: JournalSetApplied, data: bytes) -> Answer:
        self.journal().set_applied_seq(args.seq)
        return {}, b""

    @rpc(names.JOURNAL_RECEIVE, JournalReceive, inline=True)
    def journal_receive(self, args: JournalReceive, data: bytes) -> Answer:
        """Check everything, then store (targets, batch), apply, record: the batch is decoded once."""
        applied = self.receiver(args.targets).receive_encoded(data, args.first_seq, args.last_seq,
                                                               keep_targets=True)
        return {"applied": applied}, b""

    @rpc(names.JOURNAL_FINISH, JournalFinish, inline=True)
    def journal_finish(self, args: JournalFinish, data: bytes) -> Answer:
        return {"applied": self.receiver(args.targets).finish_stored()}, b""
