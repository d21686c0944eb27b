"""Quantization-aware training of a small language model: the one file experiments change.

    python train.py                                   # ternary QAT with distillation, within the harness's budget
    python train.py --quant codebook --bits 2         # 2-bit {-1.5,-.5,.5,1.5}*s codebook
    python train.py --module-quant "mlp=codebook:2,self_attn=int:4"   # per-module formats
    python train.py --teacher-cache-k 32              # distil from a precomputed top-k teacher cache
    python train.py --lora-rank 16 --lora-at 0.8      # last 20% of the budget: LoRA on frozen codes
    python train.py --baseline fp                     # score the unquantized model (no training)
    python train.py --baseline rtn                    # score the selected quantizer without training

Every UPPER_CASE setting below is a flag (LR -> --lr). Run by hand, this file hands itself to the
harness (harness/runner.py), which runs it in a child process, verifies and scores the exported
artifact in another, and appends the row to results.tsv. Everything here may change; harness/ and
prepare.py may not. The artifact format each quantizer must export is in harness/formats.py.
"""

import os
import sys

if __name__ == "__main__" and "HARNESS_RUN_DIR" not in os.environ:
    # Launched by hand: let the harness run this file as its child, so that a crash or a hang
    # still becomes a row and only harness-measured numbers are recorded.
    from harness.runner import main_for_train_script

    sys.exit(main_for_train_script(sys.argv[1:]))

import argparse
import contextlib
import copy
import ctypes
import functools
import hashlib
import json
import math
import re
import time
from pathlib import Path
from types import SimpleNamespace
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm
from transformers import AutoModelForCausalLM

from harness import artifact, paths
from harness.budget import Budget
from harness.data import DataError, load_prepared

# --- settings (each is also a flag: LR -> --lr, GROUP_SIZE -> --group-size) ---

# what the weights become
# format of every decoder Linear: ternary | codebook | int | log | mxfp4 | mxfp8 | lut | none
QUANT = "ternary"
BITS = 2  # bits per weight of codebook / int / log / lut (ternary and mxfp fix their own)
GROUP_SIZE = 128  # weights per scale along in_features; -1 = one scale per output channel
# per-module overrides, first match wins: "mlp=codebook:2,self_attn=int:4,lm_head=int:8,o_proj=none"
MODULE_QUANT = ""
# 1: scales/LUTs are parameters set by a calibration pass, then trained; 0: recalibrated from w
# every step
LEARN_SCALE = 1
# int format: 1 = symmetric (c - 2^(k-1)) * s, 0 = affine min-max with a zero point
INT_SYMMETRIC = 1
TERNARY_THRESHOLD = 0.5  # ternary deadzone: |w| <= threshold * s becomes 0 (0.5 = round to nearest)
# > 0: gradients follow a tanh staircase of this sharpness instead of the identity STE
TERNARY_TANH = 0.0
LUT_RANK = 0  # lut format: W = (A @ B) * LUT[idx] with A, B of this rank; 0 = no low-rank scale
ACT_QUANT = 0  # 1: fake-quantize every quantized Linear's input per token to INT8 (absmax)
# schedules
# fraction of the budget over which the forward blends FP -> quantized; 0 = quantized from step 0
LAMBDA_WARMUP = 0.0
LAMBDA_SCHEDULE = "linear"  # linear | plateau (lambda rises in LAMBDA_PLATEAUS equal stairs)
LAMBDA_PLATEAUS = 4  # stairs of the plateau schedule
# > 0: at PROGRESSIVE_AT of the budget drop to this many bits (a LUT is reduced by k-means)
PROGRESSIVE_BITS = 0
PROGRESSIVE_AT = 0.5  # fraction of the budget where progressive precision switches
# "2-4": cyclic precision, each step's bits follow CYCLIC_SHAPE between min and max; export at BITS
CYCLIC_BITS = ""
CYCLIC_SHAPE = "cosine"  # cosine | triangular
CYCLE_STEPS = 32  # steps per precision cycle
# "2,4": steps rotate through these widths, each with its own scales, norms and LoRA; export at BITS
SWITCHABLE_BITS = ""
# training
BASELINE = ""  # "fp" or "rtn": export without training, recorded as a baseline row
STEPS = 0  # cap on optimizer steps; 0 = the wall-clock budget alone decides
BATCH_SIZE = 4  # sequences per step
SEQ_LEN = 128  # tokens per sequence
LR = 5e-4  # peak AdamW learning rate of the latent weights and the quantizer parameters
WARMUP_STEPS = 10  # linear warm-up, then cosine decay over the budget
MIN_LR_RATIO = 0.1  # the cosine ends at LR * MIN_LR_RATIO
WEIGHT_DECAY = 0.0  # decay pulls latent weights to 0, which ternary maps to the 0 level
# 1: torch.compile fake-quant and KD (the unbudgeted first step compiles; a new bit width when first
# used); 0: eager, autograd through the fake-quant (slower, more memory)
COMPILE = 1
DTYPE = "auto"  # auto (fp32 on CPU, bf16 on CUDA/MPS) | fp32 | bf16 | fp16 (GradScaler, CUDA only)
# distillation
DISTILL_WEIGHT = 1.0  # loss = (1 - w) * CE + w * KD; 0 trains on the text alone (no teacher needed)
DISTILL_TEMP = 1.0  # softmax temperature of the KD term (scaled by T^2)
# live teacher's precision: auto (bf16 on CUDA and on CPUs that multiply bf16 natively, else fp32) |
# fp32 | bf16
TEACHER_DTYPE = "auto"
HARD_TOP1_WEIGHT = 0.0  # + CE towards the teacher's top-1 among the candidates, at every position
# + CE over the full vocab towards the teacher's top-1 at each sequence's last position
HARD_FULL_TOP1_WEIGHT = 0.0
# > 0: distil from a precomputed cache of the teacher's top-k logits (no teacher in memory)
TEACHER_CACHE_K = 0
# random other tokens cached per position, so KD also pushes some tail mass down
TEACHER_CACHE_NEGATIVES = 32
# cached positions (6 bytes * (k + negatives) each); a 300 s CPU run reads ~40K
TEACHER_CACHE_TOKENS = 65_536
# where caches live; "" = <harness cache>/teacher (shared by runs, writable in the sandbox)
TEACHER_CACHE_DIR = ""
# LoRA recovery
# > 0: a second stage freezes the quantized weights and trains LoRA adapters of this rank
LORA_RANK = 0
LORA_ALPHA = 16.0  # adapter output scale is alpha / rank
LORA_DROPOUT = 0.0  # dropout on the adapter's input
LORA_AT = 0.8  # fraction of the budget where the LoRA stage starts (0: LoRA only, on RTN weights)
# stabilizers and checkpoints
GRAD_CLIP = 1.0  # max global grad norm; 0 = off
FREEZE_ATTN_OV = 0  # 1: attention v_proj and o_proj latent weights stay fixed (still quantized)
FREEZE_LAST_MLPS = 0  # the last N layers' MLP latent weights stay fixed
EMA_DECAY = 0.0  # > 0: export an exponential moving average of the trained parameters
CHECKPOINT_EVERY = 0  # steps between checkpoints (model, optimizer, EMA, RNG); 0 = none
CHECKPOINT_DIR = ""  # "" = <harness cache>/checkpoints/<hash of the training settings>
# "auto": continue from the latest compatible checkpoint, or a path (bit-exact under --steps; a time
# budget restarts)
RESUME = ""
# bookkeeping
LOG_EVERY = 10  # steps between log lines and loss.csv rows
SEED = 0
DEVICE = "auto"  # auto | cpu | cuda | mps
DESCRIPTION = ""  # one line for results.tsv

SETTINGS = {
    name: value
    for name, value in dict(globals()).items()
    if name.isupper() and isinstance(value, (int, float, str))
}
NOT_TRAINING = (
    "resume",
    "description",
    "log_every",
    "checkpoint_every",
    "checkpoint_dir",
    "device",
)  # not in the checkpoint key


def parse_flags(argv: list[str]) -> SimpleNamespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    for name, default in SETTINGS.items():
        kind = type(default)
        parser.add_argument(
            "--" + name.lower().replace("_", "-"),
            type=kind,
            default=default,
            metavar=kind.__name__.upper(),
        )
    return SimpleNamespace(**vars(parser.parse_args(argv)))


# --- quantizers ---
# A quantizer maps a weight (out, in) to integer codes plus a few per-group parameters, and back.
# The training forward IS decode(encode(w)) (with the parameters rounded to how they are stored),
# so the exported artifact computes exactly what training saw.


class Segment(NamedTuple):
    """Columns of a weight that hold a whole number of groups of one width: the full groups, or a
    short last group (576 inputs in groups of 128: 4 groups of 128, then 1 of 64)."""

    groups: slice
    columns: slice


def segments(in_features: int, group: int) -> list[Segment]:
    full, short = divmod(in_features, group)
    parts = [Segment(slice(0, full), slice(0, full * group))] if full else []
    return parts + (
        [Segment(slice(full, full + 1), slice(full * group, in_features))] if short else []
    )


