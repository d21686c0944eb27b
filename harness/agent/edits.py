"""Edit blocks for train.py: parse a model's reply, apply it exactly, refuse anything else.

A reply holds a one-line description and one or more SEARCH/REPLACE blocks (aider's format,
which small models copy well), each optionally preceded by the file it edits:

    DESCRIPTION: raise the learning rate
    train.py
    <<<<<<< SEARCH
    LR = 5e-4  # peak AdamW learning rate on the latent (full-precision) weights
    =======
    LR = 1e-3  # peak AdamW learning rate on the latent (full-precision) weights
    >>>>>>> REPLACE

A block is applied only if its SEARCH text (whole lines or part of one) occurs exactly once in the
current train.py; the result must compile. Every refusal raises EditRejected with a reason fit
for a log line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from harness.text import one_line

EDITABLE = "train.py"
MAX_DESCRIPTION = 200

_BLOCK = re.compile(
    r"^[ \t]*<{5,9} ?SEARCH[ \t]*\n(?P<search>.*?)"
    r"^[ \t]*={5,9}[ \t]*\n(?P<replace>.*?)"
    r"^[ \t]*>{5,9} ?REPLACE[ \t]*$",
    re.DOTALL | re.MULTILINE,
)
_FENCE = re.compile(r"^\s*```")
_PATH_LIKE = re.compile(r"^[\w./\\-]+\.\w+$")  # one token with an extension: a file name, not prose


class EditRejected(Exception):
    """The reply cannot be applied; str(error) says why."""


@dataclass(frozen=True)
class Edit:
    path: str
    search: str
    replace: str


@dataclass(frozen=True)
class Reply:
    description: str
    edits: tuple[Edit, ...]


def _path_before(text: str, start: int) -> str:
    """The file a block names: the last non-blank, non-fence line before it, if it looks like a
    path (`train.py`, `harness/runner.py`, `**train.py**`); otherwise the block is for train.py."""
    for line in reversed(text[:start].splitlines()):
        if not line.strip() or _FENCE.match(line):
            continue
        candidate = line.strip().strip("*`'\":").strip()
        candidate = candidate.removeprefix("File:").removeprefix("file:").strip()
        return candidate if _PATH_LIKE.match(candidate) else EDITABLE
    return EDITABLE


def _description(text: str) -> str:
    """`DESCRIPTION: ...` if given, else the first line of prose outside the blocks."""
    outside = _BLOCK.sub("", text)
    match = re.search(
        r"^\s*\**description\**\s*:\s*\**\s*(.+)$", outside, re.IGNORECASE | re.MULTILINE
    )
    if match:
        line = match.group(1)
    else:
        prose = [ln.strip() for ln in outside.splitlines()]
        prose = [
            ln
            for ln in prose
            if ln and not _FENCE.match(ln) and not _PATH_LIKE.match(ln.strip("*`"))
        ]
        line = prose[0] if prose else ""
    return one_line(line.strip("*` "), MAX_DESCRIPTION)


def parse_reply(text: str | None) -> Reply:
    """Edit blocks and description of a reply. Rejects empty replies, replies without a block,
    and blocks for any file but train.py."""
    if text is None or not text.strip():
        raise EditRejected("empty reply")
    text = text.replace("\r\n", "\n")
    edits = []
    for match in _BLOCK.finditer(text):
        path = _path_before(text, match.start())
        if path.replace("\\", "/").removeprefix("./") != EDITABLE:
            raise EditRejected(f"edit block targets {path!r}; only {EDITABLE} may change")
        # the text between the markers, without the newline before the next marker: a block may
        # name part of a line (`LR = 5e-4`) as well as whole lines
        edits.append(
            Edit(
                path,
                match.group("search").removesuffix("\n"),
                match.group("replace").removesuffix("\n"),
            )
        )
    if not edits:
        raise EditRejected(
            f"no SEARCH/REPLACE block in the reply (starts {' '.join(text.split())[:80]!r})"
        )
    return Reply(_description(text) or "edit by the LLM proposer", tuple(edits))


def apply_edits(source: str, edits: tuple[Edit, ...] | list[Edit]) -> str:
    """train.py with every block applied in order; each SEARCH must match exactly once."""
    for number, edit in enumerate(edits, 1):
        if not edit.search.strip():
            raise EditRejected(f"block {number}: SEARCH is empty")
        count = source.count(edit.search)
        if count == 0:
            first = edit.search.strip().splitlines()[0][:80]
            raise EditRejected(
                f"block {number}: SEARCH text does not match train.py (first line {first!r})"
            )
        if count > 1:
            raise EditRejected(
                f"block {number}: SEARCH text matches {count} places; include more lines"
            )
        source = source.replace(edit.search, edit.replace, 1)
    return source


def check_encodable(source: str) -> None:
    """A reply's JSON can carry lone surrogates (\\ud800), which no file can store: refused here,
    not when the agent writes train.py."""
    try:
        source.encode("utf-8")
    except UnicodeEncodeError as err:
        raise EditRejected(
            f"edited train.py holds a lone surrogate (U+{ord(source[err.start]):04X}), "
            "which UTF-8 cannot store"
        ) from None


def check_syntax(source: str) -> None:
    try:
        compile(source, EDITABLE, "exec")
    except SyntaxError as err:
        raise EditRejected(
            f"syntax error in edited train.py line {err.lineno}: {err.msg}"
        ) from None
    except ValueError as err:  # e.g. null bytes
        raise EditRejected(f"edited train.py cannot be compiled: {err}") from None


def edited_train_py(source: str, reply_text: str | None) -> tuple[str, str]:
    """(new train.py, description) from a reply, or EditRejected."""
    reply = parse_reply(reply_text)
    new = apply_edits(source, reply.edits)
    if new == source:
        raise EditRejected("the edit changes nothing")
    check_encodable(new)
    check_syntax(new)
    return new, reply.description
