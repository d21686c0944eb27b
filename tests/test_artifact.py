"""The harness verifies exported artifacts against the prepared model: honest ones pass with the
bits they really store; unquantized, lying, malformed and non-causal ones are refused with a reason.

Artifacts are built here directly with harness.artifact.save on the tiny model (random honest codes
from test_formats.random_layer), so these tests hold whatever train.py's quantizers become."""

import argparse
import json
import math
import os
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from test_formats import random_layer
from torch import nn
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from harness.artifact import (
    DENSE_WEIGHTS,
    QUANT_SPEC,
    QUANT_WEIGHTS,
    QuantizedLinear,
    decoder_weights,
    load_verified,
    owner,  # fmt: skip
    save,
    transposed,
)
from harness.formats import (
    DENSE,
    FORMATS,
    InvalidArtifact,
    decode_layer,
    int8_token_absmax,
    pack_codes,
)
from harness.tools import export as hf_export

IDS = torch.arange(16)[None]


def tiny(model_dir) -> nn.Module:
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)


def quantize(model: nn.Module, spec: dict, names: list[str]) -> dict[str, QuantizedLinear]:
    """Give each named layer honest random codes for `spec`; the model computes with their
    decode."""
    layers = {}
    for seed, name in enumerate(names):
        module, _ = owner(model, f"{name}.weight")
        shape = list(module.weight.shape)[
            :: -1 if transposed(module) else 1
        ]  # a spec's shape is [out, in]
        full = {**spec, "shape": shape}
        codes, params = random_layer(full, seed)
        decoded = decode_layer(
            name, full, {"codes": pack_codes(codes, FORMATS[spec["format"]].levels(full)), **params}
        )
        with torch.no_grad():
            module.weight.copy_(decoded.T if transposed(module) else decoded)
        layers[name] = QuantizedLinear(
            spec["format"], codes, params, {k: v for k, v in spec.items() if k != "format"}
        )
    return layers


def export(model_dir, out_dir, spec: dict):
    """An artifact quantizing every decoder layer with `spec`, and the model it must load as."""
    model = tiny(model_dir)
    save(out_dir, quantize(model, spec, list(decoder_weights(model))))
    return out_dir, model


def edit_declaration(out_dir, edit):
    declaration = json.loads((out_dir / QUANT_SPEC).read_text())
    edit(declaration)
    (out_dir / QUANT_SPEC).write_text(json.dumps(declaration))


def edit_spec(out_dir, layer, **changes):
    edit_declaration(out_dir, lambda declaration: declaration["layers"][layer].update(changes))


TERNARY = {"format": "ternary", "group_size": 32}  # 48 = one full group and one short one
DECODER = 14  # 2 layers x (4 attention + 3 MLP) projections

# decoder bits per weight from stored bytes on the tiny model (in_features 48 or 96, all multiples
# of 16 and 48)
BPW = [
    ({"format": "codebook", "bits": 2, "group_size": 48}, 2 + 16 / 48),
    ({"format": "int", "bits": 4, "symmetric": True, "group_size": 16}, 4 + 16 / 16),
    ({"format": "int", "bits": 3, "symmetric": False, "group_size": 16}, 3 + 32 / 16),
    ({"format": "log", "bits": 4, "group_size": 48}, 4 + 16 / 48),
    ({"format": "mxfp4", "block_size": 16}, 4 + 8 / 16),
    ({"format": "mxfp8", "block_size": 16}, 8 + 8 / 16),
    ({"format": "lut", "bits": 2, "group_size": 48}, 2 + 4 * 16 / 48),
]


@pytest.mark.parametrize(
    ("spec", "bpw"), BPW, ids=[f"{spec['format']}-{bpw:.3f}bpw" for spec, bpw in BPW]
)
def test_an_honest_export_verifies_with_its_stored_bits(tiny_model_dir, tmp_path, spec, bpw):
    out, reference = export(tiny_model_dir, tmp_path / "a", spec)
    model, report = load_verified(out, tiny_model_dir)
    assert report.formats == {spec["format"]: DECODER}
    assert report.bpw == pytest.approx(bpw, rel=1e-9)
    torch.testing.assert_close(model(input_ids=IDS).logits, reference(input_ids=IDS).logits)


