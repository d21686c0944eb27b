"""Quantization-aware training of a small language model: the one file experiments change.

    python train.py                          # ternary QAT with distillation, within the harness's budget
    python train.py --lr 1e-3 --steps 200    # every UPPER_CASE setting below is a flag
    python train.py --baseline fp            # score the unquantized model (no training)
    python train.py --baseline rtn           # score round-to-nearest quantization (no training)

Run by hand, it hands itself to the harness (harness/runner.py), which runs it in a child process,
verifies and scores the exported artifact in another, and appends the row to results.tsv.
Everything here may change; harness/ and prepare.py may not.
"""

import os
import sys

if __name__ == "__main__" and "HARNESS_RUN_DIR" not in os.environ:
    # Launched by hand: let the harness run this file as its child, so that a crash or a hang
    # still becomes a row and only harness-measured numbers are recorded.
    from harness.runner import main_for_train_script

    sys.exit(main_for_train_script(sys.argv[1:]))

import argparse
import json
import math
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM

from harness import artifact
from harness.budget import Budget
from harness.data import batches, load_prepared

# --- settings (each is also a flag: LR -> --lr, GROUP_SIZE -> --group-size) ---

QUANT = "ternary"  # weight format of every decoder Linear: ternary | none (full precision)
GROUP_SIZE = 128  # weights per scale, along in_features (the last group of a row may be shorter)
BASELINE = ""  # "fp" or "rtn": export without training, recorded as a baseline row
STEPS = 0  # cap on optimizer steps; 0 = the wall-clock budget alone decides
BATCH_SIZE = 4  # sequences per step
SEQ_LEN = 128  # tokens per sequence
LR = 5e-4  # peak AdamW learning rate on the latent (full-precision) weights
WARMUP_STEPS = 10  # linear warm-up, then cosine decay over the budget
MIN_LR_RATIO = 0.1  # the cosine ends at LR * MIN_LR_RATIO
WEIGHT_DECAY = 0.0  # decay pulls latent weights to 0, which ternary maps to the 0 level
GRAD_CLIP = 1.0  # max global grad norm; 0 = off
DISTILL_WEIGHT = 1.0  # loss = (1 - w) * CE + w * KD; 0 trains on the text alone (no teacher in memory)
DISTILL_TEMP = 1.0  # softmax temperature of the KD term (scaled by T^2)
LOG_EVERY = 10  # steps between log lines and loss.csv rows
SEED = 0
DEVICE = "auto"  # auto | cpu | cuda | mps
DESCRIPTION = ""  # one line for results.tsv

SETTINGS = {name: value for name, value in dict(globals()).items() if name.isupper() and isinstance(value, (int, float, str))}


def parse_flags(argv: list[str]) -> SimpleNamespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, default in SETTINGS.items():
        kind = type(default)
        parser.add_argument("--" + name.lower().replace("_", "-"), type=kind, default=default, metavar=kind.__name__.upper())
    return SimpleNamespace(**vars(parser.parse_args(argv)))


# --- quantizers ---


