"""Quantized modules: state_dict compatibility, running input ranges, run-time bit-width
changes, and Range BatchNorm against BatchNorm."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qtrain import (
    MinMax,
    NonFiniteError,
    PerChannel,
    QConv2d,
    QLinear,
    QuantSpec,
    QuantSpecError,
    RangeBatchNorm2d,
    Rounding,
    formats,
    quantize,
)
from qtrain.nn import range_bn_constant
from qtrain.ops import GemmConfig
from qtrain.quantizer import qparams_from_range

UINT8 = QuantSpec(formats.UINT8)  # min/max affine: the running-range spec


def _randn(*shape: int, seed: int, scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale + shift


# ---- state_dict compatibility ----------------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False])
def test_qlinear_loads_a_linear_state_dict_strictly(bias):
    plain = nn.Linear(6, 4, bias=bias)
    layer = QLinear(6, 4, bias=bias, config=GemmConfig(input_spec=UINT8))
    layer.load_state_dict(plain.state_dict(), strict=True)
    assert torch.equal(layer.weight, plain.weight)
    state = layer.state_dict()
    for key, value in plain.state_dict().items():
        assert torch.equal(state[key], value)  # the same keys hold the same tensors
    fresh = QLinear(6, 4, bias=bias)
    fresh.load_state_dict(plain.state_dict(), strict=True)
    x = _randn(3, 6, seed=0)
    assert torch.equal(fresh(x), plain(x))  # all specs None: the plain layer


@pytest.mark.parametrize("bias", [True, False])
def test_qconv2d_loads_a_conv2d_state_dict_strictly(bias):
    plain = nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2, bias=bias)
    layer = QConv2d(4, 6, 3, stride=2, padding=1, groups=2, bias=bias)
    layer.load_state_dict(plain.state_dict(), strict=True)
    for key, value in plain.state_dict().items():
        assert torch.equal(layer.state_dict()[key], value)
    x = _randn(2, 4, 7, 7, seed=1)
    assert torch.equal(layer(x), plain(x))  # all specs None: the plain conv


def test_qconv2d_refuses_non_zero_padding_modes():
    with pytest.raises(QuantSpecError, match="padding"):
        QConv2d(3, 3, 3, padding=1, padding_mode="reflect")
    with pytest.raises(QuantSpecError, match="padding"):
        QConv2d.from_float(nn.Conv2d(3, 3, 3, padding="same"), GemmConfig())


def test_from_float_shares_parameters_and_mode():
    conv = nn.Conv2d(3, 4, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2)).eval()
    layer = QConv2d.from_float(conv, GemmConfig())
    assert layer.weight is conv.weight and layer.bias is conv.bias
    assert (layer.stride, layer.padding, layer.dilation) == ((2, 1), (1, 0), (1, 2))
    assert not layer.training
    x = _randn(2, 3, 9, 9, seed=2)
    assert torch.equal(layer(x), conv(x))
    linear = nn.Linear(5, 2, bias=False)
    qlinear = QLinear.from_float(linear, GemmConfig())
    assert qlinear.weight is linear.weight and qlinear.bias is None and qlinear.training


# ---- running input ranges --------------------------------------------------------------------


def test_running_ranges_update_with_momentum_in_training():
    layer = QLinear(8, 3, config=GemmConfig(input_spec=UINT8)).train()
    x1, x2 = _randn(16, 8, seed=3), _randn(16, 8, seed=4, scale=3.0, shift=1.0)
    layer(x1)
    assert torch.equal(
        layer.observers["input"].low, x1.min().view(1)
    )  # the first batch initialises them
    assert torch.equal(layer.observers["input"].high, x1.max().view(1))
    y2 = layer(x2)
    assert torch.allclose(
        layer.observers["input"].low, 0.1 * x1.min() + 0.9 * x2.min()
    )  # SBM: m = 0.1
    assert torch.allclose(layer.observers["input"].high, 0.1 * x1.max() + 0.9 * x2.max())
    # Training quantizes each batch with its own range.
    assert torch.equal(y2, F.linear(quantize(x2, UINT8), layer.weight, layer.bias))


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_training_input_raises_before_the_running_ranges_take_it(bad):
    spec = QuantSpec(formats.UINT8, scale=MinMax(batch_mean=True))
    for quantized_storage in (False, True):
        layer = QLinear(
            8, 3, config=GemmConfig(input_spec=spec, save_quantized_input=quantized_storage)
        )
        layer(_randn(4, 8, seed=8))
        low, high = layer.observers["input"].low.clone(), layer.observers["input"].high.clone()
        x = _randn(4, 8, seed=9)
        x[2, 5] = bad
        with pytest.raises(NonFiniteError):
            layer(x)
        assert torch.equal(layer.observers["input"].low, low) and torch.equal(
            layer.observers["input"].high, high
        )


def test_batch_mean_ranges_are_means_of_per_sample_extremes():
    spec = QuantSpec(formats.UINT8, scale=MinMax(batch_mean=True))
    layer = QLinear(8, 3, config=GemmConfig(input_spec=spec))
    x = _randn(5, 8, seed=5)
    layer(x)
    assert torch.allclose(layer.observers["input"].low, x.amin(1).mean().view(1))
    assert torch.allclose(layer.observers["input"].high, x.amax(1).mean().view(1))


def test_running_ranges_are_used_and_frozen_in_eval():
    layer = QLinear(8, 3, config=GemmConfig(input_spec=UINT8))
    for seed in range(3):
        layer(_randn(16, 8, seed=seed))
    low, high = layer.observers["input"].low.clone(), layer.observers["input"].high.clone()
    layer.eval()
    x = _randn(16, 8, seed=6, scale=4.0)  # wider than the running range: clips in eval
    y = layer(x)
    assert torch.equal(layer.observers["input"].low, low) and torch.equal(
        layer.observers["input"].high, high
    )
    expected = F.linear(
        quantize(x, UINT8, qparams=qparams_from_range(low, high, formats.UINT8)),
        layer.weight,
        layer.bias,
    )
    assert torch.equal(y, expected)
    assert not torch.equal(y, F.linear(quantize(x, UINT8), layer.weight, layer.bias))


def test_eval_before_training_measures_the_batch():
    layer = QLinear(8, 3, config=GemmConfig(input_spec=UINT8)).eval()
    x = _randn(4, 8, seed=7)
    assert torch.equal(layer(x), F.linear(quantize(x, UINT8), layer.weight, layer.bias))
    assert layer.observers["input"].low.numel() == 0


def test_running_ranges_survive_a_state_dict_round_trip():
    config = GemmConfig(input_spec=UINT8, weight_spec=QuantSpec(formats.INT8))
    layer = QLinear(8, 3, config=config)
    for seed in range(2):
        layer(_randn(16, 8, seed=seed))
    state = layer.state_dict()
    assert {"weight", "bias", "observers.input.low", "observers.input.high"} <= set(state)
    other = QLinear(8, 3, config=config)
    other.load_state_dict(state, strict=True)
    assert torch.equal(other.observers["input"].low, layer.observers["input"].low)
    assert torch.equal(other.observers["input"].high, layer.observers["input"].high)
    x = _randn(5, 8, seed=8, scale=2.0)
    assert torch.equal(other.eval()(x), layer.eval()(x))


def test_loading_running_ranges_keeps_the_modules_dtype():
    layer = QLinear(8, 3, config=GemmConfig(input_spec=UINT8))
    layer(_randn(16, 8, seed=9))
    other = QLinear(8, 3, config=GemmConfig(input_spec=UINT8)).double()
    other.load_state_dict(layer.state_dict(), strict=True)
    # Like every other parameter and buffer: values from the file, dtype/device of the module.
    assert other.observers["input"].low.dtype == other.weight.dtype == torch.float64
    assert torch.equal(other.observers["input"].low, layer.observers["input"].low.double())
    assert torch.equal(other.observers["input"].high, layer.observers["input"].high.double())


def test_per_channel_running_ranges_for_a_conv():
    spec = QuantSpec(formats.UINT8, granularity=PerChannel(1))
    layer = QConv2d(3, 4, 3, config=GemmConfig(input_spec=spec))
    x = _randn(2, 3, 6, 6, seed=9) * torch.tensor([1.0, 5.0, 25.0]).view(1, 3, 1, 1)
    layer(x)
    assert torch.equal(layer.observers["input"].high, x.amax((0, 2, 3)))
    assert torch.equal(layer.observers["input"].low, x.amin((0, 2, 3)))


def test_range_momentum_is_validated():
    with pytest.raises(QuantSpecError, match="range_momentum"):
        QLinear(2, 2, range_momentum=1.5)


# ---- run-time bit-width changes --------------------------------------------------------------


def test_set_config_changes_bits_without_rebuilding():
    layer = QLinear(16, 8, config=GemmConfig(weight_spec=QuantSpec(formats.INT8)))
    weight, bias = layer.weight, layer.bias
    parameters = list(layer.parameters())
    x = _randn(4, 16, seed=10)
    y8 = layer(x)
    four = QuantSpec(formats.Int(4))
    layer.set_config(GemmConfig(weight_spec=four))
    y4 = layer(x)
    assert layer.weight is weight and layer.bias is bias
    assert list(layer.parameters()) == parameters
    assert torch.equal(y4, F.linear(x, quantize(weight, four), bias))
    exact = F.linear(x, weight, bias)
    assert (y4 - exact).abs().max() > 4 * (y8 - exact).abs().max()
    assert layer.role_bits()["forward"] == (32.0, 4.0)
    with pytest.raises(QuantSpecError, match="GemmConfig"):
        layer.set_config(four)  # type: ignore[arg-type]


# ---- Range BatchNorm -------------------------------------------------------------------------


def _gaussian_range_stats(n: int) -> tuple[float, float]:
    """E[range] and an upper bound on std(range) of n standard normal samples.

    max has density n·φ·Φ^(n−1); E[range] = 2·E[max] by symmetry, and by the triangle
    inequality std(max − min) ≤ std(max) + std(min) = 2·std(max). Trapezoid rule on a grid.
    """
    x = torch.linspace(-12, 12, 240_001, dtype=torch.float64)
    log_density = math.log(n) - x**2 / 2 - 0.5 * math.log(2 * math.pi)
    density = torch.exp(log_density + (n - 1) * torch.log(torch.special.ndtr(x)))
    mean = float(torch.trapezoid(x * density, x))
    second = float(torch.trapezoid(x**2 * density, x))
    return 2 * mean, 2 * math.sqrt(second - mean**2)


def _hand_range(x: torch.Tensor, chunks: int = 16) -> torch.Tensor:
    """The authors' range per channel: mean of chunk maxima − mean of chunk minima."""
    flat = x.transpose(0, 1).reshape(x.shape[1], -1)
    flat = flat - flat.mean(1, keepdim=True)
    size = flat.shape[1] // chunks
    pieces = flat[:, : chunks * size].reshape(x.shape[1], chunks, size)
    return pieces.amax(2).mean(1) - pieces.amin(2).mean(1)


