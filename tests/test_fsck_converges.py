"""jfs fsck converges and never destroys, and the mount falls back to the backup superblock (SPEC §8
[0160], [0171]; jfs/FORMAT.md). Each case is a damaged field of a small image (tools/fuzz/jfsutil:
clean, mounted and crashed-at-a-commit-point images of one tree, `reseal` recomputing every CRC);
the last test mutates fields of every structure at random (seeded) and checks the whole cycle."""

from __future__ import annotations

import logging
import random
from collections import defaultdict

import pytest

from jfs import layout as L
from jfs.codecs import parse_dir_entries, superblock_at
from jfs.fs import FileSystem, mkfs
from jfs.fsck import EXIT_CLEAN, EXIT_FIXED, EXIT_UNFIXED, FsckResult, fsck
from jfs.logring import BlockView, read_header
from jfs.scan import scan_log
from tools.fuzz import harness, jfsutil
from tools.fuzz.jfs_image import read_everything
from vstore.blocks.device import MemoryDevice
from vstore.blocks.errors import FormatError

BS, N = jfsutil.BLOCK_SIZE, jfsutil.NUM_BLOCKS
GEO = jfsutil.geometry()
CLEAN, MOUNTED, CRASH = range(3)
B_CONTENT = bytes(range(256)) * 20  # /d/b (inode 5) in every base image


class Device(MemoryDevice):
    """A memory device on which a read outside the volume is a test failure, not an error."""

    def read(self, lba: int, count: int = 1) -> bytes:
        assert 0 <= lba and 0 < count and lba + count <= self.num_blocks, f"read of {lba}+{count}"
        return super().read(lba, count)


def image(which: int) -> bytearray:
    return bytearray(jfsutil.base_images()[which])


def site(buf: bytes, name: str) -> jfsutil.Site:
    return next(s for s in jfsutil.field_sites(bytes(buf), GEO) if s.name == name)


def edited(which: int, **fields: int) -> bytes:
    """A base image with fields (named as in `jfsutil.field_sites`, "." written "__") set, resealed."""
    buf = image(which)
    for name, value in fields.items():
        site(buf, name.replace("__", ".")).put(buf, value)
    jfsutil.reseal(buf, GEO)
    return bytes(buf)


def problems(result: FsckResult) -> list[str]:
    return [f"{p.code}: {p.message}" for p in result.problems]


def read_only_checks(dev: MemoryDevice) -> FsckResult:
    """A read-only mount with every file read (bounded) and `fsck -n` leave the volume as it was;
    returns what `fsck -n` found."""
    before = bytes(dev.buf)
    fs = harness.rejects(FileSystem.mount, dev, readonly=True)
    if harness.ok(fs):
        read_everything(fs)  # type: ignore[arg-type]
    dry = fsck(dev)
    assert bytes(dev.buf) == before, "a read-only mount or fsck -n wrote to the volume"
    return dry


def assert_converges(dev: MemoryDevice) -> FsckResult:
    """fsck repairs everything it finds, a second `fsck -n` is clean, and a mount, a write and an
    unmount keep it clean. Returns the repair's result."""
    first = fsck(dev, repair=True)
    assert first.exit_code in (EXIT_CLEAN, EXIT_FIXED), problems(first)
    second = fsck(dev)
    assert second.exit_code == EXIT_CLEAN, (problems(first), problems(second))
    fs = FileSystem.mount(dev)
    assert not read_everything(fs)
    fs.write_file("/after", b"a" * 3000)
    fs.trim()
    fs.unmount()
    after = fsck(dev)
    assert after.exit_code == EXIT_CLEAN, problems(after)
    return first


def found_then_fixed(buf: bytes) -> Device:
    """`fsck -n` finds a problem without writing, and the repair converges."""
    dev = Device(N, BS, data=buf)
    assert read_only_checks(dev).exit_code == EXIT_UNFIXED
    assert_converges(dev)
    return dev


def test_root_inode_with_a_flipped_bit_is_recreated_in_its_slot() -> None:
    """A corrupt root inode is replaced by an empty root in the same slot, not cleared: the next
    `fsck -n` is clean."""
    buf = image(CLEAN)
    buf[GEO.itable_start * BS + L.ROOT_INO * L.INODE_SIZE + 20] ^= 0x10  # its size, under a stale CRC
    dev = found_then_fixed(bytes(buf))
    blk, off = GEO.inode_location(L.ROOT_INO)
    assert dev.read(blk)[off:off + 2] == b"IN"


