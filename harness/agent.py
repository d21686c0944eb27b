"""`python -m harness agent`: propose a change, run it in tmux, keep it or reset, for hours.

    runs/agent-<tag>/worktree/     git worktree on branch autoresearch/<tag>: the only tree touched
    runs/agent-<tag>/agent.jsonl   every event: proposals, rejections with reasons, runs, decisions
    runs/agent-<tag>/jobs/<n>/     the tmux job: job.sh, console.log, exit_code
    runs/agent-<tag>/optuna.db     the Optuna study (resumed when the agent restarts)

Each candidate train.py is a commit on the branch; a kept run leaves it there, anything else
(discard, crash, invalid, a rejected reply) resets the branch to the last kept commit. Optuna's
candidates are flags for the kept train.py, so they add no commit: their flags are in the row's
config column and in the study. The runs themselves are ordinary harness runs: rows in
results.tsv, folders in runs/.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from harness import paths, results
from harness.budget import TIME_BUDGET_SECONDS
from harness.evaluate import EVAL_TOKENS
from harness.proposers import Context, Proposal, Rejected, Result
from harness.runner import time_limit

PROGRAM_FILE = "program.md"
RESULTS_COMMAND = f"{shlex.quote(sys.executable)} -m harness status --follow"
EVAL_ALLOWANCE_SECONDS = 1200.0  # on top of the runner's train.py limit: loading + scoring
CRASH_STATUSES = ("crash", "invalid")
SECRET_ENV = ("OPENAI_API_KEY",)  # never passed to a run: train.py is code the LLM wrote
PASSED_ENV = re.compile(r"^(HARNESS_|HF_|CUDA_|TORCH|TRANSFORMERS_|OMP_|MKL_|PYTHON|PATH$|VIRTUAL_ENV$|LD_LIBRARY_PATH$)")
AUTHOR = ["-c", "user.name=autoresearch", "-c", "user.email=autoresearch@localhost"]


@dataclass
class AgentConfig:
    tag: str
    max_experiments: int | None = None  # proposals, rejected ones included; None: no limit
    hours: float | None = None
    max_crashes: int = 5  # consecutive crashed/invalid/lost runs or unreachable proposers
    budget_seconds: float = TIME_BUDGET_SECONDS
    eval_tokens: int = EVAL_TOKENS
    run_timeout: float | None = None  # whole run incl. evaluation; default time_limit + allowance
    train_args: list[str] = field(default_factory=list)  # appended to every candidate's flags
    track: str | None = None  # keep only rows in this bpw track (results.TRACKS); None: any
    session: str = "autoresearch"
    socket: str | None = None  # tmux -L socket; None: the default server
    results_command: str = RESULTS_COMMAND
    no_sandbox: bool = False  # passed to every `harness run`: only where bubblewrap cannot run


def git(args: list[str], cwd: Path, check: bool = True) -> str:
    done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=120)
    if check and done.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout.strip()


class Workspace:
    """The agent's own worktree and branch; the user's checkout is never written."""

    def __init__(self, repo: Path, train_rel: Path, root: Path, branch: str):
        self.repo, self.branch, self.path = repo, branch, root / "worktree"
        self.train_py = self.path / train_rel
        if not (self.path / ".git").exists():
            git(["worktree", "prune"], repo)
            if git(["branch", "--list", branch], repo):
                git(["worktree", "add", str(self.path), branch], repo)
            else:
                git(["worktree", "add", "-b", branch, str(self.path), "HEAD"], repo)
        # the last kept commit survives restarts: HEAD may be a candidate an interrupted session left
        self.kept_file = root / "kept"
        recorded = self.kept_file.read_text().strip() if self.kept_file.exists() else ""
        self.kept = recorded if recorded and self._is_ancestor(recorded) else git(["rev-parse", "HEAD"], self.path)
        self.keep(self.kept)
        self.reset()

    def _is_ancestor(self, commit: str) -> bool:
        done = subprocess.run(["git", "merge-base", "--is-ancestor", commit, "HEAD"], cwd=self.path, capture_output=True)
        return done.returncode == 0

    def commit(self, train_py: str, message: str) -> str:
        self.train_py.write_text(train_py)
        git([*AUTHOR, "commit", "-q", "-m", message, "--", str(self.train_py)], self.path)
        return git(["rev-parse", "--short=7", "HEAD"], self.path)

    def keep(self, commit: str | None = None) -> None:
        self.kept = commit or git(["rev-parse", "HEAD"], self.path)
        self.kept_file.write_text(self.kept + "\n")

    def reset(self) -> None:
        git(["reset", "-q", "--hard", self.kept], self.path)
        git(["clean", "-q", "-fd"], self.path)

    def clean(self) -> bool:
        return git(["status", "--porcelain", "--untracked-files=all"], self.path) == "" and self.head() == self.kept

    def head(self) -> str:
        return git(["rev-parse", "HEAD"], self.path)


def _pythonpath() -> str:
    """The harness first (the run imports it from this checkout), then the user's entries."""
    entries = [str(paths.ROOT), *os.environ.get("PYTHONPATH", "").split(os.pathsep)]
    return os.pathsep.join(dict.fromkeys(entry for entry in entries if entry))