GAUSSIAN_SHAPE = (32, 8, 16, 16)  # 8192 values per channel → 16 chunks of n = 512


def _gaussian_batch(seed: int) -> torch.Tensor:
    means = torch.linspace(-3, 3, 8).view(1, 8, 1, 1)
    stds = torch.logspace(-1, 1, 8).view(1, 8, 1, 1)
    return _randn(*GAUSSIAN_SHAPE, seed=seed) * stds + means


def _tolerance(n: int, values_per_channel: int, k: float = 4.0) -> float:
    # The range estimate is a mean of 16 independent chunk ranges: relative std ≤
    # (std bound / E[range]) / 4; BN's own std estimate adds ≈ 1/sqrt(2·N). k standard deviations.
    expected_range, range_std = _gaussian_range_stats(n)
    return k * (range_std / expected_range / math.sqrt(16) + 1 / math.sqrt(2 * values_per_channel))


def test_range_bn_agrees_with_bn_on_gaussian_data():
    x = _gaussian_batch(11)
    n = 8192 // 16
    expected_range, _ = _gaussian_range_stats(n)
    # C(n)·E[range of n normals] is what the code's constant makes of σ: close to, not exactly, 1.
    bias = range_bn_constant(n) * expected_range
    assert 0.85 < bias < 1.0
    tol = _tolerance(n, 8192)
    assert tol < 0.2
    y_bn = nn.BatchNorm2d(8).train()(x)
    y_rbn = RangeBatchNorm2d(8).train()(x)
    # Per channel y_rbn = y_bn·σ̂/(C·range): within tol of y_bn / bias.
    assert torch.allclose(y_rbn, y_bn / bias, rtol=tol, atol=1e-4)
    # Averaged over the 8 channels the factor's noise shrinks by sqrt(8) (no systematic error).
    factor = y_rbn.detach().transpose(0, 1).reshape(8, -1).std(1) / y_bn.detach().transpose(
        0, 1
    ).reshape(8, -1).std(1)
    assert abs(float(factor.mean()) * bias - 1) < tol / math.sqrt(8)


