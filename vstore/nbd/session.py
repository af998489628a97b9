"""NBD fixed newstyle negotiation and request validation, sans I/O (SPEC §6 [0133]-[0135], the
intermediate server; NetworkBlockDevice `doc/proto.md`).

Keeps true:
- `Negotiation` is the whole option haggling as a state machine over bytes: the server asks
  `needed` bytes of it, `feed`s exactly those, sends `Step.reply` and acts on the step (upgrade to
  TLS, enter transmission with `Step.export`, or close with `Step.close`, a reason to log). It never
  reads past what an option's header announced, so framing is never lost while it speaks.
- What a client gets: every option but NBD_OPT_EXPORT_NAME is answered (unknown ones with
  NBD_REP_ERR_UNSUP, malformed ones with NBD_REP_ERR_INVALID); a bad magic, unknown client flags,
  an option longer than `MAX_OPTION_DATA`, more than `MAX_OPTIONS` options, an unknown export named
  by NBD_OPT_EXPORT_NAME (which cannot be answered with an error) or NBD_OPT_ABORT end the
  session. With a TLS context (FORCEDTLS mode) nothing but NBD_OPT_STARTTLS and NBD_OPT_ABORT is
  served before the upgrade, and the upgrade forgets what was negotiated before it.
- `check_request` is the one rule of what a transmission request may ask; it answers with the NBD
  error to reply (EINVAL, ENOSPC, EPERM, EOVERFLOW) and a sentence, or None. `frame_error` is the
  one rule of when a request header loses the payload framing, so that the connection must close.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from vstore.blocks.codec import parse_checked
from vstore.blocks.errors import FormatError, TricopyError, brief
from vstore.nbd import proto as p

MAX_OPTION_DATA = 16 << 10
"""The longest option data accepted (an NBD_OPT_GO with a 4096-byte name and every info request
fits many times over); a longer one ends the session instead of being read."""
MAX_OPTIONS = 1000
"""Options in one session before the server takes the client for a denial of service."""
DEFAULT_MAX_PAYLOAD = 32 << 20
KNOWN_CLIENT_FLAGS = p.FLAG_C_FIXED_NEWSTYLE | p.FLAG_C_NO_ZEROES


class ProtocolError(TricopyError):
    """A client broke the NBD protocol so that the connection cannot go on; it is closed."""


@dataclass(frozen=True)
class ExportInfo:
    """What negotiation tells a client about an export."""

    name: str
    size: int
    block_size: int
    readonly: bool = False
    max_payload: int = DEFAULT_MAX_PAYLOAD
    description: str = ""
    multi_conn: bool = True
    """True when every connection shares one device whose flush covers all of them."""

    def transmission_flags(self, structured: bool) -> int:
        flags = (p.FLAG_HAS_FLAGS | p.FLAG_SEND_FLUSH | p.FLAG_SEND_FUA | p.FLAG_SEND_WRITE_ZEROES
                 | p.FLAG_SEND_TRIM)
        if self.readonly:
            flags |= p.FLAG_READ_ONLY
        if self.multi_conn:
            flags |= p.FLAG_CAN_MULTI_CONN
        if structured:
            flags |= p.FLAG_SEND_DF  # a read is always answered with one content chunk
        return flags

    @property
    def preferred_block(self) -> int:
        return max(self.block_size, 4096)


@dataclass
class Step:
    """What the server does after one `Negotiation.feed`."""

    reply: bytes = b""
    starttls: bool = False
    export: ExportInfo | None = None
    close: str | None = None
    clean: bool = False
    """The close is the client's own wish (NBD_OPT_ABORT), not a violation."""


def option_reply(option: int, rtype: int, data: bytes = b"") -> bytes:
    return p.OPTION_REPLY.build({"option": option, "type": rtype, "data": data})


def _error_text(message: str) -> bytes:
    return message.encode()[:p.MAX_STRING]


