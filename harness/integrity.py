"""The files that define the score, and a check that nothing changed them.

prepare.py writes `<data dir>/manifest.json`: the sha256 of every harness/*.py, prepare.py, the
prepared model's files, the token files, token_bytes.npy and prepared.json. The runner checks it
before each run (a mismatch refuses the run, and so stops the agent loop, naming the files) and
again before scoring, so that a train.py which got past the sandbox cannot have edited the
evaluator or the data it reads. A file whose size, inode and change time are as recorded is not
hashed again: user space cannot set a change time back.
"""

from __future__ import annotations

import json
from pathlib import Path

from harness import paths
from harness.data import PREPARED, DataError, atomic_write_json, sha256_file

MANIFEST = "manifest.json"


def trusted_files(data_dir: Path) -> list[Path]:
    """Everything the score depends on, as the prepared record names it."""
    record = json.loads((data_dir / PREPARED).read_text())
    model_dir = data_dir / record["model_dir"]
    data = [data_dir / PREPARED, data_dir / record["token_bytes"]]
    for split in ("train", "eval"):
        data += [data_dir / record[split], (data_dir / record[split]).with_suffix(".json")]
    code = sorted((paths.ROOT / "harness").glob("*.py")) + [paths.ROOT / "prepare.py"]
    return [*code, *data, *sorted(p for p in model_dir.iterdir() if p.is_file())]


def _signature(path: Path) -> list[int]:
    info = path.stat()
    return [info.st_size, info.st_ino, info.st_ctime_ns]


def write_manifest(data_dir: Path) -> None:
    entries = {
        str(p): {"sha256": sha256_file(p), "stat": _signature(p)} for p in trusted_files(data_dir)
    }
    atomic_write_json(data_dir / MANIFEST, {"files": entries})


def changed_files(data_dir: Path) -> list[str]:
    """Trusted files that differ from the manifest (or are missing from it); DataError without
    one."""
    try:
        recorded = json.loads((data_dir / MANIFEST).read_text())["files"]
        current = trusted_files(data_dir)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DataError(
            f"no usable {data_dir / MANIFEST} ({type(err).__name__}): run `python prepare.py`"
        ) from None
    changed = []
    for path in current:
        entry = recorded.get(str(path))
        try:
            same = entry is not None and (
                entry["stat"] == _signature(path) or entry["sha256"] == sha256_file(path)
            )
        except OSError:
            same = False
        if not same:
            changed.append(str(path))
    changed += sorted(set(recorded) - {str(p) for p in current})
    return changed


def check(data_dir: Path) -> None:
    """DataError naming the changed files, with what to do about them."""
    changed = changed_files(data_dir)
    if changed:
        shown = ", ".join(changed[:3]) + (
            f" and {len(changed) - 3} more" if len(changed) > 3 else ""
        )
        raise DataError(
            f"files that define the score changed since prepare.py recorded them: {shown}. If you "
            "changed them yourself, run `python prepare.py` again to record them; if not, a run "
            "tampered with them: restore them (git checkout, prepare.py) before any more runs"
        )
