import json
import multiprocessing
import math

import pytest

from harness import results


def row(i=0, **over):
    base = {"commit": "abc1234", "run_id": f"r{i}", "timestamp": "2026-01-01T00:00:00", "status": "keep",
            "val_bpb": 1.5 + i / 1000, "val_ppl": 20.0, "bpw": 1.73, "size_mb": 50.0, "steps": 10,
            "train_tokens": 5120, "train_seconds": 3.0, "peak_mem_gb": 1.0, "eval_set": "e", "model": "m",
            "description": "tab\there and\nnewline", "config": {"lr": 1e-3, "note": "a\tb"}}  # fmt: skip
    return {**base, **over}


def _writer(path, worker, count):
    for i in range(count):
        results.append(row(worker * 1000 + i), path)


def test_concurrent_appends_lose_or_garble_nothing(tmp_path):
    path = tmp_path / "results.tsv"
    workers = [multiprocessing.Process(target=_writer, args=(path, w, 100)) for w in range(8)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
        assert w.exitcode == 0
    lines = path.read_text().splitlines()
    assert lines[0] == results.HEADER.strip("\n")
    assert len(lines) == 801
    assert all(line.count("\t") == len(results.COLUMNS) - 1 for line in lines)
    frame = results.read(path)
    assert sorted(frame["run_id"]) == sorted(f"r{w * 1000 + i}" for w in range(8) for i in range(100))


def test_rows_read_back_with_types_and_empty_metrics(tmp_path):
    path = tmp_path / "results.tsv"
    results.append(row(), path)
    results.append(row(1, status="crash", val_bpb=None, val_ppl=None, bpw=None, size_mb=float("nan")), path)
    frame = results.read(path)
    assert frame.loc[0, "val_bpb"] == pytest.approx(1.5)
    assert frame.loc[0, "description"] == "tab here and newline"
    assert json.loads(frame.loc[0, "config"]) == {"lr": 1e-3, "note": "a\tb"}  # JSON escapes it
    assert math.isnan(frame.loc[1, "val_bpb"]) and math.isnan(frame.loc[1, "size_mb"])
    assert "\t\t" in path.read_text().splitlines()[2]  # empty cells, not 0


def test_a_foreign_header_is_refused_and_left_intact(tmp_path):
    path = tmp_path / "results.tsv"
    path.write_text("a\tb\n1\t2\n")
    with pytest.raises(results.ResultsError, match="another header"):
        results.append(row(), path)
    assert path.read_text() == "a\tb\n1\t2\n"


def test_a_torn_last_line_is_isolated_and_skipped(tmp_path):
    path = tmp_path / "results.tsv"
    results.append(row(0), path)
    with open(path, "a") as handle:
        handle.write("abc1234\tpartial")  # a writer killed mid-line
    results.append(row(1), path)
    assert list(results.read(path)["run_id"]) == ["r0", "r1"]


def test_unknown_columns_are_refused():
    with pytest.raises(ValueError):
        results.format_row({"val_bpb": 1.0, "made_up": 2})


def test_tracks_and_keep_rule(tmp_path):
    assert results.bpw_track(1.73) == "ternary"
    assert results.bpw_track(2.14) == "2bit"
    assert results.bpw_track(4.25) == "4bit"
    assert results.bpw_track(32.0) == "fp"
    path = tmp_path / "results.tsv"
    results.append(row(0, status="baseline", val_bpb=3.0), path)  # RTN in the ternary track
    results.append(row(1, status="baseline", val_bpb=1.0, bpw=32.0), path)  # FP: another track
    frame = results.read(path)
    assert results.decide(2.5, 1.73, "e", "m", frame) == "keep"
    assert results.decide(2.9995, 1.73, "e", "m", frame) == "discard"  # inside the noise margin
    assert results.decide(2.5, 1.73, "other-eval", "m", frame) == "keep"
