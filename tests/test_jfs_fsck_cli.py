"""Corruption fixtures (superblock, inode, directory block, bitmap, log record): fsck -n returns 4,
repair returns 1, a second run returns 0 (the e2fsprogs idiom); the jfs CLI on images, including
corrupt ones, fails with one clear sentence and never a traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner

from jfs.cli import app
from jfs.codecs import bitmap_images
from jfs.fs import FileSystem, mkfs, open_image
from jfs.fsck import fsck
from jfs.layout import BLOCK_BITMAP_MAGIC
from vstore.blocks.device import BlockDevice, ImageDevice, create_image

runner = CliRunner()


def fixture_image(tmp_path: Path) -> tuple[Path, dict[str, int]]:
    path = tmp_path / "c.img"
    create_image(path, 4 << 20, 4096)
    dev = ImageDevice(path)
    mkfs(dev)
    fs = FileSystem.mount(dev)
    fs.mkdir("/d")
    fs.write_file("/d/f", b"f" * 6000)
    fs.write_file("/d/g", b"g" * 10)
    fs.write_file("/top", b"t" * 100)
    info = {"d": fs.lookup("/d"), "f": fs.lookup("/d/f"),
            "dirblock": fs.filemap(fs.lookup("/d")).data[0],
            "bbitmap": fs.geo.bbitmap_start, "itable": fs.geo.itable_start,
            "txn": fs.geo.log_start + 1 + fs.log.txns[0].off}
    fs.unmount()
    dev.close()
    return path, info


def flip(dev: BlockDevice, lba: int, offset: int, count: int = 4) -> None:
    raw = bytearray(dev.read(lba))
    for i in range(offset, offset + count):
        raw[i] ^= 0x5A
    dev.write(lba, bytes(raw))


CORRUPTIONS: dict[str, Callable[[BlockDevice, dict[str, int]], None]] = {
    "superblock": lambda dev, i: flip(dev, 0, 12),
    "inode": lambda dev, i: flip(dev, i["itable"] + i["f"] // 32, (i["f"] % 32) * 128 + 20),
    "directory block": lambda dev, i: flip(dev, i["dirblock"], 30),
    "bitmap": lambda dev, i: flip(dev, i["bbitmap"], 100),
    "log record": lambda dev, i: flip(dev, i["txn"], 40),
}


@pytest.mark.parametrize("what", list(CORRUPTIONS))
def test_corruption_is_found_repaired_then_clean(tmp_path: Path, what: str) -> None:
    path, info = fixture_image(tmp_path)
    dev = ImageDevice(path)
    CORRUPTIONS[what](dev, info)
    dev.close()
    before = path.read_bytes()
    check = fsck(open_image(path, readonly=True), repair=False)
    assert check.exit_code == 4 and check.problems and not any(p.fixed for p in check.problems)
    assert path.read_bytes() == before  # -n never writes
    dev = open_image(path)
    assert fsck(dev, repair=True).exit_code == 1
    assert fsck(dev, repair=True).exit_code == 0
    fs = FileSystem.mount(dev)
    fs.listdir("/")
    fs.write_file("/after", b"ok")
    fs.unmount()
    assert fsck(dev).exit_code == 0


def test_bitmap_mismatch_with_valid_crc_is_rebuilt(tmp_path: Path) -> None:
    path, info = fixture_image(tmp_path)
    dev = open_image(path)
    fs = FileSystem.mount(dev)
    lba = fs.filemap(info["f"]).data[0]
    fs.bbits.clear(lba)  # pretend a used block is free, then write a valid bitmap
    dev.write(fs.geo.bbitmap_start, bitmap_images(fs.geo, bytes(fs.bbits.bits), BLOCK_BITMAP_MAGIC)[0])
    result = fsck(dev, repair=False)
    assert result.exit_code == 4 and result.problems[0].code == "block-bitmap-mismatch"
    assert fsck(dev, repair=True).exit_code == 1 and fsck(dev).exit_code == 0


@pytest.mark.parametrize("what", ["superblock", "directory block", "inode"])
def test_cli_on_corrupt_image_gives_one_sentence(tmp_path: Path, what: str) -> None:
    path, info = fixture_image(tmp_path)
    dev = ImageDevice(path)
    CORRUPTIONS[what](dev, info)
    dev.close()
    res = runner.invoke(app, ["ls", str(path), "/d"])
    assert res.exit_code != 0
    assert "corrupt" in res.stderr and "fsck" in res.stderr and "Traceback" not in res.output
    res = runner.invoke(app, ["fsck", str(path), "-n", "--json"])
    doc = json.loads(res.stdout)
    assert res.exit_code == 4 and doc["exit_code"] == 4
    assert {"code", "message", "fixed"} <= set(doc["problems"][0])


def test_cli_round_trip_and_json(tmp_path: Path) -> None:
    img = str(tmp_path / "x.img")
    src = tmp_path / "src.bin"
    src.write_bytes(b"\x00\x01hello" * 1000)
    assert runner.invoke(app, ["mkfs", img, "--size", "4M", "--label", "L"]).exit_code == 0
    res = runner.invoke(app, ["mkfs", img])
    assert res.exit_code == 1 and "--force" in res.stderr
    assert runner.invoke(app, ["mkdir", img, "/a/b", "-p"]).exit_code == 0
    assert runner.invoke(app, ["write", img, "/a/b/f", "--from", str(src)]).exit_code == 0
    assert runner.invoke(app, ["write", img, "/s"], input="from stdin").exit_code == 0
    res = runner.invoke(app, ["read", img, "/a/b/f"])
    assert res.stdout_bytes == src.read_bytes()
    assert runner.invoke(app, ["mv", img, "/s", "/a/s"]).exit_code == 0
    res = runner.invoke(app, ["ls", img, "/a"])
    assert res.exit_code == 0 and "s" in res.stdout and "b/" in res.stdout
    res = runner.invoke(app, ["stat", img, "/a/s", "--json"])
    assert json.loads(res.stdout)["size"] == len("from stdin")
    res = runner.invoke(app, ["log", img, "--json"])
    recs = json.loads(res.stdout)["records"]
    assert {"seq", "inode", "path", "op", "blocks"} <= set(recs[0])
    assert {r["op"] for r in recs} >= {"mkdir", "create", "rename"}
    assert runner.invoke(app, ["rm", img, "/a"]).exit_code == 1
    assert runner.invoke(app, ["rm", img, "/a", "-r"]).exit_code == 0
    res = runner.invoke(app, ["fsck", img, "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout) == {**json.loads(res.stdout), "exit_code": 0}


@pytest.mark.parametrize("args,needle", [
    (["ls", "{missing}"], "no such image file"),
    (["ls", "{junk}"], "not a jfs image"),
    (["read", "{img}", "/nope"], "no such file"),
    (["write", "{img}", "/big", "--from", "{bigfile}"], "no free blocks"),
    (["mkfs", "{missing}"], "--size"),
])
def test_cli_user_mistakes(tmp_path: Path, args: list[str], needle: str) -> None:
    img = tmp_path / "x.img"
    runner.invoke(app, ["mkfs", str(img), "--size", "2M"])
    (tmp_path / "junk.img").write_bytes(b"j" * 8192)
    (tmp_path / "big.bin").write_bytes(bytes(3 << 20))
    names = {"missing": tmp_path / "none.img", "junk": tmp_path / "junk.img", "img": img,
             "bigfile": tmp_path / "big.bin"}
    res = runner.invoke(app, [a.format(**{k: str(v) for k, v in names.items()}) for a in args])
    assert res.exit_code not in (0, None) and needle in res.stderr
    assert res.exception is None or isinstance(res.exception, SystemExit)


def test_real_subprocess_on_corrupt_image(tmp_path: Path) -> None:
    path, info = fixture_image(tmp_path)
    dev = ImageDevice(path)
    CORRUPTIONS["superblock"](dev, info)
    dev.close()
    proc = subprocess.run([sys.executable, "-m", "jfs.cli", "read", str(path), "/top"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("jfs: superblock") and proc.stderr.count("\n") == 1
    proc = subprocess.run([sys.executable, "-m", "jfs.cli", "fsck", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    proc = subprocess.run([sys.executable, "-m", "jfs.cli", "read", str(path), "/top"],
                          capture_output=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout == b"t" * 100