class Negotiation:
    """The server side of fixed newstyle option haggling for one connection."""

    def __init__(self, exports: Sequence[ExportInfo], *, tls_available: bool = False) -> None:
        self.exports = list(exports)
        self.tls_available = tls_available
        self.tls_active = False
        self.structured = False
        self.no_zeroes = False
        self.fixed = False
        self.options_seen = 0
        self.done = False
        self.phase = "flags"
        """What the next `feed` is: "flags" (the client's), "header" (an option's), "data" (its data)."""
        self._option = 0
        self._length = 0

    def greeting(self) -> bytes:
        return p.GREETING.build({"handshake_flags": p.FLAG_FIXED_NEWSTYLE | p.FLAG_NO_ZEROES})

    @property
    def needed(self) -> int:
        """How many bytes the next `feed` takes (0 once the session is over)."""
        if self.done:
            return 0
        return {"flags": p.CLIENT_FLAGS_SIZE, "header": p.OPTION_HEADER_SIZE}.get(self.phase, self._length)

    def feed(self, data: bytes) -> Step:
        if self.done or len(data) != self.needed:
            raise ValueError(f"feed takes exactly {self.needed} bytes, got {len(data)}")
        if self.phase == "flags":
            return self._client_flags(data)
        if self.phase == "header":
            return self._header(data)
        self.phase = "header"
        return self._option_data(self._option, data)

    def tls_started(self) -> None:
        """The socket now speaks TLS: forget what was negotiated before (proto.md NBD_OPT_STARTTLS)."""
        self.tls_active = True
        self.structured = False

    # -- phases ----------------------------------------------------------------------------------
    def _end(self, reason: str, reply: bytes = b"") -> Step:
        self.done = True
        return Step(reply=reply, close=reason)

    def _client_flags(self, data: bytes) -> Step:
        flags = int.from_bytes(data, "big")
        if flags & ~KNOWN_CLIENT_FLAGS:
            return self._end(f"client flags {flags:#x} set bits this server does not know (not an NBD client?)")
        self.fixed = bool(flags & p.FLAG_C_FIXED_NEWSTYLE)
        self.no_zeroes = bool(flags & p.FLAG_C_NO_ZEROES)
        if self.tls_available and not self.fixed:
            return self._end("the client does not speak fixed newstyle, which TLS requires")
        self.phase = "header"
        return Step()

    def _header(self, data: bytes) -> Step:
        try:
            header = parse_checked(p.OPTION_HEADER, data, "NBD option header")
        except FormatError as err:
            return self._end(f"{err} (bytes {brief(data)})")
        self.options_seen += 1
        if self.options_seen > MAX_OPTIONS:
            return self._end(f"more than {MAX_OPTIONS} options without entering transmission")
        if header.length > MAX_OPTION_DATA:
            return self._end(f"option {header.option} announces {header.length} bytes of data, more than "
                             f"the {MAX_OPTION_DATA} this server reads")
        if header.length:
            self.phase, self._option, self._length = "data", header.option, header.length
            return Step()
        return self._option_data(header.option, b"")

    def _option_data(self, option: int, data: bytes) -> Step:
        if self.tls_available and not self.tls_active and option not in (p.OPT_STARTTLS, p.OPT_ABORT):
            if option == p.OPT_EXPORT_NAME:
                return self._end("NBD_OPT_EXPORT_NAME before STARTTLS on a server that requires TLS")
            return Step(reply=option_reply(option, p.REP_ERR_TLS_REQD, b"this server requires TLS: send STARTTLS"))
        handler = {
            p.OPT_EXPORT_NAME: self._export_name,
            p.OPT_ABORT: self._abort,
            p.OPT_LIST: self._list,
            p.OPT_STARTTLS: self._starttls,
            p.OPT_INFO: self._info,
            p.OPT_GO: self._info,
            p.OPT_STRUCTURED_REPLY: self._structured_reply,
        }.get(option)
        if handler is None:
            return Step(reply=option_reply(option, p.REP_ERR_UNSUP,
                                           _error_text(f"option {option} is not supported by this server")))
        return handler(option, data)

    def _find(self, name: str) -> ExportInfo | None:
        if name == "" and self.exports:
            return self.exports[0]
        return next((e for e in self.exports if e.name == name), None)

    def _export_name(self, option: int, data: bytes) -> Step:
        name = data.decode("utf-8", "replace")
        export = self._find(name)
        if export is None:
            return self._end(f"NBD_OPT_EXPORT_NAME names no export: {brief(name)}")
        self.done = True
        reply = p.EXPORT_NAME_REPLY.build(
            {"size": export.size, "transmission_flags": export.transmission_flags(self.structured)},
            zeroes=not self.no_zeroes)
        return Step(reply=reply, export=export)

    def _abort(self, option: int, data: bytes) -> Step:
        step = self._end("the client sent NBD_OPT_ABORT", option_reply(option, p.REP_ACK))
        step.clean = True
        return step

    def _list(self, option: int, data: bytes) -> Step:
        if data:
            return Step(reply=option_reply(option, p.REP_ERR_INVALID, b"NBD_OPT_LIST takes no data"))
        replies = [option_reply(option, p.REP_SERVER, p.REP_SERVER_DATA.build(
            {"name": e.name.encode(), "details": e.description.encode()[:p.MAX_STRING]})) for e in self.exports]
        return Step(reply=b"".join(replies) + option_reply(option, p.REP_ACK))

    def _starttls(self, option: int, data: bytes) -> Step:
        if not self.tls_available:
            return Step(reply=option_reply(option, p.REP_ERR_POLICY, b"this server is not configured for TLS"))
        if data or self.tls_active:
            why = b"NBD_OPT_STARTTLS takes no data" if data else b"TLS is already running"
            return Step(reply=option_reply(option, p.REP_ERR_INVALID, why))
        return Step(reply=option_reply(option, p.REP_ACK), starttls=True)

    def _structured_reply(self, option: int, data: bytes) -> Step:
        if data:
            return Step(reply=option_reply(option, p.REP_ERR_INVALID, b"NBD_OPT_STRUCTURED_REPLY takes no data"))
        self.structured = True
        return Step(reply=option_reply(option, p.REP_ACK))

    def _info(self, option: int, data: bytes) -> Step:
        try:
            request = parse_checked(p.INFO_REQUEST, data, "NBD_OPT_INFO/GO data")
            name = request.name.decode("utf-8")
        except (FormatError, UnicodeDecodeError) as err:
            return Step(reply=option_reply(option, p.REP_ERR_INVALID, _error_text(str(err))))
        export = self._find(name)
        if export is None:
            return Step(reply=option_reply(option, p.REP_ERR_UNKNOWN, _error_text(f"no export named {brief(name)}")))
        infos = [p.INFO_EXPORT_DATA.build({"size": export.size,
                                           "transmission_flags": export.transmission_flags(self.structured)}),
                 p.INFO_BLOCK_SIZE_DATA.build({"minimum": export.block_size, "preferred": export.preferred_block,
                                               "maximum": export.max_payload})]
        if p.INFO_NAME in request.requests:
            infos.append(p.INFO_NAME_DATA.build({"name": export.name.encode()}))
        if p.INFO_DESCRIPTION in request.requests and export.description:
            infos.append(p.INFO_DESCRIPTION_DATA.build({"description": export.description.encode()[:p.MAX_STRING]}))
        reply = b"".join(option_reply(option, p.REP_INFO, info) for info in infos) + option_reply(option, p.REP_ACK)
        if option == p.OPT_GO:
            self.done = True
            return Step(reply=reply, export=export)
        return Step(reply=reply)


