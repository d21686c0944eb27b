"""The agent's flags and its start: checks, the proposer, the workspace, the tmux session."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from harness import interrupts, paths, results
from harness.budget import TIME_BUDGET_SECONDS
from harness.evaluate import EVAL_TOKENS
from harness.git import GitError, git
from harness.sandbox import SECRET_ENV

RESULTS_COMMAND = f"{shlex.quote(sys.executable)} -m harness status --follow"

EPILOG = """\
Connect a model: any OpenAI-compatible chat-completions server. The key comes from OPENAI_API_KEY
(or --api-key, which ps shows); the agent keeps it to itself: no tmux pane, run, child or file
gets it.
  OpenAI     --base-url https://api.openai.com/v1 --model gpt-4o-mini
             key: OPENAI_API_KEY=sk-... (your key)
  vLLM       --base-url http://127.0.0.1:8000/v1 --model <the served model, as vllm serve names it>
             key: any non-empty string (the one given to `vllm serve --api-key`, if it was)
  llama.cpp  --base-url http://127.0.0.1:8080/v1 --model <any name>
             (llama-server -m model.gguf --port 8080)
             key: any non-empty string (the one given to `llama-server --api-key`, if it was)
  Ollama     --base-url http://127.0.0.1:11434/v1 --model <a pulled model, e.g. qwen2.5-coder:7b>
             key: any non-empty string, e.g. OPENAI_API_KEY=ollama
Pass --context-tokens the context window the server gives the model (llama-server -c, Ollama's
num_ctx, vLLM's --max-model-len): the prompt is sized to it.

Exit: 0 --max-experiments or --hours reached; 1 --max-crashes failures in a row; 2 not in a git
repository; 130 Ctrl-C, 143 SIGTERM, 129 SIGHUP: the running experiment is stopped with that
signal and recorded, the branch left at the kept commit. A session killed outright (kill -9) is
reconciled by the next one with the same --tag."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--proposer", choices=("llm", "optuna"), default="llm")
    parser.add_argument(
        "--tag",
        default=time.strftime("%b%d").lower(),
        help="branch autoresearch/<tag> (default: today)",
    )
    parser.add_argument(
        "--max-experiments",
        type=int,
        help="stop after N proposals in this session, rejected ones included (a restart counts "
        "afresh; 0: only reconcile what a killed session left)",
    )
    parser.add_argument(
        "--hours", type=float, help="stop starting experiments after this many hours"
    )
    parser.add_argument(
        "--max-crashes",
        type=int,
        default=5,
        help="stop after N failures in a row: crashed or invalid runs, an unreachable or failing "
        "proposer, proposals that cannot be applied (a rejected reply is none)",
    )
    parser.add_argument(
        "--budget", type=float, default=TIME_BUDGET_SECONDS, help="training seconds per run"
    )
    parser.add_argument("--eval-tokens", type=int, default=EVAL_TOKENS)
    parser.add_argument(
        "--run-timeout",
        type=float,
        help="seconds before the agent stops a run with SIGTERM "
        "(default: the runner's limit + 20 min)",
    )
    parser.add_argument(
        "--track",
        choices=[name for name, _ in results.TRACKS],
        help="keep only runs in this bpw track",
    )
    parser.add_argument(
        "--from-checkout",
        action="store_true",
        help="start a new branch from train.py as it is in your checkout, uncommitted changes "
        "included (committed on the agent's branch only; your checkout and index are untouched)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="run N experiments at once, each in its own worktree and branch "
        "autoresearch/<tag>-<k> (on CPU each gets an equal share of the cores)",
    )
    parser.add_argument(
        "--devices",
        type=lambda text: [part for part in text.split(",") if part],
        default=[],
        help="cuda:0,cuda:1,...: worker k runs on the k-th (round robin)",
    )
    parser.add_argument("--worker", type=int, default=0, help=argparse.SUPPRESS)  # a supervisor's
    parser.add_argument("--session", default="autoresearch", help="tmux session name")
    parser.add_argument("--socket", help="tmux socket name (tmux -L); default: the default server")
    parser.add_argument(
        "--results-command", default=RESULTS_COMMAND, help="what the results window runs"
    )
    parser.add_argument(
        "--no-sandbox",
        action="store_true",
        help="run proposed train.py files without bubblewrap: only where it cannot run",
    )
    llm = parser.add_argument_group(
        "llm proposer (OpenAI-compatible; key from OPENAI_API_KEY or --api-key)"
    )
    llm.add_argument("--model", default=os.environ.get("OPENAI_MODEL", "gpt-4o-mini"))
    llm.add_argument(
        "--base-url", default=None, help="e.g. http://127.0.0.1:8080/v1 (default: OPENAI_BASE_URL)"
    )
    llm.add_argument("--api-key", default=None, help="prefer OPENAI_API_KEY: flags show up in ps")
    llm.add_argument(
        "--context-tokens",
        type=int,
        default=32768,
        help="the model's context window: the prompt is sized to fit it with the reply "
        "(default 32768)",
    )
    llm.add_argument("--request-timeout", type=float, default=300.0, help="seconds per API call")
    llm.add_argument("--retries", type=int, default=3)
    llm.add_argument(
        "--backoff", type=float, default=2.0, help="seconds before the first retry (doubles)"
    )
    llm.add_argument("--max-tokens", type=int, default=2048, help="reply length cap")
    llm.add_argument(
        "--train-chars", type=int, help="show the model at most N characters of train.py"
    )
    opt = parser.add_argument_group("optuna proposer")
    opt.add_argument(
        "--search-space", type=Path, help="default: search_space.json next to train.py"
    )
    opt.add_argument("--seed", type=int, default=None)
    opt.add_argument(
        "--storage",
        help="the study's Optuna storage, shared by every worker that names it: a journal file "
        "(default runs/agent-<tag>/optuna.journal) or a database URL (postgresql://..., "
        "mysql://...) for workers on several machines",
    )