def test_ternary_bits_include_the_short_group_and_base3_packing(tiny_model_dir, tmp_path):
    model, report = load_verified(
        export(tiny_model_dir, tmp_path / "a", TERNARY)[0], tiny_model_dir
    )
    weights = [model.get_parameter(key) for key in decoder_weights(model).values()]
    bits = sum(
        8 * math.ceil(w.numel() / 5) + 16 * w.shape[0] * math.ceil(w.shape[1] / 32) for w in weights
    )
    assert report.bpw == pytest.approx(bits / sum(w.numel() for w in weights))
    assert report.quantized_weights == sum(w.numel() for w in weights)
    embeddings_and_norms = 4 * (
        512 * 48 + 5 * 48
    )  # fp32 as the prepared model stores them; the tied head once
    assert report.other_mb == pytest.approx(embeddings_and_norms / 1e6)
    assert report.size_mb == pytest.approx(report.linear_mb + embeddings_and_norms / 1e6)


def test_low_rank_lut_scales_count_their_bytes(tiny_model_dir, tmp_path):
    out, _ = export(
        tiny_model_dir, tmp_path / "a", {"format": "lut", "bits": 2, "group_size": 48, "rank": 2}
    )
    _, report = load_verified(out, tiny_model_dir)
    shapes = [
        tiny(tiny_model_dir).get_parameter(key).shape
        for key in decoder_weights(tiny(tiny_model_dir)).values()
    ]
    bits = sum(2 * o * i + 4 * 16 * o * i / 48 + 16 * 2 * (o + i) for o, i in shapes)
    assert report.bpw == pytest.approx(bits / sum(o * i for o, i in shapes), rel=1e-9)


def test_an_fp_baseline_is_a_tiny_artifact_that_costs_32_bits(tiny_model_dir, tmp_path):
    save(tmp_path / "fp", {}, dense=list(decoder_weights(tiny(tiny_model_dir))))
    assert sorted(path.name for path in (tmp_path / "fp").iterdir()) == [QUANT_SPEC, QUANT_WEIGHTS]
    assert (
        sum(path.stat().st_size for path in (tmp_path / "fp").iterdir()) < 2000
    )  # no weights: the prepared model's
    model, report = load_verified(tmp_path / "fp", tiny_model_dir)
    assert report.formats == {DENSE: DECODER} and report.bpw == 32.0
    torch.testing.assert_close(
        model(input_ids=IDS).logits, tiny(tiny_model_dir)(input_ids=IDS).logits, rtol=0, atol=0
    )


# --- what the folder may hold ---


def test_a_plain_hf_save_is_not_an_artifact(tiny_model_dir, tmp_path):
    tiny(tiny_model_dir).save_pretrained(tmp_path / "plain")
    with pytest.raises(
        InvalidArtifact, match="only quant.json, quant.safetensors and dense.safetensors are read"
    ):
        load_verified(tmp_path / "plain", tiny_model_dir)


@pytest.mark.parametrize(
    "extra", ["config.json", "pytorch_model.bin", "model.safetensors", "modeling_llama.py"]
)
def test_any_other_file_in_the_artifact_is_refused(tiny_model_dir, tmp_path, extra):
    """A config could change the architecture (is_causal, attention), a .bin is a pickle, .py is
    code."""
    out, _ = export(tiny_model_dir, tmp_path / "a", TERNARY)
    (out / extra).write_text(json.dumps({"is_causal": False}))
    with pytest.raises(InvalidArtifact, match=rf"{extra} in the artifact: only quant.json"):
        load_verified(out, tiny_model_dir)


def test_a_folder_or_a_symlink_in_the_artifact_is_refused(tiny_model_dir, tmp_path):
    out, _ = export(tiny_model_dir, tmp_path / "a", TERNARY)
    (out / "nested").mkdir()
    with pytest.raises(InvalidArtifact, match="nested in the artifact"):
        load_verified(out, tiny_model_dir)
    (out / "nested").rmdir()
    (out / QUANT_WEIGHTS).rename(tmp_path / "elsewhere.safetensors")
    os.symlink(tmp_path / "elsewhere.safetensors", out / QUANT_WEIGHTS)
    with pytest.raises(InvalidArtifact, match="quant.safetensors is a symlink"):
        load_verified(out, tiny_model_dir)
    os.symlink(out, tmp_path / "link")
    with pytest.raises(InvalidArtifact, match="not a folder"):
        load_verified(tmp_path / "link", tiny_model_dir)


