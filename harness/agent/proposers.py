"""Where candidates come from: an LLM editing train.py, or Optuna choosing train.py's flags.

A proposer turns the current state (train.py, recent rows, the training dynamics, the last crash)
into a Proposal, or raises Rejected with the reason it has none; after the run it is told the
outcome.
"""

from __future__ import annotations

import ast
import email.utils
import io
import json
import math
import os
import re
import stat
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import NamedTuple

import pandas as pd

from harness.agent.edits import MAX_DESCRIPTION, EditRejected, edited_train_py
from harness.text import one_line

RESULT_COLUMNS = ("commit", "status", "val_bpb", "bpw", "steps", "description")
RECENT_ROWS = 10
CRASH_LOG_LINES = 30

EDIT_FORMAT = """Reply with one line `DESCRIPTION: <what you changed, one line>`, then one or more \
edit blocks:

train.py
<<<<<<< SEARCH
<lines copied exactly from the current train.py>
=======
<the lines that replace them>
>>>>>>> REPLACE

Each SEARCH text must match exactly one place in train.py. Only train.py may be edited."""
_SETTING = re.compile(r"^([A-Z_]+) = ([0-9][0-9_.e+-]*)(  #.*)?$", re.MULTILINE)


def worked_example(train_py: str) -> str:
    """A complete reply editing a real setting line of this train.py (the learning rate if there
    is one): small models follow an example far better than a description of the format."""
    settings = {m.group(1): m for m in _SETTING.finditer(train_py)}
    match = settings.get("LR") or next(iter(settings.values()), None)
    if match is None:
        return ""
    try:
        value = float(match.group(2).replace("_", ""))
    except ValueError:
        return ""
    new = (
        f"{value * 2:g}" if "." in match.group(2) or "e" in match.group(2) else str(int(value) * 2)
    )
    line = match.group(0)
    changed = f"{match.group(1)} = {new}{match.group(3) or ''}"
    return (
        f"\nFor example, a complete reply that doubles {match.group(1)}:\n\n"
        f"DESCRIPTION: double {match.group(1)}\n"
        f"train.py\n<<<<<<< SEARCH\n{line}\n=======\n{changed}\n>>>>>>> REPLACE\n"
    )


class Rejected(Exception):
    """No candidate this time; str(error) says why (logged, the loop goes on). `failure` marks the
    proposer itself in trouble (a server down or answering garbage, a prompt that cannot fit), not
    one bad reply: it counts like a crashed run, so that such a night ends at --max-crashes."""

    def __init__(self, reason: str, failure: bool = False):
        super().__init__(reason)
        self.failure = failure


@dataclass
class Context:
    train_py: str
    program: str  # program.md
    recent: pd.DataFrame  # recent results rows of this agent's (and its fellow workers') runs
    crash_log: str  # tail of the last crashed run's log, or ""
    dynamics: str = ""  # dynamics_summary() of recent runs, or ""
    running: list[str] = field(default_factory=list)  # what the other workers run now


@dataclass
class Proposal:
    description: str
    train_py: str | None = None  # new train.py, or None to run the current one
    train_args: list[str] = field(default_factory=list)
    trial: int | None = None  # the Optuna trial number

    def __post_init__(self):
        # made clean here, so that the commit message, tmux, the log and results.tsv all get it
        self.description = one_line(self.description, MAX_DESCRIPTION) or "(no description)"


@dataclass
class Result:
    status: str  # keep | discard | crash | invalid (or "crash" when no row could be made)
    val_bpb: float | None


# --- training dynamics of recent runs, from their loss.csv ---

LOSS_CSV_BYTES = (
    1 << 20
)  # read at most this much of a loss.csv (train.py writes it): its start and its end
DYNAMICS_RUNS = 10  # the last runs summarised
DYNAMICS_POINTS = (0.0, 0.25, 0.5, 0.75, 1.0)  # where in each run the loss is shown
_BITS = re.compile(r"^[\w.-]{1,8}$")


