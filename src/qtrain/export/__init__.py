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

Where each part lives:

- ``qtrain.export.packing``: what both formats share: ``FORMATS``, ``SUFFIXES``,
  ``ExportError``, ``pack_int``/``unpack_int`` and the layer helpers (a layer's GemmConfig,
  its integer weights and their granularity);
- ``qtrain.export.safetensors_file``: ``save_quantized``, ``read_quantized``,
  ``load_quantized``;
- ``qtrain.export.onnx_graph``: ``save_onnx``, ``check_onnx`` and the QDQ modules of the
  export-only twin;
- here: a run's export (``export_run``, ``write_checked``, ``Exported``, ``fp32_bytes``), and
  the names above re-exported.

Example:
    >>> exported = export_run("runs/sbm8-resnet9")  # doctest: +SKIP
    >>> model = load_quantized(exported.path)  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qtrain.export.onnx_graph import (
    ONNX_OPSET,
    ONNX_PACKAGES,
    _require_onnx,
    check_onnx,
    save_onnx,
)
from qtrain.export.packing import (
    FORMATS,
    SUFFIXES,
    ExportError,
    _require_integer_weights,
    pack_int,
    unpack_int,
)
from qtrain.export.safetensors_file import (
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST_KEY,
    load_quantized,
    read_quantized,
    save_quantized,
)
from qtrain.models import build_model
from qtrain.protocol import set_precision
from qtrain.recipes import Recipe
from qtrain.train.config import TrainConfig
from qtrain.train.run import load_run

__all__ = [
    "FORMATS",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MANIFEST_KEY",
    "ONNX_OPSET",
    "ONNX_PACKAGES",
    "SUFFIXES",
    "ExportError",
    "Exported",
    "_require_onnx",
    "check_onnx",
    "export_run",
    "fp32_bytes",
    "load_quantized",
    "pack_int",
    "read_quantized",
    "save_onnx",
    "save_quantized",
    "unpack_int",
    "write_checked",
]


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
