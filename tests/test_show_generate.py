"""`show RUN` (config, row, train.py diff against its parent in a real git repo, log tail) and
`generate` (FP vs the run's verified low-bit model) on a real tiny run."""

import os
import shutil
import subprocess

import pytest
import torch
from conftest import ROOT
from test_runner import EVAL_TOKENS, TINY_FLAGS

from harness import results
from harness.__main__ import main
from harness.artifact import load_verified
from harness.runner import RunSpec, run_experiment
from harness.tools.show import RunNotFound, find_run, train_diff


def git(repo, *args):
    return subprocess.run(
        ["git", *args], cwd=repo, check=True, capture_output=True, text=True
    ).stdout.strip()


@pytest.fixture
def repo(tmp_path):
    """A real repo with two commits of train.py: LR 5e-4, then LR 1e-3."""
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q")
    git(repo, "config", "user.email", "t@example.com")
    git(repo, "config", "user.name", "t")
    (repo / "train.py").write_text("LR = 5e-4\nSTEPS = 0\n")
    git(repo, "add", "train.py")
    git(repo, "commit", "-qm", "first")
    (repo / "train.py").write_text("LR = 1e-3\nSTEPS = 0\n")
    git(repo, "commit", "-qam", "raise lr")
    return repo


def changed_lines(diff):
    return [
        line for line in diff.splitlines() if line[:1] in "+-" and line[:3] not in ("+++", "---")
    ]


def crafted_run(tmp_path, run_id, ran, commit):
    run_dir = tmp_path / "runs" / run_id
    run_dir.mkdir(parents=True)
    (run_dir / "train.py").write_text(ran)
    (run_dir / "run.log").write_text(
        "".join(f"step {i}\n" for i in range(100)) + "---\nval_bpb:          2.5\n"
    )
    results.append(
        {
            "commit": commit,
            "run_id": run_id,
            "status": "keep",
            "val_bpb": 2.5,
            "bpw": 1.73,
            "config": {"quant": "ternary", "lr": 1e-3},
        },
        tmp_path / "results.tsv",
    )
    return run_dir


def test_a_committed_change_is_diffed_against_the_commit_before(repo, tmp_path):
    head = git(repo, "rev-parse", "--short=7", "HEAD")
    run_dir = crafted_run(tmp_path, "r1", "LR = 1e-3\nSTEPS = 0\n", head)
    diff = train_diff(run_dir, head, repo / "train.py")
    assert f"--- train.py @ {head}^" in diff
    assert changed_lines(diff) == ["-LR = 5e-4", "+LR = 1e-3"]


def test_an_uncommitted_edit_is_diffed_against_its_commit(repo, tmp_path):
    head = git(repo, "rev-parse", "--short=7", "HEAD")
    run_dir = crafted_run(tmp_path, "r2", "LR = 1e-3\nSTEPS = 50\n", f"{head}-dirty")
    diff = train_diff(run_dir, f"{head}-dirty", repo / "train.py")
    assert f"--- train.py @ {head}\n" in diff
    assert changed_lines(diff) == ["-STEPS = 0", "+STEPS = 50"]


def test_no_diff_is_explained(repo, tmp_path):
    run_dir = crafted_run(tmp_path, "r3", "LR = 5e-4\nSTEPS = 0\n", "")
    assert train_diff(run_dir, "", repo / "train.py").startswith("no diff: no commit recorded")
    assert "unknown to the repo" in train_diff(run_dir, "deadbee", repo / "train.py")
    first = git(repo, "rev-list", "--max-parents=0", "--abbrev-commit", "--abbrev=7", "HEAD")
    assert "has no parent" in train_diff(run_dir, first, repo / "train.py")
    (run_dir / "train.py").unlink()
    assert "train.py is missing" in train_diff(run_dir, first, repo / "train.py")


def test_show_prints_config_row_diff_and_log_tail(repo, tmp_path, monkeypatch, capsys):
    head = git(repo, "rev-parse", "--short=7", "HEAD")
    crafted_run(tmp_path, "20260101-000000-beef", "LR = 1e-3\nSTEPS = 0\n", head)
    for name, value in (
        ("RESULTS", tmp_path / "results.tsv"),
        ("RUNS_DIR", tmp_path / "runs"),
        ("TRAIN_SCRIPT", repo / "train.py"),
    ):
        monkeypatch.setenv(f"HARNESS_{name}", str(value))
    assert main(["show", "20260101", "--tail", "3"]) == 0
    out = capsys.readouterr().out
    assert '"lr": 0.001' in out and "val_bpb        2.5" in out and "+LR = 1e-3" in out
    assert out.endswith("run.log (last 3 lines):\nstep 99\n---\nval_bpb:          2.5\n")


