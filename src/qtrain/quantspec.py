"""The quantizer's value types: what a ``QuantSpec`` is made of (format, granularity, scale
rule, rounding), the ``QParams`` it produces, and its errors. ``qtrain.quantizer`` holds the
functions that apply them and re-exports every name here.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import typing

import torch

from qtrain import formats as fmt
from qtrain.configs import Config
from qtrain.formats import BlockFloat, Format, Int, MiniFloat
from qtrain.validation import check_int, check_type, matches, refuse


class QuantSpecError(ValueError):
    """A quantization spec, or its use on a tensor, is invalid."""


class NonFiniteError(ValueError):
    """NaN or inf reached an integer quantizer whose policy is ``nonfinite="error"``."""


class Rounding(enum.Enum):
    NEAREST = "nearest"  # round half to even
    STOCHASTIC = "stochastic"  # unbiased: P(up) = distance to the lower grid point


# ---- granularities: which values share one scale ------------------------------------------


@dataclasses.dataclass(frozen=True)
class PerTensor:
    """One scale for the whole tensor."""


@dataclasses.dataclass(frozen=True)
class PerChannel:
    """One scale per index along ``axis`` (e.g. 0 = output channels of a weight)."""

    axis: int = 0

    def __post_init__(self) -> None:
        check_int("PerChannel.axis", self.axis, QuantSpecError)


@dataclasses.dataclass(frozen=True)
class PerGroup:
    """One scale per ``group_size`` consecutive values along ``axis``."""

    group_size: int
    axis: int = -1

    def __post_init__(self) -> None:
        check_int("PerGroup.group_size", self.group_size, QuantSpecError, low=1)
        check_int("PerGroup.axis", self.axis, QuantSpecError)


@dataclasses.dataclass(frozen=True)
class PerToken:
    """One scale per row: all dimensions but the last index a token."""


Granularity = PerTensor | PerChannel | PerGroup | PerToken


# ---- scale rules: how the scale is found ---------------------------------------------------


@dataclasses.dataclass(frozen=True)
class AbsMax:
    """Symmetric: scale = max|x| / qmax (minifloats: max|x| / format max)."""


@dataclasses.dataclass(frozen=True)
class MinMax:
    """Affine (GEMMLOWP): integer zero point, scale ≈ (max − min)/(qmax − qmin).

    The range is widened to include 0 so that zero is exact. Where min < 0 < max the real zero
    point qmin − min/scale is rarely an integer; of the two integers either side, the one whose
    smallest covering scale (max(−min/(z − qmin), max/(qmax − z))) is smaller is taken, with that
    scale. The grid then holds both observed ends, so no value in [min, max] is clamped and
    stochastic rounding stays unbiased up to both ends; the step is at most 1/(qmax − qmin − 1)
    wider than (max − min)/(qmax − qmin) (plain nudging to the nearest integer instead shifts
    the grid by up to half a step and clamps values near one end). ``batch_mean`` (SBM
    activations): min/max are the batch means of per-sample minima/maxima (dim 0 indexes
    samples).
    """

    batch_mean: bool = False

    def __post_init__(self) -> None:
        check_type("MinMax.batch_mean", self.batch_mean, bool, QuantSpecError)


@dataclasses.dataclass(frozen=True)
class Clip:
    """Symmetric with a fixed clip value c: scale = c / qmax; values beyond ±c saturate."""

    value: float

    def __post_init__(self) -> None:
        value = self.value
        if not (matches(value, float) and math.isfinite(value) and value > 0):
            refuse("Clip.value", value, "a finite number > 0", QuantSpecError)


@dataclasses.dataclass(frozen=True)
class LearnedStep:
    """LSQ (Esser et al. 2020): the step is a learned tensor passed as ``quantize(..., step=s)``."""


@dataclasses.dataclass(frozen=True)
class AbsMean:
    """BitNet b1.58's absmean (Ma et al. 2024): scale = mean|x| per channel, levels
    round(clamp(x/scale, qmin, qmax)); with ``Int(2)`` (levels −1, 0, +1) the ternary weight.
    Values beyond qmax·scale saturate."""


@dataclasses.dataclass(frozen=True)
class PowerOfTwo:
    """Symmetric with a power-of-two scale: 2^ceil(log2(max|x| / qmax))."""


ScaleRule = AbsMax | MinMax | Clip | LearnedStep | AbsMean | PowerOfTwo

_CLIPPING_RULES = (MinMax, Clip, LearnedStep, AbsMean)  # rules whose range may cut off values


@dataclasses.dataclass(frozen=True)
class QParams:
    """Scale and zero point per channel of the canonical (O, C, I) view: both of shape (C,)."""

    scale: torch.Tensor
    zero_point: torch.Tensor


@dataclasses.dataclass(frozen=True)
class _CheckedQParams(QParams):
    """QParams made by ``qparams_from_range`` from a range read from the very tensor they
    will quantize, that range checked finite where the spec says nonfinite='error' (the range
    kernels propagate NaN, so the tensor is finite too): valid by construction, so the quantizer
    checks neither them nor that tensor again."""


@dataclasses.dataclass(frozen=True)
class QuantSpec(Config):
    """What to quantize to and how (a ``qtrain.configs.Config``: ``to_dict``/``from_dict``).

    Args:
        format: ``formats.Int``, ``formats.MiniFloat`` or ``formats.BlockFloat``.
        granularity: ``PerTensor()``, ``PerChannel(axis)``, ``PerGroup(size, axis)``,
            ``PerToken()``.
        scale: the scale rule; default AbsMax for signed ints, MinMax for unsigned ints,
            none for minifloats (a plain cast), PowerOfTwo per block for block floats.
        rounding: ``Rounding.NEAREST`` (half to even) or ``Rounding.STOCHASTIC``.
        clip_gradient: STE gradient is zero where the value was clipped (as
            ``torch.fake_quantize_*``); False passes the gradient everywhere.
        nonfinite: scaled formats (integer, block float, a minifloat with a scale): ``"error"``
            raises on NaN/inf input, ``"propagate"`` finds the scale over finite values and
            passes NaN/inf through in ``quantize``. A plain minifloat cast carries NaN/inf as
            the format does (torch's cast), whatever the policy.
    """

    format: Format
    granularity: Granularity = PerTensor()
    scale: ScaleRule | None = None
    rounding: Rounding = Rounding.NEAREST
    clip_gradient: bool = True
    nonfinite: str = "error"

    error: typing.ClassVar[type[Exception]] = QuantSpecError

    def __post_init__(self) -> None:
        for field, kind, allowed in (
            ("format", Format, "formats.Int, MiniFloat or BlockFloat"),
            ("granularity", Granularity,
             "PerTensor(), PerChannel(axis), PerGroup(size) or PerToken()"),
            ("scale", ScaleRule | None,
             "AbsMax(), MinMax(), Clip(c), LearnedStep(), AbsMean(), PowerOfTwo() or None"),
            ("rounding", Rounding, "Rounding.NEAREST or Rounding.STOCHASTIC"),
            ("clip_gradient", bool, "a bool"),
            ("nonfinite", typing.Literal["error", "propagate"], "'error' or 'propagate'"),
        ):  # fmt: skip
            check_type(f"QuantSpec.{field}", getattr(self, field), kind, QuantSpecError, allowed)
        if isinstance(self.format, BlockFloat):
            # PerGroup(block) and PowerOfTwo() are what this sets; accepting them back keeps
            # dataclasses.replace() working on a block-float spec.
            block = PerGroup(self.format.block_size, self.format.axis)
            own_scale = self.scale in (None, PowerOfTwo())
            if self.granularity not in (PerTensor(), block) or not own_scale:
                raise QuantSpecError(
                    "QuantSpec with a BlockFloat format takes its block and power-of-two scale "
                    "from the format: leave granularity and scale at their defaults, got "
                    f"granularity={self.granularity!r}, scale={self.scale!r}"
                )
            object.__setattr__(self, "granularity", block)
            object.__setattr__(self, "scale", PowerOfTwo())
        elif isinstance(self.format, Int) and self.scale is None:
            object.__setattr__(self, "scale", AbsMax() if self.format.signed else MinMax())
        elif isinstance(self.format, MiniFloat) and not isinstance(self.scale, AbsMax | None):
            allowed = "None (plain cast) or AbsMax() for a minifloat"
            refuse("QuantSpec.scale", self.scale, allowed, QuantSpecError)
        batch_mean = isinstance(self.scale, MinMax) and self.scale.batch_mean
        if batch_mean and not isinstance(self.granularity, PerTensor):
            raise QuantSpecError(
                "MinMax(batch_mean=True) reads per-sample ranges of the whole tensor: it "
                f"needs granularity PerTensor(), got {self.granularity!r}"
            )

    @property
    def int_format(self) -> Int | None:
        """The integer format the levels live in (BlockFloat's mantissa), or None."""
        if isinstance(self.format, Int):
            return self.format
        if isinstance(self.format, BlockFloat):
            return Int(self.format.mantissa_bits)
        return None

    @property
    def bits(self) -> float:
        return fmt.format_bits(self.format)

    def with_bits(self, bits: int) -> QuantSpec:
        """The same spec at another bit-width (integer formats; used by precision schedules)."""
        if not isinstance(self.format, Int):
            raise QuantSpecError(f"with_bits needs an integer format, got {self.format}")
        if bits == self.format.bits:
            return self
        return dataclasses.replace(self, format=dataclasses.replace(self.format, bits=bits))

    def __str__(self) -> str:
        parts = [str(self.format), type(self.granularity).__name__]
        if self.rounding is Rounding.STOCHASTIC:
            parts.append("SR")
        return "/".join(parts)