@contextmanager
def environment_without_secrets():
    """Every secret-looking variable out of os.environ while the agent runs, so that no child
    (git and its hooks, tmux and the server it may start, and so every pane) inherits one."""
    removed = {name: os.environ.pop(name) for name in list(os.environ) if SECRET_ENV.search(name)}
    try:
        yield
    finally:
        os.environ.update(removed)


def command(args: argparse.Namespace) -> int:
    api_key = args.api_key or os.environ.get("OPENAI_API_KEY")
    with environment_without_secrets():
        if args.workers > 1 and not args.worker:
            return _supervise(args, api_key)
        return _main(args, api_key)


def _supervise(args: argparse.Namespace, api_key: str | None) -> int:
    from harness.agent.workers import supervise

    if _not_ready(args):
        return 2
    _watch_hint(args, f"{args.workers} workers; watch them",
                "results, w<k>-agent: worker k's log, w<k>-exp<N>: its runs")  # fmt: skip
    return supervise(args.argv, args.workers, api_key)


def _watch_hint(args: argparse.Namespace, what: str, windows: str) -> None:
    socket_flag = f"-L {args.socket} " if args.socket else ""
    print(f"[agent] {what}: tmux {socket_flag}attach -t {args.session} (windows: {windows})")


def _not_ready(args: argparse.Namespace) -> bool:
    """Said once, before any worker or proposal: the data or the sandbox is not ready."""
    from harness.runner import check_ready
    from harness.sandbox import SANDBOX_BWRAP, SANDBOX_NONE

    problem = check_ready(args.eval_tokens, SANDBOX_NONE if args.no_sandbox else SANDBOX_BWRAP)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
    return problem is not None


