"""Training-step speed and memory of each QAT method against plain FP training, side by side.

    python bench/bench_step.py [--rounds 6] [--out bench/out/step.json]

On the prepared model (the packaged 135M by default), B=4, T=128: every method gets its own model
copy, and the steps are interleaved round-robin in one process so that drift and other load on the
machine hit every method alike; the median step time is divided by FP's. Peak memory is measured
per method in a fresh subprocess (peak RSS only grows within a process) and divided by FP's.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import train  # noqa: E402
from harness.data import batches, load_prepared  # noqa: E402

# method -> (train.py flags, whether a live teacher runs, target ratio vs FP from issue 3)
METHODS = {
    "fp": (["--quant", "none"], False, 1.0),
    "ternary": (["--quant", "ternary"], False, 1.05),
    "codebook2": (["--quant", "codebook", "--bits", "2"], False, 1.05),
    "int4": (["--quant", "int", "--bits", "4"], False, 1.05),
    "mxfp4": (["--quant", "mxfp4"], False, 1.05),
    "kd_live": (["--quant", "ternary"], True, 1.35),
}
MEMORY_TARGET = 1.2  # peak memory of QAT vs FP training


def build(method: str, model_dir: Path):
    from transformers import AutoModelForCausalLM

    flags, live_teacher, _ = METHODS[method]
    cfg = train.parse_flags(flags)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if cfg.quant != "none":
        train.quantize_model(model, cfg)
    teacher = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval() if live_teacher else None
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    return model, teacher, optimizer, cfg


def step(model, teacher, optimizer, cfg, x, y) -> float:
    started = time.perf_counter()
    logits = model(input_ids=x).logits
    loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
    if teacher is not None:
        with torch.no_grad():
            teacher_logits = teacher(input_ids=x).logits
        log_student = F.log_softmax(logits.flatten(0, 1) / cfg.distill_temp, dim=-1)
        log_teacher = F.log_softmax(teacher_logits.flatten(0, 1) / cfg.distill_temp, dim=-1)
        loss = F.kl_div(log_student, log_teacher, log_target=True, reduction="batchmean") * cfg.distill_temp**2
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return time.perf_counter() - started


def peak_memory(method: str, steps: int) -> float:
    """Peak RSS in GB of a fresh process that builds `method` and trains `steps` steps."""
    done = subprocess.run([sys.executable, __file__, "--memory-probe", method, "--rounds", str(steps)],
                          capture_output=True, text=True, check=True)  # fmt: skip
    return float(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=6, help="timed steps per method (after one warm-up)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "step.json")
    parser.add_argument("--memory-probe", help=argparse.SUPPRESS)
    args = parser.parse_args()
    prepared = load_prepared()
    data = batches(prepared.train.tokens(), args.batch_size, args.seq_len, seed=0)

    if args.memory_probe:
        built = build(args.memory_probe, prepared.model_dir)
        for _ in range(args.rounds):
            step(*built, *next(data))
        print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2)
        return

    built = {method: build(method, prepared.model_dir) for method in METHODS}
    times: dict[str, list[float]] = {method: [] for method in METHODS}
    for round_index in range(args.rounds + 1):
        x, y = next(data)
        for method, parts in built.items():
            elapsed = step(*parts, x, y)
            if round_index:  # round 0 is warm-up
                times[method].append(elapsed)
        print(f"round {round_index}: " + ", ".join(f"{m} {t[-1]:.2f}s" for m, t in times.items() if t), flush=True)
    del built
    median = {method: statistics.median(t) for method, t in times.items()}
    memory = {method: peak_memory(method, 2) for method in METHODS}
    report = {
        "model": prepared.model_name,
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "rounds": args.rounds,
        "median_step_seconds": median,
        "step_ratio_vs_fp": {m: median[m] / median["fp"] for m in METHODS},
        "step_ratio_target": {m: METHODS[m][2] for m in METHODS},
        "peak_rss_gb": memory,
        "memory_ratio_vs_fp": {m: memory[m] / memory["fp"] for m in METHODS},
        "memory_ratio_target": MEMORY_TARGET,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(json.dumps({k: report[k] for k in ("step_ratio_vs_fp", "memory_ratio_vs_fp")}, indent=1))


if __name__ == "__main__":
    main()