def test_missing_or_oversized_files_are_refused(tiny_model_dir, tmp_path):
    out, _ = export(tiny_model_dir, tmp_path / "a", TERNARY)
    cap = 2 * 4 * sum(p.numel() for p in tiny(tiny_model_dir).parameters()) + (
        16 << 20
    )  # all fp32, the tied head once
    save_file({"x": torch.zeros(cap // 4 + 1, dtype=torch.float32)}, out / DENSE_WEIGHTS)
    size = (out / DENSE_WEIGHTS).stat().st_size
    with pytest.raises(
        InvalidArtifact, match=f"dense.safetensors is {size} bytes, over its cap of {cap}"
    ):
        load_verified(out, tiny_model_dir)
    (out / DENSE_WEIGHTS).unlink()
    (out / QUANT_SPEC).write_text(" " * (4 << 20) + "{}")
    with pytest.raises(InvalidArtifact, match="quant.json is 4194306 bytes, over its cap"):
        load_verified(out, tiny_model_dir)
    (out / QUANT_WEIGHTS).unlink()
    (out / QUANT_SPEC).unlink()
    with pytest.raises(InvalidArtifact, match="no quant.json"):
        load_verified(out, tiny_model_dir)


MALFORMED = {
    "not-json": (b"{'version': 2", "quant.json is not JSON"),
    "not-utf8": (b"\xff\xfe\xfa", "quant.json is not JSON"),
    "a-list": (json.dumps([2, {}]).encode(), "quant.json holds a list, not an object"),
    "old-version": (
        json.dumps({"version": 1, "layers": {}}).encode(),
        "quant.json version 1, expected 2",
    ),
    "layers-a-list": (
        json.dumps({"version": 2, "layers": []}).encode(),
        "layers is list, not an object",
    ),
    "a-string-spec": (
        json.dumps({"version": 2, "layers": {"model.layers.0.mlp.up_proj": "ternary"}}).encode(),
        "up_proj: 'ternary' is not an object naming a format",
    ),
    "a-list-format": (
        json.dumps({"version": 2, "layers": {"lm_head": {"format": ["int"]}}}).encode(),
        "lm_head: .* is not an object naming a format",
    ),
    "deep-nesting": (b"[" * 100_000, "quant.json is not JSON"),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_a_malformed_quant_json_is_a_verdict(tiny_model_dir, tmp_path, case):
    out, _ = export(tiny_model_dir, tmp_path / "a", TERNARY)
    text, reason = MALFORMED[case]
    (out / QUANT_SPEC).write_bytes(text)
    with pytest.raises(InvalidArtifact, match=reason):
        load_verified(out, tiny_model_dir)


BAD_SPECS = {
    "three-dims": (
        {"shape": [48, 48, 1]},
        r"declared shape \[48, 48, 1\], the model has \[48, 48\]",
    ),
    "a-string-dim": ({"shape": [48, "48"]}, "declared shape"),
    "a-float-dim": ({"shape": [48, 48.0]}, "declared shape"),
    "no-shape": ({"shape": None}, "declared shape None"),
    "huge-group": ({"group_size": 10**12}, "group size 1000000000000 exceeds in_features 48"),
    "zero-group": ({"group_size": 0}, "q_proj: spec group_size=0"),
    "unknown-format": ({"format": "int2magic"}, "unknown format 'int2magic'"),
    "string-alpha": ({"adapter": {"rank": 2, "alpha": "16"}}, "q_proj: adapter"),
    "listed-input-quant": (
        {"input_quant": {"format": ["int8_token_absmax"]}},
        "q_proj: malformed spec",
    ),
}


@pytest.mark.parametrize("case", BAD_SPECS)
def test_a_bad_layer_spec_is_a_verdict(tiny_model_dir, tmp_path, case):
    out, _ = export(tiny_model_dir, tmp_path / "a", TERNARY)
    changes, reason = BAD_SPECS[case]
    edit_spec(out, "model.layers.0.self_attn.q_proj", **changes)
    with pytest.raises(InvalidArtifact, match=reason):
        load_verified(out, tiny_model_dir)


@pytest.mark.parametrize("name", [QUANT_WEIGHTS, DENSE_WEIGHTS])
def test_a_corrupt_safetensors_file_is_a_verdict(tiny_model_dir, tmp_path, name):
    out, _ = export(tiny_model_dir, tmp_path / "a", TERNARY)
    (out / name).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}")
    with pytest.raises(InvalidArtifact, match=f"{name} does not load"):
        load_verified(out, tiny_model_dir)


# --- every matmul weight is declared and honest ---


def test_an_undeclared_linear_is_not_quantized(tiny_model_dir, tmp_path):
    out, _ = export(tiny_model_dir, tmp_path / "a", TERNARY)
    edit_declaration(
        out, lambda declaration: declaration["layers"].pop("model.layers.1.mlp.down_proj")
    )
    tensors = {
        k: v
        for k, v in load_file(out / QUANT_WEIGHTS).items()
        if not k.startswith("model.layers.1.mlp.down_proj.")
    }
    save_file(tensors, out / QUANT_WEIGHTS)
    with pytest.raises(InvalidArtifact, match="down_proj has no format in quant.json"):
        load_verified(out, tiny_model_dir)


def test_a_layer_the_model_lacks_is_refused(tiny_model_dir, tmp_path):
    out, _ = export(tiny_model_dir, tmp_path / "a", TERNARY)
    edit_declaration(
        out,
        lambda declaration: declaration["layers"].update(
            {"model.embed_tokens": {"format": "dense"}}
        ),
    )
    with pytest.raises(
        InvalidArtifact, match=r"not matmul weights of the model: \['model.embed_tokens'\]"
    ):
        load_verified(out, tiny_model_dir)


def test_a_lying_group_size_is_caught(tiny_model_dir, tmp_path):
    out, _ = export(tiny_model_dir, tmp_path / "a", TERNARY)
    edit_spec(
        out, "model.layers.0.self_attn.q_proj", group_size=48
    )  # claims fewer scales than stored
    with pytest.raises(InvalidArtifact, match="q_proj.scale: shape"):
        load_verified(out, tiny_model_dir)


def test_four_bit_codes_declared_as_two_bit_are_caught(tiny_model_dir, tmp_path):
    out, _ = export(
        tiny_model_dir, tmp_path / "a", {"format": "codebook", "bits": 4, "group_size": 16}
    )
    edit_spec(out, "model.layers.1.mlp.up_proj", bits=2)
    with pytest.raises(
        InvalidArtifact,
        match="up_proj: codes hold 2304 bytes; 4608 codes of 4 levels pack into 1152",
    ):
        load_verified(out, tiny_model_dir)


def test_a_nan_exponent_is_caught(tiny_model_dir, tmp_path):
    out, _ = export(tiny_model_dir, tmp_path / "a", {"format": "mxfp4"})
    tensors = load_file(out / QUANT_WEIGHTS)
    tensors["model.layers.0.self_attn.v_proj.exponent"][3, 1] = 255
    save_file(tensors, out / QUANT_WEIGHTS)
    with pytest.raises(InvalidArtifact, match="v_proj: an E8M0 exponent is 255"):
        load_verified(out, tiny_model_dir)


def test_codes_beyond_the_declared_levels_are_caught(tiny_model_dir, tmp_path):
    out, _ = export(tiny_model_dir, tmp_path / "a", TERNARY)
    tensors = load_file(out / QUANT_WEIGHTS)
    tensors["model.layers.0.mlp.up_proj.codes"][0] = 255  # not a base-3 byte
    save_file(tensors, out / QUANT_WEIGHTS)
    with pytest.raises(InvalidArtifact, match="up_proj: a packed ternary byte"):
        load_verified(out, tiny_model_dir)


def test_codes_of_a_dense_layer_are_refused(tiny_model_dir, tmp_path):
    out, _ = export(tiny_model_dir, tmp_path / "a", TERNARY)
    edit_spec(out, "model.layers.0.mlp.up_proj", format=DENSE)
    with pytest.raises(
        InvalidArtifact,
        match=r"tensors for layers with no quantized format: \['model.layers.0.mlp.up_proj'\]",
    ):
        load_verified(out, tiny_model_dir)


def test_a_blended_weight_smuggled_in_dense_tensors_is_refused(tiny_model_dir, tmp_path):
    """Saving w_q + (1 - lambda)(w - w_q) beside the codes: the codes are low-bit, the model would
    not be."""
    out, model = export(tiny_model_dir, tmp_path / "blend", TERNARY)
    original = tiny(tiny_model_dir).model.layers[0].mlp.up_proj.weight
    blended = 0.9 * model.model.layers[0].mlp.up_proj.weight + 0.1 * original
    save_file(
        {"model.layers.0.mlp.up_proj.weight": blended.detach().contiguous()}, out / DENSE_WEIGHTS
    )
    with pytest.raises(InvalidArtifact, match="up_proj.weight is the weight of a quantized layer"):
        load_verified(out, tiny_model_dir)


# --- GPT-2: Conv1D projections, not nn.Linear ---


@pytest.fixture(scope="module")
def gpt2_model_dir(tmp_path_factory):
    """A tiny GPT-2 from a config: attention and MLP are transformers' Conv1D, weight (in, out)."""
    config = GPT2Config(
        vocab_size=512,
        n_positions=64,
        n_embd=32,
        n_layer=2,
        n_head=2,
        bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(0)
    target = tmp_path_factory.mktemp("gpt2") / "tiny-gpt2"
    GPT2LMHeadModel(config).save_pretrained(target)
    return target


def test_an_empty_declaration_of_a_conv1d_model_is_refused_not_zero_bits(gpt2_model_dir, tmp_path):
    save(tmp_path / "empty", {})
    with pytest.raises(
        InvalidArtifact, match="transformer.h.0.attn.c_attn has no format in quant.json"
    ):
        load_verified(tmp_path / "empty", gpt2_model_dir)


def test_conv1d_layers_verify_with_their_transposed_weights(gpt2_model_dir, tmp_path):
    out, reference = export(
        gpt2_model_dir,
        tmp_path / "a",
        {"format": "int", "bits": 4, "symmetric": True, "group_size": 32},
    )
    model, report = load_verified(out, gpt2_model_dir)
    assert sorted(decoder_weights(model)) == [
        f"transformer.h.{i}.{m}"
        for i in (0, 1)
        for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    ]
    assert report.formats == {"int": 8} and report.bpw == pytest.approx(4 + 16 / 32)
    assert model.transformer.h[0].attn.c_attn.weight.shape == (
        32,
        96,
    )  # (in, out), as Conv1D computes
    torch.testing.assert_close(model(input_ids=IDS).logits, reference(input_ids=IDS).logits)
    embeddings_and_rest = 4 * (
        512 * 32 + 64 * 32 + 2 * (4 * 32 + 96 + 32 + 128 + 32) + 2 * 32
    )  # wte, wpe, norms, biases
    assert report.other_mb == pytest.approx(embeddings_and_rest / 1e6)


# --- dense.safetensors ---


def test_dense_tensors_replace_the_prepared_ones_at_their_stored_precision(
    tiny_model_dir, tmp_path
):
    out, reference = export(tiny_model_dir, tmp_path / "a", TERNARY)
    _, plain = load_verified(out, tiny_model_dir)
    norm = torch.linspace(0.5, 1.5, 48).to(torch.bfloat16)
    q_proj = (torch.randn(48, 48) * 0.1).half()
    with torch.no_grad():
        reference.model.norm.weight.copy_(norm)
    edit_spec(out, "model.layers.0.self_attn.q_proj", format=DENSE)
    tensors = {
        k: v
        for k, v in load_file(out / QUANT_WEIGHTS).items()
        if not k.startswith("model.layers.0.self_attn.q_proj.")
    }
    save_file(tensors, out / QUANT_WEIGHTS)
    save_file(
        {"model.norm.weight": norm, "model.layers.0.self_attn.q_proj.weight": q_proj},
        out / DENSE_WEIGHTS,
    )
    reference.model.layers[0].self_attn.q_proj.weight.data.copy_(q_proj)
    model, report = load_verified(out, tiny_model_dir)
    assert model.model.norm.weight.dtype == torch.float32 and torch.equal(
        model.model.norm.weight, norm.float()
    )
    torch.testing.assert_close(model(input_ids=IDS).logits, reference(input_ids=IDS).logits)
    ternary_bytes = 8 * math.ceil(48 * 48 / 5) / 8 + 2 * 48 * 2
    assert report.linear_mb == pytest.approx(
        plain.linear_mb - ternary_bytes / 1e6 + 2 * 48 * 48 / 1e6
    )  # f16 as stored
    assert report.other_mb == pytest.approx(
        plain.other_mb - 2 * 48 / 1e6
    )  # the final norm in bf16, not fp32
    assert report.formats == {"ternary": DECODER - 1, DENSE: 1}


DENSE_REFUSALS = {
    "unknown-key": (
        {"model.layers.7.mlp.up_proj.weight": torch.zeros(96, 48)},
        "layers.7.mlp.up_proj.weight is not a tensor",
    ),
    "wrong-shape": (
        {"model.norm.weight": torch.ones(47)},
        r"model.norm.weight is \(47,\), the model's is \(48,\)",
    ),
    "integers": (
        {"model.norm.weight": torch.ones(48, dtype=torch.int32)},
        "must hold finite floating-point values, not torch.int",
    ),
    "not-finite": (
        {"model.norm.weight": torch.full((48,), float("nan"))},
        "must hold finite floating-point values",
    ),
}


@pytest.mark.parametrize("case", DENSE_REFUSALS)
def test_a_dense_tensor_that_does_not_fit_the_model_is_refused(tiny_model_dir, tmp_path, case):
    out, _ = export(tiny_model_dir, tmp_path / "a", TERNARY)
    tensors, reason = DENSE_REFUSALS[case]
    save_file(tensors, out / DENSE_WEIGHTS)
    with pytest.raises(InvalidArtifact, match=reason):
        load_verified(out, tiny_model_dir)


def test_tied_embeddings_carry_the_head_unless_the_head_is_given(tiny_model_dir, tmp_path):
    out, _ = export(tiny_model_dir, tmp_path / "a", TERNARY)
    _, plain = load_verified(out, tiny_model_dir)
    embeddings, head = torch.randn(512, 48), torch.randn(512, 48)
    save_file({"model.embed_tokens.weight": embeddings}, out / DENSE_WEIGHTS)
    model, report = load_verified(out, tiny_model_dir)
    assert model.lm_head.weight is model.model.embed_tokens.weight and torch.equal(
        model.lm_head.weight, embeddings
    )
    assert report.other_mb == plain.other_mb  # one tensor, counted once
    save_file(
        {"model.embed_tokens.weight": embeddings, "lm_head.weight": head}, out / DENSE_WEIGHTS
    )
    model, report = load_verified(out, tiny_model_dir)
    assert torch.equal(model.model.embed_tokens.weight, embeddings) and torch.equal(
        model.lm_head.weight, head
    )
    assert (
        report.other_mb == pytest.approx(plain.other_mb + 4 * 512 * 48 / 1e6)
        and not model.config.tie_word_embeddings
    )


# --- adapters ---

ADAPTED = {"format": "codebook", "bits": 2, "group_size": 48, "adapter": {"rank": 2, "alpha": 4}}


def test_adapters_are_verified_and_counted_at_stored_precision(tiny_model_dir, tmp_path):
    out, _ = export(tiny_model_dir, tmp_path / "a", ADAPTED)
    model, report = load_verified(out, tiny_model_dir)
    shapes = [model.get_parameter(key).shape for key in decoder_weights(model).values()]
    lora_bits = sum(32 * 2 * (o + i) for o, i in shapes)  # float32 factors
    n = sum(o * i for o, i in shapes)
    assert report.bpw == pytest.approx(2 + 16 / 48 + lora_bits / n, rel=1e-9)
    q_proj = model.model.layers[0].self_attn.q_proj.weight
    stored = load_file(out / QUANT_WEIGHTS)
    delta = (
        2.0
        * stored["model.layers.0.self_attn.q_proj.lora_b"]
        @ stored["model.layers.0.self_attn.q_proj.lora_a"]
    )
    assert delta.abs().max() > 1e-3  # the adapter really changes the weight the model computes with
    plain = {k: v for k, v in ADAPTED.items() if k != "adapter"} | {"shape": list(q_proj.shape)}
    codes = {
        "codes": stored["model.layers.0.self_attn.q_proj.codes"],
        "scale": stored["model.layers.0.self_attn.q_proj.scale"],
    }
    torch.testing.assert_close(q_proj, decode_layer("q", plain, codes) + delta)


def test_the_declared_adapter_is_what_the_model_applies(tiny_model_dir, tmp_path):
    """The evaluated weight follows the declaration, not whatever train.py's model computed."""
    out, reference = export(tiny_model_dir, tmp_path / "a", ADAPTED)
    edit_spec(out, "model.layers.1.self_attn.o_proj", adapter={"rank": 2, "alpha": 8})
    model, _ = load_verified(out, tiny_model_dir)
    stored = load_file(out / QUANT_WEIGHTS)
    extra = (
        2.0
        * stored["model.layers.1.self_attn.o_proj.lora_b"]
        @ stored["model.layers.1.self_attn.o_proj.lora_a"]
    )
    o_proj = reference.model.layers[1].self_attn.o_proj.weight
    torch.testing.assert_close(model.model.layers[1].self_attn.o_proj.weight, o_proj + extra)
    edit_spec(out, "model.layers.1.self_attn.o_proj", adapter=None)
    with pytest.raises(InvalidArtifact, match="o_proj: stores .*lora_a.*, format codebook stores"):
        load_verified(out, tiny_model_dir)


# --- input fake-quant ---


def test_input_quant_is_applied_in_the_evaluated_model(tiny_model_dir, tmp_path):
    spec = {"format": "int", "bits": 4, "symmetric": True, "group_size": 16}
    hooked, _ = export(
        tiny_model_dir, tmp_path / "a", {**spec, "input_quant": {"format": "int8_token_absmax"}}
    )
    model, _ = load_verified(hooked, tiny_model_dir)
    without, _ = load_verified(export(tiny_model_dir, tmp_path / "b", spec)[0], tiny_model_dir)
    down = model.model.layers[1].mlp.down_proj
    seen = {}
    down.register_forward_pre_hook(
        lambda m, args: seen.setdefault("x", args[0]), prepend=True
    )  # before the harness's hook
    down.register_forward_hook(lambda m, args, output: seen.setdefault("y", output))
    logits = model(input_ids=IDS).logits
    assert not torch.allclose(logits, without(input_ids=IDS).logits, atol=1e-5)
    x = seen["x"]
    assert (
        x[0, 0].abs().max() == 0 and torch.isfinite(logits).all()
    )  # token 0 (padding) is all zeros: no 0/0
    torch.testing.assert_close(seen["y"], F.linear(int8_token_absmax(x), down.weight))
    assert not torch.allclose(seen["y"], F.linear(x, down.weight), atol=1e-6)
    scale = (x.abs().amax(dim=-1, keepdim=True) / 127).clamp_min(
        1e-8
    )  # the contract's formula, written out again
    torch.testing.assert_close(
        seen["y"], F.linear((x / scale).round().clamp(-127, 127) * scale, down.weight)
    )


def test_an_unknown_input_quant_is_invalid(tiny_model_dir, tmp_path):
    out, _ = export(tiny_model_dir, tmp_path / "a", TERNARY)
    edit_spec(out, "model.layers.0.mlp.gate_proj", input_quant={"format": "int4_magic"})
    with pytest.raises(InvalidArtifact, match="gate_proj: unknown input_quant"):
        load_verified(out, tiny_model_dir)


# --- output head ---

HEAD = {"format": "codebook", "bits": 2, "group_size": 48}


def test_a_declared_head_is_untied_verified_and_counted_outside_the_decoder(
    tiny_model_dir, tmp_path
):
    """The prepared model ties lm_head to the embeddings: a quantized head gets its own weight,
    the embeddings stay as stored (train.py's --module-quant lm_head=int:8)."""
    model = tiny(tiny_model_dir)
    embeddings = model.get_input_embeddings().weight.detach().clone()
    model.lm_head.weight = nn.Parameter(embeddings.clone())
    save(tmp_path / "head", quantize(model, HEAD, [*decoder_weights(model), "lm_head"]))
    verified, report = load_verified(tmp_path / "head", tiny_model_dir)
    _, without_head = load_verified(
        export(tiny_model_dir, tmp_path / "plain", HEAD)[0], tiny_model_dir
    )
    assert report.bpw == without_head.bpw and report.formats == {"codebook": DECODER + 1}
    head_bytes = 512 * 48 * 2 / 8 + 512 * 1 * 2  # 2-bit codes + one f16 scale per row
    assert report.other_mb == pytest.approx(without_head.other_mb + head_bytes / 1e6)
    assert torch.equal(verified.get_input_embeddings().weight, embeddings)  # embeddings as stored
    tensors = load_file(tmp_path / "head" / QUANT_WEIGHTS)
    stored = {
        key.removeprefix("lm_head."): value
        for key, value in tensors.items()
        if key.startswith("lm_head.")
    }
    head = decode_layer("lm_head", {**HEAD, "shape": [512, 48]}, stored)
    assert torch.equal(verified.lm_head.weight, head) and not torch.equal(head, embeddings)
    assert not verified.config.tie_word_embeddings
    torch.testing.assert_close(verified(input_ids=IDS).logits, model(input_ids=IDS).logits)


@pytest.fixture(scope="module")
def untied_model_dir(tiny_model_dir, tmp_path_factory):
    model = tiny(tiny_model_dir)
    model.config.tie_word_embeddings = False
    model.lm_head.weight = nn.Parameter(torch.randn(512, 48) * 0.02)
    target = tmp_path_factory.mktemp("untied") / "tiny-untied"
    model.save_pretrained(target)
    return target


def test_an_undeclared_untied_head_stays_as_stored_in_other_mb(untied_model_dir, tmp_path):
    out, _ = export(untied_model_dir, tmp_path / "a", TERNARY)
    model, report = load_verified(out, untied_model_dir)
    assert "lm_head" not in decoder_weights(model) and report.formats == {"ternary": DECODER}
    assert torch.equal(model.lm_head.weight, tiny(untied_model_dir).lm_head.weight)
    assert report.other_mb == pytest.approx(
        4 * (2 * 512 * 48 + 5 * 48) / 1e6
    )  # embeddings + head + norms in fp32


# --- causality ---


@pytest.fixture(scope="module")
def bidirectional_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model with `is_causal: false`, which transformers honours with a bidirectional
    mask."""
    target = tmp_path_factory.mktemp("bidirectional") / "tiny-bidirectional"
    shutil.copytree(tiny_model_dir, target)
    config = json.loads((target / "config.json").read_text())
    (target / "config.json").write_text(json.dumps({**config, "is_causal": False}))
    return target


def test_a_model_that_sees_future_tokens_is_refused(bidirectional_model_dir, tmp_path):
    out, _ = export(bidirectional_model_dir, tmp_path / "a", TERNARY)
    with pytest.raises(
        InvalidArtifact, match="not causal: its logits at the first 16 positions move"
    ):
        load_verified(out, bidirectional_model_dir)


# --- python -m harness export RUN --hf DIR ---


def hf_command(*argv) -> int:
    parser = argparse.ArgumentParser()
    hf_export.add_arguments(parser)
    return hf_export.command(parser.parse_args(argv))


def test_export_hf_writes_a_plain_folder_with_the_verified_weights(
    harness_env, tiny_model_dir, capsys
):
    run_dir = harness_env / "runs" / "20260101-000000-beef"
    model = tiny(tiny_model_dir)
    model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())
    save(run_dir / "artifact", quantize(model, HEAD, [*decoder_weights(model), "lm_head"]))
    verified, _ = load_verified(run_dir / "artifact", tiny_model_dir)
    target = harness_env / "out" / "hf"
    assert hf_command("20260101", "--hf", str(target)) == 0
    assert f"wrote {target}" in capsys.readouterr().out
    assert sorted(path.name for path in target.parent.iterdir()) == ["hf"]  # no temp folder left
    loaded = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32)
    assert (
        loaded.lm_head.weight is not loaded.model.embed_tokens.weight
    )  # the quantized head stays untied
    written = loaded.state_dict()
    for key, tensor in verified.state_dict().items():
        assert torch.equal(written[key], tensor), key
    assert (target / "tokenizer.json").read_bytes() == (
        tiny_model_dir / "tokenizer.json"
    ).read_bytes()
    torch.testing.assert_close(
        loaded(input_ids=IDS).logits, verified(input_ids=IDS).logits, rtol=0, atol=0
    )

    assert hf_command(str(run_dir), "--hf", str(target)) == 1
    assert "exists: pass --force" in capsys.readouterr().err
    assert hf_command(str(run_dir), "--hf", str(target), "--force") == 0
    (harness_env / "precious").mkdir()
    (harness_env / "precious" / "notes.txt").write_text("mine")
    assert hf_command(str(run_dir), "--hf", str(harness_env / "precious"), "--force") == 1
    assert (
        "not a model folder" in capsys.readouterr().err
        and (harness_env / "precious" / "notes.txt").exists()
    )


def test_export_hf_of_an_invalid_artifact_is_one_line_and_leaves_nothing(
    harness_env, tiny_model_dir, capsys
):
    run_dir = harness_env / "runs" / "20260101-000000-dead"
    save(run_dir / "artifact", {})  # nothing declared
    (harness_env / "out").mkdir()
    target = harness_env / "out" / "hf"
    assert hf_command(str(run_dir), "--hf", str(target)) == 1
    last = capsys.readouterr().err.splitlines()[-1]  # after transformers' progress bars
    assert last.startswith("export: model.layers.0.self_attn.q_proj has no format in quant.json")
    assert not target.exists() and not any(target.parent.iterdir())
    assert (
        hf_command("nothing", "--hf", str(target)) == 1
        and "no run 'nothing'" in capsys.readouterr().err
    )
