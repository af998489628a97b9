"""Fuzz target: a whole jfs volume with fuzzed bytes, through mount, listing and reading, the
touched-files scan, and fsck run twice (SPEC §8 [0160]-[0173]; DESIGN "JFS", invariant 5; the
e2fsprogs "run it twice" idiom).

Keeps true for every input (a small valid image with edits applied):
- A read-only mount, the scan and `fsck -n` return or raise project errors, never anything else,
  never loop, and never write to the volume. Listing and reading a mounted tree ends.
- With field edits that leave one superblock alone, `fsck` with repair corrects everything.
- `fsck` with repair then reports what it found; when it says everything was corrected (exit 0
  or 1), a second `fsck -n` finds the volume clean (exit 0), `fsck -n` before the repair found
  problems exactly when the repair did, and the repaired volume mounts, lists and reads without
  any error, takes a few more operations (running out of space or log is allowed), and is
  clean again afterwards.

Input: one flags byte, then edits. Bits 0-1 of the flags choose the image (clean, mounted, crashed
at a commit point); bit 2 recomputes every CRC after the edits (so they reach the checks behind
the checksums). Each edit is a block number (1 byte, modulo the volume's blocks), a byte offset
in it (2 bytes), a length (1 byte) and that many bytes written there. With bit 3 an edit is a
field instead: its index among `jfsutil.field_sites` of the image (2 bytes, modulo their number)
and its new value (8 bytes, cut to the field's width), and the CRCs are always recomputed.

Reads are bounded: a file is read up to the volume's size and at its last byte, since a sparse
file may be far larger than the volume (FORMAT.md "Inode").
"""

from __future__ import annotations

import itertools

from jfs.errors import LogFull, NoSpace
from jfs.fs import FileSystem
from jfs.fsck import EXIT_CLEAN, EXIT_FIXED, FsckResult, fsck
from jfs.scan import LogScan, scan_log
from tools.fuzz import harness, jfsutil
from vstore.blocks.device import MemoryDevice
from vstore.blocks.errors import TricopyError

BS, NBLOCKS = jfsutil.BLOCK_SIZE, jfsutil.NUM_BLOCKS
MAX_ENTRIES = 400  # a listing of the tiny volume never has more
VOLUME_BYTES = BS * NBLOCKS


def image_of(data: bytes) -> bytes:
    """The base image chosen by the flags with the edits applied (and resealed)."""
    return _edited(data)[0]


def _edited(data: bytes) -> tuple[bytes, bool]:
    """(the image, whether fsck must be able to repair it: field edits that left one of the two
    superblocks alone)."""
    flags = data[0] if data else 0
    images = jfsutil.base_images()
    buf = bytearray(images[flags & 3] if flags & 3 < len(images) else images[0])
    pos = 1
    if flags & 8:
        sites = jfsutil.field_sites(bytes(buf), jfsutil.geometry())
        touched = set()
        while pos + 10 <= len(data):
            site = sites[int.from_bytes(data[pos:pos + 2], "little") % len(sites)]
            site.put(buf, int.from_bytes(data[pos + 2:pos + 10], "little"))
            touched.add(site.name.split(".")[0])
            pos += 10
        jfsutil.reseal(buf, jfsutil.geometry())
        return bytes(buf), not {"superblock", "backup_superblock"} <= touched
    while pos + 4 <= len(data):
        lba, off, size = data[pos] % NBLOCKS, int.from_bytes(data[pos + 1:pos + 3], "little") % BS, data[pos + 3]
        chunk = data[pos + 4:pos + 4 + size][:BS - off]
        at = lba * BS + off
        buf[at:at + len(chunk)] = chunk
        pos += 4 + size
    if flags & 4:
        jfsutil.reseal(buf, jfsutil.geometry())
    return bytes(buf[:NBLOCKS * BS]), False


def _device(image: bytes) -> MemoryDevice:
    return MemoryDevice(NBLOCKS, BS, data=image)


def read_everything(fs: FileSystem) -> list[TricopyError]:
    """Walk the tree from the root (each directory once), stat every entry and read every file;
    the errors met on the way."""
    errors: list[TricopyError] = []
    seen: set[int] = set()
    todo, count = ["/"], 0
    while todo:
        path = todo.pop()
        entries = harness.rejects(fs.scandir, path)
        if not harness.ok(entries):
            errors.append(entries)  # type: ignore[arg-type]
            continue
        for name, ino, kind in entries:  # type: ignore[union-attr]
            count += 1
            assert count <= MAX_ENTRIES, "the listing does not end"
            child = f"{path.rstrip('/')}/{name}"
            st = harness.rejects(fs.stat, child)
            if not harness.ok(st):
                errors.append(st)  # type: ignore[arg-type]
                continue
            if kind == "dir":
                if ino not in seen:
                    seen.add(ino)
                    todo.append(child)
                continue
            size = st.size  # type: ignore[union-attr]
            got = harness.rejects(fs.read, child, 0, VOLUME_BYTES)
            last = harness.rejects(fs.read, child, size - 1, 1) if size else b""
            if not harness.ok(got) or not harness.ok(last):
                errors.append(got if not harness.ok(got) else last)  # type: ignore[arg-type]
            else:
                assert len(got) == min(size, VOLUME_BYTES), f"{child}: read {len(got)} bytes of {size}"  # type: ignore[arg-type]
                assert len(last) == min(size, 1), f"{child}: no last byte"  # type: ignore[arg-type]
    walked = harness.rejects(lambda: list(itertools.islice(fs.walk("/"), MAX_ENTRIES + 1)))
    if harness.ok(walked):
        assert len(walked) <= MAX_ENTRIES, "FileSystem.walk does not end"  # type: ignore[arg-type]
    else:
        errors.append(walked)  # type: ignore[arg-type]
    return errors


