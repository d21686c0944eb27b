"""GGUF export: a run's codes and scales written without loss into llama.cpp's block types, scored
by llama.cpp itself on the harness's eval windows to the harness's bits per byte.

The model is a tiny Llama whose rows are multiples of 256, so every block type (TQ2_0 included) can
hold its layers; artifacts carry honest random codes (test_formats.random_layer) for each format."""

import argparse
import json
import os

import gguf
import numpy as np
import pytest
import torch
from conftest import ROOT, WIKITEXT, build_tiny_model_dir
from test_artifact import quantize, tiny
from transformers import GPT2Config

from harness.artifact import decoder_weights, load_verified, save
from harness.data import load_prepared
from harness.runner import RunSpec, run_experiment
from harness.tools import export as hf_export
from harness.tools.gguf import (
    PARITY_RTOL,
    GGUFError,
    check_llama,
    check_written,
    llama_cpp_greedy,
    rope_permutation,
    tensors_to_write,
)

llama_cpp = pytest.importorskip("llama_cpp", reason="needs llama-cpp-python (the llm-server extra)")

EVAL_TOKENS = 1024
Q = gguf.GGMLQuantizationType


@pytest.fixture(scope="module")
def llama_data_dir(tmp_path_factory):
    """A prepared data dir for a tiny Llama of hidden size 256 (head_dim 64, GQA 4:2)."""
    import prepare

    model_dir = build_tiny_model_dir(tmp_path_factory.mktemp("llama") / "tiny-llama", 256, 512)
    data_dir = tmp_path_factory.mktemp("llama-data")
    code = prepare.main(["--model", str(model_dir), "--train", f"file:{WIKITEXT / 'valid.txt'}",
                         "--eval", f"file:{WIKITEXT / 'test.txt'}",
                         "--data-dir", str(data_dir)])  # fmt: skip
    assert code == 0
    return data_dir


@pytest.fixture
def env(llama_data_dir, compile_cache, tmp_path, monkeypatch):
    """conftest's harness_env, pointed at the tiny Llama's data; runs go to tmp_path / "runs"."""
    monkeypatch.setenv("HARNESS_DATA_DIR", str(llama_data_dir))
    monkeypatch.setenv("HARNESS_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.setenv("HARNESS_RESULTS", str(tmp_path / "runs" / "results.tsv"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HARNESS_COMPILE_CACHE", str(compile_cache))
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    )
    return tmp_path


def model_dir_of(data_dir):
    return load_prepared(data_dir).model_dir


def make_run(data_dir, run_dir, spec: dict, head: dict | None = None):
    """A run folder whose artifact quantizes every decoder layer (and the head, given `head`)."""
    model = tiny(model_dir_of(data_dir))
    layers = quantize(model, spec, list(decoder_weights(model)))
    if head is not None:
        layers.update(quantize(model, head, ["lm_head"]))
    save(run_dir / "artifact", layers)
    return run_dir


def export(argv) -> int:
    parser = argparse.ArgumentParser()
    hf_export.add_arguments(parser)
    return hf_export.command(parser.parse_args(argv))


def tensor_types(path) -> dict[str, str]:
    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}


def scored_gap(capsys) -> float:
    """The relative bpb gap the export reports: "... (+0.12%) on N tokens"."""
    line = capsys.readouterr().out
    return float(line.split("(")[-1].split("%")[0]) / 100


# (spec, the type it is written as, scored by llama.cpp too): every export checks its blocks
# dequantize bit for bit; the scores make sure llama.cpp reads each kind of block the same way
EXACT = [
    ({"format": "ternary", "group_size": 256}, "TQ2_0", True),
    ({"format": "ternary", "group_size": 32}, "Q4_0", False),
    ({"format": "int", "bits": 4, "symmetric": True, "group_size": 128}, "Q4_0", True),
    ({"format": "int", "bits": 8, "symmetric": True, "group_size": 32}, "Q8_0", False),
    ({"format": "int", "bits": 3, "symmetric": True, "group_size": 32}, "Q4_0", False),
    ({"format": "codebook", "bits": 2, "group_size": 64}, "Q4_0", False),
    ({"format": "log", "bits": 3, "group_size": 32}, "Q4_0", False),
    ({"format": "log", "bits": 4, "group_size": 32}, "Q8_0", False),
    ({"format": "mxfp4"}, "MXFP4", True),
]