def grouped(x: torch.Tensor, part: Segment) -> torch.Tensor:
    """The segment's columns of x (out, in) as (out, its groups, group width): a view. Compiled
    loops over it run unmasked, where over a weight padded to whole groups each load was masked,
    which made them twice as slow as their memory traffic."""
    return x[:, part.columns].unflatten(1, (part.groups.stop - part.groups.start, -1))


def joined(parts: list[torch.Tensor]) -> torch.Tensor:
    """Grouped segments (out, n, width) back to (out, in), contiguous: the compiler writes each
    segment's loop straight into its columns. A strided view of a padded weight instead made the
    matmul 14% slower."""
    return torch.cat([x.flatten(1) for x in parts], 1)


def round_ste(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.round(x) - x).detach()


def float16_value(x: torch.Tensor) -> torch.Tensor:
    """x.half().float() in integer arithmetic: x rounded to float16's 10 mantissa bits (to a
    multiple of 2^-24 below its normal range), ties to even, inf beyond its max. Compiled code
    may skip a cast to float16 and back as a no-op (Inductor 2.11 did, even when told to emulate
    it), and then the training weight is not the one the artifact stores."""
    bits = x.view(torch.int32)
    normal = ((bits + 0xFFF + ((bits >> 13) & 1)) & ~0x1FFF).view(torch.float32)
    subnormal = torch.round(x * 2.0**24) * 2.0**-24
    rounded = torch.where(x.abs() < 2.0**-14, subnormal, normal)
    return torch.where(rounded.abs() > 65504, rounded * float("inf"), rounded)


def as_stored(p: torch.Tensor) -> torch.Tensor:
    """The value a float16-stored parameter will have in the artifact; gradients pass through."""
    return p + (float16_value(p) - p).detach()


MIN_SCALE = 2.0**-14  # smallest normal float16: a scale never rounds to 0


class Quantizer:
    """Base of the formats: `bits`, `group` (along in_features). Subclasses define levels,
    calibrate (w (out, in) -> per-group params (out, n_groups)), and encode / decode, which work on
    a segment of grouped weights (out, n, width) and the parameters of its groups (restrict)."""

    name = ""
    learnable = True  # False: params are a function of w alone (recomputed every step)

    def __init__(self, bits: int, group: int, in_features: int, cfg: SimpleNamespace):
        self.bits, self.in_features, self.cfg = bits, in_features, cfg
        self.group = in_features if group <= 0 else min(group, in_features)
        self.segments = segments(in_features, self.group)

    @property
    def levels(self) -> int:
        return 2**self.bits

    has_surrogate = (
        False  # True: w's gradient is surrogate()'s slope, not the identity (straight-through)
    )

    def surrogate(self, w: torch.Tensor, p: dict) -> torch.Tensor:
        """A function of grouped w whose gradient replaces the identity; used when has_surrogate."""
        raise NotImplementedError

    def spec(self) -> dict:
        group = -1 if self.group == self.in_features else self.group
        return {"bits": self.bits, "group_size": group}

    def export_params(self, p: dict) -> dict:
        return {key: value.detach().half().cpu() for key, value in p.items()}

    def expand(self, per_group: torch.Tensor) -> torch.Tensor:
        return per_group.unsqueeze(-1)  # (out, n_groups) -> broadcast over a group

    def each_group(self, w: torch.Tensor, fit) -> torch.Tensor:
        """fit(x) -> per-group values, x (out, n, width), on each group's own weights (out, n_groups)."""
        return torch.cat([fit(grouped(w, part)) for part in self.segments], 1)

    def absmax(self, w: torch.Tensor) -> torch.Tensor:
        """Each group's largest |w| (out, n_groups)."""
        return self.each_group(w.abs(), lambda x: x.amax(-1))

    def restrict(self, p: dict, part: Segment) -> dict:
        """The parameters of the segment's groups."""
        return {k: v[:, part.groups] for k, v in p.items()}

    def split(self, x: torch.Tensor, p: dict) -> list[tuple[torch.Tensor, dict]]:
        """(x's segment grouped, its groups' parameters) per segment, for encode / decode."""
        return [(grouped(x, part), self.restrict(p, part)) for part in self.segments]


class Ternary(Quantizer):
    """{-1, 0, +1} * s, s = per-group absmean (BitNet b1.58); codes 0, 1, 2."""

    name = "ternary"
    levels = 3

    def calibrate(self, w):
        absmean = self.each_group(w.abs(), lambda x: x.mean(-1))
        return {"scale": absmean.clamp_min(MIN_SCALE)}

    def encode(self, w, p):
        bound = self.expand(
            self.cfg.ternary_threshold * p["scale"]
        )  # per group: no division per weight
        return torch.where(
            w > bound, 2.0, torch.where(w >= -bound, 1.0, 0.0)
        )  # selects: summed comparisons compile to slow mask casts

    def decode(self, codes, p):
        return (codes - 1) * self.expand(p["scale"])

    @property
    def has_surrogate(self):
        return self.cfg.ternary_tanh > 0

    def surrogate(self, w, p):
        """A smooth staircase s * (tanh(k(x - t)) + tanh(k(x + t))) / 2 whose slope gives the
        weights near a threshold a stronger gradient than those far from one."""
        s, t, k = (
            self.expand(p["scale"].detach()),
            self.cfg.ternary_threshold,
            self.cfg.ternary_tanh,
        )
        x = w / s
        return s * 0.5 * (torch.tanh(k * (x - t)) + torch.tanh(k * (x + t)))

    def spec(self):
        return {"group_size": super().spec()["group_size"]}


class Codebook(Quantizer):
    """Balanced k-bit grid (c - (2^k - 1)/2) * s: 2-bit {-1.5, -0.5, 0.5, 1.5} * s, no zero level.
    The scale starts at the MSE-optimal clip found by Newton iterations (OCTAV, Sakr et al. 2022)."""

    name = "codebook"

    def calibrate(self, w):
        clip = self.each_group(w.abs(), self.mse_clip)
        return {
            "scale": (2 * clip / self.levels).clamp_min(MIN_SCALE)
        }  # levels cells of width s span [-clip, clip]

    def mse_clip(self, x):
        """The MSE-optimal clip of |w| (..., n) per row, from the absmax."""
        clip = x.amax(-1)
        for _ in range(
            10
        ):  # clip <- E[|w| ; |w| > clip] / (4^-k / 3 * P(|w| <= clip) + P(|w| > clip))
            over = (x > clip.unsqueeze(-1)).float()
            clip = (x * over).mean(-1) / (
                (4.0**-self.bits / 3) * (1 - over).mean(-1) + over.mean(-1)
            ).clamp_min(1e-12)
        return clip

    def encode(self, w, p):
        return (
            (w * self.expand(1 / p["scale"]))
            .add_((self.levels - 1) / 2)
            .round_()
            .clamp_(0, self.levels - 1)
        )

    def decode(self, codes, p):
        return (codes - (self.levels - 1) / 2) * self.expand(p["scale"])


