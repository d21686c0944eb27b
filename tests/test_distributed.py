"""train.py on several ranks, on CPU with gloo and real torchrun: one step of a global batch split
over 2 ranks is the single-process step on that batch (data parallel: by hand, FakeQuantStep's
gradients included; FSDP2), and `harness run --nproc 2` lands a verified row and leaves no process
behind."""

import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, TINY_GROUP, TINY_RUN_FLAGS, named, wait_until_gone

from harness import results, sandbox
from harness.runner import RunSpec, run_experiment

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
STEP_FLAGS = ["--group-size", str(TINY_GROUP), "--batch-size", "4", "--seq-len", "32"]

# One training step as main() sets it up (start_ranks, load_student, shard or same_start, the live
# teacher), on step 0's batch; rank 0 saves the whole batch's loss and every trained tensor's full
# gradient and value after the optimizer step.
ONE_STEP = """
import sys
import torch
import train
from harness.data import load_prepared

cfg = train.parse_flags(sys.argv[2:])
torch.manual_seed(cfg.seed)
device = train.start_ranks(cfg)
prepared = load_prepared(need_eval=False)
model = train.load_student(prepared, cfg, device)
if cfg.fsdp:
    train.shard(model)
elif train.world_size() > 1:
    train.same_start(model)
teacher = train.load_teacher(prepared.model_dir, device, torch.float32)
optimizer, trained, _ = train.make_optimizer(model, cfg)
scaler = torch.amp.GradScaler("cpu", enabled=False)
batch = train.batch_at(0, prepared.train.tokens(), None, cfg, device)
loss, _ = train.train_step(model, teacher, train.rank_share(batch), optimizer, scaler, trained, cfg)
(loss,) = train.mean_over_ranks(loss)
full = (lambda t: t.full_tensor()) if cfg.fsdp else (lambda t: t)
saved = {
    "loss": loss.detach(),
    "grads": {name: full(p.grad) for name, p in trained.items()},
    "params": {name: full(p.detach()) for name, p in trained.items()},
}
if train.rank() == 0:
    torch.save(saved, sys.argv[1])
"""


def one_step(tmp_path, name, launcher, flags, compile_cache):
    script, out = tmp_path / "one_step.py", tmp_path / f"{name}.pt"
    script.write_text(ONE_STEP)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
           "TORCHINDUCTOR_CACHE_DIR": str(compile_cache / "inductor")}  # fmt: skip
    done = subprocess.run([*launcher, str(script), str(out), *STEP_FLAGS, *flags], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(out)


@pytest.mark.parametrize(
    ("flags", "sharded"),
    [([], []), (["--compile", "0"], []), (["--compile", "0"], ["--fsdp", "1"])],
    ids=["ddp-compiled", "ddp-eager", "fsdp2"],
)
def test_one_global_batch_on_two_ranks_is_the_single_process_step(
    harness_env, compile_cache, flags, sharded
):
    """Ternary QAT with distillation from the live teacher, the default path: the mean of the two
    ranks' losses and the averaged gradients (clipped, as the step clips them) are those of one
    process on the 4 sequences, and so are the weights after the AdamW step. Tolerance rtol 1e-4,
    atol 1e-6: each rank sums its half of the tokens, so float32 additions happen in another
    order (the same bounds as the compiled-vs-eager step)."""
    single = one_step(harness_env, "single", [sys.executable], flags, compile_cache)
    ranks = one_step(harness_env, "ranks", TORCHRUN, [*flags, *sharded], compile_cache)
    torch.testing.assert_close(ranks["loss"], single["loss"], rtol=1e-5, atol=1e-6)
    assert ranks["grads"].keys() == single["grads"].keys() and len(single["grads"]) > 14
    for kind in ("grads", "params"):
        for name, value in single[kind].items():
            torch.testing.assert_close(
                ranks[kind][name], value, rtol=1e-4, atol=1e-6, msg=named(f"{kind} {name}")
            )


@pytest.mark.parametrize("flags", [[], ["--fsdp", "1", "--compile", "0"]], ids=["ddp", "fsdp2"])
def test_harness_run_nproc_2_lands_a_verified_row_and_leaves_no_process(harness_env, flags):
    spec = RunSpec(train_args=[*TINY_RUN_FLAGS, "--log-every", "1", "--steps", "3", *flags],
                   eval_tokens=4096, echo=False, train_script=ROOT / "train.py",
                   results_path=harness_env / "results.tsv", runs_dir=harness_env / "runs",
                   budget_seconds=60, nproc=2)  # fmt: skip
    outcome = run_experiment(spec)
    assert outcome.status == "keep", outcome.reason
    assert wait_until_gone(str(outcome.run_dir)) == []
    (row,) = results.read(harness_env / "results.tsv").itertuples()
    assert row.steps == 3 and row.train_tokens == 3 * 2 * 64  # rank 0 announces the whole batch
    assert '"nproc":2' in row.config and 0 < row.val_bpb < 20 and row.bpw < 4
    assert (outcome.run_dir / "loss.csv").read_text().count("\n") == 4  # one writer: header + 3
    log = (outcome.run_dir / "run.log").read_text()
    assert log.count("exported ") == 1 and log.count("step     3 |") == 1  # rank 0 alone speaks


@pytest.mark.parametrize("kind", [sandbox.SANDBOX_BWRAP, sandbox.SANDBOX_NONE])
def test_a_hung_run_on_two_ranks_is_killed_with_every_rank(harness_env, kind):
    """torchrun starts each rank in a session of its own: killing the run's process group alone
    would leave them running without a sandbox."""
    script = harness_env / "hang.py"
    script.write_text(
        "import os, time\n"
        "open(os.path.join(os.environ['HARNESS_RUN_DIR'], 'rank' + os.environ['RANK']), 'w')\n"
        "time.sleep(300)\n"
    )
    spec = RunSpec(train_script=script, echo=False, results_path=harness_env / "results.tsv",
                   runs_dir=harness_env / "runs", sandbox=kind, startup_seconds=25,
                   export_seconds=1, nproc=2)  # fmt: skip
    outcome = run_experiment(spec)
    assert outcome.status == "invalid" and "no training step" in outcome.reason
    assert {p.name for p in outcome.run_dir.glob("rank*")} == {"rank0", "rank1"}  # both started
    assert wait_until_gone(str(harness_env / "runs"), seconds=10) == []


def test_auto_batch_shape_is_4_x_128_on_cpu_and_flags_win():
    import train

    auto = train.parse_flags([])
    assert (auto.batch_size, auto.seq_len) == (0, 0)
    assert train.batch_shape(None, torch.device("cpu"), auto) == (4, 128)
    given = train.parse_flags(["--batch-size", "6", "--seq-len", "64"])
    assert train.batch_shape(None, torch.device("cpu"), given) == (6, 64)


def test_a_non_finite_loss_on_the_ranks_is_a_crash_row_with_its_reason(harness_env):
    text = (ROOT / "train.py").read_text()
    script = harness_env / "train.py"
    script.write_text(
        text.replace("        return ce, ce\n", "        return ce * float('nan'), ce\n")
    )
    spec = RunSpec(train_args=[*TINY_RUN_FLAGS, "--distill-weight", "0", "--compile", "0"],
                   echo=False, train_script=script, results_path=harness_env / "results.tsv",
                   runs_dir=harness_env / "runs", budget_seconds=60, nproc=2)  # fmt: skip
    outcome = run_experiment(spec)
    assert outcome.status == "crash" and "loss is nan at step 0" in outcome.reason
    assert wait_until_gone(str(harness_env / "runs"), seconds=10) == []
