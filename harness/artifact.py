"""The exported low-bit model: how train.py writes it and how the harness verifies it.

An artifact is a folder that plain `AutoModelForCausalLM.from_pretrained` loads (config, tokenizer,
model.safetensors holding the dequantized weights) plus two files that are the real low-bit model:

    quant.safetensors   packed integer codes and per-group parameters, `<linear>.codes`, `<linear>.scale`, ...
    quant.json          {"version": 1, "layers": {<linear>: {"format": ..., "shape": [out, in], ...}}}

`load_verified` rebuilds every decoder Linear (and lm_head when declared) from its codes, checks it
against its declared format (formats.decode_layer, LoRA adapter included), checks the dequantized HF
weights agree with the codes, installs any declared input fake-quant, and counts the bits actually
stored. Evaluation then runs on the decoded weights, never on anything else.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from harness.formats import DENSE, FORMATS, InvalidArtifact, decode_layer, input_quant_of, pack_codes

_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}  # safetensors header dtype -> bytes per element

QUANT_WEIGHTS = "quant.safetensors"
QUANT_SPEC = "quant.json"
FORMAT_VERSION = 1
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")

# The HF weights may be stored in a lower precision than the decode; anything beyond this
# relative gap means model.safetensors is not the model the codes describe.
AGREEMENT_RTOL = 1e-3


@dataclass
class QuantizedLinear:
    """What train.py hands over for one Linear: codes in [0, levels) shaped like the weight, plus
    the format's parameters (e.g. {"scale": (out, n_groups) float16}, plus lora_a / lora_b with an
    adapter) and settings (e.g. {"bits": 2, "group_size": 128, "adapter": {"rank": 8, "alpha": 16}})."""

    format: str
    codes: torch.Tensor
    params: dict[str, torch.Tensor]
    spec: dict = field(default_factory=dict)  # e.g. {"group_size": 128}


@dataclass
class ArtifactReport:
    bpw: float  # stored bits per weight over the decoder Linears (codes + scales + dense layers)
    linear_mb: float  # their packed size
    other_mb: float  # embeddings, lm_head when untied (its codes when declared), norms: at stored precision
    quantized_weights: int  # weights in the decoder Linears
    formats: dict[str, int]  # format name -> number of verified Linears (lm_head included when declared)

    @property
    def size_mb(self) -> float:
        return self.linear_mb + self.other_mb


def save(
    out_dir: Path,
    model: nn.Module,
    layers: dict[str, QuantizedLinear],
    tokenizer_dir: Path | None = None,
    dense: list[str] = (),
) -> None:
    """Write the artifact. `model` must already compute with the dequantized weights; `dense`
    names Linears deliberately left in floating point."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors, declared = {}, {}
    for name, layer in layers.items():
        spec = {"format": layer.format, "shape": list(layer.codes.shape), **layer.spec}
        tensors[f"{name}.codes"] = pack_codes(layer.codes, FORMATS[layer.format].levels(spec))
        tensors.update({f"{name}.{key}": value.detach().contiguous().cpu() for key, value in layer.params.items()})
        declared[name] = spec
    declared.update({name: {"format": DENSE} for name in dense})
    save_file(tensors, str(out_dir / QUANT_WEIGHTS))
    (out_dir / QUANT_SPEC).write_text(json.dumps({"version": FORMAT_VERSION, "layers": declared}, indent=1))
    model.save_pretrained(out_dir)
    for filename in TOKENIZER_FILES if tokenizer_dir else ():
        if (Path(tokenizer_dir) / filename).exists():
            shutil.copy(Path(tokenizer_dir) / filename, out_dir / filename)


