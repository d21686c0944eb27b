"""Where an experiment's wall-clock goes besides training: each phase of a real `harness run`.

    python bench/loop.py [--budget 60] [--out bench/out/loop.json] [-- TRAIN_ARGS]

Runs `python -m harness run` on the prepared model twice, in a scratch runs folder of its own
(results.tsv, teacher and compile caches; the sandbox as always): a cold run on an empty compile
cache (a short eval: only its start-up is of interest), then a warm run on the cache the
cold one left, with --budget and the full eval. Each piece of output (a line, or a progress bar's
redraw) is timestamped as it arrives; the phases are the gaps between the lines every run prints:

    runner     spawn -> `run <id>:`             harness CLI, data and sandbox checks
    load       -> `model <name>:`               sandbox, imports, from_pretrained (in train.py)
    prepare    -> the `train:` bar appears       quantize, teacher, optimizer
    first_step -> `step     1 |`                 the compile warm-up (the budget's clock starts)
    training   the row's train_seconds           the runner's clock
    export     -> `exported ...`                 from the last step (first step + training)
    eval_load  -> the `eval:` bar appears        train.py's exit, integrity check, evaluator
                                                 start-up, load_verified (decode, causal probe)
    evaluation -> the `eval:` bar's last redraw  the exact fp32 eval (its tokens/s)
    finish     -> exit                           verdict, row, summary

Each run's timestamped output goes beside --out (loop-cold.log, loop-warm.log).
overhead_s = total - training - evaluation; experiments_per_hour is what the warm run's phases
imply at the default budget: 3600 / (overhead + TIME_BUDGET_SECONDS + evaluation).

Last, in this process, on the warm run's verified model: harness.evaluate.evaluate() against a
bare HF forward (fp32, torch.no_grad, the same windows) over --compare-tokens tokens, interleaved
for --rounds rounds: what the eval's loss and byte bookkeeping cost over the model itself.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from harness.budget import TIME_BUDGET_SECONDS  # noqa: E402
from harness.evaluate import EVAL_BATCH, EVAL_CONTEXT, EVAL_TOKENS  # noqa: E402

# phase -> the output that ends it (a regular expression searched in each line or progress-bar
# redraw; train.py's own lines may follow a bar's last redraw on the same line)
MARKS = {
    "runner": r"^run \S+: python ",
    "load": r"model \S+: [\d.]+M params",
    "prepare": r"^train:",
    "first_step": r"step +1 \| loss",
    "exported": r"exported \S+ after",
    "eval_start": r"^eval:",
    "summary": r"^---$",
}


def timed_lines(command: list[str], env: dict[str, str]) -> tuple[list[tuple[float, str]], float]:
    """Run `command`, timestamping each piece of its output (split at newlines and carriage
    returns) on arrival -> ([(seconds since spawn, text)], seconds to exit)."""
    started = time.monotonic()
    child = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT)  # fmt: skip
    pieces, pending, since = [], b"", 0.0
    for chunk in iter(lambda: child.stdout.read1(65536), b""):
        now = time.monotonic() - started
        *done, rest = re.split(rb"[\r\n]", chunk)
        if not pending:
            since = now
        if done:  # a piece's time is when its first byte came (a bar redraw is \r, then text)
            parts = [(since, pending + done[0]), *((now, part) for part in done[1:])]
            pieces += [(t, part.decode(errors="replace").strip()) for t, part in parts
                       if part.strip()]  # fmt: skip
            pending, since = b"", now
        pending += rest
    if pending.strip():
        pieces.append((since, pending.decode(errors="replace").strip()))
    if child.wait() != 0:
        raise SystemExit(f"the run failed ({child.returncode}):\n{shown(pieces[-20:])}")
    return pieces, time.monotonic() - started


def shown(pieces: list[tuple[float, str]]) -> str:
    return "\n".join(f"{t:8.2f} {text[:160]}" for t, text in pieces)


def first(pieces: list[tuple[float, str]], mark: str, after: float = 0.0) -> float:
    pattern = re.compile(MARKS[mark])
    found = next((t for t, text in pieces if t >= after and pattern.search(text)), None)
    if found is None:
        raise SystemExit(f"no output matching {MARKS[mark]!r}; the run printed:\n{shown(pieces)}")
    return found


def phases(pieces: list[tuple[float, str]], total: float, row: dict, eval_tokens: int) -> dict:
    """Seconds per phase (see the docstring) from a run's timestamped output and its summary."""
    at = {mark: first(pieces, mark) for mark in ("runner", "load", "prepare", "first_step")}
    training = row["train_seconds"]
    at["exported"] = first(pieces, "exported", at["first_step"])
    at["eval_start"] = first(pieces, "eval_start", at["exported"])
    at["eval_end"] = max(t for t, text in pieces if text.startswith("eval:"))
    result = {
        "runner_s": at["runner"],
        "load_s": at["load"] - at["runner"],
        "prepare_s": at["prepare"] - at["load"],
        "first_step_s": at["first_step"] - at["prepare"],
        "training_s": training,
        "export_s": at["exported"] - at["first_step"] - training,
        "eval_load_s": at["eval_start"] - at["exported"],
        "evaluation_s": at["eval_end"] - at["eval_start"],
        "finish_s": total - at["eval_end"],
        "total_s": total,
    }
    result["overhead_s"] = total - training - result["evaluation_s"]
    result["eval_tokens"] = eval_tokens
    result["eval_tokens_per_s"] = (
        eval_tokens / result["evaluation_s"] if result["evaluation_s"] > 0 else None
    )
    result["steps"] = row["steps"]
    return result


