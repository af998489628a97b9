"""SIGKILL harness for the site daemons (DESIGN "Process model", invariants 2 and 5): a writer sends
writes to distinct blocks through the daemons while one process, chosen at random, is killed at a
random moment and restarted: a site daemon (primary, sync or async), the shipper process, or the
writing host process itself (a separate writer process, SIGKILLed mid-stream; the harness then
carries on writing). Then the lab is checked:

- no acknowledged write is missing at C (the Sync site);
- D (the Async site) is always the primary after a prefix of the acknowledged writes;
- after the restart, shipping resumes with no gap and no entry applied twice (every acknowledged
  write reaches D; the receive journal refuses gaps and duplicates);
- a write in progress at the kill is either fully present or absent (never torn), and the same on
  A, C and D once the lab has settled (a restarted primary re-drives it: vstore/daemons/intent.py);
- at the end A, C and D are identical.

Usage: python -m tools.faults.killer [--runs 100] [--seed 1]
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from vstore.daemons.processes import lab_down, lab_up, running_pid, site_peer, start_site
from vstore.net.client import Peer
from vstore.net.rpc import APP_WRITE, RESYNC, STATUS
from vstore.procedures.create import free_base_port, init_lab

VICTIMS = ("primary", "sync", "async", "shipper", "host")

BS = 4096


def block(i: int) -> bytes:
    return (f"write {i:08d} ".encode() * (BS // 15 + 1))[:BS]


def read_volume(lab: Path, site: str, volume: str, n: int) -> list[bytes]:
    data = (lab / site / f"{volume}.img").read_bytes()
    return [data[i * BS:(i + 1) * BS] for i in range(n)]


def assert_prefix(d: list[bytes], acked: list[int], in_doubt: list[int], victim: str) -> None:
    """D is the primary after a prefix of the acknowledged writes: if it holds acknowledged write j
    it holds every acknowledged write before j; a write in doubt (its ack never came) may be there
    or not; nothing else is there and nothing is torn."""
    doubt = set(in_doubt)
    for i, blk in enumerate(d):
        assert blk in (block(i), bytes(BS)), f"D block {i} torn (victim {victim})"
        assert blk == bytes(BS) or i in acked or i in doubt, f"D holds write {i}, never issued (victim {victim})"
    present = [i for i in acked if d[i] == block(i)]
    if present:
        last = max(present)
        missing = [i for i in acked if i < last and d[i] != block(i)]
        assert not missing, f"D holds write {last} but not earlier acknowledged {missing} (victim {victim})"


def primary_peer(lab: Path) -> Peer:
    return site_peer(lab, "primary")


def writer(lab: Path, first: int, count: int) -> None:
    """The writing host as its own process: write blocks first..first+count-1 in order through the
    primary's daemon, printing each index once its write is acknowledged."""
    with primary_peer(lab) as primary:
        for i in range(first, first + count):
            primary.call(APP_WRITE, {"volume": 0, "lba": i}, block(i))
            print(i, flush=True)


