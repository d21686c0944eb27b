"""The command line imports only what the chosen command needs."""

import json
import os
import subprocess
import sys

from conftest import ROOT

HEAVY = ("matplotlib", "optuna", "openai", "libtmux")


def imported_by(argv: list[str], tmp_path) -> tuple[int, list[str], str]:
    """(exit code, the HEAVY modules loaded, stderr) of `python -m harness ARGV`, in a fresh
    interpreter pointed at an empty data folder."""
    probe = (
        "import json, sys\nfrom harness.__main__ import main\ncode = main(sys.argv[1:])\n"
        f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))\nsys.exit(code)"
    )
    env = {**os.environ, "HARNESS_DATA_DIR": str(tmp_path / "data"),
           "HARNESS_RUNS_DIR": str(tmp_path / "runs"),
           "HARNESS_RESULTS": str(tmp_path / "results.tsv")}  # fmt: skip
    done = subprocess.run([sys.executable, "-c", probe, *argv], cwd=ROOT, env=env,
                          capture_output=True, text=True)  # fmt: skip
    return done.returncode, json.loads(done.stdout.splitlines()[-1]), done.stderr


def test_harness_run_loads_no_viewer_or_agent_library(tmp_path):
    code, heavy, err = imported_by(["run", "--", "--steps", "1"], tmp_path)
    assert code == 2 and "prepare.py" in err  # it got as far as checking the data
    assert heavy == []


def test_a_viewer_loads_only_its_own_libraries(tmp_path):
    code, heavy, _ = imported_by(["status"], tmp_path)
    assert code == 0 and heavy == []
    code, heavy, _ = imported_by(["plot"], tmp_path)
    assert heavy == ["matplotlib"]
