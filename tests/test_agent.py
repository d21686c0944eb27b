"""The agent loop end to end: a user's git repo, real tmux, real runs on the tiny model, and a
scripted OpenAI-compatible server (or Optuna) proposing. Every bad input becomes a logged reason
(a results row where a run happened), the branch returns to the last kept commit, the loop goes on."""

import json
import os
import secrets
import signal
import subprocess
import sys
import time

import pytest
from agent_fixtures import (API_KEY, TINY_FLAGS, ScriptedServer, agent_events, assert_clean, block, files_containing,
                            git, make_user_repo)  # fmt: skip

from conftest import ROOT, default_sigint
from harness import results
from harness.__main__ import main as harness_main

NAN_CHECK = "        if not torch.isfinite(loss):"
NAN_EDIT = block(NAN_CHECK, "        loss = loss * float('nan')\n" + NAN_CHECK, description="nan loss")
KEY_PROBE_EDIT = block("    cfg = parse_flags(argv)", "    raise RuntimeError(os.environ.get('OPENAI_API_KEY', 'no key'))",
                       description="crash, showing the API key if the run could see it")  # fmt: skip
INVALID_EDIT = block("            layers[name], plain = linear.export()", "            _, plain = linear.export()",
                     description="export without codes")  # fmt: skip
HANG_EDIT = block("    cfg = parse_flags(argv)", "    time.sleep(600)\n    cfg = parse_flags(argv)", description="hang")


@pytest.fixture
def user_repo(harness_env, monkeypatch):
    repo = make_user_repo(harness_env / "user")
    monkeypatch.setenv("HARNESS_TRAIN_SCRIPT", str(repo / "train.py"))
    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)
    socket = "qat-agent-" + secrets.token_hex(4)
    monkeypatch.setenv("QAT_TEST_SOCKET", socket)
    yield repo
    subprocess.run(["tmux", "-L", socket, "kill-server"], capture_output=True)


def agent_args(*extra, tag="t1"):
    return ["agent", "--tag", tag, "--socket", os.environ["QAT_TEST_SOCKET"], "--results-command", "sleep 600",
            "--budget", "60", "--eval-tokens", "4096", *extra]  # fmt: skip


def llm_args(server, *extra, tag="t1"):
    return agent_args("--proposer", "llm", "--base-url", server.base_url, "--model", "scripted", "--retries", "1",
                      "--backoff", "0.05", "--request-timeout", "3", *extra, tag=tag)  # fmt: skip


def leftover_processes(tmp):
    """Runner, train.py or evaluation processes of this test still alive (the tmux server aside)."""
    pattern = f"^{sys.executable} (-m harness run --description hang|.*{tmp})"
    return subprocess.run(["pgrep", "-af", pattern], capture_output=True, text=True).stdout


def test_every_kind_of_reply_is_applied_and_run_or_rejected_with_a_reason(user_repo):
    tmp = user_repo.parent
    script = [
        ("reply", block("WARMUP_STEPS = 10", "WARMUP_STEPS = 1", description="shorter warm-up")),  # keep
        ("reply", block("EVAL_TOKENS = 65_536", "EVAL_TOKENS = 16", path="harness/evaluate.py")),
        ("reply", block("LR = 0.123", "LR = 0.5")),
        ("reply", block("LR = 5e-4", "LR = = 5e-4")),
        ("reply", "As an AI model I think you should try a bigger learning rate!"),
        ("reply", ""),
        ("status", 500), ("status", 500),  # the retry fails too
        ("slow", 6, "too late"), ("reply", KEY_PROBE_EDIT),  # a timeout, then the retry answers
        ("reply", NAN_EDIT),
        ("reply", INVALID_EDIT),
        ("reply", block("SEED = 0", "SEED = 0  # same seed, nothing else", description="comment only")),  # discard
    ]
    with ScriptedServer(script) as server:
        code = harness_main([*llm_args(server, "--max-experiments", "11"), "--", *TINY_FLAGS])
    assert code == 0

    events = agent_events(tmp / "runs", "t1")
    rejected = [e["reason"] for e in events if e["event"] == "rejected"]
    assert len(rejected) == 6
    for reason, expected in zip(rejected, ["targets 'harness/evaluate.py'", "does not match train.py",
                                           "syntax error in edited train.py line", "no SEARCH/REPLACE block",
                                           "empty reply", "API unavailable after 2 attempts: InternalServerError"]):  # fmt: skip
        assert expected in reason, reason
    assert any(e["event"] == "api_error" and "Timeout" in e["error"] for e in events)

    runs = [e for e in events if e["event"] == "run"]
    assert [r["status"] for r in runs] == ["keep", "crash", "crash", "invalid", "discard"]
    assert runs[1]["reason"] == "RuntimeError: no key"  # the run could not see the API key
    assert "loss is nan" in runs[2]["reason"] and runs[3]["reason"]
    frame = results.read(tmp / "results.tsv")
    assert list(frame["run_id"]) == [r["run_id"] for r in runs]
    assert list(frame["status"]) == [r["status"] for r in runs]
    assert list(frame["description"])[0] == "shorter warm-up"
    assert all(json.loads(c)["train_args"][: len(TINY_FLAGS)] == TINY_FLAGS for c in frame["config"])

    # what the model was shown: program.md, train.py as kept, the results so far, the last crash
    prompts = [r["body"]["messages"] for r in server.requests]
    assert prompts[0][0]["content"] == (ROOT / "program.md").read_text()
    assert "WARMUP_STEPS = 1  #" in prompts[1][1]["content"] and "shorter warm-up" in prompts[1][1]["content"]
    assert "RuntimeError: no key" in prompts[-3][1]["content"]  # the NaN request follows the crash
    assert all(r["authorization"] == f"Bearer {API_KEY}" for r in server.requests)
    assert files_containing(tmp / "runs", API_KEY) == [] and API_KEY not in (tmp / "results.tsv").read_text()

    assert_clean(user_repo, "t1", kept_commits=1)
    kept = git(user_repo, "show", "autoresearch/t1:train.py")
    assert "WARMUP_STEPS = 1  #" in kept and "SEED = 0  # same seed" not in kept


