"""The harness verifies exported artifacts: honest ones pass with the bits they really store;
unquantized, lying and blended ones are refused with a reason."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import train
from conftest import TINY_GROUP
from harness.artifact import QUANT_SPEC, QUANT_WEIGHTS, load_verified
from harness.formats import InvalidArtifact


def export_tiny(tiny_model_dir, out_dir, *flags):
    cfg = train.parse_flags(["--group-size", str(TINY_GROUP), *flags])
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    if cfg.quant != "none" and cfg.baseline != "fp":
        train.quantize_model(model, cfg)
    reference = model(input_ids=torch.arange(16)[None]).logits.detach()
    train.export(model, cfg, tiny_model_dir, out_dir)
    return out_dir, reference


def test_an_honest_ternary_export_verifies_with_its_stored_bits(tiny_model_dir, tmp_path):
    out, fake_quant_logits = export_tiny(tiny_model_dir, tmp_path / "a")
    model, report = load_verified(out)
    linears = train.decoder_linears(model)
    expected_bits = sum(
        8 * math.ceil(m.weight.numel() / 5) + 16 * m.out_features * math.ceil(m.in_features / TINY_GROUP)
        for m in linears.values()
    )
    assert report.formats == {"ternary": len(linears)} == {"ternary": 14}
    assert report.bpw == pytest.approx(expected_bits / sum(m.weight.numel() for m in linears.values()))
    logits = model(input_ids=torch.arange(16)[None]).logits
    torch.testing.assert_close(logits, fake_quant_logits, rtol=1e-4, atol=1e-4)


def test_an_fp_export_is_valid_and_costs_32_bits(tiny_model_dir, tmp_path):
    out, _ = export_tiny(tiny_model_dir, tmp_path / "fp", "--baseline", "fp")
    _, report = load_verified(out)
    assert report.formats == {"dense": 14} and report.bpw == 32.0


def test_a_plain_hf_save_is_not_an_artifact(tiny_model_dir, tmp_path):
    AutoModelForCausalLM.from_pretrained(tiny_model_dir).save_pretrained(tmp_path / "plain")
    with pytest.raises(InvalidArtifact, match="quant.json"):
        load_verified(tmp_path / "plain")


def test_an_undeclared_linear_is_not_quantized(tiny_model_dir, tmp_path):
    out, _ = export_tiny(tiny_model_dir, tmp_path / "a")
    spec = json.loads((out / QUANT_SPEC).read_text())
    del spec["layers"]["model.layers.1.mlp.down_proj"]
    (out / QUANT_SPEC).write_text(json.dumps(spec))
    tensors = {k: v for k, v in load_file(out / QUANT_WEIGHTS).items() if not k.startswith("model.layers.1.mlp.down_proj.")}
    save_file(tensors, out / QUANT_WEIGHTS)
    with pytest.raises(InvalidArtifact, match="down_proj is stored in full precision"):
        load_verified(out)


def test_a_lying_group_size_is_caught(tiny_model_dir, tmp_path):
    out, _ = export_tiny(tiny_model_dir, tmp_path / "a")
    spec = json.loads((out / QUANT_SPEC).read_text())
    spec["layers"]["model.layers.0.self_attn.q_proj"]["group_size"] = 48  # claims fewer scales than stored
    (out / QUANT_SPEC).write_text(json.dumps(spec))
    with pytest.raises(InvalidArtifact, match="q_proj.scale: shape"):
        load_verified(out)


def test_a_lambda_blended_export_is_caught(tiny_model_dir, tmp_path):
    """train.py saving w_q + (1 - lambda)(w - w_q) as the model: the codes are ternary, the model is not."""
    cfg = train.parse_flags(["--group-size", str(TINY_GROUP)])
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    train.quantize_model(model, cfg)
    layers = {}
    for name, linear in train.decoder_linears(model).items():
        layers[name], plain = linear.export()
        with torch.no_grad():
            plain.weight.copy_(0.9 * plain.weight + 0.1 * linear.weight)
        train.swap_module(model, name, plain)
    from harness import artifact

    artifact.save(tmp_path / "blend", model, layers, tokenizer_dir=tiny_model_dir)
    with pytest.raises(InvalidArtifact, match="blended or unquantized"):
        load_verified(tmp_path / "blend")


def test_codes_beyond_the_declared_levels_are_caught(tiny_model_dir, tmp_path):
    out, _ = export_tiny(tiny_model_dir, tmp_path / "a")
    tensors = load_file(out / QUANT_WEIGHTS)
    tensors["model.layers.0.mlp.up_proj.codes"][0] = 255  # not a base-3 byte
    save_file(tensors, out / QUANT_WEIGHTS)
    with pytest.raises(InvalidArtifact, match="up_proj: a packed ternary byte"):
        load_verified(out)
