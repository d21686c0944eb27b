"""Low-bit weight formats: how codes are packed, how a weight is decoded, how many levels a group
holds.

An artifact declares, for each quantized Linear, a format name and its spec (shape, group size,
...). The harness never takes the declaration on trust: `decode_layer` checks every stored tensor's
dtype, shape and byte count against the spec, unpacks the codes, decodes the weight and then counts
the distinct values in each group itself. A new format is one `Format` subclass in `FORMATS`.

Groups run along in_features. When in_features is not a multiple of the group size the last group
of each row is shorter (SmolLM2's hidden size 576 = 4.5 x 128). The formats, their spec keys,
stored tensors and decodes are written down in docs/artifact-format.md; MXFP4/MXFP8 follow the OCP
Microscaling spec v1.0.

Any quantized layer may also carry a LoRA adapter ("adapter": {"rank", "alpha"}, tensors lora_a,
lora_b: the model computes decode + alpha/rank * lora_b @ lora_a, levels are counted on the decode
alone) and an activation fake-quant on its input ("input_quant": {"format": ...}, see INPUT_QUANTS).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch


class InvalidArtifact(Exception):
    """The artifact is not the low-bit model it claims to be; the message says why."""


# --- spec values ---


def spec_int(
    spec: dict, key: str, default: int | None = None, low: int = 1, high: int | None = None
) -> int:
    """An integer setting of the spec, checked to lie in [low, high]; absent = default."""
    value = spec.get(key, default)
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or value < low
        or (high is not None and value > high)
    ):
        raise InvalidArtifact(
            f"spec {key}={value!r}: expected an integer in [{low}, {high if high else 'inf'}]"
        )
    return value


def group_size_of(spec: dict) -> int:
    """Group size along in_features; absent, None or -1 means one group per output channel."""
    in_features = spec["shape"][1]
    return in_features if spec.get("group_size") in (None, -1) else spec_int(spec, "group_size")


# --- groups ---


def n_groups(in_features: int, group_size: int) -> int:
    return math.ceil(in_features / group_size)


def expand_groups(per_group: torch.Tensor, in_features: int, group_size: int) -> torch.Tensor:
    """(out, n_groups) -> (out, in_features): each group's value repeated over its columns."""
    return per_group.repeat_interleave(group_size, dim=1)[:, :in_features]


def max_levels_per_group(weight: torch.Tensor, group_size: int) -> int:
    """The largest number of distinct values found in any group of `weight` (out, in)."""
    out_features, in_features = weight.shape
    pad = n_groups(in_features, group_size) * group_size - in_features
    if pad:  # repeat the last column: it adds no new value to the short group
        weight = torch.cat([weight, weight[:, -1:].expand(out_features, pad)], dim=1)
    groups = weight.reshape(out_features, -1, group_size).sort(dim=-1).values
    distinct = (groups[..., 1:] != groups[..., :-1]).sum(dim=-1) + 1
    return int(distinct.max())


# --- packing ---

_TRIT_WEIGHTS = torch.tensor([81, 27, 9, 3, 1], dtype=torch.int32)


def code_bits(levels: int) -> float:
    """Bits one code occupies once packed: 3 levels pack five to a byte (1.6 bits)."""
    return 8 / 5 if levels == 3 else max(1, math.ceil(math.log2(levels)))


def packed_nbytes(n_codes: int, levels: int) -> int:
    if levels == 3:
        return math.ceil(n_codes / 5)
    return math.ceil(n_codes * int(code_bits(levels)) / 8)


def pack_codes(codes: torch.Tensor, levels: int) -> torch.Tensor:
    """Integer codes in [0, levels) of any shape -> flat uint8 tensor of packed_nbytes bytes."""
    flat = codes.reshape(-1).to(torch.int32)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= levels):
        raise ValueError(f"codes must lie in [0, {levels})")
    if levels == 3:
        flat = torch.cat([flat, flat.new_zeros(-flat.numel() % 5)])
        return (flat.view(-1, 5) * _TRIT_WEIGHTS).sum(dim=1).to(torch.uint8)
    bits = int(code_bits(levels))
    stream = np.unpackbits(flat.to(torch.uint8).numpy()[:, None], axis=1, bitorder="little")[
        :, :bits
    ]
    return torch.from_numpy(np.packbits(stream.reshape(-1), bitorder="little"))


