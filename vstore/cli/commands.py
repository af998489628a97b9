"""The `vstore` command (DESIGN.md "user surface"): create a lab, write and read through the
replicated path, ship entries, inject and heal faults, and show what every pair is doing.

Keeps true: every user mistake or refused operation prints one sentence to stderr and exits
non-zero (never a traceback); `--json` prints exactly one JSON document on stdout with the keys
of the DESIGN.md "JSON contract"; long copies show a rich progress bar unless `--quiet`/`--json`.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from vstore.blocks.errors import TricopyError
from vstore.blocks.units import format_size, parse_size
from vstore.lab.topology import SITE_NAMES
from vstore.net.rpc import APP_INFO, APP_WRITE, RESYNC, SHIP, STATUS, VOL_READ
from vstore.replication.network import LINK_NAMES
from vstore.reports import status_document

app = typer.Typer(help="tricopy: three-site remote copy of block volumes (Primary, near Sync, far Async).",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
lab_app = typer.Typer(help="Create and run labs (a three-site deployment in one directory).", no_args_is_help=True)
app.add_typer(lab_app, name="lab")

out = Console()
err = Console(stderr=True)


@app.callback()
def main_options(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log every procedure step and pair state "
                                                                  "change to stderr.")] = False,
) -> None:
    """tricopy: three-site remote copy. Warnings (pair failures, suspended copies) go to stderr."""
    from rich.logging import RichHandler
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s",
                        handlers=[RichHandler(console=err, show_path=False, show_time=verbose)], force=True)

LabArg = Annotated[Path, typer.Argument(help="The lab directory.", show_default=False)]


def die(message: str, code: int = 1) -> None:
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn TricopyError (and a missing lab) into one sentence on stderr and exit 1."""
    try:
        yield
    except TricopyError as exc:
        die(str(exc))


@contextmanager
def progress_bars(quiet: bool) -> Iterator[Callable[[str, int], Callable[[int], None]]]:
    """A `procedures.Progress` factory backed by one rich progress display."""
    if quiet:
        yield lambda description, total: (lambda n: None)
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("blocks"),
               TimeRemainingColumn())
    with Progress(*columns, console=err, transient=False) as bars:
        def factory(description: str, total: int) -> Callable[[int], None]:
            if total <= 0:  # nothing to copy: no empty bar
                return lambda n: None
            task = bars.add_task(description, total=total)
            return lambda n: bars.advance(task, n)
        yield factory


def open_system(lab: Path) -> Any:
    from vstore.daemons.processes import is_up
    from vstore.lab.system import System
    if not lab.is_dir():
        raise TricopyError(f"{lab} does not exist; create a lab with `vstore lab init {lab}`")
    if is_up(lab):
        raise TricopyError(f"the daemons of {lab} are running and own its files; this command works on a lab "
                           f"that is down: run `vstore lab down {lab}` first")
    return System(lab)


def quiesced_lab(lab: Path) -> Any:
    """Disaster procedures run with the lab's daemons stopped and start them again afterwards."""
    from vstore.daemons.processes import quiesced
    return quiesced(lab, say=lambda text: err.print(f"[dim]{text}[/]", highlight=False))


# -- lab ------------------------------------------------------------------------------------------
@lab_app.command("init")
def lab_init(
    lab: LabArg,
    mode: Annotated[str, typer.Option(help="provider = embodiment 4 (A, C, D; entries on the host); "
                                           "mirror = embodiment 1 (A, B, C, D).")] = "provider",
    size: Annotated[str, typer.Option(help="Size of every volume, e.g. 64M, 1G.")] = "64M",
    volumes: Annotated[int, typer.Option(help="Volumes per site in one consistency group.")] = 1,
    protect: Annotated[bool, typer.Option("--protect/--no-protect",
                                          help="Fence: refuse writes once the sync copy fails [0040], [0068].")] = True,
    coalesce: Annotated[bool, typer.Option(help="Coalesce repeated writes inside a shipped batch [0045].")] = False,
    durable: Annotated[bool, typer.Option(help="fsync images, spool and state on every write.")] = False,
    spool_capacity: Annotated[str, typer.Option(help="Entry log capacity before the async pair suspends.")] = "256M",
    base_port: Annotated[int, typer.Option(help="TCP port of the primary's daemon; sync and async use the next "
                                                "two (127.0.0.1).")] = 7401,
    tls: Annotated[bool, typer.Option("--tls/--no-tls", help="Daemons talk TLS (a lab CA and certificate are made "
                                                             "in LAB/tls; topology.toml [tls] names them).")] = False,
    quiet: Annotated[bool, typer.Option(help="No progress bars.")] = False,
) -> None:
    """Create a lab and run the Fig 3 initial set-up; every pair ends Duplex.

    Example: vstore lab init /tmp/lab --mode mirror --size 64M
    """
    from vstore.procedures.create import init_lab
    with user_errors(), progress_bars(quiet) as progress:
        steps = init_lab(lab, mode=mode, size=parse_size(size), volumes=volumes, protect=protect, coalesce=coalesce,
                         durable=durable, spool_capacity=parse_size(spool_capacity), base_port=base_port,
                         tls=tls, progress=progress)
    for step in steps.steps:
        out.print(f"  {step}", highlight=False)
    out.print(f"lab [bold]{lab}[/] ready ({mode} mode)")


