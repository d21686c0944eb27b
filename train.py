"""Quantization-aware training of a small language model: the one file experiments change.

    python train.py                                   # ternary QAT with distillation
    python train.py --quant codebook --bits 2         # 2-bit {-1.5,-.5,.5,1.5}*s codebook
    python train.py --module-quant "mlp=codebook:2,self_attn=int:4"   # per-module formats
    python train.py --teacher-cache-k 32              # distil from a precomputed top-k cache
    python train.py --lora-rank 16 --lora-at 0.8      # last 20% of the budget: LoRA on fixed codes
    python train.py --baseline fp                     # score the unquantized model (no training)
    python train.py --baseline rtn                    # score the chosen quantizer untrained
    python -m harness run --nproc 2                   # data parallel on 2 devices (torchrun)
    python -m harness run --nproc 8 -- --fsdp 1 --compile 0   # parameters sharded (FSDP2)

Every module-level UPPER_CASE name holding a number or a string is a flag (LR -> --lr), wherever
it is defined: parse_flags() collects them when it runs. Run by hand, this file hands itself to
the harness (harness/runner.py), which runs it in a child process, verifies and scores the
exported artifact in another, and appends the row to results.tsv. Everything here may change;
harness/ and prepare.py may not. The artifact format is docs/artifact-format.md; measurements
behind the choices made here are docs/train-notes.md.

What the harness, its agent and the tests rely on:
- each setting is one line, `NAME = value  # comment` (the agent shows and edits them so);
- main(argv) returns the exit code and starts by calling parse_flags(argv); with HARNESS_RUN_DIR
  set it writes train.json, loss.csv and artifact/ (export()) there; under torchrun rank 0 alone
  writes them and announces steps (harness/budget.py), each counting the whole batch;
- tests/test_runner.py and tests/test_agent.py edit the lines `cfg = parse_flags(argv)`,
  `return ce, ce` and `layers[name], plain = linear.export()`: each must stay unique;
- tests/test_train_*.py and bench/ call the functions and classes below by name.
"""

import os
import sys

if __name__ == "__main__" and "HARNESS_RUN_DIR" not in os.environ:
    # by hand: the harness runs this file as its child, so a crash or a hang still becomes a row
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
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from tqdm import tqdm
from transformers import AutoModelForCausalLM

from harness import artifact, paths
from harness.budget import Budget
from harness.data import DataError, load_prepared

# --- settings (each is also a flag: LR -> --lr, GROUP_SIZE -> --group-size) ---

# what the weights become
QUANT = "ternary"  # every decoder Linear: ternary|codebook|int|log|mxfp4|mxfp8|lut|none
BITS = 2  # bits per weight of codebook / int / log / lut (ternary and mxfp fix their own)
GROUP_SIZE = 128  # weights per scale along in_features; -1 = one scale per output channel
MODULE_QUANT = ""  # first match wins: "mlp=codebook:2,self_attn=int:4,lm_head=int:8,o_proj=none"
LEARN_SCALE = 1  # 1: scales/LUTs are calibrated, then trained; 0: recalibrated from w each step
INT_SYMMETRIC = 1  # int: 1 = symmetric (c - 2^(k-1)) * s, 0 = affine min-max with a zero point
TERNARY_THRESHOLD = 0.5  # ternary deadzone: |w| <= threshold * s is 0 (0.5 = round to nearest)
TERNARY_TANH = 0.0  # > 0: w's gradient follows a tanh staircase this sharp, not the identity
LUT_RANK = 0  # lut: W = (A @ B) * LUT[idx] with A, B of this rank; 0 = no low-rank scale
ACT_QUANT = 0  # 1: fake-quantize every quantized Linear's input per token to INT8 (absmax)
# schedules
LAMBDA_WARMUP = 0.0  # budget fraction over which the forward blends FP -> quantized; 0 = none
LAMBDA_SCHEDULE = "linear"  # linear | plateau (lambda rises in LAMBDA_PLATEAUS equal stairs)
LAMBDA_PLATEAUS = 4  # stairs of the plateau schedule
PROGRESSIVE_BITS = 0  # > 0: at PROGRESSIVE_AT drop to this many bits (a LUT shrinks by k-means)
PROGRESSIVE_AT = 0.5  # fraction of the budget where progressive precision switches
CYCLIC_BITS = ""  # "2-4": each step's bits cycle between min and max; export at BITS
CYCLIC_SHAPE = "cosine"  # cosine | triangular
CYCLE_STEPS = 32  # steps per precision cycle
SWITCHABLE_BITS = ""  # "2,4": steps rotate widths, each with own scales, norms, LoRA; export BITS
# training
BASELINE = ""  # "fp" or "rtn": export without training, recorded as a baseline row
STEPS = 0  # cap on optimizer steps; 0 = the wall-clock budget alone decides
BATCH_SIZE = 0  # sequences per step, all ranks together; 0 = auto: 4 on CPU, fit_batch() on CUDA
SEQ_LEN = 0  # tokens per sequence; 0 = auto: 128 on CPU (where runs are compared), 512 on CUDA
LR = 5e-4  # peak AdamW learning rate of the latent weights and the quantizer parameters
WARMUP_STEPS = 10  # linear warm-up, then cosine decay over the budget
MIN_LR_RATIO = 0.1  # the cosine ends at LR * MIN_LR_RATIO
WEIGHT_DECAY = 0.0  # decay pulls latent weights to 0, which ternary maps to the 0 level
COMPILE = 1  # 1: torch.compile fake-quant and KD (first step compiles); 0: eager autograd
DTYPE = "auto"  # auto (fp32 on CPU, bf16 on CUDA/MPS) | fp32 | bf16 | fp16 (GradScaler, CUDA)
# distillation
DISTILL_WEIGHT = 1.0  # loss = (1 - w) * CE + w * KD; 0 trains on the text alone (no teacher)
DISTILL_TEMP = 1.0  # softmax temperature of the KD term (scaled by T^2)
TEACHER_DTYPE = "auto"  # live teacher: auto (bf16 where matmuls run natively in it) | fp32 | bf16
HARD_TOP1_WEIGHT = 0.0  # + CE towards the teacher's top-1 among the candidates, every position
HARD_FULL_TOP1_WEIGHT = 0.0  # + full-vocab CE towards the teacher's top-1 at the last position
TEACHER_CACHE_K = 0  # > 0: distil from a precomputed cache of the teacher's top-k logits
TEACHER_CACHE_NEGATIVES = 32  # random other tokens cached per position: KD pushes tail mass down
TEACHER_CACHE_TOKENS = 65_536  # cached positions (6 bytes * (k + negatives) each)
TEACHER_CACHE_DIR = ""  # "" = <harness cache>/teacher (shared by runs, writable in the sandbox)
# LoRA recovery
LORA_RANK = 0  # > 0: a last stage fixes the quantized weights and trains adapters of this rank
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
RESUME = ""  # "auto" = latest compatible checkpoint, or a path (bit-exact under --steps)
# bookkeeping
LOG_EVERY = 10  # steps between log lines and loss.csv rows
SEED = 0  # torch's RNG (adapters, dropout), the batches and the teacher cache's windows
DEVICE = "auto"  # auto | cpu | cuda | mps
FSDP = 0  # 1: shard parameters, grads, optimizer state with FSDP2 (the teacher is not sharded)
DESCRIPTION = ""  # one line for results.tsv

# settings that do not change what is trained: left out of the checkpoint folder's key
NOT_TRAINING = "resume description log_every checkpoint_every checkpoint_dir device".split()


