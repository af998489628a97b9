"""Coverage-guided fuzz targets for every parser of untrusted bytes (DESIGN invariant 5: bad bytes
give a clear error and change nothing; SPEC §4 entries, §2 the network, §3 pair state, §8 jfs).

Keeps true: `TARGETS` names every target module of this package; each has `check(data)` (asserts
the outcome for one input, usable from pytest), `seeds()` (valid inputs made by the code itself)
and `main()` (atheris, by hand: `python -m tools.fuzz.entries -atheris_runs=100000`). See README.md.
"""

TARGETS = ("entries", "spool", "journal", "wire", "sitestate", "topology", "pairs", "jfs_blocks", "jfs_image", "rpc",
           "nbd")
