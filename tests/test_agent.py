"""The agent loop end to end: a user's git repo, real tmux, real runs on the tiny model, and a
scripted OpenAI-compatible server (or Optuna) proposing. Every bad input becomes a logged reason
(a results row where a run happened), the branch returns to the last kept commit, the loop goes on;
signals stop and record the running experiment; a killed session's run is reconciled once."""

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from agent_fixtures import (
    API_KEY,
    TINY_FLAGS,
    TRAIN_PY,
    ScriptedServer,
    agent_events,
    assert_clean,
    block,
    files_containing,  # fmt: skip
    git,
    make_user_repo,
    screen_showing,
    tmux_environments,
)
from conftest import ROOT, default_sigint, processes_with

from harness import results
from harness.__main__ import main as harness_main
from harness.agent.proposers import LLMProposer, optuna_storage

OTHER_SECRET = "qat-token-" + secrets.token_hex(
    8
)  # in QAT_TEST_TOKEN: no secret-looking variable may travel
HANG_TOKEN = "qat-hang-" + secrets.token_hex(
    4
)  # in the hanging run's description, so in its runner's command line
NAN_CHECK = "        if not torch.isfinite(loss):"
NAN_EDIT = block(
    NAN_CHECK, "        loss = loss * float('nan')\n" + NAN_CHECK, description="nan loss"
)
KEY_PROBE_EDIT = block(
    "    cfg = parse_flags(argv)",
    "    raise RuntimeError(os.environ.get('OPENAI_API_KEY', 'no key'))",
    description="crash, showing the API key if the run could see it",
)
INVALID_EDIT = block(
    "            layers[name], plain = linear.export()",
    "            _, plain = linear.export()",
    description="export without codes",
)
HANG_EDIT = block("    cfg = parse_flags(argv)", "    time.sleep(600)\n    cfg = parse_flags(argv)",
                  description=f"hang {HANG_TOKEN}")  # fmt: skip
SIGNALS = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM", signal.SIGHUP: "SIGHUP"}


@pytest.fixture
def user_repo(harness_env, monkeypatch):
    repo = make_user_repo(harness_env / "user")
    monkeypatch.setenv("HARNESS_TRAIN_SCRIPT", str(repo / "train.py"))
    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)
    monkeypatch.setenv("QAT_TEST_TOKEN", OTHER_SECRET)
    socket = "qat-agent-" + secrets.token_hex(4)
    monkeypatch.setenv("QAT_TEST_SOCKET", socket)
    yield repo
    subprocess.run(["tmux", "-L", socket, "kill-server"], capture_output=True)


def agent_args(*extra, tag="t1"):
    return [
        "agent",
        "--tag",
        tag,
        "--socket",
        os.environ["QAT_TEST_SOCKET"],
        "--results-command",
        "sleep 600",
        "--budget",
        "60",
        "--eval-tokens",
        "4096",
        *extra,
    ]


def llm_args(server, *extra, tag="t1"):
    return agent_args(
        "--proposer",
        "llm",
        "--base-url",
        server.base_url,
        "--model",
        "scripted",
        "--retries",
        "1",
        "--backoff",
        "0.05",
        "--request-timeout",
        "3",
        *extra,
        tag=tag,
    )


def start_agent(server, *extra):
    return subprocess.Popen(
        [sys.executable, "-m", "harness", *llm_args(server, *extra), "--", *TINY_FLAGS],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=default_sigint,
    )


def viewer_pids():
    """The session's viewer panes (results, the agents' logs): they stay until the session goes."""
    listed = subprocess.run(
        [
            "tmux",
            "-L",
            os.environ["QAT_TEST_SOCKET"],
            "list-panes",
            "-a",
            "-F",
            "#{window_name} #{pane_pid}",
        ],
        capture_output=True,
        text=True,
    ).stdout.split("\n")
    viewers = ("results", "agent", "w1-agent", "w2-agent")  # a lone agent's and two workers'
    return {int(line.split()[1]) for line in listed if line.split()[:1] in [[v] for v in viewers]}


