"""The agent's record: every event as a JSON line (agent.jsonl), and as a line to read on stdout
and in agent.log. Secrets are masked, and what a terminal would act on dropped, before anything
is written; the events also tell a restarted session what its predecessor left unfinished."""

from __future__ import annotations

import difflib
import json
import time
from pathlib import Path

from harness.text import one_line, printable

LONG_FIELDS = ("text", "train_py", "diff")  # agent.jsonl only (a diff also goes below its line)
DIFF_LINES = 60  # of a proposal's diff, in agent.log
SHOWN_CHARS = 400  # of an event's line on stdout
# shorter "keys" are placeholders local servers accept ("x", "ollama"); masking them garbles words
MIN_SECRET_CHARS = 8


class AgentLog:
    def __init__(self, root: Path, secrets: list[str]):
        self.path, self.human = root / "agent.jsonl", root / "agent.log"
        self.secrets = [s for s in secrets if len(s) >= MIN_SECRET_CHARS]

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
        line = self._mask(one_line(f"{event} {shown}"))
        below = [
            f"    {self._mask(printable(part))}\n"
            for part in str(fields.get("diff") or "").splitlines()
        ]
        with open(self.human, "a", encoding="utf-8") as sink:
            sink.write(f"{stamp[11:]} {line}\n" + "".join(below))
        try:
            print(f"[agent] {line}"[:SHOWN_CHARS], flush=True)
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


def diff_lines(before: str, after: str) -> str:
    """A proposal's change to train.py as agent.log shows it: at most DIFF_LINES lines."""
    lines = list(
        difflib.unified_diff(
            before.splitlines(), after.splitlines(), "train.py", "train.py", n=1, lineterm=""
        )
    )[2:]
    more = [f"... {len(lines) - DIFF_LINES} more lines"] if len(lines) > DIFF_LINES else []
    return "\n".join(lines[:DIFF_LINES] + more)
