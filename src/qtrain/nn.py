"""Quantized modules. They hold runtime state (current specs, observers), never policy.

``QLinear``/``QConv2d`` subclass ``nn.Linear``/``nn.Conv2d`` and keep their state_dict keys, so
pretrained weights load into them; observers' state (running input ranges) is extra, optional
buffers. Both follow the quantized-module protocol (``qtrain.protocol``): bit-widths change at
run time through ``set_config`` / ``set_precision`` without rebuilding the module.

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
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from qtrain import kernels
from qtrain.formats import BlockFloat
from qtrain.observers import ROLES as OBSERVER_ROLES
from qtrain.observers import Observer, RunningMinMax
from qtrain.ops import (
    GemmConfig,
    Precision,
    quantize_grad,
    quantized_conv2d,
    quantized_linear,
    raised_config,
)
from qtrain.protocol import QuantizedWeight
from qtrain.quantizer import (
    LearnedStep,
    QuantSpec,
    QuantSpecError,
    Rounding,
    qparams_shape,
    quantize,
    quantize_int,
)
from qtrain.validation import check_int, check_number, check_type, matches, refuse

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
    # Whether the products run through qtrain.ops' quantized GEMM, so that
    # GemmConfig.products (exact integer products) applies to them.
    runs_ops_products: ClassVar[bool] = True

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
    runs_ops_products: ClassVar[bool] = False  # F.linear/F.conv2d on fake-quantized floats
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

    def _fake_quantize(self, x: torch.Tensor, role: str) -> torch.Tensor:
        spec = getattr(self.config, f"{role}_spec")
        if spec is None:
            return x
        if role in self.observers:
            return self.observers[role].fake_quantize(x, spec)
        return quantize(x, spec)


class FakeQuantLinear(_FakeQuantGemm, QLinear):
    """QAT's ``nn.Linear``: y = x̂·Ŵᵀ + b on fake-quantized operands, autograd's backward
    (``_FakeQuantGemm``).

    >>> from qtrain import QuantSpec, formats
    >>> layer = FakeQuantLinear(4, 3, config=GemmConfig(weight_spec=QuantSpec(formats.Int(4))))
    >>> layer.role_bits()["grad_input"]     # full-precision g_l times the 4-bit weight
    (32.0, 4.0)
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self._fake_quantize(self.weight, "weight")
        return F.linear(self._fake_quantize(x, "input"), weight, self.bias)


class FakeQuantConv2d(_FakeQuantGemm, QConv2d):
    """QAT's ``nn.Conv2d`` on fake-quantized operands, autograd's backward (``_FakeQuantGemm``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(
            self._fake_quantize(x, "input"),
            self._fake_quantize(self.weight, "weight"),
            self.bias,
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
        )


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


SPREADS = ("range", "mean_abs")  # RangeBatchNorm2d's spread estimates


def range_bn_constant(chunk_size: int) -> float:
    """C(n) of Banner et al.'s code: 0.5·0.35·(1 + sqrt(π·ln 4)) / sqrt(2·ln n)."""
    return 0.5 * 0.35 * (1 + math.sqrt(math.pi * math.log(4))) / math.sqrt(2 * math.log(chunk_size))


