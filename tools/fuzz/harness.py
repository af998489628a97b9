"""What every fuzz target shares: the allowed outcome, the per-input bounds, the seeded mutator that
CI runs, and the atheris entry point run by hand (DESIGN invariant 5: bad bytes give a clear error
and change nothing).

Keeps true:
- `rejects(fn, ...)` is the one statement of the outcome: `fn` returns, or raises one of the
  project's error types (`TricopyError` and its subclasses: `FormatError`, the jfs errors...). Any
  other exception propagates, so the target fails with it.
- `bounded(seconds)` turns an input whose work does not end into `Hang` (a `BaseException`, so the
  code under test cannot swallow it); under atheris libFuzzer's own `-timeout` does that instead.
- `scratch()` is the only directory a file-reading target gives the code under test; after the
  input it must hold nothing but the target's own directory (nothing was written beside it).
- `fuzz(target, runs, seed)` is deterministic for a given seed: it mutates the seeds, the corpus
  files and every input that produced an outcome not seen before, and on a failure saves the input
  under the temporary directory and fails with its path, so it can become a crasher file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
import signal
import sys
import tempfile
import threading
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

from vstore.blocks.errors import TricopyError

FUZZ_DIR = Path(__file__).resolve().parent
CORPUS_DIR = FUZZ_DIR / "corpus"
CRASHERS_DIR = FUZZ_DIR / "crashers"
INPUT_SECONDS = 5.0  # one input's bound in the pytest loop (generous: CI machines are shared)
MAX_INPUT = 1 << 16  # the mutator never grows an input past this
SEP = b"\n--8<--\n"  # splits one input into several files (see `split`)

ALLOWED: tuple[type[BaseException], ...] = (TricopyError,)
T = TypeVar("T")


class Hang(BaseException):
    """An input whose work did not end within its bound."""


_under_atheris = False


@contextmanager
def bounded(seconds: float = INPUT_SECONDS) -> Iterator[None]:
    """Raise `Hang` in the code running inside when it takes longer than `seconds`."""
    if _under_atheris or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum: int, frame: Any) -> None:
        raise Hang(f"one input ran for more than {seconds} s")

    old = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def rejects(fn: Callable[..., T], *args: Any, **kw: Any) -> T | TricopyError:
    """`fn(*args, **kw)`, or the project error it raised (returned, not raised)."""
    try:
        return fn(*args, **kw)
    except ALLOWED as err:
        assert str(err).strip(), f"{type(err).__name__} without a message"
        return err  # type: ignore[return-value]


def ok(value: object) -> bool:
    """Did a `rejects` call succeed?"""
    return not isinstance(value, TricopyError)


@contextmanager
def scratch(name: str = "t") -> Iterator[Path]:
    """A fresh directory `BASE/name` for one input; afterwards BASE must hold only `name`."""
    base = Path(tempfile.mkdtemp(prefix="tricopy-fuzz-"))
    try:
        (base / name).mkdir()
        yield base / name
        stray = sorted(p.name for p in base.iterdir() if p.name != name)
        assert not stray, f"the code under test wrote beside its directory: {stray}"
    finally:
        shutil.rmtree(base, ignore_errors=True)


def split(data: bytes, parts: int) -> list[bytes | None]:
    """`data` cut at `SEP` into exactly `parts` pieces (None for the pieces it lacks)."""
    pieces: list[bytes | None] = list(data.split(SEP, parts - 1))
    return pieces + [None] * (parts - len(pieces))


def join(*pieces: bytes) -> bytes:
    return SEP.join(pieces)


# -- the seeded mutator (CI) ------------------------------------------------------------------------
_INTERESTING = (0, 1, 2, 0x7F, 0x80, 0xFF, 0x100, 0x7FFF, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF, 1 << 32,
                (1 << 63) - 1, (1 << 64) - 1)


def _int_bytes(value: int, width: int, rng: random.Random) -> bytes:
    value &= (1 << (8 * width)) - 1
    return value.to_bytes(width, rng.choice(("big", "little")))


def mutate(data: bytes, rng: random.Random, pool: list[bytes]) -> bytes:
    """A third of the time, when a piece of `data` after its flags byte (see `split`) is JSON, an
    edit of that document's structure (`mutate_json`); otherwise the bytes edited (`mutate_bytes`)."""
    if len(data) > 1 and rng.randrange(3) == 0:
        pieces = data[1:].split(SEP)
        docs = [i for i, piece in enumerate(pieces) if piece[:1] in (b"{", b"[")]
        if docs:
            i = rng.choice(docs)
            edited = mutate_json(pieces[i], rng)
            if edited is not None:
                pieces[i] = edited
                return (data[:1] + SEP.join(pieces))[:MAX_INPUT]
    return mutate_bytes(data, rng, pool)


_JSON_VALUES: tuple[Any, ...] = (None, True, False, 0, -1, 1, 1 << 64, 1.5, float("inf"), float("nan"), "", "x",
                                 "../x", "/", [], {}, [0], {"": None})


