"""Token files on disk and the batches train.py draws from them.

prepare.py writes each tokenized split as `<name>.bin` (a flat uint16/uint32 array, memory-mapped
when read) beside `<name>.json`, its manifest entry: source, split, sha256 of the text and of the
token file, token and UTF-8 byte counts, tokenizer id. `data/prepared.json` names the model and the
train/eval files in use. A file that does not match its manifest is never used.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from harness import paths

PREPARED = "prepared.json"


class DataError(Exception):
    """Prepared data is missing, stale or corrupt; the message says what to run."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def atomic_write_bytes(path: Path, payload: bytes) -> None:
    """Write to a temp file beside `path`, then rename: readers see the old file or the new one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as handle:
        handle.write(payload)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: Path, value: dict) -> None:
    atomic_write_bytes(path, (json.dumps(value, indent=1) + "\n").encode())


# --- token files ---


@dataclass(frozen=True)
class TokenFile:
    path: Path  # the .bin file
    meta: dict  # its manifest entry

    @property
    def name(self) -> str:  # e.g. "sotu:eval"
        return f"{self.meta['source']}:{self.meta['split']}"

    @property
    def n_tokens(self) -> int:
        return int(self.meta["tokens"])

    def tokens(self) -> np.ndarray:
        return np.memmap(self.path, dtype=self.meta["dtype"], mode="r")


def token_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def write_token_file(path: Path, ids: np.ndarray, meta: dict) -> TokenFile:
    """Write tokens then their manifest entry, each atomically; the manifest goes last so an
    interrupted write leaves no entry that vouches for a partial file."""
    payload = np.ascontiguousarray(ids, dtype=meta["dtype"]).tobytes()
    atomic_write_bytes(path, payload)
    meta = {**meta, "tokens": int(len(ids)), "sha256": hashlib.sha256(payload).hexdigest()}
    atomic_write_json(path.with_suffix(".json"), meta)
    return TokenFile(path, meta)


def check_token_file(path: Path, expect: dict | None = None, full: bool = True) -> TokenFile:
    """Return the TokenFile if it matches its manifest (and `expect`'s fields), else raise DataError.

    `full` hashes the file; without it only the size is checked (enough to catch truncation).
    """
    manifest = path.with_suffix(".json")
    if not path.exists() or not manifest.exists():
        raise DataError(f"{path.name}: missing")
    meta = json.loads(manifest.read_text())
    for key, value in (expect or {}).items():
        if meta.get(key) != value:
            raise DataError(f"{path.name}: {key} is {meta.get(key)!r}, wanted {value!r}")
    size = meta["tokens"] * np.dtype(meta["dtype"]).itemsize
    if path.stat().st_size != size:
        raise DataError(f"{path.name}: {path.stat().st_size} bytes, its manifest says {size} (truncated?)")
    if full and sha256_file(path) != meta["sha256"]:
        raise DataError(f"{path.name}: contents differ from its manifest's sha256 (corrupt)")
    return TokenFile(path, meta)


# --- what prepare.py chose ---


@dataclass(frozen=True)
class Prepared:
    model_name: str  # e.g. "smollm2-135m"
    model_dir: Path  # a plain HF folder
    train: TokenFile
    eval: TokenFile
    token_bytes: np.ndarray  # UTF-8 bytes of each token id (0 for special tokens)


def load_prepared(data_dir: Path | None = None, full_check: bool = False) -> Prepared:
    data_dir = data_dir or paths.data_dir()
    record = data_dir / PREPARED
    if not record.exists():
        raise DataError(f"no {record}: run `python prepare.py` first")
    info = json.loads(record.read_text())
    try:
        train = check_token_file(data_dir / info["train"], full=full_check)
        evaluation = check_token_file(data_dir / info["eval"], full=full_check)
        token_bytes = np.load(data_dir / info["token_bytes"])
    except (DataError, OSError, ValueError) as err:
        raise DataError(f"prepared data is broken ({err}): run `python prepare.py` again") from None
    return Prepared(info["model_name"], data_dir / info["model_dir"], train, evaluation, token_bytes)


# --- batches ---


def batches(tokens: np.ndarray, batch_size: int, seq_len: int, seed: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless (x, y) int64 batches of random windows; y is x shifted by one. Same seed, same batches."""
    if len(tokens) <= seq_len + 1:
        raise DataError(f"{len(tokens)} tokens cannot fill one window of {seq_len + 1}")
    rng = np.random.default_rng(seed)
    offsets = np.arange(seq_len + 1)
    while True:
        starts = rng.integers(0, len(tokens) - seq_len - 1, size=batch_size)
        window = torch.from_numpy(tokens[starts[:, None] + offsets].astype(np.int64))
        yield window[:, :-1], window[:, 1:]