def unpack_codes(packed: torch.Tensor, n_codes: int, levels: int) -> torch.Tensor:
    """Inverse of pack_codes: flat uint8 bytes -> int64 codes, checked to lie in [0, levels)."""
    if packed.dtype != torch.uint8 or packed.dim() != 1:
        raise InvalidArtifact(
            f"codes must be a flat uint8 tensor, got {packed.dtype} {tuple(packed.shape)}"
        )
    expected = packed_nbytes(n_codes, levels)
    if packed.numel() != expected:
        raise InvalidArtifact(
            f"codes hold {packed.numel()} bytes; {n_codes} codes of {levels} levels "
            f"pack into {expected}"
        )
    raw = packed.to(torch.int64)
    if levels == 3:
        if int(raw.max()) > 242:
            raise InvalidArtifact("a packed ternary byte exceeds 3^5 - 1: not base-3 codes")
        codes = (raw[:, None] // _TRIT_WEIGHTS.to(torch.int64)) % 3
    else:
        bits = int(code_bits(levels))
        stream = np.unpackbits(packed.numpy(), bitorder="little")[: n_codes * bits].reshape(
            n_codes, bits
        )
        codes = torch.from_numpy(
            np.packbits(stream, axis=1, bitorder="little")[:, 0].astype(np.int64)
        )
    codes = codes.reshape(-1)[:n_codes]
    if n_codes and int(codes.max()) >= levels:
        raise InvalidArtifact(f"a code exceeds the {levels} levels the format allows")
    return codes


# --- OCP Microscaling (MX v1.0) element and scale encodings ---


def minifloat_values(
    exp_bits: int, man_bits: int, bias: int, nan_codes: tuple[int, ...] = ()
) -> torch.Tensor:
    """code -> value of a sign/exponent/mantissa float with subnormals and no infinities
    (the OCP MX element types); NaN codes decode to NaN."""
    codes = torch.arange(2 ** (1 + exp_bits + man_bits))
    exponent = (codes >> man_bits) & (2**exp_bits - 1)
    fraction = (codes & (2**man_bits - 1)) / 2**man_bits
    normal = (1 + fraction) * torch.exp2((exponent - bias).double())
    magnitude = torch.where(
        exponent == 0, fraction * 2.0 ** (1 - bias), normal
    )  # subnormal: 0.m x 2^(1-bias)
    values = torch.where(codes >> (exp_bits + man_bits) == 1, -magnitude, magnitude).float()
    values[list(nan_codes)] = float("nan")
    return values


E2M1_VALUES = minifloat_values(2, 1, bias=1)  # FP4: ±{0, 0.5, 1, 1.5, 2, 3, 4, 6}, no NaN
E4M3_VALUES = minifloat_values(
    4, 3, bias=7, nan_codes=(0x7F, 0xFF)
)  # FP8: max 448, S.1111.111 = NaN
E8M0_NAN = 255


def e8m0_scale(exponent: torch.Tensor) -> torch.Tensor:
    """uint8 E8M0 shared exponents -> 2^(e - 127) in float32; 255 (NaN) is refused."""
    if (exponent == E8M0_NAN).any():
        raise InvalidArtifact("an E8M0 exponent is 255 (NaN)")
    return torch.exp2(exponent.float() - 127)


# --- formats ---


@dataclass(frozen=True)
class Param:
    """A tensor stored beside the codes: its exact shape and dtype (None: any floating point
    dtype, e.g. LoRA factors kept at their trained precision; the stored bytes count either way)."""

    shape: tuple[int, ...]
    dtype: torch.dtype | None = torch.float16


class Format:
    """One way of storing a Linear weight as integer codes plus a few parameters.

    decode = elementwise(values(codes)); the harness counts distinct `values` per group, so a
    format whose weight carries a non-group factor (LUT with a low-rank scale) is still counted."""

    name: ClassVar[str]

    def levels(self, spec: dict) -> int:
        """How many codes exist (and the most distinct values a group may hold)."""
        return 2 ** spec_int(spec, "bits", high=8)

    def group_size(self, spec: dict) -> int:
        return group_size_of(spec)

    def params(self, spec: dict) -> dict[str, Param]:
        """The tensors stored beside the codes, by name."""
        raise NotImplementedError

    def values(
        self, codes: torch.Tensor, params: dict[str, torch.Tensor], spec: dict
    ) -> torch.Tensor:
        """codes (out, in) int64 -> the float32 values whose levels are counted per group."""
        raise NotImplementedError

    def elementwise(
        self, values: torch.Tensor, params: dict[str, torch.Tensor], spec: dict
    ) -> torch.Tensor:
        """values -> the weight the model computes with; most formats stop at the values."""
        return values

    def group_shape(self, spec: dict) -> tuple[int, int]:
        """(out, number of groups): the shape of a per-group parameter."""
        out_features, in_features = spec["shape"]
        return out_features, n_groups(in_features, self.group_size(spec))

    def expand(self, per_group: torch.Tensor, spec: dict) -> torch.Tensor:
        return expand_groups(per_group.float(), spec["shape"][1], self.group_size(spec))


class GroupScaledFormat(Format):
    """A fixed grid of code values times one float16 scale per group: value = unit(code) * s."""

    def params(self, spec):
        return {"scale": Param(self.group_shape(spec))}

    def unit(
        self, codes: torch.Tensor, params: dict[str, torch.Tensor], spec: dict
    ) -> torch.Tensor:
        raise NotImplementedError

    def values(self, codes, params, spec):
        return self.unit(codes, params, spec) * self.expand(params["scale"], spec)


class TernaryFormat(GroupScaledFormat):
    """{-1, 0, +1} x s (BitNet b1.58). Codes 0, 1, 2 mean -1, 0, +1."""

    name = "ternary"

    def levels(self, spec):
        return 3

    def unit(self, codes, params, spec):
        return codes.float() - 1


class CodebookFormat(GroupScaledFormat):
    """2^k evenly spaced levels symmetric around 0, no zero: 2-bit {-1.5, -0.5, 0.5, 1.5} x s."""

    name = "codebook"

    def unit(self, codes, params, spec):
        return codes.float() - (self.levels(spec) - 1) / 2


class IntFormat(GroupScaledFormat):
    """k-bit integers: symmetric (c - 2^(k-1)) x s, or affine (c - z) x s with a float16 zero
    per group."""

    name = "int"

    def symmetric(self, spec) -> bool:
        if not isinstance(spec.get("symmetric"), bool):
            raise InvalidArtifact(
                f"spec symmetric={spec.get('symmetric')!r}: expected true or false"
            )
        return spec["symmetric"]

    def params(self, spec):
        params = super().params(spec)
        if not self.symmetric(spec):
            params["zero"] = Param(self.group_shape(spec))
        return params

    def unit(self, codes, params, spec):
        zero = self.levels(spec) // 2 if self.symmetric(spec) else self.expand(params["zero"], spec)
        return codes.float() - zero


class LogFormat(GroupScaledFormat):
    """Sign bit + (k-1)-bit power of two: c = sign * 2^(k-1) + m; m = 0 is zero, else
    ±2^(m - (2^(k-1) - 1)) x s, so the largest magnitude is s."""

    name = "log"

    def levels(self, spec):
        return 2 ** spec_int(spec, "bits", low=2, high=8)

    def unit(self, codes, params, spec):
        half = self.levels(spec) // 2
        m = codes % half
        magnitude = torch.where(m == 0, 0.0, torch.exp2((m - (half - 1)).float()))
        return torch.where(codes >= half, -magnitude, magnitude)


class MicroscalingFormat(Format):
    """OCP MX: a minifloat element per weight times a shared E8M0 exponent per block."""

    element_values: ClassVar[torch.Tensor]

    def levels(self, spec):
        return len(self.element_values)

    def group_size(self, spec):
        return spec_int(spec, "block_size", default=32)

    def params(self, spec):
        return {"exponent": Param(self.group_shape(spec), torch.uint8)}

    def values(self, codes, params, spec):
        elements = self.element_values[codes]
        if elements.isnan().any():
            raise InvalidArtifact(f"an element code is NaN in {self.name}")
        return elements * self.expand(e8m0_scale(params["exponent"]), spec)


class MXFP4Format(MicroscalingFormat):
    name = "mxfp4"
    element_values = E2M1_VALUES


class MXFP8Format(MicroscalingFormat):
    name = "mxfp8"
    element_values = E4M3_VALUES


class LUTFormat(Format):
    """A learned float16 table of 2^k values per group: weight = lut[row, group, code], times an
    elementwise low-rank scale scale_a @ scale_b (out, r) x (r, in) when rank > 0."""

    name = "lut"

    def rank(self, spec) -> int:
        return spec_int(spec, "rank", default=0, low=0)

    def params(self, spec):
        out_features, in_features = spec["shape"]
        params = {"lut": Param((*self.group_shape(spec), self.levels(spec)))}
        if rank := self.rank(spec):
            params.update(scale_a=Param((out_features, rank)), scale_b=Param((rank, in_features)))
        return params

    def values(self, codes, params, spec):
        out_features, in_features = spec["shape"]
        table = params["lut"].float().reshape(out_features, -1)  # (out, n_groups * levels)
        group = torch.arange(in_features) // self.group_size(spec)
        return table.gather(1, group * self.levels(spec) + codes)

    def elementwise(self, values, params, spec):
        if not self.rank(spec):
            return values
        return values * (params["scale_a"].float() @ params["scale_b"].float())


FORMATS: dict[str, Format] = {
    f.name: f
    for f in (
        TernaryFormat(),
        CodebookFormat(),
        IntFormat(),
        LogFormat(),
        MXFP4Format(),
        MXFP8Format(),
        LUTFormat(),
    )
}

DENSE = "dense"  # a Linear kept in floating point: allowed, and it costs its stored bits


# --- activations ---


def int8_token_absmax(x: torch.Tensor) -> torch.Tensor:
    """Fake-quantize each token (last dim) to int8 with its own absmax scale."""
    scale = (x.abs().amax(dim=-1, keepdim=True) / 127).clamp_min(1e-8)
    return torch.clamp(torch.round(x / scale), -127, 127) * scale


INPUT_QUANTS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "int8_token_absmax": int8_token_absmax
}


