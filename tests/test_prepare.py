import os

import pytest

import prepare
from conftest import WIKITEXT
from harness import models
from harness.data import DataError, load_prepared


def run_prepare(model_dir, data_dir, *extra):
    return prepare.main(["--model", str(model_dir), "--train", f"file:{WIKITEXT / 'valid.txt'}",
                         "--eval", f"file:{WIKITEXT / 'test.txt'}", "--data-dir", str(data_dir), *extra])  # fmt: skip


def test_prepare_is_idempotent(tiny_model_dir, tmp_path, capsys):
    assert run_prepare(tiny_model_dir, tmp_path) == 0
    first = load_prepared(tmp_path, full_check=True)
    written = [first.train.path, first.eval.path, tmp_path / "prepared.json", *tmp_path.glob("tokens/*/token_bytes.npy")]
    stamps = {p: p.stat().st_mtime_ns for p in written}
    capsys.readouterr()
    assert run_prepare(tiny_model_dir, tmp_path) == 0
    assert capsys.readouterr().out.count("up to date") == 2
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps and len(stamps) == 4  # nothing rewritten
    assert first.eval.meta["utf8_bytes"] == 1_256_449  # WikiText-2 test, as shared/README says


def test_a_truncated_token_file_is_detected_and_rebuilt(tiny_model_dir, tmp_path, capsys):
    assert run_prepare(tiny_model_dir, tmp_path) == 0
    path = load_prepared(tmp_path).eval.path
    with open(path, "r+b") as handle:
        handle.truncate(path.stat().st_size // 2)
    with pytest.raises(DataError, match="truncated"):
        load_prepared(tmp_path)
    capsys.readouterr()
    assert run_prepare(tiny_model_dir, tmp_path) == 0
    assert "rebuilding" in capsys.readouterr().out
    assert load_prepared(tmp_path, full_check=True).eval.n_tokens > 0


def test_a_corrupt_token_file_is_never_used(tiny_model_dir, tmp_path):
    assert run_prepare(tiny_model_dir, tmp_path) == 0
    path = load_prepared(tmp_path).train.path
    with open(path, "r+b") as handle:
        handle.seek(100)
        handle.write(b"\xff\xff")
    with pytest.raises(DataError, match="corrupt"):
        load_prepared(tmp_path, full_check=True)


def test_an_unreachable_hub_id_gives_one_clear_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code = prepare.main(["--model", "nobody-here/no-such-model", "--preset", "offline", "--data-dir", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and "model hub" in err and models.EMBEDDED_DEFAULT in err


def test_unknown_model_and_source_are_refused(tiny_model_dir, tmp_path, capsys):
    assert prepare.main(["--model", "not a model", "--data-dir", str(tmp_path)]) == 2
    assert "unknown model" in capsys.readouterr().err
    assert run_prepare(tiny_model_dir, tmp_path, "--train", "nonsense") == 2
    assert "unknown text source" in capsys.readouterr().err


def test_a_missing_prepare_step_says_what_to_run(tmp_path):
    with pytest.raises(DataError, match="python prepare.py"):
        load_prepared(tmp_path)


def test_token_byte_lengths_add_up_to_the_text(tiny_data_dir):
    prepared = load_prepared(tiny_data_dir)
    tokens = prepared.eval.tokens()
    assert int(prepared.token_bytes[tokens].sum()) == prepared.eval.meta["utf8_bytes"]
