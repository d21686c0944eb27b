"""train.py's quantizers one by one: levels per group, idempotence, gradients, known encodings, and
an export the harness verifies whose forward equals the fake-quant training forward; and its
settings, each of which is a flag."""

import ast
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICES, TINY_GROUP, named
from torch import nn
from transformers import AutoModelForCausalLM

import train
from harness import formats
from harness.artifact import load_verified

# (flags, levels per group the decoded weight may hold)
METHODS = {
    "ternary": (["--quant", "ternary"], 3),
    "ternary-deadzone-tanh": (
        ["--quant", "ternary", "--ternary-threshold", "0.7", "--ternary-tanh", "4"],
        3,
    ),
    "ternary-dynamic-scale": (["--quant", "ternary", "--learn-scale", "0"], 3),
    "codebook2": (["--quant", "codebook", "--bits", "2"], 4),
    "codebook4": (["--quant", "codebook", "--bits", "4"], 16),
    "int4-symmetric": (["--quant", "int", "--bits", "4"], 16),
    "int3-affine-per-channel": (
        ["--quant", "int", "--bits", "3", "--int-symmetric", "0", "--group-size", "-1"],
        8,
    ),
    "log4": (["--quant", "log", "--bits", "4"], 15),
    "mxfp4": (["--quant", "mxfp4"], 15),  # +0 and -0 are one value
    "mxfp8": (["--quant", "mxfp8"], 255),
    "lut4": (["--quant", "lut", "--bits", "4"], 16),
    "lut2-lowrank": (
        ["--quant", "lut", "--bits", "2", "--lut-rank", "2"],
        None,
    ),  # levels count before the scale
    "int4-act-int8": (["--quant", "int", "--bits", "4", "--act-quant", "1"], 16),
}


def cfg_for(*flags):
    return train.parse_flags(["--group-size", str(TINY_GROUP), *flags])


def test_every_setting_is_a_flag_wherever_it_is_defined(monkeypatch):
    """Each module-level UPPER_CASE number or string in train.py's source is a flag with that
    default, and a setting the module gains after the others (as an edit appending one would) is
    a flag too: parse_flags collects them when it runs."""
    tree = ast.parse(Path(train.__file__).read_text())
    settings = {
        node.targets[0].id: node.value.value
        for node in tree.body
        if isinstance(node, ast.Assign)
        and isinstance(node.targets[0], ast.Name)
        and node.targets[0].id.isupper()
        and isinstance(node.value, ast.Constant)
        and isinstance(node.value.value, (int, float, str))
    }
    assert {"QUANT", "LR", "STEPS", "DESCRIPTION"} <= settings.keys()
    cfg = train.parse_flags([])
    assert {name: getattr(cfg, name.lower()) for name in settings} == settings
    monkeypatch.setattr(train, "LATE_SETTING", 3, raising=False)
    assert train.parse_flags(["--late-setting", "5"]).late_setting == 5
    assert train.parse_flags([]).late_setting == 3


def layer_for(flags, in_features=48, out_features=24, seed=0, device="cpu"):
    """A QATLinear over a random Linear; in_features 48 = a group of 32 and a short one of 16."""
    torch.manual_seed(seed)
    cfg = cfg_for(*flags)
    fmt, bits = train.format_for("mlp.up_proj", cfg)
    return train.QATLinear(
        nn.Linear(in_features, out_features, bias=False, device=device), fmt, bits, cfg
    )


def group_of(layer):
    return layer.quantizer.group


@pytest.mark.parametrize("method", METHODS)
def test_a_group_holds_no_more_levels_than_the_format(method):
    flags, levels = METHODS[method]
    layer = layer_for(flags, in_features=96)
    with torch.no_grad():
        codes = train.encode_weight(layer.quantizer, layer.weight, layer.params(layer.weight))
        weight = layer.fake_quant_weight()
    assert codes.min() >= 0 and codes.max() < layer.quantizer.levels
    assert formats.max_levels_per_group(codes, group_of(layer)) <= layer.quantizer.levels
    if levels is not None:
        found = formats.max_levels_per_group(weight, group_of(layer))
        assert 2 <= found <= levels


@pytest.mark.parametrize("method", METHODS)
def test_quantizing_a_quantized_weight_changes_nothing(method):
    layer = layer_for(METHODS[method][0])
    q = layer.quantizer
    with torch.no_grad():
        p = layer.params(layer.weight)
        once = train.decode_weight(q, train.encode_weight(q, layer.weight, p), p)
        twice = train.decode_weight(q, train.encode_weight(q, once, p), p)
    torch.testing.assert_close(twice, once, rtol=0, atol=1e-6)


