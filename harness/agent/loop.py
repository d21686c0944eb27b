"""The loop: propose -> apply (a commit) -> run -> keep or reset, until a limit or a signal.

A failure (a crashed, invalid or lost run, a failing proposer, a proposal that cannot be applied)
counts towards --max-crashes; a reply rejected on its merits does not, and a good run resets the
count. Before the first proposal, what a killed session left is reconciled: never a second row.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

from harness import interrupts, paths, results
from harness.agent.jobs import CRASH_STATUSES, Jobs, RunEnd, RunStopped
from harness.agent.log import AgentLog, diff_lines
from harness.agent.proposers import (
    CRASH_LOG_LINES,
    Context,
    Proposal,
    Rejected,
    Result,
    dynamics_summary,
)
from harness.agent.workspace import Workspace
from harness.budget import TIME_BUDGET_SECONDS
from harness.evaluate import EVAL_TOKENS
from harness.text import one_line

PROGRAM_FILE = "program.md"
KILLED = "interrupted (agent killed)"


@dataclass
class AgentConfig:
    tag: str
    max_experiments: int | None = None  # proposals this session, rejected ones included
    hours: float | None = None
    max_crashes: int = 5  # failures in a row (see the module's docstring)
    budget_seconds: float = TIME_BUDGET_SECONDS
    eval_tokens: int = EVAL_TOKENS
    run_timeout: float | None = None  # whole run incl. evaluation; default time_limit + allowance
    train_args: list[str] = field(default_factory=list)  # appended to every candidate's flags
    track: str | None = None  # keep only rows in this bpw track (results.TRACKS); None: any
    no_sandbox: bool = False  # passed to every `harness run`: only where bubblewrap cannot run
    cpus: list[int] | None = None  # `harness run --cpus`: a worker's share of the machine
    device: str | None = None  # a worker's --devices entry (cuda:K); None: train.py's choice


class Agent:
    def __init__(self, config: AgentConfig, proposer, log: AgentLog, workspace: Workspace,
                 jobs: Jobs, peers: list[Path] = ()):  # fmt: skip
        self.config, self.proposer, self.log, self.workspace, self.jobs = (
            config, proposer, log, workspace, jobs)  # fmt: skip
        # the other workers' folders: their rows and running experiments are in the context
        self.peers = [AgentLog(root, []) for root in peers if root != jobs.root]
        self.results_path = paths.results_path()
        self.runs_dir = paths.runs_dir()
        self.run_ids = log.run_ids()
        self.crash_log = ""
        self.current: Proposal | None = None  # the proposal in flight, for an interrupt to settle
        self.last_failure = ""

    def context(self) -> Context:
        """What the proposer sees: train.py, program.md, every worker's rows in the order they
        ran, the dynamics of those runs, the last crash here, what the other workers run now."""
        program = self.workspace.path / PROGRAM_FILE
        frame = results.read(self.results_path)
        run_ids, running = set(self.run_ids), []
        for peer in self.peers:
            events = peer.events()  # read once: a log holds every proposal's train.py
            run_ids.update(peer.run_ids(events))
            if started := peer.running(events):
                args = " ".join(started.get("args", []))
                running.append(one_line(f"{started.get('description', '')} {args}"))
        recent = frame[frame["run_id"].isin(run_ids)]
        dynamics = dynamics_summary([self.runs_dir / run_id for run_id in recent["run_id"]])
        return Context(train_py=self.workspace.train_py.read_text(),
                       program=program.read_text() if program.exists() else "",
                       recent=recent, crash_log=self.crash_log, dynamics=dynamics,
                       running=running)  # fmt: skip

    def decide(self, end: RunEnd) -> Result:
        row = end.row
        if row is None:
            return Result("crash", None)
        bpb = row.get("val_bpb")
        bpb = None if bpb is None or bpb != bpb else float(bpb)  # NaN: no metric
        in_track = (
            self.config.track is None or results.bpw_track(row.get("bpw")) == self.config.track
        )
        if row["status"] == "keep" and not in_track:
            return Result("discard", None)
        return Result(row["status"], bpb if in_track else None)

    def loop(self) -> int:
        cfg = self.config
        deadline = time.monotonic() + cfg.hours * 3600 if cfg.hours is not None else None
        crashes, done = 0, 0
        self.log("start", tag=cfg.tag, pid=os.getpid(), branch=self.workspace.branch,
                 worktree=str(self.workspace.path), kept=self.workspace.kept[:7],
                 session=self.jobs.tmux.session_name)  # fmt: skip
        try:
            self.reconcile()
            while True:
                if cfg.max_experiments is not None and done >= cfg.max_experiments:
                    return self._stop(f"{done} proposals this session (--max-experiments)", 0)
                if deadline is not None and time.monotonic() >= deadline:
                    return self._stop(f"{cfg.hours} hours are up (--hours)", 0)
                if crashes >= cfg.max_crashes:
                    return self._stop(f"{crashes} failures in a row (--max-crashes), the last: "
                                      f"{self.last_failure}", 1)  # fmt: skip
                done += 1
                failed = self.experiment(done)
                if failed:
                    crashes += 1
                elif failed is False:
                    crashes = 0
        except KeyboardInterrupt as error:
            return self._interrupted(interrupts.interrupted(error))

    def experiment(self, number: int) -> bool | None:
        """Propose, apply, run, decide. True: a failure (counted for --max-crashes); False: a run
        that did not crash; None: a reply rejected on its merits (neither)."""
        try:
            proposal = self.proposer.propose(self.context())
        except Rejected as why:
            return self._rejected(number, str(why), why.failure)
        except Exception as error:  # a proposer's bug must not end an unattended night
            return self._rejected(
                number, f"the proposer failed: {type(error).__name__}: {error}", True
            )
        self.current = proposal
        try:
            with interrupts.held():
                commit = self._apply(proposal, number)
            end = self.jobs.run(proposal, commit, on_named=self._named(proposal))
        except Exception as error:  # a commit or write that failed, tmux refusing a window
            self._forget(proposal)
            why = f"the proposal could not be applied or run: {type(error).__name__}: {error}"
            return self._rejected(number, why, True)
        with interrupts.held():
            result = self._settle(proposal, end)
        if result.status in CRASH_STATUSES:
            self.last_failure = f"run {end.run_id}: {result.status}: {end.reason}"
        return result.status in CRASH_STATUSES

    def _named(self, proposal: Proposal):
        """What to do once the runner names the proposal's run: tell the proposer (Optuna keeps it
        on its trial)."""

        def named(run_id: str) -> None:
            if hasattr(self.proposer, "started"):
                self.proposer.started(proposal, run_id)

        return named

    def _rejected(self, number: int, reason: str, failure: bool) -> bool | None:
        self.log("rejected", experiment=number, reason=reason)
        self.current = None
        if failure:
            self.last_failure = reason
        with interrupts.held():
            self.workspace.reset()
        return True if failure else None

    def _apply(self, proposal: Proposal, number: int) -> str:
        """Commit the proposal's train.py (Optuna's flags need none) -> the commit it runs."""
        diff = ""
        if proposal.train_py is None:
            commit = self.workspace.short()
        else:
            diff = diff_lines(self.workspace.train_py.read_text(), proposal.train_py)
            commit = self.workspace.commit(proposal.description, proposal.train_py)
        self.log("proposal", experiment=number, commit=commit, description=proposal.description,
                 args=proposal.train_args, diff=diff, train_py=proposal.train_py)  # fmt: skip
        return commit

    def _forget(self, proposal: Proposal) -> None:
        """The proposal never ran: Optuna fails its trial."""
        if hasattr(self.proposer, "forget"):
            self.proposer.forget(proposal)

    def _settle(self, proposal: Proposal | None, end: RunEnd, **extra) -> Result:
        """After a run: tell the proposer, keep its commit or reset to the kept one, log it."""
        result = self.decide(end)
        if proposal is not None and hasattr(self.proposer, "tell"):
            self.proposer.tell(proposal, result)
        if result.status == "keep":
            self.workspace.keep(end.commit)
        self.workspace.reset()
        if end.run_id:
            self.run_ids.append(end.run_id)
            log_file = self.runs_dir / end.run_id / "run.log"
            crashed = result.status in CRASH_STATUSES and log_file.exists()
            lines = log_file.read_text(errors="replace").splitlines() if crashed else []
            self.crash_log = "\n".join(lines[-CRASH_LOG_LINES:])
        row = end.row
        stopped = {"stopped": end.stopped} if end.stopped else {}
        self.log("run", job=end.job, run_id=end.run_id, status=result.status,
                 val_bpb=result.val_bpb, bpw=row.get("bpw") if row else None, reason=end.reason,
                 **stopped, kept=self.workspace.kept[:7], **extra)  # fmt: skip
        self.current = None
        return result

    def reconcile(self) -> None:
        """What the last session left when it was killed: its job is stopped if it still runs, then
        its row adopted into the log, or one written for it (KILLED); never a second row. Then the
        proposer settles what it left (Optuna's running trials) from the results rows."""
        started = self.log.unfinished()
        if started is not None:
            with interrupts.held():
                left = self.jobs.find(started["job"])
                if left is not None:
                    left.stop(signal.SIGTERM)  # its runner records it
                stopped = "stopped by the next session" if left is not None else ""
                end = self.jobs.ended(started["job"], started["commit"],
                                      started.get("description", ""), started.get("args", []),
                                      KILLED, stopped=stopped)  # fmt: skip
                adopted = end.row is not None and not end.written
                self._settle(None, end, reconciled="adopted" if adopted else "interrupted")
        if hasattr(self.proposer, "reconcile"):
            self.proposer.reconcile(results.read(self.results_path))

    def _interrupted(self, stop: interrupts.Interrupted) -> int:
        """Ctrl-C, SIGTERM or SIGHUP: the run it stopped is settled, a proposal that never ran
        forgotten, the branch returned to the kept commit."""
        interrupts.install(signal.SIG_IGN)  # nothing may cut short stopping and recording
        if isinstance(stop, RunStopped):
            self._settle(self.current, stop.end)
            why = self._recorded(stop.end)
        else:
            if self.current is not None:
                self._forget(self.current)
            why = "no run was in progress"
        return self._stop(f"interrupted ({stop.how}); {why}", 128 + stop.signum)

    def _recorded(self, end: RunEnd) -> str:
        """What became of a stopped run, as results.tsv has it."""
        if end.run_id is None:
            return "the runner had not started a run yet: nothing to record"
        if self.jobs.row(end.run_id) is not None:
            return f"run {end.run_id} was stopped and recorded ({end.reason})"
        return (f"run {end.run_id} was stopped, but {self.results_path} has no row for it "
                f"(see {results.unrecorded_path(self.results_path)})")  # fmt: skip

    def _stop(self, why: str, code: int) -> int:
        self.workspace.reset()
        self.log("stop", reason=why, exit_code=code, kept=self.workspace.kept[:7],
                 clean=self.workspace.clean())  # fmt: skip
        return code