@pytest.mark.parametrize(("field", "value"), [
    ("inode_count", 1), ("inode_count", 0), ("inode_count", 16), ("root_ino", 5), ("inode_size", 64),
    ("features", 1), ("state", 9), ("num_blocks", N + 1), ("block_size", 4096), ("itable_blocks", 3),
])
def test_impossible_superblock_never_replaces_the_backup(field: str, value: int) -> None:
    """A well-formed superblock whose values no mkfs makes is not trusted: the mount and fsck use the
    backup, fsck restores block 0 from it and the backup itself is never rewritten."""
    buf = edited(CLEAN, **{f"superblock__{field}": value})
    backup = buf[GEO.backup_sb * BS:]
    dev = Device(N, BS, data=buf)
    with pytest.raises(FormatError):
        superblock_at(dev, 0, "superblock")
    fs = FileSystem.mount(dev, readonly=True)
    assert fs.read("/d/b") == B_CONTENT
    first = fsck(dev, repair=True)
    assert "superblock-corrupt" in {p.code for p in first.problems}
    assert bytes(dev.buf[GEO.backup_sb * BS:]) == backup
    assert superblock_at(dev, 0, "superblock").inode_count == GEO.inode_count
    assert_converges(dev)


def test_superblock_uuid_the_log_contradicts_gives_way_to_the_backup() -> None:
    """When block 0 and its backup are both well-formed but differ, the one the log header agrees
    with is kept: the log (its records, [0171]) survives instead of being reset."""
    dev = Device(N, BS, data=edited(MOUNTED, superblock__uuid=0x1234))
    assert read_only_checks(dev).exit_code == EXIT_UNFIXED
    assert fsck(dev, repair=True).exit_code == EXIT_FIXED
    assert superblock_at(dev, 0, "superblock").uuid == jfsutil.UUID
    scan = scan_log(dev)
    assert scan.complete and scan.records
    assert_converges(dev)


def test_empty_log_whose_tail_and_head_differ_is_found_before_a_write_breaks_it() -> None:
    """An empty log with tail_off != head_off is impossible: the mount refuses it and fsck repairs
    it, after which a write and a second mount work."""
    dev = Device(128, BS)
    mkfs(dev, inodes=32, log_blocks=16)
    view = BlockView(dev)
    geo = L.Geometry.from_superblock(superblock_at(dev, 0, "superblock"))
    head = read_header(view, geo)
    head.tail_off = 5
    dev.write(geo.log_start, head.build(BS))
    with pytest.raises(FormatError, match="impossible"):
        FileSystem.mount(dev)
    assert read_only_checks(dev).exit_code == EXIT_UNFIXED
    assert fsck(dev, repair=True).exit_code == EXIT_FIXED
    fs = FileSystem.mount(dev)
    fs.write_file("/x", b"1")
    fs.unmount()
    assert FileSystem.mount(dev, readonly=True).read("/x") == b"1"
    assert fsck(dev).exit_code == EXIT_CLEAN


@pytest.mark.parametrize(("which", "field", "value"), [
    (MOUNTED, "head_off", 4), (MOUNTED, "head_off", 1), (CLEAN, "checkpoint_seq", 8),
    (MOUNTED, "head_seq", 12), (MOUNTED, "tail_seq", 12), (MOUNTED, "flags", 6),
])
def test_log_header_positions_that_contradict_the_log(which: int, field: str, value: int) -> None:
    """A log header whose head is not where its transactions end, whose checkpoint is not the
    transaction before the head, or whose sequences or flags are impossible: the mount refuses it,
    `fsck -n` reports it, and the repair keeps the transactions found and replays none of them."""
    buf = edited(which, **{f"log_header__{field}": value})
    dev = Device(N, BS, data=buf)
    with pytest.raises(FormatError):
        FileSystem.mount(dev, readonly=True)
    found_then_fixed(buf)


@pytest.mark.parametrize(("home", "value"), [(3, 32), (3, N + 5), (2, 28), (0, 1)])
def test_replay_writes_only_homes_the_records_justify(home: int, value: int) -> None:
    """The committed transaction of the crash image with one home pointed elsewhere (a file's data
    block, past the device, an inode-table block no record names, the log area): it is not a
    committed transaction, so neither mount nor fsck writes its images anywhere."""
    buf = edited(CRASH, **{f"txn@10__homes[{home}]": value})
    dev = Device(N, BS, data=buf)
    fs = FileSystem.mount(dev, readonly=True)
    assert fs.read("/d/b") == B_CONTENT and not fs.exists("/d/last")
    assert read_only_checks(dev).exit_code == EXIT_CLEAN  # an uncommitted tail is no error
    assert fsck(dev, repair=True).exit_code == EXIT_CLEAN
    assert bytes(dev.buf[BS:]) == buf[BS:]  # only block 0 changed: the crashed volume is now clean
    assert_converges(dev)
    assert FileSystem.mount(dev, readonly=True).read("/d/b") == B_CONTENT


