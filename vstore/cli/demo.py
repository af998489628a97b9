"""`vstore demo LAB`: the whole story in one command (SPEC §1 [0013]-[0015], §4 and §8
[0171]-[0173]; DESIGN.md "Surfaces"; DESIGN invariants 1 and 2).

Creates a provider-mode lab (embodiment 4), brings its daemons up with the Async site behind a far
link (a `vstore.net.linkproxy` relay on the primary-async link: limited bandwidth, optional delay),
writes files through jfs on `lab:LAB` with a live progress bar, kills every process of the primary
host with SIGKILL and deletes the primary site's directory (the site is lost), recovers at the Sync
site (`vstore.procedures.recovery.recover`: touched files only) and reports what was lost. Each of
these is a named stage (`STAGES`: init, up, write, kill, check, recover, verify), a function of the
`DemoRun`; `run_stage` runs one, times it and prints its step line. What the stages do to the lab
is `vstore.cli.demo_lab`, the result and its report `vstore.cli.demo_report`.

With `--ext4` the same stages run with the kernel's ext4 on the replicated volume instead of jfs
(SPEC §6, embodiment 2; `vstore.cli.demo_ext4`): the volume attached through the daemons, a loop
device, mkfs.ext4, files fsynced, the whole primary host killed (its dead mounts taken away), C and
D checked in copies repaired by e2fsck, recovery at the Sync site, and the ext4 mounted read-only
there. Every mount and loop device it made is gone when it ends, whatever the outcome.

The far link has 30 ms of one-way delay by default (application writes wait only for the Sync site,
so the delay is felt by shipping alone), and its bandwidth is by default "auto": unlimited while
the file system is made, then set to 85% of the rate at which the first files' entries crossed it,
so the burst of writes outruns the link a little, as a burst does on a WAN sized for the average
load.

Keeps true:
- It never touches an existing lab: LAB must not exist or be an empty directory (one-sentence
  error otherwise, nothing changed).
- The report is measured, never assumed. "Lost at Sync" is every acknowledged file whose content,
  read from the Sync site's image C after the kill, differs from what was written (invariant 1
  says: none, and the command fails loudly if any). "In flight at Async" is every acknowledged file
  missing or different in the Async site's image D after the kill and before recovery, read
  read-only with jfs (invariant 2: D is a prefix, so these are the newest files); it may be empty
  when shipping caught up, and the output says so.
- The kill is one moment for the whole primary site: the relay first severs the primary's end
  (bytes not yet transmitted are lost, bytes already on the wire arrive), then SIGKILL.
- File contents are a pure function of the file's path and size (`content_for`), so anyone can
  recompute them; the JSON also carries each file's SHA-256.
- When the demo ends, successfully or not, nothing it started is left half-running: the relay is
  stopped, the topology no longer routes through it, and the daemons are either up with their new
  roles (`--keep-up`, the default) or stopped (`--down`, or after an error).
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Annotated, NamedTuple

import typer

from vstore.blocks.errors import TricopyError
from vstore.blocks.units import format_size, parse_size
from vstore.cli.common import die, user_errors
from vstore.cli.demo_ext4 import Ext4Demo, check_ext4_demo
from vstore.cli.demo_lab import (
    AUTO_FRACTION,
    DemoOptions,
    calibration_files,
    check_lab_path,
    check_options,
    compare_files,
    far_link_wanted,
    kill_primary_host,
    read_back,
    recover_at_sync,
    settled_applied_seq,
    start_far_link,
    write_files,
)
from vstore.cli.demo_report import DemoResult, Ui, print_report
from vstore.daemons.processes import is_up, lab_down, lab_up
from vstore.net.linkproxy import LinkProxy
from vstore.procedures.create import free_base_port, init_lab

log = logging.getLogger("vstore.demo")


# -- the stages -------------------------------------------------------------------------------------
@dataclass
class DemoRun:
    """What the stages share: the lab, the options, the result being measured, and what is running."""

    lab: Path
    opts: DemoOptions
    ui: Ui
    result: DemoResult
    base_port: int
    mark: float  # when the running stage began
    stage: str = "init"
    plain_topology: str = ""  # topology.toml as `init_lab` wrote it (no relay)
    link: LinkProxy | None = None
    ext4: Ext4Demo | None = None  # the ext4 demo's mounts and measurements (--ext4)

    @property
    def topology(self) -> Path:
        return self.lab / "topology.toml"


class Stage(NamedTuple):
    name: str  # the key in the result's timings and in an error message
    says: str  # the label of its step line
    run: Callable[[DemoRun], str]  # does the stage's work; returns its step line


def init_stage(run: DemoRun) -> str:
    lab, base_port = run.lab, run.base_port
    init_lab(lab, mode="provider", size=run.opts.size, base_port=base_port)
    run.plain_topology = run.topology.read_text()
    return (f"provider-mode lab {lab} ({format_size(run.opts.size)} volumes A, C, D; daemons on 127.0.0.1:"
            f"{base_port}-{base_port + 2}); every pair Duplex")


def up_stage(run: DemoRun) -> str:
    opts = run.opts
    if far_link_wanted(opts):
        run.link = start_far_link(run.base_port, opts)
        via = f'\n[links.primary-async]\nvia = "127.0.0.1:{run.base_port + 3}"\n'
        run.topology.write_text(run.plain_topology + via)
    run.result.async_link = {"relay": run.link is not None, "delay_ms": opts.async_delay_ms,
                             "bandwidth": opts.async_bandwidth, "auto": opts.auto_bandwidth is not None}
    lab_up(run.lab)
    if run.link is None:
        far = "the Async site is near (no emulated far link)"
    else:
        if opts.auto_bandwidth is not None:
            rate = (f"bandwidth {opts.auto_bandwidth:.0%} of the entry rate measured over the first "
                    f"{calibration_files(opts.files)} file(s)")
        else:
            rate = f"{format_size(opts.async_bandwidth)}/s" if opts.async_bandwidth else "unlimited bandwidth"
        far = f"the Async site is far: {rate}" + (f", {opts.async_delay_ms:g} ms each way"
                                                   if opts.async_delay_ms else "")
    return f"daemons of primary, sync and async running; {far}"


def write_stage(run: DemoRun) -> str:
    result = run.result
    write_files(run.lab, run.opts, run.ui, result, run.link)
    linked = (f"; the far link ran at {format_size(result.async_link['bandwidth'])}/s"
              if result.async_link.get("bandwidth") else "")
    return (f"{len(result.files)} files ({format_size(run.opts.files * run.opts.file_size)}) written "
            f"through jfs on lab:{run.lab} and acknowledged, each only once the Sync site had it{linked}")


def kill_stage(run: DemoRun) -> str:
    if run.link is not None:
        run.link.sever()  # the primary site's end of its far link goes with it
    run.result.killed = kill_primary_host(run.lab)
    victims = ", ".join(f"{n} (pid {p})" for n, p in run.result.killed.items()) or "nothing (no process was running)"
    return f"SIGKILL {victims}; the primary site is lost"


def survivors_down(run: DemoRun) -> None:
    """The far link drained and gone, the Async site's applied entry settled, the survivors'
    daemons stopped (so their images can be read as they are), the primary site's directory gone."""
    lab = run.lab
    if run.link is not None:
        run.link.drain(timeout=run.opts.async_delay_ms / 1000 + 2.0)  # what was already on the wire still arrives
        run.link.stop()
        run.link = None
    run.result.async_applied_seq = settled_applied_seq(lab)
    lab_down(lab)  # the survivors, so that their images can be read as they are
    run.topology.write_text(run.plain_topology)  # no relay any more
    shutil.rmtree(lab / "primary")


