"""The text the harness scores, as one JSON-lines document for bench/lm_eval/harness_eval.yaml.

    python bench/lm_eval_text.py [--eval-tokens 16384] [--out bench/out/harness_eval.jsonl]

The harness scores tokens 1..N of the prepared eval split (token 0 is context only); this writes
the decoded tokens 0..N, so that lm-eval, which also scores the first token (after its own
end-of-text prefix), sees the same text and the same bytes plus token 0's.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from harness.data import load_prepared  # noqa: E402
from harness.evaluate import EVAL_TOKENS  # noqa: E402
from harness.models import load_tokenizer  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--eval-tokens", type=int, default=EVAL_TOKENS)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "harness_eval.jsonl")
    args = parser.parse_args(argv)
    prepared = load_prepared()
    tokens = prepared.eval.tokens()[: args.eval_tokens + 1]
    text = load_tokenizer(prepared.model_dir).decode(tokens.tolist())
    scored_bytes = int(prepared.token_bytes[tokens[1:]].sum())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"text": text}) + "\n")
    print(f"wrote {args.out}: {len(text.encode())} bytes, the harness scores {scored_bytes}")


if __name__ == "__main__":
    main()
