"""Where things live. Each location can be moved with an environment variable (tests do)."""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _env_path(name: str, default: Path) -> Path:
    value = os.environ.get(name)
    return Path(value).resolve() if value else default


def data_dir() -> Path:
    """Prepared models, raw text and token files (written by prepare.py)."""
    return _env_path("HARNESS_DATA_DIR", ROOT / "data")


def runs_dir() -> Path:
    """One folder per experiment: run.log, train.json, artifact/, eval.json."""
    return _env_path("HARNESS_RUNS_DIR", ROOT / "runs")


def results_path() -> Path:
    """The experiment ledger, one row per run."""
    return _env_path("HARNESS_RESULTS", ROOT / "results.tsv")


def train_script() -> Path:
    return _env_path("HARNESS_TRAIN_SCRIPT", ROOT / "train.py")


def cache_dir() -> Path:
    """What runs share and may write (compiled kernels, teacher caches, checkpoints): never read
    when scoring, so a run can slow a later one down through it but not change its row."""
    return _env_path("HARNESS_CACHE_DIR", runs_dir() / "cache")


def compile_cache_dir() -> Path:
    """torch.compile's kernels (Inductor, Triton), shared by runs: a warm cache saves each run its
    compile warm-up."""
    return _env_path("HARNESS_COMPILE_CACHE", cache_dir() / "compile")