def settings() -> dict[str, int | float | str]:
    """Every UPPER_CASE module-level number or string, by name: read when called, so a setting
    defined anywhere in the file (or added later) is a flag all the same."""
    return {
        name: value
        for name, value in globals().items()
        if name.isupper() and isinstance(value, (int, float, str))
    }


def parse_flags(argv: list[str]) -> SimpleNamespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    for name, default in settings().items():
        kind = type(default)
        flag = "--" + name.lower().replace("_", "-")
        parser.add_argument(flag, type=kind, default=default, metavar=kind.__name__.upper())
    return SimpleNamespace(**vars(parser.parse_args(argv)))


# --- quantizers ---
# A quantizer maps a weight (out, in) to integer codes plus a few per-group parameters, and back.
# The training forward IS decode(encode(w)) (with the parameters rounded to how they are stored),
# so the exported artifact computes exactly what training saw.


class Segment(NamedTuple):
    """Columns holding whole groups of one width: the full groups, or the short last one."""

    groups: slice
    columns: slice


def segments(in_features: int, group: int) -> list[Segment]:
    full, short = divmod(in_features, group)
    parts = [Segment(slice(0, full), slice(0, full * group))] if full else []
    if short:
        parts.append(Segment(slice(full, full + 1), slice(full * group, in_features)))
    return parts


def grouped(x: torch.Tensor, part: Segment) -> torch.Tensor:
    """The segment's columns of x (out, in) as a view (out, its groups, width): no padding, so
    compiled loops over it need no masked loads."""
    return x[:, part.columns].unflatten(1, (part.groups.stop - part.groups.start, -1))


def joined(parts: list[torch.Tensor]) -> torch.Tensor:
    """Grouped segments back to one contiguous (out, in): the matmul reads it faster than a view."""
    return torch.cat([x.flatten(1) for x in parts], 1)


def round_ste(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.round(x) - x).detach()


def float16_value(x: torch.Tensor) -> torch.Tensor:
    """x.half().float() in integer arithmetic (ties to even, subnormals, inf beyond 65504), because
    compiled code may drop a cast to float16 and back as a no-op."""
    bits = x.view(torch.int32)
    normal = ((bits + 0xFFF + ((bits >> 13) & 1)) & ~0x1FFF).view(torch.float32)
    subnormal = torch.round(x * 2.0**24) * 2.0**-24
    rounded = torch.where(x.abs() < 2.0**-14, subnormal, normal)
    return torch.where(rounded.abs() > 65504, rounded * float("inf"), rounded)


def as_stored(p: torch.Tensor) -> torch.Tensor:
    """The value a float16-stored parameter will have in the artifact; gradients pass through."""
    return p + (float16_value(p) - p).detach()


QUANTIZERS: dict[str, type["Quantizer"]] = {}  # format name -> class, filled as classes are defined


class Quantizer:
    """Base of the formats. Subclasses define calibrate (w (out, in) -> per-group params
    (out, n_groups)), and encode / decode, which work on one segment of grouped weights
    (out, n, width) and its groups' parameters. Options are constructor arguments, which
    from_settings() reads from the flags."""

    name = ""
    learnable = True  # False: params are a function of w alone (recomputed every step)
    has_surrogate = False  # True: w's gradient is surrogate()'s slope, not the identity (STE)
    min_scale = 2.0**-14  # smallest normal float16: a scale never rounds to 0

    def __init_subclass__(cls):
        if cls.name:
            QUANTIZERS[cls.name] = cls

    def __init__(self, bits: int, group: int, in_features: int):
        self.bits, self.in_features = bits, in_features
        self.group = in_features if group <= 0 else min(group, in_features)
        self.segments = segments(in_features, self.group)

    @classmethod
    def from_settings(
        cls, bits: int, group: int, in_features: int, cfg: SimpleNamespace
    ) -> "Quantizer":
        return cls(bits, group, in_features)

    @property
    def levels(self) -> int:
        return 2**self.bits

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
        """fit(x) -> per-group values of x (out, n, width), on each group's own weights."""
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


class TernaryQuantizer(Quantizer):
    """{-1, 0, +1} * s, s = per-group absmean (BitNet b1.58); codes 0, 1, 2. `threshold`: the
    deadzone |w| <= threshold * s; `tanh` > 0: the sharpness of the surrogate gradient."""

    name = "ternary"
    levels = 3

    def __init__(self, bits, group, in_features, threshold: float = 0.5, tanh: float = 0.0):
        super().__init__(bits, group, in_features)
        self.threshold, self.tanh, self.has_surrogate = threshold, tanh, tanh > 0

    @classmethod
    def from_settings(cls, bits, group, in_features, cfg):
        return cls(bits, group, in_features, cfg.ternary_threshold, cfg.ternary_tanh)

    def calibrate(self, w):
        absmean = self.each_group(w.abs(), lambda x: x.mean(-1))
        return {"scale": absmean.clamp_min(self.min_scale)}

    def encode(self, w, p):
        bound = self.expand(self.threshold * p["scale"])  # per group: no division per weight
        # selects, not summed comparisons: those compile to slow mask casts
        return torch.where(w > bound, 2.0, torch.where(w >= -bound, 1.0, 0.0))

    def decode(self, codes, p):
        return (codes - 1) * self.expand(p["scale"])

    def surrogate(self, w, p):
        """A smooth staircase s * (tanh(k(x - t)) + tanh(k(x + t))) / 2 whose slope gives the
        weights near a threshold a stronger gradient than those far from one."""
        s, t, k = self.expand(p["scale"].detach()), self.threshold, self.tanh
        x = w / s
        return s * 0.5 * (torch.tanh(k * (x - t)) + torch.tanh(k * (x + t)))

    def spec(self):
        return {"group_size": super().spec()["group_size"]}


class CodebookQuantizer(Quantizer):
    """Balanced k-bit grid (c - (2^k - 1)/2) * s: 2-bit {-1.5, -0.5, 0.5, 1.5} * s, no zero
    level. The scale starts at the MSE-optimal clip, by Newton iterations (OCTAV, Sakr 2022)."""

    name = "codebook"

    def calibrate(self, w):
        clip = self.each_group(w.abs(), self.mse_clip)
        # levels cells of width s span [-clip, clip]
        return {"scale": (2 * clip / self.levels).clamp_min(self.min_scale)}

    def mse_clip(self, x):
        """The MSE-optimal clip of |w| (..., n) per row, from the absmax:
        clip <- E[|w| ; |w| > clip] / (4^-k / 3 * P(|w| <= clip) + P(|w| > clip))."""
        clip = x.amax(-1)
        for _ in range(10):
            over = (x > clip.unsqueeze(-1)).float()
            inside = (4.0**-self.bits / 3) * (1 - over).mean(-1)
            clip = (x * over).mean(-1) / (inside + over.mean(-1)).clamp_min(1e-12)
        return clip

    def encode(self, w, p):
        codes = (w * self.expand(1 / p["scale"])).add_((self.levels - 1) / 2)
        return codes.round_().clamp_(0, self.levels - 1)

    def decode(self, codes, p):
        return (codes - (self.levels - 1) / 2) * self.expand(p["scale"])


