"""Quantized linear/conv2d: identity with torch when unquantized, STE gradients, per-role
specs (bifurcation), and quantized storage of the saved input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, example, given
from hypothesis import strategies as st

from qtrain import (
    Clip,
    MinMax,
    NonFiniteError,
    PerChannel,
    PerGroup,
    QParams,
    QuantSpec,
    QuantSpecError,
    Rounding,
    compute_qparams,
    formats,
    quantize,
)
from qtrain.ops import (
    GemmConfig,
    _gradient_copies,
    quantize_grad,
    quantized_conv2d,
    quantized_linear,
)

INT8 = QuantSpec(formats.INT8)
UINT8 = QuantSpec(formats.UINT8)


def _randn(*shape: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _leaves(*tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    return [None if t is None else t.detach().clone().requires_grad_(True) for t in tensors]


def _grads(out: torch.Tensor, inputs: list[torch.Tensor | None], grad: torch.Tensor):
    present = [t for t in inputs if t is not None]
    return torch.autograd.grad(out, present, grad)


# ---- all specs None: identical to torch ------------------------------------------------------


@given(
    lead=st.lists(st.integers(1, 5), min_size=1, max_size=3),
    in_features=st.integers(1, 33),
    out_features=st.integers(1, 17),
    bias=st.booleans(),
    transpose_x=st.booleans(),
    transpose_w=st.booleans(),
    seed=st.integers(0, 2**16),
)
# Degenerate and column-major operands: torch's mm backward orders the product differently there.
@example(
    lead=[1],
    in_features=1,
    out_features=12,
    bias=False,
    transpose_x=False,
    transpose_w=False,
    seed=0,
)
@example(
    lead=[64], in_features=3, out_features=7, bias=True, transpose_x=True, transpose_w=True, seed=1
)
def test_unquantized_linear_is_identical_to_f_linear(
    lead, in_features, out_features, bias, transpose_x, transpose_w, seed
):
    if transpose_x and len(lead) == 1:  # a column-major (N, in) input
        x = _randn(in_features, *lead, seed=seed).t()
    else:
        x = _randn(*lead, in_features, seed=seed)
    if transpose_w:
        w = _randn(in_features, out_features, seed=seed + 1).t()
    else:
        w = _randn(out_features, in_features, seed=seed + 1)
    b = _randn(out_features, seed=seed + 2) if bias else None
    ours, theirs = _leaves(x, w, b), _leaves(x, w, b)
    assert ours[0].stride() == x.stride() and ours[1].stride() == w.stride()
    y = quantized_linear(*ours, GemmConfig())
    y_ref = F.linear(*theirs)
    assert torch.equal(y, y_ref)
    grad = _randn(*y.shape, seed=seed + 3)
    for a, b_ in zip(_grads(y, ours, grad), _grads(y_ref, theirs, grad), strict=True):
        assert torch.equal(a, b_)


@given(
    batch=st.integers(1, 3),
    groups=st.sampled_from([1, 2, 3]),
    channels_per_group=st.integers(1, 3),
    out_per_group=st.integers(1, 3),
    size=st.tuples(st.integers(5, 11), st.integers(5, 11)),
    kernel=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    stride=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    padding=st.tuples(st.integers(0, 2), st.integers(0, 2)),
    dilation=st.tuples(st.integers(1, 2), st.integers(1, 2)),
    bias=st.booleans(),
    channels_last=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_unquantized_conv2d_is_identical_to_f_conv2d(
    batch,
    groups,
    channels_per_group,
    out_per_group,
    size,
    kernel,
    stride,
    padding,
    dilation,
    bias,
    channels_last,
    seed,
):
    # torch 2.13's CPU (oneDNN) weight gradient of a channels-last 1×1 convolution with a
    # stride is wrong for a few channels (e.g. 2 → 1 channels, 8×10 input, stride (1, 2):
    # relative error ~1 against float64, and not the same twice), which this comparison with
    # F.conv2d's own gradient would report as ours; found by this test on 2026-12-07.
    assume(not (channels_last and kernel == (1, 1) and stride != (1, 1)))
    x = _randn(batch, groups * channels_per_group, *size, seed=seed)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w = _randn(groups * out_per_group, channels_per_group, *kernel, seed=seed + 1)
    b = _randn(groups * out_per_group, seed=seed + 2) if bias else None
    ours, theirs = _leaves(x, w, b), _leaves(x, w, b)
    y = quantized_conv2d(*ours, GemmConfig(), stride, padding, dilation, groups)
    y_ref = F.conv2d(*theirs, stride, padding, dilation, groups)
    assert torch.equal(y, y_ref)
    grad = _randn(*y.shape, seed=seed + 3)
    for a, b_ in zip(_grads(y, ours, grad), _grads(y_ref, theirs, grad), strict=True):
        assert torch.equal(a, b_)


def test_int_stride_padding_and_frozen_weight():
    x, w = _leaves(_randn(2, 3, 8, 8, seed=1), _randn(4, 3, 3, 3, seed=2))
    w.requires_grad_(False)
    y = quantized_conv2d(x, w, None, GemmConfig(), stride=2, padding=1, dilation=1)
    assert torch.equal(y, F.conv2d(x, w, None, 2, 1))
    (gx,) = torch.autograd.grad(y.sum(), [x])
    assert gx.shape == x.shape


def test_string_padding_is_refused():
    with pytest.raises(QuantSpecError, match="padding"):
        quantized_conv2d(
            torch.ones(1, 1, 4, 4), torch.ones(1, 1, 3, 3), None, GemmConfig(), padding="same"
        )  # type: ignore[arg-type]


# ---- STE gradients with specs ----------------------------------------------------------------

GRAD8 = QuantSpec(formats.INT8)  # nearest, so the hand computation can repeat it
CONFIGS = {
    "weights+inputs": GemmConfig(
        input_spec=UINT8, weight_spec=QuantSpec(formats.Int(4), granularity=PerChannel(0))
    ),
    "clipped-input": GemmConfig(
        input_spec=QuantSpec(formats.INT8, scale=Clip(1.0)), weight_spec=INT8
    ),
    "all-roles": GemmConfig(INT8, INT8, GRAD8, QuantSpec(formats.Int(16))),
}


def _hand_ste_grads(x, w, b, config, grad, forward):
    """The STE surrogate by hand: the float op on fake-quantized operands, the layer gradient
    quantized per role, the input/weight gradients masked where their quantizer clipped."""
    x_hat, w_hat = x.detach(), w.detach()
    x_keep = w_keep = 1.0
    if config.input_spec is not None:
        xl = x.detach().clone().requires_grad_(True)
        x_hat = quantize(xl, config.input_spec)
        (x_keep,) = torch.autograd.grad(x_hat.sum(), [xl])  # 1 inside the range, 0 clipped
        x_hat = x_hat.detach()
    if config.weight_spec is not None:
        wl = w.detach().clone().requires_grad_(True)
        w_hat = quantize(wl, config.weight_spec)
        (w_keep,) = torch.autograd.grad(w_hat.sum(), [wl])
        w_hat = w_hat.detach()
    results = []
    for spec, which in ((config.grad_input_spec, 0), (config.grad_weight_spec, 1)):
        g = grad if spec is None else quantize(grad, spec)
        xl, wl = x_hat.clone().requires_grad_(True), w_hat.clone().requires_grad_(True)
        results.append(torch.autograd.grad(forward(xl, wl, b), [xl, wl], g)[which])
    return results[0] * x_keep, results[1] * w_keep


@pytest.mark.parametrize("name", CONFIGS)
def test_linear_gradients_are_the_ste_surrogate(name, backend):
    config = CONFIGS[name]
    x, w, b = _leaves(_randn(6, 5, 12, seed=3) * 2, _randn(7, 12, seed=4), _randn(7, seed=5))
    y = quantized_linear(x, w, b, config)
    grad = _randn(*y.shape, seed=6)
    gx, gw, gb = torch.autograd.grad(y, [x, w, b], grad)
    hx, hw = _hand_ste_grads(x, w, b, config, grad, lambda xi, wi, bi: F.linear(xi, wi, bi))
    assert torch.allclose(gx, hx, rtol=1e-5, atol=1e-6)
    assert torch.allclose(gw, hw, rtol=1e-5, atol=1e-5)
    assert torch.equal(gb, grad.sum((0, 1)))  # the bias gradient is the full-precision g_l


@pytest.mark.parametrize("name", CONFIGS)
def test_conv2d_gradients_are_the_ste_surrogate(name, backend):
    config = CONFIGS[name]
    conv_args = ((2, 1), (1, 0), (1, 2), 2)
    x, w, b = _leaves(
        _randn(3, 4, 9, 10, seed=7) * 2, _randn(6, 2, 3, 3, seed=8), _randn(6, seed=9)
    )
    y = quantized_conv2d(x, w, b, config, *conv_args)
    grad = _randn(*y.shape, seed=10)
    gx, gw, gb = torch.autograd.grad(y, [x, w, b], grad)
    hx, hw = _hand_ste_grads(
        x, w, b, config, grad, lambda xi, wi, bi: F.conv2d(xi, wi, bi, *conv_args)
    )
    assert torch.allclose(gx, hx, rtol=1e-5, atol=1e-5)
    assert torch.allclose(gw, hw, rtol=1e-5, atol=1e-4)
    assert torch.allclose(gb, grad.sum((0, 2, 3)), rtol=1e-5, atol=1e-5)


def test_clipped_input_gradient_is_really_masked():
    config = CONFIGS["clipped-input"]
    x, w = _leaves(_randn(40, 8, seed=11) * 2, _randn(3, 8, seed=12))
    (gx,) = torch.autograd.grad(quantized_linear(x, w, None, config).sum(), [x])
    clipped = x.detach().abs() > 1.0 + 0.5 / 127
    assert bool(clipped.any())
    assert bool((gx[clipped] == 0).all()) and bool((gx[~clipped] != 0).all())


def test_gradients_match_finite_differences_of_the_surrogate_in_float64():
    # With the operands' quantization frozen at the current point, the op is the bilinear
    # surrogate L(x, w) = Σ g·F.linear(x̂₀ + (x − x₀), ŵ₀ + (w − w₀)); its central finite
    # differences (exact up to rounding for a bilinear form) must equal the op's gradients.
    config = GemmConfig(
        input_spec=INT8, weight_spec=QuantSpec(formats.INT8, granularity=PerChannel(0))
    )
    x0 = _randn(4, 6, seed=13, dtype=torch.float64)
    w0 = _randn(3, 6, seed=14, dtype=torch.float64)
    g = _randn(4, 3, seed=15, dtype=torch.float64)
    x, w = _leaves(x0, w0)
    y = quantized_linear(x, w, None, config)
    assert y.dtype == torch.float64
    gx, gw = torch.autograd.grad(y, [x, w], g)
    x_hat, w_hat = quantize(x0, config.input_spec), quantize(w0, config.weight_spec)

    def surrogate(x: torch.Tensor, w: torch.Tensor) -> float:
        return float((g * F.linear(x_hat + (x - x0), w_hat + (w - w0))).sum())

    eps = 1e-6
    for grad, point, shift in ((gx, x0, lambda d: (x0 + d, w0)), (gw, w0, lambda d: (x0, w0 + d))):
        numeric = torch.zeros_like(point)
        for index in range(point.numel()):
            d = torch.zeros_like(point).view(-1)
            d[index] = eps
            d = d.view_as(point)
            numeric.view(-1)[index] = (surrogate(*shift(d)) - surrogate(*shift(-d))) / (2 * eps)
        assert torch.allclose(grad, numeric, rtol=1e-7, atol=1e-8)


# ---- per-role precision (bifurcation) --------------------------------------------------------


def _role_errors(config: GemmConfig) -> tuple[float, float]:
    """Relative errors of grad-input and grad-weight against the fp32 layer."""
    x = _randn(256, 64, seed=16)
    w = _randn(32, 64, seed=17) / 8
    grad = _randn(256, 32, seed=18)
    xq, wq = _leaves(x, w)
    gx, gw = torch.autograd.grad(quantized_linear(xq, wq, None, config), [xq, wq], grad)
    xr, wr = _leaves(x, w)
    rx, rw = torch.autograd.grad(F.linear(xr, wr), [xr, wr], grad)
    return float((gx - rx).norm() / rx.norm()), float((gw - rw).norm() / rw.norm())


@pytest.mark.parametrize("rounding", list(Rounding))
def test_bifurcation_uses_two_precisions(rounding, backend):
    spec8 = QuantSpec(formats.INT8, rounding=rounding)
    spec16 = QuantSpec(formats.Int(16), rounding=rounding)
    input_error, weight_error = _role_errors(
        GemmConfig(grad_input_spec=spec8, grad_weight_spec=spec16)
    )
    assert input_error > 1e-3  # 8 bits really quantized g_l for the grad-input product
    assert weight_error * 20 < input_error
    # And the other way round: each role reads its own spec.
    input_error, weight_error = _role_errors(
        GemmConfig(grad_input_spec=spec16, grad_weight_spec=spec8)
    )
    assert input_error * 20 < weight_error


def test_without_bifurcation_both_products_use_one_stochastic_copy():
    spec = QuantSpec(formats.Int(4), rounding=Rounding.STOCHASTIC)
    x, w = _leaves(_randn(32, 8, seed=40), _randn(6, 8, seed=41))
    grad = _randn(32, 6, seed=42)
    torch.manual_seed(3)
    gx, gw = torch.autograd.grad(
        quantized_linear(x, w, None, GemmConfig(grad_input_spec=spec, grad_weight_spec=spec)),
        [x, w],
        grad,
    )
    torch.manual_seed(3)
    g_hat = quantize(grad, spec)  # the one copy of g_l, drawn as backward draws it
    assert torch.allclose(gx, g_hat @ w.detach(), rtol=1e-5, atol=1e-6)
    assert torch.allclose(gw, g_hat.t() @ x.detach(), rtol=1e-5, atol=1e-6)


def _seeded(seed: int, draw):
    torch.manual_seed(seed)
    return draw()


def _sbm_gradient_specs(nonfinite: str = "error") -> tuple[QuantSpec, QuantSpec]:
    """SBM's layer-gradient copies: 8 bits for grad-input, 16 for grad-weight, one MinMax rule."""
    return tuple(
        QuantSpec(
            formats.Int(bits, signed=False),
            scale=MinMax(),
            rounding=Rounding.STOCHASTIC,
            nonfinite=nonfinite,
        )
        for bits in (8, 16)
    )