def _bounded_read(path: Path) -> bytes:
    """The file's bytes, or its first and last LOSS_CSV_BYTES / 2 when larger. Only a regular file
    is read (train.py may leave a FIFO or a link there); b"" for anything else."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return b""
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            return b""
        size = info.st_size
        if size <= LOSS_CSV_BYTES:
            return os.read(fd, LOSS_CSV_BYTES)
        head = os.pread(fd, LOSS_CSV_BYTES // 2, 0)
        tail = os.pread(fd, LOSS_CSV_BYTES // 2, size - LOSS_CSV_BYTES // 2)
    except OSError:
        return b""
    finally:
        os.close(fd)
    return head[: head.rfind(b"\n") + 1] + tail[tail.find(b"\n") + 1 :]


def _finite(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def loss_rows(path: Path) -> list[dict]:
    """loss.csv's well-formed rows as {step, loss, tokens_per_s, lambda, bits} (the last three
    None where absent), sorted by step. The header names the columns; any other line with the
    wrong cell count, a non-integer step or a non-finite loss is skipped."""
    lines = _bounded_read(path).decode("utf-8", errors="replace").splitlines()
    if not lines:
        return []
    header = [name.strip() for name in lines[0].split(",")]
    if "step" not in header or "loss" not in header:
        return []
    rows = []
    for line in lines[1:]:
        if line.count(",") != len(header) - 1:
            continue
        cells = dict(zip(header, line.split(",")))
        step, loss = _finite(cells["step"]), _finite(cells["loss"])
        if step is None or step < 0 or step != int(step) or loss is None:
            continue
        bits = cells.get("bits", "").strip()
        rows.append(
            {
                "step": int(step),
                "loss": loss,
                "tokens_per_s": _finite(cells.get("tokens_per_s", "")),
                "lambda": _finite(cells.get("lambda", "")),
                "bits": bits if _BITS.match(bits) else None,
            }
        )
    return sorted(rows, key=lambda row: row["step"])


def _at_points(rows: list[dict], key: str) -> list:
    """rows[key] at DYNAMICS_POINTS of the run, by step (the row nearest each point)."""
    first, last = rows[0]["step"], rows[-1]["step"]
    return [
        min(rows, key=lambda row: abs(row["step"] - (first + p * (last - first))))[key]
        for p in DYNAMICS_POINTS
    ]


def run_dynamics(run_dir: Path) -> str:
    """One line about a run's training from its loss.csv, or "" when it has no usable rows."""
    rows = loss_rows(run_dir / "loss.csv")
    if not rows:
        return ""
    losses = " ".join(f"{value:.4g}" for value in _at_points(rows, "loss"))
    parts = [f"{run_dir.name}: {rows[-1]['step']} steps", f"loss {losses}"]
    rates = [row["tokens_per_s"] for row in rows if row["tokens_per_s"] is not None]
    if rates:
        parts.append(f"{sum(rates) / len(rates):,.0f} tok/s")
    lambdas = [row["lambda"] for row in rows if row["lambda"] is not None]
    if len(set(lambdas)) > 1:
        parts.append("lambda " + " ".join(f"{value:.2g}" if value is not None else "-"
                                          for value in _at_points(rows, "lambda")))  # fmt: skip
    bits = list(dict.fromkeys(row["bits"] for row in rows if row["bits"] is not None))
    if len(bits) > 1:
        parts.append("bits " + ",".join(bits[:8]) + (",..." if len(bits) > 8 else ""))
    return one_line(", ".join(parts), 300)


def dynamics_summary(run_dirs: list[Path]) -> str:
    """One short line per run (the last DYNAMICS_RUNS) that has a usable loss.csv: steps, the loss
    at 0/25/50/75/100% of its steps, mean tokens/s, and lambda and bits where they varied."""
    return "\n".join(line for line in map(run_dynamics, run_dirs[-DYNAMICS_RUNS:]) if line)


# --- LLM proposer ---

DEFAULT_CONTEXT_TOKENS = 32768
CHARS_PER_TOKEN = (
    3  # conservative: SmolLM2's tokenizer gives ~3.1 characters a token on this prompt
)
MESSAGE_OVERHEAD_TOKENS = 64  # the chat template around the two messages
CRASH_LOG_CHARS = 4000  # the end of the last crash's log at most


class Section(NamedTuple):
    start: int  # first line (0-based), comments and blank lines before the statement included
    end: int  # one past its last line
    name: str  # for the note saying what was left out
    setting: bool  # an UPPER_CASE assignment: always shown


