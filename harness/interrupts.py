"""Ctrl-C, SIGTERM and SIGHUP as one exception, for the runner and the agent alike.

Both turn a stop signal into a row (the runner for its run, the agent for the run it stopped), so
both raise Interrupted for it, ignore further signals while they record, and can hold a signal
back until a step that must not be cut in half (a git commit, a tmux call) is done.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Interrupted(KeyboardInterrupt):
    """A stop signal arrived; `how` names it for a row or a log line."""

    def __init__(self, signum: int = signal.SIGINT):
        super().__init__(signum)
        self.signum = signum

    @property
    def how(self) -> str:
        return "Ctrl-C" if self.signum == signal.SIGINT else signal.Signals(self.signum).name


def interrupted(error: KeyboardInterrupt) -> Interrupted:
    """A plain KeyboardInterrupt (Python's own Ctrl-C) as an Interrupted."""
    return error if isinstance(error, Interrupted) else Interrupted(signal.SIGINT)


def install(handler, signals=STOP_SIGNALS) -> dict:
    """`handler` for `signals` (main thread only: elsewhere Python cannot) -> the ones replaced."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {sig: signal.signal(sig, handler) for sig in signals}


def restore(previous: dict) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)


def _raise(signum, frame) -> None:
    raise Interrupted(signum)


@contextmanager
def raising(signals=STOP_SIGNALS):
    """Inside, each of `signals` raises Interrupted, as Ctrl-C raises KeyboardInterrupt."""
    previous = install(_raise, signals)
    try:
        yield
    finally:
        restore(previous)


@contextmanager
def ignoring():
    """Inside, stop signals are ignored: a second Ctrl-C must not cost the row being written."""
    previous = install(signal.SIG_IGN)
    try:
        yield
    finally:
        restore(previous)


@contextmanager
def held():
    """A stop signal that arrives inside is raised when the block ends: a git or tmux call is
    never cut in half (a commit leaving index.lock behind, a window made but not known)."""
    arrived = []
    previous = install(lambda signum, frame: arrived.append(signum))
    try:
        yield
    finally:
        restore(previous)
        if arrived:
            raise Interrupted(arrived[0])