@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_bifurcated_copies_read_one_range_and_equal_separate_quantization(kind, backend):
    # Backward reads g_l's range once for both copies and draws one seed for both; the result
    # must be exactly that of quantizing g_l once per spec, each from that seed.
    spec8, spec16 = _sbm_gradient_specs()
    config = GemmConfig(grad_input_spec=spec8, grad_weight_spec=spec16)
    if kind == "linear":
        x, w = _randn(64, 24, seed=45), _randn(10, 24, seed=46)
        op = F.linear
    else:
        x, w = _randn(4, 3, 9, 9, seed=45), _randn(5, 3, 3, 3, seed=46)
        op = F.conv2d
    quantized = quantized_linear if kind == "linear" else quantized_conv2d
    xl, wl = _leaves(x, w)
    y = quantized(xl, wl, None, config)
    grad = _randn(*y.shape, seed=47)
    torch.manual_seed(5)
    gx, gw = torch.autograd.grad(y, [xl, wl], grad)
    g8, g16 = _seeded(5, lambda: quantize(grad, spec8)), _seeded(5, lambda: quantize(grad, spec16))
    xr, wr = _leaves(x, w)
    assert torch.equal(gx, torch.autograd.grad(op(xr, wr), [xr], g8)[0])
    xr, wr = _leaves(x, w)
    assert torch.equal(gw, torch.autograd.grad(op(xr, wr), [wr], g16)[0])