def _statement_name(node: ast.stmt, lines: list[str]) -> str:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return node.name
    if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
        return node.targets[0].id
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        return "imports"
    if (
        isinstance(node, ast.Expr)
        and isinstance(node.value, ast.Constant)
        and isinstance(node.value.value, str)
    ):
        return "a docstring"
    return lines[node.lineno - 1].strip()[:30]


def _is_setting(node: ast.stmt) -> bool:
    targets = (
        node.targets
        if isinstance(node, ast.Assign)
        else [node.target]
        if isinstance(node, ast.AnnAssign)
        else []
    )
    return bool(targets) and all(isinstance(t, ast.Name) and t.id.isupper() for t in targets)


def sections(lines: list[str]) -> list[Section]:
    """train.py's top-level statements, each with the comments above it; one line each when it
    does not parse (so that the cut still falls between lines)."""
    try:
        body = ast.parse("".join(lines)).body
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return [
            Section(
                i, i + 1, line.split("=")[0].strip()[:30], bool(_SETTING.match(line.rstrip("\n")))
            )
            for i, line in enumerate(lines)
        ]
    found, start = [], 0
    for node in body:
        if node.end_lineno > start:  # a second statement on one line belongs to the first
            found.append(
                Section(start, node.end_lineno, _statement_name(node, lines), _is_setting(node))
            )
            start = node.end_lineno
    if start < len(lines):
        found.append(Section(start, len(lines), "the end of the file", False))
    return found


def _omitted(left_out: list[Section]) -> str:
    distinct = list(dict.fromkeys(s.name for s in left_out))
    names = ", ".join(distinct[:6]) + (
        f" and {len(distinct) - 6} more" if len(distinct) > 6 else ""
    )
    return f"# ... lines {left_out[0].start + 1}-{left_out[-1].end} not shown: {names}\n"


def _render(lines: list[str], parts: list[Section], shown: set[int]) -> str:
    out, gap = [], []
    for number, part in enumerate(parts):
        if number not in shown:
            gap.append(part)
            continue
        if gap:
            out.append(_omitted(gap))
            gap = []
        out.append("".join(lines[part.start : part.end]))
    if gap:
        out.append(_omitted(gap))
    text = "".join(out)
    return text if text.endswith("\n") else text + "\n"


def train_view(train_py: str, limit: int) -> str:
    """train.py within `limit` characters: all of it if it fits; else its settings always, then
    whole top-level sections in file order while they fit, a `# ... not shown` line per gap."""
    if len(train_py) <= limit:
        return train_py if train_py.endswith("\n") else train_py + "\n"
    lines = io.StringIO(train_py).readlines()  # "\n" alone ends a line, as for ast's line numbers
    parts = sections(lines)
    shown = {number for number, part in enumerate(parts) if part.setting}
    for number in range(len(parts)):
        if number not in shown and len(_render(lines, parts, shown | {number})) <= limit:
            shown.add(number)
    return _render(lines, parts, shown)


def _results_table(frame: pd.DataFrame) -> str:
    if frame.empty:
        return "(no runs yet)"
    return frame.tail(RECENT_ROWS)[list(RESULT_COLUMNS)].to_csv(
        sep="\t", index=False, float_format="%.4f"
    )


def _train_block(view: str, whole: bool) -> str:
    intro = (
        "Current train.py:"
        if whole
        else (
            "Current train.py, in part to fit the model's context: each `# ... not shown` line "
            "stands for top-level code left out. Copy SEARCH text only from the lines shown."
        )
    )
    return f"{intro}\n```python\n{view}```\n"


