"""Fuzz target: the RPC requests a site daemon answers, with mutated argument documents and data,
in process: the three `SiteDaemon`s of a scratch lab reach each other through their `handle`
(DESIGN "Daemons": a daemon serves only its own site directory; invariant 5; SPEC §4).

Keeps true for every input: the request is answered or refused with a project error (never
another exception, which a real daemon would answer as "internal"); nothing outside the site
directories (and `LAB/run`) changes and nothing appears beside the lab, also when every volume the
site's state then names is read and written; afterwards every site's state.json and receive
journal load without any error, and a daemon started anew on the site finishes its start-up work
(the stored batch, its targets) with success or a project error.

Input: one flags byte, then the arguments (JSON), the data and, optionally, "mirror" (a mirror-mode
lab instead of a provider-mode one), cut at `harness.SEP`. Flag bits 0-4 choose the method
(`METHODS`), bits 5-6 the site (3: the site the method is meant for), bit 7 reads and writes every
volume of that site's state after the request.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from tools.fuzz import harness
from vstore.blocks.codec import parse_json_object
from vstore.blocks.errors import TricopyError
from vstore.daemons.requests import HANDLERS
from vstore.daemons.site import SiteDaemon
from vstore.lab.sitedir import RECV_DIR, load_site_state
from vstore.lab.topology import SITE_NAMES
from vstore.net import rpc as names
from vstore.net.wire import RemoteError
from vstore.procedures.create import init_lab
from vstore.replication.entries import Entry, encode_batch
from vstore.replication.journal import ReceiveJournal

METHODS = tuple(HANDLERS.names())
BS = 512
BLOCKS = 16
OWN = ("primary", "sync", "async", "run")  # what the daemons may write in a lab
NATURAL = {names.JOURNAL_APPLIED: "async", names.JOURNAL_SET_APPLIED: "async", names.JOURNAL_RECEIVE: "async",
           names.JOURNAL_FINISH: "async", names.VOL_READ: "sync", names.VOL_WRITE: "sync", names.VOL_FLUSH: "sync",
           names.VOL_DIGEST: "sync", names.VOL_ZERO: "sync", names.STATE_PUT: "sync"}
_templates: dict[str, Path] = {}


class LocalPeer:
    """What a daemon's `Peer` does, to another daemon of this process: the arguments and the answer
    travel as JSON, a refusal comes back as `RemoteError`."""

    app_info = None

    def __init__(self, daemons: dict[str, SiteDaemon], site: str) -> None:
        self.daemons, self.site = daemons, site

    def call(self, method: str, args: dict | None = None, data: bytes = b"") -> tuple[dict, bytes]:
        doc = json.loads(json.dumps(args or {}))
        try:
            result, out = self.daemons[self.site].handle(method, doc, bytes(data))
        except TricopyError as err:
            raise RemoteError(str(err), type(err).__name__) from None
        return json.loads(json.dumps(result)), out

    def post(self, method: str, args: dict | None = None, data: bytes = b"") -> None:
        try:
            self.call(method, args, data)
        except RemoteError:
            pass  # a posted request's refusal is only logged

    def close(self) -> None:
        """Nothing to close."""


def template(mode: str) -> Path:
    """A lab of this mode made once per process, copied for every input."""
    if mode not in _templates:
        base = tempfile.mkdtemp(prefix="tricopy-fuzz-rpc-template-")
        atexit.register(shutil.rmtree, base, ignore_errors=True)
        lab = Path(base) / "lab"
        init_lab(lab, mode=mode, size=BLOCKS * BS, block_size=BS, spool_capacity=1 << 16)
        _templates[mode] = lab
    return _templates[mode]


def daemons_of(lab: Path) -> dict[str, SiteDaemon]:
    daemons: dict[str, SiteDaemon] = {}
    for site in SITE_NAMES:
        daemons[site] = SiteDaemon(lab, site)
    for daemon in daemons.values():
        daemon.peers = {other: LocalPeer(daemons, other) for other in SITE_NAMES if other != daemon.site}
    return daemons


def _outside(lab: Path) -> dict[str, str]:
    """Every file of the lab outside the daemons' own directories, by its digest."""
    found = {}
    for path in sorted(lab.rglob("*")):
        rel = path.relative_to(lab)
        if path.is_symlink():
            found[str(rel)] = "symlink"
        elif rel.parts[0] not in OWN and path.is_file():
            found[str(rel)] = hashlib.sha1(path.read_bytes()).hexdigest()
    return found


def _touch_volumes(daemon: SiteDaemon) -> None:
    state = harness.rejects(daemon.state)
    if not isinstance(state, dict):
        return
    for volume in state.get("volumes", {}):
        harness.rejects(daemon.handle, names.VOL_READ, {"volume": volume, "lba": 0, "count": 1}, b"")
        harness.rejects(daemon.handle, names.VOL_WRITE, {"volume": volume, "lba": 0}, b"\1" * BS)


