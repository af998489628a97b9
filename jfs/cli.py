"""`jfs`: the command line of the journaling file system (DESIGN.md "user surface", SPEC §8).

Keeps true:
- Every TARGET goes through `jfs.targets`: an image path, or `PREFIX:...` opened by the kind
  registered for PREFIX (`lab:LAB[@SITE]` from vstore); this module never reads past the prefix.
- A user mistake (missing image, not a jfs image, corrupt image, no space, no such file) prints
  one sentence to stderr and exits non-zero; never a traceback.
- `--json` prints exactly one JSON document on stdout with the keys of the JSON contract.
- A command that writes (and `mkfs --force`, `fsck` without -n, a mount) holds its volume's
  claim, refused at once while another writer has it (a mount, another command), naming that
  holder; readers share with readers (`vstore.blocks.holders`).
- `fsck` exits with e2fsck's codes: 0 clean, 1 corrected, 4 left uncorrected, 8 operational error.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.table import Table

from jfs import targets
from jfs.codecs import read_superblock
from jfs.fs import FileSystem, mkfs, probe_image
from jfs.fsck import EXIT_ERROR, Checker, fsck
from jfs.fuse import COMMIT_INTERVAL, fuse_available, serve
from jfs.mounts import as_mount, check_mountpoint, foreground_argv, start_background, state_path, unmount
from jfs.scan import scan_log
from vstore.blocks.device import ImageDevice, create_image
from vstore.blocks.errors import FormatError, TricopyError
from vstore.blocks.units import parse_size

app = typer.Typer(help="jfs: a journaling file system in an image file whose metadata log names the "
                       "files it touched. Example: jfs mkfs disk.img --size 16M && "
                       "echo hi | jfs write disk.img /hello.txt",
                  no_args_is_help=True, add_completion=False)
out = Console()
err = Console(stderr=True)


def fail(message: str, code: int = 1) -> NoReturn:
    err.print(f"jfs: {message}", markup=False, highlight=False, soft_wrap=True)
    raise typer.Exit(code)


@contextmanager
def errors(code: int = 1) -> Iterator[None]:
    try:
        yield
    except TricopyError as exc:
        fail(str(exc), code)
    except OSError as exc:
        fail(f"{exc.filename or ''}: {exc.strerror or exc}".lstrip(": "), code)


@contextmanager
def mounted(target: str, *, writable: bool) -> Iterator[FileSystem]:
    with errors():
        dev = targets.open(target, writable=writable)
        try:
            fs = FileSystem.mount(dev, readonly=not writable, session=False)
            yield fs
            fs.unmount()
        finally:
            dev.close()


@app.command("mkfs")
def mkfs_command(target: str = typer.Argument(..., help="image file to format"),
         size: str | None = typer.Option(None, "--size", help="create the image with this size, e.g. 64M"),
         block_size: int = typer.Option(4096, "--block-size", min=2048, max=65536,
                                        help="block size in bytes (a power of two, 2048-65536)"),
         inodes: int | None = typer.Option(None, "--inodes", min=1, help="number of inodes (at least 1)"),
         label: str = typer.Option("", "--label", help="volume label"),
         uuid: str | None = typer.Option(None, "--uuid", help="volume UUID (random by default)"),
         log_blocks: int | None = typer.Option(None, "--log-blocks", min=1,
                                               help="size of the metadata log in blocks (at least 1)"),
         force: bool = typer.Option(False, "--force", help="overwrite an existing jfs")) -> None:
    """Create a jfs on an image file or a lab volume (lab:LAB). Example: jfs mkfs disk.img --size 16M --label data"""
    with errors():
        path = Path(target)
        if targets.is_prefixed(target):
            mkfs_target(target, label=label, uuid=uuid, inodes=inodes, log_blocks=log_blocks, force=force)
            return
        existed = path.exists()
        if not existed:
            if size is None:
                fail(f"{target} does not exist; give --size (e.g. --size 16M) to create it")
            create_image(path, parse_size(size), block_size)
        elif size is not None and path.stat().st_size != parse_size(size):
            fail(f"{target} exists with another size; remove it or drop --size")
        dev = ImageDevice(path, block_size, claim=True)  # refused while the image is in use (mounted, written)
        try:
            try:
                if existed:
                    probe_image(path)
                    if not force:
                        fail(f"{target} already holds a jfs; add --force to overwrite it")
            except FormatError:
                pass
            mkfs(dev, label=label, uuid=uuid, inodes=inodes, log_blocks=log_blocks)
        finally:
            dev.close()
    out.print(f"created jfs on {target} ({path.stat().st_size} bytes, {block_size}-byte blocks)")


def mkfs_target(target: str, *, label: str, uuid: str | None, inodes: int | None, log_blocks: int | None,
                force: bool) -> None:
    """mkfs on a prefixed target's device (a lab's replicated volume: every block goes through the
    provider or mirror group)."""
    dev = targets.open(target, writable=True)
    try:
        try:
            read_superblock(dev.read(0))
            if not force:
                fail(f"{target} already holds a jfs; add --force to overwrite it")
        except FormatError:
            pass
        mkfs(dev, label=label, uuid=uuid, inodes=inodes, log_blocks=log_blocks)
    finally:
        dev.close()
    out.print(f"created jfs on {target} ({dev.num_blocks * dev.block_size} bytes, {dev.block_size}-byte blocks)")


@app.command("write")
def write_command(target: str, path: str,
          source: Path | None = typer.Option(None, "--from", help="read the content from this file")) -> None:
    """Write a file (whole content, from stdin by default). Example: jfs write disk.img /a.txt --from a.txt"""
    with errors():
        data = source.read_bytes() if source is not None else sys.stdin.buffer.read()
    with mounted(target, writable=True) as fs:
        fs.write_file(path, data)


@app.command("read")
def read_command(target: str, path: str) -> None:
    """Print a file's bytes to stdout. Example: jfs read disk.img /a.txt > a.txt"""
    with mounted(target, writable=False) as fs:
        data = fs.read(path)
    sys.stdout.buffer.write(data)
    sys.stdout.flush()