def test_bifurcated_copies_pass_nonfinite_gradients_through_under_propagate(backend):
    spec8, spec16 = _sbm_gradient_specs(nonfinite="propagate")  # fp16 loss scaling's setting
    config = GemmConfig(grad_input_spec=spec8, grad_weight_spec=spec16)
    grad = _randn(16, 12, seed=48)
    grad[0, :3] = torch.tensor([float("inf"), -float("inf"), float("nan")])
    torch.manual_seed(6)
    copies = _gradient_copies(grad, config, True, True)
    expected = (
        _seeded(6, lambda: quantize(grad, spec8)),
        _seeded(6, lambda: quantize(grad, spec16)),
    )
    for copy, want in zip(copies, expected, strict=True):
        assert torch.equal(copy.isnan(), want.isnan())
        assert torch.equal(copy.nan_to_num(), want.nan_to_num())
    x, w = _leaves(_randn(16, 8, seed=49), _randn(12, 8, seed=50))
    spec8, spec16 = _sbm_gradient_specs(nonfinite="error")
    y = quantized_linear(x, w, None, GemmConfig(grad_input_spec=spec8, grad_weight_spec=spec16))
    with pytest.raises(NonFiniteError):  # the error policy sees the shared range's NaN
        torch.autograd.grad(y, [x, w], grad)


