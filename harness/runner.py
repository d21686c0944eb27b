"""One experiment, start to row: run train.py in a sandbox, score its artifact, append the row.

    runs/<run_id>/train.py     the exact train.py that ran
    runs/<run_id>/run.log      everything it (and the evaluation) printed
    runs/<run_id>/train.json   what train.py says about itself (settings, a crash reason; untrusted)
    runs/<run_id>/loss.csv     its own training log (untrusted)
    runs/<run_id>/artifact/    what it exported
    runs/<run_id>/eval.json    the harness's verdict

train.py runs in a sandbox (harness.sandbox) that can write only its run folder and the shared
caches, under the runner's clock: it announces each step on a pipe (harness.budget), the runner
timestamps what arrives, and those figures are the row's steps and train_seconds and decide the
limits (no step within the start-up limit, training past the budget by more than a step's slack,
an export that takes too long: invalid). The evaluator runs in a second sandbox that sees the
artifact read-only and sends its verdict back over a pipe. train.py.copy, run.log and eval.json
are the runner's: kept outside the run folder while train.py lives, put in place once it and
everything it started are gone. Every outcome, a crash, a hang, an invalid artifact, Ctrl-C or
SIGTERM, ends as a row with a reason.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import shutil
import signal
import stat
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from harness import integrity, interrupts, paths, results, sandbox
from harness.budget import BUDGET_ENV, CLOCK_FD_ENV, TIME_BUDGET_SECONDS, TORCHRUN_ENV
from harness.data import PREPARED, DataError, Prepared, atomic_write_json, load_prepared
from harness.evaluate import EVAL_TOKENS, eval_set_name
from harness.git import GitError, git
from harness.text import last_line

RUN_DIR_ENV = "HARNESS_RUN_DIR"  # tells train.py where to write, and that the harness is watching
STARTUP_LIMIT_SECONDS = (
    180.0  # process start -> first step: load, teacher, compile warm-up (not charged)
)
EXPORT_LIMIT_SECONDS = 120.0  # last step -> exit: export
EVAL_TIMEOUT_SECONDS = 3600.0
SLACK_STEPS = (
    2.0  # training may end this many (median) steps after the budget: the last step runs over
)
SLACK_SECONDS = 2.0  # plus scheduling noise
SLACK_FRACTION = 0.1  # the slack never exceeds this share of the budget
TRAIN_JSON_BYTES = 1 << 20  # larger is not read
VERDICT_BYTES = 1 << 20
MEMORY_SAMPLE_SECONDS = 0.5  # how often the sandbox's peak memory is read
LOG_BYTES = (
    100 << 20
)  # of train.py's output kept in run.log: a run that prints without end fills no disk
RUNNER_FILES = ("train.py", "run.log", "eval.json")  # written by the runner only
PRIVATE_PREFIX = ".runner-"  # runs/.runner-<pid>-<run_id>-*: the runner's files while train.py runs
# torchrun --standalone by address: the sandbox has no /etc/hosts, so no "localhost" nor hostname
TORCHRUN_LOCAL = ["--nnodes=1", "--rdzv-backend=c10d", "--rdzv-endpoint=127.0.0.1:0",
                  "--local-addr=127.0.0.1"]  # fmt: skip


@dataclass
class RunSpec:
    train_args: list[str] = field(default_factory=list)
    description: str = ""
    budget_seconds: float = TIME_BUDGET_SECONDS
    eval_tokens: int = EVAL_TOKENS
    train_script: Path = field(default_factory=paths.train_script)
    results_path: Path = field(default_factory=paths.results_path)
    runs_dir: Path = field(default_factory=paths.runs_dir)
    baseline: bool = False  # a row `harness baseline` makes; never train.py's claim
    sandbox: str = sandbox.SANDBOX_BWRAP  # or sandbox.SANDBOX_NONE (--no-sandbox)
    startup_seconds: float = STARTUP_LIMIT_SECONDS
    export_seconds: float = EXPORT_LIMIT_SECONDS
    echo: bool = True  # also stream train.py's output to this process's stdout
    nproc: int = 1  # > 1: train.py runs as that many torchrun ranks (one device each)


@dataclass
class RunOutcome:
    run_id: str
    run_dir: Path
    status: str
    reason: str
    row: dict


def time_limit(
    budget_seconds: float,
    startup: float = STARTUP_LIMIT_SECONDS,
    export: float = EXPORT_LIMIT_SECONDS,
) -> float:
    """The longest train.py may live: start-up, the budget and its largest slack, the export."""
    return startup + budget_seconds * (1 + SLACK_FRACTION) + SLACK_SECONDS + export


# --- the runner's clock ---


@dataclass
class Clock:
    """Step announcements as they reached the runner, timestamped on its own monotonic clock."""

    started: float = field(default_factory=time.monotonic)
    steps: list[float] = field(default_factory=list)
    tokens: int = 0
    ended: float | None = None

    def read(self, pipe) -> None:
        """Consume `step <tokens>` lines until the writer is gone; anything else is ignored (and
        read in short pieces: a line without end must not fill the runner's memory)."""
        inside_long_line = False
        for line in iter(lambda: pipe.readline(64), b""):
            whole = line.endswith(b"\n") and not inside_long_line
            inside_long_line = not line.endswith(b"\n")
            words = line.split() if whole else []
            if (
                len(words) == 2
                and words[0] == b"step"
                and words[1].isdigit()
                and len(self.steps) < 10_000_000
            ):
                self.steps.append(time.monotonic())
                self.tokens += min(int(words[1]), 1 << 40)

    @property
    def train_seconds(self) -> float:
        """From the end of the first (free) step to the end of the last."""
        return self.steps[-1] - self.steps[0] if len(self.steps) > 1 else 0.0

    def slack(self, budget: float) -> float:
        steps = [b - a for a, b in zip(self.steps, self.steps[1:])]
        median = statistics.median(steps) if steps else 0.0
        return min(SLACK_STEPS * median, SLACK_FRACTION * budget) + SLACK_SECONDS

    def deadline(self, spec: RunSpec) -> tuple[float, str]:
        """When the runner stops train.py, and why, given what it has announced so far."""
        if not self.steps:
            limit = spec.startup_seconds + spec.export_seconds
            return (
                self.started + limit,
                f"no training step announced and no exit within {limit:.0f} s of start",
            )
        trained = spec.budget_seconds + SLACK_FRACTION * spec.budget_seconds + SLACK_SECONDS
        last = max(self.steps[-1], self.steps[0] + trained)
        return (
            last + spec.export_seconds,
            f"still running {spec.export_seconds:.0f} s after its budget (hung or overran)",
        )

    def broken_limit(self, spec: RunSpec) -> str | None:
        """The rule a finished train.py broke, measured on this clock, or None."""
        end = self.ended or time.monotonic()
        if self.steps and self.steps[0] - self.started > spec.startup_seconds:
            return (f"start-up took {self.steps[0] - self.started:.0f} s before the first step "
                    f"(limit {spec.startup_seconds:.0f} s)")  # fmt: skip
        if self.train_seconds > spec.budget_seconds + self.slack(spec.budget_seconds):
            return (
                f"trained {self.train_seconds:.1f} s on the harness's clock: past the "
                f"{spec.budget_seconds:.0f} s "
                f"budget plus {self.slack(spec.budget_seconds):.1f} s of slack"
            )
        after = end - (self.steps[-1] if self.steps else self.started)
        limit = spec.export_seconds + (0 if self.steps else spec.startup_seconds)
        if after > limit:
            return f"ran {after:.0f} s after its last step (export limit {limit:.0f} s)"
        return None


# --- processes ---


def exit_reason(code: int, kind: str) -> str | None:
    """'killed by signal 9 (SIGKILL)' for a child a signal ended (bwrap reports 128 + N), else
    None."""
    number = (
        -code if code < 0 else code - 128 if kind == sandbox.SANDBOX_BWRAP and code > 128 else 0
    )
    try:
        return f"killed by signal {number} ({signal.Signals(number).name})" if number else None
    except ValueError:
        return f"killed by signal {number}"


def _pump(stream, sink, echo: bool) -> None:
    """Copy the child's output to the log (and our stdout) up to LOG_BYTES, then only drain it."""
    written = 0
    for chunk in iter(lambda: stream.read1(65536), b""):
        if written >= LOG_BYTES:
            continue
        chunk = chunk[: LOG_BYTES - written]
        written += len(chunk)
        if written >= LOG_BYTES:
            chunk += f"\n[output past {LOG_BYTES:,} bytes not kept]\n".encode()
        sink.write(chunk)
        sink.flush()
        if echo:
            sys.stdout.buffer.write(chunk)
            sys.stdout.buffer.flush()


def _stop(child: subprocess.Popen) -> None:
    """Kill the living child's whole process group now (a sandbox takes everything inside it
    along), and without a sandbox its descendants too: torchrun starts each rank in a session of
    its own."""
    stray = sandbox.descendants(child.pid)
    sandbox.signal_groups({child.pid}, signal.SIGKILL)
    for pid in stray:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def _tree_peak_kb(root: int, peak: int) -> int:
    """The largest VmHWM (peak resident set) among `root` and its descendants, or `peak` if
    larger."""
    for pid in [root, *sandbox.descendants(root)]:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak = max(peak, int(line.split()[1]))
        except (OSError, ValueError):
            continue
    return peak


def _supervise(
    child: subprocess.Popen, deadline, sink, echo: bool
) -> tuple[int | None, str, float]:
    """Wait for `child`, streaming its output to `sink`; kill it at `deadline()` -> (when, why).
    Returns (exit code or None if killed, why it was killed, peak resident memory in GB)."""
    reader = threading.Thread(target=_pump, args=(child.stdout, sink, echo), daemon=True)
    reader.start()
    peak_kb, next_sample = 0, 0.0
    try:
        while True:
            if time.monotonic() >= next_sample:
                peak_kb, next_sample = (
                    _tree_peak_kb(child.pid, peak_kb),
                    time.monotonic() + MEMORY_SAMPLE_SECONDS,
                )
            pid, status, usage = os.wait4(child.pid, os.WNOHANG)
            if pid:
                # stray members of the group (no sandbox) go with the leader
                sandbox.signal_groups({child.pid}, signal.SIGKILL)
                code, why = os.waitstatus_to_exitcode(status), ""
                break
            when, why = deadline()
            if time.monotonic() > when:
                _stop(child)
                _, _, usage = os.wait4(child.pid, 0)
                code = None
                break
            time.sleep(0.1)
    except BaseException:  # Ctrl-C or SIGTERM included: never leave a training process behind
        _stop(child)
        raise
    finally:
        child.returncode = -1  # reaped by wait4; keeps Popen from reaping it again
    reader.join(timeout=5)
    return code, why, max(peak_kb, usage.ru_maxrss) / 1024**2


def _train_view(run_dir: Path, caches: tuple[Path, ...], private: Path) -> sandbox.View:
    """train.py sees the model, the train split and a prepared.json without the eval split."""
    data_dir = paths.data_dir()
    record = json.loads((data_dir / PREPARED).read_text())
    record.pop("eval", None)
    trimmed = private / PREPARED
    trimmed.write_text(json.dumps(record))
    train = data_dir / record["train"]
    readable = (
        paths.ROOT / "harness",
        data_dir / record["model_dir"],
        train,
        train.with_suffix(".json"),
        data_dir / record["token_bytes"],
    )
    return sandbox.View(
        readable=readable, writable=(run_dir, *caches), files={data_dir / PREPARED: trimmed}
    )


def _eval_view(prepared, artifact: Path) -> sandbox.View:
    """The evaluator sees all the prepared data (the model may live outside it) and the artifact."""
    return sandbox.View(
        readable=(paths.ROOT / "harness", paths.data_dir(), prepared.model_dir, artifact)
    )


def _read_untrusted_json(path: Path) -> dict:
    """A JSON object train.py wrote, read without following links and within a size cap; else {}."""
    try:
        with os.fdopen(os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK), "rb") as handle:
            if not stat.S_ISREG(
                os.fstat(handle.fileno()).st_mode
            ):  # a FIFO or device would block or never end
                return {}
            value = json.loads(handle.read(TRAIN_JSON_BYTES))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _put_in_place(run_dir: Path, name: str, source: Path) -> None:
    """Replace whatever train.py left at run_dir/name (a file, a link, a folder) with `source`."""
    target = run_dir / name
    if target.is_dir() and not target.is_symlink():
        shutil.rmtree(target)
    os.replace(source, target)  # a link at target is replaced, never followed