def test_range_bn_constant_is_configurable():
    x = _gaussian_batch(12)
    n = 8192 // 16
    expected_range, _ = _gaussian_range_stats(n)
    # With C = 1/E[range] the range estimate is unbiased for σ: agreement within noise alone.
    rbn = RangeBatchNorm2d(8, constant=1 / expected_range).train()
    y_bn = nn.BatchNorm2d(8).train()(x)
    assert torch.allclose(rbn(x), y_bn, rtol=_tolerance(n, 8192), atol=1e-4)
    # And the formula by hand: y = (x − μ)/(C·range + eps).
    c = 0.2
    y = RangeBatchNorm2d(8, constant=c, affine=False).train()(x)
    mean = x.mean((0, 2, 3), keepdim=True)
    spread = (_hand_range(x) * c).view(1, 8, 1, 1)
    assert torch.allclose(y, (x - mean) / (spread + 1e-5), rtol=1e-4, atol=1e-5)
    with pytest.raises(QuantSpecError, match="constant"):
        RangeBatchNorm2d(8, constant=0.0)


def test_range_bn_default_constant_is_the_authors_code():
    n = 512
    assert range_bn_constant(n) == pytest.approx(
        0.5 * 0.35 * (1 + math.sqrt(math.pi * math.log(4))) / math.sqrt(2 * math.log(n))
    )
    x = _gaussian_batch(13)
    y = RangeBatchNorm2d(8, affine=False).train()(x)
    spread = (_hand_range(x) * range_bn_constant(n)).view(1, 8, 1, 1)
    assert torch.allclose(
        y, (x - x.mean((0, 2, 3), keepdim=True)) / (spread + 1e-5), rtol=1e-4, atol=1e-5
    )


