"""LowPrecisionConv2d (qtrain.lowp): a convolution's three products as int8/fp8 GEMMs on its
im2col matrix. The real int8 products (``torch._int_mm``) against the emulated twin bit for bit
over the geometries convolutions use; the layer against plain PyTorch (``F.conv2d`` and its
gradients) where its products are left in float, and within an SNR bound where they are not;
groups against separate convolutions; swapping, state_dict, export weights, edge values."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qtrain import kernels
from qtrain.api import dequantize_, quantize_
from qtrain.cost import CostMeter
from qtrain.lowp import (
    Float8TrainingConfig,
    Int8TrainingConfig,
    LowPrecisionConv2d,
    LowPrecisionLinear,
)
from qtrain.models import build_model
from qtrain.quantizer import PerTensor, PerToken

# (in, out, kernel, stride, padding, dilation, groups, padding_mode): what ResNets, CIFAR
# ResNets, depthwise/grouped and 'same' convolutions use, at odd sizes.
GEOMETRIES = [
    (3, 8, 3, 1, 1, 1, 1, "zeros"),
    (5, 7, 3, 2, 1, 1, 1, "zeros"),
    (4, 6, 1, 1, 0, 1, 1, "zeros"),  # pointwise: no im2col
    (4, 6, 1, 2, 0, 1, 1, "zeros"),  # a strided 1×1 shortcut
    (6, 9, 3, 1, 2, 2, 3, "zeros"),  # dilated, grouped
    (4, 4, 3, 1, 1, 1, 4, "zeros"),  # depthwise
    (3, 5, (2, 3), (2, 1), (0, 1), 1, 1, "zeros"),  # rectangular
    (3, 5, 3, 1, 1, 1, 1, "reflect"),
    (3, 5, 4, 1, "same", 1, 1, "zeros"),  # uneven 'same' padding
]


def _conv(geometry, bias: bool = True) -> nn.Conv2d:
    cin, cout, kernel, stride, padding, dilation, groups, mode = geometry
    return nn.Conv2d(cin, cout, kernel, stride, padding, dilation, groups, bias, mode)


def _run(layer: nn.Module, x: torch.Tensor, grad: torch.Tensor | None = None, seed: int = 0):
    """Output, grad of x, of the weight and of the bias for one forward/backward."""
    x = x.detach().requires_grad_()
    torch.manual_seed(seed)  # the stochastic-rounding seeds drawn in the forward
    y = layer(x)
    grad = (
        torch.randn(y.shape, generator=torch.Generator().manual_seed(1)) if grad is None else grad
    )
    params = [p for p in (layer.weight, layer.bias) if p is not None]
    grads = torch.autograd.grad(y, [x, *params], grad)
    return (y.detach(), *grads)


def _snr(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.double(), expected.double()
    return float(20 * torch.log10(expected.norm() / (actual - expected).norm()))


def _input(cin: int, channels_last: bool, seed: int) -> torch.Tensor:
    x = torch.randn(3, cin, 11, 9, generator=torch.Generator().manual_seed(seed))
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


INT8_CONFIGS = [
    Int8TrainingConfig(),
    Int8TrainingConfig(granularity=PerTensor(), stochastic_grad=True),
    Int8TrainingConfig(bits=4, grad_bits=6, stochastic_grad=True),
]


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=str)
@pytest.mark.parametrize("config", INT8_CONFIGS, ids=repr)
@pytest.mark.parametrize("channels_last", [False, True])
def test_real_int8_products_equal_the_emulated_twin_bit_for_bit(
    geometry, config: Int8TrainingConfig, channels_last: bool
) -> None:
    conv = _conv(geometry)
    real = LowPrecisionConv2d.from_conv(conv, dataclasses.replace(config, emulate=False))
    twin = LowPrecisionConv2d.from_conv(conv, dataclasses.replace(config, emulate=True))
    x = _input(geometry[0], channels_last, seed=len(str(geometry)))
    for got, want in zip(_run(real, x), _run(twin, x), strict=True):
        assert torch.equal(got, want)


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")  # torch's
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=str)
def test_with_every_product_in_float_it_is_f_conv2d(geometry) -> None:
    conv = _conv(geometry)
    config = Int8TrainingConfig(forward=False, grad_input=False, grad_weight=False)
    layer = LowPrecisionConv2d.from_conv(conv, config)
    x = _input(geometry[0], False, seed=3)
    got, want = _run(layer, x), _run(conv, x)
    assert got[0].shape == want[0].shape
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=str)
@pytest.mark.parametrize(
    ("config", "min_snr"),
    [
        (Int8TrainingConfig(), 35.0),  # 8-bit levels per row: ~42-49 dB measured
        (Int8TrainingConfig(bits=6, grad_bits=6), 23.0),
        (Float8TrainingConfig(emulate=True), 20.0),  # e4m3/e5m2: ~24-30 dB
    ],
    ids=["int8", "int6", "fp8"],
)
def test_quantized_products_stay_close_to_fp32(geometry, config, min_snr: float) -> None:
    conv = _conv(geometry)
    layer = LowPrecisionConv2d.from_conv(conv, config)
    x = _input(geometry[0], True, seed=5)
    for got, want in zip(_run(layer, x), _run(conv, x), strict=True):
        assert _snr(got, want) > min_snr


def test_a_grouped_conv_is_its_groups_run_apart() -> None:
    """Each group's products quantize only that group's operands: the grouped layer equals
    one low-precision conv per group on its slice of channels, concatenated."""
    torch.manual_seed(0)
    config = Int8TrainingConfig(bits=5, grad_bits=6, emulate=True)
    grouped = LowPrecisionConv2d(6, 4, 3, padding=1, groups=2, config=config)
    x = torch.randn(2, 6, 7, 7)
    y, gx, gw, gb = _run(grouped, x)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    for group in range(2):
        part = LowPrecisionConv2d(3, 2, 3, padding=1, config=config)
        with torch.no_grad():
            part.weight.copy_(grouped.weight[2 * group : 2 * group + 2])
            part.bias.copy_(grouped.bias[2 * group : 2 * group + 2])
        channels = slice(3 * group, 3 * group + 3)
        outs = slice(2 * group, 2 * group + 2)
        py, pgx, pgw, pgb = _run(part, x[:, channels], g[:, outs].contiguous())
        assert torch.equal(py, y[:, outs])
        # x's gradient: F.fold's float sums for the grouped conv, col2im_nhwc's (another
        # order) for a part without groups where cpu_fused builds
        torch.testing.assert_close(pgx, gx[:, channels], rtol=1e-6, atol=1e-6)
        assert torch.equal(pgw, gw[outs])
        torch.testing.assert_close(pgb, gb[outs])  # a float sum over pixels, in its own order


def test_the_forward_product_quantizes_receptive_fields_and_weight_rows() -> None:
    """The forward is the int8 product of im2col(x) (one absmax scale per receptive field)
    and W's rows (one per output channel), computed here by hand from the levels."""
    torch.manual_seed(0)
    layer = LowPrecisionConv2d(2, 3, 3, padding=1, bias=False, config=Int8TrainingConfig())
    x = torch.randn(2, 2, 5, 5)
    cols = F.unfold(x, 3, padding=1).transpose(1, 2).reshape(-1, 18)  # (2·25, 18)
    w2 = layer.weight.detach().reshape(3, 18)

    def levels(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scale = a.abs().amax(1, keepdim=True) / 127
        return torch.round(a / scale).clamp(-127, 127), scale

    (qa, sa), (qb, sb) = levels(cols), levels(w2)
    want = ((qa @ qb.t()) * sa * sb.t()).view(2, 5, 5, 3).permute(0, 3, 1, 2)
    torch.testing.assert_close(layer(x).detach(), want, rtol=1e-6, atol=1e-6)


def test_quantize_swaps_convs_and_linears_and_keeps_the_state_dict() -> None:
    torch.manual_seed(0)
    plain = build_model("resnet9", input_shape=(1, 12, 12), num_classes=4, width=4)
    model = quantize_(
        build_model("resnet9", input_shape=(1, 12, 12), num_classes=4, width=4),
        Int8TrainingConfig(emulate=True),
    )
    layers = [m for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    assert layers and all(isinstance(m, LowPrecisionConv2d | LowPrecisionLinear) for m in layers)
    assert model.state_dict().keys() == plain.state_dict().keys()
    model.load_state_dict(plain.state_dict())
    model.eval(), plain.eval()
    x = torch.randn(4, 1, 12, 12)
    assert _snr(model(x).detach(), plain(x).detach()) > 25
    linears_only = quantize_(
        build_model("resnet9", input_shape=(1, 12, 12), num_classes=4, width=4),
        Int8TrainingConfig(convolutions=False),
    )
    assert not any(isinstance(m, LowPrecisionConv2d) for m in linears_only.modules())
    assert any(isinstance(m, LowPrecisionLinear) for m in linears_only.modules())


def test_to_float_and_dequantize_give_back_the_same_conv() -> None:
    layer = LowPrecisionConv2d(3, 4, 3, stride=2, padding=1, groups=1, config=Int8TrainingConfig())
    plain = layer.to_float()
    assert type(plain) is nn.Conv2d and plain.weight is layer.weight and plain.bias is layer.bias
    assert (plain.stride, plain.padding) == ((2, 2), (1, 1))
    model = quantize_(
        build_model("resnet9", input_shape=(1, 12, 12), num_classes=4, width=4),
        Int8TrainingConfig(),
    )
    weights = [m.weight for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    dequantize_(model)
    layers = [m for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    assert all(type(m) in (nn.Conv2d, nn.Linear) for m in layers)
    assert all(m.weight is w for m, w in zip(layers, weights, strict=True))  # not copies


@pytest.mark.parametrize("granularity", [PerToken(), PerTensor()], ids=repr)
def test_quantized_weight_has_the_weights_shape_and_the_forward_levels(granularity) -> None:
    torch.manual_seed(0)
    layer = LowPrecisionConv2d(3, 5, 3, config=Int8TrainingConfig(bits=6, granularity=granularity))
    qweight = layer.quantized_weight()
    assert qweight is not None and qweight.levels.shape == layer.weight.shape
    assert qweight.levels.dtype == torch.int8 and qweight.levels.abs().max() <= 31
    expected_scale = (5, 1, 1, 1) if isinstance(granularity, PerToken) else ()
    assert tuple(qweight.scale.shape) == expected_scale
    error = (qweight.dequantize() - layer.weight.detach()).abs()
    assert float(error.max()) <= float(qweight.scale.max()) / 2 * (1 + 1e-6)
    # bits: 6-bit values and one 32-bit scale per output channel (or one in all)
    scales = 5 if isinstance(granularity, PerToken) else 1
    assert layer.weight_storage_bits() == layer.weight.numel() * 6 + 32 * scales


def test_cost_meter_counts_conv_products_at_the_operand_bits() -> None:
    layer = LowPrecisionConv2d(2, 4, 3, padding=1, config=Int8TrainingConfig(bits=6))
    meter = CostMeter(layer)
    x = torch.randn(3, 2, 5, 5, requires_grad=True)
    layer(x).sum().backward()
    cost = meter.pop()
    macs = 3 * 4 * 25 * 2 * 9  # output elements × (C_in · kh · kw)
    assert cost.macs == {"forward": macs, "grad_input": macs, "grad_weight": macs}
    assert cost.bitops["forward"] == macs * 6 * 6
    assert cost.bitops["grad_input"] == macs * 8 * 6  # g at 8 bits, W at 6
    assert cost.bitops["grad_weight"] == macs * 8 * 6  # g at 8 bits, x at 6


@pytest.mark.parametrize("emulate", [False, True])
def test_edge_values_zeros_and_non_finite_inputs(emulate: bool) -> None:
    config = Int8TrainingConfig(emulate=emulate)
    layer = LowPrecisionConv2d(2, 3, 3, padding=1, bias=False, config=config)
    zeros = torch.zeros(1, 2, 4, 4)
    y, gx, gw = _run(layer, zeros, torch.ones(1, 3, 4, 4))
    assert torch.equal(y, torch.zeros_like(y)) and torch.equal(gw, torch.zeros_like(gw))
    assert torch.isfinite(gx).all()
    poisoned = torch.randn(1, 2, 4, 4)
    poisoned[0, 1, 2, 2] = float("nan")
    assert torch.isnan(layer(poisoned)).any()  # a NaN is not hidden (a grad scaler sees it)
    plain = layer.to_float()
    # Huge values (the epilogue's acc·scale_x comes first: it overflows from about
    # |x| ≈ 1e34 up, see _epilogue) and subnormal ones (scales clamp at float32 tiny).
    for scale in (1e30, 1e-40):
        x = torch.randn(1, 2, 4, 4, generator=torch.Generator().manual_seed(0)) * scale
        got, want = layer(x).detach(), plain(x).detach()
        assert torch.isfinite(got).all()
        if scale > 1:
            assert _snr(got / scale, want / scale) > 35


def test_rejects_an_unbatched_input_with_a_clear_error() -> None:
    layer = LowPrecisionConv2d(2, 3, 3, config=Int8TrainingConfig())
    with pytest.raises(ValueError, match=r"batched \(B, C, H, W\) input, got shape \[2, 5, 5\]"):
        layer(torch.randn(2, 5, 5))


def test_training_the_twin_and_the_real_products_gives_the_same_run() -> None:
    """A few SGD steps of a small CNN: real int8 products and the twin, the same losses and
    weights bit for bit (stochastic rounding of the gradients included)."""

    def train(emulate: bool) -> tuple[list[float], torch.Tensor]:
        torch.manual_seed(0)
        model = build_model("cnn", input_shape=(1, 10, 10), num_classes=3, width=4)
        config = Int8TrainingConfig(stochastic_grad=True, emulate=emulate)
        model = quantize_(model, config)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        data = torch.Generator().manual_seed(2)
        losses = []
        for _ in range(4):
            x, target = torch.randn(8, 1, 10, 10, generator=data), torch.randint(3, (8,))
            loss = F.cross_entropy(model(x), target)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        return losses, torch.cat([p.detach().flatten() for p in model.parameters()])

    (real_losses, real_params), (twin_losses, twin_params) = train(False), train(True)
    assert real_losses == twin_losses
    assert torch.equal(real_params, twin_params)


@pytest.mark.parametrize("config", INT8_CONFIGS, ids=repr)
def test_the_fused_kernels_equal_the_pytorch_twin_through_the_layers(config, fused) -> None:
    """Backend AUTO quantizes the operands with cpu_fused's kernel and builds the im2col
    matrix in channels-last order ((kh, kw, c) columns) where it builds; the reference backend
    with ``_quantize_twin`` and F.unfold ((c, kh, kw)). The integer products are the same
    sums, so outputs and weight gradients agree bit for bit; x's gradient is folded back by
    two different float32 sums (col2im_nhwc, F.fold): equal to rounding."""
    conv = LowPrecisionConv2d.from_conv(_conv(GEOMETRIES[1]), config)
    linear = LowPrecisionLinear(7, 5, config=config)
    x_conv, x_linear = _input(5, True, seed=7), torch.randn(6, 7)
    fused = [*_run(conv, x_conv), *_run(linear, x_linear)]
    with kernels.use_backend("reference"):
        twin = [*_run(conv, x_conv), *_run(linear, x_linear)]
    for index, (got, want) in enumerate(zip(fused, twin, strict=True)):
        if index == 1:  # the conv's grad of x
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        else:
            assert torch.equal(got, want)


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated")  # torch's own
@pytest.mark.parametrize("stochastic", [False, True])
def test_torch_compile_traces_the_layer_whole(stochastic: bool) -> None:
    """fullgraph: the Function, the fused kernels (torch.library ops with fake impls) and the
    geometry trace without a graph break. Nearest rounding: outputs and gradients equal
    eager's (the bias gradient, a float sum inductor generates in its own order, to rounding).
    Stochastic: the seeds are drawn in the graph, by inductor's own generator, so the
    gradients' draws differ from eager's (the forward has none): close, not equal."""
    torch.manual_seed(0)
    config = Int8TrainingConfig(stochastic_grad=stochastic)
    layer = LowPrecisionConv2d(3, 8, 3, padding=1, config=config)
    x = _input(3, True, seed=11)
    eager = _run(layer, x, seed=1)
    compiled = _run(torch.compile(layer, fullgraph=True), x, seed=1)
    assert torch.equal(compiled[0], eager[0])
    grad_x, grad_w, grad_b = compiled[1:]
    torch.testing.assert_close(grad_b, eager[3], rtol=0, atol=1e-4)  # 297 terms of |g| ~ 1
    for got, want in ((grad_x, eager[1]), (grad_w, eager[2])):
        if stochastic:
            assert _snr(got, want) > 25
        else:
            assert torch.equal(got, want)


def test_a_float64_layer_keeps_its_dtype() -> None:
    """Operands are quantized from their float32 values (kernel and twin alike); outputs and
    gradients come back in float64."""
    torch.manual_seed(0)
    conv = LowPrecisionConv2d(2, 3, 3, config=Int8TrainingConfig(emulate=True)).double()
    y, grad_x, grad_w, _ = _run(
        conv,
        torch.randn(2, 2, 6, 6, dtype=torch.float64),
        torch.ones(2, 3, 4, 4, dtype=torch.float64),
    )
    assert y.dtype == grad_x.dtype == grad_w.dtype == torch.float64
    x = torch.randn(2, 2, 6, 6, dtype=torch.float64)
    assert _snr(conv(x).detach(), conv.to_float()(x).detach()) > 35


@pytest.mark.parametrize("module", ["qtrain.lowp_conv", "qtrain.lowp", "qtrain.int_products"])
def test_each_module_imports_first_in_a_fresh_interpreter(module) -> None:
    """qtrain.lowp and qtrain.lowp_conv import each other: either may come first, and the
    quantize_ handler that swaps convolutions is registered either way."""
    import subprocess
    import sys

    code = (
        f"import {module}\n"
        "from torch import nn\n"
        "from qtrain.api import quantize_\n"
        "from qtrain.lowp import Int8TrainingConfig, LowPrecisionConv2d\n"
        "model = quantize_(nn.Sequential(nn.Conv2d(1, 2, 3)), Int8TrainingConfig())\n"
        "assert isinstance(model[0], LowPrecisionConv2d)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ---- the CPU's int8 route: quantized im2col rows, products in pieces ----------------------------


@pytest.mark.parametrize("config", INT8_CONFIGS[::2], ids=repr)
def test_the_cpu_int8_route_never_builds_the_float_im2col_matrix(
    config, monkeypatch, fused
) -> None:
    """A row-wise int8 conv on a float32 CPU input takes the route on quantized im2col rows:
    im2col_nhwc (the float32 matrix) is never called, im2col_int8 is."""
    calls: list[str] = []
    for name in ("im2col_nhwc", "im2col_int8"):
        original = getattr(fused, name)

        def spy(*args, _name=name, _original=original, **kwargs):
            calls.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(fused, name, spy)
    conv = LowPrecisionConv2d.from_conv(_conv(GEOMETRIES[1]), config)
    _run(conv, _input(5, True, seed=2))
    assert "im2col_int8" in calls and "im2col_nhwc" not in calls


@pytest.mark.parametrize("emulate", [False, True])
@pytest.mark.parametrize("geometry", [GEOMETRIES[0], GEOMETRIES[1], GEOMETRIES[3]], ids=str)
def test_pieces_and_depth_splits_do_not_change_a_bit(
    geometry, emulate: bool, monkeypatch, fused
) -> None:
    """The products run in pieces of rows (forward, grad-weight) or images (grad-input) of
    about _PIECE_BYTES (_DEPTH_PIECE_BYTES), and grad-weight's depth in pieces of at most
    INT32_DEPTH rows, summed exactly (int64 beyond it): pieces of one row or image, and depth
    pieces of 5 rows, give the same bits."""
    from qtrain import lowp_conv

    config = Int8TrainingConfig(stochastic_grad=True, emulate=emulate)
    conv = LowPrecisionConv2d.from_conv(_conv(geometry), config)
    x = _input(geometry[0], True, seed=4)
    whole = _run(conv, x)
    monkeypatch.setattr(lowp_conv, "_PIECE_BYTES", 1)
    monkeypatch.setattr(lowp_conv, "_DEPTH_PIECE_BYTES", 1)
    monkeypatch.setattr(lowp_conv, "INT32_DEPTH", 5)
    monkeypatch.setattr(lowp_conv, "_EXACT_FLOAT32_DEPTH", 5)
    for got, want in zip(_run(conv, x), whole, strict=True):
        assert torch.equal(got, want)


def test_levels_product_is_exact_beyond_int32s_depth() -> None:
    """A reduction deeper than INT32_DEPTH with every level at ±127 passes 2^31: the real
    product sums int32 pieces in int64, the twin multiplies in float64; both exact."""
    from qtrain.lowp_products import INT32_DEPTH, levels_product

    k = INT32_DEPTH + 3
    qa = torch.full((2, k), 127, dtype=torch.int8)
    qa[1, ::2] = -127
    qb = torch.full((3, k), 127, dtype=torch.int8)
    want = qa.long() @ qb.long().t()
    assert want.abs().max() > 2**31
    real, twin = levels_product(qa, qb, emulate=False), levels_product(qa, qb, emulate=True)
    assert real.dtype == torch.int64 and torch.equal(real, want)
    assert torch.equal(twin, want.double())


def test_int_mm_equals_the_int64_product_on_every_layout() -> None:
    """torch 2.13's CPU torch._int_mm is wrong for K = 1 (N ≥ 2) and for size-1 dimensions
    with unusual strides; lowp_products._int_mm pads and copies around both."""
    from qtrain.lowp_products import _int_mm

    generator = torch.Generator().manual_seed(0)

    def levels(rows: int, cols: int) -> torch.Tensor:
        return torch.randint(-127, 128, (rows, cols), dtype=torch.int8, generator=generator)

    def layouts(rows: int, cols: int):
        yield levels(rows, cols)
        yield levels(cols, rows).t()
        yield levels(rows, 2 * cols + 3)[:, 1 : cols + 1]  # rows apart
        yield levels(2 * cols + 3, rows)[1 : cols + 1].t()  # columns apart
        if rows == 1:
            yield levels(1, cols).as_strided((1, cols), (1, 1))
        if cols == 1:
            yield levels(rows, 1).as_strided((rows, 1), (1, 1))

    for m, k, n in [(1, 1, 3), (5, 1, 2), (1, 9, 4), (3, 2, 1), (17, 33, 17), (2, 297, 9)]:
        for a in layouts(m, k):
            for b in layouts(n, k):
                assert torch.equal(_int_mm(a, b).long(), a.long() @ b.long().t())


def test_under_autocast_bf16_the_int8_route_takes_bf16_activations(monkeypatch, fused) -> None:
    """int8-gemm with amp=bf16: a bfloat16 activation goes through the int8 route (no float
    im2col matrix), the output is bfloat16, x's gradient too; the real products equal the
    twin bit for bit, and the results stay within bf16 rounding of the float32 layer's."""
    calls: list[str] = []
    original = fused.im2col_nhwc
    monkeypatch.setattr(
        fused, "im2col_nhwc", lambda *a, **k: calls.append("nhwc") or original(*a, **k)
    )
    conv = _conv(GEOMETRIES[0])
    x = _input(3, True, seed=5).bfloat16()
    results = []
    for emulate in (False, True):
        layer = LowPrecisionConv2d.from_conv(conv, Int8TrainingConfig(emulate=emulate))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            results.append(_run(layer, x))
    for got, want in zip(*results, strict=True):
        assert torch.equal(got, want)
    y, grad_x, grad_w, _ = results[0]
    assert y.dtype == grad_x.dtype == torch.bfloat16 and grad_w.dtype == torch.float32
    assert not calls
    reference = _run(LowPrecisionConv2d.from_conv(conv, Int8TrainingConfig()), x.float())
    assert _snr(y.float(), reference[0]) > 40  # bf16 output rounding: ~2^-9 relative
    # g reaches backward rounded to bf16 (autograd casts it to y's dtype): close, not equal
    assert _snr(grad_w, reference[2]) > 30 and _snr(grad_x.float(), reference[1]) > 30


def test_the_int8_gemm_recipe_composes_with_autocast_bf16() -> None:
    from qtrain.recipes import build_recipe

    recipe = build_recipe("int8-gemm", {"amp": "bf16", "emulate": "true"})
    model = recipe.prepare(
        nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                      nn.Conv2d(4, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 25, 3))
    )  # fmt: skip
    context = recipe.autocast("cpu")
    assert context is not None and context.fast_dtype == torch.bfloat16
    with context:
        logits = model(torch.randn(6, 1, 5, 5))
    assert logits.dtype == torch.bfloat16
    logits.float().sum().backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in model.parameters())