def input_quant_of(spec: dict) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The activation fake-quant a layer declares on its input, or None."""
    declared = spec.get("input_quant")
    if declared is None:
        return None
    quant = INPUT_QUANTS.get(declared.get("format")) if isinstance(declared, dict) else None
    if quant is None:
        raise InvalidArtifact(f"unknown input_quant {declared!r} (known: {sorted(INPUT_QUANTS)})")
    return quant


# --- adapters ---


def adapter_params(spec: dict) -> dict[str, Param]:
    """LoRA factors a layer declares: lora_a (r, in), lora_b (out, r) at any float precision."""
    adapter = spec.get("adapter")
    if adapter is None:
        return {}
    if not isinstance(adapter, dict) or not isinstance(adapter.get("alpha"), (int, float)):
        raise InvalidArtifact(f"adapter {adapter!r}: expected {{'rank': r, 'alpha': a}}")
    rank = spec_int(adapter, "rank")
    out_features, in_features = spec["shape"]
    return {"lora_a": Param((rank, in_features), None), "lora_b": Param((out_features, rank), None)}


def adapter_delta(spec: dict, tensors: dict[str, torch.Tensor]) -> torch.Tensor | float:
    """alpha / rank * lora_b @ lora_a in float32, or 0 without an adapter."""
    adapter = spec.get("adapter")
    if adapter is None:
        return 0.0
    return (
        adapter["alpha"] / adapter["rank"] * (tensors["lora_b"].float() @ tensors["lora_a"].float())
    )


# --- verification ---


def decode_layer(name: str, spec: dict, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """Check one declared layer's stored tensors against its spec and return the weight the model
    computes with (decode + adapter delta).

    `tensors` maps the suffix after `name.` ("codes", "scale", ...) to the stored tensor.
    Raises InvalidArtifact with a reason naming the layer.
    """
    fmt = FORMATS.get(spec.get("format"))
    if fmt is None:
        raise InvalidArtifact(
            f"{name}: unknown format {spec.get('format')!r} (known: {sorted(FORMATS)})"
        )
    try:
        params = {**fmt.params(spec), **adapter_params(spec)}
        input_quant_of(spec)
        levels = fmt.levels(spec)
    except InvalidArtifact as err:
        raise InvalidArtifact(f"{name}: {err}") from None
    if set(tensors) != {"codes", *params}:
        raise InvalidArtifact(
            f"{name}: stores {sorted(tensors)}, "
            f"format {fmt.name} stores {sorted({'codes', *params})}"
        )
    for key, param in params.items():
        stored = tensors[key]
        if tuple(stored.shape) != param.shape:
            raise InvalidArtifact(
                f"{name}.{key}: shape {tuple(stored.shape)}, the declared spec needs {param.shape}"
            )
        if param.dtype is not None and stored.dtype != param.dtype:
            raise InvalidArtifact(
                f"{name}.{key}: dtype {stored.dtype}, the format stores {param.dtype}"
            )
        if param.dtype is None and not stored.is_floating_point():
            raise InvalidArtifact(f"{name}.{key}: dtype {stored.dtype}, must be floating point")
        if stored.is_floating_point() and not torch.isfinite(stored).all():
            raise InvalidArtifact(f"{name}.{key}: must be finite values")
    out_features, in_features = spec["shape"]
    try:
        codes = unpack_codes(tensors["codes"], out_features * in_features, levels)
        values = fmt.values(codes.view(out_features, in_features), tensors, spec)
    except InvalidArtifact as err:
        raise InvalidArtifact(f"{name}: {err}") from None
    found = max_levels_per_group(values, fmt.group_size(spec))
    if found > levels:
        raise InvalidArtifact(
            f"{name}: a group holds {found} distinct values; {fmt.name} allows {levels}"
        )
    weight = fmt.elementwise(values, tensors, spec) + adapter_delta(spec, tensors)
    if not torch.isfinite(weight).all():
        raise InvalidArtifact(f"{name}: decodes to non-finite weights")
    return weight
