"""The ONNX QDQ export (``pip install qtrain[onnx]``): ``save_onnx`` writes a model as a QDQ
graph through an export-only twin (``_onnx_module``), ``check_onnx`` runs it in onnxruntime
against the PyTorch model. See ``qtrain.export``'s docstring.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import logging
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from qtrain.export.packing import ExportError, _gemm_config, _granularity, _require_integer_weights
from qtrain.formats import BlockFloat, Int
from qtrain.protocol import QuantizedWeight, is_quantized
from qtrain.quantizer import PerTensor, QParams, QuantSpec
from qtrain.range_bn import RangeBatchNorm2d, _affine_params
from qtrain.train.checkpoint import _atomic_write

ONNX_OPSET = 18
ONNX_PACKAGES = ("onnx", "onnxruntime", "onnxscript")


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
