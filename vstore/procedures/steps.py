"""The step log every procedure keeps, and the progress callbacks its copies report to (DESIGN
"Procedures": nothing silent).

Keeps true: every procedure records each step in a `StepLog` (also sent to the `vstore.procedures`
logger), so an operator can see exactly what was done and where it stopped. A `Progress` factory
makes one `Advance` callback per copy; procedures never draw anything themselves.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

log = logging.getLogger("vstore.procedures")

Advance = Callable[[int], None]
"""advance(blocks): that many more blocks of a copy are done."""
Progress = Callable[[str, int], Advance]
"""progress(description, total_blocks) -> advance."""


def no_progress(description: str, total: int) -> Advance:
    return lambda n: None


@dataclass
class StepLog:
    procedure: str
    steps: list[str] = field(default_factory=list)

    def step(self, text: str) -> None:
        self.steps.append(text)
        log.info("%s: %s", self.procedure, text)
