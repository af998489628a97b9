"""The names of the site daemons' RPC methods, declared once (DESIGN "Sites and links", "Process
model"; SPEC §4). The daemon (`vstore.daemons.site`) dispatches on these names; every caller
(`vstore.net.remote`, the shipper, `vstore.daemons.processes`, the CLI, the tools) sends them.

Keeps true: a name here is the exact string on the wire (the method field of a REQUEST frame), so
renaming a constant's value is a protocol change. A server's `HandlerTable` holds at most one
handler per name, each with the declared type of its arguments (`Route.args`), which the server
checks a request's arguments against before the handler runs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., tuple[dict, bytes]])

# -- any site: its own directory --------------------------------------------------------------
PING = "ping"  # -> {"site", "pid"}
STATE_GET = "state.get"  # -> {"state": the site's state.json or None}
STATE_PUT = "state.put"  # {"state"}: replace the site's state.json
VOL_READ = "vol.read"  # {"volume", "lba", "count"} -> the blocks
VOL_WRITE = "vol.write"  # {"volume", "lba", "flush"?} + blocks: a copy-program write
VOL_FLUSH = "vol.flush"  # {"volume"}
VOL_ZERO = "vol.zero"  # {"volume", "lba", "count"}: a copy-program write of zeros (a hole)
VOL_DIGEST = "vol.digest"  # {"volume", "lba", "count", "per"} -> one 16-byte digest per run of `per` blocks

# -- the Async site: its receive journal -------------------------------------------------------
JOURNAL_APPLIED = "journal.applied"  # -> {"applied_seq"}
JOURNAL_SET_APPLIED = "journal.set_applied"  # {"seq"}: after a resync
JOURNAL_RECEIVE = "journal.receive"  # {"first_seq", "last_seq", "targets"} + batch: store, apply, record
JOURNAL_FINISH = "journal.finish"  # {"targets"} -> {"applied"}: finish a batch stored before a crash

# -- the site running the application: its spool, for the shipper process ---------------------
SPOOL_ACKED = "spool.acked"  # -> what the shipper may send
SPOOL_PLAN = "spool.plan"  # -> where and how to ship
SPOOL_CONFIRM = "spool.confirm"  # {"seq", "stats"}: the Async site applied up to seq

# -- coordinating requests: the whole lab as the daemon's `System` sees it ---------------------
APP_INFO = "app.info"  # {"volume"?} -> {"block_size", "num_blocks", "name", "active"}
APP_READ = "app.read"  # {"volume", "lba", "count"} -> the blocks
APP_WRITE = "app.write"  # {"volume", "lba", "fua"?} + blocks: an application write (durable first when fua)
APP_FLUSH = "app.flush"  # {"volume"}: every completed application write durable on A, C and the spool
APP_HAS_UNSHIPPED = "app.has_unshipped"  # {"volume", "ranges"} -> {"answer"}
STATUS = "status"  # -> {"status"}
SNAPSHOT = "snapshot"  # -> {"snapshot"}: the dashboard's document
VERIFY = "verify"  # {"pair"?} -> {"pairs"}
RESYNC = "resync"  # -> {"steps"}
SHIP = "ship"  # {"max"?, "in_process"?, "timeout"?} -> the shipping report


# -- the server side: a table of handlers by method name ----------------------------------------
@dataclass(frozen=True)
class Route:
    """One handler, the declared type of its arguments and how its server runs it (`options`: the
    server's own flags)."""

    run: Callable[..., tuple[dict, bytes]]
    args: Any
    options: dict[str, bool]


class HandlerTable:
    """Handlers by RPC method name, filled by decorating methods: `@table.handler(NAME, ArgsType,
    flag=True)`. A name is registered once; `route(name)` is None for a name nobody handles."""

    def __init__(self) -> None:
        self._routes: dict[str, Route] = {}

    def handler(self, name: str, args: Any, **options: bool) -> Callable[[F], F]:
        def register(fn: F) -> F:
            if name in self._routes:
                raise ValueError(f"RPC method {name!r} has two handlers")
            self._routes[name] = Route(fn, args, options)
            return fn
        return register

    def names(self) -> list[str]:
        """Every method name with a handler."""
        return sorted(self._routes)

    def route(self, name: str) -> Route | None:
        return self._routes.get(name)
