"""The exported low-bit model: how train.py writes it and how the harness verifies it.

An artifact (format v2) is a folder of data, exactly these files:

    quant.json          {"version": 2, "layers": {<module>: {"format": ..., "shape": [out, in], ...}
                                                  | {"format": "dense"}}}
    quant.safetensors   packed integer codes and per-group parameters, `<module>.codes`,
                        `<module>.scale`, ...
    dense.safetensors   optional: floating-point tensors by state_dict key (norms, embeddings, a
                        dense layer's weight), only those the run changed

No config, no code, no HF weights, no pickle: the architecture and every tensor the artifact does
not give are the prepared model's (prepare.py's plain HF folder), so train.py cannot change what the
model computes except through the tensors it declares. `load_verified` builds the prepared model,
rebuilds every declared matmul weight from its codes (formats.decode_layer, LoRA adapter included),
loads dense.safetensors, installs any declared input fake-quant, checks the result is still causal
and counts the bits actually stored. Evaluation then runs on that model, never on anything else.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from harness.formats import (
    DENSE,
    FORMATS,
    InvalidArtifact,
    decode_layer,
    input_quant_of,
    pack_codes,
)

_DTYPE_BYTES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}  # safetensors header dtype -> bytes per element

QUANT_SPEC = "quant.json"
QUANT_WEIGHTS = "quant.safetensors"
DENSE_WEIGHTS = "dense.safetensors"
ARTIFACT_FILES = (QUANT_SPEC, QUANT_WEIGHTS, DENSE_WEIGHTS)
FORMAT_VERSION = 2

# Size caps, so a hostile artifact cannot exhaust memory before it is judged: a tensor file may hold
# at most twice the prepared model's weights (an fp32 copy of a bf16 model) plus some slack.
MAX_SPEC_BYTES = 4 << 20
WEIGHTS_SLACK_BYTES = 16 << 20

# Causality probe: logits at the first half of PROBE_TOKENS random ids must not move (beyond this
# fraction of their scale) when the second half changes.
PROBE_TOKENS = 32
CAUSAL_RTOL = 1e-4


@dataclass
class QuantizedLinear:
    """What train.py hands over for one Linear: codes in [0, levels) shaped like the weight, plus
    the format's parameters (e.g. {"scale": (out, n_groups) float16}, plus lora_a / lora_b with an
    adapter) and settings (e.g. {"bits": 2, "group_size": 128,
    "adapter": {"rank": 8, "alpha": 16}})."""

    format: str
    codes: torch.Tensor
    params: dict[str, torch.Tensor]
    spec: dict = field(default_factory=dict)  # e.g. {"group_size": 128}


@dataclass
class ArtifactReport:
    # stored bits per weight over the decoder matmul weights (codes + scales + dense layers)
    bpw: float
    linear_mb: float  # their stored size
    other_mb: (
        float  # embeddings, the output head (its codes when quantized), norms: at stored precision
    )
    quantized_weights: int  # weights in the decoder matmul layers
    formats: dict[
        str, int
    ]  # format name -> number of declared layers (the output head included when declared)

    @property
    def size_mb(self) -> float:
        return self.linear_mb + self.other_mb


def save(
    out_dir: Path,
    layers: dict[str, QuantizedLinear],
    dense_tensors: dict[str, torch.Tensor] | None = None,
    dense: list[str] = (),
) -> None:
    """Write the artifact: `layers` as codes, `dense_tensors` (state_dict key -> the floating
    tensors the run changed) as they are, and `dense` naming layers deliberately left in floating
    point. quant.json goes last and any old one first: a half-written folder is no artifact."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in (QUANT_SPEC, DENSE_WEIGHTS):
        (out_dir / name).unlink(missing_ok=True)
    tensors, declared = {}, {}
    for name, layer in layers.items():
        spec = {"format": layer.format, "shape": list(layer.codes.shape), **layer.spec}
        tensors[f"{name}.codes"] = pack_codes(layer.codes, FORMATS[layer.format].levels(spec))
        tensors.update(
            {
                f"{name}.{key}": value.detach().contiguous().cpu()
                for key, value in layer.params.items()
            }
        )
        declared[name] = spec
    declared.update({name: {"format": DENSE} for name in dense})
    save_file(tensors, str(out_dir / QUANT_WEIGHTS))
    if dense_tensors:
        plain = {key: value.detach().contiguous().cpu() for key, value in dense_tensors.items()}
        save_file(plain, str(out_dir / DENSE_WEIGHTS))
    (out_dir / QUANT_SPEC).write_text(
        json.dumps({"version": FORMAT_VERSION, "layers": declared}, indent=1)
    )


