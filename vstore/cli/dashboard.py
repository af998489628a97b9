"""`vstore dashboard LAB`: a rich screen of the sites, the pairs and the entry queues (DESIGN.md
"Surfaces", "user surface"; invariant 5 "nothing silent").

Keeps true:
- A snapshot is plain data (`collect` returns a JSON-able dict): the status document of
  `vstore.reports.status_document` (so every key of the DESIGN "JSON contract" is there, unchanged)
  plus per-site volumes, per-pair direction, the async group's sequence numbers and
  the newest pair state changes with their reasons, newest first. A daemon client can build the same
  dict and feed `History.add` / `render` without a lab directory.
- The lab is opened only for the instant of one snapshot (`System` holds LAB/.lock while open), so
  the dashboard never blocks other commands; a live dashboard that finds the lock taken shows its
  last frame marked "lab busy" and tries again.
- Ship rate and the queue-depth sparkline come from successive snapshots (`History`), never from
  guesses: with fewer than two samples the rate is unknown ("-").
- `run` draws one frame (`once`, optionally saved as SVG) or a Live screen refreshed when a file
  under the lab changes (watchdog) and at least every `interval` seconds; Ctrl-C exits cleanly.
  The `--svg` file is checked (`check_output_path`) before the lab is read.
"""

from __future__ import annotations

import fcntl
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console, ConsoleOptions, Group, RenderResult
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from vstore.blocks.errors import TricopyError
from vstore.blocks.units import format_size
from vstore.cli.common import STATE_STYLE, check_output_path, daemon_client, export_line, open_lab, user_errors
from vstore.lab.topology import SITE_NAMES
from vstore.lab.watch import watching
from vstore.net.rpc import SNAPSHOT
from vstore.reports import EVENTS_SHOWN, snapshot_of

SPARK_BLOCKS = "▁▂▃▄▅▆▇█"
SVG_WIDTH = 132


# -- data ---------------------------------------------------------------------------------------------
def collect(lab: Path) -> dict:
    """Open the lab just long enough to take one snapshot; raises TricopyError for a bad lab."""
    client = daemon_client(Path(lab), application=False)
    if client is not None:  # the daemons own the files: ask the coordinating one
        with client:
            return client.call(SNAPSHOT)[0]["snapshot"]
    with open_lab(Path(lab)) as system:
        return snapshot_of(system)


def lab_busy(lab: Path) -> bool:
    """Is another command holding LAB/.lock right now? (Probe only: the lock is released at once.)"""
    path = Path(lab) / ".lock"
    if not path.exists():
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing drops a lock we may have taken
    return False


class History:
    """Queue-depth and confirmed-sequence samples per async pair over the last `window_s` seconds."""

    def __init__(self, window_s: float = 300.0, rate_window_s: float = 30.0) -> None:
        self.window_s = window_s
        self.rate_window_s = rate_window_s
        self.samples: dict[str, deque[tuple[float, int, int | None]]] = {}

    def add(self, snapshot: dict) -> None:
        now = snapshot.get("time", time.time())
        for p in snapshot.get("pairs", []):
            if p.get("kind") != "async":
                continue
            q = self.samples.setdefault(p["name"], deque())
            q.append((now, int(p.get("entries_waiting") or 0), p.get("confirmed_seq")))
            while q and q[0][0] < now - self.window_s:
                q.popleft()

    def rate(self, pair: str) -> float | None:
        """Entries shipped (confirmed) per second over the recent samples; None when unknown."""
        q = [s for s in self.samples.get(pair, ()) if s[2] is not None]
        if len(q) < 2:
            return None
        end = q[-1][0]
        recent = [s for s in q if s[0] >= end - self.rate_window_s]
        # a new spool (failover) restarts the sequence: only count from the last restart
        start = 0
        for i in range(1, len(recent)):
            if recent[i][2] < recent[i - 1][2]:
                start = i
        recent = recent[start:]
        if len(recent) < 2 or recent[-1][0] <= recent[0][0]:
            return None
        return (recent[-1][2] - recent[0][2]) / (recent[-1][0] - recent[0][0])

    def sparkline(self, pair: str, width: int = 24) -> str:
        """The queue depth over the window in `width` time buckets (max per bucket)."""
        q = self.samples.get(pair)
        if not q:
            return ""
        end = q[-1][0]
        start = end - self.window_s
        step = self.window_s / width
        buckets: list[int | None] = [None] * width
        for t, depth, _ in q:
            i = min(width - 1, max(0, int((t - start) / step)))
            buckets[i] = depth if buckets[i] is None else max(buckets[i], depth)  # type: ignore[type-var]
        first = next(i for i, b in enumerate(buckets) if b is not None)
        values: list[int] = []
        for b in buckets[first:]:
            values.append(b if b is not None else values[-1])
        return " " * first + spark(values)


