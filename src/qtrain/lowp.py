"""Low-precision GEMM training: layers whose three products are real int8 or fp8 GEMMs.

``quantize_(model, Int8TrainingConfig())`` (or ``Float8TrainingConfig()``) swaps each
``nn.Linear`` for a ``LowPrecisionLinear`` and each ``nn.Conv2d`` for a ``LowPrecisionConv2d``
(``convolutions=False``: linears only), with the same state_dict keys. For x: (M, K) and
W: (N, K) the layer runs, each product as ``left · rightᵀ`` with the reduction dimension last
in both operands (a convolution: x is its im2col matrix, one receptive field per row, and W
its weight reshaped to (C_out, C·kh·kw)):

  forward      y   = x · Wᵀ        left x  (M, K), right W  (N, K)
  grad-input   g_x = g · W         left g  (M, N), right Wᵀ (K, N)
  grad-weight  g_W = gᵀ · x        left gᵀ (N, M), right xᵀ (K, M)

Each operand is quantized dynamically with an absmax scale per row (``PerToken()``: a row of
the left operand and a column of the product's right factor — the epilogue multiplies the
product by scale_left[:, None]·scale_right[None, :]) or per tensor (``PerTensor()``).

* int8: levels clamp(round(v·(1/s)), ±qmax) in int8 storage, qmax = 2^(bits−1) − 1, with
  stochastic rounding of the gradient operands as an option (the reference's counter hash,
  seeded per step).
* fp8: e4m3 for x and W, e5m2 for the gradient.

``emulate=True`` is the twin that runs anywhere: the same quantization, and float matmuls in
place of the low-precision GEMMs: equal to the int8 path bit for bit, to the fp8 path up to the
order of float32 sums. ``real_gemm_runs`` tells whether the real products run on a given device
and torch build. The quantization and the
products themselves — ``torch._int_mm`` or Triton's int8 matmul, ``torch._scaled_mm``, their
twins — live in ``qtrain.lowp_products``; this module builds the configs, the autograd function
and the layers on them.

The forward reads bit-widths from a buffer (``LowPrecisionLinear.set_precision`` fills it in
place), not from Python attributes, so a precision schedule (CPT, FracTrain) changes them under
``torch.compile`` without recompiling. The four operands — x, W, and the copies of g for the
grad-input and grad-weight products — have a bit-width each, as the four specs of
``qtrain.ops.GemmConfig`` do.

``LowPrecisionLinear`` follows the quantized-module protocol (``qtrain.protocol``), so the cost
meter, ``dequantize_``, precision schedules and the numerical guard treat it as they treat
``QLinear``: role bits are the int8 bit-widths (fp8: 8×8), weight storage is the deployed
int8/fp8 values plus their 32-bit scales.

Why this is not a backend of ``qtrain.ops``' quantized GEMM: that op fake-quantizes each
operand once, with one spec per operand whose scales follow the tensor's own axes, and feeds
the dequantized floats to ``F.linear``/``F.conv2d``; x̂ is kept for backward and serves the
forward and the grad-weight products alike, with the STE's clip masks. A real integer GEMM
needs each operand's scale constant along the reduction dimension of *its product*: x is
scaled per token (row) in the forward, but per feature (column of xᵀ) in the grad-weight
product, whose reduction runs over the tokens — so every product quantizes its operands afresh
(the layer keeps x in float for backward, as bf16 training does), which one spec per operand
cannot say. The operands also have to stay int8/fp8 levels laid out row-major with the
reduction dimension last, for ``torch._int_mm``'s int32 accumulator and the scale epilogue
after it, never dequantized floats; absmax scales never clip, so there is no mask; and a
convolution runs as products on its im2col matrix, not as a conv kernel. What is shared: the
protocol, ``quantize_``'s registry, the cost meter, the reference's counter hash for
stochastic rounding, and levels equal to ``quantize_int``'s with a ``PerToken()`` spec.

>>> import torch
>>> from torch import nn
>>> from qtrain.api import quantize_
>>> from qtrain.lowp import Int8TrainingConfig
>>> model = quantize_(nn.Sequential(nn.Linear(32, 16), nn.ReLU()), Int8TrainingConfig())
>>> model(torch.randn(20, 32)).shape
torch.Size([20, 16])
>>> sorted(model.state_dict())
['0.bias', '0.weight']
>>> model[0].role_bits()["grad_weight"]
(8, 8)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import torch
from torch import nn

from qtrain import im2col
from qtrain.configs import Config

# The products the layers run on.
from qtrain.lowp_products import (
    _FP8_FORWARD,
    _FP8_GRAD,
    _FP8_MAX,
    Int8Gemm,
    _product,
    _quantize,
    _real_gemm_runs,
    cpu_has_int8_dot,  # noqa: F401  (public here before the split)
    gradient_levels,
)
from qtrain.ops import SPEC_FIELDS, Precision
from qtrain.protocol import QuantizedWeight
from qtrain.quantizer import PerTensor, PerToken, QuantSpecError
from qtrain.validation import check_int, check_type

Scaling = PerTensor | PerToken


def _check_bits(what: str, bits: Any) -> None:
    check_int(what, bits, QuantSpecError, low=2, high=8)


@dataclasses.dataclass(frozen=True)
class Int8TrainingConfig(Config):
    """Forward, grad-input and grad-weight products of every ``nn.Linear`` as int8 GEMMs
    (a ``qtrain.configs.Config``: fields checked when built, ``to_dict``/``from_dict``).

    Args:
        bits: bit-width of x and W (levels within ±(2^(bits−1) − 1), stored as int8), 2..8.
        grad_bits: bit-width of the gradient operands, 2..8.
        stochastic_grad: round the gradient operands stochastically (unbiased).
        granularity: ``PerToken()`` — a scale per row of each operand — or ``PerTensor()``.
        forward / grad_input / grad_weight: which products run in int8 (the others run in the
            layer's compute dtype).
        gemm: ``Int8Gemm`` on CUDA; None picks TRITON where Triton runs, else INT_MM.
        emulate: the emulated twin (float matmuls, identical results).
        convolutions: ``quantize_`` swaps ``nn.Conv2d`` layers too (``LowPrecisionConv2d``),
            not only ``nn.Linear``.
    """

    error: ClassVar[type[Exception]] = QuantSpecError

    bits: int = 8
    grad_bits: int = 8
    stochastic_grad: bool = False
    granularity: Scaling = PerToken()
    forward: bool = True
    grad_input: bool = True
    grad_weight: bool = True
    gemm: Int8Gemm | None = None
    emulate: bool = False
    convolutions: bool = True

    def validate(self) -> None:
        _check_bits("Int8TrainingConfig.bits", self.bits)
        _check_bits("Int8TrainingConfig.grad_bits", self.grad_bits)


@dataclasses.dataclass(frozen=True)
class Float8TrainingConfig(Config):
    """Forward, grad-input and grad-weight products of every ``nn.Linear`` as fp8 GEMMs:
    e4m3 for x and W, e5m2 for the gradient (``torch._scaled_mm``; Hopper/Ada on CUDA).

    Args:
        granularity: ``PerTensor()`` (tensor-wise scales) or ``PerToken()`` (row-wise).
        forward / grad_input / grad_weight: which products run in fp8.
        emulate: the emulated twin (float32 matmuls of the dequantized operands).
        convolutions: ``quantize_`` swaps ``nn.Conv2d`` layers too (``LowPrecisionConv2d``).
    """

    error: ClassVar[type[Exception]] = QuantSpecError

    granularity: Scaling = PerTensor()
    forward: bool = True
    grad_input: bool = True
    grad_weight: bool = True
    emulate: bool = False
    convolutions: bool = True


LowPrecisionConfig = Int8TrainingConfig | Float8TrainingConfig


# ---- the plan: what each product does -------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Operand:
    """One operand's target: its dtype, the index of its bit-width's bound (``SPEC_FIELDS``
    order: x, W, g for grad-input, g for grad-weight), and whether it is a gradient (SR)."""

    dtype: torch.dtype
    bound: int
    grad: bool


@dataclasses.dataclass(frozen=True)
class _Plan:
    """A config resolved into what the autograd function needs (hashable, compile-constant)."""

    forward: tuple[_Operand, _Operand] | None
    grad_input: tuple[_Operand, _Operand] | None
    grad_weight: tuple[_Operand, _Operand] | None
    rowwise: bool
    stochastic_grad: bool
    emulate: bool
    int8_gemm: Int8Gemm | None

    @classmethod
    def of(cls, config: LowPrecisionConfig) -> _Plan:
        if isinstance(config, Int8TrainingConfig):
            forward_dtype = grad_dtype = torch.int8
            stochastic, gemm = config.stochastic_grad, config.gemm
        else:
            forward_dtype, grad_dtype = _FP8_FORWARD, _FP8_GRAD
            stochastic, gemm = False, None
        x, w = _Operand(forward_dtype, 0, False), _Operand(forward_dtype, 1, False)
        g_in, g_w = _Operand(grad_dtype, 2, True), _Operand(grad_dtype, 3, True)
        return cls(
            forward=(x, w) if config.forward else None,
            grad_input=(g_in, w) if config.grad_input else None,
            grad_weight=(g_w, x) if config.grad_weight else None,
            rowwise=isinstance(config.granularity, PerToken),
            stochastic_grad=stochastic,
            emulate=config.emulate,
            int8_gemm=gemm,
        )

    def products(self) -> dict[str, tuple[_Operand, _Operand] | None]:
        """Each product's (left, right) operands by role; None: it runs in floating point."""
        return {
            "forward": self.forward,
            "grad_input": self.grad_input,
            "grad_weight": self.grad_weight,
        }


def configured_bits(config: LowPrecisionConfig) -> dict[str, int]:
    """Bits of each operand by GemmConfig spec field (x, W, g for grad-input, g for
    grad-weight): int8 ``bits`` for x and W, ``grad_bits`` for g; 8 for every fp8 operand."""
    if isinstance(config, Int8TrainingConfig):
        bits = (config.bits, config.bits, config.grad_bits, config.grad_bits)
    else:
        bits = (8, 8, 8, 8)
    return dict(zip(SPEC_FIELDS, bits, strict=True))


def _bounds(config: LowPrecisionConfig, bits: dict[str, int]) -> list[float]:
    if isinstance(config, Int8TrainingConfig):
        return [2.0 ** (bits[field] - 1) - 1 for field in SPEC_FIELDS]
    return [_FP8_MAX[_FP8_FORWARD]] * 2 + [_FP8_MAX[_FP8_GRAD]] * 2


def initial_bounds(
    config: LowPrecisionConfig, device: torch.device | str | None = None
) -> torch.Tensor:
    """The (4,) float32 bounds of x, W and the two gradient copies (``SPEC_FIELDS`` order):
    qmax per bit-width for int8, the format's max value for fp8. A tensor, so that changing
    bit-widths does not recompile."""
    return torch.tensor(
        _bounds(config, configured_bits(config)), dtype=torch.float32, device=device
    )


def real_gemm_runs(config: LowPrecisionConfig, device: torch.device | str) -> bool:
    """Whether the config's real product (``torch._int_mm`` for int8, ``torch._scaled_mm``
    with its scaling for fp8) runs on ``device`` with this torch build: tried once on tiny
    operands per device. True on the CPU in torch 2.13; on CUDA, fp8 needs compute capability
    8.9+ (row-wise scales 9.0+).

    >>> real_gemm_runs(Int8TrainingConfig(), "cpu")
    True
    """
    fp8 = isinstance(config, Float8TrainingConfig)
    rowwise = isinstance(config.granularity, PerToken)
    return _real_gemm_runs(fp8, rowwise, str(torch.device(device)))


# ---- the autograd function --------------------------------------------------------------------


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype F.linear would compute in here: autocast's, or x's."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


def _matrix_backward(
    ctx, g2: torch.Tensor, x2: torch.Tensor, w2: torch.Tensor, bounds, seeds, group: int = 0
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(grad of x2, grad of w2) of y2 = x2·w2ᵀ for y2's gradient g2, each product as the plan
    says; None where autograd needs none. ``seeds``: (2, groups) per-product seeds or None."""
    plan: _Plan = ctx.plan
    grad_x = grad_w = None
    both = ctx.needs_input_grad[0] and ctx.needs_input_grad[1]
    g_levels = gradient_levels(g2, plan, bounds, both, seeds is not None)
    if ctx.needs_input_grad[0]:
        seed = None if seeds is None else seeds[0, group]
        levels = None if g_levels is None else g_levels[:2]
        grad_x = _product(
            g2, w2.t(), plan.grad_input, plan, bounds, seed, ctx.compute_dtype, levels_a=levels
        )
    if ctx.needs_input_grad[1]:
        seed = None if seeds is None else seeds[1, group]
        levels = None if g_levels is None else g_levels[2:]
        grad_w = _product(
            g2.t(), x2.t(), plan.grad_weight, plan, bounds, seed, ctx.compute_dtype, levels_a=levels
        )
    return grad_x, grad_w


def _save_for_backward(ctx, x, weight, bias, plan: _Plan, bounds, compute_dtype, groups=1):
    """What backward reads: x, W, the bounds, and one seed per gradient product and group
    (stochastic rounding only; drawn in the forward so that torch.manual_seed repeats a run)."""
    seeds = None
    if plan.stochastic_grad and (ctx.needs_input_grad[0] or ctx.needs_input_grad[1]):
        seeds = torch.randint(0, 2**62, (2, groups), device=x.device)
    ctx.save_for_backward(x, weight, bounds, seeds)
    ctx.plan, ctx.compute_dtype, ctx.has_bias = plan, compute_dtype, bias is not None


class _LowPrecisionLinear(torch.autograd.Function):
    """y = x·Wᵀ + b with each of the three products as the plan says (shapes: module docs),
    as a matrix (M, N): ``_apply`` gives it x's leading dims. A view made inside a Function
    cannot be modified in place (an in-place ReLU after the layer), one made after it can."""

    @staticmethod
    def forward(ctx, x, weight, bias, plan, bounds):  # type: ignore[override]
        compute_dtype = _compute_dtype(x)
        x2 = x.reshape(-1, x.shape[-1])
        y = _product(x2, weight, plan.forward, plan, bounds, None, compute_dtype, bias)
        _save_for_backward(ctx, x, weight, bias, plan, bounds, compute_dtype)
        return y

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        x, weight, bounds, seeds = ctx.saved_tensors
        g2 = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x, grad_w = _matrix_backward(
            ctx, g2, x.reshape(-1, x.shape[-1]), weight, bounds, seeds
        )
        if grad_x is not None:
            grad_x = grad_x.reshape(x.shape).to(x.dtype)
        if grad_w is not None:
            grad_w = grad_w.to(weight.dtype)
        grad_b = None
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g2.sum(0, dtype=torch.float32).to(weight.dtype)
        return grad_x, grad_w, grad_b, None, None


def low_precision_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    config: LowPrecisionConfig,
    bounds: torch.Tensor | None = None,
) -> torch.Tensor:
    """``F.linear`` whose forward, grad-input and grad-weight products run as ``config`` says.

    ``bounds``: the (4,) tensor of ``initial_bounds`` (a module keeps it as a buffer, so that
    bit-widths change in place); default: the config's.
    """
    if bounds is None:
        bounds = initial_bounds(config, x.device)
    return _apply(x, weight, bias, _Plan.of(config), bounds.to(torch.float32))


def _apply(x, weight, bias, plan: _Plan, bounds: torch.Tensor) -> torch.Tensor:
    y = _LowPrecisionLinear.apply(x, weight, bias, plan, bounds)
    return y.view(*x.shape[:-1], weight.shape[0])


# ---- the layers --------------------------------------------------------------------------------


class _LowPrecisionLayer(nn.Module):
    """What ``LowPrecisionLinear`` and ``LowPrecisionConv2d`` share: the config and its plan,
    the bit-widths in force (configured, scheduled, floored) in the ``bounds`` buffer, and the
    quantized-module protocol's answers. The weight's rows (W reshaped to (C_out, −1)) are the
    right operand of the forward product."""

    config: LowPrecisionConfig
    weight: nn.Parameter

    def _init_precision(self, config: LowPrecisionConfig, device) -> None:
        if not isinstance(config, Int8TrainingConfig | Float8TrainingConfig):
            raise QuantSpecError(
                f"config must be an Int8TrainingConfig or Float8TrainingConfig, got {config!r}"
            )
        self.config = config
        self.plan = _Plan.of(config)
        self._precision: Precision | None = None
        self._floor: dict[str, float] = {}
        # The bits in force per operand (SPEC_FIELDS). Forward reads them from the bounds
        # buffer, which torch.compile does not specialise on: changing them never recompiles.
        self._bits = configured_bits(config)
        # Not persistent: the state_dict stays the float layer's.
        self.register_buffer("bounds", initial_bounds(config, device), persistent=False)

    # ---- precision: configured, scheduled, floored ------------------------------------------
    def set_precision(self, precision: Precision | None) -> None:
        """The bit-widths a schedule sets this step (None: the configured ones), in place.

        int8: ``forward`` sets x and W, ``backward`` both gradient copies (``weight`` and
        ``grad_weight`` one operand each), 2..8 bits. fp8: only None (formats are fixed).
        """
        name = type(self).__name__
        check_type(f"{name}.precision", precision, Precision | None, QuantSpecError)
        if precision is not None:
            fields = ("forward", "backward", "weight", "grad_weight")
            given = {field: getattr(precision, field) for field in fields}
            given = {field: bits for field, bits in given.items() if bits is not None}
            if given and isinstance(self.config, Float8TrainingConfig):
                raise QuantSpecError(
                    f"{name} with a Float8TrainingConfig has fixed formats (e4m3 x and W, "
                    f"e5m2 gradients): a precision schedule cannot change its bits, got {precision}"
                )
            for field, bits in given.items():
                _check_bits(f"{name}: Precision.{field}", bits)
        self._precision = precision
        self._update_bits()

    def raise_floor(self) -> bool:
        """The guard's raise: every int8 operand goes to 8 bits and stays there, a floor under
        any schedule. False when all are at 8 bits already (int8 storage holds no more) and
        for fp8 (fixed formats)."""
        fields = self._int8_fields()
        if isinstance(self.config, Float8TrainingConfig) or all(
            self._bits[field] >= 8 for field in fields
        ):
            return False
        self._floor = {**self._floor, **dict.fromkeys(fields, 8.0)}
        self._update_bits()
        return True

    def floor(self) -> dict[str, float]:
        """Bits per operand (GemmConfig spec field) below which the guard keeps this layer."""
        return dict(self._floor)

    def set_floor(self, floor: dict[str, float]) -> None:
        for field, bits in floor.items():
            if field not in SPEC_FIELDS or not 0 <= bits <= 8:
                raise QuantSpecError(
                    f"{type(self).__name__}.set_floor: a floor is a spec field of "
                    f"{SPEC_FIELDS} with at most 8 bits (int8 storage), got {field!r}: {bits!r}"
                )
        self._floor = dict(floor)
        self._update_bits()

    def _int8_fields(self) -> list[str]:
        """The operands of the products that run in low precision, in SPEC_FIELDS order."""
        used = {op.bound for ops in self.plan.products().values() if ops is not None for op in ops}
        return [field for index, field in enumerate(SPEC_FIELDS) if index in used]

    def _update_bits(self) -> None:
        bits = configured_bits(self.config)
        if self._precision is not None:
            scheduled = self._precision.field_bits().items()
            bits.update({field: b for field, b in scheduled if b is not None})
        self._bits = {
            field: max(b, math.ceil(self._floor.get(field, 0))) for field, b in bits.items()
        }
        # Written on every call, changed or not: a trainer that rolls a faulty step back
        # restores buffers, this one included (an asynchronous copy, ~8 µs on the CPU).
        with torch.no_grad():
            self.bounds.copy_(torch.tensor(_bounds(self.config, self._bits)), non_blocking=True)

    # ---- what the cost meter and export ask -------------------------------------------------
    def role_bits(self, float_bits: float = 32.0) -> dict[str, tuple[float, float]]:
        """Bits of the two operands (left, right) of the forward, grad-input and grad-weight
        products: int8 bit-widths in force, 8 for fp8, ``float_bits`` for a product the
        config leaves in floating point."""
        bits = [self._bits[field] for field in SPEC_FIELDS]  # by bound index
        return {
            role: (float_bits, float_bits)
            if ops is None
            else (bits[ops[0].bound], bits[ops[1].bound])
            for role, ops in self.plan.products().items()
        }

    def sample_role_bits(self) -> None:
        return None  # every sample of a call runs at role_bits()

    def weight_storage_bits(self) -> int:
        """The weight as deployed for the forward product: its int8 levels at the weight's
        bits (fp8: 8 bits a value) plus 32-bit scales, one per output row (channel) with
        ``PerToken()``, one for the tensor with ``PerTensor()``; 32 bits a value when the
        forward product runs in floating point."""
        numel = self.weight.numel()
        if self.plan.forward is None:
            return 32 * numel
        scales = self.weight.shape[0] if self.plan.rowwise else 1
        return numel * self._bits["weight_spec"] + 32 * scales

    def quantized_weight(self) -> QuantizedWeight | None:
        """int8: W's levels exactly as the forward product quantizes them (nearest, absmax
        scale per output row/channel or per tensor, at the weight's bits in force), in W's
        shape, scale (C_out, 1, ...) or one value, zero point 0, signed. None for fp8 — its
        values are e4m3 floats times a scale, not integer levels with a zero point, which
        ``QuantizedWeight`` stands for — and when the forward product runs in floating point.
        A grouped convolution's levels are quantized per group exactly so: per output row
        they are the same; per tensor, one scale per group (shape (groups,) — which export
        refuses, as it refuses any layout other than per tensor or per channel)."""
        if isinstance(self.config, Float8TrainingConfig) or self.plan.forward is None:
            return None
        operand = self.plan.forward[1]
        groups = getattr(self, "groups", 1)
        w2 = self.weight.detach().reshape(self.weight.shape[0], -1)
        with torch.no_grad():
            bound = self.bounds[operand.bound].float()
            parts = [
                _quantize(w2[rows], operand, bound, None, self.plan)
                for rows in im2col.group_slices(w2.shape[0], groups)
            ]
        levels = torch.cat([q for q, _ in parts]).view(self.weight.shape)
        scale = torch.cat([s for _, s in parts])
        trailing = (1,) * (self.weight.dim() - 1)
        if self.plan.rowwise:
            scale = scale.view(-1, *trailing)
        elif groups == 1:
            scale = scale.view(())
        zero_point = torch.zeros(scale.shape, dtype=torch.int32, device=scale.device)
        return QuantizedWeight(levels, scale, zero_point, self._bits["weight_spec"], True)

    def _bits_repr(self) -> str:
        bits = "/".join(str(self._bits[field]) for field in SPEC_FIELDS)
        return f"config={self.config}, bits (x/W/g_in/g_W)={bits}"


class LowPrecisionLinear(_LowPrecisionLayer, nn.Linear):
    """``nn.Linear`` with int8 or fp8 GEMMs; the same parameters and state_dict keys.

    It follows the quantized-module protocol (``qtrain.protocol``), so the cost meter,
    ``dequantize_``, precision schedules and the numerical guard treat it as any quantized
    layer: ``role_bits`` reports the bits of the operands of each product that runs in int8
    (fp8: 8×8; a product the config leaves in floating point: ``float_bits`` × ``float_bits``);
    ``set_precision`` sets int8 bit-widths in place (``Precision.forward`` → x and W,
    ``backward`` → the gradient copies), never below the guard's floor (``raise_floor``: 8
    bits); fp8 formats are fixed.

    >>> layer = LowPrecisionLinear(64, 32, config=Float8TrainingConfig(emulate=True))
    >>> layer(torch.randn(4, 64)).shape
    torch.Size([4, 32])
    >>> layer = LowPrecisionLinear(64, 32, config=Int8TrainingConfig())
    >>> layer.set_precision(Precision(forward=4, backward=6))
    >>> layer.role_bits()
    {'forward': (4, 4), 'grad_input': (6, 4), 'grad_weight': (6, 4)}
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        config: LowPrecisionConfig,
    ) -> None:
        nn.Linear.__init__(self, in_features, out_features, bias, device, dtype)
        self._init_precision(config, device)

    @classmethod
    def from_linear(cls, linear: nn.Linear, config: LowPrecisionConfig) -> LowPrecisionLinear:
        """A LowPrecisionLinear sharing ``linear``'s parameters."""
        layer = cls(
            linear.in_features,
            linear.out_features,
            linear.bias is not None,
            device="meta",
            config=config,
        )
        layer.weight, layer.bias = linear.weight, linear.bias
        layer.bounds = initial_bounds(config, linear.weight.device)
        layer.train(linear.training)
        return layer

    def to_float(self) -> nn.Linear:
        """The plain ``nn.Linear`` with these parameters."""
        plain = nn.Linear(self.in_features, self.out_features, self.bias is not None, device="meta")
        plain.weight, plain.bias = self.weight, self.bias
        return plain.train(self.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _apply(x, self.weight, self.bias, self.plan, self.bounds.float())

    def extra_repr(self) -> str:
        return f"{nn.Linear.extra_repr(self)}, {self._bits_repr()}"


# The convolution layer and quantize_'s handler live in qtrain.lowp_conv, which builds on this
# module: imported last, once everything it takes from here is defined (a module import, so that
# importing qtrain.lowp_conv first works too), its public names served from here on first use.
from qtrain import lowp_conv as _lowp_conv  # noqa: E402


def __getattr__(name: str) -> Any:
    if name in ("LowPrecisionConv2d", "LOW_PRECISION_LAYERS"):
        return getattr(_lowp_conv, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
