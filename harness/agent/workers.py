"""`--workers N`: N agents at once, each with its own worktree, branch, device or cores, and log.

    runs/agent-<tag>/optuna.journal   the study every worker asks and tells (or --storage)
    runs/agent-<tag>/w<k>/            worker k's worktree, agent.jsonl, agent.log, jobs/, kept
    branch autoresearch/<tag>-<k>     its candidates

The supervisor (this process) starts each worker as `harness agent ... --worker k` in a session of
its own, passes on Ctrl-C, SIGTERM and SIGHUP once, and waits: each worker stops and records its
own run as a lone agent would. A supervisor killed outright takes its workers with it (SIGTERM
when their parent dies), and a restart with the same tag reconciles each worker's last run.
Workers share results.tsv (whose lock decides keep or discard) and see each other's rows and
running experiments; there is no coordinator beyond that file and the Optuna storage.
"""

from __future__ import annotations

import fcntl
import os
import secrets
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from harness import interrupts, paths
from harness.sandbox import die_with_parent


@dataclass(frozen=True)
class Worker:
    """Worker `index` of `count` (index 0: a lone agent, with the layout of one)."""

    tag: str
    index: int = 0
    count: int = 1

    @property
    def name(self) -> str:
        return self.tag if self.index == 0 else f"{self.tag}-{self.index}"

    @property
    def branch(self) -> str:
        return f"autoresearch/{self.name}"

    @property
    def group_root(self) -> Path:
        return paths.runs_dir() / f"agent-{self.tag}"

    @property
    def root(self) -> Path:
        return self.group_root if self.index == 0 else self.group_root / f"w{self.index}"

    def owner(self) -> str:
        """Who this worker is in a shared study: kept in its folder, so that a restart (even in a
        new container, under another hostname) is the same owner, and a worker elsewhere never."""
        self.root.mkdir(parents=True, exist_ok=True)
        file = self.root / "owner"
        if not file.exists():
            file.write_text(f"{socket.gethostname()}:{self.name}:{secrets.token_hex(4)}\n")
        return file.read_text().strip()

    def peers(self) -> list[Path]:
        """Every worker's root, this one's included: whose rows and runs the proposer sees."""
        if self.index == 0:
            return [self.root]
        return [self.group_root / f"w{k}" for k in range(1, self.count + 1)]

    def window(self, name: str) -> str:
        return name if self.index == 0 else f"w{self.index}-{name}"

    def share(self, total: int | None) -> int | None:
        """This worker's part of --max-experiments: the first ones take the remainder."""
        if total is None or self.index == 0:
            return total
        return total // self.count + (self.index <= total % self.count)

    def cpus(self) -> list[int] | None:
        """The cores this worker's runs get: an equal slice of the machine's (None: a lone agent
        uses them all)."""
        if self.index == 0:
            return None
        cores = sorted(os.sched_getaffinity(0))
        each = max(1, len(cores) // self.count)
        first = (self.index - 1) * each % len(cores)
        return cores[first : first + each]

    def device(self, devices: list[str]) -> str | None:
        """The device of this worker's runs from --devices, round robin; None: train.py's own."""
        return devices[(max(self.index, 1) - 1) % len(devices)] if devices else None


@contextmanager
def in_turn() -> Iterator[None]:
    """One agent at a time inside (any tag's): `git worktree add` and `prune` are not safe to run
    at once in one repository."""
    paths.runs_dir().mkdir(parents=True, exist_ok=True)
    with open(paths.runs_dir() / ".worktrees.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def supervise(argv: list[str], count: int, api_key: str | None) -> int:
    """Run `count` workers of `harness agent argv` to their end -> the exit code: 128 + the
    signal that stopped them, else the worst of theirs (1 over 0)."""
    env = dict(os.environ)
    if api_key:  # only the workers get it, each keeps it to itself as a lone agent does
        env["OPENAI_API_KEY"] = api_key
    workers: list[subprocess.Popen] = []
    with interrupts.raising():
        try:
            with interrupts.held():  # a signal while they start reaches every one of them
                for index in range(1, count + 1):
                    command = [sys.executable, "-m", "harness", *_with_worker(argv, index)]
                    workers.append(subprocess.Popen(
                        command, env=env, start_new_session=True,
                        preexec_fn=lambda: die_with_parent(signal.SIGTERM)))  # fmt: skip
            # a worker killed by a signal (-9: the OOM killer) counts as that signal's exit
            return max(code if code >= 0 else 128 - code for code in (w.wait() for w in workers))
        except KeyboardInterrupt as error:
            stop = interrupts.interrupted(error)
    with interrupts.ignoring():  # passed on once: each worker stops and records its own run
        for worker in workers:
            if worker.poll() is None:
                worker.send_signal(stop.signum)
        for worker in workers:
            worker.wait()
    return 128 + stop.signum


def _with_worker(argv: list[str], index: int) -> list[str]:
    """argv with `--worker index` among the agent's flags (before a `--` and train.py's)."""
    cut = argv.index("--") if "--" in argv else len(argv)
    return [*argv[:cut], "--worker", str(index), *argv[cut:]]
