"""The quantizer: how a tensor is mapped onto a format.

A ``QuantSpec`` is a format + a granularity (which values share a scale) + a scale rule (how
the scale is found) + a rounding mode (those value types are in ``qtrain.quantspec`` and
re-exported here). ``quantize`` fake-quantizes (returns x̂ in x's dtype,
straight-through gradient); ``quantize_int`` returns the integer levels with their scale and
zero point.

>>> import torch
>>> from qtrain import quantize, QuantSpec, PerChannel, Rounding, formats
>>> x = torch.randn(4, 16)
>>> spec = QuantSpec(formats.Int(8), granularity=PerChannel(0), rounding=Rounding.STOCHASTIC)
>>> y = quantize(x, spec, generator=torch.Generator().manual_seed(0))
>>> bool((y - x).abs().max() <= x.abs().amax(1).max() / 127)
True
"""

from __future__ import annotations

import dataclasses
import math
import struct
from collections.abc import Callable
from typing import Any

import torch

from qtrain import kernels
from qtrain.formats import Int, MiniFloat
from qtrain.quantspec import (  # noqa: F401  (re-exported: the spec types live there)
    _CLIPPING_RULES,
    AbsMax,
    AbsMean,
    Clip,
    Granularity,
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
    ScaleRule,
    _CheckedQParams,
)

# ---- canonical (O, C, I) view -----------------------------------------------------------------


def _scale_axis(x: torch.Tensor, granularity: Granularity) -> int:
    """The axis of x that ``granularity`` splits into scales (PerTensor: -1), once checked:
    x has a dimension, the axis is in range, a group size divides it."""
    if isinstance(granularity, PerTensor):
        return -1
    name = type(granularity).__name__
    if x.dim() == 0:
        raise QuantSpecError(f"{name} needs a tensor with at least one dimension")
    if isinstance(granularity, PerToken):
        return x.dim() - 1
    if not -x.dim() <= granularity.axis < x.dim():
        raise QuantSpecError(
            f"{name}.axis={granularity.axis} is out of range for a {x.dim()}-d tensor"
        )
    axis = granularity.axis % x.dim()
    if isinstance(granularity, PerGroup) and x.shape[axis] % granularity.group_size:
        raise QuantSpecError(
            f"PerGroup.group_size={granularity.group_size} must divide the size "
            f"{x.shape[axis]} of axis {granularity.axis}"
        )
    return axis


def canonical_view(
    x: torch.Tensor, granularity: Granularity
) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """A contiguous float32 (O, C, I) view of x (C = values sharing a scale's index) and the
    function that maps a same-shaped result back to x's shape.

    Per tensor, a dense x whose first dimension is outermost in memory (contiguous,
    channels_last, ...) is viewed in memory order, without a copy, and results come back with
    x's strides: a channels_last network stays channels_last. Stochastic rounding's stream
    follows that order (the canonical view's index), and each sample stays one run of it."""
    shape = x.shape
    axis = _scale_axis(x, granularity)
    if isinstance(granularity, PerTensor):
        if _memory_order_ok(x):
            stride = x.stride()
            flat = x.as_strided((1, 1, x.numel()), (x.numel(), x.numel(), 1))
            return _as_f32(flat), lambda y: y.contiguous().as_strided(shape, stride)
        x3 = x.reshape(1, 1, -1)
    elif isinstance(granularity, PerChannel):
        x3 = x.reshape(math.prod(shape[:axis]), shape[axis], -1)
    elif isinstance(granularity, PerToken):
        x3 = x.reshape(1, -1, shape[-1])
    elif axis != x.dim() - 1:
        moved = x.movedim(axis, -1)
        moved_shape = moved.shape
        x3 = moved.reshape(1, -1, granularity.group_size)
        return _as_f32(x3), lambda y: y.reshape(moved_shape).movedim(-1, axis)
    else:
        x3 = x.reshape(1, -1, granularity.group_size)
    return _as_f32(x3), lambda y: y.reshape(shape)