def run_environment(train_py: Path) -> dict[str, str]:
    """What a run's pane needs, explicitly: the tmux server may have been started long ago by
    someone else. The harness reads the user's data, runs/ and results.tsv, and the worktree's
    train.py; the API key is never passed."""
    env = {k: v for k, v in os.environ.items() if PASSED_ENV.match(k) and k not in SECRET_ENV}
    env.update(HARNESS_TRAIN_SCRIPT=str(train_py), HARNESS_DATA_DIR=str(paths.data_dir()),
               HARNESS_RUNS_DIR=str(paths.runs_dir()), HARNESS_RESULTS=str(paths.results_path()),
               PYTHONPATH=_pythonpath(), PYTHONUNBUFFERED="1")  # fmt: skip
    return env


class AgentLog:
    """JSON lines on disk, one short line each on stdout. Secrets are masked before either."""

    def __init__(self, path: Path, secrets: list[str]):
        self.path = path
        self.secrets = [s for s in secrets if s]

    def _mask(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, "***")
        return text

    def __call__(self, event: str, **fields) -> None:
        record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "event": event, **fields}
        with open(self.path, "a") as sink:
            sink.write(self._mask(json.dumps(record, default=str)) + "\n")
        shown = {k: v for k, v in fields.items() if k not in ("text", "train_py")}
        print(self._mask(f"[agent] {event} " + " ".join(f"{k}={v}" for k, v in shown.items()))[:400], flush=True)

    def run_ids(self) -> list[str]:
        if not self.path.exists():
            return []
        ids = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if record.get("event") == "run" and record.get("run_id"):
                ids.append(record["run_id"])
        return ids


@dataclass
class RunEnd:
    run_id: str | None
    row: dict | None  # the results row, None when no run started
    reason: str


