"""`python -m harness generate --run RUN --prompt TEXT`: does the low-bit model still speak?

bits per byte can look tolerable while the text has turned to word salad. This continues the same
prompts greedily with the prepared full-precision model and with the run's exported model, as the
evaluation sees it (harness.artifact.load_verified: weights decoded from the verified codes), and
prints the two continuations one under the other.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from harness.artifact import load_verified
from harness.data import DataError, load_prepared
from harness.formats import InvalidArtifact
from harness.tools import gguf
from harness.tools.show import RunNotFound, find_run

NEW_TOKENS = 40
DEFAULT_PROMPTS = ("The history of the city", "Scientists have discovered that")


@torch.inference_mode()
def greedy(model, tokenizer, prompt: str, new_tokens: int = NEW_TOKENS) -> str:
    """The model's most likely continuation, token by token; stops early at end of text."""
    from transformers import GenerationConfig

    ids = tokenizer(prompt, return_tensors="pt").input_ids
    # a config of our own: the model's may ask for sampling, temperature or a repetition penalty
    config = GenerationConfig(
        max_new_tokens=new_tokens,
        do_sample=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
    )  # one unpadded sequence: pad is never used
    out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


@dataclass
class Comparison:
    prompt: str
    full_precision: str
    low_bit: str | None  # None when the artifact is not valid


@dataclass
class SideBySide:
    model_name: str  # the full-precision model
    low_bit: str  # "1.73 bpw, 210 x ternary", or why the artifact is invalid
    comparisons: list[Comparison]


def compare(run_dir: Path, prompts: list[str], new_tokens: int = NEW_TOKENS) -> SideBySide:
    """Greedy continuations of each prompt by both models."""
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
    )  # seconds to import: only when used

    prepared = load_prepared()
    model_dir = prepared.model_dir
    tokenizer = AutoTokenizer.from_pretrained(
        model_dir
    )  # one tokenizer: both models see the same ids
    full_precision = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    try:
        low_bit, report = load_verified(run_dir / "artifact", model_dir)
        about = f"{report.bpw:.2f} bpw, " + ", ".join(
            f"{count} x {name}" for name, count in sorted(report.formats.items())
        )
    except InvalidArtifact as err:
        low_bit, about = None, f"invalid artifact: {err}"
    comparisons = [
        Comparison(
            prompt,
            greedy(full_precision, tokenizer, prompt, new_tokens),
            greedy(low_bit.eval(), tokenizer, prompt, new_tokens) if low_bit is not None else None,
        )  # fmt: skip
        for prompt in prompts
    ]
    return SideBySide(prepared.model_name, about, comparisons)


def _breaks_marked(text: str) -> str:
    return text.replace("\n", " ⏎ ")  # one line per model keeps the two aligned for the eye


def format_side_by_side(run_id: str, result: SideBySide) -> str:
    lines = [
        f"full precision: {result.model_name}",
        f"low-bit:        run {run_id} ({result.low_bit})",
    ]
    for item in result.comparisons:
        lines += [
            "",
            f"prompt: {item.prompt}",
            f"  full precision | {_breaks_marked(item.full_precision)}",
        ]
        low_bit = "(no valid artifact)" if item.low_bit is None else _breaks_marked(item.low_bit)
        lines.append(f"  low-bit        | {low_bit}")
    return "\n".join(lines) + "\n"


# --- command line ---


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", required=True, help="run id or a unique prefix of one")
    parser.add_argument(
        "--prompt", action="append", help=f"repeatable (default: {' / '.join(DEFAULT_PROMPTS)})"
    )
    parser.add_argument(
        "--tokens", type=int, default=NEW_TOKENS, help="new tokens per continuation"
    )
    parser.add_argument(
        "--gguf", type=Path, help="also continue with llama.cpp from this file (export --gguf)"
    )


def command(args: argparse.Namespace) -> int:
    prompts = args.prompt or list(DEFAULT_PROMPTS)
    try:
        run_dir = find_run(args.run)
        result = compare(run_dir, prompts, args.tokens)
        text = format_side_by_side(run_dir.name, result)
        if args.gguf:
            text += gguf.format_continuations(args.gguf, prompts, args.tokens)
    except (RunNotFound, DataError, gguf.GGUFError) as err:
        print(err, file=sys.stderr)
        return 1
    sys.stdout.write(text)
    return 0 if all(item.low_bit is not None for item in result.comparisons) else 1