def _private_dir(runs_dir: Path, run_id: str) -> Path:
    """The runner's own folder while train.py lives, named by the runner's pid and the run so
    that a later runner can tell one whose runner was killed outright."""
    return Path(tempfile.mkdtemp(prefix=f"{PRIVATE_PREFIX}{os.getpid()}-{run_id}-", dir=runs_dir))


def settle_orphans(runs_dir: Path) -> None:
    """What runners killed outright (SIGKILL) left: the copies of train.py and run.log they kept
    go into their run's folder, as they would have, and their private folder goes."""
    for private in runs_dir.glob(f"{PRIVATE_PREFIX}*"):
        pid, _, rest = private.name.removeprefix(PRIVATE_PREFIX).partition("-")
        if not pid.isdigit() or sandbox.alive(int(pid)):
            continue
        claimed = private.with_name(f"{private.name}.settling-{os.getpid()}")
        try:  # runners starting together: the one whose rename succeeds settles it
            private.rename(claimed)
        except OSError:
            continue
        private, run_dir = claimed, runs_dir / rest.rpartition("-")[0]
        if run_dir.is_dir() and not run_dir.is_symlink():
            for name in RUNNER_FILES:
                if (private / name).exists():
                    _put_in_place(run_dir, name, private / name)
        shutil.rmtree(private, ignore_errors=True)


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(2)


