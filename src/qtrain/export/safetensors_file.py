"""The safetensors export: ``save_quantized`` writes a model's integer weights and the rest of
its state_dict as one file with a checksummed JSON manifest, ``read_quantized`` reads and
verifies it, ``load_quantized`` builds the model back from it. The file's layout is described
in ``qtrain.export``'s docstring.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import nn

from qtrain.export.packing import (
    ExportError,
    _gemm_config,
    _granularity,
    _packing,
    _require_integer_weights,
    pack_int,
    unpack_int,
)
from qtrain.models import build_model
from qtrain.ops import GemmConfig
from qtrain.protocol import QuantizedWeight
from qtrain.recipes import RECIPES, Recipe
from qtrain.train.checkpoint import _atomic_write
from qtrain.train.config import TrainConfig, _first_line

MANIFEST_KEY = "qtrain"  # the safetensors metadata entry holding the manifest
FORMAT_NAME = "qtrain.quantized"
FORMAT_VERSION = 1


def _weight_key(layer: str) -> str:
    return f"{layer}.weight" if layer else "weight"


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
    to run at) as one safetensors file of integer weights (see ``qtrain.export``'s
    docstring), atomically. ``input_shape`` and ``num_classes`` are the model builder's (the
    dataset's). ``ptq``: the ``PTQVariant`` (as a dict) that quantized ``model`` after training
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