# --- the prepared model ---


def stored_bytes(model_dir: Path) -> dict[str, int]:
    """state_dict key -> bytes of each tensor in the prepared model's weight files, from headers."""
    stored = {}
    for path in sorted(Path(model_dir).glob("model*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            for name in handle.keys():
                piece = handle.get_slice(name)
                n_elements = 1
                for dim in piece.get_shape():
                    n_elements *= dim
                stored[name] = n_elements * _DTYPE_BYTES[piece.get_dtype()]
    return stored


def output_head_name(model: nn.Module) -> str:
    head = model.get_output_embeddings()
    return next(name for name, module in model.named_modules() if module is head)


def matmul_weights(model: nn.Module) -> dict[str, str]:
    """layer name -> state_dict key of every floating 2-D parameter, whatever its module's class,
    except embedding tables (token, position) and an output head tied to them."""
    tables = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    return {key.removesuffix(".weight"): key for key, p in model.named_parameters()
            if p.dim() == 2 and p.is_floating_point() and id(p) not in tables}  # fmt: skip


def decoder_weights(model: nn.Module) -> dict[str, str]:
    """The matmul weights that must be declared and make up bpw: all but the output head's."""
    layers = matmul_weights(model)
    layers.pop(output_head_name(model), None)
    return layers


def owner(model: nn.Module, key: str) -> tuple[nn.Module, str]:
    path, _, attr = key.rpartition(".")
    return model.get_submodule(path), attr


def transposed(module: nn.Module) -> bool:
    """transformers' Conv1D (GPT-2) stores its weight (in, out); a spec's shape is [out, in]."""
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, Conv1D)


def install_weight(model: nn.Module, key: str, weight: torch.Tensor) -> None:
    """Give the parameter `key` a Parameter of its own holding `weight` (unties a tied head)."""
    module, attr = owner(model, key)
    setattr(module, attr, nn.Parameter(weight.to(getattr(module, attr).dtype).contiguous()))


def install_input_quant(module: nn.Module, quant) -> None:
    """Fake-quantize the layer's input on every forward."""
    module.register_forward_pre_hook(lambda module, args: (quant(args[0]), *args[1:]))


# --- reading the artifact ---


def _one_line(err: Exception) -> str:
    return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"


def check_files(artifact_dir: Path, max_weights_bytes: int) -> None:
    """Only the artifact's own plain files, none too large; quant.json and quant.safetensors in."""
    if artifact_dir.is_symlink() or not artifact_dir.is_dir():
        raise InvalidArtifact(
            f"{artifact_dir} is not a folder (a symlink or missing): not an exported artifact"
        )
    for entry in sorted(artifact_dir.iterdir()):
        if entry.is_symlink():
            raise InvalidArtifact(f"{entry.name} is a symlink: an artifact holds plain files only")
        if entry.name not in ARTIFACT_FILES or not entry.is_file():
            raise InvalidArtifact(
                f"{entry.name} in the artifact: only {', '.join(ARTIFACT_FILES[:-1])} and "
                f"{ARTIFACT_FILES[-1]} are read"
            )
        cap = MAX_SPEC_BYTES if entry.name == QUANT_SPEC else max_weights_bytes
        if entry.stat().st_size > cap:
            raise InvalidArtifact(
                f"{entry.name} is {entry.stat().st_size} bytes, over its cap of {cap}"
            )
    for required in (QUANT_SPEC, QUANT_WEIGHTS):
        if not (artifact_dir / required).exists():
            raise InvalidArtifact(f"no {required} in {artifact_dir}: not an exported artifact")


def read_declaration(path: Path) -> dict[str, dict]:
    """quant.json's layers, each spec an object naming its format; anything else is a verdict."""
    try:
        declaration = json.loads(path.read_bytes())
    except (ValueError, RecursionError) as err:
        raise InvalidArtifact(f"{QUANT_SPEC} is not JSON: {_one_line(err)}") from None
    if not isinstance(declaration, dict):
        raise InvalidArtifact(f"{QUANT_SPEC} holds a {type(declaration).__name__}, not an object")
    if declaration.get("version") != FORMAT_VERSION:
        raise InvalidArtifact(
            f"{QUANT_SPEC} version {declaration.get('version')!r}, expected {FORMAT_VERSION}"
        )
    layers = declaration.get("layers")
    if not isinstance(layers, dict):
        raise InvalidArtifact(f"{QUANT_SPEC}: layers is {type(layers).__name__}, not an object")
    for name, spec in layers.items():
        if not isinstance(spec, dict) or not isinstance(spec.get("format"), str):
            raise InvalidArtifact(
                f"{QUANT_SPEC}: {name}: {str(spec)[:60]!r} is not an object naming a format"
            )
    return layers


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except Exception as err:  # noqa: BLE001 - safetensors' own errors on a corrupt or hostile file
        raise InvalidArtifact(f"{path.name} does not load: {_one_line(err)}") from None


# --- verifying it ---


def check_spec(name: str, spec: dict, shape: list[int]) -> None:
    """What decode_layer takes as given: the shape is the model's, the format known, a group fits
    a row."""
    declared = spec.get("shape")
    if (
        not isinstance(declared, list)
        or any(type(d) is not int for d in declared)
        or declared != shape
    ):
        raise InvalidArtifact(f"{name}: declared shape {str(declared)[:40]}, the model has {shape}")
    fmt = FORMATS.get(spec["format"])
    if fmt is None:
        raise InvalidArtifact(
            f"{name}: unknown format {spec['format']!r} (known: {sorted(FORMATS)} or {DENSE})"
        )
    try:
        group = fmt.group_size(spec)
    except InvalidArtifact as err:
        raise InvalidArtifact(f"{name}: {err}") from None
    if group > shape[1]:
        raise InvalidArtifact(f"{name}: group size {group} exceeds in_features {shape[1]}")


def decode_declared(name: str, spec: dict, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """decode_layer, with a malformed value anywhere in the spec a verdict, not a traceback."""
    try:
        return decode_layer(name, spec, tensors)
    except (TypeError, ValueError, KeyError, IndexError, RuntimeError) as err:
        raise InvalidArtifact(f"{name}: malformed spec or tensors: {_one_line(err)}") from None


def install_quantized(
    model: nn.Module, specs: dict[str, tuple[str, dict]], quant: dict[str, torch.Tensor]
) -> dict[str, int]:
    """Decode each quantized layer (name -> (state_dict key, spec)) into the model, with its input
    fake-quant; returns state_dict key -> bytes stored. Every tensor of quant.safetensors must be
    used."""
    by_layer: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in quant.items():
        layer, _, suffix = key.rpartition(".")
        by_layer.setdefault(layer, {})[suffix] = tensor
    stored = {}
    for name, (key, spec) in specs.items():
        module, attr = owner(model, key)
        shape = list(getattr(module, attr).shape)[:: -1 if transposed(module) else 1]
        check_spec(name, spec, shape)
        tensors = by_layer.pop(name, {})
        weight = decode_declared(name, spec, tensors)
        install_weight(model, key, weight.T if transposed(module) else weight)
        if quant_input := input_quant_of(spec):
            install_input_quant(module, quant_input)
        stored[key] = sum(t.numel() * t.element_size() for t in tensors.values())
    if by_layer:
        raise InvalidArtifact(
            f"{QUANT_WEIGHTS} holds tensors for layers with no quantized format: "
            f"{sorted(by_layer)[:3]}"
        )
    return stored


def check_dense_tensors(
    model: nn.Module, given: dict[str, torch.Tensor], quantized_keys: set[str]
) -> None:
    """Each tensor of dense.safetensors replaces one of the model's, like for like."""
    own = model.state_dict()
    for key, tensor in given.items():
        if key not in own:
            raise InvalidArtifact(f"{DENSE_WEIGHTS}: {key} is not a tensor of the model")
        if key in quantized_keys:
            raise InvalidArtifact(
                f"{DENSE_WEIGHTS}: {key} is the weight of a quantized layer: its codes are its "
                "weight"
            )
        if tensor.shape != own[key].shape:
            raise InvalidArtifact(
                f"{DENSE_WEIGHTS}: {key} is {tuple(tensor.shape)}, the model's is "
                f"{tuple(own[key].shape)}"
            )
        if not tensor.is_floating_point() or not torch.isfinite(tensor.float()).all():
            raise InvalidArtifact(
                f"{DENSE_WEIGHTS}: {key} must hold finite floating-point values, not {tensor.dtype}"
            )


@torch.no_grad()
def load_dense_tensors(model: nn.Module, given: dict[str, torch.Tensor], head_key: str) -> None:
    """dense.safetensors into the model (cast to its dtype): the head gets a tensor of its own
    (untied), anything else is overwritten in place, so tensors tied to it follow."""
    own = model.state_dict(keep_vars=True)
    for key, tensor in given.items():
        if key == head_key:
            install_weight(model, key, tensor)
        else:
            own[key].copy_(tensor)


def tied_groups(model: nn.Module) -> list[list[str]]:
    """state_dict keys grouped by the tensor they name: a tied tensor is one group."""
    groups: dict[int, list[str]] = {}
    for key, tensor in model.state_dict(keep_vars=True).items():
        groups.setdefault(id(tensor), []).append(key)
    return list(groups.values())


def stored_size(
    keys: list[str],
    quantized: dict[str, int],
    given: dict[str, torch.Tensor],
    prepared: dict[str, int],
) -> int:
    """Bytes one tensor (named by `keys`) is stored in: its codes, else the artifact's copy, else
    the prepared model's."""
    for key in keys:
        if key in quantized:
            return quantized[key]
        if key in given:
            return given[key].numel() * given[key].element_size()
    return next(prepared[key] for key in keys if key in prepared)


@torch.no_grad()
def check_causal(model: nn.Module) -> None:
    """A second line of defence: no logit may depend on a later token."""
    vocab, half = model.get_input_embeddings().num_embeddings, PROBE_TOKENS // 2
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(vocab, (1, PROBE_TOKENS), generator=generator)
    changed = torch.cat(
        [ids[:, :half], torch.randint(vocab, (1, PROBE_TOKENS - half), generator=generator)], dim=1
    )
    before, after = (model(input_ids=x).logits[0, :half].float() for x in (ids, changed))
    gap = (after - before).abs().max()
    if gap > CAUSAL_RTOL * before.abs().max():
        raise InvalidArtifact(
            f"the model is not causal: its logits at the first {half} positions move by "
            f"{float(gap):.3g} when later tokens change"
        )


def load_verified(
    artifact_dir: Path, model_dir: Path, dtype: torch.dtype = torch.float32
) -> tuple[nn.Module, ArtifactReport]:
    """The prepared model (`model_dir`: architecture and original weights) with every declared
    matmul weight rebuilt from its verified codes, dense.safetensors loaded and declared input
    fake-quant installed, and the bits it stores.

    Raises InvalidArtifact (one-line reason) if the folder holds anything but the artifact's files,
    a decoder matmul weight is undeclared, a layer lies about its format, a dense tensor does not
    fit the model, or the loaded model is not causal.
    """
    from transformers import AutoModelForCausalLM

    artifact_dir = Path(artifact_dir)
    prepared = stored_bytes(model_dir)
    check_files(artifact_dir, 2 * sum(prepared.values()) + WEIGHTS_SLACK_BYTES)
    declared = read_declaration(artifact_dir / QUANT_SPEC)
    quant = read_tensors(artifact_dir / QUANT_WEIGHTS)
    given = (
        read_tensors(artifact_dir / DENSE_WEIGHTS)
        if (artifact_dir / DENSE_WEIGHTS).exists()
        else {}
    )
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    decoder = decoder_weights(model)
    head_name = output_head_name(model)
    layers = {
        **decoder,
        head_name: f"{head_name}.weight",
    }  # the head is optional: as stored unless declared
    unknown = sorted(set(declared) - set(layers))
    if unknown:
        raise InvalidArtifact(
            f"{QUANT_SPEC} declares layers that are not matmul weights of the model: {unknown[:3]}"
        )
    for name in decoder:
        if name not in declared:
            raise InvalidArtifact(
                f"{name} has no format in {QUANT_SPEC}: every matmul weight is declared, quantized "
                "or dense"
            )
    specs = {
        name: (layers[name], spec) for name, spec in declared.items() if spec["format"] != DENSE
    }
    check_dense_tensors(model, given, {key for key, _ in specs.values()})
    quantized = install_quantized(model, specs, quant)
    load_dense_tensors(model, given, layers[head_name])
    if model.get_output_embeddings().weight is not model.get_input_embeddings().weight:
        model.config.tie_word_embeddings = (
            False  # the config says what the model now is (a saved copy stays untied)
        )
    check_causal(model)

    decoder_keys = set(decoder.values())
    linear_bytes = other_bytes = 0
    for keys in tied_groups(model):
        size = stored_size(keys, quantized, given, prepared)
        if decoder_keys.intersection(keys):
            linear_bytes += size
        else:
            other_bytes += size
    n_weights = sum(model.get_parameter(key).numel() for key in decoder_keys)
    formats: dict[str, int] = {}
    for spec in declared.values():
        formats[spec["format"]] = formats.get(spec["format"], 0) + 1
    report = ArtifactReport(
        bpw=8 * linear_bytes / max(n_weights, 1),
        linear_mb=linear_bytes / 1e6,
        other_mb=other_bytes / 1e6,
        quantized_weights=n_weights,
        formats=formats,
    )
    return model, report