@pytest.mark.parametrize(
    "spec, qtype, scored", EXACT, ids=[f"{s['format']}-{t}" for s, t, _ in EXACT]
)
def test_exact_formats_are_written_as_their_block_type_and_llama_cpp_scores_them_alike(
    env, llama_data_dir, capsys, spec, qtype, scored
):
    run = make_run(llama_data_dir, env / "run", spec)
    out = env / "model.gguf"
    check = ["--check", "--eval-tokens", str(EVAL_TOKENS)] if scored else []
    assert export([str(run), "--gguf", str(out), *check]) == 0
    if scored:
        assert abs(scored_gap(capsys)) <= PARITY_RTOL
    types = tensor_types(out)
    assert types["blk.0.attn_q.weight"] == types["blk.1.ffn_down.weight"] == qtype
    assert types["token_embd.weight"] == types["blk.0.attn_norm.weight"] == "F32"
    assert "output.weight" not in types  # tied: llama.cpp reads token_embd


def test_written_blocks_dequantize_to_the_verified_weights_with_q_k_rows_in_rope_order(
    env, llama_data_dir
):
    spec = {"format": "int", "bits": 4, "symmetric": True, "group_size": 32}
    head = {"format": "int", "bits": 8, "symmetric": True, "group_size": 32}
    run = make_run(llama_data_dir, env / "run", spec, head=head)
    out = env / "model.gguf"
    assert export([str(run), "--gguf", str(out)]) == 0
    model, _ = load_verified(run / "artifact", model_dir_of(llama_data_dir))
    reader = {t.name: t for t in gguf.GGUFReader(out).tensors}
    for key, name in [("model.layers.0.self_attn.q_proj.weight", "blk.0.attn_q.weight"),
                      ("model.layers.1.self_attn.k_proj.weight", "blk.1.attn_k.weight"),
                      ("model.layers.1.mlp.up_proj.weight", "blk.1.ffn_up.weight"),
                      ("lm_head.weight", "output.weight")]:  # fmt: skip
        tensor = reader[name]
        values = gguf.quants.dequantize(np.asarray(tensor.data), tensor.tensor_type)
        weight = model.state_dict()[key].numpy()
        order = rope_permutation(key, model.config)
        np.testing.assert_array_equal(values, weight if order is None else weight[order])
    assert reader["output.weight"].tensor_type == Q.Q8_0
    written, _ = tensors_to_write(model, run / "artifact", model_dir_of(llama_data_dir), None)
    check_written(out, written)
    written["blk.1.attn_k.weight"].weight[3, 5] += 1e-3
    with pytest.raises(
        GGUFError, match=r"^blk.1.attn_k.weight \(Q4_0\) dequantizes to other values"
    ):
        check_written(out, written)


def test_gguf_metadata_is_llama_with_the_prepared_tokenizer(env, llama_data_dir):
    run = make_run(llama_data_dir, env / "run", {"format": "ternary", "group_size": 32})
    out = env / "model.gguf"
    assert export([str(run), "--gguf", str(out)]) == 0
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask  # as any file the user writes
    fields = gguf.GGUFReader(out).fields
    value = {k: f.contents() for k, f in fields.items() if k != "tokenizer.ggml.merges"}
    config = json.loads((model_dir_of(llama_data_dir) / "config.json").read_text())
    assert value["general.architecture"] == "llama"
    assert value["llama.embedding_length"] == 256 and value["llama.block_count"] == 2
    assert value["llama.attention.head_count_kv"] == 2 and value["llama.rope.dimension_count"] == 64
    assert value["tokenizer.ggml.model"] == "gpt2" and value["tokenizer.ggml.pre"] == "gpt-2"
    assert len(value["tokenizer.ggml.tokens"]) == config["vocab_size"]
    assert value["tokenizer.ggml.eos_token_id"] == config["eos_token_id"]
    llm = llama_cpp.Llama(str(out), n_ctx=64, verbose=False)
    ids = llm.tokenize(b"The game began in 1998 .", add_bos=False, special=False)
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(model_dir_of(llama_data_dir))
    assert ids == hf("The game began in 1998 .")["input_ids"]
    assert export([str(run), "--gguf", str(out), "--force"]) == 0  # a GGUF file is replaced


