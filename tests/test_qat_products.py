"""QAT's forward product on exact integer products (``GemmConfig.products`` on
``FakeQuantLinear`` / ``FakeQuantConv2d``; ``qtrain.int_products.fake_quant_forward``): the real
``torch._int_mm`` route against its twin bit for bit; both against the exact product of the
levels read independently (learned steps and running ranges, signed and unsigned grids, per
channel weights); the gradients — of x, W, the bias and the learned steps — bit for bit the
float layer's, since the backward is full precision on the same x̂ and ŵ; the running range
moved once a call; autocast and empty batches on the floats; which layers qualify (BitNet's
per-token inputs do not); training runs and the CLI."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qtrain.api import quantize_, use_products
from qtrain.int_products import integer_product_roles
from qtrain.nn import FakeQuantConv2d, FakeQuantLinear
from qtrain.presets import bitnet_quantization, qat_quantization
from test_int_products import small_cnn, train_steps

# (in, out, kernel, stride, padding, dilation, groups): odd sizes, strided, pointwise, grouped.
GEOMETRIES = [
    (3, 8, 3, 1, 1, 1, 1),
    (5, 7, 3, 2, 1, 1, 1),
    (4, 6, 1, 1, 0, 1, 1),
    (6, 9, 3, 1, 2, 2, 3),
]
PRODUCTS = ["int8-twin", "int8-real"]
# qat_quantization's keyword arguments: LSQ W4A8 (learned steps, per-channel weights); W8A8
# LSQ; max|w| weights with running min/max unsigned inputs (lsq=false).
QUANTIZERS = {
    "lsq-w4a8": dict(first_last_bits=None),
    "lsq-w8a8": dict(weight_bits=8, first_last_bits=None),
    "minmax-w4a8": dict(learned_step=False, first_last_bits=None),
}


def _layer(module: nn.Module, quantizer: str, products: str) -> nn.Module:
    model = quantize_(
        nn.Sequential(copy.deepcopy(module)), qat_quantization(**QUANTIZERS[quantizer])
    )
    if products != "float":
        assert use_products(model, products) == 1
    return model[0]


def _run(layer: nn.Module, x: torch.Tensor, grad_seed: int = 1):
    """y and the gradients of x and of every parameter (steps included), after one call that
    also sets the LSQ steps from x; then a second call, whose results these are."""
    layer(x)  # the first tensor sets the learned steps (and a first running range)
    x = x.detach().requires_grad_()
    y = layer(x)
    grad = torch.randn(y.shape, generator=torch.Generator().manual_seed(grad_seed))
    y.backward(grad)
    grads = {name: p.grad.clone() for name, p in layer.named_parameters()}
    return y.detach(), x.grad, grads


def _levels(layer: nn.Module, t: torch.Tensor, role: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(levels as float64, scale as float64 broadcastable to them): t's levels at the qparams
    the layer's quantizer uses, from clamp(round(t / s)) — not from x̂."""
    spec = getattr(layer.config, f"{role}_spec")
    if role in layer.observers:
        observer = layer.observers[role]
        spec, qparams = observer.spec(spec), observer.qparams(t, spec)
        if qparams is None:  # a rule's scale (max|w|)
            from qtrain.quantizer import compute_qparams

            qparams = compute_qparams(t, spec)
    else:
        from qtrain.quantizer import compute_qparams

        qparams = compute_qparams(t, spec)
    scale = qparams.scale.double().reshape(-1, *[1] * (t.dim() - 1)) if role == "weight" else None
    if scale is None or qparams.scale.numel() == 1:
        scale = qparams.scale.double().reshape([])
    fmt = spec.int_format
    zero = qparams.zero_point.double().reshape(scale.shape)
    levels = torch.clamp(torch.round(t.double() / scale) + zero, fmt.qmin, fmt.qmax) - zero
    return levels, scale


def _assert_real_twin_and_float_gradients(floats, twin, real) -> None:
    """The real products' output is the twin's bit for bit; both routes' gradients (of x and
    of every parameter, learned steps included) are the float layer's bit for bit."""
    assert torch.equal(twin[0], real[0])
    for got in (twin, real):
        assert torch.equal(got[1], floats[1])  # grad of x: full precision on the same ŵ
        assert got[2].keys() == floats[2].keys()
        for name, grad in got[2].items():
            assert torch.equal(grad, floats[2][name]), name


def _assert_the_exact_product_rounded(y, exact, bias) -> None:
    """y within three float32 roundings of the exact scaled sum and one of the bias added."""
    with_bias = exact + bias.double()
    bound = 3.0001 * 2.0**-24 * exact.abs() + 2.0**-24 * with_bias.abs()
    assert ((y.double() - with_bias).abs() <= bound).all()


@pytest.mark.parametrize("quantizer", sorted(QUANTIZERS))
@pytest.mark.parametrize("shape", [(6, 20), (2, 5, 33)], ids=str)
def test_linear_forward_is_the_exact_product_and_backward_the_float_layers(quantizer, shape):
    torch.manual_seed(0)
    linear = nn.Linear(shape[-1], 7)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(2)).relu()  # post-ReLU
    floats = _run(_layer(linear, quantizer, "float"), x)
    results = {p: _run(_layer(linear, quantizer, p), x) for p in PRODUCTS}
    _assert_real_twin_and_float_gradients(floats, results["int8-twin"], results["int8-real"])
    assert any("step" in name for name in floats[2]) == quantizer.startswith("lsq")
    layer = _layer(linear, quantizer, "int8-twin")
    y = _run(layer, x)[0]
    vx, sx = _levels(layer, x, "input")
    vw, sw = _levels(layer, layer.weight.detach(), "weight")
    exact = (vx.reshape(-1, shape[-1]) @ vw.t()) * sx * sw.reshape(1, -1)
    _assert_the_exact_product_rounded(y, exact.reshape(y.shape), layer.bias.detach())
    assert not torch.equal(y, floats[0])  # the float product rounds its sums


