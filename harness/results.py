"""results.tsv: one row per experiment, appended atomically, read without pandas' parser.

Writers take an exclusive lock on `results.tsv.lock` and append one whole line, so concurrent
runs never interleave. A row is never rewritten, and a run_id is recorded once. A row that cannot
go into results.tsv (another header, a duplicate run_id, a lock held too long, an OSError) goes to
`results.tsv.unrecorded.tsv` beside it instead, and the error says so: no row is ever lost.
Metrics of a run that produced none are empty, not 0. Readers take any bytes: a line is a row when
it has exactly len(COLUMNS) tab-separated cells and a known status; everything else is counted and
skipped, never raised.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import re
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import pandas as pd

from harness.text import one_line

COLUMNS = (
    "commit", "run_id", "timestamp", "status", "val_bpb", "val_ppl", "bpw", "size_mb", "steps",
    "train_tokens", "train_seconds", "peak_mem_gb", "eval_set", "model", "description", "config",
)  # fmt: skip
NUMERIC = (
    "val_bpb",
    "val_ppl",
    "bpw",
    "size_mb",
    "steps",
    "train_tokens",
    "train_seconds",
    "peak_mem_gb",
)
STATUSES = ("baseline", "keep", "discard", "crash", "invalid")
FLOAT_FORMAT = {"val_bpb": "{:.6f}", "val_ppl": "{:.4f}", "bpw": "{:.4f}", "size_mb": "{:.3f}",
                "train_seconds": "{:.1f}", "peak_mem_gb": "{:.3f}"}  # fmt: skip

KEEP_MARGIN_BPB = 0.001  # a run must beat the best kept row of its track by this much to be kept
LOCK_TIMEOUT_SECONDS = 120.0

# bits-per-weight tracks: rows only compete with rows of the same track (upper bounds, inclusive)
TRACKS = (
    ("ternary", 1.8),
    ("2bit", 2.5),
    ("3bit", 3.5),
    ("4bit", 4.5),
    ("8bit", 8.5),
    ("fp", math.inf),
)


class ResultsError(Exception):
    """A row could not go into results.tsv. `side` is the file it went to instead (None: nowhere,
    and the message carries the row itself), so the caller can say where to find it."""

    def __init__(self, message: str, side: Path | None = None):
        super().__init__(message)
        self.side = side


class DuplicateRun(ResultsError):
    """The run_id already has a row: a run is recorded once, so a second is a forgery or a bug."""


def bpw_track(bpw: float | None) -> str | None:
    if bpw is None or not math.isfinite(bpw):
        return None
    return next(name for name, bound in TRACKS if bpw <= bound)


# what a damaged or hand-edited line may hold that our writer never writes: controls, bidi
_UNSAFE_READ = re.compile(
    "[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]"
)


def _cell(column: str, value) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    if column == "config" and not isinstance(value, str):
        value = json.dumps(value, sort_keys=True, separators=(",", ":"))
    elif column in FLOAT_FORMAT:
        value = FLOAT_FORMAT[column].format(float(value))
    return one_line(str(value))  # folds tabs and newlines, so no cell can break the row


def format_row(row: dict) -> str:
    unknown = set(row) - set(COLUMNS)
    if unknown:
        raise ValueError(f"unknown results columns: {sorted(unknown)}")
    return "\t".join(_cell(column, row.get(column)) for column in COLUMNS) + "\n"


HEADER = "\t".join(COLUMNS) + "\n"
_HEADER_BYTES = HEADER.encode()
_HEADER_LINE = HEADER.rstrip("\n")
_RUN_ID = COLUMNS.index("run_id")
_STATUS = COLUMNS.index("status")
_KNOWN_STATUS = frozenset(STATUSES)


def unrecorded_path(path: Path) -> Path:
    """Where rows go that results.tsv could not take: same format, header first."""
    return path.with_name(path.name + ".unrecorded.tsv")


def _parse(text: str) -> tuple[list[list[str]], int, bool]:
    """(rows, skipped non-blank lines after the first, whether the first line is the header). A row
    is a line of exactly len(COLUMNS) cells with a known status whose run_id has no earlier row; the
    header is fixed, so a foreign first line (a row, or a header not counted as skipped) costs only
    itself. Controls are dropped from what is kept."""
    lines = text.split("\n")
    has_header = lines[0].lstrip("\ufeff").rstrip("\r") == _HEADER_LINE
    rows, skipped, seen = [], 0, set()
    for number, line in enumerate(lines):
        if number == 0 and has_header or not line.strip():
            continue
        line = line.rstrip("\r")
        if _UNSAFE_READ.search(line):  # NUL, ESC, bidi: a hand edit or damage; never our writer
            line = _UNSAFE_READ.sub("", line)
        cells = line.split("\t")
        if (
            len(cells) != len(COLUMNS)
            or cells[_STATUS] not in _KNOWN_STATUS
            or cells[_RUN_ID] in seen
        ):
            skipped += (
                number > 0
            )  # junk, a torn line, a repeated header, a foreign status, a run's second row
            continue
        if cells[_RUN_ID]:
            seen.add(cells[_RUN_ID])
        rows.append(cells)
    return rows, skipped, has_header


@contextmanager
def _locked(path: Path):
    """An exclusive flock on `<path>.lock`, waited for at most LOCK_TIMEOUT_SECONDS."""
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        deadline = time.monotonic() + LOCK_TIMEOUT_SECONDS
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise ResultsError(
                        f"{path} is locked by another writer for {LOCK_TIMEOUT_SECONDS:.0f} s"
                    ) from None
                time.sleep(0.01)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _write(path: Path, line_for: Callable[[bytes], str], checked: bool) -> None:
    """Append line_for(what the file holds) under the lock, header first. `checked` (results.tsv
    itself) refuses a foreign first line and a run_id that already has a row; the side file takes
    anything."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with _locked(path), open(path, "a+b") as handle:
        handle.seek(0)
        data = handle.read()
        line = line_for(data)
        if _HEADER_BYTES.startswith(data):  # empty, truncated, or torn while its header was written
            handle.write(_HEADER_BYTES[len(data) :])
        else:
            if checked:
                rows, _, has_header = _parse(data.decode(errors="replace"))
                if not has_header:
                    first = data.split(b"\n", 1)[0].decode(errors="replace")
                    raise ResultsError(
                        f"{path} has another header ({first.strip()[:80]!r}): move it aside"
                    )
                run_id = line.split("\t")[_RUN_ID]
                if run_id and any(cells[_RUN_ID] == run_id for cells in rows):
                    raise DuplicateRun(f"{path} already has a row for run {run_id}")
            if not data.endswith(b"\n"):  # a torn last line stays torn, but alone on its line
                handle.write(b"\n")
        handle.write(line.encode())
        handle.flush()
        os.fsync(handle.fileno())


