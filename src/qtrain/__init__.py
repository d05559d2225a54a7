"""qtrain: quantized training for PyTorch — low-precision weights, activations and gradients."""

from qtrain import formats, presets  # noqa: F401  (presets registers the named configs)
from qtrain.api import QuantizedTrainingConfig, dequantize_, quantize_
from qtrain.export import load_quantized
from qtrain.nn import QConv2d, QLinear
from qtrain.observers import Observer, RunningMinMax
from qtrain.ops import GemmConfig, Precision
from qtrain.protocol import QuantizedModule, QuantizedWeight
from qtrain.quantizer import (
    AbsMax,
    Clip,
    LearnedStep,
    MinMax,
    NonFiniteError,
    PerChannel,
    PerGroup,
    PerTensor,
    PerToken,
    PowerOfTwo,
    QParams,
    QuantSpec,
    QuantSpecError,
    Rounding,
    compute_qparams,
    quantize,
    quantize_int,
)
from qtrain.range_bn import RangeBatchNorm2d
from qtrain.train import load_run

__version__ = "0.1.0"

__all__ = [
    "GemmConfig",
    "Observer",
    "Precision",
    "QuantizedModule",
    "QuantizedWeight",
    "RunningMinMax",
    "QConv2d",
    "QLinear",
    "QuantizedTrainingConfig",
    "RangeBatchNorm2d",
    "dequantize_",
    "quantize_",
    "AbsMax",
    "Clip",
    "LearnedStep",
    "MinMax",
    "NonFiniteError",
    "PerChannel",
    "PerGroup",
    "PerTensor",
    "PerToken",
    "PowerOfTwo",
    "QParams",
    "QuantSpec",
    "QuantSpecError",
    "Rounding",
    "compute_qparams",
    "formats",
    "quantize",
    "quantize_int",
    "load_run",
    "load_quantized",
]