@lab_app.command("up")
def lab_up_cmd(lab: LabArg) -> None:
    """Start the three site daemons on 127.0.0.1 (ports in topology.toml) and the shipper process of
    the site running the application, in the background; pid and log files go to LAB/run/. While a
    lab is up, vstore and jfs commands talk to the daemons.

    Example: vstore lab up /tmp/lab
    """
    from vstore.daemons.processes import SHIPPER, lab_up
    with user_errors():
        pids = lab_up(lab)
    for name, pid in pids.items():
        what = "shipper process" if name == SHIPPER else f"site {name} daemon"
        out.print(f"{what}: pid {pid} (log {lab / 'run' / name}.log)", highlight=False)


@lab_app.command("down")
def lab_down_cmd(lab: LabArg) -> None:
    """Stop the lab's site daemons cleanly (SIGTERM, then wait).

    Example: vstore lab down /tmp/lab
    """
    from vstore.daemons.processes import lab_down
    with user_errors():
        stopped = lab_down(lab)
    out.print(f"stopped: {', '.join(stopped) or 'nothing was running'}")


@app.command()
def serve(
    site: Annotated[str, typer.Option(help="primary, sync or async.")],
    config: Annotated[Path, typer.Option(help="The lab's topology.toml.")],
) -> None:
    """Run one site's daemon in the foreground (what `vstore lab up` starts three of).

    Example: vstore serve --site sync --config /tmp/lab/topology.toml
    """
    from vstore.daemons.site import SiteDaemon
    run_in_foreground(lambda: SiteDaemon(config.parent, site), config.parent / "run" / f"{site}.pid")


def run_in_foreground(make: Callable[[], Any], ready: Path) -> None:
    """Build a daemon (site or shipper) and run its asyncio loop until SIGTERM; user errors in one line."""
    import asyncio
    logging.getLogger().setLevel(logging.INFO)
    with user_errors():
        process = make()
        asyncio.run(process.run(ready=ready))


@app.command()
def shipper(
    site: Annotated[str, typer.Option(help="The site running the application (whose spool is shipped).")],
    config: Annotated[Path, typer.Option(help="The lab's topology.toml.")],
) -> None:
    """Run the shipping process in the foreground (what `vstore lab up` starts next to the daemon of
    the site running the application): follows that site's spool and sends acknowledged entries,
    in order, to the Async site; resumes from the Async site's applied entry after any restart.

    Example: vstore shipper --site primary --config /tmp/lab/topology.toml
    """
    from vstore.daemons.processes import SHIPPER
    from vstore.daemons.shipper import Shipper
    run_in_foreground(lambda: Shipper(config.parent, site), config.parent / "run" / f"{SHIPPER}.pid")


def daemon_client(lab: Path, *, application: bool = True) -> Any:
    """The coordinating daemon's client when the lab is up, else None (commands open the files).
    `application=False`: any daemon that answers will do when no site runs the application."""
    from vstore.daemons.processes import coordinator, is_up
    return coordinator(lab, application=application) if lab.is_dir() and is_up(lab) else None


# -- status ---------------------------------------------------------------------------------------
STATE_STYLE = {"Duplex": "green", "Simplex": "dim", "Suspend": "red", "Suspending": "yellow",
               "Duplex-Pending": "cyan", "Initial-Copying": "cyan"}


