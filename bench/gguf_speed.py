"""llama.cpp's speed, file size and peak memory on GGUF exports, side by side.

    python bench/gguf_speed.py FP.gguf LOWBIT.gguf... [--prompt-tokens 512] [--gen-tokens 128]
                         [--rounds 3] [--out bench/out/gguf_speed.json]

The first file is the reference the others are divided by: the unquantized model, exported from a
`python train.py --baseline fp` run (`python -m harness export RUN --gguf FP.gguf` writes dense
layers as the prepared model stores them, F32 for the packaged one); --f16-from RUN writes that
run's model with F16 matrices instead, the way llama.cpp's own converter ships a model. Each file
runs in its own fresh subprocess, so that its peak resident memory (VmHWM: weights mapped and read,
KV cache, compute buffers, and the Python and llama.cpp runtime every file shares) is its own. The
prompt is the first --prompt-tokens of the prepared eval text, evaluated in one batch; then
--gen-tokens greedy tokens, one at a time (wall clock around llama-cpp-python's eval and sample).
Speeds are the median over --rounds after one untimed warm-up, on every CPU core.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rss import peak_rss_gb  # noqa: E402


def cpu_kind() -> str:
    """The CPU's name and the widest vector extension llama.cpp's kernels pick from."""
    cpuinfo = Path("/proc/cpuinfo").read_text()
    name = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines()
                 if line.startswith("model name")), platform.machine())  # fmt: skip
    flags = set(next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines()
                      if line.startswith("flags")), []))  # fmt: skip
    vector = next((f for f in ("avx512_bf16", "avx512f", "avx2") if f in flags), "no AVX2")
    return f"{name}, {vector}"


def write_f16(run_dir: Path, target: Path) -> Path:
    """The run's verified model as export --gguf writes it, each F32 matrix rounded to F16."""
    from harness.artifact import load_verified
    from harness.data import load_prepared
    from harness.tools.gguf import Q, Written, tensors_to_write, write_gguf

    prepared = load_prepared()
    model, _ = load_verified(run_dir / "artifact", prepared.model_dir)
    written, _ = tensors_to_write(model, run_dir / "artifact", prepared.model_dir, None)
    for name, item in written.items():
        if item.qtype == Q.F32 and item.data.ndim == 2:
            written[name] = Written(Q.F16, item.data.astype("float16"), None)
    target.parent.mkdir(parents=True, exist_ok=True)
    write_gguf(target, model, prepared.model_dir, written)
    return target


def probe(path: Path, prompt: list[int], gen_tokens: int, rounds: int) -> dict:
    """In this process: llama.cpp on `path`, timed on the prompt and on greedy generation."""
    import llama_cpp

    llm = llama_cpp.Llama(str(path), n_ctx=len(prompt) + gen_tokens, n_batch=len(prompt),
                          n_ubatch=len(prompt), n_threads=os.cpu_count(),
                          verbose=False)  # fmt: skip
    prompt_speed, gen_speed = [], []
    for round_index in range(rounds + 1):
        llm.reset()
        start = time.perf_counter()
        llm.eval(prompt)
        prompted = time.perf_counter()
        for _ in range(gen_tokens):
            llm.eval([llm.sample(top_k=1, temp=0.0)])
        done = time.perf_counter()
        if round_index:  # round 0 warms the caches and the thread pool
            prompt_speed.append(len(prompt) / (prompted - start))
            gen_speed.append(gen_tokens / (done - prompted))
    llm.close()
    return {
        "prompt_tokens_per_s": statistics.median(prompt_speed),
        "gen_tokens_per_s": statistics.median(gen_speed),
        "peak_rss_gb": peak_rss_gb(),
    }


def measure(path: Path, prompt: list[int], gen_tokens: int, rounds: int) -> dict:
    """probe() in a fresh subprocess, plus the file's size."""
    command = [sys.executable, __file__, "--probe", str(path), "--gen-tokens", str(gen_tokens),
               "--rounds", str(rounds), "--prompt-ids", ",".join(map(str, prompt))]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return {"file_mb": path.stat().st_size / 1e6, **result}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "files", nargs="*", type=Path, help="GGUF files; the first is the reference"
    )
    parser.add_argument(
        "--f16-from",
        type=Path,
        metavar="RUN",
        help="write RUN's model with every dense matrix in F16 to bench/out and put it first",
    )
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--gen-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "gguf_speed.json")
    parser.add_argument("--probe", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--prompt-ids", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.probe:
        prompt = [int(token) for token in args.prompt_ids.split(",")]
        print(json.dumps(probe(args.probe, prompt, args.gen_tokens, args.rounds)))
        return
    if args.f16_from:
        args.files.insert(0, write_f16(args.f16_from, args.out.parent / "f16.gguf"))
    if not args.files:
        parser.error("give the GGUF files to compare, the unquantized one first")

    import llama_cpp

    from harness.data import load_prepared

    prepared = load_prepared()
    prompt = [int(token) for token in prepared.eval.tokens()[: args.prompt_tokens]]
    files = {}
    for path in args.files:
        files[str(path)] = measure(path, prompt, args.gen_tokens, args.rounds)
        print(json.dumps({str(path): files[str(path)]}), flush=True)
    reference = dict(files[str(args.files[0])])
    for figures in files.values():
        figures["vs_reference"] = {key: figures[key] / reference[key] for key in reference}
    report = {
        "date": datetime.now(timezone.utc).isoformat(timespec="minutes"),
        "model": prepared.model_name,
        "cpu": cpu_kind(),
        "threads": os.cpu_count(),
        "llama_cpp_python": llama_cpp.__version__,
        "prompt_tokens": args.prompt_tokens,
        "gen_tokens": args.gen_tokens,
        "rounds": args.rounds,
        "files": files,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