def _memory_order_ok(x: torch.Tensor) -> bool:
    """Whether x is dense, laid out otherwise than its default contiguous strides, with its
    first dimension outermost (so that a sample is one run of memory)."""
    if x.dim() < 2 or x.numel() == 0 or (x.is_contiguous() and 1 not in x.shape):
        return False  # (contiguous without size-1 dims: the default strides, a fast test)
    if x.stride() == _default_strides(x.shape):
        return False
    return kernels.is_dense(x) and (x.shape[0] == 1 or x.stride(0) * x.shape[0] == x.numel())


def _default_strides(shape: torch.Size) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


def _as_f32(x3: torch.Tensor) -> torch.Tensor:
    x32 = x3.to(torch.float32).contiguous()
    if x3.dtype.itemsize > 4 and bool((torch.isinf(x32) & torch.isfinite(x3)).any()):
        top = float(x3.abs().nan_to_num(0.0, 0.0, 0.0).max())
        raise QuantSpecError(
            f"quantize: x ({x3.dtype}) has finite values beyond float32's range (max |x| = "
            f"{top:.6g}); the quantizer computes in float32"
        )
    return x32


def qparams_shape(x: torch.Tensor, granularity: Granularity) -> tuple[int, ...]:
    """Shape of the scale/zero point ``quantize_int`` returns. It broadcasts against x, except
    for PerGroup(G, axis): x's shape with the group axis shrunk to size/G, which broadcasts as
    ``scale.unsqueeze(axis + 1)`` against ``x.unflatten(axis, (size // G, G))``."""
    axis = _scale_axis(x, granularity)
    if isinstance(granularity, PerTensor):
        return ()
    if isinstance(granularity, PerChannel):
        return (x.shape[axis],) + (1,) * (x.dim() - axis - 1)
    if isinstance(granularity, PerToken):
        return tuple(x.shape[:-1]) + (1,)
    shape = list(x.shape)
    shape[axis] //= granularity.group_size
    return tuple(shape)


def _qparams_layout(
    values: torch.Tensor, x: torch.Tensor, granularity: Granularity
) -> torch.Tensor:
    """A canonical (C,) scale or zero point laid out in ``qparams_shape``. The canonical view
    orders PerGroup channels with the group axis moved last, so move it back."""
    shape = qparams_shape(x, granularity)
    if not isinstance(granularity, PerGroup):
        return values.reshape(shape)
    axis = _scale_axis(x, granularity)
    moved = shape[:axis] + shape[axis + 1 :] + shape[axis : axis + 1]
    return values.reshape(moved).movedim(-1, axis)


# ---- scales -------------------------------------------------------------------------------


def _draw_seed(generator: torch.Generator | None) -> int:
    device = generator.device if generator is not None else "cpu"
    return int(torch.randint(0, 2**62, (), generator=generator, device=device))


def _finite_only(x3: torch.Tensor) -> torch.Tensor:
    return torch.nan_to_num(x3, nan=0.0, posinf=0.0, neginf=0.0)


def _check_finite(values: torch.Tensor, spec: QuantSpec) -> None:
    if not bool(torch.isfinite(values).all()):
        raise NonFiniteError(
            f"quantize: the input to {spec} has NaN or inf values (QuantSpec.nonfinite='error'; "
            "use nonfinite='propagate' to pass them through)"
        )


_F32 = torch.finfo(torch.float32)


def _safe_scale(scale: torch.Tensor) -> torch.Tensor:
    # An all-zero channel gets scale 1 (quantizes to exact zeros). A positive scale is kept in
    # float32's normal range: at least the smallest normal so that 1/scale stays finite, at
    # most the largest (a power-of-two scale above amax/qmax may round up to 2^128 = inf).
    return torch.where(scale > 0, scale.clamp(_F32.tiny, _F32.max), torch.ones_like(scale))


def _to_f32(value: float) -> float:
    """``value`` rounded to the nearest float32 (±inf beyond its range), as a Python float."""
    try:
        return struct.unpack("f", struct.pack("f", value))[0]
    except OverflowError:  # struct refuses what rounds to ±inf; float32 arithmetic gives it
        return math.copysign(math.inf, value)