@app.command()
def status(lab: LabArg, as_json: Annotated[bool, typer.Option("--json", help="One JSON document.")] = False) -> None:
    """Show sites, pairs and their states, and the entries waiting to be shipped.

    Example: vstore status /tmp/lab --json
    """
    with user_errors():
        client = daemon_client(lab, application=False)
        if client is not None:
            doc = client.call(STATUS)[0]["status"]
        else:
            with open_system(lab) as system:
                doc = status_document(system)
    if as_json:
        print(json.dumps(doc, indent=2))
        return
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
    down = [name for name, up in doc["links"].items() if not up]
    if down:
        out.print(f"links down: {', '.join(down)}")
    shipping = doc.get("shipping")
    if shipping:
        last = f"{shipping['last_confirm_s']:.1f}s ago" if shipping["last_confirm_s"] is not None else "never"
        rate = f"{shipping['entries_per_s']:.0f} entries/s, {format_size(int(shipping['bytes_per_s']))}/s"
        pid = f" (pid {shipping['pid']})" if shipping["pid"] else ""
        out.print(f"shipper process: {shipping['process']}{pid}, sending {rate}; last confirmed batch {last}",
                  highlight=False)


# -- I/O ------------------------------------------------------------------------------------------
def read_payload(file: Path | None, block_size: int, pad: bool) -> bytes:
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


@app.command()
def write(
    lab: LabArg,
    lba: Annotated[int, typer.Option(help="First block to write.")],
    volume: Annotated[str, typer.Option(help="Virtual volume: index (0) or name (A, A1...).")] = "0",
    file: Annotated[Path | None, typer.Option(help="Read the data from this file (default: stdin).")] = None,
    pad: Annotated[bool, typer.Option(help="Zero-fill the last partial block.")] = False,
) -> None:
    """Write blocks the way the application does: through the mirror program (mirror mode) or the
    provider (provider mode). Returns only when the Sync site holds the write.

    Example: head -c 8192 /dev/urandom | vstore write /tmp/lab --lba 10
    """
    with user_errors():
        client = daemon_client(lab)
        if client is not None:
            vol = int(volume) if volume.isdigit() else volume
            info = client.call(APP_INFO, {"volume": vol})[0]
            data = read_payload(file, info["block_size"], pad)
            client.call(APP_WRITE, {"volume": vol, "lba": lba}, data)
            name, block_size = info["name"], info["block_size"]
        else:
            with open_system(lab) as system:
                try:
                    device = system.device(int(volume) if volume.isdigit() else volume)
                    data = read_payload(file, device.block_size, pad)
                    device.write(lba, data)
                    device.flush()
                finally:
                    system.save()
                name, block_size = device.name, device.block_size
    out.print(f"wrote {len(data) // block_size} block(s) at {lba} to {name}", highlight=False)


@app.command()
def read(
    lab: LabArg,
    site: Annotated[str, typer.Option(help="primary, sync or async.")],
    volume: Annotated[str, typer.Option(help="Volume at that site (A, B, C, D, A0...).")],
    lba: Annotated[int, typer.Option(help="First block.")],
    count: Annotated[int, typer.Option(help="Number of blocks.")] = 1,
    output: Annotated[Path | None, typer.Option("--out", help="Write to this file instead of stdout.")] = None,
) -> None:
    """Read blocks of one site's volume (the raw replica, whatever its pair state).

    Example: vstore read /tmp/lab --site sync --volume C --lba 10 --count 2 | xxd | head
    """
    with user_errors():
        if site not in SITE_NAMES:
            raise TricopyError(f"unknown site {site!r}; use one of {', '.join(SITE_NAMES)}")
        from vstore.daemons.processes import is_up
        if is_up(lab):
            from vstore.daemons.processes import clients
            from vstore.lab.topology import load_topology
            from vstore.net.keys import load_key
            topo = load_topology(lab)
            with clients(lab, topo, load_key(lab / topo.key_file))[site] as client:
                data = client.call(VOL_READ, {"volume": volume, "lba": lba, "count": count})[1]
        else:
            with open_system(lab) as system:
                system.network.check(site, site)
                data = system.storage(site).host_read(volume, lba, count)
    if output:
        output.write_bytes(data)
    else:
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()