def test_range_bn_running_stats_and_eval():
    rbn = RangeBatchNorm2d(8, momentum=0.1)
    with torch.no_grad():
        rbn.weight.copy_(torch.linspace(0.5, 2, 8))
        rbn.bias.copy_(torch.linspace(-1, 1, 8))
    x = _gaussian_batch(14)
    rbn.train()(x)
    spread = _hand_range(x) * range_bn_constant(512)
    assert torch.allclose(rbn.running_mean, 0.1 * x.mean((0, 2, 3)), rtol=1e-5, atol=1e-6)
    assert torch.allclose(rbn.running_var, 0.9 + 0.1 * spread**2, rtol=1e-5)
    assert int(rbn.num_batches_tracked) == 1
    rbn.eval()
    x_eval = _gaussian_batch(15)[:1]  # one sample: eval must not depend on the batch
    y = rbn(x_eval)
    shape = (1, 8, 1, 1)
    expected = (x_eval - rbn.running_mean.view(shape)) / (rbn.running_var.sqrt().view(shape) + 1e-5)
    expected = expected * rbn.weight.view(shape) + rbn.bias.view(shape)
    assert torch.allclose(y, expected, rtol=1e-5, atol=1e-5)
    assert int(rbn.num_batches_tracked) == 1


def test_range_bn_loads_a_batchnorm_state_dict():
    bn = nn.BatchNorm2d(8)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2)
        bn.bias.uniform_(-1, 1)
    for seed in range(3):
        bn(_gaussian_batch(seed))
    rbn = RangeBatchNorm2d(8)
    rbn.load_state_dict(bn.state_dict(), strict=True)
    assert set(rbn.state_dict()) == set(bn.state_dict())
    x = _gaussian_batch(16)
    # Eval: 1/(σ + eps) against BN's 1/sqrt(σ² + eps): relative gap ≤ eps/σ² (σ² ≥ 0.01 here).
    assert torch.allclose(rbn.eval()(x), bn.eval()(x), rtol=1e-3, atol=1e-4)


