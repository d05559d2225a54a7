"""Cost meter: MACs per role, BitOPs, energy (METHODS.md §8) and weight storage bits, on
examples computed by hand."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qtrain import PerChannel, PerTensor, QLinear, QuantSpec, formats
from qtrain.cost import ROLES, CostMeter, StepCost, mac_energy_pj, model_bits
from qtrain.formats import BlockFloat
from qtrain.lowp import Float8TrainingConfig, Int8TrainingConfig, LowPrecisionLinear
from qtrain.ops import GemmConfig, Precision
from qtrain.protocol import QuantizedModule

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


class PerSampleLinear(nn.Linear):
    """A toy protocol layer whose last call ran 3 samples at 4 bits and 5 at 8 bits (DFQ's
    shape of answer); its weight is stored at 4 bits with no scale."""

    SAMPLES = [
        (3, {"forward": (4, 4), "grad_input": (8, 4), "grad_weight": (8, 4)}),
        (5, dict.fromkeys(ROLES, (8, 8))),
    ]

    def role_bits(self, float_bits: float = 32.0) -> dict[str, tuple[float, float]]:
        return dict.fromkeys(ROLES, (8, 8))

    def sample_role_bits(self):
        return self.SAMPLES

    def weight_storage_bits(self) -> int:
        return 4 * self.weight.numel()

    def quantized_weight(self) -> None:
        return None

    def to_float(self) -> nn.Linear:
        return self

    def set_precision(self, precision: Precision | None) -> None:
        pass

    def raise_floor(self) -> bool:
        return False

    def floor(self) -> dict[str, float]:
        return {}

    def set_floor(self, floor: dict[str, float]) -> None:
        pass


def test_per_sample_bits_split_a_calls_macs_by_sample():
    layer = PerSampleLinear(6, 5)
    assert isinstance(layer, QuantizedModule)
    meter = CostMeter(layer)
    x = torch.randn(8, 6, requires_grad=True)
    # 8 samples × 5 outputs × 6 inputs = 240 MACs: 30 a sample, 90 at the first bits, 150 at 8×8.
    cost = _step(layer, x, meter)
    assert cost.macs == dict.fromkeys(ROLES, 240)
    assert cost.bitops == {
        "forward": 90 * 4 * 4 + 150 * 8 * 8,
        "grad_input": 90 * 8 * 4 + 150 * 8 * 8,
        "grad_weight": 90 * 8 * 4 + 150 * 8 * 8,
    }
    assert cost.energy_pj == pytest.approx(3 * 240 * INT8_MAC)
    with torch.no_grad():
        layer(x)
    cost = meter.pop()
    assert cost.macs == {"forward": 240, "grad_input": 0, "grad_weight": 0}
    assert cost.bitops["forward"] == 90 * 4 * 4 + 150 * 8 * 8
    # Leading dims beyond the batch (a sequence): a sample is all its tokens.
    layer(torch.randn(8, 7, 6))
    assert meter.pop().bitops["forward"] == 7 * (90 * 4 * 4 + 150 * 8 * 8)
    with pytest.raises(ValueError, match="counts 8 samples for a batch of 4"):
        layer(torch.randn(4, 6))
    assert model_bits(layer) == 4 * 30 + 5 * 32  # its weight as it says, the bias at 32 bits


def test_low_precision_gemms_count_their_int8_and_fp8_bits():
    # The real int8/fp8 GEMM layers answer the protocol: their products count 8×8 (the
    # configured int8 bits), not the 32×32 of the nn.Linear they subclass.
    x = torch.randn(4, 8, requires_grad=True)
    macs = 4 * 8 * 3
    for config, forward, backward in (
        (Int8TrainingConfig(), 8 * 8, 8 * 8),
        (Int8TrainingConfig(bits=4, grad_bits=6), 4 * 4, 6 * 4),
        (Float8TrainingConfig(), 8 * 8, 8 * 8),
    ):
        layer = LowPrecisionLinear(8, 3, config=config)
        meter = CostMeter(layer)
        cost = _step(layer, x, meter)
        assert cost.bitops == {
            "forward": macs * forward,
            "grad_input": macs * backward,
            "grad_weight": macs * backward,
        }
        assert cost.energy_pj == pytest.approx(3 * macs * INT8_MAC)
    layer = LowPrecisionLinear(8, 3, config=Int8TrainingConfig())
    meter = CostMeter(layer)
    layer.set_precision(Precision(forward=4, backward=6))  # a schedule's bits are counted
    assert _step(layer, x, meter).bitops["forward"] == macs * 4 * 4
    with torch.autocast("cpu", dtype=torch.bfloat16):  # only products left in float go to 16
        partial = LowPrecisionLinear(8, 3, config=Int8TrainingConfig(forward=False))
        meter = CostMeter(partial)
        partial(x).float().sum().backward()
    assert meter.pop().bitops == {
        "forward": macs * 16 * 16,
        "grad_input": macs * 8 * 8,
        "grad_weight": macs * 8 * 8,
    }


def test_model_bits_of_low_precision_layers_are_values_and_scales():
    model = nn.Sequential(
        LowPrecisionLinear(8, 4, config=Int8TrainingConfig()),  # 32 int8 values + 4 row scales
        nn.ReLU(),
        LowPrecisionLinear(4, 6, config=Int8TrainingConfig(bits=4, granularity=PerTensor())),
        LowPrecisionLinear(6, 2, bias=False, config=Float8TrainingConfig()),  # + one scale
    )
    expected = (
        32 * 8 + 4 * 32 + 4 * 32  # int8 per row; fp32 bias
        + 24 * 4 + 32 + 6 * 32  # int4 per tensor: one scale; fp32 bias
        + 12 * 8 + 32  # fp8 per tensor
    )  # fmt: skip
    assert model_bits(model) == expected


def test_normalisation_layers_are_counted_per_output_element():
    from qtrain import MinMax, RangeBatchNorm2d, Rounding

    x = torch.randn(4, 3, 5, 5, requires_grad=True)
    elements = x.numel()  # the output has the input's shape
    plain = nn.BatchNorm2d(3)
    cost = _step(plain, x, CostMeter(plain))
    # Forward: the squares of the variance and the affine; grad-input 2, grad-weight (γ) 1.
    assert cost.macs == {"forward": 2 * elements, "grad_input": 2 * elements,
                         "grad_weight": elements}  # fmt: skip
    assert cost.total_bitops == 5 * elements * 32 * 32
    assert (cost.norm_macs, cost.norm_bitops) == (5 * elements, cost.total_bitops)

    input_spec = QuantSpec(formats.UINT8, scale=MinMax(batch_mean=True), clip_gradient=False)
    grad_spec = QuantSpec(formats.Int(6), scale=MinMax(), rounding=Rounding.STOCHASTIC)
    ranged = RangeBatchNorm2d(3, input_spec=input_spec, grad_spec=grad_spec)
    cost = _step(ranged, x, CostMeter(ranged))
    # Range BN: no squares; its quantized input and gradient are the narrow operand.
    assert cost.macs == {"forward": elements, "grad_input": 2 * elements,
                         "grad_weight": elements}  # fmt: skip
    assert cost.bitops == {"forward": elements * 8 * 32, "grad_input": 2 * elements * 6 * 32,
                           "grad_weight": elements * 6 * 32}  # fmt: skip
    assert cost.energy_pj == pytest.approx(4 * elements * FP32_MAC)  # a 32-bit coefficient
    frozen = nn.Sequential(nn.BatchNorm2d(3, affine=False))
    cost = _step(frozen, x, CostMeter(frozen))
    assert cost.macs["grad_weight"] == 0
    # Stored: γ and β at 32 bits (the running statistics are buffers, not the model).
    assert model_bits(ranged) == 2 * 3 * 32
    plain.eval()
    meter = CostMeter(plain)
    with torch.no_grad():
        plain(x)
    assert meter.pop().macs == {"forward": elements, "grad_input": 0, "grad_weight": 0}


def test_step_cost_of_a_checkpoint_without_norm_counts_loads():
    old = StepCost().to_dict()
    del old["macs_norm"], old["bitops_norm"]
    assert StepCost.from_dict(old).norm_bitops == 0.0
