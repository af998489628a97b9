"""`vstore verify LAB`: online verify in the manner of DRBD (issue 7 item 3; DESIGN.md "user surface",
"JSON contract"; invariants 1-3 checked on the real images).

Keeps true:
- Nothing is moved or changed: each side digests its own volume (BLAKE2b per chunk of
  `chunk_blocks` blocks, then per block inside a chunk whose digests differ), and only digests are
  compared, so the cost over a real link is the digests, not the data.
- A difference the replication explains is not reported: for an async pair the blocks that still
  have unshipped entries in the active site's entry log (the target legitimately equals the source
  "up to the confirmed sequence") and, for any pair, the positions recorded in its bitmap while it
  was Suspend (the next Duplex-Pending copies them) are excluded and counted in `skipped_unshipped`.
  Every other differing block is reported, merged into `[first_lba, count]` ranges.
- A pair that cannot be verified (its target site down or gone, the link between the sites cut,
  the initial copy unfinished) is reported with an `error` key, never silently passed.
- Simplex pairs are not verified (nothing is claimed to be equal).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from vstore.blocks.errors import TricopyError
from vstore.net.rpc import VERIFY
from vstore.replication.pairs import Pair, PairKind, PairState
from vstore.replication.registry import split_ref

EXIT_DIFFER = 1
EXIT_UNVERIFIED = 2


def digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


def merge_blocks(lbas: list[int]) -> list[list[int]]:
    """Sorted block numbers -> [[first, count], ...] of adjacent runs."""
    out: list[list[int]] = []
    for lba in sorted(lbas):
        if out and out[-1][0] + out[-1][1] == lba:
            out[-1][1] += 1
        else:
            out.append([lba, 1])
    return out


def excluded_blocks(system: Any, pair: Pair) -> set[int]:
    """Blocks where the target may legitimately differ: unshipped entries and recorded positions."""
    excluded = {lba for first, n in pair.bitmap.ranges() for lba in range(first, first + n)}
    if pair.kind != PairKind.ASYNC:
        return excluded
    try:
        program = system.async_program
    except TricopyError:
        return excluded
    site, volume = split_ref(pair.source)
    if program.source_site == site and volume in program.volume_ids:
        excluded |= program.log.unshipped_blocks(program.volume_ids[volume])
    return excluded


def verify_pair(system: Any, pair: Pair, chunk_blocks: int = 64) -> dict:
    result: dict = {"name": pair.name, "differing_ranges": [], "blocks_compared": 0, "skipped_unshipped": 0}
    src_site, src_vol = split_ref(pair.source)
    dst_site, dst_vol = split_ref(pair.target)
    try:
        if pair.state == PairState.INITIAL_COPYING:
            raise TricopyError("the initial copy has not finished; nothing to compare yet")
        system.network.check(src_site, dst_site)
        src, dst = system.storage(src_site), system.storage(dst_site)
        num_blocks = src.volume(src_vol).device.num_blocks
        if dst.volume(dst_vol).device.num_blocks != num_blocks:
            raise TricopyError(f"{pair.source} and {pair.target} differ in size")
        excluded = excluded_blocks(system, pair)
        bs = src.volume(src_vol).device.block_size
        differing: list[int] = []
        for lba in range(0, num_blocks, chunk_blocks):
            n = min(chunk_blocks, num_blocks - lba)
            a, b = src.host_read(src_vol, lba, n), dst.host_read(dst_vol, lba, n)
            if digest(a) == digest(b):
                continue
            for i in range(n):
                if lba + i in excluded:
                    continue
                if digest(a[i * bs:(i + 1) * bs]) != digest(b[i * bs:(i + 1) * bs]):
                    differing.append(lba + i)
    except TricopyError as exc:
        result["error"] = f"cannot verify {pair.source} -> {pair.target}: {exc}"
        return result
    skipped = sum(1 for lba in excluded if 0 <= lba < num_blocks)
    result.update(differing_ranges=merge_blocks(differing), blocks_compared=num_blocks - skipped,
                  skipped_unshipped=skipped)
    return result


def verify(system: Any, pair_name: str | None = None, chunk_blocks: int = 64) -> list[dict]:
    """Verify every non-Simplex pair (or only `pair_name`); one result dict per pair."""
    if chunk_blocks < 1:
        raise TricopyError("chunk_blocks must be at least 1")
    if pair_name is not None:
        pair = system.registry.get(pair_name)
        if pair.state == PairState.SIMPLEX:
            raise TricopyError(f"pair {pair_name} is Simplex: its volumes are not kept equal, nothing to verify")
        pairs = [pair]
    else:
        pairs = [p for p in system.registry if p.state != PairState.SIMPLEX]
    return [verify_pair(system, p, chunk_blocks) for p in pairs]


def exit_code(results: list[dict]) -> int:
    if any(r["differing_ranges"] for r in results):
        return EXIT_DIFFER
    if any("error" in r for r in results):
        return EXIT_UNVERIFIED
    return 0


def describe_ranges(ranges: list[list[int]], limit: int = 8) -> str:
    parts = [f"{first}" if count == 1 else f"{first}-{first + count - 1}" for first, count in ranges[:limit]]
    if len(ranges) > limit:
        parts.append(f"... ({len(ranges) - limit} more ranges)")
    return ", ".join(parts)


def register(app: typer.Typer) -> None:
    """Add `vstore verify` to a typer app."""

    @app.command("verify")
    def verify_command(
        lab: Annotated[Path, typer.Argument(help="The lab directory.", show_default=False)],
        pair: Annotated[str | None, typer.Option("--pair", help="Verify only this pair (e.g. A->C).")] = None,
        as_json: Annotated[bool, typer.Option("--json", help="One JSON document.")] = False,
    ) -> None:
        """Online verify (like DRBD's): compare per-range digests of every pair's source and target
        without moving the data, and name the block ranges that differ. Blocks with unshipped entries
        or recorded positions are skipped (the target legitimately lags there). Exit 1 when any pair
        differs, 2 when a pair could not be verified, 0 when all are equal.

        Example: vstore verify /tmp/lab --pair B->D --json
        """
        from vstore.cli.commands import daemon_client, open_system, user_errors
        with user_errors():
            client = daemon_client(lab, application=False)
            if client is not None:  # online, while the daemons run: the coordinating one compares
                with client:
                    results = client.call(VERIFY, {"pair": pair})[0]["pairs"]
            else:
                with open_system(lab) as system:
                    results = verify(system, pair)
        code = exit_code(results)
        if as_json:
            print(json.dumps({"pairs": results}, indent=2))
            raise typer.Exit(code)
        out = Console()
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
        raise typer.Exit(code)