@app.command()
def ship(
    lab: LabArg,
    max_entries: Annotated[int | None, typer.Option("--max", help="Ship at most N entries.")] = None,
    follow: Annotated[bool, typer.Option("--follow", help="Keep shipping as new entries arrive (watchdog "
                                                           "on the spool) until Ctrl-C or --duration.")] = False,
    period: Annotated[float | None, typer.Option("--period", help="With --follow: ship only every S seconds "
                                                                  "(the periodic copy of the prior art).")] = None,
    duration: Annotated[float | None, typer.Option("--duration", help="With --follow: stop after S seconds.")] = None,
    quiet: Annotated[bool, typer.Option(help="No progress bar.")] = False,
) -> None:
    """Send waiting entries to the Async site in order (it stores each batch, applies it, confirms).
    A suspended async pair whose link works again is first resynced (Duplex-Pending).

    Example: vstore ship /tmp/lab --max 10      (or: vstore ship /tmp/lab --follow --period 10)
    """
    if follow:
        from vstore.lab.follow import follow as run_follow

        def report_round(r: Any) -> None:
            if r.error:
                err.print(f"[yellow]ship:[/] {r.error}", highlight=False)
            elif r.entries and not quiet:
                out.print(f"shipped {r.entries} entries", highlight=False)

        with user_errors():
            if period is not None and period <= 0:
                raise TricopyError("--period must be a positive number of seconds")
            from vstore.daemons.processes import is_up
            if is_up(lab):
                raise TricopyError(f"the daemons of {lab} are running: their shipper process already follows the "
                                   f"spool (`vstore status {lab}` shows its send rate); `--follow` works on a lab "
                                   "that is down")
            try:
                total = run_follow(lab, period=period, duration=duration, on_round=report_round)
            except KeyboardInterrupt:
                total = -1
        if total >= 0:
            out.print(f"follow ended: {total} entries shipped", highlight=False)
        return
    if period is not None or duration is not None:
        die("--period and --duration go with --follow")
    with user_errors():
        client = daemon_client(lab)
    if client is not None:
        with user_errors():
            r = client.call(SHIP, {"max": max_entries})[0]
        if r["error"]:
            die(f"cannot ship: {r['error']}")
        if r["batches"] is None:  # the shipper process ships; the daemon waited until it caught up
            out.print(f"the shipper process shipped {r['entries']} entries meanwhile; nothing is waiting",
                      highlight=False)
        else:
            out.print(f"shipped {r['entries']} entries in {r['batches']} batches ({r['blocks_sent']} blocks sent)",
                      highlight=False)
        return
    with user_errors(), open_system(lab) as system:
        try:
            total = system.entry_log.stats().entries
            with progress_bars(quiet or total < 1000) as progress:
                report = system.shipper().ship(max_entries, progress=progress("shipping entries", total))
        finally:
            system.save()
    if report.error:
        die(f"cannot ship: {report.error}; the async pair is now suspended with positions recorded")
    msg = f"shipped {report.entries} entries in {report.batches} batches ({report.blocks_sent} blocks sent"
    if report.blocks_sent != report.blocks_written:
        msg += f", {report.blocks_written} written: coalesced"
    msg += ")"
    if report.resynced_blocks:
        msg += f"; resynced {report.resynced_blocks} recorded blocks first"
    out.print(msg, highlight=False)


# -- faults ---------------------------------------------------------------------------------------
def parse_target(target: str) -> tuple[str, str]:
    if target in SITE_NAMES:
        return "site", target
    if target in LINK_NAMES:
        return "link", target
    if target.startswith("volume:"):
        ref = target.removeprefix("volume:")
        site, _, vol = ref.rpartition(":")
        return "volume", f"{site or 'primary'}:{vol}"
    raise TricopyError(f"unknown target {target!r}: use a site ({', '.join(SITE_NAMES)}), a link "
                       f"({', '.join(LINK_NAMES)}) or volume:NAME (e.g. volume:A)")


@app.command()
def fail(lab: LabArg, target: Annotated[str, typer.Argument(help="Site, link or volume:NAME.")]) -> None:
    """Inject a failure: a site goes down, a link is cut, or a volume fails.

    Example: vstore fail /tmp/lab primary-sync
    """
    with user_errors():
        kind, name = parse_target(target)
        edit_faults(lab, kind, name, broken=True)
    out.print(f"{kind} {name} failed")


def edit_faults(lab: Path, kind: str, name: str, *, broken: bool) -> None:
    """Change LAB/faults.json (the lab's simulation control; daemons read it on every request)."""
    from vstore.blocks.codec import load_json, save_json_atomic
    from vstore.lab.system import FAULTS_FILE
    from vstore.lab.topology import load_topology
    from vstore.replication.network import Faults
    load_topology(lab)  # a clear error for a directory that is not a lab
    path = lab / FAULTS_FILE
    faults = Faults.from_dict(load_json(path)) if path.is_file() else Faults()
    faults.set(kind, name, broken)
    save_json_atomic(path, faults.to_dict(), durable=False)


