"""fsck: e2fsck-style check and repair of a jfs volume (SPEC §8 [0160], [0171]; DESIGN.md "JFS").

The model is e2fsck: replay the journal, then one pass per kind of structure, each judging what the
passes before it established (which inodes exist, which blocks they own, which names reach them).
It reads the volume only through the shared readers: superblocks and block images through
`jfs.codecs`, pointer trees through `jfs.blockmap.walk`, the log through `jfs.metalog` (the same
`scan_ring` and `replay_committed` as mount), never through a mounted file system.

Keeps true:
- Exit codes are e2fsck's: 0 clean, 1 problems found and all corrected, 4 problems left
  uncorrected (always the case with `-n` when something is wrong), 8 operational error.
- Passes: 0 superblock (and its backup) and 1 log area (`jfs.fsck_log`: a committed log is
  replayed before anything is judged, a dirty log is not an error; with `-n` the replay lives in
  memory and the device is never written), 2 inodes and block ownership (bad and doubly claimed
  blocks, corrupt pointer blocks, impossible sizes), 3 directory blocks, 4 directory entries and
  connectivity to the root (orphans go to /lost+found; a directory reached twice, a cycle, a name
  stored twice or an impossible name loses the entry), 5 link counts, 6 bitmaps against what is
  reachable.
- Repair only does what is safe and converges: it drops what cannot be trusted (a corrupt pointer
  or directory block is left where it is and no longer owned, a bad entry, a second claim on a
  block) and rebuilds what is derived (bitmaps, link counts, block counts, a directory's block list
  and size); it never writes a block it does not own afterwards. When it reports everything
  corrected (exit 1), a second run finds nothing (exit 0).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from jfs import layout as L
from jfs.blockmap import FileMap, store_map, walk
from jfs.codecs import (
    DirBlock,
    Inode,
    bitmap_images,
    fresh_bitmaps,
    parse_dir_entries,
    parse_ptr_block,
    ptr_image,
)
from jfs.errors import NoSpace
from jfs.fsck_log import Abort, Problem, VolumeChecks
from vstore.blocks.device import BlockDevice
from vstore.blocks.errors import FormatError, TricopyError, brief

EXIT_CLEAN, EXIT_FIXED, EXIT_UNFIXED, EXIT_ERROR = 0, 1, 4, 8
LOST_FOUND = "lost+found"


@dataclass
class FsckResult:
    exit_code: int
    problems: list[Problem] = field(default_factory=list)
    replayed: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"exit_code": self.exit_code, "problems": [asdict(p) for p in self.problems],
                "replayed_transactions": self.replayed}

    def dumps(self) -> str:
        return json.dumps(self.to_json())


class Checker(VolumeChecks):
    """Passes 0-1 (`jfs.fsck_log`), then 2-6 here."""

    # -- pass 2: inodes and block ownership ---------------------------------------------------------
    def check_inodes(self) -> None:
        geo = self.geo
        self.inodes: dict[int, Inode] = {}
        self.dirty_inodes: set[int] = set()
        self.cleared: set[int] = set()
        self.owner: dict[int, int] = {}
        self.data: dict[int, list[int]] = {}
        self.maps: dict[int, FileMap] = {}
        self.given_up: set[int] = set()  # blocks dropped as untrustworthy: left as they are, never reused here
        self.ptr_writes: dict[int, bytes] = {}
        for blk in range(geo.itable_blocks):
            raw = self.view.read(geo.itable_start + blk)
            for slot in range(geo.inodes_per_block):
                ino = blk * geo.inodes_per_block + slot
                if ino >= geo.inode_count:
                    break
                chunk = raw[slot * L.INODE_SIZE:(slot + 1) * L.INODE_SIZE]
                try:
                    node = Inode.parse(ino, chunk)
                except FormatError as exc:
                    if self.problem("inode-corrupt", f"{exc.args[0].split(';')[0]}; the inode is cleared"):
                        self.cleared.add(ino)
                    continue
                if node is None:
                    continue
                if ino == 0:
                    if self.problem("inode-reserved", "reserved inode 0 is in use; cleared"):
                        self.cleared.add(0)
                    continue
                self.inodes[ino] = node
        root = self.inodes.get(L.ROOT_INO)
        if root is None or root.type != L.TYPE_DIR:
            if self.problem("root-missing", "the root directory inode is missing or not a directory; "
                            "an empty root is created"):
                now = min(self.sb.mkfs_time_ns, (1 << 63) - 1)  # an inode time is an i64
                self.inodes[L.ROOT_INO] = Inode(L.ROOT_INO, L.TYPE_DIR, 0o755, 2, 1, 0, now, now, now)
                self.dirty_inodes.add(L.ROOT_INO)
                self.cleared.discard(L.ROOT_INO)  # the corrupt slot is replaced, not emptied
            else:
                raise Abort
        for ino in sorted(self.inodes):
            self._walk(self.inodes[ino])

    def _claim(self, node: Inode, lba: int, what: str) -> bool:
        if not self.geo.data_start <= lba < self.geo.data_end:
            self.problem("bad-block-pointer", f"inode {node.ino}: {what} {lba} is outside the data "
                         "area; pointer dropped")
            return False
        if lba in self.owner:
            self.problem("block-claimed-twice", f"inode {node.ino}: {what} {lba} is also claimed by "
                         f"inode {self.owner[lba]}; the second claim is dropped")
            return False
        self.owner[lba] = node.ino
        return True

    def _ptr_block(self, node: Inode, lba: int, level: int) -> list[int] | None:
        """The pointers of a claimed pointer block, or None (the claim is withdrawn) when it is
        corrupt or belongs elsewhere."""
        try:
            v = parse_ptr_block(self.geo.block_size, self.view.read(lba), f"pointer block {lba}")
        except FormatError as exc:
            self.problem("pointer-block-corrupt", f"inode {node.ino}: {exc.args[0].split(';')[0]}; "
                         "the blocks under it are dropped")
            del self.owner[lba]
            self.given_up.add(lba)
            return None
        if v.level != level or v.owner != node.ino:
            self.problem("pointer-block-owner", f"inode {node.ino}: pointer block {lba} belongs to "
                         f"inode {v.owner} level {v.level}; dropped")
            del self.owner[lba]
            self.given_up.add(lba)
            return None
        return list(v.ptrs)

    def _walk(self, node: Inode) -> None:
        """Claim every block `node` points to; a pointer that cannot be trusted is dropped."""
        before = len(self.owner)
        m = walk(self.geo, node, lambda lba, level: self._ptr_block(node, lba, level),
                 lambda lba, what: self._claim(node, lba, what))
        direct = (m.data[:L.N_DIRECT] + [0] * L.N_DIRECT)[:L.N_DIRECT]
        if (direct, m.indirect, m.dindirect) != (node.direct, node.indirect, node.dindirect):
            node.direct, node.indirect, node.dindirect = direct, m.indirect, m.dindirect
            self.dirty_inodes.add(node.ino)
        for lba, (level, ptrs) in m.repaired.items():
            self.ptr_writes[lba] = ptr_image(self.geo.block_size, level, node.ino, ptrs)
        self.data[node.ino] = m.data
        self.maps[node.ino] = m
        limit = L.max_file_blocks(self.geo.block_size) * self.geo.block_size
        if node.type == L.TYPE_FILE and node.size > limit:
            if self.problem("inode-size", f"inode {node.ino} has size {node.size}, more than a file can "
                            f"hold; cut to its last block ({len(m.data) * self.geo.block_size})"):
                node.size = len(m.data) * self.geo.block_size
                self.dirty_inodes.add(node.ino)
        owned = len(self.owner) - before
        if node.nblocks != owned:
            if self.problem("inode-block-count", f"inode {node.ino} says it owns {node.nblocks} blocks "
                            f"but owns {owned}; corrected"):
                node.nblocks = owned
                self.dirty_inodes.add(node.ino)

    # -- pass 3: directories ------------------------------------------------------------------------
    def check_dirs(self) -> None:
        bs = self.geo.block_size
        self.dirs: dict[int, list[DirBlock]] = {}
        self.dir_writes: dict[int, int] = {}  # lba -> owner
        for ino, node in sorted(self.inodes.items()):
            if node.type != L.TYPE_DIR:
                continue
            blocks: list[DirBlock] = []
            data = self.data[ino]
            if 0 in data:
                self.problem("dir-hole", f"directory inode {ino} has a hole in its block list; closed")
            for lba in data:
                if not lba:
                    continue
                try:
                    owner, entries = parse_dir_entries(bs, self.view.read(lba), f"directory block {lba}")
                    if owner != ino:
                        raise FormatError(f"directory block {lba} belongs to inode {owner}")
                except FormatError as exc:
                    self.problem("dir-block-corrupt", f"directory inode {ino}: {exc.args[0].split(';')[0]}; "
                                 "the block is dropped from the directory (its entries are lost)")
                    del self.owner[lba]
                    self.given_up.add(lba)
                    continue
                block = DirBlock(lba, {})
                for name, child, typ in entries:
                    if name in block.entries:
                        self.problem("dir-entry-duplicate", f"directory block {lba} of inode {ino} names "
                                     f"{brief(name)} twice; the second entry is removed")
                        self.dir_writes[lba] = ino
                    else:
                        block.add(name, child, typ)
                blocks.append(block)
            self.dirs[ino] = blocks
            if [b.lba for b in blocks] != data:
                try:
                    self._set_dir_blocks(ino)
                except NoSpace:
                    self.problem("dir-rebuild", f"directory inode {ino}: no free block to rebuild its "
                                 "block list; free some space and run fsck again", False)
                    raise Abort from None
            if node.size != len(blocks) * bs:
                if self.problem("dir-size", f"directory inode {ino} has size {node.size}, "
                                f"expected {len(blocks) * bs}; corrected"):
                    node.size = len(blocks) * bs
                    self.dirty_inodes.add(ino)

    def _set_dir_blocks(self, ino: int) -> None:
        """Point directory `ino` at exactly its blocks in `dirs` (rebuilding its pointer blocks)."""
        node, m = self.inodes[ino], self.maps[ino]
        m.data = [b.lba for b in self.dirs[ino]]
        self.data[ino] = m.data

        def alloc() -> int:
            lba = self._free_block()
            if lba is None:
                raise NoSpace("no free block for a directory's pointer block")
            self.owner[lba] = ino
            return lba

        def put(lba: int, img: bytes) -> None:
            self.ptr_writes[lba] = img

        def free(lba: int) -> None:
            self.owner.pop(lba, None)
            self.ptr_writes.pop(lba, None)

        store_map(m, node, self.geo.block_size, alloc=alloc, put=put, free=free)
        node.size = len(m.data) * self.geo.block_size
        self.dirty_inodes.add(ino)

    # -- pass 4: connectivity --------------------------------------------------------------------
    def check_tree(self) -> None:
        self.links: dict[int, int] = {ino: 0 for ino in self.inodes}
        self.subdirs: dict[int, int] = {ino: 0 for ino in self.inodes}
        self.reached: set[int] = set()
        self._visit(L.ROOT_INO, "")
        unreached = [ino for ino in sorted(self.inodes) if ino not in self.reached]
        named = {e[0] for ino in unreached if ino in self.dirs
                 for b in self.dirs[ino] for e in b.entries.values()}
        for ino in [i for i in unreached if i not in named] + [i for i in unreached if i in named]:
            if ino in self.reached:
                continue
            if self.problem("unattached-inode", f"inode {ino} is not reachable from the root; "
                            f"linked into /{LOST_FOUND}"):
                lf = self._lost_found()
                if lf is None or not self._add_entry(lf, f"#{ino}", ino):
                    self.problems[-1].fixed = False
                    continue
                self.links[ino] += 1
                if self.inodes[ino].type == L.TYPE_DIR:
                    self.subdirs[lf] += 1
                self._visit(ino, f"/{LOST_FOUND}/#{ino}")

    def _visit(self, start: int, path: str) -> None:
        stack = [(start, path)]
        self.reached.add(start)
        while stack:
            ino, path = stack.pop()
            names: set[str] = set()
            for b in self.dirs.get(ino, []):
                for name, (child, typ) in list(b.entries.items()):
                    bad = "another entry of the directory has this name" if name in names \
                        else self._bad_entry(name, child, typ)
                    names.add(name)
                    if bad is None and self.inodes[child].type == L.TYPE_DIR and child in self.reached:
                        bad = "names a directory that is already linked elsewhere"
                    if bad is not None:
                        if self.problem("dir-entry-bad", f"{path}/{name}: {bad}; entry removed"):
                            b.remove(name)
                            self.dir_writes[b.lba] = ino
                        continue
                    self.links[child] += 1
                    if typ == L.TYPE_DIR:
                        self.subdirs[ino] += 1
                    if child not in self.reached:
                        self.reached.add(child)
                        if typ == L.TYPE_DIR:
                            stack.append((child, f"{path}/{name}"))

    def _bad_entry(self, name: str, child: int, typ: int) -> str | None:
        if "/" in name or "\0" in name or name in ("", ".", ".."):
            return "invalid name"
        if child not in self.inodes or child == L.ROOT_INO:
            return f"names inode {child}, which is not in use"
        if self.inodes[child].type != typ:
            return "file type differs from the inode's"
        return None

    def _free_block(self) -> int | None:
        for lba in range(self.geo.data_start, self.geo.data_end):
            if lba not in self.owner and lba not in self.given_up:
                return lba
        return None

    def _lost_found(self) -> int | None:
        root = self.dirs.setdefault(L.ROOT_INO, [])
        names = {n: e for b in root for n, e in b.entries.items()}
        hit = names.get(LOST_FOUND)
        if hit and hit[1] == L.TYPE_DIR:
            return hit[0]
        free = [i for i in range(2, self.geo.inode_count) if i not in self.inodes and i not in self.cleared]
        if not free:
            return None
        ino, now = free[0], min(self.sb.mkfs_time_ns, (1 << 63) - 1)
        name = LOST_FOUND if LOST_FOUND not in names else f"{LOST_FOUND}.{ino}"  # the name is a file's
        self.inodes[ino] = Inode(ino, L.TYPE_DIR, 0o700, 2, 1, 0, now, now, now)
        self.dirs[ino], self.data[ino], self.maps[ino] = [], [], FileMap([])
        if not self._add_entry(L.ROOT_INO, name, ino):
            del self.inodes[ino]
            return None
        self.dirty_inodes.add(ino)
        self.links[ino], self.subdirs[ino] = 1, 0
        self.reached.add(ino)
        self.subdirs[L.ROOT_INO] += 1
        return ino

    def _add_entry(self, dir_ino: int, name: str, ino: int) -> bool:
        """Add an entry, growing the directory by a block when it must; False when it cannot."""
        blocks = self.dirs[dir_ino]
        cap = L.dir_capacity(self.geo.block_size)
        target = next((b for b in blocks if b.used + L.dir_entry_size(name) <= cap), None)
        if target is None:
            lba = self._free_block()
            if lba is None:
                return False
            self.owner[lba] = dir_ino
            target = DirBlock(lba, {})
            blocks.append(target)
            try:
                self._set_dir_blocks(dir_ino)
            except NoSpace:
                blocks.pop()
                del self.owner[lba]
                self._set_dir_blocks(dir_ino)
                return False
        target.add(name, ino, self.inodes[ino].type)
        self.dir_writes[target.lba] = dir_ino
        return True

    # -- pass 5: link counts ------------------------------------------------------------------------
    def check_links(self) -> None:
        for ino, node in sorted(self.inodes.items()):
            if ino not in self.reached:
                continue
            want = 2 + self.subdirs[ino] if node.type == L.TYPE_DIR else self.links[ino]
            if node.nlink != want:
                if self.problem("link-count", f"inode {ino} has link count {node.nlink}, "
                                f"expected {want}; corrected"):
                    node.nlink = want
                    self.dirty_inodes.add(ino)

    # -- pass 6: bitmaps ------------------------------------------------------------------------------
    def check_bitmaps(self) -> None:
        geo = self.geo
        keep = self.reached if self.repair else set(self.inodes)
        ib, bb = fresh_bitmaps(geo)
        for ino in keep:
            ib[ino >> 3] |= 1 << (ino & 7)
        for lba, ino in self.owner.items():
            if ino in keep:
                bb[lba >> 3] |= 1 << (lba & 7)
        for what, start, count, magic, want in (
                ("inode", geo.ibitmap_start, geo.ibitmap_blocks, L.INODE_BITMAP_MAGIC, ib),
                ("block", geo.bbitmap_start, geo.bbitmap_blocks, L.BLOCK_BITMAP_MAGIC, bb)):
            images = bitmap_images(geo, bytes(want), magic)
            bad = []
            for k in range(count):
                raw = self.view.read(start + k)
                try:
                    L.parse_checked(L.bitmap_block(geo.block_size, magic), raw, "bitmap")
                except FormatError:
                    self.problem(f"{what}-bitmap-corrupt", f"{what} bitmap block {start + k} is "
                                 "corrupt; rebuilt")
                    bad.append(k)
                    continue
                if raw[:len(images[k])] != images[k]:
                    bad.append(k)
            diff = [k for k in bad if not any(p.message.startswith(f"{what} bitmap block {start + k}")
                                              for p in self.problems)]
            if diff:
                self.problem(f"{what}-bitmap-mismatch", f"the {what} bitmap differs from what is in "
                             f"use in {len(diff)} block(s); rebuilt")
            if self.repair:
                for k in bad:
                    self.view.write(start + k, images[k].ljust(geo.block_size, b"\0"))

    # -- writing the repairs --------------------------------------------------------------------------
    def write_repairs(self) -> None:
        geo, bs = self.geo, self.geo.block_size
        for lba, img in self.ptr_writes.items():
            self.view.write(lba, img)
        for lba, owner in self.dir_writes.items():
            b = next(x for x in self.dirs[owner] if x.lba == lba)
            self.view.write(lba, b.image(bs, owner))
        by_block: dict[int, list[int]] = {}
        for ino in self.dirty_inodes | self.cleared | {i for i in self.inodes if i not in self.reached}:
            by_block.setdefault(geo.inode_location(ino)[0], []).append(ino)
        for blk, inos in by_block.items():
            raw = bytearray(self.view.read(blk))
            for ino in inos:
                off = geo.inode_location(ino)[1]
                node = self.inodes.get(ino)
                keep = node is not None and ino in self.reached and ino not in self.cleared
                raw[off:off + L.INODE_SIZE] = node.build() if keep and node else bytes(L.INODE_SIZE)
            self.view.write(blk, bytes(raw))

    PASSES = ("superblock", "log", "inodes and block ownership", "directory entries", "connectivity",
              "link counts", "bitmaps")

    def run(self, on_pass: Callable[[str], None] = lambda name: None) -> FsckResult:
        passes = [self.check_superblock, self.check_log, self.check_inodes, self.check_dirs, self.check_tree,
                  self.check_links, self.check_bitmaps]
        try:
            for name, check in zip(self.PASSES, passes, strict=True):
                on_pass(name)
                if check == self.check_bitmaps and self.repair:
                    self.write_repairs()
                check()
            if self.repair:
                self._write_sb(0, L.STATE_CLEAN if not self._unfixed() else L.STATE_DIRTY)
                self.view.flush()
        except Abort:
            pass
        if not self.problems:
            code = EXIT_CLEAN
        else:
            code = EXIT_UNFIXED if self._unfixed() else EXIT_FIXED
        return FsckResult(code, self.problems, self.replayed)

    def _unfixed(self) -> bool:
        return any(not p.fixed for p in self.problems)


def fsck(device: BlockDevice, *, repair: bool = False,
         on_pass: Callable[[str], None] = lambda name: None) -> FsckResult:
    """Check (and with `repair`, fix) a jfs volume. Returns exit code and problems. `on_pass` is
    told the name of each pass as it starts (progress display)."""
    try:
        return Checker(device, repair).run(on_pass)
    except TricopyError as exc:
        return FsckResult(EXIT_ERROR, [Problem("operational-error", str(exc), False)])
