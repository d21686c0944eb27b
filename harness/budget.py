"""The wall-clock training budget.

train.py asks `budget.done(step)` before each step and calls `budget.step_done()` after it. The
clock starts when the first step ends, so model loading and the first step's one-off costs
(allocation, kernel selection) are not charged; `with budget.paused():` excludes evaluation or
checkpointing. The runner also kills train.py outright if it overstays (runner.hard_limit).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

TIME_BUDGET_SECONDS = 300.0  # training time per experiment, excluding load, warm-up and eval
BUDGET_ENV = "HARNESS_BUDGET_SECONDS"  # set by the runner so train.py cannot pick its own


@dataclass
class Budget:
    seconds: float = TIME_BUDGET_SECONDS
    max_steps: int | None = None  # train.py's --steps: a cap on top of the clock
    steps: int = 0
    _started: float | None = field(default=None, repr=False)
    _paused_total: float = field(default=0.0, repr=False)

    @classmethod
    def from_env(cls, max_steps: int | None = None) -> Budget:
        return cls(seconds=float(os.environ.get(BUDGET_ENV, TIME_BUDGET_SECONDS)), max_steps=max_steps)

    @property
    def elapsed(self) -> float:
        """Training seconds charged so far."""
        if self._started is None:
            return 0.0
        return time.perf_counter() - self._started - self._paused_total

    def done(self, step: int | None = None) -> bool:
        step = self.steps if step is None else step
        if self.max_steps is not None and step >= self.max_steps:
            return True
        return self.elapsed >= self.seconds

    def step_done(self) -> None:
        self.steps += 1
        if self._started is None:  # the warm-up step is free; the clock starts now
            self._started = time.perf_counter()

    @property
    def fraction(self) -> float:
        """Progress through the run in [0, 1], by steps when capped tighter than time, else by time."""
        by_time = self.elapsed / self.seconds if self.seconds > 0 else 1.0
        by_steps = self.steps / self.max_steps if self.max_steps else 0.0
        return min(1.0, max(by_time, by_steps))

    @contextmanager
    def paused(self) -> Iterator[None]:
        if self._started is None:  # nothing is charged before the clock starts anyway
            yield
            return
        began = time.perf_counter()
        try:
            yield
        finally:
            self._paused_total += time.perf_counter() - began