# ------------------------------------------------------------------------------------------------
# Transmission phase
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Request:
    flags: int
    type: int
    cookie: int
    offset: int
    length: int

    @property
    def name(self) -> str:
        return p.COMMAND_NAMES.get(self.type, f"command {self.type}")


def parse_request(raw: bytes | bytearray | memoryview) -> Request:
    """A request header (the `struct` fast path of `proto.REQUEST`); FormatError for a bad magic."""
    magic, flags, rtype, cookie, offset, length = p.REQUEST_FAST.unpack(raw)
    if magic != p.REQUEST_MAGIC:
        raise FormatError(f"NBD request header: bad magic {magic:#010x} (the client lost the framing "
                          "or is not an NBD client)")
    return Request(flags, rtype, cookie, offset, length)


def frame_error(req: Request, info: ExportInfo) -> str | None:
    """Why the connection must close before anything else is read, or None: a WRITE whose payload is
    longer than the maximum cannot be skipped safely (a 4 GiB claim would be read to find the next
    header), so the framing is given up."""
    if req.type == p.CMD_WRITE and req.length > info.max_payload:
        return (f"a WRITE of {req.length} bytes is over the maximum payload of {info.max_payload}; "
                "its data cannot be skipped, so the connection is closed")
    return None


_ALLOWED_FLAGS = {
    p.CMD_READ: p.CMD_FLAG_FUA | p.CMD_FLAG_DF,
    p.CMD_WRITE: p.CMD_FLAG_FUA,
    p.CMD_DISC: p.CMD_FLAG_FUA,
    p.CMD_FLUSH: p.CMD_FLAG_FUA,
    p.CMD_TRIM: p.CMD_FLAG_FUA,
    p.CMD_WRITE_ZEROES: p.CMD_FLAG_FUA | p.CMD_FLAG_NO_HOLE,
}
_WRITES = (p.CMD_WRITE, p.CMD_TRIM, p.CMD_WRITE_ZEROES)


def check_request(req: Request, info: ExportInfo, structured: bool) -> tuple[int, str] | None:
    """The NBD error and a sentence for a request the server must refuse, or None to serve it.
    Unaligned requests are served (by read-modify-write), so alignment is never an error."""
    allowed = _ALLOWED_FLAGS.get(req.type)
    if allowed is None:
        return p.EINVAL, f"{req.name} is not a command this server knows"
    if not structured:
        allowed &= ~p.CMD_FLAG_DF
    if req.flags & ~allowed:
        return p.EINVAL, f"flags {req.flags:#x} are not valid for {req.name}"
    if req.type in (p.CMD_FLUSH, p.CMD_DISC):
        if req.offset or req.length:
            return p.EINVAL, f"{req.name} must have offset and length zero"
        return None
    if req.type in _WRITES and info.readonly:
        return p.EPERM, f"export {info.name} is read-only"
    if req.type == p.CMD_READ and req.length > info.max_payload:
        return (p.EOVERFLOW if structured else p.EINVAL), \
            f"a read of {req.length} bytes is over the maximum payload of {info.max_payload}"
    if req.offset + req.length > info.size:
        code = p.ENOSPC if req.type in (p.CMD_WRITE, p.CMD_WRITE_ZEROES) else p.EINVAL
        return code, (f"{req.name} of bytes {req.offset}..{req.offset + req.length} is past the end "
                      f"of export {info.name} ({info.size} bytes)")
    return None
