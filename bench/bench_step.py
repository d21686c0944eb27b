"""Training-step speed and memory of each QAT method against plain FP training, side by side.

    python bench/bench_step.py [--rounds 20] [--device cpu] [--out bench/out/step.json]

On the prepared model (the packaged 135M by default), B=4, T=128, on the CPU in fp32 (--device
cuda: in train.py's bf16 autocast). Each method is train.py's own
step (train_step, batches from batch_at) on its own model copy, and the steps
are interleaved round-robin in one process, so that drift and other load on the machine hit every
method alike, each round starting one method later so that none always follows the same one. A
method's ratio is the median over rounds of its step time divided by FP's in the same round (with
a bootstrap 95% interval), so that drift between rounds cancels. Round 0 is the warm-up (it
compiles the fake-quant) and is not timed. Peak memory is measured per method in a fresh
subprocess (peak RSS only grows within a process; on CUDA, the peak allocated) over MEMORY_STEPS
steps and divided by FP's.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rss import peak_rss_gb  # noqa: E402

import train  # noqa: E402
from harness.data import load_prepared  # noqa: E402

CE_ONLY = ["--distill-weight", "0"]
# method -> (train.py flags, step-time target vs FP from issue 3)
METHODS = {
    "fp": (["--quant", "none", *CE_ONLY], 1.0),
    "ternary": (["--quant", "ternary", *CE_ONLY], 1.05),
    "codebook2": (["--quant", "codebook", "--bits", "2", *CE_ONLY], 1.05),
    "int4": (["--quant", "int", "--bits", "4", *CE_ONLY], 1.05),
    "mxfp4": (["--quant", "mxfp4", *CE_ONLY], 1.05),
    "kd_live": (
        ["--quant", "ternary"],
        1.35,
    ),  # train.py's default: ternary QAT + KD from the live teacher
    "kd_cache": (
        ["--quant", "ternary", "--teacher-cache-k", "32", "--teacher-cache-tokens", "8192"],
        1.08,
    ),
}
MEMORY_TARGET = 1.2  # peak memory of QAT (no teacher in memory) vs FP training
MEMORY_METHODS = ("ternary", "codebook2", "int4", "mxfp4", "kd_cache")
# glibc's heap grows over the first steps as freed buffers fragment; on the CPU FP's settles by the
# tenth
MEMORY_STEPS = 10


class Method:
    """A model, its teacher (or cache) and optimizer, stepped exactly as train.train() steps."""

    def __init__(self, name: str, prepared, batch_size: int, seq_len: int, device: torch.device):
        from transformers import AutoModelForCausalLM

        flags = [*METHODS[name][0], "--batch-size", str(batch_size), "--seq-len", str(seq_len)]
        self.cfg = cfg = train.parse_flags(flags)
        self.device = device
        self.model = AutoModelForCausalLM.from_pretrained(
            prepared.model_dir, dtype=torch.float32
        ).to(device)
        if cfg.quant != "none":
            train.prepare_qat(self.model, cfg)
        self.model.train()
        self.teacher, self.cache = None, None
        if cfg.distill_weight > 0 and cfg.teacher_cache_k:
            self.cache = train.load_teacher_cache(train.build_teacher_cache(prepared, cfg, device))
        elif cfg.distill_weight > 0:
            self.teacher = train.load_teacher(
                prepared.model_dir, device, train.teacher_dtype(device, cfg)
            )
        self.optimizer, self.trained, _ = train.make_optimizer(self.model, cfg)
        self.scaler = torch.amp.GradScaler(device.type, enabled=False)
        self.tokens = prepared.train.tokens()

    def step(self, index: int) -> float:
        batch = train.batch_at(index, self.tokens, self.cache, self.cfg, self.device)
        started = time.perf_counter()
        train.train_step(
            self.model, self.teacher, batch, self.optimizer, self.scaler, self.trained, self.cfg
        )
        if self.device.type == "cuda":
            torch.cuda.synchronize()  # the step's kernels, not only their launches
        elapsed = time.perf_counter() - started
        self.optimizer.zero_grad(set_to_none=True)  # grads of idle models need no memory
        return elapsed


def peak_memory(
    method: str, steps: int, batch_size: int, seq_len: int, device: torch.device
) -> float:
    """Peak memory in GB (RSS; on CUDA, allocated on the GPU) of a fresh process that builds
    `method` and trains `steps` steps."""
    probe = [sys.executable, __file__, "--memory-probe", method, "--rounds", str(steps)]
    probe += ["--device", str(device), "--batch-size", str(batch_size), "--seq-len", str(seq_len)]
    done = subprocess.run(probe, capture_output=True, text=True, check=True)
    return float(done.stdout.strip().splitlines()[-1])


def paired_ratio(times: list[float], fp_times: list[float]) -> tuple[float, list[float]]:
    """Median over rounds of time / FP's time in the same round, and its bootstrap 95% interval
    (rounds resampled with replacement)."""
    ratios = [t / fp for t, fp in zip(times, fp_times)]
    rng = random.Random(0)
    medians = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(2000))
    return statistics.median(ratios), [medians[50], medians[1949]]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--rounds", type=int, default=20, help="timed steps per method (after one warm-up)"
    )
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument(
        "--device", type=torch.device, default=torch.device("cpu"), help="cpu | cuda"
    )
    parser.add_argument(
        "--methods", default=",".join(METHODS), help="comma-separated subset (fp is always run)"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "step.json")
    parser.add_argument("--memory-probe", help=argparse.SUPPRESS)
    args = parser.parse_args()
    train.keep_freed_memory()  # as train.main() does
    prepared = load_prepared()

    if args.memory_probe:
        method = Method(args.memory_probe, prepared, args.batch_size, args.seq_len, args.device)
        for index in range(args.rounds):
            method.step(index)
        print(
            torch.cuda.max_memory_allocated() / 1024**3
            if args.device.type == "cuda"
            else peak_rss_gb()
        )
        return

    names = ["fp", *(m for m in args.methods.split(",") if m != "fp")]
    built = {
        name: Method(name, prepared, args.batch_size, args.seq_len, args.device) for name in names
    }
    times: dict[str, list[float]] = {name: [] for name in names}
    for index in range(args.rounds + 1):
        start = index % len(names)
        for name in names[start:] + names[:start]:
            elapsed = built[name].step(index)
            if index:  # round 0 is the warm-up
                times[name].append(elapsed)
        print(
            f"round {index}: " + ", ".join(f"{n} {t[-1]:.3f}s" for n, t in times.items() if t),
            flush=True,
        )
    del built
    median = {name: statistics.median(t) for name, t in times.items()}
    ratio = {name: paired_ratio(t, times["fp"]) for name, t in times.items()}
    memory_names = ["fp", *(n for n in names if n in MEMORY_METHODS)]
    memory = {
        name: peak_memory(name, MEMORY_STEPS, args.batch_size, args.seq_len, args.device)
        for name in memory_names
    }
    report = {
        "model": prepared.model_name,
        "device": torch.cuda.get_device_name() if args.device.type == "cuda" else "cpu",
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "rounds": args.rounds,
        "median_step_seconds": median,
        "step_ratio_vs_fp": {n: ratio[n][0] for n in names},
        "step_ratio_ci95": {n: ratio[n][1] for n in names},
        "step_ratio_target": {n: METHODS[n][1] for n in names},
        "peak_memory_gb": memory,
        "memory_ratio_vs_fp": {n: memory[n] / memory["fp"] for n in memory_names},
        "memory_ratio_target": MEMORY_TARGET,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(
        json.dumps(
            {
                k: report[k]
                for k in (
                    "median_step_seconds",
                    "step_ratio_vs_fp",
                    "step_ratio_ci95",
                    "memory_ratio_vs_fp",
                )
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