def _range_on_host(low: torch.Tensor, high: torch.Tensor) -> tuple[float, float] | None:
    """One finite (low, high) pair of a per-tensor range on the CPU as Python floats, where
    computing on the host is exact and cheaper than a chain of one-element tensor ops; else
    None (per-channel, another device, NaN/inf, a traced or differentiable range)."""
    if (
        low.numel() != 1
        or high.numel() != 1
        or low.device.type != "cpu"
        or high.device.type != "cpu"
        or low.dtype != torch.float32
        or high.dtype != torch.float32
        or low.requires_grad
        or high.requires_grad
        or torch.compiler.is_compiling()
    ):
        return None
    pair = low.item(), high.item()
    return pair if math.isfinite(pair[0]) and math.isfinite(pair[1]) else None


def _qparams_on_host(low: float, high: float, int_format: Int) -> tuple[float, float]:
    """``qparams_from_range`` of one finite float32 range in float32 arithmetic on the host.

    Each float32 operation is the float64 one rounded to float32: exact, since float64 has more
    than twice float32's precision (+, −, × and ÷ are then correctly rounded after the double
    rounding). The constants are rounded to float32 as torch rounds Python scalars.
    """
    low, high = min(low, 0.0), max(high, 0.0)
    qmin, qmax = int_format.qmin, int_format.qmax
    steps = _to_f32(qmax - qmin)
    scale = _to_f32(_to_f32(high - low) / steps)
    if math.isinf(scale):
        scale = _to_f32(_to_f32(high / steps) - _to_f32(low / steps))
    scale = min(max(scale, _F32.tiny), _F32.max) if scale > 0 else 1.0
    if low == 0.0 or high == 0.0 or qmax - qmin < 2:
        # One end is zero: the plain grid has both ends on it. Two levels (1 bit): no level
        # either side of zero to cover both ends with; the plain grid.
        zero_point = _to_f32(qmin - round(_to_f32(low / scale)))
        return scale, min(max(zero_point, qmin), qmax)
    best = None
    for zero_point in _zero_point_candidates(
        math.floor(_to_f32(qmin - _to_f32(low / scale))), qmin, qmax
    ):
        covering = max(_to_f32(-low / (zero_point - qmin)), _to_f32(high / (qmax - zero_point)))
        if best is None or covering < best[0]:
            best = (covering, zero_point)
    covering, zero_point = best
    return max(covering, _F32.tiny), float(zero_point)


def _zero_point_candidates(floor: int, qmin: int, qmax: int) -> tuple[int, int]:
    """The integer zero points either side of the real one, kept strictly inside the grid
    (a range with both ends nonzero needs a level on each side of zero)."""
    return tuple(min(max(z, qmin + 1), qmax - 1) for z in (floor, floor + 1))


def qparams_from_range(low: torch.Tensor, high: torch.Tensor, int_format: Int) -> QParams:
    """Affine (GEMMLOWP) scale and integer zero point for the range [low, high] ∪ {0}: the
    smallest grid with zero on it that covers the whole range (see ``MinMax``)."""
    return _qparams_of_range(low, high, int_format, _range_on_host(low, high))


def _observed_qparams(
    low: torch.Tensor, high: torch.Tensor, spec: QuantSpec, int_formats: list[Int]
) -> list[QParams]:
    """``qparams_from_range`` for each format, from one range observed on the tensor that
    ``spec`` quantizes: NonFiniteError first where the spec says nonfinite='error' and the
    range holds NaN or ±inf (as the tensor then does: the range kernels propagate NaN). A
    per-tensor range is read to the host once for the check and every format."""
    on_host = _range_on_host(low, high)  # None also for a non-finite per-tensor range
    if on_host is None and spec.nonfinite == "error":
        _check_finite(torch.stack([low, high]), spec)
    return [_qparams_of_range(low, high, int_format, on_host) for int_format in int_formats]


def _qparams_of_range(
    low: torch.Tensor, high: torch.Tensor, int_format: Int, on_host: tuple[float, float] | None
) -> QParams:
    """``qparams_from_range``, with ``on_host`` = ``_range_on_host(low, high)``."""
    if on_host is not None:
        scale, zero_point = _qparams_on_host(*on_host, int_format)
        return QParams(torch.full_like(low, scale), torch.full_like(low, zero_point))
    return _qparams_of_range_tensors(low, high, int_format)


