"""Where untrusted code runs: a bubblewrap sandbox that sees only what one run needs.

train.py (and the evaluator that parses its artifact) start under `bwrap` with a read-only view
of the system, the Python installation and harness/, the few data files the runner names, and
write access to the folders it names (the run's own folder, the shared caches); no network, a PID
namespace of their own that dies with the runner, a new session (no terminal to inject keys into)
and an environment built from an allowlist (no keys or tokens; HOME is scratch). Everything else,
results.tsv, the eval split, other runs, the user's home, is simply not there.

`--no-sandbox` (SANDBOX_NONE) runs the same command directly with the same environment: for
machines without bubblewrap, and recorded in every row it produces.
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

SANDBOX_BWRAP, SANDBOX_NONE = "bwrap", "none"
SCRATCH_HOME = "/tmp/home"
# /etc is not bound whole: only what the dynamic loader, the compiler's alternatives and getpwuid
# read
ETC_ENTRIES = (
    "ld.so.cache",
    "ld.so.conf",
    "ld.so.conf.d",
    "alternatives",
    "passwd",
    "group",
    "nsswitch.conf",
    "localtime",
    "os-release",
    "ssl",
)
SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
# passed through from the caller's environment when set: locale, threads, device selection, compiler
# knobs
PASSED_ENV = re.compile(
    r"^(LANG|LANGUAGE|LC_[A-Z]+|TZ|TERM|OMP_NUM_THREADS|MKL_NUM_THREADS|CUDA_VISIBLE_DEVICES"
    r"|(TORCH|TORCHINDUCTOR|PYTORCH)_[A-Z0-9_]+)$"
)
SECRET_ENV = re.compile(r"KEY|TOKEN|SECRET|PASSW|CREDENTIAL|AUTH", re.IGNORECASE)
FIXED_ENV = {
    "HOME": SCRATCH_HOME,
    "TMPDIR": "/tmp",
    "PYTHONUNBUFFERED": "1",
    "PYTHONNOUSERSITE": "1",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
}


class SandboxUnavailable(Exception):
    """bubblewrap cannot run here; the message says what to install or pass instead."""


@dataclass(frozen=True)
class View:
    """What a sandboxed process sees besides the system and Python: `readable` paths bound
    read-only, `writable` ones read-write, and `files` (destination -> source) bound read-only
    at a path other than their own (e.g. a train-only copy of prepared.json)."""

    readable: tuple[Path, ...] = ()
    writable: tuple[Path, ...] = ()
    files: dict[Path, Path] = field(default_factory=dict)


def environment(extra: dict[str, str]) -> dict[str, str]:
    """The child's whole environment: the allowlist from ours, fixed values, then `extra`."""
    passed = {
        k: v for k, v in os.environ.items() if PASSED_ENV.match(k) and not SECRET_ENV.search(k)
    }
    path = os.pathsep.join([str(Path(sys.executable).parent), "/usr/local/bin", "/usr/bin", "/bin"])
    return {**passed, **FIXED_ENV, "PATH": path, **extra}


def python_dirs() -> list[Path]:
    """The interpreter, its standard library and site-packages (a venv and its base, links
    resolved)."""
    found = {Path(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)}
    found |= {p.resolve() for p in found} | {Path(sys.executable).resolve().parent}
    return sorted(found)


def gpu_paths() -> list[Path]:
    """NVIDIA device nodes (bound when present: a run may use the GPU) and the /sys the driver
    reads."""
    nodes = sorted(Path("/dev").glob("nvidia*"))
    return [*nodes, Path("/sys")] if nodes else []