def kill_host_writer(lab: Path, rng: random.Random, first: int, count: int) -> tuple[list[int], int]:
    """Start a writer process and SIGKILL it at a random moment. Returns the writes it saw
    acknowledged and the next index it would have written (possibly in flight at the kill)."""
    proc = subprocess.Popen([sys.executable, "-m", "tools.faults.killer", "--writer", str(lab), "--first",
                             str(first), "--count", str(count)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    wanted = rng.randrange(1, count)
    acked: list[int] = []
    for line in proc.stdout:
        acked.append(int(line))
        if len(acked) >= wanted:
            break
    time.sleep(rng.random() * 0.005)  # the next write is somewhere on its way
    proc.kill()
    rest, _ = proc.communicate()
    acked += [int(x) for x in rest.split()]
    return acked, first + len(acked)


class DaemonKiller(threading.Thread):
    """SIGKILLs `victim` once `acked()` reaches `after` writes, plus a random few milliseconds, so
    the kill lands while a write is in flight (inside the daemon's write path, between its copies)."""

    def __init__(self, lab: Path, victim: str, after: int, delay_s: float, acked: Callable[[], int]) -> None:
        super().__init__(daemon=True)
        self.lab, self.victim, self.after, self.delay_s, self.acked = lab, victim, after, delay_s, acked
        self.done = threading.Event()

    def run(self) -> None:
        while self.acked() < self.after:
            time.sleep(0.0005)
        time.sleep(self.delay_s)
        pid = running_pid(self.lab, self.victim)
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
        self.done.set()


def restart(lab: Path, victim: str, primary: Peer) -> None:
    """Start the killed process again (a restarted Async site first finishes its stored batch; a
    restarted primary re-drives the write in progress at the kill)."""
    running_pid(lab, victim)  # reaps it if it has exited already
    # SIGKILL may not have finished the process yet; without its pid file start_site starts anew
    (lab / "run" / f"{victim}.pid").unlink(missing_ok=True)
    start_site(lab, victim)
    if victim == "sync":  # the fenced pair returns by resync (what `vstore heal` does)
        primary.call(RESYNC)


def run_once(root: Path, rng: random.Random, writes: int = 60, victim: str | None = None) -> str:
    lab = root / f"lab{rng.randrange(10**9)}"
    mode = rng.choice(["provider", "mirror"])
    init_lab(lab, mode=mode, size=256 * BS, base_port=free_base_port())
    lab_up(lab)
    victim = victim or rng.choice(VICTIMS)
    kill_at = rng.randrange(5, writes - 10)
    acked: list[int] = []
    in_doubt: list[int] = []
    primary = primary_peer(lab)
    killer = None
    if victim != "host":
        killer = DaemonKiller(lab, victim, kill_at, rng.random() * 0.006, lambda: len(acked) + len(in_doubt))
        killer.start()
    restarted = False
    try:
        i = 0
        while i < writes:
            if i == kill_at and victim == "host":
                got, i = kill_host_writer(lab, rng, i, 8)
                acked += got
                in_doubt.append(i)  # maybe written, maybe not: never written again
                i += 1
                continue
            if killer is not None and killer.done.is_set() and not restarted:
                restart(lab, victim, primary)
                restarted = True
                assert_prefix(read_volume(lab, "async", "D", writes), acked, in_doubt, victim)
            try:
                primary.call(APP_WRITE, {"volume": 0, "lba": i}, block(i))
                acked.append(i)
            except Exception:  # noqa: BLE001 - the write is in doubt: the daemon died or fenced it
                in_doubt.append(i)
                if killer is not None:
                    killer.done.wait(10)
            i += 1
        if killer is not None:
            killer.join(10)
            if not restarted:
                restart(lab, victim, primary)
        deadline = time.monotonic() + 30
        while True:  # shipping resumes by itself (the shipper process)
            status = primary.call(STATUS)[0]["status"]
            pairs = [(p["name"], p["state"], p["entries_waiting"]) for p in status["pairs"]]
            if all(state == "Duplex" and waiting == 0 for _, state, waiting in pairs):
                break
            assert time.monotonic() < deadline, f"the lab did not settle within 30 s: {pairs} (victim {victim})"
            time.sleep(0.05)
    finally:
        primary.close()
        lab_down(lab)
    c = read_volume(lab, "sync", "C", writes)
    d = read_volume(lab, "async", "D", writes)
    for i in acked:
        assert c[i] == block(i), f"acknowledged write {i} missing at C (victim {victim})"
    for i in in_doubt:
        assert c[i] in (block(i), bytes(BS)), f"write {i} torn at C"
    assert_prefix(d, acked, in_doubt, victim)
    lost = [i for i in acked if d[i] != block(i)]
    assert not lost, f"shipping did not resume: acknowledged writes {lost} never reached D (victim {victim})"
    volumes = [("primary", "A"), ("sync", "C"), ("async", "D")] + ([("primary", "B")] if mode == "mirror" else [])
    copies = {f"{site}:{vol}": read_volume(lab, site, vol, writes) for site, vol in volumes}
    for i in in_doubt:  # whole or absent, and the same everywhere (vstore/intent.py)
        seen = {name: "present" if blocks[i] == block(i) else "absent" for name, blocks in copies.items()}
        assert len(set(seen.values())) == 1, f"write {i} in progress at the kill differs between copies: {seen} " \
                                             f"(victim {victim})"
    differ = [name for name, blocks in copies.items() if blocks != copies["primary:A"]]
    assert not differ, f"{', '.join(differ)} differ from A after the lab settled (victim {victim})"
    return victim


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--writer", type=Path, help=argparse.SUPPRESS)  # the writing host process (internal)
    ap.add_argument("--first", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--count", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.writer:
        writer(args.writer, args.first, args.count)
        return
    rng = random.Random(args.seed)
    victims: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in range(args.runs):
            v = run_once(Path(tmp), rng)
            victims[v] = victims.get(v, 0) + 1
            print(f"run {n + 1}/{args.runs}: killed {v}: ok", flush=True)
    print(f"{args.runs} runs passed; victims: {victims}")


if __name__ == "__main__":
    main()
