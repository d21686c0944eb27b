"""Edit blocks against the real train.py: applied only when exact, else refused with a reason."""

import pytest
from conftest import ROOT

from harness.agent.edits import EditRejected, apply_edits, edited_train_py, parse_reply
from harness.text import one_line

TRAIN_PY = (ROOT / "train.py").read_text()
LR_LINE = next(line for line in TRAIN_PY.splitlines() if line.startswith("LR = "))


def block(search, replace, path="train.py"):
    return f"{path}\n<<<<<<< SEARCH\n{search}\n=======\n{replace}\n>>>>>>> REPLACE\n"


def test_a_valid_edit_is_applied_with_its_description():
    reply = "DESCRIPTION: double the learning rate\n" + block(
        LR_LINE, LR_LINE.replace("LR = ", "LR = 2 * ")
    )
    new, description = edited_train_py(TRAIN_PY, reply)
    assert description == "double the learning rate"
    assert "\nLR = 2 * " in new and new.count("\n") == TRAIN_PY.count("\n")


def test_fenced_blocks_without_a_path_line_edit_train_py():
    reply = ("I will lower the warm-up.\n```python\n<<<<<<< SEARCH\nWARMUP_STEPS = 10\n=======\n"
             "WARMUP_STEPS = 5\n>>>>>>> REPLACE\n```\n")  # fmt: skip
    new, description = edited_train_py(TRAIN_PY, reply)
    assert "WARMUP_STEPS = 5  #" in new and description == "I will lower the warm-up."


def test_several_blocks_apply_in_order():
    reply = block("WARMUP_STEPS = 10", "WARMUP_STEPS = 20") + block(
        "WARMUP_STEPS = 20", "WARMUP_STEPS = 30"
    )
    assert "WARMUP_STEPS = 30  #" in edited_train_py(TRAIN_PY, reply)[0]


@pytest.mark.parametrize(
    "path", ["harness/runner.py", "prepare.py", "./harness/evaluate.py", "results.tsv"]
)
def test_blocks_for_other_files_are_refused(path):
    with pytest.raises(EditRejected, match="only train.py may change"):
        parse_reply(block("import os", "import os, sys", path=path))


def test_one_foreign_block_refuses_the_whole_reply():
    reply = block("WARMUP_STEPS = 10", "WARMUP_STEPS = 5") + block(
        "X = 1", "X = 2", path="harness/budget.py"
    )
    with pytest.raises(EditRejected, match="harness/budget.py"):
        edited_train_py(TRAIN_PY, reply)


def test_search_text_that_does_not_match_is_refused():
    with pytest.raises(EditRejected, match="does not match"):
        edited_train_py(TRAIN_PY, block("LR = 0.123", "LR = 0.5"))


def test_ambiguous_search_text_is_refused():
    assert TRAIN_PY.count("        return ") > 1
    with pytest.raises(EditRejected, match="matches .* places"):
        apply_edits(TRAIN_PY, parse_reply(block("        return ", "        return  ")).edits)


def test_an_edit_that_breaks_the_syntax_is_refused():
    with pytest.raises(EditRejected, match="syntax error in edited train.py line"):
        edited_train_py(TRAIN_PY, block(LR_LINE, "LR = = 1"))


@pytest.mark.parametrize("reply", ["", "   \n", None])
def test_empty_replies_are_refused(reply):
    with pytest.raises(EditRejected, match="empty reply"):
        edited_train_py(TRAIN_PY, reply)


@pytest.mark.parametrize("reply", ["Sure! I think the learning rate is too low.",
                                   "\x00\x01garbage{{{",
                                   "<<<<<<< SEARCH\nLR = 5e-4\n=======\nLR = 1e-3\n"])  # fmt: skip
def test_replies_without_a_complete_block_are_refused(reply):
    with pytest.raises(EditRejected, match="no SEARCH/REPLACE block"):
        edited_train_py(TRAIN_PY, reply)


def test_an_edit_that_changes_nothing_is_refused():
    with pytest.raises(EditRejected, match="changes nothing"):
        edited_train_py(TRAIN_PY, block(LR_LINE, LR_LINE))


def test_the_description_is_one_printable_line_whatever_the_reply_held():
    reply = (
        "DESCRIPTION: **\x1b[1mwarm\x1b[0m-up \u2067x\u2069\u200f 5\ud83d\x1b]0;title\x07 "
        "steps\u0085**\n"
    )
    description = parse_reply(reply + block("WARMUP_STEPS = 10", "WARMUP_STEPS = 5")).description
    assert description == "warm-up x 5 steps" and description.isprintable()


def test_a_description_that_starts_with_a_dash_is_kept_as_written():
    reply = "DESCRIPTION: --lr 1e-3 and -x\n" + block("WARMUP_STEPS = 10", "WARMUP_STEPS = 5")
    assert parse_reply(reply).description == "--lr 1e-3 and -x"


def test_one_line_caps_and_folds():
    assert one_line("a\tb\r\n\u2028c" + "d" * 500, 10) == "a b cddddd"
    assert one_line("\x9b31m\x1b(B\x00", 10) == ""


def test_an_edit_holding_a_lone_surrogate_is_refused():
    with pytest.raises(EditRejected, match="lone surrogate"):
        edited_train_py(TRAIN_PY, block(LR_LINE, LR_LINE + "  # \udc80"))
