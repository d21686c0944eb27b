"""Shared by the agent tests: a user's git repo holding train.py, and a scripted OpenAI-compatible
chat-completions server on 127.0.0.1 (a real HTTP server the real openai client talks to)."""

from __future__ import annotations

import json
import secrets
import shutil
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from conftest import ROOT, TINY_RUN_FLAGS

TINY_FLAGS = [*TINY_RUN_FLAGS, "--steps", "2"]
TRAIN_PY = (ROOT / "train.py").read_text()
API_KEY = "sk-qat-test-" + secrets.token_hex(
    8
)  # distinctive: searched for in every file afterwards


def git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=repo, check=True, capture_output=True, text=True
    ).stdout.strip()


def make_user_repo(path: Path, search_space: dict | None = None) -> Path:
    """A checkout like the user's: train.py, program.md and a search space, committed on main."""
    path.mkdir()
    shutil.copy(ROOT / "train.py", path / "train.py")
    shutil.copy(ROOT / "program.md", path / "program.md")
    space = search_space or {"--lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
                             "--warmup-steps": {"type": "int", "low": 0, "high": 4}}  # fmt: skip
    (path / "search_space.json").write_text(json.dumps(space))
    git(path, "init", "-q", "-b", "main")
    git(path, "add", ".")
    git(
        path,
        "-c",
        "user.name=user",
        "-c",
        "user.email=user@localhost",
        "commit",
        "-q",
        "-m",
        "start",
    )
    return path


def completion(content: str | None) -> dict:
    return {
        "id": "chatcmpl-test",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": "scripted",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }


class ScriptedServer:
    """Answers POST /v1/chat/completions with the next scripted action:
    ("reply", text) | ("status", code) | ("slow", seconds, text); past the script, 500s. Each
    request is recorded with its receive time under "received" (time.time(), comparable with an
    HTTP date)."""

    def __init__(self, script: list):
        self.script = list(script)
        self.requests: list[dict] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                received = time.time()
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                owner.requests.append(
                    {
                        "path": self.path,
                        "body": body,
                        "received": received,
                        "authorization": self.headers.get("Authorization"),
                    }
                )
                code, headers, data = owner.answer(owner.script.pop(0) if owner.script else None)
                try:
                    self.send_response(code)
                    for name, value in headers.items():
                        self.send_header(name, value)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up waiting (the slow case)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def answer(self, action: tuple | None) -> tuple[int, dict, bytes]:
        """(status, headers, body) for one scripted action."""
        action = action or ("status", 500)
        if action[0] == "slow":
            time.sleep(action[1])
            action = ("reply", action[2])
        if action[0] == "status":
            payload, code = (
                {"error": {"message": "scripted failure", "type": "server_error"}},
                action[1],
            )
        else:
            payload, code = completion(action[1]), 200
        return code, {"Content-Type": "application/json"}, json.dumps(payload).encode()

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def block(search: str, replace: str, path: str = "train.py", description: str = "a change") -> str:
    return (
        f"DESCRIPTION: {description}\n{path}\n"
        f"<<<<<<< SEARCH\n{search}\n=======\n{replace}\n>>>>>>> REPLACE\n"
    )


def files_containing(root: Path, needle: str) -> list[Path]:
    found = []
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink() and needle.encode() in path.read_bytes():
            found.append(path)
    return found


def assert_clean(repo, tag, kept_commits):
    """The user's checkout untouched; the agent's branch holds exactly the kept commits, clean."""
    assert git(repo, "status", "--porcelain") == "" and (repo / "train.py").read_text() == TRAIN_PY
    assert git(repo, "rev-parse", "--abbrev-ref", "HEAD") == "main"
    worktree = repo.parent / "runs" / f"agent-{tag}" / "worktree"
    assert git(worktree, "status", "--porcelain", "--untracked-files=all") == ""
    assert git(worktree, "rev-parse", "HEAD") == git(repo, "rev-parse", f"autoresearch/{tag}")
    assert int(git(repo, "rev-list", "--count", f"main..autoresearch/{tag}")) == kept_commits


def agent_events(runs: Path, tag: str) -> list[dict]:
    return [
        json.loads(line)
        for line in (runs / f"agent-{tag}" / "agent.jsonl").read_text().splitlines()
    ]


def raw_reply(content: str | None) -> tuple[int, dict, bytes]:
    """A RawServer action: a well-formed completion."""
    return 200, {"Content-Type": "application/json"}, json.dumps(completion(content)).encode()


class RawServer(ScriptedServer):
    """Answers each POST with the next scripted (status, headers, body bytes), exactly as given:
    bodies that are not UTF-8 or not JSON, Retry-After headers. Past the script, 500s."""

    def answer(self, action: tuple[int, dict, bytes] | None) -> tuple[int, dict, bytes]:
        return action or (500, {}, b"scripted failure")


def tmux_environments(socket: str) -> dict[str, bytes]:
    """pid -> initial environment (/proc/<pid>/environ) of the tmux server on `socket` and of
    every pane's process there."""

    def shown(*args):
        return subprocess.run(
            ["tmux", "-L", socket, *args], capture_output=True, text=True
        ).stdout.split()

    pids = [
        *shown("list-panes", "-a", "-F", "#{pane_pid}"),
        *shown("display-message", "-p", "#{pid}"),
    ]
    return {pid: Path(f"/proc/{pid}/environ").read_bytes() for pid in pids}


def screen_showing(socket: str, target: str, needle: str, seconds: float = 120) -> str:
    """What tmux pane `target` shows, its scrollback included, once it shows `needle` (or once
    `seconds` have passed)."""
    deadline = time.monotonic() + seconds
    while True:
        screen = subprocess.run(
            ["tmux", "-L", socket, "capture-pane", "-p", "-J", "-S", "-", "-t", target],
            capture_output=True,
            text=True,
        ).stdout
        if needle in screen or time.monotonic() > deadline:
            return screen
        time.sleep(0.2)
