"""Proposers without runs: the Optuna study across killed sessions, the LLM prompt and its size, the
training dynamics, and every way a chat server can answer, through the real openai client."""

import email.utils
import json
import multiprocessing
import os
import re
import time

import optuna
import pandas as pd
import pytest
from agent_fixtures import TRAIN_PY, RawServer, block, raw_reply
from conftest import ROOT

from harness import results
from harness.agent.proposers import (
    CHARS_PER_TOKEN,
    LOSS_CSV_BYTES,
    RETRY_AFTER_CAP,
    Context,
    LLMConfig,
    LLMProposer,
    OptunaProposer,
    Proposal,
    Rejected,
    Result,
    build_messages,
    dynamics_summary,
    load_search_space,  # fmt: skip
    optuna_storage,
    retry_after,
)

JSON = {"Content-Type": "application/json"}
LR_LINE = next(line for line in TRAIN_PY.splitlines() if line.startswith("LR = "))
GOOD_REPLY = block(
    LR_LINE, LR_LINE.replace("LR = 5e-4", "LR = 1e-3"), description="raise the learning rate"
)
SETTING_LINES = [line for line in TRAIN_PY.splitlines() if re.match(r"^[A-Z][A-Z0-9_]* = ", line)]
TrialState = optuna.trial.TrialState
COMPLETE, FAIL, RUNNING = TrialState.COMPLETE, TrialState.FAIL, TrialState.RUNNING


def real_context(**fields) -> Context:
    values = {
        "train_py": TRAIN_PY,
        "program": (ROOT / "program.md").read_text(),
        "recent": pd.DataFrame(),
        "crash_log": "",
        **fields,
    }
    return Context(**values)


def llm(server, **overrides) -> LLMProposer:
    settings = {
        "model": "scripted",
        "base_url": server.base_url,
        "api_key": "test",
        "timeout": 5,
        "retries": 1,
        "backoff": 0.01,
        **overrides,
    }
    return LLMProposer(LLMConfig(**settings))


def rejection(script, **overrides) -> tuple[Rejected, RawServer]:
    with RawServer(script) as server:
        with pytest.raises(Rejected) as caught:
            llm(server, **overrides).propose(real_context())
    return caught.value, server


def completion_of(content: str) -> dict:
    return {"choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]}


def test_the_shipped_search_space_loads():
    space = load_search_space(ROOT / "search_space.json")
    assert space["--lr"].log and space["--warmup-steps"].low == 0
    assert all(flag.startswith("--") for flag in space)


@pytest.mark.parametrize("declared, message", [
    ({"lr": {"type": "float", "low": 0, "high": 1}}, "must be a train.py flag"),
    ({"--lr": {"type": "uniform", "low": 0, "high": 1}}, "use float, int or categorical"),
    ({"_comment": "nothing else"}, "declares no flags"),
])  # fmt: skip
def test_a_bad_search_space_is_refused_with_the_reason(tmp_path, declared, message):
    path = tmp_path / "space.json"
    path.write_text(json.dumps(declared))
    with pytest.raises(SystemExit, match=message):
        load_search_space(path)


# --- Optuna across sessions ---

SMALL_SPACE = {
    "--warmup-steps": optuna.distributions.IntDistribution(0, 4),
    "--quant": optuna.distributions.CategoricalDistribution(["ternary", "int"]),
}


def test_a_trial_left_running_by_an_interrupted_sweep_is_failed_and_the_study_goes_on(tmp_path):
    space = {"--lr": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)}
    first = OptunaProposer(space, str(tmp_path / "study.journal"), "s", seed=0)
    done = first.propose(None)
    first.tell(done, Result("keep", 1.5))
    first.propose(None)  # the session dies here: this trial stays RUNNING in the database
    resumed = OptunaProposer(space, str(tmp_path / "study.journal"), "s", seed=0)
    resumed.reconcile(results.read(tmp_path / "results.tsv"))  # no rows at all
    assert [t.state for t in resumed.study.trials] == [COMPLETE, FAIL]
    nxt = resumed.propose(None)
    assert (
        nxt.trial == 2
        and nxt.train_args[0] == "--lr"
        and nxt.description.startswith("optuna trial 2: --lr ")
    )
    resumed.tell(nxt, Result("crash", None))
    assert resumed.study.trials[2].state == FAIL
    assert resumed.study.best_value == 1.5


