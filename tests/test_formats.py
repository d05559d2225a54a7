"""Formats: validation, integer ranges, preset limits, and bit-exact equality of the minifloat
presets' nearest rounding with torch's own casts."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from qtrain import QuantSpec, formats, quantize
from qtrain.formats import BlockFloat, FormatError, Int, MiniFloat

# ---- validation ------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [0, 17, -3, True, 8.0, "8", None])
def test_int_rejects_bad_bits_naming_the_parameter(bits):
    with pytest.raises(FormatError, match=r"Int\.bits"):
        Int(bits)


def test_signed_one_bit_int_is_refused_but_unsigned_is_allowed():
    with pytest.raises(FormatError, match="bits"):
        Int(1)
    assert (Int(1, signed=False).qmin, Int(1, signed=False).qmax) == (0, 1)


@pytest.mark.parametrize(
    ("field", "kwargs"),
    [
        ("exponent_bits", {"exponent_bits": 1, "mantissa_bits": 3}),
        ("exponent_bits", {"exponent_bits": 9, "mantissa_bits": 3}),
        ("exponent_bits", {"exponent_bits": True, "mantissa_bits": 3}),
        ("exponent_bits", {"exponent_bits": 4.0, "mantissa_bits": 3}),
        ("mantissa_bits", {"exponent_bits": 4, "mantissa_bits": -1}),
        ("mantissa_bits", {"exponent_bits": 4, "mantissa_bits": 24}),
        ("mantissa_bits", {"exponent_bits": 4, "mantissa_bits": False}),
    ],
)
def test_minifloat_rejects_bad_bits_naming_the_parameter(field, kwargs):
    with pytest.raises(FormatError, match=rf"MiniFloat\.{field}"):
        MiniFloat(**kwargs)


def test_minifloat_without_inf_needs_a_mantissa_bit_for_nan():
    with pytest.raises(FormatError, match="mantissa_bits"):
        MiniFloat(5, 0, has_inf=False)
    assert MiniFloat(5, 0).bits == 6


@pytest.mark.parametrize("bits", [0, 1, 17, True, 4.5])
def test_blockfloat_rejects_bad_mantissa_bits_naming_the_parameter(bits):
    with pytest.raises(FormatError, match=r"BlockFloat\.mantissa_bits"):
        BlockFloat(bits)


@pytest.mark.parametrize("block_size", [0, -4, True, 2.0])
def test_blockfloat_rejects_bad_block_size_naming_the_parameter(block_size):
    with pytest.raises(FormatError, match=r"BlockFloat\.block_size"):
        BlockFloat(8, block_size)


def test_formats_are_frozen_values():
    with pytest.raises(dataclasses.FrozenInstanceError):
        formats.INT8.bits = 4  # type: ignore[misc]
    assert Int(8) == formats.INT8 and hash(Int(8)) == hash(formats.INT8)
    assert Int(8, signed=False) == formats.UINT8


# ---- integer ranges and bits -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "qmin", "qmax", "dtype"),
    [
        (Int(2), -1, 1, torch.int8),
        (Int(4), -7, 7, torch.int8),
        (Int(8), -127, 127, torch.int8),
        (Int(8, signed=False), 0, 255, torch.uint8),
        (Int(12), -2047, 2047, torch.int16),
        (Int(16), -32767, 32767, torch.int16),
        (Int(16, signed=False), 0, 65535, torch.int32),
    ],
)
def test_int_range_and_storage(fmt, qmin, qmax, dtype):
    assert (fmt.qmin, fmt.qmax) == (qmin, qmax)
    assert fmt.storage_dtype == dtype
    info = torch.iinfo(dtype)
    assert info.min <= qmin and qmax <= info.max


def test_bits_of_each_format():
    assert formats.format_bits(None) == 32.0
    assert formats.format_bits(Int(5)) == 5.0
    assert formats.FP8_E4M3.bits == formats.FP8_E5M2.bits == 8
    assert formats.BF16.bits == formats.FP16.bits == 16
    # A block float stores its 8-bit shared exponent once per block.
    assert BlockFloat(6, block_size=16).bits == 6 + 8 / 16


# ---- presets --------------------------------------------------------------------------------


PRESETS = [formats.FP8_E4M3, formats.FP8_E5M2, formats.BF16, formats.FP16]


def test_preset_max_values():
    assert formats.FP8_E4M3.max_value == 448.0
    assert formats.FP8_E5M2.max_value == 57344.0
    assert formats.FP16.max_value == 65504.0
    assert formats.BF16.max_value == (2 - 2**-7) * 2.0**127


@pytest.mark.parametrize("fmt", PRESETS, ids=str)
def test_preset_limits_match_torch_finfo(fmt):
    info = torch.finfo(fmt.torch_dtype)
    assert fmt.max_value == info.max
    assert math.ldexp(1.0, fmt.min_exponent) == info.tiny  # smallest normal
    assert fmt.smallest_subnormal == math.ldexp(info.tiny, -fmt.mantissa_bits)
    assert fmt.bits == info.bits


def test_only_the_exact_semantics_map_to_a_torch_dtype():
    assert formats.FP8_E4M3.torch_dtype == torch.float8_e4m3fn
    assert formats.FP8_E5M2.torch_dtype == torch.float8_e5m2
    assert formats.BF16.torch_dtype == torch.bfloat16
    assert formats.FP16.torch_dtype == torch.float16
    # Same bit layout, different overflow semantics: not torch's cast.
    assert MiniFloat(4, 3, has_inf=False, saturate=False).torch_dtype is None
    assert MiniFloat(5, 2, saturate=True).torch_dtype is None


# ---- bit-exact nearest rounding against torch's casts ----------------------------------------


def _as_int32(patterns: torch.Tensor) -> torch.Tensor:
    """Unsigned 32-bit patterns held in int64 → the same bits as int32."""
    return torch.where(patterns >= 2**31, patterns - 2**32, patterns).to(torch.int32)


def _boundary_patterns(mantissa_bits: int) -> torch.Tensor:
    """Every fp32 pattern whose bits below the format's rounding bit are 0, 1 or all ones.

    The head (sign, exponent and the top mantissa_bits + 1 mantissa bits) runs over all values,
    so this holds every grid point of the format and every midpoint between neighbours (ties),
    each ±1 fp32 ulp, in every binade: the format's max and the midpoint to overflow, its
    normal/subnormal boundary and subnormals (they need no more bits), fp32 subnormals, ±0,
    ±inf and NaN payloads.
    """
    shift = 22 - mantissa_bits
    heads = torch.arange(2 ** (32 - shift), dtype=torch.int64) << shift
    tails = torch.tensor([0, 1, (1 << shift) - 1], dtype=torch.int64)
    return _as_int32((heads[:, None] + tails).reshape(-1))


def _random_patterns(count: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return _as_int32(torch.randint(0, 2**32, (count,), generator=generator, dtype=torch.int64))


def _assert_same_bits(actual: torch.Tensor, expected: torch.Tensor, x: torch.Tensor) -> None:
    same = (actual.view(torch.int32) == expected.view(torch.int32)) | (
        torch.isnan(actual) & torch.isnan(expected)
    )
    if not bool(same.all()):
        bad = (~same).nonzero()[:5, 0]
        pytest.fail(
            f"{int((~same).sum())} mismatches, e.g. x={x[bad].tolist()} "
            f"(bits {x[bad].view(torch.int32).tolist()}): got {actual[bad].tolist()}, "
            f"torch {expected[bad].tolist()}"
        )


@pytest.mark.parametrize("fmt", PRESETS, ids=str)
def test_nearest_rounding_equals_torch_cast_bit_exactly(fmt, backend):
    patterns = torch.cat([_boundary_patterns(fmt.mantissa_bits), _random_patterns(2_000_000, 7)])
    x = patterns.view(torch.float32)
    assert bool(torch.isinf(x).any()) and bool(torch.isnan(x).any())
    expected = x.to(fmt.torch_dtype).to(torch.float32)
    _assert_same_bits(quantize(x, QuantSpec(fmt)), expected, x)


@pytest.mark.parametrize("fmt", PRESETS, ids=str)
def test_specials_follow_the_format(fmt):
    x = torch.tensor([0.0, -0.0, math.inf, -math.inf, math.nan, 3.4e38, -3.4e38])
    y = quantize(x, QuantSpec(fmt))
    assert y[0].item() == 0.0 and math.copysign(1.0, y[1].item()) == -1.0
    assert math.isnan(y[4].item())
    if fmt.saturate:  # OCP E4M3 as torch casts it: no inf, overflow saturates to ±448
        assert y[[2, 5]].tolist() == [448.0, 448.0]
        assert y[[3, 6]].tolist() == [-448.0, -448.0]
    else:
        assert y[[2, 3]].tolist() == [math.inf, -math.inf]
        assert torch.isinf(y[5:]).all()


def test_e4m3_without_saturation_overflows_to_nan():
    fmt = MiniFloat(4, 3, has_inf=False, saturate=False)
    y = quantize(torch.tensor([448.0, 463.0, 465.0, math.inf, 1.0]), QuantSpec(fmt))
    # 463 rounds down to 448; 465 is past the midpoint to the (NaN) next pattern.
    assert y[0].item() == 448.0 and y[1].item() == 448.0 and y[4].item() == 1.0
    assert torch.isnan(y[2:4]).all()
