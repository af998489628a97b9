"""`vstore export`: the application's volume over NBD to clients nobody here wrote (qemu-io, nbdinfo,
nbdcopy, qemu-img), with the lab down (in the export's process) and up (through the primary's
daemon); what they write is replicated like any application write (SPEC §6, embodiment 2)."""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import image, vstore
from vstore.daemons.processes import lab_up

pytestmark = pytest.mark.skipif(not (shutil.which("qemu-io") and shutil.which("nbdinfo")),
                                reason="needs qemu-utils and libnbd-bin (apt)")
MiB = 1 << 20


@contextlib.contextmanager
def exported(lab: Path, *args: str) -> Iterator[dict]:
    """`vstore export LAB --json` on a free port, stopped with SIGTERM after the block (exit 0 asserted)."""
    proc = subprocess.Popen([sys.executable, "-m", "vstore.cli", "export", str(lab), "--listen", "127.0.0.1:0",
                             "--json", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    text = ""
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            text += line
            with contextlib.suppress(json.JSONDecodeError):
                doc = json.loads(text)
                break
        else:
            raise AssertionError(f"the export did not start: {proc.stderr.read() if proc.stderr else ''}")
        yield doc
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert not list((lab / "run" / "exports").glob("*.json")), "the export left its status file"


def qemu_io(url: str, *commands: str, ok: bool = True) -> subprocess.CompletedProcess:
    argv = ["qemu-io", "-f", "raw"]
    for c in commands:
        argv += ["-c", c]
    done = subprocess.run([*argv, url], capture_output=True, text=True, timeout=120)
    if ok:
        assert done.returncode == 0 and "error" not in done.stdout.lower() + done.stderr.lower(), done
    return done


def patterns(seed: int, size: int, n: int) -> list[tuple[int, int, int]]:
    """(offset, length, byte) writes at random offsets and lengths, half of them not block-aligned."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        if i % 2:
            off, length = rng.randrange(size - 70000), rng.randrange(1, 70000)
        else:
            off, length = rng.randrange(size // 4096 - 16) * 4096, rng.randrange(1, 16) * 4096
        out.append((off, length, rng.randrange(1, 256)))
    return out


@pytest.mark.parametrize("mode", ["provider", "mirror"])
def test_qemu_io_writes_are_replicated_byte_for_byte(make_lab, mode: str) -> None:
    """Patterns written by qemu-io at random offsets and lengths (aligned and not) read back through
    the export; after the export stops, A holds exactly them, C equals A (sync), and after shipping
    D equals the volume whose entries it receives."""
    lab = make_lab(mode=mode, size=4 * MiB)
    writes = patterns(7, 4 * MiB, 24)
    expect = bytearray(4 * MiB)
    for off, length, byte in writes:
        expect[off:off + length] = bytes([byte]) * length
    with exported(lab) as doc:
        url = doc["url"]
        assert doc["exports"][0]["size_bytes"] == 4 * MiB
        qemu_io(url, *[f"write -P {b} {o} {n}" for o, n, b in writes], "flush")
        last: dict[int, tuple[int, int]] = {}
        for o, n, b in writes:  # read back each write where no later one covers it
            last = {k: v for k, v in last.items() if not (o <= k < o + n)}
            last[o] = (n, b)
        checks = [f"read -P {b} {o} {n}" for o, (n, b) in last.items()
                  if bytes(expect[o:o + n]) == bytes([b]) * n]
        assert checks
        qemu_io(url, *checks)
    assert image(lab, "primary", "A") == bytes(expect)
    assert image(lab, "sync", "C") == bytes(expect)
    vstore("ship", str(lab))
    assert image(lab, "async", "D") == bytes(expect)
    if mode == "mirror":
        assert image(lab, "primary", "B") == bytes(expect)


def test_real_clients_through_the_daemons(daemon_lab, tmp_path: Path) -> None:
    """With the lab up: nbdinfo reports the size and the block size constraints; status --json shows
    the export and its client; a 64 MiB random file copied in with nbdcopy and out again is identical;
    qemu-img convert of the export equals A, and after shipping D equals A."""
    lab = daemon_lab(size=64 * MiB)
    lab_up(lab)
    source = tmp_path / "random.bin"
    source.write_bytes(random.Random(3).randbytes(64 * MiB))
    with exported(lab) as doc:
        url = doc["url"]
        info = json.loads(subprocess.run(["nbdinfo", "--json", url], capture_output=True, text=True,
                                         check=True, timeout=60).stdout)
        export = info["exports"][0]
        assert export["export-size"] == 64 * MiB
        assert export["block_size_minimum"] == 4096 and export["block_size_maximum"] >= 4096
        holder = subprocess.Popen(["qemu-io", "-f", "raw", "-c", "sleep 4000", url],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            for _ in range(40):
                status = json.loads(vstore("status", str(lab), "--json").stdout)
                if status["exports"] and sum(len(e["clients"]) for e in status["exports"][0]["exports"]):
                    break
                subprocess.run(["sleep", "0.2"])
            assert status["exports"][0]["url"] == url
            assert len(status["exports"][0]["exports"][0]["clients"]) == 1
        finally:
            holder.kill()
            holder.wait()
        subprocess.run(["nbdcopy", str(source), url], check=True, timeout=300)
        back = tmp_path / "back.bin"
        subprocess.run(["nbdcopy", url, str(back)], check=True, timeout=300)
        assert back.read_bytes() == source.read_bytes()
        converted = tmp_path / "converted.raw"
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "raw", url, str(converted)], check=True, timeout=300)
        assert converted.read_bytes() == image(lab, "primary", "A") == source.read_bytes()
    assert image(lab, "sync", "C") == source.read_bytes()
    vstore("ship", str(lab))
    assert image(lab, "async", "D") == source.read_bytes()


def test_a_fenced_write_fails_and_changes_no_copy(make_lab) -> None:
    """Protection on and the sync link cut: an NBD WRITE fails with EIO (the fence) and no copy changes."""
    lab = make_lab(size=4 * MiB, protect=True)
    vstore("fail", str(lab), "primary-sync")
    before = {(s, v): image(lab, s, v) for s, v in (("primary", "A"), ("sync", "C"), ("async", "D"))}
    with exported(lab) as doc:
        done = qemu_io(doc["url"], "write -P 9 0 65536", ok=False)
        assert "Input/output error" in done.stdout + done.stderr, done
    assert {(s, v): image(lab, s, v) for s, v in before} == before


def test_bad_export_requests_are_clear_errors(make_lab, tmp_path: Path) -> None:
    """A missing lab, a malformed --listen and a non-loopback address without TLS are one-line
    errors (exit 1, no traceback), and nothing is left listening or written."""
    lab = make_lab()
    for args, words in (([str(tmp_path / "nope")], "does not exist"),
                        ([str(lab), "--listen", "localhost:port"], "HOST:PORT"),
                        ([str(lab), "--listen", "0.0.0.0:0"], "TLS")):
        result = vstore("export", *args, ok=False)
        assert result.exit_code == 1, result.output
        assert words in result.output and "Traceback" not in result.output
    assert not (lab / "run" / "exports").exists() or not os.listdir(lab / "run" / "exports")


def test_a_tls_lab_exports_over_tls_only(make_lab, tmp_path: Path) -> None:
    """A lab made with --tls exports with NBD_OPT_STARTTLS required: nbdinfo over nbds:// with the
    lab's CA and certificate sees the volume; a client without TLS is refused."""
    lab = make_lab(size=4 * MiB, tls=True)
    creds = tmp_path / "creds"
    creds.mkdir()
    tls = tomllib.loads((lab / "topology.toml").read_text())["tls"]  # the lab's CA and certificate
    for name, key in (("ca-cert.pem", "ca"), ("client-cert.pem", "cert"), ("client-key.pem", "key")):
        shutil.copy(lab / tls[key], creds / name)
    with exported(lab) as doc:
        assert doc["tls"] is True
        port = doc["listen"].rsplit(":", 1)[1]
        info = json.loads(subprocess.run(["nbdinfo", "--json", f"nbds://127.0.0.1:{port}/A?tls-certificates={creds}"],
                                         capture_output=True, text=True, check=True, timeout=60).stdout)
        assert info["TLS"] is True and info["exports"][0]["export-size"] == 4 * MiB
        plain = qemu_io(doc["url"], "read 0 512", ok=False)
        assert plain.returncode != 0 and "TLS" in plain.stderr


def test_lab_up_export_serves_until_lab_down(daemon_lab) -> None:
    """`lab up --export` starts the export with the daemons (shown in status --json with its
    requests), qemu-io writes through it reach A and C, and `lab down` stops it first (nothing of
    the lab left running, its status file gone)."""
    lab = daemon_lab(size=4 * MiB)
    port = free_port()
    vstore("lab", "up", str(lab), "--export", "--export-listen", f"127.0.0.1:{port}")
    url = f"nbd://127.0.0.1:{port}/A"
    qemu_io(url, "write -P 5 4096 8192", "flush")
    for _ in range(50):  # the export rewrites its status about once a second
        status = json.loads(vstore("status", str(lab), "--json").stdout)
        if status["exports"] and status["exports"][0]["exports"][0]["requests"].get("write", 0):
            break
        time.sleep(0.1)
    assert [e["url"] for e in status["exports"]] == [url]
    assert status["exports"][0]["exports"][0]["requests"]["write"] >= 1
    result = vstore("lab", "down", str(lab))
    assert "export" in result.stdout
    assert not list((lab / "run" / "exports").glob("*.json"))
    assert image(lab, "primary", "A")[4096:12288] == bytes([5]) * 8192 == image(lab, "sync", "C")[4096:12288]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
