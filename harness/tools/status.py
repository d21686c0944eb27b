"""`python -m harness status`: results.tsv at a glance.

    python -m harness status [--status keep] [--track ternary] [--since 8h] [--last 30] [--follow]

Prints the rows as a table, the best row so far per eval set / model / bits-per-weight track, and
the Pareto front of val_bpb against bits per weight. Filters apply to all three. `--follow`
redraws in place whenever the file changes (the tmux `results` window runs it); Ctrl-C leaves.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from harness import paths, results

SCORED = (
    "keep",
    "discard",
    "baseline",
)  # statuses whose numbers were measured on a verified artifact
CLEAR_SCREEN = "\x1b[H\x1b[2J"  # cursor home + erase display: a redraw, not a scroll
NOTE_WIDTH = 48
TRACK_ORDER = {name: i for i, (name, _) in enumerate(results.TRACKS)}
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([mhd])$")
_UNIT_SECONDS = {"m": 60, "h": 3600, "d": 86400}


@dataclass
class Filters:
    status: list[str] | None = None
    track: list[str] | None = None
    since: str | None = None  # ISO time ("2026-01-02T03:00") or an age ("90m", "8h", "2d")


def parse_config(text: str) -> dict:
    """A config JSON cell (or train.json) as a dict; {} for anything else."""
    try:
        value = json.loads(text)
    except (TypeError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def method_of(config_json: str) -> str:
    """What a row tried, for labels and colours: "fp"/"rtn" for baselines, else its quant format."""
    config = parse_config(config_json)
    if config.get("baseline"):
        return str(config["baseline"])
    return str(config.get("quant") or "?")


def annotate(frame: pd.DataFrame) -> pd.DataFrame:
    """results.read()'s frame plus `track`, `method` and `note` (the crash reason, if any)."""
    frame = frame.copy()
    frame["track"] = frame["bpw"].map(
        lambda bpw: results.bpw_track(None if pd.isna(bpw) else float(bpw))
    )
    frame["method"] = frame["config"].map(method_of)
    reasons = frame["config"].map(lambda text: parse_config(text).get("reason", ""))
    frame["note"] = [
        reason or description for reason, description in zip(reasons, frame["description"])
    ]
    return frame


def since_cutoff(since: str, now: float | None = None) -> pd.Timestamp:
    """The earliest timestamp `--since` admits. Row timestamps are local time (time.strftime)."""
    match = _DURATION.match(since.strip())
    if match:
        seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        return pd.Timestamp(
            time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime((now or time.time()) - seconds))
        )
    try:
        cutoff = pd.Timestamp(since)
    except ValueError:
        raise ValueError(
            f"--since {since!r}: give an age like 90m, 8h, 2d or a time like 2026-01-02T03:00"
        ) from None
    if cutoff.tzinfo is not None:  # "...Z" or "+02:00": compare in local time, as rows are written
        cutoff = pd.Timestamp(cutoff.to_pydatetime().astimezone().replace(tzinfo=None))
    return cutoff


def apply_filters(frame: pd.DataFrame, filters: Filters) -> pd.DataFrame:
    keep = pd.Series(True, index=frame.index)
    if filters.status:
        keep &= frame["status"].isin(filters.status)
    if filters.track:
        keep &= frame["track"].isin(filters.track)
    if filters.since:
        stamps = pd.to_datetime(frame["timestamp"], errors="coerce", format="ISO8601")
        keep &= stamps >= since_cutoff(filters.since)
    return frame[keep]


def best_so_far(frame: pd.DataFrame) -> pd.DataFrame:
    """Lowest val_bpb among keep and baseline rows per eval set, model and track: what a new run
    of that track must beat (the same rows results.best_in_track considers)."""
    rows = frame[
        frame["status"].isin(("keep", "baseline"))
        & frame["val_bpb"].notna()
        & frame["track"].notna()
    ]
    if rows.empty:
        return rows
    best = rows.loc[rows.groupby(["eval_set", "model", "track"], sort=False)["val_bpb"].idxmin()]
    return best.sort_values(["eval_set", "model", "track"], key=_track_sort_key)


def _track_sort_key(column: pd.Series) -> pd.Series:
    return column.map(TRACK_ORDER) if column.name == "track" else column


def pareto_front(frame: pd.DataFrame) -> pd.DataFrame:
    """Rows no other scored row of the same eval set and model beats on both bpw and val_bpb
    (lower is better on each), ordered by bpw."""
    scored = frame[frame["status"].isin(SCORED) & frame["val_bpb"].notna() & frame["bpw"].notna()]
    front = []
    for _, group in scored.groupby(["eval_set", "model"], sort=True):
        lowest = math.inf
        # by bpw, then val_bpb: a row is on the front iff it beats every row with no more bits
        for index, row in group.sort_values(["bpw", "val_bpb"], kind="stable").iterrows():
            if row["val_bpb"] < lowest:
                front.append(index)
                lowest = row["val_bpb"]
    return scored.loc[front]


@dataclass
class Status:
    rows: pd.DataFrame  # annotated and filtered
    skipped: int  # lines of results.tsv that were not rows
    best: pd.DataFrame
    front: pd.DataFrame


def load(path: Path, filters: Filters | None = None) -> Status:
    filters = filters or Filters()
    frame, skipped = results.read_counted(path)
    rows = apply_filters(annotate(frame), filters)
    return Status(rows, skipped, best_so_far(rows), pareto_front(rows))


