"""The request table of a site daemon and what every request's arguments are checked against
(DESIGN "Sites and links", invariant 5; SPEC §4: a site refuses what a peer sends it unless it is
exactly what the protocol declares).

Keeps true:
- Every handler is registered once in `HANDLERS` with `@rpc(NAME, ArgsStruct, ...)`, where
  `ArgsStruct` is a `msgspec.Struct` declared next to the handler (no unknown keys, every value in
  its type and range). `arguments` converts a request's JSON object to it before the handler runs
  or anything is read, stored or touched; anything else is one `FormatError` naming the method,
  the key and what is allowed.
- A reply carrying block data is bounded before anything is read into memory (`check_reply`): a
  request for more than `MAX_REPLY_DATA` bytes is refused with the largest count that fits.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec

from vstore.blocks.errors import FormatError
from vstore.blocks.schema import validate
from vstore.net.rpc import HandlerTable, Route
from vstore.net.wire import DEFAULT_MAX_PAYLOAD

# A handler runs as (daemon, args, data), or as (daemon, system, args, data) when `coordinated` (on
# the lab's `System`); after one that `saves`, the System is saved, even when the request failed.
HANDLERS = HandlerTable()
rpc = HANDLERS.handler

MAX_REPLY_DATA = DEFAULT_MAX_PAYLOAD - (64 << 10)  # block data in one answer: the frame limit, less room for the rest
MAX_INT = (1 << 63) - 1

Lba = Annotated[int, msgspec.Meta(ge=0, le=MAX_INT)]
BlockCount = Annotated[int, msgspec.Meta(ge=1, le=DEFAULT_MAX_PAYLOAD // 512)]
Name = Annotated[str, msgspec.Meta(min_length=1, max_length=255)]
"""A volume or pair name."""
VirtualVolume = Annotated[int, msgspec.Meta(ge=0, le=1 << 16)] | Name
"""A virtual volume of the application: its index or its name."""


class NoArgs(msgspec.Struct, forbid_unknown_fields=True):
    """A request that takes no arguments: `{}`."""


def arguments(route: Route, method: str, doc: dict) -> Any:
    """`doc` as the declared arguments of `route`; FormatError naming the key and what is allowed."""
    return validate(route.args, doc, f"{method} request arguments", str_keys=True)


def check_reply(count: int, block_size: int) -> None:
    """Refuse a read whose answer would not fit one reply, before anything is read."""
    if count * block_size > MAX_REPLY_DATA:
        raise FormatError(f"a read of {count} blocks ({count * block_size} bytes) does not fit one answer "
                          f"(at most {MAX_REPLY_DATA} bytes); read at most {MAX_REPLY_DATA // block_size} "
                          "blocks per request")


def unknown_request(method: str) -> FormatError:
    """The refusal of a method nobody handles, naming the ones that exist."""
    shown = method if len(method) <= 40 else method[:40] + "..."
    return FormatError(f"unknown request {shown!r}; this site answers {', '.join(HANDLERS.names())}")