def test_a_server_that_keeps_failing_stops_the_loop_with_a_clear_message(user_repo, capsys):
    with ScriptedServer([]) as server:  # every request: 500
        code = harness_main([*llm_args(server, "--max-crashes", "2", "--max-experiments", "10"), "--", *TINY_FLAGS])
    assert code == 1
    assert "2 failures in a row (--max-crashes)" in capsys.readouterr().out
    stop = agent_events(user_repo.parent / "runs", "t1")[-1]
    assert stop["event"] == "stop" and stop["clean"] is True
    assert not (user_repo.parent / "results.tsv").exists()  # no run happened, no row


def test_hours_bound_the_session(user_repo, capsys):
    with ScriptedServer([("reply", NAN_EDIT)]) as server:
        code = harness_main([*llm_args(server, "--hours", "0"), "--", *TINY_FLAGS])
    assert code == 0 and "0.0 hours are up (--hours)" in capsys.readouterr().out
    assert server.requests == [] and not (user_repo.parent / "results.tsv").exists()


def test_a_hanging_train_py_is_stopped_recorded_and_reset(user_repo):
    with ScriptedServer([("reply", HANG_EDIT)]) as server:
        code = harness_main([*llm_args(server, "--max-experiments", "1", "--run-timeout", "20"), "--", *TINY_FLAGS])
    assert code == 0
    run = [e for e in agent_events(user_repo.parent / "runs", "t1") if e["event"] == "run"][0]
    assert run["status"] == "crash" and "stopped the run after 20 s" in run["reason"]
    row = results.read(user_repo.parent / "results.tsv").iloc[0]
    assert row["status"] == "crash" and row["run_id"] == run["run_id"]
    assert leftover_processes(user_repo.parent) == ""
    assert_clean(user_repo, "t1", kept_commits=0)


def test_ctrl_c_records_the_running_experiment_and_leaves_the_tree_clean(user_repo):
    tmp = user_repo.parent
    with ScriptedServer([("reply", HANG_EDIT)]) as server:
        agent = subprocess.Popen([sys.executable, "-m", "harness", *llm_args(server), "--", *TINY_FLAGS], cwd=ROOT,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, preexec_fn=default_sigint)  # fmt: skip
        hanging = f"^{sys.executable} {tmp / 'runs'}/[0-9a-f-]+/train.py"  # the runner runs its copy
        deadline = time.monotonic() + 120
        while not subprocess.run(["pgrep", "-f", hanging], capture_output=True).stdout:
            assert time.monotonic() < deadline and agent.poll() is None
            time.sleep(0.5)  # until train.py runs (hangs) in its tmux window
        agent.send_signal(signal.SIGINT)
        out, _ = agent.communicate(timeout=120)
    assert agent.returncode == 130, out
    assert "interrupted (Ctrl-C)" in out
    row = results.read(tmp / "results.tsv").iloc[0]
    assert row["status"] == "crash" and json.loads(row["config"])["reason"] == "interrupted (Ctrl-C)"
    assert leftover_processes(tmp) == ""
    assert_clean(user_repo, "t1", kept_commits=0)


def test_optuna_runs_trials_as_rows_and_resumes_its_study(user_repo):
    import optuna

    tmp = user_repo.parent
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for _ in range(2):  # the second invocation resumes the same study
        done = subprocess.run([sys.executable, "-m", "harness", *agent_args("--proposer", "optuna", "--seed", "1",
                               "--max-experiments", "1", tag="opt"), "--", *TINY_FLAGS],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    frame = results.read(tmp / "results.tsv")
    assert len(frame) == 2 and set(frame["status"]) <= {"keep", "discard"}
    study = optuna.load_study(study_name="opt", storage=f"sqlite:///{tmp / 'runs' / 'agent-opt' / 'optuna.db'}")
    trials = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert [t.number for t in trials] == [0, 1]
    for trial, (_, row) in zip(trials, frame.iterrows()):
        args = json.loads(row["config"])["train_args"]
        assert args[: len(TINY_FLAGS)] == TINY_FLAGS
        assert float(args[args.index("--lr") + 1]) == pytest.approx(trial.params["--lr"], rel=1e-3)
        assert int(args[args.index("--warmup-steps") + 1]) == trial.params["--warmup-steps"]
        assert trial.value == pytest.approx(row["val_bpb"], abs=1e-6)
        assert row["description"] == f"optuna trial {trial.number}: " + " ".join(args[len(TINY_FLAGS):])
    assert_clean(user_repo, "opt", kept_commits=0)