@pytest.mark.parametrize("method", METHODS)
def test_gradients_reach_the_latent_weights_and_move_the_quantized_ones(method):
    layer = layer_for(METHODS[method][0])
    x = torch.randn(64, layer.in_features, generator=torch.Generator().manual_seed(1))
    target = torch.randn(64, layer.out_features, generator=torch.Generator().manual_seed(2))
    optimizer = torch.optim.Adam(layer.parameters(), lr=2e-2)
    start_latent, start_quantized = (
        layer.weight.detach().clone(),
        layer.fake_quant_weight().detach().clone(),
    )
    losses = []
    for _ in range(5):
        loss = F.mse_loss(layer(x), target)
        optimizer.zero_grad()
        loss.backward()
        assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
        if layer.learn:  # learnable scales / LUT entries get a gradient through decode
            assert all(
                p.grad is not None and p.grad.abs().sum() > 0 for p in layer.qparams.parameters()
            )
        optimizer.step()
        losses.append(loss.item())
    assert not torch.equal(layer.weight.detach(), start_latent)
    assert not torch.equal(layer.fake_quant_weight().detach(), start_quantized)
    assert losses[-1] < losses[0]


def step_through(layer, x, upstream, autocast=None):
    """layer's output for x, and the gradients of sum(output * upstream), as a training step
    computes them: the weight from a FakeQuantStep, whose backward() gives w and the parameters
    theirs."""
    with train.FakeQuantStep(layer) as step:
        with torch.autocast(x.device.type, dtype=autocast, enabled=autocast is not None):
            y = layer(x)
        (y * upstream).sum().backward()
        step.backward()
    return y


def assert_step_matches_definition(method, device, autocast=None):
    x = torch.randn(2, 5, 48, generator=torch.Generator().manual_seed(1)).to(device)
    x_stepped, x_eager = x.clone().requires_grad_(), x.clone().requires_grad_()
    stepped, eager = (layer_for(METHODS[method][0], device=device) for _ in range(2))
    upstream = torch.arange(stepped.out_features, device=device).float()
    y_stepped = step_through(stepped, x_stepped, upstream, autocast)
    with torch.autocast(device, dtype=autocast, enabled=autocast is not None):
        y_eager = eager(x_eager)
    (y_eager * upstream).sum().backward()
    torch.testing.assert_close(y_stepped, y_eager, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x_stepped.grad, x_eager.grad, rtol=1e-6, atol=1e-6)
    # the tanh surrogate's slope is a vectorized tanh compiled, libm's eager: a few ulps apart
    torch.testing.assert_close(stepped.weight.grad, eager.weight.grad, rtol=1e-3, atol=1e-4)
    for (name, p), q in zip(stepped.qparams.named_parameters(), eager.qparams.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=named(name))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", METHODS)