class Int(Quantizer):
    """k-bit integers, min-max calibrated: symmetric (c - 2^(k-1)) * s or affine (c - z) * s."""

    name = "int"

    def calibrate(self, w):
        if self.cfg.int_symmetric:
            return {"scale": (self.absmax(w) / (self.levels // 2 - 1)).clamp_min(MIN_SCALE)}
        low = self.each_group(w, lambda x: x.amin(-1)).clamp_max(0)  # the grid must hold 0 exactly
        high = self.each_group(w, lambda x: x.amax(-1)).clamp_min(0)
        scale = ((high - low) / (self.levels - 1)).clamp_min(MIN_SCALE)
        return {"scale": scale, "zero": torch.clamp(torch.round(-low / scale), 0, self.levels - 1)}

    def offset(self, p):
        return self.levels // 2 if self.cfg.int_symmetric else self.expand(round_ste(p["zero"]))

    def encode(self, w, p):
        return (
            (w * self.expand(1 / p["scale"]))
            .add_(self.offset(p))
            .round_()
            .clamp_(0, self.levels - 1)
        )

    def decode(self, codes, p):
        return (codes - self.offset(p)) * self.expand(p["scale"])

    def spec(self):
        return {**super().spec(), "symmetric": bool(self.cfg.int_symmetric)}


class Log(Quantizer):
    """Powers of two below the group's absmax s: ±s * 2^(m - M), m = 1..M = 2^(k-1) - 1, and 0.
    Code = sign_bit * 2^(k-1) + m; rounding happens in the log domain."""

    name = "log"

    def calibrate(self, w):
        return {"scale": self.absmax(w).clamp_min(MIN_SCALE)}

    def encode(self, w, p):
        top = self.levels // 2 - 1
        x = w / self.expand(p["scale"])
        m = torch.round(torch.log2(x.abs().clamp_min(1e-30))) + top
        m = torch.where(m >= 1, m.clamp_max(top), torch.zeros_like(m))
        return m + ((x < 0) & (m > 0)).float() * (self.levels // 2)

    def decode(self, codes, p):
        half, top = self.levels // 2, self.levels // 2 - 1
        m, negative = codes % half, codes >= half
        magnitude = torch.where(m > 0, torch.exp2(m - top), torch.zeros_like(m)) * self.expand(
            p["scale"]
        )
        return torch.where(negative, -magnitude, magnitude)


def power_of_two(e8m0: torch.Tensor) -> torch.Tensor:
    """2^(e - 127) for E8M0 bytes e in 1..254, built from its float32 bits (the same biased
    exponent): exact, and no exp2 per weight in the compiled loop."""
    return (e8m0.to(torch.int32) << 23).view(torch.float32)


class MXFP(Quantizer):
    """OCP Microscaling (MX v1.0): blocks of 32 share a power-of-two scale 2^(e - 127) stored as
    an E8M0 byte; each element is a small float (MXFP4, MXFP8 below). The shared exponent is
    floor(log2(absmax)) - emax of the element format, and elements beyond its max saturate."""

    learnable = False
    block = 32
    emax = 0  # exponent of the element format's largest power of two

    def __init__(self, bits, group, in_features, cfg):
        super().__init__(bits, self.block, in_features, cfg)

    def calibrate(self, w):
        shared = torch.floor(torch.log2(self.absmax(w).clamp_min(2.0**-127))) - self.emax
        # E8M0 reaches 2^-127, but at 2^-126 the scale and its inverse are both normal floats; only
        # a block whose absmax is under 2^-124 (zero, in practice) would have gone lower
        return {"exponent": torch.clamp(shared, -126, 126) + 127}

    def encode(self, w, p):
        return self.element_codes(
            w * power_of_two(254 - self.expand(p["exponent"]))
        )  # w / 2^(e-127), exactly

    def decode(self, codes, p):
        return self.element_values(codes) * power_of_two(self.expand(p["exponent"]))

    def spec(self):
        return {"block_size": self.block}

    def export_params(self, p):
        return {"exponent": p["exponent"].detach().to(torch.uint8).cpu()}


class MXFP4(MXFP):
    """E2M1 elements: sign, 2 exponent bits, 1 mantissa bit: ±{0, 0.5, 1, 1.5, 2, 3, 4, 6}, codes
    0-7 (bit 3 = sign). A magnitude's code is 2e + its rounded position in binade e (e = 0 for
    [0, 2), 1 for [2, 4), 2 for [4, 6]), whose step is 2^(e-1). Written as comparisons and
    products, with no selects or log2/exp2 per weight: nested selects took the compiler minutes
    per weight shape, and per-weight transcendentals made the fused loop several times slower."""

    name, levels, emax = "mxfp4", 16, 2  # 6 = 1.5 * 2^2

    def element_codes(self, x):
        """Round to the nearest magnitude, a tie to the even code: round() halves to even, and the
        position's parity is the code's. A value rounding up into the next binade (1.9 -> 4 * 0.5)
        lands on that binade's first code all the same."""
        a = x.abs().clamp_max(6)
        over_2, over_4 = (a >= 2).float(), (a >= 4).float()  # e = over_2 + over_4
        position = torch.round(a * 2 * (1 - 0.5 * over_2) * (1 - 0.5 * over_4))  # a / 2^(e-1)
        magnitude = position + 2 * (over_2 + over_4)
        return torch.where((x < 0) & (magnitude > 0), magnitude + 8, magnitude)

    def element_values(self, c):
        negative = c >= 8
        m = torch.where(negative, c - 8, c)
        over_4, over_6 = (m >= 4).float(), (m >= 6).float()  # codes 4-5 are binade 1, 6-7 binade 2
        magnitude = (
            (m - 2 * (over_4 + over_6)) * 0.5 * (1 + over_4) * (1 + over_6)
        )  # position * 2^(e-1)
        return torch.where(negative, -magnitude, magnitude)


class MXFP8(MXFP):
    """E4M3 elements (bias 7, max 448, S.1111.111 = NaN): exactly torch.float8_e4m3fn's bits."""

    name, levels, emax = "mxfp8", 256, 8  # 448 = 1.75 * 2^8

    def element_codes(self, x):
        return (
            x.clamp(-448, 448).to(torch.float8_e4m3fn).view(torch.uint8).float()
        )  # clamped: never NaN

    def element_values(self, c):
        return c.to(torch.uint8).view(torch.float8_e4m3fn).float()


def kmeans_1d(x: torch.Tensor, k: int, iters: int = 12) -> torch.Tensor:
    """k centroids for each row of x (..., n), all rows at once; starts from quantiles."""
    quantiles = torch.linspace(0.5 / k, 1 - 0.5 / k, k, device=x.device)
    centroids = torch.quantile(x, quantiles, dim=-1).movedim(0, -1).contiguous()
    for _ in range(iters):
        assign = (x.unsqueeze(-1) - centroids.unsqueeze(-2)).abs().argmin(-1)
        onehot = F.one_hot(assign, k).float()
        counts = onehot.sum(-2)
        sums = (onehot * x.unsqueeze(-1)).sum(-2)
        centroids = torch.where(
            counts > 0, sums / counts.clamp_min(1), centroids
        )  # an empty cluster stays put
    return centroids.sort(-1).values


def sorted_table(p: dict) -> torch.Tensor:
    """A LUT's entries in ascending order, equal ones in their stored order (stable): the sort's
    backward then sends each entry's gradient to the same parameter on every device, compiled or
    not (CUDA's unstable sort did not)."""
    return p["lut"].sort(dim=-1, stable=True).values


class LUT(Quantizer):
    """A learned table of 2^k values per group (k-means initialised): W = LUT[group, idx], or with
    LUT_RANK > 0, W = (A @ B) * LUT[group, idx], the low-rank scale absorbing row/column magnitude."""

    name = "lut"

    def low_rank(self, p, like):
        """A @ B as stored (float16), grouped like `like`; None without a low-rank scale."""
        return (
            (as_stored(p["scale_a"]) @ as_stored(p["scale_b"])).view(like.shape)
            if "scale_a" in p
            else None
        )

    def restrict(self, p, part):
        """The tables of the segment's groups, and B's columns of it (A is every column's)."""
        columns = {"scale_a": slice(None), "scale_b": part.columns, "lut": part.groups}
        return {k: v[:, columns[k]] for k, v in p.items()}

    def calibrate(self, w):
        params, rank = {}, self.cfg.lut_rank
        if rank > 0:  # rank 1 from mean |w| of rows and columns; the other components start at 0
            magnitude = w.abs()
            a = torch.zeros(w.shape[0], rank, device=w.device)
            b = torch.full((rank, w.shape[1]), 0.01, device=w.device)
            a[:, 0] = magnitude.mean(1).clamp_min(MIN_SCALE)
            b[0] = magnitude.mean(0) / magnitude.mean().clamp_min(1e-12)
            params = {"scale_a": a, "scale_b": b.clamp_min(MIN_SCALE)}
            w = w / self.low_rank(params, w)
        params["lut"] = self.each_group(w, lambda x: kmeans_1d(x, self.levels))
        return params

    def encode(self, w, p):
        """The nearest entry's index: how many midpoints between sorted entries lie below x. As
        comparisons, one per midpoint, it fuses into the compiled loop over w; searchsorted did
        not, and made a 4-bit LUT quantize ~5x slower than this."""
        scale = self.low_rank(p, w)
        x = w if scale is None else w / scale
        lut = sorted_table(p)
        midpoints = (lut[..., 1:] + lut[..., :-1]) / 2
        return sum((x > midpoints[..., k : k + 1]).float() for k in range(self.levels - 1))

    def decode(self, codes, p):
        lut = sorted_table(p)  # encode indexes the sorted table; export stores it sorted
        w = torch.gather(lut, -1, codes.long())
        scale = self.low_rank(p, w)
        return w if scale is None else w * scale

    def spec(self):
        return {**super().spec(), "rank": self.cfg.lut_rank}

    def export_params(self, p):
        return super().export_params({**p, "lut": sorted_table(p)})


def stored_params(q: Quantizer, w: torch.Tensor, learned: dict | None) -> dict:
    """The quantizer's parameters as the artifact stores them (float16), with gradients: the
    learned ones, or (learned None) calibrated from w itself."""
    if learned is not None:
        return {k: as_stored(v) for k, v in learned.items()}
    return {k: float16_value(v) for k, v in q.calibrate(w.detach()).items()}


def fake_quantize(q: Quantizer, w: torch.Tensor, learned: dict | None) -> torch.Tensor:
    """decode(encode(w)) of a (out, in) weight: exactly what the artifact will hold. Gradient:
    straight-through to w (or the surrogate's slope), the true gradient to learned parameters
    through decode (the codes are constants)."""
    p = stored_params(q, w, learned)
    parts = []
    for x, p_part in q.split(w, p):
        codes = q.encode(x.detach(), {k: v.detach() for k, v in p_part.items()})
        straight = q.surrogate(x, p_part) if q.has_surrogate else x
        parts.append(q.decode(codes, p_part) + (straight - straight.detach()))
    return joined(parts)


def encode_weight(q: Quantizer, w: torch.Tensor, p: dict) -> torch.Tensor:
    """The codes (out, in) of a weight (out, in)."""
    return joined([q.encode(x, p_part) for x, p_part in q.split(w, p)])


def decode_weight(q: Quantizer, codes: torch.Tensor, p: dict) -> torch.Tensor:
    return joined([q.decode(c, p_part) for c, p_part in q.split(codes, p)])


def quantized(q: Quantizer, w: torch.Tensor, learned: dict | None) -> torch.Tensor:
    """fake_quantize's value without its gradient: the weight a training step computes with, by
    one loop over w per segment (decode_weight(encode_weight()) would write the codes between)."""
    p = stored_params(q, w, learned)
    return joined([q.decode(q.encode(x, p_part), p_part) for x, p_part in q.split(w, p)])


def params_vjp(q: Quantizer, w: torch.Tensor, learned: dict, grad: torch.Tensor) -> dict:
    """{name: dL/dparam} for grad = dL/d(the quantized weight): decode's vjp at the forward's codes,
    which is the gradient fake_quantize gives the parameters (its codes are constants). The codes
    are encoded again from w, as the forward encoded them: reading w costs 4 bytes a weight where
    codes kept from the forward cost 1, but writing those codes was a second loop over w there."""
    codes = [q.encode(x, p_part) for x, p_part in q.split(w, stored_params(q, w, learned))]

    def decoded(learned):
        p = stored_params(q, None, learned)
        return [q.decode(c, q.restrict(p, part)) for c, part in zip(codes, q.segments)]

    _, pullback = torch.func.vjp(decoded, learned)
    return pullback([grouped(grad, part) for part in q.segments])[0]


def surrogate_vjp(
    q: Quantizer, w: torch.Tensor, learned: dict | None, grad: torch.Tensor
) -> torch.Tensor:
    """dL/dw through the surrogate's slope (where fake_quantize's w gradient is not the identity)."""
    p = {k: v.detach() for k, v in stored_params(q, w, learned).items()}
    _, slope = torch.func.vjp(
        lambda w: joined([q.surrogate(x, p_part) for x, p_part in q.split(w, p)]), w
    )
    return slope(grad)[0]


def blend(w: torch.Tensor, w_q: torch.Tensor, lam: float) -> torch.Tensor:
    """Lambda warm-up's weight: w + lam * (q(w) - w), from FP (0) to fully quantized (1)."""
    return w_q if lam >= 1 else w + lam * (w_q - w)


def quantize_block(quantizers: list, ws: list, learned: list) -> list[torch.Tensor]:
    return [quantized(q, w, p) for q, w, p in zip(quantizers, ws, learned)]


def block_params_vjp(quantizers: list, ws: list, learned: list, grads: list) -> list[dict]:
    return [params_vjp(q, w, p, g) for q, w, p, g in zip(quantizers, ws, learned, grads)]


def block_surrogate_vjp(
    quantizers: list, ws: list, learned: list, grads: list
) -> list[torch.Tensor]:
    return [surrogate_vjp(q, w, p, g) for q, w, p, g in zip(quantizers, ws, learned, grads)]


# Eager, fake_quantize is ~10 passes over every weight, each step; compiled, the forward is one
# fused loop over w and the backward one over dL/dweight and w: what keeps a QAT step near an FP
# step. One call per block of layers, not per layer: a compiled call costs ~0.1 ms (guards,
# dispatch) whatever its size, and the 135M model has 210 Linears.
def compiled(fn):
    """torch.compile(fn), done at its first call: importing the compiler costs a process seconds
    that baselines and COMPILE=0 runs need not pay."""
    compiled_fn = None

    @functools.wraps(fn)
    def call(*args):
        nonlocal compiled_fn
        if compiled_fn is None:
            torch._dynamo.config.recompile_limit = (
                64  # graphs per distinct block (its shapes and widths)
            )
            compiled_fn = torch.compile(fn, dynamic=False)
        return compiled_fn(*args)

    return call


quantize_block_compiled = compiled(quantize_block)
block_params_vjp_compiled = compiled(block_params_vjp)
block_surrogate_vjp_compiled = compiled(block_surrogate_vjp)


QUANTIZERS = {q.name: q for q in (Ternary, Codebook, Int, Log, MXFP4, MXFP8, LUT)}
FIXED_BITS = {"ternary": 2, "mxfp4": 4, "mxfp8": 8}  # formats whose bits no schedule can change


def module_formats(cfg: SimpleNamespace) -> list[tuple[str, str, int]]:
    """MODULE_QUANT "mlp=codebook:2,lm_head=int:8" -> [(pattern, format, bits)], then the default."""
    rules = []
    for rule in filter(None, cfg.module_quant.split(",")):
        pattern, _, fmt = rule.partition("=")
        name, _, bits = fmt.partition(":")
        rules.append((pattern.strip(), name.strip(), int(bits or cfg.bits)))
    return rules


def format_for(name: str, cfg: SimpleNamespace) -> tuple[str, int] | None:
    """(format, bits) of the Linear called `name`, or None to keep it dense. The output head is
    quantized only when a MODULE_QUANT rule names it."""
    for pattern, fmt, bits in module_formats(cfg):
        if pattern in name:
            return None if fmt == "none" else (fmt, bits)
    if name.endswith("lm_head") or cfg.quant == "none":
        return None
    return cfg.quant, cfg.bits


# --- layers ---


def parse_bits(text: str) -> list[int]:
    """ "2,4" -> [2, 4]; "2-4" -> [2, 3, 4]."""
    if "-" in text:
        low, high = map(int, text.split("-"))
        return list(range(low, high + 1))
    return [int(b) for b in text.split(",") if b]


def new_adapter(rank: int, in_features: int, out_features: int) -> nn.ParameterDict:
    """LoRA's A (rank, in) initialised like a Linear, B (out, rank) at zero: a no-op to start from."""
    a = torch.empty(rank, in_features)
    nn.init.kaiming_uniform_(a, a=math.sqrt(5))
    return nn.ParameterDict(
        {"a": nn.Parameter(a), "b": nn.Parameter(torch.zeros(out_features, rank))}
    )


class QuantLinear(nn.Linear):
    """A Linear computing with its quantized weight. The straight-through estimator is applied to
    the weight, not the output, so a step costs one matmul and the gradient reaches the latent
    full-precision weight unchanged. Quantizer parameters are kept per bit width, so a precision
    schedule can switch between them."""

    def __init__(self, linear: nn.Linear, fmt: str, bits: int, cfg: SimpleNamespace):
        super().__init__(
            linear.in_features, linear.out_features, linear.bias is not None, device="meta"
        )
        self.weight, self.bias = (
            linear.weight,
            linear.bias,
        )  # the Linear's own tensors: a copy would cost a model's worth of memory
        fixed = fmt in FIXED_BITS
        self.export_bits = FIXED_BITS.get(fmt) or cfg.progressive_bits or bits
        scheduled = [*parse_bits(cfg.cyclic_bits), *parse_bits(cfg.switchable_bits)]
        widths = {self.export_bits} if fixed else {bits, self.export_bits, *scheduled}
        self.quantizers = {
            b: QUANTIZERS[fmt](b, cfg.group_size, self.in_features, cfg) for b in sorted(widths)
        }
        self.own_bits = self.bits = (
            bits if not fixed else self.export_bits
        )  # own_bits: what it trains at unscheduled
        self.learn = cfg.learn_scale and QUANTIZERS[fmt].learnable
        self.qparams = nn.ModuleDict()
        if self.learn:
            with torch.no_grad():
                for b, q in self.quantizers.items():
                    self.qparams[str(b)] = nn.ParameterDict(
                        {k: nn.Parameter(v) for k, v in q.calibrate(self.weight).items()}
                    )
        self.act_quant = bool(cfg.act_quant)
        self.step = None  # the QuantizedStep computing this layer's weight, while one runs
        self.lam = 1.0  # blend FP -> quantized (lambda warm-up); export ignores it
        # LoRA adapters, bits -> {a, b}: one per width if precision is switchable, else one. They
        # exist from the start (b = 0, so they add nothing) and train only in the LoRA stage.
        adapter_widths = (
            (self.quantizers if cfg.switchable_bits else [self.export_bits])
            if cfg.lora_rank > 0
            else []
        )
        adapters = {
            str(b): new_adapter(cfg.lora_rank, self.in_features, self.out_features)
            for b in adapter_widths
        }
        self.lora = nn.ModuleDict(adapters).to(self.weight.device)
        self.lora.requires_grad_(False)
        self.lora_scale, self.lora_dropout = (
            cfg.lora_alpha / max(cfg.lora_rank, 1),
            nn.Dropout(cfg.lora_dropout),
        )
        self.lora_on, self.frozen = (
            False,
            {},
        )  # frozen: bits -> quantized weight cached for the LoRA stage

    @property
    def quantizer(self) -> Quantizer:
        return self.quantizers[self.bits]

    def learned(self) -> dict | None:
        """This width's trained parameters, or None where they are calibrated from w each step."""
        return dict(self.qparams[str(self.bits)]) if self.learn else None

    def params(self, w: torch.Tensor) -> dict:
        """The quantizer's parameters as the artifact stores them (float16), with gradients."""
        return stored_params(self.quantizer, w, self.learned())

    def definition(self) -> torch.Tensor:
        """This step's weight as a function of w and the learned values, differentiable by autograd:
        fake-quantized, blended with w while lambda < 1. QuantizedStep computes the same faster."""
        return blend(
            self.weight,
            fake_quantize(self.quantizer, self.weight.float(), self.learned()),
            self.lam,
        )

    def computed_weight(self) -> torch.Tensor:
        """The weight a forward outside a QuantizedStep computes with (with --compile 0, in eval):
        the LoRA stage's frozen one, or the definition."""
        return self.frozen[self.bits] if self.bits in self.frozen else self.definition()

    @torch.no_grad()
    def quantized_weight(self) -> torch.Tensor:
        """The weight this step computes with, as a plain tensor (freezing, schedules, tests)."""
        return self.computed_weight()

    def adapter(self) -> nn.ParameterDict | None:
        key = str(self.bits) if str(self.bits) in self.lora else str(self.export_bits)
        return self.lora[key] if self.lora_on else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_quant:
            x = quantize_activation(x)
        if self.step is not None:
            y = self.step.linear(self, x)
        else:
            y = F.linear(x, self.computed_weight().to(x.dtype), self.bias)
        lora = self.adapter()
        if lora is not None:  # unmerged: two thin matmuls instead of re-merging every step
            y = y + self.lora_scale * F.linear(F.linear(self.lora_dropout(x), as_stored(lora["a"]).to(x.dtype)),
                                               as_stored(lora["b"]).to(x.dtype))  # fmt: skip
        return y

    def freeze(self) -> None:
        """LoRA stage: the codes stop moving (fully quantized), so the quantized weight of each
        adapter's width is computed once."""
        self.weight.requires_grad_(False)
        self.qparams.requires_grad_(False)
        training_bits, self.lam, self.frozen = self.bits, 1.0, {}
        with torch.no_grad():
            for key in self.lora:
                self.bits = int(key)
                self.frozen[self.bits] = self.quantized_weight()
        self.bits, self.lora_on = training_bits, True
        self.lora.requires_grad_(True)

    def export(self) -> tuple[artifact.QuantizedLinear, nn.Linear]:
        """Codes + parameters for the artifact, and the plain Linear holding exactly what they
        decode to (plus the merged adapter)."""
        self.bits, self.lam, self.frozen = self.export_bits, 1.0, {}
        with torch.no_grad():
            w = self.weight.float()
            p = self.params(w)
            codes = encode_weight(self.quantizer, w, p)
            weight = decode_weight(self.quantizer, codes, p)
            spec, params = self.quantizer.spec(), self.quantizer.export_params(p)
            lora = self.adapter()
            if lora is not None:
                a, b = lora["a"].half(), lora["b"].half()
                weight = weight + self.lora_scale * (b.float() @ a.float())
                params.update(lora_a=a.cpu(), lora_b=b.cpu())
                spec["adapter"] = {"rank": a.shape[0], "alpha": self.lora_scale * a.shape[0]}
            if self.act_quant:
                spec["input_quant"] = {"format": "int8_token_absmax"}
            plain = nn.Linear(self.in_features, self.out_features, self.bias is not None)
            plain.weight.copy_(weight)
            if self.bias is not None:
                plain.bias.copy_(self.bias)
        return artifact.QuantizedLinear(
            self.quantizer.name, codes.to(torch.int64).cpu(), params, spec
        ), plain


class SwitchableRMSNorm(nn.Module):
    """RMSNorm with one weight per bit width (switchable precision: each width normalises its own
    activation statistics), computing exactly what LlamaRMSNorm computes."""

    def __init__(self, norm: nn.Module, widths: list[int]):
        super().__init__()
        self.eps, self.norm_class = norm.variance_epsilon, type(norm)
        self.weights = nn.ParameterDict(
            {str(b): nn.Parameter(norm.weight.detach().clone()) for b in widths}
        )
        self.bits = widths[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weights[str(self.bits)] * h.to(x.dtype)

    def export(self, bits: int) -> nn.Module:
        """The model's own norm class holding the exported width's weight."""
        norm = self.norm_class(self.weights[str(bits)].shape[0], eps=self.eps)
        norm.weight.data.copy_(self.weights[str(bits)].detach())
        return norm


def all_linears(model: nn.Module) -> dict[str, nn.Linear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def quant_linears(model: nn.Module) -> dict[str, QuantLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}


def swap_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def quantize_model(model: nn.Module, cfg: SimpleNamespace) -> nn.Module:
    """Swap every Linear that format_for() selects for a QuantLinear (calibrating its scales),
    and with SWITCHABLE_BITS every RMSNorm for a SwitchableRMSNorm."""
    head = model.get_output_embeddings()
    for name, linear in all_linears(model).items():
        chosen = format_for(name, cfg)
        if chosen is None:
            continue
        if (
            linear is head and model.config.tie_word_embeddings
        ):  # untie: the embedding stays as stored
            linear = copy.deepcopy(linear)
            model.config.tie_word_embeddings = False
        swap_module(model, name, QuantLinear(linear, *chosen, cfg))
    if cfg.switchable_bits:
        for name, module in list(model.named_modules()):
            if type(module).__name__.endswith("RMSNorm"):
                swap_module(model, name, SwitchableRMSNorm(module, parse_bits(cfg.switchable_bits)))
    return model


def set_bits(model: nn.Module, bits: int | None) -> None:
    """Every variable-width layer (and switchable norm) computes at `bits`; None = each at its own."""
    for m in model.modules():
        if isinstance(m, QuantLinear) and m.quantizer.name not in FIXED_BITS:
            m.bits = bits if bits in m.quantizers else m.own_bits
        elif isinstance(m, SwitchableRMSNorm) and bits is not None and str(bits) in m.weights:
            m.bits = bits


# --- the quantized step ---


def add_grad(p: torch.Tensor, grad: torch.Tensor) -> None:
    p.grad = grad if p.grad is None else p.grad + grad


def detached_inputs(layers: list["QuantLinear"]) -> tuple[list, list, list]:
    """(quantizers, latent weights, learned values or None) of layers without gradients: the
    compiled block functions' arguments."""
    learned = [
        {k: v.detach() for k, v in layer.learned().items()} if layer.learn else None
        for layer in layers
    ]
    return (
        [layer.quantizer for layer in layers],
        [layer.weight.detach().float() for layer in layers],
        learned,
    )


def layer_blocks(model: nn.Module) -> dict[str, list["QuantLinear"]]:
    """The QuantLinears that compute their weight each step (not the LoRA stage's frozen ones), by
    block: a name up to its first index ("model.layers.3"), so each decoder layer's projections are
    one call, of a graph every layer shares."""
    blocks = {}
    for name, layer in quant_linears(model).items():
        if layer.bits not in layer.frozen:
            blocks.setdefault(re.sub(r"(\.\d+)\..*", r"\1", name), []).append(layer)
    return blocks


class QuantizedStep:
    """One training step's quantized weights, a block of layers (a decoder layer's projections)
    per compiled call, computed when the block's first layer runs and given their gradients by
    backward(), after loss.backward(). A context: on exit no layer keeps this step's weights.

    Each weight is a leaf its layer's matmul reads, so autograd leaves dL/dweight in its .grad, and
    backward() runs no quantizer: w's gradient is dL/dweight itself (straight-through, or the
    surrogate's slope), the learned parameters' one pass over dL/dweight and w. The weights stay
    to the end of the step: 4 bytes a weight, 0.43 GB for the 135M model. Freeing each after its
    forward matmul and decoding it again from codes kept in 2-4 bits took less memory, but the
    decode, the saved-tensor hooks and writing the codes (a second loop over w) made the step
    1.06-1.08x an FP step, where this one is ~1.03x. Freeing each as its gradient arrived (a
    post-accumulate-grad hook) lowered the peak over the first steps only: by the tenth, glibc's
    heap had grown as far (4.0 GB, FP 3.5), and backward was ~60 ms slower. Per block, not per
    layer: a compiled call costs ~0.1 ms (guards, dispatch) whatever its size, and the 135M model
    has 210 Linears (per layer its CPU step was 1.08x an FP step, per block 1.04x)."""

    def __init__(self, model: nn.Module):
        self.blocks = list(layer_blocks(model).values())
        self.block_of = {layer: layers for layers in self.blocks for layer in layers}
        self.weights: dict[QuantLinear, torch.Tensor] = {}  # the leaves whose .grad is dL/dweight

    def linear(self, layer: "QuantLinear", x: torch.Tensor) -> torch.Tensor:
        if layer not in self.weights:
            self.quantize(self.block_of[layer])
        return F.linear(x, self.weights[layer].to(x.dtype), layer.bias)

    def quantize(self, layers: list["QuantLinear"]) -> None:
        with torch.no_grad(), torch.autocast(layers[0].weight.device.type, enabled=False):
            weights = quantize_block_compiled(*detached_inputs(layers))
        for layer, w_q in zip(layers, weights):
            trains = layer.weight.requires_grad or layer.learn
            self.weights[layer] = blend(layer.weight.detach(), w_q, layer.lam).requires_grad_(
                trains
            )

    def backward(self) -> None:
        """The latent weights' and the learned parameters' gradients from the dL/dweight that
        loss.backward() left, as autograd gets them through QuantLinear.definition()."""
        for layers in self.blocks:
            grad = {
                layer: self.weights[layer].grad for layer in layers if layer in self.weights
            }  # dL/dweight
            layers = [layer for layer in layers if grad.get(layer) is not None]
            grad_q = {
                layer: grad[layer] if layer.lam >= 1 else layer.lam * grad[layer]
                for layer in layers
            }  # dL/dq(w)
            learners = [layer for layer in layers if layer.learn]
            if learners:
                vjps = block_params_vjp_compiled(
                    *detached_inputs(learners), [grad_q[layer] for layer in learners]
                )
                for layer, vjp in zip(learners, vjps):
                    for k, v in layer.learned().items():
                        add_grad(v, vjp[k])
            trained = [layer for layer in layers if layer.weight.requires_grad]
            surrogates = [layer for layer in trained if layer.quantizer.has_surrogate]
            if surrogates:
                slopes = block_surrogate_vjp_compiled(
                    *detached_inputs(surrogates), [grad_q[layer] for layer in surrogates]
                )
                for layer, slope in zip(surrogates, slopes):
                    grad[layer] = slope if layer.lam >= 1 else slope + (1 - layer.lam) * grad[layer]
            for layer in trained:
                add_grad(layer.weight, grad[layer].to(layer.weight.dtype))

    def __enter__(self) -> "QuantizedStep":
        for layer in self.block_of:
            layer.step = self
        return self

    def __exit__(self, *exc) -> None:
        for layer in self.block_of:
            layer.step = None
        self.weights = {}


# --- activation quantization ---


def quantize_activation(x: torch.Tensor) -> torch.Tensor:
    """Per-token absmax INT8 with a straight-through gradient: s = max|x| / 127 over the last dim."""
    scale = (x.detach().abs().amax(-1, keepdim=True) / 127).clamp_min(1e-8)
    return x + (torch.clamp(torch.round(x.detach() / scale), -127, 127) * scale - x.detach())


# --- distillation + top-k cache ---


def teacher_dtype(device: torch.device, cfg: SimpleNamespace) -> torch.dtype:
    """bf16 where matmuls run natively in it. On the 2-core Zen 4 CPU of the README's bench the
    135M teacher's forward takes 0.56 s in bf16 against 1.08 s in fp32, and its distribution moves
    by KL(fp32 || bf16) = 0.001 nats per token (top-1 agreement 96.5%)."""
    if cfg.teacher_dtype == "auto":
        native = device.type == "cuda" or (
            device.type == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported()
        )
        return torch.bfloat16 if native else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[cfg.teacher_dtype]


def load_teacher(model_dir: Path, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """The unquantized model, frozen, for distillation from a live teacher."""
    teacher = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    return teacher.requires_grad_(False)


def kl_to_teacher(s_logits: torch.Tensor, t_logits: torch.Tensor, temp: float) -> torch.Tensor:
    """KL(teacher || student) averaged over positions, times temp^2 so that its gradient scale
    does not shrink as the temperature grows (Hinton et al., 2015)."""
    log_t, log_s = F.log_softmax(t_logits / temp, -1), F.log_softmax(s_logits / temp, -1)
    return (log_t.exp() * (log_t - log_s)).sum(-1).mean() * temp**2


# Over a 49K vocabulary, eager KL is ~8 passes over the logits forward and backward; compiled, the
# softmaxes, the KL and its gradient fuse into a few row-wise loops.
kl_to_teacher_compiled = compiled(kl_to_teacher)


def distill_terms(
    logits: torch.Tensor, teacher: dict, cfg: SimpleNamespace
) -> dict[str, torch.Tensor]:
    """KD terms. `teacher` holds either full-vocab "logits" (a live teacher) or, from the cache,
    "ids" (B, T, C) of candidate tokens with their "logits"; both distributions are then taken over
    the candidates (cached duplicates carry -inf and drop out)."""
    ids, t_logits, s_logits = teacher.get("ids"), teacher["logits"].float(), logits.float()
    if (
        ids is not None
    ):  # a duplicate (-inf) gets probability 0 on both sides; -1e4 keeps the KL finite
        dropped = torch.isinf(t_logits)
        t_logits, s_logits = (
            t_logits.masked_fill(dropped, -1e4),
            s_logits.gather(-1, ids).masked_fill(dropped, -1e4),
        )
    kl = kl_to_teacher_compiled if cfg.compile else kl_to_teacher
    terms = {"kd": kl(s_logits, t_logits, cfg.distill_temp)}
    top = t_logits.argmax(-1)  # candidate index of the teacher's top-1
    if cfg.hard_top1_weight > 0:
        terms["hard_top1"] = F.cross_entropy(s_logits.flatten(0, 1), top.flatten())
    if cfg.hard_full_top1_weight > 0:
        top_token = top[:, -1] if ids is None else ids[:, -1].gather(-1, top[:, -1:]).squeeze(-1)
        terms["hard_full_top1"] = F.cross_entropy(logits[:, -1].float(), top_token)
    return terms


def teacher_cache_path(prepared, cfg: SimpleNamespace) -> Path:
    """A cache is keyed by everything it depends on: the model, the training tokens, the shape."""
    config = (prepared.model_dir / "config.json").read_bytes()
    key = (f"{prepared.model_name}-{hashlib.sha256(config).hexdigest()[:8]}-{prepared.train.meta['sha256'][:12]}"
           f"-T{cfg.seq_len}-k{cfg.teacher_cache_k}-n{cfg.teacher_cache_negatives}-{cfg.teacher_cache_tokens}tok-s{cfg.seed}")  # fmt: skip
    root = Path(cfg.teacher_cache_dir) if cfg.teacher_cache_dir else paths.cache_dir() / "teacher"
    return root / key


def build_teacher_cache(prepared, cfg: SimpleNamespace, device: torch.device) -> Path:
    """Run the teacher once over TEACHER_CACHE_TOKENS positions (random windows, fixed by the
    seed) and keep each position's top-k logits plus a few random negatives. Written to a temp
    folder and renamed, so a half-built cache is never used."""
    path = teacher_cache_path(prepared, cfg)
    if (path / "logits.npy").exists():
        return path
    tokens = prepared.train.tokens()
    n_windows = max(1, cfg.teacher_cache_tokens // cfg.seq_len)
    rng = np.random.default_rng(cfg.seed)
    starts = rng.integers(0, len(tokens) - cfg.seq_len - 1, size=n_windows)
    windows = tokens[starts[:, None] + np.arange(cfg.seq_len + 1)].astype(np.int64)
    teacher = load_teacher(
        prepared.model_dir, device, torch.float32
    )  # cached logits at full precision
    k, n_neg = cfg.teacher_cache_k, cfg.teacher_cache_negatives
    generator = torch.Generator().manual_seed(cfg.seed)
    all_ids, all_logits = [], []
    for i in tqdm(range(0, n_windows, cfg.batch_size), desc="teacher cache", unit="batch"):
        x = torch.from_numpy(windows[i : i + cfg.batch_size, :-1]).to(device)
        with torch.no_grad():
            logits = teacher(input_ids=x).logits.float().cpu()
        top = logits.topk(k, dim=-1)
        negatives = torch.randint(0, logits.shape[-1], (*x.shape, n_neg), generator=generator)
        ids = torch.cat([top.indices, negatives], -1)
        values = logits.gather(-1, ids)
        duplicate = (negatives.unsqueeze(-1) == top.indices.unsqueeze(-2)).any(-1)
        duplicate |= torch.triu(
            (negatives.unsqueeze(-1) == negatives.unsqueeze(-2)), diagonal=1
        ).any(-2)
        values[..., k:] = values[..., k:].masked_fill(duplicate, -torch.inf)
        all_ids.append(ids.to(torch.int32).numpy())
        all_logits.append(values.half().numpy())
    del teacher
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    np.save(tmp / "windows.npy", windows.astype(np.int32))
    np.save(tmp / "ids.npy", np.concatenate(all_ids))
    np.save(tmp / "logits.npy", np.concatenate(all_logits))
    os.replace(tmp, path)
    return path


def load_teacher_cache(path: Path) -> dict[str, np.ndarray]:
    return {
        name: np.load(path / f"{name}.npy", mmap_mode="r") for name in ("windows", "ids", "logits")
    }


def batch_at(step: int, tokens: np.ndarray, cache: dict | None, cfg: SimpleNamespace,
             device: torch.device = torch.device("cpu")) -> tuple[torch.Tensor, torch.Tensor, dict]:  # fmt: skip
    """The batch of step `step` on `device`, a pure function of (seed, step): a resumed run draws
    exactly the batches the uninterrupted one would have. With a teacher cache, windows come from
    the cache."""
    rng = np.random.default_rng([cfg.seed, step])
    if cache is not None:
        rows = np.sort(rng.integers(0, len(cache["windows"]), size=cfg.batch_size))
        window = torch.from_numpy(cache["windows"][rows].astype(np.int64))
        teacher = {"ids": torch.from_numpy(cache["ids"][rows].astype(np.int64)),
                   "logits": torch.from_numpy(cache["logits"][rows].astype(np.float32))}  # fmt: skip
    else:
        starts = rng.integers(0, len(tokens) - cfg.seq_len - 1, size=cfg.batch_size)
        window = torch.from_numpy(
            tokens[starts[:, None] + np.arange(cfg.seq_len + 1)].astype(np.int64)
        )
        teacher = {}
    window = window.to(device)
    return window[:, :-1], window[:, 1:], {k: v.to(device) for k, v in teacher.items()}


# --- LoRA ---


def start_lora_stage(model: nn.Module) -> None:
    """Freeze every quantized weight and its parameters; only the adapters train from here on."""
    model.requires_grad_(False)
    for layer in quant_linears(model).values():
        layer.freeze()


def lora_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters alone (float16, as the artifact stores them): a small file to ship or reload."""
    return {f"{name}.lora.{bits}.{key}": p.detach().half().cpu().contiguous()
            for name, layer in quant_linears(model).items() for bits, pd in layer.lora.items() for key, p in pd.items()}  # fmt: skip


# --- schedules (lambda / cyclic / progressive) ---


def lr_at(step: int, fraction: float, cfg: SimpleNamespace) -> float:
    """Linear warm-up over steps, then cosine decay over the budget's progress."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    cosine = 0.5 * (1 + math.cos(math.pi * min(fraction, 1.0)))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine)


def lambda_at(fraction: float, cfg: SimpleNamespace) -> float:
    """How quantized the forward is: 0 = full precision, 1 = fully quantized."""
    if cfg.lambda_warmup <= 0 or fraction >= cfg.lambda_warmup:
        return 1.0
    ramp = fraction / cfg.lambda_warmup
    if cfg.lambda_schedule == "plateau":
        return math.floor(ramp * cfg.lambda_plateaus) / cfg.lambda_plateaus
    return ramp


def bits_at(step: int, cfg: SimpleNamespace) -> int | None:
    """This step's bit width under a switchable or cyclic schedule; None = each layer's own."""
    if cfg.switchable_bits:
        widths = parse_bits(cfg.switchable_bits)
        return widths[step % len(widths)]
    if cfg.cyclic_bits:
        low, high = min(parse_bits(cfg.cyclic_bits)), max(parse_bits(cfg.cyclic_bits))
        phase = (step % cfg.cycle_steps) / cfg.cycle_steps
        shape = (
            0.5 * (1 - math.cos(2 * math.pi * phase))
            if cfg.cyclic_shape == "cosine"
            else 1 - abs(2 * phase - 1)
        )
        return round(low + (high - low) * shape)
    return None


def start_progressive_stage(model: nn.Module) -> None:
    """Continue at each layer's final width, its parameters re-calibrated on the current quantized
    weight: for a LUT this is k-means of the 2^k old entries (weighted by use) down to the new size."""
    for layer in quant_linears(model).values():
        if not layer.learn or str(layer.export_bits) not in layer.qparams:
            continue
        with torch.no_grad():
            current = layer.quantized_weight().float()
            fresh = layer.quantizers[layer.export_bits].calibrate(current)
            for key, value in layer.qparams[str(layer.export_bits)].items():
                value.copy_(fresh[key])


# --- stabilizers + checkpoints ---


def freeze_modules(model: nn.Module, cfg: SimpleNamespace) -> None:
    """Hold some latent weights fixed (they are still quantized): attention's v/o projections
    are where low-bit training tends to diverge first; the last MLPs shape the output most."""
    n_layers = model.config.num_hidden_layers
    for name, layer in quant_linears(model).items():
        frozen_ov = cfg.freeze_attn_ov and (name.endswith("v_proj") or name.endswith("o_proj"))
        index = next((int(part) for part in name.split(".") if part.isdigit()), -1)
        frozen_mlp = ".mlp." in name and index >= n_layers - cfg.freeze_last_mlps
        if frozen_ov or frozen_mlp:
            layer.weight.requires_grad_(False)


class EMA:
    """Exponential moving average of the trained parameters; the export uses the average."""

    def __init__(self, params: dict[str, nn.Parameter], decay: float):
        self.decay, self.params = decay, params
        self.shadow = {name: p.detach().clone() for name, p in params.items()}

    @torch.no_grad()
    def update(self) -> None:
        for name, p in self.params.items():
            self.shadow[name].lerp_(p.detach(), 1 - self.decay)

    @torch.no_grad()
    def copy_to_model(self) -> None:
        for name, p in self.params.items():
            p.copy_(self.shadow[name])


def checkpoint_dir(cfg: SimpleNamespace) -> Path:
    """Checkpoints of runs with the same training settings share a folder: that is what makes
    one "compatible" for --resume auto."""
    if cfg.checkpoint_dir:
        return Path(cfg.checkpoint_dir)
    key = json.dumps({k: v for k, v in sorted(vars(cfg).items()) if k not in NOT_TRAINING})
    return paths.cache_dir() / "checkpoints" / hashlib.sha256(key.encode()).hexdigest()[:12]


def save_checkpoint(state: dict, cfg: SimpleNamespace) -> Path:
    folder = checkpoint_dir(cfg)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step{state['step']:07d}.pt"
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # a kill mid-save leaves the previous checkpoint intact
    for old in folder.glob("step*.pt"):
        if old != path:
            old.unlink()
    return path


def find_checkpoint(cfg: SimpleNamespace) -> Path | None:
    if cfg.resume != "auto":
        return Path(cfg.resume) if cfg.resume else None
    found = sorted(checkpoint_dir(cfg).glob("step*.pt"))
    return found[-1] if found else None


# --- training loop ---


def keep_freed_memory() -> None:
    """Have glibc's malloc keep what a step frees for the next step. By default it hands buffers
    over 32 MB (logits and their gradients) and the heap's free top back to the kernel, and each
    CPU step page-faults ~1 GB in again: a fifth of a step's time, and most of its jitter."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc
        return
    m_trim_threshold, m_mmap_max = -1, -4
    mallopt(m_mmap_max, 0)  # every allocation from the heap
    mallopt(m_trim_threshold, 2**31 - 1)  # and the heap never shrinks


def pick_device(name: str) -> torch.device:
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def autocast_dtype(device: torch.device, cfg: SimpleNamespace) -> torch.dtype | None:
    """fp32 on CPU, where runs are compared (--dtype bf16 is faster on a CPU that multiplies bf16
    natively, slower on one that emulates it); bf16 autocast on CUDA/MPS."""
    if cfg.dtype == "auto":
        return None if device.type == "cpu" else torch.bfloat16
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.dtype]


class LossIsNotFinite(Exception):
    pass


def make_optimizer(
    model: nn.Module, cfg: SimpleNamespace
) -> tuple[torch.optim.Optimizer, dict, "EMA | None"]:
    """AdamW (and an EMA) over whatever currently requires grad: a new stage gets a fresh pair.
    Fused: one kernel per tensor. PyTorch's default on CPU is a Python loop of ~6 ops per tensor,
    0.30 s of the 135M model's ~2.8 s CPU step against 0.08 s fused, and a QAT model's 210 scale
    tensors cost that loop 0.02 s more."""
    trained = {name: p for name, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(
        trained.values(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95), fused=True
    )
    return optimizer, trained, EMA(trained, cfg.ema_decay) if cfg.ema_decay > 0 else None


def begin_lora_stage(model: nn.Module, ema: "EMA | None", cfg: SimpleNamespace) -> tuple:
    if ema is not None:
        ema.copy_to_model()  # freeze the averaged weights, not the last step's
    start_lora_stage(model)
    return make_optimizer(model, cfg)


def restore_checkpoint(path: Path, model, scaler, stage: dict, cfg, device) -> tuple[int, tuple]:
    """Load everything a bit-exact continuation needs. Batches need no state: batch_at(step)."""
    state = torch.load(path, map_location=device, weights_only=False)
    stage.update(state["stage"])
    model.load_state_dict(state["model"])
    if stage["lora"]:  # after loading: the cached quantized weights come from the restored latents
        start_lora_stage(model)
    optimizer, trained, ema = make_optimizer(model, cfg)
    optimizer.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    if ema is not None:
        ema.shadow = state["ema"]
    torch.set_rng_state(
        state["rng"]["torch"].cpu()
    )  # map_location moved them, and an RNG state is a CPU tensor
    if device.type == "cuda":
        torch.cuda.set_rng_state(state["rng"]["cuda"].cpu())
    print(f"resumed from {path} at step {state['step']}")
    return state["step"], (optimizer, trained, ema)


def compute_loss(model, teacher, x, y, teacher_out: dict, cfg) -> tuple[torch.Tensor, torch.Tensor]:
    """(training loss, plain cross-entropy) of one batch. The teacher's logits come from the live
    teacher, or arrive in teacher_out from the cache; without either the loss is the CE."""
    logits = model(input_ids=x).logits
    if teacher is not None:
        with torch.no_grad():
            teacher_out = {"logits": teacher(input_ids=x).logits}
    kd_weight = cfg.distill_weight if teacher_out else 0.0
    with torch.set_grad_enabled(
        torch.is_grad_enabled() and kd_weight < 1
    ):  # at weight 1 the CE is only logged
        ce = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
    if not teacher_out:
        return ce, ce
    terms = distill_terms(logits, teacher_out, cfg)
    loss = kd_weight * terms["kd"] + cfg.hard_top1_weight * terms.get("hard_top1", 0)
    loss = loss + cfg.hard_full_top1_weight * terms.get("hard_full_top1", 0)
    if kd_weight < 1:
        loss = loss + (1 - kd_weight) * ce
    return loss, ce


def train_step(
    model, teacher, batch: tuple, optimizer, scaler, trained: dict, cfg
) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step on batch = (x, y, teacher_out); returns (loss, ce). The quantized weights
    are computed once for the step (QuantizedStep; with --compile 0 each layer differentiates its
    definition), the loss under autocast where autocast_dtype() asks for it."""
    x, y, teacher_out = batch
    dtype = autocast_dtype(x.device, cfg)
    optimizer.zero_grad(
        set_to_none=True
    )  # before the forward, whose activations can take the memory
    with QuantizedStep(model) if cfg.compile else contextlib.nullcontext() as weights:
        with torch.autocast(
            x.device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None
        ):
            loss, ce = compute_loss(model, teacher, x, y, teacher_out, cfg)
        if not torch.isfinite(loss):
            raise LossIsNotFinite(f"loss is {loss.item()}")
        scaler.scale(loss).backward()
        if weights is not None:
            weights.backward()
    if cfg.grad_clip > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(trained.values(), cfg.grad_clip)
    scaler.step(optimizer)
    scaler.update()
    return loss, ce


def train(model, teacher, prepared, cfg, device, run_dir: Path) -> Budget:
    budget = Budget.from_env(max_steps=cfg.steps or None)
    tokens = prepared.train.tokens()
    if len(tokens) <= cfg.seq_len + 1:
        raise DataError(
            f"{len(tokens)} training tokens cannot fill one window of {cfg.seq_len + 1}"
        )
    cache = None
    if cfg.teacher_cache_k and cfg.distill_weight > 0:
        cache = load_teacher_cache(build_teacher_cache(prepared, cfg, device))
    dtype = autocast_dtype(device, cfg)
    scaler = torch.amp.GradScaler(
        device.type, enabled=dtype == torch.float16 and device.type == "cuda"
    )
    freeze_modules(model, cfg)
    stage = {"lora": cfg.lora_rank > 0 and cfg.lora_at <= 0, "progressive": False}
    if stage["lora"]:
        start_lora_stage(model)
    optimizer, trained, ema = make_optimizer(model, cfg)
    step = 0
    checkpoint = find_checkpoint(cfg)
    if checkpoint is not None:
        step, (optimizer, trained, ema) = restore_checkpoint(
            checkpoint, model, scaler, stage, cfg, device
        )
        budget.steps = step

    log = open(run_dir / "loss.csv", "w")
    log.write("step,loss,ce,lr,lambda,bits,tokens_per_s,train_seconds\n")
    bar = tqdm(
        total=100,
        desc="train",
        unit="%",
        mininterval=2.0,
        bar_format="{l_bar}{bar}| {n:.0f}/{total}% [{elapsed}{postfix}]",
    )
    model.train()
    window_started, window_tokens = time.perf_counter(), 0
    while not budget.done():
        fraction = budget.fraction
        if cfg.progressive_bits and not stage["progressive"] and fraction >= cfg.progressive_at:
            start_progressive_stage(model)
            stage["progressive"] = True
        if cfg.lora_rank > 0 and not stage["lora"] and fraction >= cfg.lora_at:
            optimizer, trained, ema = begin_lora_stage(model, ema, cfg)
            stage["lora"] = True
        lam = lambda_at(fraction, cfg)
        bits = cfg.progressive_bits if stage["progressive"] else bits_at(step, cfg)
        set_bits(model, bits)
        for layer in quant_linears(model).values():
            layer.lam = lam
        lr = lr_at(step, fraction, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr

        batch = batch_at(step, tokens, cache, cfg, device)
        try:
            loss, ce = train_step(model, teacher, batch, optimizer, scaler, trained, cfg)
        except LossIsNotFinite as err:
            raise LossIsNotFinite(f"{err} at step {step}") from None
        if ema is not None:
            ema.update()
        step += 1
        budget.step_done(cfg.batch_size * cfg.seq_len)

        window_tokens += cfg.batch_size * cfg.seq_len
        rate = window_tokens / (time.perf_counter() - window_started)
        bar.n = 100 * budget.fraction
        bar.set_postfix_str(f"loss {loss.item():.3f} | {rate:,.0f} tok/s", refresh=False)
        bar.update(0)
        if step % cfg.log_every == 0 or step == 1:
            shown_bits = bits if bits is not None else "-"
            print(f"step {step:5d} | loss {loss.item():.4f} | ce {ce.item():.4f} | lr {lr:.2e} | lambda {lam:.2f} | "
                  f"bits {shown_bits} | {rate:,.0f} tok/s | {budget.elapsed:.0f}/{budget.seconds:.0f} s", flush=True)  # fmt: skip
            log.write(f"{step},{loss.item():.6f},{ce.item():.6f},{lr:.6g},{lam:.4f},{shown_bits},"
                      f"{rate:.1f},{budget.elapsed:.2f}\n")  # fmt: skip
            log.flush()
            window_started, window_tokens = time.perf_counter(), 0
        if (
            cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and not budget.done()
        ):  # the last step exports instead
            rng = {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state() if device.type == "cuda" else None,
            }
            save_checkpoint({"step": step, "stage": stage, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                             "scaler": scaler.state_dict(), "ema": ema.shadow if ema else None, "rng": rng}, cfg)  # fmt: skip
    bar.close()
    log.close()
    if ema is not None:
        ema.copy_to_model()
    return budget


# --- export ---


def changed_tensors(model: nn.Module, model_dir: Path, skip: set[str]) -> dict[str, torch.Tensor]:
    """The model's floating tensors (a tied one once) that differ from the prepared model's, by
    state_dict key: the artifact stores those, the harness takes every other from the prepared model."""
    prepared = {}
    for path in sorted(Path(model_dir).glob("model*.safetensors")):
        prepared.update(load_file(path))
    changed, seen = {}, set()
    for key, tensor in model.state_dict().items():
        if key in skip or not tensor.is_floating_point() or tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        if key not in prepared or not torch.equal(tensor, prepared[key].to(tensor.dtype)):
            changed[key] = tensor
    return changed


def export(model: nn.Module, cfg: SimpleNamespace, model_dir: Path, out_dir: Path) -> None:
    """Write the artifact: codes + parameters for every quantized Linear, every other Linear
    declared dense, and the tensors that changed in training (norms, dense Linears, ...) in fp32.
    Always the fully quantized model, whatever lambda or bit width the last step trained at."""
    model = model.float().cpu()
    layers, dense = {}, []
    for name, module in list(model.named_modules()):
        if isinstance(module, SwitchableRMSNorm):
            swap_module(model, name, module.export(cfg.bits))
    for name, linear in all_linears(model).items():
        if isinstance(linear, QuantLinear):
            layers[name], plain = linear.export()
            swap_module(model, name, plain)
        elif linear is not model.get_output_embeddings():
            dense.append(name)
    artifact.save(
        out_dir,
        layers,
        changed_tensors(model, model_dir, {f"{name}.weight" for name in layers}),
        dense,
    )


# --- main ---


def main(argv: list[str]) -> int:
    cfg = parse_flags(argv)
    keep_freed_memory()
    run_dir = Path(os.environ["HARNESS_RUN_DIR"])
    torch.manual_seed(cfg.seed)
    device = pick_device(cfg.device)
    prepared = load_prepared(need_eval=False)  # the sandbox shows train.py no eval split
    if cfg.baseline not in ("", "fp", "rtn"):
        raise SystemExit(f"--baseline must be fp or rtn, not {cfg.baseline!r}")
    for _, fmt, _ in [("", cfg.quant, 0), *module_formats(cfg)]:
        if fmt not in QUANTIZERS and fmt != "none":
            raise SystemExit(f"unknown format {fmt!r}; known: {sorted(QUANTIZERS)} or none")
    if cfg.switchable_bits and cfg.bits not in parse_bits(cfg.switchable_bits):
        raise SystemExit(
            f"--bits {cfg.bits} (the exported width) must be one of --switchable-bits {cfg.switchable_bits}"
        )
    # what train.py says about itself: settings and a crash reason; the runner measures the rest
    info = {
        "description": cfg.description
        or (f"baseline {cfg.baseline}" if cfg.baseline else f"{cfg.quant} QAT"),
        "config": {k: v for k, v in vars(cfg).items() if k != "description"},
    }
    (run_dir / "train.json").write_text(
        json.dumps(info, indent=1)
    )  # early, so a crash still names its run

    model = AutoModelForCausalLM.from_pretrained(prepared.model_dir, dtype=torch.float32).to(device)
    print(
        f"model {prepared.model_name}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params on {device}"
    )
    if cfg.baseline != "fp":
        quantize_model(model, cfg)
    budget = None
    if not cfg.baseline:
        teacher = None
        if cfg.distill_weight > 0 and not cfg.teacher_cache_k:
            teacher = load_teacher(prepared.model_dir, device, teacher_dtype(device, cfg))
        try:
            budget = train(model, teacher, prepared, cfg, device, run_dir)
        except LossIsNotFinite as err:
            info["reason"] = str(err)
            (run_dir / "train.json").write_text(json.dumps(info, indent=1))
            print(f"stopping: {err}", file=sys.stderr)
            return 3
        del teacher
    steps = budget.steps if budget else 0
    info.update(steps=steps, train_tokens=steps * cfg.batch_size * cfg.seq_len,
                train_seconds=budget.elapsed if budget else 0.0)  # fmt: skip
    if cfg.lora_rank > 0 and quant_linears(model):
        save_file(lora_tensors(model), str(run_dir / "lora.safetensors"))
    export(model, cfg, prepared.model_dir, run_dir / "artifact")
    (run_dir / "train.json").write_text(json.dumps(info, indent=1))
    print(f"exported {run_dir / 'artifact'} after {steps} steps")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
