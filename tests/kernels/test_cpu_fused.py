"""The cpu_fused backend against the reference kernels: bit-exact results (nearest and
stochastic rounding with the same seed), thread-count invariance, stochastic-rounding
properties, edge values and shapes, the torch.library registration and the build fallback.

The first run on a machine compiles the extension (about 10–20 s on 2 cores); later runs load
it from the cache.
"""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from qtrain import PerChannel, PerGroup, PerTensor, PerToken, QuantSpec, Rounding, formats
from qtrain import quantize as quantize_tensor
from qtrain.kernels import Backend, cpu_fused, implementation, reference, use_backend

CPU = torch.device("cpu")
NAN, INF = float("nan"), float("inf")
TINY = torch.finfo(torch.float32).tiny
FLT_MAX = torch.finfo(torch.float32).max
# Seeds: small, beyond 32 bits, the top of 64 bits, negative (taken mod 2^64 by both).
SEEDS = [None, 0, 12345, 2**40 + 7, 2**64 - 1, -3]
INT_RANGES = [(-127, 127), (0, 255), (-7, 7), (-32767, 32767), (0, 1)]
# (O, C, I): per-tensor, per-channel, per-token rows, one value per scale, odd sizes.
SHAPES = [(1, 1, 1), (1, 1, 3), (1, 1, 1023), (4, 3, 17), (1, 33, 16), (5, 7, 1), (2, 1, 300)]
MINIFLOATS = [formats.FP8_E4M3, formats.FP8_E5M2, formats.BF16, formats.FP16]
# Beyond the presets: fp4 e2m1 (saturating), e3m2, an 8-bit exponent without inf.
OTHER_MINIFLOATS = [
    formats.MiniFloat(2, 1, has_inf=False, saturate=True),
    formats.MiniFloat(3, 2),
    formats.MiniFloat(8, 3, has_inf=False),
]
# Past one chunk per thread (2^15 elements), odd so the last chunk is ragged.
THREADED_NUMEL = 3 * 2**15 + 17