def leftover_processes(tmp, seconds=60):
    """This test's runner, train.py, tee and job shells still alive (found by a path under the
    test's own folder and the hanging run's token in their command lines), once `seconds` have let
    them end."""
    deadline = time.monotonic() + seconds
    mine = (f"{tmp}{os.sep}", HANG_TOKEN)  # tmp/: not the folder of a test whose name extends it
    while True:
        left = {pid for token in mine for pid in processes_with(token)} - viewer_pids()
        if not left or time.monotonic() > deadline:
            return sorted(left)
        time.sleep(0.5)


def hanging_train_py(tmp) -> bool:
    """Whether the runner's copy of train.py (runs/<id>/train.py) runs for this test: an argument
    that is that path (a tmux client's -e HARNESS_TRAIN_SCRIPT=... is not)."""
    runs = f"{tmp / 'runs'}/"
    for pid in processes_with(runs):
        try:
            arguments = (
                open(f"/proc/{pid}/cmdline", "rb").read().decode(errors="replace").split("\0")
            )
        except OSError:
            continue
        if any(
            Path(arg).name == "train.py" and Path(arg).parent.parent == tmp / "runs"
            for arg in arguments
        ):
            return True
    return False


def wait_for(condition, agent, seconds=300):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline and agent.poll() is None, (
            agent.stdout.read() if agent.poll() else ""
        )
        time.sleep(0.2)


def assert_no_secret_in_tmux(tmp):
    """No key or token in tmux's global environment, the server's or any pane's process, any
    process of this test, or any file under runs/."""
    socket = os.environ["QAT_TEST_SOCKET"]
    shown = subprocess.run(
        ["tmux", "-L", socket, "show-environment", "-g"], capture_output=True, text=True
    ).stdout
    assert "PATH=" in shown  # the server was there to ask
    environments = [*tmux_environments(socket).values()]
    for pid in processes_with(str(tmp)) + processes_with(HANG_TOKEN):
        try:
            environments.append(open(f"/proc/{pid}/environ", "rb").read())
        except OSError:
            pass  # ended meanwhile
    for secret in (API_KEY, OTHER_SECRET):
        assert secret not in shown
        assert all(secret.encode() not in environment for environment in environments)
        assert files_containing(tmp / "runs", secret) == []


@pytest.mark.slow  # minutes of real runs; .ci/run runs it after make test
def test_every_kind_of_reply_is_applied_and_run_or_rejected_with_a_reason(user_repo):
    tmp = user_repo.parent
    script = [
        (
            "reply",
            block("WARMUP_STEPS = 10", "WARMUP_STEPS = 1", description="shorter warm-up"),
        ),  # keep
        ("reply", block("EVAL_TOKENS = 65_536", "EVAL_TOKENS = 16", path="harness/evaluate.py")),
        ("reply", block("LR = 0.123", "LR = 0.5")),
        ("reply", block("LR = 5e-4", "LR = = 5e-4")),
        ("reply", "As an AI model I think you should try a bigger learning rate!"),
        ("reply", ""),
        ("status", 500),
        ("status", 500),  # the retry fails too
        ("slow", 6, "too late"),
        ("reply", KEY_PROBE_EDIT),  # a timeout, then the retry answers
        ("reply", NAN_EDIT),
        ("reply", INVALID_EDIT),
        (
            "reply",
            block("SEED = 0", "SEED = 0  # same seed, nothing else", description="comment only"),
        ),  # discard
        ("reply", "no block: asked after a run that did not crash"),
    ]
    with ScriptedServer(script) as server:
        code = harness_main([*llm_args(server, "--max-experiments", "12"), "--", *TINY_FLAGS])
    assert code == 0
    assert (
        os.environ["OPENAI_API_KEY"] == API_KEY
    )  # taken out of the environment only while the agent ran

    events = agent_events(tmp / "runs", "t1")
    rejected = [e["reason"] for e in events if e["event"] == "rejected"]
    assert len(rejected) == 7
    for reason, expected in zip(
        rejected,
        [
            "targets 'harness/evaluate.py'",
            "does not match train.py",
            "syntax error in edited train.py line",
            "no SEARCH/REPLACE block",
            "empty reply",
            "API unavailable after 2 attempts: InternalServerError",
            "no SEARCH/REPLACE block",
        ],
    ):
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
    assert all(
        json.loads(c)["train_args"][: len(TINY_FLAGS)] == TINY_FLAGS for c in frame["config"]
    )

    # what the model was shown: program.md, train.py as kept, the results so far, the last crash
    prompts = [r["body"]["messages"] for r in server.requests]
    assert prompts[0][0]["content"] == (ROOT / "program.md").read_text()
    assert (
        "WARMUP_STEPS = 1  #" in prompts[1][1]["content"]
        and "shorter warm-up" in prompts[1][1]["content"]
    )
    assert "RuntimeError: no key" in prompts[-4][1]["content"]  # the NaN request follows the crash
    assert "The last run crashed" in prompts[-2][1]["content"]  # after the invalid run
    assert "The last run crashed" not in prompts[-1][1]["content"]  # after the discarded one
    assert all(r["authorization"] == f"Bearer {API_KEY}" for r in server.requests)
    assert_no_secret_in_tmux(tmp)
    assert API_KEY not in (tmp / "results.tsv").read_text()

    assert_clean(user_repo, "t1", kept_commits=1)
    kept = git(user_repo, "show", "autoresearch/t1:train.py")
    assert "WARMUP_STEPS = 1  #" in kept and "SEED = 0  # same seed" not in kept


