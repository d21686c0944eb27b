"""Experiments in tmux windows the user can watch: `tmux attach -t autoresearch`.

A Job is one shell script in its own window. The script records its exit code in a file as its
last act, so the driver knows how it ended even after the window closed. The driver polls: exit
file present -> finished; pane gone without one -> vanished (window killed, tmux server died);
past the deadline -> stopped (SIGINT first so the runner writes its row, then SIGKILL for every
process group the job ever had, including train.py's, which lives in its own session).
"""

from __future__ import annotations

import os
import shlex
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import libtmux
from libtmux.exc import LibTmuxException

RESULTS_WINDOW = "results"
STOP_GRACE_SECONDS = 20.0  # SIGINT -> SIGKILL; the runner needs ~10 s to stop train.py and log a row
POLL_SECONDS = 0.5


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])  # the command name may hold spaces
        children.setdefault(ppid, []).append(int(entry))
    return children


def descendants(pid: int) -> list[int]:
    tree, found, todo = _children_map(), [], [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def _signal_groups(pgids: set[int], sig: int) -> None:
    for pgid in pgids:
        try:
            os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError):
            pass


@dataclass
class JobEnd:
    how: str  # exited | vanished | timeout | interrupted
    exit_code: int | None
    seconds: float


@dataclass
class Job:
    """A script running in a tmux pane. Only its own process groups are ever signalled."""

    tmux: Tmux
    window_name: str
    pane_id: str
    pane_pid: int
    exit_file: Path
    started: float = field(default_factory=time.monotonic)
    groups: set[int] = field(default_factory=set)  # every process group seen under the pane

    def _remember_groups(self) -> None:
        for pid in [self.pane_pid, *descendants(self.pane_pid)]:
            pgid = _pgid(pid)
            if pgid is not None and pgid != os.getpgrp():
                self.groups.add(pgid)

    def exit_code(self) -> int | None:
        try:
            return int(self.exit_file.read_text().strip())
        except (OSError, ValueError):
            return None

    def wait(self, timeout: float) -> JobEnd:
        """Block until the job ends, vanishes or overruns `timeout` seconds. On Ctrl-C the job is
        stopped (its runner records the run as interrupted) and KeyboardInterrupt re-raised."""
        deadline = self.started + timeout
        try:
            while True:
                self._remember_groups()
                code = self.exit_code()
                if code is not None:
                    self._sweep()
                    return JobEnd("exited", code, time.monotonic() - self.started)
                if not self.tmux.pane_alive(self.pane_id):
                    code = self.exit_code()  # it may have finished between the two checks
                    self._sweep()
                    return JobEnd("exited" if code is not None else "vanished", code, time.monotonic() - self.started)
                if time.monotonic() > deadline:
                    self.stop()
                    return JobEnd("timeout", self.exit_code(), time.monotonic() - self.started)
                time.sleep(POLL_SECONDS)
        except KeyboardInterrupt:
            self.stop()
            raise

    def stop(self) -> None:
        """SIGINT the job's process groups (the runner turns it into a row), wait for the pane
        to finish, then SIGKILL whatever is left and close the window."""
        self._remember_groups()
        _signal_groups(self.groups, signal.SIGINT)
        ends = time.monotonic() + STOP_GRACE_SECONDS
        while time.monotonic() < ends and self.exit_code() is None and self.tmux.pane_alive(self.pane_id):
            self._remember_groups()
            time.sleep(0.2)
        self._sweep()
        self.tmux.kill_pane(self.pane_id)

    def _sweep(self) -> None:
        """Nothing the job started outlives it: train.py sits in its own session, so a pane that
        died of SIGHUP leaves it orphaned unless its group is killed here."""
        _signal_groups(self.groups, signal.SIGKILL)


class Tmux:
    """One tmux session (created when missing) with a results window and a window per job."""

    def __init__(self, results_command: str, cwd: Path, session_name: str = "autoresearch",
                 socket_name: str | None = None, environment: dict[str, str] | None = None):  # fmt: skip
        self.results_command = results_command
        self.cwd = cwd
        self.environment = environment  # for the results window
        self.session_name = session_name
        self.server = libtmux.Server(socket_name=socket_name)

    def _env_flags(self, environment: dict[str, str] | None) -> list[str]:
        return [part for key, value in (environment or {}).items() for part in ("-e", f"{key}={value}")]

    def session(self) -> libtmux.Session:
        """The session, recreated with its results window if the user (or a crash) took it or
        the whole server away."""
        try:
            found = list(self.server.sessions.filter(session_name=self.session_name))
        except LibTmuxException:
            found = []
        if not found:
            # if the viewer exits, its pane stays with the reason instead of the window vanishing
            self.server.cmd("new-session", "-d", "-s", self.session_name, "-n", RESULTS_WINDOW, "-c", str(self.cwd),
                            *self._env_flags(self.environment), self.results_command,
                            ";", "set-option", "-w", "remain-on-exit", "on")  # fmt: skip
            found = list(self.server.sessions.filter(session_name=self.session_name))
        if not found:
            raise RuntimeError(f"cannot start tmux session {self.session_name!r}")
        return found[0]

    def start(self, window_name: str, script: str, job_dir: Path, environment: dict[str, str] | None = None) -> Job:
        """Run bash `script` in a new window (with `environment` on top of the tmux server's);
        its exit code lands in job_dir/exit_code."""
        job_dir.mkdir(parents=True, exist_ok=True)
        exit_file = shlex.quote(str(job_dir / "exit_code"))
        (job_dir / "exit_code").unlink(missing_ok=True)
        (job_dir / "job.sh").write_text(f"#!/usr/bin/env bash\n{script}\n")
        # the exit code is written by a shell around the script, so even `exit 3` inside it is caught
        command = f"bash job.sh; echo $? > {exit_file}.tmp && mv {exit_file}.tmp {exit_file}"
        target = self.session().session_name + ":"
        # one tmux call that prints the pane's id and pid: a quick job may be gone a moment later
        made = self.server.cmd("new-window", "-d", "-P", "-F", "#{pane_id} #{pane_pid}", "-t", target, "-n", window_name,
                               "-c", str(job_dir), *self._env_flags(environment), command)  # fmt: skip
        if made.returncode != 0 or not made.stdout:
            raise RuntimeError(f"tmux new-window failed: {' '.join(made.stderr)}")
        pane_id, pane_pid = made.stdout[0].split()
        return Job(self, window_name, pane_id, int(pane_pid), job_dir / "exit_code")

    def pane_alive(self, pane_id: str) -> bool:
        try:
            listed = "\n".join(self.server.cmd("list-panes", "-a", "-F", "#{pane_id} #{pane_dead}").stdout)
        except LibTmuxException:
            return False
        return f"{pane_id} 0" in listed.splitlines()

    def kill_pane(self, pane_id: str) -> None:
        try:
            self.server.cmd("kill-pane", "-t", pane_id)
        except LibTmuxException:
            pass
