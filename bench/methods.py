"""Every train.py method at the default budget, one harness run each (docs/benchmarks.md's table).

    python bench/methods.py                     # runs what results.tsv lacks, then prints the table
    python bench/methods.py --only int4,mxfp4   # a subset, run in this order
    python bench/methods.py --table             # the table alone, from results.tsv

Each method is an ordinary experiment: train.py in a child process under the wall-clock budget,
its artifact verified and scored by the harness, one row appended to results.tsv. A method whose
row (same description, same model) is already there is not run again, so an interrupted sweep
resumes where it stopped. On 2 CPU cores a QAT row takes ~8 min (300 s of training, the rest is
loading, compiling and the 65,536-token evaluation); a baseline ~2 min.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from harness import paths, results  # noqa: E402
from harness.budget import TIME_BUDGET_SECONDS  # noqa: E402
from harness.data import load_prepared  # noqa: E402
from harness.runner import RunSpec, check_ready, run_experiment  # noqa: E402

# name -> (description in results.tsv, train.py flags); baselines first, then one row per method
METHODS = {
    "fp": ("FP (no quantization)", ["--baseline", "fp"]),
    "rtn-ternary": ("RTN ternary g128", ["--baseline", "rtn", "--quant", "ternary"]),
    "rtn-codebook2": (
        "RTN codebook 2-bit g128",
        ["--baseline", "rtn", "--quant", "codebook", "--bits", "2"],
    ),
    "rtn-int4": ("RTN int4 g128", ["--baseline", "rtn", "--quant", "int", "--bits", "4"]),
    "rtn-mxfp4": ("RTN MXFP4", ["--baseline", "rtn", "--quant", "mxfp4"]),
    "ternary": ("ternary + KD (train.py default)", []),
    "codebook2": (
        "codebook 2-bit, Newton clip, learned scale + KD",
        ["--quant", "codebook", "--bits", "2"],
    ),
    "int4": ("int4 symmetric g128 + KD", ["--quant", "int", "--bits", "4"]),
    "mxfp4": ("MXFP4 (E2M1, E8M0 scale per 32) + KD", ["--quant", "mxfp4"]),
    "mxfp8": ("MXFP8 (E4M3, E8M0 scale per 32) + KD", ["--quant", "mxfp8"]),
    "lut-progressive": (
        "LUT k-means, rank-2 scales, progressive 4 -> 2 bits + KD",
        ["--quant", "lut", "--bits", "4", "--lut-rank", "2", "--progressive-bits", "2"],
    ),
    "per-module": (
        "per-module: MLP codebook 2-bit, attention log 4-bit + KD",
        ["--quant", "codebook", "--bits", "2", "--module-quant", "self_attn=log:4"],
    ),
    "act-int8": ("ternary + INT8 per-token activations + KD", ["--act-quant", "1"]),
    "kd-cache": (
        "ternary, top-k teacher cache (k=32 + 32 negatives), hard top-1 terms",
        ["--teacher-cache-k", "32", "--hard-top1-weight", "0.1", "--hard-full-top1-weight", "0.1"],
    ),
    "lora-stabilized": (
        "ternary, frozen attn o/v, EMA, LoRA r16 last 20% + KD",
        ["--freeze-attn-ov", "1", "--ema-decay", "0.99", "--lora-rank", "16", "--lora-at", "0.8"],
    ),
    "switchable": (
        "switchable codebook 2/4-bit, exported at 2 + KD",
        ["--quant", "codebook", "--bits", "2", "--switchable-bits", "2,4"],
    ),
    "cyclic": (
        "cyclic int 2-4 bits (cosine), exported at 4 + KD",
        ["--quant", "int", "--bits", "4", "--cyclic-bits", "2-4"],
    ),
}


def latest_rows(model: str) -> dict[str, dict]:
    """description -> the newest row of this model that has a score (a crash is run again)."""
    frame = results.read(paths.results_path())
    if frame.empty:
        return {}
    scored = frame[(frame["model"] == model) & frame["val_bpb"].notna()]
    return {row["description"]: row for row in scored.to_dict("records")}


def markdown_table(names: list[str], rows: dict[str, dict]) -> str:
    lines = [
        "| method | flags | val_bpb | val_ppl | bpw | size_mb | steps | status |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in names:
        description, flags = METHODS[name]
        row, shown_flags = rows.get(description), f"`{' '.join(flags)}`" if flags else "defaults"
        if row is None:
            lines.append(f"| {description} | {shown_flags} | not run | | | | | |")
            continue
        cells = [f"{row['val_bpb']:.4f}", f"{row['val_ppl']:.4g}", f"{row['bpw']:.4f}",
                 f"{row['size_mb']:.1f}", f"{int(row['steps'])}", row["status"]]  # fmt: skip
        lines.append(f"| {description} | {shown_flags} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", default="", help="comma-separated method names (default: all)")
    parser.add_argument(
        "--budget", type=float, default=TIME_BUDGET_SECONDS, help="training seconds per run"
    )
    parser.add_argument(
        "--table", action="store_true", help="print the table from results.tsv; run nothing"
    )
    args = parser.parse_args(argv)
    names = [n for n in args.only.split(",") if n] or list(METHODS)
    unknown = set(names) - set(METHODS)
    if unknown:
        parser.error(f"unknown methods {sorted(unknown)}; known: {', '.join(METHODS)}")
    problem = check_ready()
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    model = load_prepared().model_name
    if not args.table:
        for name in names:
            description, flags = METHODS[name]
            if description in latest_rows(model):
                print(f"{name}: already in results.tsv")
                continue
            print(
                f"{name}: python -m harness run --description {description!r} -- {' '.join(flags)}",
                flush=True,
            )
            spec = RunSpec(train_args=flags, description=description, budget_seconds=args.budget,
                           echo=False, baseline="--baseline" in flags)  # fmt: skip
            run_experiment(spec)
    print(markdown_table([n for n in METHODS if n in names], latest_rows(model)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