def _proposer(args: argparse.Namespace, api_key: str | None, log, workspace, worker):
    from harness.agent.proposers import (
        SEARCH_SPACE_FILE,
        LLMConfig,
        LLMProposer,
        OptunaProposer,
        load_search_space,
    )

    if args.proposer == "llm":
        config = LLMConfig(model=args.model, base_url=args.base_url, api_key=api_key,
                           timeout=args.request_timeout, retries=args.retries,
                           backoff=args.backoff, max_tokens=args.max_tokens,
                           train_chars=args.train_chars,
                           context_tokens=args.context_tokens)  # fmt: skip
        proposer = LLMProposer(config, log=log)
        log("proposer", kind="llm", model=args.model, base_url=str(proposer.client.base_url),
            context_tokens=args.context_tokens)  # fmt: skip
        return proposer
    space_file = args.search_space or workspace.train_py.parent / SEARCH_SPACE_FILE
    legacy = worker.group_root / "optuna.db"  # a lone agent's study before journals: resumed
    storage = args.storage or str(
        legacy if legacy.exists() else worker.group_root / "optuna.journal"
    )
    seed = None if args.seed is None else args.seed + 1000 * worker.index  # workers differ
    proposer = OptunaProposer(load_search_space(space_file), storage, study_name=args.tag,
                              owner=worker.owner(), seed=seed,
                              log=log)  # fmt: skip
    log("proposer", kind="optuna", search_space=str(space_file), storage=storage,
        trials_so_far=len(proposer.study.trials))  # fmt: skip
    return proposer


def _main(args: argparse.Namespace, api_key: str | None) -> int:
    from harness.agent.jobs import Jobs, run_environment
    from harness.agent.log import AgentLog
    from harness.agent.loop import Agent, AgentConfig
    from harness.agent.tmux import LOG_WINDOW, Tmux
    from harness.agent.workers import Worker, in_turn
    from harness.agent.workspace import Workspace, start_point

    if not args.worker and _not_ready(args):  # one line now, not a failed run per proposal
        return 2
    worker = Worker(args.tag, args.worker, args.workers)
    script = paths.train_script()
    try:
        repo = Path(git(["rev-parse", "--show-toplevel"], script.parent))
    except GitError:
        print(
            f"error: {script} is not in a git repository; the agent commits candidates on a branch",
            file=sys.stderr,
        )
        return 2
    train_rel = script.resolve().relative_to(repo.resolve())
    root = worker.root
    root.mkdir(parents=True, exist_ok=True)
    log = AgentLog(
        root, secrets=[api_key] if api_key else [], name=worker.name if worker.index else None
    )
    uncommitted = git(["status", "--porcelain", "--", str(train_rel)], repo) != ""
    with in_turn():
        workspace = Workspace(repo, train_rel, root, worker.branch)
    proposer = _proposer(args, api_key, log, workspace, worker)
    start_point(workspace, script, train_rel, uncommitted, args.from_checkout, log)
    config = AgentConfig(tag=worker.name, max_experiments=worker.share(args.max_experiments),
                         hours=args.hours, max_crashes=args.max_crashes,
                         budget_seconds=args.budget, eval_tokens=args.eval_tokens,
                         run_timeout=args.run_timeout, train_args=args.train_args,
                         track=args.track, no_sandbox=args.no_sandbox, cpus=worker.cpus(),
                         device=worker.device(args.devices))  # fmt: skip
    tmux = Tmux(args.results_command, cwd=paths.ROOT, session_name=args.session,
                socket_name=args.socket, environment=run_environment(workspace.train_py),
                log_file=log.human, log_window=worker.window(LOG_WINDOW))  # fmt: skip
    tmux.session()
    if not worker.index:  # a worker's supervisor has said where to watch
        _watch_hint(args, "watch it", "results, agent: this log, exp<N>: runs")
    jobs = Jobs(config, tmux, root, workspace.train_py, log, window=worker.window)
    with interrupts.raising():
        return Agent(config, proposer, log, workspace, jobs, peers=worker.peers()).loop()
