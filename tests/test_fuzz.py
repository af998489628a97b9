"""The fuzz targets of tools/fuzz in the suite: every parser of untrusted bytes takes 10,000 mutated
inputs (the seeded mutator, deterministic), every saved crasher stays fixed, and each atheris entry
point runs coverage-guided for a bounded number of inputs (DESIGN invariant 5: bad bytes give a
clear error, no traceback, no hang, nothing written; fsck twice converges)."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from tools.fuzz import TARGETS, harness

ROOT = Path(__file__).resolve().parent.parent
RUNS = harness.env_runs(10_000)
SLICES = {"jfs_image": 4, "jfs_blocks": 2, "spool": 2, "journal": 2, "rpc": 2}  # the slow ones, shared between workers
ATHERIS_RUNS = {"jfs_image": 300}
ATHERIS_DEFAULT_RUNS = 1_000


def target(name: str) -> ModuleType:
    return importlib.import_module(f"tools.fuzz.{name}")


def test_every_target_is_listed():
    """TARGETS names every target module of tools/fuzz, so none is left out of the suite."""
    found = {p.stem for p in (ROOT / "tools" / "fuzz").glob("*.py")} - {"__init__", "harness", "jfsutil"}
    assert found == set(TARGETS)


@pytest.mark.parametrize(("name", "part"), [(n, i) for n in TARGETS for i in range(SLICES.get(n, 1))])
def test_target_survives_mutated_inputs(name: str, part: int):
    """RUNS mutated inputs (split in slices with their own seed) reach only the allowed outcomes,
    and more than one of them (the mutations reach past the first check)."""
    mod = target(name)
    parts = SLICES.get(name, 1)
    seen = harness.fuzz(mod, RUNS // parts, seed=part)
    assert sum(seen.values()) >= RUNS // parts
    assert len(seen) > 1, seen


@pytest.mark.parametrize(("name", "crasher"), [(n, f) for n in TARGETS for f, _ in harness.crashers(n)])
def test_crasher_stays_fixed(name: str, crasher: str):
    """An input that once failed its target (saved under tools/fuzz/crashers) now passes it."""
    data = dict(harness.crashers(name))[crasher]
    with harness.bounded():
        target(name).check(data)


def test_every_crasher_folder_names_a_target():
    """A crasher folder is named after the target that replays it."""
    folders = {p.name for p in harness.CRASHERS_DIR.iterdir() if p.is_dir()}
    assert folders <= set(TARGETS)


@pytest.mark.parametrize("name", TARGETS)
def test_atheris_runs_the_target_coverage_guided(name: str, tmp_path: Path):
    """`python -m tools.fuzz.NAME -atheris_runs=N` runs libFuzzer over the target and ends clean (with
    a fixed seed, so the suite does not pass or fail by chance; runs by hand explore further)."""
    pytest.importorskip("atheris")
    runs = ATHERIS_RUNS.get(name, ATHERIS_DEFAULT_RUNS)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", f"tools.fuzz.{name}", f"-atheris_runs={runs}",
                           f"-artifact_prefix={tmp_path}/", "-timeout=30", "-seed=1"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=170)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"Done {runs} runs" in proc.stderr or f"Done {runs} in" in proc.stderr, proc.stderr[-2000:]
    assert not list(tmp_path.iterdir()), "libFuzzer saved a crash"