@pytest.mark.slow  # minutes of real runs; .ci/run runs it after make test
def test_odd_descriptions_are_recorded_and_a_proposal_that_cannot_be_committed_is_a_rejection(
    user_repo, monkeypatch
):
    tmp = user_repo.parent
    flag_like = "--budget=600 --no-sandbox --eval-tokens 1"
    proposed = []
    original = LLMProposer.propose

    def propose(self, context):
        proposal = original(self, context)
        proposed.append(proposal)
        if len(proposed) == 3:  # what no proposer should hand over: a message git cannot take
            proposal.description = "lone \ud800 surrogate"
        return proposal

    monkeypatch.setattr(LLMProposer, "propose", propose)
    script = [
        ("reply", block("WARMUP_STEPS = 10", "WARMUP_STEPS = 1", description=flag_like)),
        (
            "reply",
            block("SEED = 0", "SEED = 1", description="seed \ud800 one"),
        ),  # a surrogate in the reply's JSON
        ("reply", block("SEED = 0", "SEED = 2", description="never committed")),
        ("reply", "no edit block at all"),
    ]
    with ScriptedServer(script) as server:
        code = harness_main([*llm_args(server, "--max-experiments", "4"), "--", *TINY_FLAGS])
    assert code == 0

    frame = results.read(tmp / "results.tsv")
    assert len(frame) == 2 and set(frame["status"]) <= {"keep", "discard"}
    first = frame.iloc[0]
    assert first["description"] == flag_like
    config = json.loads(first["config"])
    assert (
        config["budget_seconds"] == 60 and config["sandbox"] == "bwrap"
    )  # the description set no flag
    assert "\ud800" not in frame.iloc[1]["description"] and "seed" in frame.iloc[1]["description"]

    events = agent_events(tmp / "runs", "t1")
    rejected = [e for e in events if e["event"] == "rejected"]
    assert [e["experiment"] for e in rejected] == [3, 4]
    assert (
        "could not be applied" in rejected[0]["reason"]
        and "UnicodeEncodeError" in rejected[0]["reason"]
    )
    assert "no SEARCH/REPLACE block" in rejected[1]["reason"]
    assert_clean(user_repo, "t1", kept_commits=int((frame["status"] == "keep").sum()))

    # the log window follows agent.log: proposals with their diff, runs, rejections with reasons
    human = (tmp / "runs" / "agent-t1" / "agent.log").read_text()
    assert (
        "+WARMUP_STEPS = 1" in human
        and "rejected experiment=3 reason=the proposal could not be applied" in human
    )
    screen = screen_showing(
        os.environ["QAT_TEST_SOCKET"], "autoresearch:agent", "rejected experiment=4"
    )
    assert "rejected experiment=4 reason=reply rejected: no SEARCH/REPLACE block" in screen