def append(row: dict, path: Path, decided_here: bool = False) -> None:
    """Append one row under an exclusive lock. When results.tsv cannot take it safely (another
    header, its run_id already recorded, the lock held too long, an OSError) the row goes to
    unrecorded_path(path) and ResultsError (DuplicateRun for a run_id) says so: nothing is lost.
    `decided_here`: row["status"] (keep or discard) is decided under the lock against the rows
    already there, so two runs ending together cannot both be kept over the same best."""

    def line_for(data: bytes) -> str:
        nonlocal decided_here
        if decided_here:
            decided_here = False  # once: the side file gets the same status
            frame = _frame(_parse(data.decode(errors="replace"))[0])
            row["status"] = decide(row["val_bpb"], row["bpw"], row["eval_set"], row["model"], frame)
        return format_row(row)

    try:
        _write(path, line_for, checked=True)
        return
    except (ResultsError, OSError) as err:
        failure = err
    kind = DuplicateRun if isinstance(failure, DuplicateRun) else ResultsError
    reason = (
        str(failure)
        if isinstance(failure, ResultsError)
        else f"{path} could not be written ({failure})"
    )
    side = unrecorded_path(path)
    try:
        _write(side, lambda _: line_for(_read_bytes(path)), checked=False)  # decided if not yet
    except (ResultsError, OSError) as err:
        raise kind(
            f"{reason}; nor could {side} ({err}): the row, unrecorded: {format_row(row).rstrip()}"
        ) from failure
    raise kind(f"{reason}; the row went to {side}", side) from failure


def read(path: Path) -> pd.DataFrame:
    """All well-formed rows (numeric columns as floats, missing metrics as NaN); malformed lines
    and foreign statuses are skipped. An absent or empty file gives an empty frame."""
    return read_counted(path)[0]


def read_counted(path: Path) -> tuple[pd.DataFrame, int]:
    """read(), plus how many non-blank lines after the first (the header, or a foreign one) were
    skipped, so a viewer can say so. Any bytes read: invalid UTF-8 becomes U+FFFD, never an
    error."""
    rows, skipped, _ = _parse(_read_bytes(path).decode(errors="replace"))
    return _frame(rows), skipped


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:
        return b""


def _frame(rows: list[list[str]]) -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=list(COLUMNS), dtype=object)
    for column in NUMERIC:
        frame[column] = pd.to_numeric(frame[column], errors="coerce").astype("float64")
    return frame


def best_in_track(
    frame: pd.DataFrame, eval_set: str, model: str, track: str | None
) -> float | None:
    """Lowest val_bpb among kept and baseline rows of the same eval set, model and bpw track."""
    if frame.empty or track is None:
        return None
    same = frame[
        (frame["eval_set"] == eval_set)
        & (frame["model"] == model)
        & frame["status"].isin(("keep", "baseline"))
        & (frame["bpw"].map(bpw_track) == track)
    ]["val_bpb"].dropna()
    return float(same.min()) if len(same) else None


def decide(val_bpb: float, bpw: float, eval_set: str, model: str, frame: pd.DataFrame) -> str:
    """keep if the run beats the best kept row of its track by KEEP_MARGIN_BPB (or is the first)."""
    best = best_in_track(frame, eval_set, model, bpw_track(bpw))
    return "keep" if best is None or val_bpb < best - KEEP_MARGIN_BPB else "discard"