def _read_only(image: bytes) -> str:
    dev = _device(image)
    fs = harness.rejects(FileSystem.mount, dev, readonly=True)
    if not harness.ok(fs):
        result = harness.describe(fs)
    else:
        errors = read_everything(fs)  # type: ignore[arg-type]
        result = f"mounted, {len(errors)} errors" + (f" ({harness.describe(errors[0])})" if errors else "")
    assert bytes(dev.buf) == image, "a read-only mount wrote to the volume"
    scan = harness.rejects(scan_log, dev)
    assert not harness.ok(scan) or isinstance(scan, LogScan)
    assert bytes(dev.buf) == image, "the touched-files scan wrote to the volume"
    return result


def _use(dev: MemoryDevice) -> None:
    """A clean volume mounts, reads without error, takes operations and stays clean."""
    fs = FileSystem.mount(dev)
    errors = read_everything(fs)
    assert not errors, f"a volume fsck found clean fails to read: {errors[0]}"
    for op, *args in (("mkdir", "/fz"), ("write_file", "/fz/f", b"fuzz" * 700), ("write_file", "/n", b"1"),
                      ("rename", "/n", "/fz/n"), ("unlink", "/fz/f"), ("truncate", "/fz/n", 5000)):
        try:
            getattr(fs, op)(*args)
        except (NoSpace, LogFull):
            break  # allowed; the operations after it need what it would have made
    assert not read_everything(fs)
    fs.unmount()
    after = fsck(dev)
    assert after.exit_code == EXIT_CLEAN, f"operations on a clean volume left problems: {_codes(after)}"


def _codes(result: FsckResult) -> list[str]:
    return [f"{p.code}: {p.message}" for p in result.problems]


def outcome(data: bytes) -> str:
    image, repairable = _edited(data)
    result = _read_only(image)
    dev = _device(image)
    dry = fsck(dev, repair=False)
    assert bytes(dev.buf) == image, "fsck -n wrote to the volume"
    first = fsck(dev, repair=True)
    assert not repairable or first.exit_code in (EXIT_CLEAN, EXIT_FIXED), \
        f"fsck left problems of a volume with a good superblock uncorrected: {_codes(first)}"
    if first.exit_code not in (EXIT_CLEAN, EXIT_FIXED):
        return f"{result}; fsck {first.exit_code} {sorted({p.code for p in first.problems})}"
    second = fsck(dev, repair=False)
    assert second.exit_code == EXIT_CLEAN, \
        f"fsck after a repair that fixed everything ({_codes(first)}) still finds {_codes(second)}"
    assert (dry.exit_code == EXIT_CLEAN) == (first.exit_code == EXIT_CLEAN), \
        f"fsck -n says {dry.exit_code} ({_codes(dry)}) but the repair {first.exit_code} ({_codes(first)})"
    _use(dev)
    return f"{result}; fsck {first.exit_code} {sorted({p.code for p in first.problems})}"


def check(data: bytes) -> None:
    outcome(data)


def _edit(lba: int, off: int, chunk: bytes) -> bytes:
    return bytes([lba, *off.to_bytes(2, "little"), len(chunk)]) + chunk


def seeds() -> list[bytes]:
    geo = jfsutil.geometry()
    plain = [bytes([image]) for image in range(3)]
    edits = [_edit(geo.itable_start, 128 + 12, b"\7"),  # the root's link count
             _edit(geo.data_start, 16, b"\0\0\0\0"),  # an entry of the first directory block
             _edit(geo.bbitmap_start, 20, b"\xff\x00"),  # the block bitmap
             _edit(0, 40, b"\1")]  # the superblock (its backup remains)
    fields = [bytes([8 | image]) + (i * 37).to_bytes(2, "little") + (1).to_bytes(8, "little")
              for image in range(3) for i in range(4)]
    return plain + [bytes([4 | image]) + e for image in range(3) for e in edits] + fields


def main() -> None:
    harness.atheris_main("jfs_image", check, seeds())


if __name__ == "__main__":
    main()
