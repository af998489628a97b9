"""What every `vstore` command shares (DESIGN.md "Surfaces", "user surface"): the root typer app,
the two consoles, the one way to fail, the one progress-bar factory and the one colour per pair state.

Keeps true:
- A user mistake or refused operation is one sentence on stderr and a non-zero exit (`die`,
  `user_errors`), never a traceback; the sentence is printed as it is (brackets such as
  "[sites.primary]" are text, not rich markup).
- stdout carries only a command's result (tables, lines, or the one JSON document of the DESIGN.md
  "JSON contract"); warnings, log lines and progress bars go to stderr.
- `progress_bars` is the only rich progress display behind a `procedures.Progress` factory: every
  long copy (init, heal, ship, recover, failover, failback, the demo's recovery) draws the same bar,
  and none at all when quiet.
- A command that opens the lab's files in process refuses while the lab's daemons run
  (`open_system`); `daemon_client` is the way to the running lab instead.
- `STATE_STYLE` is the one colour of each pair state, in `vstore status` and the dashboard.
- An output file a command is asked to write (`read --out`, `dashboard --svg`) is checked with
  `check_output_path` before any work: a missing or unwritable directory, or a path that is a
  directory, is one sentence ("cannot write DIR/x: the directory DIR does not exist").
"""

from __future__ import annotations

import logging
import os
import shlex
import sys
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from vstore.blocks.errors import TricopyError
from vstore.blocks.interrupts import Terminated, terminate_as_interrupt
from vstore.daemons.processes import coordinator, is_up, quiesced
from vstore.lab.copies import unfinished
from vstore.lab.system import System
from vstore.net.client import Peer
from vstore.procedures.reactions import open_system
from vstore.procedures.steps import Progress as ProgressFactory

app = typer.Typer(help="tricopy: three-site remote copy of block volumes (Primary, near Sync, far Async).",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)

out = Console()
err = Console(stderr=True)

LabArg = Annotated[Path, typer.Argument(help="The lab directory.", show_default=False)]
QuietOption = Annotated[bool, typer.Option(help="No progress bars.")]
JsonOption = Annotated[bool, typer.Option("--json", help="One JSON document.")]

STATE_STYLE = {"Duplex": "green", "Simplex": "dim", "Suspend": "red", "Suspending": "yellow",
               "Duplex-Pending": "cyan", "Initial-Copying": "cyan"}


@app.callback()
def main_options(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log every procedure step and pair state "
                                                                  "change to stderr.")] = False,
) -> None:
    """tricopy: three-site remote copy. Warnings (pair failures, suspended copies) go to stderr."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s",
                        handlers=[RichHandler(console=err, show_path=False, show_time=verbose)], force=True)


def die(message: str, code: int = 1) -> NoReturn:
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)  # "[lab]" is text
    raise typer.Exit(code)


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn TricopyError (and a missing lab) into one sentence on stderr and exit 1."""
    try:
        yield
    except TricopyError as exc:
        die(str(exc))


def check_output_path(path: Path) -> Path:
    """`path` if a file can be created or replaced there, else a TricopyError naming what is wrong."""
    directory = path.parent
    if not directory.exists():
        raise TricopyError(f"cannot write {path}: the directory {directory} does not exist")
    if not directory.is_dir():
        raise TricopyError(f"cannot write {path}: {directory} is not a directory")
    if path.is_dir():
        raise TricopyError(f"cannot write {path}: it is a directory; name a file in it")
    if not os.access(directory, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise TricopyError(f"cannot write {path}: permission denied")
    return path


@contextmanager
def progress_bars(quiet: bool) -> Iterator[ProgressFactory]:
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


def open_lab(lab: Path) -> System:
    """The lab opened in this process; refused while its daemons own the files."""
    if not lab.is_dir():
        raise TricopyError(f"{lab} does not exist; create a lab with `vstore lab init {lab}`")
    if is_up(lab):
        raise TricopyError(f"the daemons of {lab} are running and own its files; this command works on a lab "
                           f"that is down: run `vstore lab down {lab}` first")
    system = open_system(lab)
    system.command = command_line()
    return system


def command_line() -> str:
    """This command as the user typed it (what a stopped copy says to run again)."""
    return shlex.join(["vstore", *sys.argv[1:]])


@contextmanager
def stoppable(lab: Path) -> Iterator[None]:
    """A long command: Ctrl-C or SIGTERM stops it at a consistent point (no block half-copied, the
    lab's saved state untouched), and it says which copies stopped where and what continues them."""
    with terminate_as_interrupt():
        try:
            yield
        except KeyboardInterrupt as exc:
            what = "terminated" if isinstance(exc, Terminated) else "interrupted"
            left = unfinished(lab) if lab.is_dir() else []
            err.print(f"[bold yellow]{what}[/]: the lab's saved state is as it was before this command"
                      + (", except the positions of these copies:" if left else "."), highlight=False)
            for copy in left:
                err.print(f"  {copy['source']} -> {copy['target']}: {copy['done']} of {copy['total']} blocks copied",
                          highlight=False)
            err.print(f"run `{command_line()}` again to continue" + (" from there" if left else ""),
                      highlight=False, soft_wrap=True)
            raise typer.Exit(130) from None


def quiesced_lab(lab: Path) -> AbstractContextManager[list[str]]:
    """Disaster procedures run with the lab's daemons stopped and start them again afterwards."""
    return quiesced(lab, say=lambda text: err.print(f"[dim]{text}[/]", highlight=False))


def daemon_client(lab: Path, *, application: bool = True) -> Peer | None:
    """The coordinating daemon's client when the lab is up, else None (commands open the files).
    `application=False`: any daemon that answers will do when no site runs the application."""
    return coordinator(lab, application=application) if lab.is_dir() and is_up(lab) else None


def export_line(export: dict) -> str:
    """One running NBD export (`status --json` "exports"): where, who, how busy."""
    clients = sorted({c for e in export["exports"] for c in e["clients"]})
    return (f"{export['url']} (pid {export['pid']}), {len(clients)} client(s)"
            f"{': ' + ', '.join(clients) if clients else ''}, {export['requests_per_s']:.0f} requests/s")
