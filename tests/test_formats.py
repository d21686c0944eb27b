"""Formats: packing, decodes of known values, levels counted per group, lying declarations
caught."""

import pytest
import torch

from harness.formats import (
    E2M1_VALUES,
    E4M3_VALUES,
    FORMATS,
    Format,
    InvalidArtifact,
    Param,
    adapter_params,
    decode_layer,
    e8m0_scale,
    input_quant_of,
    int8_token_absmax,
    max_levels_per_group,
    pack_codes,
    packed_nbytes,
    unpack_codes,
)  # fmt: skip


def random_layer(spec: dict, seed: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Honest random codes and parameters for `spec` (which includes "shape"), as train.py hands
    them over."""
    gen = torch.Generator().manual_seed(seed)
    fmt = FORMATS[spec["format"]]
    codes = torch.randint(0, fmt.levels(spec), spec["shape"], generator=gen)
    if fmt.name == "mxfp8":
        codes[(codes & 0x7F) == 0x7F] -= 1  # S.1111.111 is NaN: use ±448 instead
    params = {}
    for key, param in {**fmt.params(spec), **adapter_params(spec)}.items():
        if param.dtype == torch.uint8:  # E8M0 exponents near 2^-10
            params[key] = torch.randint(112, 120, param.shape, generator=gen).to(torch.uint8)
        else:
            params[key] = ((torch.rand(param.shape, generator=gen) + 0.5) * 0.05).to(
                param.dtype or torch.float32
            )
    return codes, params


def stored(spec: dict, codes: torch.Tensor, params: dict) -> dict[str, torch.Tensor]:
    return {"codes": pack_codes(codes, FORMATS[spec["format"]].levels(spec)), **params}


# --- packing ---


@pytest.mark.parametrize("levels", [2, 3, 4, 5, 8, 16, 256])
@pytest.mark.parametrize("n", [1, 7, 128, 1001])
def test_pack_round_trips(levels, n):
    codes = torch.randint(0, levels, (n,), generator=torch.Generator().manual_seed(n))
    packed = pack_codes(codes, levels)
    assert packed.dtype == torch.uint8 and packed.numel() == packed_nbytes(n, levels)
    assert torch.equal(unpack_codes(packed, n, levels), codes)


def test_packed_sizes_are_the_code_widths():
    assert packed_nbytes(1000, 3) == 200  # ternary: 1.6 bits per weight
    assert [packed_nbytes(1000, 2**k) for k in (1, 2, 3, 4, 8)] == [125, 250, 375, 500, 1000]


def test_pack_refuses_out_of_range_codes():
    with pytest.raises(ValueError):
        pack_codes(torch.tensor([0, 1, 3]), 3)


def test_unpack_rejects_bytes_beyond_base3():
    with pytest.raises(InvalidArtifact, match="base-3"):
        unpack_codes(torch.tensor([243], dtype=torch.uint8), 5, 3)


def test_levels_are_counted_per_group_including_a_short_last_group():
    row = torch.tensor([[1.0, -1.0, 0.0, 1.0, 2.0, 3.0]])  # groups of 4: {1,-1,0}, then {2,3}
    assert max_levels_per_group(row, 4) == 3
    assert max_levels_per_group(row, 2) == 2
    assert max_levels_per_group(row, 6) == 5


# --- decodes of known values ---


def decode(spec: dict, codes: list[list[int]], **params) -> torch.Tensor:
    codes = torch.tensor(codes)
    return decode_layer("w", {**spec, "shape": list(codes.shape)}, stored(spec, codes, params))


def f16(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float16)


def test_ternary_decodes_to_signs_times_group_scale():
    spec = {"format": "ternary", "group_size": 2}
    weight = decode(spec, [[0, 1, 2]], scale=f16([[2.0, 0.5]]))
    assert weight.tolist() == [[-2.0, 0.0, 0.5]]


def test_codebook_levels_have_no_zero():
    two_bit = decode({"format": "codebook", "bits": 2}, [[0, 1, 2, 3]], scale=f16([[2.0]]))
    assert two_bit.tolist() == [[-3.0, -1.0, 1.0, 3.0]]
    four_bit = decode(
        {"format": "codebook", "bits": 4, "group_size": 2}, [[0, 15, 7, 8]], scale=f16([[1.0, 2.0]])
    )
    assert four_bit.tolist() == [[-7.5, 7.5, -1.0, 1.0]]


def test_int_symmetric_and_affine():
    symmetric = decode(
        {"format": "int", "bits": 4, "symmetric": True}, [[0, 8, 15]], scale=f16([[0.5]])
    )
    assert symmetric.tolist() == [[-4.0, 0.0, 3.5]]
    affine_spec = {"format": "int", "bits": 2, "symmetric": False, "group_size": 2}
    affine = decode(affine_spec, [[0, 3, 0, 3]], scale=f16([[2.0, 1.0]]), zero=f16([[1.0, 0.5]]))
    assert affine.tolist() == [[-2.0, 4.0, -0.5, 2.5]]


def test_log_is_sign_and_power_of_two():
    # 3 bits: c = sign * 4 + m; m = 0 -> 0, else 2^(m - 3) x s
    weight = decode({"format": "log", "bits": 3}, [[0, 1, 2, 3, 4, 5, 7]], scale=f16([[8.0]]))
    assert weight.tolist() == [[0.0, 2.0, 4.0, 8.0, 0.0, -2.0, -8.0]]


def test_e2m1_codes_follow_the_ocp_mx_spec():
    assert E2M1_VALUES.tolist() == [0, 0.5, 1, 1.5, 2, 3, 4, 6, 0, -0.5, -1, -1.5, -2, -3, -4, -6]
    assert (E2M1_VALUES[0b0111], E2M1_VALUES[0b1010], E2M1_VALUES[0b0001]) == (6.0, -1.0, 0.5)


def test_e4m3_codes_follow_the_ocp_mx_spec():
    assert E4M3_VALUES[0x7E] == 448 and E4M3_VALUES[0xFE] == -448  # the largest normal
    assert E4M3_VALUES[0x08] == 2.0**-6  # the smallest normal
    assert E4M3_VALUES[0x01] == 2.0**-9 and E4M3_VALUES[0x07] == 7 * 2.0**-9  # subnormals
    assert E4M3_VALUES[0x38] == 1.0 and E4M3_VALUES[0x3C] == 1.5 and E4M3_VALUES[0xC0] == -2.0
    assert E4M3_VALUES[0x7F].isnan() and E4M3_VALUES[0xFF].isnan()
    assert E4M3_VALUES.isnan().sum() == 2 and E4M3_VALUES.isinf().sum() == 0


def test_e8m0_scales_are_powers_of_two_and_255_is_nan():
    assert e8m0_scale(torch.tensor([127, 128, 0, 254], dtype=torch.uint8)).tolist() == [
        1.0,
        2.0,
        2.0**-127,
        2.0**127,
    ]
    with pytest.raises(InvalidArtifact, match="255"):
        e8m0_scale(torch.tensor([127, 255], dtype=torch.uint8))


def test_mx_blocks_share_one_exponent():
    exponent = torch.tensor(
        [[128, 126]], dtype=torch.uint8
    )  # x2 for the first block of 2, x0.5 for the rest
    mxfp4 = decode(
        {"format": "mxfp4", "block_size": 2}, [[0b0111, 0b1010, 0b0001]], exponent=exponent
    )
    assert mxfp4.tolist() == [[12.0, -2.0, 0.25]]
    mxfp8 = decode({"format": "mxfp8", "block_size": 2}, [[0x7E, 0x01, 0x38]], exponent=exponent)
    assert mxfp8.tolist() == [[896.0, 2.0**-8, 0.5]]


def test_mx_blocks_default_to_32():
    codes, params = random_layer({"format": "mxfp4", "shape": [2, 48]})
    assert params["exponent"].shape == (2, 2)  # 48 = 1.5 blocks of 32


def test_lut_indexes_a_table_per_group_and_applies_the_low_rank_scale():
    lut = f16([[[0.0, 1.0, 2.0, 3.0], [10.0, 20.0, 30.0, 40.0]]])  # one row, two groups of 2
    plain = decode({"format": "lut", "bits": 2, "group_size": 2}, [[3, 0, 1, 2]], lut=lut)
    assert plain.tolist() == [[3.0, 0.0, 20.0, 30.0]]
    scale_a, scale_b = f16([[2.0]]), f16([[1.0, 2.0, 3.0, 4.0]])
    scaled = decode({"format": "lut", "bits": 2, "group_size": 2, "rank": 1}, [[3, 0, 1, 2]],
                    lut=lut, scale_a=scale_a, scale_b=scale_b)  # fmt: skip
    assert scaled.tolist() == [[6.0, 0.0, 120.0, 240.0]]


# --- every format: honest layers verify, their levels are counted ---

SPECS = [
    {"format": "ternary", "group_size": 8},
    {"format": "codebook", "bits": 2, "group_size": 8},
    {"format": "codebook", "bits": 4},
    {"format": "int", "bits": 4, "symmetric": True, "group_size": 8},
    {"format": "int", "bits": 3, "symmetric": False, "group_size": 8},
    {"format": "log", "bits": 4, "group_size": 8},
    {"format": "mxfp4", "block_size": 8},
    {"format": "mxfp8", "block_size": 8},
    {"format": "lut", "bits": 3, "group_size": 8},
    {"format": "lut", "bits": 2, "group_size": 8, "rank": 2},
]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: "-".join(str(v) for v in s.values()))
def test_an_honest_layer_verifies_and_holds_at_most_its_levels_per_group(spec):
    spec = {**spec, "shape": [8, 20]}  # groups of 8: the last one is short
    codes, params = random_layer(spec)
    weight = decode_layer("w", spec, stored(spec, codes, params))
    fmt = FORMATS[spec["format"]]
    counted = fmt.values(codes, params, spec)
    assert weight.shape == (8, 20) and weight.dtype == torch.float32
    assert 2 <= max_levels_per_group(counted, fmt.group_size(spec)) <= fmt.levels(spec)
    if spec.get(
        "rank"
    ):  # the low-rank scale makes every weight distinct; the LUT levels are what count
        assert max_levels_per_group(weight, 8) > fmt.levels(spec)
    else:
        assert torch.equal(weight, counted)


def test_every_registered_format_is_exercised():
    assert {spec["format"] for spec in SPECS} == set(FORMATS)


class Leaky(Format):
    """A broken format whose 'levels' are per-weight floats: the count must catch it."""

    name = "leaky"

    def levels(self, spec):
        return 2

    def params(self, spec):
        return {"value": Param(tuple(spec["shape"]))}

    def values(self, codes, params, spec):
        return params["value"].float()


def test_a_format_that_decodes_more_levels_than_it_declares_is_caught(monkeypatch):
    monkeypatch.setitem(FORMATS, "leaky", Leaky())
    spec = {"format": "leaky", "shape": [2, 4], "group_size": 4}
    tensors = {"codes": pack_codes(torch.zeros(2, 4), 2), "value": torch.rand(2, 4).half() + 0.1}
    with pytest.raises(InvalidArtifact, match="a group holds 4 distinct values; leaky allows 2"):
        decode_layer("w", spec, tensors)


# --- lying declarations ---


def test_four_bit_codes_declared_as_two_bit_are_caught():
    spec = {"format": "codebook", "bits": 4, "group_size": 4, "shape": [8, 8]}
    codes, params = random_layer(spec)
    tensors = stored(spec, codes, params)
    with pytest.raises(
        InvalidArtifact, match="w: codes hold 32 bytes; 64 codes of 4 levels pack into 16"
    ):
        decode_layer("w", {**spec, "bits": 2}, tensors)


def test_a_scale_per_weight_is_not_a_group_scale():
    spec = {"format": "ternary", "group_size": 4, "shape": [4, 6]}
    codes, _ = random_layer(spec)
    with pytest.raises(
        InvalidArtifact, match=r"w.scale: shape \(4, 6\), the declared spec needs \(4, 2\)"
    ):
        decode_layer("w", spec, {"codes": pack_codes(codes, 3), "scale": torch.ones(4, 6).half()})


def test_codes_packed_at_another_width_are_caught():
    spec = {"format": "ternary", "group_size": 4, "shape": [4, 6]}
    codes, params = random_layer(spec)
    with pytest.raises(InvalidArtifact, match="bytes"):
        decode_layer("w", spec, {"codes": pack_codes(codes, 4), **params})


def test_parameters_must_have_the_declared_dtype():
    spec = {"format": "int", "bits": 4, "symmetric": True, "group_size": 4, "shape": [4, 8]}
    codes, params = random_layer(spec)
    with pytest.raises(
        InvalidArtifact, match="w.scale: dtype torch.float32, the format stores torch.float16"
    ):
        decode_layer("w", spec, stored(spec, codes, {"scale": params["scale"].float()}))
    mx = {"format": "mxfp4", "block_size": 4, "shape": [4, 8]}
    codes, params = random_layer(mx)
    with pytest.raises(
        InvalidArtifact, match="w.exponent: dtype torch.float16, the format stores torch.uint8"
    ):
        decode_layer("w", mx, stored(mx, codes, {"exponent": params["exponent"].half()}))


def test_an_affine_int_without_zero_points_is_caught():
    spec = {"format": "int", "bits": 4, "symmetric": False, "group_size": 4, "shape": [4, 8]}
    codes, params = random_layer(spec)
    del params["zero"]
    with pytest.raises(
        InvalidArtifact,
        match=r"stores \['codes', 'scale'\], format int stores \['codes', 'scale', 'zero'\]",
    ):
        decode_layer("w", spec, stored(spec, codes, params))


def test_nan_exponents_and_nan_elements_are_caught():
    spec = {"format": "mxfp8", "block_size": 4, "shape": [4, 8]}
    codes, params = random_layer(spec)
    bad_exponent = params["exponent"].clone()
    bad_exponent[1, 1] = 255
    with pytest.raises(InvalidArtifact, match="w: an E8M0 exponent is 255"):
        decode_layer("w", spec, stored(spec, codes, {"exponent": bad_exponent}))
    codes[2, 3] = 0xFF
    with pytest.raises(InvalidArtifact, match="w: an element code is NaN in mxfp8"):
        decode_layer("w", spec, stored(spec, codes, params))


def test_a_non_finite_scale_or_an_overflowing_decode_is_caught():
    spec = {"format": "codebook", "bits": 2, "group_size": 4, "shape": [4, 8]}
    codes, params = random_layer(spec)
    params["scale"][0, 0] = float("inf")
    with pytest.raises(InvalidArtifact, match="w.scale: must be finite"):
        decode_layer("w", spec, stored(spec, codes, params))
    mx = {"format": "mxfp8", "block_size": 4, "shape": [1, 4]}
    with pytest.raises(InvalidArtifact, match="non-finite"):  # 448 x 2^127 overflows float32
        decode_layer(
            "w",
            mx,
            stored(
                mx,
                torch.tensor([[0x7E] * 4]),
                {"exponent": torch.tensor([[254]], dtype=torch.uint8)},
            ),
        )


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"format": "magic"}, "unknown format 'magic'"),
        ({"bits": 9}, "spec bits=9"),
        ({"bits": "2"}, "spec bits='2'"),
        ({"group_size": 0}, "spec group_size=0"),
        ({"symmetric": None}, "spec symmetric=None"),
        ({"input_quant": {"format": "int4_magic"}}, "unknown input_quant"),
        ({"adapter": {"rank": 0, "alpha": 1}}, "spec rank=0"),
        ({"adapter": {"rank": 2}}, "adapter"),
    ],
)
def test_malformed_specs_are_invalid_not_crashes(change, reason):
    spec = {"format": "int", "bits": 2, "symmetric": True, "group_size": 4, "shape": [4, 8]}
    codes, params = random_layer(spec)
    with pytest.raises(InvalidArtifact, match=reason):
        decode_layer("w", {**spec, **change}, stored(spec, codes, params))


def test_missing_tensors_are_caught():
    spec = {"format": "ternary", "group_size": 4, "shape": [4, 6]}
    codes, _ = random_layer(spec)
    with pytest.raises(InvalidArtifact, match="stores"):
        decode_layer("w", spec, {"codes": pack_codes(codes, 3)})


# --- adapters ---


def test_an_adapter_adds_its_scaled_low_rank_delta_and_is_not_counted_as_levels():
    spec = {
        "format": "codebook",
        "bits": 2,
        "group_size": 8,
        "shape": [6, 16],
        "adapter": {"rank": 2, "alpha": 4},
    }
    codes, params = random_layer(spec)
    assert params["lora_a"].shape == (2, 16) and params["lora_b"].shape == (6, 2)
    weight = decode_layer("w", spec, stored(spec, codes, params))
    plain = {k: v for k, v in spec.items() if k != "adapter"}
    base = decode_layer("w", plain, stored(plain, codes, {"scale": params["scale"]}))
    torch.testing.assert_close(weight, base + 2.0 * params["lora_b"] @ params["lora_a"])
    assert (
        max_levels_per_group(weight, 8) > 4
    )  # merged weights are dense floats; the codes still verify


def test_adapter_factors_must_match_the_declared_rank_and_be_floats():
    spec = {
        "format": "int",
        "bits": 4,
        "symmetric": True,
        "group_size": 4,
        "shape": [6, 8],
        "adapter": {"rank": 2, "alpha": 4},
    }
    codes, params = random_layer(spec)
    with pytest.raises(
        InvalidArtifact, match=r"w.lora_a: shape \(2, 8\), the declared spec needs \(3, 8\)"
    ):
        decode_layer("w", {**spec, "adapter": {"rank": 3, "alpha": 4}}, stored(spec, codes, params))
    with pytest.raises(
        InvalidArtifact, match="w.lora_b: dtype torch.int64, must be floating point"
    ):
        decode_layer("w", spec, stored(spec, codes, {**params, "lora_b": params["lora_b"].long()}))
    bf16 = {**params, "lora_a": params["lora_a"].bfloat16(), "lora_b": params["lora_b"].half()}
    assert (
        decode_layer("w", spec, stored(spec, codes, bf16)).dtype == torch.float32
    )  # any float precision


# --- input fake-quant ---


def test_int8_token_absmax_rounds_each_token_on_its_own_scale():
    x = torch.tensor([[1.0, -0.5, 0.3, 0.0], [254.0, 1.0, 0.5, -127.0], [0.0, 0.0, 0.0, 0.0]])
    expected = torch.tensor([
        [127.0, -64.0, 38.0, 0.0],  # scale 1/127: -63.5 rounds to even -64, 38.1 -> 38
        [127.0, 0.0, 0.0, -64.0],  # scale 2: 0.5 and 0.25 round to 0, -63.5 -> -64
        [0.0, 0.0, 0.0, 0.0],  # an all-zero token stays zero (scale clamped away from 0)
    ]) * torch.tensor([[1 / 127], [2.0], [1e-8]])  # fmt: skip
    torch.testing.assert_close(int8_token_absmax(x), expected)
    assert input_quant_of({"input_quant": {"format": "int8_token_absmax"}}) is int8_token_absmax
    assert input_quant_of({}) is None