class Agent:
    def __init__(self, config: AgentConfig, proposer, log: AgentLog, workspace: Workspace, tmux, root: Path):
        self.config, self.proposer, self.log, self.workspace, self.tmux, self.root = (
            config, proposer, log, workspace, tmux, root)  # fmt: skip
        self.results_path = paths.results_path()
        self.runs_dir = paths.runs_dir()
        self.run_ids = log.run_ids()
        self.crash_log = ""
        self.jobs = len(list((root / "jobs").glob("*"))) if (root / "jobs").exists() else 0

    # --- one candidate in tmux ---

    def _script(self, proposal: Proposal, console: Path) -> str:
        command = [sys.executable, "-m", "harness", "run", "--description", proposal.description,
                   "--budget", str(self.config.budget_seconds), "--eval-tokens", str(self.config.eval_tokens),
                   *(["--no-sandbox"] if self.config.no_sandbox else []),
                   "--", *self.config.train_args, *proposal.train_args]  # fmt: skip
        return "\n".join([
            f"unset {' '.join(SECRET_ENV)}",
            f"cd {shlex.quote(str(paths.ROOT))}",
            f"{shlex.join(command)} 2>&1 | tee {shlex.quote(str(console))}",
            "(exit ${PIPESTATUS[0]})",
        ])  # fmt: skip

    def _row(self, run_id: str | None) -> dict | None:
        if not run_id:
            return None
        frame = results.read(self.results_path)
        found = frame[frame["run_id"] == run_id]
        return found.iloc[-1].to_dict() if len(found) else None

    def run(self, proposal: Proposal, commit: str) -> RunEnd:
        self.jobs += 1
        job_dir = self.root / "jobs" / f"{self.jobs:04d}"
        console = job_dir / "console.log"
        timeout = self.config.run_timeout or time_limit(self.config.budget_seconds) + EVAL_ALLOWANCE_SECONDS
        script = self._script(proposal, console)
        job = self.tmux.start(f"exp{self.jobs}", script, job_dir, run_environment(self.workspace.train_py))
        self.log("started", job=job_dir.name, window=f"exp{self.jobs}", commit=commit, args=proposal.train_args)
        interrupted = False
        try:
            end = job.wait(timeout)
        except KeyboardInterrupt:
            interrupted, end = True, None
        text = console.read_text(errors="replace") if console.exists() else ""
        match = re.search(r"^run (\S+): ", text, re.MULTILINE)
        run_id = match.group(1) if match else None
        row = self._row(run_id)
        if interrupted:
            reason = "interrupted (Ctrl-C)"
        elif end.how == "timeout":
            reason = f"the agent stopped the run after {timeout:.0f} s (run timeout)"
        elif end.how == "vanished":
            reason = "the tmux pane or server disappeared during the run"
        elif row is None:
            reason = f"the run ended (exit code {end.exit_code}) without a results row: " + _last_line(text)
        else:
            reason = json.loads(row["config"] or "{}").get("reason", "") if row["status"] in CRASH_STATUSES else ""
        if row is None and run_id:  # the runner died before its row: the run still gets one
            row = self._crash_row(run_id, commit, proposal, reason)
        if run_id:
            self.run_ids.append(run_id)
            log_file = self.runs_dir / run_id / "run.log"
            if row["status"] in CRASH_STATUSES and log_file.exists():
                self.crash_log = "\n".join(log_file.read_text(errors="replace").splitlines()[-30:])
        if interrupted:
            raise KeyboardInterrupt(RunEnd(run_id, row, reason))
        return RunEnd(run_id, row, reason)

    def _crash_row(self, run_id: str, commit: str, proposal: Proposal, reason: str) -> dict:
        row = {"commit": commit, "run_id": run_id, "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S"), "status": "crash",
               "description": proposal.description,
               "config": {"train_args": [*self.config.train_args, *proposal.train_args],
                          "budget_seconds": self.config.budget_seconds, "reason": reason}}  # fmt: skip
        results.append(row, self.results_path)
        return row

    # --- the loop ---

    def context(self) -> Context:
        program = self.workspace.path / PROGRAM_FILE
        frame = results.read(self.results_path)
        return Context(train_py=self.workspace.train_py.read_text(),
                       program=program.read_text() if program.exists() else "",
                       recent=frame[frame["run_id"].isin(self.run_ids)], crash_log=self.crash_log)  # fmt: skip

    def decide(self, end: RunEnd) -> Result:
        row = end.row
        if row is None:
            return Result("crash", None)
        bpb = row.get("val_bpb")
        bpb = None if bpb is None or bpb != bpb else float(bpb)  # NaN: no metric
        in_track = self.config.track is None or results.bpw_track(row.get("bpw")) == self.config.track
        if row["status"] == "keep" and not in_track:
            return Result("discard", None)
        return Result(row["status"], bpb if in_track else None)

    def loop(self) -> int:
        cfg = self.config
        deadline = time.monotonic() + cfg.hours * 3600 if cfg.hours is not None else None
        crashes, done = 0, 0
        self.log("start", tag=cfg.tag, branch=self.workspace.branch, worktree=str(self.workspace.path),
                 kept=self.workspace.kept[:7], session=cfg.session)  # fmt: skip
        while True:
            if cfg.max_experiments is not None and done >= cfg.max_experiments:
                return self._stop(f"{done} experiments done (--max-experiments)", 0)
            if deadline is not None and time.monotonic() >= deadline:
                return self._stop(f"{cfg.hours} hours are up (--hours)", 0)
            if crashes >= cfg.max_crashes:
                return self._stop(f"{crashes} failures in a row (--max-crashes): fix train.py or the proposer", 1)
            done += 1
            proposal = None
            try:
                proposal = self.proposer.propose(self.context())
            except Rejected as why:
                self.log("rejected", experiment=done, reason=str(why))
                crashes += str(why).startswith("API")  # an unreachable server is a failure, a bad edit is not
                self.workspace.reset()
                continue
            except KeyboardInterrupt:
                self.workspace.reset()
                return self._stop("interrupted (Ctrl-C) while waiting for a proposal", 130)
            try:
                commit = self.workspace.commit(proposal.train_py, proposal.description) if proposal.train_py else \
                    git(["rev-parse", "--short=7", "HEAD"], self.workspace.path)  # fmt: skip
                self.log("proposal", experiment=done, commit=commit, description=proposal.description,
                         train_py=proposal.train_py)  # fmt: skip
                end = self.run(proposal, commit)
            except KeyboardInterrupt as stop:
                end = stop.args[0] if stop.args and isinstance(stop.args[0], RunEnd) else None
                self._settle(proposal, end)
                return self._stop("interrupted (Ctrl-C); the run was stopped and recorded", 130)
            result = self._settle(proposal, end)
            crashes = crashes + 1 if result.status in CRASH_STATUSES else 0

    def _settle(self, proposal: Proposal, end: RunEnd | None) -> Result:
        """Bookkeeping after a run: tell the proposer, keep the commit or reset to the kept one."""
        result = self.decide(end) if end else Result("crash", None)
        if hasattr(self.proposer, "tell"):
            self.proposer.tell(proposal, result)
        if result.status == "keep":
            self.workspace.keep()
        else:
            self.workspace.reset()
        row = end.row if end else None
        self.log("run", run_id=end.run_id if end else None, status=result.status, val_bpb=result.val_bpb,
                 bpw=row.get("bpw") if row else None, reason=end.reason if end else "interrupted before the run",
                 kept=self.workspace.kept[:7])  # fmt: skip
        return result

    def _stop(self, why: str, code: int) -> int:
        self.workspace.reset()
        self.log("stop", reason=why, kept=self.workspace.kept[:7], clean=self.workspace.clean())
        return code


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:300] if lines else "(no output)"


