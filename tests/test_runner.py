"""End to end on the tiny model: train.py runs as a child, the harness scores its artifact in
another process, and every outcome, good or bad, becomes one row with a reason."""

import json
import os
import subprocess
import sys

from conftest import ROOT, TINY_GROUP, TINY_RUN_FLAGS, wait_until_gone

from harness import results
from harness.runner import RunSpec, run_experiment

TINY_FLAGS = [*TINY_RUN_FLAGS, "--log-every", "1"]
EVAL_TOKENS = 4096


def run(tmp_path, train_args, script=None, **spec):
    spec = RunSpec(train_args=train_args, eval_tokens=EVAL_TOKENS, echo=False,
                   train_script=script or ROOT / "train.py", results_path=tmp_path / "results.tsv",
                   runs_dir=tmp_path / "runs", **{"budget_seconds": 60, **spec})  # fmt: skip
    return run_experiment(spec)


def only_row(tmp_path):
    frame = results.read(tmp_path / "results.tsv")
    assert len(frame) == 1
    return frame.iloc[0]


def broken_train_script(tmp_path, old, new):
    """train.py with one line changed: a real script failing the way a careless edit would."""
    text = (ROOT / "train.py").read_text()
    assert old in text
    script = tmp_path / "train.py"
    script.write_text(text.replace(old, new))
    return script


def test_a_tiny_qat_run_lands_a_verified_row(harness_env):
    outcome = run(harness_env, [*TINY_FLAGS, "--steps", "4"])
    assert outcome.status == "keep", outcome.reason
    row = only_row(harness_env)
    assert row["status"] == "keep" and row["steps"] == 4 and row["train_tokens"] == 4 * 2 * 64
    assert 0 < row["val_bpb"] < 20 and row["bpw"] < 4 and row["peak_mem_gb"] > 0
    assert row["eval_set"].endswith(f"test.txt:all@{EVAL_TOKENS}x1024")
    assert json.loads(row["config"])["group_size"] == TINY_GROUP
    log = (outcome.run_dir / "run.log").read_text()
    assert "\n---\nval_bpb:" in log and "status:           keep" in log
    assert (outcome.run_dir / "loss.csv").read_text().count("\n") == 5  # header + 4 steps


def test_baselines_are_recorded_as_such(harness_env):
    fp = run(harness_env, [*TINY_FLAGS, "--baseline", "fp"], baseline=True)
    rtn = run(harness_env, [*TINY_FLAGS, "--baseline", "rtn"], baseline=True)
    assert fp.status == rtn.status == "baseline"
    assert fp.row["bpw"] == 32.0 and rtn.row["bpw"] < 4 and fp.row["steps"] == 0


def test_nan_loss_stops_early_as_a_crash_row(harness_env):
    script = broken_train_script(
        harness_env, "        return ce, ce\n", "        return ce * float('nan'), ce\n"
    )
    outcome = run(harness_env, [*TINY_FLAGS, "--distill-weight", "0"], script=script)
    assert outcome.status == "crash" and "loss is nan at step 0" in outcome.reason
    row = only_row(harness_env)
    assert row["status"] == "crash" and str(row["val_bpb"]) == "nan"


def test_an_exception_becomes_a_crash_row_with_its_message(harness_env):
    script = broken_train_script(
        harness_env, "    cfg = parse_flags(argv)\n", "    raise RuntimeError('boom')\n"
    )
    outcome = run(harness_env, TINY_FLAGS, script=script)
    assert outcome.status == "crash" and outcome.reason == "RuntimeError: boom"


def test_a_baseline_is_the_harness_s_call_not_train_py_s(harness_env):
    outcome = run(
        harness_env, [*TINY_FLAGS, "--baseline", "fp"]
    )  # a plain run, whatever its flags say
    assert outcome.status == "keep" and outcome.row["bpw"] == 32.0


def test_a_hung_run_is_killed_and_recorded(harness_env):
    token = (
        f"hung-child-{harness_env.name}"  # the script's own child, not any sleeper on the machine
    )
    script = harness_env / "hang.py"
    script.write_text(
        "import subprocess, sys, time\n"
        f"subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)', {token!r}])\n"
        "time.sleep(300)\n"
    )
    outcome = run(harness_env, [], script=script, startup_seconds=1, export_seconds=1)
    assert outcome.status == "invalid" and outcome.reason.startswith(
        "killed after 2 s: no training step"
    )
    assert wait_until_gone(token) == []  # the whole sandbox went with it


def test_an_unverifiable_export_is_invalid_not_scored(harness_env):
    script = broken_train_script(harness_env, "            layers[name], plain = linear.export()\n",
                                 "            _, plain = linear.export()\n")  # fmt: skip
    outcome = run(harness_env, [*TINY_FLAGS, "--steps", "1"], script=script)
    assert outcome.status == "invalid" and "has no format in quant.json" in outcome.reason
    assert str(only_row(harness_env)["val_bpb"]) == "nan"


def test_python_train_py_by_hand_goes_through_the_harness(harness_env):
    env = {k: v for k, v in os.environ.items() if k != "HARNESS_RUN_DIR"}
    env["HARNESS_BUDGET_SECONDS"] = "30"
    done = subprocess.run(
        [sys.executable, "train.py", *TINY_FLAGS, "--steps", "2", "--description", "by hand"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "\n---\nval_bpb:" in done.stdout
    row = only_row(harness_env)
    assert row["description"] == "by hand" and row["steps"] == 2 and row["status"] == "keep"


def test_an_unprepared_checkout_gets_one_line_and_no_row(harness_env, monkeypatch):
    monkeypatch.setenv("HARNESS_DATA_DIR", str(harness_env / "nothing-here"))
    done = subprocess.run(
        [sys.executable, "train.py", "--steps", "1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={k: v for k, v in os.environ.items() if k != "HARNESS_RUN_DIR"},
        timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr.strip().startswith("error: no ") and "python prepare.py" in done.stderr
    assert not (harness_env / "results.tsv").exists()


def test_what_a_runner_killed_outright_kept_goes_into_its_run_folder(tmp_path):
    """A SIGKILLed runner cannot tidy up: the next runner puts its run.log and train.py copy in
    the run's folder and removes its private one; a live runner's folder is left alone."""
    from harness.runner import PRIVATE_PREFIX, settle_orphans

    dead = subprocess.Popen(["true"])
    dead.wait()
    run_id = "20261202-040000-beef"
    (tmp_path / run_id).mkdir()
    (tmp_path / run_id / "train.py").write_text("what train.py left there")
    outside = tmp_path / "outside.txt"
    outside.write_text("not train.py's to write")
    (tmp_path / run_id / "run.log").symlink_to(outside)  # a link train.py planted: replaced
    orphan = tmp_path / f"{PRIVATE_PREFIX}{dead.pid}-{run_id}-x1y2z3"
    live = tmp_path / f"{PRIVATE_PREFIX}{os.getpid()}-{run_id}-a1b2c3"
    for private in (orphan, live):
        private.mkdir()
        (private / "run.log").write_text("the runner's log")
        (private / "train.py").write_text("the runner's copy")
    settle_orphans(tmp_path)
    assert not orphan.exists() and live.exists()
    assert (tmp_path / run_id / "run.log").read_text() == "the runner's log"
    assert (tmp_path / run_id / "train.py").read_text() == "the runner's copy"
    assert not (tmp_path / run_id / "run.log").is_symlink()
    assert outside.read_text() == "not train.py's to write"
