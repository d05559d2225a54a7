"""The quantized-module protocol on the emulated layers: storage bits, integer weights,
``to_float``, and precision = configured bits, at a schedule's bits, above the guard's floor."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from qtrain import PerChannel, QConv2d, QLinear, QuantSpec, QuantSpecError, formats, quantize
from qtrain.ops import GemmConfig, Precision
from qtrain.protocol import QuantizedModule, is_quantized, quantized_layers, set_precision

INT8 = QuantSpec(formats.INT8)
UINT8 = QuantSpec(formats.UINT8)
CONFIG = GemmConfig(UINT8, INT8, INT8, QuantSpec(formats.Int(16)))


def _bits(layer: QuantizedModule) -> tuple[float, ...]:
    return tuple(layer.config.spec_bits().values())  # type: ignore[attr-defined]


def test_emulated_layers_follow_the_protocol() -> None:
    model = nn.Sequential(QConv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), QLinear(8, 2), nn.Linear(2, 2))
    assert [name for name, _ in quantized_layers(model)] == ["0", "3"]
    assert [is_quantized(m) for m in model] == [isinstance(m, QuantizedModule) for m in model]


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (INT8, 8 * 12 + 32),  # per tensor: one 32-bit scale
        (QuantSpec(formats.Int(4), granularity=PerChannel(0)), 4 * 12 + 3 * 32),
        (None, 32 * 12),
    ],
)
def test_weight_storage_bits(spec: QuantSpec | None, expected: int) -> None:
    assert QLinear(4, 3, config=GemmConfig(weight_spec=spec)).weight_storage_bits() == expected


@pytest.mark.parametrize(
    "spec", [QuantSpec(formats.Int(4)), QuantSpec(formats.Int(4), PerChannel(0))]
)
def test_quantized_weight_dequantizes_to_the_forward_weight(spec: QuantSpec) -> None:
    layer = QConv2d(3, 5, 3, config=GemmConfig(weight_spec=spec))
    packed = layer.quantized_weight()
    assert packed is not None and packed.bits == 4 and packed.signed
    assert packed.levels.abs().max() <= 7
    assert torch.equal(packed.dequantize(), quantize(layer.weight.detach(), spec))
    assert QLinear(2, 2).quantized_weight() is None  # no weight spec: nothing to export


def test_to_float_shares_the_parameters() -> None:
    layer = QConv2d(2, 4, 3, padding=1, stride=2, bias=False, config=CONFIG)
    plain = layer.to_float()
    assert type(plain) is nn.Conv2d and plain.weight is layer.weight and plain.bias is None
    assert (plain.stride, plain.padding) == ((2, 2), (1, 1))
    x = torch.randn(1, 2, 6, 6)
    assert torch.equal(plain(x), nn.functional.conv2d(x, layer.weight, None, 2, 1))


def test_schedule_sets_bits_and_none_goes_back_to_the_configured_ones() -> None:
    layer = QLinear(8, 4, config=CONFIG)
    layer.set_precision(Precision(forward=4, backward=6))
    assert _bits(layer) == (4, 4, 6, 6)
    layer.set_precision(Precision(forward=4, weight=2, backward=6, grad_weight=12))
    assert _bits(layer) == (4, 2, 6, 12)
    layer.set_precision(None)
    assert layer.config == CONFIG
    with pytest.raises(QuantSpecError, match="Precision.forward"):
        Precision(forward=0)


def test_a_schedule_never_goes_below_the_guards_floor() -> None:
    layer = QLinear(8, 4, config=CONFIG)
    layer.set_precision(Precision(forward=4, backward=4))
    assert layer.raise_floor()  # 4 -> 8 bits; the 4-bit grad-weight copy -> 8 too
    assert _bits(layer) == (8, 8, 8, 8)
    layer.set_precision(Precision(forward=4, backward=4))  # the next step's schedule
    assert _bits(layer) == (8, 8, 8, 8)
    layer.set_precision(Precision(forward=12, backward=4))  # above the floor: the schedule's
    assert _bits(layer) == (12, 12, 8, 8)
    assert layer.raise_floor() and layer.raise_floor()  # 12 -> 16 -> float
    assert _bits(layer) == (math.inf,) * 4
    assert not layer.raise_floor()


def test_floor_round_trips_onto_a_fresh_layer() -> None:
    layer = QLinear(8, 4, config=CONFIG)
    layer.raise_floor()
    fresh = QLinear(8, 4, config=CONFIG)
    fresh.set_floor(layer.floor())
    fresh.set_precision(Precision(forward=2, backward=2))
    assert fresh.config == layer.config


def test_set_precision_on_a_model_by_layer_name() -> None:
    model = nn.Sequential(QLinear(4, 4, config=CONFIG), QLinear(4, 4, config=CONFIG))
    set_precision(model, {"1": Precision(forward=3)})
    assert _bits(model[0]) == (8, 8, 8, 16) and _bits(model[1])[:2] == (3, 3)
    set_precision(model, Precision(backward=5))
    assert _bits(model[0])[2:] == _bits(model[1])[2:] == (5, 5)


def test_saved_levels_follow_the_bits() -> None:
    config = GemmConfig(UINT8, INT8, save_quantized_input=True)
    layer = QLinear(4, 4, config=config)
    layer.set_precision(Precision(forward=12))
    assert not layer.config.save_quantized_input  # int levels are kept only up to 8 bits
    layer.set_precision(Precision(forward=6))
    assert layer.config.save_quantized_input
