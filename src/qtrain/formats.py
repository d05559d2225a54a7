"""Number formats: what a low-precision number is. One small frozen value type each.

Formats know nothing of tensors' roles or of how a tensor is mapped onto them (that is the
quantizer's job); they only describe the representable set.

>>> from qtrain import formats
>>> formats.Int(8).qmin, formats.Int(8).qmax          # narrow signed range
(-127, 127)
>>> formats.FP8_E4M3.max_value
448.0
"""

from __future__ import annotations

import dataclasses
import math

import torch

from qtrain.validation import check_int, check_type


class FormatError(ValueError):
    """A format was constructed with values outside what it allows."""


@dataclasses.dataclass(frozen=True)
class Int:
    """A b-bit integer (fixed point once a scale is applied).

    Signed formats use the narrow range [-(2^(b-1)-1), 2^(b-1)-1] so that symmetric absmax
    quantization maps ±max|x| to ±qmax exactly; unsigned formats use [0, 2^b - 1].

    Args:
        bits: 1..16.
        signed: signed (two's complement, narrow range) or unsigned.
    """

    bits: int
    signed: bool = True

    def __post_init__(self) -> None:
        check_int("Int.bits", self.bits, FormatError, low=1, high=16)
        check_type("Int.signed", self.signed, bool, FormatError)
        if self.signed and self.bits == 1:
            # A narrow signed 1-bit range is {0}; 1-bit signed means binary ±1 (sign), which is
            # Int(2)'s ternary grid restricted; refuse rather than silently collapse to zero.
            raise FormatError("Int(bits=1, signed=True) has an empty narrow range; use bits >= 2")

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1) - 1) if self.signed else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1

    @property
    def storage_dtype(self) -> torch.dtype:
        """Smallest torch integer dtype holding every value of the format."""
        if self.bits <= 8:
            return torch.int8 if self.signed else torch.uint8
        return torch.int16 if self.signed else torch.int32

    def __str__(self) -> str:
        return f"{'int' if self.signed else 'uint'}{self.bits}"


@dataclasses.dataclass(frozen=True)
class MiniFloat:
    """A binary floating-point format with ``exponent_bits`` and ``mantissa_bits`` (+ sign).

    IEEE-like layout: bias 2^(e-1) - 1, subnormals, round-to-nearest-even. ``has_inf`` selects
    IEEE semantics for the all-ones exponent (inf and NaN). Formats without inf (OCP FP8 E4M3,
    ``float8_e4m3fn``) reserve only the all-ones pattern S.1111.111 for NaN, so the top binade
    holds finite values and ``max_value`` is 448. Overflow goes to inf where the format has inf,
    to NaN where it has not; ``saturate=True`` clamps overflow and ±inf to ±max_value instead.
    The presets carry torch's cast semantics, so their nearest rounding equals ``x.to(dtype)``.
    """

    exponent_bits: int
    mantissa_bits: int
    has_inf: bool = True
    saturate: bool = False
    name: str = ""

    def __post_init__(self) -> None:
        check_int("MiniFloat.exponent_bits", self.exponent_bits, FormatError, low=2, high=8)
        check_int("MiniFloat.mantissa_bits", self.mantissa_bits, FormatError, low=0, high=23)
        check_type("MiniFloat.has_inf", self.has_inf, bool, FormatError)
        check_type("MiniFloat.saturate", self.saturate, bool, FormatError)
        check_type("MiniFloat.name", self.name, str, FormatError)
        if not self.has_inf and self.mantissa_bits == 0:
            raise FormatError("MiniFloat without inf needs mantissa_bits >= 1 to encode NaN")

    @property
    def bits(self) -> int:
        return 1 + self.exponent_bits + self.mantissa_bits

    @property
    def bias(self) -> int:
        return 2 ** (self.exponent_bits - 1) - 1

    @property
    def min_exponent(self) -> int:
        """Exponent of the smallest normal number (also the subnormals' exponent)."""
        return 1 - self.bias

    @property
    def max_exponent(self) -> int:
        top = 2**self.exponent_bits - 1
        return (top - 1 if self.has_inf else top) - self.bias

    @property
    def max_value(self) -> float:
        if self.has_inf:
            mantissa = 2.0 - 2.0**-self.mantissa_bits
        else:  # the all-ones mantissa in the top binade is NaN
            mantissa = 2.0 - 2.0 ** (1 - self.mantissa_bits)
        return math.ldexp(mantissa, self.max_exponent)

    @property
    def smallest_subnormal(self) -> float:
        return math.ldexp(1.0, self.min_exponent - self.mantissa_bits)

    @property
    def torch_dtype(self) -> torch.dtype | None:
        """The torch dtype with exactly this format's values and cast semantics, if any."""
        key = (self.exponent_bits, self.mantissa_bits, self.has_inf, self.saturate)
        return _TORCH_DTYPES.get(key)

    def __str__(self) -> str:
        return self.name or f"e{self.exponent_bits}m{self.mantissa_bits}"


@dataclasses.dataclass(frozen=True)
class BlockFloat:
    """Block floating point: one shared power-of-two exponent per block of ``block_size``
    values along ``axis``; each value keeps a signed ``mantissa_bits`` integer (sign included).

    Quantizing to it is integer quantization with a power-of-two scale per group, so the
    quantizer maps it onto ``Int(mantissa_bits)`` + ``PerGroup(block_size, axis)`` +
    ``PowerOfTwo()``.
    """

    mantissa_bits: int
    block_size: int = 32
    axis: int = -1

    def __post_init__(self) -> None:
        # The mantissa is a narrow-range signed integer, so it needs at least 2 bits.
        check_int("BlockFloat.mantissa_bits", self.mantissa_bits, FormatError, low=2, high=16)
        check_int("BlockFloat.block_size", self.block_size, FormatError, low=1)
        check_int("BlockFloat.axis", self.axis, FormatError)

    @property
    def bits(self) -> float:
        """Average storage bits per value: mantissa plus an 8-bit exponent shared by the block."""
        return self.mantissa_bits + 8 / self.block_size

    def __str__(self) -> str:
        return f"bfp{self.mantissa_bits}x{self.block_size}"


Format = Int | MiniFloat | BlockFloat

INT8 = Int(8)
INT4 = Int(4)
UINT8 = Int(8, signed=False)
# torch (2.13) casts to float8_e4m3fn saturate: overflow and ±inf become ±448, NaN stays NaN.
FP8_E4M3 = MiniFloat(4, 3, has_inf=False, saturate=True, name="fp8_e4m3")
FP8_E5M2 = MiniFloat(5, 2, has_inf=True, name="fp8_e5m2")
BF16 = MiniFloat(8, 7, has_inf=True, name="bf16")
FP16 = MiniFloat(5, 10, has_inf=True, name="fp16")

_TORCH_DTYPES: dict[tuple[int, int, bool, bool], torch.dtype] = {
    (4, 3, False, True): torch.float8_e4m3fn,
    (5, 2, True, False): torch.float8_e5m2,
    (8, 7, True, False): torch.bfloat16,
    (5, 10, True, False): torch.float16,
}


def format_bits(fmt: Format | None) -> float:
    """Bits per value of a format; None means full precision (32)."""
    return 32.0 if fmt is None else float(fmt.bits)