@app.command()
def heal(lab: LabArg, target: Annotated[str, typer.Argument(help="Site, link or volume:NAME.")],
         quiet: Annotated[bool, typer.Option(help="No progress bars.")] = False) -> None:
    """Repair an injected failure, then resync the pairs it suspended (Duplex-Pending copies only the
    recorded positions) and clear the mirror program's write inhibit.

    Example: vstore heal /tmp/lab primary-sync
    """
    from vstore.procedures.setup import resync_all
    with user_errors():
        kind, name = parse_target(target)
        edit_faults(lab, kind, name, broken=False)
        client = daemon_client(lab)
        if client is not None:
            lines = client.call(RESYNC)[0]["steps"]
        else:
            with open_system(lab) as system, progress_bars(quiet) as progress:
                lines = resync_all(system, progress).steps
                system.save()
    out.print(f"{kind} {name} healed")
    for step in lines:
        out.print(f"  {step}", highlight=False)


# -- disaster recovery ----------------------------------------------------------------------------
@app.command()
def recover(
    lab: LabArg,
    to: Annotated[str, typer.Option("--to", help="sync: resume at the Sync site; async: resume at the Async site.")],
    as_json: Annotated[bool, typer.Option("--json", help="One JSON document.")] = False,
    full: Annotated[bool, typer.Option("--full", help="Copy the whole volume instead of touched files.")] = False,
    quiet: Annotated[bool, typer.Option(help="No progress bar.")] = False,
) -> None:
    """Embodiment-4 recovery after losing the primary [0171]-[0173]: scan C's metadata log, copy only
    the touched files (and differing metadata) C -> D, re-establish async copy, resume at the chosen site.
    Falls back to a full copy, and says so, when the log cannot prove what changed.

    Example: rm -rf /tmp/lab/primary && vstore recover /tmp/lab --to sync
    """
    from vstore.procedures.recovery import recover as run_recover
    with user_errors(), quiesced_lab(lab), open_system(lab) as system, progress_bars(quiet or as_json) as progress:
        report, steps = run_recover(system, to, progress, full_copy=full)
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


@app.command()
def failover(
    lab: LabArg,
    to: Annotated[str, typer.Option("--to", help="sync (Fig 10) or async (Fig 13; Fig 14 with --catch-up).")],
    catch_up: Annotated[bool, typer.Option("--catch-up", help="Fig 14: make D equal to C first, then async "
                                                               "D -> C.")] = False,
    quiet: Annotated[bool, typer.Option(help="No progress bars.")] = False,
) -> None:
    """Move the application off a lost primary. `--to sync` (Fig 10): C becomes writable and async copy
    C -> D starts (provider mode: touched-files copy; mirror mode: full copy). `--to async` (Fig 13):
    D becomes writable, the file system log is replayed and checked. `--to async --catch-up` (Fig 14):
    D is first made equal to C, then D -> C async copy starts.

    Example: rm -rf /tmp/lab/primary && vstore failover /tmp/lab --to sync
    """
    from vstore.procedures import failover as fo
    with user_errors(), quiesced_lab(lab), open_system(lab) as system, progress_bars(quiet) as progress:
        if to == "sync":
            if catch_up:
                raise TricopyError("--catch-up goes with --to async (Fig 14)")
            steps = fo.fig10_failover_to_sync(system, progress)
        elif to == "async":
            steps = (fo.fig14_failover_to_async_catch_up if catch_up else fo.fig13_failover_to_async)(system, progress)
        else:
            raise TricopyError(f"--to must be sync or async, not {to!r}")
        system.save()
    for step in steps.steps:
        out.print(f"  {step}", highlight=False)


@app.command()
def failback(
    lab: LabArg,
    sync_first: Annotated[bool, typer.Option("--sync-first/--async-first",
                                             help="From the Sync site: Fig 11 / Fig 12. From the Async site: "
                                                  "Fig 16 / Fig 15.")] = True,
    discard_site: Annotated[str | None, typer.Option("--discard-site", help="After a split brain: the site "
                                                                           "whose independent writes are thrown "
                                                                           "away.")] = None,
    quiet: Annotated[bool, typer.Option(help="No progress bars.")] = False,
) -> None:
    """Return the application to the primary site and restore A->C sync, B->D (provider: A->D) async,
    every pair Duplex. The primary directory may be gone or empty (fresh images are made) or hold
    its old images. Stops on split brain unless --discard-site names the side to discard.

    Example: vstore failback /tmp/lab --sync-first
    """
    from vstore.procedures.failback import failback as run_failback
    with user_errors(), quiesced_lab(lab), open_system(lab) as system, progress_bars(quiet) as progress:
        steps = run_failback(system, sync_first=sync_first, progress=progress, discard_site=discard_site)
        system.save()
    for step in steps.steps:
        out.print(f"  {step}", highlight=False)