def check_stage(run: DemoRun) -> str:
    lab, result = run.lab, run.result
    survivors_down(run)
    result.lost_at_sync, _ = compare_files(lab / "sync" / "C.img", result.files)
    result.in_flight_at_async, result.async_note = compare_files(lab / "async" / "D.img", result.files)
    return (f"Sync site: {len(result.files) - len(result.lost_at_sync)} of {len(result.files)} "
            f"files intact; Async site: {len(result.in_flight_at_async)} file(s) were still in flight")


def recover_stage(run: DemoRun) -> str:
    rec = run.result.recovery = recover_at_sync(run.lab, run.ui)
    if run.ext4 is not None:
        run.ext4.info["recovery_copy"] = "whole volume compared" if rec["fallback_full_copy"] else "touched files"
    if rec["fallback_full_copy"]:
        why = ("an ext4 volume has no jfs metadata log to tell what changed" if run.ext4 is not None
               else "; ".join(rec["problems"]))
        return (f"at the Sync site: WHOLE VOLUME COMPARED by digests ({why}), "
                f"{format_size(rec['bytes_copied'])} that differed copied to the Async site instead of "
                f"{format_size(rec['full_copy_bytes'])}; async copy C -> D re-established")
    return (f"at the Sync site: {rec['touched_files']} touched files, "
            f"{format_size(rec['bytes_copied'])} copied to the Async site instead of "
            f"{format_size(rec['full_copy_bytes'])}; async copy C -> D re-established")