@pytest.mark.parametrize(("field", "value"), [
    ("record[0].ino", 0xFFFFFFFF), ("record[0].ino", 0), ("record[0].ino", 32), ("record[0].op", 99),
    ("record[0].range[0].first", N), ("record[0].range[0].count", 0), ("record[0].range[0].count", 1 << 31),
])
def test_log_record_fields_are_checked(field: str, value: int) -> None:
    """A checkpointed transaction whose record names an inode outside the table, an unknown
    operation or a range outside the data area is corrupt: the mount refuses the log (instead of
    the trim failing later), fsck finds it and the repaired volume trims and writes."""
    buf = edited(MOUNTED, **{f"txn@21__{field}": value})
    with pytest.raises(FormatError, match="log"):
        FileSystem.mount(Device(N, BS, data=buf))
    found_then_fixed(buf)


@pytest.mark.parametrize("size", [L.max_file_blocks(BS) * BS + 1, 1 << 63])
def test_file_size_past_the_largest_file(size: int) -> None:
    """A file size above the format's maximum: reading it is a FormatError at once (not a read that
    runs until killed), `fsck -n` reports it, and the repair keeps the file's bytes."""
    buf = edited(CLEAN, inode5__size=size)
    fs = FileSystem.mount(Device(N, BS, data=buf), readonly=True)
    with harness.bounded(), pytest.raises(FormatError, match="size"):
        fs.read("/d/b")
    dev = found_then_fixed(buf)
    assert FileSystem.mount(dev, readonly=True).read("/d/b", 0, len(B_CONTENT)) == B_CONTENT


def dir_block(buf: bytearray, lba: int, entries: list[tuple[str, int, int]]) -> None:
    """Directory block `lba` of `buf` rewritten with `entries` (duplicates and bad names allowed)."""
    owner, _ = parse_dir_entries(BS, bytes(buf[lba * BS:(lba + 1) * BS]), "dir")
    raw = L.build_checked(L.dir_block(BS), dict(count=len(entries), owner=owner, entries=[
        dict(ino=i, type=t, name=n) for n, i, t in entries]))
    buf[lba * BS:(lba + 1) * BS] = raw


E_BLOCK, D_INO, B_INO = 35, 2, 5  # /d/e's directory block; /d and /d/b's inodes


@pytest.mark.parametrize("extra", [("loop", D_INO, L.TYPE_DIR), ("", B_INO, L.TYPE_FILE),
                                   (".", B_INO, L.TYPE_FILE), ("big", B_INO, L.TYPE_FILE)])
def test_directory_cycles_and_bad_names_end_and_are_repaired(extra: tuple[str, int, int]) -> None:
    """/d/e holding an entry back to /d (a cycle), an empty name, "." or a name twice: walking the
    mounted tree ends with a FormatError (never a RecursionError), and fsck removes the entry."""
    buf = image(CLEAN)
    _, entries = parse_dir_entries(BS, bytes(buf[E_BLOCK * BS:(E_BLOCK + 1) * BS]), "dir")
    assert {n for n, _, _ in entries} == {"big", "hole"}
    dir_block(buf, E_BLOCK, [*entries, extra])
    fs = FileSystem.mount(Device(N, BS, data=bytes(buf)), readonly=True)
    with harness.bounded(), pytest.raises(FormatError):
        list(fs.walk("/"))
    dev = found_then_fixed(bytes(buf))
    fs = FileSystem.mount(dev, readonly=True)
    assert fs.listdir("/d/e") == ["big", "hole"] and fs.read("/d/b") == B_CONTENT


def test_corrupt_directory_block_is_dropped_not_overwritten() -> None:
    """A directory block that does not parse is no longer the directory's (its inodes go to
    /lost+found) but fsck leaves its bytes where they are: it never writes a block it gives up."""
    buf = image(CLEAN)
    buf[E_BLOCK * BS + 20] ^= 1
    damaged = bytes(buf[E_BLOCK * BS:(E_BLOCK + 1) * BS])
    dev = Device(N, BS, data=bytes(buf))
    assert read_only_checks(dev).exit_code == EXIT_UNFIXED
    assert fsck(dev, repair=True).exit_code == EXIT_FIXED
    fs = FileSystem.mount(dev, readonly=True)
    assert dev.read(E_BLOCK) == damaged and not fs.bbits.test(E_BLOCK)
    assert fs.listdir("/d/e") == [] and len(fs.listdir("/lost+found")) == 2
    assert_converges(dev)


