"""`vstore ship LAB`: send the waiting entries to the Async site, once or following the spool
(DESIGN.md "Surfaces", "JSON contract"; SPEC §4 [0044]-[0045]).

Keeps true: while the lab is up the coordinating daemon ships (or waits until its shipper process
has shipped everything acknowledged so far); while it is down the lab is opened here and shipped
with a progress bar for a long backlog. A suspended async group whose link works again is first
resynced. `--json` prints the one report `{"entries", "batches", "blocks_written", "blocks_sent",
"resynced_blocks", "error"}` and exits 1 when the Async site could not be reached.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Annotated

import typer

from vstore.blocks.errors import TricopyError
from vstore.cli.common import JsonOption, LabArg, daemon_client, die, err, open_lab, out, progress_bars, user_errors
from vstore.daemons.processes import is_up
from vstore.lab.follow import follow as follow_spool
from vstore.net.client import Peer
from vstore.net.rpc import SHIP
from vstore.replication.shipping import ShipReport


def ship_command(
    lab: LabArg,
    max_entries: Annotated[int | None, typer.Option("--max", min=0, help="Ship at most N entries.")] = None,
    follow: Annotated[bool, typer.Option("--follow", help="Keep shipping as new entries arrive (watchdog "
                                                           "on the spool) until Ctrl-C or --duration.")] = False,
    period: Annotated[float | None, typer.Option("--period", help="With --follow: ship only every S seconds "
                                                                  "(the periodic copy of the prior art).")] = None,
    duration: Annotated[float | None, typer.Option("--duration", min=0.0,
                                                   help="With --follow: stop after S seconds.")] = None,
    quiet: Annotated[bool, typer.Option(help="No progress bar.")] = False,
    as_json: JsonOption = False,
) -> None:
    """Send waiting entries to the Async site in order (it stores each batch, applies it, confirms).
    A suspended async pair whose link works again is first resynced (Duplex-Pending). --json prints
    the report: entries, batches, blocks_written, blocks_sent, resynced_blocks, error.

    Example: vstore ship /tmp/lab --max 10      (or: vstore ship /tmp/lab --follow --period 10)
    """
    if follow:
        if as_json:
            die("--json reports one shipping round; it does not go with --follow")
        ship_following(lab, period=period, duration=duration, quiet=quiet)
        return
    if period is not None or duration is not None:
        die("--period and --duration go with --follow")
    with user_errors():
        client = daemon_client(lab)
    if client is not None:
        report = ship_through_daemons(client, max_entries, as_json=as_json)
    else:
        report = ship_in_process(lab, max_entries, quiet=quiet or as_json, as_json=as_json)
    if as_json:
        print(json.dumps(report, indent=2))
        if report["error"]:
            raise typer.Exit(1)


def ship_following(lab: Path, *, period: float | None, duration: float | None, quiet: bool) -> None:
    """`--follow`: ship rounds in this process as the spool grows (the lab's daemons are down)."""
    def report_round(r: ShipReport) -> None:
        if r.error:
            err.print(f"[yellow]ship:[/] {r.error}", highlight=False)
        elif r.entries and not quiet:
            out.print(f"shipped {r.entries} entries", highlight=False)

    with user_errors():
        if period is not None and period <= 0:
            raise TricopyError("--period must be a positive number of seconds")
        if is_up(lab):
            raise TricopyError(f"the daemons of {lab} are running: their shipper process already follows the "
                               f"spool (`vstore status {lab}` shows its send rate); `--follow` works on a lab "
                               "that is down")
        try:
            total = follow_spool(lab, period=period, duration=duration, on_round=report_round)
        except KeyboardInterrupt:
            total = -1
    if total >= 0:
        out.print(f"follow ended: {total} entries shipped", highlight=False)


def ship_through_daemons(client: Peer, max_entries: int | None, *, as_json: bool = False) -> dict:
    """The lab is up: the coordinating daemon ships (or waits for its shipper process to catch up)."""
    with user_errors():
        r = client.call(SHIP, {"max": max_entries})[0]
    if as_json:
        return r
    if r["error"]:
        die(f"cannot ship: {r['error']}")
    if r["batches"] is None:  # the shipper process ships; the daemon waited until it caught up
        out.print(f"the shipper process shipped {r['entries']} entries meanwhile; nothing is waiting",
                  highlight=False)
    else:
        out.print(f"shipped {r['entries']} entries in {r['batches']} batches ({r['blocks_sent']} blocks sent)",
                  highlight=False)
    return r


def ship_in_process(lab: Path, max_entries: int | None, *, quiet: bool, as_json: bool = False) -> dict:
    """The lab is down: open it and ship here, with a progress bar for a long backlog."""
    with user_errors(), open_lab(lab) as system:
        try:
            total = system.entry_log.stats().entries
            with progress_bars(quiet or total < 1000) as progress:
                report = system.shipper().ship(max_entries, progress=progress("shipping entries", total))
        finally:
            system.save()
    if as_json:
        return dataclasses.asdict(report)
    if report.error:
        die(f"cannot ship: {report.error}; the async pair is now suspended with positions recorded")
    msg = f"shipped {report.entries} entries in {report.batches} batches ({report.blocks_sent} blocks sent"
    if report.blocks_sent != report.blocks_written:
        msg += f", {report.blocks_written} written: coalesced"
    msg += ")"
    if report.resynced_blocks:
        msg += f"; resynced {report.resynced_blocks} recorded blocks first"
    out.print(msg, highlight=False)
    return dataclasses.asdict(report)
