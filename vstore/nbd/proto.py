"""The NBD wire structures and constants, each declared once as the protocol document says
(NetworkBlockDevice `doc/proto.md`: fixed newstyle negotiation, option haggling, the transmission
phase; SPEC §6 [0133]-[0135], the intermediate server between unmodified hosts and the volume).

Keeps true:
- Every structure that crosses the socket is one `construct` declaration here, field for field
  in the order and width of proto.md (all integers big-endian). The formats are the protocol's
  own, so they carry NBD's magic numbers and no version or checksum of ours.
- The transmission-phase hot paths (the request header read for every command, the simple reply
  and the structured-reply chunk header with its offset written for every answer) are packed with
  `struct` in the same layout (`REQUEST_FAST`, `SIMPLE_REPLY_FAST`, `CHUNK_FAST`,
  `OFFSET_DATA_FAST`); tests check that they agree with the declarations byte for byte.
- Nothing here reads a socket: `vstore.nbd.session` parses what the server receives (through
  `vstore.blocks.codec.parse_checked`, so bad bytes are a `FormatError`), `vstore.nbd.server`
  moves the bytes.
"""

from __future__ import annotations

import struct

from construct import (
    Const,
    GreedyBytes,
    If,
    Int16ub,
    Int32ub,
    Int64ub,
    PascalString,
    Prefixed,
    PrefixedArray,
    Struct,
    Terminated,
    this,
)

# -- magic numbers -------------------------------------------------------------------------------
NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
OPTION_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

# -- handshake flags (16 bits, server) and client flags (32 bits) --------------------------------
FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
FLAG_C_FIXED_NEWSTYLE = 1 << 0
FLAG_C_NO_ZEROES = 1 << 1

# -- transmission flags (16 bits) ----------------------------------------------------------------
FLAG_HAS_FLAGS = 1 << 0
FLAG_READ_ONLY = 1 << 1
FLAG_SEND_FLUSH = 1 << 2
FLAG_SEND_FUA = 1 << 3
FLAG_ROTATIONAL = 1 << 4
FLAG_SEND_TRIM = 1 << 5
FLAG_SEND_WRITE_ZEROES = 1 << 6
FLAG_SEND_DF = 1 << 7
FLAG_CAN_MULTI_CONN = 1 << 8
FLAG_SEND_CACHE = 1 << 10
FLAG_SEND_FAST_ZERO = 1 << 11

# -- options -------------------------------------------------------------------------------------
OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10

# -- option reply types --------------------------------------------------------------------------
REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_ERR = 1 << 31
REP_ERR_UNSUP = REP_ERR + 1
REP_ERR_POLICY = REP_ERR + 2
REP_ERR_INVALID = REP_ERR + 3
REP_ERR_PLATFORM = REP_ERR + 4
REP_ERR_TLS_REQD = REP_ERR + 5
REP_ERR_UNKNOWN = REP_ERR + 6
REP_ERR_SHUTDOWN = REP_ERR + 7
REP_ERR_BLOCK_SIZE_REQD = REP_ERR + 8
REP_ERR_TOO_BIG = REP_ERR + 9

# -- NBD_INFO types ------------------------------------------------------------------------------
INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

# -- commands and command flags ------------------------------------------------------------------
CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7
COMMAND_NAMES = {CMD_READ: "read", CMD_WRITE: "write", CMD_DISC: "disc", CMD_FLUSH: "flush",
                 CMD_TRIM: "trim", CMD_WRITE_ZEROES: "write_zeroes"}

CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
CMD_FLAG_REQ_ONE = 1 << 3
CMD_FLAG_FAST_ZERO = 1 << 4

# -- structured replies --------------------------------------------------------------------------
REPLY_FLAG_DONE = 1 << 0
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_OFFSET_HOLE = 2
REPLY_TYPE_ERROR = (1 << 15) + 1
REPLY_TYPE_ERROR_OFFSET = (1 << 15) + 2

# -- error values --------------------------------------------------------------------------------
EPERM = 1
EIO = 5
ENOMEM = 12
EINVAL = 22
ENOSPC = 28
EOVERFLOW = 75
ENOTSUP = 95
ESHUTDOWN = 108

MAX_STRING = 4096
"""proto.md: a string (export name, description, error message) is at most 4096 bytes."""

# ------------------------------------------------------------------------------------------------
# Handshake phase
# ------------------------------------------------------------------------------------------------
GREETING = Struct(
    "magic" / Const(NBDMAGIC, Int64ub),
    "ihaveopt" / Const(IHAVEOPT, Int64ub),
    "handshake_flags" / Int16ub,
)
"""S: the newstyle greeting."""

