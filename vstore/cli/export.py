"""`vstore export`: serve the lab's application volume over NBD until interrupted (DESIGN "user
surface"; SPEC §6, embodiment 2). The server itself is `vstore.exports.nbd_export`."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Annotated

import typer

from vstore.blocks.interrupts import terminate_as_interrupt
from vstore.cli.common import JsonOption, LabArg, out, user_errors
from vstore.exports.nbd_export import serve
from vstore.nbd.server import DEFAULT_PORT


def export_command(
    lab: LabArg,
    name: Annotated[str, typer.Option(help="The export's name (what clients ask for: nbd://HOST:PORT/NAME).")] = "A",
    listen: Annotated[str, typer.Option(help="HOST:PORT to listen on; a non-loopback host needs the lab's TLS.")]
    = f"127.0.0.1:{DEFAULT_PORT}",
    readonly: Annotated[bool, typer.Option(help="Refuse writes (EPERM).")] = False,
    site: Annotated[str | None, typer.Option(help="Serve this site's volume (a replica is served read-only).")]
    = None,
    as_json: JsonOption = False,
) -> None:
    """Serve the application's volume over NBD (qemu, qemu-img, nbdcopy, nbdinfo, nbd-client) until
    Ctrl-C or SIGTERM. A WRITE is answered once A and C have it and its entry exists; FLUSH and FUA
    once it is durable on A, C and the spool. Works with the lab down (in this process) or up
    (through the primary's daemon).

    Example: vstore export /tmp/lab --listen 127.0.0.1:10809 &  qemu-img info nbd://127.0.0.1:10809/A
    """
    stop = threading.Event()

    def ready(doc: dict) -> None:
        if as_json:
            print(json.dumps(doc, indent=2), flush=True)
            return
        e = doc["exports"][0]
        out.print(f"exporting {doc['url']} ({e['size_bytes']} bytes, {e['block_size']}-byte blocks"
                  f"{', read-only' if e['readonly'] else ''}); Ctrl-C stops", highlight=False)

    with user_errors():
        try:
            with terminate_as_interrupt():
                serve(Path(lab), stop=stop, on_ready=ready, name=name, listen=listen, readonly=readonly, site=site)
        except KeyboardInterrupt:
            stop.set()
    if not as_json:
        out.print("export stopped", highlight=False)


def register(app: typer.Typer) -> None:
    app.command("export")(export_command)
