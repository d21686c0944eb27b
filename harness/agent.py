"""`python -m harness agent`: propose a change, run it in tmux, keep it or reset, for hours.

    runs/agent-<tag>/worktree/     git worktree on branch autoresearch/<tag>: the only tree touched
    runs/agent-<tag>/agent.jsonl   every event: proposals, rejections with reasons, runs, decisions
    runs/agent-<tag>/agent.log     the same as lines to read (the tmux window "agent" follows it)
    runs/agent-<tag>/jobs/<n>/     the tmux job: job.sh, console.log, exit_code
    runs/agent-<tag>/optuna.db     the Optuna study (resumed when the agent restarts)

Each candidate train.py is a commit on the branch; a kept run leaves it there, anything else
(discard, crash, invalid, a rejected reply, a proposal that could not be applied) resets the
branch to the last kept commit. Optuna's candidates are flags for the kept train.py, so they add
no commit: their flags are in the row's config column and in the study. The runs themselves are
ordinary harness runs: rows in results.tsv, folders in runs/.

Ctrl-C, SIGTERM and SIGHUP stop the running experiment with the same signal (its runner writes
the row; the agent writes one itself if the runner died first), return the branch to the kept
commit and exit with 128 + the signal's number (130, 143, 129). A session killed outright leaves
its last job behind: the next session started with the same tag stops it if it still runs and
adopts its row, or records it as "interrupted (agent killed)".

The API key lives only in this process: the agent's environment is emptied of every
secret-looking variable while it runs, so neither git, tmux, the tmux server it starts, a pane,
nor a run inherits one, and the logs mask it.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from harness import paths, results
from harness.budget import TIME_BUDGET_SECONDS
from harness.evaluate import EVAL_TOKENS
from harness.proposers import Context, Proposal, Rejected, Result, dynamics_summary
from harness.runner import time_limit
from harness.sandbox import SECRET_ENV

PROGRAM_FILE = "program.md"
RESULTS_COMMAND = f"{shlex.quote(sys.executable)} -m harness status --follow"
EVAL_ALLOWANCE_SECONDS = 1200.0  # on top of the runner's train.py limit: loading + scoring
CRASH_STATUSES = ("crash", "invalid")
PASSED_ENV = re.compile(
    r"^(HARNESS_|HF_|CUDA_|TORCH|TRANSFORMERS_|OMP_|MKL_|PYTHON|PATH$|VIRTUAL_ENV$|LD_LIBRARY_PATH$)"
)
# the agent's commits are records of candidates: the user's hooks and signing do not apply to them
NO_HOOKS = ["-c", "core.hooksPath=/dev/null"]
COMMITTER = [*NO_HOOKS, "-c", "commit.gpgsign=false", "-c", "user.name=autoresearch",
             "-c", "user.email=autoresearch@localhost"]  # fmt: skip
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
CONSOLE_HEAD_BYTES = 65536  # the runner names its run in its first line
KILLED = "interrupted (agent killed)"
DIFF_LINES = 60  # of a proposal's diff, in agent.log
# what a terminal would act on (escapes start with ESC), and lone surrogates no file can hold
_UNPRINTABLE = re.compile(
    "[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069\ud800-\udfff]"
)
LONG_FIELDS = (
    "text",
    "train_py",
    "diff",
)  # agent.jsonl only (a diff also goes to agent.log, below its line)


@dataclass
class AgentConfig:
    tag: str
    max_experiments: int | None = (
        None  # proposals this session, rejected ones included; None: no limit
    )
    hours: float | None = None
    max_crashes: int = (
        5  # consecutive crashed/invalid/lost runs, failing proposers or proposals that cannot apply
    )
    budget_seconds: float = TIME_BUDGET_SECONDS
    eval_tokens: int = EVAL_TOKENS
    run_timeout: float | None = None  # whole run incl. evaluation; default time_limit + allowance
    train_args: list[str] = field(default_factory=list)  # appended to every candidate's flags
    track: str | None = None  # keep only rows in this bpw track (results.TRACKS); None: any
    session: str = "autoresearch"
    socket: str | None = None  # tmux -L socket; None: the default server
    results_command: str = RESULTS_COMMAND
    no_sandbox: bool = False  # passed to every `harness run`: only where bubblewrap cannot run


# --- signals ---


class Interrupt(KeyboardInterrupt):
    """Ctrl-C, SIGTERM or SIGHUP to the agent; `end` is the run it stopped, once recorded."""

    def __init__(self, signum: int = signal.SIGINT):
        super().__init__(signum)
        self.signum = signum
        self.end: RunEnd | None = None

    @property
    def how(self) -> str:
        return "Ctrl-C" if self.signum == signal.SIGINT else signal.Signals(self.signum).name


def as_interrupt(error: KeyboardInterrupt) -> Interrupt:
    return error if isinstance(error, Interrupt) else Interrupt(signal.SIGINT)


def _raise_interrupt(signum, frame) -> None:
    raise Interrupt(signum)


def _set_handlers(handler) -> dict:
    return {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}


def _restore_handlers(previous: dict) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)


@contextmanager
def stop_signals():
    """SIGTERM and SIGHUP raise Interrupt, as Ctrl-C does, while the loop runs."""
    previous = _set_handlers(_raise_interrupt)
    try:
        yield
    finally:
        _restore_handlers(previous)


@contextmanager
def held():
    """A signal that arrives inside is raised when the block ends: a git or tmux call is never
    cut in half (a commit leaving index.lock behind, a window made but not known)."""
    arrived = []
    previous = _set_handlers(lambda signum, frame: arrived.append(signum))
    try:
        yield
    finally:
        _restore_handlers(previous)
        if arrived:
            raise Interrupt(arrived[0])


def ignore_signals() -> None:
    """From the first interrupt on: nothing may cut short stopping and recording the run."""
    _set_handlers(signal.SIG_IGN)


@contextmanager
def environment_without_secrets():
    """Every secret-looking variable out of os.environ while the agent runs, so that no child
    (git and its hooks, tmux and the server it may start, and so every pane) inherits one."""
    removed = {name: os.environ.pop(name) for name in list(os.environ) if SECRET_ENV.search(name)}
    try:
        yield
    finally:
        os.environ.update(removed)


# --- the branch ---


def git(args: list[str], cwd: Path, check: bool = True) -> str:
    done = subprocess.run(
        ["git", *args], cwd=cwd, capture_output=True, text=True, errors="replace", timeout=120
    )
    if check and done.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout.strip()


class Workspace:
    """The agent's own worktree and branch; the user's checkout is never written."""

    def __init__(self, repo: Path, train_rel: Path, root: Path, branch: str):
        self.repo, self.branch, self.path = repo, branch, root / "worktree"
        self.train_py = self.path / train_rel
        self.created = False  # the branch is new this session
        if not (self.path / ".git").exists():
            git(["worktree", "prune"], repo)
            if git(["branch", "--list", branch], repo):
                git([*NO_HOOKS, "worktree", "add", str(self.path), branch], repo)
            else:
                git([*NO_HOOKS, "worktree", "add", "-b", branch, str(self.path), "HEAD"], repo)
                self.created = True
        # the last kept commit survives restarts: HEAD may be a candidate an interrupted session
        # left
        self.kept_file = root / "kept"
        recorded = self.kept_file.read_text().strip() if self.kept_file.exists() else ""
        self.keep(recorded if recorded and self._is_ancestor(recorded) else "HEAD")
        self.reset()

    def _is_ancestor(self, commit: str) -> bool:
        done = subprocess.run(
            ["git", "merge-base", "--is-ancestor", commit, "HEAD"],
            cwd=self.path,
            capture_output=True,
        )
        return done.returncode == 0

    def commit(self, message: str, train_py: str | None = None) -> str:
        """Commit train.py (written first when given) -> the short commit."""
        if train_py is not None:
            self.train_py.write_text(train_py)
        git(["add", "--", str(self.train_py)], self.path)
        git([*COMMITTER, "commit", "-q", "-m", message], self.path)
        return self.short()

    def short(self) -> str:
        return git(["rev-parse", "--short=7", "HEAD"], self.path)

    def keep(self, commit: str = "HEAD") -> None:
        self.kept = git(["rev-parse", "--verify", f"{commit}^{{commit}}"], self.path)
        self.kept_file.write_text(self.kept + "\n")

    def reset(self) -> None:
        git(["reset", "-q", "--hard", self.kept], self.path)
        git(["clean", "-q", "-fd"], self.path)

    def clean(self) -> bool:
        return (
            git(["status", "--porcelain", "--untracked-files=all"], self.path) == ""
            and self.head() == self.kept
        )

    def head(self) -> str:
        return git(["rev-parse", "HEAD"], self.path)


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


# --- the log ---


def _printable(text: str) -> str:
    return _UNPRINTABLE.sub("", text)


class AgentLog:
    """Every event as a JSON line (agent.jsonl), and as a line to read on stdout and in agent.log.
    Secrets are masked, and what a terminal would act on dropped, before anything is written."""

    def __init__(self, root: Path, secrets: list[str]):
        self.path, self.human = root / "agent.jsonl", root / "agent.log"
        self.secrets = [s for s in secrets if s]

    def _mask(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, "***")
        return text

    def __call__(self, event: str, **fields) -> None:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
        record = {"time": stamp, "event": event, **fields}
        with open(self.path, "a") as sink:
            sink.write(self._mask(json.dumps(record, default=str)) + "\n")
        shown = " ".join(f"{k}={v}" for k, v in fields.items() if k not in LONG_FIELDS)
        line = self._mask(" ".join(_printable(f"{event} {shown}").split()))
        below = [
            f"    {self._mask(_printable(part))}\n"
            for part in str(fields.get("diff") or "").splitlines()
        ]
        with open(self.human, "a", encoding="utf-8") as sink:
            sink.write(f"{stamp[11:]} {line}\n" + "".join(below))
        try:
            print(f"[agent] {line}"[:400], flush=True)
        except OSError:  # the terminal went away (SIGHUP): the files have it
            pass

    def events(self) -> list[dict]:
        if not self.path.exists():
            return []
        found = []
        for line in self.path.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a line torn by a kill
            if isinstance(record, dict):
                found.append(record)
        return found

    def run_ids(self) -> list[str]:
        return [e["run_id"] for e in self.events() if e.get("event") == "run" and e.get("run_id")]

    def unfinished(self) -> dict | None:
        """The last job started that no "run" event ended: what a killed session left behind."""
        pending = None
        for record in self.events():
            if record.get("event") == "started":
                pending = record
            elif record.get("event") == "run":
                pending = None
        return pending


def _diff(before: str, after: str) -> str:
    lines = list(
        difflib.unified_diff(
            before.splitlines(), after.splitlines(), "train.py", "train.py", n=1, lineterm=""
        )
    )
    shown = lines[2:][:DIFF_LINES]
    return "\n".join(
        shown
        + ([f"... {len(lines) - 2 - DIFF_LINES} more lines"] if len(lines) - 2 > DIFF_LINES else [])
    )


# --- runs ---


@dataclass
class RunEnd:
    job: str  # the job folder's name
    run_id: str | None  # None: the runner never named a run
    commit: str
    row: dict | None  # the run's row in results.tsv; None when it has none
    reason: str  # the row's reason; without a row, why there is none
    stopped: str = ""  # why the agent stopped the run, when it did
    written: bool = False  # the agent wrote the row: the runner died before its own


def _row_reason(row: dict) -> str:
    if row["status"] not in CRASH_STATUSES:
        return ""
    try:
        return str(json.loads(row["config"] or "{}").get("reason", ""))
    except (ValueError, AttributeError):
        return ""


def _tail_line(path: Path) -> str:
    try:
        with open(path, "rb") as handle:
            handle.seek(max(0, handle.seek(0, os.SEEK_END) - 4096))
            text = handle.read().decode(errors="replace")
    except OSError:
        return "(no output)"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:300] if lines else "(no output)"


class Agent:
    def __init__(
        self, config: AgentConfig, proposer, log: AgentLog, workspace: Workspace, tmux, root: Path
    ):
        self.config, self.proposer, self.log, self.workspace, self.tmux, self.root = (
            config, proposer, log, workspace, tmux, root)  # fmt: skip
        self.results_path = paths.results_path()
        self.runs_dir = paths.runs_dir()
        self.run_ids = log.run_ids()
        self.crash_log = ""
        self.jobs = len(list((root / "jobs").glob("*"))) if (root / "jobs").exists() else 0
        self.current: Proposal | None = None  # the proposal in flight, for an interrupt to settle
        self.last_failure = ""

    # --- one candidate in tmux ---

    def _script(self, proposal: Proposal, console: Path) -> str:
        # --description=TEXT: no description can be read as one of the runner's flags
        command = [sys.executable, "-m", "harness", "run", f"--description={proposal.description}",
                   "--budget", str(self.config.budget_seconds), "--eval-tokens", str(self.config.eval_tokens),
                   *(["--no-sandbox"] if self.config.no_sandbox else []),
                   "--", *self.config.train_args, *proposal.train_args]  # fmt: skip
        return "\n".join([
            f"cd {shlex.quote(str(paths.ROOT))}",
            # tee ignores the stop signals: it outlives the runner and logs its last lines
            f"{shlex.join(command)} 2>&1 | (trap '' INT TERM HUP; exec tee {shlex.quote(str(console))})",
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

    def _row(self, run_id: str | None) -> dict | None:
        if not run_id:
            return None
        frame = results.read(self.results_path)
        found = frame[frame["run_id"] == run_id]
        return found.iloc[-1].to_dict() if len(found) else None

    def run(self, proposal: Proposal, commit: str) -> RunEnd:
        self.jobs += 1
        window, job = f"exp{self.jobs}", f"{self.jobs:04d}"
        timeout = (
            self.config.run_timeout
            or time_limit(self.config.budget_seconds) + EVAL_ALLOWANCE_SECONDS
        )
        train_args = [*self.config.train_args, *proposal.train_args]
        running = None
        try:
            with (
                held()
            ):  # a signal during the tmux call is raised once the job exists, so it gets stopped
                running = self.tmux.start(window, self._script(proposal, self._console(job)), self.root / "jobs" / job,
                                          run_environment(self.workspace.train_py))  # fmt: skip
                self.log("started", job=job, window=window, commit=commit, args=train_args,
                         description=proposal.description)  # fmt: skip
            end = running.wait(timeout, poll=self._watch(job, proposal))
        except KeyboardInterrupt as error:
            stop = as_interrupt(error)
            ignore_signals()
            if running is not None:
                running.stop(stop.signum)  # the same signal: the runner records its run with it
            stop.end = self._ended(job, commit, proposal.description, train_args, f"interrupted ({stop.how})",
                                   stopped=f"the agent was interrupted ({stop.how})")  # fmt: skip
            raise stop from None
        except BaseException:
            if running is not None:
                running.stop(signal.SIGTERM)  # no run goes on unwatched
            raise
        if end.how == "timeout":
            why = f"the agent stopped the run after {timeout:.0f} s (run timeout)"
            return self._ended(job, commit, proposal.description, train_args, why, stopped=why)
        if end.how == "vanished":
            return self._ended(job, commit, proposal.description, train_args,
                               "the tmux pane or server disappeared during the run")  # fmt: skip
        return self._ended(job, commit, proposal.description, train_args,
                           f"the run ended (exit code {end.exit_code}) without a results row: "
                           + _tail_line(self._console(job)))  # fmt: skip

    def _watch(self, job: str, proposal: Proposal):
        """A poll for Job.wait: once the runner names its run, log it and tell the proposer."""
        named = []

        def poll() -> None:
            run_id = None if named else self._run_id(job)
            if run_id:
                named.append(run_id)
                self.log("running", job=job, run_id=run_id)
                if hasattr(self.proposer, "started"):
                    self.proposer.started(proposal, run_id)

        return poll

    def _ended(self, job: str, commit: str, description: str, train_args: list[str], reason: str,
               stopped: str = "") -> RunEnd:  # fmt: skip
        """How the job's run ended: its row (the runner's, or one written here with `reason` when
        the runner named its run but died before its row). The reason is always the row's."""
        run_id = self._run_id(job)
        row, written = self._row(run_id), False
        if row is None and run_id:
            row, written = self._crash_row(run_id, commit, description, train_args, reason)
        return RunEnd(
            job, run_id, commit, row, _row_reason(row) if row else reason, stopped, written
        )

    def _crash_row(self, run_id: str, commit: str, description: str, train_args: list[str],
                   reason: str) -> tuple[dict | None, bool]:  # fmt: skip
        """(the run's row, whether this wrote it). A row that appeared meanwhile (DuplicateRun) is
        the runner's; one results.tsv refuses goes to its side file, logged as unrecorded."""
        row = {"commit": commit, "run_id": run_id, "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S"), "status": "crash",
               "description": description,
               "config": {"train_args": train_args, "budget_seconds": self.config.budget_seconds, "reason": reason,
                          "recorded_by": "agent"}}  # fmt: skip
        try:
            results.append(row, self.results_path)
        except results.DuplicateRun:
            return self._row(run_id), False
        except results.ResultsError as error:
            self.log("unrecorded", run_id=run_id, error=str(error))
            return None, True
        return self._row(run_id), True

    # --- the loop ---

    def context(self) -> Context:
        program = self.workspace.path / PROGRAM_FILE
        frame = results.read(self.results_path)
        return Context(train_py=self.workspace.train_py.read_text(),
                       program=program.read_text() if program.exists() else "",
                       recent=frame[frame["run_id"].isin(self.run_ids)], crash_log=self.crash_log,
                       dynamics=dynamics_summary([self.runs_dir / run_id for run_id in self.run_ids]))  # fmt: skip

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
        self.log("start", tag=cfg.tag, branch=self.workspace.branch, worktree=str(self.workspace.path),
                 kept=self.workspace.kept[:7], session=cfg.session)  # fmt: skip
        try:
            self.reconcile()
            while True:
                if cfg.max_experiments is not None and done >= cfg.max_experiments:
                    return self._stop(f"{done} proposals this session (--max-experiments)", 0)
                if deadline is not None and time.monotonic() >= deadline:
                    return self._stop(f"{cfg.hours} hours are up (--hours)", 0)
                if crashes >= cfg.max_crashes:
                    return self._stop(f"{crashes} failures in a row (--max-crashes), the last: {self.last_failure}",
                                      1)  # fmt: skip
                done += 1
                failed = self.experiment(done)
                if failed:
                    crashes += 1
                elif failed is False:
                    crashes = 0
        except KeyboardInterrupt as error:
            return self._interrupted(as_interrupt(error))

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
            with held():
                commit = self._apply(proposal, number)
            end = self.run(proposal, commit)
        except Exception as error:  # a commit or write that failed, tmux refusing a window
            self._forget(proposal)
            return self._rejected(number, f"the proposal could not be applied or run: {type(error).__name__}: {error}",
                                  True)  # fmt: skip
        with held():
            result = self._settle(proposal, end)
        if result.status in CRASH_STATUSES:
            self.last_failure = f"run {end.run_id}: {result.status}: {end.reason}"
        return result.status in CRASH_STATUSES

    def _rejected(self, number: int, reason: str, failure: bool) -> bool | None:
        self.log("rejected", experiment=number, reason=reason)
        self.current = None
        if failure:
            self.last_failure = reason
        with held():
            self.workspace.reset()
        return True if failure else None

    def _apply(self, proposal: Proposal, number: int) -> str:
        """Commit the proposal's train.py (Optuna's flags need none) -> the commit it runs."""
        diff = ""
        if proposal.train_py is None:
            commit = self.workspace.short()
        else:
            diff = _diff(self.workspace.train_py.read_text(), proposal.train_py)
            commit = self.workspace.commit(proposal.description, proposal.train_py)
        self.log("proposal", experiment=number, commit=commit, description=proposal.description,
                 args=proposal.train_args, diff=diff, train_py=proposal.train_py)  # fmt: skip
        return commit

    def _forget(self, proposal: Proposal) -> None:
        """The proposal never ran: Optuna fails its trial."""
        if hasattr(self.proposer, "forget"):
            self.proposer.forget(proposal)

    def _settle(self, proposal: Proposal | None, end: RunEnd, **extra) -> Result:
        """Bookkeeping after a run: tell the proposer, keep its commit or reset to the kept one, log it."""
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
            self.crash_log = (
                "\n".join(log_file.read_text(errors="replace").splitlines()[-30:])
                if crashed
                else ""
            )
        row = end.row
        self.log("run", job=end.job, run_id=end.run_id, status=result.status, val_bpb=result.val_bpb,
                 bpw=row.get("bpw") if row else None, reason=end.reason, **({"stopped": end.stopped} if end.stopped else {}),
                 kept=self.workspace.kept[:7], **extra)  # fmt: skip
        self.current = None
        return result

    def reconcile(self) -> None:
        """What the last session left when it was killed: its job is stopped if it still runs, then
        its row adopted into the log, or one written for it (KILLED); never a second row. Then the
        proposer settles what it left (Optuna's running trials) from the results rows."""
        started = self.log.unfinished()
        if started is not None:
            with held():
                left = self.tmux.find(self.root / "jobs" / started["job"])
                if left is not None:
                    left.stop(signal.SIGTERM)  # its runner records it
                end = self._ended(started["job"], started["commit"], started.get("description", ""),
                                  started.get("args", []), KILLED,
                                  stopped="stopped by the next session" if left is not None else "")  # fmt: skip
                self._settle(
                    None,
                    end,
                    reconciled="adopted"
                    if end.row is not None and not end.written
                    else "interrupted",
                )
        if hasattr(self.proposer, "reconcile"):
            self.proposer.reconcile(results.read(self.results_path))

    def _interrupted(self, stop: Interrupt) -> int:
        """Ctrl-C, SIGTERM or SIGHUP: the run it stopped is settled, a proposal that never ran
        forgotten, the branch returned to the kept commit."""
        ignore_signals()
        if stop.end is not None:
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
        if self._row(end.run_id) is not None:
            return f"run {end.run_id} was stopped and recorded ({end.reason})"
        return (f"run {end.run_id} was stopped, but {self.results_path} has no row for it "
                f"(see {results.unrecorded_path(self.results_path)})")  # fmt: skip

    def _stop(self, why: str, code: int) -> int:
        self.workspace.reset()
        self.log(
            "stop",
            reason=why,
            exit_code=code,
            kept=self.workspace.kept[:7],
            clean=self.workspace.clean(),
        )
        return code