def build_messages(
    context: Context,
    context_tokens: int = DEFAULT_CONTEXT_TOKENS,
    max_tokens: int = 2048,
    train_chars: int | None = None,
) -> list[dict]:
    """program.md as the system message; train.py, recent results, the training dynamics and the
    last crash as the user's, sized to fit `context_tokens` with room for a `max_tokens` reply.
    program.md and train.py's settings are always there (Rejected when they alone do not fit);
    then the results, the dynamics and the crash when they fit, then as much of train.py as fits
    (at most `train_chars` characters of it when given)."""
    budget = (context_tokens - max_tokens - MESSAGE_OVERHEAD_TOKENS) * CHARS_PER_TOKEN
    closing = (f"\nPropose one change to train.py that should lower val_bpb.\n{EDIT_FORMAT}\n"
               f"{worked_example(context.train_py)}")  # fmt: skip
    # + 2: the newline after the block, and the one train_view adds to a file without a last one
    fixed = len(context.program) + len(closing) + len(_train_block("", whole=False)) + 2
    settings = train_view(context.train_py, 0)
    if fixed + len(settings) > budget:
        needed = (fixed + len(settings)) // CHARS_PER_TOKEN + max_tokens + MESSAGE_OVERHEAD_TOKENS
        raise Rejected(
            f"the prompt cannot fit: program.md and train.py's settings alone need about {needed} "
            f"tokens with the {max_tokens}-token reply; --context-tokens is {context_tokens}: "
            "raise it (or "
            "shorten program.md)",
            failure=True,
        )
    crash = context.crash_log[-CRASH_LOG_CHARS:]
    extras = [
        f"Recent results (lower val_bpb is better):\n{_results_table(context.recent)}\n",
        "\nTraining dynamics of recent runs (loss at 0/25/50/75/100% of each run's steps):\n"
        f"{context.dynamics}\n"
        if context.dynamics
        else "",
        f"\nThe last run crashed; the end of its log:\n```\n{crash}\n```\n" if crash else "",
        "\nRunning now on other workers (propose something else):\n"
        + "".join(f"- {line}\n" for line in context.running)
        if context.running
        else "",
    ]
    room = budget - fixed
    for number, extra in enumerate(extras):
        if len(extra) > room - len(settings):
            extras[number] = ""
        room -= len(extras[number])
    limit = room if train_chars is None else min(room, train_chars)
    user = (
        _train_block(train_view(context.train_py, limit), whole=len(context.train_py) <= limit)
        + "\n"
        + "".join(extras)
        + closing
    )
    return [{"role": "system", "content": context.program}, {"role": "user", "content": user}]


RETRY_AFTER_CAP = 120.0  # seconds: the longest a server's Retry-After is waited
RETRY_AFTER_STATUSES = (429, 503)
BODY_PREVIEW = 300  # characters of an unusable response's body quoted in the reason


def _preview(body: bytes) -> str:
    """The start of a response body, for a log line, whatever its bytes."""
    return repr(one_line(body[: BODY_PREVIEW * 4].decode("utf-8", errors="replace"), BODY_PREVIEW))


def retry_after(value: str | None) -> float | None:
    """Seconds a Retry-After header asks for (a number, or an HTTP date), at most RETRY_AFTER_CAP;
    None when absent or unreadable."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
        when = when if when.tzinfo else when.replace(tzinfo=timezone.utc)
        seconds = (when - datetime.now(timezone.utc)).total_seconds()
    return min(max(seconds, 0.0), RETRY_AFTER_CAP) if math.isfinite(seconds) else None


def _error_message(error) -> str:
    message = error.get("message") if isinstance(error, dict) else error
    return one_line(str(message), BODY_PREVIEW)


def reply_content(status: int, body: bytes) -> str | None:
    """choices[0].message.content of a chat-completions response body. Rejected, quoting the
    status and the body's start, when the body is not UTF-8 JSON of that shape: an HTML page, a
    proxy's error, `{"error": ...}` sent with 200."""
    try:
        data = json.loads(body.decode("utf-8-sig"))
    except UnicodeDecodeError:
        raise Rejected(
            f"API reply unusable: HTTP {status}, the body is not UTF-8: {_preview(body)}",
            failure=True,
        ) from None
    except (ValueError, RecursionError):
        raise Rejected(f"API reply unusable: HTTP {status}, the body is not JSON: {_preview(body)}",
                       failure=True) from None  # fmt: skip
    if isinstance(data, dict) and "error" in data:
        raise Rejected(
            f"API error in an HTTP {status} reply: {_error_message(data['error'])} "
            f"(body {_preview(body)})",
            failure=True,
        )
    try:
        content = data["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise Rejected(
            f"API reply unusable: HTTP {status}, no choices[0].message.content in {_preview(body)}",
            failure=True,
        ) from None
    if content is not None and not isinstance(content, str):
        raise Rejected(
            f"API reply unusable: HTTP {status}, the message content is not text: {_preview(body)}",
            failure=True,
        )
    return content