def _qparams_of_range_tensors(low: torch.Tensor, high: torch.Tensor, int_format: Int) -> QParams:
    """``qparams_from_range`` in tensor ops: any shape, device and autograd."""
    low = low.clamp(max=0.0)
    high = high.clamp(min=0.0)
    qmin, qmax = int_format.qmin, int_format.qmax
    steps = qmax - qmin
    scale = (high - low) / steps
    # A range wider than float32's largest value overflows high − low: divide first there.
    scale = _safe_scale(torch.where(torch.isinf(scale), high / steps - low / steps, scale))
    plain = (qmin - torch.round(low / scale)).clamp(qmin, qmax)
    if steps < 2:  # two levels: no level either side of zero, the plain grid (as on the host)
        return QParams(scale, plain)
    # Both ends nonzero: the better of the two integer zero points either side of the real one,
    # each with the smallest scale whose grid covers [low, high] (see MinMax).
    floor = torch.floor(qmin - low / scale)
    below, above = (z.clamp(qmin + 1, qmax - 1) for z in (floor, floor + 1))
    scale_below, scale_above = (
        torch.maximum(-low / (z - qmin), high / (qmax - z)) for z in (below, above)
    )
    take_above = scale_above < scale_below  # a tie keeps the lower one, as on the host
    covering = torch.where(take_above, scale_above, scale_below).clamp(min=_F32.tiny)
    zero_point = torch.where(take_above, above, below)
    straddles = (low < 0) & (high > 0)
    return QParams(
        torch.where(straddles, covering, scale), torch.where(straddles, zero_point, plain)
    )


def compute_qparams(x: torch.Tensor, spec: QuantSpec) -> QParams:
    """Scale and zero point that ``spec``'s rule gives for ``x`` (canonical (C,) shapes)."""
    x3, _ = canonical_view(x, spec.granularity)
    return _qparams_of_view(x, x3, spec)


def _observe_view(
    x: torch.Tensor, x3: torch.Tensor, rule: MinMax
) -> tuple[torch.Tensor, torch.Tensor]:
    if rule.batch_mean:
        # SBM activations: mean over samples of per-sample minima/maxima.
        # One fused pass: the samples are the channels of a (1, B, rest) view.
        per_sample = x3.reshape(1, x.shape[0] if x.dim() else 1, -1)
        low, high = kernels.implementation(x3.device).minmax(per_sample)
        return _mean(low), _mean(high)
    return kernels.implementation(x3.device).minmax(x3)


def _mean(values: torch.Tensor) -> torch.Tensor:
    """The mean as shape (1,); where float32's sum of values near its largest overflows (the
    mean itself cannot), the sum of values / n."""
    mean = values.mean().view(1)
    if values.device.type == "cpu" and not torch.compiler.is_compiling():
        # One host read instead of two more one-element ops (no sync on a CPU).
        return (values / values.numel()).sum().view(1) if math.isinf(mean.item()) else mean
    return torch.where(torch.isinf(mean), (values / values.numel()).sum(), mean)


