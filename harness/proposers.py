"""Where candidates come from: an LLM editing train.py, or Optuna choosing train.py's flags.

A proposer turns the current state (train.py, recent rows, the last crash) into a Proposal, or
raises Rejected with the reason it has none; after the run it is told the outcome.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from harness.edits import EditRejected, edited_train_py

RESULT_COLUMNS = ("commit", "status", "val_bpb", "bpw", "steps", "description")
RECENT_ROWS = 10
CRASH_LOG_LINES = 30

EDIT_FORMAT = """Reply with one line `DESCRIPTION: <what you changed, one line>`, then one or more edit blocks:

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
    new = f"{value * 2:g}" if "." in match.group(2) or "e" in match.group(2) else str(int(value) * 2)
    line = match.group(0)
    changed = f"{match.group(1)} = {new}{match.group(3) or ''}"
    return (f"\nFor example, a complete reply that doubles {match.group(1)}:\n\nDESCRIPTION: double {match.group(1)}\n"
            f"train.py\n<<<<<<< SEARCH\n{line}\n=======\n{changed}\n>>>>>>> REPLACE\n")


class Rejected(Exception):
    """No candidate this time; str(error) says why (logged, the loop goes on)."""


@dataclass
class Context:
    train_py: str
    program: str  # program.md
    recent: pd.DataFrame  # recent results rows of this agent's branch
    crash_log: str  # tail of the last crashed run's log, or ""


@dataclass
class Proposal:
    description: str
    train_py: str | None = None  # new train.py, or None to run the current one
    train_args: list[str] = field(default_factory=list)
    trial: int | None = None  # the Optuna trial number


@dataclass
class Result:
    status: str  # keep | discard | crash | invalid (or "crash" when no row could be made)
    val_bpb: float | None


# --- LLM proposer ---


def _results_table(frame: pd.DataFrame) -> str:
    if frame.empty:
        return "(no runs yet)"
    return frame.tail(RECENT_ROWS)[list(RESULT_COLUMNS)].to_csv(sep="\t", index=False, float_format="%.4f")


def build_messages(context: Context, train_chars: int | None = None) -> list[dict]:
    """program.md as the system message; train.py (its first `train_chars` characters when the
    model's context is small: the settings come first), the results and the last crash."""
    shown = context.train_py
    if train_chars is not None and len(shown) > train_chars:
        shown = shown[: shown.rfind("\n", 0, train_chars) + 1] + "# ... (the rest of train.py is not shown)\n"
    user = (
        f"Current train.py:\n```python\n{shown}```\n\n"
        f"Recent results (lower val_bpb is better):\n{_results_table(context.recent)}\n"
        + (f"\nThe last run crashed; the end of its log:\n```\n{context.crash_log}\n```\n" if context.crash_log else "")
        + f"\nPropose one change to train.py that should lower val_bpb.\n{EDIT_FORMAT}\n{worked_example(context.train_py)}"
    )
    return [{"role": "system", "content": context.program}, {"role": "user", "content": user}]


@dataclass
class LLMConfig:
    model: str
    base_url: str | None = None  # None: the openai client reads OPENAI_BASE_URL, else api.openai.com
    api_key: str | None = None  # None: OPENAI_API_KEY; never logged
    timeout: float = 300.0  # seconds per request
    retries: int = 3  # after the first attempt, on 5xx, timeouts and connection errors
    backoff: float = 2.0  # seconds before the first retry, doubled after each
    max_tokens: int = 2048
    temperature: float = 0.7
    train_chars: int | None = None  # show only the start of train.py (small context windows)