# --- command line ---

EPILOG = """\
Connect a model: any OpenAI-compatible chat-completions server. The key comes from OPENAI_API_KEY
(or --api-key, which ps shows); the agent keeps it to itself: no tmux pane, run, child or file gets it.
  OpenAI     --base-url https://api.openai.com/v1 --model gpt-4o-mini     OPENAI_API_KEY=sk-... (your key)
  vLLM       --base-url http://127.0.0.1:8000/v1 --model <the served model, as `vllm serve` names it>
             key: any non-empty string (the one given to `vllm serve --api-key`, if it was)
  llama.cpp  --base-url http://127.0.0.1:8080/v1 --model <any name>   (llama-server -m model.gguf --port 8080)
             key: any non-empty string (the one given to `llama-server --api-key`, if it was)
  Ollama     --base-url http://127.0.0.1:11434/v1 --model <a pulled model, e.g. qwen2.5-coder:7b>
             key: any non-empty string, e.g. OPENAI_API_KEY=ollama
Pass --context-tokens the context window the server gives the model (llama-server -c, Ollama's
num_ctx, vLLM's --max-model-len): the prompt is sized to it.

Exit: 0 --max-experiments or --hours reached; 1 --max-crashes failures in a row; 2 not in a git
repository; 130 Ctrl-C, 143 SIGTERM, 129 SIGHUP: the running experiment is stopped with that
signal and recorded, the branch left at the kept commit. A session killed outright (kill -9) is
reconciled by the next one with the same --tag."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--proposer", choices=("llm", "optuna"), default="llm")
    parser.add_argument(
        "--tag",
        default=time.strftime("%b%d").lower(),
        help="branch autoresearch/<tag> (default: today)",
    )
    parser.add_argument("--max-experiments", type=int,
                        help="stop after N proposals in this session, rejected ones included (a restart counts "
                             "afresh; 0: only reconcile what a killed session left)")  # fmt: skip
    parser.add_argument(
        "--hours", type=float, help="stop starting experiments after this many hours"
    )
    parser.add_argument("--max-crashes", type=int, default=5,
                        help="stop after N failures in a row: crashed or invalid runs, an unreachable or failing "
                             "proposer, proposals that cannot be applied (a rejected reply is none)")  # fmt: skip
    parser.add_argument(
        "--budget", type=float, default=TIME_BUDGET_SECONDS, help="training seconds per run"
    )
    parser.add_argument("--eval-tokens", type=int, default=EVAL_TOKENS)
    parser.add_argument("--run-timeout", type=float, help="seconds before the agent stops a run with SIGTERM "
                        "(default: the runner's limit + 20 min)")  # fmt: skip
    parser.add_argument(
        "--track",
        choices=[name for name, _ in results.TRACKS],
        help="keep only runs in this bpw track",
    )
    parser.add_argument(
        "--from-checkout",
        action="store_true",
        help="start a new branch from train.py as it is in your checkout, uncommitted changes "
        "included (committed on the agent's branch only; your checkout and index are untouched)",
    )
    parser.add_argument("--session", default="autoresearch", help="tmux session name")
    parser.add_argument("--socket", help="tmux socket name (tmux -L); default: the default server")
    parser.add_argument(
        "--results-command", default=RESULTS_COMMAND, help="what the results window runs"
    )
    parser.add_argument(
        "--no-sandbox",
        action="store_true",
        help="run proposed train.py files without bubblewrap: only where it cannot run",
    )
    llm = parser.add_argument_group(
        "llm proposer (OpenAI-compatible; key from OPENAI_API_KEY or --api-key)"
    )
    llm.add_argument("--model", default=os.environ.get("OPENAI_MODEL", "gpt-4o-mini"))
    llm.add_argument(
        "--base-url", default=None, help="e.g. http://127.0.0.1:8080/v1 (default: OPENAI_BASE_URL)"
    )
    llm.add_argument("--api-key", default=None, help="prefer OPENAI_API_KEY: flags show up in ps")
    llm.add_argument(
        "--context-tokens",
        type=int,
        default=32768,
        help="the model's context window: the prompt is sized to fit it with the reply (default 32768)",
    )
    llm.add_argument("--request-timeout", type=float, default=300.0, help="seconds per API call")
    llm.add_argument("--retries", type=int, default=3)
    llm.add_argument(
        "--backoff", type=float, default=2.0, help="seconds before the first retry (doubles)"
    )
    llm.add_argument("--max-tokens", type=int, default=2048, help="reply length cap")
    llm.add_argument(
        "--train-chars", type=int, help="show the model at most N characters of train.py"
    )
    opt = parser.add_argument_group("optuna proposer")
    opt.add_argument(
        "--search-space", type=Path, help="default: search_space.json next to train.py"
    )
    opt.add_argument("--seed", type=int, default=None)


def _start_point(from_checkout: bool, log: AgentLog, workspace: Workspace, script: Path, train_rel: Path,
                 uncommitted: bool) -> None:  # fmt: skip
    """A new branch starts from the checkout's uncommitted train.py with --from-checkout;
    otherwise uncommitted changes there are not on the branch, and the user is told so."""
    if uncommitted and from_checkout and workspace.created:
        workspace.train_py.write_bytes(script.read_bytes())
        workspace.keep(
            workspace.commit(f"{train_rel} as in the checkout, uncommitted changes included")
        )
        log("from_checkout", commit=workspace.kept[:7], train_py=str(script))
    elif uncommitted and from_checkout:
        log("warning", reason=f"--from-checkout: branch {workspace.branch} exists, so it continues from its kept "
                              f"commit {workspace.kept[:7]} without your uncommitted changes to {train_rel}; "
                              "a new --tag starts from them")  # fmt: skip
    elif uncommitted:
        log("warning", reason=f"{train_rel} in your checkout has uncommitted changes that branch {workspace.branch} "
                              f"does not have: it {'starts' if workspace.created else 'continues'} from commit "
                              f"{workspace.kept[:7]}. Commit them, or start a new --tag with --from-checkout")  # fmt: skip


def main(args: argparse.Namespace) -> int:
    api_key = args.api_key or os.environ.get("OPENAI_API_KEY")
    with environment_without_secrets():
        return _main(args, api_key)


def _main(args: argparse.Namespace, api_key: str | None) -> int:
    from harness.proposers import LLMConfig, LLMProposer, OptunaProposer, load_search_space
    from harness.runner import check_ready
    from harness.sandbox import SANDBOX_BWRAP, SANDBOX_NONE
    from harness.tmux import Tmux

    problem = check_ready(args.eval_tokens, SANDBOX_NONE if args.no_sandbox else SANDBOX_BWRAP)
    if problem:  # one line now, not a failed run per proposal
        print(f"error: {problem}", file=sys.stderr)
        return 2
    script = paths.train_script()
    try:
        repo = Path(git(["rev-parse", "--show-toplevel"], script.parent))
    except (RuntimeError, OSError):
        print(
            f"error: {script} is not in a git repository; the agent commits candidates on a branch",
            file=sys.stderr,
        )
        return 2
    train_rel = script.resolve().relative_to(repo.resolve())
    root = paths.runs_dir() / f"agent-{args.tag}"
    root.mkdir(parents=True, exist_ok=True)
    log = AgentLog(root, secrets=[api_key] if api_key else [])
    uncommitted = git(["status", "--porcelain", "--", str(train_rel)], repo) != ""
    workspace = Workspace(repo, train_rel, root, f"autoresearch/{args.tag}")
    if args.proposer == "llm":
        proposer = LLMProposer(LLMConfig(model=args.model, base_url=args.base_url, api_key=api_key,
                                         timeout=args.request_timeout, retries=args.retries, backoff=args.backoff,
                                         max_tokens=args.max_tokens, train_chars=args.train_chars,
                                         context_tokens=args.context_tokens), log=log)  # fmt: skip
        log("proposer", kind="llm", model=args.model, base_url=str(proposer.client.base_url),
            context_tokens=args.context_tokens)  # fmt: skip
    else:
        space_file = args.search_space or workspace.train_py.parent / "search_space.json"
        proposer = OptunaProposer(load_search_space(space_file), root / "optuna.db", study_name=args.tag,
                                  seed=args.seed, log=log)  # fmt: skip
        log(
            "proposer",
            kind="optuna",
            search_space=str(space_file),
            trials_so_far=len(proposer.study.trials),
        )
    _start_point(args.from_checkout, log, workspace, script, train_rel, uncommitted)
    config = AgentConfig(tag=args.tag, max_experiments=args.max_experiments, hours=args.hours,
                         max_crashes=args.max_crashes, budget_seconds=args.budget, eval_tokens=args.eval_tokens,
                         run_timeout=args.run_timeout, train_args=args.train_args, track=args.track,
                         session=args.session, socket=args.socket, results_command=args.results_command,
                         no_sandbox=args.no_sandbox)  # fmt: skip
    tmux = Tmux(config.results_command, cwd=paths.ROOT, session_name=config.session, socket_name=config.socket,
                environment=run_environment(workspace.train_py), log_file=log.human)  # fmt: skip
    tmux.session()
    socket = f"-L {config.socket} " if config.socket else ""
    print(
        f"[agent] watch it: tmux {socket}attach -t {config.session} (windows: results, agent: this log, exp<N>: runs)"
    )
    with stop_signals():
        return Agent(config, proposer, log, workspace, tmux, root).loop()