@dataclass
class LLMConfig:
    model: str
    base_url: str | None = (
        None  # None: the openai client reads OPENAI_BASE_URL, else api.openai.com
    )
    api_key: str | None = None  # None: OPENAI_API_KEY; never logged
    timeout: float = 300.0  # seconds per request
    retries: int = 3  # after the first attempt, on 429, 5xx, timeouts and connection errors
    backoff: float = (
        2.0  # seconds before the first retry, doubled after each (unless Retry-After says)
    )
    max_tokens: int = 2048
    temperature: float = 0.7
    train_chars: int | None = None  # show at most this much of train.py
    context_tokens: int = (
        DEFAULT_CONTEXT_TOKENS  # the model's context window: the prompt is sized to it
    )


class LLMProposer:
    """Any OpenAI-compatible chat-completions server: OpenAI, vLLM, llama.cpp's server, Ollama."""

    def __init__(self, config: LLMConfig, log=lambda event, **fields: None):
        import openai

        self.config = config
        self.log = log
        self.client = openai.OpenAI(
            base_url=config.base_url,
            api_key=config.api_key or "not-needed",
            timeout=config.timeout,
            max_retries=0,
        )

    def _request(self, messages: list[dict]) -> str | None:
        """One request, its body parsed here: the client itself raises its decoding errors or hands
        back an HTML page as a string. Rejected for a 4xx other than 429 (a retry will not help);
        openai's errors for what may pass with time."""
        import openai

        try:
            raw = self.client.chat.completions.with_raw_response.create(
                model=self.config.model, messages=messages, max_tokens=self.config.max_tokens,
                temperature=self.config.temperature)  # fmt: skip
        except openai.APIStatusError as err:
            if err.status_code == 429 or err.status_code >= 500:
                raise
            raise Rejected(
                f"API error: {type(err).__name__}: HTTP {err.status_code}: "
                f"{_preview(err.response.content)}",
                failure=True,
            ) from None
        return reply_content(raw.http_response.status_code, raw.http_response.content)

    def _complete(self, messages: list[dict]) -> str | None:
        import openai

        delay = self.config.backoff
        for attempt in range(self.config.retries + 1):
            wait = delay
            try:
                return self._request(messages)
            except openai.APIStatusError as err:
                body = _preview(err.response.content)
                error = f"{type(err).__name__}: HTTP {err.status_code}: {body}"
                asked = retry_after(err.response.headers.get("retry-after"))
                if err.status_code in RETRY_AFTER_STATUSES and asked is not None:
                    wait = asked
            except openai.APIConnectionError as err:  # timeouts included
                cause = (
                    f" ({type(err.__cause__).__name__}: {err.__cause__})" if err.__cause__ else ""
                )
                error = f"{type(err).__name__}: {err}{cause}"
            except openai.OpenAIError as err:  # anything else the client raises: not worth a retry
                raise Rejected(f"API error: {type(err).__name__}: {err}", failure=True) from None
            last = attempt == self.config.retries
            self.log(
                "api_error",
                attempt=attempt + 1,
                error=error,
                **({} if last else {"retry_in_s": round(wait, 2)}),
            )
            if not last:
                time.sleep(wait)
                delay *= 2
        raise Rejected(
            f"API unavailable after {self.config.retries + 1} attempts: {error}", failure=True
        )

    def propose(self, context: Context) -> Proposal:
        messages = build_messages(
            context, self.config.context_tokens, self.config.max_tokens, self.config.train_chars
        )
        chars = sum(len(message["content"]) for message in messages)
        self.log("prompt", chars=chars, tokens_estimate=chars // CHARS_PER_TOKEN,
                 context_tokens=self.config.context_tokens)  # fmt: skip
        reply = self._complete(messages)
        self.log("reply", chars=len(reply or ""), text=(reply or "")[:4000])
        try:
            train_py, description = edited_train_py(context.train_py, reply)
        except EditRejected as err:
            raise Rejected(f"reply rejected: {err}") from None
        return Proposal(description=description, train_py=train_py)

    def tell(self, proposal: Proposal, result: Result) -> None:
        pass  # the next prompt carries the results table


