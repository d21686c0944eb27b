"""`python -m harness export RUN --hf DIR [--force]`: a run's verified model as a plain HF folder.

An artifact holds only codes and the tensors a run changed; anything outside the harness wants a
folder `AutoModelForCausalLM.from_pretrained` loads. This writes exactly what the evaluation scored
(harness.artifact.load_verified against the prepared model: weights decoded from the verified codes)
as config, fp32 weights and the prepared model's tokenizer files, into a temp folder beside DIR that
is renamed to DIR only once it reloads with the same weights. Input fake-quant (a forward hook in
the evaluation) has no place in an HF folder and is dropped, with a note.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

from harness.artifact import QUANT_SPEC, load_verified, read_declaration
from harness.data import DataError, load_prepared
from harness.formats import InvalidArtifact
from harness.tools import gguf
from harness.tools.show import RunNotFound, find_run

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
)


class ExportError(Exception):
    """The folder cannot be written as asked; the message says why."""


def run_folder(run: str) -> Path:
    """A path to a run folder, or a run id (or unique prefix) under runs/."""
    return Path(run) if Path(run).is_dir() else find_run(run)


def check_target(target: Path, force: bool) -> None:
    """An existing DIR is replaced only with --force, and only if it is a model folder (or empty):
    --force must never delete anything else."""
    if not target.exists() and not target.is_symlink():
        return
    if not force:
        raise ExportError(f"{target} exists: pass --force to replace it")
    if (
        target.is_symlink()
        or not target.is_dir()
        or (any(target.iterdir()) and not (target / "config.json").exists())
    ):
        raise ExportError(
            f"{target} is not a model folder (no config.json): refusing to replace it"
        )


def check_written(folder: Path, model: nn.Module) -> None:
    """The folder loads with plain transformers and holds exactly the verified model's tensors."""
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).state_dict()
    for key, tensor in model.state_dict().items():
        if key not in loaded or not torch.equal(loaded[key], tensor):
            raise ExportError(
                f"{key} of the written folder is not the verified model's: not exported"
            )


def export_hf(run_dir: Path, target: Path, force: bool = False) -> str:
    """Verify the run's artifact, write it to `target` as a plain HF folder -> what was written."""
    check_target(target, force)
    model_dir = load_prepared().model_dir
    model, report = load_verified(run_dir / "artifact", model_dir)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        for name in TOKENIZER_FILES:
            if (model_dir / name).exists():
                shutil.copy(model_dir / name, tmp / name)
        check_written(tmp, model)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    hooked = sum(
        "input_quant" in spec
        for spec in read_declaration(run_dir / "artifact" / QUANT_SPEC).values()
    )
    note = f"; {hooked} layers' input fake-quant is not in it" if hooked else ""
    return f"wrote {target} ({report.bpw:.4f} bpw verified, weights stored as fp32{note})"


# --- command line ---


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "run", help="run id (or a unique prefix of one) under runs/, or a path to a run folder"
    )
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--hf", type=Path, help="the plain Hugging Face folder to write")
    target.add_argument(
        "--gguf", type=Path, help="a GGUF file for llama.cpp (Llama models, exact types)"
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="replace the target if it exists (a model folder or GGUF)",
    )
    gguf.add_arguments(parser)


def command(args: argparse.Namespace) -> int:
    try:
        if args.gguf:
            print(gguf.export_gguf(run_folder(args.run), args.gguf, args.force, args.check,
                                   args.lossy, args.eval_tokens))  # fmt: skip
        else:
            print(export_hf(run_folder(args.run), args.hf, args.force))
    except (
        gguf.GGUFError,
        RunNotFound,
        DataError,
        InvalidArtifact,
        ExportError,
        OSError,
        RuntimeError,
        ValueError,
    ) as err:
        print(
            f"export: {str(err).splitlines()[0] if str(err) else type(err).__name__}",
            file=sys.stderr,
        )
        return 1
    return 0
