"""`python -m harness status`: the table, best rows, Pareto front and filters on a crafted ledger,
bad input reported and skipped, and --follow picking up a row appended while it watches."""

import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from conftest import ROOT, default_sigint

from harness import results
from harness.tools import status


def row(run_id, status_="keep", val_bpb=2.0, bpw=1.73, config=None, **over):
    base = {
        "commit": "abc1234",
        "run_id": run_id,
        "timestamp": "2026-01-01T03:00:00",
        "status": status_,
        "val_bpb": val_bpb,
        "bpw": bpw,
        "eval_set": "sotu:eval",
        "model": "m",
        "description": run_id,
        "config": config or {"quant": "ternary"},
    }
    return {**base, **over}


@pytest.fixture
def ledger(tmp_path):
    """Baselines, kept and discarded runs in three tracks, a crash, a second eval set, and junk."""
    path = tmp_path / "results.tsv"
    rows = [
        row("fp", "baseline", 1.00, 32.0, {"baseline": "fp", "quant": "ternary"}),
        row("rtn", "baseline", 6.00, 1.60, {"baseline": "rtn", "quant": "ternary"}),
        row("t1", "keep", 2.50, 1.73),
        row("t2", "discard", 2.60, 1.73),
        row("t3", "keep", 2.20, 1.73, timestamp="2026-01-02T01:00:00"),
        row("boom", "crash", None, None, {"quant": "ternary", "reason": "RuntimeError: boom"}),
        row("i4", "keep", 1.30, 4.25, {"quant": "int"}, timestamp="2026-01-02T02:00:00"),
        row("i4b", "discard", 1.40, 4.50, {"quant": "int"}),  # worse with more bits: dominated
        row("c2", "discard", 2.10, 2.25, {"quant": "codebook"}),  # discarded yet on the front
        row("other", "keep", 0.50, 1.73, eval_set="wikitext:test"),
    ]
    for item in rows:
        results.append(item, path)
    with open(path, "a") as handle:
        handle.write("not a row at all\n")
        handle.write(
            "\t".join(["abc", "x", "2026", "exploded", *[""] * 12]) + "\n"
        )  # foreign status
    return path


def test_table_best_and_pareto_on_a_crafted_ledger(ledger):
    view = status.load(ledger)
    assert view.skipped == 2 and len(view.rows) == 10
    by_id = view.rows.set_index("run_id")
    assert by_id.loc["rtn", "method"] == "rtn" and by_id.loc["c2", "method"] == "codebook"
    assert by_id.loc["i4", "track"] == "4bit" and by_id.loc["c2", "track"] == "2bit"
    assert by_id.loc["boom", "note"] == "RuntimeError: boom" and by_id.loc["t1", "note"] == "t1"

    best = {(r.eval_set, r.track): r.run_id for r in view.best.itertuples()}
    # t3 beats the RTN baseline in the ternary track; discarded c2 never counts as best
    assert best == {
        ("sotu:eval", "ternary"): "t3",
        ("sotu:eval", "4bit"): "i4",
        ("sotu:eval", "fp"): "fp",
        ("wikitext:test", "ternary"): "other",
    }
    front = view.front
    assert list(front[front["eval_set"] == "sotu:eval"]["run_id"]) == [
        "rtn",
        "t3",
        "c2",
        "i4",
        "fp",
    ]
    assert list(front[front["eval_set"] == "wikitext:test"]["run_id"]) == ["other"]

    text = status.render(ledger)
    assert "10 rows, 2 malformed or foreign lines skipped" in text
    assert "Pareto front" in text and "RuntimeError: boom" in text


def test_filters_by_status_track_and_time(ledger):
    assert set(status.load(ledger, status.Filters(status=["crash", "discard"])).rows["run_id"]) == {
        "boom",
        "t2",
        "i4b",
        "c2",
    }
    ternary = status.load(ledger, status.Filters(track=["ternary"]))
    assert set(ternary.rows["run_id"]) == {"rtn", "t1", "t2", "t3", "other"}
    assert list(ternary.front[ternary.front["eval_set"] == "sotu:eval"]["run_id"]) == ["rtn", "t3"]
    assert set(status.load(ledger, status.Filters(since="2026-01-02")).rows["run_id"]) == {
        "t3",
        "i4",
    }
    assert list(status.render(ledger, last=1).splitlines()[3].split())[0] == "other"


def test_an_age_filter_counts_back_from_now(tmp_path):
    path = tmp_path / "results.tsv"
    now = time.time()
    results.append(
        row("old", timestamp=time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(now - 3 * 86400))),
        path,
    )
    results.append(
        row("new", timestamp=time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(now - 600))), path
    )
    assert list(status.load(path, status.Filters(since="1d")).rows["run_id"]) == ["new"]
    assert list(status.load(path, status.Filters(since="90m")).rows["run_id"]) == ["new"]
    with pytest.raises(ValueError, match="90m"):
        status.since_cutoff("yesterday-ish")


def test_empty_absent_and_foreign_files_are_reported_not_fatal(tmp_path):
    absent = tmp_path / "absent.tsv"
    assert "0 rows" in status.render(absent) and "no rows yet" in status.render(absent)
    empty = tmp_path / "empty.tsv"
    empty.write_text("")
    assert status.load(empty).rows.empty and status.load(empty).skipped == 0
    foreign = tmp_path / "foreign.tsv"
    foreign.write_text("a\tb\n1\t2\n3\t4\n")
    view = status.load(foreign)
    assert view.rows.empty and view.skipped == 2 and view.front.empty and view.best.empty
    assert "2 malformed or foreign lines skipped" in status.render(foreign)


def test_follow_yields_again_when_a_row_lands(tmp_path):
    path = tmp_path / "results.tsv"
    results.append(row("first"), path)
    draws = status.follow(path, lambda: status.render(path), interval=0.01)
    assert "first" in next(draws) and "second" not in status.render(path)
    results.append(row("second", val_bpb=1.9), path)
    assert "second" in next(draws)


def test_status_follow_redraws_in_place_and_stops_cleanly_on_ctrl_c(tmp_path):
    path = tmp_path / "results.tsv"
    results.append(row("first"), path)
    env = {**os.environ, "HARNESS_RESULTS": str(path), "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen(
        [sys.executable, "-m", "harness", "status", "--follow", "--interval", "0.05"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=default_sigint,
    )
    seen, drawn = [], threading.Event()

    def read_output() -> None:
        for chunk in iter(lambda: child.stdout.read(1), ""):
            seen.append(chunk)
            if "second" in "".join(seen[-4000:]):
                drawn.set()

    reader = threading.Thread(target=read_output, daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 60  # generous: a wedged child must fail the test, not hang it
        while "first" not in "".join(seen) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "first" in "".join(seen)
        results.append(row("second", val_bpb=1.9), path)
        assert drawn.wait(60), "".join(seen)[-2000:]
    finally:
        child.send_signal(signal.SIGINT)
        code = child.wait(30)
    output = "".join(seen)
    assert code == 0 and "Traceback" not in child.stderr.read()
    assert output.count(status.CLEAR_SCREEN) >= 2  # redrawn, not appended below