class LLMProposer:
    """Any OpenAI-compatible chat-completions server: OpenAI, vLLM, llama.cpp's server, Ollama."""

    def __init__(self, config: LLMConfig, log=lambda event, **fields: None):
        import openai

        self.config = config
        self.log = log
        self.client = openai.OpenAI(base_url=config.base_url, api_key=config.api_key or "not-needed",
                                    timeout=config.timeout, max_retries=0)  # fmt: skip

    def _complete(self, messages: list[dict]) -> str | None:
        import openai

        delay = self.config.backoff
        for attempt in range(self.config.retries + 1):
            try:
                reply = self.client.chat.completions.create(
                    model=self.config.model, messages=messages, max_tokens=self.config.max_tokens,
                    temperature=self.config.temperature)  # fmt: skip
                choices = getattr(reply, "choices", None)
                return choices[0].message.content if choices else None
            except (openai.APITimeoutError, openai.APIConnectionError, openai.InternalServerError,
                    openai.RateLimitError) as err:  # fmt: skip
                cause = f" ({type(err.__cause__).__name__}: {err.__cause__})" if err.__cause__ else ""
                error = f"{type(err).__name__}: {err}{cause}"
            except openai.APIError as err:  # 4xx other than 429: retrying will not help
                raise Rejected(f"API error: {type(err).__name__}: {err}") from None
            self.log("api_error", attempt=attempt + 1, error=error)
            if attempt < self.config.retries:
                time.sleep(delay)
                delay *= 2
        raise Rejected(f"API unavailable after {self.config.retries + 1} attempts: {error}")

    def propose(self, context: Context) -> Proposal:
        reply = self._complete(build_messages(context, self.config.train_chars))
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
            raise SystemExit(f"{path}: {flag!r} must be a train.py flag (--name) mapped to an object")
        kind, log = spec.get("type"), spec.get("log", False)
        if kind == "float":
            space[flag] = dist.FloatDistribution(spec["low"], spec["high"], log=log, step=spec.get("step"))
        elif kind == "int":
            space[flag] = dist.IntDistribution(spec["low"], spec["high"], log=log, step=spec.get("step", 1))
        elif kind == "categorical":
            space[flag] = dist.CategoricalDistribution(spec["choices"])
        else:
            raise SystemExit(f"{path}: {flag} has type {kind!r}; use float, int or categorical")
    if not space:
        raise SystemExit(f"{path} declares no flags")
    return space


def _flag_value(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


class OptunaProposer:
    """TPE over train.py's flags. The study lives in SQLite, so an interrupted sweep resumes."""

    def __init__(self, space: dict, storage: Path, study_name: str, seed: int | None = None,
                 log=lambda event, **fields: None):  # fmt: skip
        import optuna
        from optuna.trial import TrialState

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.space = space
        self.log = log
        storage.parent.mkdir(parents=True, exist_ok=True)
        self.study = optuna.create_study(study_name=study_name, storage=f"sqlite:///{storage}", direction="minimize",
                                         sampler=optuna.samplers.TPESampler(seed=seed), load_if_exists=True)  # fmt: skip
        for stale in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            self.study.tell(stale.number, state=TrialState.FAIL)  # a run the last session did not finish
            log("optuna_stale_trial_failed", trial=stale.number)
        self.pending: dict[int, object] = {}

    def propose(self, context: Context) -> Proposal:
        trial = self.study.ask(self.space)
        self.pending[trial.number] = trial
        args = [part for flag, value in trial.params.items() for part in (flag, _flag_value(value))]
        description = f"optuna trial {trial.number}: {' '.join(args)}"
        return Proposal(description=description, train_args=args, trial=trial.number)

    def tell(self, proposal: Proposal, result: Result) -> None:
        from optuna.trial import TrialState

        trial = self.pending.pop(proposal.trial)
        if result.val_bpb is not None and result.status in ("keep", "discard"):
            self.study.tell(trial, result.val_bpb)
        else:
            self.study.tell(trial, state=TrialState.FAIL)

    def forget(self, proposal: Proposal) -> None:
        """The run never happened (Ctrl-C before it started): fail its trial."""
        from optuna.trial import TrialState

        if proposal.trial in self.pending:
            self.study.tell(self.pending.pop(proposal.trial), state=TrialState.FAIL)