def verify_stage(run: DemoRun) -> str:
    result = run.result
    if run.opts.keep_up:
        lab_up(run.lab)
        result.daemons = "up"
    result.missing_at_new_primary = read_back(run.lab, result.files)
    return (f"{len(result.files) - len(result.missing_at_new_primary)} of {len(result.files)} "
            f"acknowledged files read back from the new primary (lab:{run.lab}, now the Sync site)")


INIT = Stage("init", "init", init_stage)
STAGES = (  # after init, in order; if one fails, what the demo started is stopped
    Stage("up", "up", up_stage),
    Stage("write", "writing", write_stage),
    Stage("kill", "kill", kill_stage),
    Stage("check", "check", check_stage),
    Stage("recover", "recover", recover_stage),
    Stage("verify", "verify", verify_stage),
)


def ext4_of(run: DemoRun) -> Ext4Demo:
    assert run.ext4 is not None
    return run.ext4


def ext4_write_stage(run: DemoRun) -> str:
    result = run.result
    ext4_of(run).write(run.opts, run.ui, result, run.link)
    linked = (f"; the far link ran at {format_size(result.async_link['bandwidth'])}/s"
              if result.async_link.get("bandwidth") else "")
    return (f"{len(result.files)} files ({format_size(run.opts.files * run.opts.file_size)}) written to the "
            f"kernel's ext4 on lab:{run.lab}, each acknowledged once its fsync returned{linked}")


def ext4_kill_stage(run: DemoRun) -> str:
    if run.link is not None:
        run.link.sever()
    run.result.killed = ext4_of(run).kill()
    victims = ", ".join(f"{n} (pid {p})" for n, p in run.result.killed.items()) or "nothing (no process was running)"
    return f"SIGKILL {victims}; the primary site is lost, its dead ext4 mount and loop device removed"


def ext4_check_stage(run: DemoRun) -> str:
    result = run.result
    survivors_down(run)
    ext4_of(run).check(result)
    fsck = ext4_of(run).info["e2fsck_exit"]
    return (f"Sync site: {len(result.files) - len(result.lost_at_sync)} of {len(result.files)} files intact; "
            f"Async site: {len(result.in_flight_at_async)} file(s) were still in flight (copies repaired by "
            f"e2fsck -fy: C exit {fsck['C']}, D exit {fsck['D']})")


def ext4_verify_stage(run: DemoRun) -> str:
    if run.opts.keep_up:
        lab_up(run.lab)
        run.result.daemons = "up"
    text = ext4_of(run).verify(run.result)
    n = len(run.result.files)
    return f"{n - len(run.result.missing_at_new_primary)} of {n} acknowledged files read back: {text}"


EXT4_STAGES = (  # the same names, the ext4 work where it differs
    STAGES[0],
    Stage("write", "writing", ext4_write_stage),
    Stage("kill", "kill", ext4_kill_stage),
    Stage("check", "check", ext4_check_stage),
    STAGES[4],
    Stage("verify", "verify", ext4_verify_stage),
)