def test_range_bn_input_and_gradient_specs_quantize():
    x = _gaussian_batch(17)
    input_spec, grad_spec = QuantSpec(formats.INT8), QuantSpec(formats.Int(4))
    plain = RangeBatchNorm2d(8)
    assert torch.equal(
        RangeBatchNorm2d(8, input_spec=input_spec)(x), plain(quantize(x, input_spec))
    )

    grad = _randn(*x.shape, seed=18)
    xq, xp = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    RangeBatchNorm2d(8, grad_spec=grad_spec)(xq).backward(grad)
    RangeBatchNorm2d(8)(xp).backward(quantize(grad, grad_spec))
    assert torch.equal(xq.grad, xp.grad)
    xf = x.clone().requires_grad_(True)
    RangeBatchNorm2d(8)(xf).backward(grad)
    assert not torch.allclose(xq.grad, xf.grad, rtol=1e-2)


def test_range_bn_validation():
    with pytest.raises(QuantSpecError, match="num_chunks"):
        RangeBatchNorm2d(4, num_chunks=0)
    with pytest.raises(ValueError, match="N, C, H, W"):
        RangeBatchNorm2d(4)(torch.randn(2, 4, 3))
    with pytest.raises(ValueError, match="2 values"):
        RangeBatchNorm2d(4).train()(torch.randn(1, 4, 1, 1))


@pytest.mark.parametrize("batch", [32, 20])  # divisible by the 16 chunks, and not
def test_range_bn_range_matches_the_authors_chunking(batch: int) -> None:
    # Authors' code: centre each channel, lay its B·H·W values out sample by sample, split
    # them into 16 equal chunks (dropping a remainder), range = mean chunk max − mean chunk min.
    bn = RangeBatchNorm2d(3)
    x = torch.randn(batch, 3, 5, 7) * torch.tensor([1.0, 3.0, 0.1]).view(1, 3, 1, 1)
    mean, value_range, chunk_size = bn._batch_range(x)
    flat = x.transpose(0, 1).reshape(3, -1)
    centred = flat - flat.mean(1, keepdim=True)
    size = flat.shape[1] // 16
    pieces = centred[:, : 16 * size].reshape(3, 16, size)
    expected = pieces.amax(2).mean(1) - pieces.amin(2).mean(1)
    assert chunk_size == size
    torch.testing.assert_close(mean, flat.mean(1))
    torch.testing.assert_close(value_range, expected)


def _range_bn_autograd_reference(bn: RangeBatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    # The same function built from differentiable torch ops (autograd through amax/amin).
    from qtrain.nn import _affine

    mean, value_range, chunk_size = bn._batch_range(x)
    return _affine(x, mean, value_range * range_bn_constant(chunk_size), bn.weight, bn.bias, bn.eps)


# 32 samples: two per chunk; 20 and 5: chunks split samples and leave a remainder in no chunk.
@pytest.mark.parametrize("batch", [32, 20, 5])
def test_range_bn_fused_forward_and_backward_match_autograd(batch: int) -> None:
    torch.manual_seed(0)
    bn = RangeBatchNorm2d(4)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1.0, 1.0)
    x = torch.randn(batch, 4, 5, 6, requires_grad=True)
    g = torch.randn(batch, 4, 5, 6)
    y = bn(x)
    reference = _range_bn_autograd_reference(bn, x)
    torch.testing.assert_close(y, reference, rtol=1e-5, atol=1e-5)
    fused = torch.autograd.grad(y, (x, bn.weight, bn.bias), g)
    expected = torch.autograd.grad(reference, (x, bn.weight, bn.bias), g)
    for got, want in zip(fused, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_range_bn_fused_backward_with_tied_extremes_is_a_subgradient() -> None:
    # Values on a coarse grid tie at every chunk's max/min. The fused backward gives the
    # range gradient to one tied position, autograd splits it: per chunk and channel the
    # totals agree, and away from the tied extremes the gradients are identical.
    torch.manual_seed(1)
    bn = RangeBatchNorm2d(3)
    x = torch.randint(-2, 3, (16, 3, 4, 4)).float().requires_grad_()
    g = torch.randn(16, 3, 4, 4)
    (fused,) = torch.autograd.grad(bn(x), x, g)
    (expected,) = torch.autograd.grad(_range_bn_autograd_reference(bn, x), x, g)
    per_chunk = (16, 1, 3, 16)  # 16 chunks of one sample each: (chunk, sample, C, H·W)
    torch.testing.assert_close(
        fused.reshape(per_chunk).sum(dim=(1, 3)),
        expected.reshape(per_chunk).sum(dim=(1, 3)),
        rtol=1e-5,
        atol=1e-5,
    )
    extremes = (x == x.amax(dim=(2, 3), keepdim=True)) | (x == x.amin(dim=(2, 3), keepdim=True))
    torch.testing.assert_close(fused[~extremes], expected[~extremes], rtol=1e-5, atol=1e-5)


# ---- compact saved activations ---------------------------------------------------------------


def _saved_storage_bytes(fn) -> int:
    """Bytes of the distinct storages autograd holds for backward while ``fn()`` runs."""
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


@pytest.mark.parametrize("inplace", [False, True])
def test_compact_relu_gives_torchs_results_and_keeps_one_byte_per_value(inplace: bool) -> None:
    from qtrain.nn import CompactReLU

    x = torch.randn(4, 3, 5, 7)
    x.view(-1)[:5] = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 0.0])
    g = torch.randn(4, 3, 5, 7)
    g.view(-1)[5:8] = torch.tensor([float("nan"), float("inf"), 1.0])
    results = []
    for layer in (nn.ReLU(inplace), CompactReLU(inplace)):
        leaf = x.clone().requires_grad_()
        source = leaf * 1.0  # in place needs a non-leaf input
        y = layer(source)
        y.backward(g)
        results.append((y.detach(), leaf.grad))
    for got, want in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
    leaf = torch.randn(64, 8, 16, 16, requires_grad=True)
    assert _saved_storage_bytes(lambda: CompactReLU()(leaf * 1.0)) == leaf.numel()  # bool mask
    assert _saved_storage_bytes(lambda: nn.ReLU()(leaf * 1.0)) == 4 * leaf.numel()


