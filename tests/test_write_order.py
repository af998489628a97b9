"""Write-order fidelity at the Async site (DESIGN invariant 2), as a hypothesis state
machine: random writes over two volumes of one consistency group, random partial shipping,
random cuts of the async link, Async-site crashes between storing and applying a batch, with and
without coalescing, in both modes. At every observation each D volume must equal a shadow model
of the primary after one prefix of acknowledged writes (the same prefix for every volume), and the
prefix never goes backwards.
"""

from __future__ import annotations

import hashlib
import random
import shutil
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from vstore.lab.system import System
from vstore.procedures.create import init_lab
from vstore.replication.journal import SimulatedCrash

BS = 4096
NBLOCKS = 8
VOLUMES = 2


def digest(volumes: list[bytes]) -> str:
    h = hashlib.sha256()
    for v in volumes:
        h.update(v)
    return h.hexdigest()


class WriteOrder(RuleBasedStateMachine):
    @initialize(mode=st.sampled_from(["mirror", "provider"]), coalesce=st.booleans(),
                batch=st.integers(1, 6))
    def setup(self, mode: str, coalesce: bool, batch: int) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="wo-"))
        self.lab = self.dir / "lab"
        init_lab(self.lab, mode=mode, size=NBLOCKS * BS, volumes=VOLUMES, coalesce=coalesce)
        self.system = System(self.lab)
        self.batch = batch
        self.model = [bytearray(NBLOCKS * BS) for _ in range(VOLUMES)]
        # every prefix with its contents: writes can bring the volumes back to contents they had before
        self.prefix_digests: dict[str, list[int]] = {digest([bytes(m) for m in self.model]): [0]}
        self.acked = 0
        self.last_prefix = 0
        self.letter = "D"

    def teardown(self) -> None:
        if hasattr(self, "system"):
            self.system.close()
            shutil.rmtree(self.dir, ignore_errors=True)

    def shipper(self):
        shipper = self.system.shipper()
        shipper.batch_entries = self.batch
        return shipper

    @rule(volume=st.integers(0, VOLUMES - 1), lba=st.integers(0, NBLOCKS - 1), count=st.integers(1, 3),
          seed=st.integers(0, 2**32))
    def write(self, volume: int, lba: int, count: int, seed: int) -> None:
        count = min(count, NBLOCKS - lba)
        data = random.Random(seed).randbytes(count * BS)
        self.system.device(volume).write(lba, data)  # acknowledged when it returns
        self.model[volume][lba * BS:(lba + count) * BS] = data
        self.acked += 1
        self.prefix_digests.setdefault(digest([bytes(m) for m in self.model]), []).append(self.acked)

    @rule(n=st.integers(1, 10))
    def ship_some(self, n: int) -> None:
        self.shipper().ship(n)

    @rule()
    def cut_async_link(self) -> None:
        self.system.faults.set("link", "primary-async", True)
        self.shipper().ship()  # fails: the group suspends with positions recorded
        self.system.faults.set("link", "primary-async", False)

    @precondition(lambda self: self.system.entry_log.stats().entries > 0)
    @rule()
    def crash_async_between_store_and_apply(self) -> None:
        try:
            self.shipper().ship(crash_after_store_batch=0)
        except SimulatedCrash:
            pass
        self.observe()  # D as the crash left it: the stored batch is not applied yet
        self.system.save()
        self.system.close()
        self.system = System(self.lab)  # restart: the stored batch is finished before D is used

    @invariant()
    def observe(self) -> None:
        if not hasattr(self, "system"):
            return
        d = [(self.lab / "async" / f"D{i}.img").read_bytes() for i in range(VOLUMES)]
        prefixes = self.prefix_digests.get(digest(d))
        assert prefixes, "D is not the primary after any prefix of acknowledged writes"
        later = [p for p in prefixes if p >= self.last_prefix]
        assert later, "D went back to an older prefix"
        self.last_prefix = min(later)  # the earliest prefix D can be at: contents may repeat


WriteOrder.TestCase.settings = settings(max_examples=60, stateful_step_count=30, deadline=None,
                                        suppress_health_check=[HealthCheck.too_slow])
TestWriteOrder = WriteOrder.TestCase