def test_the_quantized_step_computes_the_definitions_outputs_and_gradients(method, device):
    """A training step (compiled: the quantized weight a leaf the matmul reads, the parameters'
    gradient from the codes encoded again) and autograd through fake_quantize (the definition,
    what --compile 0 runs) are one computation: same values, same gradients to the input, the
    latent weight and the quantizer parameters."""
    assert_step_matches_definition(method, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", ["ternary", "codebook2", "int4-symmetric", "mxfp4"])
def test_under_bf16_autocast_the_quantized_step_computes_the_definitions_gradients(method, device):
    """bf16 autocast (CUDA's default) casts the weight before its matmul, so dL/dweight reaches
    the leaf through that cast: the same computation all the same."""
    assert_step_matches_definition(method, device, autocast=torch.bfloat16)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", ["int4-symmetric", "ternary-deadzone-tanh"])
def test_a_blended_step_gets_autograds_gradients_of_the_blend(method, device):
    """While lambda < 1 the forward is w + lambda * (q(w) - w): the quantized step's backward
    gives what autograd gives through that expression evaluated eagerly."""
    layer = layer_for(METHODS[method][0], device=device)
    layer.lam = 0.3
    x = torch.randn(6, 48, generator=torch.Generator().manual_seed(1)).to(device)
    upstream = torch.randn(6, layer.out_features, generator=torch.Generator().manual_seed(2)).to(
        device
    )
    step_through(layer, x, upstream)
    w = layer.weight.detach().clone().requires_grad_()
    learned = {k: v.detach().clone().requires_grad_() for k, v in layer.learned().items()}
    weight = w + 0.3 * (train.fake_quantize(layer.quantizer, w, learned) - w)
    (F.linear(x, weight) * upstream).sum().backward()
    torch.testing.assert_close(layer.weight.grad, w.grad, rtol=1e-3, atol=1e-5)
    for name, p in layer.learned().items():
        torch.testing.assert_close(
            p.grad, learned[name].grad, rtol=1e-4, atol=1e-6, msg=named(name)
        )


@pytest.mark.parametrize("device", DEVICES)
def test_a_step_computes_each_weight_once_and_backward_reads_that_weight(device):
    """The step quantizes a layer's weight when it first runs and keeps it until backward: a
    second call reads the same leaf, so its .grad sums both uses, which is w's gradient
    (straight-through: no copy) and, with the codes encoded again from w, the scale's."""
    layer = layer_for(
        ["--quant", "codebook", "--bits", "2"], in_features=64, out_features=32, device=device
    )
    twice = layer_for(
        ["--quant", "codebook", "--bits", "2"], in_features=64, out_features=32, device=device
    )
    x = torch.randn(4, 64, device=device, requires_grad=True)
    expected = layer.fake_quant_weight()
    with train.FakeQuantStep(layer) as step:
        y = layer(x)
        weight = step.weights[layer]
        assert torch.equal(weight, expected) and weight.requires_grad
        y.sum().backward()
        step.backward()
    torch.testing.assert_close(x.grad, torch.ones(4, 32, device=device) @ expected)
    assert layer.weight.grad is weight.grad
    assert layer.fake_quant_step is None and not step.weights  # nothing of the step outlives it
    with train.FakeQuantStep(twice) as step:
        (twice(x) + twice(x)).sum().backward()
        step.backward()
    torch.testing.assert_close(twice.weight.grad, 2 * layer.weight.grad)
    for p, q in zip(twice.qparams.parameters(), layer.qparams.parameters()):
        torch.testing.assert_close(p.grad, 2 * q.grad)


def test_float16_rounding_is_the_casts_compiled_or_not():
    """The stored parameters' rounding equals x.half().float() bit for bit, also compiled, where a
    cast there and back may be skipped: normal and subnormal ties, overflow, signs, infinities."""
    magnitudes = 10.0 ** torch.randint(-9, 6, (20_000,), generator=torch.Generator().manual_seed(0))
    edges = [1 + 2**-11, 1 + 3 * 2**-11, -(1 + 2**-11), 2.0**-14, 2.0**-14 * (1 - 2**-12), 0.0]
    edges += [65504, 65519, 65520, -65520, float("inf"), float("-inf")]
    x = torch.cat([torch.randn(20_000, generator=torch.Generator().manual_seed(1)) * magnitudes,
                   (torch.arange(-64, 64) + 0.5) * 2.0**-24,  # halfway between float16 subnormals
                   torch.tensor(edges)])  # fmt: skip
    expected = x.half().float()
    assert torch.equal(train.float16_value(x), expected)
    assert torch.equal(torch.compile(train.float16_value)(x), expected)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", METHODS)
def test_the_export_verifies_and_computes_the_training_forward(
    method, device, tiny_model_dir, tmp_path
):
    """Trained on the GPU or not, the artifact is verified and evaluated on the CPU."""
    cfg = cfg_for(*METHODS[method][0])
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).to(device)
    train.prepare_qat(model, cfg)
    ids = torch.arange(40)[None] * 7 % 512
    fake_quant_logits = model(input_ids=ids.to(device)).logits.detach().cpu()
    train.export(model, cfg, tiny_model_dir, tmp_path / "artifact")
    verified, report = load_verified(tmp_path / "artifact", tiny_model_dir)
    assert report.formats == {cfg.quant: 14}
    torch.testing.assert_close(
        verified(input_ids=ids).logits, fake_quant_logits, rtol=1e-4, atol=1e-4
    )


def test_ternary_deadzone_widens_the_zero_level():
    narrow, wide = (
        layer_for(["--quant", "ternary"]),
        layer_for(["--quant", "ternary", "--ternary-threshold", "0.9"]),
    )
    with torch.no_grad():
        zeros = [(layer.fake_quant_weight() == 0).float().mean().item() for layer in (narrow, wide)]
    assert zeros[1] > zeros[0] > 0


def test_tanh_proxy_changes_gradients_not_values():
    ste, soft = (
        layer_for(["--quant", "ternary"]),
        layer_for(["--quant", "ternary", "--ternary-tanh", "3"]),
    )
    x = torch.randn(8, 48)
    torch.testing.assert_close(ste(x), soft(x))
    for layer in (ste, soft):
        layer(x).sum().backward()
    assert not torch.allclose(ste.weight.grad, soft.weight.grad)