# ---- quantized storage of the saved input ----------------------------------------------------


def _saved_bytes(fn) -> tuple[torch.Tensor, int]:
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, total


INPUT_SPECS = {
    "int8-absmax": INT8,
    "uint8-minmax": UINT8,
    "uint8-batch-mean": QuantSpec(formats.UINT8, scale=MinMax(batch_mean=True)),  # clips
    "int8-per-group-axis0": QuantSpec(formats.INT8, granularity=PerGroup(4, 0)),
    "int4-clip": QuantSpec(formats.Int(4), scale=Clip(1.0)),
}


@pytest.mark.parametrize("name", INPUT_SPECS)
def test_quantized_storage_shrinks_saved_memory_and_keeps_gradients(name, backend):
    spec = INPUT_SPECS[name]
    x = _randn(1004, 63, seed=19) * 2  # 63252 values: the packed mask needs padding
    w, b = _randn(16, 63, seed=20), _randn(16, seed=21)
    grad = _randn(1004, 16, seed=22)
    results = {}
    for stored_quantized in (False, True):
        config = GemmConfig(input_spec=spec, save_quantized_input=stored_quantized)
        xl, wl, bl = _leaves(x, w, b)
        y, saved = _saved_bytes(lambda c=config, a=(xl, wl, bl): quantized_linear(*a, c))
        results[stored_quantized] = (y, torch.autograd.grad(y, [xl, wl, bl], grad), saved)
    (y_float, grads_float, saved_float), (y_int, grads_int, saved_int) = (
        results[False],
        results[True],
    )
    assert torch.equal(y_float, y_int)
    for a, b_ in zip(grads_float, grads_int, strict=True):
        assert torch.equal(a, b_)
    weight_bytes = w.numel() * 4
    input_fp32 = x.numel() * 4
    assert saved_float >= input_fp32 + weight_bytes
    # int8 levels (1 byte) + at most a bit-packed clip mask (1/8 byte) per value ≈ 1/4 of fp32.
    assert saved_int - weight_bytes <= 0.3 * input_fp32


