"""Jobs in a real tmux server (own socket): exit codes, overruns, stops that let the job finish,
killed windows and servers, secrets kept out of panes, the log window."""

import os
import secrets
import signal
import subprocess
import time

import pytest
from agent_fixtures import screen_showing, tmux_environments

import harness.agent.tmux
from harness.agent.tmux import LOG_WINDOW, RESULTS_WINDOW, Tmux


@pytest.fixture
def tmux(tmp_path):
    box = Tmux(
        "sleep 600", cwd=tmp_path, session_name="t", socket_name="qat-test-" + secrets.token_hex(4)
    )
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
    job = tmux.start(
        "exp1",
        "until [ -e go ]; do sleep 0.1; done\necho hello > out.txt\nexit 7",
        tmp_path / "job",
    )
    names = [w.window_name for w in tmux.session().windows]
    assert names[0] == RESULTS_WINDOW and "exp1" in names
    (tmp_path / "job" / "go").touch()
    end = job.wait(timeout=30)
    assert (end.how, end.exit_code) == ("exited", 7)
    assert (tmp_path / "job" / "out.txt").read_text() == "hello\n"  # ran in its job folder


def test_the_environment_reaches_the_job(tmux, tmp_path):
    job = tmux.start(
        "env", 'echo "$QAT_PROBE" > probe.txt', tmp_path / "job", environment={"QAT_PROBE": "x y"}
    )
    assert job.wait(timeout=30).exit_code == 0
    assert (tmp_path / "job" / "probe.txt").read_text() == "x y\n"


def test_an_overrunning_job_is_stopped_with_every_process_group(tmux, tmp_path, monkeypatch):
    monkeypatch.setattr(
        harness.agent.tmux, "STOP_GRACE_SECONDS", 2.0
    )  # the job ignores SIGTERM: no need to wait 20 s
    # a grandchild in its own session, as train.py is under the runner: a signal to the pane misses
    # it
    script = "setsid sleep 300 &\necho $! > child.pid\ntrap '' TERM\nsleep 300"
    job = tmux.start("slow", script, tmp_path / "job")
    pid_file = tmp_path / "job" / "child.pid"
    while not pid_file.exists() or not pid_file.read_text().strip():
        time.sleep(0.1)
    child = int(pid_file.read_text())
    assert alive(child, settle=0)
    end = job.wait(timeout=2)
    assert end.how == "timeout" and end.exit_code is None  # killed: its shells never wrote one
    assert not alive(child)
    assert not tmux.pane_alive(job.pane_id)


def test_a_stopped_job_finishes_what_its_signal_started_and_its_exit_code_is_kept(tmux, tmp_path):
    """What the runner does on SIGTERM: take a moment to write its row, then exit. The pane's shells
    wait for it, so no hangup cuts it short."""
    handler = "sleep 1; echo row > row.txt; exit 3"
    job = tmux.start(
        "runner",
        f"bash -c 'trap \"{handler}\" TERM; touch ready; while :; do sleep 0.1; done'",
        tmp_path / "job",
    )
    while not (tmp_path / "job" / "ready").exists():
        time.sleep(0.1)
    job.stop(signal.SIGTERM)
    assert (tmp_path / "job" / "row.txt").read_text() == "row\n"
    assert job.exit_code() == 3
    assert not tmux.pane_alive(job.pane_id)


def test_a_killed_window_hangs_up_its_job_which_still_records_its_exit(tmux, tmp_path):
    job = tmux.start(
        "doomed", "setsid sleep 300 &\necho $! > child.pid\nsleep 300", tmp_path / "job"
    )
    pid_file = tmp_path / "job" / "child.pid"
    while (
        not pid_file.exists()
        or not pid_file.read_text().strip()
        or not leads_own_group(int(pid_file.read_text()))
    ):
        time.sleep(0.1)  # until the child has called setsid
    job._remember_groups()  # the driver's poll has seen the child before the window goes
    subprocess.run(
        ["tmux", "-L", tmux.server.socket_name, "kill-window", "-t", "t:doomed"], check=True
    )
    end = job.wait(timeout=60)
    assert (end.how, end.exit_code) == (
        "exited",
        128 + signal.SIGHUP,
    )  # its `sleep 300` died of the hangup
    assert not alive(int(pid_file.read_text()))