def test_codebook_scale_init_is_near_the_mse_optimal_clip():
    """On a heavy-tailed weight the Newton clip beats absmax and is within 5% of a grid search."""
    q = train.CodebookQuantizer(2, 128, 256)
    w = torch.distributions.StudentT(3.0).sample((64, 256))

    def error(scale):
        p = {"scale": scale}
        return F.mse_loss(train.decode_weight(q, train.encode_weight(q, w, p), p), w).item()

    newton = q.calibrate(w)["scale"]
    absmax = q.absmax(w) * 2 / q.levels
    searched = min(error(newton * factor) for factor in torch.linspace(0.3, 2.0, 35).tolist())
    assert error(newton) < error(absmax)
    assert error(newton) <= 1.05 * searched


def test_lut_codes_index_each_weights_nearest_entry():
    layer = layer_for(["--quant", "lut", "--bits", "4"], in_features=96)
    q = layer.quantizer
    with torch.no_grad():
        p = layer.params(layer.weight)
        w = layer.weight.unflatten(1, (-1, q.group))  # 96 inputs: 3 whole groups
        nearest = (w.unsqueeze(-1) - p["lut"].sort(-1).values.unsqueeze(-2)).abs().argmin(-1)
        assert torch.equal(train.encode_weight(q, layer.weight, p).long(), nearest.flatten(1))


@pytest.mark.parametrize("bits", [2, 4])
def test_a_short_groups_lut_is_fitted_to_its_own_weights(bits):
    """in_features 48 = a group of 32 and a short one of 16: fitted to its 16 weights (not to a
    padding that repeated one of them), no two entries of the short group's table are equal."""
    q = layer_for(["--quant", "lut", "--bits", str(bits)]).quantizer
    w = torch.randn(24, 48, generator=torch.Generator().manual_seed(0))
    table = q.calibrate(w)["lut"]
    assert table.shape == (24, 2, 2**bits)
    assert (table.diff(dim=-1) > 0).all()  # ascending, no two entries equal


@pytest.mark.parametrize(
    "method",
    [
        "ternary",
        "ternary-dynamic-scale",
        "codebook2",
        "codebook4",
        "int4-symmetric",
        "log4",
        "lut4",
    ],
)
def test_a_short_groups_parameters_are_those_of_its_own_weights(method):
    """The short last group (16 weights of a 32-wide grouping) calibrates to what the same 16
    weights give as a full group of 16."""
    cfg = cfg_for(*METHODS[method][0])
    fmt, bits = train.format_for("mlp.up_proj", cfg)
    torch.manual_seed(0)
    w = torch.distributions.StudentT(3.0).sample((24, 48))
    padded = train.QUANTIZERS[fmt].from_settings(bits, TINY_GROUP, 48, cfg).calibrate(w)
    alone = train.QUANTIZERS[fmt].from_settings(bits, 16, 16, cfg).calibrate(w[:, TINY_GROUP:])
    assert padded.keys() == alone.keys()
    for name in padded:
        torch.testing.assert_close(padded[name][:, 1], alone[name][:, 0], msg=named(name))


def test_mx_encodings_of_known_values_match_the_spec():
    w = torch.zeros(1, 64)
    w[0, :8] = torch.tensor(
        [6.0, -0.5, 1.5, 3.0, 0.0, -6.0, 0.25, 5.0]
    )  # absmax 6: shared exponent 2^0
    w[0, 32:36] = torch.tensor(
        [448.0, 1.0, -2.0, 2.0**-9]
    )  # absmax 448: shared exponent 2^0 for E4M3
    fp4 = train.MXFP4Quantizer(4, 32, 64)
    fp8 = train.MXFP8Quantizer(8, 32, 64)
    p4, p8 = fp4.calibrate(w), fp8.calibrate(w)
    assert p4["exponent"][0, 0] == 127 and p8["exponent"][0, 1] == 127
    assert p8["exponent"][0, 0] == 127 - 8 + 2  # absmax 6 -> 2^(2 - 8)
    codes4 = train.encode_weight(fp4, w, p4).long().flatten()
    # E2M1: sign<<3 | exp<<1 | man; 0.25 is a tie between 0 and 0.5 and rounds to even (0); 5 -> 4
    # (tie, even)
    assert codes4[:8].tolist() == [0b0111, 0b1001, 0b0011, 0b0101, 0b0000, 0b1111, 0b0000, 0b0110]
    codes8 = train.encode_weight(fp8, w, p8).long().flatten()
    assert codes8[32:36].tolist() == [0x7E, 0x38, 0xC0, 0x01]  # 448, 1, -2, smallest subnormal
    for q, p, codes in (
        (fp4, p4, codes4),
        (fp8, p8, codes8),
    ):  # the harness's reference tables agree
        table = formats.E2M1_VALUES if q.name == "mxfp4" else formats.E4M3_VALUES
        scale = torch.exp2(p["exponent"].float() - 127).repeat_interleave(32, dim=1)[0]
        decoded = train.decode_weight(q, codes.view(1, 64).float(), p).flatten()
        torch.testing.assert_close(decoded, table[codes].float() * scale)


