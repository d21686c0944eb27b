"""Experiments in tmux windows the user can watch: `tmux attach -t autoresearch`.

A Job is one shell script in its own window. The script records its exit code in a file as its
last act, so the driver knows how it ended even after the window closed. The job's shells trap
INT, TERM and HUP: they outlive what they run, so a runner that turns a signal into a results row
keeps its terminal until it is done, and its exit code is still written. The driver polls: exit
file present -> finished; pane gone (window or server killed) -> its process group is sent
SIGHUP and given the grace to finish, then finished, or vanished when no exit file came (the
shells were killed); past the deadline -> stopped (SIGTERM to the pane's process group, the
grace, then SIGKILL for every process group the job ever had, including train.py's, which lives
in its own session).

The session's panes never get a secret: the server takes the environment of whoever starts it
(the agent starts it without any), and in a server someone else started, every secret-looking
variable of its environment is marked removed for this session (set-environment -r) before any
of our commands starts there (the session's first pane is a placeholder, respawned after).
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

from harness.sandbox import SECRET_ENV, descendants, signal_groups

RESULTS_WINDOW = "results"
LOG_WINDOW = "agent"
STOP_GRACE_SECONDS = (
    20.0  # signal -> SIGKILL; the runner needs a few seconds to stop train.py and log a row
)
POLL_SECONDS = 0.5
TRAPPED = "trap : INT TERM HUP"  # a shell with a trap waits for its foreground child, then goes on
# the pane's command, run without a shell of tmux's choosing: $0 is job.sh, $1 the exit file
WRAPPER = f'{TRAPPED}; bash "$0"; echo $? > "$1.tmp" && mv "$1.tmp" "$1"'


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # there, as someone else's
        pass
    return True


@dataclass
class JobEnd:
    how: str  # exited | vanished | timeout
    exit_code: int | None
    seconds: float


@dataclass
class Job:
    """A script running in a tmux pane. Only its own process groups are ever signalled; the pane's
    process leads its own session and group (tmux makes it so), which is what a stop signals."""

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

    def wait(self, timeout: float, poll=None) -> JobEnd:
        """Block until the job ends or overruns `timeout` seconds (then it is stopped with SIGTERM).
        `poll()`, if given, is called every round: the caller may read what the job wrote so far.
        Whatever interrupts the wait (Ctrl-C) leaves the job running: the caller decides."""
        deadline = self.started + timeout
        while True:
            self._remember_groups()
            if poll is not None:
                poll()
            code = self.exit_code()
            if code is not None:
                self._sweep()
                return JobEnd("exited", code, time.monotonic() - self.started)
            if not self.tmux.pane_alive(self.pane_id):
                # the window was killed (or the server): only the pane's shell saw its terminal go,
                # so the rest of its group hears it here, and a runner gets to write its row
                signal_groups({self.pane_pid}, signal.SIGHUP)
                self._drain()
                code = self.exit_code()
                self._sweep()
                return JobEnd(
                    "exited" if code is not None else "vanished",
                    code,
                    time.monotonic() - self.started,
                )
            if time.monotonic() > deadline:
                self.stop(signal.SIGTERM)
                return JobEnd("timeout", self.exit_code(), time.monotonic() - self.started)
            time.sleep(POLL_SECONDS)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Send `sig` to the pane's process group (the shells trap it; the runner turns it into a
        row), let that group finish, then SIGKILL whatever is left and close the window."""
        self._remember_groups()
        signal_groups({self.pane_pid}, sig)
        self._drain()
        self._sweep()
        self.tmux.kill_pane(self.pane_id)

    def _drain(self) -> None:
        """Wait up to STOP_GRACE_SECONDS for the pane's process group to end or write its exit
        code."""
        ends = time.monotonic() + STOP_GRACE_SECONDS
        while time.monotonic() < ends and self.exit_code() is None and _group_alive(self.pane_pid):
            self._remember_groups()
            time.sleep(0.2)

    def _sweep(self) -> None:
        """Nothing the job started outlives it: train.py sits in its own session, so a pane that
        died of SIGHUP leaves it orphaned unless its group is killed here."""
        signal_groups(self.groups, signal.SIGKILL)