def test_compact_relu_in_place_on_a_view_and_without_grad() -> None:
    from qtrain.nn import CompactReLU

    leaf = torch.randn(6, 8, requires_grad=True)
    base = leaf * 2.0
    CompactReLU(inplace=True)(base[:, :4])  # a view, modified in place
    base.sum().backward()
    expected = torch.where(leaf[:, :4] * 2.0 > 0, 2.0, 0.0)
    torch.testing.assert_close(leaf.grad[:, :4], expected)
    torch.testing.assert_close(leaf.grad[:, 4:], torch.full((6, 4), 2.0))
    with torch.no_grad():
        x = torch.randn(3, 4)
        assert torch.equal(CompactReLU()(x), torch.relu(x))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"kernel_size": 2},  # the 2×2 window kernels (either layout), odd sizes
        {"kernel_size": 2, "stride": 2, "ceil_mode": True},  # odd sizes: torch's ops
        {"kernel_size": 3, "stride": 2, "padding": 1},
        {"kernel_size": 3, "stride": 2, "ceil_mode": True},
        {"kernel_size": 2, "dilation": 2},
    ],
)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("size", [(9, 11), (8, 10)])
def test_compact_maxpool_gives_torchs_results_without_keeping_its_input(
    kwargs, channels_last, size, backend
):
    from qtrain.nn import CompactMaxPool2d

    x = torch.randint(-3, 4, (4, 3, *size)).float()  # ties inside windows
    x[0, 0, 0, 0] = float("nan")
    x[1, 1, :2, :2] = torch.tensor([[-0.0, 0.0], [0.0, -0.0]])  # tied zeros: the first wins
    x[2, 2, :2, :2] = torch.tensor([[float("nan"), 1.0], [float("nan"), 2.0]])  # the last NaN
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    results = []
    for pool in (nn.MaxPool2d(**kwargs), CompactMaxPool2d(**kwargs)):
        leaf = x.clone().requires_grad_()
        y = pool(leaf)
        y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(0)))
        results.append((y.detach(), leaf.grad))
    for got, want in zip(results[1], results[0], strict=True):
        assert got.stride() == want.stride()
        assert torch.equal(got.isnan(), want.isnan())
        assert torch.equal(got.nan_to_num().view(torch.int32), want.nan_to_num().view(torch.int32))