def test_a_server_that_keeps_failing_stops_the_loop_with_a_clear_message(user_repo, capsys):
    with ScriptedServer([]) as server:  # every request: 500
        code = harness_main(
            [*llm_args(server, "--max-crashes", "2", "--max-experiments", "10"), "--", *TINY_FLAGS]
        )
    assert code == 1
    assert (
        "2 failures in a row (--max-crashes), the last: API unavailable" in capsys.readouterr().out
    )
    stop = agent_events(user_repo.parent / "runs", "t1")[-1]
    assert stop["event"] == "stop" and stop["clean"] is True and stop["exit_code"] == 1
    assert not (user_repo.parent / "results.tsv").exists()  # no run happened, no row


def test_an_unprepared_checkout_stops_the_agent_before_it_starts(user_repo, monkeypatch, capsys):
    monkeypatch.setenv("HARNESS_DATA_DIR", str(user_repo.parent / "nothing-here"))
    assert harness_main(["agent", "--proposer", "optuna", "--tag", "t1", "--", *TINY_FLAGS]) == 2
    assert "python prepare.py" in capsys.readouterr().err
    assert not (user_repo.parent / "runs" / "agent-t1").exists()


def test_hours_bound_the_session(user_repo, capsys):
    with ScriptedServer([("reply", NAN_EDIT)]) as server:
        code = harness_main([*llm_args(server, "--hours", "0"), "--", *TINY_FLAGS])
    assert code == 0 and "0.0 hours are up (--hours)" in capsys.readouterr().out
    assert server.requests == [] and not (user_repo.parent / "results.tsv").exists()


def test_a_hanging_train_py_is_stopped_and_its_row_and_the_log_agree_on_why(user_repo):
    with ScriptedServer([("reply", HANG_EDIT)]) as server:
        code = harness_main(
            [*llm_args(server, "--max-experiments", "1", "--run-timeout", "20"), "--", *TINY_FLAGS]
        )
    assert code == 0
    run = [e for e in agent_events(user_repo.parent / "runs", "t1") if e["event"] == "run"][0]
    row = results.read(user_repo.parent / "results.tsv").iloc[0]
    assert row["status"] == "crash" and row["run_id"] == run["run_id"] and run["status"] == "crash"
    assert run["reason"] == json.loads(row["config"])["reason"] == "interrupted (SIGTERM)"
    assert run["stopped"] == "the agent stopped the run after 20 s (run timeout)"
    assert leftover_processes(user_repo.parent) == []
    assert_clean(user_repo, "t1", kept_commits=0)


@pytest.mark.parametrize("sig", SIGNALS, ids=SIGNALS.values())
def test_a_signal_stops_the_running_experiment_records_it_and_leaves_the_kept_commit(
    user_repo, sig
):
    tmp = user_repo.parent
    with ScriptedServer([("reply", HANG_EDIT)]) as server:
        agent = start_agent(server)
        wait_for(lambda: hanging_train_py(tmp), agent)
        assert_no_secret_in_tmux(tmp)  # the job's pane, the runner and train.py included
        agent.send_signal(sig)
        out, _ = agent.communicate(timeout=300)
    assert agent.returncode == 128 + sig, out
    row = results.read(tmp / "results.tsv").iloc[0]
    config = json.loads(row["config"])
    assert row["status"] == "crash" and config["reason"] == f"interrupted ({SIGNALS[sig]})"
    assert "recorded_by" not in config  # the runner wrote it
    assert f"interrupted ({SIGNALS[sig]}); run {row['run_id']} was stopped and recorded" in out
    events = agent_events(tmp / "runs", "t1")
    assert [(e["run_id"], e["reason"]) for e in events if e["event"] == "run"] == [
        (row["run_id"], config["reason"])
    ]
    assert events[-1]["event"] == "stop" and events[-1]["exit_code"] == 128 + sig
    assert leftover_processes(tmp) == []
    assert_clean(user_repo, "t1", kept_commits=0)