# --- Optuna proposer ---

SEARCH_SPACE_FILE = "search_space.json"


def load_search_space(path: Path) -> dict:
    """search_space.json: {"--flag": {"type": "float"|"int", "low", "high", "log"?, "step"?} or
    {"type": "categorical", "choices": [...]}} -> optuna distributions."""
    import optuna.distributions as dist

    try:
        declared = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise SystemExit(f"cannot read the search space {path}: {err}") from None
    space = {}
    for flag, spec in declared.items():
        if flag.startswith("_"):
            continue  # "_comment" keys
        if not flag.startswith("--") or not isinstance(spec, dict):
            raise SystemExit(
                f"{path}: {flag!r} must be a train.py flag (--name) mapped to an object"
            )
        kind, log = spec.get("type"), spec.get("log", False)
        if kind == "float":
            space[flag] = dist.FloatDistribution(
                spec["low"], spec["high"], log=log, step=spec.get("step")
            )
        elif kind == "int":
            space[flag] = dist.IntDistribution(
                spec["low"], spec["high"], log=log, step=spec.get("step", 1)
            )
        elif kind == "categorical":
            space[flag] = dist.CategoricalDistribution(spec["choices"])
        else:
            raise SystemExit(f"{path}: {flag} has type {kind!r}; use float, int or categorical")
    if not space:
        raise SystemExit(f"{path} declares no flags")
    return space