# --- command line ---


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--proposer", choices=("llm", "optuna"), default="llm")
    parser.add_argument("--tag", default=time.strftime("%b%d").lower(), help="branch autoresearch/<tag> (default: today)")
    parser.add_argument("--max-experiments", type=int, help="stop after N proposals (rejected ones count)")
    parser.add_argument("--hours", type=float, help="stop starting experiments after this many hours")
    parser.add_argument("--max-crashes", type=int, default=5, help="stop after N failures in a row")
    parser.add_argument("--budget", type=float, default=TIME_BUDGET_SECONDS, help="training seconds per run")
    parser.add_argument("--eval-tokens", type=int, default=EVAL_TOKENS)
    parser.add_argument("--run-timeout", type=float, help="seconds before the agent stops a run (default: the runner's "
                        "limit + 20 min)")  # fmt: skip
    parser.add_argument("--track", choices=[name for name, _ in results.TRACKS], help="keep only runs in this bpw track")
    parser.add_argument("--session", default="autoresearch", help="tmux session name")
    parser.add_argument("--socket", help="tmux socket name (tmux -L); default: the default server")
    parser.add_argument("--results-command", default=RESULTS_COMMAND, help="what the results window runs")
    parser.add_argument("--no-sandbox", action="store_true",
                        help="run proposed train.py files without bubblewrap: only where it cannot run")
    llm = parser.add_argument_group("llm proposer (OpenAI-compatible; key from --api-key or OPENAI_API_KEY)")
    llm.add_argument("--model", default=os.environ.get("OPENAI_MODEL", "gpt-4o-mini"))
    llm.add_argument("--base-url", default=None, help="e.g. http://127.0.0.1:8080/v1 (default: OPENAI_BASE_URL)")
    llm.add_argument("--api-key", default=None, help="prefer OPENAI_API_KEY: flags show up in ps")
    llm.add_argument("--request-timeout", type=float, default=300.0, help="seconds per API call")
    llm.add_argument("--retries", type=int, default=3)
    llm.add_argument("--backoff", type=float, default=2.0, help="seconds before the first retry (doubles)")
    llm.add_argument("--max-tokens", type=int, default=2048, help="reply length cap")
    llm.add_argument("--train-chars", type=int, help="show the model only the first N characters of train.py")
    opt = parser.add_argument_group("optuna proposer")
    opt.add_argument("--search-space", type=Path, help="default: search_space.json next to train.py")
    opt.add_argument("--seed", type=int, default=None)


