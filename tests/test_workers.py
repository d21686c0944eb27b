"""What each of N workers gets: its folder, branch, window names, share of --max-experiments,
cores and device. The workers themselves run end to end in test_agent.py (slow)."""

import os

import pytest

from harness.__main__ import cpu_list
from harness.agent.jobs import device_environment
from harness.agent.workers import Worker


@pytest.fixture
def runs(tmp_path, monkeypatch):
    monkeypatch.setenv("HARNESS_RUNS_DIR", str(tmp_path))
    return tmp_path


def test_a_lone_agent_keeps_the_single_layout(runs):
    lone = Worker("dec01")
    assert lone.branch == "autoresearch/dec01" and lone.root == lone.group_root
    assert lone.peers() == [lone.root] and lone.window("exp3") == "exp3"
    assert lone.share(7) == 7 and lone.cpus() is None and lone.device([]) is None


def test_workers_split_the_experiments_the_cores_and_the_devices(runs):
    workers = [Worker("dec01", k, 3) for k in (1, 2, 3)]
    assert [w.branch for w in workers] == [f"autoresearch/dec01-{k}" for k in (1, 2, 3)]
    assert [w.root.name for w in workers] == ["w1", "w2", "w3"]
    assert workers[0].peers() == [w.root for w in workers]
    assert workers[1].window("exp3") == "w2-exp3"
    assert [w.share(7) for w in workers] == [3, 2, 2] and [w.share(None) for w in workers] == [
        None
    ] * 3
    assert [w.device(["cuda:0", "cuda:1"]) for w in workers] == ["cuda:0", "cuda:1", "cuda:0"]
    cores = sorted(os.sched_getaffinity(0))
    slices = [w.cpus() for w in workers]
    assert all(slices) and all(set(s) <= set(cores) for s in slices)
    if len(cores) >= 3:  # each worker its own cores
        assert sum(map(len, slices)) == len({c for s in slices for c in s})


def test_a_cuda_device_is_the_only_one_a_run_sees(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert device_environment("cuda:1") == {"CUDA_VISIBLE_DEVICES": "1"}
    assert device_environment("cpu") == {"CUDA_VISIBLE_DEVICES": ""}
    assert device_environment(None) == {}
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")  # the job's GPUs, as SLURM gives them
    assert device_environment("cuda:1") == {"CUDA_VISIBLE_DEVICES": "5"}


def test_core_lists_read_as_taskset_writes_them():
    assert cpu_list("0-3,8") == [0, 1, 2, 3, 8] and cpu_list("5") == [5]
    with pytest.raises(Exception, match="core list"):
        cpu_list("a-b")


def test_a_workers_proposer_sees_every_workers_rows_and_what_the_others_run_now(runs):
    from types import SimpleNamespace

    from harness import results
    from harness.agent.log import AgentLog
    from harness.agent.loop import Agent, AgentConfig
    from harness.agent.proposers import build_messages

    me, other = Worker("t", 1, 2), Worker("t", 2, 2)
    for worker, run_id in ((me, "run-mine"), (other, "run-theirs")):
        worker.root.mkdir(parents=True)
        log = AgentLog(worker.root, [])
        log("start", pid=os.getpid())
        log("run", run_id=run_id)
        row = {"commit": "abc1234", "run_id": run_id, "status": "discard", "val_bpb": 1.5,
               "description": f"{run_id} row"}  # fmt: skip
        results.append(row, runs / "results.tsv")
    AgentLog(other.root, [])(
        "started", job="0002", description="try lr 3e-3", args=["--lr", "3e-3"]
    )
    results.append({"commit": "abc1234", "run_id": "run-stranger", "status": "keep",
                    "val_bpb": 1.4}, runs / "results.tsv")  # fmt: skip
    train_py = runs / "train.py"
    train_py.write_text("LR = 5e-4  # the learning rate\n")
    workspace = SimpleNamespace(path=runs, train_py=train_py)
    agent = Agent(AgentConfig(tag=me.name), None, AgentLog(me.root, []), workspace,
                  SimpleNamespace(root=me.root), peers=me.peers())  # fmt: skip
    agent.results_path = runs / "results.tsv"
    context = agent.context()
    assert sorted(context.recent["run_id"]) == ["run-mine", "run-theirs"]  # not a stranger's row
    assert context.running == ["try lr 3e-3 --lr 3e-3"]
    prompt = build_messages(context)[1]["content"]
    assert "run-theirs row" in prompt and "Running now on other workers" in prompt
    assert "- try lr 3e-3 --lr 3e-3" in prompt


def test_a_peer_without_a_log_yet_is_no_running_experiment(runs):
    """Workers start in turn: the first one proposes before the last has written a line."""
    from harness.agent.log import AgentLog

    peer = Worker("t", 2, 2).root
    assert AgentLog(peer, []).running() is None  # no folder at all
    peer.mkdir(parents=True)
    (peer / "agent.jsonl").write_text("")
    assert AgentLog(peer, []).running() is None  # an empty log