def test_directory_hole_is_closed_keeping_its_entries() -> None:
    """A directory whose block list has a hole (direct[0] = 0, direct[1] = its block) is repaired by
    closing the hole: every entry stays reachable (before, fsck left it uncorrected forever)."""
    dev = found_then_fixed(edited(CLEAN, **{"inode1__direct[0]": 0, "inode1__direct[1]": 29}))
    fs = FileSystem.mount(dev, readonly=True)
    assert "d" in fs.listdir("/") and fs.read("/d/b") == B_CONTENT


def test_mount_falls_back_to_the_backup_superblock(caplog: pytest.LogCaptureFixture) -> None:
    """A damaged block 0: a read-only mount uses the backup and writes nothing; a read-write mount
    says so in the log and rewrites block 0 from the backup, after which fsck finds nothing."""
    buf = image(CLEAN)
    buf[13] ^= 0xFF  # num_blocks, under a stale CRC
    dev = Device(N, BS, data=bytes(buf))
    assert FileSystem.mount(dev, readonly=True).read("/d/b") == B_CONTENT
    assert bytes(dev.buf) == bytes(buf)
    with caplog.at_level(logging.WARNING, logger="jfs.fs"):
        fs = FileSystem.mount(dev)
    assert "backup superblock" in caplog.text and "replaces it" in caplog.text
    assert superblock_at(dev, 0, "superblock").state == L.STATE_DIRTY
    fs.unmount()
    assert fsck(dev).exit_code == EXIT_CLEAN


def test_mount_of_an_empty_block_0_is_no_file_system() -> None:
    """Block 0 of zeros is no file system yet (mkfs writes it last), even with a backup present."""
    buf = image(CLEAN)
    buf[:BS] = bytes(BS)
    with pytest.raises(FormatError, match="holds no file system"):
        FileSystem.mount(Device(N, BS, data=bytes(buf)))


def _mutated(rng: random.Random) -> bytes:
    """A base image with 1 to 3 fields of its structures set to values worth trying, resealed. The
    kind of structure is chosen first, so the few superblock and log-header fields weigh as much
    as the many inode fields."""
    buf = image(rng.randrange(3))
    groups: dict[str, list[jfsutil.Site]] = defaultdict(list)
    for s in jfsutil.field_sites(bytes(buf), GEO):
        groups[s.name.split(".")[0].split("@")[0].rstrip("0123456789")].append(s)
    for _ in range(rng.choice((1, 1, 2, 3))):
        kind = rng.choice(sorted(groups))
        groups.pop({"superblock": "backup_superblock", "backup_superblock": "superblock"}.get(kind, ""), None)
        s = rng.choice(groups[kind])  # never both superblocks: without either, nothing can be repaired
        value = jfsutil.interesting(s, s.get(buf), GEO, rng.randrange(64)) if rng.randrange(5) \
            else rng.randrange(1 << 8 * s.width)
        s.put(buf, value)
    jfsutil.reseal(buf, GEO)
    return bytes(buf)


@pytest.mark.parametrize("part", range(2))
def test_any_field_of_any_structure_converges(part: int) -> None:
    """For fields of every structure (superblocks, log header, transaction descriptor, homes,
    records and commit, inodes, bitmaps, pointer and directory blocks) mutated with their CRCs
    recomputed: a read-only mount, bounded reads of every file and `fsck -n` never write, read
    outside the volume or hang; `fsck -n` finds something exactly when the repair does; the repair
    leaves `fsck -n` at 0, and so do a mount, a write and an unmount after it."""
    rng = random.Random(part)
    logging.disable(logging.CRITICAL)  # every fallback to the backup superblock warns
    try:
        for _ in range(600):
            buf = _mutated(rng)
            with harness.bounded(10):
                dev = Device(N, BS, data=buf)
                dry = read_only_checks(dev)
                first = assert_converges(dev)
                assert (dry.exit_code == EXIT_CLEAN) == (first.exit_code == EXIT_CLEAN), \
                    (problems(dry), problems(first))
    finally:
        logging.disable(logging.NOTSET)


def test_a_version_1_log_is_refused_by_name_and_fsck_rewrites_it() -> None:
    """A cleanly unmounted volume whose log header is version 1 (the older jfs): the mount refuses
    it with a message naming the version and what to do, fsck rewrites the log as the current
    version, and every file is kept."""
    buf = bytearray(image(CLEAN))
    n = L.LogHeader.sizeof() - 4
    start = GEO.log_start * BS
    buf[start + 4] = 1
    buf[start + n:start + n + 4] = L.crc32(bytes(buf[start:start + n])).to_bytes(4, "little")
    with pytest.raises(FormatError, match="version 1.*jfs fsck"):
        FileSystem.mount(Device(N, BS, data=bytes(buf)))
    dev = found_then_fixed(bytes(buf))
    assert FileSystem.mount(dev, readonly=True).read("/d/b") == B_CONTENT