@pytest.mark.parametrize("quantizer", sorted(QUANTIZERS))
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels-last"])
def test_conv_forward_is_the_exact_convolution_and_backward_the_float_layers(
    quantizer, geometry, channels_last
):
    cin, cout, kernel, stride, padding, dilation, groups = geometry
    torch.manual_seed(0)
    conv = nn.Conv2d(cin, cout, kernel, stride, padding, dilation, groups)
    x = torch.randn(3, cin, 11, 9, generator=torch.Generator().manual_seed(3))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    floats = _run(_layer(conv, quantizer, "float"), x)
    twin = _run(_layer(conv, quantizer, "int8-twin"), x)
    real = _run(_layer(conv, quantizer, "int8-real"), x)
    _assert_real_twin_and_float_gradients(floats, twin, real)
    layer = _layer(conv, quantizer, "int8-real")
    y = _run(layer, x)[0]
    vx, sx = _levels(layer, x, "input")
    vw, sw = _levels(layer, layer.weight.detach(), "weight")
    exact = F.conv2d(vx, vw, None, stride, padding, dilation, groups) * sx * sw.reshape(1, -1, 1, 1)
    _assert_the_exact_product_rounded(y, exact, layer.bias.detach().reshape(1, -1, 1, 1))


def test_outputs_take_in_place_ops():
    """A ReLU(inplace=True) after the layer: the Function returns the product matrix, the
    layer views it (autograd refuses in-place ops on a custom Function's views)."""
    for module, x in [
        (nn.Linear(8, 3), torch.randn(2, 5, 8)),
        (nn.Conv2d(3, 4, 3, padding=1), torch.randn(2, 3, 6, 6)),
    ]:
        layer = _layer(module, "lsq-w4a8", "int8-twin")
        y = layer(x)
        expected = torch.relu(y.detach())
        F.relu(y, inplace=True).sum().backward()
        assert torch.equal(y.detach(), expected)
        assert layer.weight.grad is not None


def test_the_running_range_moves_once_a_call():
    linear = nn.Linear(10, 4)
    x = torch.randn(8, 10).abs()
    observers = []
    for products in ("float", "int8-twin"):
        layer = _layer(linear, "minmax-w4a8", products)
        layer(x), layer(2 * x)
        observers.append(layer.observers["input"])
    assert torch.equal(observers[0].low, observers[1].low)
    assert torch.equal(observers[0].high, observers[1].high)


def test_autocast_and_empty_batches_take_the_float_product():
    linear = nn.Linear(12, 5)
    x = torch.randn(4, 12)
    for products in ("float", "int8-real"):
        layer = _layer(linear, "lsq-w8a8", products)
        layer(x)  # sets the steps
        with torch.autocast("cpu", torch.bfloat16):
            y = layer(x)
        if products == "float":
            expected = y
        assert layer(x[:0]).shape == (0, 5)
    assert torch.equal(y, expected)


def test_which_layers_qualify():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
    qat = quantize_(copy.deepcopy(model), qat_quantization())
    assert isinstance(qat[0], FakeQuantConv2d) and isinstance(qat[3], FakeQuantLinear)
    assert integer_product_roles(qat) == {}
    assert use_products(qat, "int8") == 2
    assert integer_product_roles(qat) == {"0": ["forward"], "3": ["forward"]}
    assert qat[0].config.grad_input_spec is None  # the gradients stay full precision
    # BitNet's activations have a scale per token: along the product's rows, not per tensor
    bitnet = quantize_(nn.Sequential(nn.Linear(6, 3)), bitnet_quantization())
    assert use_products(bitnet, "int8") == 1
    assert integer_product_roles(bitnet) == {}
    x = torch.randn(4, 6)
    y = bitnet(x)
    use_products(bitnet, "float")
    assert torch.equal(y, bitnet(x))


def _train(products: str):
    model = quantize_(small_cnn(), qat_quantization())
    if products != "float":
        use_products(model, products)
    return train_steps(model)


def test_training_on_the_real_products_is_the_twins_run():
    real, twin, floats = _train("int8-real"), _train("int8-twin"), _train("float")
    assert real[0] == twin[0]
    assert all(torch.equal(a, b) for a, b in zip(real[1], twin[1], strict=True))
    assert all(abs(a - b) < 1e-3 for a, b in zip(real[0], floats[0], strict=True))


def test_the_cli_runs_qat_on_integer_products(tmp_path):
    from qtrain.cli import main

    out = tmp_path / "run"
    argv = ["train", "--recipe", "qat", "--model", "mlp", "--data", "synthetic", "--epochs", "1"]
    argv += ["--train-subset", "64", "--test-subset", "32", "--products", "int8-twin"]
    assert main([*argv, "--out", str(out), "--quiet"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["integer_products"]
    assert all(roles == ["forward"] for roles in summary["integer_products"].values())
