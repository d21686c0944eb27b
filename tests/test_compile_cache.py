"""The compile cache runs share: a second run of the same train.py (copied to another run folder,
as the runner does) gets its compiled fake-quant from the cache; an edited one is compiled anew,
never served the old kernels. Real bwrap, the runner's environment, train.py's own compiled
function."""

import json
import subprocess
import sys

import pytest
from conftest import ROOT

from harness import runner, sandbox

PROBE = """
import json, sys
sys.path[:0] = [sys.argv[1], sys.argv[2]]  # the run folder's train.py, then the checkout's harness/
import torch
from torch._dynamo.utils import counters
import train
quantizer = train.TernaryQuantizer(2, 16, 32)
weight = torch.randn(8, 32, generator=torch.Generator().manual_seed(0))
(value,) = train.block_fake_quant_compiled([quantizer], [weight], [None])
print(json.dumps({"value": value.tolist(), **counters["inductor"], **counters["aot_autograd"]}))
"""
DECODE = 'return (codes - 1) * self.expand(p["scale"])'  # TernaryQuantizer.decode, compiled


def compiled_in_a_run_folder(tmp_path, name: str, source: str, cache) -> dict:
    """Run PROBE on `source` (a train.py) from its own folder, in the sandbox, as the runner
    starts train.py -> its value and torch's compile-cache counters."""
    folder = tmp_path / name
    folder.mkdir()
    (folder / "train.py").write_text(source)
    (folder / "probe.py").write_text(PROBE)
    kind = sandbox.resolve(sandbox.SANDBOX_BWRAP)
    view = sandbox.View(readable=(ROOT / "harness",), writable=(folder, cache))
    env = sandbox.environment({**runner.compile_cache_env(cache), "HARNESS_RUN_DIR": str(folder)})
    argv = [sys.executable, str(folder / "probe.py"), str(folder), str(ROOT)]
    child = sandbox.popen(kind, argv, view, env, folder, stdout=subprocess.PIPE)
    out, _ = child.communicate(timeout=600)
    assert child.returncode == 0
    return json.loads(out.decode().strip().splitlines()[-1])


@pytest.mark.slow
def test_a_warm_cache_serves_the_same_graph_and_an_edit_compiles_anew(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    source = (ROOT / "train.py").read_text()
    assert source.count(DECODE) == 1
    cold = compiled_in_a_run_folder(tmp_path, "run1", source, cache)
    warm = compiled_in_a_run_folder(tmp_path, "run2", source, cache)
    edited = compiled_in_a_run_folder(
        tmp_path, "run3", source.replace(DECODE, DECODE.replace("* self", "* 2 * self")), cache
    )
    assert cold.get("fxgraph_cache_miss", 0) > 0 and not cold.get("fxgraph_cache_hit")
    assert warm.get("fxgraph_cache_hit", 0) > 0 and not warm.get("fxgraph_cache_miss")
    assert warm.get("autograd_cache_hit", 0) > 0
    assert warm["value"] == cold["value"]
    assert edited.get("fxgraph_cache_miss", 0) > 0
    assert edited["value"] == [[2 * x for x in row] for row in cold["value"]]
