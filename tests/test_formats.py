import pytest
import torch

from harness.formats import (
    InvalidArtifact, decode_layer, max_levels_per_group, pack_codes, packed_nbytes, unpack_codes,
)  # fmt: skip


@pytest.mark.parametrize("levels", [2, 3, 4, 5, 16, 256])
@pytest.mark.parametrize("n", [1, 7, 128, 1001])
def test_pack_round_trips(levels, n):
    codes = torch.randint(0, levels, (n,), generator=torch.Generator().manual_seed(n))
    packed = pack_codes(codes, levels)
    assert packed.dtype == torch.uint8 and packed.numel() == packed_nbytes(n, levels)
    assert torch.equal(unpack_codes(packed, n, levels), codes)


def test_ternary_packs_five_codes_per_byte():
    assert packed_nbytes(1000, 3) == 200  # 1.6 bits per weight
    assert packed_nbytes(1000, 4) == 250


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


def ternary_layer(out=4, inp=6, group=4):
    codes = torch.randint(0, 3, (out, inp), generator=torch.Generator().manual_seed(1))
    scale = torch.rand(out, -(-inp // group)).half() + 0.1
    spec = {"format": "ternary", "shape": [out, inp], "group_size": group}
    return codes, scale, spec


def test_ternary_decodes_to_signs_times_group_scale():
    codes, scale, spec = ternary_layer()
    weight = decode_layer("w", spec, {"codes": pack_codes(codes, 3), "scale": scale})
    expected = (codes.float() - 1) * scale.float().repeat_interleave(4, dim=1)[:, :6]
    assert torch.equal(weight, expected)


def test_a_scale_per_weight_is_not_a_group_scale():
    codes, _, spec = ternary_layer()
    with pytest.raises(InvalidArtifact, match="shape"):
        decode_layer("w", spec, {"codes": pack_codes(codes, 3), "scale": torch.ones(4, 6).half()})


def test_codes_packed_at_another_width_are_caught():
    codes, scale, spec = ternary_layer()
    with pytest.raises(InvalidArtifact, match="bytes"):
        decode_layer("w", spec, {"codes": pack_codes(codes, 4), "scale": scale})


def test_unknown_format_and_missing_tensors_are_caught():
    codes, scale, spec = ternary_layer()
    with pytest.raises(InvalidArtifact, match="unknown format"):
        decode_layer("w", {**spec, "format": "magic"}, {"codes": pack_codes(codes, 3), "scale": scale})
    with pytest.raises(InvalidArtifact, match="stores"):
        decode_layer("w", spec, {"codes": pack_codes(codes, 3)})