class Tmux:
    """One tmux session (created when missing) with a results window, optionally a window that
    follows `log_file`, and a window per job."""

    def __init__(self, results_command: str, cwd: Path, session_name: str = "autoresearch",
                 socket_name: str | None = None, environment: dict[str, str] | None = None,
                 log_file: Path | None = None, log_window: str = LOG_WINDOW):  # fmt: skip
        self.cwd = cwd
        self.environment = environment  # for the viewer windows
        self.session_name = session_name
        self.server = libtmux.Server(socket_name=socket_name)
        self.viewers = {RESULTS_WINDOW: results_command}
        if log_file is not None:
            self.viewers[log_window] = f"tail -n +1 -F {shlex.quote(str(log_file))}"
        self._ready = False  # viewers (re)made and secrets hidden in the current session

    def _env_flags(self, environment: dict[str, str] | None) -> list[str]:
        return [
            part for key, value in (environment or {}).items() for part in ("-e", f"{key}={value}")
        ]

    def _find(self) -> libtmux.Session | None:
        try:
            found = list(self.server.sessions.filter(session_name=self.session_name))
        except LibTmuxException:
            found = []
        return found[0] if found else None

    def session(self) -> libtmux.Session:
        """The session, recreated with its viewer windows if the user (or a crash) took it or the
        whole server away. A session found on the first call gets this object's viewers too."""
        found = self._find()
        if found is None:
            # a placeholder first window: the panes are made once the secrets are hidden
            self.server.cmd(
                "new-session",
                "-d",
                "-s",
                self.session_name,
                "-n",
                RESULTS_WINDOW,
                "-c",
                str(self.cwd),
                "sleep 600",
            )
            found = self._find()
            self._ready = False
        if found is None:
            raise RuntimeError(f"cannot start tmux session {self.session_name!r}")
        if not self._ready:
            self._hide_secrets()
            self._make_viewers()
            self._ready = True
        return found

    def _hide_secrets(self) -> None:
        """Mark each secret-looking variable of the server or session as removed for new panes."""
        listed = [*self.server.cmd("show-environment", "-g").stdout,
                  *self.server.cmd("show-environment", "-t", self.session_name).stdout]  # fmt: skip
        names = {line.split("=", 1)[0].lstrip("-") for line in listed}
        for name in sorted(name for name in names if SECRET_ENV.search(name)):
            self.server.cmd("set-environment", "-t", self.session_name, "-r", name)

    def _make_viewers(self) -> None:
        """Each viewer window runs its command anew (respawned if the window exists); if the
        command exits, its pane stays with the reason instead of the window vanishing."""
        existing = set(
            self.server.cmd("list-windows", "-t", self.session_name, "-F", "#{window_name}").stdout
        )
        for name, command in self.viewers.items():
            target = f"{self.session_name}:{name}"
            place = (["respawn-pane", "-k", "-t", target] if name in existing else
                     ["new-window", "-d", "-t", f"{self.session_name}:", "-n", name])  # fmt: skip
            self.server.cmd(
                *place, "-c", str(self.cwd), *self._env_flags(self.environment), command
            )
            self.server.cmd("set-option", "-w", "-t", target, "remain-on-exit", "on")

    def start(
        self,
        window_name: str,
        script: str,
        job_dir: Path,
        environment: dict[str, str] | None = None,
    ) -> Job:
        """Run bash `script` in a new window (with `environment` on top of the tmux server's);
        its exit code lands in job_dir/exit_code."""
        job_dir.mkdir(parents=True, exist_ok=True)
        exit_file = job_dir / "exit_code"
        exit_file.unlink(missing_ok=True)
        (job_dir / "job.sh").write_text(f"#!/usr/bin/env bash\n{TRAPPED}\n{script}\n")
        target = self.session().session_name + ":"
        # one tmux call that prints the pane's id and pid: a quick job may be gone a moment later
        made = self.server.cmd(
            "new-window",
            "-d",
            "-P",
            "-F",
            "#{pane_id} #{pane_pid}",
            "-t",
            target,
            "-n",
            window_name,
            "-c",
            str(job_dir),
            *self._env_flags(environment),
            "bash",
            "-c",
            WRAPPER,
            str(job_dir / "job.sh"),
            str(exit_file),
        )
        if made.returncode != 0 or not made.stdout:
            raise RuntimeError(f"tmux new-window failed: {' '.join(made.stderr)}")
        pane_id, pane_pid = made.stdout[0].split()
        return Job(self, window_name, pane_id, int(pane_pid), exit_file)

    def find(self, job_dir: Path) -> Job | None:
        """The job of `job_dir` if it still runs in this session (started by a driver that is gone:
        its pane's command names job_dir/job.sh), or None."""
        script = str(job_dir / "job.sh")
        listed = self.server.cmd(
            "list-panes",
            "-s",
            "-t",
            self.session_name,
            "-F",
            "#{window_name}\t#{pane_id}\t#{pane_pid}\t#{pane_dead}\t#{pane_start_command}",
        ).stdout
        for line in listed:
            name, pane_id, pane_pid, dead, command = line.split("\t", 4)
            if dead == "0" and script in command:
                return Job(self, name, pane_id, int(pane_pid), job_dir / "exit_code")
        return None

    def pane_alive(self, pane_id: str) -> bool:
        try:
            listed = "\n".join(
                self.server.cmd("list-panes", "-a", "-F", "#{pane_id} #{pane_dead}").stdout
            )
        except LibTmuxException:
            return False
        return f"{pane_id} 0" in listed.splitlines()

    def kill_pane(self, pane_id: str) -> None:
        try:
            self.server.cmd("kill-pane", "-t", pane_id)
        except LibTmuxException:
            pass
