"""Shared fixtures: a tiny real Llama with a real byte-level BPE tokenizer, prepared on WikiText-2.

Everything is built in seconds: the tokenizer is trained on WikiText-2's valid split, the model
is a 2-layer Llama from a config (random weights). Tests point the harness at temp folders
through its environment variables, so nothing touches the checkout's data/, runs/ or results.tsv.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
WIKITEXT = ROOT.parent / "shared" / "data" / "wikitext-2"
sys.path.insert(0, str(ROOT))

TINY_VOCAB = 512
TINY_GROUP = 32  # the tiny model's hidden size 48 gives one full group and one short one
# train.py's flags for the tiny model: steps of seconds on a CPU
TINY_RUN_FLAGS = ["--group-size", str(TINY_GROUP), "--batch-size", "2", "--seq-len", "64"]

# What train.py does differently on a GPU (Triton-compiled quantizers, bf16 autocast by default,
# fp16 with a GradScaler) is tested on "cuda" too, where a GPU is: CI has none, so run these on one.
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEVICES = ["cpu", pytest.param("cuda", marks=needs_cuda)]


def named(name: str):
    """assert_close's msg with name before its mismatch figures (a plain string replaces them)."""
    return lambda detail: f"{name}: {detail}"


def default_sigint() -> None:
    """preexec_fn for a child the test stops with SIGINT: a shell running pytest in the background
    starts it with SIGINT ignored, which the child would inherit and then never see Ctrl-C."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def processes_with(token: str) -> list[int]:
    """Pids whose command line holds `token`: only the test's own processes, never a neighbour's."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and entry.name != str(os.getpid()):
            try:
                if token.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


def wait_until_gone(token: str, seconds: float = 30) -> list[int]:
    deadline = time.monotonic() + seconds
    while processes_with(token) and time.monotonic() < deadline:
        time.sleep(0.2)
    return processes_with(token)


def build_tiny_model_dir(target: Path, hidden_size: int = 48, intermediate_size: int = 96) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TINY_VOCAB, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tokenizer.train([str(WIKITEXT / "valid.txt")], trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )
    config = LlamaConfig(
        vocab_size=TINY_VOCAB,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        eos_token_id=0,
        pad_token_id=0,
        bos_token_id=0,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(target)
    fast.save_pretrained(target)
    return target


def run_prepare(model_dir: Path, data_dir: Path, *extra: str) -> int:
    """prepare.py on the tiny model: WikiText-2's valid split to train, its test split to score."""
    import prepare

    return prepare.main(["--model", str(model_dir), "--train", f"file:{WIKITEXT / 'valid.txt'}",
                         "--eval", f"file:{WIKITEXT / 'test.txt'}", "--data-dir", str(data_dir),
                         *extra])  # fmt: skip


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "tiny-llama")


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """A data dir prepared by prepare.py: tiny model, WikiText-2 valid to train, test to score."""
    data_dir = tmp_path_factory.mktemp("data")
    code = run_prepare(tiny_model_dir, data_dir)
    assert code == 0
    return data_dir


@pytest.fixture(scope="session")
def compile_cache(tmp_path_factory) -> Path:
    """One torch.compile cache for every run of the session: each would otherwise compile cold."""
    return tmp_path_factory.mktemp("compile-cache")


@pytest.fixture
def harness_env(tiny_data_dir, compile_cache, tmp_path, monkeypatch) -> Path:
    """Point the harness (and the processes it starts) at the tiny data and a temp results file."""
    monkeypatch.setenv("HARNESS_DATA_DIR", str(tiny_data_dir))
    monkeypatch.setenv("HARNESS_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.setenv("HARNESS_RESULTS", str(tmp_path / "results.tsv"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HARNESS_COMPILE_CACHE", str(compile_cache))
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    )
    return tmp_path
