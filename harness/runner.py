"""One experiment, start to row: run train.py, verify and score its artifact, append the row.

    runs/<run_id>/train.py     the exact train.py that ran
    runs/<run_id>/run.log      everything it (and the evaluation) printed
    runs/<run_id>/train.json   what train.py says about itself (steps, tokens, config; untrusted)
    runs/<run_id>/artifact/    what it exported
    runs/<run_id>/eval.json    the harness's verdict: verified bpw/size and bits per byte

train.py runs in its own process group with a hard wall-clock limit; the evaluation runs in a
second process on the artifact alone. Every outcome, a crash, a hang, an invalid artifact or
Ctrl-C, ends as a row with a reason. Only numbers the harness measured reach the metric columns.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from harness import paths, results
from harness.budget import BUDGET_ENV, TIME_BUDGET_SECONDS
from harness.data import DataError, load_prepared
from harness.evaluate import EVAL_TOKENS

RUN_DIR_ENV = "HARNESS_RUN_DIR"  # tells train.py where to write, and that the harness is watching
EVAL_TIMEOUT_SECONDS = 3600.0
KILL_GRACE_SECONDS = 10.0  # between SIGTERM and SIGKILL


def hard_limit(budget_seconds: float) -> float:
    """train.py's whole wall time: the budget plus room for loading, warm-up and export."""
    return budget_seconds * 1.25 + 180.0


@dataclass
class RunSpec:
    train_args: list[str] = field(default_factory=list)
    description: str = ""
    budget_seconds: float = TIME_BUDGET_SECONDS
    eval_tokens: int = EVAL_TOKENS
    train_script: Path = field(default_factory=paths.train_script)
    results_path: Path = field(default_factory=paths.results_path)
    runs_dir: Path = field(default_factory=paths.runs_dir)
    time_limit: float | None = None  # default: hard_limit(budget_seconds)
    echo: bool = True  # also stream train.py's output to this process's stdout


@dataclass
class RunOutcome:
    run_id: str
    run_dir: Path
    status: str
    reason: str
    row: dict


def _git(args: list[str], cwd: Path) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def commit_of(script: Path) -> str:
    """Short commit of the repo holding train.py, marked -dirty if train.py differs from it."""
    head = _git(["rev-parse", "--short=7", "HEAD"], script.parent)
    if head is None:
        return ""
    changed = _git(["status", "--porcelain", "--", script.name], script.parent)
    return f"{head}-dirty" if changed else head


def _tail_reason(log: Path, fallback: str) -> str:
    """The last informative line of a log: usually the exception."""
    try:
        lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return fallback
    return lines[-1][:300] if lines else fallback


def _run_logged(command: list[str], log: Path, env: dict, cwd: Path, limit: float, echo: bool) -> tuple[int | None, float]:
    """Run `command` in its own process group, teeing output to `log`. Returns (exit code or None
    if it was killed at `limit`, peak resident memory in GB measured by the kernel)."""
    with open(log, "ab") as sink:
        child = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, start_new_session=True)

        def pump() -> None:
            for chunk in iter(lambda: child.stdout.read1(65536), b""):
                sink.write(chunk)
                sink.flush()
                if echo:
                    sys.stdout.buffer.write(chunk)
                    sys.stdout.buffer.flush()

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            code, usage = _wait(child, time.monotonic() + limit)
        except BaseException:  # Ctrl-C included: never leave a training process behind
            _stop_group(child)
            raise
        finally:
            child.returncode = -1  # reaped by wait4; keeps Popen from reaping it again
            reader.join(timeout=5)
    return code, usage.ru_maxrss / 1024**2


def _wait(child: subprocess.Popen, deadline: float):
    """(exit code, rusage) of the group leader, or (None, rusage) after stopping it at `deadline`."""
    while True:
        pid, status, usage = os.wait4(child.pid, os.WNOHANG)
        if pid:
            _kill_group(child.pid, signal.SIGKILL)  # stray grandchildren go with it
            return os.waitstatus_to_exitcode(status), usage
        if time.monotonic() > deadline:
            return None, _stop_group(child)
        time.sleep(0.2)


def _kill_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def _stop_group(child: subprocess.Popen):
    """SIGTERM the whole process group, SIGKILL it after a grace period; returns the leader's rusage."""
    _kill_group(child.pid, signal.SIGTERM)
    grace_ends = time.monotonic() + KILL_GRACE_SECONDS
    while time.monotonic() < grace_ends:
        pid, _, usage = os.wait4(child.pid, os.WNOHANG)
        if pid:
            _kill_group(child.pid, signal.SIGKILL)
            return usage
        time.sleep(0.1)
    _kill_group(child.pid, signal.SIGKILL)
    return os.wait4(child.pid, 0)[2]


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
        return value if isinstance(value, dict) else {}
    except (OSError, ValueError):
        return {}


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(2)