def run_stage(run: DemoRun, stage: Stage) -> None:
    """Run one stage, record how long it took in the result's timings, then print its step line."""
    run.stage = stage.name
    text = stage.run(run)
    now = time.monotonic()
    run.result.timings[stage.name] = round(now - run.mark, 3)
    run.mark = now
    run.ui.step(stage.says, text)


def stop_what_was_started(run: DemoRun) -> None:
    """After a failed or interrupted stage: the ext4 demo's mounts and loop device gone, the relay
    stopped, the daemons down, no route through the relay."""
    if run.ext4 is not None:
        run.ext4.release()
    if run.link is not None:
        run.link.stop()
    if run.lab.is_dir() and is_up(run.lab):
        lab_down(run.lab)
    if run.topology.is_file() and run.topology.read_text() != run.plain_topology:
        run.topology.write_text(run.plain_topology)


@contextlib.contextmanager
def interruptible() -> Iterator[threading.Event]:
    """Ctrl-C and SIGTERM unwind as KeyboardInterrupt, so the demo still stops the daemons and the
    relay it started; the event records that the user asked to stop (a clean-up step may turn the
    interrupt into another error on its way out)."""
    asked = threading.Event()

    def interrupt(signum: int, frame: FrameType | None) -> None:
        asked.set()
        raise KeyboardInterrupt

    previous = {}
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, interrupt)
    except ValueError:  # not the main thread: leave signals alone
        pass
    try:
        yield asked
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class DemoInterrupted(Exception):
    """The user stopped the demo (Ctrl-C or SIGTERM) after the lab was created."""


def run_demo(lab: Path, opts: DemoOptions, ui: Ui, *, ext4: bool = False) -> DemoResult:
    with interruptible() as asked:
        return _run_demo(lab, opts, ui, asked, ext4)


def _run_demo(lab: Path, opts: DemoOptions, ui: Ui, asked: threading.Event, ext4: bool) -> DemoResult:
    started = time.monotonic()
    check_options(opts)
    if ext4:
        check_ext4_demo()
    check_lab_path(lab)
    base_port = opts.base_port if opts.base_port is not None else free_base_port(4)
    result = DemoResult(lab=str(lab), options={
        "files": opts.files, "file_size": opts.file_size, "size": opts.size, "base_port": base_port,
        "keep_up": opts.keep_up, "ext4": ext4}, file_system="ext4" if ext4 else "jfs")
    run = DemoRun(lab, opts, ui, result, base_port, mark=time.monotonic(), ext4=Ext4Demo(lab) if ext4 else None)
    if run.ext4 is not None:
        result.ext4 = run.ext4.info
    run_stage(run, INIT)  # nothing runs yet: a failure here has nothing to stop
    try:
        for stage in EXT4_STAGES if ext4 else STAGES:
            run_stage(run, stage)
    except BaseException as exc:
        interrupted = asked.is_set() or isinstance(exc, KeyboardInterrupt)
        if not interrupted:
            log.warning("demo stopped at step %s: %s; stopping what it started", run.stage, exc)
        stop_what_was_started(run)
        if interrupted:
            raise DemoInterrupted(f"interrupted at step {run.stage!r}; the lab in {lab} is left with its daemons "
                                  "stopped") from None
        if isinstance(exc, TricopyError):
            raise TricopyError(f"the demo stopped at step {run.stage!r}: {exc} (the lab in {lab} is left with its "
                               "daemons stopped)") from None
        raise
    result.seconds = time.monotonic() - started
    return result


