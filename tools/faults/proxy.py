"""The fault proxy on the command line (DESIGN "Tools": delay, bandwidth, drop, cut); the relay is
vstore.net.linkproxy.

Keeps true:
- The relay, its loopback-only check and its semantics are `vstore.net.linkproxy` (see there); this
  module adds only the command and its control port (`control_command`).
- A control line gets exactly one answer line: "ok ...", "error ..." or one JSON object (stats).

Use:
    python -m tools.faults.proxy --listen 127.0.0.1:P --target 127.0.0.1:Q [--delay-ms MS]
        [--bandwidth BYTES_PER_S] [--control 127.0.0.1:C]
where the control port takes text lines `delay 30`, `bandwidth 1000000` (or `bandwidth off`),
`drop`, `cut`, `sever`, `restore`, `stats` and answers one line to each.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

from vstore.net.linkproxy import ProxyCore, ProxyError, parse_address


def control_command(core: ProxyCore, line: str) -> str:
    """Apply one control line to the proxy and return the one-line answer."""
    words = line.split()
    if not words:
        return "error empty command"
    cmd, args = words[0].lower(), words[1:]
    try:
        if cmd == "delay" and len(args) == 1:
            core.set_delay(float(args[0]))
            return f"ok delay {core.delay_ms:g} ms"
        if cmd == "bandwidth" and len(args) == 1:
            core.set_bandwidth(None if args[0].lower() in ("off", "none", "0") else int(args[0]))
            return f"ok bandwidth {core.bandwidth or 'unlimited'}"
        if cmd in ("drop", "cut", "sever", "restore") and not args:
            getattr(core, cmd)()
            return f"ok {cmd}"
        if cmd == "stats" and not args:
            return json.dumps(core.stats(), sort_keys=True)
    except (ValueError, ProxyError) as e:
        return f"error {e}"
    return (f"error unknown command {line.strip()!r} (delay MS, bandwidth BPS|off, drop, cut, sever, restore, "
            "stats)")


async def _control_client(core: ProxyCore, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while line := await reader.readline():
            writer.write((control_command(core, line.decode(errors="replace")) + "\n").encode())
            await writer.drain()
    except OSError:
        pass
    finally:
        writer.close()


async def _main(args: argparse.Namespace) -> None:
    core = ProxyCore(parse_address(args.listen, "listen"), parse_address(args.target, "target"),
                     delay_ms=args.delay_ms, bandwidth=args.bandwidth)
    await core.start()
    print(f"fault proxy {core.listen[0]}:{core.port} -> {core.target[0]}:{core.target[1]}", flush=True)
    if args.control:
        host, port = parse_address(args.control, "control")
        ctl = await asyncio.start_server(lambda r, w: _control_client(core, r, w), host, port)
        print(f"control on {host}:{ctl.sockets[0].getsockname()[1]}", flush=True)
    await asyncio.Event().wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.faults.proxy",
                                     description="A TCP fault proxy on a loopback link: delay, bandwidth, drop, "
                                     "cut, sever (see vstore/linkproxy.py).")
    parser.add_argument("--listen", required=True, help="127.0.0.1:PORT to accept connections on")
    parser.add_argument("--target", required=True, help="127.0.0.1:PORT to forward to")
    parser.add_argument("--delay-ms", type=float, default=0.0, help="one-way delay added to each chunk")
    parser.add_argument("--bandwidth", type=int, default=None, help="bytes/s per direction and connection")
    parser.add_argument("--control", default=None, help="127.0.0.1:PORT for text control lines")
    args = parser.parse_args(argv)
    try:
        asyncio.run(_main(args))
    except ProxyError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
