"""Cost meter: MACs per role, BitOPs, energy (METHODS.md §8) and weight storage bits, on
examples computed by hand."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qtrain import PerChannel, QLinear, QuantSpec, formats
from qtrain.cost import CostMeter, StepCost, mac_energy_pj, model_bits
from qtrain.formats import BlockFloat
from qtrain.ops import GemmConfig

INT8 = QuantSpec(formats.INT8)

# METHODS.md §8: pJ per multiply + add (Horowitz 2014, 45 nm).
INT8_MAC, FP16_MAC, FP32_MAC = 0.2 + 0.03, 1.1 + 0.4, 3.7 + 0.9


def _step(model: nn.Module, x: torch.Tensor, meter: CostMeter) -> StepCost:
    model(x).sum().backward()
    return meter.pop()


def test_linear_macs_by_hand():
    layer = nn.Linear(7, 4)
    meter = CostMeter(layer)
    x = torch.randn(5, 3, 7, requires_grad=True)
    cost = _step(layer, x, meter)
    macs = 5 * 3 * 4 * 7  # 15 rows, each 4 outputs of 7 products
    assert cost.macs == {"forward": 420, "grad_input": 420, "grad_weight": 420}
    assert macs == 420
    assert cost.bitops == {role: 420 * 32.0 * 32.0 for role in cost.bitops}
    assert cost.bitops_fp32 == cost.total_bitops == 3 * 420 * 1024


def test_conv2d_macs_by_hand_with_stride_padding_and_groups():
    layer = nn.Conv2d(6, 4, kernel_size=(3, 2), stride=2, padding=1, groups=2, bias=False)
    meter = CostMeter(layer)
    x = torch.randn(2, 6, 9, 8)  # the input needs no gradient: no grad-input product
    out = layer(x)
    # Output: H = (9 + 2 − 3)//2 + 1 = 5, W = (8 + 2 − 2)//2 + 1 = 5; each of the
    # 2·4·5·5 = 200 outputs sums (6/2 input channels)·3·2 = 18 products.
    assert out.shape == (2, 4, 5, 5)
    out.sum().backward()
    cost = meter.pop()
    assert cost.macs == {"forward": 3600, "grad_input": 0, "grad_weight": 3600}


def test_grad_roles_follow_what_needs_gradients():
    layer = nn.Linear(3, 2)
    meter = CostMeter(layer)
    x = torch.randn(4, 3)
    layer(x)  # input needs no grad: forward and grad-weight only
    assert meter.pop().macs == {"forward": 24, "grad_input": 0, "grad_weight": 24}
    layer.weight.requires_grad_(False)
    layer(x.requires_grad_(True))
    assert meter.pop().macs == {"forward": 24, "grad_input": 24, "grad_weight": 0}
    with torch.no_grad():
        layer(x)
    assert meter.pop().macs == {"forward": 24, "grad_input": 0, "grad_weight": 0}


def test_bits_come_from_a_quantized_layers_config():
    config = GemmConfig(INT8, INT8, INT8, QuantSpec(formats.Int(16)))
    layer = QLinear(8, 8, config=config)
    meter = CostMeter(layer)
    cost = _step(layer, torch.randn(2, 8, requires_grad=True), meter)
    macs = 2 * 8 * 8
    assert cost.macs == dict.fromkeys(("forward", "grad_input", "grad_weight"), macs)
    assert cost.bitops == {
        "forward": macs * 8 * 8,
        "grad_input": macs * 8 * 8,
        "grad_weight": macs * 16 * 8,  # the 16-bit copy of g_l times the 8-bit input
    }
    assert cost.total_bitops / cost.bitops_fp32 == pytest.approx((64 + 64 + 128) / (3 * 1024))
    assert cost.energy_pj == pytest.approx(macs * (2 * INT8_MAC + FP16_MAC))

    plain = QLinear(8, 8)  # all specs None: full precision
    plain_meter = CostMeter(plain)
    plain_cost = _step(plain, torch.randn(2, 8, requires_grad=True), plain_meter)
    assert plain_cost.bitops == dict.fromkeys(
        ("forward", "grad_input", "grad_weight"), macs * 32.0 * 32.0
    )
    assert plain_cost.energy_pj == pytest.approx(3 * macs * FP32_MAC)


def test_autocast_bf16_counts_16_bits():
    layer = nn.Linear(4, 3)
    meter = CostMeter(layer)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        layer(torch.randn(2, 4))
    cost = meter.pop()
    assert cost.bitops["forward"] == 24 * 16 * 16
    assert cost.energy_pj == pytest.approx(2 * 24 * FP16_MAC)  # forward + grad-weight


def test_energy_per_mac_by_operand_class():
    assert mac_energy_pj(8, 8) == pytest.approx(INT8_MAC)
    assert mac_energy_pj(4, 2) == pytest.approx(INT8_MAC)
    assert mac_energy_pj(16, 16) == pytest.approx(FP16_MAC)
    assert mac_energy_pj(8, 16) == pytest.approx(FP16_MAC)  # the wider operand decides
    assert mac_energy_pj(32, 8) == pytest.approx(FP32_MAC)
    assert mac_energy_pj(32, 32) == pytest.approx(FP32_MAC)


def test_paused_counts_nothing_and_pop_resets():
    layer = nn.Linear(4, 3)
    meter = CostMeter(layer)
    with meter.paused():
        layer(torch.randn(2, 4))
    assert meter.pop().total_macs == 0
    layer(torch.randn(2, 4))
    with meter.paused(), meter.paused():
        layer(torch.randn(5, 4))
    layer(torch.randn(1, 4))  # counting resumes after the (nested) pause
    assert meter.pop().macs["forward"] == 3 * 12
    assert meter.pop().total_macs == 0
    meter.remove()
    layer(torch.randn(2, 4))
    assert meter.pop().total_macs == 0


def test_costs_accumulate_and_serialise():
    total = StepCost()
    step = StepCost()
    step.add("forward", 10, 8, 8)
    step.add("grad_weight", 10, 16, 8)
    total += step
    total += step
    assert total.macs["forward"] == 20 and total.bitops["grad_weight"] == 2 * 10 * 16 * 8
    assert total.energy_pj == pytest.approx(2 * 10 * (INT8_MAC + FP16_MAC))
    again = StepCost.from_dict(total.to_dict())
    assert again.macs == total.macs and again.bitops == total.bitops
    assert again.energy_pj == pytest.approx(total.energy_pj)


def test_model_bits_for_quantized_and_plain_parameters():
    model = nn.Sequential(
        QLinear(8, 4, config=GemmConfig(weight_spec=INT8)),  # 32 weights at 8 bits + 1 scale
        nn.ReLU(),
        QLinear(
            4,
            6,
            config=GemmConfig(weight_spec=QuantSpec(formats.Int(4), granularity=PerChannel(0))),
        ),
        nn.Linear(6, 2),  # plain: 32 bits
        QLinear(2, 2, bias=False, config=GemmConfig(weight_spec=QuantSpec(formats.FP8_E4M3))),
        QLinear(2, 4, bias=False, config=GemmConfig(weight_spec=QuantSpec(BlockFloat(6, 2)))),
    )
    expected = (
        32 * 8
        + 32
        + 4 * 32  # int8 per tensor: one 32-bit scale; fp32 bias
        + 24 * 4
        + 6 * 32
        + 6 * 32  # int4 per channel: 6 scales
        + (12 + 2) * 32  # plain linear
        + 4 * 8  # fp8 cast: no scale
        + 8 * (6 + 8 / 2)  # block float: shared 8-bit exponents are in its bits per value
    )
    assert model_bits(model) == expected
    assert model_bits(nn.Linear(3, 2)) == 8 * 32


def test_model_bits_count_shared_weights_once():
    layer = QLinear(4, 4, bias=False, config=GemmConfig(weight_spec=INT8))
    model = nn.Sequential(layer, layer)
    assert model_bits(model) == 16 * 8 + 32


def test_quantized_layer_unquantized_roles_count_autocast_width():
    # A QLinear with only a weight spec: under bf16 autocast its float operands are 16-bit.
    layer = QLinear(4, 3, bias=False, config=GemmConfig(weight_spec=QuantSpec(formats.INT8)))
    meter = CostMeter(layer)
    x = torch.randn(2, 4, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        layer(x).float().sum().backward()
    cost = meter.pop()
    macs = 2 * 4 * 3
    assert cost.bitops["forward"] == macs * 16 * 8
    assert cost.bitops["grad_input"] == macs * 16 * 8
    assert cost.bitops["grad_weight"] == macs * 16 * 16