def test_compact_maxpool_keeps_a_byte_per_output_for_2x2_windows(backend):
    from qtrain.nn import CompactMaxPool2d

    leaf = torch.randn(8, 4, 16, 16, requires_grad=True)
    out = 8 * 4 * 8 * 8
    assert _saved_storage_bytes(lambda: CompactMaxPool2d(2)(leaf * 1.0)) == out  # uint8
    channels_last = leaf.contiguous(memory_format=torch.channels_last)
    assert _saved_storage_bytes(lambda: CompactMaxPool2d(2)(channels_last * 1.0)) == out
    assert _saved_storage_bytes(lambda: CompactMaxPool2d(3, 2)(leaf * 1.0)) == 8 * 7 * 7 * 32
    assert _saved_storage_bytes(lambda: nn.MaxPool2d(2)(leaf * 1.0)) == 4 * leaf.numel() + 8 * out


def test_compact_maxpool_refuses_a_pool_returning_indices() -> None:
    from qtrain.nn import CompactMaxPool2d

    with pytest.raises(ValueError, match="returns its indices"):
        CompactMaxPool2d.from_maxpool(nn.MaxPool2d(2, return_indices=True))


@pytest.mark.parametrize("batch", [32, 20])
def test_range_bn_with_a_fused_relu_equals_the_pair_bit_for_bit(batch: int) -> None:
    from qtrain.nn import CompactReLU, FusedReLU, fuse_range_bn_relu

    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv2d(4, 4, 1), RangeBatchNorm2d(4), CompactReLU(inplace=True))
    fused = copy.deepcopy(base)
    assert fuse_range_bn_relu(fused) == 1
    assert fused[1].fused_relu and isinstance(fused[2], FusedReLU) and fused[2].inplace
    assert fuse_range_bn_relu(fused) == 0  # already fused
    x, g = torch.randn(batch, 4, 6, 6), torch.randn(batch, 4, 6, 6)
    results = []
    for model in (base, fused):
        xb = x.clone().requires_grad_()
        y = model(xb)
        y.backward(g)
        grads = [p.grad for p in model.parameters()]
        results.append((y.detach(), xb.grad, *grads, model[1].running_mean, model[1].running_var))
    for got, want in zip(*results, strict=True):
        assert torch.equal(got, want)
    for model in (base, fused):
        model.eval()
    with torch.no_grad():
        assert torch.equal(fused(x), base(x))


SR_GRAD_UINT8 = QuantSpec(formats.UINT8, scale=MinMax(), rounding=Rounding.STOCHASTIC)
BATCH_MEAN_UINT8 = QuantSpec(formats.UINT8, scale=MinMax(batch_mean=True), clip_gradient=False)


def test_fused_relu_with_a_grad_spec_quantizes_after_the_mask_as_the_pair_does() -> None:
    from qtrain.nn import fuse_range_bn_relu

    torch.manual_seed(0)
    base = nn.Sequential(RangeBatchNorm2d(3, grad_spec=SR_GRAD_UINT8), nn.ReLU())
    fused = copy.deepcopy(base)
    assert fuse_range_bn_relu(fused) == 1 and fused[0].fused_relu
    x, g = _randn(8, 3, 5, 5, seed=30), _randn(8, 3, 5, 5, seed=31)
    results = []
    for model in (base, fused):
        xb = x.clone().requires_grad_()
        torch.manual_seed(1)  # the same stochastic rounding of the gradient
        model(xb).backward(g)
        results.append((xb.grad, model[0].weight.grad, model[0].bias.grad))
    for got, want in zip(*results, strict=True):
        assert torch.equal(got, want)
    # The twin: plain autograd ReLU, the gradient at the normalisation's output quantized by
    # hand with the same seed, a Range BN without specs.
    plain = RangeBatchNorm2d(3)
    xp = x.clone().requires_grad_()
    y = plain(xp)
    torch.manual_seed(1)
    plain_grad = quantize(torch.where(y > 0, g, 0.0), SR_GRAD_UINT8)
    y.backward(plain_grad)
    assert torch.equal(xp.grad, results[0][0])
    assert not torch.equal(plain_grad, torch.where(y > 0, g, 0.0))  # it did quantize


