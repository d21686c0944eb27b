"""The wall-clock training budget, as train.py sees it, and the steps it announces to the runner.

train.py asks `budget.done()` before each step (stop when the next step would end past the budget)
and calls `budget.step_done(tokens)` after it. The clock starts when the first step ends, so model
loading and the first step's one-off costs (compilation, allocation) are not charged. Each step_done
also writes one line to the runner's clock pipe (CLOCK_FD_ENV); the runner timestamps those lines
itself and its figures are the ones recorded: train.py's own clock only tells it when to stop.
Under torchrun (several ranks) rank 0 alone announces, each step counting the whole batch.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

TIME_BUDGET_SECONDS = 300.0  # training time per experiment, excluding load, warm-up and export
BUDGET_ENV = "HARNESS_BUDGET_SECONDS"  # set by the runner: the budget it will hold train.py to
CLOCK_FD_ENV = "HARNESS_CLOCK_FD"  # the pipe step announcements go to
TORCHRUN_ENV = "TORCHELASTIC_RUN_ID"  # set by torchrun in each process it starts


def announce_step(tokens: int) -> None:
    """Tell the runner a step ended (`step <tokens>`); a no-op outside the harness and on every
    torchrun rank but 0, which speaks for all of them."""
    fd = os.environ.get(CLOCK_FD_ENV)
    if not fd or os.environ.get("RANK", "0") != "0":
        return
    line = f"step {int(tokens)}\n".encode()
    if TORCHRUN_ENV not in os.environ:
        os.write(int(fd), line)
        return
    # torchrun starts its workers with stdio alone: the pipe is its fd, reached through /proc
    pipe = os.open(f"/proc/{os.getppid()}/fd/{int(fd)}", os.O_WRONLY)
    try:
        os.write(pipe, line)
    finally:
        os.close(pipe)


@dataclass
class Budget:
    seconds: float = TIME_BUDGET_SECONDS
    max_steps: int | None = None  # train.py's --steps: a cap on top of the clock
    steps: int = 0
    _started: float | None = field(default=None, repr=False)

    @classmethod
    def from_env(cls, max_steps: int | None = None) -> Budget:
        return cls(
            seconds=float(os.environ.get(BUDGET_ENV, TIME_BUDGET_SECONDS)), max_steps=max_steps
        )

    @property
    def elapsed(self) -> float:
        """Training seconds charged so far (checkpoints included: the runner's clock never
        pauses)."""
        return 0.0 if self._started is None else time.perf_counter() - self._started

    def done(self) -> bool:
        """True when the step cap is reached, or when one more step at the pace so far would end
        past the budget: a run stops inside it instead of overrunning by its last step."""
        if self.max_steps is not None and self.steps >= self.max_steps:
            return True
        timed = self.steps - 1  # the clock started when the first step ended
        pace = self.elapsed / timed if timed > 0 else 0.0
        return self.elapsed + pace >= self.seconds

    def step_done(self, tokens: int = 0) -> None:
        self.steps += 1
        if self._started is None:  # the warm-up step is free; the clock starts now
            self._started = time.perf_counter()
        announce_step(tokens)

    @property
    def fraction(self) -> float:
        """Progress through the run in [0, 1]: by steps when capped tighter than time, else time."""
        by_time = self.elapsed / self.seconds if self.seconds > 0 else 1.0
        by_steps = self.steps / self.max_steps if self.max_steps else 0.0
        return min(1.0, max(by_time, by_steps))
