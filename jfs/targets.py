"""Which block device a jfs TARGET names (SPEC §8, DESIGN.md "user surface").

A TARGET is the path of an image file, or `PREFIX:REST`, where PREFIX names a *target kind*
registered under the Python entry-point group `jfs.targets` (tricopy registers `lab`, whose kind is
`vstore.targets:open_lab_target`). jfs reads only the prefix; what REST means belongs to the kind,
so jfs depends on no package above `vstore.blocks`.

Keeps true:
- An existing file is always an image, even with a colon in its name; so is any TARGET whose part
  before the first colon is not a plain word (`./a:b.img`, `/tmp/a:b`).
- A kind is a callable `kind(target, *, writable) -> BlockDevice`. It may also answer
  `kind.absolute(target) -> str` (the same target, independent of the working directory) and
  `kind.replica(target) -> bool` (it names a read-only replica, mounted read-only); without them a
  target is its own absolute form and is not a replica.
- A prefix no kind is registered for, or a kind that cannot be loaded, is a `TricopyError` of one
  sentence, never a traceback.
- An image opened here holds its claim (`IMG.lock`, `vstore.blocks.holders`) until the device is
  closed: one writer (a mount, a command that writes, mkfs, fsck) or any number of readers. A kind
  guards its own volumes the same way (the `lab` kind: the lab's claim, or the application
  writer's claim through the daemons).
"""

from __future__ import annotations

import functools
import os
import re
from importlib.metadata import EntryPoint, entry_points
from typing import Protocol

from jfs.fs import probe_image
from vstore.blocks.device import BlockDevice, ImageDevice
from vstore.blocks.errors import TricopyError

GROUP = "jfs.targets"
_PREFIXED = re.compile(r"([A-Za-z][A-Za-z0-9_-]*):(.*)", re.DOTALL)


class TargetKind(Protocol):
    """What a registered kind must do: open the device its target names."""

    def __call__(self, target: str, *, writable: bool) -> BlockDevice: ...


def split(target: str) -> tuple[str | None, str]:
    """(prefix, the rest) of a prefixed TARGET; (None, TARGET) for an image path."""
    m = _PREFIXED.fullmatch(target)
    if m is None or (os.path.exists(target) and not os.path.isdir(target)):
        return None, target
    return m.group(1), m.group(2)


@functools.cache
def _registered() -> dict[str, EntryPoint]:
    return {ep.name: ep for ep in entry_points(group=GROUP)}


def kind(prefix: str, target: str) -> TargetKind:
    """The kind registered for `prefix` (TARGET only names the request in an error)."""
    ep = _registered().get(prefix)
    if ep is None:
        known = ", ".join(f"{name}:" for name in sorted(_registered())) or "none is installed"
        raise TricopyError(f"{target}: no opener is registered for {prefix}: targets (entry-point group {GROUP}; "
                           f"known: {known}); to name an image file with a colon, write ./{target}")
    try:
        loaded = ep.load()
    except Exception as exc:  # an installed plug-in that is broken or half-removed
        raise TricopyError(f"{target}: the opener of {prefix}: targets ({ep.value}) cannot be loaded: "
                           f"{type(exc).__name__}: {exc}") from None
    if not callable(loaded):
        raise TricopyError(f"{target}: the opener of {prefix}: targets ({ep.value}) is not callable")
    return loaded  # type: ignore[no-any-return]


def open(target: str, *, writable: bool, durable: bool = False) -> BlockDevice:
    """The block device TARGET names, claimed for writing or for reading (see the module docstring).
    `durable` (image files only): fsync the image at every flush."""
    prefix, _ = split(target)
    if prefix is None:
        block_size, _ = probe_image(target)  # the block size its superblock states
        return ImageDevice(target, block_size, readonly=not writable, durable=durable, claim=True)
    return kind(prefix, target)(target, writable=writable)


def absolute(target: str) -> str:
    """TARGET in a form that means the same from any working directory."""
    prefix, _ = split(target)
    if prefix is None:
        return os.path.abspath(target)
    answer = getattr(kind(prefix, target), "absolute", None)
    return str(answer(target)) if answer is not None else target


def replica(target: str) -> bool:
    """Whether TARGET names a read-only replica (mounted read-only)."""
    prefix, _ = split(target)
    if prefix is None:
        return False
    answer = getattr(kind(prefix, target), "replica", None)
    return bool(answer(target)) if answer is not None else False


def is_prefixed(target: str) -> bool:
    """Whether TARGET goes to a registered (or unknown) kind rather than to an image file."""
    return split(target)[0] is not None
