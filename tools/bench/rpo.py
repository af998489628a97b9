"""Benchmark: the recovery point when Primary and Sync are destroyed together.

A steady load of random 4 KiB writes runs against an in-process lab (provider and mirror modes)
while a shipper runs beside it, either **continuously** (the patent: entries leave as soon as they
exist) or **periodically** every P seconds (the prior art of [0006]-[0013]: the Async site is
updated once per period). At a random moment both the Primary and the Sync site are destroyed;
the acknowledged writes missing at the Async site are counted (each acknowledged write is one entry,
so missing = entries appended - entries applied at D), with the seconds of writes they represent.

Usage: python -m tools.bench.rpo [--trials 20] [--rate 200] [--periods 1,10] [--modes provider,mirror]
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import threading
import time
from pathlib import Path

BS = 4096


def trial(mode: str, period: float | None, rate: float, rng: random.Random) -> tuple[int, float]:
    from vstore.procedures.create import init_lab
    from vstore.procedures.reactions import open_system
    with tempfile.TemporaryDirectory() as tmp:
        lab = Path(tmp) / "lab"
        init_lab(lab, mode=mode, size=16 << 20, spool_capacity=1 << 30)
        system = open_system(lab)
        dev, shipper = system.device(0), system.shipper()
        lock, stop = threading.Lock(), threading.Event()
        acked_at: list[float] = []

        def writer() -> None:
            wrng = random.Random(rng.random())
            payload = wrng.randbytes(BS)
            next_t = time.monotonic()
            while not stop.is_set():
                with lock:
                    if stop.is_set():
                        return
                    dev.write(wrng.randrange(dev.num_blocks), payload)
                    acked_at.append(time.monotonic())
                next_t += 1 / rate
                time.sleep(max(0.0, next_t - time.monotonic()))

        def ship_loop() -> None:
            while not stop.is_set():
                if period is None:
                    time.sleep(0.002)
                else:
                    stop.wait(period)
                with lock:
                    if stop.is_set():
                        return
                    shipper.ship()

        threads = [threading.Thread(target=writer), threading.Thread(target=ship_loop)]
        for t in threads:
            t.start()
        span = period or 1.0
        time.sleep(span + rng.random() * span)  # a random moment, after at least one period
        with lock:  # Primary and Sync destroyed together: nothing more is written or shipped
            stop.set()
            applied = system.journal(system.async_target_site()).applied_seq
            appended = system.entry_log.next_seq - 1
        for t in threads:
            t.join()
        missing = appended - applied
        seconds = (acked_at[-1] - acked_at[applied]) if missing and applied < len(acked_at) else 0.0
        system.close()
        return missing, seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--rate", type=float, default=200.0, help="writes per second")
    ap.add_argument("--periods", default="1,10", help="periodic-copy periods in seconds, comma separated")
    ap.add_argument("--modes", default="provider,mirror")
    args = ap.parse_args()
    rng = random.Random(2026)
    periods: list[float | None] = [None] + [float(p) for p in args.periods.split(",")]
    print(f"{args.trials} trials each, {args.rate:.0f} random 4 KiB writes/s; Primary and Sync destroyed at a "
          "random moment")
    print(f"{'mode':<9} {'shipping':<14} {'lost writes mean':>17} {'max':>6} {'lost seconds mean':>18}")
    for mode in args.modes.split(","):
        means = {}
        for period in periods:
            results = [trial(mode, period, args.rate, rng) for _ in range(args.trials)]
            lost = [r[0] for r in results]
            secs = [r[1] for r in results]
            label = "continuous" if period is None else f"periodic {period:g}s"
            means[period] = statistics.mean(lost)
            print(f"{mode:<9} {label:<14} {statistics.mean(lost):>17.2f} {max(lost):>6} {statistics.mean(secs):>18.3f}")
        cont = max(means[None], 1e-9)
        for period in periods[1:]:
            print(f"{mode:<9} periodic {period:g}s loses {means[period] / cont:.0f}x more acknowledged writes than "
                  "continuous" + ("   (goal >= 100x at 1 s)" if period == 1.0 else ""))


if __name__ == "__main__":
    main()