def test_a_seeded_study_killed_and_restarted_never_runs_a_parameter_set_twice(tmp_path):
    proposed = []
    for _ in range(2):  # each session proposes, then dies without telling the study anything
        session = OptunaProposer(SMALL_SPACE, str(tmp_path / "study.journal"), "s", seed=7)
        proposed += [tuple(session.propose(None).train_args) for _ in range(4)]
        del session
    assert len(set(proposed)) == 8  # of the 10 sets there are
    last = OptunaProposer(SMALL_SPACE, str(tmp_path / "study.journal"), "s", seed=7)
    proposed += [tuple(last.propose(None).train_args) for _ in range(2)]
    assert len(set(proposed)) == 10
    assert any(
        "repeat_of" in t.user_attrs for t in last.study.trials
    )  # the sampler did repeat; the repeats never ran
    with pytest.raises(Rejected, match="search space looks exhausted") as exhausted:
        last.propose(None)
    assert exhausted.value.failure


def scored_results(tmp_path, rows: list[tuple[str, str, float | None]]) -> pd.DataFrame:
    path = tmp_path / "results.tsv"
    for run_id, status, bpb in rows:
        results.append(
            {"commit": "abc1234", "run_id": run_id, "status": status, "val_bpb": bpb}, path
        )
    return results.read(path)


def test_reconcile_gives_a_killed_sessions_trials_their_rows_and_fails_the_rest(tmp_path):
    space = {"--lr": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)}
    first = OptunaProposer(space, str(tmp_path / "study.journal"), "s", seed=0)
    told = first.propose(None)
    first.started(told, "run-told")
    first.tell(told, Result("discard", None))  # e.g. outside --track: the agent's word stands
    for run_id in ("run-scored", "run-crashed", None):
        proposal = first.propose(None)
        if run_id:
            first.started(proposal, run_id)
    del first  # SIGKILL: three trials RUNNING, one of them never started a run
    frame = scored_results(tmp_path, [("run-told", "keep", 1.4), ("run-scored", "discard", 1.7),
                                      ("run-crashed", "crash", None)])  # fmt: skip
    resumed = OptunaProposer(space, str(tmp_path / "study.journal"), "s", seed=0)
    assert [t.state for t in resumed.study.trials] == [FAIL, RUNNING, RUNNING, RUNNING]
    resumed.reconcile(frame)
    trials = resumed.study.trials
    assert [t.state for t in trials] == [FAIL, COMPLETE, FAIL, FAIL]
    assert trials[1].value == pytest.approx(1.7) and trials[1].user_attrs["run_id"] == "run-scored"
    resumed.reconcile(frame)  # once settled, nothing changes
    assert len(resumed.study.trials) == 4


def test_a_run_that_outlived_its_agent_is_scored_when_its_row_comes(tmp_path):
    space = {"--lr": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)}
    first = OptunaProposer(space, str(tmp_path / "study.journal"), "s", seed=0)
    first.started(first.propose(None), "run-late")
    del first
    resumed = OptunaProposer(space, str(tmp_path / "study.journal"), "s", seed=0)
    resumed.reconcile(scored_results(tmp_path, []))  # the run still goes on in its tmux window
    assert [t.state for t in resumed.study.trials] == [FAIL]
    resumed.reconcile(scored_results(tmp_path, [("run-late", "keep", 1.25)]))
    late = resumed.study.trials
    assert [t.state for t in late] == [FAIL, COMPLETE]
    assert late[1].value == pytest.approx(1.25) and late[1].params == late[0].params
    assert late[1].user_attrs["reconciled_from"] == 0
    resumed.reconcile(scored_results(tmp_path, []))  # the same rows again: no second copy
    assert len(resumed.study.trials) == 2


# --- the prompt ---


def code_block(user: str) -> str:
    return user.split("```python\n", 1)[1].split("\n```", 1)[0]


def test_the_prompt_carries_program_train_py_results_dynamics_and_the_crash():
    recent = pd.DataFrame(
        [
            {
                "commit": "abc1234",
                "status": "keep",
                "val_bpb": 2.5,
                "bpw": 1.7,
                "steps": 9,
                "description": "first try",
            }
        ]
    )
    context = real_context(
        recent=recent, crash_log="Traceback: boom", dynamics="r1: 9 steps, loss 5 4 3 2 1"
    )
    system, user = build_messages(context)
    assert system == {"role": "system", "content": (ROOT / "program.md").read_text()}
    content = user["content"]
    assert (
        TRAIN_PY in content and "not shown" not in content
    )  # the default 32K tokens take all of it
    for part in ("first try", "Traceback: boom", "r1: 9 steps, loss 5 4 3 2 1", "<<<<<<< SEARCH"):
        assert part in content


