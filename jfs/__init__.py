"""jfs: the toy journaling file system of embodiment 4 (SPEC §8 [0158]-[0173]), whose metadata log
names the files each transaction touched.

Modules, bottom up: `layout` (the on-disk structures), `codecs` (block images of them), `alloc`
(bitmaps), `blockmap` (where an inode's blocks are), `metalog` (the log: commit, replay, trim),
`txn` (an operation as one transaction), `dirs` (names and paths), `fs` (mkfs, mount, the
operations); beside them `fsck` (check and repair) and `scan` (the touched files, for recovery).
"""
