"""results.tsv: one row per experiment, appended atomically, read with pandas.

Writers take an exclusive lock on `results.tsv.lock` and append one whole line, so concurrent
runs never interleave. A row is never rewritten. Metrics of a run that produced none are empty,
not 0. Readers skip malformed lines rather than fail.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import time
from pathlib import Path

import pandas as pd

COLUMNS = (
    "commit", "run_id", "timestamp", "status", "val_bpb", "val_ppl", "bpw", "size_mb", "steps",
    "train_tokens", "train_seconds", "peak_mem_gb", "eval_set", "model", "description", "config",
)  # fmt: skip
NUMERIC = ("val_bpb", "val_ppl", "bpw", "size_mb", "steps", "train_tokens", "train_seconds", "peak_mem_gb")
STATUSES = ("baseline", "keep", "discard", "crash", "invalid")
FLOAT_FORMAT = {"val_bpb": "{:.6f}", "val_ppl": "{:.4f}", "bpw": "{:.4f}", "size_mb": "{:.3f}",
                "train_seconds": "{:.1f}", "peak_mem_gb": "{:.3f}"}  # fmt: skip

KEEP_MARGIN_BPB = 0.001  # a run must beat the best kept row of its track by this much to be kept
LOCK_TIMEOUT_SECONDS = 120.0

# bits-per-weight tracks: rows only compete with rows of the same track (upper bounds, inclusive)
TRACKS = (("ternary", 1.8), ("2bit", 2.5), ("3bit", 3.5), ("4bit", 4.5), ("8bit", 8.5), ("fp", math.inf))


class ResultsError(Exception):
    """results.tsv cannot be written safely; nothing was written."""


def bpw_track(bpw: float | None) -> str | None:
    if bpw is None or not math.isfinite(bpw):
        return None
    return next(name for name, bound in TRACKS if bpw <= bound)


def _cell(column: str, value) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    if column == "config" and not isinstance(value, str):
        value = json.dumps(value, sort_keys=True, separators=(",", ":"))
    elif column in FLOAT_FORMAT:
        value = FLOAT_FORMAT[column].format(float(value))
    return " ".join(str(value).split())  # no tab or newline can break the row


def format_row(row: dict) -> str:
    unknown = set(row) - set(COLUMNS)
    if unknown:
        raise ValueError(f"unknown results columns: {sorted(unknown)}")
    return "\t".join(_cell(column, row.get(column)) for column in COLUMNS) + "\n"


HEADER = "\t".join(COLUMNS) + "\n"


def append(row: dict, path: Path) -> None:
    """Append one row under an exclusive lock. Raises ResultsError, writing nothing, when the
    file has another header or the lock is held too long."""
    line = format_row(row).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        deadline = time.monotonic() + LOCK_TIMEOUT_SECONDS
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise ResultsError(f"{path} is locked by another writer for {LOCK_TIMEOUT_SECONDS:.0f} s") from None
                time.sleep(0.01)
        try:
            with open(path, "a+b") as handle:
                size = handle.seek(0, os.SEEK_END)
                if size == 0:
                    handle.write(HEADER.encode())
                else:
                    handle.seek(0)
                    header = handle.readline().decode(errors="replace")
                    if header != HEADER:
                        raise ResultsError(f"{path} has another header ({header.strip()[:80]!r}): move it aside")
                    handle.seek(size - 1)
                    if handle.read(1) != b"\n":  # a torn last line stays torn, but alone on its line
                        handle.write(b"\n")
                handle.write(line)
                handle.flush()
                os.fsync(handle.fileno())
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def read(path: Path) -> pd.DataFrame:
    """All well-formed rows (numeric columns as floats, missing metrics as NaN); malformed lines
    and foreign statuses are skipped. An absent or empty file gives an empty frame."""
    return read_counted(path)[0]


def read_counted(path: Path) -> tuple[pd.DataFrame, int]:
    """read(), plus how many non-blank lines after the header were skipped (all of them when the
    header is foreign), so a viewer can say so."""
    if not path.exists() or path.stat().st_size == 0:
        return pd.DataFrame(columns=list(COLUMNS)), 0
    with open(path, errors="replace") as handle:
        data_lines = sum(1 for line in handle if line.strip()) - 1
    frame = pd.read_csv(
        path, sep="\t", dtype=str, keep_default_na=False, on_bad_lines="skip", engine="python", quoting=3
    )
    if tuple(frame.columns) != COLUMNS:
        return pd.DataFrame(columns=list(COLUMNS)), max(data_lines, 0)
    frame = frame[frame["status"].isin(STATUSES)].copy()
    for column in NUMERIC:
        frame[column] = pd.to_numeric(frame[column].replace("", None), errors="coerce")
    return frame.reset_index(drop=True), data_lines - len(frame)


def best_in_track(frame: pd.DataFrame, eval_set: str, model: str, track: str | None) -> float | None:
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
