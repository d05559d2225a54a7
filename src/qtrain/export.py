"""A trained run's quantized model as a file: integer weights in safetensors, or a QDQ ONNX graph.

safetensors (``save_quantized``, ``load_quantized``), one file, no pickle:

- per quantized layer, ``<layer>.weight.levels`` (``pack_int``: four to a byte up to 2 bits,
  ternary included, two up to 4 bits, else int8/uint8/int16/int32), ``.weight.scale`` and
  ``.weight.zero_point``, in ``QuantizedWeight``'s shapes;
- every other tensor of the model's state_dict as it is: biases, BatchNorm statistics, the
  observers' running ranges and learned steps, so that activations quantize as they trained;
- the header's metadata: one JSON manifest, with the format version, how to build the model
  (the run's train config, input shape and classes; the recipe and its config), per packed
  weight its bits, sign, shape, granularity and packing and the layer's GemmConfig in force,
  and the SHA-256 of the manifest and every tensor, so a changed or cut file is refused.

``load_quantized`` builds the model as training did (``build_model``, ``recipe.prepare``), loads
the tensors, sets each layer's weight to its dequantized levels and runs the layer with its
GemmConfig at export less the weight spec: the weight is not quantized a second time (a
min/max rule on quantized values may pick another scale). Its outputs are the fake-quantized
model's.

ONNX (``save_onnx``, ``pip install qtrain[onnx]``): the model with each quantized layer as
DequantizeLinear of its int8/uint8 weight initializer and QuantizeLinear/DequantizeLinear of
its input at the input's static scale (a running range, a learned step), checked against the
PyTorch model in onnxruntime (``check_onnx``: as written, and in onnxruntime's default session,
whose fused integer kernels round on their own). Layers that measure their input's scale from
each batch (BitNet's per-token absmax, ui8/daint8's per-tensor absmax) are refused.

Example:
    >>> exported = export_run("runs/sbm8-resnet9")  # doctest: +SKIP
    >>> model = load_quantized(exported.path)  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import importlib.util
import json
import logging
import math
import os
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
import torch.nn.functional as F
from torch import nn

from qtrain.formats import BlockFloat, Int
from qtrain.models import build_model
from qtrain.nn import RangeBatchNorm2d, _affine_params
from qtrain.ops import GemmConfig
from qtrain.protocol import QuantizedWeight, is_quantized, quantized_layers, set_precision
from qtrain.quantizer import PerTensor, QParams, QuantSpec
from qtrain.recipes import RECIPES, Recipe
from qtrain.train.checkpoint import _atomic_write
from qtrain.train.config import RunError, TrainConfig, _first_line
from qtrain.train.run import load_run

FORMATS = ("safetensors", "onnx")
SUFFIXES = {"safetensors": ".safetensors", "onnx": ".onnx"}
MANIFEST_KEY = "qtrain"  # the safetensors metadata entry holding the manifest
FORMAT_NAME = "qtrain.quantized"
FORMAT_VERSION = 1
ONNX_OPSET = 18
ONNX_PACKAGES = ("onnx", "onnxruntime", "onnxscript")


class ExportError(RunError):
    """A model cannot be exported as asked, or an exported file is damaged or not qtrain's."""


# ---- packing -------------------------------------------------------------------------------


def _field_bits(bits: int) -> int | None:
    """Bits of one packed field: 2 (four to a byte), 4 (two to a byte); None: not packed."""
    return 2 if bits <= 2 else 4 if bits <= 4 else None


def _storage_dtype(bits: int, signed: bool) -> torch.dtype:
    if not (isinstance(bits, int) and 1 <= bits <= 32):
        raise ValueError(f"bits must be an int in 1..32, got {bits!r}")
    if bits <= 8:
        return torch.int8 if signed else torch.uint8
    return torch.int16 if signed and bits <= 16 else torch.int32