@app.command("ls")
def ls_command(target: str, path: str = typer.Argument("/", help="directory to list")) -> None:
    """List a directory as a table. Example: jfs ls disk.img /docs"""
    with mounted(target, writable=False) as fs:
        table = Table(title=f"{target}:{path}")
        for col in ("name", "type", "size", "mode", "inode"):
            table.add_column(col, justify="right" if col in ("size", "inode") else "left")
        base = path.rstrip("/")
        for name in fs.listdir(path):
            st = fs.stat(f"{base}/{name}")
            table.add_row(name + ("/" if st.type == "dir" else ""), st.type, str(st.size),
                          oct(st.mode), str(st.ino))
    out.print(table)


@app.command("mkdir")
def mkdir_command(target: str, path: str,
          parents: bool = typer.Option(False, "-p", "--parents", help="create missing parents too")) -> None:
    """Create a directory. Example: jfs mkdir disk.img /docs -p"""
    with mounted(target, writable=True) as fs:
        if not parents:
            fs.mkdir(path)
            return
        parts = [p for p in path.split("/") if p]
        for i in range(1, len(parts) + 1):
            sub = "/" + "/".join(parts[:i])
            if not fs.exists(sub):
                fs.mkdir(sub)


def _remove_tree(fs: FileSystem, path: str) -> None:
    """Remove `path` with everything below it, deepest first (`FileSystem.walk` refuses cycles)."""
    entries = list(fs.walk(path))
    for child, st in reversed(entries):
        if st.type == "dir":
            fs.rmdir(child)
        else:
            fs.unlink(child)
    fs.rmdir(path)


@app.command("rm")
def rm_command(target: str, path: str,
       recursive: bool = typer.Option(False, "-r", "--recursive", help="remove a directory tree")) -> None:
    """Remove a file (or a directory tree with -r). Example: jfs rm disk.img /old -r"""
    with mounted(target, writable=True) as fs:
        if fs.stat(path).type == "dir":
            if not recursive:
                fail(f"{path} is a directory; use -r to remove it with its content")
            _remove_tree(fs, path)
        else:
            fs.unlink(path)


@app.command("mv")
def mv_command(target: str, old: str, new: str) -> None:
    """Rename or move (replacing a file there). Example: jfs mv disk.img /a.txt /docs/a.txt"""
    with mounted(target, writable=True) as fs:
        fs.rename(old, new)


@app.command("stat")
def stat_command(target: str, path: str,
         as_json: bool = typer.Option(False, "--json", help="one JSON document on stdout")) -> None:
    """Show a file's inode. Example: jfs stat disk.img /a.txt"""
    with mounted(target, writable=False) as fs:
        st = fs.stat(path)
    fields = {"path": path, **st.__dict__}
    if as_json:
        out.print_json(json.dumps(fields))
        return
    table = Table(title=f"{target}:{path}", show_header=False)
    for k, v in fields.items():
        table.add_row(k, oct(v) if k == "mode" else str(v))
    out.print(table)