def mutate_json(raw: bytes, rng: random.Random) -> bytes | None:
    """One edit of a JSON document's structure: a value replaced (by a value of another type, an
    extreme number, another node of the document, a deep nest), an integer nudged, a key deleted or
    renamed. None when `raw` is not JSON."""
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    nodes: list[tuple[Any, Any]] = []  # (container, key or index)

    def visit(node: Any) -> None:
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        for key, child in items:
            nodes.append((node, key))
            visit(child)

    visit(doc)
    if not nodes:
        return json.dumps(rng.choice(_JSON_VALUES)).encode()
    container, key = rng.choice(nodes)
    value = container[key]
    op = rng.randrange(6)
    if op == 0:
        container[key] = rng.choice(_JSON_VALUES)
    elif op == 1 and isinstance(value, int) and not isinstance(value, bool):
        container[key] = value + rng.choice((-1, 1, -value - 1, 1 << 63))
    elif op == 2 and isinstance(container, dict):
        del container[key]
    elif op == 3 and isinstance(container, dict):
        container[rng.choice(("", "x", f"{key}{key}", str(key).upper()))] = container.pop(key)
    elif op == 4:
        other, other_key = rng.choice(nodes)
        container[key] = json.loads(json.dumps(other[other_key]))
    else:
        nest: Any = value
        for _ in range(rng.choice((2, 50, 900, 990))):
            nest = [nest]
        container[key] = nest
    try:
        return json.dumps(doc).encode()
    except (ValueError, RecursionError):
        return None


def mutate_bytes(data: bytes, rng: random.Random, pool: list[bytes]) -> bytes:
    """1 to 4 random edits of `data`: bit flips, bytes set to random or interesting values, integers
    nudged, ranges inserted, deleted, duplicated, repeated or spliced in from another input of
    `pool`."""
    buf = bytearray(data)
    for _ in range(rng.choice((1, 1, 2, 3, 4))):
        op = rng.randrange(11)
        pos = rng.randrange(len(buf) + 1)
        if op == 0 and buf:
            i = rng.randrange(len(buf))
            buf[i] ^= 1 << rng.randrange(8)
        elif op == 1 and buf:
            buf[rng.randrange(len(buf))] = rng.randrange(256)
        elif op == 2:
            width = rng.choice((1, 2, 4, 8))
            buf[pos:pos + width] = _int_bytes(rng.choice(_INTERESTING) + rng.choice((-1, 0, 0, 1)), width, rng)
        elif op == 3 and buf:
            width = rng.choice((1, 2, 4, 8))
            at = rng.randrange(len(buf))
            order = rng.choice(("big", "little"))
            value = int.from_bytes(bytes(buf[at:at + width]).ljust(width, b"\0"), order)
            value = (value + rng.choice((-16, -2, -1, 1, 2, 16))) % (1 << (8 * width))
            buf[at:at + width] = value.to_bytes(width, order)
        elif op == 4:
            buf[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 9)))
        elif op == 5 and buf:
            end = min(len(buf), pos + rng.randrange(1, 33))
            del buf[pos:end]
        elif op == 6 and buf:
            start = rng.randrange(len(buf))
            chunk = buf[start:start + rng.randrange(1, 65)]
            buf[pos:pos] = chunk
        elif op == 7 and pool:
            other = rng.choice(pool)
            if other:
                start = rng.randrange(len(other))
                chunk = other[start:start + rng.randrange(1, 257)]
                buf[pos:pos + rng.choice((0, len(chunk)))] = chunk
        elif op == 8 and buf:
            del buf[rng.randrange(len(buf) + 1):]
        elif op == 9:
            buf[pos:pos] = rng.choice((SEP, b"\0" * rng.randrange(1, 64), b"\xff" * rng.randrange(1, 16)))
        elif op == 10 and buf:  # a short run repeated: deep nesting, huge numbers, long names
            start = rng.randrange(len(buf))
            buf[pos:pos] = buf[start:start + rng.randrange(1, 5)] * rng.choice((10, 300, 5000))
    return bytes(buf[:MAX_INPUT])


def corpus(name: str) -> list[bytes]:
    """The seed files of a target, `corpus/<name>/*`, in name order."""
    return _files(CORPUS_DIR / name)


def crashers(name: str) -> list[tuple[str, bytes]]:
    """(file name, bytes) of every regression input of a target, `crashers/<name>/*`."""
    folder = CRASHERS_DIR / name
    return [(p.name, p.read_bytes()) for p in sorted(folder.iterdir()) if p.is_file()] if folder.is_dir() else []


def _files(folder: Path) -> list[bytes]:
    return [p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()] if folder.is_dir() else []


def _outcome(outcome: Callable[[bytes], str], data: bytes) -> str:
    """What `outcome` saw, with numbers blurred, for keeping inputs that reach somewhere new."""
    return re.sub(r"[0-9]+", "#", outcome(data))[:200]