def spark(values: list[int]) -> str:
    top = max(values, default=0)
    if top <= 0:
        return SPARK_BLOCKS[0] * len(values)
    last = len(SPARK_BLOCKS) - 1
    return "".join(SPARK_BLOCKS[min(last, round(v * last / top))] for v in values)


# -- drawing ------------------------------------------------------------------------------------------
def styled_state(state: str) -> Text:
    return Text(state, style=STATE_STYLE.get(state, ""))


def age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    if seconds < 3600:
        return f"{seconds / 60:.1f}m"
    return f"{seconds / 3600:.1f}h"


def site_panel(name: str, info: dict) -> Panel:
    if not info.get("present", True):
        status, border = "[bold red]LOST[/] (directory missing)", "red"
    elif info.get("up"):
        status, border = "[green]up[/]", "green"
    else:
        status, border = "[bold red]down[/]", "red"
    grid = Table.grid(padding=(0, 1))
    grid.add_column(style="bold")
    grid.add_column()
    grid.add_row("status", status)
    grid.add_row("role", info.get("role", "?"))
    for vol in info.get("volumes", []):
        roles = ", ".join(vol.get("pairs", [])) or "no pair"
        grid.add_row(f"vol {vol['name']}", f"{format_size(vol['size'])}  {roles}")
    return Panel(grid, title=f"[bold]{name}[/]", border_style=border)


WIDE = 120  # below this many columns the pairs table drops kind and direction


class PairsTable:
    """The pairs table, laid out for the width it is drawn at; reasons go below it, one line each."""

    def __init__(self, snapshot: dict, history: History) -> None:
        self.snapshot = snapshot
        self.history = history

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        wide = options.max_width >= WIDE
        table = Table(title="pairs", expand=True, title_justify="left")
        cols = [("pair", {"no_wrap": True})]
        if wide:
            cols += [("kind", {}), ("direction", {"no_wrap": True})]
        cols += [("state", {"no_wrap": True})]
        cols += [("waiting", {"justify": "right"}), ("bytes", {"justify": "right", "no_wrap": True}),
                 ("oldest", {"justify": "right"}), ("ship rate", {"justify": "right", "no_wrap": True}),
                 ("queue depth", {"no_wrap": True, "min_width": 8})]
        for col, kw in cols:
            table.add_column(col, **kw)
        reasons = Table.grid(padding=(0, 1))
        reasons.add_column(no_wrap=True)
        reasons.add_column(no_wrap=True)
        reasons.add_column()
        for p in self.snapshot.get("pairs", []):
            is_async = p.get("kind") == "async"
            rate = self.history.rate(p["name"]) if is_async else None
            row: list[Any] = [p["name"]]
            if wide:
                row += [p["kind"], f"{p['source']} -> {p['target']}"]
            row.append(styled_state(p["state"]))
            if is_async:
                row += [str(p["entries_waiting"]), format_size(p["bytes_waiting"]), age(p.get("oldest_waiting_s")),
                        f"{rate:.1f}/s" if rate is not None else "-",
                        Text(self.history.sparkline(p["name"]), style="cyan")]
            else:
                row += ["-", "-", "-", "-", ""]
            table.add_row(*row)
            if p.get("reason"):
                reasons.add_row(p["name"], Text.assemble(styled_state(p["state"]), ":"), p["reason"])
        if not self.snapshot.get("pairs"):
            table.add_row("(no pairs)", *[""] * (len(cols) - 1))
        yield table
        if reasons.row_count:
            yield reasons


def pairs_table(snapshot: dict, history: History) -> PairsTable:
    return PairsTable(snapshot, history)


def event_line(e: dict) -> Text:
    when = time.strftime("%H:%M:%S", time.localtime(e["time"])) if e.get("time") else "--:--:--"
    line = Text(f"{when}  {e['pair']} ")
    if e.get("failure"):
        line.append("failure ", style="bold red")
    line.append(f"{e['from']} -> ")
    line.append(styled_state(e["to"] or "?"))
    if e.get("reason"):
        line.append(f": {e['reason']}")
    return line


