"""Names: paths, directory blocks and lookup in a mounted jfs (SPEC §8 [0160]; FORMAT.md "Directory block").

The model is xv6's dirlookup()/dirlink()/namei(): a directory is a file whose blocks hold
(name, inode, type) entries; a path is resolved one component at a time from the root. Here a
directory block is rewritten whole (as a metadata block, through the transaction), and an emptied
last block is given back.

Keeps true:
- A name is 1..255 UTF-8 bytes without "/" or NUL and is not "." or ".."; "." and ".." in a path are
  resolved textually (`split_path`) and never stored.
- A directory block is used only when it belongs to its directory and every entry has a valid
  name, a known type and an inode number other than 0 and the root inside the table; any other
  block is a `FormatError` (fsck repairs it entry by entry).
- A directory's size is its number of blocks times the block size.
- Every change of a directory block records the directory (inode, path, the block) in the
  operation's transaction, so the log names the directory as a touched file ([0161]).
"""

from __future__ import annotations

import time

from jfs import layout as L
from jfs.codecs import TYPE_NAMES, DirBlock, parse_dir_block
from jfs.errors import FileNotFound, InvalidArgument, NameTooLong, NotADirectory
from jfs.txn import Transactions
from vstore.blocks.errors import FormatError

DCACHE_ENTRIES = 65536  # paths remembered by `lookup`


def split_path(path: str) -> list[str]:
    parts: list[str] = []
    for comp in str(path).split("/"):
        if comp in ("", "."):
            continue
        if comp == "..":
            if parts:
                parts.pop()
            continue
        check_name(comp)
        parts.append(comp)
    return parts


def check_name(name: str) -> None:
    if "\0" in name or "/" in name or name in ("", ".", ".."):
        raise InvalidArgument(f"{name!r} is not a valid file name")
    if len(name.encode()) > L.MAX_NAME:
        raise NameTooLong(f"the name {name[:40]!r}... is {len(name.encode())} bytes; "
                          f"jfs allows at most {L.MAX_NAME}")


def join(parts: list[str]) -> str:
    return "/" + "/".join(parts)


