"""Waking on file changes under a lab directory: the one watchdog handler (DESIGN "Process model":
no busy polling).

Keeps true: `watching(path, notify)` calls `notify()` (from watchdog's thread) whenever a file under
`path` is written, created, removed or moved, and never for events that reading causes (opened,
closed), for a directory's own modification time, or for the lab lock `.lock` (taking it is not a
change). Callers still wake on a timer as well: an event may be coalesced or lost, never invented.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

CHANGES = frozenset({"modified", "created", "deleted", "moved"})


class Wake(FileSystemEventHandler):
    """watchdog handler: `notify()` on a change (see the module docstring)."""

    def __init__(self, notify: Callable[[], object]) -> None:
        self.notify = notify

    def on_any_event(self, event: FileSystemEvent) -> None:
        if is_change(event):
            self.notify()


def is_change(event: FileSystemEvent) -> bool:
    if event.event_type not in CHANGES:  # opened/closed: a reader's own reads would wake it forever
        return False
    if event.is_directory and event.event_type == "modified":
        return False
    paths = [str(event.src_path), str(getattr(event, "dest_path", "") or "")]
    return not all(p.endswith(".lock") or not p for p in paths)


@contextlib.contextmanager
def watching(path: Path, notify: Callable[[], object], *, recursive: bool = False) -> Iterator[None]:
    """Call `notify()` on every change under `path` while the block runs."""
    observer = Observer()
    observer.schedule(Wake(notify), str(path), recursive=recursive)
    observer.start()
    try:
        yield
    finally:
        observer.stop()
        observer.join()
