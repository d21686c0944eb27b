import json
import threading
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, WIKITEXT, run_prepare

import prepare
from harness import integrity, models
from harness.data import DataError, load_prepared


def test_prepare_is_idempotent(tiny_model_dir, tmp_path, capsys):
    assert run_prepare(tiny_model_dir, tmp_path) == 0
    first = load_prepared(tmp_path, full_check=True)
    written = [
        first.train.path,
        first.eval.path,
        tmp_path / "prepared.json",
        *tmp_path.glob("tokens/*/token_bytes.npy"),
    ]
    stamps = {p: p.stat().st_mtime_ns for p in written}
    capsys.readouterr()
    assert run_prepare(tiny_model_dir, tmp_path) == 0
    assert capsys.readouterr().out.count("up to date") == 2
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps and len(
        stamps
    ) == 4  # nothing rewritten
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
    code = prepare.main(
        ["--model", "nobody-here/no-such-model", "--preset", "offline", "--data-dir", str(tmp_path)]
    )
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


# --- bad input is a one-line verdict, and train and test stay apart ---


def refused(capsys, code) -> str:
    """The one error line of a refused prepare.py run (exit code 2), after any progress bars."""
    err = capsys.readouterr().err
    lines = [
        line
        for line in err.replace("\r", "\n").splitlines()
        if "error" in line or "Traceback" in line
    ]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def prepare_texts(model_dir, data_dir, train, evaluation, *extra):
    return prepare.main(
        [
            "--model",
            str(model_dir),
            "--train",
            train,
            "--eval",
            evaluation,
            "--data-dir",
            str(data_dir),
            *extra,
        ]
    )


def test_a_glob_that_holds_the_eval_file_is_refused(tiny_model_dir, tmp_path, capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "valid.txt").write_text((WIKITEXT / "valid.txt").read_text())
    (corpus / "test.txt").write_text((WIKITEXT / "test.txt").read_text())
    data_dir = tmp_path / "data"
    err = refused(
        capsys,
        prepare_texts(
            tiny_model_dir, data_dir, f"file:{corpus}/*.txt", f"file:{corpus / 'test.txt'}"
        ),
    )
    assert "1 of 1 eval documents" in err and "train text" in err
    assert not (data_dir / "prepared.json").exists()


def test_the_eval_text_under_another_name_is_refused(tiny_model_dir, tmp_path, capsys):
    copy = (
        tmp_path / "notes.txt"
    )  # same text, other line endings and spacing: still the same document
    copy.write_text("  " + (WIKITEXT / "test.txt").read_text().replace("\n", "\r\n  "))
    err = refused(
        capsys,
        prepare_texts(tiny_model_dir, tmp_path, f"file:{copy}", f"file:{WIKITEXT / 'test.txt'}"),
    )
    assert "1 of 1 eval documents" in err
    assert not (tmp_path / "prepared.json").exists()


