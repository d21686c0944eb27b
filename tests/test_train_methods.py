"""train.py's training methods on the tiny model: schedules (lambda, cyclic, switchable,
progressive), distillation and the teacher top-k cache, LoRA recovery, stabilizers, and a
bit-exact resume. Training runs in-process (train.main) for speed; the harness verifies each
exported artifact with load_verified, as it would after a real run."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICES, TINY_GROUP, named, needs_cuda
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM

import train
from harness import formats
from harness.artifact import QUANT_SPEC, QUANT_WEIGHTS, load_verified
from harness.data import load_prepared

TINY_FLAGS = [
    "--group-size",
    str(TINY_GROUP),
    "--batch-size",
    "2",
    "--seq-len",
    "32",
    "--log-every",
    "1",
    "--warmup-steps",
    "2",
]


def train_in_process(env, monkeypatch, name, *flags):
    """train.main as the runner would start it (HARNESS_RUN_DIR set), in this process. A training
    run gives --steps, and the budget is one no machine reaches in that many steps: the steps
    alone decide its progress (lambda, bits, LoRA), however loaded the machine is."""
    assert "--steps" in flags or "--baseline" in flags
    run_dir = env / "runs" / name
    run_dir.mkdir(parents=True)
    monkeypatch.setenv("HARNESS_RUN_DIR", str(run_dir))
    monkeypatch.setenv("HARNESS_BUDGET_SECONDS", str(10**9))
    assert train.main([*TINY_FLAGS, *flags]) == 0
    return run_dir


def loss_rows(run_dir):
    lines = (run_dir / "loss.csv").read_text().splitlines()
    header = lines[0].split(",")
    return [dict(zip(header, line.split(","))) for line in lines[1:]]


def cfg_for(*flags):
    return train.parse_flags(["--group-size", str(TINY_GROUP), *flags])


def tiny_quantized(tiny_model_dir, *flags):
    cfg = cfg_for(*flags)
    return train.prepare_qat(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32), cfg
    ), cfg


def assert_export_matches(model, cfg, tiny_model_dir, out_dir):
    ids = torch.arange(30)[None] * 5 % 512
    model.eval()
    train.set_bits(model, cfg.bits if cfg.switchable_bits else None)
    reference = model(input_ids=ids).logits.detach()
    train.export(model, cfg, tiny_model_dir, out_dir)
    verified, report = load_verified(out_dir, tiny_model_dir)
    torch.testing.assert_close(verified(input_ids=ids).logits, reference, rtol=1e-4, atol=1e-4)
    return report


# --- schedules ---


def test_lambda_schedules_rise_from_fp_to_quantized():
    linear = cfg_for("--lambda-warmup", "0.5")
    plateau = cfg_for(
        "--lambda-warmup", "0.5", "--lambda-schedule", "plateau", "--lambda-plateaus", "4"
    )
    assert [train.lambda_at(f, linear) for f in (0, 0.25, 0.5, 0.9)] == [0, 0.5, 1, 1]
    assert [train.lambda_at(f, plateau) for f in (0, 0.1, 0.13, 0.3, 0.49, 0.5)] == [
        0,
        0,
        0.25,
        0.5,
        0.75,
        1,
    ]
    assert train.lambda_at(0.0, cfg_for()) == 1  # no warm-up: quantized from the first step


def test_a_half_blended_model_still_exports_fully_quantized(tiny_model_dir, tmp_path):
    model, cfg = tiny_quantized(tiny_model_dir, "--quant", "codebook", "--bits", "2")
    ids = torch.arange(20)[None]
    quantized = model(input_ids=ids).logits.detach()
    for layer in train.qat_linears(model).values():
        layer.lam = 0.5
    assert not torch.allclose(model(input_ids=ids).logits, quantized)  # the blend is in the forward
    train.export(model, cfg, tiny_model_dir, tmp_path / "a")
    verified, _ = load_verified(tmp_path / "a", tiny_model_dir)
    torch.testing.assert_close(verified(input_ids=ids).logits, quantized, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape", ["cosine", "triangular"])
def test_cyclic_precision_sweeps_between_min_and_max_bits(shape):
    cfg = cfg_for("--cyclic-bits", "2-4", "--cycle-steps", "8", "--cyclic-shape", shape)
    cycle = [train.bits_at(step, cfg) for step in range(16)]
    assert cycle[:8] == cycle[8:] and cycle[0] == 2 and cycle[4] == 4 and set(cycle) == {2, 3, 4}
    assert train.bits_at(3, cfg_for()) is None


def test_switchable_precision_rotates_widths_with_their_own_norms_and_scales(
    harness_env, monkeypatch, tiny_model_dir
):
    flags = "--quant codebook --bits 2 --switchable-bits 2,4 --steps 4 --distill-weight 0"
    run_dir = train_in_process(harness_env, monkeypatch, "switch", *flags.split())
    assert [row["bits"] for row in loss_rows(run_dir)] == ["2", "4", "2", "4"]
    _, report = load_verified(run_dir / "artifact", tiny_model_dir)
    assert report.formats == {"codebook": 14}
    model, cfg = tiny_quantized(
        tiny_model_dir, "--quant", "codebook", "--bits", "2", "--switchable-bits", "2,4"
    )
    norms = [m for m in model.modules() if isinstance(m, train.SwitchableRMSNorm)]
    assert len(norms) == 5 and set(norms[0].weights) == {"2", "4"}  # 2 per layer + the final norm
    layer = train.qat_linears(model)["model.layers.0.mlp.up_proj"]
    assert set(layer.qparams) == {"2", "4"}
    with torch.no_grad():
        norms[0].weights["4"].mul_(3.0)  # as if the 4-bit width had learned its own statistics
    assert_export_matches(model, cfg, tiny_model_dir, harness_env / "switch-export")


def test_progressive_precision_reduces_a_lut_by_kmeans(tiny_model_dir):
    model, _ = tiny_quantized(
        tiny_model_dir, "--quant", "lut", "--bits", "4", "--progressive-bits", "2"
    )
    layer = train.qat_linears(model)["model.layers.0.mlp.down_proj"]
    assert layer.bits == 4 and layer.export_bits == 2
    with torch.no_grad():
        old_lut = layer.qparams["4"]["lut"].half().float()  # as the forward uses it
        train.start_progressive_stage(model)
        train.set_bits(model, 2)
        weight = layer.fake_quant_weight()
    new_lut = layer.qparams["2"]["lut"]
    assert new_lut.shape[-1] == 4 and formats.max_levels_per_group(weight, TINY_GROUP) <= 4
    # each new entry is a weighted mean of old entries: inside their range
    assert (new_lut >= old_lut.amin(-1, keepdim=True) - 1e-7).all() and (
        new_lut <= old_lut.amax(-1, keepdim=True) + 1e-7
    ).all()


def test_a_lambda_and_progressive_run_logs_both_and_verifies(
    harness_env, monkeypatch, tiny_model_dir
):
    flags = (
        "--quant lut --bits 4 --progressive-bits 2 --progressive-at 0.5 --lambda-warmup 0.5 "
        "--steps 4 --distill-weight 0"
    )
    run_dir = train_in_process(harness_env, monkeypatch, "prog", *flags.split())
    rows = loss_rows(run_dir)
    assert [float(r["lambda"]) for r in rows] == [0.0, 0.5, 1.0, 1.0]
    assert [r["bits"] for r in rows] == ["-", "-", "2", "2"]
    _, report = load_verified(run_dir / "artifact", tiny_model_dir)
    spec = json.loads((run_dir / "artifact" / QUANT_SPEC).read_text())["layers"][
        "model.layers.0.mlp.up_proj"
    ]
    assert report.formats == {"lut": 14} and spec["bits"] == 2


def test_a_cyclic_run_verifies_at_its_export_width(harness_env, monkeypatch, tiny_model_dir):
    flags = "--quant int --bits 4 --cyclic-bits 2-4 --cycle-steps 4 --steps 4 --distill-weight 0"
    run_dir = train_in_process(harness_env, monkeypatch, "cyclic", *flags.split())
    assert [r["bits"] for r in loss_rows(run_dir)] == ["2", "3", "4", "3"]
    spec = json.loads((run_dir / "artifact" / QUANT_SPEC).read_text())["layers"][
        "model.layers.1.self_attn.k_proj"
    ]
    assert spec["bits"] == 4 and load_verified(run_dir / "artifact", tiny_model_dir)[1].formats == {
        "int": 14
    }


# --- distillation + top-k cache ---


def test_the_live_teacher_runs_frozen_in_the_chosen_precision(tiny_model_dir):
    cpu, ids = torch.device("cpu"), torch.arange(64)[None] * 5 % 512
    log_probs = {}
    for flag, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        teacher = train.load_teacher(
            tiny_model_dir, cpu, train.teacher_dtype(cpu, cfg_for("--teacher-dtype", flag))
        )
        assert all(p.dtype == dtype and not p.requires_grad for p in teacher.parameters())
        with torch.no_grad():
            log_probs[flag] = F.log_softmax(teacher(input_ids=ids).logits.float(), -1)
    kl = (log_probs["fp32"].exp() * (log_probs["fp32"] - log_probs["bf16"])).sum(-1).mean()
    assert 0 < kl < 1e-2  # bf16 moves the distribution, a little


def test_kd_over_all_candidates_equals_the_full_vocab_kl():
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 5, 50), torch.randn(2, 5, 50)
    cfg = cfg_for("--distill-temp", "2.0")
    full = train.distill_terms(student, {"logits": teacher}, cfg)["kd"]
    log_s, log_t = (F.log_softmax(x.flatten(0, 1) / 2, -1) for x in (student, teacher))
    expected = F.kl_div(log_s, log_t, log_target=True, reduction="batchmean") * 4
    torch.testing.assert_close(full, expected)
    ids = torch.randperm(50).expand(2, 5, 50)
    shuffled = train.distill_terms(student, {"ids": ids, "logits": teacher.gather(-1, ids)}, cfg)[
        "kd"
    ]
    torch.testing.assert_close(shuffled, expected)
    duplicate = torch.cat([ids, ids[..., :1]], -1)  # a -inf duplicate drops out
    logits = torch.cat([teacher.gather(-1, ids), torch.full((2, 5, 1), -torch.inf)], -1)
    torch.testing.assert_close(
        train.distill_terms(student, {"ids": duplicate, "logits": logits}, cfg)["kd"], expected
    )


def test_hard_top1_terms_target_the_teachers_argmax():
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 4, 30), torch.randn(2, 4, 30)
    cfg = cfg_for("--hard-top1-weight", "1", "--hard-full-top1-weight", "1")
    terms = train.distill_terms(student, {"logits": teacher}, cfg)
    top = teacher.argmax(-1)
    torch.testing.assert_close(
        terms["hard_top1"], F.cross_entropy(student.flatten(0, 1), top.flatten())
    )
    torch.testing.assert_close(terms["hard_full_top1"], F.cross_entropy(student[:, -1], top[:, -1]))
    ids = teacher.topk(5, -1).indices  # from a cache: top-1 is the first candidate
    cached = train.distill_terms(student, {"ids": ids, "logits": teacher.gather(-1, ids)}, cfg)
    torch.testing.assert_close(
        cached["hard_top1"],
        F.cross_entropy(student.gather(-1, ids).flatten(0, 1), torch.zeros(8, dtype=torch.long)),
    )
    torch.testing.assert_close(cached["hard_full_top1"], terms["hard_full_top1"])


def test_the_teacher_cache_round_trips_and_is_keyed_by_what_it_depends_on(
    harness_env, tiny_data_dir
):
    prepared = load_prepared()
    flags = "--teacher-cache-k 8 --teacher-cache-negatives 6 --teacher-cache-tokens 320"
    cfg = cfg_for(*flags.split(), "--seq-len", "32", "--batch-size", "4")
    path = train.build_teacher_cache(prepared, cfg, torch.device("cpu"))
    assert path.parent == harness_env / "runs" / "cache" / "teacher"
    cache = train.load_teacher_cache(path)
    assert cache["windows"].shape == (10, 33) and cache["ids"].shape == cache["logits"].shape == (
        10,
        32,
        14,
    )
    teacher = AutoModelForCausalLM.from_pretrained(prepared.model_dir, dtype=torch.float32)
    with torch.no_grad():
        live = teacher(
            input_ids=torch.from_numpy(cache["windows"][:3, :-1].astype(np.int64))
        ).logits
    ids, logits = (
        torch.from_numpy(cache["ids"][:3].astype(np.int64)),
        torch.from_numpy(cache["logits"][:3].astype(np.float32)),
    )
    torch.testing.assert_close(logits[..., :8], live.topk(8, -1).values.half().float())
    finite = torch.isfinite(logits)
    torch.testing.assert_close(logits[finite], live.gather(-1, ids)[finite].half().float())
    assert finite[..., :8].all() and finite.float().mean() > 0.8
    stamp = (path / "logits.npy").stat().st_mtime_ns
    assert (
        train.build_teacher_cache(prepared, cfg, torch.device("cpu")) == path
    )  # reused, not rebuilt
    assert (path / "logits.npy").stat().st_mtime_ns == stamp
    assert train.teacher_cache_path(
        prepared, cfg_for("--teacher-cache-k", "16")
    ) != train.teacher_cache_path(prepared, cfg)
    x, y, batch_teacher = train.batch_at(7, prepared.train.tokens(), cache, cfg)
    x2, _, _ = train.batch_at(7, prepared.train.tokens(), cache, cfg)
    assert (
        torch.equal(x, x2)
        and torch.equal(x[:, 1:], y[:, :-1])
        and batch_teacher["ids"].shape == (4, 32, 14)
    )
    rows = [i for i in range(10) if np.array_equal(cache["windows"][i, :-1], x[0].numpy())]
    assert rows and torch.equal(
        batch_teacher["logits"][0], torch.from_numpy(cache["logits"][rows[0]].astype(np.float32))
    )


def test_batches_are_a_function_of_seed_and_step(harness_env):
    tokens, cfg = load_prepared().train.tokens(), cfg_for("--seq-len", "16", "--batch-size", "2")
    first, again, other = (train.batch_at(step, tokens, None, cfg) for step in (3, 3, 4))
    assert torch.equal(first[0], again[0]) and not torch.equal(first[0], other[0])


# --- LoRA ---


def lora_layer(bits_flags=()):
    cfg = cfg_for(
        "--quant", "int", "--bits", "3", "--lora-rank", "4", "--lora-alpha", "8", *bits_flags
    )
    torch.manual_seed(0)
    layer = train.QATLinear(nn.Linear(48, 24), "int", 3, cfg)
    train.start_lora_stage(nn.Sequential(layer))
    with torch.no_grad():
        layer.lora[str(layer.export_bits)]["b"].normal_()
    return layer


def test_lora_merged_and_unmerged_outputs_agree():
    layer = lora_layer()
    assert not layer.weight.requires_grad and all(p.requires_grad for p in layer.lora.parameters())
    x = torch.randn(3, 7, 48)
    unmerged = layer(x)
    record, merged = layer.export()
    torch.testing.assert_close(merged(x), unmerged, rtol=1e-5, atol=1e-5)
    assert record.spec["adapter"] == {"rank": 4, "alpha": 8.0}
    assert record.params["lora_a"].dtype == record.params["lora_b"].dtype == torch.float16
    assert not torch.allclose(
        merged(x), F.linear(x, layer.fake_quant_weight(), layer.bias)
    )  # the adapter matters


def test_lora_trains_only_the_adapters():
    layer = lora_layer()
    weight, codes_before = layer.weight.detach().clone(), layer.fake_quant_weight().clone()
    optimizer = torch.optim.Adam([p for p in layer.parameters() if p.requires_grad], lr=1e-2)
    a_before = layer.lora["3"]["a"].detach().clone()
    for _ in range(3):
        optimizer.zero_grad()
        layer(torch.randn(8, 48)).pow(2).mean().backward()
        optimizer.step()
    assert torch.equal(layer.weight, weight)
    assert torch.equal(layer.fake_quant_weight(), codes_before)
    assert not torch.equal(layer.lora["3"]["a"], a_before)


@pytest.mark.parametrize("device", DEVICES)
def test_a_kd_cache_and_lora_run_exports_adapters_counted_in_bpw(
    harness_env, monkeypatch, device, tiny_model_dir
):
    flags = (
        "--quant codebook --bits 2 --steps 4 "
        "--teacher-cache-k 8 --teacher-cache-negatives 8 --teacher-cache-tokens 640 "
        "--hard-top1-weight 0.1 --hard-full-top1-weight 0.1 "
        "--lora-rank 4 --lora-at 0.5 --ema-decay 0.5"
    )
    run_dir = train_in_process(harness_env, monkeypatch, "lora", "--device", device, *flags.split())
    adapters = load_file(run_dir / "lora.safetensors")
    assert len(adapters) == 2 * 14 and any(
        t.abs().sum() > 0 for k, t in adapters.items() if k.endswith(".b")
    )
    _, report = load_verified(run_dir / "artifact", tiny_model_dir)
    spec = json.loads((run_dir / "artifact" / QUANT_SPEC).read_text())["layers"][
        "model.layers.0.mlp.gate_proj"
    ]
    assert spec["adapter"] == {"rank": 4, "alpha": 16.0}
    stored = load_file(run_dir / "artifact" / QUANT_WEIGHTS)
    n_weights = report.quantized_weights
    adapter_bits = sum(16 * t.numel() for k, t in stored.items() if ".lora_" in k)
    plain_bits = sum(
        8 * t.numel() * t.element_size() for k, t in stored.items() if ".lora_" not in k
    )
    assert report.bpw == pytest.approx((plain_bits + adapter_bits) / n_weights)


# --- stabilizers + checkpoints ---


def test_freezing_holds_attention_ov_and_the_last_mlps(tiny_model_dir):
    model, cfg = tiny_quantized(tiny_model_dir, "--freeze-attn-ov", "1", "--freeze-last-mlps", "1")
    train.freeze_weights(model, cfg)
    frozen = sorted(
        name for name, layer in train.qat_linears(model).items() if not layer.weight.requires_grad
    )
    assert frozen == [
        "model.layers.0.self_attn.o_proj",
        "model.layers.0.self_attn.v_proj",
        "model.layers.1.mlp.down_proj",
        "model.layers.1.mlp.gate_proj",
        "model.layers.1.mlp.up_proj",
        "model.layers.1.self_attn.o_proj",
        "model.layers.1.self_attn.v_proj",
    ]


def test_a_training_step_quantizes_each_decoder_layer_at_once_and_matches_the_definition(
    tiny_model_dir, tiny_data_dir
):
    """train_step (compiled: one FakeQuantStep call per decoder layer, for its 7 projections in two
    formats, two of them frozen) gives every parameter the gradient that --compile 0 (autograd
    through each layer's fake_quantize) gives it, after the same loss."""
    flags = "--module-quant mlp=codebook:2,self_attn=int:4 --freeze-attn-ov 1 --distill-weight 0"
    flags = [*flags.split(), "--batch-size", "2", "--seq-len", "16"]
    tokens = load_prepared(tiny_data_dir).train.tokens()
    steps = []
    for compile_flag in ("1", "0"):
        model, cfg = tiny_quantized(tiny_model_dir, *flags, "--compile", compile_flag)
        train.freeze_weights(model, cfg)
        optimizer, trained, _ = train.make_optimizer(model, cfg)
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        loss, _ = train.train_step(
            model, None, train.batch_at(0, tokens, None, cfg), optimizer, scaler, trained, cfg
        )
        steps.append((model, loss, trained))
    (model, loss, trained), (_, eager_loss, eager_trained) = steps
    blocks = train.layer_blocks(model)
    assert list(blocks) == ["model.layers.0", "model.layers.1"] and all(
        len(layers) == 7 for layers in blocks.values()
    )
    assert all(layer.fake_quant_step is None for layer in train.qat_linears(model).values())
    torch.testing.assert_close(loss, eager_loss, rtol=1e-6, atol=1e-6)
    assert trained.keys() == eager_trained.keys()
    for name, p in trained.items():
        torch.testing.assert_close(
            p.grad, eager_trained[name].grad, rtol=1e-4, atol=1e-6, msg=named(name)
        )


def assert_trains_and_exports(env, monkeypatch, tiny_model_dir, *flags):
    run_dir = train_in_process(env, monkeypatch, "run", "--steps", "3", *flags)
    rows = loss_rows(run_dir)
    assert [r["step"] for r in rows] == ["1", "2", "3"] and all(
        math.isfinite(float(r["loss"])) for r in rows
    )
    _, report = load_verified(run_dir / "artifact", tiny_model_dir)
    assert report.formats == {"ternary": 14}


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_autocast_trains_and_exports(harness_env, monkeypatch, device, tiny_model_dir):
    """--dtype bf16 is what CUDA runs by default (autocast around the step; the live teacher in
    bf16): the quantized layers' backward meets bf16 gradients and fp32 latent weights."""
    assert_trains_and_exports(
        harness_env, monkeypatch, tiny_model_dir, "--device", device, "--dtype", "bf16"
    )


@needs_cuda
def test_fp16_trains_with_a_grad_scaler_on_cuda(harness_env, monkeypatch, tiny_model_dir):
    """fp16 autocast scales the loss (GradScaler), so every gradient, the quantized step's too,
    arrives scaled and is unscaled before clipping and the optimizer step."""
    assert_trains_and_exports(
        harness_env, monkeypatch, tiny_model_dir, "--device", "cuda", "--dtype", "fp16"
    )


def test_ema_averages_and_is_what_gets_exported():
    p = nn.Parameter(torch.zeros(3))
    ema = train.EMA({"p": p}, decay=0.5)
    for value in (4.0, 8.0):
        with torch.no_grad():
            p.fill_(value)
        ema.update()
    assert torch.equal(ema.shadow["p"], torch.full((3,), 5.0))  # 0 -> 2 -> 5
    ema.copy_to_model()
    assert torch.equal(p.detach(), torch.full((3,), 5.0))


@pytest.mark.parametrize("device", DEVICES)
def test_resume_continues_bit_exactly(harness_env, monkeypatch, device):
    """A run checkpointed at step 3 and resumed ends where the uninterrupted run ends."""
    flags = (
        "--quant codebook --bits 2 --steps 6 --checkpoint-every 3 "
        "--ema-decay 0.9 --lora-rank 2 --lora-at 0.6 --lora-dropout 0.1"
    )
    flags = ["--device", device, *flags.split()]
    whole = train_in_process(harness_env, monkeypatch, "whole", *flags)
    checkpoints = list((harness_env / "runs" / "cache" / "checkpoints").glob("*/step*.pt"))
    assert [c.name for c in checkpoints] == [
        "step0000003.pt"
    ]  # the final step writes the artifact instead
    resumed = train_in_process(harness_env, monkeypatch, "resumed", *flags, "--resume", "auto")
    assert [r["step"] for r in loss_rows(resumed)] == ["4", "5", "6"]
    a, b = (
        load_file(whole / "artifact" / QUANT_WEIGHTS),
        load_file(resumed / "artifact" / QUANT_WEIGHTS),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert loss_rows(whole)[-1]["loss"] == loss_rows(resumed)[-1]["loss"]


def test_rtn_baseline_and_no_quant_export(harness_env, monkeypatch, tiny_model_dir):
    rtn = train_in_process(harness_env, monkeypatch, "rtn", "--quant", "mxfp4", "--baseline", "rtn")
    none = train_in_process(
        harness_env, monkeypatch, "none", "--quant", "none", "--steps", "1", "--distill-weight", "0"
    )
    rtn_report = load_verified(rtn / "artifact", tiny_model_dir)[1]
    assert (
        rtn_report.formats == {"mxfp4": 14} and 4 + 8 / 32 < rtn_report.bpw < 4 + 8 / 16
    )  # 48 = 32 + a short block
    assert load_verified(none / "artifact", tiny_model_dir)[1].formats == {"dense": 14}
    assert math.isclose(json.loads((rtn / "train.json").read_text())["steps"], 0)