def test_ctrl_c_as_a_run_starts_says_recorded_only_when_the_row_is_there(user_repo):
    tmp = user_repo.parent
    started = tmp / "runs" / "agent-t1" / "agent.jsonl"
    with ScriptedServer([("reply", HANG_EDIT)]) as server:
        agent = start_agent(server)
        wait_for(lambda: started.exists() and '"event": "started"' in started.read_text(), agent)
        agent.send_signal(signal.SIGINT)
        out, _ = agent.communicate(timeout=300)
    assert agent.returncode == 130, out
    events = agent_events(tmp / "runs", "t1")
    run = [e for e in events if e["event"] == "run"][0]
    frame = results.read(tmp / "results.tsv")
    if run["run_id"] is None:  # the runner had not named a run yet
        assert frame.empty and "the runner had not started a run yet" in events[-1]["reason"]
    else:  # a named run always has its row, the runner's or the agent's
        assert list(frame["run_id"]) == [run["run_id"]] and frame.iloc[0]["status"] == "crash"
        assert f"run {run['run_id']} was stopped and recorded" in events[-1]["reason"]
    assert leftover_processes(tmp) == []
    assert_clean(user_repo, "t1", kept_commits=0)


@pytest.mark.parametrize("runner_killed", [False, True], ids=["runner-alive", "runner-killed-too"])
def test_a_killed_agents_run_is_reconciled_once_by_the_next_session(user_repo, runner_killed):
    tmp = user_repo.parent
    with ScriptedServer([("reply", HANG_EDIT)]) as server:
        agent = start_agent(server)
        wait_for(lambda: hanging_train_py(tmp), agent)
        agent.kill()
        agent.communicate(timeout=60)
        if runner_killed:  # the machine's OOM killer, say: no runner left to write the row
            for pid in processes_with(f"--description=hang {HANG_TOKEN}"):
                os.kill(pid, signal.SIGKILL)
        for _ in range(2):  # the second session finds nothing left to reconcile
            assert (
                harness_main([*llm_args(server, "--max-experiments", "0"), "--", *TINY_FLAGS]) == 0
            )
    events = agent_events(tmp / "runs", "t1")
    runs = [e for e in events if e["event"] == "run"]
    assert len(runs) == 1 and runs[0]["status"] == "crash"
    frame = results.read(tmp / "results.tsv")
    assert list(frame["run_id"]) == [runs[0]["run_id"]]  # one row, for that run
    config = json.loads(frame.iloc[0]["config"])
    if runner_killed:
        assert runs[0]["reconciled"] == "interrupted" and config["recorded_by"] == "agent"
        assert runs[0]["reason"] == config["reason"] == "interrupted (agent killed)"
    else:  # still running when the next session came: stopped, and its runner's row adopted
        assert runs[0]["reconciled"] == "adopted" and "recorded_by" not in config
        assert runs[0]["reason"] == config["reason"] == "interrupted (SIGTERM)"
        assert runs[0]["stopped"] == "stopped by the next session"
    assert leftover_processes(tmp) == []
    assert_clean(user_repo, "t1", kept_commits=0)


def test_a_run_that_finished_after_its_agent_was_killed_is_adopted_and_kept(user_repo):
    tmp = user_repo.parent
    exit_file = tmp / "runs" / "agent-t1" / "jobs" / "0001" / "exit_code"
    with ScriptedServer(
        [("reply", block("WARMUP_STEPS = 10", "WARMUP_STEPS = 1", description="shorter warm-up"))]
    ) as server:
        agent = start_agent(server)
        wait_for(lambda: hanging_train_py(tmp), agent)
        agent.kill()
        agent.communicate(timeout=60)
        deadline = time.monotonic() + 900
        while not exit_file.exists():  # the run goes on in tmux without its agent, to its row
            assert time.monotonic() < deadline
            time.sleep(0.5)
        assert harness_main([*llm_args(server, "--max-experiments", "0"), "--", *TINY_FLAGS]) == 0
    run = [e for e in agent_events(tmp / "runs", "t1") if e["event"] == "run"][0]
    frame = results.read(tmp / "results.tsv")
    assert (run["reconciled"], run["status"]) == ("adopted", "keep") and list(frame["run_id"]) == [
        run["run_id"]
    ]
    assert_clean(user_repo, "t1", kept_commits=1)  # the candidate it ran is the kept commit now
    assert "WARMUP_STEPS = 1  #" in git(user_repo, "show", "autoresearch/t1:train.py")


