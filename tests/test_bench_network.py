"""Smoke test of the network benchmark: `--quick` runs all three parts against real
daemons and prints numbers. No timing is asserted (the machine is shared and noisy)."""

from __future__ import annotations

import re

import pytest

from tools.bench import network


@pytest.mark.timeout(60)
def test_quick_run_prints_the_three_parts(capsys):
    """`--quick` runs all three parts of the network benchmark and prints a number for every row and
    goal: shipping beside the minimal sender with the same MAC, and the lag at full write rate."""
    network.main(["--quick"])
    out = capsys.readouterr().out
    for part in ("(a) loopback throughput", "(b) async shipping", "(c) 4 KiB sync write latency"):
        assert part in out, out
    number = r"(\d+(?:\.\d+)?)"
    assert re.search(rf"raw TCP, 1 MiB sendall\s+{number} MB/s", out), out
    assert re.search(rf"shipping throughput \(from ready\)\s+{number} MB/s\s+{number}x raw", out), out
    assert re.search(rf"minimal sender/receiver, same MAC and bytes\s+{number} MB/s", out), out
    assert re.search(r"goal \(b\) >= 0.7x the minimal sender: (met|NOT met)", out), out
    assert re.search(r"goal \(b\) >= 0.3x \(a\) raw TCP: (met|NOT met)", out), out
    assert re.search(r"lag at full write rate: \d+ writes .* max \d+", out), out
    for row in ("proxy RTT: raw TCP", "proxy RTT: RPC ping to sync", "app -> primary daemon hop",
                "local 4 KiB write", "sync write: app.write"):
        assert re.search(rf"{re.escape(row)}.*?\s{number}\s+{number}$", out, re.MULTILINE), row
    assert re.search(r"goal: sync write p50 \d+ <= .* us: (met|NOT met)", out), out
