"""Low-bit weight formats: how codes are packed, how a weight is decoded, how many levels a group holds.

An artifact declares, for each quantized Linear, a format name and its spec (shape, group size, ...).
The harness never takes the declaration on trust: `decode_layer` checks every stored tensor's
dtype, shape and byte count against the spec, unpacks the codes, decodes the weight and then counts
the distinct values in each group itself. A new format is one `Format` subclass in `FORMATS`.

Groups run along in_features. When in_features is not a multiple of the group size the last group
of each row is shorter (SmolLM2's hidden size 576 = 4.5 x 128).
"""

from __future__ import annotations

import math
from typing import ClassVar

import numpy as np
import torch


class InvalidArtifact(Exception):
    """The artifact is not the low-bit model it claims to be; the message says why."""


# --- groups ---


def group_size_of(spec: dict) -> int:
    """Group size along in_features; absent, None or -1 means one group per output channel."""
    in_features = spec["shape"][1]
    size = spec.get("group_size")
    return in_features if size in (None, -1) else int(size)


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
    stream = np.unpackbits(flat.to(torch.uint8).numpy()[:, None], axis=1, bitorder="little")[:, :bits]
    return torch.from_numpy(np.packbits(stream.reshape(-1), bitorder="little"))


def unpack_codes(packed: torch.Tensor, n_codes: int, levels: int) -> torch.Tensor:
    """Inverse of pack_codes: flat uint8 bytes -> int64 codes, checked to lie in [0, levels)."""
    if packed.dtype != torch.uint8 or packed.dim() != 1:
        raise InvalidArtifact(f"codes must be a flat uint8 tensor, got {packed.dtype} {tuple(packed.shape)}")
    expected = packed_nbytes(n_codes, levels)
    if packed.numel() != expected:
        raise InvalidArtifact(
            f"codes hold {packed.numel()} bytes; {n_codes} codes of {levels} levels pack into {expected}"
        )
    raw = packed.to(torch.int64)
    if levels == 3:
        if int(raw.max()) > 242:
            raise InvalidArtifact("a packed ternary byte exceeds 3^5 - 1: not base-3 codes")
        codes = (raw[:, None] // _TRIT_WEIGHTS.to(torch.int64)) % 3
    else:
        bits = int(code_bits(levels))
        stream = np.unpackbits(packed.numpy(), bitorder="little")[: n_codes * bits].reshape(n_codes, bits)
        codes = torch.from_numpy(np.packbits(stream, axis=1, bitorder="little")[:, 0].astype(np.int64))
    codes = codes.reshape(-1)[:n_codes]
    if n_codes and int(codes.max()) >= levels:
        raise InvalidArtifact(f"a code exceeds the {levels} levels the format allows")
    return codes


# --- formats ---


class Format:
    """One way of storing a Linear weight as integer codes plus a few float parameters."""

    name: ClassVar[str]

    def levels(self, spec: dict) -> int:
        """How many distinct values a group may hold (and how many codes exist)."""
        raise NotImplementedError

    def param_shapes(self, spec: dict) -> dict[str, tuple[int, ...]]:
        """The float tensors stored beside the codes, by name, with their exact shapes."""
        raise NotImplementedError

    def decode(self, codes: torch.Tensor, params: dict[str, torch.Tensor], spec: dict) -> torch.Tensor:
        """codes (out, in) int64 + params -> the float32 weight the model computes with."""
        raise NotImplementedError


class Ternary(Format):
    """{-1, 0, +1} x s with one scale s per group (BitNet b1.58). Codes 0, 1, 2 mean -1, 0, +1."""

    name = "ternary"

    def levels(self, spec):
        return 3

    def param_shapes(self, spec):
        out_features, in_features = spec["shape"]
        return {"scale": (out_features, n_groups(in_features, group_size_of(spec)))}

    def decode(self, codes, params, spec):
        in_features = spec["shape"][1]
        scale = expand_groups(params["scale"].float(), in_features, group_size_of(spec))
        return (codes.float() - 1) * scale


FORMATS: dict[str, Format] = {f.name: f for f in (Ternary(),)}

DENSE = "dense"  # a Linear kept in floating point: allowed, and it costs its stored bits


def decode_layer(name: str, spec: dict, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """Check one declared layer's stored tensors against its spec and return the decoded weight.

    `tensors` maps the suffix after `name.` ("codes", "scale", ...) to the stored tensor.
    Raises InvalidArtifact with a reason naming the layer.
    """
    fmt = FORMATS.get(spec.get("format"))
    if fmt is None:
        raise InvalidArtifact(f"{name}: unknown format {spec.get('format')!r} (known: {sorted(FORMATS)})")
    out_features, in_features = spec["shape"]
    levels = fmt.levels(spec)
    expected = {"codes", *fmt.param_shapes(spec)}
    if set(tensors) != expected:
        raise InvalidArtifact(f"{name}: stores {sorted(tensors)}, format {fmt.name} stores {sorted(expected)}")
    for key, shape in fmt.param_shapes(spec).items():
        param = tensors[key]
        if tuple(param.shape) != shape:
            raise InvalidArtifact(f"{name}.{key}: shape {tuple(param.shape)}, the declared spec needs {shape}")
        if not param.is_floating_point() or not torch.isfinite(param).all():
            raise InvalidArtifact(f"{name}.{key}: must be finite floating point values")
    try:
        codes = unpack_codes(tensors["codes"], out_features * in_features, levels)
    except InvalidArtifact as err:
        raise InvalidArtifact(f"{name}: {err}") from None
    weight = fmt.decode(codes.view(out_features, in_features), tensors, spec)
    found = max_levels_per_group(weight, group_size_of(spec))
    if found > levels:
        raise InvalidArtifact(f"{name}: a group holds {found} distinct values; {fmt.name} allows {levels}")
    return weight