def test_a_job_whose_shells_are_killed_has_vanished(tmux, tmp_path):
    job = tmux.start("shot", "sleep 300", tmp_path / "job")
    os.killpg(job.pane_pid, signal.SIGKILL)
    end = job.wait(timeout=60)
    assert end.how == "vanished" and end.exit_code is None


def test_a_dead_server_is_noticed_and_the_session_comes_back(tmux, tmp_path):
    job = tmux.start("orphan", "echo > started\nsleep 300", tmp_path / "job")
    while not (tmp_path / "job" / "started").exists():
        time.sleep(
            0.1
        )  # the job's shells have set their traps: a server killed sooner kills them outright
    tmux.server.kill()
    assert job.wait(timeout=60).exit_code == 128 + signal.SIGHUP
    again = tmux.start(
        "next", "exit 0", tmp_path / "job2"
    )  # a new server, session and results window
    assert again.wait(timeout=30).exit_code == 0
    assert tmux.session().windows[0].window_name == RESULTS_WINDOW


def test_a_job_left_by_an_earlier_driver_is_found_by_its_folder(tmux, tmp_path):
    job = tmux.start("exp1", "sleep 300", tmp_path / "job")
    assert tmux.find(tmp_path / "other") is None
    found = Tmux(
        "sleep 600", cwd=tmp_path, session_name="t", socket_name=tmux.server.socket_name
    ).find(tmp_path / "job")
    assert (found.pane_id, found.pane_pid) == (job.pane_id, job.pane_pid)
    found.stop()
    assert found.exit_code() == 128 + signal.SIGTERM


def test_a_server_someone_else_started_with_secrets_gives_none_to_the_panes(tmp_path):
    socket = "qat-test-" + secrets.token_hex(4)
    token = "qat-secret-" + secrets.token_hex(8)
    env = {**os.environ, "QAT_PROBE_TOKEN": token, "QAT_PROBE_SECRET": token, "QAT_PLAIN": "kept"}
    subprocess.run(
        ["tmux", "-L", socket, "new-session", "-d", "-s", "theirs", "sleep 600"],
        env=env,
        check=True,
    )
    try:
        box = Tmux(
            "sleep 600",
            cwd=tmp_path,
            session_name="t",
            socket_name=socket,
            log_file=tmp_path / "log",
        )
        job = box.start(
            "env",
            'echo "${QAT_PROBE_TOKEN-absent} ${QAT_PROBE_SECRET-absent} $QAT_PLAIN" > probe.txt\n'
            "sleep 300",
            tmp_path / "job",
        )
        probe = tmp_path / "job" / "probe.txt"
        while not probe.exists() or not probe.read_text():
            time.sleep(0.1)
        assert probe.read_text() == "absent absent kept\n"
        ours = {w.window_name: w for w in box.session().windows}
        viewer_pids = {ours[name].panes[0].pane_pid for name in (RESULTS_WINDOW, LOG_WINDOW)}
        environments = tmux_environments(socket)
        assert viewer_pids | {str(job.pane_pid)} <= set(environments)
        for pid in viewer_pids | {str(job.pane_pid)}:
            assert token.encode() not in environments[pid]
        job.stop()
    finally:
        subprocess.run(["tmux", "-L", socket, "kill-server"], capture_output=True)


def test_the_log_window_follows_the_log_file(tmp_path):
    log = tmp_path / "agent.log"
    log.write_text("first line\n")
    box = Tmux(
        "sleep 600",
        cwd=tmp_path,
        session_name="t",
        socket_name="qat-test-" + secrets.token_hex(4),
        log_file=log,
    )
    try:
        box.session()
        with open(log, "a") as sink:
            sink.write("rejected experiment=2 reason=written later\n")
        screen = screen_showing(box.server.socket_name, f"t:{LOG_WINDOW}", "written later")
        assert "first line" in screen and "written later" in screen
    finally:
        box.server.kill()
