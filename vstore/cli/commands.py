"""The `vstore` commands on a lab's pairs and data (DESIGN.md "Surfaces", "user surface", "JSON
contract"): show what every pair is doing, write and read through the replicated path, ship
entries, inject and heal faults, and the disaster procedures (recover, failover, failback).

Keeps true: every user mistake or refused operation prints one sentence to stderr and exits
non-zero (never a traceback); `--json` prints exactly one JSON document on stdout with the keys
of the DESIGN.md "JSON contract"; long copies show a rich progress bar unless `--quiet`/`--json`.
A command goes through the coordinating daemon while the lab is up and opens the lab's files in
process while it is down; the disaster procedures stop the daemons, run, and start them again.
`fail`/`heal` change exactly the site, link or site:volume named (an unknown one is a usage error,
exit 2, listing the valid forms) and say so; healing what is not failed says "nothing to heal"
and exits 0. An output file (`read --out`) is checked before any work is done.
"""

from __future__ import annotations

import json
import sys
from contextlib import suppress
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from vstore.blocks.errors import TricopyError
from vstore.blocks.holders import claim
from vstore.blocks.units import format_size
from vstore.cli import ship
from vstore.cli.common import (
    STATE_STYLE,
    JsonOption,
    LabArg,
    QuietOption,
    check_output_path,
    daemon_client,
    die,
    err,
    export_line,
    open_lab,
    out,
    progress_bars,
    quiesced_lab,
    stoppable,
    user_errors,
)
from vstore.daemons.processes import RUN_DIR, clients, is_up
from vstore.lab.copies import unfinished
from vstore.lab.sitedir import load_site_state
from vstore.lab.topology import SITE_NAMES, load_topology
from vstore.net.keys import load_key
from vstore.net.remote import spans
from vstore.net.rpc import APP_FLUSH, APP_INFO, APP_WRITE, RESYNC, STATUS, VOL_READ
from vstore.procedures.failback import failback
from vstore.procedures.failover import (
    fig10_failover_to_sync,
    fig13_failover_to_async,
    fig14_failover_to_async_catch_up,
)
from vstore.procedures.recovery import recover
from vstore.procedures.setup import resync_all
from vstore.replication.network import Faults, FaultTarget, UnknownFaultTarget, resolve_target
from vstore.reports import lab_warnings, status_document
from vstore.targets import APP_LOCK


# -- status ---------------------------------------------------------------------------------------
def status_command(lab: LabArg, as_json: JsonOption = False) -> None:
    """Show sites, pairs and their states, and the entries waiting to be shipped.

    Example: vstore status /tmp/lab --json
    """
    with user_errors():
        client = daemon_client(lab, application=False)
        if client is not None:
            doc = client.call(STATUS)[0]["status"]
        else:
            with open_lab(lab) as system:
                doc = status_document(system)
        doc["warnings"] = lab_warnings(lab)
    if as_json:
        print(json.dumps(doc, indent=2))
        return
    print_status(doc)


def print_status(doc: dict) -> None:
    """The status document as two tables and a line per link down and for the shipper process."""
    sites = Table(title=f"lab {doc['lab']} ({doc['mode']} mode)")
    for col in ("site", "up", "role"):
        sites.add_column(col)
    for name, s in doc["sites"].items():
        sites.add_row(name, "[green]up[/]" if s["up"] else "[red]down[/]", s["role"])
    out.print(sites)
    pairs = Table(title="pairs")
    for col in ("pair", "kind", "source -> target", "state", "entries", "bytes", "oldest", "reason"):
        pairs.add_column(col)
    for p in doc["pairs"]:
        style = STATE_STYLE.get(p["state"], "")
        oldest = f"{p['oldest_waiting_s']:.1f}s" if p["oldest_waiting_s"] is not None else "-"
        pairs.add_row(p["name"], p["kind"], f"{p['source']} -> {p['target']}", f"[{style}]{p['state']}[/]",
                      str(p["entries_waiting"]), format_size(p["bytes_waiting"]), oldest, p["reason"] or "")
    out.print(pairs)
    if doc.get("spool_damage"):
        out.print(f"[bold white on red]spool damage[/]: {doc['spool_damage']['message']}", highlight=False)
    for warning in doc.get("warnings", []):
        out.print(f"[yellow]warning[/]: {warning}", highlight=False)
    down = [name for name, up in doc["links"].items() if not up]
    if down:
        out.print(f"links down: {', '.join(down)}")
    if doc.get("unfinished_setup"):
        out.print(f"[yellow]the set-up of this lab did not finish[/]: run `vstore lab init {doc['lab']}` again to "
                  "continue it", highlight=False)
    for copy in doc.get("unfinished_copies", []):
        out.print(f"[yellow]unfinished copy[/] {copy['source']} -> {copy['target']}: {copy['done']} of "
                  f"{copy['total']} blocks; run `{copy['command']}` again to continue", highlight=False)
    shipping = doc.get("shipping")
    if shipping:
        last = f"{shipping['last_confirm_s']:.1f}s ago" if shipping["last_confirm_s"] is not None else "never"
        rate = f"{shipping['entries_per_s']:.0f} entries/s, {format_size(int(shipping['bytes_per_s']))}/s"
        pid = f" (pid {shipping['pid']})" if shipping["pid"] else ""
        out.print(f"shipper process: {shipping['process']}{pid}, sending {rate}; last confirmed batch {last}",
                  highlight=False)
    for export in doc.get("exports", []):
        out.print(f"NBD export: {export_line(export)}", highlight=False)