@app.command("fsck")
def fsck_command(target: str,
         no_change: bool = typer.Option(False, "-n", help="check only; never write"),
         as_json: bool = typer.Option(False, "--json", help="one JSON document on stdout"),
         quiet: bool = typer.Option(False, "--quiet", help="no progress display")) -> None:
    """Check and repair (exit 0 clean, 1 corrected, 4 left uncorrected, 8 error). Example: jfs fsck disk.img -n"""
    with errors(EXIT_ERROR):
        dev = targets.open(target, writable=not no_change)
    try:
        if as_json or quiet:
            result = fsck(dev, repair=not no_change)
        else:
            with Progress(TextColumn("fsck {task.description}"), BarColumn(), MofNCompleteColumn(),
                          console=err, transient=True) as bars:
                task = bars.add_task("", total=len(Checker.PASSES))

                started: list[str] = []

                def on_pass(name: str) -> None:
                    bars.update(task, description=name, completed=len(started))
                    started.append(name)

                result = fsck(dev, repair=not no_change, on_pass=on_pass)
                bars.update(task, completed=len(Checker.PASSES))
    finally:
        dev.close()
    if as_json:
        sys.stdout.write(result.dumps() + "\n")
    else:
        for p in result.problems:
            mark = "fixed" if p.fixed else "NOT FIXED"
            out.print(f"[{mark}] {p.code}: {p.message}", markup=False, highlight=False)
        if result.replayed:
            out.print(f"replayed {result.replayed} committed log transaction(s)")
        out.print(f"{target}: " + {0: "clean", 1: "problems corrected", 4: "problems left uncorrected",
                                   8: "operational error"}[result.exit_code])
    raise typer.Exit(result.exit_code)


@app.command("log")
def log_command(target: str, as_json: bool = typer.Option(False, "--json", help="one JSON document on stdout")) -> None:
    """Show the metadata log: which files each record touched. Example: jfs log disk.img --json"""
    with errors():
        dev = targets.open(target, writable=False)
        try:
            scan = scan_log(dev)
        finally:
            dev.close()
    records = [{"seq": r.seq, "inode": r.ino, "path": r.path, "op": r.op,
                "blocks": [list(x) for x in r.ranges]} for r in scan.records]
    if as_json:
        sys.stdout.write(json.dumps({"records": records, "complete": scan.complete,
                                     "problem": scan.problem}) + "\n")
        return
    table = Table(title=f"metadata log of {target}")
    for col in ("seq", "inode", "path", "op", "blocks"):
        table.add_column(col)
    for r in records:
        table.add_row(str(r["seq"]), str(r["inode"]), r["path"] or "?", r["op"],
                      " ".join(f"{a}+{b}" for a, b in r["blocks"]))
    out.print(table)
    if not scan.complete:
        err.print(f"jfs: the log is incomplete: {scan.problem}", markup=False)


@app.command("mount")
def mount_command(target: str = typer.Argument(..., help="image file, lab:LAB, or lab:LAB@sync|@async (read-only)"),
          mountpoint: Path = typer.Argument(..., help="an empty directory"),
          foreground: bool = typer.Option(False, "--foreground", "-f",
                                          help="serve in this process until unmounted (Ctrl-C unmounts)"),
          durable: bool = typer.Option(False, "--durable",
                                       help="image targets: fsync the image at every flush point"),
          commit_interval: float = typer.Option(COMMIT_INTERVAL, "--commit-interval", min=0.05,
                                                help="seconds at most before an operation is durable "
                                                     "(fsync and unmount make it durable at once)")) -> None:
    """Mount a jfs through FUSE; returns once the mount is live. Example: jfs mount disk.img /mnt/disk"""
    with errors():
        why = fuse_available()
        if why is not None:
            fail(why)
        check_mountpoint(mountpoint)
        mountpoint = mountpoint.resolve()
        target = targets.absolute(target)  # libfuse changes the directory to /
        writable = not targets.replica(target)
        if not foreground:
            dev = targets.open(target, writable=False)  # fail here, in the caller, on a bad target or one in use
            dev.close()
            argv = foreground_argv(target, str(mountpoint), durable=durable)
            if commit_interval != COMMIT_INTERVAL:
                argv += ["--commit-interval", repr(commit_interval)]
            start_background(argv, mountpoint)
            out.print(f"mounted {target} at {mountpoint}; unmount with: jfs umount {mountpoint}")
            return
        with as_mount(mountpoint):  # the volume's claim names this mount until it is unmounted
            dev = targets.open(target, writable=writable, durable=durable)
        try:
            serve(dev, mountpoint, readonly=not writable, state=state_path(mountpoint),
                  commit_interval=commit_interval)
        finally:
            dev.close()


@app.command("umount")
def umount_command(mountpoint: Path = typer.Argument(..., help="where a jfs is mounted")) -> None:
    """Unmount a jfs mount and wait until its volume is clean. Example: jfs umount /mnt/disk"""
    with errors():
        out.print(unmount(mountpoint))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
