"""`python -m harness show RUN`: one run in full.

Prints its config, its results.tsv row, what its train.py changed relative to its parent commit,
and the tail of run.log. RUN is a run id or a unique prefix of one under runs/.

The row's commit is the commit of train.py's repo when it ran, "-dirty" if train.py differed from
it; runs/RUN/train.py is the exact file that ran. If that file is the commit's train.py, the change
being tried is the commit itself, so the diff is against commit^; otherwise it is against commit.
"""

from __future__ import annotations

import argparse
import difflib
import json
import sys
from pathlib import Path

from harness import paths, results
from harness.git import GitError, git
from harness.tools.status import parse_config

LOG_TAIL_LINES = 30


class RunNotFound(Exception):
    """No single run folder matches; the message says what exists."""


def find_run(run: str, runs_dir: Path | None = None) -> Path:
    root = runs_dir or paths.runs_dir()
    names = (
        sorted(entry.name for entry in root.iterdir() if entry.is_dir()) if root.is_dir() else []
    )
    if run in names:
        return root / run
    matches = [name for name in names if run and name.startswith(run)]
    if len(matches) == 1:
        return root / matches[0]
    if matches:
        raise RunNotFound(
            f"{run!r} matches {len(matches)} runs in {root}: {', '.join(matches[:5])}, ..."
        )
    latest = f" (latest: {names[-1]})" if names else ""
    raise RunNotFound(f"no run {run!r} in {root}{latest}")


def _git_file(revision: str, script: Path) -> str | None:
    """train.py's text at `revision` in the repo holding `script`, or None (no git, no commit)."""
    try:
        return git(["show", f"{revision}:./{script.name}"], script.parent, whole=True)
    except GitError:
        return None


def train_diff(run_dir: Path, commit: str, script: Path) -> str:
    """Unified diff of the train.py that ran against its parent's, or a line saying why not."""
    snapshot = run_dir / "train.py"
    if not snapshot.exists():
        return f"no diff: {snapshot} is missing"
    if not commit:
        return (
            "no diff: no commit recorded (train.py was not in a git repo, or git was unavailable)"
        )
    base = commit.removesuffix("-dirty")
    committed = _git_file(base, script)
    if committed is None:
        return (
            f"no diff: commit {base} (or train.py in it) is unknown to the repo at {script.parent}"
        )
    ran = snapshot.read_text(errors="replace")
    parent, before = base, committed
    if ran == committed:
        parent = f"{base}^"
        before = _git_file(parent, script)
        if before is None:
            return f"no diff: train.py is exactly {base}'s, which has no parent holding train.py"
    lines = difflib.unified_diff(
        before.splitlines(keepends=True),
        ran.splitlines(keepends=True),
        fromfile=f"train.py @ {parent}",
        tofile=f"{run_dir.name}/train.py",
    )
    return "".join(lines) or f"train.py is identical to {parent}'s"


def _log_tail(log: Path, lines: int) -> str:
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return f"({log} is missing)"
    return "\n".join(text.splitlines()[-lines:])


def show(run_dir: Path, tail: int = LOG_TAIL_LINES) -> str:
    ledger = results.read(paths.results_path())
    matching = ledger[ledger["run_id"] == run_dir.name]
    row = matching.iloc[-1].to_dict() if len(matching) else None
    if row is not None:  # the row's config also holds the budget, train_args and any failure reason
        config = parse_config(row["config"])
    else:
        train_json = run_dir / "train.json"
        config = (
            parse_config(train_json.read_text(errors="replace")).get("config", {})
            if train_json.exists()
            else {}
        )
    sections = [
        f"run {run_dir.name}  ({run_dir})",
        "",
        "config:",
        json.dumps(config, indent=1, sort_keys=True),
        "",
    ]
    if row is None:
        sections += [
            "summary: no results.tsv row (still running, or it died before the harness could "
            "record it)"
        ]
    else:
        sections += ["summary:"] + [
            f"  {column:14s} {row[column]}"
            for column in results.COLUMNS
            if column != "config" and str(row[column]) not in ("", "nan")
        ]
    commit = "" if row is None else str(row["commit"])
    sections += [
        "",
        "train.py against its parent:",
        train_diff(run_dir, commit, paths.train_script()).rstrip("\n"),
    ]
    sections += ["", f"run.log (last {tail} lines):", _log_tail(run_dir / "run.log", tail)]
    return "\n".join(sections) + "\n"


# --- command line ---


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", help="run id or a unique prefix of one")
    parser.add_argument(
        "--tail", type=int, default=LOG_TAIL_LINES, help="lines of run.log to print"
    )


def command(args: argparse.Namespace) -> int:
    try:
        run_dir = find_run(args.run)
    except RunNotFound as err:
        print(err, file=sys.stderr)
        return 1
    sys.stdout.write(show(run_dir, args.tail))
    return 0