INT4 = {"format": "int", "bits": 4, "symmetric": True, "group_size": 32}
REFUSED = [
    ({"format": "lut", "bits": 2, "group_size": 32}, "lut has no exact GGUF type"),
    ({"format": "log", "bits": 5, "group_size": 32}, "log has no exact GGUF type"),
    ({"format": "mxfp8"}, "mxfp8 has no exact GGUF type"),
    ({**INT4, "group_size": 16}, "do not split into 32"),
    ({**INT4, "input_quant": {"format": "int8_token_absmax"}}, "input fake-quant has no place"),
    ({**INT4, "adapter": {"rank": 2, "alpha": 4}}, "LoRA adapter"),
]


@pytest.mark.parametrize("spec, reason", REFUSED, ids=[r for _, r in REFUSED])
def test_a_format_with_no_exact_type_is_refused_in_one_line_and_leaves_no_file(
    env, llama_data_dir, capsys, spec, reason
):
    run = make_run(llama_data_dir, env / "run", spec)
    out = env / "model.gguf"
    assert export([str(run), "--gguf", str(out)]) == 1
    err = capsys.readouterr().err
    (verdict,) = [line for line in err.splitlines() if line.startswith("export:")]
    assert reason in verdict and "--lossy" in verdict
    assert list(env.iterdir()) == [env / "run"]


def test_lossy_quantizes_what_has_no_exact_type_and_reports_the_files_own_bpb(
    env, llama_data_dir, capsys
):
    run = make_run(llama_data_dir, env / "run", {"format": "lut", "bits": 2, "group_size": 32})
    out = env / "model.gguf"
    argv = [str(run), "--gguf", str(out), "--lossy", "q8_0", "--eval-tokens", str(EVAL_TOKENS)]
    assert export(argv) == 0
    line = capsys.readouterr().out
    assert "re-quantized to Q8_0" in line and "llama.cpp" in line and "bpb vs harness" in line
    assert tensor_types(out)["blk.0.ffn_gate.weight"] == "Q8_0"


def test_bad_inputs_are_one_line_and_leave_nothing(env, llama_data_dir, capsys, tmp_path):
    run = make_run(llama_data_dir, env / "run", {"format": "ternary", "group_size": 32})
    out = env / "model.gguf"
    out.write_text("not a model")
    assert export([str(run), "--gguf", str(out)]) == 1
    assert "exists: pass --force" in capsys.readouterr().err
    assert export([str(run), "--gguf", str(out), "--force"]) == 1
    assert "not a GGUF file" in capsys.readouterr().err and out.read_text() == "not a model"
    out.unlink()
    (run / "eval.json").write_text(json.dumps({"status": "invalid", "reason": "a lie\nmore"}))
    assert export([str(run), "--gguf", str(out)]) == 1
    assert capsys.readouterr().err == "export: run was scored invalid: a lie\n"
    (run / "eval.json").unlink()
    (run / "artifact" / "quant.json").unlink()
    assert export([str(run), "--gguf", str(out)]) == 1
    assert "not an exported artifact" in capsys.readouterr().err
    assert list(env.iterdir()) == [env / "run"]


def test_a_non_llama_model_is_refused_with_the_reason():
    with pytest.raises(GGUFError, match="'gpt2': GGUF export writes Llama models only"):
        check_llama(GPT2Config())


