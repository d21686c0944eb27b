"""The harness verifies exported artifacts: honest ones pass with the bits they really store;
unquantized, lying and blended ones are refused with a reason.

Artifacts are built here directly with harness.artifact.save on the tiny model (random honest codes
from test_formats.random_layer), so these tests hold whatever train.py's quantizers become."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from test_formats import random_layer
from torch import nn
from transformers import AutoModelForCausalLM

from harness.artifact import QUANT_SPEC, QUANT_WEIGHTS, QuantizedLinear, decoder_linears, load_verified, save
from harness.formats import FORMATS, InvalidArtifact, decode_layer, int8_token_absmax, pack_codes

IDS = torch.arange(16)[None]


def tiny(tiny_model_dir, untie_head=False) -> nn.Module:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    if untie_head:
        model.config.tie_word_embeddings = False
        model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())
    return model


def quantize(model: nn.Module, spec: dict, names: list[str], hf_weight=lambda decoded, original: decoded):
    """Give each named Linear honest random codes for `spec`; the model computes with their decode
    (or with whatever `hf_weight` makes of it, to build dishonest exports)."""
    modules, layers = dict(model.named_modules()), {}
    for seed, name in enumerate(names):
        linear = modules[name]
        full = {**spec, "shape": list(linear.weight.shape)}
        codes, params = random_layer(full, seed)
        decoded = decode_layer(name, full, {"codes": pack_codes(codes, FORMATS[spec["format"]].levels(full)), **params})
        with torch.no_grad():
            linear.weight.copy_(hf_weight(decoded, linear.weight))
        layers[name] = QuantizedLinear(spec["format"], codes, params, {k: v for k, v in spec.items() if k != "format"})
    return layers


def export(tiny_model_dir, out_dir, spec: dict, **quantize_args):
    model = tiny(tiny_model_dir)
    layers = quantize(model, spec, list(decoder_linears(model)), **quantize_args)
    save(out_dir, model, layers, tokenizer_dir=tiny_model_dir)
    return out_dir


def edit_spec(out_dir, layer, **changes):
    declaration = json.loads((out_dir / QUANT_SPEC).read_text())
    declaration["layers"][layer].update(changes)
    (out_dir / QUANT_SPEC).write_text(json.dumps(declaration))


TERNARY = {"format": "ternary", "group_size": 32}  # 48 = one full group and one short one

# decoder bits per weight from stored bytes on the tiny model (in_features 48 or 96, all multiples of 16 and 48)
BPW = [
    ({"format": "codebook", "bits": 2, "group_size": 48}, 2 + 16 / 48),
    ({"format": "int", "bits": 4, "symmetric": True, "group_size": 16}, 4 + 16 / 16),
    ({"format": "int", "bits": 3, "symmetric": False, "group_size": 16}, 3 + 32 / 16),
    ({"format": "log", "bits": 4, "group_size": 48}, 4 + 16 / 48),
    ({"format": "mxfp4", "block_size": 16}, 4 + 8 / 16),
    ({"format": "mxfp8", "block_size": 16}, 8 + 8 / 16),
    ({"format": "lut", "bits": 2, "group_size": 48}, 2 + 4 * 16 / 48),
]


@pytest.mark.parametrize(("spec", "bpw"), BPW, ids=[f"{spec['format']}-{bpw:.3f}bpw" for spec, bpw in BPW])
def test_an_honest_export_verifies_with_its_stored_bits(tiny_model_dir, tmp_path, spec, bpw):
    out = export(tiny_model_dir, tmp_path / "a", spec)
    model, report = load_verified(out)
    assert report.formats == {spec["format"]: 14}
    assert report.bpw == pytest.approx(bpw, rel=1e-9)
    plain = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    torch.testing.assert_close(model(input_ids=IDS).logits, plain(input_ids=IDS).logits)


def test_ternary_bits_include_the_short_group_and_base3_packing(tiny_model_dir, tmp_path):
    model, report = load_verified(export(tiny_model_dir, tmp_path / "a", TERNARY))
    linears = decoder_linears(model).values()
    bits = sum(8 * math.ceil(m.weight.numel() / 5) + 16 * m.out_features * math.ceil(m.in_features / 32) for m in linears)
    assert report.bpw == pytest.approx(bits / sum(m.weight.numel() for m in linears))
    assert report.quantized_weights == sum(m.weight.numel() for m in linears)


def test_low_rank_lut_scales_count_their_bytes(tiny_model_dir, tmp_path):
    _, report = load_verified(export(tiny_model_dir, tmp_path / "a", {"format": "lut", "bits": 2, "group_size": 48, "rank": 2}))
    shapes = [m.weight.shape for m in decoder_linears(tiny(tiny_model_dir)).values()]
    bits = sum(2 * o * i + 4 * 16 * o * i / 48 + 16 * 2 * (o + i) for o, i in shapes)
    assert report.bpw == pytest.approx(bits / sum(o * i for o, i in shapes), rel=1e-9)


def test_an_fp_export_is_valid_and_costs_32_bits(tiny_model_dir, tmp_path):
    model = tiny(tiny_model_dir)
    save(tmp_path / "fp", model, {}, tokenizer_dir=tiny_model_dir, dense=list(decoder_linears(model)))
    _, report = load_verified(tmp_path / "fp")
    assert report.formats == {"dense": 14} and report.bpw == 32.0


def test_a_plain_hf_save_is_not_an_artifact(tiny_model_dir, tmp_path):
    tiny(tiny_model_dir).save_pretrained(tmp_path / "plain")
    with pytest.raises(InvalidArtifact, match="quant.json"):
        load_verified(tmp_path / "plain")


def test_an_undeclared_linear_is_not_quantized(tiny_model_dir, tmp_path):
    out = export(tiny_model_dir, tmp_path / "a", TERNARY)
    spec = json.loads((out / QUANT_SPEC).read_text())
    del spec["layers"]["model.layers.1.mlp.down_proj"]
    (out / QUANT_SPEC).write_text(json.dumps(spec))
    tensors = {k: v for k, v in load_file(out / QUANT_WEIGHTS).items() if not k.startswith("model.layers.1.mlp.down_proj.")}
    save_file(tensors, out / QUANT_WEIGHTS)
    with pytest.raises(InvalidArtifact, match="down_proj is stored in full precision"):
        load_verified(out)


def test_a_lying_group_size_is_caught(tiny_model_dir, tmp_path):
    out = export(tiny_model_dir, tmp_path / "a", TERNARY)
    edit_spec(out, "model.layers.0.self_attn.q_proj", group_size=48)  # claims fewer scales than stored
    with pytest.raises(InvalidArtifact, match="q_proj.scale: shape"):
        load_verified(out)


def test_four_bit_codes_declared_as_two_bit_are_caught(tiny_model_dir, tmp_path):
    out = export(tiny_model_dir, tmp_path / "a", {"format": "codebook", "bits": 4, "group_size": 16})
    edit_spec(out, "model.layers.1.mlp.up_proj", bits=2)
    with pytest.raises(InvalidArtifact, match="up_proj: codes hold 2304 bytes; 4608 codes of 4 levels pack into 1152"):
        load_verified(out)


def test_a_nan_exponent_is_caught(tiny_model_dir, tmp_path):
    out = export(tiny_model_dir, tmp_path / "a", {"format": "mxfp4"})
    tensors = load_file(out / QUANT_WEIGHTS)
    tensors["model.layers.0.self_attn.v_proj.exponent"][3, 1] = 255
    save_file(tensors, out / QUANT_WEIGHTS)
    with pytest.raises(InvalidArtifact, match="v_proj: an E8M0 exponent is 255"):
        load_verified(out)


def test_a_lambda_blended_export_is_caught(tiny_model_dir, tmp_path):
    """Saving w_q + (1 - lambda)(w - w_q) as the model: the codes are low-bit, the model is not."""
    out = export(tiny_model_dir, tmp_path / "blend", TERNARY, hf_weight=lambda decoded, w: 0.9 * decoded + 0.1 * w)
    with pytest.raises(InvalidArtifact, match="blended or unquantized"):
        load_verified(out)


def test_codes_beyond_the_declared_levels_are_caught(tiny_model_dir, tmp_path):
    out = export(tiny_model_dir, tmp_path / "a", TERNARY)
    tensors = load_file(out / QUANT_WEIGHTS)
    tensors["model.layers.0.mlp.up_proj.codes"][0] = 255  # not a base-3 byte
    save_file(tensors, out / QUANT_WEIGHTS)
    with pytest.raises(InvalidArtifact, match="up_proj: a packed ternary byte"):
        load_verified(out)


# --- adapters ---

ADAPTED = {"format": "codebook", "bits": 2, "group_size": 48, "adapter": {"rank": 2, "alpha": 4}}


def test_adapters_are_verified_and_counted_at_stored_precision(tiny_model_dir, tmp_path):
    out = export(tiny_model_dir, tmp_path / "a", ADAPTED)
    model, report = load_verified(out)
    shapes = [m.weight.shape for m in decoder_linears(model).values()]
    lora_bits = sum(32 * 2 * (o + i) for o, i in shapes)  # float32 factors
    n = sum(o * i for o, i in shapes)
    assert report.bpw == pytest.approx(2 + 16 / 48 + lora_bits / n, rel=1e-9)
    q_proj = model.model.layers[0].self_attn.q_proj.weight
    stored = load_file(out / QUANT_WEIGHTS)
    delta = 2.0 * stored["model.layers.0.self_attn.q_proj.lora_b"] @ stored["model.layers.0.self_attn.q_proj.lora_a"]
    assert delta.abs().max() > 1e-3  # the adapter really changes the weight the model computes with
    plain = {k: v for k, v in ADAPTED.items() if k != "adapter"} | {"shape": list(q_proj.shape)}
    codes = {"codes": stored["model.layers.0.self_attn.q_proj.codes"], "scale": stored["model.layers.0.self_attn.q_proj.scale"]}
    torch.testing.assert_close(q_proj, decode_layer("q", plain, codes) + delta)


def test_a_declared_adapter_the_model_does_not_apply_is_caught(tiny_model_dir, tmp_path):
    out = export(tiny_model_dir, tmp_path / "a", ADAPTED)
    edit_spec(out, "model.layers.1.self_attn.o_proj", adapter={"rank": 2, "alpha": 8})
    with pytest.raises(InvalidArtifact, match="o_proj: model.safetensors differs"):
        load_verified(out)


# --- input fake-quant ---


def test_input_quant_is_applied_in_the_evaluated_model(tiny_model_dir, tmp_path):
    spec = {"format": "int", "bits": 4, "symmetric": True, "group_size": 16}
    out = export(tiny_model_dir, tmp_path / "a", {**spec, "input_quant": {"format": "int8_token_absmax"}})
    model, _ = load_verified(out)
    without, _ = load_verified(export(tiny_model_dir, tmp_path / "b", spec))
    down = model.model.layers[1].mlp.down_proj
    seen = {}
    down.register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0]), prepend=True)  # before the harness's hook
    down.register_forward_hook(lambda m, args, output: seen.setdefault("y", output))
    logits = model(input_ids=IDS).logits
    assert not torch.allclose(logits, without(input_ids=IDS).logits, atol=1e-5)
    x = seen["x"]
    assert x[0, 0].abs().max() == 0 and torch.isfinite(logits).all()  # token 0 (padding) is all zeros: no 0/0
    torch.testing.assert_close(seen["y"], F.linear(int8_token_absmax(x), down.weight))
    assert not torch.allclose(seen["y"], F.linear(x, down.weight), atol=1e-6)
    scale = (x.abs().amax(dim=-1, keepdim=True) / 127).clamp_min(1e-8)  # the contract's formula, written out again
    torch.testing.assert_close(seen["y"], F.linear((x / scale).round().clamp(-127, 127) * scale, down.weight))


def test_an_unknown_input_quant_is_invalid(tiny_model_dir, tmp_path):
    out = export(tiny_model_dir, tmp_path / "a", TERNARY)
    edit_spec(out, "model.layers.0.mlp.gate_proj", input_quant={"format": "int4_magic"})
    with pytest.raises(InvalidArtifact, match="gate_proj: unknown input_quant"):
        load_verified(out)


# --- output head ---


def test_a_declared_lm_head_is_verified_and_counted_outside_the_decoder(tiny_model_dir, tmp_path):
    spec = {"format": "codebook", "bits": 2, "group_size": 48}
    model = tiny(tiny_model_dir, untie_head=True)
    embeddings = model.get_input_embeddings().weight.detach().clone()
    layers = quantize(model, spec, [*decoder_linears(model), "lm_head"])
    save(tmp_path / "head", model, layers, tokenizer_dir=tiny_model_dir)
    verified, report = load_verified(tmp_path / "head")
    _, without_head = load_verified(export(tiny_model_dir, tmp_path / "plain", spec))
    assert report.bpw == without_head.bpw and report.formats == {"codebook": 15}
    head_bytes = 512 * 48 * 2 / 8 + 512 * 1 * 2  # 2-bit codes + one f16 scale per row
    assert report.other_mb == pytest.approx(without_head.other_mb + head_bytes / 1e6)
    torch.testing.assert_close(verified.get_input_embeddings().weight, embeddings)  # embeddings as stored
    tensors = load_file(tmp_path / "head" / QUANT_WEIGHTS)
    stored = {key.removeprefix("lm_head."): value for key, value in tensors.items() if key.startswith("lm_head.")}
    head = decode_layer("lm_head", {**spec, "shape": [512, 48]}, stored)
    assert torch.equal(verified.lm_head.weight, head) and not torch.equal(head, embeddings)


def test_a_declared_lm_head_tied_to_the_embeddings_is_refused(tiny_model_dir, tmp_path):
    model = tiny(tiny_model_dir)
    layers = quantize(model, TERNARY, [*decoder_linears(model), "lm_head"])
    save(tmp_path / "tied", model, layers, tokenizer_dir=tiny_model_dir)
    with pytest.raises(InvalidArtifact, match="tied to the embeddings"):
        load_verified(tmp_path / "tied")