def _starts_again(lab: Path, site: str) -> None:
    """The site's files load, and a new daemon does its start-up work (project errors allowed there)."""
    for name in SITE_NAMES:
        load_site_state(lab / name)
        if (lab / name / RECV_DIR).is_dir():
            ReceiveJournal(lab / name / RECV_DIR, durable=False).saved_targets()
    fresh = daemons_of(lab)
    try:
        harness.rejects(fresh[site].finish_at_start)
    finally:
        for daemon in fresh.values():
            daemon.close()


def outcome(data: bytes) -> str:
    if not data:
        return "empty"
    flags = data[0]
    raw_args, payload, mode = harness.split(data[1:], 3)
    method = METHODS[(flags & 31) % len(METHODS)]
    pick = (flags >> 5) & 3
    site = SITE_NAMES[pick] if pick < len(SITE_NAMES) else NATURAL.get(method, "primary")
    args = harness.rejects(parse_json_object, raw_args or b"{}", "the request's arguments")
    if not isinstance(args, dict):
        return "arguments not a JSON object"
    with harness.scratch("lab") as lab:
        shutil.copytree(template("mirror" if mode == b"mirror" else "provider"), lab, dirs_exist_ok=True)
        before = _outside(lab)
        daemons = daemons_of(lab)
        try:
            got: Any = harness.rejects(daemons[site].handle, method, args, payload or b"")
            if flags & 0x80:
                _touch_volumes(daemons[site])
        finally:
            for daemon in daemons.values():
                daemon.close()
        assert _outside(lab) == before, f"{method} at {site} changed files outside the site directories"
        _starts_again(lab, site)
        return f"{method}: {harness.describe(got) if isinstance(got, TricopyError) else 'ok'}"


def check(data: bytes) -> None:
    outcome(data)


def _seed(method: str, args: dict, data: bytes = b"", site: int = 3, touch: bool = False,
          mode: bytes = b"") -> bytes:
    flags = METHODS.index(method) | site << 5 | (0x80 if touch else 0)
    pieces = [json.dumps(args).encode(), data] + ([mode] if mode else [])
    return bytes([flags]) + harness.join(*pieces)


def seeds() -> list[bytes]:
    block = b"\7" * BS
    batch = encode_batch([Entry(1, 1, 0, 2, 1, block), Entry(2, 2, 0, 3, 1, block)])
    state = load_site_state(template("provider") / "sync") or {}
    out = [
        _seed(names.PING, {}), _seed(names.STATE_GET, {}, site=0),
        _seed(names.STATE_PUT, {"state": state}, touch=True),
        _seed(names.STATE_PUT, {"state": {**state, "volumes": {"C": {"file": "../../x.img", "external_id": "e"}}}},
              touch=True),
        _seed(names.VOL_READ, {"volume": "C", "lba": 0, "count": 2}),
        _seed(names.VOL_WRITE, {"volume": "C", "lba": 1, "flush": True}, block),
        _seed(names.VOL_FLUSH, {"volume": "C"}),
        _seed(names.VOL_DIGEST, {"volume": "C", "lba": 0, "count": 16, "per": 4}),
        _seed(names.VOL_ZERO, {"volume": "C", "lba": 2, "count": 3}),
        _seed(names.JOURNAL_APPLIED, {}), _seed(names.JOURNAL_SET_APPLIED, {"seq": 0}),
        _seed(names.JOURNAL_RECEIVE, {"first_seq": 1, "last_seq": 2, "targets": {"0": "D"},
                                      "crash_after_store": False}, batch),
        _seed(names.JOURNAL_FINISH, {"targets": {"0": "D"}}),
        _seed(names.SPOOL_ACKED, {}), _seed(names.SPOOL_PLAN, {}),
        _seed(names.SPOOL_CONFIRM, {"seq": 0, "stats": {"entries_per_s": 1.5, "bytes_per_s": 10.0}}),
        _seed(names.APP_INFO, {"volume": 0}), _seed(names.APP_INFO, {"volume": "A"}, mode=b"mirror"),
        _seed(names.APP_READ, {"volume": 0, "lba": 1, "count": 2}),
        _seed(names.APP_WRITE, {"volume": 0, "lba": 4}, block * 2),
        _seed(names.APP_WRITE, {"volume": 0, "lba": 4}, block, mode=b"mirror"),
        _seed(names.APP_HAS_UNSHIPPED, {"volume": 0, "ranges": [[0, 4], [8, 1]]}),
        _seed(names.STATUS, {}), _seed(names.SNAPSHOT, {}), _seed(names.VERIFY, {"pair": None}),
        _seed(names.RESYNC, {}), _seed(names.SHIP, {"max": 10, "in_process": True, "timeout": 5.0}),
    ]
    return out


def main() -> None:
    harness.atheris_main("rpc", check, seeds())


if __name__ == "__main__":
    main()