def test_mxfp4_codes_are_the_nearest_e2m1_value_ties_to_even():
    fp4 = train.MXFP4Quantizer(4, 32, 64)
    x = torch.cat(
        [torch.linspace(-7, 7, 14_001), torch.arange(-6, 6.25, 0.25)]
    )  # every midpoint is a tie
    codes = fp4.element_codes(x).long()
    table = formats.E2M1_VALUES.float()
    distance = (x.clamp(-6, 6).unsqueeze(1) - table).abs()
    nearest = distance == distance.min(1, keepdim=True).values
    assert nearest.gather(1, codes.unsqueeze(1)).all()  # a nearest value...
    tie = nearest.sum(1) > 1
    assert (
        codes[tie & (x.abs() > 0)] % 2 == 0
    ).all()  # ...and of two, the even code (±0 tie with each other)
    assert torch.equal(fp4.element_values(torch.arange(16.0)), table)


def test_mx_saturates_instead_of_overflowing():
    fp8 = train.MXFP8Quantizer(8, 32, 32)
    w = torch.full((1, 32), 1.0)
    w[0, 0] = 500.0  # absmax 500: exponent 2^0, and 500 > 448 saturates to 448 (never NaN)
    p = fp8.calibrate(w)
    assert train.decode_weight(fp8, train.encode_weight(fp8, w, p), p)[0, 0] == 448.0


def test_activation_quant_matches_the_harness_hook():
    x = torch.randn(2, 5, 48) * torch.tensor([0.01, 1, 100.0]).repeat(16)
    torch.testing.assert_close(
        train.fake_quantize_activation(x), formats.int8_token_absmax(x), rtol=0, atol=0
    )


def test_module_formats_pick_the_first_matching_rule():
    cfg = cfg_for(
        "--quant",
        "ternary",
        "--bits",
        "3",
        "--module-quant",
        "mlp=codebook:2,self_attn=int,o_proj=none,lm_head=int:8",
    )
    assert train.format_for("model.layers.0.mlp.down_proj", cfg) == ("codebook", 2)
    assert train.format_for("model.layers.0.self_attn.q_proj", cfg) == ("int", 3)
    assert train.format_for("model.layers.0.self_attn.o_proj", cfg) == (
        "int",
        3,
    )  # self_attn matched first
    assert train.format_for("lm_head", cfg) == ("int", 8)
    assert train.format_for("lm_head", cfg_for()) is None  # the head stays as stored unless named


def test_per_module_bits_and_a_quantized_head_verify(tiny_model_dir, tmp_path):
    cfg = cfg_for("--module-quant", "mlp=codebook:2,self_attn=int:4,lm_head=int:8")
    model = train.prepare_qat(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32), cfg
    )
    ids = torch.arange(24)[None]
    reference = model(input_ids=ids).logits.detach()
    train.export(model, cfg, tiny_model_dir, tmp_path / "a")
    verified, report = load_verified(tmp_path / "a", tiny_model_dir)
    assert report.formats == {
        "codebook": 6,
        "int": 9,
    }  # 2 layers x 3 MLP, 2 x 4 attention + the head
    torch.testing.assert_close(verified(input_ids=ids).logits, reference, rtol=1e-4, atol=1e-4)


def test_prepare_qat_keeps_the_weights_in_place_but_unties_a_quantized_head(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    before = {name: linear.weight.data_ptr() for name, linear in train.all_linears(model).items()}
    embedding = model.get_input_embeddings().weight
    train.prepare_qat(model, cfg_for("--module-quant", "mlp=codebook:2,lm_head=int:8"))
    after = {name: linear.weight.data_ptr() for name, linear in train.all_linears(model).items()}
    assert isinstance(model.model.layers[0].mlp.up_proj, train.QATLinear)
    assert {n: p for n, p in after.items() if n != "lm_head"} == {
        n: p for n, p in before.items() if n != "lm_head"
    }
    head = model.get_output_embeddings()
    assert isinstance(head, train.QATLinear) and head.weight.data_ptr() != embedding.data_ptr()
    assert torch.equal(head.weight, embedding) and not model.config.tie_word_embeddings