def run_once(scratch: Path, budget: float, eval_tokens: int, extra: list[str], log: Path) -> dict:
    """One `harness run` in `scratch` (its runs, results and caches) -> its phases; its
    timestamped output goes to `log`."""
    env = {
        **os.environ,
        "HARNESS_RUNS_DIR": str(scratch / "runs"),
        "HARNESS_RESULTS": str(scratch / "results.tsv"),
    }
    command = [sys.executable, "-m", "harness", "run", "--budget", str(budget)]
    command += ["--eval-tokens", str(eval_tokens), "--description", "bench/loop.py", *extra]
    pieces, total = timed_lines(command, env)
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(shown(pieces) + "\n")
    summary = summary_of(pieces)
    if summary["status"] in ("crash", "invalid"):
        raise SystemExit(f"the run ended {summary['status']}: {summary.get('reason')}")
    return {**phases(pieces, total, summary, eval_tokens), "run_id": summary["run_id"]}


def summary_of(pieces: list[tuple[float, str]]) -> dict:
    """The run's closing block (runner.format_summary): `name: value` lines after the last ---."""
    start = max(i for i, (_, text) in enumerate(pieces) if text == "---")
    fields = dict(text.split(":", 1) for _, text in pieces[start + 1 :] if ":" in text)
    summary = {name.strip(): value.strip() for name, value in fields.items()}
    summary["train_seconds"] = float(summary.get("training_seconds") or 0)
    summary["steps"] = int(summary.get("num_steps") or 0)
    return summary


def compare_eval(artifact: Path, n_tokens: int, rounds: int) -> dict:
    """tokens/s of evaluate() and of a bare forward over the same windows, interleaved."""
    import numpy as np
    import torch

    from harness.artifact import load_verified
    from harness.data import load_prepared
    from harness.evaluate import evaluate

    prepared = load_prepared()
    model, _ = load_verified(artifact, prepared.model_dir)
    model.eval()
    tokens = prepared.eval.tokens()
    stream = torch.from_numpy(np.asarray(tokens[: n_tokens + 1], dtype=np.int64))
    windows = torch.stack([stream[s : s + EVAL_CONTEXT] for s in range(0, n_tokens, EVAL_CONTEXT)])

    def bare() -> None:
        with torch.no_grad():
            for batch in windows.split(EVAL_BATCH):
                model(input_ids=batch)

    def harness_eval() -> None:
        evaluate(model, tokens, prepared.token_bytes, n_tokens, progress=False)

    times: dict[str, list[float]] = {"bare_forward": [], "evaluate": []}
    for index in range(rounds):
        order = list(times) if index % 2 == 0 else list(times)[::-1]
        for name in order:
            started = time.perf_counter()
            (bare if name == "bare_forward" else harness_eval)()
            times[name].append(time.perf_counter() - started)
    median = {name: statistics.median(t) for name, t in times.items()}
    return {
        "tokens": n_tokens,
        "rounds": rounds,
        "tokens_per_s": {name: n_tokens / t for name, t in median.items()},
        "evaluate_over_bare_ratio": statistics.median(
            e / b for e, b in zip(times["evaluate"], times["bare_forward"])
        ),
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--budget", type=float, default=60.0, help="training seconds, warm run")
    parser.add_argument("--cold-budget", type=float, default=60.0)
    parser.add_argument("--cold-eval-tokens", type=int, default=2 * EVAL_BATCH * EVAL_CONTEXT)
    parser.add_argument("--compare-tokens", type=int, default=2 * EVAL_BATCH * EVAL_CONTEXT)
    parser.add_argument("--rounds", type=int, default=2, help="of the in-process comparison")
    parser.add_argument("--no-sandbox", action="store_true", help="passed on to harness run")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "loop.json")
    parser.add_argument("train_args", nargs="*", help="passed on to train.py (after --)")
    args = parser.parse_args()
    extra = ["--no-sandbox"] if args.no_sandbox else []
    extra += ["--", *args.train_args] if args.train_args else []
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-loop-") as scratch:
        logs = {
            name: args.out.with_name(f"{args.out.stem}-{name}.log") for name in ("cold", "warm")
        }
        cold = run_once(Path(scratch), args.cold_budget, args.cold_eval_tokens, extra, logs["cold"])
        print(json.dumps({"cold": cold}, indent=1), flush=True)
        warm = run_once(Path(scratch), args.budget, EVAL_TOKENS, extra, logs["warm"])
        print(json.dumps({"warm": warm}, indent=1), flush=True)
        artifact = Path(scratch) / "runs" / warm["run_id"] / "artifact"
        compared = compare_eval(artifact, args.compare_tokens, args.rounds)
    evaluation = warm["evaluation_s"]
    per_experiment = warm["overhead_s"] + TIME_BUDGET_SECONDS + evaluation
    report = {
        "cpu": platform.processor() or platform.machine(),
        "avx512_bf16": "avx512_bf16" in Path("/proc/cpuinfo").read_text(),
        "cores": os.cpu_count(),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "train_args": args.train_args,
        "cold": cold,
        "warm": warm,
        "first_step_warm_over_cold": warm["first_step_s"] / cold["first_step_s"],
        "experiment_seconds_at_default_budget": per_experiment,
        "experiments_per_hour": 3600 / per_experiment,
        "eval_vs_bare_forward": compared,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