def pack_int(levels: torch.Tensor, bits: int, signed: bool) -> torch.Tensor:
    """Integer levels of ``bits`` bits (signed: two's complement, −2^(b−1)..2^(b−1) − 1;
    unsigned: 0..2^b − 1) as a flat tensor: up to 2 bits four to a byte, up to 4 bits two to a
    byte (uint8, the first value in the lowest bits, the last byte padded with zeros), wider
    ones one per element in the smallest dtype that holds them (``Int(bits,
    signed).storage_dtype``). ``unpack_int`` inverts it.

    >>> pack_int(torch.tensor([-1, 0, 1, 1, -1]), 2, signed=True)  # ternary: 4 per byte
    tensor([83,  3], dtype=torch.uint8)
    """
    dtype = _storage_dtype(bits, signed)
    flat = levels.reshape(-1)
    if flat.is_floating_point() or flat.is_complex() or flat.dtype == torch.bool:
        raise ValueError(f"pack_int: levels must be an integer tensor, got dtype {flat.dtype}")
    low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    if flat.numel() and (int(flat.min()) < low or int(flat.max()) > high):
        kind = "signed" if signed else "unsigned"
        raise ValueError(
            f"pack_int: levels span {int(flat.min())}..{int(flat.max())}, outside the {bits}-bit "
            f"{kind} range {low}..{high}"
        )
    width = _field_bits(bits)
    if width is None:
        return flat.to(dtype).contiguous()
    per_byte = 8 // width
    fields = (flat.to(torch.int32) & (2**width - 1)).to(torch.uint8)
    fields = F.pad(fields, (0, -fields.numel() % per_byte)).view(-1, per_byte)
    shifts = torch.arange(0, 8, width, dtype=torch.uint8, device=fields.device)
    return (fields << shifts).sum(1, dtype=torch.uint8)


