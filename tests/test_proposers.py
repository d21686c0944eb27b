"""Proposers without runs: the Optuna search space file, an interrupted study, the LLM prompt."""

import json

import optuna
import pandas as pd
import pytest

from conftest import ROOT
from harness.proposers import Context, OptunaProposer, Result, build_messages, load_search_space


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


def test_a_trial_left_running_by_an_interrupted_sweep_is_failed_and_the_study_goes_on(tmp_path):
    space = {"--lr": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)}
    first = OptunaProposer(space, tmp_path / "study.db", "s", seed=0)
    done = first.propose(None)
    first.tell(done, Result("keep", 1.5))
    first.propose(None)  # the session dies here: this trial stays RUNNING in the database
    resumed = OptunaProposer(space, tmp_path / "study.db", "s", seed=0)
    states = [t.state for t in resumed.study.trials]
    assert states == [optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL]
    nxt = resumed.propose(None)
    assert nxt.trial == 2 and nxt.train_args[0] == "--lr" and nxt.description.startswith("optuna trial 2: --lr ")
    resumed.tell(nxt, Result("crash", None))
    assert resumed.study.trials[2].state == optuna.trial.TrialState.FAIL
    assert resumed.study.best_value == 1.5


def test_the_prompt_carries_program_train_py_results_and_the_crash():
    train_py = "LR = 5e-4  # learning rate\n" + "x = 1\n" * 1000
    recent = pd.DataFrame([{"commit": "abc1234", "status": "keep", "val_bpb": 2.5, "bpw": 1.7, "steps": 9,
                            "description": "first try"}])  # fmt: skip
    context = Context(train_py=train_py, program="PROGRAM", recent=recent, crash_log="Traceback: boom")
    system, user = build_messages(context)
    assert system == {"role": "system", "content": "PROGRAM"}
    assert train_py in user["content"] and "first try" in user["content"] and "Traceback: boom" in user["content"]
    assert "<<<<<<< SEARCH" in user["content"]
    short = build_messages(context, train_chars=100)[1]["content"]
    assert "LR = 5e-4  # learning rate\n" in short and "the rest of train.py is not shown" in short
    assert short.count("x = 1\n") < 20


def test_the_worked_example_in_the_prompt_is_itself_a_valid_edit_of_train_py():
    from harness.edits import edited_train_py
    from harness.proposers import worked_example

    train_py = (ROOT / "train.py").read_text()
    example = worked_example(train_py)
    assert "<<<<<<< SEARCH" in example
    new, description = edited_train_py(train_py, example.split(":", 1)[1])  # the reply after "doubles LR:"
    assert new != train_py and description.startswith("double ")
    assert worked_example("no settings here\n") == ""