def test_a_missing_or_ambiguous_run_is_a_message_not_a_traceback(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HARNESS_RUNS_DIR", str(tmp_path / "runs"))
    assert main(["show", "nothing"]) == 1 and "no run 'nothing'" in capsys.readouterr().err
    for run_id in ("20260101-000000-aaaa", "20260101-000001-bbbb"):
        (tmp_path / "runs" / run_id).mkdir(parents=True)
    with pytest.raises(RunNotFound, match="matches 2 runs"):
        find_run("20260101")
    assert find_run("20260101-000001").name == "20260101-000001-bbbb"
    assert (
        main(["generate", "--run", "2025"]) == 1
        and "latest: 20260101-000001-bbbb" in capsys.readouterr().err
    )


# --- on a real tiny run ---


@pytest.fixture(scope="module")
def tiny_run(tiny_data_dir, tmp_path_factory):
    """One real ternary QAT run on the tiny model, with the harness's env pointed at it."""
    home = tmp_path_factory.mktemp("viewer")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HARNESS_DATA_DIR", str(tiny_data_dir))
        patch.setenv("HARNESS_RUNS_DIR", str(home / "runs"))
        patch.setenv("HARNESS_RESULTS", str(home / "results.tsv"))
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setenv(
            "PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
        )
        outcome = run_experiment(
            RunSpec(
                train_args=[*TINY_FLAGS, "--steps", "3"],
                budget_seconds=60,
                echo=False,
                eval_tokens=EVAL_TOKENS,
                train_script=ROOT / "train.py",
                results_path=home / "results.tsv",
                runs_dir=home / "runs",
            )
        )
        assert outcome.status == "keep", outcome.reason
        yield outcome


@torch.inference_mode()
def argmax_continuation(model, tokenizer, prompt, n):
    """Greedy decoding the slow, obvious way, for generate() to agree with."""
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    start = ids.shape[1]
    for _ in range(n):
        ids = torch.cat([ids, model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        if ids[0, -1] == tokenizer.eos_token_id:
            break
    return tokenizer.decode(ids[0, start:], skip_special_tokens=True).replace("\n", " ⏎ ")


def test_generate_prints_both_models_on_the_same_prompt(tiny_run, tiny_model_dir, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert (
        main(["generate", "--run", tiny_run.run_id, "--prompt", "The city of", "--tokens", "12"])
        == 0
    )
    out = capsys.readouterr().out
    assert f"low-bit:        run {tiny_run.run_id} (" in out and "14 x ternary" in out
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    full_precision = AutoModelForCausalLM.from_pretrained(
        tiny_model_dir, dtype=torch.float32
    ).eval()
    low_bit, _ = load_verified(tiny_run.run_dir / "artifact", tiny_model_dir)
    expected_fp = argmax_continuation(full_precision, tokenizer, "The city of", 12)
    expected_low_bit = argmax_continuation(low_bit.eval(), tokenizer, "The city of", 12)
    assert expected_fp and expected_low_bit
    assert f"  full precision | {expected_fp}\n  low-bit        | {expected_low_bit}\n" in out


def test_generate_reports_an_invalid_artifact(tiny_run, capsys):
    broken = tiny_run.run_dir.with_name(tiny_run.run_id + "-broken")
    shutil.copytree(tiny_run.run_dir, broken)
    (broken / "artifact" / "quant.json").unlink()
    assert main(["generate", "--run", broken.name, "--tokens", "4"]) == 1
    out = capsys.readouterr().out
    assert "invalid artifact: no quant.json" in out and "(no valid artifact)" in out
    shutil.rmtree(broken)


def test_show_and_loss_plot_of_a_real_run(tiny_run, capsys):
    assert main(["show", tiny_run.run_id]) == 0
    out = capsys.readouterr().out
    assert f"run_id         {tiny_run.run_id}" in out and "status:           keep" in out
    assert '"group_size": 32' in out
    assert main(["plot", "--run", tiny_run.run_id]) == 0
    assert (tiny_run.run_dir / "loss.png").read_bytes()[:4] == b"\x89PNG"
