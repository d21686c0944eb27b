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


def test_a_cuda_device_is_the_only_one_a_run_sees():
    assert device_environment("cuda:1") == {"CUDA_VISIBLE_DEVICES": "1"}
    assert device_environment("cpu") == {} and device_environment(None) == {}


def test_core_lists_read_as_taskset_writes_them():
    assert cpu_list("0-3,8") == [0, 1, 2, 3, 8] and cpu_list("5") == [5]
    with pytest.raises(Exception, match="core list"):
        cpu_list("a-b")
