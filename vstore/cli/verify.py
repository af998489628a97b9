"""`vstore verify LAB`: online verify in the manner of DRBD (DESIGN.md "Surfaces", "user surface",
"JSON contract"; invariants 1-3 checked on the real images).

Keeps true:
- The comparison is `vstore.reports.verify`, the same one the coordinating daemon runs while the
  lab is up: nothing is moved or changed; each side digests its own volume (BLAKE2b per chunk of
  `chunk_blocks` blocks, then per block inside a chunk whose digests differ; a site's daemon
  answers `vol.digest`), and only digests are compared, so the cost over a real link is the
  digests, not the data.
- A difference the replication explains is not reported: for an async pair the blocks that still
  have unshipped entries in the active site's entry log (the target legitimately equals the source
  "up to the confirmed sequence") and, for any pair, the positions recorded in its bitmap while it
  was Suspend (the next Duplex-Pending copies them) are excluded and counted in `skipped_unshipped`.
  Every other differing block is reported, merged into `[first_lba, count]` ranges.
- A pair that cannot be verified (its target site down or gone, the link between the sites cut,
  the initial copy unfinished) is reported with an `error` key, never silently passed.
- Simplex pairs are not verified (nothing is claimed to be equal).
- `--repair` copies exactly the differing ranges of each Duplex pair source -> target, then verifies
  again and reports that second result, each pair with the `repaired_ranges` it copied. A Suspend
  pair whose positions were lost with damaged spool entries (`verify_first`) is given the
  differential check: only the recorded blocks whose digests differ are copied, and it is resynced.
- `--json` prints `{"pairs": [...]}`; the exit code is 1 when any pair differs, 2 when one could not
  be verified, 0 when all are equal.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from vstore.cli.common import (
    JsonOption,
    LabArg,
    daemon_client,
    open_lab,
    progress_bars,
    quiesced_lab,
    stoppable,
    user_errors,
)
from vstore.lab.system import System
from vstore.net.rpc import VERIFY
from vstore.procedures.setup import repair_pair
from vstore.procedures.steps import StepLog
from vstore.replication.pairs import PairState
from vstore.reports import verify

EXIT_DIFFER = 1
EXIT_UNVERIFIED = 2


def exit_code(results: list[dict]) -> int:
    """1 when any pair differs, else 2 when any could not be verified, else 0."""
    if any(r["differing_ranges"] for r in results):
        return EXIT_DIFFER
    if any("error" in r for r in results):
        return EXIT_UNVERIFIED
    return 0


def describe_ranges(ranges: list[list[int]], limit: int = 8) -> str:
    """`3, 10-12, ... (n more ranges)`: the first `limit` ranges for a table cell."""
    parts = [f"{first}" if count == 1 else f"{first}-{first + count - 1}" for first, count in ranges[:limit]]
    if len(ranges) > limit:
        parts.append(f"... ({len(ranges) - limit} more ranges)")
    return ", ".join(parts)


def print_results(lab: Path, results: list[dict]) -> None:
    """One table row per pair: blocks compared, blocks skipped, and equal / the differing ranges / the error."""
    out = Console()  # made now: it measures the terminal the command runs in
    table = Table(title=f"verify {lab}")
    for col in ("pair", "compared", "skipped (unshipped)", "result"):
        table.add_column(col)
    for r in results:
        if "error" in r:
            verdict = f"[yellow]{r['error']}[/]"
        elif r["differing_ranges"]:
            blocks = sum(n for _, n in r["differing_ranges"])
            verdict = f"[bold red]{blocks} block(s) differ:[/] {describe_ranges(r['differing_ranges'])}"
        else:
            verdict = "[green]equal[/]"
        counts = ("-", "-") if "error" in r else (str(r["blocks_compared"]), str(r["skipped_unshipped"]))
        table.add_row(r["name"], *counts, verdict)
    if not results:
        table.add_row("(no pairs to verify)", "", "", "")
    out.print(table)


def verify_and_repair(system: System, pair: str | None, quiet: bool) -> list[dict]:
    """Verify, copy every differing range of a Duplex pair source -> target, verify again; each
    result names what was copied in `repaired_ranges`."""
    first = verify(system, pair)
    steps = StepLog("repair")
    repaired: dict[str, list[list[int]]] = {}
    with progress_bars(quiet) as progress:
        for result in first:
            target = system.registry.get(result["name"])
            lost_positions = target.verify_first and target.state == PairState.SUSPEND and "error" not in result
            if result["differing_ranges"] or lost_positions:
                ranges = [(f, n) for f, n in result["differing_ranges"]]
                copied = repair_pair(system, target, ranges, steps, progress)
                repaired[result["name"]] = [[f, n] for f, n in copied]
    system.save()
    again = verify(system, pair)
    for result in again:
        result["repaired_ranges"] = repaired.get(result["name"], [])
    return again


def verify_command(
    lab: LabArg,
    pair: Annotated[str | None, typer.Option("--pair", help="Verify only this pair (e.g. A->C).")] = None,
    repair: Annotated[bool, typer.Option("--repair", help="Copy every differing range source -> target, then "
                                         "verify again (the daemons are stopped meanwhile).")] = False,
    as_json: JsonOption = False,
) -> None:
    """Online verify (like DRBD's): compare per-range digests of every pair's source and target
    without moving the data, and name the block ranges that differ. Blocks with unshipped entries
    or recorded positions are skipped (the target legitimately lags there). With --repair, copy
    exactly the differing ranges of each Duplex pair from its source and verify again. Exit 1 when
    any pair differs, 2 when a pair could not be verified, 0 when all are equal.

    Example: vstore verify /tmp/lab --pair B->D --json      (or: vstore verify /tmp/lab --repair)
    """
    with user_errors():
        client = None if repair else daemon_client(lab, application=False)
        if client is not None:  # online, while the daemons run: the coordinating one compares
            with client:
                results = client.call(VERIFY, {"pair": pair})[0]["pairs"]
        elif repair:
            with stoppable(lab), quiesced_lab(lab), open_lab(lab) as system:
                results = verify_and_repair(system, pair, quiet=as_json)
        else:
            with open_lab(lab) as system:
                results = verify(system, pair)
    code = exit_code(results)
    if as_json:
        print(json.dumps({"pairs": results}, indent=2))
    else:
        print_results(lab, results)
    raise typer.Exit(code)


def register(app: typer.Typer) -> None:
    """Add `vstore verify` to a typer app."""
    app.command("verify")(verify_command)
