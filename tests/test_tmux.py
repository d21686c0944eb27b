"""Jobs in a real tmux server (own socket): exit codes, overruns, vanished panes and servers."""

import os
import secrets
import subprocess
import time

import pytest

import harness.tmux
from harness.tmux import RESULTS_WINDOW, Tmux


@pytest.fixture
def tmux(tmp_path):
    box = Tmux("sleep 600", cwd=tmp_path, session_name="t", socket_name="qat-test-" + secrets.token_hex(4))
    yield box
    box.server.kill()


def leads_own_group(pid):
    return os.getpgid(pid) == pid


def alive(pid, settle=5.0):
    """Whether pid still runs, allowing a SIGKILL `settle` seconds to be delivered."""
    ends = time.monotonic() + settle
    while _running(pid) and time.monotonic() < ends:
        time.sleep(0.1)
    return _running(pid)


def _running(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_a_job_runs_in_its_own_window_and_reports_its_exit_code(tmux, tmp_path):
    job = tmux.start("exp1", "until [ -e go ]; do sleep 0.1; done\necho hello > out.txt\nexit 7", tmp_path / "job")
    names = [w.window_name for w in tmux.session().windows]
    assert names[0] == RESULTS_WINDOW and "exp1" in names
    (tmp_path / "job" / "go").touch()
    end = job.wait(timeout=30)
    assert (end.how, end.exit_code) == ("exited", 7)
    assert (tmp_path / "job" / "out.txt").read_text() == "hello\n"  # ran in its job folder


def test_the_environment_reaches_the_job(tmux, tmp_path):
    job = tmux.start("env", 'echo "$QAT_PROBE" > probe.txt', tmp_path / "job", environment={"QAT_PROBE": "x y"})
    assert job.wait(timeout=30).exit_code == 0
    assert (tmp_path / "job" / "probe.txt").read_text() == "x y\n"


def test_an_overrunning_job_is_stopped_with_every_process_group(tmux, tmp_path, monkeypatch):
    monkeypatch.setattr(harness.tmux, "STOP_GRACE_SECONDS", 2.0)  # the job ignores SIGINT: no need to wait 20 s
    # a grandchild in its own session, as train.py is under the runner: SIGINT to the pane misses it
    script = "setsid sleep 300 &\necho $! > child.pid\ntrap '' INT\nsleep 300"
    job = tmux.start("slow", script, tmp_path / "job")
    pid_file = tmp_path / "job" / "child.pid"
    while not pid_file.exists() or not pid_file.read_text().strip():
        time.sleep(0.1)
    child = int(pid_file.read_text())
    assert alive(child, settle=0)
    end = job.wait(timeout=2)
    assert end.how == "timeout" and end.exit_code is None
    assert not alive(child)
    assert not tmux.pane_alive(job.pane_id)


def test_a_killed_window_is_noticed_and_its_processes_reaped(tmux, tmp_path):
    job = tmux.start("doomed", "setsid sleep 300 &\necho $! > child.pid\nsleep 300", tmp_path / "job")
    pid_file = tmp_path / "job" / "child.pid"
    while not pid_file.exists() or not pid_file.read_text().strip() or not leads_own_group(int(pid_file.read_text())):
        time.sleep(0.1)  # until the child has called setsid
    job._remember_groups()  # the driver's poll has seen the child before the window goes
    subprocess.run(["tmux", "-L", tmux.server.socket_name, "kill-window", "-t", "t:doomed"], check=True)
    end = job.wait(timeout=60)
    assert end.how == "vanished" and end.exit_code is None
    assert not alive(int(pid_file.read_text()))


def test_a_dead_server_is_noticed_and_the_session_comes_back(tmux, tmp_path):
    job = tmux.start("orphan", "sleep 300", tmp_path / "job")
    tmux.server.kill()
    assert job.wait(timeout=60).how == "vanished"
    again = tmux.start("next", "exit 0", tmp_path / "job2")  # a new server, session and results window
    assert again.wait(timeout=30).exit_code == 0
    assert tmux.session().windows[0].window_name == RESULTS_WINDOW
