"""Token files on disk and the record of what prepare.py chose.

prepare.py writes each tokenized split as `<name>.bin` (a flat uint16/uint32 array, memory-mapped
when read) beside `<name>.json`, its manifest entry: source, split, sha256 of the text and of the
token file, token and UTF-8 byte counts, tokenizer id. `data/prepared.json` names the model, the
train/eval files in use, the token byte lengths (with their sha256) and the eval token budget. A
file that does not match its manifest is never used. A copy of prepared.json without "eval" is what
untrusted code gets: it then cannot find the eval tokens through it.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

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
    """Return the TokenFile if it matches its manifest (and `expect`'s fields), else raise
    DataError.

    `full` hashes the file; without it only the size is checked (enough to catch truncation).
    """
    manifest = path.with_suffix(".json")
    if not path.exists() or not manifest.exists():
        raise DataError(f"{path.name}: missing")
    try:
        meta = json.loads(manifest.read_text())
        size = int(meta["tokens"]) * np.dtype(meta["dtype"]).itemsize
        digest = str(meta["sha256"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DataError(
            f"{manifest.name}: unreadable manifest ({type(err).__name__}: {err})"
        ) from None
    for key, value in (expect or {}).items():
        if meta.get(key) != value:
            raise DataError(f"{path.name}: {key} is {meta.get(key)!r}, wanted {value!r}")
    if path.stat().st_size != size:
        raise DataError(
            f"{path.name}: {path.stat().st_size} bytes, its manifest says {size} (truncated?)"
        )
    if full and sha256_file(path) != digest:
        raise DataError(f"{path.name}: contents differ from its manifest's sha256 (corrupt)")
    return TokenFile(path, meta)


# --- what prepare.py chose ---


@dataclass(frozen=True)
class Prepared:
    model_name: str  # e.g. "smollm2-135m"
    model_dir: Path  # a plain HF folder
    train: TokenFile
    eval: TokenFile | None  # None in the copy given to train.py, which must not see the eval text
    token_bytes: np.ndarray  # UTF-8 bytes of each token id (0 for special tokens)
    eval_tokens: int  # the eval budget prepare.py checked the eval split against


RECORD_FIELDS = {
    "model_name": str,
    "model_dir": str,
    "train": str,
    "token_bytes": str,
    "token_bytes_sha256": str,
    "eval_tokens": int,
}


def _read_record(path: Path) -> dict:
    """prepared.json as a dict of the expected keys and types; anything else: one DataError line."""

    def broken(why: str) -> DataError:
        return DataError(f"{path} is broken ({why}): run `python prepare.py` again")

    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise broken(str(err)) from None
    try:
        info = json.loads(text)
    except ValueError as err:
        raise broken(f"not JSON: {err}") from None
    if not isinstance(info, dict):
        raise broken(f"a JSON {type(info).__name__}, not an object")
    for key, kind in RECORD_FIELDS.items():
        if key not in info:
            raise broken(f"no {key!r}")
        if not isinstance(info[key], kind) or isinstance(info[key], bool):
            raise broken(f"{key!r} is {info[key]!r}, not a {kind.__name__}")
    if "eval" in info and not isinstance(info["eval"], str):
        raise broken(f"'eval' is {info['eval']!r}, not a str")
    return info


def load_prepared(
    data_dir: Path | None = None, full_check: bool = False, need_eval: bool = True
) -> Prepared:
    """What prepare.py chose, checked against the manifests; `full_check` hashes every file (the
    token files and token_bytes.npy, which scales every bits-per-byte figure)."""
    data_dir = data_dir or paths.data_dir()
    record = data_dir / PREPARED
    if not record.exists():
        raise DataError(f"no {record}: run `python prepare.py` first")
    info = _read_record(record)
    if need_eval and "eval" not in info:
        raise DataError(
            f"{record} names no eval split (a copy made for train.py?): run `python prepare.py` "
            "again"
        )
    try:
        train = check_token_file(data_dir / info["train"], full=full_check)
        evaluation = (
            check_token_file(data_dir / info["eval"], full=full_check) if "eval" in info else None
        )
        token_bytes_path = data_dir / info["token_bytes"]
        if full_check and sha256_file(token_bytes_path) != info["token_bytes_sha256"]:
            raise DataError(
                f"{token_bytes_path.name}: contents differ from prepared.json's sha256 (corrupt)"
            )
        token_bytes = np.load(token_bytes_path)
    except (DataError, OSError, ValueError, KeyError, TypeError) as err:
        raise DataError(f"prepared data is broken ({err}): run `python prepare.py` again") from None
    return Prepared(
        info["model_name"],
        data_dir / info["model_dir"],
        train,
        evaluation,
        token_bytes,
        info["eval_tokens"],
    )