def run_experiment(spec: RunSpec) -> RunOutcome:
    run_id = new_run_id()
    run_dir = spec.runs_dir / run_id
    run_dir.mkdir(parents=True)
    script = spec.train_script.resolve()
    (run_dir / "train.py").write_bytes(script.read_bytes())
    log = run_dir / "run.log"
    commit = commit_of(script)
    env = {**os.environ, RUN_DIR_ENV: str(run_dir), BUDGET_ENV: str(spec.budget_seconds), "PYTHONUNBUFFERED": "1"}
    limit = spec.time_limit or hard_limit(spec.budget_seconds)
    started = time.time()
    print(f"run {run_id}: python {script.name} {' '.join(spec.train_args)}", flush=True)

    status, reason, verdict, peak_gb = "crash", "", {}, None
    try:
        code, peak_gb = _run_logged([sys.executable, str(script), *spec.train_args], log, env, script.parent, limit, spec.echo)
        train_info = _read_json(run_dir / "train.json")
        artifact = run_dir / "artifact"
        if code is None:
            reason = f"killed after {limit:.0f} s (budget {spec.budget_seconds:.0f} s): hung or overran"
        elif code != 0:
            reason = train_info.get("reason") or _tail_reason(log, f"train.py exited with code {code}")
        elif not (artifact / "quant.json").exists():
            reason = train_info.get("reason") or "train.py exited without exporting an artifact"
        else:
            command = [sys.executable, "-m", "harness.evaluate", str(artifact), "--out", str(run_dir / "eval.json"),
                       "--eval-tokens", str(spec.eval_tokens)]  # fmt: skip
            code, _ = _run_logged(command, log, env, paths.ROOT, EVAL_TIMEOUT_SECONDS, spec.echo)
            verdict = _read_json(run_dir / "eval.json")
            if code != 0 or "status" not in verdict:
                reason = "evaluation failed: " + _tail_reason(log, f"exit code {code}")
            elif verdict["status"] == "invalid":
                status, reason = "invalid", verdict.get("reason", "")
            else:
                status = "valid"
    except KeyboardInterrupt:
        train_info, reason = _read_json(run_dir / "train.json"), "interrupted (Ctrl-C)"
        _record(spec, run_id, run_dir, commit, "crash", reason, train_info, {}, None, started)
        raise
    return _record(spec, run_id, run_dir, commit, status, reason, train_info, verdict, peak_gb, started)


def _record(spec, run_id, run_dir, commit, status, reason, train_info, verdict, peak_gb, started) -> RunOutcome:
    model = train_info.get("model", "")
    eval_set = verdict.get("eval_set", "")
    if status == "valid":
        if train_info.get("baseline"):
            status = "baseline"
        else:
            status = results.decide(verdict["val_bpb"], verdict["bpw"], eval_set, model, results.read(spec.results_path))
    config = {**train_info.get("config", {}), "train_args": spec.train_args, "budget_seconds": spec.budget_seconds}
    if reason:
        config["reason"] = reason
    row = {
        "commit": commit,
        "run_id": run_id,
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "status": status,
        "val_bpb": verdict.get("val_bpb"),
        "val_ppl": verdict.get("val_ppl"),
        "bpw": verdict.get("bpw"),
        "size_mb": verdict.get("size_mb"),
        "steps": train_info.get("steps"),
        "train_tokens": train_info.get("train_tokens"),
        "train_seconds": train_info.get("train_seconds"),
        "peak_mem_gb": peak_gb,
        "eval_set": eval_set,
        "model": model,
        "description": spec.description or train_info.get("description", ""),
        "config": config,
    }
    results.append(row, spec.results_path)
    summary = format_summary(row, reason, time.time() - started)
    print(summary, flush=True)
    with open(run_dir / "run.log", "a") as log:
        log.write(summary + "\n")
    return RunOutcome(run_id, run_dir, status, reason, row)


def format_summary(row: dict, reason: str, total_seconds: float) -> str:
    """The grep-able block every run ends with: `grep '^val_bpb:' run.log`."""

    def show(value, fmt: str) -> str:
        return "" if value is None else fmt.format(value)

    lines = [
        "---",
        f"val_bpb:          {show(row['val_bpb'], '{:.6f}')}",
        f"val_ppl:          {show(row['val_ppl'], '{:.4f}')}",
        f"bpw:              {show(row['bpw'], '{:.4f}')}",
        f"size_mb:          {show(row['size_mb'], '{:.2f}')}",
        f"training_seconds: {show(row['train_seconds'], '{:.1f}')}",
        f"total_seconds:    {total_seconds:.1f}",
        f"peak_mem_mb:      {show(row['peak_mem_gb'] and row['peak_mem_gb'] * 1024, '{:.0f}')}",
        f"num_steps:        {show(row['steps'], '{}')}",
        f"status:           {row['status']}",
        f"run_id:           {row['run_id']}",
    ]
    if reason:
        lines.append(f"reason:           {reason}")
    return "\n".join(lines)


def check_ready() -> str | None:
    """Why no experiment can start (data not prepared, or corrupt), or None. Checked before a run
    so that a missing `prepare.py` step is one clear line, not a crash row per attempt."""
    try:
        load_prepared(full_check=True)
    except DataError as err:
        return str(err)
    return None


def main_for_train_script(train_args: list[str]) -> int:
    """`python train.py ARGS` by hand: the same as `python -m harness run -- ARGS`."""
    problem = check_ready()
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    budget = float(os.environ.get(BUDGET_ENV, TIME_BUDGET_SECONDS))
    outcome = run_experiment(RunSpec(train_args=train_args, budget_seconds=budget))
    return 0 if outcome.status not in ("crash", "invalid") else 1
