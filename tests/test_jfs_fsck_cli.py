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

from jfs.codecs import bitmap_images
from jfs.fs import FileSystem, open_image
from jfs.fsck import fsck
from jfs.layout import BLOCK_BITMAP_MAGIC
from vstore.blocks.device import BlockDevice, ImageDevice


@pytest.fixture
def populated_image(make_image) -> tuple[Path, dict[str, int]]:
    """A 4 MiB jfs holding /d/f, /d/g and /top; (its path, where the structures to damage are)."""
    path = make_image("c.img", 4 << 20)
    dev = ImageDevice(path)
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


def damage(path: Path, info: dict[str, int], what: str) -> None:
    """Apply one of the CORRUPTIONS to the image file."""
    dev = ImageDevice(path)
    CORRUPTIONS[what](dev, info)
    dev.close()


def flip(dev: BlockDevice, lba: int, offset: int, count: int = 4) -> None:
    raw = bytearray(dev.read(lba))
    for i in range(offset, offset + count):
        raw[i] ^= 0x5A
    dev.write(lba, bytes(raw))


CORRUPTIONS: dict[str, Callable[[BlockDevice, dict[str, int]], None]] = {
    "superblock": lambda dev, i: flip(dev, 0, 12),
    "both superblocks": lambda dev, i: (flip(dev, 0, 12), flip(dev, dev.num_blocks - 1, 12)),
    "inode": lambda dev, i: flip(dev, i["itable"] + i["f"] // 32, (i["f"] % 32) * 128 + 20),
    "directory block": lambda dev, i: flip(dev, i["dirblock"], 30),
    "bitmap": lambda dev, i: flip(dev, i["bbitmap"], 100),
    "log record": lambda dev, i: flip(dev, i["txn"], 40),
}


@pytest.mark.parametrize("what", [w for w in CORRUPTIONS if w != "both superblocks"])
def test_corruption_is_found_repaired_then_clean(populated_image, what: str) -> None:
    """Each kind of damage: fsck -n finds it (4) without writing, repair fixes it (1), a second run is clean (0)."""
    path, info = populated_image
    damage(path, info, what)
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


def test_bitmap_mismatch_with_valid_crc_is_rebuilt(populated_image) -> None:
    """A block bitmap with a valid CRC that marks a used block free is found and rebuilt."""
    path, info = populated_image
    dev = open_image(path)
    fs = FileSystem.mount(dev)
    lba = fs.filemap(info["f"]).data[0]
    fs.bbits.clear(lba)  # pretend a used block is free, then write a valid bitmap
    dev.write(fs.geo.bbitmap_start, bitmap_images(fs.geo, bytes(fs.bbits.bits), BLOCK_BITMAP_MAGIC)[0])
    result = fsck(dev, repair=False)
    assert result.exit_code == 4 and result.problems[0].code == "block-bitmap-mismatch"
    assert fsck(dev, repair=True).exit_code == 1 and fsck(dev).exit_code == 0


@pytest.mark.parametrize("what", ["both superblocks", "directory block", "inode"])
def test_cli_on_corrupt_image_gives_one_sentence(populated_image, what: str, jfs) -> None:
    """The CLI on a damaged image fails with one sentence pointing at fsck; `fsck -n --json` reports the problems."""
    path, info = populated_image
    damage(path, info, what)
    res = jfs("ls", path, "/d", ok=False)
    assert res.exit_code != 0
    assert ("corrupt" in res.stderr or "damaged" in res.stderr) and "fsck" in res.stderr
    assert "Traceback" not in res.output and "mkfs" not in res.stderr  # never advise destroying it
    if what == "both superblocks":
        return  # nothing fsck can start from: the sentence says to restore the volume
    res = jfs("fsck", path, "-n", "--json", ok=False)
    doc = json.loads(res.stdout)
    assert res.exit_code == 4 and doc["exit_code"] == 4
    assert {"code", "message", "fixed"} <= set(doc["problems"][0])


@pytest.fixture
def cli_image(tmp_path: Path, jfs) -> str:
    """A 4 MiB jfs image labelled L, made by `jfs mkfs`."""
    img = str(tmp_path / "x.img")
    jfs("mkfs", img, "--size", "4M", "--label", "L")
    return img


@pytest.fixture
def cli_tree(cli_image: str, tmp_path: Path, jfs) -> tuple[str, Path]:
    """The CLI image after `mkdir -p /a/b`, `write /a/b/f --from FILE`, `write /s` from stdin, `mv /s /a/s`;
    (the image, the source file)."""
    src = tmp_path / "src.bin"
    src.write_bytes(b"\x00\x01hello" * 1000)
    jfs("mkdir", cli_image, "/a/b", "-p")
    jfs("write", cli_image, "/a/b/f", "--from", src)
    jfs("write", cli_image, "/s", input="from stdin")
    jfs("mv", cli_image, "/s", "/a/s")
    return cli_image, src


def test_mkfs_refuses_an_existing_image_without_force(cli_image: str, jfs) -> None:
    """`jfs mkfs` of an existing image is refused, naming --force."""
    res = jfs("mkfs", cli_image, ok=False)
    assert res.exit_code == 1 and "--force" in res.stderr


def test_a_file_written_from_a_file_reads_back_byte_for_byte(cli_tree: tuple[str, Path], jfs) -> None:
    """`jfs read` returns exactly the bytes `jfs write --from` stored, binary included."""
    img, src = cli_tree
    res = jfs("read", img, "/a/b/f")
    assert res.stdout_bytes == src.read_bytes()


def test_ls_and_stat_show_the_moved_file(cli_tree: tuple[str, Path], jfs) -> None:
    """After `mv`, `ls` lists the file and the subdirectory, and `stat --json` gives the size written from stdin."""
    img, _ = cli_tree
    res = jfs("ls", img, "/a")
    assert res.exit_code == 0 and "s" in res.stdout and "b/" in res.stdout
    res = jfs("stat", img, "/a/s", "--json")
    assert json.loads(res.stdout)["size"] == len("from stdin")


def test_log_json_lists_a_record_of_each_operation(cli_tree: tuple[str, Path], jfs) -> None:
    """`jfs log --json` lists records with seq, inode, path, op and blocks, for mkdir, create and rename."""
    img, _ = cli_tree
    res = jfs("log", img, "--json")
    recs = json.loads(res.stdout)["records"]
    assert {"seq", "inode", "path", "op", "blocks"} <= set(recs[0])
    assert {r["op"] for r in recs} >= {"mkdir", "create", "rename"}


def test_rm_of_a_directory_needs_r_and_leaves_a_clean_image(cli_tree: tuple[str, Path], jfs) -> None:
    """`jfs rm` of a non-empty directory is refused without -r, works with it, and fsck --json is then clean."""
    img, _ = cli_tree
    assert jfs("rm", img, "/a", ok=False).exit_code == 1
    jfs("rm", img, "/a", "-r")
    res = jfs("fsck", img, "--json", ok=False)
    assert res.exit_code == 0 and json.loads(res.stdout) == {**json.loads(res.stdout), "exit_code": 0}


@pytest.mark.parametrize("args,needle", [
    (["ls", "{missing}"], "no such image file"),
    (["ls", "{junk}"], "not a jfs image"),
    (["read", "{img}", "/nope"], "no such file"),
    (["write", "{img}", "/big", "--from", "{bigfile}"], "no free blocks"),
    (["mkfs", "{missing}"], "--size"),
])
def test_cli_user_mistakes(tmp_path: Path, args: list[str], needle: str, jfs) -> None:
    """Each user mistake fails with a message naming it, and never with a traceback."""
    img = tmp_path / "x.img"
    jfs("mkfs", img, "--size", "2M")
    (tmp_path / "junk.img").write_bytes(b"j" * 8192)
    (tmp_path / "big.bin").write_bytes(bytes(3 << 20))
    names = {"missing": tmp_path / "none.img", "junk": tmp_path / "junk.img", "img": img,
             "bigfile": tmp_path / "big.bin"}
    res = jfs(*[a.format(**{k: str(v) for k, v in names.items()}) for a in args], ok=False)
    assert res.exit_code not in (0, None) and needle in res.stderr
    assert res.exception is None or isinstance(res.exception, SystemExit)


def test_real_subprocess_on_corrupt_image(populated_image) -> None:
    """As a real process: a damaged superblock and its backup are one line on stderr, exit 1; with
    the backup intact the file reads, with one warning naming the backup, and writes nothing; after
    fsck the file reads back without a word."""
    path, info = populated_image
    good = path.read_bytes()
    damage(path, info, "both superblocks")
    proc = subprocess.run([sys.executable, "-m", "jfs.cli", "read", str(path), "/top"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "both damaged" in proc.stderr and proc.stderr.count("\n") == 1
    path.write_bytes(good)
    damage(path, info, "superblock")
    damaged = path.read_bytes()
    proc = subprocess.run([sys.executable, "-m", "jfs.cli", "read", str(path), "/top"],
                          capture_output=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout == b"t" * 100
    assert b"backup superblock" in proc.stderr and b"Traceback" not in proc.stderr
    assert path.read_bytes() == damaged  # read-only: the backup is used, nothing repaired
    proc = subprocess.run([sys.executable, "-m", "jfs.cli", "fsck", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    proc = subprocess.run([sys.executable, "-m", "jfs.cli", "read", str(path), "/top"],
                          capture_output=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout == b"t" * 100
