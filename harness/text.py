"""Untrusted text (a model's reply, train.py's output, a description) made safe to show, store."""

from __future__ import annotations

import os
import re
from pathlib import Path

TAIL_BYTES = 4096  # of a log read for its last line: a run's log can be 100 MB
LINE_CHARS = 300  # of that line kept
# terminal escape sequences (CSI, OSC, then any other ESC sequence), removed whole so that no "[31m"
# is left
_ESCAPE = re.compile(
    r"\x1b\[[0-?]*[ -/]*[@-~]|\x9b[0-?]*[ -/]*[@-~]"  # CSI
    r"|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?"  # OSC
    r"|\x1b[ -/]*[0-~]"
)


def printable(text: str) -> str:
    """`text` without what a terminal would act on: escape sequences, control and format
    characters (the bidi controls among them) and lone surrogates dropped, whitespace as spaces."""
    text = _ESCAPE.sub("", text)
    return "".join(c if c.isprintable() else " " if c.isspace() else "" for c in text)


def one_line(text: str, limit: int | None = None) -> str:
    """printable(text) as one line of at most `limit` characters, safe for a commit message, a
    tmux window, a log or a results cell: any whitespace folded to single spaces."""
    return " ".join(printable(text).split())[:limit].rstrip()


def last_line(path: Path, fallback: str) -> str:
    """The last non-blank line of a log (usually the exception), or `fallback` without one."""
    try:
        with open(path, "rb") as handle:
            handle.seek(max(0, handle.seek(0, os.SEEK_END) - TAIL_BYTES))
            text = handle.read().decode(errors="replace")
    except OSError:
        return fallback
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:LINE_CHARS] if lines else fallback
