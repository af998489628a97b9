"""The commands that create a lab and run its processes (DESIGN.md "Surfaces", "user surface"):
`vstore lab init|up|down` and the foreground daemons `vstore serve` and `vstore shipper`.

Keeps true: `lab init` leaves every pair Duplex (the Fig 3 set-up) or fails with one sentence
(out-of-range numbers are refused by their option bounds before anything is created);
`lab up` starts the three site daemons and the shipper process in the background and names their
pid and log files, warning (one line per kind of path) about anything of the lab open wider than it
should be; `serve`/`shipper` run one process in the foreground until SIGTERM, with its ready file in
LAB/run so that `lab up` knows when it listens, and create their files as private as the lab
(umask 077, or 007 in a lab shared with its group).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer

from vstore.blocks.codec import group_shared
from vstore.blocks.holders import check_free
from vstore.blocks.pids import read_pid
from vstore.blocks.units import parse_size
from vstore.cli.common import LabArg, QuietOption, command_line, err, out, progress_bars, stoppable, user_errors
from vstore.daemons.processes import EXPORT, RUN_DIR, SHIPPER, lab_down, lab_up, ready_file, stop_site
from vstore.daemons.shipper import ShipperDaemon
from vstore.daemons.site import SiteDaemon
from vstore.exports.nbd_export import parse_listen
from vstore.lab.served import running_exports
from vstore.procedures.create import init_lab
from vstore.reports import lab_warnings
from vstore.targets import APP_LOCK


def lab_init_command(
    lab: LabArg,
    mode: Annotated[str, typer.Option(help="provider = embodiment 4 (A, C, D; entries on the host); "
                                           "mirror = embodiment 1 (A, B, C, D).")] = "provider",
    size: Annotated[str, typer.Option(help="Size of every volume, e.g. 64M, 1G.")] = "64M",
    volumes: Annotated[int, typer.Option(min=1, max=64, help="Volumes per site in one consistency group "
                                                             "(1-64).")] = 1,
    protect: Annotated[bool, typer.Option("--protect/--no-protect",
                                          help="Fence: refuse writes once the sync copy fails [0040], [0068].")] = True,
    coalesce: Annotated[bool, typer.Option(help="Coalesce repeated writes inside a shipped batch [0045].")] = False,
    unsafe_no_flush: Annotated[bool, typer.Option(
        "--unsafe-no-flush", help="Flushes do nothing: a power cut may lose flushed writes. For benchmarks only; "
                                  "status warns. (By default a flush is durable on A, C and the spool.)")] = False,
    durable: Annotated[bool, typer.Option(hidden=True, help="Accepted for old scripts: flushes are always "
                                                            "durable now.")] = True,
    spool_capacity: Annotated[str, typer.Option(help="Entry log capacity before the async pair suspends.")] = "256M",
    base_port: Annotated[int, typer.Option(min=1024, max=65533,
                                           help="TCP port of the primary's daemon; sync and async use the next "
                                                "two (127.0.0.1); 1024-65533.")] = 7401,
    tls: Annotated[bool, typer.Option("--tls/--no-tls", help="Daemons talk TLS (a lab CA and certificate are made "
                                                             "in LAB/tls; topology.toml [tls] names them).")] = False,
    overcommit: Annotated[bool, typer.Option("--overcommit", help="Create the (sparse) images even when the "
                                             "disk cannot hold them at their full size.")] = False,
    group: Annotated[str | None, typer.Option(help="Share the lab's administration with this group (name or "
                                                   "number): directories 0770, files 0660 instead of "
                                                   "0700/0600; the lab key stays 0600.")] = None,
    quiet: QuietOption = False,
) -> None:
    """Create a lab and run the Fig 3 initial set-up; every pair ends Duplex. An interrupted set-up
    continues where its copies stopped when the same command is run again.

    Example: vstore lab init /tmp/lab --mode mirror --size 64M
    """
    with user_errors(), stoppable(lab), progress_bars(quiet) as progress:
        steps = init_lab(lab, mode=mode, size=parse_size(size), volumes=volumes, protect=protect, coalesce=coalesce,
                         unsafe_no_flush=unsafe_no_flush, spool_capacity=parse_size(spool_capacity),
                         base_port=base_port,
                         tls=tls, overcommit=overcommit, group=group, progress=progress,
                         command=command_line())
    for step in steps.steps:
        out.print(f"  {step}", highlight=False)
    out.print(f"lab [bold]{lab}[/] ready ({mode} mode)")


def lab_up_command(
    lab: LabArg,
    export: Annotated[bool, typer.Option("--export", help="Also serve the application's volume over NBD "
                                                          "(`vstore export`, stopped by `lab down`).")] = False,
    export_listen: Annotated[str, typer.Option(help="HOST:PORT of that export.")] = "127.0.0.1:10809",
) -> None:
    """Start the three site daemons on 127.0.0.1 (ports in topology.toml) and the shipper process of
    the site running the application, in the background; pid and log files go to LAB/run/. While a
    lab is up, vstore and jfs commands talk to the daemons.

    Example: vstore lab up /tmp/lab --export   (then: qemu-img info nbd://127.0.0.1:10809/A)
    """
    with user_errors():
        if export:
            parse_listen(export_listen)  # refuse a bad address before starting anything
        pids = lab_up(lab, export=export_listen if export else None)
        warnings = lab_warnings(lab)
    for line in warnings:
        err.print(f"[yellow]warning[/]: {line}", highlight=False, soft_wrap=True)
    for name, pid in pids.items():
        what = {SHIPPER: "shipper process", EXPORT: "NBD export"}.get(name, f"site {name} daemon")
        out.print(f"{what}: pid {pid} (log {lab / 'run' / name}.log)", highlight=False)
    for doc in running_exports(lab) if export else []:
        out.print(f"NBD export serving {doc['url']}", highlight=False)


def lab_down_command(
    lab: LabArg,
    force: Annotated[bool, typer.Option("--force", help="Stop the daemons even while lab:LAB is mounted or "
                                                        "open through them (its next writes will fail).")] = False,
) -> None:
    """Stop the lab's site daemons cleanly (SIGTERM, then wait). Refused while the application's
    volume is mounted or open through the daemons, naming who has it, unless --force.

    Example: vstore lab down /tmp/lab
    """
    with user_errors():
        export = lab.is_dir() and stop_site(lab, EXPORT)  # `lab up --export`'s holds the volume: it goes first
        if not force and lab.is_dir():
            check_free(lab / RUN_DIR / APP_LOCK, resource=f"lab:{lab.absolute()}", wait=0)
        stopped = [EXPORT] * export + lab_down(lab)
    out.print(f"stopped: {', '.join(stopped) or 'nothing was running'}")


def serve_command(
    site: Annotated[str, typer.Option(help="primary, sync or async.")],
    config: Annotated[Path, typer.Option(help="The lab's topology.toml.")],
) -> None:
    """Run one site's daemon in the foreground (what `vstore lab up` starts three of).

    Example: vstore serve --site sync --config /tmp/lab/topology.toml
    """
    run_in_foreground(lambda: SiteDaemon(config.parent, site), ready_file(config.parent, site))


def shipper_command(
    site: Annotated[str, typer.Option(help="The site running the application (whose spool is shipped).")],
    config: Annotated[Path, typer.Option(help="The lab's topology.toml.")],
) -> None:
    """Run the shipping process in the foreground (what `vstore lab up` starts next to the daemon of
    the site running the application): follows that site's spool and sends acknowledged entries,
    in order, to the Async site; resumes from the Async site's applied entry after any restart.

    Example: vstore shipper --site primary --config /tmp/lab/topology.toml
    """
    run_in_foreground(lambda: ShipperDaemon(config.parent, site), ready_file(config.parent, SHIPPER))


def run_in_foreground(make: Callable[[], SiteDaemon | ShipperDaemon], ready: Path) -> None:
    """Build a daemon (site or shipper) and run its asyncio loop until SIGTERM; user errors in one
    line. What it creates is private to the lab (umask 077, or 007 where the lab is shared with its
    group); its ready file goes when it ends."""
    logging.getLogger().setLevel(logging.INFO)
    umask = os.umask(0o007 if group_shared(ready.parent.parent) else 0o077)
    try:
        with user_errors():
            process = make()
            asyncio.run(process.run(ready=ready))
    finally:
        os.umask(umask)
        if read_pid(ready) == os.getpid():
            with contextlib.suppress(OSError):
                ready.unlink()


def register(app: typer.Typer) -> None:
    """Add `vstore serve`, `vstore shipper` and the `vstore lab` group to a typer app."""
    app.command("serve")(serve_command)
    app.command("shipper")(shipper_command)
    lab_app = typer.Typer(help="Create and run labs (a three-site deployment in one directory).",
                          no_args_is_help=True)
    lab_app.command("init")(lab_init_command)
    lab_app.command("up")(lab_up_command)
    lab_app.command("down")(lab_down_command)
    app.add_typer(lab_app, name="lab")
