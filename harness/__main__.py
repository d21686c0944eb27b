"""Command line: `python -m harness COMMAND`.

run [--description D] [--budget S] [-- TRAIN_ARGS]   one experiment, sandboxed, scored and logged
run --nproc K [-- TRAIN_ARGS]                       the same on K devices (torchrun ranks)
baseline [-- TRAIN_ARGS]                            the FP and round-to-nearest rows
evaluate ARTIFACT                                   verify and score an exported artifact
export RUN --hf DIR | --gguf FILE                   a run's verified model: HF folder or GGUF
status [--follow] [--since 8h] [--track T]          the results table, best rows, Pareto front
plot [--run RUN]                                    progress.png and pareto.png, or a loss curve
show RUN                                            a run's config, row, train.py diff and log tail
generate --run RUN [--prompt P] [--gguf FILE]       FP vs low-bit greedy continuations
agent [--proposer llm|optuna] [-- TRAIN_ARGS]       propose, run in tmux, keep or reset (program.md)
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import tempfile
from pathlib import Path

from harness.budget import TIME_BUDGET_SECONDS
from harness.evaluate import EVAL_TOKENS
from harness.runner import STARTUP_LIMIT_SECONDS

BASELINES = (["--baseline", "fp"], ["--baseline", "rtn"])
# the commands outside the scoring core: name -> (module with add_arguments(parser) and
# command(args) -> exit code, help). Only the chosen one is imported: `harness run` must not pay
# for matplotlib, optuna, openai or libtmux, nor fail without them.
COMMANDS = {
    "status": (
        "harness.tools.status",
        "results.tsv as a table, best per track, Pareto front; --follow",
    ),
    "plot": ("harness.tools.plots", "progress.png and pareto.png; --run RUN draws its loss curve"),
    "show": (
        "harness.tools.show",
        "one run: config, row, train.py diff against its parent, log tail",
    ),
    "generate": (
        "harness.tools.generate",
        "greedy continuations: FP model vs the run's low-bit model",
    ),
    "export": (
        "harness.tools.export",
        "a run's verified low-bit model: a plain HF folder (--hf) or a GGUF (--gguf)",
    ),
    "agent": ("harness.agent.cli", "autonomous experiments in tmux: LLM or Optuna proposals"),
}


def _run(args: argparse.Namespace) -> int:
    from harness.runner import RunSpec, check_ready, run_experiment
    from harness.sandbox import SANDBOX_BWRAP, SANDBOX_NONE

    kind = SANDBOX_NONE if args.no_sandbox else SANDBOX_BWRAP
    if args.cpus:  # the runner, train.py and the evaluator inherit the cores and the thread count
        os.sched_setaffinity(0, args.cpus)
        os.environ["OMP_NUM_THREADS"] = str(len(args.cpus))
    problem = check_ready(args.eval_tokens, kind)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    failed = 0
    baseline = args.command == "baseline"
    for prefix in BASELINES if baseline else [[]]:
        spec = RunSpec(
            train_args=[*prefix, *args.train_args],
            description=args.description,
            budget_seconds=args.budget,
            eval_tokens=args.eval_tokens,
            baseline=baseline,
            sandbox=kind,
            startup_seconds=args.startup_limit,
            nproc=args.nproc,
        )
        failed += run_experiment(spec).status in ("crash", "invalid")
    return 1 if failed else 0


def cpu_list(text: str) -> list[int]:
    """`0-3,8` -> [0, 1, 2, 3, 8], as taskset and cpuset files write them."""
    cores = []
    try:
        for part in text.split(","):
            first, _, last = part.partition("-")
            cores += range(int(first), int(last or first) + 1)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a core list like 0-3,8: {text!r}") from None
    if not cores:
        raise argparse.ArgumentTypeError("no cores")
    return cores


def _evaluate(args: argparse.Namespace) -> int:
    from harness import evaluate

    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "eval.json"
        code = evaluate.main(
            [str(args.artifact), "--out", str(out), "--eval-tokens", str(args.eval_tokens)]
        )
        print(json.dumps(json.loads(out.read_text()), indent=1))
    return code


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    whole, train_args = list(argv), []
    if "--" in argv:  # everything after -- goes to train.py untouched
        argv, train_args = argv[: argv.index("--")], argv[argv.index("--") + 1 :]
    parser = argparse.ArgumentParser(
        prog="python -m harness",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    for name, about in (
        ("run", "one experiment: train.py, verify, score, log"),
        ("baseline", "FP and RTN rows"),
    ):
        sub = commands.add_parser(name, help=about)
        sub.add_argument("--description", default="", help="one line for results.tsv")
        sub.add_argument(
            "--budget", type=float, default=TIME_BUDGET_SECONDS, help="training seconds"
        )
        sub.add_argument("--eval-tokens", type=int, default=EVAL_TOKENS)
        sub.add_argument(
            "--startup-limit",
            type=float,
            default=STARTUP_LIMIT_SECONDS,
            help="seconds train.py may take before its first step (not charged to the budget)",
        )
        sub.add_argument(
            "--nproc",
            type=int,
            default=1,
            help="train.py as this many torchrun ranks, one device each (data parallel; --fsdp 1)",
        )
        sub.add_argument(
            "--no-sandbox",
            action="store_true",
            help="run train.py without bubblewrap (recorded in the row): only where it cannot run",
        )
        sub.add_argument(
            "--cpus",
            type=cpu_list,
            help="run on these cores only, e.g. 0-3,8 (the agent's workers divide the machine so)",
        )
        sub.set_defaults(handler=_run, train_args=train_args)
    sub = commands.add_parser("evaluate", help="verify and score an artifact folder")
    sub.add_argument("artifact", type=Path)
    sub.add_argument("--eval-tokens", type=int, default=EVAL_TOKENS)
    sub.set_defaults(handler=_evaluate)
    chosen = next((word for word in argv if not word.startswith("-")), None)
    for name, (module_name, about) in COMMANDS.items():
        sub = commands.add_parser(name, help=about)
        if name == chosen:
            module = importlib.import_module(module_name)
            module.add_arguments(sub)
            sub.set_defaults(handler=module.command, train_args=train_args, argv=whole)
    args = parser.parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
