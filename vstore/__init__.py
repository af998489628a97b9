"""vstore: block devices, ordered entries, remote-copy pairs, storage systems, the mirror program,
the virtual storage provider and the three sites of tricopy (SPEC §2-§8)."""