# -- I/O ------------------------------------------------------------------------------------------
def read_payload(file: Path | None, block_size: int, pad: bool) -> bytes:
    """The bytes to write (a file or stdin), whole blocks only unless `pad` fills the last one."""
    if file is None:
        data = sys.stdin.buffer.read()
    elif not file.is_file():
        raise TricopyError(f"{file}: no such file")
    else:
        data = file.read_bytes()
    if not data:
        raise TricopyError("nothing to write: the input is empty")
    if len(data) % block_size:
        if not pad:
            raise TricopyError(f"the input is {len(data)} bytes, not a whole number of {block_size}-byte blocks; "
                               "pass --pad to fill the last block with zeros")
        data += bytes(block_size - len(data) % block_size)
    return data


def write_command(
    lab: LabArg,
    lba: Annotated[int, typer.Option(help="First block to write.")],
    volume: Annotated[str, typer.Option(help="Virtual volume: index (0) or name (A, A1...).")] = "0",
    file: Annotated[Path | None, typer.Option(help="Read the data from this file (default: stdin).")] = None,
    pad: Annotated[bool, typer.Option(help="Zero-fill the last partial block.")] = False,
) -> None:
    """Write blocks the way the application does: through the mirror program (mirror mode) or the
    provider (provider mode), then flush: returns when the write is durable on A, C and the spool.

    Example: head -c 8192 /dev/urandom | vstore write /tmp/lab --lba 10
    """
    with user_errors():
        client = daemon_client(lab)
        if client is not None:
            vol = int(volume) if volume.isdigit() else volume
            info = client.call(APP_INFO, {"volume": vol})[0]
            data = read_payload(file, info["block_size"], pad)
            block_size = info["block_size"]
            # the application writer's claim, as a jfs mount of lab:LAB through the daemons takes it
            with claim(lab / RUN_DIR / APP_LOCK, exclusive=True, resource=f"lab:{lab.absolute()}"):
                for first, n in spans(lba, len(data) // block_size, block_size):
                    at = (first - lba) * block_size
                    client.call(APP_WRITE, {"volume": vol, "lba": first}, data[at:at + n * block_size])
                client.call(APP_FLUSH, {"volume": vol})
            name = info["name"]
        else:
            with open_lab(lab) as system:
                try:
                    device = system.device(int(volume) if volume.isdigit() else volume)
                    data = read_payload(file, device.block_size, pad)
                    device.write(lba, data)
                    device.flush()
                finally:
                    system.save()
                name, block_size = device.name, device.block_size
    out.print(f"wrote {len(data) // block_size} block(s) at {lba} to {name}", highlight=False)


def read_command(
    lab: LabArg,
    site: Annotated[str, typer.Option(help="primary, sync or async.")],
    volume: Annotated[str, typer.Option(help="Volume at that site (A, B, C, D, A0...).")],
    lba: Annotated[int, typer.Option(min=0, help="First block.")],
    count: Annotated[int, typer.Option(min=1, help="Number of blocks.")] = 1,
    output: Annotated[Path | None, typer.Option("--out", help="Write to this file instead of stdout (its "
                                                              "directory must exist).")] = None,
) -> None:
    """Read blocks of one site's volume (the raw replica, whatever its pair state).

    Example: vstore read /tmp/lab --site sync --volume C --lba 10 --count 2 | xxd | head
    """
    with user_errors():
        if output is not None:
            check_output_path(output)
        if site not in SITE_NAMES:
            raise TricopyError(f"unknown site {site!r}; use one of {', '.join(SITE_NAMES)}")
        if is_up(lab):
            topo = load_topology(lab)
            with clients(lab, topo, load_key(lab / topo.key_file))[site] as client:
                data = client.call(VOL_READ, {"volume": volume, "lba": lba, "count": count})[1]
        else:
            with open_lab(lab) as system:
                system.network.check(site, site)
                data = system.storage(site).host_read(volume, lba, count)
    if output:
        try:
            output.write_bytes(data)
        except OSError as exc:
            die(f"cannot write {output}: {exc.strerror or exc}")
    else:
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()


# -- shipping -------------------------------------------------------------------------------------
# -- faults ---------------------------------------------------------------------------------------
FaultTargetArg = Annotated[str, typer.Argument(
    help="A site (primary, sync, async), a link (primary-sync, primary-async, sync-async) or a volume with "
         "its site, volume:SITE:VOLUME (e.g. volume:sync:C; volume:C when only one site has a C).",
    show_default=False)]


def lab_volumes(lab: Path) -> dict[str, list[str]]:
    """The volume names of every site whose state the lab holds (a destroyed site has none)."""
    load_topology(lab)  # a clear error for a directory that is not a lab
    return {site: sorted(state.get("volumes", {})) for site in SITE_NAMES
            if (state := load_site_state(lab / site)) is not None}


def fault_target(lab: Path, target: str, faults: Faults) -> FaultTarget:
    """The site, link or volume `target` names in this lab; an unknown one is a usage error (exit 2).
    A volume already failed stays nameable after its site is gone, so that it can be healed."""
    volumes = lab_volumes(lab)
    try:
        return resolve_target(target, volumes)
    except UnknownFaultTarget as exc:
        gone: dict[str, list[str]] = {}  # the failed volumes of sites whose state is gone
        for ref in faults.volumes_failed:
            site, _, volume = ref.partition(":")
            if site not in volumes:
                gone.setdefault(site, []).append(volume)
        if target.startswith("volume:") and gone:
            with suppress(UnknownFaultTarget):
                return resolve_target(target, gone)
        die(str(exc), code=2)


def short_form(target: FaultTarget) -> str:
    """For a volume named without its site, which site's volume that was: " (volume:C is sync:C)"."""
    if target.kind == "volume" and target.typed != f"volume:{target.name}":
        return f" ({target.typed} is {target.name}, the only volume of that name)"
    return ""


def fail_command(lab: LabArg, target: FaultTargetArg) -> None:
    """Inject a failure: a site goes down, a link is cut, or one site's volume fails (its reads and
    writes, by the host and by the copy programs, are rejected). Only targets that exist are
    accepted; failing what is already failed changes nothing (exit 0).

    Example: vstore fail /tmp/lab primary-sync      (or: vstore fail /tmp/lab volume:sync:C)
    """
    with user_errors():
        faults = Faults.load(lab) if lab.is_dir() else Faults()
        resolved = fault_target(lab, target, faults)
        changed = faults.set(resolved.kind, resolved.name, True)
        if changed:
            faults.save(lab)  # the lab's simulation control; daemons read it on every request
    what = "failed" if changed else "is already failed; nothing changed"
    out.print(f"{resolved} {what}{short_form(resolved)}", highlight=False, soft_wrap=True)


def heal_command(lab: LabArg, target: FaultTargetArg, quiet: QuietOption = False) -> None:
    """Repair an injected failure, then resync the pairs it suspended (Duplex-Pending copies only the
    recorded positions) and clear the mirror program's write inhibit. Healing what is not failed
    says so and changes no fault; pairs left Suspend (by a stopped heal, or by a site that came back
    in a new boot) are still resynced; exit 0.

    Example: vstore heal /tmp/lab primary-sync
    """
    with user_errors():
        faults = Faults.load(lab) if lab.is_dir() else Faults()
        resolved = fault_target(lab, target, faults)
        healed = faults.set(resolved.kind, resolved.name, False)
        if not healed:
            out.print(f"{resolved} is not failed; nothing to heal{short_form(resolved)}", highlight=False,
                      soft_wrap=True)
            if unfinished(lab):
                out.print("continuing the resync a stopped heal left unfinished", highlight=False)
        else:
            faults.save(lab)
        client = daemon_client(lab)
        if client is not None:
            lines = client.call(RESYNC)[0]["steps"]
        else:
            with stoppable(lab), open_lab(lab) as system, progress_bars(quiet) as progress:
                lines = resync_all(system, progress).steps
                system.save()
    if healed:
        out.print(f"{resolved} healed{short_form(resolved)}", highlight=False, soft_wrap=True)
    for step in lines:
        out.print(f"  {step}", highlight=False)


# -- disaster recovery ----------------------------------------------------------------------------
def recover_command(
    lab: LabArg,
    to: Annotated[str, typer.Option("--to", help="sync: resume at the Sync site; async: resume at the Async site.")],
    as_json: JsonOption = False,
    full: Annotated[bool, typer.Option("--full", help="Copy the whole volume instead of touched files.")] = False,
    quiet: Annotated[bool, typer.Option(help="No progress bar.")] = False,
) -> None:
    """Embodiment-4 recovery after losing the primary [0171]-[0173]: scan C's metadata log, copy only
    the touched files (and differing metadata) C -> D, re-establish async copy, resume at the chosen site.
    Falls back to a full copy, and says so, when the log cannot prove what changed.

    Example: rm -rf /tmp/lab/primary && vstore recover /tmp/lab --to sync
    """
    with user_errors(), stoppable(lab), quiesced_lab(lab), open_lab(lab) as system, \
            progress_bars(quiet or as_json) as progress:
        report, steps = recover(system, to, progress, full_copy=full)
        system.save()
    if as_json:
        print(json.dumps(report.to_json(), indent=2))
        return
    for step in steps.steps:
        out.print(f"  {step}", highlight=False)
    ratio = report.full_copy_bytes / report.bytes_copied if report.bytes_copied else float("inf")
    out.print(f"recovered to {to}: {report.touched_files} touched files, {report.blocks_copied} blocks "
              f"({format_size(report.bytes_copied)}) copied instead of {format_size(report.full_copy_bytes)} "
              f"({ratio:.0f}x less) in {report.seconds:.2f}s", highlight=False)
    if report.fallback_full_copy:
        err.print("[yellow]warning:[/] the metadata log could not prove what changed; a full copy was made: "
                  + "; ".join(report.problems), highlight=False, soft_wrap=True)


def failover_command(
    lab: LabArg,
    to: Annotated[str, typer.Option("--to", help="sync (Fig 10) or async (Fig 13; Fig 14 with --catch-up).")],
    catch_up: Annotated[bool, typer.Option("--catch-up", help="Fig 14: make D equal to C first, then async "
                                                               "D -> C.")] = False,
    quiet: QuietOption = False,
) -> None:
    """Move the application off a lost primary. `--to sync` (Fig 10): C becomes writable and async copy
    C -> D starts (provider mode: touched-files copy; mirror mode: full copy). `--to async` (Fig 13):
    D becomes writable, the file system log is replayed and checked. `--to async --catch-up` (Fig 14):
    D is first made equal to C, then D -> C async copy starts.

    Example: rm -rf /tmp/lab/primary && vstore failover /tmp/lab --to sync
    """
    with user_errors(), stoppable(lab), quiesced_lab(lab), open_lab(lab) as system, progress_bars(quiet) as progress:
        if to == "sync":
            if catch_up:
                raise TricopyError("--catch-up goes with --to async (Fig 14)")
            steps = fig10_failover_to_sync(system, progress)
        elif to == "async":
            steps = (fig14_failover_to_async_catch_up if catch_up else fig13_failover_to_async)(system, progress)
        else:
            raise TricopyError(f"--to must be sync or async, not {to!r}")
        system.save()
    for step in steps.steps:
        out.print(f"  {step}", highlight=False)


def failback_command(
    lab: LabArg,
    sync_first: Annotated[bool, typer.Option("--sync-first/--async-first",
                                             help="From the Sync site: Fig 11 / Fig 12. From the Async site: "
                                                  "Fig 16 / Fig 15.")] = True,
    discard_site: Annotated[str | None, typer.Option("--discard-site", help="After a split brain: the site "
                                                                           "whose independent writes are thrown "
                                                                           "away.")] = None,
    quiet: QuietOption = False,
) -> None:
    """Return the application to the primary site and restore A->C sync, B->D (provider: A->D) async,
    every pair Duplex. The primary directory may be gone or empty (fresh images are made) or hold
    its old images. Stops on split brain unless --discard-site names the side to discard.

    Example: vstore failback /tmp/lab --sync-first
    """
    with user_errors(), stoppable(lab), quiesced_lab(lab), open_lab(lab) as system, progress_bars(quiet) as progress:
        steps = failback(system, sync_first=sync_first, progress=progress, discard_site=discard_site)
        system.save()
    for step in steps.steps:
        out.print(f"  {step}", highlight=False)


def register(app: typer.Typer) -> None:
    """Add the pair, data, fault and disaster commands to a typer app, in the order `--help` lists them."""
    for name, command in (("status", status_command), ("write", write_command), ("read", read_command),
                          ("ship", ship.ship_command), ("fail", fail_command), ("heal", heal_command),
                          ("recover", recover_command), ("failover", failover_command),
                          ("failback", failback_command)):
        app.command(name)(command)