def unpack_int(packed: torch.Tensor, bits: int, numel: int, signed: bool) -> torch.Tensor:
    """The ``numel`` levels that ``pack_int(levels, bits, signed)`` packed, flat, in the
    smallest dtype that holds them.

    >>> unpack_int(torch.tensor([83, 3], dtype=torch.uint8), 2, 5, signed=True)
    tensor([-1,  0,  1,  1, -1], dtype=torch.int8)
    """
    dtype = _storage_dtype(bits, signed)
    width = _field_bits(bits)
    flat = packed.reshape(-1)
    expected = numel if width is None else -(-numel // (8 // width))
    if flat.numel() != expected:
        raise ValueError(
            f"unpack_int: {numel} levels of {bits} bits take {expected} packed values, "
            f"got {flat.numel()}"
        )
    if width is None:
        return flat.to(dtype)
    shifts = torch.arange(0, 8, width, dtype=torch.uint8, device=flat.device)
    fields = ((flat.unsqueeze(1) >> shifts) & (2**width - 1)).reshape(-1)[:numel].to(torch.int16)
    if signed:  # sign-extend each two's complement field
        fields = torch.where(fields >= 2 ** (width - 1), fields - 2**width, fields)
    return fields.to(dtype)


def _packing(bits: int, signed: bool) -> str:
    width = _field_bits(bits)
    if width is None:
        return str(_storage_dtype(bits, signed)).removeprefix("torch.")
    return f"{8 // width} per byte"


# ---- safetensors ---------------------------------------------------------------------------


def _weight_key(layer: str) -> str:
    return f"{layer}.weight" if layer else "weight"


def _gemm_config(layer: nn.Module) -> GemmConfig | None:
    """The GemmConfig a layer runs with, for the layers that take one (``set_config``):
    emulated and fake-quantized conv/linear layers; None for others (``LowPrecisionLinear``)."""
    config = getattr(layer, "config", None)
    return config if isinstance(config, GemmConfig) and hasattr(layer, "set_config") else None


def _require_integer_weights(
    model: nn.Module, what: str
) -> dict[str, tuple[nn.Module, QuantizedWeight]]:
    """{name: (layer, its integer weight)} of the quantized layers that have one (a float or
    non-integer weight is stored as it is, and quantized at load by its layer); refused when
    none has: a float model gains nothing."""
    found = {}
    for name, layer in quantized_layers(model):
        qweight = layer.quantized_weight()
        if qweight is not None:
            found[name] = (layer, qweight)
    if not found:
        raise ExportError(
            f"{what} has no layer with integer weights: nothing to export as integers (its "
            "layers compute in floating point, as fp32, amp and fp8 recipes train)"
        )
    return found


def _granularity(name: str, qweight: QuantizedWeight) -> str:
    """ "per_tensor" or "per_channel" (one scale per output channel, axis 0); other layouts
    (groups) are refused: ``QuantizedWeight.dequantize`` does not broadcast them."""
    shape, scale_shape = tuple(qweight.levels.shape), tuple(qweight.scale.shape)
    if qweight.scale.numel() == 1:
        return "per_tensor"
    if shape and scale_shape == (shape[0],) + (1,) * (len(shape) - 1):
        return "per_channel"
    raise ExportError(
        f"layer {name!r}: a weight of shape {list(shape)} with scales of shape "
        f"{list(scale_shape)} is neither per tensor nor per output channel; export supports those"
    )


def _digest(manifest: dict[str, Any], tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 of the manifest (less its own ``sha256``) and of every tensor's name, dtype,
    shape and bytes, in name order."""
    described = {k: v for k, v in manifest.items() if k != "sha256"}
    digest = hashlib.sha256(json.dumps(described, sort_keys=True).encode())
    for name in sorted(tensors):
        tensor = tensors[name]
        digest.update(f"{name}|{tensor.dtype}|{list(tensor.shape)}|".encode())
        digest.update(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def _plain_copy(tensor: torch.Tensor) -> torch.Tensor:
    # Its own contiguous CPU storage: safetensors refuses shared or strided tensors.
    return torch.clone(tensor.detach(), memory_format=torch.contiguous_format).cpu()


def save_quantized(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    config: TrainConfig,
    recipe: Recipe,
    input_shape: Sequence[int],
    num_classes: int,
    ptq: dict[str, Any] | None = None,
) -> Path:
    """Write ``model`` (prepared by ``recipe`` for ``config``'s model, at the precision it is
    to run at) as one safetensors file of integer weights (see the module docstring),
    atomically. ``input_shape`` and ``num_classes`` are the model builder's (the dataset's).
    ``ptq``: the ``PTQVariant`` (as a dict) that quantized ``model`` after training
    (``qtrain.ptq``); the loader rebuilds the trained model, then folds and quantizes it so.

    Raises ``ExportError`` when no layer has integer weights (fp32, amp: nothing to gain).

    Example:
        >>> run = load_run("runs/sbm8-resnet9")  # doctest: +SKIP
        >>> save_quantized(run.model, "sbm8.safetensors", config=run.config,
        ...                recipe=run.recipe, input_shape=run.data.input_shape,
        ...                num_classes=run.data.num_classes)  # doctest: +SKIP
    """
    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    layers: dict[str, dict[str, Any]] = {}
    configs: list[dict[str, Any]] = []  # the distinct GemmConfigs, each written once
    for name, (layer, qweight) in _require_integer_weights(model, "the model").items():
        key = _weight_key(name)
        gemm = _gemm_config(layer)
        config_index = None
        if gemm is not None:
            if gemm.to_dict() not in configs:
                configs.append(gemm.to_dict())
            config_index = configs.index(gemm.to_dict())
        layers[name] = {
            "bits": qweight.bits,
            "signed": qweight.signed,
            "shape": list(qweight.levels.shape),
            "granularity": _granularity(name, qweight),
            "scale_shape": list(qweight.scale.shape),
            "packing": _packing(qweight.bits, qweight.signed),
            "config": config_index,  # in "configs"; None: the layer has no GemmConfig
        }
        tensors[f"{key}.levels"] = pack_int(qweight.levels.cpu(), qweight.bits, qweight.signed)
        tensors[f"{key}.scale"] = _plain_copy(qweight.scale.float())
        tensors[f"{key}.zero_point"] = _plain_copy(qweight.zero_point.to(torch.int32))
    packed = {_weight_key(name) for name in layers}
    for key, tensor in model.state_dict().items():
        if key not in packed:
            tensors[key] = _plain_copy(tensor)
    manifest = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "train": config.to_dict(),
        "input_shape": list(input_shape),
        "num_classes": num_classes,
        "recipe": {
            "name": recipe.name,
            "config": recipe.config.to_dict(),
            "state": _json_state(recipe),
        },
        "ptq": ptq,
        "layers": layers,
        "configs": configs,
    }
    manifest["sha256"] = _digest(manifest, tensors)
    data = safetensors.torch.save(tensors, metadata={MANIFEST_KEY: json.dumps(manifest)})
    _atomic_write(path, lambda f: f.write(data))
    return path


def _json_state(recipe: Recipe) -> Any:
    """The recipe's state (a structural change to replay, such as removed channels) as JSON."""
    try:
        return json.loads(json.dumps(recipe.state_dict()))
    except TypeError as err:
        raise ExportError(
            f"recipe {recipe.name!r} keeps state that is not JSON ({err}): export cannot record it"
        ) from None


def _damaged(path: Path, what: str) -> ExportError:
    return ExportError(f"cannot load {path}: {what}; refusing it")


def read_quantized(path: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The manifest and the tensors of a file ``save_quantized`` wrote, checksum verified.

    Raises ``ExportError`` naming the file when it is missing, truncated, changed after
    export, or not a qtrain export.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ExportError(f"cannot read {path}: {err.strerror or err}") from None
    # safetensors: an 8-byte little-endian header length, the JSON header, the tensor bytes.
    size = int.from_bytes(data[:8], "little") if len(data) >= 8 else None
    if size is None or 8 + size > len(data):
        raise _damaged(path, f"it is truncated ({len(data)} bytes, shorter than its header says)")
    try:
        header = json.loads(data[8 : 8 + size])
        manifest = json.loads(header["__metadata__"][MANIFEST_KEY])
    except (ValueError, KeyError, TypeError):
        raise _damaged(
            path, "it is not a qtrain export (no qtrain manifest in its header)"
        ) from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise _damaged(path, f"its manifest is not a {FORMAT_NAME} manifest")
    if manifest.get("version") != FORMAT_VERSION:
        raise _damaged(
            path,
            f"it is format version {manifest.get('version')!r}; this qtrain reads version "
            f"{FORMAT_VERSION}",
        )
    try:
        tensors = safetensors.torch.load(data)
    except Exception as err:  # safetensors' own error type is not importable by name
        raise _damaged(path, f"{_first_line(err)} (truncated or corrupted)") from None
    if _digest(manifest, tensors) != manifest.get("sha256"):
        raise _damaged(
            path,
            "its tensors or manifest do not match the SHA-256 recorded at export: the file "
            "was changed or corrupted",
        )
    return manifest, tensors


def _build(manifest: dict[str, Any], keys: set[str]) -> tuple[nn.Module, Recipe]:
    """The model a manifest describes, freshly built and prepared (global RNG untouched), with
    the recipe's state replayed onto it and, for a PTQ output, folded and quantized as the
    variant was (``keys``: the file's tensor names, for the biases bias correction added);
    the weights not yet loaded."""
    name = manifest["recipe"]["name"]
    if name not in RECIPES:
        raise ExportError(
            f"the file was exported from recipe {name!r}, which is not registered here; "
            f"known: {', '.join(sorted(RECIPES))}"
        )
    recipe_class = RECIPES[name]
    recipe = recipe_class(recipe_class.config_class.from_dict(manifest["recipe"]["config"]))
    config = TrainConfig.from_dict(manifest["train"])
    with torch.random.fork_rng(devices=[]):
        model = build_model(
            config.model,
            input_shape=manifest["input_shape"],
            num_classes=manifest["num_classes"],
            width=config.width,
            **config.model_kwargs,
        )
        model = recipe.prepare(model)
        recipe.load_state_dict(manifest["recipe"]["state"], model)  # replays structural changes
        if manifest.get("ptq") is not None:
            from qtrain.ptq import PTQError, PTQVariant, skeleton

            try:
                variant = PTQVariant.from_dict(manifest["ptq"])
            except (PTQError, TypeError, ValueError) as err:
                raise ExportError(f"the file's PTQ variant is not valid: {err}") from None
            model = skeleton(model, variant, keys)
    return model, recipe


def load_quantized(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> nn.Module:
    """The model that ``save_quantized`` (``qtrain export``) wrote to ``path``, in eval mode:
    built as training built it, each quantized layer computing with its dequantized integer
    weight and quantizing its input as it did at export. Its outputs equal the exported
    model's. Nothing is unpickled; the file's checksum is verified first.

    Raises ``ExportError`` naming the file when it is damaged or does not fit the model its
    manifest describes.

    Example:
        >>> model = load_quantized("runs/sbm8-resnet9/model.safetensors")  # doctest: +SKIP
        >>> model(torch.zeros(1, 1, 28, 28)).shape  # doctest: +SKIP
        torch.Size([1, 10])
    """
    path = Path(path)
    manifest, tensors = read_quantized(path)
    model, _ = _build(manifest, set(tensors))
    weights = {}
    try:
        for name, record in manifest["layers"].items():
            key = _weight_key(name)
            numel = math.prod(record["shape"])
            packed = tensors.pop(f"{key}.levels")
            levels = unpack_int(packed, record["bits"], numel, record["signed"])
            scale, zero_point = tensors.pop(f"{key}.scale"), tensors.pop(f"{key}.zero_point")
            qweight = QuantizedWeight(
                levels.view(record["shape"]), scale, zero_point, record["bits"], record["signed"]
            )
            weights[name] = qweight
            layer = model.get_submodule(name)
            # A new Parameter: a tensor tied to this weight (a GPT's embedding) keeps its own
            # float values.
            weight = nn.Parameter(qweight.dequantize(), requires_grad=layer.weight.requires_grad)
            layer.weight = weight
            tensors[key] = weight.detach()
        model.load_state_dict(tensors)
    except (RuntimeError, AttributeError, KeyError) as err:
        raise ExportError(
            f"{path} does not fit the model its manifest describes: {_first_line(err)}"
        ) from None
    for name, qweight in weights.items():
        index = manifest["layers"][name]["config"]
        config = None if index is None else manifest["configs"][index]
        _run_with_weight(path, name, model.get_submodule(name), qweight, config)
    return model.to(device).eval()


def _run_with_weight(
    path: Path,
    name: str,
    layer: nn.Module,
    qweight: QuantizedWeight,
    config: dict[str, Any] | None,
) -> None:
    """Make ``layer`` (its weight now the dequantized levels) compute as at export, with the
    GemmConfig ``config`` it had then where it has one."""
    if config is not None:
        # The config in force at export (the eval precision, the guard's floors) without a
        # weight spec: the weight already holds its quantized values.
        layer.set_config(GemmConfig.from_dict(config).with_specs(weight_spec=None))
        return
    # A layer without a GemmConfig keeps its weight quantizer, which must find the same levels.
    again = layer.quantized_weight()
    same = (
        again is not None
        and (again.bits, again.signed) == (qweight.bits, qweight.signed)
        and torch.equal(again.levels.to(torch.int32), qweight.levels.to(torch.int32))
        and torch.allclose(again.scale.float(), qweight.scale, rtol=1e-6, atol=0.0)
    )
    if not same:
        raise ExportError(
            f"{path}: layer {name!r} ({type(layer).__name__}) re-quantizes its weight and does "
            "not find the exported levels again; this layer type cannot be loaded exactly"
        )


# ---- ONNX ----------------------------------------------------------------------------------


def _require_onnx() -> None:
    missing = [name for name in ONNX_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise ExportError(f"ONNX export needs {', '.join(missing)}: pip install 'qtrain[onnx]'")


def _qdq_dtype(int_format: Int, what: str) -> torch.dtype:
    """uint8 or int8, whichever holds the grid; a grid of more than 8 bits is refused."""
    for dtype in (torch.uint8, torch.int8):
        info = torch.iinfo(dtype)
        if info.min <= int_format.qmin and int_format.qmax <= info.max:
            return dtype
    raise ExportError(
        f"{what}: a {int_format} grid does not fit the int8/uint8 of ONNX's QuantizeLinear; "
        "ONNX export supports grids of at most 8 bits"
    )


class _ActivationQDQ(nn.Module):
    """x → QuantizeLinear → DequantizeLinear at a fixed per-tensor scale and zero point. A
    grid narrower than its storage type (a signed narrow range, fewer than 8 bits) is
    enforced by clipping x to the grid's ends first, which gives the same levels."""

    def __init__(self, int_format: Int, qparams: QParams, what: str) -> None:
        super().__init__()
        self.dtype = _qdq_dtype(int_format, what)
        self.qmin, self.qmax = int_format.qmin, int_format.qmax
        self.scale = float(qparams.scale.reshape(()))
        self.zero_point = int(qparams.zero_point.reshape(()))
        info = torch.iinfo(self.dtype)
        self.narrow = (self.qmin, self.qmax) != (info.min, info.max)
        ends = (torch.tensor([self.qmin, self.qmax]) - qparams.zero_point.reshape(())) * (
            qparams.scale.reshape(()).float()
        )
        self.low, self.high = (float(end) for end in ends)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.narrow:
            x = x.clamp(self.low, self.high)
        args = (self.scale, self.zero_point, self.qmin, self.qmax, self.dtype)
        q = torch.ops.quantized_decomposed.quantize_per_tensor(x, *args)
        return torch.ops.quantized_decomposed.dequantize_per_tensor(q, *args)


def _input_qdq(observers: nn.ModuleDict, spec: QuantSpec | None, what: str) -> nn.Module:
    """The input quantizer of a layer as a static QDQ pair (identity without an input spec).

    Refused where the scale is not fixed: the spec's rule measures each batch (no observer
    state), or the observer's qparams change with the tensor."""
    if spec is None:
        return nn.Identity()
    observer = observers["input"] if "input" in observers else None  # noqa: SIM401  (ModuleDict has no get)
    if observer is not None:
        spec = observer.spec(spec)  # an LSQ step's grid: signed or unsigned
    found = []
    if observer is not None and isinstance(spec.granularity, PerTensor):
        probes = (torch.zeros(4), torch.linspace(-1e3, 1e3, 4))
        found = [observer.qparams(probe, spec) for probe in probes]
    fixed = bool(found) and found[0] is not None and all(
        q is not None and torch.equal(q.scale, found[0].scale)
        and torch.equal(q.zero_point, found[0].zero_point)
        for q in found
    )  # fmt: skip
    if not fixed or spec.int_format is None or isinstance(spec.format, BlockFloat):
        raise ExportError(
            f"{what} quantizes its input ({spec}) at a scale measured from each batch: ONNX "
            "export supports static activation scales (running ranges, learned steps, "
            "calibrated ranges: recipes sbm, sbm8, cpt, pfq, qat), not bitnet's per-token or "
            "ui8/daint8's per-batch absmax; export this run as safetensors"
        )
    return _ActivationQDQ(spec.int_format, found[0], what)


class _DequantizedWeight(nn.Module):
    """A weight held as int8/uint8 levels, dequantized by DequantizeLinear (per tensor, or
    per output channel on axis 0)."""

    def __init__(self, qweight: QuantizedWeight, per_channel: bool, what: str) -> None:
        super().__init__()
        int_format = Int(qweight.bits, qweight.signed)
        self.dtype = _qdq_dtype(int_format, what)
        self.qmin, self.qmax = torch.iinfo(self.dtype).min, torch.iinfo(self.dtype).max
        self.register_buffer("levels", qweight.levels.to(self.dtype))
        self.per_channel = per_channel
        if per_channel:
            self.register_buffer("scale", qweight.scale.float().reshape(-1))
            self.register_buffer("zero_point", qweight.zero_point.to(torch.int64).reshape(-1))
        else:  # Python numbers: the exporter bakes them in as the node's constants
            self.scale, self.zero_point = float(qweight.scale), int(qweight.zero_point)

    def forward(self) -> torch.Tensor:
        ops = torch.ops.quantized_decomposed
        bounds = (self.qmin, self.qmax, self.dtype)
        if self.per_channel:
            return ops.dequantize_per_channel(self.levels, self.scale, self.zero_point, 0, *bounds)
        return ops.dequantize_per_tensor(self.levels, self.scale, self.zero_point, *bounds)


class _QDQGemm(nn.Module):
    """A quantized conv/linear for ONNX: QDQ input, DequantizeLinear weight, float GEMM."""

    def __init__(self, name: str, layer: nn.Module) -> None:
        super().__init__()
        what = f"layer {name!r} ({type(layer).__name__})"
        config = _gemm_config(layer)
        if config is None:
            raise ExportError(
                f"{what} is not an emulated or fake-quantized conv/linear layer: ONNX export "
                "supports those"
            )
        self.input_quantizer = _input_qdq(layer.observers, config.input_spec, what)
        qweight = layer.quantized_weight()
        if qweight is None and config.weight_spec is not None:
            raise ExportError(f"{what} quantizes its weight to {config.weight_spec}, not integers")
        self.weight = (
            nn.Parameter(layer.weight.detach().clone(), requires_grad=False)
            if qweight is None
            else _DequantizedWeight(qweight, _granularity(name, qweight) == "per_channel", what)
        )
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone())
        self.conv_args = None
        if isinstance(layer, nn.Conv2d):
            self.conv_args = (layer.stride, layer.padding, layer.dilation, layer.groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.input_quantizer(x)
        weight = self.weight if isinstance(self.weight, nn.Parameter) else self.weight()
        if self.conv_args is None:
            return F.linear(x, weight, self.bias)
        return F.conv2d(x, weight, self.bias, *self.conv_args)


class _QDQRangeNorm(nn.Module):
    """``RangeBatchNorm2d`` in eval for ONNX: QDQ input, x·scale + shift per channel
    (``_affine_params`` of the running statistics, as its eval forward), ReLU if fused."""

    def __init__(self, name: str, norm: RangeBatchNorm2d) -> None:
        super().__init__()
        what = f"layer {name!r} (RangeBatchNorm2d)"
        self.input_quantizer = _input_qdq(norm.observers, norm.input_spec, what)
        with torch.no_grad():
            scale, shift = _affine_params(
                norm.running_mean, norm.running_var.sqrt(), norm.weight, norm.bias, norm.eps
            )
        self.register_buffer("scale", scale.view(1, -1, 1, 1).clone())
        self.register_buffer("shift", shift.view(1, -1, 1, 1).clone())
        self.fused_relu = norm.fused_relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.addcmul(self.shift, self.input_quantizer(x), self.scale)
        return torch.relu(y) if self.fused_relu else y


def _onnx_module(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in eval mode made of plain torch ops that ``torch.onnx.export``
    turns into a QDQ graph: each quantized layer a ``_QDQGemm``, each Range BatchNorm a
    ``_QDQRangeNorm``. Raises ``ExportError`` for a layer ONNX export cannot express."""
    import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers quantized_decomposed)

    twin = copy.deepcopy(model).eval()
    for name, module in list(twin.named_modules()):
        if isinstance(module, RangeBatchNorm2d):
            replacement: nn.Module = _QDQRangeNorm(name, module)
        elif is_quantized(module):
            replacement = _QDQGemm(name, module)
        else:
            continue
        if not name:
            return replacement
        parent, _, child = name.rpartition(".")
        setattr(twin.get_submodule(parent), child, replacement)
    return twin


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """torch.onnx.export without its log lines and deprecation warnings (about torch itself:
    optional torchvision ops, internal APIs)."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        logger.setLevel(level)


def save_onnx(model: nn.Module, path: str | os.PathLike[str], example: torch.Tensor) -> Path:
    """Write ``model`` (at the precision it is to run at) as a QDQ ONNX graph (``_onnx_module``)
    with a dynamic batch dimension, traced on ``example`` (a batch of inputs), atomically.

    Raises ``ExportError`` when the onnx extra is missing, the model has no integer weights
    or a layer cannot be expressed.
    """
    _require_onnx()
    _require_integer_weights(model, "the model")
    path = Path(path)
    twin = _onnx_module(model)
    batch = torch.export.Dim("batch", min=1)
    with torch.no_grad(), _quiet_exporter():
        program = torch.onnx.export(
            twin,
            (example,),
            dynamo=True,
            dynamic_shapes=({0: batch},),
            input_names=["input"],
            output_names=["output"],
            opset_version=ONNX_OPSET,
            verbose=False,
        )
    proto = program.model_proto
    for node in proto.graph.node:  # the exporter's per-node notes: stack traces, fx nodes
        del node.metadata_props[:]
    data = proto.SerializeToString()
    _atomic_write(path, lambda f: f.write(data))
    return path


def check_onnx(
    path: str | os.PathLike[str], model: nn.Module, inputs: torch.Tensor, optimized: bool = False
) -> float:
    """Max |ONNX Runtime's output − ``model(inputs)``| for the graph at ``path``.

    ``optimized=False`` runs the graph as written (ONNX Runtime's graph optimizations off):
    its float ops then follow PyTorch's up to float32 summation order. ``optimized=True`` is
    ONNX Runtime's default session, which fuses DequantizeLinear → Conv/MatMul → (ReLU) →
    QuantizeLinear into integer kernels (QLinearConv...) that requantize the accumulator with
    their own rounding: an activation then lands a level apart now and then, and outputs move
    by about a step (the deployment's numerics, not the graph's). On x86 without VNNI, the
    fused kernels' u8×s8 products of 8-bit weights can also saturate (a PTQ W8A8 ResNet-9
    changed 3.4% of its predictions there; docs/RESULTS.md, issue 20)."""
    _require_onnx()
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    if not optimized:
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    (output,) = session.run(None, {session.get_inputs()[0].name: inputs.cpu().numpy()})
    with torch.no_grad():
        expected = model(inputs)
    return float((torch.from_numpy(output) - expected.cpu()).abs().max())


# ---- a run -----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Exported:
    """What ``export_run`` wrote: the file, its size, the float32 size of the plain model's
    parameters and buffers, and the largest output difference from the trained model on
    ``checked_inputs`` of the run's test inputs (the file loaded back, or the ONNX graph run
    as written in onnxruntime; ``optimized_max_abs_diff``: the same graph in onnxruntime's
    default, optimized session, see ``check_onnx``)."""

    path: Path
    bytes: int
    fp32_bytes: int
    max_abs_diff: float
    checked_inputs: int
    optimized_max_abs_diff: float | None = None  # ONNX: ONNX Runtime's fused integer kernels


def fp32_bytes(config: TrainConfig, input_shape: Sequence[int], num_classes: int) -> int:
    """Bytes of the plain model's state_dict with every float tensor in float32."""
    with torch.device("meta"):
        plain = build_model(
            config.model,
            input_shape=input_shape,
            num_classes=num_classes,
            width=config.width,
            **config.model_kwargs,
        )
    return sum(
        t.numel() * (4 if t.is_floating_point() else t.element_size())
        for t in plain.state_dict().values()
    )


def export_run(
    run_dir: str | os.PathLike[str],
    format: str = "safetensors",
    out: str | os.PathLike[str] | None = None,
    check_batch: int = 64,
) -> Exported:
    """Export the trained model of the run in ``run_dir`` (``load_run``, at the precision it
    evaluates at: CPT at its eval bits) as ``format`` to ``out`` (default ``model.<format>``
    in the run directory), then check the file on ``check_batch`` test inputs: loaded back
    (safetensors) or run in onnxruntime (ONNX) against the trained model.

    Raises ``ExportError`` for an unknown format, a model without integer weights, or one
    ONNX cannot express; ``RunNotFoundError``/``CheckpointError`` as ``load_run``.
    """
    if format not in FORMATS:
        raise ExportError(f"unknown export format {format!r}; choose from: {', '.join(FORMATS)}")
    if format == "onnx":
        _require_onnx()  # before the run loads
    run = load_run(run_dir, device="cpu")
    precision = run.recipe.on_eval_start(run.model)
    if precision is not None:
        set_precision(run.model, precision)
    _require_integer_weights(run.model, f"run {run.path} (recipe {run.recipe.name})")
    path = Path(out) if out is not None else run.path / f"model{SUFFIXES[format]}"
    return write_checked(
        run.model,
        path,
        format,
        config=run.config,
        recipe=run.recipe,
        input_shape=run.data.input_shape,
        num_classes=run.data.num_classes,
        inputs=run.data.test_x[:check_batch],
    )


def write_checked(
    model: nn.Module,
    path: str | os.PathLike[str],
    format: str,
    *,
    config: TrainConfig,
    recipe: Recipe,
    input_shape: Sequence[int],
    num_classes: int,
    inputs: torch.Tensor,
    ptq: dict[str, Any] | None = None,
) -> Exported:
    """Write ``model`` as ``format`` to ``path`` (``save_quantized`` or ``save_onnx``; the
    arguments as theirs), then check the file on ``inputs``: loaded back (safetensors) or run
    in onnxruntime (ONNX) against ``model``. Returns what was written and the check."""
    if format not in FORMATS:
        raise ExportError(f"unknown export format {format!r}; choose from: {', '.join(FORMATS)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    optimized = None
    if format == "safetensors":
        save_quantized(
            model, path, config=config, recipe=recipe, input_shape=input_shape,
            num_classes=num_classes, ptq=ptq,
        )  # fmt: skip
        with torch.no_grad():
            diff = (load_quantized(path)(inputs) - model(inputs)).abs().max()
        max_abs_diff = float(diff)
    else:
        save_onnx(model, path, inputs)
        max_abs_diff = check_onnx(path, model, inputs)
        optimized = check_onnx(path, model, inputs, optimized=True)
    fp32 = fp32_bytes(config, input_shape, num_classes)
    size = path.stat().st_size
    return Exported(path, size, fp32, max_abs_diff, len(inputs), optimized)