def test_a_small_context_gets_the_settings_and_the_dynamics_and_whole_sections_of_train_py():
    context_tokens, max_tokens = 12000, 2048
    context = real_context(crash_log="Traceback: boom", dynamics="r1: 9 steps, loss 5 4 3 2 1")
    messages = build_messages(context, context_tokens, max_tokens)
    assert (
        sum(len(m["content"]) for m in messages) <= (context_tokens - max_tokens) * CHARS_PER_TOKEN
    )
    user = messages[1]["content"]
    assert (
        "r1: 9 steps, loss 5 4 3 2 1" in user
        and "Traceback: boom" in user
        and "DESCRIPTION: double LR" in user
    )
    shown = code_block(user)
    assert all(line in shown.splitlines() for line in SETTING_LINES)
    markers = [line for line in shown.splitlines() if line.startswith("# ... lines ")]
    assert markers and all("not shown: " in line for line in markers)
    assert "in part to fit the model's context" in user
    # each stretch between markers is train.py verbatim, from a top-level line to a top-level line
    for stretch in re.split(r"^# \.\.\. lines .*\n", shown + "\n", flags=re.MULTILINE):
        assert stretch in TRAIN_PY
        assert not stretch.strip() or not stretch.splitlines()[0][:1].isspace()


def test_train_chars_caps_train_py_but_not_its_settings():
    train_py = "LR = 5e-4  # learning rate\n" + "x = 1\n" * 1000
    user = build_messages(real_context(train_py=train_py), train_chars=100)[1]["content"]
    assert "LR = 5e-4  # learning rate\n" in user and "not shown: x" in user
    assert 0 < user.count("x = 1\n") < 20


def test_a_context_too_small_for_the_settings_is_rejected_naming_the_flag():
    with pytest.raises(Rejected) as caught:
        build_messages(real_context(), context_tokens=3000, max_tokens=2048)
    reason = str(caught.value)
    assert "--context-tokens is 3000" in reason and "\n" not in reason and caught.value.failure


def test_the_request_the_server_gets_fits_the_context_and_the_proposal_is_applied():
    with RawServer([raw_reply(GOOD_REPLY)]) as server:
        proposer = llm(server, context_tokens=8192, max_tokens=1024)
        proposal = proposer.propose(real_context(dynamics="r1: 9 steps"))
    messages = server.requests[0]["body"]["messages"]
    assert sum(len(m["content"]) for m in messages) <= (8192 - 1024) * CHARS_PER_TOKEN
    assert "r1: 9 steps" in messages[1]["content"] and LR_LINE in messages[1]["content"]
    assert server.requests[0]["body"]["max_tokens"] == 1024
    assert (
        "\nLR = 1e-3  #" in proposal.train_py and proposal.description == "raise the learning rate"
    )


# --- descriptions ---


def test_a_description_becomes_one_clean_printable_line():
    dirty = (
        "\x1b[31mraise\x1b[0m the \u202eLR\u202c\ud800 to\x85 1e-3\x9b2J "
        "\u2066now\u2069\x7f\x00\tplease"
    )
    reply = GOOD_REPLY.replace("raise the learning rate", dirty)
    with RawServer([(200, JSON, json.dumps(completion_of(reply)).encode())]) as server:
        proposal = llm(server).propose(real_context())
    assert proposal.description == "raise the LR to 1e-3 now please"
    assert proposal.description.isprintable()


def test_a_description_is_capped_kept_when_it_starts_with_a_dash_and_never_empty():
    assert Proposal(description="--lr 1e-3 -x; rm -rf ~").description == "--lr 1e-3 -x; rm -rf ~"
    assert Proposal(description="-" * 1000).description == "-" * 200
    assert Proposal(description="\x1b[2J\u202e\n").description == "(no description)"


# --- how a chat server can fail, through the real openai client ---


@pytest.mark.parametrize("headers, body, expected", [
    (JSON, b'{"choices": [{"message": {"content": "caf\xe9 \xff"}}]}', "the body is not UTF-8"),
    (JSON, b"upstream connect error or disconnect/reset before headers", "the body is not JSON"),
    ({"Content-Type": "text/html"}, b"<html><body><h1>Welcome to nginx!</h1></body></html>",
     "the body is not JSON"),
    (JSON, json.dumps({"error": {"message": "model scripted is not loaded", "code": 404}}).encode(),
     "API error in an HTTP 200 reply: model scripted is not loaded"),
    (JSON, b'{"object": "list", "data": []}', "no choices[0].message.content"),
])  # fmt: skip
def test_an_unusable_200_is_rejected_with_the_status_and_the_start_of_the_body(
    headers, body, expected
):
    error, server = rejection([(200, headers, body)])
    reason = str(error)
    assert expected in reason and "HTTP 200" in reason and error.failure
    assert body[:25].decode(errors="replace") in reason
    assert len(server.requests) == 1  # a garbled answer is not retried


