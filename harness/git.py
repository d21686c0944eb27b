"""The one way the harness, the agent and the viewers call git."""

from __future__ import annotations

import subprocess
from pathlib import Path

TIMEOUT_SECONDS = 120.0  # a hung git (a lock, a network filesystem) must not hang a run


class GitError(RuntimeError):
    """git failed, could not start or did not finish; the message says which, with git's words."""


def git(args: list[str], cwd: Path, whole: bool = False) -> str:
    """git's output (a value: without the newline it ends with; `whole`: as it is, e.g. a file's
    text); GitError when it does not succeed."""
    try:
        done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True,
                              errors="replace", timeout=TIMEOUT_SECONDS)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as err:
        raise GitError(f"git {' '.join(args)}: {err}") from None
    if done.returncode != 0:
        raise GitError(f"git {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout if whole else done.stdout.rstrip("\n")
