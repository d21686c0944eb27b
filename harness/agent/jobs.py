"""One candidate as a tmux job: `harness run` in a window of its own, and how it ended.

    runs/agent-<tag>/jobs/<n>/job.sh       the command, cd'd into this checkout
    runs/agent-<tag>/jobs/<n>/console.log  what the runner printed (tee'd: it outlives the runner)
    runs/agent-<tag>/jobs/<n>/exit_code    written as the job's last act

The runner names its run in the console's first line; the job's end is the run's results row.
If the runner died before writing one, the agent writes it (status crash, recorded_by agent), so
a named run always has exactly one row.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from harness import interrupts, paths, results
from harness.agent.proposers import Proposal
from harness.agent.tmux import Job, Tmux
from harness.runner import time_limit
from harness.sandbox import SECRET_ENV
from harness.text import last_line

if TYPE_CHECKING:
    from harness.agent.log import AgentLog
    from harness.agent.loop import AgentConfig
EVAL_ALLOWANCE_SECONDS = 1200.0  # on top of the runner's train.py limit: loading + scoring
CRASH_STATUSES = ("crash", "invalid")
CONSOLE_HEAD_BYTES = 65536  # the runner names its run in its first line
PASSED_ENV = re.compile(
    r"^(HARNESS_|HF_|CUDA_|TORCH|TRANSFORMERS_|OMP_|MKL_|PYTHON|PATH$|VIRTUAL_ENV$|LD_LIBRARY_PATH$)"
)


@dataclass
class RunEnd:
    job: str  # the job folder's name
    run_id: str | None  # None: the runner never named a run
    commit: str
    row: dict | None  # the run's row in results.tsv; None when it has none
    reason: str  # the row's reason; without a row, why there is none
    stopped: str = ""  # why the agent stopped the run, when it did
    written: bool = False  # the agent wrote the row: the runner died before its own


class RunStopped(interrupts.Interrupted):
    """A stop signal that reached the agent during a run; `end`: that run, stopped and recorded."""

    def __init__(self, signum: int, end: RunEnd):
        super().__init__(signum)
        self.end = end


def _pythonpath() -> str:
    """The harness first (the run imports it from this checkout), then the user's entries."""
    entries = [str(paths.ROOT), *os.environ.get("PYTHONPATH", "").split(os.pathsep)]
    return os.pathsep.join(dict.fromkeys(entry for entry in entries if entry))


def run_environment(train_py: Path) -> dict[str, str]:
    """What a run's pane needs, explicitly: the tmux server may have been started long ago by
    someone else. The harness reads the user's data, runs/ and results.tsv, and the worktree's
    train.py; nothing secret-looking is passed."""
    env = {k: v for k, v in os.environ.items() if PASSED_ENV.match(k) and not SECRET_ENV.search(k)}
    env.update(HARNESS_TRAIN_SCRIPT=str(train_py), HARNESS_DATA_DIR=str(paths.data_dir()),
               HARNESS_RUNS_DIR=str(paths.runs_dir()), HARNESS_RESULTS=str(paths.results_path()),
               PYTHONPATH=_pythonpath(), PYTHONUNBUFFERED="1")  # fmt: skip
    return env


def device_environment(device: str | None) -> dict[str, str]:
    """What a run on `device` (a --devices entry) needs: that CUDA device the only one its process
    sees, so train.py's DEVICE=auto picks it; cpu: no CUDA device at all; None: nothing. cuda:K
    counts among the devices this process may use (CUDA_VISIBLE_DEVICES, as under SLURM)."""
    if device is None:
        return {}
    if not device.startswith("cuda"):
        return {"CUDA_VISIBLE_DEVICES": ""}
    index = int(device.partition(":")[2] or 0)
    allowed = os.environ.get("CUDA_VISIBLE_DEVICES")
    visible = allowed.split(",") if allowed else None
    return {"CUDA_VISIBLE_DEVICES": visible[index] if visible else str(index)}


def _row_reason(row: dict) -> str:
    if row["status"] not in CRASH_STATUSES:
        return ""
    try:
        return str(json.loads(row["config"] or "{}").get("reason", ""))
    except (ValueError, AttributeError):
        return ""