def _same(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal shapes, dtypes and bit patterns; any NaN matches any NaN at the same place."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    if not actual.is_floating_point():
        assert torch.equal(actual, expected)
        return
    nan = torch.isnan(expected)
    assert torch.equal(torch.isnan(actual), nan)
    bits = torch.int32 if actual.dtype == torch.float32 else torch.int16
    assert torch.equal(actual[~nan].view(bits), expected[~nan].view(bits))


def _values(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Normal values whose magnitudes grow along the last axis from 1e-3 to 1e3."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=generator) * torch.logspace(-3, 3, shape[-1])
    return x.contiguous()


def _qparams(x3: torch.Tensor, qmin: int, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A per-channel scale from the range, and an integer zero point inside [qmin, qmax]."""
    low, high = reference.minmax(x3)
    scale = ((high - low) / (qmax - qmin)).clamp_min(TINY)
    zero_point = (qmin - torch.round(low / scale)).clamp(qmin, qmax)
    return scale, zero_point


# ---- integer kernels -------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("seed", SEEDS)
def test_fake_quant_int_is_bit_exact(fused, shape, seed):
    x3 = _values(shape, seed=len(shape))
    for qmin, qmax in INT_RANGES:
        scale, zero_point = _qparams(x3, qmin, qmax)
        # Some channels cut short, so the clamp and the STE mask are exercised.
        scale = scale * torch.linspace(0.5, 1.0, shape[1])
        expected = reference.fake_quant_int(x3, scale, zero_point, qmin, qmax, seed, True)
        actual = fused.fake_quant_int(x3, scale, zero_point, qmin, qmax, seed, True)
        _same(actual[0], expected[0])
        _same(actual[1], expected[1])
        y3, mask = fused.fake_quant_int(x3, scale, zero_point, qmin, qmax, seed, False)
        assert mask is None
        _same(y3, expected[0])


# Bifurcation's grids: SBM's uint8 / uint16, signed ones, a grid much coarser than the other.
PAIR_RANGES = [((0, 255), (0, 65535)), ((-127, 127), (-32767, 32767)), ((-7, 7), (0, 1))]


@pytest.mark.parametrize("shape", SHAPES + [(3, 2, 5)])
@pytest.mark.parametrize("seed", SEEDS)
def test_fake_quant_int_pair_is_two_quantizations_with_one_seed(fused, shape, seed):
    x3 = _values(shape, seed=len(shape) + 1)
    if shape == (3, 2, 5):
        x3[0, 0, :3] = torch.tensor([NAN, INF, -INF])
        x3 = x3.transpose(0, 2).contiguous().transpose(0, 2)  # non-contiguous, same values
    for (qmin_a, qmax_a), (qmin_b, qmax_b) in PAIR_RANGES:
        scale_a, zero_point_a = _qparams(x3.nan_to_num(0, 0, 0), qmin_a, qmax_a)
        scale_b, zero_point_b = _qparams(x3.nan_to_num(0, 0, 0), qmin_b, qmax_b)
        scale_b = scale_b * torch.linspace(0.5, 1.0, shape[1])  # some values clamped
        args = (x3, scale_a, zero_point_a, qmin_a, qmax_a, scale_b, zero_point_b, qmin_b, qmax_b)
        fake_a, fake_b = fused.fake_quant_int_pair(*args, seed)
        _same(
            fake_a,
            reference.fake_quant_int(x3, scale_a, zero_point_a, qmin_a, qmax_a, seed, False)[0],
        )
        _same(
            fake_b,
            reference.fake_quant_int(x3, scale_b, zero_point_b, qmin_b, qmax_b, seed, False)[0],
        )
        for got, want in zip(
            (fake_a, fake_b), reference.fake_quant_int_pair(*args, seed), strict=True
        ):
            _same(got, want)


def test_fake_quant_int_pair_checks_its_grids(fused):
    x3, one, zero = torch.zeros(1, 2, 4), torch.ones(2), torch.zeros(2)
    with pytest.raises(RuntimeError, match="scale and zero_point"):
        fused.fake_quant_int_pair(x3, one, zero, 0, 1, torch.ones(3), torch.zeros(3), 0, 1, None)
    with pytest.raises(RuntimeError, match="qmin > qmax"):
        fused.fake_quant_int_pair(x3, one, zero, 0, 1, one, zero, 2, 1, None)


def test_nearest_ties_round_to_even(fused):
    x3 = torch.tensor([[[-2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 3.5]]])
    y3, _ = fused.fake_quant_int(x3, torch.ones(1), torch.zeros(1), -127, 127, None, False)
    assert y3.flatten().tolist() == [-2.0, -2.0, -0.0, 0.0, 2.0, 2.0, 4.0]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8, torch.int16, torch.int32])
def test_levels_in_storage_dtypes_equal_the_reference_levels(fused, seed, dtype):
    x3 = _values((3, 4, 50))
    qmin, qmax = (0, 255) if dtype == torch.uint8 else (-127, 127)
    scale, zero_point = _qparams(x3, qmin, qmax)
    expected = reference.quant_int(x3, scale, zero_point, qmin, qmax, seed)
    _same(fused.quant_int(x3, scale, zero_point, qmin, qmax, seed), expected)
    levels = fused.quant_int_levels(x3, scale, zero_point, qmin, qmax, seed, dtype)
    _same(levels, expected.to(dtype))
    fake, mask, saved = fused.fake_quant_int_levels(
        x3, scale, zero_point, qmin, qmax, seed, True, dtype
    )
    reference_fake, reference_mask = reference.fake_quant_int(
        x3, scale, zero_point, qmin, qmax, seed, True
    )
    _same(fake, reference_fake)
    _same(mask, reference_mask)
    _same(saved, levels)
    # Saved activations: backward rebuilds exactly the x̂ the forward used.
    _same(fused.dequant_int(saved, scale, zero_point), fake)


def test_non_finite_values_follow_the_reference(fused):
    x3 = torch.tensor([[[NAN, INF, -INF, 0.0, -0.0, 1e-45, -TINY, FLT_MAX, -FLT_MAX, 0.7]]])
    for seed in (None, 5):
        scale, zero_point = torch.tensor([0.01]), torch.tensor([3.0])
        expected = reference.fake_quant_int(x3, scale, zero_point, -127, 127, seed, True)
        actual = fused.fake_quant_int(x3, scale, zero_point, -127, 127, seed, True)
        _same(actual[0], expected[0])
        _same(actual[1], expected[1])
        _same(
            fused.quant_int(x3, scale, zero_point, -127, 127, seed),
            reference.quant_int(x3, scale, zero_point, -127, 127, seed),
        )
    # NaN has no integer level: stored as 0.
    levels = fused.quant_int_levels(x3, torch.ones(1), torch.zeros(1), -127, 127, None, torch.int8)
    assert levels.flatten().tolist()[:3] == [0, 127, -127]


@given(
    shape=st.tuples(st.integers(1, 3), st.integers(1, 4), st.integers(1, 40)),
    values=st.lists(st.floats(width=32), min_size=1, max_size=480),
    seed=st.none() | st.integers(0, 2**64 - 1),
    signed=st.booleans(),
)
def test_any_float32_values_are_bit_exact(fused, shape, values, seed, signed):
    numel = shape[0] * shape[1] * shape[2]
    cycled = values * (numel // len(values) + 1)
    x3 = torch.tensor(cycled[:numel], dtype=torch.float32).view(shape)
    qmin, qmax = (-127, 127) if signed else (0, 255)
    scale = reference.absmax(x3).nan_to_num(1.0, 1.0).clamp(TINY, FLT_MAX) / 127
    zero_point = torch.zeros(shape[1]) if signed else torch.full((shape[1],), 128.0)
    expected = reference.fake_quant_int(x3, scale, zero_point, qmin, qmax, seed, True)
    actual = fused.fake_quant_int(x3, scale, zero_point, qmin, qmax, seed, True)
    _same(actual[0], expected[0])
    _same(actual[1], expected[1])
    dtype = torch.int8 if signed else torch.uint8
    args = (x3, scale, zero_point, qmin, qmax, seed, True, dtype)
    for got, want in zip(
        fused.fake_quant_int_levels(*args), reference.fake_quant_int_levels(*args), strict=True
    ):
        _same(got, want)
    levels = reference.fake_quant_int_levels(*args)[2]
    _same(
        fused.dequant_int(levels, scale, zero_point),
        reference.dequant_int(levels, scale, zero_point),
    )
    for fmt in MINIFLOATS:
        args = (fmt.exponent_bits, fmt.mantissa_bits, fmt.has_inf, fmt.saturate, seed)
        _same(fused.fake_quant_minifloat(x3, *args), reference.fake_quant_minifloat(x3, *args))
    # The bifurcated pair: this grid and one 256 times finer (SBM's 8/16 bits).
    pair = (x3, scale, zero_point, qmin, qmax, scale / 256, zero_point * 256, 0, 65535, seed)
    for got, want in zip(
        fused.fake_quant_int_pair(*pair), reference.fake_quant_int_pair(*pair), strict=True
    ):
        _same(got, want)


# ---- saved activations: levels and their dequantization --------------------------------------

# (storage dtype, qmin, qmax): the formats' own, a narrow range in a wide dtype, float levels.
STORAGES = [
    (torch.int8, -128, 127),
    (torch.uint8, 0, 255),
    (torch.int16, -32767, 32767),
    (torch.int32, -7, 7),
    (torch.float32, 0, 255),
]


def _with_edge_values(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Fresh normal values with, at random places, ±0, subnormals, tiny and huge magnitudes,
    values on rounding ties, NaN and ±inf."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=generator) * torch.logspace(-3, 3, shape[-1])
    special = torch.tensor(
        [0.0, -0.0, 1e-45, -1e-40, TINY, 1e30, -FLT_MAX, 0.5, -2.5, NAN, INF, -INF]
    )
    flat = x.view(-1)
    places = torch.randperm(flat.numel(), generator=generator)[: max(1, flat.numel() // 5)]
    flat[places] = special[torch.randint(len(special), (len(places),), generator=generator)]
    return x


def _finite_qparams(x3: torch.Tensor, qmin: int, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``_qparams`` of the finite values, cut short on some channels so that values clip."""
    finite = torch.where(torch.isfinite(x3), x3, torch.zeros_like(x3)).clamp(-1e6, 1e6)
    scale, zero_point = _qparams(finite, qmin, qmax)
    return scale * torch.linspace(0.25, 1.0, x3.shape[1]), zero_point


@pytest.mark.parametrize("storage", STORAGES, ids=lambda s: str(s[0]).removeprefix("torch."))
@pytest.mark.parametrize("seed", [None, 0, 2**40 + 7, 2**64 - 1])
@pytest.mark.parametrize("shape", SHAPES)
def test_fake_quant_int_levels_equals_its_reference_twin(fused, shape, seed, storage):
    dtype, qmin, qmax = storage
    x3 = _with_edge_values(shape, seed=len(shape) + shape[-1])
    scale, zero_point = _finite_qparams(x3, qmin, qmax)
    for want_mask in (True, False):
        args = (x3, scale, zero_point, qmin, qmax, seed, want_mask, dtype)
        fake, mask, levels = fused.fake_quant_int_levels(*args)
        expected_fake, expected_mask, expected_levels = reference.fake_quant_int_levels(*args)
        _same(fake, expected_fake)
        _same(levels, expected_levels)
        if want_mask:
            _same(mask, expected_mask)
        else:
            assert mask is None and expected_mask is None
    # The twins are what the ops layer relies on: x̂ as fake_quant_int computes it, and the
    # levels back through dequant_int give x̂ again wherever x was a number.
    _same(fake, reference.fake_quant_int(x3, scale, zero_point, qmin, qmax, seed, False)[0])
    is_number = ~torch.isnan(x3)  # NaN has no integer level: stored as 0
    _same(reference.dequant_int(levels, scale, zero_point)[is_number], fake[is_number])


@pytest.mark.parametrize("storage", STORAGES, ids=lambda s: str(s[0]).removeprefix("torch."))
@pytest.mark.parametrize("shape", SHAPES + [(2, 3, THREADED_NUMEL // 6)])
def test_dequant_int_equals_its_reference_twin(fused, shape, storage):
    dtype, _, _ = storage
    generator = torch.Generator().manual_seed(shape[-1])
    if dtype.is_floating_point:
        levels3 = torch.randint(-300, 300, shape, generator=generator).to(dtype)
    else:
        info = torch.iinfo(dtype)  # the dtype's whole range, its extremes included
        levels3 = torch.randint(info.min, info.max, shape, generator=generator, dtype=torch.int64)
        levels3.view(-1)[:2] = torch.tensor([info.min, info.max])[: levels3.numel()]
        levels3 = levels3.to(dtype)
    # Scales from subnormal to huge (products overflow to inf), zero points inside and out.
    scale = torch.logspace(-40, 30, shape[1])[torch.randperm(shape[1], generator=generator)]
    zero_point = torch.linspace(-200.0, 300.0, shape[1]).round()
    _same(
        fused.dequant_int(levels3, scale, zero_point),
        reference.dequant_int(levels3, scale, zero_point),
    )
    strided = levels3.transpose(0, 2).contiguous().transpose(0, 2)  # same values, other strides
    _same(
        fused.dequant_int(strided, scale, zero_point),
        reference.dequant_int(levels3, scale, zero_point),
    )


# ---- reductions ------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES + [(3, 2, THREADED_NUMEL // 6)])
def test_minmax_and_absmax_are_exact(fused, shape):
    x3 = _values(shape) - 0.25
    _same(fused.absmax(x3), reference.absmax(x3))
    for actual, expected in zip(fused.minmax(x3), reference.minmax(x3), strict=True):
        _same(actual, expected)


def test_reductions_propagate_nan_and_see_inf(fused):
    x3 = torch.tensor([[[1.0, NAN, -2.0], [INF, -3.0, 0.5]], [[0.0, 4.0, -1.0], [-INF, 2.0, 1.0]]])
    _same(fused.absmax(x3), reference.absmax(x3))
    for actual, expected in zip(fused.minmax(x3), reference.minmax(x3), strict=True):
        _same(actual, expected)
    assert fused.absmax(torch.full((1, 1, 5), -0.0)).item() == 0.0
    subnormal = torch.tensor([[[1e-45, -2e-45, 0.0]]])  # subnormals keep their order
    low, high = fused.minmax(subnormal)
    assert (low.item(), high.item()) == (subnormal.min().item(), subnormal.max().item())


# ---- minifloats -----------------------------------------------------------------------------


def _minifloat_inputs() -> torch.Tensor:
    generator = torch.Generator().manual_seed(3)
    spread = torch.randn(4000, generator=generator) * torch.logspace(-45, 38, 4000).clamp(max=1e38)
    special = torch.tensor(
        [NAN, INF, -INF, 0.0, -0.0, 1e-45, -1e-45, TINY, 1e-40, FLT_MAX, -FLT_MAX]
        + [448.0, 464.0, -480.0, 57344.0, 61440.0, 65504.0, 65520.0]  # tops and overflows
        + [2.0**-9, 2.0**-10, 3 * 2.0**-11, 0.5, 1.5]  # fp8 subnormals, ties
    )
    return torch.cat([spread, special])


@pytest.mark.parametrize("fmt", MINIFLOATS + OTHER_MINIFLOATS, ids=str)
@pytest.mark.parametrize("seed", [None, 0, 2**63 + 1])
def test_minifloat_is_bit_exact(fused, fmt, seed):
    x = _minifloat_inputs()
    args = (fmt.exponent_bits, fmt.mantissa_bits, fmt.has_inf, fmt.saturate, seed)
    _same(fused.fake_quant_minifloat(x, *args), reference.fake_quant_minifloat(x, *args))


@pytest.mark.parametrize("fmt", MINIFLOATS, ids=str)
def test_minifloat_presets_equal_torch_casts(fused, fmt):
    x = _minifloat_inputs()
    args = (fmt.exponent_bits, fmt.mantissa_bits, fmt.has_inf, fmt.saturate, None)
    _same(fused.fake_quant_minifloat(x, *args), x.to(fmt.torch_dtype).to(torch.float32))


# ---- threads, rounding statistics ------------------------------------------------------------


def _results(fused, x3: torch.Tensor, seed: int | None) -> list[torch.Tensor]:
    scale, zero_point = _qparams(x3, 0, 255)
    fake, mask, levels = fused.fake_quant_int_levels(
        x3, scale * 0.9, zero_point, 0, 255, seed, True, torch.uint8
    )
    signed = fused.fake_quant_int_levels(
        x3, scale, zero_point - 128, -128, 127, seed, True, torch.int8
    )
    return [
        fake,
        mask,
        levels,
        fused.dequant_int(levels, scale, zero_point),
        *signed,
        fused.dequant_int(signed[2], scale, zero_point - 128),
        *fused.minmax(x3),
        fused.absmax(x3),
        fused.fake_quant_minifloat(x3, 4, 3, False, True, seed),
        *fused.fake_quant_int_pair(
            x3, scale, zero_point, 0, 255, scale / 7, zero_point, 0, 65535, seed
        ),
    ]


@pytest.mark.parametrize("seed", [None, 99])
@pytest.mark.parametrize("channels", [1, 3])
def test_one_and_two_threads_give_identical_results(fused, seed, channels):
    x3 = _values((1, channels, THREADED_NUMEL))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = _results(fused, x3, seed)
        torch.set_num_threads(2)
        double = _results(fused, x3, seed)
    finally:
        torch.set_num_threads(threads)
    for one, two in zip(single, double, strict=True):
        _same(two, one)


@given(value=st.floats(-100.0, 100.0), seed=st.integers(0, 2**64 - 1))
def test_stochastic_rounding_is_unbiased_onto_the_two_neighbours(fused, value, seed):
    count = 20_000
    x3 = torch.full((1, 1, count), value)
    levels = fused.quant_int(x3, torch.ones(1), torch.zeros(1), -1000, 1000, seed)
    v = torch.tensor(value)  # the float32 value actually rounded
    low, high = torch.floor(v), torch.ceil(v)
    assert bool(((levels == low) | (levels == high)).all())
    fraction = float(v - low)
    # The hash's uniforms sit on a 2^-24 grid: P(up) = ceil(fraction·2^24)/2^24.
    sigma = max((fraction * (1 - fraction) / count) ** 0.5, 1 / count)
    assert abs(float(levels.mean() - low) - fraction) <= 5 * sigma + 2.0**-24


def test_minifloat_stochastic_rounding_is_unbiased(fused):
    x = torch.full((50_000,), 1.0 + 1.0 / 3.0)  # between e4m3 grid points 1.25 and 1.375
    y = fused.fake_quant_minifloat(x, 4, 3, False, True, 11)
    assert set(y.unique().tolist()) == {1.25, 1.375}
    assert abs(float(y.double().mean()) - float(x[0])) < 5 * 0.125 * (0.25 / 50_000) ** 0.5


# ---- shapes, layouts, the quantizer on top ---------------------------------------------------


def test_empty_and_degenerate_views(fused):
    empty = torch.empty(0, 3, 4)
    fake, mask = fused.fake_quant_int(empty, torch.ones(3), torch.zeros(3), -127, 127, 1, True)
    assert fake.shape == mask.shape == (0, 3, 4)
    assert fused.fake_quant_minifloat(torch.empty(0), 4, 3, False, True, None).shape == (0,)
    assert fused.minmax(torch.empty(2, 0, 5))[0].shape == (0,)
    for kernel in (fused.absmax, fused.minmax, reference.absmax, reference.minmax):
        with pytest.raises(IndexError):
            kernel(torch.empty(0, 3, 4))


def test_large_outputs_reuse_freed_blocks_and_stay_correct(fused):
    x3 = _values((1, 1, 3 * 2**20))  # 12 MiB outputs: served by the block cache
    scale, zero_point = reference.absmax(x3) / 127, torch.zeros(1)
    expected = reference.fake_quant_int(x3, scale, zero_point, -127, 127, None, False)[0]
    first = fused.fake_quant_int(x3, scale, zero_point, -127, 127, None, False)[0]
    _same(first, expected)
    second = fused.fake_quant_int(x3, scale * 2, zero_point, -127, 127, None, False)[0]
    assert second.data_ptr() != first.data_ptr()
    _same(first, expected)  # a live output is never handed out again
    freed = (first.data_ptr(), second.data_ptr())
    del first, second
    third = fused.fake_quant_int(x3, scale, zero_point, -127, 127, None, False)[0]
    assert third.data_ptr() in freed  # warm memory, not a fresh mapping
    _same(third, expected)
    third.resize_(third.numel() + 1)  # storages stay resizable


def test_inputs_are_checked(fused):
    with pytest.raises(RuntimeError, match="float32"):
        fused.absmax(torch.zeros(1, 1, 4, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="scale and zero_point"):
        fused.fake_quant_int(torch.zeros(1, 2, 4), torch.ones(3), torch.zeros(3), 0, 1, None, False)
    with pytest.raises(RuntimeError, match="levels dtype"):
        fused.quant_int_levels(
            torch.zeros(1, 1, 4), torch.ones(1), torch.zeros(1), 0, 1, None, torch.float64
        )


def test_non_contiguous_input_is_read_in_logical_order(fused):
    x3 = _values((6, 5, 4)).transpose(0, 2)  # (4, 5, 6), non-contiguous
    scale, zero_point = _qparams(x3.contiguous(), -127, 127)
    expected = reference.fake_quant_int(x3, scale, zero_point, -127, 127, 3, False)[0]
    _same(fused.fake_quant_int(x3, scale, zero_point, -127, 127, 3, False)[0], expected)
    args = (x3, scale, zero_point, -127, 127, 3, True, torch.int8)
    for got, want in zip(
        fused.fake_quant_int_levels(*args), reference.fake_quant_int_levels(*args), strict=True
    ):
        _same(got, want)
    _same(
        fused.fake_quant_minifloat(x3, 5, 2, True, False, 3),
        reference.fake_quant_minifloat(x3, 5, 2, True, False, 3),
    )


GRANULARITIES = [PerTensor(), PerChannel(1), PerChannel(0), PerGroup(4, axis=1), PerToken()]
FORMATS = [formats.INT8, formats.UINT8, formats.INT4, formats.FP8_E4M3]


@pytest.mark.parametrize("granularity", GRANULARITIES, ids=lambda g: type(g).__name__)
@pytest.mark.parametrize("fmt", FORMATS, ids=str)
@pytest.mark.parametrize("rounding", list(Rounding))
def test_quantize_through_canonical_view_matches_the_reference(fused, granularity, fmt, rounding):
    x = _values((3, 5, 8, 6)).permute(0, 2, 3, 1)  # a channels-last-like strided view
    spec = QuantSpec(fmt, granularity=granularity, rounding=rounding)
    results = []
    for backend in (Backend.REFERENCE, Backend.CPU_FUSED):
        with use_backend(backend):
            results.append(quantize_tensor(x, spec, generator=torch.Generator().manual_seed(4)))
    _same(results[1], results[0])


# ---- Range BatchNorm kernels -------------------------------------------------------------------

# (B, C, HW, chunks): the model's shapes shrunk, short rows (scalar path) and long (vector path),
# one chunk, one sample per chunk, odd sizes; runs that split samples (B not a multiple of K),
# with a remainder in no run, and runs shorter than a sample.
RANGE_BN_SHAPES = [
    (32, 3, 49, 16),
    (16, 2, 9, 16),
    (12, 5, 17, 4),
    (8, 1, 1, 8),
    (6, 4, 33, 1),
    (20, 3, 49, 16),
    (5, 2, 7, 16),
    (3, 2, 40, 16),
    (100, 3, 9, 16),
]
EPS32 = torch.finfo(torch.float32).eps


def _range_bn_input(shape: tuple[int, int, int], seed: int = 0) -> torch.Tensor:
    """Per-channel offsets and magnitudes from 1e-3 to 1e3, so centring matters."""
    generator = torch.Generator().manual_seed(seed)
    batch, channels, spatial = shape
    magnitude = torch.logspace(-3, 3, channels).view(1, -1, 1)
    offset = torch.randn(1, channels, 1, generator=generator) * magnitude
    return torch.randn(shape, generator=generator) * magnitude + offset


def _assert_stats_equal(got, want):
    # float64 sums of the same float32 values in another order: a few float64 roundings.
    for sums, expected in zip(got[:2], want[:2], strict=True):
        bound = 64 * torch.finfo(torch.float64).eps * expected.abs() + 1e-300
        assert sums.dtype == torch.float64 and bool(((sums - expected).abs() <= bound).all())
    for actual, expected in zip(got[2:], want[2:], strict=True):
        _same(actual, expected)


@pytest.mark.parametrize("shape", RANGE_BN_SHAPES)
def test_range_bn_stats_equal_the_reference(fused, shape):
    *dims, chunks = shape
    x3 = _range_bn_input(tuple(dims))
    _assert_stats_equal(fused.range_bn_stats(x3, chunks), reference.range_bn_stats(x3, chunks))


def test_range_bn_stats_ties_zeros_and_specials_follow_torch(fused):
    for x3, chunks in _specials_for_range_bn():
        got, want = fused.range_bn_stats(x3, chunks), reference.range_bn_stats(x3, chunks)
        for actual, expected in zip(got[2:], want[2:], strict=True):
            _same(actual, expected)
        for sums, expected in zip(got[:2], want[:2], strict=True):
            torch.testing.assert_close(sums, expected, equal_nan=True)
    special = _specials_for_range_bn()[-2][0]
    got = fused.range_bn_stats(special, 2)
    assert torch.isnan(got[2][0, 0]) and torch.isnan(got[4][0, 0])  # run 0 holds the NaNs
    assert int(got[3][0, 0]) == int(got[5][0, 0]) == 1 * 25 + 7  # sample 1 comes first


def test_range_bn_stats_and_backward_read_non_contiguous_input(fused):
    x3 = _range_bn_input((20, 3, 16)).transpose(0, 2).contiguous().transpose(0, 2)
    assert not x3.is_contiguous()
    _assert_stats_equal(fused.range_bn_stats(x3, 4), reference.range_bn_stats(x3, 4))
    scale, shift = torch.rand(3) + 0.5, torch.randn(3)
    _same(fused.channel_affine(x3, scale, shift), reference.channel_affine(x3, scale, shift))


def _channels_last(x3: torch.Tensor) -> torch.Tensor:
    """The (B, C, S) batch in the channels-last layout: C innermost, as a channels_last
    (B, C, H, W) tensor viewed as (B, C, H·W) is."""
    return x3.transpose(1, 2).contiguous().transpose(1, 2)


def _specials_for_range_bn() -> list[tuple[torch.Tensor, int]]:
    generator = torch.Generator().manual_seed(3)
    # Coarse grid: every chunk's max and min are tied; the first position wins, as torch.max.
    tied = torch.randint(-2, 3, (16, 3, 20), generator=generator).float()
    # Many channels: a channels-last run spans many rows-of-channels vectors, ties across them.
    wide = torch.randint(-2, 3, (64, 24, 20), generator=generator).float()
    # Signed zeros tie with each other (a chunk of -0 and +0 only, in both orders).
    zeros = torch.zeros(4, 2, 6)
    zeros[0, 0, :3] = -0.0
    zeros[2, 1, 3:] = -0.0
    # NaN: both extremes NaN at the first NaN; inf and float32's largest values are extremes.
    special = _range_bn_input((8, 3, 25))
    special[1, 0, 7] = NAN
    special[3, 0, 2] = NAN
    special[5, 1, 4] = INF
    special[6, 1, 0] = -INF
    special[2, 2, 3] = FLT_MAX
    special[4, 2, 3] = -FLT_MAX
    return [(tied, 4), (tied, 7), (wide, 4), (wide, 3), (zeros, 2), (special, 2), (special, 3)]


@pytest.mark.parametrize("shape", RANGE_BN_SHAPES)
def test_range_bn_stats_of_channels_last_batches_equal_the_reference(fused, shape):
    # The channels-last kernel walks rows of C values: the same runs, extremes and positions.
    *dims, chunks = shape
    x3 = _range_bn_input(tuple(dims))
    cl = _channels_last(x3)
    assert cl.is_contiguous() == (dims[1] == 1 or dims[2] == 1)
    _assert_stats_equal(fused.range_bn_stats(cl, chunks), reference.range_bn_stats(x3, chunks))


def test_range_bn_stats_of_channels_last_ties_zeros_and_specials_follow_torch(fused):
    for x3, chunks in _specials_for_range_bn():
        got = fused.range_bn_stats(_channels_last(x3), chunks)
        want = reference.range_bn_stats(x3, chunks)
        for actual, expected in zip(got[2:], want[2:], strict=True):
            _same(actual, expected)
        for sums, expected in zip(got[:2], want[:2], strict=True):
            torch.testing.assert_close(sums, expected, equal_nan=True)


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("shape", [(4, 3, 5, 7), (2, 17, 3, 3), (3, 2, 1, 1), (1, 5, 2, 9)])
def test_channel_affine_keeps_channels_last_and_is_bit_exact(fused, shape, relu):
    x = _values(shape).contiguous(memory_format=torch.channels_last)
    x[0, 0, 0, :4] = torch.tensor([NAN, INF, -INF, -0.0])[: shape[3]]
    scale, shift = torch.randn(shape[1]), torch.randn(shape[1])
    if relu:
        got = fused.channel_affine_relu(x, scale, shift)
        want = reference.channel_affine_relu(x.contiguous(), scale, shift)
    else:
        got = (fused.channel_affine(x, scale, shift),)
        want = (reference.channel_affine(x.contiguous(), scale, shift),)
    for actual, expected in zip(got, want, strict=True):
        _same(actual, expected)
        assert actual.stride() == x.stride()


@pytest.mark.parametrize("shape", [(4, 3, 5, 7), (6, 2, 17), (5, 4), (3, 2, 2, 2, 2)])
def test_channel_affine_is_bit_exact(fused, shape):
    x = _values(shape)
    x.view(-1)[:4] = torch.tensor([NAN, INF, -INF, -0.0])
    scale, shift = torch.randn(shape[1]), torch.randn(shape[1])
    _same(fused.channel_affine(x, scale, shift), reference.channel_affine(x, scale, shift))
    empty = torch.empty(0, shape[1], 3)
    assert fused.channel_affine(empty, scale, shift).shape == empty.shape


def _range_bn_backward_args(shape, chunks, seed=0):
    x3 = _range_bn_input(shape, seed)
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(seed + 1))
    sums, rest, high, high_index, low, low_index = reference.range_bn_stats(x3, chunks)
    mean = ((sums.sum(0) + rest) / (shape[0] * shape[2])).float()
    inv_spread = 1.0 / ((high.mean(0) - low.mean(0)) * 0.4 + 1e-5)
    gamma = torch.rand(shape[1]) + 0.5
    return grad, x3, mean, inv_spread, gamma, 0.4, high_index, low_index


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape", RANGE_BN_SHAPES)
def test_range_bn_backward_matches_the_reference_within_float32_summation(fused, shape, layout):
    *dims, chunks = shape
    args = _range_bn_backward_args(tuple(dims), chunks)
    grad, x3, mean, inv_spread, gamma, constant = args[:6]
    want = reference.range_bn_backward(*args)
    if layout == "channels_last":
        args = (_channels_last(grad), _channels_last(x3), *args[2:])
    got = fused.range_bn_backward(*args)
    assert got[0].stride() == args[1].stride()  # grad_x in x's layout
    # The kernel sums each row (HW values) in float32 over the vector lanes (channels-last:
    # in float64), the reference in float64: the difference is bounded by n·eps·Σ|terms| with
    # n the row's length.
    rows = dims[2] + 16
    centred = (x3 - mean.view(1, -1, 1)).double()
    abs_g = grad.double().abs().sum(dim=(0, 2))
    abs_gx = (grad.double() * centred).abs().sum(dim=(0, 2))
    sum_bound = rows * EPS32 * abs_g + 1e-30
    sum_gx_bound = rows * EPS32 * abs_gx + 1e-30
    grad_x, grad_gamma, grad_beta = got
    assert bool(((grad_beta.double() - want[2].double()).abs() <= sum_bound * 1.01).all())
    gamma_bound = sum_gx_bound * inv_spread.double() * 1.01
    assert bool(((grad_gamma.double() - want[1].double()).abs() <= gamma_bound).all())
    # grad_x: per channel, the mean term moves by γs·Δ(Σg)/n, the range term (at the extremes)
    # by C·γ·s²·Δ(Σg(x − μ))/K, plus one float32 rounding of each output.
    slope = (gamma * inv_spread).double()
    count = dims[0] * dims[2]
    shift_bound = slope * sum_bound / count + constant * slope * inv_spread * sum_gx_bound / chunks
    rounding = 4 * EPS32 * (want[0].double().abs() + 1e-30)
    bound = shift_bound.view(1, -1, 1) * 1.01 + rounding
    assert bool(((grad_x.double() - want[0].double()).abs() <= bound).all())


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_range_bn_kernels_give_identical_results_on_one_and_two_threads(fused, layout):
    args = _range_bn_backward_args((64, 8, 784), 16)
    if layout == "channels_last":
        args = (_channels_last(args[0]), _channels_last(args[1]), *args[2:])
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            results.append(
                [
                    *fused.range_bn_stats(args[1], 16),
                    fused.channel_affine(args[1], args[3], args[2]),
                    *fused.range_bn_backward(*args),
                ]
            )
    finally:
        torch.set_num_threads(threads)
    for one, two in zip(*results, strict=True):
        _same(two, one)


def test_range_bn_backward_takes_its_inputs_in_mixed_layouts(fused):
    # g (and a mask) in another layout than x: brought to x's, the same result in x's layout.
    args = list(_range_bn_backward_args((12, 5, 17), 4))
    mask = torch.rand(12, 5, 17, generator=torch.Generator().manual_seed(2)) < 0.5
    x_cl = _channels_last(args[1])
    want = fused.range_bn_backward(_channels_last(args[0]), x_cl, *args[2:], _channels_last(mask))
    got = fused.range_bn_backward(args[0], x_cl, *args[2:], mask)
    for actual, expected in zip(got, want, strict=True):
        _same(actual, expected)
    assert got[0].stride() == x_cl.stride()
    got = fused.range_bn_backward(_channels_last(args[0]), *args[1:], _channels_last(mask))
    _same(got[0], fused.range_bn_backward(*args, mask)[0])
    assert got[0].is_contiguous()


def test_range_bn_kernels_check_their_inputs(fused):
    x3 = torch.zeros(8, 2, 4)
    with pytest.raises(RuntimeError, match="chunks must be in 1..B·HW"):
        fused.range_bn_stats(x3, 33)
    with pytest.raises(RuntimeError, match="float32"):
        fused.range_bn_stats(x3.double(), 2)
    with pytest.raises(RuntimeError, match="scale and zero_point"):
        fused.channel_affine(x3, torch.ones(3), torch.zeros(3))
    index = torch.zeros(2, 2, dtype=torch.int64)
    ones = torch.ones(2)
    with pytest.raises(IndexError, match="index out of range"):
        fused.range_bn_backward(x3, x3, ones, ones, ones, 1.0, index + 99, index)
    with pytest.raises(RuntimeError, match="indices"):
        fused.range_bn_backward(x3, x3, ones, ones, ones, 1.0, index.int(), index)
    # The ops themselves (the wrappers bring other layouts to one of these two).
    strided = torch.zeros(2, 8, 4).transpose(0, 1)
    with pytest.raises(RuntimeError, match="contiguous or channels-last"):
        torch.ops.qtrain.range_bn_stats(strided, 2)
    with pytest.raises(RuntimeError, match="contiguous or channels-last"):
        torch.ops.qtrain.channel_affine(strided, ones, ones)
    with pytest.raises(RuntimeError, match="differ in shape or layout"):
        torch.ops.qtrain.range_bn_backward(
            _channels_last(x3), x3, ones, ones, ones, 1.0, index, index
        )
    with pytest.raises(RuntimeError, match="shape and strides"):
        torch.ops.qtrain.masked_zero(x3, _channels_last(x3) > 0)


def test_range_batchnorm_trains_the_same_on_both_backends(fused):
    # Module level: forward, backward and running statistics of RangeBatchNorm2d under the
    # reference and cpu_fused backends agree (sums may differ in the last float32 bit).
    from qtrain.nn import RangeBatchNorm2d

    x = _range_bn_input((32, 4, 36)).view(32, 4, 6, 6)
    g = torch.randn(32, 4, 6, 6, generator=torch.Generator().manual_seed(9))
    results = []
    for backend in (Backend.REFERENCE, Backend.CPU_FUSED):
        bn = RangeBatchNorm2d(4)
        with torch.no_grad():
            bn.weight.copy_(torch.linspace(0.5, 1.5, 4))
        xb = x.clone().requires_grad_()
        with use_backend(backend):
            y = bn(xb)
            y.backward(g)
        results.append((y, xb.grad, bn.weight.grad, bn.bias.grad, bn.running_mean, bn.running_var))
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(
            got, want, rtol=1e-5, atol=1e-5 * float(want.detach().abs().max())
        )


@pytest.mark.parametrize("relu", [False, True])
def test_range_batchnorm_on_channels_last_input_keeps_the_layout(fused, relu):
    # A channels_last batch (as `qtrain train` feeds the net) stays channels_last through the
    # layer, forward and backward, with the results of the contiguous batch.
    from qtrain.nn import RangeBatchNorm2d

    x = _range_bn_input((32, 4, 36)).view(32, 4, 6, 6)
    g = torch.randn(32, 4, 6, 6, generator=torch.Generator().manual_seed(9))
    results = []
    for layout in (torch.contiguous_format, torch.channels_last):
        bn = RangeBatchNorm2d(4)
        bn.fused_relu = relu
        xb = x.contiguous(memory_format=layout).detach().requires_grad_()
        with use_backend(Backend.CPU_FUSED):
            y = bn(xb)
            y.backward(g.contiguous(memory_format=layout))
        assert y.is_contiguous(memory_format=layout) and xb.grad.is_contiguous(memory_format=layout)
        results.append((y, xb.grad, bn.weight.grad, bn.bias.grad, bn.running_mean, bn.running_var))
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(
            got, want, rtol=1e-5, atol=1e-5 * float(want.detach().abs().max())
        )


def test_channel_affine_relu_is_bit_exact(fused):
    x = _values((4, 3, 5, 7))
    x.view(-1)[:4] = torch.tensor([NAN, INF, -INF, -0.0])
    scale, shift = torch.randn(3), torch.randn(3)
    scale[0] = 1.0
    shift[0] = 0.0  # channel 0: -0.0 stays -0.0 through the affine, as torch.relu keeps it
    got, want = (
        fused.channel_affine_relu(x, scale, shift),
        reference.channel_affine_relu(x, scale, shift),
    )
    for actual, expected in zip(got, want, strict=True):
        _same(actual, expected)
    _same(got[0], torch.relu(reference.channel_affine(x, scale, shift)))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape", RANGE_BN_SHAPES)
def test_range_bn_backward_through_a_relu_mask_is_the_unfused_pair(fused, shape, layout):
    # Reading g through the fused ReLU's mask gives bit for bit what the separate ReLU
    # backward (masked_zero) followed by the plain Range BN backward gives.
    *dims, chunks = shape
    args = list(_range_bn_backward_args(tuple(dims), chunks))
    mask = torch.rand(tuple(dims), generator=torch.Generator().manual_seed(7)) < 0.5
    args[0].view(-1)[:3] = torch.tensor([NAN, INF, -INF])
    mask.view(-1)[:3] = True  # non-finite gradients where the ReLU zeroes them
    if layout == "channels_last":
        args[0], args[1], mask = (_channels_last(t) for t in (args[0], args[1], mask))
    fused_pair = fused.range_bn_backward(*args, zero_mask=mask)
    unfused = fused.range_bn_backward(fused.masked_zero(args[0], mask), *args[1:])
    for got, want in zip(fused_pair, unfused, strict=True):
        _same(got, want)
    reference_pair = reference.range_bn_backward(*args, zero_mask=mask)
    reference_unfused = reference.range_bn_backward(reference.masked_zero(args[0], mask), *args[1:])
    for got, want in zip(reference_pair, reference_unfused, strict=True):
        _same(got, want)


# ---- compact ReLU kernels -------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1,), (7, 13), (4, 3, 5, 7), (THREADED_NUMEL,)])
def test_zero_mask_and_masked_zero_equal_the_reference(fused, shape):
    y = torch.relu(_values(shape, seed=2))
    g = _values(shape, seed=3)
    specials = torch.tensor([NAN, INF, -INF, -0.0, 0.0, TINY, -TINY, FLT_MAX])
    y.view(-1)[: min(8, y.numel())] = specials[: y.numel()]
    g.view(-1)[-min(8, g.numel()) :] = specials[: g.numel()]
    mask = fused.zero_mask(y)
    _same(mask, reference.zero_mask(y))
    _same(fused.masked_zero(g, mask), reference.masked_zero(g, mask))
    # torch's own ReLU backward, which the pair replaces
    _same(fused.masked_zero(g, mask), torch.ops.aten.threshold_backward(g, y, 0))


def test_compact_relu_kernels_keep_a_dense_layout(fused):
    # channels_last (or any dense permutation) is walked in memory order: the mask comes in
    # y's layout; a gradient in another layout is brought to the mask's.
    y = torch.relu(_values((4, 6, 5, 3), seed=2)).contiguous(memory_format=torch.channels_last)
    g = _values((4, 6, 5, 3), seed=3)
    mask = fused.zero_mask(y)
    assert mask.stride() == y.stride()
    _same(mask, reference.zero_mask(y))
    for grad in (g, g.contiguous(memory_format=torch.channels_last)):
        out = fused.masked_zero(grad, mask)
        _same(out, torch.ops.aten.threshold_backward(g, y, 0))
        assert out.stride() == y.stride()


def test_compact_relu_kernels_on_odd_inputs(fused):
    y = torch.relu(_values((6, 5, 4))).transpose(0, 2)  # non-contiguous
    g = _values((4, 5, 6))
    _same(fused.zero_mask(y), reference.zero_mask(y))
    _same(fused.masked_zero(g, fused.zero_mask(y)), reference.masked_zero(g, y <= 0))
    empty = torch.empty(0, 3)
    assert fused.zero_mask(empty).shape == (0, 3)
    assert fused.masked_zero(empty, fused.zero_mask(empty)).shape == (0, 3)
    half = torch.randn(8, dtype=torch.bfloat16)  # other dtypes: the reference ops
    _same(fused.masked_zero(half, fused.zero_mask(half)), reference.masked_zero(half, half <= 0))


def test_compact_relu_kernels_give_identical_results_on_one_and_two_threads(fused):
    y, g = torch.relu(_values((THREADED_NUMEL,), 4)), _values((THREADED_NUMEL,), 5)
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            mask = fused.zero_mask(y)
            results.append((mask, fused.masked_zero(g, mask)))
    finally:
        torch.set_num_threads(threads)
    for one, two in zip(*results, strict=True):
        _same(two, one)


# ---- 2×2 max pool -----------------------------------------------------------------------------

POOL_SHAPES = [
    (1, 1, 2, 2),
    (2, 3, 5, 7),
    (4, 2, 28, 28),
    (2, 2, 3, 66),
    (1, 3, 64, 33),
    (2, 37, 7, 6),  # channels-last rows of 37: a vector and a ragged tail
]


def _pool_input(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Small integers (ties in windows) with NaN, ±0 and -inf sprinkled in."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randint(-3, 4, shape, generator=generator).float()
    flat = x.view(-1)
    for step, value in ((7, 0.0), (11, -0.0), (13, NAN), (17, -INF), (23, INF)):
        flat[::step] = value
    return x


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("path", ["vector", "scalar"])
@pytest.mark.parametrize("shape", POOL_SHAPES)
def test_max_pool2x2_and_its_backward_equal_torchs(fused, shape, path, layout, monkeypatch):
    # The AVX-512 rows (where compiled in) and the portable rows must both be torch's bits;
    # channels_last runs its own loops over the channels and keeps the layout.
    if path == "scalar":
        monkeypatch.setenv("QTRAIN_SCALAR_POOL", "1")
    x = _pool_input(shape)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    y, where = fused.max_pool2x2(x)
    assert y.stride() == where.stride() == torch.nn.functional.max_pool2d(x, 2).stride()
    expected_y, expected_where = reference.max_pool2x2(x)
    _same(y, expected_y)
    _same(where, expected_where)
    torch_y = torch.nn.functional.max_pool2d(x, 2)
    _same(y, torch_y)
    grad = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    grad.view(-1)[::5] = -0.0  # torch adds into zeros: -0 becomes +0
    grad.view(-1)[1::9] = NAN
    leaf = x.clone().requires_grad_()
    torch.nn.functional.max_pool2d(leaf, 2).backward(grad)
    height, width = shape[2:]
    grad_x = fused.max_pool2x2_backward(grad, where, height, width)
    _same(grad_x, leaf.grad)
    assert grad_x.stride() == x.stride()
    _same(reference.max_pool2x2_backward(grad, where, height, width), leaf.grad)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=str)
def test_max_pool2x2_on_one_and_two_threads_and_non_contiguous_input(fused, layout):
    x = _pool_input((3, 8, 30, 30), seed=2)  # 21600 values a plane row split between threads
    x = torch.cat([x] * 8, 0).contiguous(memory_format=layout)
    threads = torch.get_num_threads()
    try:
        results = []
        for count in (1, 2):
            torch.set_num_threads(count)
            y, where = fused.max_pool2x2(x)
            grad = torch.randn(y.shape, generator=torch.Generator().manual_seed(3))
            results.append((y, where, fused.max_pool2x2_backward(grad, where, 30, 30)))
    finally:
        torch.set_num_threads(threads)
    for one, two in zip(*results, strict=True):
        _same(two, one)
    view = x.transpose(2, 3)  # non-contiguous: read in logical order
    for got, want in zip(fused.max_pool2x2(view), reference.max_pool2x2(view), strict=True):
        _same(got, want)


def test_max_pool2x2_checks_its_inputs(fused):
    with pytest.raises(RuntimeError, match="H, W >= 2"):
        torch.ops.qtrain.max_pool2x2(torch.zeros(1, 1, 1, 4))
    with pytest.raises(RuntimeError, match="pooled shape"):
        fused.max_pool2x2_backward(
            torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2, dtype=torch.uint8), 6, 4
        )


# ---- registration, compile, fallback, cache ----------------------------------------------------


def test_ops_pass_torch_library_opcheck(fused):
    x3 = _values((2, 3, 5))
    scale, zero_point = torch.rand(3) + 0.1, torch.zeros(3)
    levels = torch.randint(-127, 128, (2, 3, 5), dtype=torch.int8)
    cases = [
        (torch.ops.qtrain.minmax, (x3,)),
        (torch.ops.qtrain.absmax, (x3,)),
        (
            torch.ops.qtrain.quantize_int,
            (x3, scale, zero_point, -127, 127, 7, True, True, torch.int8),
        ),
        (
            torch.ops.qtrain.quantize_int,
            (x3, scale, zero_point, -127, 127, None, True, False, None),
        ),
        (
            torch.ops.qtrain.quantize_int_pair,
            (x3, scale, zero_point, 0, 255, scale / 3, zero_point, 0, 65535, 7),
        ),
        (
            torch.ops.qtrain.quantize_int_pair,
            (x3, scale, zero_point, -7, 7, scale, zero_point, -127, 127, None),
        ),
        (torch.ops.qtrain.dequantize_int, (levels, scale, zero_point)),
        (torch.ops.qtrain.max_pool2x2, (x3.view(2, 3, 1, 5).expand(2, 3, 2, 5).contiguous(),)),
        (
            torch.ops.qtrain.max_pool2x2_backward,
            (
                x3[:, :, :2].reshape(2, 3, 1, 2).contiguous(),
                torch.zeros(2, 3, 1, 2, dtype=torch.uint8),
                3,
                5,
            ),
        ),
        (torch.ops.qtrain.fake_quant_minifloat, (x3, 4, 3, False, True, 7)),
        (torch.ops.qtrain.range_bn_stats, (x3, 2)),
        (torch.ops.qtrain.channel_affine, (x3, scale, zero_point)),
        (torch.ops.qtrain.zero_mask, (x3,)),
        (torch.ops.qtrain.channel_affine_relu, (x3, scale, zero_point)),
        (
            torch.ops.qtrain.range_bn_backward,
            (x3, x3, scale, scale, scale, 0.5, *torch.zeros(2, 2, 3, dtype=torch.int64), x3 > 0),
        ),
        (torch.ops.qtrain.masked_zero, (x3, x3 > 0)),
        (
            torch.ops.qtrain.range_bn_backward,
            (x3, x3, scale, scale, scale, 0.5, *torch.zeros(2, 2, 3, dtype=torch.int64)),
        ),
    ]
    # Channels-last inputs: the outputs' strides (the input's layout) must match the fakes'.
    cl3 = _channels_last(x3)
    x4 = _values((2, 3, 4, 6)).contiguous(memory_format=torch.channels_last)
    pooled = x4[:, :, :2, :3].contiguous(memory_format=torch.channels_last)
    cases += [
        (torch.ops.qtrain.range_bn_stats, (cl3, 2)),
        (torch.ops.qtrain.channel_affine, (cl3, scale, zero_point)),
        (torch.ops.qtrain.channel_affine_relu, (x4, scale, zero_point)),
        (torch.ops.qtrain.zero_mask, (x4,)),
        (torch.ops.qtrain.masked_zero, (x4, x4 > 0)),
        (
            torch.ops.qtrain.range_bn_backward,
            (cl3, cl3, scale, scale, scale, 0.5, *torch.zeros(2, 2, 3, dtype=torch.int64), cl3 > 0),
        ),
        (torch.ops.qtrain.max_pool2x2, (x4,)),
        (
            torch.ops.qtrain.max_pool2x2_backward,
            (pooled, torch.zeros_like(pooled, dtype=torch.uint8), 4, 6),
        ),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


def test_torch_compile_traces_the_ops_as_graph_nodes(fused):
    def step(x3: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        y3, _ = fused.fake_quant_int(x3, scale, torch.zeros(1), -127, 127, 5, False)
        return y3 * 2

    x3 = _values((1, 1, 64))
    scale = fused.absmax(x3) / 127
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    _same(compiled(x3, scale), step(x3, scale))


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=str)
def test_torch_compile_traces_range_batchnorm_training_in_one_graph(fused, layout):
    from qtrain.nn import RangeBatchNorm2d

    x = _range_bn_input((32, 4, 36)).view(32, 4, 6, 6).contiguous(memory_format=layout)
    g = torch.randn(32, 4, 6, 6, generator=torch.Generator().manual_seed(5))
    g = g.contiguous(memory_format=layout)
    results = []
    for compiled in (False, True):
        bn = RangeBatchNorm2d(4).train()
        bn.fused_relu = layout == torch.channels_last  # the fused pair too
        layer = torch.compile(bn, backend="aot_eager", fullgraph=True) if compiled else bn
        xb = x.clone(memory_format=torch.preserve_format).requires_grad_()
        with use_backend(Backend.CPU_FUSED):
            y = layer(xb)
            y.backward(g)
        results.append((y.detach(), xb.grad, bn.weight.grad, bn.bias.grad, bn.running_var))
    for got, want in zip(*results, strict=True):
        _same(got, want)


def test_auto_falls_back_to_the_reference_with_one_warning(monkeypatch):
    def fail() -> None:
        raise RuntimeError("c++: command not found")

    monkeypatch.setattr(cpu_fused, "_build_and_load", fail)
    monkeypatch.setattr(cpu_fused, "_available", None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with use_backend(Backend.AUTO):
            assert implementation(CPU) is reference
            assert implementation(CPU) is reference
    assert [str(w.message) for w in caught] == [
        "qtrain: cpu_fused kernels unavailable (c++: command not found); using the reference"
    ]
    with pytest.raises(RuntimeError, match="not available"):
        implementation(CPU, Backend.CPU_FUSED)


def test_cache_directory_is_keyed_by_cpu_and_configurable(monkeypatch, tmp_path):
    monkeypatch.setenv("QTRAIN_CACHE_DIR", str(tmp_path))
    here = cpu_fused.cache_dir()
    assert here.parent == tmp_path and here.name.startswith("ext-")
    monkeypatch.setattr(cpu_fused, "_cpu_flags", lambda: "flags : sse2")
    assert cpu_fused.cache_dir() != here


def test_importing_qtrain_builds_nothing():
    code = (
        "import sys, qtrain, qtrain.kernels.cpu_fused as f; "
        "print(f._available, 'torch.utils.cpp_extension' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["None", "False"]