# -- the command ------------------------------------------------------------------------------------
def demo_command(
    lab: Annotated[Path, typer.Argument(help="A new lab directory (must not exist, or be empty).",
                                        show_default=False)],
    files: Annotated[int, typer.Option("--files", help="How many files to write.")] = 100,
    file_size: Annotated[str, typer.Option("--file-size", help="Size of each file, e.g. 8K.")] = "8K",
    size: Annotated[str, typer.Option("--size", help="Size of every volume.")] = "64M",
    base_port: Annotated[int | None, typer.Option("--base-port", help="TCP port of the primary's daemon; sync, "
                                                  "async and the far-link relay use the next three "
                                                  "(default: free ports below the ephemeral range).")] = None,
    async_bandwidth: Annotated[str, typer.Option("--async-bandwidth", help="Bandwidth of the primary -> "
                                                 "async link per second: auto (85% of the rate the first "
                                                 "files need, so the Async site falls behind during the "
                                                 "writes), a size such as 256K, or 0 for unlimited.")
                               ] = "auto",
    async_delay: Annotated[float, typer.Option("--async-delay", help="One-way delay (ms) added on that link: "
                                               "a far Async site (0: none).")] = 30.0,
    keep_up: Annotated[bool, typer.Option("--keep-up/--down", help="Leave the daemons running at the end "
                                          "(default; stop them with `vstore lab down LAB`), or stop them.")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON document on stdout (steps go to stderr).")
                       ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", help="No step lines and no progress bars.")] = False,
    ext4: Annotated[bool, typer.Option("--ext4", help="The kernel's ext4 instead of jfs: the volume attached "
                                       "through FUSE (vstore attach), a loop device, mkfs.ext4; needs root, "
                                       "e2fsprogs and FUSE.")] = False,
) -> None:
    """The whole story in one command: create a provider-mode lab (embodiment 4) in LAB, start its
    daemons with the Async site far away (a loopback relay limits the bandwidth of the primary ->
    async link), write files through jfs with a live progress bar (each one acknowledged only once
    the Sync site has it), kill the primary host's processes with SIGKILL and delete LAB/primary (the
    site is lost), and recover at the Sync site, which copies only the touched files to the Async
    site and becomes the primary.

    The report says what was lost, measured, not assumed: at the Sync site nothing (every acknowledged
    file is read back from C and compared); at the Async site the files still in flight when the
    primary died (read from D before recovery; it may be none if shipping had caught up). Then every
    acknowledged file is read back from the new primary. Exit 1 if anything acknowledged was lost at
    the Sync site or is unreadable at the new primary.

    With the defaults it takes about ten seconds. The lab stays for exploring (`jfs ls lab:LAB /demo`,
    `vstore status LAB`, `vstore failback LAB`); remove it with `vstore lab down LAB && rm -rf LAB`.

    With --ext4 the file system is the kernel's ext4 on a loop device over the attached volume; a file
    counts once its fsync returned; C and D are checked in copies repaired by e2fsck -fy, recovery copies
    the whole volume (there is no jfs log to tell what changed) and the ext4 is mounted read-only at the
    Sync site to read every file back. Every mount and loop device it made is removed at the end.

    Example: vstore demo /tmp/demo --files 200   (afterwards: jfs ls lab:/tmp/demo /demo)
    """
    ui = Ui(quiet=quiet, as_json=as_json)
    with user_errors():
        choice = async_bandwidth.strip().lower()
        bandwidth = None if choice in ("auto", "0", "off", "none") else parse_size(async_bandwidth)
        opts = DemoOptions(files=files, file_size=parse_size(file_size), size=parse_size(size),
                           base_port=base_port, async_delay_ms=async_delay, async_bandwidth=bandwidth,
                           auto_bandwidth=AUTO_FRACTION if choice == "auto" else None, keep_up=keep_up)
        try:
            result = run_demo(lab, opts, ui, ext4=ext4)
        except DemoInterrupted as exc:
            die(str(exc), 130)
    if as_json:
        print(json.dumps(result.to_json(), indent=2))
    else:
        print_report(result, ui.console)
    if result.lost_at_sync:
        die(f"{len(result.lost_at_sync)} acknowledged file(s) were lost at the Sync site, which must never "
            "happen (invariant 1); keep the lab for analysis")
    if result.missing_at_new_primary:
        die(f"{len(result.missing_at_new_primary)} acknowledged file(s) are not readable at the new primary; "
            "keep the lab for analysis")
    if result.ext4 and result.ext4.get("problems"):
        die(f"the ext4 demo found: {'; '.join(result.ext4['problems'])}; keep the lab for analysis")


def register(app: typer.Typer) -> None:
    """Add `vstore demo` to a typer app."""
    app.command("demo")(demo_command)