class IntQuantizer(Quantizer):
    """k-bit integers, min-max calibrated: symmetric (c - 2^(k-1)) * s or affine (c - z) * s."""

    name = "int"

    def __init__(self, bits, group, in_features, symmetric: bool = True):
        super().__init__(bits, group, in_features)
        self.symmetric = symmetric

    @classmethod
    def from_settings(cls, bits, group, in_features, cfg):
        return cls(bits, group, in_features, bool(cfg.int_symmetric))

    def calibrate(self, w):
        if self.symmetric:
            return {"scale": (self.absmax(w) / (self.levels // 2 - 1)).clamp_min(self.min_scale)}
        low = self.each_group(w, lambda x: x.amin(-1)).clamp_max(0)  # the grid must hold 0 exactly
        high = self.each_group(w, lambda x: x.amax(-1)).clamp_min(0)
        scale = ((high - low) / (self.levels - 1)).clamp_min(self.min_scale)
        return {"scale": scale, "zero": torch.clamp(torch.round(-low / scale), 0, self.levels - 1)}

    def offset(self, p):
        return self.levels // 2 if self.symmetric else self.expand(round_ste(p["zero"]))

    def encode(self, w, p):
        codes = (w * self.expand(1 / p["scale"])).add_(self.offset(p))
        return codes.round_().clamp_(0, self.levels - 1)

    def decode(self, codes, p):
        return (codes - self.offset(p)) * self.expand(p["scale"])

    def spec(self):
        return {**super().spec(), "symmetric": self.symmetric}


class LogQuantizer(Quantizer):
    """Powers of two below the group's absmax s: ±s * 2^(m - M), m = 1..M = 2^(k-1) - 1, and 0.
    Code = sign_bit * 2^(k-1) + m; rounding happens in the log domain."""

    name = "log"

    def calibrate(self, w):
        return {"scale": self.absmax(w).clamp_min(self.min_scale)}

    def encode(self, w, p):
        top = self.levels // 2 - 1
        x = w / self.expand(p["scale"])
        m = torch.round(torch.log2(x.abs().clamp_min(1e-30))) + top
        m = torch.where(m >= 1, m.clamp_max(top), torch.zeros_like(m))
        return m + ((x < 0) & (m > 0)).float() * (self.levels // 2)

    def decode(self, codes, p):
        half, top = self.levels // 2, self.levels // 2 - 1
        m, negative = codes % half, codes >= half
        magnitude = torch.where(m > 0, torch.exp2(m - top), torch.zeros_like(m))
        magnitude = magnitude * self.expand(p["scale"])
        return torch.where(negative, -magnitude, magnitude)


def power_of_two(e8m0: torch.Tensor) -> torch.Tensor:
    """2^(e - 127) for E8M0 bytes e in 1..254, built from its float32 bits (the same biased
    exponent): exact, and no exp2 per weight in the compiled loop."""
    return (e8m0.to(torch.int32) << 23).view(torch.float32)


class MXFPQuantizer(Quantizer):
    """OCP Microscaling (MX v1.0): blocks of 32 share a power-of-two scale 2^(e - 127) stored as
    an E8M0 byte; each element is a small float (MXFP4, MXFP8 below). The shared exponent is
    floor(log2(absmax)) - emax of the element format, and elements beyond its max saturate."""

    learnable = False
    block = 32
    emax = 0  # exponent of the element format's largest power of two

    def __init__(self, bits, group, in_features):
        super().__init__(bits, self.block, in_features)

    def calibrate(self, w):
        shared = torch.floor(torch.log2(self.absmax(w).clamp_min(2.0**-127))) - self.emax
        # not below 2^-126, where the scale and its inverse are both normal floats
        return {"exponent": torch.clamp(shared, -126, 126) + 127}

    def encode(self, w, p):
        # w / 2^(e-127), exactly
        return self.element_codes(w * power_of_two(254 - self.expand(p["exponent"])))

    def decode(self, codes, p):
        return self.element_values(codes) * power_of_two(self.expand(p["exponent"]))

    def spec(self):
        return {"block_size": self.block}

    def export_params(self, p):
        return {"exponent": p["exponent"].detach().to(torch.uint8).cpu()}


class MXFP4Quantizer(MXFPQuantizer):
    """E2M1 elements ±{0, 0.5, 1, 1.5, 2, 3, 4, 6}, bit 3 the sign. A magnitude's code is 2e + its
    rounded position in binade e (0: [0, 2), 1: [2, 4), 2: [4, 6]), whose step is 2^(e-1); as
    comparisons and products, which compile fast and run fast."""

    name, levels, emax = "mxfp4", 16, 2  # 6 = 1.5 * 2^2

    def element_codes(self, x):
        """The nearest magnitude, a tie to the even code (round() halves to even, and the position's
        parity is the code's); rounding up into the next binade lands on its first code."""
        a = x.abs().clamp_max(6)
        over_2, over_4 = (a >= 2).float(), (a >= 4).float()  # e = over_2 + over_4
        position = torch.round(a * 2 * (1 - 0.5 * over_2) * (1 - 0.5 * over_4))  # a / 2^(e-1)
        magnitude = position + 2 * (over_2 + over_4)
        return torch.where((x < 0) & (magnitude > 0), magnitude + 8, magnitude)

    def element_values(self, c):
        negative = c >= 8
        m = torch.where(negative, c - 8, c)
        over_4, over_6 = (m >= 4).float(), (m >= 6).float()  # codes 4-5 are binade 1, 6-7 binade 2
        position = m - 2 * (over_4 + over_6)
        magnitude = position * 0.5 * (1 + over_4) * (1 + over_6)  # position * 2^(e-1)
        return torch.where(negative, -magnitude, magnitude)


class MXFP8Quantizer(MXFPQuantizer):
    """E4M3 elements (bias 7, max 448, S.1111.111 = NaN): exactly torch.float8_e4m3fn's bits."""

    name, levels, emax = "mxfp8", 256, 8  # 448 = 1.75 * 2^8

    def element_codes(self, x):
        # clamped: never NaN
        return x.clamp(-448, 448).to(torch.float8_e4m3fn).view(torch.uint8).float()

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
        # an empty cluster stays put
        centroids = torch.where(counts > 0, sums / counts.clamp_min(1), centroids)
    return centroids.sort(-1).values


def sorted_table(p: dict) -> torch.Tensor:
    """A LUT's entries in ascending order; stable, so ties get the same gradients on any device."""
    return p["lut"].sort(dim=-1, stable=True).values


class LUTQuantizer(Quantizer):
    """A learned table of 2^k values per group (k-means initialised): W = LUT[group, idx], or with
    `rank` > 0, W = (A @ B) * LUT[group, idx], the low-rank scale absorbing row/column magnitude."""

    name = "lut"

    def __init__(self, bits, group, in_features, rank: int = 0):
        super().__init__(bits, group, in_features)
        self.rank = rank

    @classmethod
    def from_settings(cls, bits, group, in_features, cfg):
        return cls(bits, group, in_features, cfg.lut_rank)

    def low_rank(self, p, like):
        """A @ B as stored (float16), grouped like `like`; None without a low-rank scale."""
        if "scale_a" not in p:
            return None
        return (as_stored(p["scale_a"]) @ as_stored(p["scale_b"])).view(like.shape)

    def restrict(self, p, part):
        """The tables of the segment's groups, and B's columns of it (A is every column's)."""
        columns = {"scale_a": slice(None), "scale_b": part.columns, "lut": part.groups}
        return {k: v[:, columns[k]] for k, v in p.items()}

    def calibrate(self, w):
        params = {}
        if (
            self.rank > 0
        ):  # rank 1 from mean |w| of rows and columns; the other components start at 0
            magnitude = w.abs()
            a = torch.zeros(w.shape[0], self.rank, device=w.device)
            b = torch.full((self.rank, w.shape[1]), 0.01, device=w.device)
            a[:, 0] = magnitude.mean(1).clamp_min(self.min_scale)
            b[0] = magnitude.mean(0) / magnitude.mean().clamp_min(1e-12)
            params = {"scale_a": a, "scale_b": b.clamp_min(self.min_scale)}
            w = w / self.low_rank(params, w)
        params["lut"] = self.each_group(w, lambda x: kmeans_1d(x, self.levels))
        return params

    def encode(self, w, p):
        """The nearest entry's index: how many midpoints between sorted entries lie below x, as one
        comparison per midpoint, which fuses into the compiled loop (searchsorted does not)."""
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
        return {**super().spec(), "rank": self.rank}

    def export_params(self, p):
        return super().export_params({**p, "lut": sorted_table(p)})


FIXED_BITS = {"ternary": 2, "mxfp4": 4, "mxfp8": 8}  # formats whose bits no schedule can change


# --- fake quantization: decode(encode(w)) with the gradients training needs ---


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


def fake_quant_value(q: Quantizer, w: torch.Tensor, learned: dict | None) -> torch.Tensor:
    """fake_quantize's value without its gradient, in one loop over w per segment (no codes are
    written in between)."""
    p = stored_params(q, w, learned)
    return joined([q.decode(q.encode(x, p_part), p_part) for x, p_part in q.split(w, p)])


def params_vjp(q: Quantizer, w: torch.Tensor, learned: dict, grad: torch.Tensor) -> dict:
    """{name: dL/dparam} for grad = dL/d(the fake-quantized weight): decode's vjp at the codes,
    which is the gradient fake_quantize gives the parameters. The codes are encoded again from w:
    cheaper than having the forward write them."""
    codes = [q.encode(x, p_part) for x, p_part in q.split(w, stored_params(q, w, learned))]

    def decoded(learned):
        p = stored_params(q, None, learned)
        return [q.decode(c, q.restrict(p, part)) for c, part in zip(codes, q.segments)]

    _, pullback = torch.func.vjp(decoded, learned)
    return pullback([grouped(grad, part) for part in q.segments])[0]


def surrogate_vjp(
    q: Quantizer, w: torch.Tensor, learned: dict | None, grad: torch.Tensor
) -> torch.Tensor:
    """dL/dw through the surrogate's slope, where fake_quantize's w gradient is not the identity."""
    p = {k: v.detach() for k, v in stored_params(q, w, learned).items()}
    _, slope = torch.func.vjp(
        lambda w: joined([q.surrogate(x, p_part) for x, p_part in q.split(w, p)]), w
    )
    return slope(grad)[0]


def blend(w: torch.Tensor, w_q: torch.Tensor, lam: float) -> torch.Tensor:
    """Lambda warm-up's weight: w + lam * (q(w) - w), from FP (0) to fully quantized (1)."""
    return w_q if lam >= 1 else w + lam * (w_q - w)


def per_block(fn):
    """fn over a block of layers in one call (lists of its arguments, one item per layer): a
    compiled call has a fixed cost (guards, dispatch) whatever its size."""
    return lambda *columns: [fn(*args) for args in zip(*columns)]


def compiled(fn):
    """torch.compile(fn) at its first call: baselines and COMPILE=0 never import the compiler."""
    compiled_fn = None

    @functools.wraps(fn)
    def call(*args):
        nonlocal compiled_fn
        if compiled_fn is None:
            torch._dynamo.config.recompile_limit = 64  # graphs per block (its shapes and widths)
            compiled_fn = torch.compile(fn, dynamic=False)
        return compiled_fn(*args)

    return call


block_fake_quant_compiled = compiled(per_block(fake_quant_value))
block_params_vjp_compiled = compiled(per_block(params_vjp))
block_surrogate_vjp_compiled = compiled(per_block(surrogate_vjp))


# --- which Linear gets which format ---


def module_formats(cfg: SimpleNamespace) -> list[tuple[str, str, int]]:
    """MODULE_QUANT "mlp=codebook:2,lm_head=int:8" -> [(pattern, format, bits)]."""
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


def parse_bits(text: str) -> list[int]:
    """ "2,4" -> [2, 4]; "2-4" -> [2, 3, 4]."""
    if "-" in text:
        low, high = map(int, text.split("-"))
        return list(range(low, high + 1))
    return [int(b) for b in text.split(",") if b]


# --- layers ---


def new_adapter(rank: int, in_features: int, out_features: int) -> nn.ParameterDict:
    """LoRA's A (rank, in) initialised like a Linear, B (out, rank) at zero: a no-op at first."""
    a = torch.empty(rank, in_features)
    nn.init.kaiming_uniform_(a, a=math.sqrt(5))
    b = torch.zeros(out_features, rank)
    return nn.ParameterDict({"a": nn.Parameter(a), "b": nn.Parameter(b)})


class QATLinear(nn.Linear):
    """A Linear computing with its fake-quantized weight: straight-through on the weight, not the
    output, so a step costs one matmul. Quantizer parameters are kept per bit width, for the
    precision schedules."""

    def __init__(self, linear: nn.Linear, fmt: str, bits: int, cfg: SimpleNamespace):
        has_bias = linear.bias is not None
        super().__init__(linear.in_features, linear.out_features, has_bias, device="meta")
        # the Linear's own tensors: a copy would cost a model's worth of memory
        self.weight, self.bias = linear.weight, linear.bias
        fixed = fmt in FIXED_BITS
        self.export_bits = FIXED_BITS.get(fmt) or cfg.progressive_bits or bits
        scheduled = [*parse_bits(cfg.cyclic_bits), *parse_bits(cfg.switchable_bits)]
        widths = {self.export_bits} if fixed else {bits, self.export_bits, *scheduled}
        self.quantizers = {
            b: QUANTIZERS[fmt].from_settings(b, cfg.group_size, self.in_features, cfg)
            for b in sorted(widths)
        }
        self.own_bits = self.bits = self.export_bits if fixed else bits  # width when unscheduled
        self.learn = cfg.learn_scale and QUANTIZERS[fmt].learnable
        self.qparams = nn.ModuleDict()
        if self.learn:
            with torch.no_grad():
                for b, q in self.quantizers.items():
                    calibrated = q.calibrate(self.weight)
                    self.qparams[str(b)] = nn.ParameterDict(
                        {k: nn.Parameter(v) for k, v in calibrated.items()}
                    )
        self.act_quant = bool(cfg.act_quant)
        self.fake_quant_step = (
            None  # the FakeQuantStep computing this layer's weight, while one runs
        )
        self.lam = 1.0  # blend FP -> quantized (lambda warm-up); export ignores it
        # LoRA adapters, bits -> {a, b}: one per width if precision is switchable, else one. They
        # exist from the start (b = 0, so they add nothing) and train only in the LoRA stage.
        adapter_widths = []
        if cfg.lora_rank > 0:
            adapter_widths = self.quantizers if cfg.switchable_bits else [self.export_bits]
        adapters = {
            str(b): new_adapter(cfg.lora_rank, self.in_features, self.out_features)
            for b in adapter_widths
        }
        self.lora = nn.ModuleDict(adapters).to(self.weight.device)
        self.lora.requires_grad_(False)
        self.lora_scale = cfg.lora_alpha / max(cfg.lora_rank, 1)
        self.lora_dropout = nn.Dropout(cfg.lora_dropout)
        self.lora_on = False
        self.fixed_weights = {}  # bits -> fake-quantized weight, fixed for the LoRA stage

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
        """This step's weight, differentiable by autograd: fake-quantized, blended with w while
        lambda < 1. FakeQuantStep computes the same faster."""
        w_q = fake_quantize(self.quantizer, self.weight.float(), self.learned())
        return blend(self.weight, w_q, self.lam)

    def computed_weight(self) -> torch.Tensor:
        """The weight a forward outside a FakeQuantStep computes with (--compile 0, eval): the
        LoRA stage's fixed one, or the definition."""
        if self.bits in self.fixed_weights:
            return self.fixed_weights[self.bits]
        return self.definition()

    @torch.no_grad()
    def fake_quant_weight(self) -> torch.Tensor:
        """The weight this step computes with, as a plain tensor."""
        return self.computed_weight()

    def adapter(self) -> nn.ParameterDict | None:
        key = str(self.bits) if str(self.bits) in self.lora else str(self.export_bits)
        return self.lora[key] if self.lora_on else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_quant:
            x = fake_quantize_activation(x)
        if self.fake_quant_step is not None:
            y = self.fake_quant_step.linear(self, x)
        else:
            y = F.linear(x, self.computed_weight().to(x.dtype), self.bias)
        lora = self.adapter()
        if lora is not None:  # unmerged: two thin matmuls instead of re-merging every step
            a, b = as_stored(lora["a"]).to(x.dtype), as_stored(lora["b"]).to(x.dtype)
            y = y + self.lora_scale * F.linear(F.linear(self.lora_dropout(x), a), b)
        return y

    def start_lora(self) -> None:
        """This layer's part of the LoRA stage: fully quantized, its codes fixed, so each adapter
        width's weight is computed once; only the adapters train."""
        self.weight.requires_grad_(False)
        self.qparams.requires_grad_(False)
        training_bits, self.lam, self.fixed_weights = self.bits, 1.0, {}
        with torch.no_grad():
            for key in self.lora:
                self.bits = int(key)
                self.fixed_weights[self.bits] = self.fake_quant_weight()
        self.bits, self.lora_on = training_bits, True
        self.lora.requires_grad_(True)

    def export(self) -> tuple[artifact.QuantizedLinear, nn.Linear]:
        """Codes + parameters for the artifact, and the plain Linear holding exactly what they
        decode to (plus the merged adapter)."""
        self.bits, self.lam, self.fixed_weights = self.export_bits, 1.0, {}
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
        codes = codes.to(torch.int64).cpu()
        return artifact.QuantizedLinear(self.quantizer.name, codes, params, spec), plain


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


def qat_linears(model: nn.Module) -> dict[str, QATLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QATLinear)}


def swap_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def prepare_qat(model: nn.Module, cfg: SimpleNamespace) -> nn.Module:
    """Swap every Linear that format_for() selects for a QATLinear (calibrating its scales), and
    with SWITCHABLE_BITS every RMSNorm for a SwitchableRMSNorm."""
    head = model.get_output_embeddings()
    for name, linear in all_linears(model).items():
        chosen = format_for(name, cfg)
        if chosen is None:
            continue
        if linear is head and model.config.tie_word_embeddings:  # the embedding stays as stored
            linear = copy.deepcopy(linear)
            model.config.tie_word_embeddings = False
        swap_module(model, name, QATLinear(linear, *chosen, cfg))
    if cfg.switchable_bits:
        for name, module in list(model.named_modules()):
            if type(module).__name__.endswith("RMSNorm"):
                swap_module(model, name, SwitchableRMSNorm(module, parse_bits(cfg.switchable_bits)))
    return model


def set_bits(model: nn.Module, bits: int | None) -> None:
    """Every variable-width layer and switchable norm computes at `bits`; None = each at its own."""
    for m in model.modules():
        if isinstance(m, QATLinear) and m.quantizer.name not in FIXED_BITS:
            m.bits = bits if bits in m.quantizers else m.own_bits
        elif isinstance(m, SwitchableRMSNorm) and bits is not None and str(bits) in m.weights:
            m.bits = bits


# --- the compiled fake-quant step ---


def add_grad(p: torch.Tensor, grad: torch.Tensor) -> None:
    p.grad = grad if p.grad is None else p.grad + grad


def detached_inputs(layers: list["QATLinear"]) -> tuple[list, list, list]:
    """(quantizers, latent weights, learned values or None), detached: a block's arguments."""
    learned = [
        {k: v.detach() for k, v in layer.learned().items()} if layer.learn else None
        for layer in layers
    ]
    weights = [layer.weight.detach().float() for layer in layers]
    return [layer.quantizer for layer in layers], weights, learned


def layer_blocks(model: nn.Module) -> dict[str, list["QATLinear"]]:
    """The QATLinears that compute their weight each step (not the LoRA stage's fixed ones), by
    block: the name up to its first index ("model.layers.3"): one compiled call a decoder layer."""
    blocks = {}
    for name, layer in qat_linears(model).items():
        if layer.bits not in layer.fixed_weights:
            blocks.setdefault(re.sub(r"(\.\d+)\..*", r"\1", name), []).append(layer)
    return blocks


class FakeQuantStep:
    """One training step's fake-quantized weights: one compiled call per block of layers when its
    first layer runs; backward(), after loss.backward(), gives w and the learned parameters their
    gradients. Each weight is a leaf its matmul reads, so autograd leaves dL/dweight in its .grad:
    w's gradient is that (straight-through, or the surrogate's slope), the parameters' one more
    pass over it and w. A context: on exit no layer keeps this step's weights."""

    def __init__(self, model: nn.Module):
        self.blocks = list(layer_blocks(model).values())
        self.block_of = {layer: layers for layers in self.blocks for layer in layers}
        self.weights: dict[QATLinear, torch.Tensor] = {}  # the leaves whose .grad is dL/dweight

    def linear(self, layer: "QATLinear", x: torch.Tensor) -> torch.Tensor:
        if layer not in self.weights:
            self.compute(self.block_of[layer])
        return F.linear(x, self.weights[layer].to(x.dtype), layer.bias)

    def compute(self, layers: list["QATLinear"]) -> None:
        with torch.no_grad(), torch.autocast(layers[0].weight.device.type, enabled=False):
            weights = block_fake_quant_compiled(*detached_inputs(layers))
        for layer, w_q in zip(layers, weights):
            trains = layer.weight.requires_grad or layer.learn
            weight = blend(layer.weight.detach(), w_q, layer.lam)
            self.weights[layer] = weight.requires_grad_(trains)

    def backward(self) -> None:
        """The latent weights' and the learned parameters' gradients from the dL/dweight that
        loss.backward() left, as autograd gets them through QATLinear.definition()."""
        for layers in self.blocks:
            grad = {layer: self.weights[layer].grad for layer in layers if layer in self.weights}
            layers = [layer for layer in layers if grad.get(layer) is not None]
            grad_q = {  # dL/dq(w)
                layer: grad[layer] if layer.lam >= 1 else layer.lam * grad[layer]
                for layer in layers
            }
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

    def __enter__(self) -> "FakeQuantStep":
        for layer in self.block_of:
            layer.fake_quant_step = self
        return self

    def __exit__(self, *exc) -> None:
        for layer in self.block_of:
            layer.fake_quant_step = None
        self.weights = {}


# --- activation quantization ---


def fake_quantize_activation(x: torch.Tensor) -> torch.Tensor:
    """Per-token absmax INT8, straight-through gradient: s = max|x| / 127 over the last dim."""
    scale = (x.detach().abs().amax(-1, keepdim=True) / 127).clamp_min(1e-8)
    return x + (torch.clamp(torch.round(x.detach() / scale), -127, 127) * scale - x.detach())


# --- distillation + top-k cache ---


def teacher_dtype(device: torch.device, cfg: SimpleNamespace) -> torch.dtype:
    """bf16 where matmuls run natively in it: about twice as fast, the distribution barely moved."""
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


# compiled, the softmaxes, the KL and its gradient fuse into a few row-wise loops over the vocab
kl_to_teacher_compiled = compiled(kl_to_teacher)


def distill_terms(
    logits: torch.Tensor, teacher: dict, cfg: SimpleNamespace
) -> dict[str, torch.Tensor]:
    """KD terms. `teacher` holds full-vocab "logits" (live), or "ids" (B, T, C) of candidates with
    their "logits" (cache): then both distributions are over the candidates (a -inf drops out)."""
    ids, t_logits, s_logits = teacher.get("ids"), teacher["logits"].float(), logits.float()
    if ids is not None:  # a duplicate (-inf) gets probability 0 on both sides; -1e4 keeps KL finite
        dropped = torch.isinf(t_logits)
        t_logits = t_logits.masked_fill(dropped, -1e4)
        s_logits = s_logits.gather(-1, ids).masked_fill(dropped, -1e4)
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
    config = hashlib.sha256((prepared.model_dir / "config.json").read_bytes()).hexdigest()[:8]
    shape = (
        f"T{cfg.seq_len}-k{cfg.teacher_cache_k}-n{cfg.teacher_cache_negatives}"
        f"-{cfg.teacher_cache_tokens}tok-s{cfg.seed}"
    )
    key = f"{prepared.model_name}-{config}-{prepared.train.meta['sha256'][:12]}-{shape}"
    root = Path(cfg.teacher_cache_dir) if cfg.teacher_cache_dir else paths.cache_dir() / "teacher"
    return root / key


def build_teacher_cache(prepared, cfg: SimpleNamespace, device: torch.device) -> Path:
    """The teacher's top-k logits plus random negatives at TEACHER_CACHE_TOKENS positions (windows
    fixed by the seed), built once; written to a temp folder and renamed, never half-built."""
    path = teacher_cache_path(prepared, cfg)
    if (path / "logits.npy").exists():
        return path
    tokens = prepared.train.tokens()
    n_windows = max(1, cfg.teacher_cache_tokens // cfg.seq_len)
    rng = np.random.default_rng(cfg.seed)
    starts = rng.integers(0, len(tokens) - cfg.seq_len - 1, size=n_windows)
    windows = tokens[starts[:, None] + np.arange(cfg.seq_len + 1)].astype(np.int64)
    teacher = load_teacher(prepared.model_dir, device, torch.float32)  # cached at full precision
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
        repeated = negatives.unsqueeze(-1) == negatives.unsqueeze(-2)
        duplicate |= torch.triu(repeated, diagonal=1).any(-2)
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
    names = ("windows", "ids", "logits")
    return {name: np.load(path / f"{name}.npy", mmap_mode="r") for name in names}


def batch_at(
    step: int,
    tokens: np.ndarray,
    cache: dict | None,
    cfg: SimpleNamespace,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """The batch of step `step`, a pure function of (seed, step), so a resumed run draws the same
    batches; with a teacher cache, its windows."""
    rng = np.random.default_rng([cfg.seed, step])
    if cache is not None:
        rows = np.sort(rng.integers(0, len(cache["windows"]), size=cfg.batch_size))
        window = torch.from_numpy(cache["windows"][rows].astype(np.int64))
        teacher = {
            "ids": torch.from_numpy(cache["ids"][rows].astype(np.int64)),
            "logits": torch.from_numpy(cache["logits"][rows].astype(np.float32)),
        }
    else:
        starts = rng.integers(0, len(tokens) - cfg.seq_len - 1, size=cfg.batch_size)
        window = tokens[starts[:, None] + np.arange(cfg.seq_len + 1)].astype(np.int64)
        window, teacher = torch.from_numpy(window), {}
    window = window.to(device)
    return window[:, :-1], window[:, 1:], {k: v.to(device) for k, v in teacher.items()}


# --- LoRA ---


def start_lora_stage(model: nn.Module) -> None:
    """Fix every quantized weight and its parameters; only the adapters train from here on."""
    model.requires_grad_(False)
    for layer in qat_linears(model).values():
        layer.start_lora()


def lora_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters alone (float16, as the artifact stores them): a small file to ship or reload."""
    return {
        f"{name}.lora.{bits}.{key}": p.detach().half().cpu().contiguous()
        for name, layer in qat_linears(model).items()
        for bits, adapter in layer.lora.items()
        for key, p in adapter.items()
    }


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
        if cfg.cyclic_shape == "cosine":
            shape = 0.5 * (1 - math.cos(2 * math.pi * phase))
        else:
            shape = 1 - abs(2 * phase - 1)
        return round(low + (high - low) * shape)
    return None


def start_progressive_stage(model: nn.Module) -> None:
    """Continue at each layer's final width, its parameters re-calibrated on the current quantized
    weight: for a LUT, k-means of the 2^k old entries (weighted by use) down to the new size."""
    for layer in qat_linears(model).values():
        if not layer.learn or str(layer.export_bits) not in layer.qparams:
            continue
        with torch.no_grad():
            current = layer.fake_quant_weight().float()
            fresh = layer.quantizers[layer.export_bits].calibrate(current)
            for key, value in layer.qparams[str(layer.export_bits)].items():
                value.copy_(fresh[key])


# --- stabilizers + checkpoints ---


def freeze_weights(model: nn.Module, cfg: SimpleNamespace) -> None:
    """FREEZE_ATTN_OV / FREEZE_LAST_MLPS: hold latent weights fixed (still quantized) where low-bit
    training tends to diverge first (attention v/o) or that shape the output most (last MLPs)."""
    n_layers = model.config.num_hidden_layers
    for name, layer in qat_linears(model).items():
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
    """Runs with the same training settings share a folder: --resume auto's "compatible"."""
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


# --- several devices (torchrun) ---
# `harness run --nproc K` starts K ranks. Data parallel by default: each trains on its slice of the
# step's batch, and average_gradients() does DistributedDataParallel's math by hand, because
# FakeQuantStep gives the quantized layers their gradients after backward, where DDP's autograd
# hooks never look. FSDP=1 shards the parameters instead (autograd's own gradients: --compile 0).


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def start_ranks(cfg: SimpleNamespace) -> torch.device:
    """This process's device, in torchrun's process group when torchrun started several (one GPU
    each); alone, no process group at all."""
    device = pick_device(cfg.device)
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def same_start(model: nn.Module) -> None:
    """Rank 0's parameters on every rank, as DDP starts: ranks loading alike surely start alike."""
    for p in model.parameters():
        dist.broadcast(p.detach(), 0)


def average_gradients(params, bucket_bytes: int = 1 << 26) -> None:
    """Each gradient replaced by its mean over the ranks, one all-reduce per flattened bucket: with
    equal slices of the batch, the gradient of the whole batch's mean loss."""
    buckets, size = [[]], 0
    for grad in (p.grad for p in params if p.grad is not None):
        if size >= bucket_bytes:
            buckets, size = [*buckets, []], 0
        buckets[-1].append(grad)
        size += grad.numel() * grad.element_size()
    for bucket in filter(None, buckets):
        flat = _flatten_dense_tensors(bucket)
        dist.all_reduce(flat)
        flat /= world_size()
        for grad, mean in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
            grad.copy_(mean)


def agreed(done: bool, fraction: float, device: torch.device) -> tuple[bool, float]:
    """Rank 0's budget decision and progress, on every rank: all stop at the same step, and the
    schedules (lr, lambda, stages) that follow the progress stay in step."""
    if not dist.is_initialized():
        return done, fraction
    shared = torch.tensor([float(done), fraction], dtype=torch.float64, device=device)
    dist.broadcast(shared, 0)
    return bool(shared[0]), float(shared[1])


def rank_share(batch: tuple) -> tuple:
    """This rank's equal slice of the step's batch (x, y, teacher_out)."""
    if not dist.is_initialized():
        return batch
    n = batch[0].shape[0] // world_size()
    part = slice(rank() * n, (rank() + 1) * n)
    x, y, teacher_out = batch
    return x[part], y[part], {k: v[part] for k, v in teacher_out.items()}


def mean_over_ranks(*values: torch.Tensor) -> list[torch.Tensor]:
    """The logged losses: the mean of the ranks' means, the whole batch's."""
    if not dist.is_initialized():
        return list(values)
    stacked = torch.stack([v.detach().float() for v in values])
    dist.all_reduce(stacked)
    return list(stacked / world_size())


def shard(model: nn.Module) -> None:
    """FSDP2: each decoder layer's parameters split across the ranks and gathered for its forward
    and backward, then the rest (embeddings, norm, head) as one more unit."""
    from torch.distributed.fsdp import fully_shard  # only sharded runs pay for the import

    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)


def full_weights(model: nn.Module, prepared, cfg: SimpleNamespace) -> nn.Module | None:
    """On rank 0, a plain CPU copy of the sharded model holding the full trained weights (what
    export() reads); None on the others. Every rank takes part in gathering them."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(model, options=options)
    if rank() != 0:
        return None
    plain = load_student(prepared, cfg, torch.device("cpu"))
    plain.load_state_dict(state)
    return plain


# --- training loop ---


def keep_freed_memory() -> None:
    """Have glibc's malloc keep what a step frees for the next one, rather than hand large buffers
    back to the kernel and page-fault them in again every step."""
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


def fit_batch(model: nn.Module, device: torch.device, seq_len: int) -> int:
    """Sequences per CUDA device: the largest power of two, up to 64, whose activations take at most
    half the memory left free by the loaded models, at an estimated 24 bytes a vocabulary entry
    (student and teacher logits, softmaxes, gradients) and 48 a hidden unit per layer, a token."""
    config = model.config
    per_token = 24 * config.vocab_size + 48 * config.hidden_size * config.num_hidden_layers
    fits = torch.cuda.mem_get_info(device)[0] // 2 // (per_token * seq_len)
    batch = torch.tensor(min(64, 2 ** max(0, int(fits).bit_length() - 1)), device=device)
    if dist.is_initialized():  # the fullest GPU decides: every rank slices one and the same batch
        dist.all_reduce(batch, op=dist.ReduceOp.MIN)
    return int(batch)


def batch_shape(model: nn.Module, device: torch.device, cfg: SimpleNamespace) -> tuple[int, int]:
    """(BATCH_SIZE, SEQ_LEN), each 0 (auto) made the device's: 4 x 128 on CPU and MPS; on CUDA
    fit_batch() sequences of 512 tokens per rank."""
    cuda = device.type == "cuda"
    seq_len = cfg.seq_len or (512 if cuda else 128)
    batch = cfg.batch_size or (fit_batch(model, device, seq_len) * world_size() if cuda else 4)
    return batch, seq_len


def autocast_dtype(device: torch.device, cfg: SimpleNamespace) -> torch.dtype | None:
    """fp32 on CPU, where runs are compared; bf16 autocast on CUDA/MPS."""
    if cfg.dtype == "auto":
        return None if device.type == "cpu" else torch.bfloat16
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.dtype]


class LossIsNotFinite(Exception):
    pass


def make_optimizer(
    model: nn.Module, cfg: SimpleNamespace
) -> tuple[torch.optim.Optimizer, dict, "EMA | None"]:
    """Fused AdamW (one kernel per tensor) and an EMA over what requires grad; fresh per stage."""
    trained = {name: p for name, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(
        trained.values(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95), fused=True
    )
    return optimizer, trained, EMA(trained, cfg.ema_decay) if cfg.ema_decay > 0 else None


def restore_checkpoint(path: Path, model, scaler, stage: dict, cfg, device) -> tuple[int, tuple]:
    """Load everything a bit-exact continuation needs. Batches need no state: batch_at(step)."""
    state = torch.load(path, map_location=device, weights_only=False)
    stage.update(state["stage"])
    model.load_state_dict(state["model"])
    if stage["lora"]:  # after loading: the fixed weights come from the restored latents
        start_lora_stage(model)
    optimizer, trained, ema = make_optimizer(model, cfg)
    optimizer.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    if ema is not None:
        ema.shadow = state["ema"]
    torch.set_rng_state(state["rng"]["torch"].cpu())  # an RNG state is a CPU tensor
    if device.type == "cuda":
        torch.cuda.set_rng_state(state["rng"]["cuda"].cpu())
    print(f"resumed from {path} at step {state['step']}")
    return state["step"], (optimizer, trained, ema)


def compute_loss(model, teacher, x, y, teacher_out: dict, cfg) -> tuple[torch.Tensor, torch.Tensor]:
    """(training loss, plain CE) of a batch; the teacher's logits are live or in teacher_out."""
    logits = model(input_ids=x).logits
    if teacher is not None:
        with torch.no_grad():
            teacher_out = {"logits": teacher(input_ids=x).logits}
    kd_weight = cfg.distill_weight if teacher_out else 0.0
    # at weight 1 the CE is only logged
    with torch.set_grad_enabled(torch.is_grad_enabled() and kd_weight < 1):
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
    """One optimizer step on batch = (x, y, teacher_out) -> (loss, ce): fake-quantized weights by a
    FakeQuantStep (--compile 0: autograd through each layer's definition), autocast as asked."""
    x, y, teacher_out = batch
    dtype = autocast_dtype(x.device, cfg)
    optimizer.zero_grad(set_to_none=True)  # before the forward, whose activations need the memory
    with FakeQuantStep(model) if cfg.compile else contextlib.nullcontext() as weights:
        autocast = torch.autocast(
            x.device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None
        )
        with autocast:
            loss, ce = compute_loss(model, teacher, x, y, teacher_out, cfg)
        if not torch.isfinite(loss):
            raise LossIsNotFinite(f"loss is {loss.item()}")
        scaler.scale(loss).backward()
        if weights is not None:
            weights.backward()
    if dist.is_initialized() and not cfg.fsdp:
        average_gradients(trained.values())
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
        window = cfg.seq_len + 1
        raise DataError(f"{len(tokens)} training tokens cannot fill one window of {window}")
    cache = None
    if cfg.teacher_cache_k and cfg.distill_weight > 0:
        if rank() == 0:
            build_teacher_cache(prepared, cfg, device)
        if dist.is_initialized():
            dist.barrier()  # the other ranks wait for rank 0's cache
        cache = load_teacher_cache(teacher_cache_path(prepared, cfg))
    dtype = autocast_dtype(device, cfg)
    fp16_scaled = dtype == torch.float16 and device.type == "cuda"
    scaler = torch.amp.GradScaler(device.type, enabled=fp16_scaled)
    freeze_weights(model, cfg)
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

    main_rank = rank() == 0  # the one that logs (the budget announces its steps alone)
    log = open(run_dir / "loss.csv" if main_rank else os.devnull, "w")
    log.write("step,loss,ce,lr,lambda,bits,tokens_per_s,train_seconds\n")
    bar_format = "{l_bar}{bar}| {n:.0f}/{total}% [{elapsed}{postfix}]"
    bar = tqdm(total=100, desc="train", unit="%", mininterval=2.0, bar_format=bar_format,
               disable=not main_rank)  # fmt: skip
    model.train()
    window_started, window_tokens = time.perf_counter(), 0
    while True:
        done, fraction = agreed(budget.done(), budget.fraction, device)
        if done:
            break
        if cfg.progressive_bits and not stage["progressive"] and fraction >= cfg.progressive_at:
            start_progressive_stage(model)
            stage["progressive"] = True
        if cfg.lora_rank > 0 and not stage["lora"] and fraction >= cfg.lora_at:
            if ema is not None:
                ema.copy_to_model()  # fix the averaged weights, not the last step's
            start_lora_stage(model)
            optimizer, trained, ema = make_optimizer(model, cfg)
            stage["lora"] = True
        lam = lambda_at(fraction, cfg)
        bits = cfg.progressive_bits if stage["progressive"] else bits_at(step, cfg)
        set_bits(model, bits)
        for layer in qat_linears(model).values():
            layer.lam = lam
        lr = lr_at(step, fraction, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr

        batch = rank_share(batch_at(step, tokens, cache, cfg, device))
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
            loss, ce = mean_over_ranks(loss, ce)
            shown_bits = bits if bits is not None else "-"
            print(
                f"step {step:5d} | loss {loss.item():.4f} | ce {ce.item():.4f} | lr {lr:.2e} | "
                f"lambda {lam:.2f} | bits {shown_bits} | {rate:,.0f} tok/s | "
                f"{budget.elapsed:.0f}/{budget.seconds:.0f} s",
                flush=True,
            )
            log.write(
                f"{step},{loss.item():.6f},{ce.item():.6f},{lr:.6g},{lam:.4f},{shown_bits},"
                f"{rate:.1f},{budget.elapsed:.2f}\n"
            )
            log.flush()
            window_started, window_tokens = time.perf_counter(), 0
        # the last step exports instead
        checkpointed = cfg.checkpoint_every and step % cfg.checkpoint_every == 0
        if checkpointed and main_rank and not budget.done():
            rng = {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state() if device.type == "cuda" else None,
            }
            state = {
                "step": step,
                "stage": stage,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(),
                "ema": ema.shadow if ema else None,
                "rng": rng,
            }
            save_checkpoint(state, cfg)
    bar.close()
    log.close()
    if ema is not None:
        ema.copy_to_model()
    return budget


# --- export ---


def changed_tensors(model: nn.Module, model_dir: Path, skip: set[str]) -> dict[str, torch.Tensor]:
    """The model's floating tensors (a tied one once) that differ from the prepared model's, by
    state_dict key: the artifact stores those; the rest the harness takes from the prepared one."""
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
    """Write the artifact: codes + parameters of every quantized Linear, every other Linear declared
    dense, the tensors that changed in training in fp32. Always fully quantized, at BITS."""
    model = model.float().cpu()
    layers, dense = {}, []
    for name, module in list(model.named_modules()):
        if isinstance(module, SwitchableRMSNorm):
            swap_module(model, name, module.export(cfg.bits))
    for name, linear in all_linears(model).items():
        if isinstance(linear, QATLinear):
            layers[name], plain = linear.export()
            swap_module(model, name, plain)
        elif linear is not model.get_output_embeddings():
            dense.append(name)
    tensors = changed_tensors(model, model_dir, {f"{name}.weight" for name in layers})
    artifact.save(out_dir, layers, tensors, dense)


# --- main ---


def load_student(prepared, cfg: SimpleNamespace, device: torch.device) -> nn.Module:
    """The model to train: the prepared one, its Linears made QATLinears (but for --baseline fp)."""
    model = AutoModelForCausalLM.from_pretrained(prepared.model_dir, dtype=torch.float32).to(device)
    return model if cfg.baseline == "fp" else prepare_qat(model, cfg)


def main(argv: list[str]) -> int:
    cfg = parse_flags(argv)
    keep_freed_memory()
    run_dir = Path(os.environ["HARNESS_RUN_DIR"])
    torch.manual_seed(cfg.seed)
    device = start_ranks(cfg)
    if rank() != 0:
        sys.stdout = open(os.devnull, "w")  # rank 0 speaks for all; errors still reach stderr
    prepared = load_prepared(need_eval=False)  # the sandbox shows train.py no eval split
    if cfg.baseline not in ("", "fp", "rtn"):
        raise SystemExit(f"--baseline must be fp or rtn, not {cfg.baseline!r}")
    for _, fmt, _ in [("", cfg.quant, 0), *module_formats(cfg)]:
        if fmt not in QUANTIZERS and fmt != "none":
            raise SystemExit(f"unknown format {fmt!r}; known: {sorted(QUANTIZERS)} or none")
    unsharded = {"--compile 1": cfg.compile, "--lora-rank": cfg.lora_rank,
                 "--progressive-bits": cfg.progressive_bits,
                 "--checkpoint-every": cfg.checkpoint_every, "--resume": cfg.resume}  # fmt: skip
    if cfg.fsdp and (world_size() == 1 or any(unsharded.values())):
        refused = ", ".join(flag for flag, value in unsharded.items() if value)
        raise SystemExit(
            "--fsdp 1 shards over several ranks (python -m harness run --nproc K) and trains by "
            f"eager autograd (--compile 0); it does not support {refused or 'a single rank'}"
        )
    if cfg.switchable_bits and cfg.bits not in parse_bits(cfg.switchable_bits):
        raise SystemExit(
            f"--bits {cfg.bits} (the exported width) must be one of "
            f"--switchable-bits {cfg.switchable_bits}"
        )
    # what train.py says about itself: settings and a crash reason; the runner measures the rest
    default_description = f"baseline {cfg.baseline}" if cfg.baseline else f"{cfg.quant} QAT"
    info = {
        "description": cfg.description or default_description,
        "config": {k: v for k, v in vars(cfg).items() if k != "description"},
    }
    if rank() == 0:  # early: a crash names its run
        (run_dir / "train.json").write_text(json.dumps(info, indent=1))

    # sharded: loaded in host memory, then fully_shard moves each rank's shard to its device
    model = load_student(prepared, cfg, torch.device("cpu") if cfg.fsdp else device)
    n_params = sum(p.numel() for p in model.parameters()) / 1e6
    ranks = f" x {world_size()} ranks" if dist.is_initialized() else ""
    print(f"model {prepared.model_name}: {n_params:.1f}M params on {device}{ranks}")
    if cfg.fsdp:
        shard(model)
    elif dist.is_initialized():
        same_start(model)
    budget = None
    if not cfg.baseline:
        teacher = None
        if cfg.distill_weight > 0 and not cfg.teacher_cache_k:
            teacher = load_teacher(prepared.model_dir, device, teacher_dtype(device, cfg))
        cfg.batch_size, cfg.seq_len = batch_shape(model, device, cfg)
        info["config"].update(batch_size=cfg.batch_size, seq_len=cfg.seq_len)
        if cfg.batch_size % world_size():
            raise SystemExit(
                f"--batch-size {cfg.batch_size} (all ranks together) must divide among "
                f"{world_size()} ranks"
            )
        try:
            budget = train(model, teacher, prepared, cfg, device, run_dir)
        except LossIsNotFinite as err:
            info["reason"] = str(err)
            (run_dir / "train.json").write_text(json.dumps(info, indent=1))
            print(f"stopping: {err}", file=sys.stderr)
            return 3
        del teacher
    steps = budget.steps if budget else 0
    info.update(
        steps=steps,
        train_tokens=steps * cfg.batch_size * cfg.seq_len,
        train_seconds=budget.elapsed if budget else 0.0,
    )
    if cfg.fsdp:
        model = full_weights(model, prepared, cfg)
    if rank() != 0:
        dist.destroy_process_group()
        return 0
    if cfg.lora_rank > 0 and qat_linears(model):
        save_file(lora_tensors(model), str(run_dir / "lora.safetensors"))
    export(model, cfg, prepared.model_dir, run_dir / "artifact")
    (run_dir / "train.json").write_text(json.dumps(info, indent=1))
    print(f"exported {run_dir / 'artifact'} after {steps} steps")
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
