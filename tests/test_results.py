import json
import math
import multiprocessing

import pytest

from harness import results


def row(i=0, **over):
    base = {
        "commit": "abc1234",
        "run_id": f"r{i}",
        "timestamp": "2026-01-01T00:00:00",
        "status": "keep",
        "val_bpb": 1.5 + i / 1000,
        "val_ppl": 20.0,
        "bpw": 1.73,
        "size_mb": 50.0,
        "steps": 10,
        "train_tokens": 5120,
        "train_seconds": 3.0,
        "peak_mem_gb": 1.0,
        "eval_set": "e",
        "model": "m",
        "description": "tab\there and\nnewline",
        "config": {"lr": 1e-3, "note": "a\tb"},
    }
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
    assert sorted(frame["run_id"]) == sorted(
        f"r{w * 1000 + i}" for w in range(8) for i in range(100)
    )


def test_rows_read_back_with_types_and_empty_metrics(tmp_path):
    path = tmp_path / "results.tsv"
    results.append(row(), path)
    results.append(
        row(1, status="crash", val_bpb=None, val_ppl=None, bpw=None, size_mb=float("nan")), path
    )
    frame = results.read(path)
    assert frame.loc[0, "val_bpb"] == pytest.approx(1.5)
    assert frame.loc[0, "description"] == "tab here and newline"
    assert json.loads(frame.loc[0, "config"]) == {"lr": 1e-3, "note": "a\tb"}  # JSON escapes it
    assert math.isnan(frame.loc[1, "val_bpb"]) and math.isnan(frame.loc[1, "size_mb"])
    assert "\t\t" in path.read_text().splitlines()[2]  # empty cells, not 0


def test_a_foreign_header_is_refused_left_intact_and_the_row_side_filed(tmp_path):
    path = tmp_path / "results.tsv"
    path.write_text("a\tb\n1\t2\n")
    side = tmp_path / "results.tsv.unrecorded.tsv"
    with pytest.raises(results.ResultsError, match="another header") as caught:
        results.append(row(), path)
    assert caught.value.side == side == results.unrecorded_path(path) and str(side) in str(
        caught.value
    )
    assert path.read_text() == "a\tb\n1\t2\n"
    assert side.read_text().splitlines()[0] == results.HEADER.strip("\n")
    assert list(results.read(side)["run_id"]) == ["r0"]  # nothing lost


def test_rows_after_a_foreign_first_line_still_read_and_appends_go_aside(tmp_path):
    path = tmp_path / "results.tsv"
    path.write_text("# edited by hand\n" + results.format_row(row(0)) + results.format_row(row(1)))
    frame, skipped = results.read_counted(path)
    assert list(frame["run_id"]) == ["r0", "r1"] and skipped == 0
    assert frame["val_bpb"].dtype == float and frame.loc[1, "val_bpb"] == pytest.approx(1.501)
    with pytest.raises(results.ResultsError, match="unrecorded.tsv"):
        results.append(row(2), path)
    with pytest.raises(results.ResultsError):
        results.append(row(3), path)
    assert list(results.read(path)["run_id"]) == ["r0", "r1"]
    side = results.read(results.unrecorded_path(path))
    assert list(side["run_id"]) == ["r2", "r3"]  # one header, both rows


def _bytes_ledger(path, junk: bytes):
    path.write_bytes(results.HEADER.encode() + results.format_row(row(0)).encode() + junk
                     + results.format_row(row(1)).encode())  # fmt: skip


@pytest.mark.parametrize("junk, skipped", [
    (b"\xff\n", 1),  # the byte that used to make pandas drop the next row
    (b"\x00\x00\x00\x00\n", 1),  # a block of NULs, as a crash can leave
    (b"abc\xc3\x28\xfe\tr9\n", 1),  # invalid UTF-8 in a short line
    (b"\xff" * 3 + b"\t" * 15 + b"\n", 1),  # invalid bytes with the right tab count, no status
    (results.HEADER.encode(), 1),  # a header repeated in the middle
    (b"\t" * 20 + b"keep\n", 1),  # too many tabs
    (b"abc\tr9\t2026\tkeep\n", 1),  # too few tabs
    (b"\r\n\n  \n", 0),  # blank lines are not counted
], ids=["ff", "nul", "bad-utf8", "bad-utf8-tabs", "header-again", "many-tabs", "few-tabs",
       "blank"])  # fmt: skip
def test_any_bytes_in_the_middle_cost_only_their_line(tmp_path, junk, skipped):
    path = tmp_path / "results.tsv"
    _bytes_ledger(path, junk)
    frame, count = results.read_counted(path)
    assert list(frame["run_id"]) == ["r0", "r1"] and count == skipped
    results.append(row(2), path)  # and the next append lands
    assert list(results.read(path)["run_id"]) == ["r0", "r1", "r2"]


def test_damaged_bytes_inside_a_row_keep_the_row_and_drop_the_controls(tmp_path):
    path = tmp_path / "results.tsv"
    line = results.format_row(row(5, description="plain")).encode()
    _bytes_ledger(path, line.replace(b"plain", b"pl\xffa\x00i\x1b[31mn"))
    frame, skipped = results.read_counted(path)
    assert list(frame["run_id"]) == ["r0", "r5", "r1"] and skipped == 0
    assert frame.loc[1, "description"] == "pl\ufffdai[31mn"