class RangeBatchNorm2d(nn.BatchNorm2d):
    """Range BatchNorm (Banner et al. 2018): normalise by C(n)·range instead of the std.

    Per channel the B·H·W centred values are split into ``num_chunks`` chunks; range = mean of
    chunk maxima − mean of chunk minima; y = (x − μ)/(C(n)·range + eps)·γ + β, n = chunk size.
    ``constant`` replaces C(n) when given; ``constant_scale`` multiplies it (C(n) assumes
    independent Gaussian values: on a network's activations C(n)·range is off by a factor,
    docs/RESULTS.md, issue 15). ``spread="mean_abs"`` normalises by c·mean|x − μ| instead,
    c = sqrt(π/2) (σ for Gaussian values; ``constant`` and ``constant_scale`` apply to c):
    still no squares or square roots, but every value takes part in the spread and its
    gradient, where the range reads 2·K extremes per channel. The running "variance" stores
    the spread squared, so the state_dict keys and their meaning are those of
    ``nn.BatchNorm2d`` and BN weights load; ``momentum`` is torch's (the weight of the new
    batch).

    Optional ``input_spec`` fake-quantizes the input (straight-through), with the qparams of
    ``input_observer`` where given (e.g. ``RunningMinMax``: a MinMax spec's running range in
    eval, as the GEMM layers' inputs); ``grad_spec`` quantizes the gradient that reaches the
    normalisation (SBM runs both at 8 bits). ``fused_relu`` applies a ReLU to the output in
    the same pass (its backward mask is all the pair keeps besides the input); ``quantize_``
    sets it where a ReLU follows in a Sequential, whose ReLU then becomes a ``FusedReLU``
    pass-through. With both, the gradient is quantized after the ReLU's mask, where an unfused
    pair would quantize it: at the normalisation's output.
    """

    fused_relu: bool = False

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float = 0.1,
        affine: bool = True,
        *,
        num_chunks: int = 16,
        constant: float | None = None,
        constant_scale: float = 1.0,
        spread: str = "range",
        input_spec: QuantSpec | None = None,
        grad_spec: QuantSpec | None = None,
        input_observer: Observer | None = None,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        check_int("RangeBatchNorm2d.num_chunks", num_chunks, QuantSpecError, low=1)
        if constant is not None and not (matches(constant, float) and 0 < constant < math.inf):
            refuse(
                "RangeBatchNorm2d.constant", constant, "a finite number > 0 or None", QuantSpecError
            )
        if not (matches(constant_scale, float) and 0 < constant_scale < math.inf):
            refuse(
                "RangeBatchNorm2d.constant_scale",
                constant_scale,
                "a finite number > 0",
                QuantSpecError,
            )
        if spread not in SPREADS:
            refuse("RangeBatchNorm2d.spread", spread, f"one of {SPREADS}", QuantSpecError)
        for name, spec in (("input_spec", input_spec), ("grad_spec", grad_spec)):
            check_type(f"RangeBatchNorm2d.{name}", spec, QuantSpec | None, QuantSpecError)
        check_type(
            "RangeBatchNorm2d.input_observer", input_observer, Observer | None, QuantSpecError
        )
        super().__init__(num_features, eps, momentum, affine, True, device=device, dtype=dtype)
        self.num_chunks = num_chunks
        self.constant = constant
        self.constant_scale = float(constant_scale)
        self.spread = spread
        self.input_spec = input_spec
        self.grad_spec = grad_spec
        # State_dict keys as a GEMM layer's: observers.input.*
        self.observers = nn.ModuleDict({} if input_observer is None else {"input": input_observer})

    @classmethod
    def from_batchnorm(
        cls, bn: nn.BatchNorm2d, momentum: float | None = None, **kwargs: Any
    ) -> RangeBatchNorm2d:
        """A RangeBatchNorm2d sharing ``bn``'s parameters and buffers (``momentum``: None
        keeps ``bn``'s, torch's 0.1 where ``bn`` has none)."""
        if momentum is None:
            momentum = bn.momentum if bn.momentum is not None else 0.1
        new = cls(
            bn.num_features,
            bn.eps,
            momentum,
            bn.affine,
            device=bn.running_mean.device,
            **kwargs,
        )
        new.weight, new.bias = bn.weight, bn.bias
        new.running_mean, new.running_var = bn.running_mean, bn.running_var
        new.num_batches_tracked = bn.num_batches_tracked
        return new.train(bn.training)

    def _chunks(self, x: torch.Tensor) -> int:
        per_channel = x[:, 0].numel()
        if per_channel < 2:
            raise ValueError("RangeBatchNorm2d needs at least 2 values per channel in training")
        return min(self.num_chunks, per_channel // 2)

    def _batch_range(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Per-channel mean, chunked range and chunk size of a float32 (N, C, H, W) batch.

        The authors' chunks split each channel's B·H·W values, laid out sample by sample, into
        ``num_chunks`` equal runs; when the batch divides evenly a chunk is a group of whole
        samples, so the range reads x in place. The range is shift invariant, so centring by μ
        is not needed for it. Differentiable torch ops: the plain definition that training's
        fused ``_RangeNorm`` is tested against.
        """
        batch, channels = x.shape[:2]
        chunks = self._chunks(x)
        chunk_size = x[:, 0].numel() // chunks
        mean = x.mean(dim=(0, 2, 3))
        if batch % chunks == 0:
            pieces = x.reshape(chunks, batch // chunks, channels, -1)  # (chunks, B/chunks, C, HW)
            highs, lows = pieces.amax(dim=(1, 3)), pieces.amin(dim=(1, 3))  # (chunks, C)
            return mean, highs.mean(0) - lows.mean(0), chunk_size
        flat = x.transpose(0, 1).reshape(channels, -1)[:, : chunks * chunk_size]  # (C, B·H·W)
        pieces = flat.reshape(channels, chunks, chunk_size)
        return mean, pieces.amax(2).mean(1) - pieces.amin(2).mean(1), chunk_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(
                f"RangeBatchNorm2d expects (N, C, H, W) input, got shape {tuple(x.shape)}"
            )
        if self.input_spec is not None:
            qparams = None
            if "input" in self.observers:
                qparams = self.observers["input"].qparams(x, self.input_spec)
            x = quantize(x, self.input_spec, qparams=qparams)
        if self.training:
            x = x.float()  # statistics in float32 whatever the input dtype (autocast: bf16/fp16)
            chunks = self._chunks(x)  # also checks there are 2 values per channel
            if self.spread == "range":
                constant = self.constant or range_bn_constant(x[:, 0].numel() // chunks)
                norm, args = _RangeNorm, (chunks,)
            else:
                constant = self.constant or math.sqrt(math.pi / 2)
                norm, args = _MeanAbsNorm, ()
            y, mean, spread = norm.apply(
                x,
                self.weight,
                self.bias,
                *args,
                constant * self.constant_scale,
                self.eps,
                self.fused_relu,
                self.grad_spec,
            )
            with torch.no_grad():
                self.num_batches_tracked += 1
                self.running_mean.lerp_(mean.detach(), self.momentum)
                self.running_var.lerp_(spread.detach() ** 2, self.momentum)
            return y
        spread = self.running_var.sqrt()
        y = _affine(x, self.running_mean, spread, self.weight, self.bias, self.eps)
        if self.fused_relu:
            y = torch.relu(y)
        return quantize_grad(y, self.grad_spec)


def _affine_params(mean, spread, weight, bias, eps):
    """Per-channel (scale, shift) with (x − μ)/(spread + eps)·γ + β = x·scale + shift."""
    scale = 1.0 / (spread + eps)
    if weight is not None:
        scale = scale * weight
    shift = -mean * scale if bias is None else bias - mean * scale
    return scale, shift


def _affine(x, mean, spread, weight, bias, eps):
    """(x − μ)/(spread + eps)·γ + β per channel, as one multiply-add over x (autograd)."""
    scale, shift = _affine_params(mean, spread, weight, bias, eps)
    return torch.addcmul(shift[None, :, None, None], x, scale[None, :, None, None])


class _RangeNorm(torch.autograd.Function):
    """Range BN's training forward and backward (x: float32 (B, C, H, W)) on the kernel
    backend's ``range_bn_stats`` / ``channel_affine`` / ``range_bn_backward``: one read of x for
    all statistics, one pass for y; backward one read of g and x, one pass for grad_x.

    Chunks as the authors': each channel's B·H·W values, sample by sample, cut into K runs of
    n = ⌊B·H·W/K⌋ (a run may split a sample; the remainder is in no run but in the mean).
    y = (x − μ)·s·γ + β with s = 1/(C(n)·r + eps), r = mean_k max_k − mean_k min_k. Backward:
    ∂L/∂μ spreads evenly over the channel; ∂L/∂r = −C·γ·s²·Σg·(x − μ) goes to each run's max
    (+1/K) and min (−1/K) position, found in the forward. Where a run's extreme is tied, its
    first position takes it: a valid subgradient (autograd's amax would split it evenly).
    ``grad_spec`` quantizes the gradient of the normalisation's output (after a fused ReLU's
    mask) before it enters the backward.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, chunks, constant, eps, relu, grad_spec):  # type: ignore[override]
        batch, channels = x.shape[:2]
        x3 = x.reshape(batch, channels, -1)
        impl = kernels.implementation(x.device)
        sums, rest, highs, high_index, lows, low_index = impl.range_bn_stats(x3, chunks)
        c = constant
        mean = ((sums.sum(0) + rest) / x3[:, 0].numel()).float()
        spread = (highs.mean(0) - lows.mean(0)) * c
        scale, shift = _affine_params(mean, spread, weight, bias, eps)
        if relu:  # a fused ReLU: y and its backward mask in the one pass
            y, zeroed = impl.channel_affine_relu(x, scale, shift)
        else:
            y, zeroed = impl.channel_affine(x, scale, shift), None
        ctx.save_for_backward(x, weight, high_index, low_index, mean, spread, zeroed)
        ctx.constant, ctx.eps, ctx.grad_spec = c, eps, grad_spec
        ctx.mark_non_differentiable(mean, spread)
        return y, mean, spread

    @staticmethod
    def backward(ctx, grad, _grad_mean, _grad_spread):  # type: ignore[override]
        x, weight, high_index, low_index, mean, spread, zeroed = ctx.saved_tensors
        s = 1.0 / (spread + ctx.eps)
        gamma = weight if weight is not None else torch.ones_like(s)
        batch, channels = x.shape[:2]
        impl = kernels.implementation(x.device)
        grad, zeroed = _incoming_grad(grad, zeroed, ctx.grad_spec)
        grad_x, grad_gamma, grad_beta = impl.range_bn_backward(
            grad.reshape(batch, channels, -1),
            x.reshape(batch, channels, -1),
            mean,
            s,
            gamma.detach().float(),
            ctx.constant,
            high_index,
            low_index,
            zeroed,
        )
        grads_affine = (grad_gamma, grad_beta) if weight is not None else (None, None)
        return grad_x.view(x.shape), *grads_affine, None, None, None, None, None


def _incoming_grad(
    grad: torch.Tensor, zeroed: torch.Tensor | None, grad_spec: QuantSpec | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The gradient a normalisation's backward starts from, float32: with ``grad_spec``, a
    fused ReLU's mask applied first (the gradient the normalisation receives), then
    quantized; the mask still to apply (None once applied)."""
    grad = grad.float()
    if grad_spec is None:
        return grad, zeroed
    if zeroed is not None:
        grad = kernels.implementation(grad.device).masked_zero(grad, zeroed)
    return quantize(grad, grad_spec), None


class _MeanAbsNorm(torch.autograd.Function):
    """The ``spread="mean_abs"`` normalisation's training forward and backward (x: float32
    (B, C, H, W)): y = (x − μ)·s·γ + β, s = 1/(c·m + eps), m = mean|x − μ| per channel.

    Backward, with n values per channel, g the incoming gradient and ∂L/∂m = −c·γ·s²·Σg·(x − μ):
    grad_x = γs·(g − Σg/n) + ∂L/∂m/n·(sign(x − μ) − Σsign/n) (the second term is m's own
    derivative with μ's through it); grad_gamma = s·Σg·(x − μ), grad_beta = Σg.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, constant, eps, relu, grad_spec):  # type: ignore[override]
        impl = kernels.implementation(x.device)
        mean = x.mean(dim=(0, 2, 3))
        spread = (x - mean.view(1, -1, 1, 1)).abs_().mean(dim=(0, 2, 3)) * constant
        scale, shift = _affine_params(mean, spread, weight, bias, eps)
        if relu:
            y, zeroed = impl.channel_affine_relu(x, scale, shift)
        else:
            y, zeroed = impl.channel_affine(x, scale, shift), None
        ctx.save_for_backward(x, weight, mean, spread, zeroed)
        ctx.constant, ctx.eps, ctx.grad_spec = constant, eps, grad_spec
        ctx.mark_non_differentiable(mean, spread)
        return y, mean, spread

    @staticmethod
    def backward(ctx, grad, _grad_mean, _grad_spread):  # type: ignore[override]
        x, weight, mean, spread, zeroed = ctx.saved_tensors
        grad, zeroed = _incoming_grad(grad, zeroed, ctx.grad_spec)
        if zeroed is not None:
            grad = kernels.implementation(grad.device).masked_zero(grad, zeroed)
        dims, shape = (0, 2, 3), (1, -1, 1, 1)
        n = x[:, 0].numel()
        s = 1.0 / (spread + ctx.eps)
        gamma = weight.detach().float() if weight is not None else torch.ones_like(s)
        centred = x - mean.view(shape)
        sum_g = grad.sum(dim=dims, dtype=torch.float64)
        sum_gx = (grad * centred).sum(dim=dims, dtype=torch.float64)
        sign = centred.sign_()
        sum_sign = sign.sum(dim=dims, dtype=torch.float64)
        slope = (gamma * s).double()
        grad_m = -ctx.constant * slope * s.double() * sum_gx
        grad_x = grad * slope.float().view(shape) + (-slope * sum_g / n).float().view(shape)
        grad_x += (sign - (sum_sign / n).float().view(shape)) * (grad_m / n).float().view(shape)
        affine = (
            ((sum_gx * s.double()).float(), sum_g.float()) if weight is not None else (None, None)
        )
        return grad_x, *affine, None, None, None, None


# ---- compact saved activations -------------------------------------------------------------


class CompactReLU(nn.ReLU):
    """``nn.ReLU`` that keeps a 1-byte mask for backward instead of its float32 output.

    The gradient is torch's (``threshold_backward``: zero where the output is ≤ 0, passed
    through elsewhere, NaN outputs included), so training is bit-identical; only the memory held
    for backward changes: 1 byte per value instead of 4, and the output itself is no longer
    kept alive by this layer (a following quantized GEMM keeps int8 levels of it).
    """

    @classmethod
    def from_relu(cls, relu: nn.ReLU) -> CompactReLU:
        return cls(inplace=relu.inplace).train(relu.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (torch.is_grad_enabled() and x.requires_grad):
            return torch.relu_(x) if self.inplace else torch.relu(x)
        return _MaskedReLU.apply(x, self.inplace)


class _MaskedReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, inplace):  # type: ignore[override]
        y = torch.relu_(x) if inplace else torch.relu(x)
        if inplace:
            ctx.mark_dirty(x)
        # Where threshold_backward zeroes the gradient: [y ≤ 0], one byte per value.
        ctx.save_for_backward(kernels.implementation(y.device).zero_mask(y))
        return y

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        (zeroed,) = ctx.saved_tensors
        return kernels.implementation(grad.device).masked_zero(grad, zeroed), None


class FusedReLU(nn.ReLU):
    """The place of a ReLU that runs inside the preceding ``RangeBatchNorm2d``
    (``fused_relu=True``): a pass-through. ``dequantize_`` turns it back into ``nn.ReLU``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def fuse_range_bn_relu(model: nn.Module) -> int:
    """In every ``nn.Sequential`` of ``model``, let each ``RangeBatchNorm2d`` directly
    followed by a ReLU apply it: set ``fused_relu`` and put a ``FusedReLU``
    in the ReLU's place. Returns the number of pairs fused. The same results, one pass and one
    saved float tensor fewer per pair."""
    fused = 0
    for sequential in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
        names = list(sequential._modules)
        for first, second in zip(names, names[1:], strict=False):
            bn, relu = sequential._modules[first], sequential._modules[second]
            if (
                isinstance(bn, RangeBatchNorm2d)
                and not bn.fused_relu
                and type(relu) in (nn.ReLU, CompactReLU)
            ):
                bn.fused_relu = True
                sequential._modules[second] = FusedReLU(relu.inplace).train(relu.training)
                fused += 1
    return fused


class CompactMaxPool2d(nn.MaxPool2d):
    """``nn.MaxPool2d`` that keeps only where each maximum was for backward, not its input.

    The common 2×2, stride-2 pool (no padding or dilation) of a contiguous or channels_last
    input runs on the kernel backend's ``max_pool2x2``: each maximum's position in its window
    is kept as one byte (torch keeps an int64 index and the input). Other pools run torch's own
    ops (``max_pool2d_with_indices`` and its backward) and keep the int64 indices only. Either
    way results and gradients are torch's, bit for bit (ties to the first maximum, NaN
    propagated).
    """

    @classmethod
    def from_maxpool(cls, pool: nn.MaxPool2d) -> CompactMaxPool2d:
        if pool.return_indices:
            raise ValueError("CompactMaxPool2d: a pool that returns its indices stays as it is")
        new = cls(pool.kernel_size, pool.stride, pool.padding, pool.dilation, False, pool.ceil_mode)
        return new.train(pool.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (torch.is_grad_enabled() and x.requires_grad) or x.dim() != 4:
            return super().forward(x)
        pair = nn.modules.utils._pair
        stride = pair(self.stride if self.stride is not None else self.kernel_size)
        args = (pair(self.kernel_size), stride, pair(self.padding), pair(self.dilation))
        height, width = x.shape[-2:]
        if (
            args == ((2, 2), (2, 2), (0, 0), (1, 1))
            and (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last))
            and min(height, width) >= 2
            and not (self.ceil_mode and (height % 2 or width % 2))
        ):
            return _WindowMaxPool.apply(x)
        return _IndexMaxPool.apply(x, args, self.ceil_mode)


class _WindowMaxPool(torch.autograd.Function):
    """The 2×2, stride-2 max pool on the kernel backend: one byte per output kept."""

    @staticmethod
    def forward(ctx, x):  # type: ignore[override]
        y, where = kernels.implementation(x.device).max_pool2x2(x)
        ctx.save_for_backward(where)
        ctx.size = tuple(x.shape[-2:])
        return y

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        (where,) = ctx.saved_tensors
        return kernels.implementation(grad.device).max_pool2x2_backward(grad, where, *ctx.size)


class _IndexMaxPool(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, args, ceil_mode):  # type: ignore[override]
        y, indices = torch.ops.aten.max_pool2d_with_indices(x, *args, ceil_mode)
        ctx.save_for_backward(indices)
        ctx.args, ctx.ceil_mode = args, ceil_mode
        ctx.shape, ctx.dtype, ctx.device = x.shape, x.dtype, x.device
        ctx.channels_last = x.is_contiguous(memory_format=torch.channels_last) and not (
            x.is_contiguous()
        )
        return y

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        (indices,) = ctx.saved_tensors
        # The backward op reads only the input's shape and layout: an unwritten stand-in.
        layout = torch.channels_last if ctx.channels_last else torch.contiguous_format
        stand_in = torch.empty(ctx.shape, dtype=ctx.dtype, device=ctx.device, memory_format=layout)
        grad_x = torch.ops.aten.max_pool2d_with_indices_backward(
            grad, stand_in, *ctx.args, ctx.ceil_mode, indices
        )
        return grad_x, None, None
