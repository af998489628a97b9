"""The NBD server with clients nobody here wrote (SPEC §6 [0133]-[0135]): qemu-io, qemu-img,
nbdinfo and nbdcopy against an export of a real image file; what they write is in the image byte
for byte, what they read is the image."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.test_nbd import BS, Counting, serving
from vstore.net.tls import create_lab_certificates, make_ssl_contexts

pytestmark = pytest.mark.skipif(
    not all(shutil.which(tool) for tool in ("qemu-io", "qemu-img", "nbdinfo", "nbdcopy")),
    reason="needs qemu-utils and libnbd-bin (apt)")
MIB = 1 << 20


def run(*args: object, ok: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=300)
    if ok:
        assert proc.returncode == 0, f"{args[0]} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    return proc


def test_qemu_io_patterns_at_random_offsets_land_in_the_image(tmp_path: Path):
    """qemu-io writes seeded patterns at random offsets and lengths, aligned and not (some with
    FUA, some as write-zeroes), and reads each back with `read -P`; the image equals a byte model
    of those writes."""
    rng = random.Random(16)
    with serving(tmp_path, 16 * MIB) as (server, img, _):
        model = bytearray(img.read_bytes())
        writes, reads = [], []
        slot = MIB // 2
        for i in range(32):  # one write per slot, so that reading back each pattern is exact
            aligned = i % 3 == 0
            length = rng.randrange(1, 40) * BS if aligned else rng.randrange(1, 3 * BS + 1000)
            offset = i * slot + (rng.randrange(0, 16) * BS if aligned else rng.randrange(0, slot - length))
            pattern = rng.randrange(1, 256)
            if i % 7 == 3:
                writes += ["-c", f"write -z {offset} {length}"]
                pattern = 0
            else:
                writes += ["-c", f"write {'-f ' if i % 5 == 1 else ''}-P {pattern:#x} {offset} {length}"]
            reads += ["-c", f"read -P {pattern:#x} {offset} {length}"]
            model[offset:offset + length] = bytes([pattern]) * length
        out = run("qemu-io", "-f", "raw", server.url(), *writes, "-c", "flush", *reads).stdout
        assert "failed" not in out.lower(), out[-2000:]
        assert out.count("read ") == 32
        assert img.read_bytes() == model


def test_qemu_io_fua_and_flush_reach_the_device(tmp_path: Path):
    """`write -f` (FUA) from qemu reaches the device's write_fua and qemu-io's `flush` its flush."""
    with serving(tmp_path, wrap=Counting) as (server, _, dev):
        assert isinstance(dev, Counting)
        run("qemu-io", "-f", "raw", server.url(), "-c", f"write -f -P 0x11 0 {BS}")
        assert dev.calls["write_fua"] >= 1
        flushes = dev.calls["flush"]
        run("qemu-io", "-f", "raw", server.url(), "-c", f"write -P 0x22 {BS} {BS}", "-c", "flush")
        assert dev.calls["flush"] > flushes


def test_qemu_io_write_to_a_readonly_export_fails(tmp_path: Path):
    """A read-only export is read-only to qemu: its write fails and the image is unchanged."""
    with serving(tmp_path, readonly=True) as (server, img, _):
        before = img.read_bytes()
        proc = run("qemu-io", "-f", "raw", server.url(), "-c", f"write -P 0x33 0 {BS}", ok=False)
        assert "wrote" not in proc.stdout
        assert img.read_bytes() == before


def test_nbdinfo_shows_size_and_block_size_constraints(tmp_path: Path):
    """nbdinfo --json reports the export's size, minimum block size = the volume's block size,
    a preferred size at least that, the 32 MiB maximum payload, and flush/FUA/zero/trim support."""
    with serving(tmp_path, 8 * MIB) as (server, _, _):
        doc = json.loads(run("nbdinfo", "--json", server.url()).stdout)
        export = doc["exports"][0]
        assert doc["protocol"] == "newstyle-fixed" and export["export-name"] == "A"
        assert export["export-size"] == 8 * MIB
        assert export["block_size_minimum"] == BS and export["block_size_preferred"] >= BS
        assert export["block_size_maximum"] == 32 * MIB
        assert export["can_flush"] and export["can_fua"] and export["can_zero"] and export["can_trim"]
        assert not export["is_read_only"]
        listed = run("nbdinfo", "--list", "--json", server.url()).stdout
        assert [e["export-name"] for e in json.loads(listed)["exports"]] == ["A"]


def test_nbdcopy_of_64_mib_in_and_out_is_identical(tmp_path: Path):
    """nbdcopy of a 64 MiB random file into the export (over several connections) makes the
    image that file, and nbdcopy out of the export gives it back."""
    src, out = tmp_path / "random.bin", tmp_path / "out.bin"
    src.write_bytes(random.Random(64).randbytes(64 * MIB))
    with serving(tmp_path, 64 * MIB) as (server, img, _):
        run("nbdcopy", src, server.url())
        assert img.read_bytes() == src.read_bytes()
        run("nbdcopy", server.url(), out)
        assert out.read_bytes() == src.read_bytes()


def test_qemu_img_convert_equals_the_image(tmp_path: Path):
    """`qemu-img convert -O raw nbd://...` produces a file equal to the exported image."""
    out = tmp_path / "converted.raw"
    with serving(tmp_path, 8 * MIB) as (server, img, _):
        run("qemu-img", "convert", "-f", "raw", "-O", "raw", server.url(), out)
        assert out.read_bytes() == img.read_bytes()


def test_tls_clients_connect_with_the_lab_certificates(tmp_path: Path):
    """With a TLS context the server may listen beyond loopback; nbdinfo over nbds:// and
    qemu-img with x509 credentials connect with the lab's CA and certificate, and a client
    without TLS is told that TLS is required."""
    paths = create_lab_certificates(tmp_path, ["127.0.0.1"])
    cert, key, ca = (tmp_path / paths[k] for k in ("cert", "key", "ca"))
    server_ctx, _ = make_ssl_contexts(cert, key, ca)
    creds = tmp_path / "client"
    creds.mkdir()
    for name, path in (("ca-cert.pem", ca), ("client-cert.pem", cert), ("client-key.pem", key)):
        shutil.copy(path, creds / name)
    with serving(tmp_path, tls=server_ctx) as (server, img, _):
        doc = json.loads(run("nbdinfo", "--json", f"nbds://127.0.0.1:{server.port}/A?tls-certificates={creds}").stdout)
        assert doc["TLS"] is True and doc["exports"][0]["export-size"] == img.stat().st_size
        out = tmp_path / "over-tls.raw"
        run("qemu-img", "convert", "--object", f"tls-creds-x509,id=tls0,dir={creds},endpoint=client",
            "--image-opts", f"driver=nbd,host=127.0.0.1,port={server.port},export=A,tls-creds=tls0",
            "-O", "raw", out)
        assert out.read_bytes() == img.read_bytes()
        plain = run("qemu-io", "-f", "raw", server.url(), "-c", "read 0 512", ok=False)
        assert plain.returncode != 0 and "TLS" in plain.stderr
