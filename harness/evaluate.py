"""Bits per byte on held-out text, computed on a verified artifact in a process of its own.

    python -m harness.evaluate ARTIFACT_DIR --out eval.json [--eval-tokens N]
    python -I -m harness.evaluate ARTIFACT_DIR --verdict-fd 3 ...  # as the runner starts it

bits/byte = sum of target-token NLL in nats / (ln 2 x UTF-8 bytes of those targets). The first
EVAL_TOKENS tokens of the eval file are cut into non-overlapping windows of EVAL_CONTEXT targets; a
window sees the tokens before its targets only within itself. Special tokens (document separators)
are neither scored nor counted as bytes. Deterministic: same artifact, same numbers.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from harness.artifact import load_verified
from harness.data import DataError, atomic_write_json, load_prepared
from harness.formats import InvalidArtifact

EVAL_TOKENS = 65_536  # scored target tokens: one constant, so every row is comparable
EVAL_CONTEXT = 1024  # tokens per window
EVAL_BATCH = 4  # windows per forward pass (CPU memory: logits are batch x 1024 x vocab floats)


@dataclass
class EvalResult:
    val_bpb: float
    val_ppl: float
    nll_nats: float
    targets: int
    utf8_bytes: int


def bits_per_byte(nll_nats: float, utf8_bytes: int) -> float:
    return nll_nats / (math.log(2) * utf8_bytes)


def eval_set_name(
    token_file_name: str, n_tokens: int = EVAL_TOKENS, context: int = EVAL_CONTEXT
) -> str:
    """The name rows are compared under: a different token budget or context is another eval set."""
    return (
        token_file_name
        if (n_tokens, context) == (EVAL_TOKENS, EVAL_CONTEXT)
        else f"{token_file_name}@{n_tokens}x{context}"
    )


@torch.inference_mode()
def evaluate(
    model: torch.nn.Module,
    tokens: np.ndarray,
    token_bytes: np.ndarray,
    n_tokens: int = EVAL_TOKENS,
    context: int = EVAL_CONTEXT,
    batch_size: int = EVAL_BATCH,
    progress: bool = True,
) -> EvalResult:
    if len(tokens) < n_tokens + 1:
        raise DataError(
            f"the eval text has {len(tokens)} tokens; scoring {n_tokens} needs {n_tokens + 1}"
        )
    if n_tokens % context:
        raise ValueError(f"eval tokens ({n_tokens}) must be a multiple of the context ({context})")
    device = next(model.parameters()).device
    model.eval()
    stream = torch.from_numpy(np.asarray(tokens[: n_tokens + 1], dtype=np.int64))
    byte_table = torch.from_numpy(token_bytes.astype(np.int64))
    starts = list(range(0, n_tokens, context))
    nll, counted, n_bytes = 0.0, 0, 0
    for first in tqdm(
        range(0, len(starts), batch_size), desc="eval", unit="batch", disable=not progress
    ):
        rows = [stream[s : s + context + 1] for s in starts[first : first + batch_size]]
        window = torch.stack(rows).to(device)
        inputs, targets = window[:, :-1], window[:, 1:]
        logits = model(input_ids=inputs).logits.float()
        losses = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
        target_bytes = byte_table[targets.flatten().cpu()]
        scored = (target_bytes > 0).to(device)
        nll += float(losses[scored].double().sum())
        counted += int(scored.sum())
        n_bytes += int(target_bytes.sum())
    return EvalResult(
        val_bpb=bits_per_byte(nll, n_bytes),
        val_ppl=math.exp(nll / counted),
        nll_nats=nll,
        targets=counted,
        utf8_bytes=n_bytes,
    )


def deliver(args: argparse.Namespace, verdict: dict) -> None:
    """The verdict goes to --out, or down the runner's pipe: no file another process could race."""
    if args.verdict_fd is None:
        atomic_write_json(args.out, verdict)
        return
    with os.fdopen(args.verdict_fd, "wb") as pipe:
        pipe.write(json.dumps(verdict).encode())


def main(argv: list[str] | None = None) -> int:
    """Verify then score one artifact; always writes --out with status valid or invalid."""
    parser = argparse.ArgumentParser(description="Verify and score an exported artifact.")
    parser.add_argument("artifact", type=Path)
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--out", type=Path, help="where to write the JSON verdict")
    where.add_argument(
        "--verdict-fd", type=int, help="a pipe to write the JSON verdict to (the runner's)"
    )
    parser.add_argument("--eval-tokens", type=int, default=EVAL_TOKENS)
    parser.add_argument("--data-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    started = time.time()
    prepared = load_prepared(args.data_dir, full_check=True)
    verdict = {
        "eval_set": eval_set_name(prepared.eval.name, args.eval_tokens),
        "eval_tokens": args.eval_tokens,
    }
    try:
        model, report = load_verified(args.artifact, prepared.model_dir)
    except InvalidArtifact as err:
        deliver(args, {**verdict, "status": "invalid", "reason": str(err)})
        print(f"invalid artifact: {err}", file=sys.stderr)
        return 0
    result = evaluate(model, prepared.eval.tokens(), prepared.token_bytes, args.eval_tokens)
    if not math.isfinite(result.val_bpb):
        deliver(
            args,
            {
                **verdict,
                "status": "invalid",
                "reason": "the model's loss on eval text is not finite",
            },
        )
        return 0
    deliver(
        args,
        {
            **verdict,
            "status": "valid",
            **asdict(result),
            "bpw": report.bpw,
            "size_mb": report.size_mb,
            "linear_mb": report.linear_mb,
            "other_mb": report.other_mb,
            "formats": report.formats,
            "eval_seconds": time.time() - started,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