def test_llama_cpp_greedy_picks_what_the_verified_model_ranks_first(env, llama_data_dir):
    """Each id llama.cpp picks is (up to its 8-bit activations) the verified model's argmax."""
    spec = {"format": "int", "bits": 8, "symmetric": True, "group_size": 32}
    run = make_run(llama_data_dir, env / "run", spec)
    out = env / "model.gguf"
    assert export([str(run), "--gguf", str(out)]) == 0
    model, _ = load_verified(run / "artifact", model_dir_of(llama_data_dir))
    prompt = load_prepared(llama_data_dir).eval.tokens()[:16].tolist()
    picked = llama_cpp_greedy(out, prompt, 8, eos_id=None)
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([prompt + picked])).logits[0, len(prompt) - 1 : -1]
    shortfall = logits.max(dim=-1).values - logits[torch.arange(len(picked)), picked]
    assert len(picked) == 8 and float(shortfall.max()) <= 1e-2 * float(logits.std())


def test_generate_adds_llama_cpp_continuations_of_the_file(env, llama_data_dir, capsys):
    from harness.tools import generate

    spec = {"format": "int", "bits": 8, "symmetric": True, "group_size": 32}
    make_run(llama_data_dir, env / "runs" / "r1", spec)
    out = env / "model.gguf"
    assert export([str(env / "runs" / "r1"), "--gguf", str(out)]) == 0
    capsys.readouterr()
    parser = argparse.ArgumentParser()
    generate.add_arguments(parser)
    argv = ["--run", "r1", "--tokens", "5", "--prompt", "The city", "--prompt", "It"]
    assert generate.command(parser.parse_args([*argv, "--gguf", str(out)])) == 0
    text = capsys.readouterr().out
    block = text[text.index(f"llama.cpp:      {out}") :]
    continued = [line for line in block.splitlines() if line.startswith("  llama.cpp      | ")]
    assert len(continued) == 2 and all(
        line.removeprefix("  llama.cpp      | ") for line in continued
    )
    assert generate.command(parser.parse_args([*argv, "--gguf", str(env / "none.gguf")])) == 1
    assert "is not a GGUF file" in capsys.readouterr().err


# --- on real runs of train.py ---

# int4 affine: train.py's zero is an integer, m = -z s rarely fits fp16, so Q8_0 holds c - z exactly
TRAINED = [
    (["--baseline", "rtn", "--quant", "int", "--bits", "4", "--int-symmetric", "0"], "Q8_0"),
    pytest.param(["--quant", "ternary", "--group-size", "256", "--steps", "3"], "TQ2_0",
                 marks=pytest.mark.slow, id="ternary-qat"),
    pytest.param(["--quant", "mxfp4", "--steps", "3"], "MXFP4", marks=pytest.mark.slow,
                 id="mxfp4-qat"),
]  # fmt: skip


@pytest.mark.parametrize("train_args, qtype", TRAINED)
def test_a_real_run_exports_exactly_and_matches_its_recorded_bpb(env, capsys, train_args, qtype):
    flags = ["--group-size", "32", "--batch-size", "2", "--seq-len", "64", *train_args]
    outcome = run_experiment(RunSpec(train_args=flags, budget_seconds=60, echo=False,
                                     eval_tokens=EVAL_TOKENS, train_script=ROOT / "train.py",
                                     results_path=env / "runs" / "results.tsv",
                                     runs_dir=env / "runs"))  # fmt: skip
    assert outcome.status in ("keep", "discard"), outcome.reason
    capsys.readouterr()
    out = env / "model.gguf"
    argv = [str(outcome.run_dir), "--gguf", str(out), "--check", "--eval-tokens", str(EVAL_TOKENS)]
    assert export(argv) == 0
    assert abs(scored_gap(capsys)) <= PARITY_RTOL
    assert tensor_types(out)["blk.1.ffn_up.weight"] == qtype
