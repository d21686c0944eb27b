import os
import time

from harness.budget import Budget


def test_step_cap_stops_training():
    budget = Budget(seconds=1000, max_steps=3)
    steps = 0
    while not budget.done():
        budget.step_done()
        steps += 1
    assert steps == 3


class FakeClock:
    """time.perf_counter for the budget: a step lasts exactly what the test says."""

    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_clock_starts_after_the_first_step_and_stops_before_the_step_that_would_overrun(
    monkeypatch,
):
    clock = FakeClock()
    monkeypatch.setattr(time, "perf_counter", clock)
    budget = Budget(seconds=10.5)
    clock.now += 60  # model loading and the first step are free
    assert budget.elapsed == 0 and not budget.done()
    budget.step_done()
    steps = 1
    while not budget.done():
        clock.now += 1.0
        budget.step_done()
        steps += 1
    # 1-second steps: the eleventh timed one would end at 11 s, past the 10.5 s budget
    assert budget.elapsed == 10.0 and steps == 11


def test_each_step_is_announced_on_the_clock_pipe(monkeypatch):
    read_end, write_end = os.pipe()
    monkeypatch.setenv("HARNESS_CLOCK_FD", str(write_end))
    budget = Budget(seconds=10, max_steps=2)
    while not budget.done():
        budget.step_done(256)
    os.close(write_end)
    with os.fdopen(read_end) as pipe:
        assert pipe.read() == "step 256\nstep 256\n"


def test_budget_reads_the_harness_setting(monkeypatch):
    monkeypatch.setenv("HARNESS_BUDGET_SECONDS", "12.5")
    assert Budget.from_env(max_steps=4) == Budget(seconds=12.5, max_steps=4)
