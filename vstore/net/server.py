"""The asyncio RPC server of a site daemon (DESIGN "Sites and links", "Process model"; SPEC §4):
`serve` answers authenticated requests (frames, handshake and payloads of `vstore.net.wire`).

Keeps true:
- Bad input (garbage, wrong MAC, wrong version, oversized, unexpected type, silent past the
  handshake timeout) closes only that connection, with a `logging.warning` naming the peer and
  the reason, and never reaches the handler; the server keeps serving everyone else.
- Requests on one connection are handled one at a time in arrival order; connections are served
  concurrently. A handler's `TricopyError` comes back to the caller as `RemoteError` with the
  same message; any other exception is logged with its traceback on the server and answered with
  a generic error, never crashing the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Awaitable, Callable

from vstore.blocks.errors import FormatError, TricopyError
from vstore.net.keys import check_key
from vstore.net.wire import (
    DEFAULT_MAX_PAYLOAD,
    STATUS_ERROR,
    STATUS_INTERNAL,
    STATUS_OK,
    Session,
    decode_request,
    encode_response,
    read_raw_frame,
    server_accept,
)

log = logging.getLogger(__name__)

DEFAULT_HANDSHAKE_TIMEOUT = 10.0

Handler = Callable[[str, dict, bytes], Awaitable[tuple[dict, bytes]]]


def _peer_name(writer: asyncio.StreamWriter) -> str:
    peer = writer.get_extra_info("peername")
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"{peer[0]}:{peer[1]}"
    return str(peer)


async def _call_handler(handler: Handler, method: str, args: dict, data: bytes, peer: str) -> bytes:
    """Run the handler and encode its answer; never raises (errors become error responses)."""
    try:
        result, out = await handler(method, args, data)
        return encode_response(STATUS_OK, result, out)
    except TricopyError as e:
        return encode_response(STATUS_ERROR, {"error": str(e), "kind": type(e).__name__})
    except Exception:
        log.exception("net: handler failed on %r from %s", method, peer)
        return encode_response(STATUS_INTERNAL, {
            "error": f"the site failed internally on {method!r} (see the site's log)", "kind": "internal"})


async def _handshake(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, key: bytes,
                     max_payload: int) -> Session:
    raw = await read_raw_frame(reader, max_payload)
    if raw is None:
        raise FormatError("connection closed before the handshake")
    session, welcome = server_accept(key, raw, max_payload)
    writer.write(welcome)
    await writer.drain()
    return session


async def _serve_requests(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, session: Session,
                          handler: Handler, peer: str) -> None:
    while (raw := await read_raw_frame(reader, session.max_payload)) is not None:
        frame = session.open(raw)
        method, args, data = decode_request(frame.payload)
        payload = await _call_handler(handler, method, args, data, peer)
        try:
            reply = session.seal(frame.request_id, payload)
        except TricopyError as e:
            log.warning("net: answer to %r for %s not sendable: %s", method, peer, e)
            refusal = encode_response(STATUS_ERROR, {"error": str(e), "kind": "TricopyError"})
            reply = session.seal(frame.request_id, refusal)
        writer.write(reply)
        await writer.drain()


async def _serve_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, key: bytes,
                            handler: Handler, max_payload: int, handshake_timeout: float) -> None:
    peer = _peer_name(writer)
    try:
        session = await asyncio.wait_for(_handshake(reader, writer, key, max_payload), handshake_timeout)
        await _serve_requests(reader, writer, session, handler, peer)
    except TimeoutError:
        log.warning("net: closing connection from %s: no handshake within %.1fs", peer, handshake_timeout)
    except FormatError as e:
        log.warning("net: closing connection from %s: %s", peer, e)
    except (ConnectionError, ssl.SSLError, OSError) as e:
        log.info("net: connection from %s lost: %s", peer, e)
    except Exception:
        log.exception("net: closing connection from %s after an unexpected error", peer)
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


async def serve(host: str, port: int, key: bytes, handler: Handler, *, ssl_context: ssl.SSLContext | None = None,
                max_payload: int = DEFAULT_MAX_PAYLOAD,
                handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT) -> asyncio.Server:
    """Listen on host:port (0 = any free port) and answer authenticated RPC requests with `handler`."""
    key = check_key(key)

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _serve_connection(reader, writer, key, handler, max_payload, handshake_timeout)

    limit = 2 ** 20
    return await asyncio.start_server(on_connect, host, port, ssl=ssl_context, limit=limit,
                                      ssl_handshake_timeout=handshake_timeout if ssl_context else None)


def bound_port(server: asyncio.Server) -> int:
    """The TCP port a server from `serve` listens on (useful with port 0)."""
    return server.sockets[0].getsockname()[1]
