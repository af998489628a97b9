"""The NBD server of embodiment 2 (SPEC §6 [0133]-[0135]): unmodified programs (qemu, libnbd,
the kernel's nbd client) use a block device of ours over the standard Network Block Device
protocol. `proto` declares the wire structures, `session` negotiates and checks requests without
I/O, `server` listens and serves. Stands only on `vstore.blocks`: an export is any device with the
`BlockDevice` methods, and a TLS context is passed in by whoever owns the certificates.
"""
