"""What the sandbox costs a run: the same command started with and without bubblewrap.

    python bench/sandbox.py [--rounds 10]      # bench/out/sandbox.json

Each round starts `python -c "import torch, transformers"` (what every train.py and evaluator
does first) once plainly and once through harness.sandbox with a run's view, in alternating
order; the cost is the median of the paired differences.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness import paths, sandbox  # noqa: E402

COMMAND = [sys.executable, "-c", "import torch, transformers"]


def timed(kind: str, view: sandbox.View, cwd: Path) -> float:
    started = time.perf_counter()
    child = sandbox.popen(kind, COMMAND, view, sandbox.environment({}), cwd)
    if child.wait() != 0:
        raise SystemExit(f"{kind}: the command failed")
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "out" / "sandbox.json")
    args = parser.parse_args()
    sandbox.resolve(sandbox.SANDBOX_BWRAP)
    with tempfile.TemporaryDirectory() as scratch:
        run_dir = Path(scratch)
        view = sandbox.View(readable=(paths.ROOT / "harness",), writable=(run_dir,))
        timed(sandbox.SANDBOX_BWRAP, view, run_dir)  # warm the page cache for both
        plain, boxed = [], []
        for round_ in range(args.rounds):
            order = [sandbox.SANDBOX_NONE, sandbox.SANDBOX_BWRAP][:: 1 if round_ % 2 else -1]
            for kind in order:
                (plain if kind == sandbox.SANDBOX_NONE else boxed).append(
                    timed(kind, view, run_dir)
                )
    report = {
        "command": " ".join(COMMAND[1:]),
        "rounds": args.rounds,
        "plain_s_median": statistics.median(plain),
        "sandboxed_s_median": statistics.median(boxed),
        "cost_s_median": statistics.median(b - p for p, b in zip(plain, boxed)),
        "bwrap_arguments": len(
            sandbox.bwrap_command(COMMAND, view, sandbox.environment({}), run_dir)
        ),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
