"""The agent's record: every event as a JSON line (agent.jsonl), and as a line to read on stdout
and in agent.log. Secrets are masked, and what a terminal would act on dropped, before anything
is written; the events also tell a restarted session what its predecessor left unfinished."""

from __future__ import annotations

import difflib
import json
import time
from pathlib import Path

from harness.sandbox import alive
from harness.text import one_line, printable

LONG_FIELDS = ("text", "train_py", "diff")  # agent.jsonl only (a diff also goes below its line)
DIFF_LINES = 60  # of a proposal's diff, in agent.log
SHOWN_CHARS = 400  # of an event's line on stdout
# shorter "keys" are placeholders local servers accept ("x", "ollama"); masking them garbles words
MIN_SECRET_CHARS = 8


class AgentLog:
    def __init__(self, root: Path, secrets: list[str], name: str | None = None):
        self.path, self.human = root / "agent.jsonl", root / "agent.log"
        self.secrets = [s for s in secrets if len(s) >= MIN_SECRET_CHARS]
        self.prefix = f"[agent {name}]" if name else "[agent]"  # a worker's lines, told apart

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
            print(f"{self.prefix} {line}"[:SHOWN_CHARS], flush=True)
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

    def run_ids(self, events: list[dict] | None = None) -> list[str]:
        """The runs this agent ran, from `events` (already read) or the file."""
        events = self.events() if events is None else events
        return [e["run_id"] for e in events if e.get("event") == "run" and e.get("run_id")]

    def running(self, events: list[dict] | None = None) -> dict | None:
        """The "started" event of the job a live session runs now; None when no session runs
        (the last one stopped, or its process is gone) or it is between jobs."""
        events = self.events() if events is None else events
        starts = [e for e in events if e.get("event") == "start"]
        pid = starts[-1].get("pid") if starts else None
        if not isinstance(pid, int) or events[-1].get("event") == "stop" or not alive(pid):
            return None
        return self.unfinished(events)

    def unfinished(self, events: list[dict] | None = None) -> dict | None:
        """The last job started that no "run" event ended: what a killed session left behind."""
        pending = None
        for record in self.events() if events is None else events:
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


def agent_logs(runs_dir: Path) -> dict[str, AgentLog]:
    """Every agent's log under runs_dir by its name: a lone agent's tag, a worker's <tag>-<k>."""
    found = {}
    for events in sorted(runs_dir.glob("agent-*/agent.jsonl")):
        found[events.parent.name.removeprefix("agent-")] = AgentLog(events.parent, [])
    for events in sorted(runs_dir.glob("agent-*/w[0-9]*/agent.jsonl")):
        tag = events.parent.parent.name.removeprefix("agent-")
        found[f"{tag}-{events.parent.name[1:]}"] = AgentLog(events.parent, [])
    return found