def _stored_tensors(artifact_dir: Path) -> dict[str, tuple[str, int]]:
    """name -> (dtype, bytes) of every tensor in the HF weight files, read from headers only."""
    stored = {}
    for path in sorted(artifact_dir.glob("model*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            for name in handle.keys():
                piece = handle.get_slice(name)
                n_elements = 1
                for dim in piece.get_shape():
                    n_elements *= dim
                stored[name] = (piece.get_dtype(), n_elements * _DTYPE_BYTES[piece.get_dtype()])
    return stored


def decoder_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Every nn.Linear that must be quantized: all of them except the output head."""
    head = model.get_output_embeddings()
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear) and m is not head}


def output_head(model: nn.Module) -> tuple[str, nn.Linear]:
    head = model.get_output_embeddings()
    return next(name for name, module in model.named_modules() if module is head), head


def install_input_quant(linear: nn.Linear, quant) -> None:
    """Fake-quantize the Linear's input on every forward (the HF folder cannot say this)."""
    linear.register_forward_pre_hook(lambda module, args: (quant(args[0]), *args[1:]))


def load_verified(artifact_dir: Path, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, ArtifactReport]:
    """Load the artifact's model with every decoder Linear (and lm_head, when declared) rebuilt
    from its verified codes and its declared input fake-quant installed.

    Raises InvalidArtifact (one-line reason) if any Linear is missing, lies about its format,
    or if the dequantized HF weights are not what the codes decode to.
    """
    from transformers import AutoModelForCausalLM

    artifact_dir = Path(artifact_dir)
    for required in ("config.json", QUANT_SPEC, QUANT_WEIGHTS):
        if not (artifact_dir / required).exists():
            raise InvalidArtifact(f"no {required} in {artifact_dir}: not an exported artifact")
    declaration = json.loads((artifact_dir / QUANT_SPEC).read_text())
    if declaration.get("version") != FORMAT_VERSION:
        raise InvalidArtifact(f"{QUANT_SPEC} version {declaration.get('version')!r}, expected {FORMAT_VERSION}")
    declared: dict[str, dict] = declaration.get("layers", {})
    try:
        model = AutoModelForCausalLM.from_pretrained(artifact_dir, dtype=dtype)
    except Exception as err:  # noqa: BLE001 - any load failure makes the artifact unusable
        raise InvalidArtifact(f"model.safetensors does not load: {type(err).__name__}: {err}") from None
    linears = decoder_linears(model)
    head_name, head = output_head(model)
    if head_name in declared:  # optional: a quantized head is verified too, but it is not decoder bpw
        if head.weight is model.get_input_embeddings().weight:
            raise InvalidArtifact(f"{head_name} is declared but tied to the embeddings: untie it "
                                  "(tie_word_embeddings=false) so the embeddings stay as stored")  # fmt: skip
        linears[head_name] = head
    unknown = sorted(set(declared) - set(linears))
    if unknown:
        raise InvalidArtifact(f"{QUANT_SPEC} declares layers the model does not have: {unknown[:3]}")
    stored = _stored_tensors(artifact_dir)
    quant = load_file(str(artifact_dir / QUANT_WEIGHTS))
    by_layer: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in quant.items():
        layer, _, suffix = key.rpartition(".")
        by_layer.setdefault(layer, {})[suffix] = tensor

    layer_bytes, formats = {}, {}
    for name, linear in linears.items():
        spec = declared.get(name)
        if spec is None:
            raise InvalidArtifact(f"{name} is stored in full precision with no format in {QUANT_SPEC}: not quantized")
        formats[spec.get("format")] = formats.get(spec.get("format"), 0) + 1
        if spec.get("format") == DENSE:  # declared floating point: honest, and it pays its stored bits
            layer_bytes[name] = stored[f"{name}.weight"][1]
            continue
        if list(spec.get("shape", [])) != list(linear.weight.shape):
            raise InvalidArtifact(f"{name}: declared shape {spec.get('shape')}, the model has {list(linear.weight.shape)}")
        tensors = by_layer.pop(name, {})
        weight = decode_layer(name, spec, tensors)
        gap = (weight - linear.weight.detach().float()).abs().max()
        if gap > AGREEMENT_RTOL * weight.abs().max().clamp_min(1e-12):
            raise InvalidArtifact(
                f"{name}: model.safetensors differs from the decoded codes by {float(gap):.3g} "
                "(a blended or unquantized export)"
            )
        with torch.no_grad():
            linear.weight.copy_(weight)
        if quant_input := input_quant_of(spec):
            install_input_quant(linear, quant_input)
        layer_bytes[name] = sum(t.numel() * t.element_size() for t in tensors.values())
    if by_layer:
        raise InvalidArtifact(f"{QUANT_WEIGHTS} holds tensors for undeclared layers: {sorted(by_layer)[:3]}")

    decoder = [name for name in linears if name != head_name]
    linear_bytes = sum(layer_bytes[name] for name in decoder)
    n_weights = sum(linears[name].weight.numel() for name in decoder)
    linear_keys = {f"{name}.weight" for name in linears}
    other_bytes = layer_bytes.get(head_name, 0) + sum(size for key, (_, size) in stored.items() if key not in linear_keys)
    report = ArtifactReport(
        bpw=8 * linear_bytes / max(n_weights, 1),
        linear_mb=linear_bytes / 1e6,
        other_mb=other_bytes / 1e6,
        quantized_weights=n_weights,
        formats=formats,
    )
    return model, report
