"""The lab's running exports, as the status and the dashboard see them (DESIGN "lab layout":
LAB/run/exports/PID.json; SPEC §6 [0133]-[0135], the intermediate server).

Keeps true: each export process (`vstore export`, or the one `lab up --export` starts) owns one
file named by its pid and replaces it atomically (never fsynced: it says what is running now, and a
power cut ends that anyway); `running_exports` lists only files whose process is alive, so a
killed export never shows as running; it reads and never writes or deletes, so a read-only
command may call it. The writer removes its file when it stops.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from vstore.blocks import pids
from vstore.blocks.codec import load_json, make_dir, save_json_atomic
from vstore.blocks.errors import FormatError

EXPORTS_DIR = "run/exports"


def status_file(lab: Path, pid: int | None = None) -> Path:
    return Path(lab) / EXPORTS_DIR / f"{os.getpid() if pid is None else pid}.json"


def save_status(lab: Path, doc: dict) -> None:
    """This process's export status (`doc` gets its pid)."""
    make_dir(Path(lab) / EXPORTS_DIR, parents=True, exist_ok=True)
    save_json_atomic(status_file(lab), {**doc, "pid": os.getpid()}, durable=False)


def remove_status(lab: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        status_file(lab).unlink()


def running_exports(lab: Path) -> list[dict]:
    """The status of every export process of the lab that is alive, by pid."""
    found = []
    folder = Path(lab) / EXPORTS_DIR
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            doc = load_json(path)
        except (OSError, FormatError):
            continue  # replaced or removed while we looked
        pid = doc.get("pid")
        if isinstance(pid, int) and pids.alive(pid):
            found.append(doc)
    return found
