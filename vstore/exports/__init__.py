"""What unmodified programs use of a lab (SPEC §6 [0133]-[0135], embodiment 2: the intermediate
server): the application's volume exported over NBD (`nbd_export`) and attached as one file through
FUSE (`attach`), both over the same `lab:LAB` device the targets layer opens."""