CLIENT_FLAGS = Struct("flags" / Int32ub)
"""C: the client's flags, the answer to the greeting."""

OPTION_HEADER = Struct(
    "magic" / Const(IHAVEOPT, Int64ub),
    "option" / Int32ub,
    "length" / Int32ub,
)
"""C: an option request's header; `length` bytes of option data follow."""

OPTION_REPLY = Struct(
    "magic" / Const(OPTION_REPLY_MAGIC, Int64ub),
    "option" / Int32ub,
    "type" / Int32ub,
    "data" / Prefixed(Int32ub, GreedyBytes),
)
"""S: a reply to any option but NBD_OPT_EXPORT_NAME."""

EXPORT_NAME_REPLY = Struct(
    "size" / Int64ub,
    "transmission_flags" / Int16ub,
    "reserved" / If(this._params.zeroes, Const(bytes(124))),
)
"""S: the answer to NBD_OPT_EXPORT_NAME; build/parse with `zeroes=` False when the client set
NBD_FLAG_C_NO_ZEROES."""

INFO_REQUEST = Struct(
    "name" / Prefixed(Int32ub, GreedyBytes),
    "requests" / PrefixedArray(Int16ub, Int16ub),
    Terminated,
)
"""C: the option data of NBD_OPT_INFO and NBD_OPT_GO."""

REP_SERVER_DATA = Struct(
    "name" / Prefixed(Int32ub, GreedyBytes),
    "details" / GreedyBytes,
)
"""S: the data of an NBD_REP_SERVER reply (one per export, to NBD_OPT_LIST)."""

INFO_EXPORT_DATA = Struct(
    "type" / Const(INFO_EXPORT, Int16ub),
    "size" / Int64ub,
    "transmission_flags" / Int16ub,
)
"""S: NBD_REP_INFO data, NBD_INFO_EXPORT (length 12)."""

INFO_NAME_DATA = Struct("type" / Const(INFO_NAME, Int16ub), "name" / GreedyBytes)
"""S: NBD_REP_INFO data, NBD_INFO_NAME: the export's canonical name."""

INFO_DESCRIPTION_DATA = Struct("type" / Const(INFO_DESCRIPTION, Int16ub), "description" / GreedyBytes)
"""S: NBD_REP_INFO data, NBD_INFO_DESCRIPTION."""

INFO_BLOCK_SIZE_DATA = Struct(
    "type" / Const(INFO_BLOCK_SIZE, Int16ub),
    "minimum" / Int32ub,
    "preferred" / Int32ub,
    "maximum" / Int32ub,
)
"""S: NBD_REP_INFO data, NBD_INFO_BLOCK_SIZE (length 14): the size constraints."""

# ------------------------------------------------------------------------------------------------
# Transmission phase
# ------------------------------------------------------------------------------------------------
REQUEST = Struct(
    "magic" / Const(REQUEST_MAGIC, Int32ub),
    "flags" / Int16ub,
    "type" / Int16ub,
    "cookie" / Int64ub,
    "offset" / Int64ub,
    "length" / Int32ub,
)
"""C: a request header; `length` bytes of data follow for NBD_CMD_WRITE only."""

SIMPLE_REPLY = Struct(
    "magic" / Const(SIMPLE_REPLY_MAGIC, Int32ub),
    "error" / Int32ub,
    "cookie" / Int64ub,
)
"""S: a simple reply; the data of a successful NBD_CMD_READ follows."""

CHUNK_HEADER = Struct(
    "magic" / Const(STRUCTURED_REPLY_MAGIC, Int32ub),
    "flags" / Int16ub,
    "type" / Int16ub,
    "cookie" / Int64ub,
    "length" / Int32ub,
)
"""S: a structured reply chunk's header; `length` bytes of payload follow."""

OFFSET_DATA_HEAD = Struct("offset" / Int64ub)
"""S: the payload of NBD_REPLY_TYPE_OFFSET_DATA starts with the offset; the data follows."""

ERROR_CHUNK = Struct(
    "error" / Int32ub,
    "message" / PascalString(Int16ub, "utf8"),
)
"""S: the payload of NBD_REPLY_TYPE_ERROR."""

REQUEST_FAST = struct.Struct(">IHHQQI")
SIMPLE_REPLY_FAST = struct.Struct(">IIQ")
CHUNK_FAST = struct.Struct(">IHHQI")
OFFSET_DATA_FAST = struct.Struct(">IHHQIQ")
"""The chunk header of an NBD_REPLY_TYPE_OFFSET_DATA chunk together with its offset."""

REQUEST_SIZE = REQUEST_FAST.size  # 28
OPTION_HEADER_SIZE = 16
CLIENT_FLAGS_SIZE = 4
