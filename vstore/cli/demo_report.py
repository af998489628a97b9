"""What `vstore demo LAB` measured and how it says so (DESIGN.md "Surfaces", "JSON contract"): the
`DemoResult`, its one JSON document, the step lines and write bar while it runs (`Ui`), and the
closing report table.

Keeps true: the report states only what the result holds, which the demo measured (files read back
from C, D and the new primary), never what it assumed; `--json` puts every measurement in one
document on stdout and the step lines on stderr; `--quiet` prints no step lines and no bars.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from vstore.blocks.units import format_size

log = logging.getLogger("vstore.demo")

DEMO_DIR = "/demo"


@dataclass
class DemoResult:
    lab: str
    files: list[dict] = field(default_factory=list)  # acknowledged: {"path", "bytes", "sha256"}
    lost_at_sync: list[str] = field(default_factory=list)
    in_flight_at_async: list[str] = field(default_factory=list)
    async_note: str | None = None
    recovery: dict = field(default_factory=dict)
    missing_at_new_primary: list[str] = field(default_factory=list)
    killed: dict[str, int] = field(default_factory=dict)
    async_link: dict = field(default_factory=dict)
    async_applied_seq: int | None = None
    timings: dict[str, float] = field(default_factory=dict)
    daemons: str = "down"
    seconds: float = 0.0
    options: dict = field(default_factory=dict)
    file_system: str = "jfs"  # or "ext4" (`--ext4`)
    ext4: dict | None = None  # the ext4 demo's own measurements (e2fsck exits, the mount at Sync, ...)

    def to_json(self) -> dict:
        return {"lab": self.lab, "files_written": len(self.files),
                "bytes_written": sum(f["bytes"] for f in self.files), "files": self.files,
                "lost_at_sync": self.lost_at_sync, "in_flight_at_async": self.in_flight_at_async,
                "async_note": self.async_note, "async_applied_seq": self.async_applied_seq,
                "recovery": self.recovery, "new_primary": "sync",
                "missing_at_new_primary": self.missing_at_new_primary, "killed": self.killed,
                "async_link": self.async_link, "daemons": self.daemons, "timings": self.timings,
                "options": self.options, "seconds": round(self.seconds, 3), "file_system": self.file_system,
                **({"ext4": self.ext4} if self.ext4 is not None else {})}


class Ui:
    """Step lines and progress bars (stdout for humans; stderr or nothing with --json / --quiet)."""

    def __init__(self, *, quiet: bool, as_json: bool) -> None:
        self.quiet, self.as_json = quiet, as_json
        self.console = Console(stderr=as_json)

    def step(self, name: str, text: str) -> None:
        log.info("demo %s: %s", name, text)
        if not self.quiet:
            self.console.print(f"[bold cyan]{name:>8}[/] {text}", highlight=False, soft_wrap=True)

    def progress(self) -> Progress | None:
        """The bar of the files being written (files, bytes and the Async backlog), or None."""
        if self.quiet or self.as_json:
            return None
        return Progress(TextColumn("{task.description}"), BarColumn(bar_width=30),
                        TextColumn("{task.fields[files]}/{task.fields[total_files]} files, {task.fields[written]}"),
                        TimeElapsedColumn(), TextColumn("[yellow]{task.fields[backlog]}"),
                        console=Console(stderr=True), transient=False)


def listing(paths: list[str], limit: int = 8) -> str:
    shown = ", ".join(p.removeprefix(DEMO_DIR + "/") for p in paths[:limit])
    return shown + (f" ... and {len(paths) - limit} more" if len(paths) > limit else "")


def in_flight_text(result: DemoResult) -> str:
    """The files the Async site missed: the newest ones, as invariant 2 says, or a plain list."""
    written = [f["path"] for f in result.files]
    if result.in_flight_at_async:
        count = len(result.in_flight_at_async)
        if result.in_flight_at_async == written[-count:]:
            names = [p.removeprefix(DEMO_DIR + "/") for p in result.in_flight_at_async]
            inflight = f"[yellow]{count} files[/], the newest: {names[0]}" + (f" to {names[-1]}" if count > 1 else "")
        else:
            inflight = f"[yellow]{count} files[/]: {listing(result.in_flight_at_async)}"
    else:
        inflight = "[green]none[/]: shipping had caught up with every acknowledged file when the primary died"
    if result.async_note:
        inflight += f" ({result.async_note})"
    return inflight


def ext4_text(info: dict) -> str:
    """The ext4 row: e2fsck of the copies, the mount at the Sync site, and any problem found."""
    fsck = info.get("e2fsck_exit", {})
    text = ", ".join(f"{site} exit {rc}" for site, rc in fsck.items())
    text = f"e2fsck -fy of copies: {text}" if text else "not checked"
    at_sync = info.get("at_sync")
    if at_sync:
        text += "; mounted read-only at Sync" + (" after the kernel replayed its journal"
                                                  if at_sync.get("journal_replayed") else "")
    if info.get("problems"):
        text += f"; [bold red]{'; '.join(info['problems'])}[/]"
    return text


def print_report(result: DemoResult, console: Console) -> None:
    n = len(result.files)
    nbytes = sum(f["bytes"] for f in result.files)
    rec = result.recovery
    table = Table(title=f"vstore demo {result.lab}", show_header=True)
    table.add_column("what")
    table.add_column("result")
    table.add_row("written and acknowledged", f"{n} files ({format_size(nbytes)})")
    table.add_row("lost at Sync (C)", "[green]nothing[/]: every acknowledged file read back identical from C"
                  if not result.lost_at_sync else f"[bold red]{len(result.lost_at_sync)} files:[/] "
                  f"{listing(result.lost_at_sync)}")
    table.add_row("in flight at Async (D)", in_flight_text(result))
    ratio = rec["full_copy_bytes"] / rec["bytes_copied"] if rec.get("bytes_copied") else float("inf")
    table.add_row("recovery at Sync", f"{rec['touched_files']} touched files, {rec['blocks_copied']} blocks "
                  f"({format_size(rec['bytes_copied'])}) copied C -> D instead of {format_size(rec['full_copy_bytes'])}"
                  + f" ({ratio:.0f}x less) in {rec['seconds']:.2f}s"
                  + ((" [yellow](the volume holds no jfs metadata log to tell what changed: every block compared "
                      "by digests)[/]" if result.ext4 is not None
                      else " [yellow](the log could not prove what changed: every block compared by digests)[/]")
                     if rec.get("fallback_full_copy") else ""))
    if result.ext4 is not None:
        table.add_row("ext4", ext4_text(result.ext4))
    table.add_row("new primary", "the Sync site: " + ("[green]every acknowledged file readable[/]"
                  if not result.missing_at_new_primary else
                  f"[bold red]{len(result.missing_at_new_primary)} files unreadable:[/] "
                  f"{listing(result.missing_at_new_primary)}"))
    table.add_row("daemons", "running: the Sync site runs the application, async copy C -> D"
                  if result.daemons == "up" else "stopped (`vstore lab up` starts them with the new roles)")
    table.add_row("took", f"{result.seconds:.1f}s")
    console.print(table)
    lab = result.lab
    first = result.files[0]["path"]
    if result.ext4 is not None:
        console.print(f"try: vstore attach {lab} /mnt/x --readonly; losetup -r -f --show /mnt/x/A; mount -o ro "
                      f"LOOPDEV /mnt/y; head -3 /mnt/y{first};  vstore status {lab}", highlight=False, soft_wrap=True)
        return
    console.print(f"try: jfs read lab:{lab} {first} | head -3;  vstore status {lab};  vstore failback {lab}"
                  + (f";  vstore lab down {lab}" if result.daemons == "up" else ""), highlight=False, soft_wrap=True)