def render(snapshot: dict, history: History | None = None, *, note: str | None = None) -> Group:
    """One frame: a panel per site, the pairs table with sparklines, the newest state changes."""
    history = history or History()
    sites = Table.grid(expand=True, padding=(0, 1))
    names = [n for n in SITE_NAMES if n in snapshot.get("sites", {})] or list(snapshot.get("sites", {}))
    for _ in names:
        sites.add_column(ratio=1)
    sites.add_row(*[site_panel(n, snapshot["sites"][n]) for n in names])
    header = Text(f"tricopy lab {snapshot.get('lab', '?')} ({snapshot.get('mode', '?')} mode)", style="bold")
    if snapshot.get("time"):
        header.append(time.strftime("  %Y-%m-%d %H:%M:%S", time.localtime(snapshot["time"])), style="dim")
    down = [name for name, up in snapshot.get("links", {}).items() if not up]
    if down:
        header.append(f"  links down: {', '.join(down)}", style="bold red")
    queue = snapshot.get("queue")
    if queue:
        header.append(f"  entry log at {queue['site']}: confirmed #{queue['confirmed_seq']}, "
                      f"next #{queue['next_seq']}", style="dim")
    shipping = snapshot.get("shipping")
    if shipping:  # through the daemons: the shipper process
        running = shipping["process"] == "running"
        header.append(f"  shipper process {shipping['process']}", style="green" if running else "bold red")
        if running:
            header.append(f" ({format_size(int(shipping['bytes_per_s']))}/s)", style="dim")
    for export in snapshot.get("exports", []):
        header.append(f"\n  NBD export {export_line(export)}", style="cyan")
    if note:
        header.append(f"  {note}", style="bold yellow")
    damage = snapshot.get("spool_damage")
    if damage:  # acknowledged entries damaged or missing: the async group is Suspend for them
        header.append(f"\nSPOOL DAMAGE: {damage['message']}", style="bold white on red")
    events = Table.grid()
    events.add_column()
    shown = snapshot.get("events", [])[:EVENTS_SHOWN]
    for e in shown:
        events.add_row(event_line(e))
    if not shown:
        events.add_row(Text("no state changes recorded", style="dim"))
    return Group(header, sites, pairs_table(snapshot, history),
                 Panel(events, title="recent state changes (newest first)", border_style="blue"))


def error_frame(lab: Path, message: str) -> Panel:
    return Panel(Text(message, style="red"), title=f"tricopy lab {lab}", border_style="red")


# -- running ------------------------------------------------------------------------------------------
def run(lab: Path, once: bool = False, svg: Path | None = None, interval: float = 1.0,
        console: Console | None = None) -> None:
    lab = Path(lab)
    history = History()
    if once or svg is not None:
        snapshot = collect(lab)
        history.add(snapshot)
        frame = render(snapshot, history)
        if svg is not None:
            rec = Console(record=True, width=SVG_WIDTH, file=console.file if console else None)
            rec.print(frame)
            rec.save_svg(str(svg), title=f"vstore dashboard {lab.name}")
        else:
            (console or Console()).print(frame)
        return
    _live(lab, history, max(0.05, interval), console or Console())


def _live(lab: Path, history: History, interval: float, console: Console, *,
          stop: threading.Event | None = None, on_frame: Callable[[dict | None], None] | None = None) -> None:
    """The Live loop; `stop` and `on_frame` let a test (or an embedding program) end it and watch it."""
    from rich.live import Live
    wake = threading.Event()
    snapshot: dict | None = None
    try:
        with watching(lab, wake.set, recursive=True), \
                Live(error_frame(lab, "loading..."), console=console, screen=True, auto_refresh=False) as live:
            while True:
                note = None
                if lab_busy(lab):
                    note = "lab busy (another command holds LAB/.lock); showing the last frame"
                    wake.clear()  # its writes land before it lets go; the interval brings the next frame
                else:
                    try:
                        snapshot = collect(lab)
                        history.add(snapshot)
                    except TricopyError as exc:
                        snapshot, note = None, str(exc)
                    wake.clear()  # changes made while we looked are in this frame
                frame = render(snapshot, history, note=note) if snapshot else error_frame(lab, note or "no data")
                live.update(frame, refresh=True)
                if on_frame is not None:
                    on_frame(snapshot)
                deadline = time.monotonic() + interval
                while not wake.is_set() and time.monotonic() < deadline and not (stop and stop.is_set()):
                    wake.wait(min(0.1, max(0.0, deadline - time.monotonic())))
                if stop is not None and stop.is_set():
                    return
                time.sleep(0.05)  # let a burst of file events settle into one refresh
    except KeyboardInterrupt:
        pass


def register(app: typer.Typer) -> None:
    """Add `vstore dashboard` to a typer app."""

    @app.command("dashboard")
    def dashboard_command(
        lab: Annotated[Path, typer.Argument(help="The lab directory.", show_default=False)],
        once: Annotated[bool, typer.Option("--once", help="Print one frame and exit.")] = False,
        svg: Annotated[Path | None, typer.Option("--svg", help="Save one frame as an SVG file and exit.")] = None,
        interval: Annotated[float, typer.Option(help="Refresh at least every this many seconds.")] = 1.0,
    ) -> None:
        """Live screen of sites, pairs and entry queues (waiting entries, bytes, oldest age, ship rate,
        queue-depth sparkline) and the newest pair state changes with their reasons. Refreshes when the
        lab's files change and at least every --interval seconds; Ctrl-C quits.

        Example: vstore dashboard /tmp/lab --once
        """
        with user_errors():
            if svg is not None:
                check_output_path(svg)
            run(lab, once=once, svg=svg, interval=interval)
        if svg is not None:
            Console(stderr=True).print(f"saved the frame to {svg}", highlight=False)