def test_uncommitted_train_py_is_warned_about_and_from_checkout_starts_from_it(user_repo, capsys):
    tweaked = TRAIN_PY + "# the user's uncommitted tweak\n"
    (user_repo / "train.py").write_text(tweaked)
    with ScriptedServer([]) as server:
        assert harness_main([*llm_args(server, "--max-experiments", "0"), "--", *TINY_FLAGS]) == 0
        assert "train.py in your checkout has uncommitted changes" in capsys.readouterr().out
        warning = [
            e for e in agent_events(user_repo.parent / "runs", "t1") if e["event"] == "warning"
        ]
        assert len(warning) == 1 and "--from-checkout" in warning[0]["reason"]
        assert git(user_repo, "rev-parse", "autoresearch/t1") == git(user_repo, "rev-parse", "main")

        for _ in range(2):  # the second time the branch exists: it keeps its kept commit
            assert (
                harness_main(
                    [
                        *llm_args(server, "--max-experiments", "0", "--from-checkout", tag="t2"),
                        "--",
                        *TINY_FLAGS,
                    ]
                )
                == 0
            )
    events = agent_events(user_repo.parent / "runs", "t2")
    assert [e["event"] for e in events].count("from_checkout") == 1
    assert (
        "branch autoresearch/t2 exists"
        in [e for e in events if e["event"] == "warning"][0]["reason"]
    )
    assert git(user_repo, "show", "autoresearch/t2:train.py") + "\n" == tweaked
    assert int(git(user_repo, "rev-list", "--count", "main..autoresearch/t2")) == 1
    # the user's checkout and index as they were
    assert (
        git(user_repo, "status", "--porcelain") == "M train.py"
        and git(user_repo, "diff", "--cached") == ""
    )
    assert (user_repo / "train.py").read_text() == tweaked
    worktree = user_repo.parent / "runs" / "agent-t2" / "worktree"
    assert (worktree / "train.py").read_text() == tweaked and git(
        worktree, "status", "--porcelain"
    ) == ""


@pytest.mark.slow  # minutes of real runs; .ci/run runs it after make test
def test_optuna_runs_trials_as_rows_and_resumes_its_study(user_repo):
    import optuna

    tmp = user_repo.parent
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for _ in range(2):  # the second invocation resumes the same study
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "harness",
                *agent_args(
                    "--proposer", "optuna", "--seed", "1", "--max-experiments", "1", tag="opt"
                ),
                "--",
                *TINY_FLAGS,
            ],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    frame = results.read(tmp / "results.tsv")
    assert len(frame) == 2 and set(frame["status"]) <= {"keep", "discard"}
    journal = str(tmp / "runs" / "agent-opt" / "optuna.journal")
    study = optuna.load_study(study_name="opt", storage=optuna_storage(journal))
    trials = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert [t.number for t in trials] == [0, 1]
    for trial, (_, row) in zip(trials, frame.iterrows()):
        args = json.loads(row["config"])["train_args"]
        assert args[: len(TINY_FLAGS)] == TINY_FLAGS
        assert float(args[args.index("--lr") + 1]) == pytest.approx(trial.params["--lr"], rel=1e-3)
        assert int(args[args.index("--warmup-steps") + 1]) == trial.params["--warmup-steps"]
        assert trial.value == pytest.approx(row["val_bpb"], abs=1e-6)
        assert trial.user_attrs["run_id"] == row["run_id"]  # told when the run was named
        assert row["description"] == f"optuna trial {trial.number}: " + " ".join(
            args[len(TINY_FLAGS) :]
        )
    assert_clean(user_repo, "opt", kept_commits=0)


def test_the_log_masks_a_key_but_not_a_placeholder_short_enough_to_be_a_word(tmp_path):
    from harness.agent.log import AgentLog

    AgentLog(tmp_path, secrets=[API_KEY])("api_error", error=f"bad key {API_KEY} for tokens")
    AgentLog(tmp_path, secrets=["k"])("prompt", tokens_estimate=6078, context_tokens=8192)
    text = (tmp_path / "agent.log").read_text() + (tmp_path / "agent.jsonl").read_text()
    assert API_KEY not in text and "bad key *** for tokens" in text
    assert "tokens_estimate=6078 context_tokens=8192" in text