def test_crlf_bom_and_a_torn_last_line_read(tmp_path):
    path = tmp_path / "results.tsv"
    text = results.HEADER + results.format_row(row(0)) + results.format_row(row(1))
    path.write_bytes(b"\xef\xbb\xbf" + text.replace("\n", "\r\n").encode() + b"abc1234\tr2\t20")
    frame, skipped = results.read_counted(path)
    assert list(frame["run_id"]) == ["r0", "r1"] and skipped == 1
    assert frame.loc[0, "config"].endswith("}")  # no \r left on the last cell
    results.append(row(3), path)  # a CRLF header is still the header
    assert list(results.read(path)["run_id"]) == ["r0", "r1", "r3"]


def test_a_duplicate_run_id_is_refused_and_side_filed(tmp_path):
    path = tmp_path / "results.tsv"
    results.append(row(0), path)
    before = path.read_bytes()
    with pytest.raises(results.DuplicateRun, match="r0") as caught:
        results.append(row(0, status="baseline", val_bpb=0.1, description="forged"), path)
    assert isinstance(
        caught.value, results.ResultsError
    ) and caught.value.side == results.unrecorded_path(path)
    assert path.read_bytes() == before
    assert list(results.read(caught.value.side)["description"]) == ["forged"]


def test_a_row_written_by_hand_for_a_recorded_run_is_skipped(tmp_path):
    path = tmp_path / "results.tsv"
    results.append(row(0), path)
    with open(path, "a") as handle:  # around append(): the forged row comes second, so it loses
        handle.write(results.format_row(row(0, status="baseline", val_bpb=0.1)))
    frame, skipped = results.read_counted(path)
    assert len(frame) == 1 and frame.loc[0, "val_bpb"] == pytest.approx(1.5) and skipped == 1


def test_a_lock_held_too_long_side_files_the_row(tmp_path, monkeypatch):
    import fcntl

    path = tmp_path / "results.tsv"
    monkeypatch.setattr(results, "LOCK_TIMEOUT_SECONDS", 0.05)
    with open(tmp_path / "results.tsv.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        holder = multiprocessing.get_context("fork").Process(
            target=results.append, args=(row(0), path)
        )
        holder.start()
        holder.join()
    assert holder.exitcode != 0 and not path.exists()
    assert list(results.read(results.unrecorded_path(path))["run_id"]) == ["r0"]


def test_an_unwritable_file_side_files_the_row(tmp_path):
    path = tmp_path / "results.tsv"
    path.mkdir()  # open() raises IsADirectoryError, an OSError
    with pytest.raises(results.ResultsError, match="could not be written") as caught:
        results.append(row(0), path)
    assert list(results.read(caught.value.side)["run_id"]) == ["r0"]


def test_when_even_the_side_file_fails_the_error_carries_the_row(tmp_path):
    path = tmp_path / "results.tsv"
    path.mkdir()
    results.unrecorded_path(path).mkdir()
    with pytest.raises(results.ResultsError) as caught:
        results.append(row(0, description="keep me"), path)
    assert caught.value.side is None and "keep me" in str(caught.value)


def test_terminal_controls_are_stripped_from_cells(tmp_path):
    path = tmp_path / "results.tsv"
    nasty = (
        "\x1b[2J\x1b[31mred\x1b[0m \u202egnp.exe\u202c \u2066iso\u2069 "
        "\u200e\u200f\u061c\x7f\x9b\x00 sur\ud800rogate"
    )
    results.append(row(0, description=nasty, model="m\x07\x08"), path)
    cells = path.read_text().splitlines()[1].split("\t")
    assert cells[results.COLUMNS.index("description")] == "red gnp.exe iso surrogate"
    assert cells[results.COLUMNS.index("model")] == "m"
    assert results.read(path).loc[0, "description"] == "red gnp.exe iso surrogate"


def test_truncation_is_survived(tmp_path):
    path = tmp_path / "results.tsv"
    results.append(row(0), path)
    path.write_bytes(b"")  # truncated to nothing: history is gone, but the file works again
    assert results.read_counted(path)[1] == 0 and results.read(path).empty
    results.append(row(1), path)
    assert path.read_text() == results.HEADER + results.format_row(row(1))
    path.write_text(results.HEADER[:11])  # torn inside the header: completed, not foreign
    results.append(row(2), path)
    assert list(results.read(path)["run_id"]) == ["r2"]
    path.write_text(results.HEADER + results.format_row(row(3))[:30])  # torn inside a row
    results.append(row(4), path)
    assert list(results.read(path)["run_id"]) == ["r4"]


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


def _decided_writer(path, worker, start):
    start.wait()
    results.append(row(worker, status="valid", val_bpb=1.5), path, decided_here=True)


def test_runs_ending_together_are_decided_under_the_lock(tmp_path):
    """Eight equally good runs recorded at once: the lock decides, so exactly one beats the best."""
    path = tmp_path / "results.tsv"
    start = multiprocessing.Event()
    writers = [
        multiprocessing.Process(target=_decided_writer, args=(path, w, start)) for w in range(8)
    ]
    for w in writers:
        w.start()
    start.set()
    for w in writers:
        w.join()
        assert w.exitcode == 0
    assert sorted(results.read(path)["status"]) == ["discard"] * 7 + ["keep"]