def group_absmean(w: torch.Tensor, group: int) -> torch.Tensor:
    """Mean |w| of each group along in_features: (out, in) -> (out, n_groups); a short last group
    is averaged over its own length."""
    out_features, in_features = w.shape
    n_groups = -(-in_features // group)
    pad = n_groups * group - in_features
    sums = F.pad(w.abs(), (0, pad)).view(out_features, n_groups, group).sum(-1)
    lengths = torch.full((n_groups,), group, dtype=w.dtype, device=w.device)
    lengths[-1] = group - pad
    return sums / lengths


def expand_groups(per_group: torch.Tensor, in_features: int, group: int) -> torch.Tensor:
    return per_group.repeat_interleave(group, dim=1)[:, :in_features]


def ternary_scale(w: torch.Tensor, group: int) -> torch.Tensor:
    """Per-group absmean scale, rounded to float16 because that is how it is stored."""
    return group_absmean(w, group).to(torch.float16).float().clamp_min(2**-14)


def ternary_codes(w: torch.Tensor, scale: torch.Tensor, group: int) -> torch.Tensor:
    """Round-to-nearest onto {-1, 0, +1}: |w| below s/2 becomes 0."""
    return torch.clamp(torch.round(w / expand_groups(scale, w.shape[1], group)), -1, 1)


def ternary_quantize(w: torch.Tensor, group: int) -> torch.Tensor:
    scale = ternary_scale(w, group)
    return ternary_codes(w, scale, group) * expand_groups(scale, w.shape[1], group)


# --- layers ---


class BitLinear(nn.Linear):
    """A Linear whose forward uses the quantized weight. The straight-through estimator is applied
    to the weight (w + (q(w) - w).detach()), so the forward costs one matmul and the gradient
    flows to the latent full-precision weight unchanged."""

    def __init__(self, linear: nn.Linear, group: int):
        super().__init__(linear.in_features, linear.out_features, linear.bias is not None,
                         device=linear.weight.device, dtype=linear.weight.dtype)  # fmt: skip
        self.load_state_dict(linear.state_dict())
        self.group = group

    def quantized_weight(self) -> torch.Tensor:
        return ternary_quantize(self.weight, self.group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        return F.linear(x, w + (self.quantized_weight() - w).detach(), self.bias)

    def export(self) -> tuple[artifact.QuantizedLinear, nn.Linear]:
        """Codes + scales for the artifact, and the plain Linear holding exactly what they decode to."""
        with torch.no_grad():
            scale = ternary_scale(self.weight.float(), self.group)
            codes = ternary_codes(self.weight.float(), scale, self.group)
            plain = nn.Linear(self.in_features, self.out_features, self.bias is not None)
            plain.weight.copy_(codes * expand_groups(scale, self.in_features, self.group))
            if self.bias is not None:
                plain.bias.copy_(self.bias)
        record = artifact.QuantizedLinear("ternary", (codes + 1).to(torch.uint8).cpu(),
                                          {"scale": scale.to(torch.float16).cpu()}, {"group_size": self.group})  # fmt: skip
        return record, plain


def decoder_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Every Linear except the output head (embeddings are not Linears)."""
    head = model.get_output_embeddings()
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear) and m is not head}


def swap_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def quantize_model(model: nn.Module, cfg: SimpleNamespace) -> None:
    for name, linear in decoder_linears(model).items():
        swap_module(model, name, BitLinear(linear, cfg.group_size))


# --- distillation ---


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temp: float) -> torch.Tensor:
    """KL(teacher || student) at temperature `temp`, times temp^2 so its gradient scale does not
    shrink as the temperature grows (Hinton et al., 2015)."""
    log_student = F.log_softmax(student_logits.float() / temp, dim=-1)
    log_teacher = F.log_softmax(teacher_logits.float() / temp, dim=-1)
    return F.kl_div(log_student, log_teacher, log_target=True, reduction="batchmean") * temp**2


# --- training loop ---


def pick_device(name: str) -> torch.device:
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def lr_at(step: int, fraction: float, cfg: SimpleNamespace) -> float:
    """Linear warm-up over steps, then cosine decay over the budget's progress."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    cosine = 0.5 * (1 + math.cos(math.pi * min(fraction, 1.0)))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine)


class LossIsNotFinite(Exception):
    pass


def train(model, teacher, prepared, cfg, device, run_dir: Path) -> Budget:
    budget = Budget.from_env(max_steps=cfg.steps or None)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type in ("cuda", "mps"))
    data = batches(prepared.train.tokens(), cfg.batch_size, cfg.seq_len, seed=cfg.seed)
    log = open(run_dir / "loss.csv", "w")
    log.write("step,loss,lr,tokens_per_s,train_seconds\n")
    model.train()
    step, window_started, window_tokens = 0, time.perf_counter(), 0
    while not budget.done():
        x, y = (t.to(device) for t in next(data))
        lr = lr_at(step, budget.fraction, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        with autocast:
            logits = model(input_ids=x).logits
            ce = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
            loss = ce
            if teacher is not None:
                with torch.no_grad():
                    teacher_logits = teacher(input_ids=x).logits
                kd = distill_loss(logits.flatten(0, 1), teacher_logits.flatten(0, 1), cfg.distill_temp)
                loss = (1 - cfg.distill_weight) * ce + cfg.distill_weight * kd
        if not torch.isfinite(loss):
            raise LossIsNotFinite(f"loss is {float(loss)} at step {step}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        step += 1
        budget.step_done()
        window_tokens += x.numel()
        if step % cfg.log_every == 0 or step == 1:
            rate = window_tokens / (time.perf_counter() - window_started)
            print(f"step {step:5d} | loss {loss.item():.4f} | ce {ce.item():.4f} | lr {lr:.2e} | "
                  f"{rate:,.0f} tok/s | {budget.elapsed:.0f}/{budget.seconds:.0f} s", flush=True)  # fmt: skip
            log.write(f"{step},{loss.item():.6f},{lr:.6g},{rate:.1f},{budget.elapsed:.2f}\n")
            log.flush()
            window_started, window_tokens = time.perf_counter(), 0
    log.close()
    return budget


# --- export ---


def export(model: nn.Module, cfg: SimpleNamespace, model_dir: Path, out_dir: Path) -> None:
    """Write the artifact: codes + scales for every quantized Linear, and an HF folder whose
    Linears hold exactly the decoded weights (the harness checks that they agree)."""
    model = model.float().cpu()
    layers, dense = {}, []
    for name, linear in decoder_linears(model).items():
        if isinstance(linear, BitLinear):
            layers[name], plain = linear.export()
            swap_module(model, name, plain)
        else:
            dense.append(name)
    artifact.save(out_dir, model, layers, tokenizer_dir=model_dir, dense=dense)


# --- main ---


def main(argv: list[str]) -> int:
    cfg = parse_flags(argv)
    run_dir = Path(os.environ["HARNESS_RUN_DIR"])
    torch.manual_seed(cfg.seed)
    device = pick_device(cfg.device)
    prepared = load_prepared()
    if cfg.baseline not in ("", "fp", "rtn"):
        raise SystemExit(f"--baseline must be fp or rtn, not {cfg.baseline!r}")
    quantized = cfg.quant != "none" and cfg.baseline != "fp"
    if cfg.quant not in ("ternary", "none"):
        raise SystemExit(f"--quant must be ternary or none, not {cfg.quant!r}")
    info = {
        "model": prepared.model_name,
        "baseline": bool(cfg.baseline),
        "description": cfg.description or (f"baseline {cfg.baseline}" if cfg.baseline else f"{cfg.quant} QAT"),
        "config": {k: v for k, v in vars(cfg).items() if k != "description"},
    }
    (run_dir / "train.json").write_text(json.dumps(info, indent=1))  # early, so a crash still names its run

    model = AutoModelForCausalLM.from_pretrained(prepared.model_dir, dtype=torch.float32).to(device)
    print(f"model {prepared.model_name}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params on {device}")
    if quantized:
        quantize_model(model, cfg)
    budget = None
    if not cfg.baseline:
        teacher = None
        if cfg.distill_weight > 0:
            teacher = AutoModelForCausalLM.from_pretrained(prepared.model_dir, dtype=torch.float32).to(device).eval()
            teacher.requires_grad_(False)
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
    export(model, cfg, prepared.model_dir, run_dir / "artifact")
    (run_dir / "train.json").write_text(json.dumps(info, indent=1))
    print(f"exported {run_dir / 'artifact'} after {steps} steps")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
