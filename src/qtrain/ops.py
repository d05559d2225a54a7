"""Quantized ops: linear and conv2d autograd functions with a spec per GEMM role.

A layer's training step runs three products (shapes for linear, x: (N, in), W: (out, in)):
  forward      y   = x̂ · Ŵᵀ            operands: input spec × weight spec
  grad-input   g_x = ĝ_in · Ŵ          operands: grad-input spec (layer gradient g_l) × weight
  grad-weight  g_W = ĝ_wᵀ · x̂          operands: grad-weight spec (a copy of g_l) × input
Gradient bifurcation (SBM) is grad_input_spec ≠ grad_weight_spec. A None spec is full precision.

>>> import torch
>>> from qtrain import QuantSpec, formats
>>> from qtrain.ops import GemmConfig, quantized_linear
>>> cfg = GemmConfig(input_spec=QuantSpec(formats.INT8), weight_spec=QuantSpec(formats.INT8))
>>> quantized_linear(torch.randn(2, 4), torch.randn(3, 4), None, cfg).shape
torch.Size([2, 3])
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import torch
import torch.nn.functional as F

from qtrain import kernels
from qtrain.configs import Config
from qtrain.formats import Int
from qtrain.observers import Observer
from qtrain.quantizer import (
    MinMax,
    QParams,
    QuantSpec,
    QuantSpecError,
    Rounding,
    _check_finite,
    _check_qparams,
    _CheckedQParams,
    _draw_seed,
    _finish,
    _finite_only,
    _observe_view,
    _observed_qparams,
    _qparams_of_view,
    canonical_view,
    compute_qparams,
    fake_quantize_with_mask,
    needs_clip_mask,
)
from qtrain.validation import check_int

ROLES = ("forward", "grad_input", "grad_weight")
PRODUCTS = ("float", "int8", "int8-twin", "int8-real")  # GemmConfig.products
SPEC_FIELDS = ("input_spec", "weight_spec", "grad_input_spec", "grad_weight_spec")


@dataclasses.dataclass(frozen=True)
class Precision(Config):
    """Bit-widths a precision schedule sets on a layer (CPT, FracTrain); None keeps the
    configured bits. Only integer specs change; an operand without a spec stays full precision.

    Args:
        forward: the forward product's operands, input and weight (``weight`` overrides).
        backward: the layer gradient g_l for the grad-input product.
        weight: the weight alone (e.g. DFQ's 4-bit weights under varying activation bits).
        grad_weight: the copy of g_l for the grad-weight product (None: ``backward``'s).

    >>> Precision(forward=4, backward=8).field_bits()
    {'input_spec': 4, 'weight_spec': 4, 'grad_input_spec': 8, 'grad_weight_spec': 8}
    """

    forward: int | None = None
    backward: int | None = None
    weight: int | None = None
    grad_weight: int | None = None

    error: ClassVar[type[Exception]] = QuantSpecError

    def validate(self) -> None:
        for field in ("forward", "backward", "weight", "grad_weight"):
            value = getattr(self, field)
            if value is not None:
                check_int(f"Precision.{field}", value, QuantSpecError, low=1, high=16)

    def field_bits(self) -> dict[str, int | None]:
        """Bits per GemmConfig spec field (None: unchanged)."""
        weight = self.weight if self.weight is not None else self.forward
        grad_weight = self.grad_weight if self.grad_weight is not None else self.backward
        return dict(
            zip(SPEC_FIELDS, (self.forward, weight, self.backward, grad_weight), strict=True)
        )


@dataclasses.dataclass(frozen=True)
class GemmConfig(Config):
    """Specs for the three products of one layer, and how the saved input is stored.

    Args:
        input_spec: quantization of the layer input (forward and grad-weight operand).
        weight_spec: quantization of the weight (forward and grad-input operand).
        grad_input_spec: quantization of g_l for the grad-input product.
        grad_weight_spec: quantization of the copy of g_l for the grad-weight product.
        save_quantized_input: keep the quantized input for backward as integer levels + scale
            (1 byte per value for ≤ 8-bit integer input specs) instead of float32.
        products: how the products run (``qtrain.int_products``): ``float`` — on the
            fake-quantized floats (the emulation); ``int8`` — each product whose operands are
            integer levels with scales constant along its reduction as exact int8 products
            (levels of 9–16 bits as two int8 limbs), on ``torch._int_mm`` where the device has
            fast int8 units (CUDA, AMX/VNNI CPUs), else their exact twin; ``int8-twin`` /
            ``int8-real``: either route forced. The integer routes equal each other bit for
            bit; they differ from ``float`` in the last bits (float32 sums round, integer ones
            do not).
    """

    input_spec: QuantSpec | None = None
    weight_spec: QuantSpec | None = None
    grad_input_spec: QuantSpec | None = None
    grad_weight_spec: QuantSpec | None = None
    save_quantized_input: bool = False
    products: str = "float"

    error: ClassVar[type[Exception]] = QuantSpecError

    def validate(self) -> None:
        if self.products not in PRODUCTS:
            raise QuantSpecError(
                f"GemmConfig.products must be one of {', '.join(PRODUCTS)}; got {self.products!r}"
            )
        if self.save_quantized_input:
            spec = self.input_spec
            if spec is None or spec.int_format is None or spec.int_format.bits > 8:
                raise QuantSpecError(
                    "GemmConfig.save_quantized_input needs an integer input_spec of <= 8 bits"
                )
            if spec.nonfinite == "propagate":
                raise QuantSpecError(
                    "GemmConfig.save_quantized_input cannot keep NaN/inf in integer levels: "
                    "use an input_spec with nonfinite='error'"
                )

    def with_specs(self, **specs: QuantSpec | None) -> GemmConfig:
        """The same config with some specs replaced; integer levels are saved for backward
        only while the input spec allows it (an integer format of <= 8 bits)."""
        new = {field: specs.get(field, getattr(self, field)) for field in SPEC_FIELDS}
        spec = new["input_spec"]
        save = self.save_quantized_input and (
            spec is not None and spec.int_format is not None and spec.int_format.bits <= 8
        )
        return dataclasses.replace(self, **new, save_quantized_input=save)

    def with_precision(self, precision: Precision | None) -> GemmConfig:
        """Integer specs at the bit-widths ``precision`` sets (the rest unchanged)."""
        if precision is None:
            return self
        specs = {}
        for field, bits in precision.field_bits().items():
            spec = getattr(self, field)
            if bits is not None and spec is not None and isinstance(spec.format, Int):
                specs[field] = spec.with_bits(bits)
        return self.with_specs(**specs) if specs else self

    def with_floor(self, floor: dict[str, float]) -> GemmConfig:
        """No operand below its floor bits: a narrower integer spec is widened to the floor;
        a floor above 16 bits, or above a non-integer spec's bits, means full precision."""
        specs: dict[str, QuantSpec | None] = {}
        for field, bits in floor.items():
            spec = getattr(self, field)
            if spec is None or spec.bits >= bits:
                continue
            widen = isinstance(spec.format, Int) and bits <= 16
            specs[field] = spec.with_bits(int(bits)) if widen else None
        return self.with_specs(**specs) if specs else self

    def spec_bits(self) -> dict[str, float]:
        """Bits per spec field; ``math.inf`` for an operand at full precision."""
        return {
            field: math.inf if getattr(self, field) is None else getattr(self, field).bits
            for field in SPEC_FIELDS
        }

    def role_bits(self, float_bits: float = 32.0) -> dict[str, tuple[float, float]]:
        """Bits of the two operands of each product; an operand without a spec counts
        ``float_bits`` (32, or 16 under bf16/fp16 autocast)."""
        bits = {
            name: (float_bits if spec is None else spec.bits)
            for name, spec in (
                ("input", self.input_spec),
                ("weight", self.weight_spec),
                ("grad_input", self.grad_input_spec),
                ("grad_weight", self.grad_weight_spec),
            )
        }
        return {
            "forward": (bits["input"], bits["weight"]),
            "grad_input": (bits["grad_input"], bits["weight"]),
            "grad_weight": (bits["grad_weight"], bits["input"]),
        }


def raised_config(config: GemmConfig) -> GemmConfig | None:
    """One precision step up for every quantized operand of a layer; None if all are float.

    An integer spec doubles its bits (at most 16); a 16-bit integer, minifloat or block-float
    spec becomes full precision. Integer levels are saved for backward only up to 8 bits.

    Example:
        >>> from qtrain import QuantSpec, formats
        >>> spec = QuantSpec(formats.Int(4))
        >>> raised = raised_config(GemmConfig(spec, spec, QuantSpec(formats.FP8_E5M2)))
        >>> raised.input_spec.format.bits, raised.grad_input_spec
        (8, None)
    """
    if all(getattr(config, field) is None for field in SPEC_FIELDS):
        return None
    return config.with_specs(**{f: _raised_spec(getattr(config, f)) for f in SPEC_FIELDS})


def _raised_spec(spec: QuantSpec | None) -> QuantSpec | None:
    if spec is not None and isinstance(spec.format, Int) and spec.format.bits < 16:
        return spec.with_bits(min(16, 2 * spec.format.bits))
    return None


def _quantize_operand(
    x: torch.Tensor, spec: QuantSpec | None, qparams: QParams | None, want_mask: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    if spec is None or x.numel() == 0:
        return x, None
    return fake_quantize_with_mask(x, spec, qparams=qparams, want_mask=want_mask)


class _SavedInput:
    """The forward's quantized input kept for backward: float, or integer levels + canonical
    qparams with the STE mask packed 8 values per byte (about 1/4 of float32 in all).

    Only ``tensors()`` go through ``ctx.save_for_backward`` (so saved-tensor hooks see and may
    offload them); backward rebuilds the input and mask from what those hooks give back.
    """

    def __init__(
        self,
        x: torch.Tensor,
        spec: QuantSpec | None,
        qparams: QParams | None,
        quantized_storage: bool,
        want_mask: bool,
    ) -> None:
        self.quantized = quantized_storage and x.numel() > 0
        if not self.quantized:
            self.value, self.mask = _quantize_operand(x, spec, qparams, want_mask)
            return
        x3, self.restore = canonical_view(x, spec.granularity)
        want_mask = want_mask and needs_clip_mask(spec, qparams is not None)
        impl = kernels.implementation(x3.device)
        if qparams is None:
            qparams = _qparams_of_view(x, x3, spec)
        elif not isinstance(qparams, _CheckedQParams):
            # nonfinite='error' (GemmConfig ensures it). NaN and ±inf reach max|x|: one
            # read-only reduction instead of an isfinite pass.
            _check_finite(impl.absmax(x3), spec)
            _check_qparams(qparams, x3.shape[1], spec, "quantize")
        int_format = spec.int_format
        seed = _draw_seed(None) if spec.rounding is Rounding.STOCHASTIC else None
        # One pass: x̂ for the forward GEMM, and the levels (+ mask) that backward keeps.
        y3, mask, self.levels = impl.fake_quant_int_levels(
            x3,
            qparams.scale,
            qparams.zero_point,
            int_format.qmin,
            int_format.qmax,
            seed,
            want_mask,
            int_format.storage_dtype,
        )
        self.mask = None if mask is None else _pack_bits(mask)
        self.shape = x.shape
        self.spec = spec
        self.qparams = qparams
        self.dtype = x.dtype
        self.value = self.restore(_finish(y3, x3, qparams, spec, x.dtype)).to(x.dtype)

    def dequantize(self, levels: torch.Tensor) -> torch.Tensor:
        impl = kernels.implementation(levels.device)
        x3 = impl.dequant_int(levels, self.qparams.scale, self.qparams.zero_point)
        # As the forward: grid points past the largest value of x's dtype are held at it.
        return self.restore(_finish(x3, x3, self.qparams, self.spec, self.dtype)).to(self.dtype)

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """What backward needs: (input or levels, mask or packed mask)."""
        return (self.levels, self.mask) if self.quantized else (self.value, self.mask)

    def unpack(
        self, stored: torch.Tensor, mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The inverse of ``tensors()``: (the quantized input, the mask in the input's shape)."""
        if not self.quantized:
            return stored, mask
        if mask is not None:
            mask = self.restore(_unpack_bits(mask, self.shape.numel()))
        return self.dequantize(stored), mask


def _pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """A bool tensor as uint8, 8 values per byte (little-endian bit order)."""
    flat = mask.reshape(-1).to(torch.uint8)
    flat = F.pad(flat, (0, -flat.numel() % 8)).view(-1, 8)
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=mask.device)
    return (flat * weights).sum(1, dtype=torch.uint8)


def _unpack_bits(packed: torch.Tensor, numel: int) -> torch.Tensor:
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    return ((packed.unsqueeze(1) >> shifts) & 1).reshape(-1)[:numel].bool()


class _QuantizedGemm(torch.autograd.Function):
    """Shared forward/backward of quantized linear and conv2d; ``kind`` picks the products."""

    @staticmethod
    def forward(ctx, x, weight, bias, config, input_qparams, conv_args, observers):  # type: ignore[override]
        want_x_mask = ctx.needs_input_grad[0]
        integer = _integer_route(config, x, weight, conv_args)
        if input_qparams is None:
            input_qparams = _observed(observers, "input", x, config.input_spec)
        if integer is not None and integer.roles & {"forward", "grad_weight"}:
            input_qparams = _explicit_qparams(x, config.input_spec, input_qparams)
        saved = _SavedInput(
            x, config.input_spec, input_qparams, config.save_quantized_input, want_x_mask
        )
        w_qparams = _observed(observers, "weight", weight, config.weight_spec)
        if integer is not None and integer.roles & {"forward", "grad_input"}:
            w_qparams = _explicit_qparams(weight, config.weight_spec, w_qparams)
        w_q, w_mask = _quantize_operand(
            weight, config.weight_spec, w_qparams, ctx.needs_input_grad[1]
        )
        if integer is not None:
            integer.qparams = {"input": input_qparams, "weight": w_qparams}
        if integer is not None and "forward" in integer.roles:
            y = integer.forward(saved.value, w_q, bias, conv_args)
            if y._base is not None:  # a view of the product matrix: return a tensor of its own
                y = y.clone()  # (autograd forbids in-place ops on a custom Function's views)
        elif conv_args is None:
            y = F.linear(saved.value, w_q, bias)
        else:
            y = F.conv2d(saved.value, w_q, bias, *conv_args)
        ctx.integer = integer
        ctx.config = config
        ctx.observers = observers
        ctx.conv_args = conv_args
        ctx.has_bias = bias is not None
        stored, x_mask = saved.tensors()
        ctx.save_for_backward(stored, w_q, x_mask, w_mask)
        # Keep only the metadata: the float copy and the levels are dropped from the object.
        saved.value = saved.levels = saved.mask = None
        ctx.saved_input = saved
        return y

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        stored, w_q, x_mask, w_mask = ctx.saved_tensors
        x_q, x_mask = ctx.saved_input.unpack(stored, x_mask)
        config: GemmConfig = ctx.config
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_x = grad_w = grad_b = None
        integer = ctx.integer
        if integer is not None and grad_out.dtype == torch.float32:
            observers, qparams = ctx.observers, integer.qparams  # filled with the copies' qparams
            g_in, g_w = _gradient_copies(grad_out, config, need_x, need_w, observers, qparams)
            grad_x, grad_w = integer.backward(g_in, g_w, x_q, w_q, ctx.conv_args)
            # Products the integer route does not take run on the floats below.
            g_in = None if grad_x is not None else g_in
            g_w = None if grad_w is not None else g_w
        else:
            g_in, g_w = _gradient_copies(grad_out, config, need_x, need_w, ctx.observers)
        if ctx.conv_args is None:
            float_x, float_w = _linear_grads(g_in, g_w, x_q, w_q)
        else:
            float_x, float_w = _conv_grads(g_in, g_w, x_q, w_q, ctx.conv_args)
        grad_x = float_x if grad_x is None else grad_x
        grad_w = float_w if grad_w is None else grad_w
        if ctx.has_bias and ctx.needs_input_grad[2]:
            # The bias gradient is a plain sum of the full-precision g_l, as torch computes it.
            if ctx.conv_args is None:
                grad_b = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
            else:
                grad_b = _conv_backward(grad_out, x_q, w_q, ctx.conv_args, [False, False, True])[2]
        if grad_x is not None and x_mask is not None:
            grad_x = grad_x * x_mask.to(grad_x.dtype)
        if grad_w is not None and w_mask is not None:
            grad_w = grad_w * w_mask.to(grad_w.dtype)
        return grad_x, grad_w, grad_b, None, None, None, None


def _integer_route(config: GemmConfig, x: torch.Tensor, weight: torch.Tensor, conv_args):
    """The call's ``int_products.IntegerRoute`` (None: every product on the floats)."""
    if config.products == "float":
        return None
    from qtrain import int_products  # it loads torch._dynamo (qtrain.lowp_products)

    return int_products.IntegerRoute.of(config, x, weight, conv_args)


def _observed(
    observers: dict[str, Observer] | None, role: str, x: torch.Tensor, spec: QuantSpec | None
) -> QParams | None:
    """The qparams the role's observer gives for x (None: no observer, or the spec's rule)."""
    if spec is None or observers is None or role not in observers:
        return None
    return observers[role].qparams(x, spec)


def _gradient_copies(
    grad: torch.Tensor,
    config: GemmConfig,
    need_x: bool,
    need_w: bool,
    observers: dict[str, Observer] | None = None,
    qparams: dict[str, QParams | None] | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """g_l quantized for the grad-input and the grad-weight products (None where not needed);
    stochastic-rounding seeds are drawn in that order, as two ``quantize`` calls draw them.

    With equal specs and no grad-weight observer, one quantized copy serves both products
    (no bifurcation), quantized with the grad-input observer's qparams if there is one.
    ``qparams``: a dict to fill with each copy's qparams by role (the integer products need
    them), which are then computed before quantizing — the same values either way."""
    input_spec, weight_spec = config.grad_input_spec, config.grad_weight_spec

    def quantize(role: str, spec: QuantSpec | None, given: QParams | None) -> torch.Tensor:
        if qparams is not None:
            given = qparams[role] = _explicit_qparams(grad, spec, given)
        return _quantize_operand(grad, spec, given, False)[0]

    one_copy = input_spec == weight_spec and (observers is None or "grad_weight" not in observers)
    if one_copy and observers is not None and "grad_input" in observers and (need_x or need_w):
        g = quantize("grad_input", input_spec, _observed(observers, "grad_input", grad, input_spec))
        if qparams is not None:
            qparams["grad_weight"] = qparams["grad_input"]
        return (g if need_x else None), (g if need_w else None)
    if observers is not None and ("grad_input" in observers or "grad_weight" in observers):
        g_in = g_w = None
        if need_x:
            given = _observed(observers, "grad_input", grad, input_spec)
            g_in = quantize("grad_input", input_spec, given)
        if need_w:
            given = _observed(observers, "grad_weight", grad, weight_spec)
            g_w = quantize("grad_weight", weight_spec, given)
        return g_in, g_w
    if need_x and need_w and one_copy:
        g_in = quantize("grad_input", input_spec, None)
        if qparams is not None:
            qparams["grad_weight"] = qparams["grad_input"]
        return g_in, g_in  # no bifurcation: both products use the one quantized copy of g_l
    if need_x and need_w and _same_range(input_spec, weight_spec) and grad.numel() > 0:
        return _copies_of_one_range(grad, (input_spec, weight_spec), qparams)
    g_in = quantize("grad_input", input_spec, None) if need_x else None
    g_w = quantize("grad_weight", weight_spec, None) if need_w else None
    return g_in, g_w


def _explicit_qparams(x: torch.Tensor, spec: QuantSpec | None, given: QParams | None):
    """The qparams that quantizing x with ``spec`` uses: ``given``, else the spec's rule's."""
    if given is not None or spec is None or spec.int_format is None or x.numel() == 0:
        return given
    return compute_qparams(x, spec)


def _same_range(first: QuantSpec | None, second: QuantSpec | None) -> bool:
    """Whether two specs take their qparams from the same observed range (MinMax rules of one
    granularity and non-finite policy; the bit-widths may differ)."""
    return (
        first is not None
        and second is not None
        and isinstance(first.scale, MinMax)
        and (first.granularity, first.scale, first.nonfinite)
        == (second.granularity, second.scale, second.nonfinite)
    )


def _copies_of_one_range(
    x: torch.Tensor,
    specs: tuple[QuantSpec, QuantSpec],
    qparams_out: dict[str, QParams | None] | None = None,
) -> tuple[torch.Tensor, ...]:
    """``fake_quantize_with_mask(x, spec)[0]`` for each of two specs, with x's range read once
    and one stochastic-rounding seed for both: SBM's 8-bit grad-input and 16-bit grad-weight
    copies of g_l (bifurcation). With the same rounding the two come from one pass over x."""
    first = specs[0]
    x3, restore = canonical_view(x, first.granularity)
    propagate = first.nonfinite == "propagate"
    low, high = _observe_view(x, _finite_only(x3) if propagate else x3, first.scale)
    qparams = _observed_qparams(low, high, first, [spec.int_format for spec in specs])
    if qparams_out is not None:
        qparams_out.update(zip(("grad_input", "grad_weight"), qparams, strict=True))
    impl = kernels.implementation(x3.device)
    stochastic = [spec.rounding is Rounding.STOCHASTIC for spec in specs]
    seed = _draw_seed(None) if any(stochastic) else None
    grids = [
        (q.scale, q.zero_point, s.int_format.qmin, s.int_format.qmax)
        for q, s in zip(qparams, specs, strict=True)
    ]
    if stochastic[0] == stochastic[1]:
        y3s = impl.fake_quant_int_pair(x3, *grids[0], *grids[1], seed)
    else:
        y3s = [
            impl.fake_quant_int(x3, *grid, seed if sr else None, False)[0]
            for grid, sr in zip(grids, stochastic, strict=True)
        ]
    return tuple(
        restore(_finish(y3, x3, q, spec, x.dtype)).to(x.dtype)
        for y3, q, spec in zip(y3s, qparams, specs, strict=True)
    )


def _linear_grads(g_in, g_w, x_q, w_q):
    # The products in the order torch's mm backward picks (a column-major operand gets the
    # transposed product), so that with every spec None the gradients are F.linear's bit for bit.
    # They run in the gradient's dtype: the forward output's, i.e. the autocast dtype if any.
    if g_in is None and g_w is None:
        return None, None
    dtype = (g_in if g_in is not None else g_w).dtype
    x2 = x_q.reshape(-1, x_q.shape[-1]).to(dtype)  # (N, in), as F.linear folds leading dims
    w_q = w_q.to(dtype)
    grad_x = grad_w = None
    if g_in is not None:
        g2 = g_in.reshape(-1, g_in.shape[-1])
        grad_x2 = w_q.t().mm(g2.t()).t() if _column_major(x2) else g2.mm(w_q)
        grad_x = grad_x2.reshape(x_q.shape)
    if g_w is not None:
        g2 = g_w.reshape(-1, g_w.shape[-1])
        grad_w = g2.t().mm(x2) if _column_major(w_q.t()) else x2.t().mm(g2).t()
    return grad_x, grad_w


def _column_major(matrix: torch.Tensor) -> bool:
    return matrix.stride(0) == 1 and matrix.stride(1) == matrix.shape[0]


def _conv_backward(grad, x_q, w_q, conv_args, output_mask):
    stride, padding, dilation, groups = conv_args
    # In the gradient's dtype, as _linear_grads (autocast does not cast convolution_backward).
    x_q, w_q = x_q.to(grad.dtype), w_q.to(grad.dtype)
    return torch.ops.aten.convolution_backward(
        grad,
        x_q,
        w_q,
        [w_q.shape[0]],
        stride,
        padding,
        dilation,
        False,
        [0, 0],
        groups,
        output_mask,
    )


def _conv_grads(g_in, g_w, x_q, w_q, conv_args):
    grad_x = grad_w = None
    if g_in is not None and g_in is g_w:
        grad_x, grad_w, _ = _conv_backward(g_in, x_q, w_q, conv_args, [True, True, False])
        return grad_x, grad_w
    if g_in is not None:
        grad_x = _conv_backward(g_in, x_q, w_q, conv_args, [True, False, False])[0]
    if g_w is not None:
        grad_w = _conv_backward(g_w, x_q, w_q, conv_args, [False, True, False])[1]
    return grad_x, grad_w


def quantized_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    config: GemmConfig,
    input_qparams: QParams | None = None,
    observers: dict[str, Observer] | None = None,
) -> torch.Tensor:
    """``F.linear`` with the products quantized as ``config`` says.

    ``observers`` maps a role (``input``, ``weight``, ``grad_input``, ``grad_weight``) to the
    ``Observer`` whose qparams quantize that operand (e.g. running ranges); ``input_qparams``
    fixes the input's qparams outright. With every spec None the result and gradients equal
    ``F.linear``'s.
    """
    return _QuantizedGemm.apply(x, weight, bias, config, input_qparams, None, observers)


def quantized_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    config: GemmConfig,
    stride: tuple[int, int] = (1, 1),
    padding: tuple[int, int] = (0, 0),
    dilation: tuple[int, int] = (1, 1),
    groups: int = 1,
    input_qparams: QParams | None = None,
    observers: dict[str, Observer] | None = None,
) -> torch.Tensor:
    """``F.conv2d`` (zero padding, any stride/dilation/groups) with quantized products;
    ``input_qparams`` and ``observers`` as in ``quantized_linear``."""
    if isinstance(padding, str):
        raise QuantSpecError("quantized_conv2d: padding must be numeric, got a string mode")
    conv_args = (list(_pair(stride)), list(_pair(padding)), list(_pair(dilation)), groups)
    return _QuantizedGemm.apply(x, weight, bias, config, input_qparams, conv_args, observers)


def _pair(value: int | tuple[int, ...] | list[int]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


class _GradQuant(torch.autograd.Function):
    """Identity forward; quantizes the gradient flowing back (e.g. Range BN's output grad)."""

    @staticmethod
    def forward(ctx, x, spec):  # type: ignore[override]
        ctx.spec = spec
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return fake_quantize_with_mask(grad, ctx.spec)[0], None


def quantize_grad(x: torch.Tensor, spec: QuantSpec | None) -> torch.Tensor:
    """Return x unchanged; its gradient is quantized with ``spec`` on the way back."""
    return x if spec is None else _GradQuant.apply(x, spec)