def main(args: argparse.Namespace) -> int:
    from harness.proposers import LLMConfig, LLMProposer, OptunaProposer, load_search_space
    from harness.tmux import Tmux

    script = paths.train_script()
    try:
        repo = Path(git(["rev-parse", "--show-toplevel"], script.parent))
    except (RuntimeError, OSError):
        print(f"error: {script} is not in a git repository; the agent commits candidates on a branch", file=sys.stderr)
        return 2
    root = paths.runs_dir() / f"agent-{args.tag}"
    root.mkdir(parents=True, exist_ok=True)
    api_key = args.api_key or os.environ.get("OPENAI_API_KEY")
    log = AgentLog(root / "agent.jsonl", secrets=[api_key] if api_key else [])
    workspace = Workspace(repo, script.resolve().relative_to(repo.resolve()), root, f"autoresearch/{args.tag}")
    if args.proposer == "llm":
        proposer = LLMProposer(LLMConfig(model=args.model, base_url=args.base_url, api_key=api_key,
                                         timeout=args.request_timeout, retries=args.retries, backoff=args.backoff,
                                         max_tokens=args.max_tokens, train_chars=args.train_chars), log=log)  # fmt: skip
        log("proposer", kind="llm", model=args.model, base_url=str(proposer.client.base_url))
    else:
        space_file = args.search_space or workspace.train_py.parent / "search_space.json"
        proposer = OptunaProposer(load_search_space(space_file), root / "optuna.db", study_name=args.tag,
                                  seed=args.seed, log=log)  # fmt: skip
        log("proposer", kind="optuna", search_space=str(space_file), trials_so_far=len(proposer.study.trials))
    config = AgentConfig(tag=args.tag, max_experiments=args.max_experiments, hours=args.hours,
                         max_crashes=args.max_crashes, budget_seconds=args.budget, eval_tokens=args.eval_tokens,
                         run_timeout=args.run_timeout, train_args=args.train_args, track=args.track,
                         session=args.session, socket=args.socket, results_command=args.results_command,
                         no_sandbox=args.no_sandbox)  # fmt: skip
    tmux = Tmux(config.results_command, cwd=paths.ROOT, session_name=config.session, socket_name=config.socket,
                environment=run_environment(workspace.train_py))  # fmt: skip
    tmux.session()
    print(f"[agent] watch it: tmux {'-L ' + config.socket + ' ' if config.socket else ''}attach -t {config.session}")
    return Agent(config, proposer, log, workspace, tmux, root).loop()
