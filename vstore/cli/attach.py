"""`vstore attach` and `vstore detach` (SPEC §6 [0133]-[0135], embodiment 2): a lab's volume as one
file `MOUNTPOINT/A` through FUSE, for a loop device and a kernel file system on it.

Keeps true:
- Every mistake the caller can see before mounting (a missing lab, a mountpoint that is not an
  empty directory or is mounted, FUSE missing, a lab whose volume has a writer) is one sentence
  and exit 1, in the calling process, before anything is mounted.
- Without `--foreground` the command starts the attach process (this command with
  `--foreground`, in its own session, logging to `jfs.mounts`' log beside its state file) and
  returns once the mount is live; `vstore detach` unmounts it and returns once that process has
  flushed the volume, saved the lab and exited. `--foreground` serves in this process until
  unmounted or Ctrl-C / SIGTERM.
- `lab:LAB` (no `--site`) is the application's volume, writable unless `--readonly`; `--site S`
  attaches that site's copy read-only, named after its letter (`C` at sync, `D` at async).
- `--json` prints one document on stdout, once the mount is live: lab, target, mountpoint, file,
  volume, site, size_bytes, block_size, readonly, through ("process" or "daemons"), pid.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from jfs.fuse import fuse_available
from jfs.mounts import read_state, start_background, state_path
from vstore.blocks.device import BlockDevice
from vstore.blocks.errors import TricopyError
from vstore.blocks.holders import acting_as
from vstore.cli.common import JsonOption, LabArg, out, user_errors
from vstore.exports.attach import check_empty_dir, detach, serve
from vstore.lab.topology import SITE_LETTERS, SITE_NAMES
from vstore.targets import LabDevice, open_lab

MountpointArg = Annotated[Path, typer.Argument(help="An empty directory; the volume appears in it as one file.",
                                               show_default=False)]


def volume_file(site: str | None) -> str:
    """The attached file's name: `A` for the application's volume, else the site's volume letter."""
    return "A" if site is None else SITE_LETTERS[site][0]


def describe(lab: Path, target: str, mp: Path, site: str | None, device: BlockDevice, *,
             readonly: bool) -> dict[str, Any]:
    """The document `--json` prints (without the pid, which the serving process adds)."""
    name = volume_file(site)
    return {"lab": str(lab), "target": target, "mountpoint": str(mp), "file": str(mp / name), "volume": name,
            "site": site, "size_bytes": device.size_bytes, "block_size": device.block_size, "readonly": readonly,
            "through": "process" if isinstance(device, LabDevice) else "daemons"}


def attach_command(
    lab: LabArg,
    mountpoint: MountpointArg,
    site: Annotated[str | None, typer.Option("--site", help="Attach this site's copy (primary, sync, async), "
                                                            "read-only.")] = None,
    readonly: Annotated[bool, typer.Option("--readonly", help="Refuse every write (EROFS).")] = False,
    foreground: Annotated[bool, typer.Option("--foreground", help="Serve in this process until detached "
                                                                  "(Ctrl-C detaches).")] = False,
    as_json: JsonOption = False,
) -> None:
    """Attach the lab's application volume as one file MOUNTPOINT/A through FUSE: every write to it is
    replicated (sync copy to C, an entry for D), fsync makes it durable on A, C and the spool. Put a loop
    device and a file system on it; `vstore detach MOUNTPOINT` ends it.

    Example: vstore attach /tmp/lab /mnt/vol && losetup --find --show /mnt/vol/A
    """
    with user_errors():
        if site is not None and site not in SITE_NAMES:
            raise TricopyError(f"unknown site {site!r}; use one of {', '.join(SITE_NAMES)}")
        why = fuse_available()
        if why is not None:
            raise TricopyError(why)
        check_empty_dir(mountpoint)
        mp, lab = mountpoint.resolve(), Path(os.path.abspath(lab))  # libfuse and the child run elsewhere
        target = f"lab:{lab}" + (f"@{site}" if site else "")
        writable = site is None and not readonly
        if not foreground:
            open_lab(target, writable=False).close()  # a bad lab, or a volume in use, fails here in the caller
            argv = [sys.executable, "-m", "vstore.cli", "attach", str(lab), str(mp), "--foreground"]
            argv += ["--site", site] if site else []
            argv += ["--readonly"] if readonly else []
            try:
                pid = start_background(argv, mp)
            except TricopyError as exc:
                raise TricopyError(str(exc).removeprefix("error: ")) from None
            doc = {**(read_state(mp) or {}), "pid": pid}
            if as_json:
                sys.stdout.write(json.dumps(doc) + "\n")
            else:
                out.print(f"attached {target} as {mp / volume_file(site)}; detach with: vstore detach {mp}",
                          highlight=False, soft_wrap=True)
            return
        with acting_as(f"attached at {mp}", mountpoint=str(mp), lasting=True,
                       release=f"detach it first: vstore detach {mp}"):
            device = open_lab(target, writable=writable)
        try:
            doc = describe(lab, target, mp, site, device, readonly=not writable)

            def ready() -> None:
                if as_json:
                    sys.stdout.write(json.dumps({**doc, "pid": os.getpid()}) + "\n")
                    sys.stdout.flush()

            serve(device, mp, volume_file(site), readonly=not writable, cache=site is None,
                  state=state_path(mp), on_ready=ready, describe=doc)
        finally:
            device.close()


def detach_command(mountpoint: MountpointArg, as_json: JsonOption = False) -> None:
    """Detach a volume `vstore attach` attached: unmount it and wait until its process has flushed it and
    saved the lab. Detach the loop devices on its file first (losetup -d).

    Example: vstore detach /mnt/vol
    """
    with user_errors():
        note = detach(mountpoint)
    if as_json:
        sys.stdout.write(json.dumps({"mountpoint": str(mountpoint.resolve()), "detached": True, "note": note}) + "\n")
    else:
        out.print(note, highlight=False)


def register(app: typer.Typer) -> None:
    """Add `vstore attach` and `vstore detach` to a typer app."""
    app.command("attach")(attach_command)
    app.command("detach")(detach_command)