@cache
def bwrap_problem() -> str | None:
    """Why bubblewrap cannot run here (not installed, no namespaces), or None."""
    if shutil.which("bwrap") is None:
        return "bubblewrap is not installed (Debian/Ubuntu: apt-get install bubblewrap)"
    try:
        done = subprocess.run(
            ["bwrap", "--ro-bind", "/", "/", "--unshare-pid", "--unshare-net", "--", "true"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"bubblewrap does not start: {err}"
    if done.returncode != 0:
        return f"bubblewrap cannot create namespaces here: {done.stderr.strip()[:200]}"
    return None


def resolve(kind: str) -> str:
    """The sandbox a run gets: bwrap unless SANDBOX_NONE was asked for; SandboxUnavailable if
    bwrap was asked for and cannot run."""
    if kind == SANDBOX_NONE:
        return SANDBOX_NONE
    problem = bwrap_problem()
    if problem:
        raise SandboxUnavailable(
            f"{problem}; to run train.py without a sandbox anyway, pass --no-sandbox"
        )
    return SANDBOX_BWRAP


def bwrap_command(argv: list[str], view: View, env: dict[str, str], cwd: Path) -> list[str]:
    command = [
        "bwrap",
        "--die-with-parent",
        "--new-session",
        "--unshare-pid",
        "--unshare-net",
        "--unshare-ipc",
        "--unshare-uts",
        "--unshare-cgroup-try",
        "--cap-drop",
        "ALL",
        "--clearenv",
        "--dev",
        "/dev",
        "--proc",
        "/proc",
        "--tmpfs",
        "/tmp",
        "--dir",
        SCRATCH_HOME,
    ]
    for path in SYSTEM_DIRS:
        if os.path.lexists(path):  # /lib is a link to /usr/lib on merged-/usr systems
            command += (
                ["--symlink", os.readlink(path), path]
                if os.path.islink(path)
                else ["--ro-bind", path, path]
            )
    for entry in ETC_ENTRIES:
        if os.path.exists(f"/etc/{entry}"):
            command += ["--ro-bind", f"/etc/{entry}", f"/etc/{entry}"]
    for path in python_dirs():
        command += ["--ro-bind", str(path), str(path)]
    for path in gpu_paths():
        command += [
            "--dev-bind" if path.parent == Path("/dev") else "--ro-bind",
            str(path),
            str(path),
        ]
    for path in view.readable:
        command += ["--ro-bind", str(path), str(path)]
    for path in view.writable:
        command += ["--bind", str(path), str(path)]
    for dest, src in view.files.items():
        command += ["--ro-bind", str(src), str(dest)]
    for key, value in env.items():
        command += ["--setenv", key, value]
    return [*command, "--chdir", str(cwd), "--", *argv]


def alive(pid: int) -> bool:
    """Whether process `pid` exists (someone else's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def descendants(pid: int) -> list[int]:
    """The processes below `pid`, from /proc: a sandbox's are not its caller's children (wait4
    cannot see them), and torchrun's ranks are in sessions of their own."""
    children: dict[int, list[int]] = {}
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        try:  # the command name, in parentheses, may hold spaces
            parent = int(stat_file.read_text().rpartition(")")[2].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(parent, []).append(int(stat_file.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def signal_groups(pgids: set[int], sig: int) -> None:
    """Send `sig` to each process group that still exists (popen gives each child its own)."""
    for pgid in pgids:
        try:
            os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """preexec_fn: the child gets `sig` when its parent dies (without a sandbox: the runner)."""
    pr_set_pdeathsig = 1
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, sig)
    except (OSError, AttributeError):  # not Linux/glibc: nothing to arrange
        pass


def popen(
    kind: str, argv: list[str], view: View, env: dict[str, str], cwd: Path, pass_fds=(), **kwargs
) -> subprocess.Popen:
    """Start `argv` in the sandbox `kind` (from `resolve`), in a process group of its own."""
    if kind == SANDBOX_BWRAP:
        return subprocess.Popen(bwrap_command(argv, view, env, cwd), env={}, pass_fds=pass_fds,
                                start_new_session=True, **kwargs)  # fmt: skip
    Path(env.get("HOME", SCRATCH_HOME)).mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(argv, cwd=cwd, env=env, pass_fds=pass_fds, start_new_session=True,
                            preexec_fn=die_with_parent, **kwargs)  # fmt: skip