def describe(result: object) -> str:
    """The outcome name of a `rejects` result: "ok" or the error's class and message."""
    if isinstance(result, TricopyError):
        message = re.sub(r"/\S*?tricopy-fuzz-[^/\s]*/", "", str(result)[:300])  # the scratch directory
        message = re.sub(r"b'[^']*'|b\"[^\"]*\"", "b'..'", message)  # bytes quoted in construct's errors
        return f"{type(result).__name__}:{re.sub(r'[0-9]+', '#', message)[:60]}"
    return "ok"


def save_failure(name: str, data: bytes) -> Path:
    folder = Path(tempfile.gettempdir()) / "tricopy-fuzz-failures"
    folder.mkdir(exist_ok=True)
    path = folder / f"{name}-{hashlib.sha1(data).hexdigest()[:16]}.bin"
    path.write_bytes(data)
    return path


def run_input(name: str, outcome: Callable[[bytes], str], data: bytes) -> str:
    """One input through a target's `outcome`, bounded; a failure names the file its input was
    saved to."""
    try:
        with bounded():
            return _outcome(outcome, data)
    except (Exception, Hang) as err:
        path = save_failure(name, data)
        raise AssertionError(f"fuzz target {name} failed on {path} ({len(data)} bytes): "
                             f"{type(err).__name__}: {err}\n{traceback.format_exc()}") from None


def fuzz(target: ModuleType, runs: int, seed: int = 0, failures: list[str] | None = None) -> dict[str, int]:
    """`runs` mutated inputs through `target.outcome` (what `check` runs); returns how often each
    outcome was seen. The first failure raises, unless `failures` is given: then each is added to
    it and the loop goes on."""
    name = target.__name__.rsplit(".", 1)[-1]
    rng = random.Random(seed)
    seen: dict[str, int] = {}
    logging.disable(logging.CRITICAL)  # recovery warns about every torn tail it cuts
    try:
        pool = [*target.seeds(), *corpus(name), *(data for _, data in crashers(name))]
        return _loop(name, target, pool, seen, rng, runs, failures)
    finally:
        logging.disable(logging.NOTSET)


def _loop(name: str, target: ModuleType, pool: list[bytes], seen: dict[str, int], rng: random.Random,
          runs: int, failures: list[str] | None) -> dict[str, int]:
    def one(data: bytes) -> str:
        try:
            return run_input(name, target.outcome, data)
        except AssertionError as err:
            if failures is None:
                raise
            failures.append(str(err))
            return "failure"

    for data in list(pool):
        key = one(data)
        seen[key] = seen.get(key, 0) + 1
    for _ in range(runs):
        child = mutate(rng.choice(pool), rng, pool)
        key = one(child)
        if key not in seen and len(pool) < 2000:
            pool.append(child)
        seen[key] = seen.get(key, 0) + 1
    return seen


# -- atheris (by hand) ------------------------------------------------------------------------------
def atheris_main(target_name: str, check: Callable[[bytes], None], seeds: list[bytes]) -> None:
    """libFuzzer over `check`: `python -m tools.fuzz.<target> [-atheris_runs=N] [libFuzzer flags]
    [CORPUS_DIR...]`. Without a corpus directory, a temporary one is filled with the seeds, the
    corpus files and the crashers; crash files go to a temporary directory unless
    `-artifact_prefix=` says otherwise. Both paths are printed."""
    import atheris  # the optional fuzzing engine (the `test` extra)

    global _under_atheris
    _under_atheris = True
    work = Path(tempfile.mkdtemp(prefix=f"tricopy-atheris-{target_name}-"))
    args = list(sys.argv)
    if not any(not a.startswith("-") for a in args[1:]):
        seed_dir = work / "corpus"
        seed_dir.mkdir()
        for data in [*seeds, *corpus(target_name), *(d for _, d in crashers(target_name))]:
            (seed_dir / hashlib.sha1(data).hexdigest()).write_bytes(data)
        args.append(str(seed_dir))
    if not any(a.startswith("-artifact_prefix=") for a in args):
        args.append(f"-artifact_prefix={work}/")
    if not any(a.startswith("-max_len=") for a in args):
        args.append(f"-max_len={MAX_INPUT}")
    print(f"tricopy fuzz {target_name}: corpus and crash files under {work}", file=sys.stderr)

    logging.disable(logging.CRITICAL)
    atheris.instrument_all()
    atheris.Setup(args, check)
    atheris.Fuzz()


def seal_crc(buf: bytearray, start: int, end: int, crc: Callable[[bytes], int], order: str) -> None:
    """Write the CRC of `buf[start:end]` into the 4 bytes at `end` (when they exist)."""
    if 0 <= start <= end and end + 4 <= len(buf):
        buf[end:end + 4] = crc(bytes(buf[start:end])).to_bytes(4, order)  # type: ignore[arg-type]


def env_runs(default: int) -> int:
    """The fuzz loop's length: TRICOPY_FUZZ_RUNS when set, else `default`."""
    return int(os.environ.get("TRICOPY_FUZZ_RUNS", default))