# --- one experiment ---


@dataclass
class _Run:
    """One experiment in flight: what training, scoring and recording it share."""

    spec: RunSpec
    run_id: str
    run_dir: Path
    private: Path  # the runner's own files until train.py and all it started are gone
    commit: str
    sandbox: str  # the kind resolved for this run
    prepared: Prepared
    log: BinaryIO  # private/run.log
    started: float = field(default_factory=time.time)
    clock: Clock = field(default_factory=Clock)


def run_experiment(spec: RunSpec) -> RunOutcome:
    kind = sandbox.resolve(spec.sandbox)
    prepared = load_prepared()
    run_id = new_run_id()
    run_dir = spec.runs_dir / run_id
    run_dir.mkdir(parents=True)
    settle_orphans(spec.runs_dir)
    private = _private_dir(spec.runs_dir, run_id)
    script = spec.train_script.resolve()
    source = script.read_bytes()
    (run_dir / "train.py").write_bytes(source)
    (private / "train.py").write_bytes(source)
    commit = commit_of(script)
    print(
        f"run {run_id}: python {script.name} {' '.join(spec.train_args)} (sandbox: {kind})",
        flush=True,
    )
    with open(private / "run.log", "ab") as log:
        run = _Run(spec, run_id, run_dir, private, commit, kind, prepared, log)
        train_info, verdict = {}, {}
        with interrupts.raising((signal.SIGTERM, signal.SIGHUP)):
            try:
                status, reason, peak_gb = _train(run)
                train_info = _read_untrusted_json(run_dir / "train.json")
                if status == "crash" and not reason:
                    reason = str(train_info.get("reason") or "") or last_line(
                        private / "run.log", "train.py failed"
                    )
                if status == "valid":
                    status, reason, verdict = _score(run)
            except KeyboardInterrupt as err:
                with interrupts.ignoring():  # a second Ctrl-C must not cost the row
                    _finish(
                        run,
                        status="crash",
                        reason=f"interrupted ({interrupts.interrupted(err).how})",
                        train_info=_read_untrusted_json(run_dir / "train.json"),
                        verdict={},
                        peak_gb=None,
                    )
                raise
        return _finish(run, status=status, reason=reason, train_info=train_info, verdict=verdict,
                       peak_gb=peak_gb)  # fmt: skip