class Directories(Transactions):
    """Directory blocks and path resolution on top of the transaction machinery."""

    def dir_blocks(self, ino: int) -> list[DirBlock]:
        blocks = self.dirs.get(ino)
        if blocks is not None:
            return blocks
        node = self.inode(ino)
        if node.type != L.TYPE_DIR:
            raise NotADirectory(f"inode {ino} is not a directory")
        blocks = []
        for lba in self.filemap(ino).data:
            if not lba:
                raise FormatError(f"directory inode {ino} has a hole in its block list; run 'jfs fsck'")
            if not self.geo.data_start <= lba < self.geo.data_end:
                raise FormatError(f"directory inode {ino} points outside the data area; run 'jfs fsck'")
            owner, block = parse_dir_block(self.bs, lba, self.view.read(lba), f"directory block {lba} of inode {ino}")
            bad = self._bad_dir_block(ino, owner, block)
            if bad is not None:
                raise FormatError(f"directory block {lba} of inode {ino} {bad}; run 'jfs fsck' to repair")
            blocks.append(block)
        self.dirs[ino] = blocks
        return blocks

    def _bad_dir_block(self, ino: int, owner: int, block: DirBlock) -> str | None:
        """What makes a parsed directory block unusable (fsck judges entry by entry instead)."""
        if owner != ino:
            return f"belongs to inode {owner}"
        for name, (child, typ) in block.entries.items():
            if typ not in TYPE_NAMES:
                return f"has an entry of unknown type {typ}"
            if not L.ROOT_INO < child < self.geo.inode_count:
                return f"names inode {child}, which cannot be an entry"
            if "/" in name or "\0" in name or name in ("", ".", ".."):
                return "holds an invalid name"
        return None

    def _index(self, ino: int) -> dict[str, DirBlock]:
        """name -> the block holding it, for every entry of directory `ino` (built once per load)."""
        index = self.dindex.get(ino)
        if index is None:
            index = self.dindex[ino] = {n: b for b in self.dir_blocks(ino) for n in b.entries}
        return index

    def _entries(self, ino: int) -> dict[str, tuple[int, int]]:
        out: dict[str, tuple[int, int]] = {}
        for b in self.dir_blocks(ino):
            out.update(b.entries)
        return out

    def _lookup_in(self, dir_ino: int, name: str) -> tuple[int, int] | None:
        block = self._index(dir_ino).get(name)
        return None if block is None else block.entries[name]

    def _dir_add(self, dir_ino: int, dir_path: str, op: str, name: str, ino: int, typ: int) -> None:
        """Add an entry: into the last block when it has room (O(1) while a directory grows), else
        the first block with room, else a new block."""
        blocks = self.dir_blocks(dir_ino)
        index = self._index(dir_ino)
        room = L.dir_capacity(self.bs) - L.dir_entry_size(name)
        target = blocks[-1] if blocks and blocks[-1].used <= room else \
            next((b for b in blocks if b.used <= room), None)
        if target is None:
            m = self.filemap(dir_ino)
            lba = self._alloc_blocks(1)[0]
            target = DirBlock(lba, {})
            blocks.append(target)
            m.data.append(lba)
            node = self.inode(dir_ino)
            node.size = len(blocks) * self.bs
            self._record(dir_ino, dir_path, op, self._store_map(dir_ino, m))
        target.add(name, ino, typ)
        index[name] = target
        self._t().meta[target.lba] = target.image(self.bs, dir_ino)
        self._touch_dir(dir_ino, dir_path, op, [target.lba])

    def _dir_remove(self, dir_ino: int, dir_path: str, op: str, name: str) -> None:
        blocks = self.dir_blocks(dir_ino)
        b = self._index(dir_ino).pop(name)
        b.remove(name)
        self.dcache.clear()  # paths through this name are gone
        if not b.entries and b is blocks[-1]:
            blocks.pop()
            m = self.filemap(dir_ino)
            m.data.pop()
            self._free_block(b.lba)
            self.inode(dir_ino).size = len(blocks) * self.bs
            self._record(dir_ino, dir_path, op, self._store_map(dir_ino, m))
            self._touch_dir(dir_ino, dir_path, op, [])
        else:
            self._t().meta[b.lba] = b.image(self.bs, dir_ino)
            self._touch_dir(dir_ino, dir_path, op, [b.lba])

    def _touch_dir(self, dir_ino: int, dir_path: str, op: str, blocks: list[int]) -> None:
        node = self.inode(dir_ino)
        node.mtime_ns = node.ctime_ns = time.time_ns()
        self._dirty(dir_ino)
        self._record(dir_ino, dir_path, op, blocks)

    # -- path resolution ------------------------------------------------------------------------------
    def _resolve(self, parts: list[str]) -> int:
        ino = L.ROOT_INO
        for i, name in enumerate(parts):
            if self.inode(ino).type != L.TYPE_DIR:
                raise NotADirectory(f"{join(parts[:i])} is not a directory")
            hit = self._lookup_in(ino, name)
            if hit is None:
                raise FileNotFound(f"{join(parts[:i + 1])}: no such file or directory")
            ino = hit[0]
        return ino

    def lookup(self, path: str) -> int:
        """The inode number of `path` (remembered until a name is removed or the state reloaded)."""
        ino = self.dcache.get(path)
        if ino is None:
            ino = self._resolve(split_path(path))
            if len(self.dcache) >= DCACHE_ENTRIES:
                self.dcache.clear()
            self.dcache[path] = ino
        return ino

    def _parent(self, path: str) -> tuple[int, str, str, list[str]]:
        """(parent inode, parent path, name, parts) of a path that names an entry."""
        parts = split_path(path)
        if not parts:
            raise InvalidArgument("the root directory cannot be created, removed or renamed")
        parent = self._resolve(parts[:-1])
        if self.inode(parent).type != L.TYPE_DIR:
            raise NotADirectory(f"{join(parts[:-1])} is not a directory")
        return parent, join(parts[:-1]), parts[-1], parts
