"""The quantizer: agreement with torch's fake_quantize, stochastic rounding, granularities,
degenerate inputs, integer levels, LSQ and the spec's JSON form."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from qtrain import (
    AbsMax,
    Clip,
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
    compute_qparams,
    formats,
    quantize,
    quantize_int,
)
from qtrain.formats import BlockFloat, FormatError, Int, MiniFloat
from qtrain.quantizer import qparams_from_range

INT8 = QuantSpec(formats.INT8)  # symmetric, absmax
UINT8 = QuantSpec(formats.UINT8)  # affine, min/max (GEMMLOWP)


def _randn(*shape: int, seed: int = 0, scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=generator) * scale + shift


def _leaf(x: torch.Tensor) -> torch.Tensor:
    return x.detach().clone().requires_grad_(True)


# ---- agreement with torch.fake_quantize_* ----------------------------------------------------


@given(
    rows=st.integers(1, 40),
    cols=st.integers(1, 40),
    scale=st.floats(1e-3, 1e3),
    shift=st.floats(-2.0, 2.0),
    seed=st.integers(0, 2**16),
    spec=st.sampled_from([UINT8, INT8]),
)
def test_per_tensor_values_equal_torch_fake_quantize(rows, cols, scale, shift, seed, spec):
    x = _randn(rows, cols, seed=seed, scale=scale, shift=shift * scale)
    qp = compute_qparams(x, spec)
    expected = torch.fake_quantize_per_tensor_affine(
        x, float(qp.scale), int(qp.zero_point), spec.format.qmin, spec.format.qmax
    )
    assert torch.equal(quantize(x, spec), expected)


@given(
    shape=st.lists(st.integers(1, 9), min_size=1, max_size=3),
    data=st.data(),
    seed=st.integers(0, 2**16),
    signed=st.booleans(),
)
def test_per_channel_values_equal_torch_fake_quantize(shape, data, seed, signed):
    axis = data.draw(st.integers(-len(shape), len(shape) - 1))
    spec = QuantSpec(formats.INT8 if signed else formats.UINT8, granularity=PerChannel(axis))
    # Channels of very different magnitudes, so a shared scale would be visibly wrong.
    magnitudes = torch.logspace(-2, 2, shape[axis]).view(
        [-1] + [1] * (len(shape) - axis % len(shape) - 1)
    )
    x = _randn(*shape, seed=seed, shift=0.3) * magnitudes
    qp = compute_qparams(x, spec)
    expected = torch.fake_quantize_per_channel_affine(
        x,
        qp.scale,
        qp.zero_point.to(torch.int32),
        axis % x.dim(),
        spec.format.qmin,
        spec.format.qmax,
    )
    assert torch.equal(quantize(x, spec), expected)


def test_per_tensor_gradient_equals_torch_fake_quantize_where_values_clip(backend):
    x = _randn(64, 32, seed=1, scale=2.0)
    spec = QuantSpec(formats.INT8, scale=Clip(1.5))  # |x| > 1.5 saturates
    ours, theirs = _leaf(x), _leaf(x)
    grad = _randn(64, 32, seed=2)
    quantize(ours, spec).backward(grad)
    y = torch.fake_quantize_per_tensor_affine(theirs, 1.5 / 127, 0, -127, 127)
    y.backward(grad)
    assert torch.equal(ours.grad, theirs.grad)
    zeroed = ours.grad == 0
    assert 0 < int(zeroed.sum()) < x.numel()  # the mask really cut some values off


@pytest.mark.parametrize("spec", [UINT8, QuantSpec(formats.INT8, scale=MinMax())], ids=str)
def test_given_qparams_values_and_gradient_equal_torch_fake_quantize(spec, backend):
    # Running-range style: qparams measured on a narrower batch, so the wider x clips.
    qp = compute_qparams(_randn(16, 8, seed=3), spec)
    x = _randn(64, 8, seed=4, scale=2.0, shift=0.5)
    grad = _randn(64, 8, seed=5)
    ours, theirs = _leaf(x), _leaf(x)
    y_ours = quantize(ours, spec, qparams=qp)
    y_theirs = torch.fake_quantize_per_tensor_affine(
        theirs, float(qp.scale), int(qp.zero_point), spec.format.qmin, spec.format.qmax
    )
    assert torch.equal(y_ours, y_theirs)
    y_ours.backward(grad)
    y_theirs.backward(grad)
    assert torch.equal(ours.grad, theirs.grad)
    assert 0 < int((ours.grad == 0).sum()) < x.numel()


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_per_channel_gradient_equals_torch_fake_quantize_with_given_qparams(axis, backend):
    spec = QuantSpec(formats.INT8, granularity=PerChannel(axis))
    x = _randn(12, 10, seed=6, scale=2.0)
    qp = compute_qparams(x * 0.5, spec)  # half the range: the outer values clip
    grad = _randn(12, 10, seed=7)
    ours, theirs = _leaf(x), _leaf(x)
    y_ours = quantize(ours, spec, qparams=qp)
    y_theirs = torch.fake_quantize_per_channel_affine(
        theirs, qp.scale, qp.zero_point.to(torch.int32), axis % 2, -127, 127
    )
    assert torch.equal(y_ours, y_theirs)
    y_ours.backward(grad)
    y_theirs.backward(grad)
    assert torch.equal(ours.grad, theirs.grad)
    assert 0 < int((ours.grad == 0).sum()) < x.numel()


def test_ties_round_half_to_even_like_torch(backend):
    spec = QuantSpec(formats.INT8, scale=Clip(127 * 0.25))  # step exactly 0.25
    x = torch.tensor([0.125, 0.375, 0.625, -0.125, -0.375, -0.625, 31.625, 31.875])
    expected = torch.fake_quantize_per_tensor_affine(x, 0.25, 0, -127, 127)
    assert torch.equal(quantize(x, spec), expected)
    assert quantize(x, spec).tolist() == [0.0, 0.5, 0.5, 0.0, -0.5, -0.5, 31.5, 31.75]


def test_clip_gradient_false_passes_the_gradient_everywhere():
    x = _leaf(_randn(100, seed=8, scale=3.0))
    quantize(x, QuantSpec(formats.INT8, scale=Clip(1.0), clip_gradient=False)).sum().backward()
    assert torch.equal(x.grad, torch.ones(100))


def test_absmax_does_not_clip_so_its_gradient_is_the_identity():
    x = _leaf(_randn(50, seed=9))
    quantize(x, INT8).sum().backward()
    assert torch.equal(x.grad, torch.ones(50))


# ---- stochastic rounding --------------------------------------------------------------------

SR_INT8 = QuantSpec(formats.INT8, scale=Clip(4.0), rounding=Rounding.STOCHASTIC)
STEP = 4.0 / 127  # the grid step of SR_INT8


@pytest.mark.parametrize(
    "spec",
    [
        SR_INT8,
        QuantSpec(formats.UINT8, rounding=Rounding.STOCHASTIC),
        QuantSpec(formats.Int(4), granularity=PerChannel(0), rounding=Rounding.STOCHASTIC),
    ],
    ids=str,
)
def test_stochastic_levels_are_the_two_neighbours(spec, backend):
    x = _randn(64, 50, seed=10)
    g = torch.Generator().manual_seed(0)
    q, scale, zero_point = quantize_int(x, spec, generator=g)
    position = x / scale + zero_point  # where x lies on the integer grid
    lower = torch.floor(position).clamp(spec.format.qmin, spec.format.qmax)
    upper = torch.ceil(position).clamp(spec.format.qmin, spec.format.qmax)
    levels = q.to(torch.float32)
    assert bool(((levels == lower) | (levels == upper)).all())
    differ = lower != upper  # both neighbours really occur
    assert bool((levels == lower)[differ].any()) and bool((levels == upper)[differ].any())


def test_stochastic_fake_quant_values_are_the_two_neighbours(backend):
    x = _randn(10_000, seed=11, scale=0.8)  # inside the clip range ±4
    y = quantize(x, SR_INT8, generator=torch.Generator().manual_seed(1))
    lower, upper = torch.floor(x / STEP) * STEP, torch.ceil(x / STEP) * STEP
    tol = 1e-6
    on_grid = ((y - lower).abs() <= tol) | ((y - upper).abs() <= tol)
    assert bool(on_grid.all())
    assert bool(((y - x).abs() < STEP).all())


def _unbiased_bound(step: float, n: int, k: float = 5.0) -> float:
    # Each error e_i = x̂_i − x_i is a two-point variable on a span of one step with mean 0
    # (unbiased rounding), so Var(e_i) = step²·p(1−p) ≤ step²/4 and the mean of n independent
    # errors has std ≤ step/(2√n). k = 5 standard deviations; plus the bias that the 2^-24 grid
    # of the uniforms allows (≤ step·2^-24 per value).
    return k * step / (2 * math.sqrt(n)) + step * 2.0**-24


@pytest.mark.parametrize("fraction", [0.25, 0.6, 0.9])
def test_stochastic_rounding_is_unbiased(fraction, backend):
    # Every value sits at the same fraction of its grid cell: nearest rounding would err by
    # −fraction·step or (1 − fraction)·step on every value, far outside the bound.
    n = 200_000
    cells = torch.randint(-100, 100, (n,), generator=torch.Generator().manual_seed(12))
    x = (cells + fraction) * STEP
    error = quantize(x, SR_INT8, generator=torch.Generator().manual_seed(3)) - x
    bound = _unbiased_bound(STEP, n)
    assert abs(float(error.double().mean())) <= bound
    nearest = quantize(x, dataclasses.replace(SR_INT8, rounding=Rounding.NEAREST)) - x
    assert abs(float(nearest.double().mean())) > 10 * bound


# (low, high, format): the real zero point qmin − low/scale is 63.75, 8.5, 0.43 (4 bits), 52.97.
AFFINE_RANGES = [
    (-1.0, 3.0, formats.UINT8),
    (-0.13, 3.77, formats.UINT8),
    (-0.5, 17.0, Int(4, signed=False)),
    (-2.2, 0.9, formats.INT8),
]


def _end_probes(low: float, high: float, step: float) -> torch.Tensor:
    """Values at, and within a step of, both ends of [low, high], plus zero."""
    near = torch.tensor([0.0, 0.1, 0.3, 0.49, 0.5, 0.7, 0.95])
    return torch.cat([low + near * step, high - near * step, torch.zeros(1)])


def _mean_of_draws(
    probes: torch.Tensor, low: float, high: float, spec: QuantSpec, n: int, qparams=None
):
    """The mean over n independent stochastic roundings of each probe, quantized in one tensor
    whose observed range is exactly [low, high] (its first two values)."""
    x = torch.cat([torch.tensor([low, high]), probes.repeat(n)])
    y = quantize(x, spec, generator=torch.Generator().manual_seed(5), qparams=qparams)
    return y[2:].view(n, -1).double().mean(0)


@pytest.mark.parametrize("low, high, fmt", AFFINE_RANGES, ids=str)
def test_stochastic_rounding_is_unbiased_at_and_near_both_ends_of_the_range(
    low, high, fmt, backend
):
    spec = QuantSpec(fmt, scale=MinMax(), rounding=Rounding.STOCHASTIC)
    qparams = qparams_from_range(torch.tensor([low]), torch.tensor([high]), fmt)
    step = float(qparams.scale)
    assert step <= (high - low) / (fmt.qmax - fmt.qmin - 1)  # at most one level lost
    n = 40_000
    probes = _end_probes(low, high, step)
    mean = _mean_of_draws(probes, low, high, spec, n)
    bound = _unbiased_bound(step, n)
    assert (mean - probes.double()).abs().max().item() <= bound
    # The test has teeth: the plain nudged grid (scale (high − low)/steps, zero point rounded)
    # misses one end and its rounding there is biased far beyond the bound.
    steps = fmt.qmax - fmt.qmin
    plain_scale = (high - low) / steps
    nudged = QParams(
        torch.tensor([plain_scale]), torch.tensor([float(fmt.qmin - round(low / plain_scale))])
    )
    biased = _mean_of_draws(probes, low, high, spec, n, qparams=nudged)
    assert (biased - probes.double()).abs().max().item() > 10 * bound


def test_covering_range_keeps_an_end_at_zero_exact():
    for low, high in ((0.0, 2.0), (-2.0, 0.0)):
        qparams = qparams_from_range(torch.tensor([low]), torch.tensor([high]), formats.UINT8)
        assert float(qparams.scale) == pytest.approx((high - low) / 255)
        grid = (torch.arange(256.0) - qparams.zero_point) * qparams.scale
        assert float(grid.min()) == pytest.approx(low) and float(grid.max()) == pytest.approx(high)
        assert 0.0 in grid


def test_stochastic_rounding_error_mean_shrinks_like_one_over_sqrt_n(backend):
    x = _randn(400_000, seed=13, scale=0.5)  # inside the clip range ±4
    g = torch.Generator().manual_seed(4)
    for n in (1_000, 20_000, 400_000):
        error = quantize(x[:n], SR_INT8, generator=g) - x[:n]
        assert abs(float(error.double().mean())) <= _unbiased_bound(STEP, n)


def test_stochastic_rounding_is_reproducible_with_a_generator(backend):
    x = _randn(5000, seed=14)
    first = quantize(x, SR_INT8, generator=torch.Generator().manual_seed(42))
    again = quantize(x, SR_INT8, generator=torch.Generator().manual_seed(42))
    other = quantize(x, SR_INT8, generator=torch.Generator().manual_seed(43))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_stochastic_rounding_follows_torch_manual_seed_without_a_generator(backend):
    x = _randn(5000, seed=15)
    torch.manual_seed(7)
    first, second = quantize(x, SR_INT8), quantize(x, SR_INT8)
    torch.manual_seed(7)
    assert torch.equal(quantize(x, SR_INT8), first)
    assert not torch.equal(first, second)  # the global generator advanced


@pytest.mark.parametrize("fmt", [formats.FP8_E4M3, formats.FP8_E5M2, formats.BF16], ids=str)
def test_minifloat_stochastic_rounding(fmt, backend):
    spec = QuantSpec(fmt, rounding=Rounding.STOCHASTIC)
    n = 100_000
    # Values spread over four binades (both signs), away from the subnormals and overflow.
    x = torch.exp2(torch.rand(n, generator=torch.Generator().manual_seed(16)) * 4 - 1)
    x = x * torch.where(torch.arange(n) % 2 == 0, 1.0, -1.0)
    exponent = torch.floor(torch.log2(x.abs()))
    ulp = torch.exp2(exponent - fmt.mantissa_bits)  # grid step in x's binade
    lower, upper = torch.floor(x / ulp) * ulp, torch.ceil(x / ulp) * ulp
    y = quantize(x, spec, generator=torch.Generator().manual_seed(5))
    assert bool(((y == lower) | (y == upper)).all())
    # Unbiased: the normalised errors (x̂ − x)/ulp have variance ≤ 1/4.
    assert abs(float(((y - x) / ulp).double().mean())) <= _unbiased_bound(1.0, n)
    again = quantize(x, spec, generator=torch.Generator().manual_seed(5))
    assert torch.equal(y, again)
    assert not torch.equal(y, quantize(x, spec, generator=torch.Generator().manual_seed(6)))


# ---- granularities --------------------------------------------------------------------------


@given(
    shape=st.lists(st.integers(1, 6), min_size=1, max_size=4),
    data=st.data(),
    seed=st.integers(0, 1000),
)
def test_per_channel_quantizes_each_slice_on_its_own(shape, data, seed):
    axis = data.draw(st.integers(-len(shape), len(shape) - 1))
    spec = QuantSpec(formats.Int(4), granularity=PerChannel(axis))
    x = _randn(*shape, seed=seed) * torch.arange(1, shape[axis] + 1).view(
        [-1] + [1] * (len(shape) - axis % len(shape) - 1)
    )
    y = quantize(x, spec)
    per_tensor = QuantSpec(formats.Int(4))
    for c in range(shape[axis]):
        assert torch.equal(y.select(axis, c), quantize(x.select(axis, c).contiguous(), per_tensor))


def test_negative_axis_is_the_same_channel():
    x = _randn(3, 5, 7, seed=17)
    for axis in range(-3, 0):
        a = quantize(x, QuantSpec(formats.INT8, granularity=PerChannel(axis)))
        b = quantize(x, QuantSpec(formats.INT8, granularity=PerChannel(axis % 3)))
        assert torch.equal(a, b)
    with pytest.raises(QuantSpecError, match="axis"):
        quantize(x, QuantSpec(formats.INT8, granularity=PerChannel(3)))


@pytest.mark.parametrize(
    ("shape", "axis", "group"), [((6, 8), -1, 4), ((8, 3), 0, 2), ((2, 6, 5), 1, 3)]
)
def test_per_group_quantizes_each_group_on_its_own(shape, axis, group):
    x = _randn(*shape, seed=18) * torch.linspace(0.1, 10, math.prod(shape)).view(shape)
    y = quantize(x, QuantSpec(formats.Int(4), granularity=PerGroup(group, axis)))
    moved_x, moved_y = x.movedim(axis, -1), y.movedim(axis, -1)
    groups_x = moved_x.reshape(-1, group)
    groups_y = moved_y.reshape(-1, group)
    for gx, gy in zip(groups_x, groups_y, strict=True):
        assert torch.equal(gy, quantize(gx.contiguous(), QuantSpec(formats.Int(4))))


def test_per_group_size_must_divide_the_axis():
    with pytest.raises(QuantSpecError, match="group_size"):
        quantize(torch.randn(4, 10), QuantSpec(formats.INT8, granularity=PerGroup(4)))
    for bad in (0, -2, True, 2.0):
        with pytest.raises(QuantSpecError, match="group_size"):
            PerGroup(bad)


def test_per_token_quantizes_each_row_on_its_own():
    x = _randn(2, 3, 8, seed=19) * torch.arange(1, 7).view(2, 3, 1)
    y = quantize(x, QuantSpec(formats.INT8, granularity=PerToken()))
    for b in range(2):
        for t in range(3):
            assert torch.equal(y[b, t], quantize(x[b, t].contiguous(), INT8))


def test_block_float_is_power_of_two_scaled_groups():
    fmt = BlockFloat(mantissa_bits=6, block_size=4)
    spec = QuantSpec(fmt)
    assert spec.granularity == PerGroup(4, -1) and spec.scale == PowerOfTwo()
    x = _randn(3, 8, seed=20) * torch.tensor([1.0, 1.0, 1.0, 1.0, 100.0, 100.0, 100.0, 100.0])
    q, scale, _ = quantize_int(x, spec)
    assert scale.shape == (3, 2)
    assert torch.equal(torch.exp2(torch.log2(scale).round()), scale)  # powers of two
    # The exponent of each block is the smallest that fits its absmax into ±31.
    amax = x.view(3, 2, 4).abs().amax(-1)
    assert bool((amax / scale <= 31).all()) and bool((amax / scale > 31 / 2).all())
    y = quantize(x, spec)
    assert torch.equal(y, (q.float().view(3, 2, 4) * scale.unsqueeze(-1)).view(3, 8))
    explicit = QuantSpec(Int(6), granularity=PerGroup(4), scale=PowerOfTwo())
    assert torch.equal(y, quantize(x, explicit))


def test_block_float_spec_takes_granularity_from_the_format():
    with pytest.raises(QuantSpecError, match="BlockFloat"):
        QuantSpec(BlockFloat(8), granularity=PerChannel(0))
    with pytest.raises(QuantSpecError, match="BlockFloat"):
        QuantSpec(BlockFloat(8), scale=AbsMax())
    spec = QuantSpec(BlockFloat(8, 4))
    assert dataclasses.replace(spec, rounding=Rounding.STOCHASTIC).granularity == PerGroup(4, -1)


NONCONTIGUOUS_SPECS = [
    INT8,
    UINT8,
    QuantSpec(formats.INT8, granularity=PerChannel(0)),
    QuantSpec(formats.UINT8, granularity=PerChannel(-1)),
    QuantSpec(formats.Int(4), granularity=PerGroup(3, 0)),
    QuantSpec(formats.INT8, granularity=PerToken()),
    QuantSpec(formats.FP8_E4M3),
    QuantSpec(formats.FP8_E5M2, scale=AbsMax()),
    QuantSpec(BlockFloat(5, 2)),
]


@pytest.mark.parametrize("spec", NONCONTIGUOUS_SPECS, ids=str)
def test_noncontiguous_inputs_equal_their_contiguous_copy(spec, backend):
    base = _randn(12, 10, seed=21, scale=3.0)
    views = [base.t(), base[::2, 1:7], base.t()[2:8:2], base.unsqueeze(0).expand(3, 12, 10)[1]]
    for view in views:
        try:
            expected = quantize(view.contiguous(), spec)
        except QuantSpecError:
            continue  # the group does not divide this view's axis
        assert torch.equal(quantize(view, spec), expected)
    assert not views[0].is_contiguous() and not views[1].is_contiguous()


@pytest.mark.parametrize("rounding", list(Rounding))
@pytest.mark.parametrize("batch_mean", [False, True])
def test_a_dense_permuted_tensor_is_quantized_in_memory_order_and_keeps_its_layout(
    rounding, batch_mean, backend
):
    # Per tensor, a channels_last tensor is read in memory order without a copy and the
    # result has its strides, so a channels_last network stays channels_last. The values are
    # those of the contiguous tensor (the range, and each sample's range, are the same);
    # stochastic rounding's stream follows memory order, i.e. it is that of the NHWC tensor.
    x = _randn(4, 6, 5, 3, seed=5, scale=2.0).contiguous(memory_format=torch.channels_last)
    spec = QuantSpec(formats.UINT8, scale=MinMax(batch_mean=batch_mean), rounding=rounding)

    def quantized(t: torch.Tensor) -> torch.Tensor:
        return quantize(t, spec, generator=torch.Generator().manual_seed(8))

    y = quantized(x)
    assert y.stride() == x.stride()
    assert torch.equal(y, quantized(x.permute(0, 2, 3, 1).contiguous()).permute(0, 3, 1, 2))
    if rounding is Rounding.NEAREST:
        assert torch.equal(y, quantized(x.contiguous()))
    # One input channel, as `qtrain train`'s augmented batches: strides (HW, 1, W, 1) kept.
    single = _randn(4, 5, 6, 1, seed=6).permute(0, 3, 1, 2)
    assert single.is_contiguous() and quantized(single).stride() == single.stride()
    # Batch not outermost: not a run of memory per sample; the logical order (a copy).
    swapped = _randn(6, 4, 5, seed=7).transpose(0, 1)
    assert torch.equal(quantized(swapped), quantized(swapped.contiguous()))


@given(shape=st.lists(st.integers(1, 7), min_size=1, max_size=4), seed=st.integers(0, 1000))
def test_odd_shapes_keep_shape_and_error_bound(shape, seed):
    x = _randn(*shape, seed=seed)
    for spec in (INT8, UINT8, QuantSpec(formats.INT8, granularity=PerToken())):
        y = quantize(x, spec)
        assert y.shape == x.shape and y.dtype == x.dtype
        step = compute_qparams(x, spec).scale.max()
        assert float((y - x).abs().max()) <= float(step) / 2 * (1 + 1e-5)


@pytest.mark.parametrize(
    "spec",
    [
        INT8,
        UINT8,
        QuantSpec(formats.INT8, granularity=PerChannel(1)),
        QuantSpec(formats.FP16),
        QuantSpec(formats.INT8, granularity=PerGroup(2)),
        SR_INT8,
    ],
    ids=str,
)
def test_empty_tensors(spec):
    x = torch.empty(0, 4, requires_grad=True)
    y = quantize(x, spec)
    assert y.shape == (0, 4) and y.dtype == x.dtype
    y.sum().backward()
    assert x.grad.shape == (0, 4)
    if spec.int_format is not None:
        q, scale, zero_point = quantize_int(x.detach(), spec)
        assert q.shape == (0, 4) and q.dtype == spec.int_format.storage_dtype
        assert zero_point.dtype == torch.int32


def test_zero_dim_tensors():
    x = torch.tensor(0.7)
    y = quantize(x, INT8)
    assert y.shape == () and math.isclose(float(y), 0.7, rel_tol=1e-6)  # absmax maps to qmax
    assert math.isclose(float(quantize(torch.tensor(-3.0), UINT8)), -3.0, rel_tol=1e-6)
    q, scale, _ = quantize_int(x, INT8)
    assert q.shape == () and int(q) == 127 and scale.shape == ()
    for granularity in (PerChannel(0), PerToken()):
        with pytest.raises(QuantSpecError):
            quantize(x, QuantSpec(formats.INT8, granularity=granularity))


@pytest.mark.parametrize(
    "spec",
    [
        INT8,
        UINT8,
        SR_INT8,
        QuantSpec(formats.INT8, scale=PowerOfTwo()),
        QuantSpec(BlockFloat(8, 2)),
        QuantSpec(formats.FP8_E4M3, scale=AbsMax()),
        QuantSpec(formats.UINT8, scale=MinMax(batch_mean=True)),
    ],
    ids=str,
)
def test_all_zero_tensor_quantizes_to_zeros(spec):
    x = torch.zeros(4, 6, requires_grad=True)
    y = quantize(x, spec)
    assert torch.equal(y, torch.zeros(4, 6))
    y.sum().backward()
    assert not torch.isnan(x.grad).any()


@pytest.mark.parametrize("format_", [formats.INT8, formats.UINT8], ids=str)
def test_all_zero_channel_quantizes_to_zeros(format_):
    x = _randn(5, 6, seed=22)
    x[2] = 0.0
    spec = QuantSpec(format_, granularity=PerChannel(0))
    y = quantize(x, spec)
    assert not torch.isnan(y).any()
    assert torch.equal(y[2], torch.zeros(6))
    assert torch.allclose(y, x, atol=float(compute_qparams(x, spec).scale.max()))


@pytest.mark.parametrize(
    "spec",
    [
        INT8,
        UINT8,
        QuantSpec(formats.INT8, scale=Clip(1.0)),
        QuantSpec(formats.INT8, granularity=PerChannel(0)),
        QuantSpec(formats.INT8, scale=MinMax(batch_mean=True)),
        QuantSpec(BlockFloat(8, 2)),
    ],
    ids=str,
)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nonfinite_values_raise_by_default(spec, bad):
    x = _randn(4, 6, seed=23)
    x[1, 2] = bad
    with pytest.raises(NonFiniteError):
        quantize(x, spec)
    with pytest.raises(NonFiniteError):
        quantize_int(x, spec)


# ---- per-tensor qparams on the host ----------------------------------------------------------

FLOAT32_VALUES = st.floats(width=32, allow_nan=False, allow_infinity=False) | st.sampled_from(
    [0.0, -0.0, 1e-45, -1e-45, 1.1754944e-38, 3.4028235e38, -3.4028235e38, 1.0, -2.5]
)
INT_FORMATS = [
    Int(bits, signed=signed) for bits in (2, 3, 4, 8, 12, 16) for signed in (True, False)
]


@given(low=FLOAT32_VALUES, high=FLOAT32_VALUES, int_format=st.sampled_from(INT_FORMATS))
def test_per_tensor_qparams_on_the_host_equal_the_tensor_ops(low, high, int_format):
    # A one-value CPU range is computed in host float32 arithmetic (one .item() per bound
    # instead of a dozen one-element ops); it must give the tensor ops' bits exactly,
    # overflowing ranges and sub-normal ones included.
    low, high = min(low, high), max(low, high)
    one = qparams_from_range(torch.tensor([low]), torch.tensor([high]), int_format)
    two = qparams_from_range(torch.tensor([low, low]), torch.tensor([high, high]), int_format)
    for name in ("scale", "zero_point"):
        host, ops = getattr(one, name), getattr(two, name)[:1]
        assert host.shape == ops.shape and host.dtype == ops.dtype == torch.float32
        assert torch.equal(host.view(torch.int32), ops.view(torch.int32)), name


def test_per_tensor_qparams_of_a_non_finite_or_differentiable_range_use_the_tensor_ops():
    for low, high in ((math.nan, 1.0), (-math.inf, 1.0), (0.0, math.inf)):
        one = qparams_from_range(torch.tensor([low]), torch.tensor([high]), formats.UINT8)
        two = qparams_from_range(torch.tensor([low] * 2), torch.tensor([high] * 2), formats.UINT8)
        assert torch.equal(one.scale, two.scale[:1])
        assert torch.equal(one.zero_point.nan_to_num(), two.zero_point[:1].nan_to_num())
        assert torch.equal(one.zero_point.isnan(), two.zero_point[:1].isnan())
    low = torch.tensor([-1.0], requires_grad=True)
    high = torch.tensor([3.0], requires_grad=True)
    qparams = qparams_from_range(low, high, formats.UINT8)
    qparams.scale.sum().backward()  # the range stays differentiable
    # [-1, 3] on 255 steps: zero point 64, the covering scale 3/191 is set by the high end.
    assert qparams.zero_point.item() == 64
    assert high.grad is not None and high.grad.item() == pytest.approx(1 / 191)


def test_nonfinite_values_raise_with_given_qparams():
    x = _randn(8, seed=24)
    x[3] = math.nan
    with pytest.raises(NonFiniteError):
        quantize(x, INT8, qparams=QParams(torch.tensor([0.1]), torch.tensor([0.0])))


@pytest.mark.parametrize(
    "spec",
    [
        QuantSpec(formats.INT8, nonfinite="propagate"),
        QuantSpec(formats.UINT8, nonfinite="propagate"),
        QuantSpec(formats.INT8, granularity=PerChannel(0), nonfinite="propagate"),
    ],
    ids=str,
)
def test_propagate_policy_passes_nonfinite_values_through(spec):
    x = _randn(4, 6, seed=25, scale=2.0)
    x[0, 1], x[2, 3], x[3, 0] = math.nan, math.inf, -math.inf
    y = quantize(x, spec)
    finite = torch.isfinite(x)
    assert torch.isnan(y[0, 1]) and y[2, 3] == math.inf and y[3, 0] == -math.inf
    # The scale comes from the finite values alone.
    expected = quantize(torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0), spec)
    assert torch.equal(y[finite], expected[finite])
    with pytest.raises(NonFiniteError):  # integer levels cannot hold NaN/inf
        quantize_int(x, spec)


def test_minifloats_carry_nonfinite_values_by_their_semantics():
    x = torch.tensor([math.nan, math.inf, 1.0])
    y = quantize(x, QuantSpec(formats.BF16))
    assert torch.isnan(y[0]) and y[1] == math.inf and y[2] == 1.0


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.uint8, torch.bool])
def test_integer_input_is_a_clear_error(dtype):
    x = torch.ones(4, dtype=dtype)
    with pytest.raises(QuantSpecError, match="floating-point"):
        quantize(x, INT8)
    with pytest.raises(QuantSpecError, match="floating-point"):
        quantize_int(x, INT8)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("spec", [INT8, UINT8, QuantSpec(formats.FP8_E4M3)], ids=str)
def test_low_and_high_precision_inputs_keep_their_dtype(dtype, spec):
    x = _randn(6, 5, seed=26).to(dtype).requires_grad_(True)
    y = quantize(x, spec)
    assert y.dtype == dtype
    # Computed in float32, the result is float32's rounded back to the input dtype.
    assert torch.equal(y, quantize(x.detach().float(), spec).to(dtype))
    y.sum().backward()
    assert x.grad.dtype == dtype


def test_non_tensor_or_non_spec_arguments_are_type_errors():
    with pytest.raises(TypeError):
        quantize([1.0, 2.0], INT8)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        quantize(torch.ones(2), formats.INT8)  # type: ignore[arg-type]


# ---- integer levels --------------------------------------------------------------------------

INT_SPECS = [
    INT8,
    UINT8,
    QuantSpec(formats.Int(4), granularity=PerChannel(1)),
    QuantSpec(formats.Int(12), granularity=PerChannel(-1)),
    QuantSpec(formats.Int(12, signed=False), granularity=PerToken()),
    QuantSpec(formats.Int(3), granularity=PerGroup(2, 0)),
    QuantSpec(formats.Int(5), granularity=PerGroup(3, -1)),
    QuantSpec(formats.INT8, scale=Clip(0.5)),
    QuantSpec(BlockFloat(7, 3)),
    SR_INT8,
]


def _dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, spec: QuantSpec):
    levels = q.to(torch.float32)
    if isinstance(spec.granularity, PerGroup):
        axis = spec.granularity.axis % q.dim()
        groups = levels.unflatten(axis, (-1, spec.granularity.group_size))
        value = (groups - zero_point.unsqueeze(axis + 1)) * scale.unsqueeze(axis + 1)
        return value.flatten(axis, axis + 1)
    return (levels - zero_point) * scale


@pytest.mark.parametrize("spec", INT_SPECS, ids=str)
def test_quantize_int_levels_reproduce_quantize(spec, backend):
    x = _randn(4, 6, 6, seed=27, scale=2.0) * torch.arange(1, 7).view(1, 1, 6)
    q, scale, zero_point = quantize_int(x, spec, generator=torch.Generator().manual_seed(9))
    int_format = spec.int_format
    assert q.dtype == int_format.storage_dtype
    assert int(q.min()) >= int_format.qmin and int(q.max()) <= int_format.qmax
    assert zero_point.dtype == torch.int32 and scale.dtype == torch.float32
    y = quantize(x, spec, generator=torch.Generator().manual_seed(9))
    assert torch.equal(_dequantize(q, scale, zero_point, spec), y)


@pytest.mark.parametrize(
    ("granularity", "shape"),
    [
        (PerTensor(), ()),
        (PerChannel(1), (6, 1)),
        (PerChannel(-1), (6,)),
        (PerChannel(0), (4, 1, 1)),
        (PerToken(), (4, 6, 1)),
        (PerGroup(2, 0), (2, 6, 6)),
        (PerGroup(3, -1), (4, 6, 2)),
    ],
    ids=str,
)
def test_scale_shape_per_granularity(granularity, shape):
    x = _randn(4, 6, 6, seed=28)
    _, scale, zero_point = quantize_int(x, QuantSpec(formats.INT8, granularity=granularity))
    assert scale.shape == shape and zero_point.shape == shape


def test_per_group_scales_sit_at_their_group():
    # Groups along axis 0 of an (8, 3) tensor: group g of column c must carry that block's scale.
    x = (
        torch.ones(8, 3)
        * torch.tensor([[1.0], [2.0]]).repeat_interleave(4, 0)
        * torch.tensor([1.0, 10.0, 100.0])
    )
    _, scale, _ = quantize_int(x, QuantSpec(formats.INT8, granularity=PerGroup(4, 0)))
    expected = torch.tensor([[1.0, 10.0, 100.0], [2.0, 20.0, 200.0]]) / 127
    assert torch.allclose(scale, expected)


def test_quantize_int_needs_an_integer_format():
    with pytest.raises(QuantSpecError, match="integer"):
        quantize_int(torch.ones(3), QuantSpec(formats.FP8_E4M3))


# ---- LSQ (learned step) ----------------------------------------------------------------------


def test_learned_step_gradient_follows_lsq_by_hand():
    spec = QuantSpec(formats.Int(3), scale=LearnedStep())  # Q_N = Q_P = 3
    s = 0.5
    # x/s = [-4.2, -3.0, -1.3, 0.2, 0.75, 2.6, 3.3, 5.0]: clipped below, at −Q_N, inside ×4,
    # in the band (Q_P, Q_P + 1/2) where round() still gives Q_P, and far above.
    x = torch.tensor([-2.1, -1.5, -0.65, 0.1, 0.375, 1.3, 1.65, 2.5], requires_grad=True)
    step = torch.tensor(s, requires_grad=True)
    grad = torch.tensor([1.0, -2.0, 0.5, 3.0, -1.0, 2.0, 1.5, -0.5])
    y = quantize(x, spec, step=step)
    assert torch.allclose(y.detach(), torch.tensor([-3, -3, -1, 0, 1, 3, 3, 3]) * s)
    y.backward(grad)
    # torch's form of Esser et al. eq. 3: ∂x̂/∂s = round(v) − v where round(v) is in
    # [−Q_N, Q_P] (at −Q_N itself and in the band above Q_P too), −Q_N / Q_P beyond.
    d_step = torch.tensor([-3.0, 0.0, -1 + 1.3, 0 - 0.2, 1 - 0.75, 3 - 2.6, 3 - 3.3, 3.0])
    g_scale = 1 / math.sqrt(8 * 3)  # 1/sqrt(N·Q_P)
    assert math.isclose(float(step.grad), float((grad * d_step).sum()) * g_scale, rel_tol=1e-5)
    inside = torch.tensor([0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0])
    assert torch.equal(x.grad, grad * inside)


def test_learned_step_per_channel_gradient():
    spec = QuantSpec(formats.Int(4), granularity=PerChannel(0), scale=LearnedStep())
    x = _randn(3, 16, seed=29, scale=1.5)
    step = torch.tensor([[0.05], [0.2], [0.5]], requires_grad=True)
    grad = _randn(3, 16, seed=30)
    quantize(x, spec, step=step).backward(grad)
    v = x / step.detach()
    inside = (torch.round(v) >= -7) & (torch.round(v) <= 7)
    d_step = torch.where(inside, torch.round(v) - v, torch.where(v < 0, -7.0, 7.0))
    expected = (grad * d_step).sum(1, keepdim=True) / math.sqrt(16 * 7)
    assert step.grad.shape == step.shape
    assert torch.allclose(step.grad, expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_learned_step_equals_torch_learnable_fake_quantize(bits, seed):
    # Output, input gradient (bit for bit) and step gradient (to float rounding of the sums)
    # against torch's own LSQ op, at LSQ's gradient scale 1/sqrt(N·Q_P).
    spec = QuantSpec(formats.Int(bits), scale=LearnedStep())
    int_format = spec.int_format
    x = _randn(4, 7, 5, seed=100 + seed, scale=2.0)
    x.view(-1)[:3] = torch.tensor([0.0, 1e-30, -1e30])  # a zero, a tiny and a clipped value
    grad = _randn(4, 7, 5, seed=200 + seed)
    s = float(x.abs().mean()) * 2 / math.sqrt(int_format.qmax)
    factor = 1 / math.sqrt(x.numel() * int_format.qmax)
    ours_x, ours_s = x.clone().requires_grad_(), torch.tensor(s, requires_grad=True)
    y = quantize(ours_x, spec, step=ours_s)
    y.backward(grad)
    theirs_x, theirs_s = x.clone().requires_grad_(), torch.tensor([s], requires_grad=True)
    y_ref = torch._fake_quantize_learnable_per_tensor_affine(
        theirs_x, theirs_s, torch.zeros(1), int_format.qmin, int_format.qmax, factor
    )
    y_ref.backward(grad)
    assert torch.equal(y.detach(), y_ref.detach())
    assert torch.equal(ours_x.grad, theirs_x.grad)
    torch.testing.assert_close(ours_s.grad.view(1), theirs_s.grad, rtol=2e-5, atol=1e-7)


@pytest.mark.parametrize("shape,axis", [((6, 3, 3, 3), 0), ((5, 9), 0), ((4, 6, 2), 1)])
def test_learned_step_per_channel_equals_torch_learnable_fake_quantize(shape, axis):
    spec = QuantSpec(formats.Int(4), granularity=PerChannel(axis), scale=LearnedStep())
    x = _randn(*shape, seed=41, scale=1.5)
    grad = _randn(*shape, seed=42)
    channels = shape[axis]
    steps = torch.linspace(0.05, 0.6, channels)
    factor = 1 / math.sqrt(x.numel() / channels * 7)
    ours_x = x.clone().requires_grad_()
    step_shape = [1] * len(shape)
    step_shape[axis] = channels
    ours_s = steps.clone().view(step_shape).requires_grad_()
    y = quantize(ours_x, spec, step=ours_s)
    y.backward(grad)
    theirs_x, theirs_s = x.clone().requires_grad_(), steps.clone().requires_grad_()
    y_ref = torch._fake_quantize_learnable_per_channel_affine(
        theirs_x, theirs_s, torch.zeros(channels), axis, -7, 7, factor
    )
    y_ref.backward(grad)
    assert torch.equal(y.detach(), y_ref.detach())
    assert torch.equal(ours_x.grad, theirs_x.grad)
    torch.testing.assert_close(ours_s.grad.view(-1), theirs_s.grad, rtol=2e-5, atol=1e-7)


def test_learned_step_gradient_whatever_the_layouts_of_input_and_gradient():
    # Per tensor, a channels_last input is read in memory order; a gradient in another layout
    # must meet the saved step gradient in that order too.
    spec = QuantSpec(formats.Int(4), scale=LearnedStep())
    x = _randn(3, 4, 5, 2, seed=31, scale=1.5)
    grad = _randn(3, 4, 5, 2, seed=32)
    results = []
    for x_layout, grad_layout in [
        (torch.contiguous_format,) * 2,
        (torch.channels_last, torch.contiguous_format),
        (torch.contiguous_format, torch.channels_last),
        (torch.channels_last,) * 2,
    ]:
        leaf = x.contiguous(memory_format=x_layout).detach().requires_grad_()
        step = torch.tensor(0.2, requires_grad=True)
        quantize(leaf, spec, step=step).backward(grad.contiguous(memory_format=grad_layout))
        results.append((leaf.grad, step.grad))
    for x_grad, step_grad in results[1:]:
        assert torch.equal(x_grad, results[0][0])
        torch.testing.assert_close(step_grad, results[0][1], rtol=1e-6, atol=0)


def test_learned_step_needs_a_step():
    spec = QuantSpec(formats.INT8, scale=LearnedStep())
    with pytest.raises(QuantSpecError, match="step"):
        quantize(torch.ones(3), spec)


# ---- spec values: validation, JSON, with_bits ------------------------------------------------


def test_spec_validation_errors():
    with pytest.raises(QuantSpecError, match="format"):
        QuantSpec("int8")  # type: ignore[arg-type]
    with pytest.raises(QuantSpecError, match="granularity"):
        QuantSpec(formats.INT8, granularity="tensor")  # type: ignore[arg-type]
    with pytest.raises(QuantSpecError, match="scale"):
        QuantSpec(formats.INT8, scale="absmax")  # type: ignore[arg-type]
    with pytest.raises(QuantSpecError, match="rounding"):
        QuantSpec(formats.INT8, rounding="nearest")  # type: ignore[arg-type]
    with pytest.raises(QuantSpecError, match="nonfinite"):
        QuantSpec(formats.INT8, nonfinite="ignore")
    with pytest.raises(QuantSpecError, match="minifloat"):
        QuantSpec(formats.FP8_E4M3, scale=MinMax())
    with pytest.raises(QuantSpecError, match="batch_mean"):
        QuantSpec(formats.UINT8, granularity=PerChannel(0), scale=MinMax(batch_mean=True))
    for bad in (0, -1.0, math.nan, math.inf, "1"):
        with pytest.raises(QuantSpecError, match="Clip.value"):
            Clip(bad)  # type: ignore[arg-type]


def test_default_scale_rules():
    assert QuantSpec(formats.INT8).scale == AbsMax()
    assert QuantSpec(formats.UINT8).scale == MinMax()
    assert QuantSpec(formats.BF16).scale is None


_formats = st.one_of(
    st.builds(Int, st.integers(2, 16), st.booleans()),
    st.builds(Int, st.integers(1, 16), st.just(False)),
    st.sampled_from([formats.FP8_E4M3, formats.FP8_E5M2, formats.BF16, formats.FP16]),
    st.builds(MiniFloat, st.integers(2, 8), st.integers(1, 10), st.booleans(), st.booleans()),
    st.builds(BlockFloat, st.integers(2, 16), st.integers(1, 64), st.integers(-3, 2)),
)
_granularities = st.one_of(
    st.just(PerTensor()),
    st.builds(PerChannel, st.integers(-3, 3)),
    st.builds(PerGroup, st.integers(1, 128), st.integers(-3, 3)),
    st.just(PerToken()),
)
_scales = st.one_of(
    st.none(),
    st.just(AbsMax()),
    st.builds(MinMax, st.booleans()),
    st.builds(Clip, st.floats(1e-6, 1e6)),
    st.just(LearnedStep()),
    st.just(PowerOfTwo()),
)


@st.composite
def quant_specs(draw: st.DrawFn) -> QuantSpec:
    kwargs = dict(
        format=draw(_formats),
        granularity=draw(_granularities),
        scale=draw(_scales),
        rounding=draw(st.sampled_from(list(Rounding))),
        clip_gradient=draw(st.booleans()),
        nonfinite=draw(st.sampled_from(["error", "propagate"])),
    )
    try:
        return QuantSpec(**kwargs)
    except (QuantSpecError, FormatError):
        assume(False)
        raise


@given(quant_specs())
def test_spec_json_round_trip(spec):
    text = json.dumps(spec.to_dict())
    again = QuantSpec.from_dict(json.loads(text))
    assert again == spec
    assert again.to_dict() == spec.to_dict()


def test_spec_from_dict_rejects_unknown_types():
    data = INT8.to_dict()
    data["scale"] = {"type": "Percentile", "value": 99.9}
    with pytest.raises(QuantSpecError, match="Percentile"):
        QuantSpec.from_dict(data)


def test_with_bits_changes_only_the_bits():
    spec = QuantSpec(formats.INT8, granularity=PerChannel(0), rounding=Rounding.STOCHASTIC)
    four = spec.with_bits(4)
    assert four.format == formats.Int(4) and four.bits == 4
    assert dataclasses.replace(four, format=formats.INT8) == spec
    assert spec.with_bits(8) is spec
    unsigned = QuantSpec(formats.UINT8).with_bits(2)
    assert unsigned.format == Int(2, signed=False) and unsigned.scale == MinMax()
    with pytest.raises(QuantSpecError, match="integer"):
        QuantSpec(formats.BF16).with_bits(8)
    with pytest.raises(FormatError):
        spec.with_bits(0)