def test_range_bn_input_observer_keeps_running_ranges_for_eval() -> None:
    from qtrain.observers import RunningMinMax

    bn = RangeBatchNorm2d(4, input_spec=BATCH_MEAN_UINT8, input_observer=RunningMinMax(0.1))
    twin = RangeBatchNorm2d(4)
    batches = [_randn(6, 4, 3, 3, seed=40 + i, shift=0.5) for i in range(3)]
    for x in batches:  # training: each batch quantized with its own range
        assert torch.equal(bn(x), twin(quantize(x, BATCH_MEAN_UINT8)))
    low, high = bn.observers.input.low, bn.observers.input.high
    per_sample = [(x.flatten(1).amin(1).mean(), x.flatten(1).amax(1).mean()) for x in batches]
    want_low = per_sample[0][0]
    for x_low, _ in per_sample[1:]:
        want_low = 0.1 * want_low + 0.9 * x_low
    assert torch.allclose(low, want_low.view(1), atol=1e-6)
    bn.eval(), twin.eval()
    x = _randn(2, 4, 3, 3, seed=50, scale=3.0)  # eval: the running range, not the batch's
    qparams = qparams_from_range(low, high, formats.UINT8)
    assert torch.equal(bn(x), twin(quantize(x, BATCH_MEAN_UINT8, qparams=qparams)))
    assert set(bn.state_dict()) >= {"observers.input.low", "observers.input.high"}


def _mean_abs_reference(bn: RangeBatchNorm2d, x: torch.Tensor, c: float) -> torch.Tensor:
    """spread="mean_abs" in plain autograd ops."""
    mean = x.mean(dim=(0, 2, 3), keepdim=True)
    spread = (x - mean).abs().mean(dim=(0, 2, 3), keepdim=True) * c
    y = (x - mean) / (spread + bn.eps) * bn.weight.view(1, -1, 1, 1) + bn.bias.view(1, -1, 1, 1)
    return torch.relu(y) if bn.fused_relu else y


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("scale", [1.0, 0.8])
def test_mean_abs_spread_forward_and_backward_match_autograd(relu: bool, scale: float) -> None:
    bn = RangeBatchNorm2d(5, spread="mean_abs", constant_scale=scale)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5), bn.bias.uniform_(-0.5, 0.5)
    bn.fused_relu = relu
    x = _randn(12, 5, 4, 3, seed=60, scale=2.0, shift=0.3)
    g = _randn(12, 5, 4, 3, seed=61)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    y = bn(xa)
    y.backward(g)
    got = (y.detach(), xa.grad, bn.weight.grad.clone(), bn.bias.grad.clone())
    bn.weight.grad = bn.bias.grad = None
    y_ref = _mean_abs_reference(bn, xb, math.sqrt(math.pi / 2) * scale)
    y_ref.backward(g)
    want = (y_ref.detach(), xb.grad, bn.weight.grad, bn.bias.grad)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # The running "variance" is the spread squared: eval normalises by the same spread.
    spread = (x - x.mean(dim=(0, 2, 3), keepdim=True)).abs().mean(dim=(0, 2, 3))
    spread = spread * math.sqrt(math.pi / 2) * scale
    torch.testing.assert_close(bn.running_var, 0.9 * torch.ones(5) + 0.1 * spread**2)


def test_mean_abs_spread_is_the_std_on_gaussian_values() -> None:
    x = _randn(256, 3, 8, 8, seed=62)
    bn = RangeBatchNorm2d(3, spread="mean_abs", momentum=1.0)
    bn(x)
    torch.testing.assert_close(bn.running_var.sqrt(), x.std(dim=(0, 2, 3)), rtol=0.02, atol=0)


def test_spread_and_constant_scale_are_validated() -> None:
    with pytest.raises(QuantSpecError, match="RangeBatchNorm2d.spread must be one of"):
        RangeBatchNorm2d(3, spread="std")
    with pytest.raises(QuantSpecError, match="RangeBatchNorm2d.constant_scale must be"):
        RangeBatchNorm2d(3, constant_scale=0.0)


def test_constant_scale_multiplies_the_range_constant() -> None:
    x = _gaussian_batch(63)
    plain, scaled = (
        RangeBatchNorm2d(8, momentum=1.0),
        RangeBatchNorm2d(8, momentum=1.0, constant_scale=1.25),
    )
    plain(x), scaled(x)
    torch.testing.assert_close(scaled.running_var, plain.running_var * 1.25**2)