def test_quantized_storage_holds_float16_grid_points_as_float_storage_does(backend):
    # float16 inputs up to 65504: the nudged zero point puts the top grid point at ~65559,
    # which float16 rounds to inf; both storages hold it at 65504, forward and backward.
    spec = QuantSpec(formats.UINT8, scale=MinMax())
    x = torch.linspace(-1100.0, 65504.0, 96).to(torch.float16).reshape(12, 8)
    w = torch.eye(8, dtype=torch.float16)  # y = x̂
    grad = torch.full((12, 8), 2.0**-10, dtype=torch.float16)  # grad-weight sums stay finite
    results = []
    for stored_quantized in (False, True):
        config = GemmConfig(input_spec=spec, save_quantized_input=stored_quantized)
        xl, wl = _leaves(x, w)
        y = quantized_linear(xl, wl, None, config)
        results.append((y, *torch.autograd.grad(y, [xl, wl], grad)))
    assert float(results[0][0].detach().max()) == 65504.0
    assert bool(torch.isfinite(results[0][2]).all())
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


def test_quantized_storage_works_through_saved_tensor_hooks():
    # Hooks that move saved tensors elsewhere (like torch.autograd.graph.save_on_cpu) must be
    # what backward reads: here the originals are wiped after packing a copy.
    config = GemmConfig(
        input_spec=QuantSpec(formats.UINT8, scale=MinMax(batch_mean=True)),
        weight_spec=INT8,
        save_quantized_input=True,
    )
    x, w = _randn(64, 16, seed=23), _randn(8, 16, seed=24)
    grad = _randn(64, 8, seed=25)
    xl, wl = _leaves(x, w)
    expected = torch.autograd.grad(quantized_linear(xl, wl, None, config), [xl, wl], grad)
    originals = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        originals.append(t)
        return t.clone()

    xl, wl = _leaves(x, w)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = quantized_linear(xl, wl, None, config)
    for t in originals:
        t.zero_()
    for a, b in zip(torch.autograd.grad(y, [xl, wl], grad), expected, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("stored_quantized", [False, True])
def test_nonfinite_input_with_given_qparams_is_an_error(stored_quantized, value, backend):
    config = GemmConfig(input_spec=UINT8, save_quantized_input=stored_quantized)
    x = _randn(4, 8, seed=43)
    qp = compute_qparams(x, UINT8)  # running ranges, say
    x[1, 2] = value
    with pytest.raises(NonFiniteError):
        quantized_linear(x, _randn(3, 8, seed=44), None, config, input_qparams=qp)


def test_quantized_storage_needs_a_small_integer_input_spec():
    for spec in (
        None,
        QuantSpec(formats.FP8_E4M3),
        QuantSpec(formats.Int(12)),
        QuantSpec(formats.INT8, nonfinite="propagate"),  # int8 levels cannot hold NaN/inf
    ):
        with pytest.raises(QuantSpecError, match="save_quantized_input"):
            GemmConfig(input_spec=spec, save_quantized_input=True)


# ---- config and helpers ----------------------------------------------------------------------


def test_gemm_config_validation_and_bits():
    with pytest.raises(QuantSpecError, match="weight_spec"):
        GemmConfig(weight_spec=formats.INT8)  # type: ignore[arg-type]
    config = GemmConfig(INT8, QuantSpec(formats.Int(4)), QuantSpec(formats.FP8_E5M2), None)
    assert config.role_bits() == {
        "forward": (8.0, 4.0),
        "grad_input": (8.0, 4.0),
        "grad_weight": (32.0, 8.0),
    }
    assert GemmConfig.from_dict(config.to_dict()) == config


def test_quantize_grad_is_identity_forward_and_quantizes_the_gradient():
    x = _leaves(_randn(50, seed=26))[0]
    y = quantize_grad(x, QuantSpec(formats.Int(4)))
    assert torch.equal(y, x)
    grad = _randn(50, seed=27)
    y.backward(grad)
    assert torch.equal(x.grad, quantize(grad, QuantSpec(formats.Int(4))))
    assert quantize_grad(x, None) is x


def test_quantized_weight_is_what_the_forward_multiplies(backend):
    spec = QuantSpec(formats.Int(3), granularity=PerChannel(0))
    x, w = _randn(5, 8, seed=28), _randn(4, 8, seed=29)
    y = quantized_linear(x, w, None, GemmConfig(weight_spec=spec))
    assert torch.equal(y, F.linear(x, quantize(w, spec)))
    qp = compute_qparams(x, UINT8)
    y = quantized_linear(x * 3, w, None, GemmConfig(input_spec=UINT8), input_qparams=qp)
    assert torch.equal(y, F.linear(quantize(x * 3, UINT8, qparams=qp), w))


@pytest.mark.parametrize("kind", ["linear", "conv2d"])
@pytest.mark.parametrize("config", [GemmConfig(), CONFIGS["all-roles"]], ids=["fp32", "int8"])
def test_ops_under_bf16_autocast_match_torch(kind, config):
    # Under autocast the products run in bf16 both ways, as torch's own layers do; unquantized,
    # the result and gradients are torch's bit for bit.
    if kind == "linear":
        x, w, b = _randn(6, 5, 12, seed=30), _randn(7, 12, seed=31), _randn(7, seed=32)
        ops = (lambda *a: quantized_linear(*a, config), F.linear)
    else:
        x, w, b = _randn(2, 4, 9, 9, seed=30), _randn(6, 2, 3, 3, seed=31), _randn(6, seed=32)
        ops = (
            lambda *a: quantized_conv2d(*a, config, 2, 1, 1, 2),
            lambda *a: F.conv2d(*a, 2, 1, 1, 2),
        )
    results = []
    for op in ops:
        leaves = _leaves(x, w, b)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = op(*leaves)
        assert y.dtype == torch.bfloat16
        grads = torch.autograd.grad(y, leaves, _randn(*y.shape, seed=33).to(y.dtype))
        assert all(g.dtype == torch.float32 and bool(torch.isfinite(g).all()) for g in grads)
        results.append([y, *grads])
    if config == GemmConfig():
        for a, b_ in zip(*results, strict=True):
            assert torch.equal(a, b_)


@pytest.mark.parametrize("save_quantized_input", [False, True])
def test_given_qparams_of_the_wrong_size_are_refused_on_both_storage_paths(
    save_quantized_input: bool,
) -> None:
    spec = QuantSpec(formats.Int(8, signed=False))
    config = GemmConfig(spec, save_quantized_input=save_quantized_input)
    bad = QParams(torch.ones(3), torch.zeros(3))
    with pytest.raises(QuantSpecError, match=r"qparams.scale must hold 1 value\(s\).*got 3"):
        quantized_linear(torch.randn(2, 4), torch.randn(3, 4), None, config, input_qparams=bad)