class Jobs:
    """The jobs of one agent session under root/jobs, numbered on from the last session's."""

    def __init__(self, config: AgentConfig, tmux: Tmux, root: Path, train_py: Path, log: AgentLog,
                 window: Callable[[str], str] = str):  # fmt: skip
        self.config, self.tmux, self.root, self.train_py, self.log = (
            config, tmux, root, train_py, log)  # fmt: skip
        self.window = window  # a job's window name: a worker's are prefixed with its number
        self.results_path = paths.results_path()
        self.count = len(list((root / "jobs").glob("*"))) if (root / "jobs").exists() else 0

    def _script(self, proposal: Proposal, console: Path) -> str:
        # --description=TEXT: no description can be read as one of the runner's flags
        command = [sys.executable, "-m", "harness", "run", f"--description={proposal.description}",
                   "--budget", str(self.config.budget_seconds),
                   "--eval-tokens", str(self.config.eval_tokens),
                   *(["--no-sandbox"] if self.config.no_sandbox else []),
                   *(["--cpus", ",".join(map(str, self.config.cpus))] if self.config.cpus else []),
                   "--", *self.config.train_args, *proposal.train_args]  # fmt: skip
        # tee ignores the stop signals: it outlives the runner and logs its last lines
        tee = f"(trap '' INT TERM HUP; exec tee {shlex.quote(str(console))})"
        return "\n".join([
            f"cd {shlex.quote(str(paths.ROOT))}",
            f"{shlex.join(command)} 2>&1 | {tee}",
            "(exit ${PIPESTATUS[0]})",
        ])  # fmt: skip

    def _console(self, job: str) -> Path:
        return self.root / "jobs" / job / "console.log"

    def _run_id(self, job: str) -> str | None:
        """The run the job's runner announced (`run <id>: ...`, its first line), or None."""
        try:
            with open(self._console(job), "rb") as handle:
                head = handle.read(CONSOLE_HEAD_BYTES).decode(errors="replace")
        except OSError:
            return None
        match = re.search(r"^run (\S+): ", head, re.MULTILINE)
        return match.group(1) if match else None

    def row(self, run_id: str | None) -> dict | None:
        if not run_id:
            return None
        frame = results.read(self.results_path)
        found = frame[frame["run_id"] == run_id]
        return found.iloc[-1].to_dict() if len(found) else None

    def find(self, job: str) -> Job | None:
        """The job if it still runs (a killed session's), or None."""
        return self.tmux.find(self.root / "jobs" / job)

    def run(self, proposal: Proposal, commit: str, on_named: Callable[[str], None]) -> RunEnd:
        """Run the proposal at `commit` to its end; `on_named(run_id)` once the runner names its
        run. A stop signal stops the run with that signal and raises RunStopped once recorded."""
        self.count += 1
        window, job = self.window(f"exp{self.count}"), f"{self.count:04d}"
        timeout = (
            self.config.run_timeout
            or time_limit(self.config.budget_seconds) + EVAL_ALLOWANCE_SECONDS
        )
        train_args = [*self.config.train_args, *proposal.train_args]
        running = None
        try:
            # a signal during the tmux call is raised once the job exists, so it gets stopped
            with interrupts.held():
                running = self.tmux.start(window, self._script(proposal, self._console(job)),
                                          self.root / "jobs" / job,
                                          {**run_environment(self.train_py),
                                           **device_environment(self.config.device)})  # fmt: skip
                self.log("started", job=job, window=window, commit=commit, args=train_args,
                         description=proposal.description)  # fmt: skip
            end = running.wait(timeout, poll=self._watch(job, on_named))
        except KeyboardInterrupt as error:
            stop = interrupts.interrupted(error)
            interrupts.install(signal.SIG_IGN)  # from now on nothing may cut the recording short
            if running is not None:
                running.stop(stop.signum)  # the same signal: the runner records its run with it
            ended = self.ended(job, commit, proposal.description, train_args,
                               f"interrupted ({stop.how})",
                               stopped=f"the agent was interrupted ({stop.how})")  # fmt: skip
            raise RunStopped(stop.signum, ended) from None
        except BaseException:
            if running is not None:
                running.stop(signal.SIGTERM)  # no run goes on unwatched
            raise
        if end.how == "timeout":
            why = f"the agent stopped the run after {timeout:.0f} s (run timeout)"
            return self.ended(job, commit, proposal.description, train_args, why, stopped=why)
        if end.how == "vanished":
            return self.ended(job, commit, proposal.description, train_args,
                              "the tmux pane or server disappeared during the run")  # fmt: skip
        return self.ended(job, commit, proposal.description, train_args,
                          f"the run ended (exit code {end.exit_code}) without a results row: "
                          + last_line(self._console(job), "(no output)"))  # fmt: skip

    def _watch(self, job: str, on_named: Callable[[str], None]):
        """A poll for Job.wait: once the runner names its run, log it and pass it on."""
        named = []

        def poll() -> None:
            run_id = None if named else self._run_id(job)
            if run_id:
                named.append(run_id)
                self.log("running", job=job, run_id=run_id)
                on_named(run_id)

        return poll

    def ended(self, job: str, commit: str, description: str, train_args: list[str], reason: str,
              stopped: str = "") -> RunEnd:  # fmt: skip
        """How the job's run ended: its row (the runner's, or one written here with `reason` when
        the runner named its run but died before its row). The reason is always the row's."""
        run_id = self._run_id(job)
        row, written = self.row(run_id), False
        if row is None and run_id:
            row, written = self._crash_row(run_id, commit, description, train_args, reason)
        return RunEnd(
            job, run_id, commit, row, _row_reason(row) if row else reason, stopped, written
        )

    def _crash_row(self, run_id: str, commit: str, description: str, train_args: list[str],
                   reason: str) -> tuple[dict | None, bool]:  # fmt: skip
        """(the run's row, whether this wrote it). A row that appeared meanwhile (DuplicateRun) is
        the runner's; one results.tsv refuses goes to its side file, logged as unrecorded."""
        config = {"train_args": train_args, "budget_seconds": self.config.budget_seconds,
                  "reason": reason, "recorded_by": "agent"}  # fmt: skip
        row = {"commit": commit, "run_id": run_id, "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S"),
               "status": "crash", "description": description, "config": config}  # fmt: skip
        try:
            results.append(row, self.results_path)
        except results.DuplicateRun:
            return self.row(run_id), False
        except results.ResultsError as error:
            self.log("unrecorded", run_id=run_id, error=str(error))
            return None, True
        return self.row(run_id), True
