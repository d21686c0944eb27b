import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from harness.data import load_prepared
from harness.evaluate import bits_per_byte, evaluate


class UniformLM(nn.Module):
    """Predicts every token of a `vocab`-sized vocabulary with probability 1/vocab."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab = vocab
        self.anchor = nn.Parameter(torch.zeros(1))

    def forward(self, input_ids):
        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, self.vocab))


def test_bits_per_byte_matches_a_hand_computation():
    # 8 windows of 4 targets over tokens 0..32; token t stands for (t % 3) bytes, so every third
    # target is a special token (0 bytes) and is neither scored nor counted.
    tokens = np.arange(33, dtype=np.uint16)
    token_bytes = np.array([t % 3 for t in range(33)], dtype=np.int32)
    result = evaluate(
        UniformLM(40), tokens, token_bytes, n_tokens=32, context=4, batch_size=3, progress=False
    )
    targets = np.arange(1, 33)
    scored = targets[token_bytes[targets] > 0]
    n_bytes = int(token_bytes[targets].sum())
    assert result.targets == len(scored) == 22 and result.utf8_bytes == n_bytes == 33
    assert result.nll_nats == pytest.approx(len(scored) * math.log(40))
    assert result.val_bpb == pytest.approx(len(scored) * math.log(40) / (math.log(2) * n_bytes))
    assert result.val_ppl == pytest.approx(40.0)
    assert bits_per_byte(math.log(2) * 10, 5) == pytest.approx(2.0)


def test_evaluation_is_deterministic(tiny_model_dir, tiny_data_dir):
    prepared = load_prepared(tiny_data_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    runs = [
        evaluate(model, prepared.eval.tokens(), prepared.token_bytes, n_tokens=8192, progress=False)
        for _ in range(2)
    ]
    assert runs[0] == runs[1]
    assert runs[0].utf8_bytes > runs[0].targets > 8000  # byte-level BPE: several bytes a token


def test_too_short_eval_text_is_refused():
    from harness.data import DataError

    with pytest.raises(DataError, match="needs"):
        evaluate(
            UniformLM(4),
            np.zeros(10, dtype=np.uint16),
            np.ones(4, dtype=np.int32),
            n_tokens=16,
            context=4,
        )
