"""Quantized modules. They hold runtime state (current specs, observers), never policy.

``QLinear``/``QConv2d`` subclass ``nn.Linear``/``nn.Conv2d`` and keep their state_dict keys, so
pretrained weights load into them; observers' state (running input ranges) is extra, optional
buffers. Both follow the quantized-module protocol (``qtrain.protocol``): bit-widths change at
run time through ``set_config`` / ``set_precision`` without rebuilding the module.

Range BatchNorm lives in ``qtrain.range_bn`` and the compact saved activations (``CompactReLU``,
``CompactMaxPool2d``, ``FusedReLU``) in ``qtrain.compact``; their names stay importable from here.

>>> import torch
>>> from qtrain import QuantSpec, formats
>>> from qtrain.ops import GemmConfig
>>> layer = QLinear(4, 3, config=GemmConfig(weight_spec=QuantSpec(formats.Int(4))))
>>> layer(torch.randn(2, 4)).shape
torch.Size([2, 3])
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# Range BN (qtrain.range_bn) and the compact activations (qtrain.compact) live in their own
# modules; re-exported so that ``from qtrain.nn import RangeBatchNorm2d`` etc. keep working.
from qtrain.compact import (  # noqa: F401  (re-exported)
    CompactMaxPool2d,
    CompactReLU,
    FusedReLU,
    fuse_range_bn_relu,
)
from qtrain.formats import BlockFloat
from qtrain.observers import ROLES as OBSERVER_ROLES
from qtrain.observers import Observer, RunningMinMax
from qtrain.ops import (
    GemmConfig,
    Precision,
    quantized_conv2d,
    quantized_linear,
    raised_config,
)
from qtrain.protocol import QuantizedWeight
from qtrain.quantizer import (
    LearnedStep,
    QuantSpecError,
    Rounding,
    compute_qparams,
    qparams_shape,
    quantize,
    quantize_int,
)
from qtrain.range_bn import (  # noqa: F401  (re-exported)
    SPREADS,
    RangeBatchNorm2d,
    _affine,
    _affine_params,
    range_bn_constant,
)
from qtrain.validation import check_number, check_type, refuse

# Keys of the running input ranges before they moved into the input observer.
_OLD_RANGE_KEYS = {"input_low": "observers.input.low", "input_high": "observers.input.high"}


class _QuantizedGemmModule:
    """Mixin: the quantized-module protocol (``qtrain.protocol``) for a conv/linear layer.

    The layer's effective ``config`` is its configured one (``set_config``) at the bit-widths
    a schedule sets (``set_precision``), with no operand below the guard's floor
    (``raise_floor``): a schedule never undoes a raise. Observers (``observers``, one per
    role that has state; by default SBM's running ranges for the input) supply the qparams
    of their operand.
    """

    config: GemmConfig
    range_momentum: float

    def _init_quant(
        self,
        config: GemmConfig,
        range_momentum: float,
        observers: dict[str, Observer] | None = None,
    ) -> None:
        what = f"{type(self).__name__}.range_momentum"
        check_number(what, range_momentum, QuantSpecError, low=0.0, high=1.0)
        self.range_momentum = float(range_momentum)
        if observers is None:
            observers = {"input": RunningMinMax(range_momentum)}
        unknown = sorted(set(observers) - set(OBSERVER_ROLES))
        if unknown:
            allowed = f"roles {OBSERVER_ROLES}"
            refuse(f"{type(self).__name__}.observers", unknown, allowed, QuantSpecError)
        self.observers = nn.ModuleDict(observers)
        self._precision: Precision | None = None
        self._floor: dict[str, float] = {}
        self.set_config(config)

    # ---- precision: configured, scheduled, floored ----------------------------------------
    def set_config(self, config: GemmConfig) -> None:
        """Switch the configured specs in place; observers (running ranges) are kept."""
        check_type(f"{type(self).__name__}.config", config, GemmConfig, QuantSpecError)
        self.base_config = config
        self._update_config()

    def set_precision(self, precision: Precision | None) -> None:
        """The bit-widths a schedule sets this step (None: the configured ones)."""
        check_type(f"{type(self).__name__}.precision", precision, Precision | None, QuantSpecError)
        self._precision = precision
        self._update_config()

    def raise_floor(self) -> bool:
        """Raise every quantized operand one step (``raised_config``) and keep it there as a
        floor under any later schedule. False when already full precision."""
        raised = raised_config(self.config)
        if raised is None:
            return False
        bits = raised.spec_bits()
        self._floor = {field: max(self._floor.get(field, 0.0), b) for field, b in bits.items()}
        self._update_config()
        return True

    def floor(self) -> dict[str, float]:
        """Bits per spec field below which the guard keeps this layer (``math.inf``: float)."""
        return dict(self._floor)

    def set_floor(self, floor: dict[str, float]) -> None:
        self._floor = dict(floor)
        self._update_config()

    def _update_config(self) -> None:
        self.config = self.base_config.with_precision(self._precision).with_floor(self._floor)

    # ---- which products run as exact integer products (GemmConfig.products) ---------------
    def integer_roles(self) -> set[str]:
        """The products that run as exact integer products at the bits in force (a linear's
        on 2-d inputs; ``qtrain.int_products``)."""
        from qtrain.int_products import product_roles  # it loads torch._dynamo

        conv = isinstance(self, nn.Conv2d)
        return product_roles(self.config, conv, 4 if conv else 2)

    # ---- what the cost meter and export ask -------------------------------------------------
    def role_bits(self, float_bits: float = 32.0) -> dict[str, tuple[float, float]]:
        return self.config.role_bits(float_bits)

    def sample_role_bits(self) -> None:
        return None  # every sample of a call runs at role_bits()

    def weight_storage_bits(self) -> int:
        """The weight at its spec's bits plus one 32-bit scale per scale group (a block
        float's shared exponents are in its bits; a plain cast has no scale); 32 bits a
        value without a weight spec."""
        spec, weight = self.config.weight_spec, self.weight
        if spec is None:
            return 32 * weight.numel()
        scales = 0
        if not isinstance(spec.format, BlockFloat) and spec.scale is not None:
            scales = math.prod(qparams_shape(weight, spec.granularity))
        return math.ceil(weight.numel() * spec.bits) + 32 * scales

    def quantized_weight(self) -> QuantizedWeight | None:
        """The weight as integer levels with scale and zero point, as the forward quantizes it:
        at the weight observer's qparams where it has one (a learned step, a calibrated
        range), else at the spec's own rule. None: not an integer spec, or an observer that
        has not set its qparams yet."""
        spec = self.config.weight_spec
        if spec is None or spec.int_format is None or isinstance(spec.format, BlockFloat):
            return None
        qparams = None
        if "weight" in self.observers:
            observer = self.observers["weight"]
            spec = observer.spec(spec)
            qparams = observer.qparams(self.weight.detach(), spec)
            if qparams is None and spec.scale == LearnedStep():
                return None
        nearest = dataclasses.replace(spec, rounding=Rounding.NEAREST)
        levels, scale, zero_point = quantize_int(self.weight.detach(), nearest, qparams=qparams)
        int_format = spec.int_format
        return QuantizedWeight(levels, scale, zero_point, int_format.bits, int_format.signed)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        # Running ranges saved by a qtrain from before observers load into the input observer.
        for old, new in _OLD_RANGE_KEYS.items():
            if prefix + old in state_dict and prefix + new not in state_dict:
                state_dict[prefix + new] = state_dict.pop(prefix + old)
        super()._load_from_state_dict(state_dict, prefix, *args)  # type: ignore[misc]


class QLinear(_QuantizedGemmModule, nn.Linear):
    """``nn.Linear`` whose forward, grad-input and grad-weight products follow a GemmConfig."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        config: GemmConfig | None = None,
        range_momentum: float = 0.1,
        observers: dict[str, Observer] | None = None,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        nn.Linear.__init__(self, in_features, out_features, bias, device=device, dtype=dtype)
        self._init_quant(config or GemmConfig(), range_momentum, observers)

    @classmethod
    def from_float(
        cls,
        module: nn.Linear,
        config: GemmConfig,
        range_momentum: float = 0.1,
        observers: dict[str, Observer] | None = None,
    ) -> QLinear:
        """A QLinear sharing ``module``'s parameters."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = module.in_features, module.out_features
        new.weight, new.bias = module.weight, module.bias
        new._init_quant(config, range_momentum, observers)
        return new.train(module.training)

    def to_float(self) -> nn.Linear:
        """The plain ``nn.Linear`` with these parameters."""
        return plain_linear(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quantized_linear(x, self.weight, self.bias, self.config, None, self.observers)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, config={_describe(self.config)}"


class QConv2d(_QuantizedGemmModule, nn.Conv2d):
    """``nn.Conv2d`` (zero padding) whose three products follow a GemmConfig."""

    def __init__(
        self,
        *args: Any,
        config: GemmConfig | None = None,
        range_momentum: float = 0.1,
        observers: dict[str, Observer] | None = None,
        **kwargs: Any,
    ) -> None:
        nn.Conv2d.__init__(self, *args, **kwargs)
        _check_conv(self)
        self._init_quant(config or GemmConfig(), range_momentum, observers)

    @classmethod
    def from_float(
        cls,
        module: nn.Conv2d,
        config: GemmConfig,
        range_momentum: float = 0.1,
        observers: dict[str, Observer] | None = None,
    ) -> QConv2d:
        """A QConv2d sharing ``module``'s parameters."""
        _check_conv(module)
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        copy_conv_attributes(module, new)
        new._init_quant(config, range_momentum, observers)
        return new.train(module.training)

    def to_float(self) -> nn.Conv2d:
        """The plain ``nn.Conv2d`` with these parameters."""
        return plain_conv2d(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quantized_conv2d(
            x,
            self.weight,
            self.bias,
            self.config,
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
            None,
            self.observers,
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, config={_describe(self.config)}"


class _FakeQuantGemm:
    """Mixin for QAT's layers (``FakeQuantLinear``, ``FakeQuantConv2d``): the forward product
    on fake-quantized input and weight, backward by autograd through the quantizers' straight-
    through estimators — full-precision gradients, zero outside a clip range as
    ``torch.fake_quantize_*`` has it, learned steps (``LSQStep`` observers) learning. The
    protocol (bits, schedules, the guard's floor, export) is the emulated layers'; a config
    with gradient specs is refused, as this layer would ignore them."""

    config: GemmConfig
    observers: nn.ModuleDict
    weight: nn.Parameter

    def set_config(self, config: GemmConfig) -> None:
        given = [f for f in ("grad_input_spec", "grad_weight_spec") if getattr(config, f, None)]
        if given:
            raise QuantSpecError(
                f"{type(self).__name__} quantizes the forward operands only (its gradients are "
                f"full precision): GemmConfig.{given[0]} must be None"
            )
        super().set_config(config)  # type: ignore[misc]

    def integer_roles(self) -> set[str]:
        """{"forward"} where ``GemmConfig.products`` runs the forward product on integer
        levels (``int_products.fake_quant_roles``); the gradients are full precision."""
        from qtrain.int_products import fake_quant_roles  # it loads torch._dynamo

        return fake_quant_roles(self.config)

    def _fake_quantize(self, x: torch.Tensor, role: str) -> torch.Tensor:
        spec = getattr(self.config, f"{role}_spec")
        if spec is None:
            return x
        if role in self.observers:
            return self.observers[role].fake_quantize(x, spec)
        return quantize(x, spec)

    def _operand(self, x: torch.Tensor, role: str):
        """x̂ for ``role``, and for the integer forward product (``GemmConfig.products``) the
        qparams and spec it was quantized with (None on the floats, and without a spec)."""
        spec = getattr(self.config, f"{role}_spec")
        if spec is None or self.config.products == "float":
            return self._fake_quantize(x, role), None
        integer = spec.int_format is not None
        if role in self.observers:
            x_hat, qparams, spec = self.observers[role].fake_quantize_observed(x, spec)
        else:  # the spec's rule measures x once: quantize at those qparams is quantize(x, spec)
            qparams = compute_qparams(x.detach(), spec) if integer else None
            x_hat = quantize(x, spec, qparams=qparams)
        if qparams is None and integer:
            qparams = compute_qparams(x.detach(), spec)  # the rule's, as quantize measured them
        return x_hat, (qparams, spec)

    def _product(self, x: torch.Tensor, conv_args=None) -> torch.Tensor:
        """x̂·ŵᵀ + b (conv2d for ``conv_args``): an exact integer product where the config
        asks and the operands qualify (``int_products.fake_quant_forward``), else on the
        floats."""
        x_hat, x_levels = self._operand(x, "input")
        w_hat, w_levels = self._operand(self.weight, "weight")
        if x_levels is not None and w_levels is not None:
            from qtrain.int_products import fake_quant_forward  # it loads torch._dynamo

            y = fake_quant_forward(
                self.config, x_hat, x_levels, w_hat, w_levels, self.bias, conv_args
            )
            if y is not None:
                return y
        if conv_args is None:
            return F.linear(x_hat, w_hat, self.bias)
        return F.conv2d(x_hat, w_hat, self.bias, *conv_args)


class FakeQuantLinear(_FakeQuantGemm, QLinear):
    """QAT's ``nn.Linear``: y = x̂·Ŵᵀ + b on fake-quantized operands, autograd's backward
    (``_FakeQuantGemm``).

    >>> from qtrain import QuantSpec, formats
    >>> layer = FakeQuantLinear(4, 3, config=GemmConfig(weight_spec=QuantSpec(formats.Int(4))))
    >>> layer.role_bits()["grad_input"]     # full-precision g_l times the 4-bit weight
    (32.0, 4.0)
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._product(x)


class FakeQuantConv2d(_FakeQuantGemm, QConv2d):
    """QAT's ``nn.Conv2d`` on fake-quantized operands, autograd's backward (``_FakeQuantGemm``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._product(x, (self.stride, self.padding, self.dilation, self.groups))


class BitLinear(FakeQuantLinear):
    """BitNet b1.58's linear layer (Ma et al. 2024, METHODS.md §7): an RMSNorm of the input
    (the paper's placement: inside the layer, before the activation quantizer) then
    ``FakeQuantLinear`` — with ``bitnet_quantization``'s specs, ternary absmean weights and
    8-bit per-token absmax activations. ``to_float`` gives ``nn.Sequential(norm, linear)``.
    """

    @classmethod
    def from_float(cls, module: nn.Linear, *args: Any, **kwargs: Any) -> BitLinear:
        new = super().from_float(module, *args, **kwargs)
        new.input_norm = nn.RMSNorm(
            module.in_features, eps=1e-6, device=module.weight.device
        ).train(module.training)
        return new

    def to_float(self) -> nn.Sequential:  # type: ignore[override]
        return nn.Sequential(self.input_norm, super().to_float()).train(self.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.input_norm(x))


def plain_conv2d(module: nn.Conv2d) -> nn.Conv2d:
    """A plain ``nn.Conv2d`` sharing ``module``'s parameters and hyperparameters."""
    plain = nn.Conv2d(
        module.in_channels,
        module.out_channels,
        module.kernel_size,
        module.stride,
        module.padding,
        module.dilation,
        module.groups,
        module.bias is not None,
        device="meta",
    )
    plain.weight, plain.bias = module.weight, module.bias
    return plain.train(module.training)


def plain_linear(module: nn.Linear) -> nn.Linear:
    """A plain ``nn.Linear`` sharing ``module``'s parameters."""
    plain = nn.Linear(
        module.in_features, module.out_features, module.bias is not None, device="meta"
    )
    plain.weight, plain.bias = module.weight, module.bias
    return plain.train(module.training)


def copy_conv_attributes(source: nn.Conv2d, target: nn.Module) -> None:
    """Give ``target`` (a bare conv subclass instance) ``source``'s hyperparameters and its
    weight and bias parameters (shared, not copied)."""
    for name in (
        "in_channels",
        "out_channels",
        "kernel_size",
        "stride",
        "padding",
        "dilation",
        "transposed",
        "output_padding",
        "groups",
        "padding_mode",
        "_reversed_padding_repeated_twice",
    ):
        setattr(target, name, getattr(source, name))
    target.weight, target.bias = source.weight, source.bias


def _check_conv(module: nn.Conv2d) -> None:
    if module.padding_mode != "zeros" or isinstance(module.padding, str):
        raise QuantSpecError(
            "QConv2d supports numeric zero padding only; got padding="
            f"{module.padding!r}, padding_mode={module.padding_mode!r}"
        )


def _describe(config: GemmConfig) -> str:
    roles = (
        ("input", config.input_spec),
        ("weight", config.weight_spec),
        ("grad_input", config.grad_input_spec),
        ("grad_weight", config.grad_weight_spec),
    )
    return "(" + ", ".join(f"{role}={spec or 'float'}" for role, spec in roles) + ")"