def workers_args(*extra, tag):
    return [sys.executable, "-m", "harness",
            *agent_args("--proposer", "optuna", "--workers", "2", *extra, tag=tag)]  # fmt: skip


@pytest.mark.slow  # minutes of real runs; .ci/run runs it after make test
def test_two_workers_run_distinct_trials_each_on_its_own_branch_and_cores(user_repo):
    import optuna

    from harness.agent.log import agent_logs
    from harness.agent.workers import Worker

    tmp = user_repo.parent
    done = subprocess.run(
        [*workers_args("--max-experiments", "4", tag="par"), "--", *TINY_FLAGS],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    frame = results.read(tmp / "results.tsv")
    assert len(frame) == 4 and set(frame["status"]) <= {"keep", "discard"}
    logs = agent_logs(tmp / "runs")
    ran = {name: log.run_ids() for name, log in logs.items()}
    assert sorted(ran) == ["par-1", "par-2"] and [len(ids) for ids in ran.values()] == [2, 2]
    assert sorted(ran["par-1"] + ran["par-2"]) == sorted(frame["run_id"])
    flags = {tuple(json.loads(config)["train_args"]) for config in frame["config"]}
    assert len(flags) == 4  # no parameter set twice, across the workers
    study = optuna.load_study(
        study_name="par", storage=optuna_storage(str(tmp / "runs" / "agent-par" / "optuna.journal"))
    )
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 4
    assert {t.user_attrs["owner"].split(":")[1] for t in complete} == {"par-1", "par-2"}
    for k in (1, 2):
        worktree = tmp / "runs" / "agent-par" / f"w{k}" / "worktree"
        assert git(worktree, "status", "--porcelain", "--untracked-files=all") == ""
        assert git(worktree, "rev-parse", "HEAD") == git(
            user_repo, "rev-parse", f"autoresearch/par-{k}"
        )
        cores = ",".join(map(str, Worker("par", k, 2).cpus()))
        for job in (tmp / "runs" / "agent-par" / f"w{k}" / "jobs").iterdir():
            assert f"--cpus {cores} " in (job / "job.sh").read_text()
    assert git(user_repo, "status", "--porcelain") == ""
    windows = subprocess.run(
        ["tmux", "-L", os.environ["QAT_TEST_SOCKET"], "list-windows", "-a", "-F", "#{window_name}"],
        capture_output=True, text=True,
    ).stdout.split()  # fmt: skip
    assert {"results", "w1-agent", "w2-agent"} <= set(windows)


@pytest.mark.slow  # minutes of real runs; .ci/run runs it after make test
def test_a_signal_to_the_workers_supervisor_stops_and_records_every_workers_run(user_repo):
    from harness.agent.log import agent_logs

    tmp = user_repo.parent
    supervisor = subprocess.Popen(
        # no --steps: each run trains for the whole 60 s budget, so the signal finds both running
        [*workers_args("--max-experiments", "2", tag="sig"), "--", *TINY_FLAGS[:-2]],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        preexec_fn=default_sigint,
    )  # fmt: skip

    def both_training():
        logs = agent_logs(tmp / "runs")
        named = [e for log in logs.values() for e in log.events() if e.get("event") == "running"]
        return len(named) == 2 and len(list((tmp / "runs").glob("*/loss.csv"))) == 2

    wait_for(both_training, supervisor)
    supervisor.send_signal(signal.SIGTERM)
    output = supervisor.communicate(timeout=120)[0]
    assert supervisor.returncode == 128 + signal.SIGTERM, output[-3000:]
    frame = results.read(tmp / "results.tsv")
    assert len(frame) == 2 and set(frame["status"]) == {"crash"}
    assert {json.loads(c)["reason"] for c in frame["config"]} == {"interrupted (SIGTERM)"}
    for name, log in agent_logs(tmp / "runs").items():
        stop = log.events()[-1]
        assert stop["event"] == "stop" and stop["exit_code"] == 143 and stop["clean"], name
    assert leftover_processes(tmp) == []
