"""Exact integer products for qtrain.ops' quantized layers (``GemmConfig.products``,
``qtrain.int_products``): the real ``torch._int_mm`` route against its twin bit for bit for every
product over the recipes' quantizers and the geometries convolutions use; both against the exact
product of the levels (elementwise, within the three float32 roundings of the epilogue); which
products qualify (8-bit limit, scales along the reduction, autocast, dtypes); the offsets of
affine levels by hand; training runs; the run option."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qtrain import QuantSpec, formats, int_products, lowp_products
from qtrain.api import quantize_, use_products
from qtrain.int_products import IntegerRoute
from qtrain.ops import GemmConfig, quantized_conv2d, quantized_linear
from qtrain.presets import (
    precision_schedule_quantization,
    sbm_quantization,
    symmetric_quantization,
)
from qtrain.quantizer import MinMax, PerChannel, PerTensor, QuantSpecError, Rounding, quantize_int
from qtrain.train import TrainConfig, TrainConfigError

# The quantizers of the recipes the integer products serve, by the recipe that uses them.
QUANTIZERS = {
    "ui8": symmetric_quantization(8).gemm,
    "daint8": symmetric_quantization(8, grad_weight_granularity=PerChannel(1)).gemm,
    "sbm8": sbm_quantization().gemm,  # affine unsigned; a 16-bit grad-weight copy of g
    "cpt-6/8": precision_schedule_quantization(6, 8).gemm,  # per-output-channel weights
    "cpt-3/6": precision_schedule_quantization(3, 6).gemm,
    "dfq-6/12": precision_schedule_quantization(6, 12).gemm,  # 12-bit gradients: two limbs
    "sym-12": symmetric_quantization(12).gemm,  # every operand in two limbs
}
# The products each quantizer's layer runs as integer products (conv and 2-D linear).
EXPECTED_ROLES = {
    "ui8": {"forward", "grad_input", "grad_weight"},
    "daint8": {"forward", "grad_input", "grad_weight"},
    "sbm8": {"forward", "grad_input", "grad_weight"},
    "cpt-6/8": {"forward", "grad_weight"},
    "cpt-3/6": {"forward", "grad_weight"},
    "dfq-6/12": {"forward", "grad_weight"},
    "sym-12": {"forward", "grad_input", "grad_weight"},
}
# (in, out, kernel, stride, padding, dilation, groups) at odd sizes.
GEOMETRIES = [
    (3, 8, 3, 1, 1, 1, 1),
    (5, 7, 3, 2, 1, 1, 1),
    (4, 6, 1, 1, 0, 1, 1),  # pointwise
    (4, 6, 1, 2, 0, 1, 1),  # a strided 1×1 shortcut
    (6, 9, 3, 1, 2, 2, 3),  # dilated, grouped
    (4, 4, 3, 1, 1, 1, 4),  # depthwise
    (3, 5, (2, 3), (2, 1), (0, 1), 1, 1),  # rectangular
]


def _with(config: GemmConfig, products: str) -> GemmConfig:
    return dataclasses.replace(config, products=products)


def _grads(fn, tensors, seed: int = 0):
    """Output and the gradients of ``tensors`` for one forward/backward of ``fn``."""
    tensors = [t.detach().requires_grad_() for t in tensors]
    torch.manual_seed(seed)  # stochastic rounding's seeds
    y = fn(*tensors)
    grad = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    return (y.detach(), *torch.autograd.grad(y, tensors, grad))


def _conv_fn(config, geometry):
    _, _, _, stride, padding, dilation, groups = geometry
    return lambda x, w, b: quantized_conv2d(x, w, b, config, stride, padding, dilation, groups)


def _conv_tensors(geometry, channels_last=False, seed=0):
    cin, cout, kernel, *_, groups = geometry
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, cin, 11, 9, generator=g)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    w = torch.randn(cout, cin // groups, kh, kw, generator=g)
    return x, w, torch.randn(cout, generator=g)


@pytest.mark.parametrize("name", sorted(QUANTIZERS))
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels-last"])
def test_conv_real_products_equal_the_twin_bit_for_bit(name, geometry, channels_last) -> None:
    tensors = _conv_tensors(geometry, channels_last)
    config = QUANTIZERS[name]
    real = _grads(_conv_fn(_with(config, "int8-real"), geometry), tensors)
    twin = _grads(_conv_fn(_with(config, "int8-twin"), geometry), tensors)
    for a, b in zip(real, twin, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", sorted(QUANTIZERS))
@pytest.mark.parametrize("shape", [(5, 20), (2, 7, 33), (1, 1), (40, 1100)], ids=str)
def test_linear_real_products_equal_the_twin_bit_for_bit(name, shape) -> None:
    """Odd shapes, a 3-d input, and K > 1024 (the twin's float64 matmul)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(*shape, generator=g)
    w = torch.randn(6, shape[-1], generator=g)
    b = torch.randn(6, generator=g)
    config = QUANTIZERS[name]

    def fn(products):
        return lambda x, w, b: quantized_linear(x, w, b, _with(config, products))

    real, twin = _grads(fn("int8-real"), (x, w, b)), _grads(fn("int8-twin"), (x, w, b))
    for a, b_ in zip(real, twin, strict=True):
        assert torch.equal(a, b_)


@pytest.mark.parametrize("name", sorted(QUANTIZERS))
@pytest.mark.parametrize("conv", [False, True], ids=["linear", "conv"])
def test_products_that_do_not_qualify_equal_the_float_emulation(name, conv) -> None:
    """The integer route takes exactly the expected products; the others are the float
    emulation's bit for bit (and the quantized operands are the same on both routes: every
    product stays within float32 rounding of the emulation's)."""
    geometry = GEOMETRIES[1]
    config = QUANTIZERS[name]
    if conv:
        tensors = _conv_tensors(geometry)

        def fn(products):
            return _conv_fn(_with(config, products), geometry)
    else:
        g = torch.Generator().manual_seed(0)
        tensors = (torch.randn(9, 30, generator=g), torch.randn(7, 30, generator=g))

        def fn(products):
            return lambda x, w: quantized_linear(x, w, None, _with(config, products))

    conv_args = () if conv else None
    route = IntegerRoute.of(_with(config, "int8-twin"), tensors[0], tensors[1], conv_args)
    assert route.roles == EXPECTED_ROLES[name]
    keys = ("forward", "grad_x", "grad_w", "grad_b")[: len(tensors) + 1]
    outputs = dict(zip(keys, _grads(fn("int8-twin"), tensors), strict=True))
    floats = dict(zip(keys, _grads(fn("float"), tensors), strict=True))
    role_of = {"forward": "forward", "grad_x": "grad_input", "grad_w": "grad_weight"}
    for key, value in outputs.items():
        reference = floats[key]
        if key == "grad_b" or role_of[key] not in route.roles:
            assert torch.equal(value, reference), key
        else:
            assert not torch.equal(value, reference) or value.abs().max() == 0
            assert _relative(value, reference) < 1e-5, key


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _levels(t: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """(q − z as float64, scale as float64), from quantize_int (an independent path)."""
    q, scale, zero_point = quantize_int(t, spec)
    return q.double() - zero_point.double(), scale.double()


@pytest.mark.parametrize("name", sorted(QUANTIZERS))
@pytest.mark.parametrize("products", ["int8-twin", "int8-real"])
def test_the_integer_forward_is_the_exact_product_rounded_in_the_epilogue(name, products) -> None:
    """y = fl(fl(fl(Σ (q_x − z_x)(q_w − z_w))·s_x)·s_w) elementwise: within 3 float32 roundings
    (relative 3·2^-24) of the exact product of the levels, which the emulation is not."""
    config = QUANTIZERS[name]
    g = torch.Generator().manual_seed(5)
    x, w = torch.randn(64, 700, generator=g), torch.randn(48, 700, generator=g)
    x[:, :350] += 3.0  # a non-zero mean: the affine zero points are far from the middle
    y = quantized_linear(x, w, None, _with(config, products))
    vx, sx = _levels(x, config.input_spec)
    vw, sw = _levels(w, config.weight_spec)
    exact = (vx @ vw.t()) * sx.reshape(-1, 1) * sw.reshape(1, -1)
    bound = 3.0001 * 2.0**-24 * exact.abs()
    assert ((y.double() - exact).abs() <= bound).all()
    emulation = quantized_linear(x, w, None, _with(config, "float"))
    assert not ((emulation.double() - exact).abs() <= bound).all()


@pytest.mark.parametrize("products", ["int8-twin", "int8-real"])
def test_the_integer_conv_is_the_exact_convolution_of_the_levels(products) -> None:
    config = QUANTIZERS["sbm8"]
    x, w, _ = _conv_tensors((5, 7, 3, 2, 1, 1, 1))
    x = x.abs() + 0.5  # post-ReLU activations: uint8 levels with a zero point at 0..few
    y = quantized_conv2d(x, w, None, _with(config, products), (2, 2), (1, 1))
    vx, sx = _levels(x, config.input_spec)
    vw, sw = _levels(w, config.weight_spec)
    exact = F.conv2d(vx, vw, None, 2, 1) * (sx * sw).reshape(())
    assert ((y.double() - exact).abs() <= 3.0001 * 2.0**-24 * exact.abs()).all()


def test_affine_offsets_by_hand() -> None:
    """Unsigned 8-bit levels with zero points 10 and 200: q − z spans more than int8, so both
    operands are shifted by d = qmin − z + 128 and the rank-one terms restore the product."""
    a_levels = torch.tensor([[0.0, 255.0, 17.0], [10.0, 10.0, 10.0]])  # q
    b_levels = torch.tensor([[255.0, 0.0, 200.0]])
    a = int_products.IntegerValues(
        a_levels - 10, torch.tensor([0.5]), torch.tensor([10.0]), formats.Int(8, signed=False)
    )
    b = int_products.IntegerValues(
        b_levels - 200, torch.tensor([0.25]), torch.tensor([200.0]), formats.Int(8, signed=False)
    )
    assert int_products.offsets(a).tolist() == [118.0]
    assert int_products.offsets(b).tolist() == [-72.0]
    # (−10)(55) + 245(−200) + 7(0) = −49550; 0 for the second row (q = z)
    expected = torch.tensor([[-49550 * 0.5 * 0.25], [0.0]])
    for real in (False, True):
        out = int_products.exact_product(
            a.values, int_products.offsets(a), a.scale, False,
            b.values, int_products.offsets(b), b.scale, False, real,
        )  # fmt: skip
        assert torch.equal(out, expected)


@pytest.mark.parametrize("b_per_row", [False, True], ids=["b-per-tensor", "b-per-row"])
@pytest.mark.parametrize("rows_a, rows_b", [(7, 5), (5, 7)])
@pytest.mark.parametrize("bits_a, bits_b", [(16, 8), (8, 16), (12, 16), (16, 16), (9, 3), (8, 8)])
@pytest.mark.parametrize("real", [False, True], ids=["twin", "real"])
def test_wide_operands_in_two_limbs_give_the_exact_product(
    bits_a, bits_b, real, rows_a, rows_b, b_per_row
) -> None:
    """Unsigned levels of up to 16 bits with zero points anywhere in their range (one per row
    for a), against the float64 product of q − z: within the epilogue's three roundings —
    with either operand the one whose limbs are stacked (fewer rows)."""
    g = torch.Generator().manual_seed(bits_a * 100 + bits_b)

    def operand(rows: int, bits: int, per_row: bool) -> int_products.IntegerValues:
        fmt = formats.Int(bits, signed=False)
        q = torch.randint(0, fmt.qmax + 1, (rows, 300), generator=g).float()
        z = torch.randint(0, fmt.qmax + 1, (rows if per_row else 1,), generator=g).float()
        scale = torch.rand(rows if per_row else 1, generator=g) + 0.5
        return int_products.IntegerValues(q - z.view(-1, 1), scale, z, fmt)

    a, b = operand(rows_a, bits_a, True), operand(rows_b, bits_b, b_per_row)
    out = int_products.exact_product(
        *int_products._matrix(a, a.values), *int_products._matrix(b, b.values), real
    )
    exact = (a.values.double() @ b.values.double().t()) * a.scale.double().view(-1, 1)
    exact = exact * b.scale.double().view(1, -1)
    assert ((out.double() - exact).abs() <= 3.0001 * 2.0**-24 * exact.abs()).all()
    twin = int_products.exact_product(
        *int_products._matrix(a, a.values), *int_products._matrix(b, b.values), not real
    )
    assert torch.equal(out, twin)


@pytest.mark.parametrize("real", [False, True], ids=["twin", "real"])
def test_a_reduction_deeper_than_int32_holds_is_exact(real, monkeypatch) -> None:
    """K·128² beyond 2^31 (levels at −128 throughout, narrow and as a wide operand's limbs):
    the products run in depth pieces summed in float64, the exact sum, not int32's wrap; a
    shallower piece depth gives the same bits."""
    depth = int_products._INT_MM_DEPTH + 3
    a = torch.full((2, depth), -128.0)
    a[1, ::2] = 127.0
    wide = torch.where(a < 0, -(2.0**15), a)  # −2^15: both limbs at −128
    for a_wide, values in ((False, a), (True, wide)):
        acc = int_products.exact_acc(values, None, a_wide, a, None, False, real)
        assert acc.dtype == torch.float64
        assert torch.equal(acc, values.double() @ a.double().t())
    whole = int_products.exact_acc(a, None, False, a, None, False, real)
    monkeypatch.setattr(int_products, "_INT_MM_DEPTH", 1000)
    monkeypatch.setattr(int_products, "_EXACT_FLOAT32_DEPTH", 1000)
    assert torch.equal(int_products.exact_acc(a, None, False, a, None, False, real), whole)


def test_symmetric_levels_need_no_offset() -> None:
    values = torch.tensor([[-127.0, 127.0]])
    operand = int_products.IntegerValues(values, torch.ones(1), torch.zeros(1), formats.Int(8))
    assert int_products.offsets(operand) is None


def test_per_channel_offsets_follow_the_rows() -> None:
    """CPT's weights: one zero point per output channel (the rows of the forward's right
    operand), each with its own shift."""
    spec = QuantSpec(formats.Int(8, signed=False), granularity=PerChannel(0), scale=MinMax())
    g = torch.Generator().manual_seed(2)
    w = torch.randn(5, 40, generator=g) + torch.arange(5.0).view(-1, 1)
    x = torch.randn(7, 40, generator=g)
    x_spec = QuantSpec(formats.Int(8))
    config = GemmConfig(x_spec, spec, products="int8-real")
    y = quantized_linear(x, w, None, config)
    vx, sx = _levels(x, x_spec)
    vw, sw = _levels(w, spec)
    exact = (vx @ vw.t()) * sx.reshape(()) * sw.reshape(1, -1)
    assert ((y.double() - exact).abs() <= 3.0001 * 2.0**-24 * exact.abs()).all()


@pytest.mark.parametrize(
    "config, roles",
    [
        (GemmConfig(QuantSpec(formats.Int(8)), QuantSpec(formats.Int(8))), {"forward"}),
        # 12 and 16 bits: two int8 limbs
        (GemmConfig(QuantSpec(formats.Int(12)), QuantSpec(formats.Int(16))), {"forward"}),
        # a minifloat operand
        (GemmConfig(QuantSpec(formats.FP8_E4M3), QuantSpec(formats.Int(8))), set()),
        # per-input-feature activations: the scale runs along the forward's reduction
        (
            GemmConfig(
                QuantSpec(formats.Int(8), granularity=PerChannel(1)), QuantSpec(formats.Int(8))
            ),
            set(),
        ),  # noqa: E501
        # NaN/inf passed through: not representable in int8
        (
            GemmConfig(QuantSpec(formats.Int(8), nonfinite="propagate"), QuantSpec(formats.Int(8))),
            set(),
        ),
        # a full-precision weight
        (GemmConfig(QuantSpec(formats.Int(8)), None), set()),
    ],
)
def test_which_products_qualify(config, roles) -> None:
    assert int_products.product_roles(_with(config, "int8"), conv=False, grad_dim=2) == roles


def test_float_products_autocast_and_other_dtypes_take_the_float_route() -> None:
    config = _with(QUANTIZERS["ui8"], "int8-real")
    x, w = torch.randn(4, 8), torch.randn(3, 8)
    assert IntegerRoute.of(_with(config, "float"), x, w, None) is None
    assert IntegerRoute.of(config, x.double(), w.double(), None) is None
    with torch.autocast("cpu", torch.bfloat16):
        assert IntegerRoute.of(config, x, w, None) is None
        y = quantized_linear(x, w, None, config)
        assert torch.equal(y, quantized_linear(x, w, None, _with(config, "float")))


@pytest.mark.parametrize("has_dot", [False, True])
def test_int8_picks_the_real_product_where_the_cpu_has_int8_units(monkeypatch, has_dot) -> None:
    monkeypatch.setattr(lowp_products, "cpu_has_int8_dot", lambda: has_dot)
    x, w = torch.randn(4, 8), torch.randn(3, 8)
    route = IntegerRoute.of(_with(QUANTIZERS["ui8"], "int8"), x, w, None)
    assert route.real is has_dot
    assert IntegerRoute.of(_with(QUANTIZERS["ui8"], "int8-twin"), x, w, None).real is False
    assert IntegerRoute.of(_with(QUANTIZERS["ui8"], "int8-real"), x, w, None).real is True


@pytest.mark.parametrize(
    "x",
    [
        torch.zeros(6, 10),
        torch.full((6, 10), 1e-30),
        torch.full((6, 10), 3e30),
        torch.randn(10, 6).t(),  # non-contiguous
        torch.randn(6, 10) * torch.tensor([0.0, 1.0] * 5),  # columns of zeros
    ],
    ids=["zeros", "tiny", "huge", "transposed", "zero-columns"],
)
def test_edge_inputs(x) -> None:
    config = QUANTIZERS["sbm8"]
    w = torch.randn(4, 10, generator=torch.Generator().manual_seed(0))
    real = _grads(lambda x, w: quantized_linear(x, w, None, _with(config, "int8-real")), (x, w))
    twin = _grads(lambda x, w: quantized_linear(x, w, None, _with(config, "int8-twin")), (x, w))
    floats = _grads(lambda x, w: quantized_linear(x, w, None, _with(config, "float")), (x, w))
    for a, b, f in zip(real, twin, floats, strict=True):
        assert torch.equal(a, b)
        assert torch.isfinite(a).all()
        if f.abs().max() > 0:
            assert _relative(a, f) < 1e-5
        else:
            assert a.abs().max() == 0


def test_nonfinite_inputs_still_raise() -> None:
    config = _with(QUANTIZERS["ui8"], "int8-real")
    x = torch.randn(4, 8)
    x[1, 2] = math.nan
    with pytest.raises(Exception, match="(?i)nan|non-finite|nonfinite"):
        quantized_linear(x, torch.randn(3, 8), None, config)


def test_products_survive_precision_schedules_and_serialisation() -> None:
    config = _with(QUANTIZERS["cpt-6/8"], "int8")
    from qtrain.ops import Precision

    assert config.with_precision(Precision(forward=4, backward=6)).products == "int8"
    assert config.with_floor({"input_spec": 8}).products == "int8"
    assert GemmConfig.from_dict(config.to_dict()) == config
    with pytest.raises(QuantSpecError, match="products must be one of float, int8"):
        GemmConfig(products="int4")


def small_cnn() -> nn.Module:
    """A small CNN (a grouped, strided conv among them), seeded."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 8, 3, stride=2, groups=2),
        nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 10),
    )  # fmt: skip


def _train(config: GemmConfig, steps: int = 4):
    from qtrain.api import QuantizedTrainingConfig

    return train_steps(quantize_(small_cnn(), QuantizedTrainingConfig(config)), steps)


def train_steps(model: nn.Module, steps: int = 4):
    """The losses of ``steps`` SGD steps of ``small_cnn``'s shape on fixed random batches, and
    the parameters after them."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        x, target = (
            torch.randn(16, 1, 14, 14, generator=g),
            torch.randint(0, 10, (16,), generator=g),
        )
        loss = F.cross_entropy(model(x), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses, [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("name", ["ui8", "sbm8", "cpt-6/8", "daint8"])
def test_training_on_the_real_products_is_the_twins_run(name) -> None:
    real = _train(_with(QUANTIZERS[name], "int8-real"))
    twin = _train(_with(QUANTIZERS[name], "int8-twin"))
    assert real[0] == twin[0]
    assert all(torch.equal(a, b) for a, b in zip(real[1], twin[1], strict=True))
    floats = _train(_with(QUANTIZERS[name], "float"))
    assert all(abs(a - b) < 1e-3 for a, b in zip(real[0], floats[0], strict=True))


def test_use_products_sets_every_quantized_layer() -> None:
    model = quantize_(nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2)), symmetric_quantization(8))
    assert use_products(model, "int8") == 2
    assert all(m.config.products == "int8" for m in model)
    assert model[0].base_config.input_spec == QUANTIZERS["ui8"].input_spec


def test_the_run_option_is_validated_and_refused_without_quantized_layers(tmp_path) -> None:
    with pytest.raises(TrainConfigError, match="unknown products 'int4'; choose from: float"):
        TrainConfig(model="cnn", data="synthetic", epochs=1, products="int4")
    from qtrain.recipes import build_recipe
    from qtrain.train.run import build

    config = TrainConfig(
        model="mlp", data="synthetic", epochs=1, products="int8", train_subset=64, test_subset=64
    )
    with pytest.raises(TrainConfigError, match="recipe fp32 has none"):
        build(config, build_recipe("fp32"))
    _, model = build(config, build_recipe("ui8"))
    products = {m.config.products for m in model.modules() if hasattr(m, "base_config")}
    assert products == {"int8"}


def test_per_tensor_and_rows_rules() -> None:
    spec = QuantSpec(formats.Int(8))
    assert int_products._rows_ok(spec, None)
    assert int_products._rows_ok(dataclasses.replace(spec, granularity=PerChannel(0)), 0)
    assert not int_products._rows_ok(dataclasses.replace(spec, granularity=PerChannel(0)), None)
    assert not int_products._rows_ok(dataclasses.replace(spec, granularity=PerChannel(1)), 0)
    assert isinstance(QUANTIZERS["ui8"].input_spec.granularity, PerTensor)
    assert QUANTIZERS["ui8"].grad_input_spec.rounding is Rounding.STOCHASTIC


def test_the_cli_runs_a_recipe_on_integer_products(tmp_path) -> None:
    import json

    from qtrain.cli import main

    out = tmp_path / "run"
    argv = ["train", "--recipe", "ui8", "--model", "mlp", "--data", "synthetic", "--epochs", "1"]
    argv += ["--train-subset", "64", "--test-subset", "32", "--products", "int8-twin"]
    assert main([*argv, "--out", str(out), "--quiet"]) == 0
    assert json.loads((out / "config.json").read_text())["train"]["products"] == "int8-twin"
    summary = json.loads((out / "summary.json").read_text())
    every = ["forward", "grad_input", "grad_weight"]
    assert summary["integer_products"] and all(
        roles == every for roles in summary["integer_products"].values()
    )
    assert main([*argv[:-1], "int4", "--out", str(tmp_path / "bad"), "--quiet"]) == 2
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("conv", [False, True], ids=["linear", "conv"])
def test_outputs_take_in_place_ops(conv) -> None:
    """A ReLU(inplace=True) after the layer (autograd refuses in-place ops on views that a
    custom Function returns)."""
    config = _with(QUANTIZERS["ui8"], "int8-twin")
    if conv:
        x, w, _ = _conv_tensors(GEOMETRIES[0])
        w.requires_grad_()
        y = quantized_conv2d(x, w, None, config, 1, 1)
    else:
        x, w = torch.randn(2, 5, 8), torch.randn(3, 8, requires_grad=True)
        y = quantized_linear(x, w, None, config)
    expected = torch.relu(y.detach())
    F.relu(y, inplace=True).sum().backward()
    assert torch.equal(y.detach(), expected)
    assert w.grad is not None


@pytest.mark.parametrize("name", ["sbm8", "daint8", "cpt-3/6", "sym-12"])
@pytest.mark.parametrize("real", [False, True], ids=["twin", "real"])
def test_conv_pieces_do_not_change_a_bit(name, real, monkeypatch) -> None:
    """Convolutions without groups run their products in pieces (rows, images, depth) of
    about _PIECE_BYTES / _DEPTH_PIECE_BYTES, grad-weight's depth at most _INT32_DEPTH rows,
    summed exactly: pieces of one row or image and depth pieces of 7 rows give the same bits."""
    from qtrain import int_products

    products = "int8-real" if real else "int8-twin"
    geometry = (5, 7, 3, 2, 1, 1, 1)
    tensors = _conv_tensors(geometry, channels_last=True, seed=3)
    fn = _conv_fn(_with(QUANTIZERS[name], products), geometry)
    whole = _grads(fn, tensors)
    monkeypatch.setattr(int_products, "_PIECE_BYTES", 1)
    monkeypatch.setattr(int_products, "_DEPTH_PIECE_BYTES", 1)
    monkeypatch.setattr(int_products, "_INT32_DEPTH", 7)
    for got, want in zip(_grads(fn, tensors), whole, strict=True):
        assert torch.equal(got, want)


def test_shifted_levels_are_the_limbs_of_every_piece() -> None:
    """Narrow operands are shifted into int8 once for the whole operand (``_shifted``; the
    convolutions' kernels move 1-byte levels): the same integers as ``_limbs`` makes of each
    piece, with one offset and with one per row of the product."""
    g = torch.Generator().manual_seed(3)
    u = torch.randint(-128, 128, (40, 6), generator=g).float()  # the shifted levels
    per_row = torch.tensor([120.0, 0.0, 5.0, 127.0, -3.0, 64.0], dtype=torch.float64)
    for offset in (None, torch.tensor([120.0], dtype=torch.float64), per_row):
        values = u if offset is None else u + offset.float()  # q − z, as x̂ gives them back
        shifted = int_products._shifted(values, offset, 1)
        assert torch.equal(shifted.float(), u)
        limb = int_products._limbs(values.t(), offset, False)[0][0][0]
        assert shifted.dtype == torch.int8 and torch.equal(shifted.t().float(), limb)
        ((limb_of_shifted, weight),), total = int_products._limbs(shifted.t(), offset, False)
        assert torch.equal(limb_of_shifted, shifted.t())
        assert weight == 1.0 and total is offset
    assert int_products._pad_value(None) == 0
    assert int_products._pad_value(torch.tensor([120.0], dtype=torch.float64)) == -120
