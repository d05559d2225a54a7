"""``quantize_(model, config, filter_fn)``: the one entry point that swaps modules in place.

A registry maps each config type to its handler (torchao style). Named configs (``"sbm8"``)
are registered by ``qtrain.presets``, which the package imports, below the recipes.

>>> import torch
>>> from torch import nn
>>> from qtrain import QuantSpec, formats, quantize_, dequantize_
>>> from qtrain.api import QuantizedTrainingConfig
>>> from qtrain.ops import GemmConfig
>>> spec = QuantSpec(formats.INT8)
>>> model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
>>> config = QuantizedTrainingConfig(GemmConfig(spec, spec, spec, spec))
>>> type(quantize_(model, config)[0]).__name__
'QLinear'
>>> type(dequantize_(model)[0]).__name__
'Linear'
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, ClassVar

from torch import nn

from qtrain.compact import CompactMaxPool2d, CompactReLU, FusedReLU, fuse_range_bn_relu
from qtrain.configs import Config
from qtrain.nn import BitLinear, FakeQuantConv2d, FakeQuantLinear, QConv2d, QLinear
from qtrain.observers import ROLES as OBSERVER_ROLES
from qtrain.observers import LSQStep, Observer, RunningMinMax
from qtrain.ops import GemmConfig
from qtrain.protocol import is_quantized
from qtrain.quantizer import LearnedStep, MinMax, QuantSpec, QuantSpecError, qparams_shape
from qtrain.range_bn import SPREADS, RangeBatchNorm2d
from qtrain.validation import check_int, check_number, refuse

FilterFn = Callable[[nn.Module, str], bool]
_GEMM_TYPES = (nn.Linear, nn.Conv2d)


@dataclasses.dataclass(frozen=True)
class QuantizedTrainingConfig(Config):
    """Quantize every conv/linear's three products, and optionally swap BN for Range BN.

    Args:
        gemm: the GemmConfig of each conv/linear layer.
        first_last: the GemmConfig of the first and the last conv/linear layer (in module order);
            None gives them ``gemm`` like the rest. ``GemmConfig()`` keeps them full precision.
        range_batchnorm: replace ``nn.BatchNorm2d`` by ``RangeBatchNorm2d``.
        batchnorm_input_spec / batchnorm_grad_spec: Range BN's optional input/gradient specs;
            a MinMax input spec reads the running range in eval (``RunningMinMax``), as the
            GEMM layers' inputs do.
        batchnorm_momentum: Range BN's running statistics, torch's meaning: run ← (1 − m)·run
            + m·batch; None keeps each replaced BatchNorm's own momentum.
        range_momentum: running input ranges: run ← m·run + (1 − m)·batch.
        range_bn_chunks: Range BN's number of chunks per channel.
        range_bn_spread / range_bn_constant_scale: Range BN's ``spread`` ("range" or
            "mean_abs") and ``constant_scale`` (``RangeBatchNorm2d``).
        observers: extra observers per role (``"input"``, ``"weight"``, ``"grad_input"``,
            ``"grad_weight"``), each a zero-argument factory called once per layer (e.g. a
            clip observer class); every layer's input observer is SBM's running ranges
            (``RunningMinMax(range_momentum)``) unless this names another. With equal
            gradient specs, a ``"grad_input"`` observer alone quantizes the one copy of g_l
            that both backward products use (Unified INT8's clip).
        compact_activations: replace ``nn.ReLU`` by ``CompactReLU`` (a 1-byte mask for
            backward) and ``nn.MaxPool2d`` by ``CompactMaxPool2d`` (indices only), and fuse
            each Range BN with a ReLU that follows it in a Sequential (``fuse_range_bn_relu``):
            the same results with less memory held for backward (which pays once the GEMMs
            keep their inputs as integer levels, ``GemmConfig.save_quantized_input``) and fewer
            passes.
    """

    gemm: GemmConfig
    first_last: GemmConfig | None = None
    range_batchnorm: bool = False
    batchnorm_input_spec: QuantSpec | None = None
    batchnorm_grad_spec: QuantSpec | None = None
    batchnorm_momentum: float | None = None
    range_momentum: float = 0.1
    range_bn_chunks: int = 16
    range_bn_spread: str = "range"
    range_bn_constant_scale: float = 1.0
    compact_activations: bool = False
    observers: dict[str, Callable[[], Observer]] | None = None

    error: ClassVar[type[Exception]] = QuantSpecError

    def validate(self) -> None:
        what = "QuantizedTrainingConfig."
        check_number(what + "range_momentum", self.range_momentum, QuantSpecError, low=0, high=1)
        if self.batchnorm_momentum is not None:
            check_number(
                what + "batchnorm_momentum", self.batchnorm_momentum, QuantSpecError, low=0, high=1
            )
        check_int(what + "range_bn_chunks", self.range_bn_chunks, QuantSpecError, low=1)
        if self.range_bn_spread not in SPREADS:
            refuse(
                what + "range_bn_spread", self.range_bn_spread, f"one of {SPREADS}", QuantSpecError
            )
        scale = self.range_bn_constant_scale
        if not (0 < scale < math.inf):
            refuse(what + "range_bn_constant_scale", scale, "a finite number > 0", QuantSpecError)
        unknown = sorted(set(self.observers or {}) - set(OBSERVER_ROLES))
        if unknown:
            refuse(what + "observers", unknown, f"keys among {OBSERVER_ROLES}", QuantSpecError)

    def batchnorm_observer(self) -> Observer | None:
        """Range BN's input observer: running ranges for a MinMax input spec, else none."""
        spec = self.batchnorm_input_spec
        if spec is None or not isinstance(spec.scale, MinMax):
            return None
        return RunningMinMax(self.range_momentum)

    def build_observers(self) -> dict[str, Observer]:
        """A fresh set of observers for one layer."""
        built = {role: factory() for role, factory in (self.observers or {}).items()}
        return {"input": RunningMinMax(self.range_momentum), **built}


_HANDLERS: dict[type, Callable[[nn.Module, Any, FilterFn | None], nn.Module]] = {}
_NAMED_CONFIGS: dict[str, Callable[[], Any]] = {}


def register_handler(config_type: type) -> Callable:
    """Decorator: ``handler(model, config, filter_fn) -> model`` for configs of this type."""

    def decorate(handler: Callable) -> Callable:
        _HANDLERS[config_type] = handler
        return handler

    return decorate


def register_config_name(name: str, factory: Callable[[], Any]) -> None:
    """Let ``quantize_(model, name)`` build the config from ``factory()`` (done by recipes)."""
    _NAMED_CONFIGS[name] = factory


def quantize_(model: nn.Module, config: Any, filter_fn: FilterFn | None = None) -> nn.Module:
    """Swap ``model``'s layers in place as ``config`` says and return the model.

    Args:
        model: any module.
        config: a config object with a registered handler, or a registered name (``"sbm8"``).
        filter_fn: ``filter_fn(module, fqn) -> bool`` picks which layers are swapped.
    """
    if isinstance(config, str):
        if config not in _NAMED_CONFIGS:
            names = ", ".join(sorted(_NAMED_CONFIGS))
            raise QuantSpecError(f"quantize_: unknown config name {config!r}; choose from: {names}")
        config = _NAMED_CONFIGS[config]()
    handler = _HANDLERS.get(type(config))
    if handler is None:
        names = ", ".join(t.__name__ for t in _HANDLERS)
        raise QuantSpecError(
            f"quantize_: no handler for {type(config).__name__}; registered: {names}"
        )
    return handler(model, config, filter_fn)


def except_classifier(model: nn.Module) -> FilterFn:
    """A ``filter_fn`` that leaves the last conv/linear layer in module order (the classifier)
    out, as CPT and FracTrain keep it in float32."""
    names = [name for name, m in model.named_modules() if isinstance(m, _GEMM_TYPES)]
    classifier = names[-1] if names else None
    return lambda _module, name: name != classifier


def except_first_last(model: nn.Module) -> FilterFn:
    """A ``filter_fn`` that leaves the first and the last conv/linear layer (in module order)
    out: the input layer and the classifier or language-model head, as BitNet keeps them."""
    edges = _gemm_edges(model)
    return lambda _module, name: name not in edges


@dataclasses.dataclass(frozen=True)
class FakeQuantConfig(Config):
    """Quantization-aware training: every conv/linear becomes a ``FakeQuantLinear`` /
    ``FakeQuantConv2d`` whose forward runs on fake-quantized input and weight and whose
    backward is autograd's, at full precision.

    Args:
        gemm: the input and weight specs (gradient specs must be None).
        first_last: the GemmConfig of the first and last conv/linear (in module order); None
            gives them ``gemm``.
        conv: the GemmConfig of the other convolutions; None gives them ``gemm``.
        input_norm: linears become ``BitLinear`` (an RMSNorm of the input first, BitNet).
        range_momentum: running ranges of a MinMax input spec (``RunningMinMax``).

    A ``LearnedStep()`` spec gets an ``LSQStep`` observer per layer: weights one step per scale
    of the spec's granularity, signed; inputs one step, the grid's sign chosen by the first
    batch (unsigned after a ReLU).
    """

    gemm: GemmConfig
    first_last: GemmConfig | None = None
    conv: GemmConfig | None = None
    input_norm: bool = False
    range_momentum: float = 0.9

    error: ClassVar[type[Exception]] = QuantSpecError

    def validate(self) -> None:
        for field in ("gemm", "first_last", "conv"):
            config = getattr(self, field)
            for spec in ("grad_input_spec", "grad_weight_spec"):
                if config is not None and getattr(config, spec) is not None:
                    raise QuantSpecError(
                        f"FakeQuantConfig.{field}.{spec} must be None: QAT's gradients are "
                        "full precision"
                    )
        check_number(
            "FakeQuantConfig.range_momentum", self.range_momentum, QuantSpecError, low=0, high=1
        )

    def build_observers(self, module: nn.Module, gemm: GemmConfig) -> dict[str, Observer]:
        """A fresh set of observers for ``module`` under ``gemm``."""
        observers: dict[str, Observer] = {"input": RunningMinMax(self.range_momentum)}
        if gemm.input_spec is not None and isinstance(gemm.input_spec.scale, LearnedStep):
            observers["input"] = LSQStep(1, signed="auto")
        spec = gemm.weight_spec
        if spec is not None and isinstance(spec.scale, LearnedStep):
            steps = math.prod(qparams_shape(module.weight, spec.granularity))
            observers["weight"] = LSQStep(steps, signed=True)
        return observers


def _gemm_edges(model: nn.Module) -> set[str]:
    """Names of the first and the last conv/linear layer in module order."""
    names = [name for name, m in model.named_modules() if isinstance(m, _GEMM_TYPES)]
    return {names[0], names[-1]} if names else set()


def _selected(model: nn.Module, filter_fn: FilterFn | None) -> list[tuple[str, nn.Module]]:
    """(name, module) of every submodule ``filter_fn`` accepts (all without one), listed before
    any is replaced."""
    return [
        (name, module)
        for name, module in model.named_modules()
        if name and (filter_fn is None or filter_fn(module, name))
    ]


def _replace(model: nn.Module, fqn: str, new: nn.Module) -> None:
    parent_name, _, child = fqn.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


@register_handler(QuantizedTrainingConfig)
def _quantize_training(
    model: nn.Module, config: QuantizedTrainingConfig, filter_fn: FilterFn | None
) -> nn.Module:
    edges = _gemm_edges(model)
    for name, module in _selected(model, filter_fn):
        if isinstance(module, QLinear | QConv2d):
            continue
        if isinstance(module, _GEMM_TYPES):
            gemm = (
                config.first_last
                if (name in edges and config.first_last is not None)
                else config.gemm
            )
            cls = QLinear if isinstance(module, nn.Linear) else QConv2d
            observers = config.build_observers()
            _replace(model, name, cls.from_float(module, gemm, config.range_momentum, observers))
        elif config.compact_activations and type(module) is nn.ReLU:
            _replace(model, name, CompactReLU.from_relu(module))
        elif (
            config.compact_activations
            and type(module) is nn.MaxPool2d
            and not module.return_indices
        ):
            _replace(model, name, CompactMaxPool2d.from_maxpool(module))
        elif config.range_batchnorm and type(module) is nn.BatchNorm2d:
            _replace(
                model,
                name,
                RangeBatchNorm2d.from_batchnorm(
                    module,
                    momentum=config.batchnorm_momentum,
                    num_chunks=config.range_bn_chunks,
                    spread=config.range_bn_spread,
                    constant_scale=config.range_bn_constant_scale,
                    input_spec=config.batchnorm_input_spec,
                    grad_spec=config.batchnorm_grad_spec,
                    input_observer=config.batchnorm_observer(),
                ),
            )
    if config.compact_activations:
        fuse_range_bn_relu(model)
    return model


@register_handler(FakeQuantConfig)
def _fake_quantize(
    model: nn.Module, config: FakeQuantConfig, filter_fn: FilterFn | None
) -> nn.Module:
    edges = _gemm_edges(model)
    for name, module in _selected(model, filter_fn):
        if is_quantized(module) or not isinstance(module, _GEMM_TYPES):
            continue
        gemm = config.gemm
        if name in edges and config.first_last is not None:
            gemm = config.first_last
        elif isinstance(module, nn.Conv2d) and config.conv is not None:
            gemm = config.conv
        if isinstance(module, nn.Linear):
            cls = BitLinear if config.input_norm else FakeQuantLinear
        else:
            cls = FakeQuantConv2d
        observers = config.build_observers(module, gemm)
        _replace(model, name, cls.from_float(module, gemm, config.range_momentum, observers))
    return model


def dequantize_(model: nn.Module) -> nn.Module:
    """Restore plain modules with the same weights: every quantized layer's ``to_float()``
    (``qtrain.protocol``), ``nn.BatchNorm2d`` for Range BN, and plain ``nn.ReLU`` /
    ``nn.MaxPool2d`` for the compact ones."""
    for name, module in list(model.named_modules()):
        if not name:
            continue  # the root cannot be replaced in place (quantize_ never swaps it either)
        if is_quantized(module):
            _replace(model, name, module.to_float())
        elif isinstance(module, FusedReLU | CompactReLU):
            _replace(model, name, nn.ReLU(module.inplace).train(module.training))
        elif isinstance(module, CompactMaxPool2d):
            plain_pool = nn.MaxPool2d(
                module.kernel_size,
                module.stride,
                module.padding,
                module.dilation,
                ceil_mode=module.ceil_mode,
            )
            _replace(model, name, plain_pool.train(module.training))
        elif isinstance(module, RangeBatchNorm2d):
            plain = nn.BatchNorm2d(
                module.num_features, module.eps, module.momentum, module.affine, device="meta"
            )
            plain.running_mean, plain.running_var = module.running_mean, module.running_var
            plain.num_batches_tracked = module.num_batches_tracked
            plain.weight, plain.bias = module.weight, module.bias
            _replace(model, name, plain.train(module.training))
    return model


def quantized_modules(model: nn.Module) -> list[tuple[str, QLinear | QConv2d]]:
    """(name, module) of every emulated quantized GEMM layer, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QLinear | QConv2d)]


def use_products(model: nn.Module, products: str) -> int:
    """Set ``GemmConfig.products`` on every emulated quantized layer (``quantized_modules``:
    ``qtrain.ops``' layers, whose three products it applies to, and QAT's, whose forward
    product it applies to), keeping the rest of each layer's configured specs; returns how
    many layers it set.

    >>> from qtrain.presets import symmetric_quantization
    >>> model = quantize_(nn.Sequential(nn.Linear(4, 3)), symmetric_quantization(8))
    >>> use_products(model, "int8-twin"), model[0].config.products
    (1, 'int8-twin')
    """
    modules = quantized_modules(model)
    for _, module in modules:
        module.set_config(dataclasses.replace(module.base_config, products=products))
    return len(modules)


def layer_observers(model: nn.Module, role: str) -> dict[str, Observer]:
    """Each emulated quantized layer's observer of ``role`` (``"grad_input"``...) by layer
    name, in module order; layers without one are left out."""
    return {name: m.observers[role] for name, m in quantized_modules(model) if role in m.observers}