def _table(frame: pd.DataFrame, columns: list[str]) -> str:
    shown = frame[columns].copy()
    for column, fmt in (
        ("val_bpb", "{:.4f}"),
        ("bpw", "{:.2f}"),
        ("train_seconds", "{:.0f}"),
        ("steps", "{:.0f}"),
    ):
        if column in shown:
            shown[column] = shown[column].map(
                lambda v, fmt=fmt: "" if pd.isna(v) else fmt.format(v)
            )
    if "timestamp" in shown:
        shown["timestamp"] = shown["timestamp"].str.replace("T", " ").str[5:16]  # MM-DD HH:MM
    if "note" in shown:
        shown["note"] = shown["note"].map(
            lambda text: text if len(text) <= NOTE_WIDTH else text[: NOTE_WIDTH - 1] + "…"
        )
        shown["note"] = shown["note"].str.ljust(
            shown["note"].str.len().max()
        )  # prose reads left-aligned
    shown = shown.fillna("").rename(columns={"train_seconds": "secs", "timestamp": "time"})
    return shown.to_string(index=False)


def running_now(runs_dir: Path) -> list[str]:
    """One line per agent (a worker, or a lone agent) with an experiment running now."""
    from harness.agent.log import agent_logs

    lines = []
    for name, log in agent_logs(runs_dir).items():
        started = log.running()
        if started:
            since = str(started.get("time", ""))[11:]
            lines.append(f"  {name}  job {started.get('job')} since {since}: "
                         f"{started.get('description', '')}"[:160])  # fmt: skip
    return lines


def render(path: Path, filters: Filters | None = None, last: int | None = None,
           runs_dir: Path | None = None) -> str:  # fmt: skip
    """The table, the best rows, the front; with `runs_dir`, first what each agent runs now."""
    status = load(path, filters)
    lines = [
        f"{path}: {len(status.rows)} row{'' if len(status.rows) == 1 else 's'}"
        + (f", {status.skipped} malformed or foreign lines skipped" if status.skipped else "")
    ]
    running = running_now(runs_dir) if runs_dir else []
    if running:
        lines += ["running now:", *running]
    if status.rows.empty:
        return "\n".join([*lines, "no rows yet" if not path.exists() else "no rows match"]) + "\n"
    shown = status.rows.tail(last) if last else status.rows
    lines += [
        "",
        _table(
            shown,
            [
                "run_id",
                "timestamp",
                "status",
                "val_bpb",
                "bpw",
                "track",
                "method",
                "steps",
                "train_seconds",
                "note",
            ],
        ),
    ]
    if not status.best.empty:
        lines += [
            "",
            "best so far (keep or baseline) per eval set / model / track:",
            _table(
                status.best, ["eval_set", "model", "track", "val_bpb", "bpw", "method", "run_id"]
            ),
        ]
    if not status.front.empty:
        lines += [
            "",
            "Pareto front, val_bpb vs bits per weight:",
            _table(
                status.front, ["eval_set", "model", "bpw", "val_bpb", "method", "status", "run_id"]
            ),
        ]
    return "\n".join(lines) + "\n"


def _signature(path: Path) -> tuple[int, int] | None:
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_mtime_ns, stat.st_size


def follow(path: Path, draw: Callable[[], str], interval: float = 2.0,
           also: Callable[[], list[Path]] = list) -> Iterator[str]:  # fmt: skip
    """Yield draw() at once and again each time `path` (or a file `also()` names) changes. Polls:
    they are small files, appended a few times an hour."""
    seen = ()
    while True:
        signature = [_signature(watched) for watched in [path, *also()]]
        if signature != seen:
            seen = signature
            yield draw()
        else:
            time.sleep(interval)


# --- command line ---


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--status",
        action="append",
        choices=results.STATUSES,
        help="only these statuses (repeatable)",
    )
    parser.add_argument(
        "--track",
        action="append",
        choices=[name for name, _ in results.TRACKS],
        help="only these bpw tracks",
    )
    parser.add_argument(
        "--since", help="only rows since a time (2026-01-02T03:00) or within an age (90m, 8h, 2d)"
    )
    parser.add_argument("--last", type=int, help="show only the last N rows of the table")
    parser.add_argument(
        "--follow", action="store_true", help="redraw whenever results.tsv changes; Ctrl-C to stop"
    )
    parser.add_argument(
        "--interval", type=float, default=2.0, help="seconds between checks with --follow"
    )


def command(args: argparse.Namespace) -> int:
    path = paths.results_path()
    filters = Filters(args.status, args.track, args.since)
    if args.since:
        try:
            since_cutoff(args.since)  # a bad --since is a usage error, said once, not a redraw loop
        except ValueError as err:
            print(err, file=sys.stderr)
            return 2
    runs_dir = paths.runs_dir()
    if not args.follow:
        sys.stdout.write(render(path, filters, args.last, runs_dir))
        return 0
    from harness.agent.log import agent_logs

    def draw() -> str:
        return render(path, filters, args.last, runs_dir)

    def agents() -> list[Path]:  # a worker starting or ending a run redraws too
        return [log.path for log in agent_logs(runs_dir).values()]

    try:
        for text in follow(path, draw, args.interval, also=agents):
            sys.stdout.write(CLEAR_SCREEN + time.strftime("%H:%M:%S ") + text)
            sys.stdout.flush()
    except KeyboardInterrupt:
        pass
    return 0