def _flag_value(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _train_args(params: dict) -> list[str]:
    return [part for flag, value in params.items() for part in (flag, _flag_value(value))]


def _param_key(params: dict) -> tuple:
    """What a trial runs, as its flags show it: two trials with one key run the same command."""
    return tuple(sorted((flag, _flag_value(value)) for flag, value in params.items()))


SCORED_STATUSES = ("keep", "discard", "baseline")
MAX_RESAMPLES = (
    20  # fresh samples asked for when the sampler repeats a parameter set that already ran
)


def scored_runs(frame: pd.DataFrame) -> dict[str, float]:
    """run_id -> val_bpb of the results rows that carry a score."""
    scored = frame[frame["status"].isin(SCORED_STATUSES) & frame["val_bpb"].notna()]
    return {
        str(run_id): float(bpb)
        for run_id, bpb in zip(scored["run_id"], scored["val_bpb"])
        if math.isfinite(bpb)
    }


def optuna_storage(where: str):
    """A database URL as Optuna takes it, or a journal file (what several processes on one
    machine, or a shared filesystem, share safely)."""
    import optuna

    if "://" in where:
        return where
    if where.endswith(".db"):  # SQLite: one process at a time; workers need a journal or a server
        return f"sqlite:///{where}"
    Path(where).parent.mkdir(parents=True, exist_ok=True)
    backend = optuna.storages.journal.JournalFileBackend(where)
    return optuna.storages.JournalStorage(backend)


class OptunaProposer:
    """TPE over train.py's flags, in a study any number of workers share through its storage (a
    journal file, or a database for several machines), so an interrupted sweep resumes and workers
    never run one parameter set twice. Each trial carries its run's id (started()) and its owner
    (the worker that asked for it); reconcile() settles only the owner's trials that a killed
    session left running, from the results rows their runs wrote."""

    def __init__(self, space: dict, storage: str, study_name: str, owner: str = "",
                 seed: int | None = None, log=lambda event, **fields: None):  # fmt: skip
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.space, self.owner, self.log = space, owner, log
        self.study = optuna.create_study(
            study_name=study_name,
            storage=optuna_storage(storage),
            direction="minimize",
            load_if_exists=True,
        )
        # a sampler seeded as in the last session would propose that session's trials again
        # constant liar: the trials other workers run now count as bad, so TPE samples elsewhere
        self.study.sampler = optuna.samplers.TPESampler(
            seed=None if seed is None else seed + len(self.study.trials), constant_liar=True
        )
        self.pending: dict[int, object] = {}

    def _repeat_of(self, trial) -> int | None:
        """Another trial with the same parameters that ran, runs, or may run (any worker's), or
        None. Read after this trial's parameters are stored, so of two workers that drew one set
        at once, at least the later reader sees the other: one runs it, or neither."""
        from optuna.trial import TrialState

        key = _param_key(trial.params)
        for other in self.study.get_trials(deepcopy=False):
            ran = other.state in (TrialState.COMPLETE, TrialState.RUNNING)
            if other.number != trial.number and (ran or "run_id" in other.user_attrs):
                if _param_key(other.params) == key:
                    return other.number
        return None

    def propose(self, context: Context) -> Proposal:
        from optuna.trial import TrialState

        for _ in range(MAX_RESAMPLES):
            trial = self.study.ask(self.space)
            trial.set_user_attr("owner", self.owner)
            earlier = self._repeat_of(trial)
            if earlier is None:
                break
            trial.set_user_attr("repeat_of", earlier)
            self.study.tell(trial, state=TrialState.FAIL)
            self.log("optuna_repeat_skipped", trial=trial.number, repeat_of=earlier)
        else:
            raise Rejected(
                f"optuna: {MAX_RESAMPLES} samples in a row repeated parameters that already ran; "
                "the search space looks exhausted",
                failure=True,
            )
        self.pending[trial.number] = trial
        args = _train_args(trial.params)
        description = f"optuna trial {trial.number}: {' '.join(args)}"
        return Proposal(description=description, train_args=args, trial=trial.number)

    def started(self, proposal: Proposal, run_id: str) -> None:
        """The proposal's run has an id: kept on its trial, so a later session can find its row."""
        if proposal.trial in self.pending:
            self.pending[proposal.trial].set_user_attr("run_id", run_id)

    def tell(self, proposal: Proposal, result: Result) -> None:
        from optuna.trial import TrialState

        trial = self.pending.pop(proposal.trial)
        trial.set_user_attr(
            "outcome", result.status
        )  # told by the session that ran it: reconcile() leaves it
        if result.val_bpb is not None and result.status in ("keep", "discard"):
            self.study.tell(trial, result.val_bpb)
        else:
            self.study.tell(trial, state=TrialState.FAIL)

    def forget(self, proposal: Proposal) -> None:
        """The run never happened (Ctrl-C before it started): fail its trial."""
        from optuna.trial import TrialState

        if proposal.trial in self.pending:
            self.study.tell(self.pending.pop(proposal.trial), state=TrialState.FAIL)

    def reconcile(self, frame: pd.DataFrame) -> None:
        """Settle the trials an earlier session of this owner left behind, from results.read()'s
        rows: a trial still RUNNING gets its run's val_bpb if the run wrote a scored row, else it
        fails; a trial failed that way whose run scored since (the run outlived the agent) is
        added again as complete. Trials of this session, trials told their outcome and other
        owners' trials are left alone."""
        from optuna.trial import TrialState, create_trial

        scores = scored_runs(frame)
        trials = self.study.get_trials(deepcopy=False)
        settled = {t.user_attrs.get("run_id") for t in trials if t.state == TrialState.COMPLETE}
        # another worker's trials are its own to settle (and its rows may be on another machine)
        for trial in [t for t in trials if t.user_attrs.get("owner") == self.owner]:
            run_id = trial.user_attrs.get("run_id")
            if trial.state == TrialState.RUNNING and trial.number not in self.pending:
                if run_id in scores:
                    self.study.tell(trial.number, scores[run_id])
                    self.log(
                        "optuna_trial_reconciled",
                        trial=trial.number,
                        run_id=run_id,
                        val_bpb=scores[run_id],
                    )
                else:
                    self.study.tell(trial.number, state=TrialState.FAIL)
                    self.log("optuna_stale_trial_failed", trial=trial.number, run_id=run_id)
            elif (trial.state == TrialState.FAIL and run_id in scores and run_id not in settled
                  and "outcome" not in trial.user_attrs):  # fmt: skip
                attrs = {**trial.user_attrs, "reconciled_from": trial.number}
                self.study.add_trial(
                    create_trial(
                        params=trial.params,
                        distributions=trial.distributions,
                        value=scores[run_id],
                        user_attrs=attrs,
                    )
                )
                self.log(
                    "optuna_trial_reconciled",
                    trial=trial.number,
                    run_id=run_id,
                    val_bpb=scores[run_id],
                )
