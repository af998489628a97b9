"""Copy-on-write file content of a mounted jfs: a file's bytes into freshly allocated blocks of the
running transaction (SPEC §8 [0160]; FORMAT.md "Files").

Keeps true:
- New data always goes to freshly allocated blocks (`_put_data`, `_set_size`), held in the
  transaction's `data` until its commit writes them before the transaction that points at them;
  the blocks they replace are freed by that transaction, never overwritten in place.
- Reads join runs of consecutive blocks into one device read and refuse pointers outside the
  data area (FormatError: run fsck).
"""

from __future__ import annotations

from typing import Any

from jfs import layout as L
from jfs.blockmap import FileMap
from jfs.codecs import Inode
from jfs.errors import FileTooLarge
from jfs.logring import BlockView
from vstore.blocks.errors import FormatError


class CopyOnWrite:
    """File content operations; `jfs.txn.Transactions` supplies the state and the allocator."""

    bs: int
    geo: L.Geometry
    view: BlockView

    def inode(self, ino: int) -> Inode:
        raise NotImplementedError

    def filemap(self, ino: int) -> FileMap:
        raise NotImplementedError

    def _alloc_blocks(self, n: int) -> list[int]:
        raise NotImplementedError

    def _free_block(self, lba: int) -> None:
        raise NotImplementedError

    def _t(self) -> Any:
        raise NotImplementedError

    def _read_blocks(self, lbas: list[int]) -> bytes:
        """The blocks `lbas` (0 = hole), read in runs of consecutive blocks and joined once."""
        parts: list[bytes] = []
        i = 0
        while i < len(lbas):
            j = i + 1
            if not lbas[i]:
                while j < len(lbas) and not lbas[j]:
                    j += 1
                parts.append(bytes((j - i) * self.bs))
            else:
                while j < len(lbas) and lbas[j] == lbas[j - 1] + 1:
                    j += 1
                if not (self.geo.data_start <= lbas[i] and lbas[j - 1] < self.geo.data_end):
                    raise FormatError("a file points outside the data area; run 'jfs fsck'")
                parts.append(self.view.read(lbas[i], j - i))
            i = j
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _put_data(self, ino: int, offset: int, data: bytes) -> list[int]:
        """Copy-on-write `data` at `offset` into the file's map; returns the new data blocks."""
        bs, node, m = self.bs, self.inode(ino), self.filemap(ino)
        end = offset + len(data)
        if not data:
            return []
        if -(-end // bs) > L.max_file_blocks(bs):
            raise FileTooLarge(f"files are limited to {L.max_file_blocks(bs) * bs} bytes")
        k0, k1 = offset // bs, (end - 1) // bs
        if len(m.data) <= k1:
            m.data += [0] * (k1 + 1 - len(m.data))
        new = self._alloc_blocks(k1 - k0 + 1)
        t = self._t()
        for i, k in enumerate(range(k0, k1 + 1)):
            lo, hi = max(offset, k * bs), min(end, (k + 1) * bs)
            if hi - lo == bs:
                blk = data[lo - offset:hi - offset]
            else:
                old = m.data[k]
                base = bytearray(t.data.get(old) or (self.view.read(old) if old else bytes(bs)))
                base[lo - k * bs:hi - k * bs] = data[lo - offset:hi - offset]
                blk = bytes(base)
            if m.data[k]:
                self._free_block(m.data[k])
                t.data.pop(m.data[k], None)
            m.data[k] = new[i]
            t.data[new[i]] = blk
        node.size = max(node.size, end)
        return new

    def _set_size(self, ino: int, size: int) -> list[int]:
        """Truncate or extend (with a hole); returns data blocks written (a zeroed tail)."""
        bs, node, m = self.bs, self.inode(ino), self.filemap(ino)
        if -(-size // bs) > L.max_file_blocks(bs):
            raise FileTooLarge(f"files are limited to {L.max_file_blocks(bs) * bs} bytes")
        written: list[int] = []
        if size < node.size:
            keep = -(-size // bs)
            for b in m.data[keep:]:
                self._free_block(b)
            del m.data[keep:]
            if size % bs and keep <= len(m.data) and m.data[keep - 1]:
                old = self.view.read(m.data[keep - 1])
                tail = old[:size % bs] + bytes(bs - size % bs)
                if tail != old:
                    new = self._alloc_blocks(1)[0]
                    self._free_block(m.data[keep - 1])
                    m.data[keep - 1] = new
                    self._t().data[new] = tail
                    written.append(new)
        node.size = size
        return written