def test_an_error_status_is_rejected_with_its_body_and_retried_only_when_it_may_pass():
    page = (
        b"<html><head><title>502 Bad Gateway</title></head><body>" + b"x" * 2000 + b"</body></html>"
    )
    error, server = rejection(
        [(502, {"Content-Type": "text/html"}, page), (502, {"Content-Type": "text/html"}, page)]
    )
    assert str(error).startswith(
        "API unavailable after 2 attempts: InternalServerError: HTTP 502: '<html><head>"
    )
    assert len(str(error)) < 500 and len(server.requests) == 2
    error, server = rejection(
        [(401, JSON, b'{"error": {"message": "Incorrect API key provided"}}')]
    )
    assert (
        "HTTP 401" in str(error)
        and "Incorrect API key provided" in str(error)
        and len(server.requests) == 1
    )


def test_429_waits_as_long_as_retry_after_asks():
    busy = (429, {**JSON, "Retry-After": "4"}, b'{"error": {"message": "slow down"}}')
    with RawServer([busy, raw_reply(GOOD_REPLY)]) as server:
        proposal = llm(server, backoff=0.01).propose(real_context())
    first, second = (request["received"] for request in server.requests)
    assert second - first >= 3.5 and proposal.description == "raise the learning rate"


def test_503_waits_until_the_http_date_in_retry_after():
    when = email.utils.formatdate(time.time() + 5, usegmt=True)
    busy = (503, {**JSON, "Retry-After": when}, b"busy")
    with RawServer([busy, raw_reply(GOOD_REPLY)]) as server:
        llm(server, backoff=0.01).propose(real_context())
    assert server.requests[1]["received"] >= email.utils.parsedate_to_datetime(when).timestamp()


@pytest.mark.parametrize("value, seconds", [
    ("4", 4.0), ("0.5", 0.5), ("-3", 0.0), ("86400", RETRY_AFTER_CAP), ("soon", None),
    ("nan", None), ("", None), (None, None), ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0),
    (email.utils.formatdate(time.time() + 86400, usegmt=True), RETRY_AFTER_CAP),
])  # fmt: skip
def test_retry_after_reads_seconds_or_a_date_and_is_capped(value, seconds):
    assert retry_after(value) == seconds


def test_a_reply_with_a_lone_surrogate_in_the_code_is_rejected_not_written():
    reply = GOOD_REPLY.replace("LR = 1e-3", "LR = 1e-3  # \ud800")
    error, _ = rejection([(200, JSON, json.dumps(completion_of(reply)).encode())])
    assert "lone surrogate" in str(error) and not error.failure


# --- training dynamics ---

LOSS_HEADER = "step,loss,ce,lr,lambda,bits,tokens_per_s,train_seconds\n"


def loss_csv(run_dir, text: str | bytes) -> None:
    run_dir.mkdir(parents=True)
    (run_dir / "loss.csv").write_bytes(text if isinstance(text, bytes) else text.encode())


def logged_rows(steps) -> str:
    """Rows as train.py writes them: loss falls from 10 by 1 per 20 steps, lambda rises to 1, 4 bits
    then 2."""
    return "".join(
        f"{s},{10 - s / 20:.6f},{10 - s / 20:.6f},0.0005,{s / 100:.4f},{4 if s < 50 else 2},"
        f"1000.0,{s}\n"
        for s in steps
    )


def test_the_dynamics_summary_shows_each_runs_curve_speed_and_schedules(tmp_path):
    loss_csv(tmp_path / "run-a", LOSS_HEADER + logged_rows([1, *range(10, 101, 10)]))
    loss_csv(
        tmp_path / "run-b",
        LOSS_HEADER + "".join(f"{s},3.0,3.0,0.0005,1.0000,-,500.0,{s}\n" for s in (1, 10)),
    )
    assert dynamics_summary([tmp_path / "run-a", tmp_path / "run-b"]) == (
        "run-a: 100 steps, loss 9.95 8.5 7.5 6 5, 1,000 tok/s, lambda 0.01 0.3 0.5 0.8 1, "
        "bits 4,2\n"
        "run-b: 10 steps, loss 3 3 3 3 3, 500 tok/s"
    )