def test_bad_file_sources_are_one_line(tiny_model_dir, tmp_path, capsys, monkeypatch):
    test_file = f"file:{WIKITEXT / 'test.txt'}"
    err = refused(capsys, prepare_texts(tiny_model_dir, tmp_path, f"file:{WIKITEXT}", test_file))
    assert f"is a directory: use file:{WIKITEXT}/*.txt" in err
    empty = tmp_path / "empty.txt"
    empty.write_text(" \n\t\n")
    assert "holds no text" in refused(
        capsys, prepare_texts(tiny_model_dir, tmp_path, f"file:{empty}", test_file)
    )
    assert "no such file" in refused(
        capsys, prepare_texts(tiny_model_dir, tmp_path, f"file:{tmp_path}/*.nothing", test_file)
    )
    locked = tmp_path / "locked.txt"
    locked.write_text("text")
    read_text = Path.read_text  # root reads a chmod 000 file, so deny the read here instead

    def deny(path, *args, **kwargs):
        if Path(path) == locked:
            raise PermissionError(13, "Permission denied", str(path))
        return read_text(path, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", deny)
    err = refused(capsys, prepare_texts(tiny_model_dir, tmp_path, f"file:{locked}", test_file))
    assert "cannot read" in err and "Permission denied" in err
    assert not (tmp_path / "prepared.json").exists()


def test_an_eval_text_shorter_than_the_eval_budget_is_refused(tiny_model_dir, tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text((WIKITEXT / "test.txt").read_text()[:20_000])  # a few thousand tokens
    train = f"file:{WIKITEXT / 'valid.txt'}"
    err = refused(capsys, prepare_texts(tiny_model_dir, tmp_path, train, f"file:{short}"))
    assert "tokens, fewer than the 65,537" in err and "--eval-tokens" in err
    assert not (tmp_path / "prepared.json").exists()
    assert (
        prepare_texts(tiny_model_dir, tmp_path, train, f"file:{short}", "--eval-tokens", "1024")
        == 0
    )
    assert json.loads((tmp_path / "prepared.json").read_text())["eval_tokens"] == 1024
    assert load_prepared(tmp_path, full_check=True).eval_tokens == 1024
    assert "multiple" in refused(
        capsys,
        prepare_texts(tiny_model_dir, tmp_path, train, f"file:{short}", "--eval-tokens", "1000"),
    )


def test_hub_text_while_offline_fails_fast(tiny_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code = prepare_texts(tiny_model_dir, tmp_path, "tinystories", f"file:{WIKITEXT / 'test.txt'}")
    err = refused(capsys, code)
    assert "needs the dataset hub, which is unreachable" in err  # refused before any download try
    assert "tinystories" in err and all(name in err for name in ("sotu", "moby-dick", "file:PATH"))
    assert not (tmp_path / "prepared.json").exists()


@pytest.mark.parametrize(
    "text, why",
    [
        ("{not json", "not JSON"),
        ("[1, 2]", "not an object"),
        ("drop model_dir", "no 'model_dir'"),
        ("eval_tokens=x", "'eval_tokens'"),
    ],
)
def test_a_broken_prepared_json_is_one_data_error(tiny_data_dir, tmp_path, text, why):
    record = json.loads((tiny_data_dir / "prepared.json").read_text())
    if text == "drop model_dir":
        text = json.dumps({k: v for k, v in record.items() if k != "model_dir"})
    elif text == "eval_tokens=x":
        text = json.dumps({**record, "eval_tokens": "x"})
    (tmp_path / "prepared.json").write_text(text)
    with pytest.raises(DataError, match="run `python prepare.py` again") as caught:
        load_prepared(tmp_path)
    assert why in str(caught.value) and len(str(caught.value).splitlines()) == 1


def test_a_tampered_token_bytes_file_is_caught_and_rewritten(tiny_model_dir, tmp_path):
    assert run_prepare(tiny_model_dir, tmp_path) == 0
    path = next(tmp_path.glob("tokens/*/token_bytes.npy"))
    np.save(path, np.load(path) * 100)  # would divide every bits-per-byte figure by 100
    load_prepared(tmp_path)  # only full_check hashes it
    with pytest.raises(DataError, match="token_bytes.npy"):
        load_prepared(tmp_path, full_check=True)
    assert run_prepare(tiny_model_dir, tmp_path) == 0
    assert load_prepared(tmp_path, full_check=True).token_bytes.max() < 100


def test_a_record_without_eval_hides_the_eval_split(tiny_data_dir, tmp_path):
    for name in ("tokens", "models"):
        if (tiny_data_dir / name).exists():
            (tmp_path / name).symlink_to(tiny_data_dir / name)
    record = json.loads((tiny_data_dir / "prepared.json").read_text())
    (tmp_path / "prepared.json").write_text(
        json.dumps({k: v for k, v in record.items() if k != "eval"})
    )
    prepared = load_prepared(tmp_path, full_check=True, need_eval=False)
    assert prepared.eval is None and prepared.train.n_tokens > 0
    with pytest.raises(DataError, match="no eval split"):
        load_prepared(tmp_path)


def test_a_stalled_resolver_does_not_stall_the_hub_check(monkeypatch):
    from harness import sources

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    released = threading.Event()
    # the lookup answers (the hub "reachable") only once released: an answer of False means the
    # check gave up on the stalled lookup instead of waiting for it
    monkeypatch.setattr(sources.socket, "getaddrinfo", lambda *args: released.wait(60))
    try:
        assert not sources.hub_reachable(timeout=0.5)
    finally:
        released.set()


def test_the_manifest_holds_the_scoring_core_and_not_the_agent_or_the_viewers(tiny_data_dir):
    harness = ROOT / "harness"
    hashed = {path for path in integrity.trusted_files(tiny_data_dir) if harness in path.parents}
    assert hashed == set(harness.glob("*.py"))
    assert {harness / "runner.py", harness / "evaluate.py", harness / "formats.py"} <= hashed
    assert (harness / "agent").is_dir() and (harness / "tools").is_dir()  # left out, not missing
