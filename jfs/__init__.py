"""jfs: the toy journaling file system of embodiment 4 (SPEC §8), whose metadata log names the
files each transaction touched."""