def _popen_holding(
    fd: int, kind: str, argv: list[str], view: sandbox.View, env: dict[str, str], cwd: Path
) -> subprocess.Popen:
    """Start `argv` in the sandbox with `fd` (a pipe's write end) passed on and closed here: the
    child is its only holder, so the pipe ends when the child does. Output: the child's stdout."""
    try:
        return sandbox.popen(kind, argv, view, env, cwd, pass_fds=(fd,), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)  # fmt: skip
    finally:
        os.close(fd)


def compile_cache_env(compiled: Path) -> dict[str, str]:
    """torch.compile's on-disk caches in the harness's folder, which runs share: Inductor's FX
    graph cache and the AOTAutograd cache (on by name, whatever torch's defaults) key each graph by
    what it computes, so a run of an unchanged train.py skips the compile and an edited one
    compiles its changed graphs anew."""
    return {
        "TORCHINDUCTOR_CACHE_DIR": str(compiled / "inductor"),
        "TRITON_CACHE_DIR": str(compiled / "triton"),
        "TORCHINDUCTOR_FX_GRAPH_CACHE": "1",
        "TORCHINDUCTOR_AUTOGRAD_CACHE": "1",
    }


def _train(run: _Run) -> tuple[str, str, float | None]:
    """Run train.py to its end -> ("valid" | "crash" | "invalid", reason, peak GB)."""
    spec, run_dir, clock = run.spec, run.run_dir, run.clock
    cache, compiled = paths.cache_dir(), paths.compile_cache_dir()
    for folder in (cache, compiled):
        folder.mkdir(parents=True, exist_ok=True)
    read_end, write_end = os.pipe()
    env = sandbox.environment(
        {
            RUN_DIR_ENV: str(run_dir),
            "HARNESS_DATA_DIR": str(paths.data_dir()),
            "HARNESS_CACHE_DIR": str(cache),
            BUDGET_ENV: str(spec.budget_seconds),
            CLOCK_FD_ENV: str(write_end),
            **compile_cache_env(compiled),
        }
    )
    launcher = [sys.executable]
    if spec.nproc > 1:  # torchrun is this module; its ranks meet on the sandbox's own loopback
        launcher += [
            "-m",
            "torch.distributed.run",
            *TORCHRUN_LOCAL,
            f"--nproc-per-node={spec.nproc}",
        ]
        env["GLOO_SOCKET_IFNAME"] = "lo"
        # torchrun would give each rank one thread; on a CPU they share the cores (or --cpus')
        threads = int(env.get("OMP_NUM_THREADS") or len(os.sched_getaffinity(0)))
        env["OMP_NUM_THREADS"] = str(max(1, threads // spec.nproc))
    argv = [*launcher, str(run_dir / "train.py"), *spec.train_args]
    view = _train_view(run_dir, (cache, compiled), run.private)
    child = _popen_holding(write_end, run.sandbox, argv, view, env, run_dir)
    clock.started = time.monotonic()
    with os.fdopen(read_end, "rb") as pipe:
        listener = threading.Thread(target=clock.read, args=(pipe,), daemon=True)
        listener.start()
        code, why, peak_gb = _supervise(child, lambda: clock.deadline(spec), run.log, spec.echo)
        clock.ended = time.monotonic()
        listener.join(timeout=5)
    if code is None:
        return "invalid", f"killed after {clock.ended - clock.started:.0f} s: {why}", peak_gb
    if code != 0:
        return "crash", exit_reason(code, run.sandbox) or "", peak_gb
    broken = clock.broken_limit(spec)
    if broken:
        return "invalid", broken, peak_gb
    artifact = run_dir / "artifact"
    if artifact.is_symlink() or not artifact.is_dir():
        why = "is a link" if artifact.is_symlink() else "is missing"
        return (
            "crash",
            f"train.py exited without exporting an artifact (runs/<id>/artifact {why})",
            peak_gb,
        )
    return "valid", "", peak_gb


def _score(run: _Run) -> tuple[str, str, dict]:
    """Verify and score the artifact in a sandbox of its own -> (status, reason, verdict)."""
    spec, artifact = run.spec, run.run_dir / "artifact"
    data_dir = paths.data_dir()
    changed = integrity.changed_files(data_dir)
    if changed:
        return (
            "invalid",
            f"files that define the score changed during the run: {', '.join(changed[:3])}",
            {},
        )
    read_end, write_end = os.pipe()
    argv = [
        sys.executable,
        "-I",
        "-m",
        "harness.evaluate",
        str(artifact),
        "--verdict-fd",
        str(write_end),
        "--eval-tokens",
        str(spec.eval_tokens),
        "--data-dir",
        str(data_dir),
    ]
    view = _eval_view(run.prepared, artifact)
    child = _popen_holding(
        write_end, run.sandbox, argv, view, sandbox.environment({}), Path("/tmp")
    )
    with os.fdopen(read_end, "rb") as pipe:
        received = []
        listener = threading.Thread(
            target=lambda: received.append(pipe.read(VERDICT_BYTES)), daemon=True
        )
        listener.start()
        limit = time.monotonic() + EVAL_TIMEOUT_SECONDS
        code, _, _ = _supervise(child, lambda: (limit, "evaluation timed out"), run.log, spec.echo)
        listener.join(timeout=5)
    try:
        verdict = json.loads(received[0]) if received else {}
    except ValueError:
        verdict = {}
    if code != 0 or not isinstance(verdict, dict) or "status" not in verdict:
        reason = exit_reason(code, run.sandbox) if code is not None else "evaluation timed out"
        return "crash", "evaluation failed: " + (reason or f"exit code {code}"), {}
    if verdict["status"] == "invalid":
        return "invalid", str(verdict.get("reason", "")), verdict
    try:
        return "valid", "", {**verdict, **scored(verdict, spec.eval_tokens)}
    except DataError as err:
        return "crash", f"evaluation failed: {err}", {}


def scored(verdict: dict, eval_tokens: int) -> dict:
    """val_bpb and val_ppl recomputed from the verdict's sums, which must be plausible."""
    nll, targets, n_bytes = (
        verdict.get("nll_nats"),
        verdict.get("targets"),
        verdict.get("utf8_bytes"),
    )
    if not (isinstance(nll, float) and isinstance(targets, int) and isinstance(n_bytes, int)):
        raise DataError("the evaluator's verdict lacks its sums")
    if not (0 < targets <= eval_tokens and n_bytes > 0 and math.isfinite(nll) and nll >= 0):
        raise DataError(
            f"implausible evaluation sums: nll {nll}, {targets} targets, {n_bytes} bytes"
        )
    return {"val_bpb": nll / (math.log(2) * n_bytes), "val_ppl": math.exp(nll / targets)}


def _finish(run: _Run, *, status: str, reason: str, train_info: dict, verdict: dict,
            peak_gb: float | None) -> RunOutcome:  # fmt: skip
    """Decide the status, append the row, put the runner's files in place."""
    spec, prepared, clock = run.spec, run.prepared, run.clock
    model = prepared.model_name
    eval_set = eval_set_name(prepared.eval.name, spec.eval_tokens) if prepared.eval else ""
    decided_here = status == "valid" and not spec.baseline  # keep or discard, under the lock
    if status == "valid" and spec.baseline:
        status = "baseline"
    claimed = train_info.get("config") if isinstance(train_info.get("config"), dict) else {}
    config = {
        **claimed,
        "train_args": spec.train_args,
        "budget_seconds": spec.budget_seconds,
        "sandbox": run.sandbox,
        "nproc": spec.nproc,
        "cpus": len(os.sched_getaffinity(0)),  # a worker's share of the machine (--cpus)
    }
    if reason:
        config["reason"] = reason
    description = spec.description or str(train_info.get("description") or "")[:300]
    row = {
        "commit": run.commit,
        "run_id": run.run_id,
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "status": status,
        "val_bpb": verdict.get("val_bpb"),
        "val_ppl": verdict.get("val_ppl"),
        "bpw": verdict.get("bpw"),
        "size_mb": verdict.get("size_mb"),
        "steps": len(clock.steps),
        "train_tokens": clock.tokens,
        "train_seconds": clock.train_seconds,
        "peak_mem_gb": peak_gb,
        "eval_set": eval_set,
        "model": model,
        "description": description,
        "config": config,
    }
    try:
        results.append(row, spec.results_path, decided_here=decided_here)
    except results.ResultsError as err:
        print(f"warning: {err}", file=sys.stderr, flush=True)
        if row["status"] == "valid":  # neither file could be opened to decide under its lock
            row["status"] = results.decide(row["val_bpb"], row["bpw"], eval_set, model,
                                           results.read(spec.results_path))  # fmt: skip
    status = row["status"]
    summary = format_summary(row, reason, time.time() - run.started)
    print(summary, flush=True)
    run.log.write(summary.encode() + b"\n")
    run.log.flush()
    if verdict:
        atomic_write_json(run.private / "eval.json", verdict)
    for name in RUNNER_FILES:
        if (run.private / name).exists():
            _put_in_place(run.run_dir, name, run.private / name)
    shutil.rmtree(run.private, ignore_errors=True)
    return RunOutcome(run.run_id, run.run_dir, status, reason, row)


def format_summary(row: dict, reason: str, total_seconds: float) -> str:
    """The grep-able block every run ends with: `grep '^val_bpb:' run.log`."""

    def show(value, fmt: str) -> str:
        return "" if value is None else fmt.format(value)

    lines = [
        "---",
        f"val_bpb:          {show(row['val_bpb'], '{:.6f}')}",
        f"val_ppl:          {show(row['val_ppl'], '{:.4f}')}",
        f"bpw:              {show(row['bpw'], '{:.4f}')}",
        f"size_mb:          {show(row['size_mb'], '{:.2f}')}",
        f"training_seconds: {show(row['train_seconds'], '{:.1f}')}",
        f"total_seconds:    {total_seconds:.1f}",
        f"peak_mem_mb:      {show(row['peak_mem_gb'] and row['peak_mem_gb'] * 1024, '{:.0f}')}",
        f"num_steps:        {show(row['steps'], '{}')}",
        f"status:           {row['status']}",
        f"run_id:           {row['run_id']}",
    ]
    if reason:
        lines.append(f"reason:           {reason}")
    return "\n".join(lines)


# --- around a run ---


def commit_of(script: Path) -> str:
    """Short commit of the repo holding train.py, marked -dirty if train.py differs from it."""
    try:
        head = git(["rev-parse", "--short=7", "HEAD"], script.parent)
        changed = git(["status", "--porcelain", "--", script.name], script.parent)
    except GitError:
        return ""
    return f"{head}-dirty" if changed else head


def check_ready(
    eval_tokens: int = EVAL_TOKENS, sandbox_kind: str = sandbox.SANDBOX_BWRAP
) -> str | None:
    """Why no experiment can start (data not prepared or changed, no sandbox), or None. Checked
    before a run so that a missing step is one clear line, not a crash row per attempt."""
    try:
        prepared = load_prepared(full_check=True)
        integrity.check(paths.data_dir())
        sandbox.resolve(sandbox_kind)
    except (DataError, sandbox.SandboxUnavailable) as err:
        return str(err)
    if prepared.eval.n_tokens < eval_tokens + 1:
        return (
            f"the eval split has {prepared.eval.n_tokens} tokens; scoring {eval_tokens} needs "
            f"{eval_tokens + 1}: prepare a longer one or pass a smaller --eval-tokens"
        )
    return None


def main_for_train_script(train_args: list[str]) -> int:
    """`python train.py ARGS` by hand: the same as `python -m harness run -- ARGS`."""
    if TORCHRUN_ENV in os.environ:
        print("error: torchrun by hand would start a run per rank; use "
              "`python -m harness run --nproc K -- ARGS`", file=sys.stderr)  # fmt: skip
        return 2
    kind = (
        sandbox.SANDBOX_NONE
        if os.environ.get("HARNESS_SANDBOX") == sandbox.SANDBOX_NONE
        else sandbox.SANDBOX_BWRAP
    )
    problem = check_ready(sandbox_kind=kind)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    budget = float(os.environ.get(BUDGET_ENV, TIME_BUDGET_SECONDS))
    outcome = run_experiment(RunSpec(train_args=train_args, budget_seconds=budget, sandbox=kind))
    return 0 if outcome.status not in ("crash", "invalid") else 1