def observe_range(x: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """The (low, high) range a MinMax spec reads from x, per channel of the canonical view
    (shape (C,)), before widening to include zero. Used to keep running ranges."""
    if not isinstance(spec.scale, MinMax):
        raise QuantSpecError(f"observe_range needs a MinMax() scale rule, got {spec.scale!r}")
    x3, _ = canonical_view(x.detach(), spec.granularity)
    source = _finite_only(x3) if spec.nonfinite == "propagate" else x3
    return _observe_view(x, source, spec.scale)


def _qparams_of_view(x: torch.Tensor, x3: torch.Tensor, spec: QuantSpec) -> QParams:
    rule = spec.scale
    impl = kernels.implementation(x3.device)
    channels = x3.shape[1]
    zeros = torch.zeros(channels, device=x3.device)
    propagate = spec.nonfinite == "propagate"
    source = _finite_only(x3) if propagate else x3
    if isinstance(rule, MinMax):
        low, high = _observe_view(x, source, rule)
        return _observed_qparams(low, high, spec, [spec.int_format])[0]
    if isinstance(rule, Clip):
        if not propagate:
            _check_finite(x3, spec)
        # A clip value beyond float32's range is held at its smallest normal / largest value.
        step = min(max(rule.value / spec.int_format.qmax, _F32.tiny), _F32.max)
        return QParams(torch.full((channels,), step, device=x3.device), zeros)
    if isinstance(rule, LearnedStep):
        raise QuantSpecError("QuantSpec with LearnedStep() needs quantize(..., step=tensor)")
    amax = impl.absmax(source)
    if not propagate:
        _check_finite(amax, spec)
    if isinstance(rule, AbsMean):
        return QParams(_safe_scale(source.abs().mean(dim=(0, 2))), zeros)
    if isinstance(spec.format, MiniFloat):
        return QParams(_safe_scale(amax / spec.format.max_value), zeros)
    ratio = amax / spec.int_format.qmax
    if isinstance(rule, PowerOfTwo):
        ratio = torch.where(ratio > 0, torch.exp2(torch.ceil(torch.log2(ratio))), ratio)
    return QParams(_safe_scale(ratio), zeros)


# ---- fake quantization ----------------------------------------------------------------------


def _fake_quant_view(
    x3: torch.Tensor, spec: QuantSpec, qparams: QParams | None, seed: int | None, want_mask: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    impl = kernels.implementation(x3.device)
    if isinstance(spec.format, MiniFloat):
        f = spec.format
        if qparams is None:
            y = impl.fake_quant_minifloat(
                x3, f.exponent_bits, f.mantissa_bits, f.has_inf, f.saturate, seed
            )
            return y, None
        s = qparams.scale.view(1, -1, 1)
        y = impl.fake_quant_minifloat(
            x3 / s, f.exponent_bits, f.mantissa_bits, f.has_inf, f.saturate, seed
        )
        return y * s, None
    int_format = spec.int_format
    return impl.fake_quant_int(
        x3, qparams.scale, qparams.zero_point, int_format.qmin, int_format.qmax, seed, want_mask
    )


def _prepare(x: torch.Tensor, spec: QuantSpec, what: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what}: x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise QuantSpecError(f"{what}: x must be a floating-point tensor, got dtype {x.dtype}")
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"{what}: spec must be a QuantSpec, got {type(spec).__name__}")


def needs_clip_mask(spec: QuantSpec, qparams_given: bool) -> bool:
    """Whether quantizing with ``spec`` may clip values whose STE gradient must then be zero."""
    # Given qparams (running ranges, a chosen clip) may cut values off like a clipping rule.
    may_clip = qparams_given or isinstance(spec.scale, _CLIPPING_RULES)
    return spec.clip_gradient and spec.int_format is not None and may_clip


def fake_quantize_with_mask(
    x: torch.Tensor,
    spec: QuantSpec,
    *,
    qparams: QParams | None = None,
    generator: torch.Generator | None = None,
    want_mask: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``quantize`` without autograd: x̂ and, when asked and the values may be clipped, the
    STE mask in x's shape (True where the value was inside the range), else None."""
    x3, restore = canonical_view(x, spec.granularity)
    want_mask = want_mask and needs_clip_mask(spec, qparams is not None)
    if qparams is None and spec.scale is not None:
        qparams = _qparams_of_view(x, x3, spec)
    elif qparams is not None and not isinstance(qparams, _CheckedQParams):
        # NaN/inf input first: running ranges built from it are bad too, and the guard must
        # see a NonFiniteError, not a complaint about the qparams.
        if spec.nonfinite == "error":
            _check_finite(x3, spec)
        _check_qparams(qparams, x3.shape[1], spec, "quantize")
    seed = _draw_seed(generator) if spec.rounding is Rounding.STOCHASTIC else None
    y3, mask = _fake_quant_view(x3, spec, qparams, seed, want_mask)
    if qparams is not None:  # a plain minifloat cast keeps the format's own overflow and NaN
        y3 = _finish(y3, x3, qparams, spec, x.dtype)
    return restore(y3).to(x.dtype), None if mask is None else restore(mask)


def _finish(
    y3: torch.Tensor, x3: torch.Tensor, qparams: QParams, spec: QuantSpec, dtype: torch.dtype
) -> torch.Tensor:
    """A scaled result in x's dtype's finite range, NaN/inf passed through if propagated.

    A grid may reach past the largest value of x's dtype: a float16 input near 65504 whose
    power-of-two scale rounds up, or whose zero point is nudged; a range wider than float32's
    largest value. Such results are held at that largest value, as a saturating cast would.
    """
    bound = min(torch.finfo(dtype).max, _F32.max)
    scale, zero_point = _per_tensor_on_host(qparams.scale, qparams.zero_point)
    int_format = spec.int_format
    if int_format is None:
        levels = spec.format.max_value
    else:  # max(qmax − z, z − qmin): the most levels a value may lie from the zero point
        qmin, qmax = int_format.qmin, int_format.qmax
        levels = (qmax - qmin + abs(qmax + qmin - 2 * zero_point)) / 2
    past = levels * scale > bound
    if past if isinstance(past, bool) else bool(past.any()):
        y3 = y3.clamp(-bound, bound)
    if spec.nonfinite == "propagate":
        y3 = torch.where(torch.isfinite(x3), y3, x3)
    return y3


def _per_tensor_on_host(
    scale: torch.Tensor, zero_point: torch.Tensor
) -> tuple[torch.Tensor | float, torch.Tensor | float]:
    """Scale and zero point flattened; one of each (per tensor) read as Python floats, which
    is cheaper than a chain of one-element tensor operations and a device sync."""
    if scale.numel() == 1:
        return scale.item(), zero_point.item()
    return scale.detach().reshape(-1), zero_point.reshape(-1)


def _first_bad_scale(scale: torch.Tensor, zero_point: torch.Tensor) -> int | None:
    """Index of the first scale not finite and > 0 or zero point not finite, else None."""
    scale, zero_point = _per_tensor_on_host(scale, zero_point)
    if isinstance(scale, float):
        return None if 0 < scale < math.inf and math.isfinite(zero_point) else 0
    ok = (scale > 0) & torch.isfinite(scale) & torch.isfinite(zero_point)
    return None if bool(ok.all()) else int((~ok).nonzero()[0])


def _check_qparams(qparams: QParams, channels: int, spec: QuantSpec, what: str) -> None:
    """Given qparams hold one finite scale > 0 and one finite zero point per channel."""
    if not isinstance(qparams, QParams):
        raise TypeError(f"{what}: qparams must be a QParams, got {type(qparams).__name__}")
    for name in ("scale", "zero_point"):
        values = getattr(qparams, name)
        if not isinstance(values, torch.Tensor) or values.numel() != channels:
            got = f"{values.numel()}" if isinstance(values, torch.Tensor) else repr(values)
            raise QuantSpecError(
                f"{what}: qparams.{name} must hold {channels} value(s), one per scale of "
                f"{spec.granularity!r} on this tensor, got {got}"
            )
    index = _first_bad_scale(qparams.scale, qparams.zero_point)
    if index is not None:
        scale, zero_point = qparams.scale.reshape(-1), qparams.zero_point.reshape(-1)
        raise QuantSpecError(
            f"{what}: qparams need a finite scale > 0 and a finite zero point, got scale "
            f"{float(scale[index])} and zero point {float(zero_point[index])} at index {index}"
        )


def _check_step(step: Any, channels: int, spec: QuantSpec) -> None:
    """A learned step is a float tensor of 1 or ``channels`` values, each finite and > 0."""
    if not isinstance(step, torch.Tensor) or not step.is_floating_point():
        kind = f"dtype {step.dtype}" if isinstance(step, torch.Tensor) else type(step).__name__
        raise TypeError(f"quantize: step must be a floating-point tensor, got {kind}")
    if step.numel() not in (1, channels):
        raise QuantSpecError(
            f"quantize: step must hold 1 or {channels} value(s), one per scale of "
            f"{spec.granularity!r} on this tensor, got {step.numel()}"
        )
    index = _first_bad_scale(step, torch.zeros_like(step))
    if index is not None:
        raise QuantSpecError(
            f"quantize: the learned step must be finite and > 0, got "
            f"{float(step.reshape(-1)[index])}" + (f" at index {index}" if step.numel() > 1 else "")
        )


class _FakeQuant(torch.autograd.Function):
    """Straight-through fake quantization; the gradient is masked where values were clipped."""

    @staticmethod
    def forward(ctx, x, spec, qparams, generator):  # type: ignore[override]
        y, mask = fake_quantize_with_mask(
            x, spec, qparams=qparams, generator=generator, want_mask=ctx.needs_input_grad[0]
        )
        ctx.save_for_backward(mask)
        return y

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        (mask,) = ctx.saved_tensors
        if mask is not None:
            grad = grad * mask.to(grad.dtype)
        return grad, None, None, None


class _LearnedStepQuant(torch.autograd.Function):
    """LSQ: x̂ = round(clip(x/s, −Q_N, Q_P))·s with the step gradient of Esser et al. (2020),
    in torch's form (``torch._fake_quantize_learnable_per_tensor_affine``): v = x·(1/s) is
    inside where round(v) lies in [−Q_N, Q_P]; there ∂x̂/∂x = 1 and ∂x̂/∂s = (x̂ − x)·(1/s)
    = round(v) − v; outside ∂x̂/∂x = 0 and ∂x̂/∂s = −Q_N or Q_P. (The paper's eq. 3 puts the
    bound on v itself: the two differ only for v within half a step beyond a bound.)"""

    @staticmethod
    def forward(ctx, x, step, spec, generator):  # type: ignore[override]
        x3, restore = canonical_view(x, spec.granularity)
        if spec.nonfinite == "error":
            _check_finite(x3, spec)
        step_c = step.detach().to(torch.float32).reshape(-1).expand(x3.shape[1]).contiguous()
        int_format = spec.int_format
        seed = _draw_seed(generator) if spec.rounding is Rounding.STOCHASTIC else None
        zero = torch.zeros_like(step_c)
        y3, inside = kernels.implementation(x3.device).fake_quant_int(
            x3, step_c, zero, int_format.qmin, int_format.qmax, seed, True
        )
        bound = torch.where(x3 < 0, float(int_format.qmin), float(int_format.qmax))
        step_grad = torch.where(inside, (y3 - x3) * (1.0 / step_c).view(1, -1, 1), bound)
        if spec.nonfinite == "propagate":  # the step learns from the finite values alone
            step_grad = torch.where(torch.isfinite(x3), step_grad, 0.0)
        y3 = _finish(y3, x3, QParams(step_c, zero), spec, x.dtype)
        mask = inside if spec.clip_gradient else torch.ones_like(inside)
        ctx.save_for_backward(mask, step_grad)
        ctx.restore = restore
        # The layout whose canonical view has the order of x's: grad is brought to it.
        ctx.layout = x.stride() if _memory_order_ok(x) else _default_strides(x.shape)
        ctx.step_shape = step.shape
        ctx.granularity = spec.granularity
        ctx.grad_scale = 1.0 / math.sqrt(x3.numel() / x3.shape[1] * int_format.qmax)
        return restore(y3).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        mask, step_grad = ctx.saved_tensors
        grad = kernels.with_strides(grad, ctx.layout)
        grad3, _ = canonical_view(grad, ctx.granularity)
        grad_x = grad * ctx.restore(mask).to(grad.dtype)
        grad_step = (grad3 * step_grad).sum(dim=(0, 2)) * ctx.grad_scale
        if ctx.step_shape.numel() == 1:
            grad_step = grad_step.sum()
        return grad_x, grad_step.reshape(ctx.step_shape), None, None


def quantize(
    x: torch.Tensor,
    spec: QuantSpec,
    *,
    generator: torch.Generator | None = None,
    qparams: QParams | None = None,
    step: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fake-quantize ``x``: the nearest (or stochastically rounded) value of ``spec``'s grid,
    in x's dtype, with a straight-through gradient. A scaled grid point beyond the largest
    finite value of x's dtype (of float32 for float64) is held at that value.

    The result has x's layout where x is dense and quantized per tensor (a channels_last x
    gives a channels_last result). Stochastic rounding draws one uniform per value from the
    seed and the value's index in ``canonical_view(x)``, which for such an x is its memory
    order: with one seed, x and a copy of it in another layout round alike in distribution but
    not value for value.

    Args:
        x: a floating-point tensor (any shape, contiguous or not, possibly empty).
        spec: the ``QuantSpec``.
        generator: source of the stochastic-rounding seed (default: torch's global generator,
            so ``torch.manual_seed`` makes runs reproducible).
        qparams: explicit scale/zero point (canonical (C,) shapes), e.g. running ranges; each
            scale finite and > 0, each zero point finite.
        step: the learned step tensor for ``LearnedStep()`` (scalar or one per channel), each
            value finite and > 0.

    >>> from qtrain import formats
    >>> quantize(torch.tensor([0.1, -0.5, 1.0]), QuantSpec(formats.Int(4))).tolist()
    [0.1428571492433548, -0.4285714626312256, 1.0]
    """
    _prepare(x, spec, "quantize")
    channels = math.prod(qparams_shape(x, spec.granularity))  # checks the granularity against x
    learned = isinstance(spec.scale, LearnedStep)
    if learned:
        if step is None:
            raise QuantSpecError("QuantSpec with LearnedStep() needs quantize(..., step=tensor)")
        _check_step(step, channels, spec)
    if x.numel() == 0:
        if qparams is not None:
            _check_qparams(qparams, channels, spec, "quantize")
        return x.clone()
    if learned:
        return _LearnedStepQuant.apply(x, step, spec, generator)
    return _FakeQuant.apply(x, spec, qparams, generator)


def quantize_int(
    x: torch.Tensor,
    spec: QuantSpec,
    *,
    generator: torch.Generator | None = None,
    qparams: QParams | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Integer quantization: (levels in the format's storage dtype, scale, zero_point).

    ``scale`` and ``zero_point`` (int32) have ``qparams_shape(x, spec.granularity)``, so that
    ``(q - zero_point) * scale`` (in float32, held in x's dtype's finite range) equals
    ``quantize(x, spec)`` (for PerGroup(G, axis) split the group axis first: see
    ``qparams_shape``).
    """
    _prepare(x, spec, "quantize_int")
    int_format = spec.int_format
    if int_format is None:
        raise QuantSpecError(f"quantize_int needs an integer or block format, got {spec.format}")
    if spec.nonfinite == "propagate":
        _check_finite(x, dataclasses.replace(spec, nonfinite="error"))
    shape = qparams_shape(x, spec.granularity)
    if x.numel() == 0:
        levels = torch.empty(x.shape, dtype=int_format.storage_dtype, device=x.device)
        zero_point = torch.zeros(shape, dtype=torch.int32, device=x.device)
        return levels, torch.ones(shape, device=x.device), zero_point
    x3, restore = canonical_view(x, spec.granularity)
    if qparams is None:
        if isinstance(spec.scale, LearnedStep):
            raise QuantSpecError("quantize_int with LearnedStep() needs qparams=QParams(step, 0)")
        qparams = _qparams_of_view(x, x3, spec)
    else:
        _check_qparams(qparams, x3.shape[1], spec, "quantize_int")
        _check_finite(x3, spec)
    seed = _draw_seed(generator) if spec.rounding is Rounding.STOCHASTIC else None
    levels = kernels.implementation(x3.device).quant_int(
        x3, qparams.scale, qparams.zero_point, int_format.qmin, int_format.qmax, seed
    )
    q = restore(levels).to(int_format.storage_dtype)
    scale = _qparams_layout(qparams.scale, x, spec.granularity)
    zero_point = _qparams_layout(qparams.zero_point, x, spec.granularity).to(torch.int32)
    return q, scale, zero_point