def test_the_dynamics_summary_skips_garbled_lines_and_unreadable_files(tmp_path):
    garbage = (
        LOSS_HEADER.encode()
        + b"\x00\x00\xff\xfe\n"
        + b"1,9.0,9.0,0.1,0,2,10,1\n"
        + b"2,nan,1,1,1,2,1,1\n"
        + b"3,inf,1,1,1,2,1,1\n"
        + b"-4,1.0,1,1,1,2,1,1\n"
        + b"5.5,1.0,1,1,1,2,1,1\n"
        + b"6,1.0,1\n"
        + b"7,1.0,1,1,1,2,1,1,extra\n"
        + b"8,\x1b[31m1.0,1,1,1,2,1,1\n"
        + b"x" * 100_000
        + b"\n"
        + b"10,8.0,8.0,0.1,0,2,30,2\n"
        + b"11,7.0,7.0,0.1,0,\x1b]0;pwned\x07,20,3"
    )
    loss_csv(tmp_path / "garbled", garbage)
    loss_csv(tmp_path / "no-header", logged_rows([1, 10]))
    loss_csv(tmp_path / "binary", os.urandom(4096))
    (tmp_path / "missing").mkdir()
    (tmp_path / "a-folder" / "loss.csv").mkdir(parents=True)
    (tmp_path / "fifo").mkdir()
    os.mkfifo(tmp_path / "fifo" / "loss.csv")  # opening it to read would block: it is never read
    loss_csv(tmp_path / "linked", b"")
    (tmp_path / "linked" / "loss.csv").unlink()
    (tmp_path / "linked" / "loss.csv").symlink_to(tmp_path / "garbled" / "loss.csv")
    names = ["garbled", "no-header", "binary", "missing", "a-folder", "fifo", "linked"]
    assert (
        dynamics_summary([tmp_path / name for name in names])
        == "garbled: 11 steps, loss 9 9 8 8 7, 20 tok/s"
    )


def test_the_dynamics_of_a_huge_loss_csv_come_from_its_start_and_its_end(tmp_path):
    steps = range(1, 200_001)
    text = LOSS_HEADER + logged_rows(steps)
    assert len(text) > 4 * LOSS_CSV_BYTES
    loss_csv(tmp_path / "long", text)
    line = dynamics_summary([tmp_path / "long"])
    assert line.startswith("long: 200000 steps, loss 9.95 ") and line.split(", ")[1].endswith(
        " -9990"
    )


# --- Optuna shared by workers ---


def _worker_proposes(journal, owner, start, count, out):
    proposer = OptunaProposer(SMALL_SPACE, journal, "s", owner=owner)
    start.wait()
    for _ in range(count):
        try:
            out.put(tuple(proposer.propose(None).train_args))
        except Rejected:
            return


def test_workers_sharing_one_journal_never_run_a_parameter_set_twice(tmp_path):
    """Two processes drawing from 10 sets at once, unseeded: what they run is distinct, even when
    both draw one set at the same moment."""
    journal = str(tmp_path / "optuna.journal")
    start, out = multiprocessing.Event(), multiprocessing.Queue()
    workers = [
        multiprocessing.Process(target=_worker_proposes, args=(journal, owner, start, 6, out))
        for owner in ("host:a-1", "host:a-2")
    ]
    for worker in workers:
        worker.start()
    start.set()
    for worker in workers:
        worker.join(timeout=120)
        assert worker.exitcode == 0
    ran = []
    while not out.empty():
        ran.append(out.get())
    assert len(ran) >= 8 and len(set(ran)) == len(ran)
    study = optuna.load_study(study_name="s", storage=optuna_storage(journal))
    owners = {t.user_attrs["owner"] for t in study.trials if t.state == RUNNING}
    assert owners == {"host:a-1", "host:a-2"}


def test_a_worker_reconciles_only_its_own_trials(tmp_path):
    """A worker (re)starting leaves alone what another worker runs now, and settles its own."""
    space = {"--lr": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)}
    journal = str(tmp_path / "optuna.journal")
    other = OptunaProposer(space, journal, "s", owner="host:t-2", seed=0)
    other.started(other.propose(None), "run-other")  # running now, its row not written yet
    killed = OptunaProposer(space, journal, "s", owner="host:t-1", seed=1)
    killed.started(killed.propose(None), "run-mine")
    del killed
    restarted = OptunaProposer(space, journal, "s", owner="host:t-1", seed=1)
    restarted.reconcile(scored_results(tmp_path, [("run-mine", "discard", 1.6)]))
    assert [t.state for t in restarted.study.trials] == [RUNNING, COMPLETE]
